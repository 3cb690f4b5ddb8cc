"""The method interface: what statistics a method needs, and how it rewrites one linear layer.

A method never loads data or models. The engine streams each linear layer's calibration inputs into
a :class:`LayerStats` (shared by linears that read the same tensor, e.g. q/k/v), then calls
``method.compress(weight, stats, ctx)`` with the layer's weight as a float32 ``[out, in]`` matrix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from calibrant.errors import NumericalError

Need = Literal["none", "norms", "hessian"]
_ORDER = {"none": 0, "norms": 1, "hessian": 2}


def max_need(needs: list[Need]) -> Need:
    return max(needs, key=_ORDER.__getitem__, default="none")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf in ``t``: one min/max pass (NaN propagates to both), 7–10x faster than
    ``isfinite(t).all()``, which writes a boolean tensor first (bench/gptq_kernels.py)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run a loop of tiny tensor ops on one CPU thread.

    Column-by-column solvers (OBS, GPTQ) issue thousands of ops on a few hundred kB each; intra-op
    threading only adds synchronisation, and when another process holds a core the threads' spin
    waits make it 40x slower (measured: 0.06 s vs 2.8 s for one 960x576 GPTQ solve). No effect on CUDA.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class LayerStats:
    """Streaming statistics of a linear layer's input ``x`` over all calibration tokens.

    ``sq_norms[j] = Σ_t x_tj²`` (Wanda's ‖X_j‖₂²) and, when asked for, ``hessian = Σ_t x_t x_tᵀ``
    (XᵀX), both accumulated in float32 without storing any activation. ``cache`` lets methods keep
    derived quantities (a damped Cholesky inverse) shared by every linear reading this input.
    """

    def __init__(self, dim: int, need: Need, device: torch.device | str = "cpu"):
        self.dim = dim
        self.need = need
        self.tokens = 0
        self._sq = torch.zeros(dim, dtype=torch.float32, device=device) if need == "norms" else None
        self._h = torch.zeros(dim, dim, dtype=torch.float32, device=device) if need == "hessian" else None
        self._lower_stale = False
        self.cache: dict[str, Any] = {}

    # XᵀX is symmetric: for wide inputs only the tiles on and above the diagonal are accumulated (k column
    # chunks: k(k+1)/2 of k² products) and mirrored once when read; faster than one GEMM from 576 columns
    # on (bench/gptq_kernels.py). GPUs run the one GEMM.
    TRIANGULAR_MIN_DIM = 512

    @property
    def _chunks(self) -> int:
        return 4 if self.dim < 1024 else 6

    @property
    def hessian(self) -> torch.Tensor | None:
        if self._h is not None and self._lower_stale:  # copy each tile above the diagonal to its mirror
            bounds = self._chunk_bounds()
            for i in range(self._chunks):
                a0, a1 = bounds[i], bounds[i + 1]
                self._h[a1:, a0:a1].copy_(self._h[a0:a1, a1:].t())
                tile = self._h[a0:a1, a0:a1]  # a full GEMM: symmetric up to rounding, made exactly so
                tile.copy_(torch.triu(tile) + torch.triu(tile, 1).t())
            self._lower_stale = False
        return self._h

    def _chunk_bounds(self) -> list[int]:
        return [self.dim * i // self._chunks for i in range(self._chunks + 1)]

    @hessian.setter
    def hessian(self, value: torch.Tensor | None) -> None:
        self._h = value
        self._lower_stale = False

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.dim).to(torch.float32)
        self.tokens += x.shape[0]
        if self._h is not None:
            if self.dim < self.TRIANGULAR_MIN_DIM or x.device.type != "cpu":  # GPUs: one big GEMM is faster
                self._h.addmm_(x.t(), x)
                return
            bounds = self._chunk_bounds()
            for i in range(self._chunks):  # the diagonal tiles in full, the tiles right of them
                a0, a1 = bounds[i], bounds[i + 1]
                xa = x[:, a0:a1]
                self._h[a0:a1, a0:].addmm_(xa.t(), x[:, a0:])
            self._lower_stale = True
        elif self._sq is not None:
            self._sq.add_(x.square().sum(0))

    def release(self) -> None:
        """Drop the statistics and everything derived from them (once their linears are compressed)."""
        self._h = self._sq = None
        self._lower_stale = False
        self.cache.clear()

    @property
    def sq_norms(self) -> torch.Tensor:
        if self.hessian is not None:
            return torch.diagonal(self.hessian).clone()
        if self._sq is None:
            raise RuntimeError("these statistics were collected without activation norms")
        return self._sq

    def check_finite(self, where: str) -> None:
        t = self.hessian if self.hessian is not None else self._sq
        if t is not None and not all_finite(t):
            raise NumericalError(
                f"calibration activations entering {where} contain NaN/Inf; the model overflows on this "
                "calibration data — load it in float32 or use other calibration text"
            )


@dataclass
class LayerContext:
    """Per-layer state handed from one method of a recipe to the next, plus what goes in the report."""

    name: str
    mask: torch.Tensor | None = None  # True where a weight was pruned; later methods keep those zero
    quant: dict[str, Any] | None = None  # scheme, scales, zero points, g_idx of a quantized weight (for export)
    sq_error: float | None = None  # ‖(W − Ŵ)X‖² over the calibration tokens, W as the method received it, if known
    info: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set ``name`` and ``needs`` and implement :meth:`compress`."""

    name: ClassVar[str]
    needs: ClassVar[Need] = "none"

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def validate(self, name: str, shape: tuple[int, int]) -> None:
        """Raise RecipeError before any layer is touched if this layer cannot be served."""

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        raise NotImplementedError

    def compress_group(
        self, weights: list[torch.Tensor], stats: LayerStats | None, ctxs: list[LayerContext]
    ) -> list[torch.Tensor]:
        """Compress linears that read the same input (q/k/v, gate/up). Methods whose maths is row-wise
        independent override this to solve them as one stacked matrix."""
        return [self.compress(w, stats, c) for w, c in zip(weights, ctxs, strict=True)]

    def describe(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.params().items() if v is not None)
        return f"{self.name}({inner})"
