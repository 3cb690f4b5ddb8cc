"""Float grids: FP8 E4M3 and FP4 E2M1 rounding, the ``fp8`` and ``nvfp4`` weight grids, their activations.

Simulated on any device with torch's ``float8_e4m3fn`` dtype (torch ≥ 2.1) and a bucketing of E2M1;
conventions are those of compressed-tensors (what vLLM reads), so that export writes the very numbers
computed here:

- E4M3 (``float8_e4m3fn``): 3 mantissa bits, largest finite 448, no infinities, subnormals down to
  2⁻⁹; E2M1: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}. Both round to nearest with ties to the even mantissa and
  **saturate**: a value beyond the largest is clamped to it, never turned into NaN;
- ``fp8`` weights: per output channel ``s = max|w_row| / 448``, ``ŵ = e4m3(w / s) · s``;
- ``nvfp4`` weights: a per-tensor *global* scale ``g = 448 · 6 / max|W|`` (a multiplier, as
  compressed-tensors stores ``weight_global_scale``), a per-16-block scale stored in E4M3,
  ``b = e4m3(g · max|block| / 6)``, and values ``ŵ = e2m1(w / e) · e`` with the block's effective scale
  ``e = b / g`` (one float32 division, as every reader computes it). Linears that vLLM fuses (q/k/v,
  gate/up) share one global scale, taken over all of them;
- activations: ``fp8`` per token ``s = max|x_token| / 448`` (dynamic), ``fp8-static`` one scale
  ``s = a / 448`` from the maximum ``a`` of ``|x|`` over the calibration tokens; ``nvfp4`` a static
  global ``g = 448 · 6 / a`` with dynamic E4M3 block scales per 16 inputs, as for weights (a block
  whose scale underflows E4M3 reads as zeros, as in vLLM; weight block scales are floored at 2⁻⁹ instead,
  since they are stored).
"""

from __future__ import annotations

import torch

from calibrant.errors import RecipeError

FLOAT8_TORCH = "2.1"  # the first torch with torch.float8_e4m3fn
E4M3_MAX = 448.0
E2M1_MAX = 6.0
E4M3_MIN_SUBNORMAL = 2.0**-9
NVFP4_BLOCK = 16


def require_float8(scheme: str) -> None:
    """Refuse a float scheme when the installed torch has no ``float8_e4m3fn`` (one line naming the fix)."""
    if getattr(torch, "float8_e4m3fn", None) is None:
        raise RecipeError(f"scheme {scheme} needs torch ≥ {FLOAT8_TORCH} (torch.float8_e4m3fn); the installed torch is "
                          f"{torch.__version__} — pip install 'torch>={FLOAT8_TORCH}', or use an integer scheme "
                          "such as w8a8 or w4g128")


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 value of each element (ties to even, saturating at ±448), in ``x``'s dtype.

    The clamp comes first: torch's cast is exact round-to-nearest-even below 448 but its overflow
    behaviour has differed between versions (NaN or saturation)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of each element (ties to even mantissa, saturating at ±6), in ``x``'s dtype.

    The grid's spacing is 0.5 on [0, 2), 1 on [2, 4) and 2 on [4, 6]; dividing by the spacing (a power
    of two: exact) and ``torch.round`` (half to even) gives ties to the even mantissa, since every
    binade starts at an even multiple of its spacing. The sign is kept, so −0.1 → −0."""
    a = x.abs().clamp_(max=E2M1_MAX)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)).to(x.dtype)
    return torch.copysign(a.div_(step).round_().mul_(step), x)


def round_float_(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """:func:`round_e4m3` (``fp8``) or :func:`round_e2m1` (``nvfp4``) of ``t``, written into ``t``."""
    return t.copy_(round_e4m3(t) if fmt == "fp8" else round_e2m1(t))


def fp8_channel_scale(W: torch.Tensor) -> torch.Tensor:
    """Per-row scale ``max|w| / 448`` ``[rows]`` (an all-zero row gets 1: any scale represents it)."""
    scale = W.abs().amax(dim=1) / E4M3_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """``448 · 6 / amax`` as a float32 ``[1]`` tensor; 1 where ``amax`` is 0 or not finite (nothing to scale)."""
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    # a tensor division (correctly rounded); ``scalar / tensor`` is computed as a reciprocal times the scalar
    g = torch.full_like(amax, E4M3_MAX * E2M1_MAX) / amax.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(torch.isfinite(g) & (amax > 0), g, torch.ones_like(g))


def nvfp4_block_scales(amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales ``e4m3(g · amax / 6)`` (float32 values on the E4M3 grid) for block maxima ``amax``.

    Floored at the smallest E4M3 subnormal, so that a scale never rounds to zero: an all-zero block
    gets 2⁻⁹ (its values stay 0), and a tiny non-zero one the finest scale there is."""
    raw = global_scale.to(torch.float32) * (amax.to(torch.float32) / E2M1_MAX)
    return round_e4m3(raw.clamp(min=E4M3_MIN_SUBNORMAL))


