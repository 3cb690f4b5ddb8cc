"""Shared quantization maths: scheme strings, integer grids, per-tensor/channel/group parameters.

Conventions (what export and effective-bit accounting rely on):
- a weight ``W`` is ``[out, in]``; groups run along ``in`` (``group_size`` consecutive inputs), the
  last group may be shorter when ``in`` is not a multiple of ``group_size``;
- symmetric: ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``, ``s = max|w| / (2^(b-1) - 1)``,
  zero point 0 (so weights use the restricted range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, as int8 kernels do); asymmetric: ``q = clamp(round(w / s) + z, 0, 2^b - 1)``, ``s = (max - min) / (2^b - 1)``
  with the range widened to include 0 so that 0 is exactly representable (pruned weights stay 0);
- dequantized ``ŵ = (q - z) · s``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import torch

from calibrant.errors import RecipeError

SCHEME_EXAMPLES = ("w4g128", "w4g64-asym", "w8-channel", "w4-tensor", "w8a8", "w4a8g128", "w3g64+lorc8", "w4g64-mse")
_SCHEME = re.compile(
    r"^w(?P<bits>\d+)"
    r"(?:a(?P<abits>\d+)(?P<atensor>t)?)?"
    r"(?:g(?P<group>\d+)|-(?P<gran>channel|tensor))?"
    r"(?P<flags>(?:-(?:asym|sym|mse))*)"
    r"(?:\+lorc(?P<rank>\d+))?$"
)


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 4
    group_size: int | None = None  # None: per output channel (or per tensor, see granularity)
    granularity: str = "channel"  # "tensor" | "channel" | "group"
    symmetric: bool = True
    clip: str = "none"  # "none" | "mse": search a shrunk range per group minimising the rounding error
    act_bits: int | None = None  # dynamic fake-quant of the linear's inputs
    act_granularity: str = "token"  # "token" | "tensor"
    lorc_rank: int = 0  # ZeroQuant-V2 low-rank compensation of the quantization error

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise RecipeError(f"weight bits {self.bits} outside 2–8; use e.g. w4g128 or w8-channel")
        if self.act_bits is not None and not 4 <= self.act_bits <= 8:
            raise RecipeError(f"activation bits {self.act_bits} outside 4–8; use e.g. w8a8 or w4a8")
        if self.group_size is not None and self.group_size < 1:
            raise RecipeError(f"group size {self.group_size} must be ≥ 1, e.g. w4g128")
        if self.lorc_rank < 0:
            raise RecipeError("LoRC rank must be ≥ 0")

    @property
    def name(self) -> str:
        """Canonical scheme string; ``parse_scheme(s.name) == s``."""
        s = f"w{self.bits}"
        if self.act_bits:
            s += f"a{self.act_bits}" + ("t" if self.act_granularity == "tensor" else "")
        s += f"g{self.group_size}" if self.granularity == "group" else f"-{self.granularity}"
        s += "" if self.symmetric else "-asym"
        s += "-mse" if self.clip == "mse" else ""
        s += f"+lorc{self.lorc_rank}" if self.lorc_rank else ""
        return s

    def effective_bits(self, shape: tuple[int, int]) -> float:
        """Bits per weight including scales (16 bit), zero points (``bits`` bit, asymmetric only) and LoRC factors (16 bit)."""
        rows, cols = shape
        per_group = 16 + (0 if self.symmetric else self.bits)
        if self.granularity == "tensor":
            overhead = per_group / (rows * cols)
        elif self.granularity == "channel":
            overhead = per_group / cols
        else:
            overhead = per_group * -(-cols // self.group_size) / cols
        lorc = 16 * self.lorc_rank * (rows + cols) / (rows * cols)
        return self.bits + overhead + lorc


def parse_scheme(text: str | QuantScheme) -> QuantScheme:
    """Parse a scheme string such as ``w4g128``, ``w4g64-asym``, ``w8-channel``, ``w8a8``, ``w3g64+lorc8``."""
    if isinstance(text, QuantScheme):
        return text
    m = _SCHEME.match(str(text).strip().lower())
    if not m:
        close = difflib.get_close_matches(str(text).lower(), SCHEME_EXAMPLES, n=1, cutoff=0.3)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(
            f"unknown scheme '{text}'.{hint} Form: w<bits>[a<bits>][g<size>|-channel|-tensor][-asym][-mse][+lorc<r>], "
            f"e.g. {', '.join(SCHEME_EXAMPLES[:5])}"
        )
    flags = set(filter(None, m["flags"].split("-")))
    if {"asym", "sym"} <= flags:
        raise RecipeError(f"scheme '{text}' says both -sym and -asym; pick one")
    if m["group"] is not None:
        granularity, group = "group", int(m["group"])
    else:
        granularity, group = m["gran"] or "channel", None
    return QuantScheme(
        bits=int(m["bits"]),
        group_size=group,
        granularity=granularity,
        symmetric="asym" not in flags,
        clip="mse" if "mse" in flags else "none",
        act_bits=int(m["abits"]) if m["abits"] else None,
        act_granularity="tensor" if m["atensor"] else "token",
        lorc_rank=int(m["rank"] or 0),
    )


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def qparams(w: torch.Tensor, bits: int, symmetric: bool, clip: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` ``[rows, k]`` → two ``[rows]`` tensors."""
    lo, hi = qrange(bits, symmetric)
    wmin = torch.clamp(w.min(dim=1).values, max=0.0)
    wmax = torch.clamp(w.max(dim=1).values, min=0.0)

    def from_range(mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if symmetric:
            scale = torch.maximum(mx, -mn) / hi
            zero = torch.zeros_like(scale)
        else:
            scale = (mx - mn) / (hi - lo)
            zero = torch.round(-mn / torch.where(scale > 0, scale, torch.ones_like(scale)))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: any scale works
        return scale, zero

    scale, zero = from_range(wmin, wmax)
    if clip == "mse":
        best = ((fake_quant(w, scale[:, None], zero[:, None], lo, hi) - w) ** 2).sum(1)
        for shrink in torch.linspace(0.95, 0.5, 10).tolist():
            s, z = from_range(wmin * shrink, wmax * shrink)
            err = ((fake_quant(w, s[:, None], z[:, None], lo, hi) - w) ** 2).sum(1)
            better = err < best
            scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.minimum(err, best)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, lo, hi)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, lo: int, hi: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``(clamp(round(w / s) + z, lo, hi) - z) · s``, computed in place in ``out`` when given (GPTQ's column
    loop); ``zero=None`` is a grid whose zero points are all 0 (symmetric), skipping the two additions."""
    q = torch.div(w, scale, out=out).round_()
    if zero is not None:
        q.add_(zero)
    q.clamp_(lo, hi)
    if zero is not None:
        q.sub_(zero)
    return q.mul_(scale)


def group_slices(cols: int, scheme: QuantScheme) -> list[tuple[int, int]]:
    """Column ranges sharing one scale: one for channel/tensor granularity, else groups (last may be short)."""
    if scheme.granularity != "group":
        return [(0, cols)]
    g = scheme.group_size
    return [(c, min(c + g, cols)) for c in range(0, cols, g)]


def weight_qparams(W: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points ``[rows, n_groups]`` of a whole weight (per-tensor: every row shares one)."""
    if scheme.granularity == "tensor":
        s, z = qparams(W.reshape(1, -1), scheme.bits, scheme.symmetric, scheme.clip)
        return s.expand(W.shape[0]).unsqueeze(1).clone(), z.expand(W.shape[0]).unsqueeze(1).clone()
    rows, cols = W.shape
    g = scheme.group_size if scheme.granularity == "group" else cols
    full = cols // g * g  # the full groups as the rows of one [rows·G, g] matrix (qparams is row-wise), then
    s, z = qparams(W[:, :full].reshape(rows * (full // g), g), scheme.bits, scheme.symmetric, scheme.clip)
    scales, zeros = [s.reshape(rows, -1)], [z.reshape(rows, -1)]
    if full < cols:  # the short last group
        s, z = qparams(W[:, full:], scheme.bits, scheme.symmetric, scheme.clip)
        scales.append(s[:, None])
        zeros.append(z[:, None])
    return torch.cat(scales, 1), torch.cat(zeros, 1)


def expand_groups(t: torch.Tensor, cols: int, scheme: QuantScheme) -> torch.Tensor:
    """``[rows, n_groups]`` → ``[rows, cols]``, each column taking its group's value."""
    sizes = [b - a for a, b in group_slices(cols, scheme)]
    return torch.repeat_interleave(t, torch.tensor(sizes, device=t.device), dim=1)


def fake_quant_weight(W: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of a whole weight: (dequantized weight, scales, zero points)."""
    scale, zero = weight_qparams(W, scheme)
    lo, hi = qrange(scheme.bits, scheme.symmetric)
    Wq = fake_quant(W, expand_groups(scale, W.shape[1], scheme), expand_groups(zero, W.shape[1], scheme), lo, hi)
    return Wq, scale, zero


def fake_quant_activations(x: torch.Tensor, bits: int, granularity: str = "token") -> torch.Tensor:
    """Dynamic symmetric fake-quant of activations, per token (last dim) or per tensor."""
    hi = 2 ** (bits - 1) - 1
    if granularity == "tensor":
        amax = x.abs().amax()
    else:
        amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.clamp(amax, min=1e-8) / hi
    return torch.clamp(torch.round(x / scale), -hi - 1, hi) * scale


def lorc(error: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``r`` approximation of the quantization error (ZeroQuant-V2's LoRC), to add back to ŵ."""
    if rank <= 0:
        return torch.zeros_like(error)
    U, S, Vh = torch.linalg.svd(error.double(), full_matrices=False)
    r = min(rank, S.numel())
    return ((U[:, :r] * S[:r]) @ Vh[:r]).to(error.dtype)
