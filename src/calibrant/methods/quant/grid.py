"""Integer grids: per-tensor/channel/group parameters, round-to-nearest, activation fake-quant, LoRC.

Conventions (what export and effective-bit accounting rely on):
- a weight ``W`` is ``[out, in]``; groups run along ``in`` (``group_size`` consecutive inputs), the
  last group may be shorter when ``in`` is not a multiple of ``group_size``;
- symmetric: ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``, ``s = max|w| / (2^(b-1) - 1)``,
  zero point 0 (so weights use the restricted range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, as int8 kernels do); asymmetric: ``q = clamp(round(w / s) + z, 0, 2^b - 1)``, ``s = (max - min) / (2^b - 1)``
  with the range widened to include 0 so that 0 is exactly representable (pruned weights stay 0);
- dequantized ``ŵ = (q - z) · s``.
"""

from __future__ import annotations

import torch

from calibrant.methods.quant.scheme import QuantScheme


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
    """Round-to-nearest of a whole weight: (dequantized weight, scales, zero points). On a GGUF grid it is
    llama.cpp's own rounding, and the "zero points" are the blocks' float16 minima (0 for the symmetric types)."""
    if scheme.gguf is not None:
        from calibrant.methods.quant.ggufgrid import gguf_weight

        Wq, d16, m16 = gguf_weight(W, scheme.gguf)
        return Wq.to(W.dtype), d16, m16
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