def nvfp4_effective(block_scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """The scale the E2M1 values are multiplied by: ``b / g`` in float32."""
    return block_scales.to(torch.float32) / global_scale.to(torch.float32)


def fp8_weight(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest ``fp8`` weight: (``ŵ`` in float32, per-row scales ``[rows, 1]``)."""
    W = W.to(torch.float32)
    scale = fp8_channel_scale(W)[:, None]
    return round_e4m3(W / scale) * scale, scale


def nvfp4_weight(W: torch.Tensor, global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """Round-to-nearest ``nvfp4`` weight: (``ŵ`` in float32, E4M3 block scales ``[rows, cols / 16]``, the
    global scale ``[1]``). ``global_scale`` defaults to this weight's own (pass a shared one for fused
    linears). ``cols`` need not be a multiple of 16 (the last block is then short; export refuses it)."""
    W = W.to(torch.float32)
    if global_scale is None:
        global_scale = nvfp4_global_scale(W.abs().amax() if W.numel() else 0.0)
    global_scale = global_scale.to(W.device)
    blocks = [W[:, c:c + NVFP4_BLOCK] for c in range(0, W.shape[1], NVFP4_BLOCK)]
    amax = torch.stack([b.abs().amax(dim=1) for b in blocks], dim=1)
    scales = nvfp4_block_scales(amax, global_scale)
    eff = torch.repeat_interleave(nvfp4_effective(scales, global_scale),
                                  torch.tensor([b.shape[1] for b in blocks], device=W.device), dim=1)
    return round_e2m1(W / eff) * eff, scales, global_scale


def fp8_activations(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 fake-quant of activations: per token (last dim) when ``scale`` is None, else with that static scale."""
    if scale is None:
        scale = x.abs().amax(dim=-1, keepdim=True).to(torch.float32) / E4M3_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(x.device)
    return (round_e4m3(x.to(torch.float32) / scale) * scale).to(x.dtype)


def nvfp4_activations(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake-quant of activations: dynamic E4M3 scales per 16 inputs under the static ``global_scale``.
    The last dim must be a multiple of 16 (the input width of a linear that nvfp4 can serve)."""
    shape = x.shape
    if shape[-1] % NVFP4_BLOCK:
        raise RecipeError(f"nvfp4 quantizes activations in blocks of {NVFP4_BLOCK}, but this linear reads "
                          f"{shape[-1]} inputs; exclude it (--exclude) or use fp8")
    xb = x.to(torch.float32).reshape(*shape[:-1], shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    g = global_scale.to(device=x.device, dtype=torch.float32)
    blocks = round_e4m3(g * (xb.abs().amax(dim=-1, keepdim=True) / E2M1_MAX))
    # a block whose scale underflows E4M3 is all zeros, as vLLM's kernel and compressed-tensors make it
    nonzero = blocks > 0
    eff = nvfp4_effective(torch.where(nonzero, blocks, torch.ones_like(blocks)), g)
    return (round_e2m1(xb / eff) * eff * nonzero).reshape(shape).to(x.dtype)
