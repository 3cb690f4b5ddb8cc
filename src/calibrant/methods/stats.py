"""Statistics of a linear layer's input, streamed over the calibration tokens: small observers.

A method lists the statistics it needs by key (``Method.statistics``); the engine makes one
:class:`LayerStats` per distinct input tensor (q/k/v read one, gate/up another), streams every
calibration batch into it once, and hands it to each linear that reads that input. A statistic is a
class with ``update(x)`` and ``result()``; subclassing :class:`Statistic` with a new ``key``
registers it, so adding one never edits the engine. Everything accumulates in float32 (XᵀX) or
wider, without keeping activations (the row sample keeps a bounded number of rows).

Worked example — the per-channel mean of |x| (AWQ's activation salience) is::

    class MeanAbs(Statistic):
        key = "mean_abs"

        def __init__(self, dim, device):
            self._sum = torch.zeros(dim, dtype=torch.float64, device=device)
            self._tokens = 0

        def update(self, x):
            self._sum += x.abs().sum(0, dtype=torch.float64)
            self._tokens += x.shape[0]

        def result(self):
            return (self._sum / max(self._tokens, 1)).float()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from calibrant.errors import NumericalError, RecipeError

STATISTICS: dict[str, type[Statistic]] = {}


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf in ``t``: one min/max pass (NaN propagates to both), several times faster than
    ``isfinite(t).all()``, which writes a boolean tensor first (bench/gptq_kernels.py)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


class Statistic:
    """One streamed statistic over ``x`` of shape ``[tokens, dim]`` (float32). Subclasses set ``key``.

    ``derived_from``: the key of a statistic this one can be read from exactly when both are asked for
    (then only that one is accumulated and :meth:`derive` reads it), e.g. Σx² is XᵀX's diagonal.
    """

    key: ClassVar[str]
    derived_from: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "key" in cls.__dict__:
            STATISTICS[cls.key] = cls

    def __init__(self, dim: int, device: torch.device | str) -> None:
        self.dim = dim

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> Any:
        raise NotImplementedError

    @classmethod
    def derive(cls, source: Statistic) -> Any:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        """The accumulators, for the finiteness check."""
        return [v for v in vars(self).values() if isinstance(v, torch.Tensor)]


class Hessian(Statistic):
    """``XᵀX = Σ_t x_t x_tᵀ`` [dim, dim] in float32 (GPTQ, SparseGPT, SpQR).

    XᵀX is symmetric: for wide inputs on CPU only the tiles on and above the diagonal are accumulated
    (k column chunks: k(k+1)/2 of k² products) and mirrored once when read; faster than one GEMM from
    576 columns on (bench/gptq_kernels.py). GPUs run the one GEMM."""

    key = "hessian"
    TRIANGULAR_MIN_DIM = 512

    def __init__(self, dim: int, device: torch.device | str) -> None:
        super().__init__(dim, device)
        # allocated at the first update (or read): a block's groups are all created before its forwards, and a
        # 7 B down-projection's XᵀX (0.5 GB) need not be resident while the groups before it are solved
        self._h: torch.Tensor | None = None
        self._device = device
        self._allocated = False
        self._lower_stale = False
        self._chunks = 4 if dim < 1024 else 6

    def _chunk_bounds(self) -> list[int]:
        return [self.dim * i // self._chunks for i in range(self._chunks + 1)]

    def _matrix(self) -> torch.Tensor | None:
        if not self._allocated:
            self._h = torch.zeros(self.dim, self.dim, dtype=torch.float32, device=self._device)
            self._allocated = True
        return self._h

    def update(self, x: torch.Tensor) -> None:
        h = self._matrix()
        assert h is not None
        if self.dim < self.TRIANGULAR_MIN_DIM or x.device.type != "cpu":
            h.addmm_(x.t(), x)
            return
        bounds = self._chunk_bounds()
        for i in range(self._chunks):  # the diagonal tiles in full, the tiles right of them
            a0, a1 = bounds[i], bounds[i + 1]
            h[a0:a1, a0:].addmm_(x[:, a0:a1].t(), x[:, a0:])
        self._lower_stale = True

    def result(self) -> torch.Tensor | None:
        self._matrix()
        if self._h is not None and self._lower_stale:  # copy each tile above the diagonal to its mirror
            bounds = self._chunk_bounds()
            for i in range(self._chunks):
                a0, a1 = bounds[i], bounds[i + 1]
                self._h[a1:, a0:a1].copy_(self._h[a0:a1, a1:].t())
                tile = self._h[a0:a1, a0:a1]  # a full GEMM: symmetric up to rounding, made exactly so
                tile.copy_(torch.triu(tile) + torch.triu(tile, 1).t())
            self._lower_stale = False
        return self._h

    def replace(self, value: torch.Tensor | None) -> None:
        self._h = value
        self._allocated = True
        self._lower_stale = False


class SqNorms(Statistic):
    """``Σ_t x_tj²`` per input channel [dim] (Wanda's ‖X_j‖₂²); XᵀX's diagonal when XᵀX is collected."""

    key = "sq_norms"
    derived_from = "hessian"

    def __init__(self, dim: int, device: torch.device | str) -> None:
        super().__init__(dim, device)
        self._sq = torch.zeros(dim, dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor) -> None:
        self._sq.add_(x.square().sum(0))

    def result(self) -> torch.Tensor:
        return self._sq

    @classmethod
    def derive(cls, source: Statistic) -> torch.Tensor:
        return torch.diagonal(source.result()).clone()


class MeanAbs(Statistic):
    """Mean ``|x_j|`` over tokens per input channel [dim] (AWQ's activation salience)."""

    key = "mean_abs"

    def __init__(self, dim: int, device: torch.device | str) -> None:
        super().__init__(dim, device)
        self._sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self._tokens = 0

    def update(self, x: torch.Tensor) -> None:
        self._sum += x.abs().sum(0, dtype=torch.float64)
        self._tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        return (self._sum / max(self._tokens, 1)).float()


class MaxAbs(Statistic):
    """``max_t |x_tj|`` per input channel [dim] (SmoothQuant's activation range)."""

    key = "max_abs"

    def __init__(self, dim: int, device: torch.device | str) -> None:
        super().__init__(dim, device)
        self._max = torch.zeros(dim, dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor) -> None:
        torch.maximum(self._max, x.abs().amax(0), out=self._max)

    def result(self) -> torch.Tensor:
        return self._max


class OutlierCounts(Statistic):
    """Per input channel, how many tokens have ``|x_tj| > THRESHOLD`` (LLM.int8's outlier criterion)."""

    key = "outlier_counts"
    THRESHOLD = 6.0

    def __init__(self, dim: int, device: torch.device | str) -> None:
        super().__init__(dim, device)
        self._count = torch.zeros(dim, dtype=torch.int64, device=device)

    def update(self, x: torch.Tensor) -> None:
        self._count += (x.abs() > self.THRESHOLD).sum(0)

    def result(self) -> torch.Tensor:
        return self._count


class RowSample(Statistic):
    """A uniform random sample of at most ``CAPACITY`` input rows [k, dim] (reservoir sampling, seeded),
    for methods that evaluate candidate transforms on real inputs without keeping every token."""

    key = "rows"
    CAPACITY = 2048
    SEED = 0

    def __init__(self, dim: int, device: torch.device | str) -> None:
        super().__init__(dim, device)
        self._rows = torch.empty(0, dim, dtype=torch.float32, device=device)
        self._seen = 0
        self._gen = torch.Generator().manual_seed(self.SEED)

    def update(self, x: torch.Tensor) -> None:
        free = self.CAPACITY - self._rows.shape[0]
        if free > 0:
            head, x = x[:free], x[free:]
            self._rows = torch.cat([self._rows, head])
            self._seen += head.shape[0]
        if x.shape[0] == 0:
            return
        # each later row t (1-based count) replaces a random slot with probability CAPACITY / t
        t = torch.arange(self._seen + 1, self._seen + x.shape[0] + 1, dtype=torch.float64)
        keep = torch.rand(x.shape[0], generator=self._gen, dtype=torch.float64) < self.CAPACITY / t
        slots = torch.randint(self.CAPACITY, (x.shape[0],), generator=self._gen)
        for row in torch.nonzero(keep).flatten().tolist():  # in order: a later row may overwrite an earlier
            self._rows[int(slots[row])] = x[row]
        self._seen += x.shape[0]

    def result(self) -> torch.Tensor:
        return self._rows


def _keys(needs: str | Iterable[str]) -> set[str]:
    keys = {needs} if isinstance(needs, str) else set(needs)
    unknown = keys - set(STATISTICS)
    if unknown:
        raise RecipeError(f"unknown statistic {', '.join(sorted(unknown))}; known: {', '.join(sorted(STATISTICS))}")
    return keys


class LayerStats:
    """The statistics of one input tensor of a block, shared by every linear that reads it.

    ``needs``: statistic keys (``"hessian"``, ``"sq_norms"``, ``"mean_abs"``, ...). ``cache`` lets methods
    keep derived quantities (a damped Cholesky factor) shared by those linears.
    """

    def __init__(self, dim: int, needs: str | Iterable[str] = (), device: torch.device | str = "cpu"):
        keys = _keys(needs)
        self.dim = dim
        self.keys = frozenset(keys)
        self.tokens = 0
        self._observers = {k: STATISTICS[k](dim, device) for k in sorted(keys)
                           if STATISTICS[k].derived_from not in keys}
        self.cache: dict[str, Any] = {}

    @torch.no_grad()
    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Stream ``x`` (``[..., dim]``); with ``mask`` (one flag per token of ``x``) only the flagged tokens."""
        x = x.reshape(-1, self.dim)
        if mask is not None:
            flags = mask.reshape(-1).to(x.device)
            if flags.numel() != x.shape[0]:
                raise RecipeError(f"a token mask of {flags.numel()} flags does not match the {x.shape[0]} tokens "
                                  "reaching this linear; token masks need linears that see [batch, length, dim]")
            x = x[flags]
        x = x.to(torch.float32)
        self.tokens += x.shape[0]
        for obs in self._observers.values():
            obs.update(x)

    def get(self, key: str) -> Any:
        """The result of statistic ``key`` (computed from another one where it derives from it)."""
        if key in self._observers:
            return self._observers[key].result()
        source = STATISTICS[key].derived_from if key in STATISTICS else None
        if key in self.keys and source in self._observers:
            return STATISTICS[key].derive(self._observers[source])
        raise RecipeError(f"the statistic '{key}' was not collected for this layer (collected: "
                          f"{', '.join(sorted(self.keys)) or 'none'}); list it in the method's `statistics`")

    @property
    def hessian(self) -> torch.Tensor | None:
        obs = self._observers.get("hessian")
        return obs.result() if obs is not None else None

    @hessian.setter
    def hessian(self, value: torch.Tensor | None) -> None:
        obs = self._observers.get("hessian")
        if obs is None:
            raise RecipeError("these statistics were collected without XᵀX")
        obs.replace(value)  # type: ignore[attr-defined]

    @property
    def sq_norms(self) -> torch.Tensor:
        return self.get("sq_norms")

    def release(self) -> None:
        """Drop the statistics and everything derived from them (once their linears are compressed)."""
        self._observers.clear()
        self.cache.clear()

    def check_finite(self, where: str) -> None:
        for key, obs in self._observers.items():
            if key == "hessian":
                obs.result()  # mirror first: the check reads the whole matrix
            if not all(all_finite(t) for t in obs.tensors() if t.is_floating_point()):
                raise NumericalError(
                    f"calibration activations entering {where} contain NaN/Inf; the model overflows on this "
                    "calibration data — load it in float32 or use other calibration text"
                )
