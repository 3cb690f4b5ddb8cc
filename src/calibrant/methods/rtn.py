"""Round-to-nearest quantization: the data-free baseline of every PTQ study.

Integer grids, GGUF grids (llama.cpp's own rounding, :mod:`calibrant.methods.quant.ggufgrid`) and ``fp8`` read
no data; ``fp8-static`` and ``nvfp4`` calibrate their activation scale
from the largest ``|x|`` each linear sees over the calibration tokens (the ``max_abs`` statistic)."""

from __future__ import annotations

import torch

from calibrant.errors import RecipeError
from calibrant.methods.base import LayerContext, LayerStats, Method
from calibrant.methods.quant import (
    QuantState,
    fake_quant_weight,
    fp8_weight,
    lorc,
    nvfp4_global_scale,
    nvfp4_weight,
    parse_scheme,
)
from calibrant.methods.quant.scheme import QuantScheme

SCHEME_HELP = ("quantization scheme: w4g128, w4g64-asym, w8-channel, w8a8, w3g64+lorc8, fp8, fp8-static, nvfp4, "
               "gguf-q4_0 (q4_1, q5_0, q5_1, q8_0: llama.cpp's grids), ... (default w4g128)")


def input_amax(scheme: QuantScheme, stats: LayerStats | None) -> torch.Tensor | None:
    """The largest ``|x|`` over the calibration tokens ``[1]`` for a scheme with a static activation scale."""
    if not scheme.act_static:
        return None
    if stats is None:
        raise RecipeError(f"scheme {scheme.name} calibrates its activation scale and needs calibration data; pass a "
                          "calibration set (or use fp8, whose activation scales are dynamic)")
    return stats.get("max_abs").amax().reshape(1).to(torch.float32).cpu()


def gguf_fallback(scheme: QuantScheme, shape: tuple[int, int]) -> str | None:
    """A linear a GGUF grid cannot hold (its input width is not a multiple of the block): it stays unquantized
    (the GGUF file stores it F16), for this reason."""
    if scheme.gguf is not None and shape[1] % scheme.group_size:
        return f"{shape[1]} inputs are not a multiple of {scheme.name}'s blocks of {scheme.group_size}"
    return None


def check_block_width(scheme: QuantScheme, name: str, shape: tuple[int, int]) -> None:
    """nvfp4 quantizes inputs in blocks of 16: refuse, before any work, a linear whose input width is not a
    multiple (GGUF grids fall back instead: :func:`gguf_fallback`)."""
    if scheme.fmt == "nvfp4" and shape[1] % scheme.group_size:
        raise RecipeError(f"nvfp4 quantizes weights and inputs in blocks of {scheme.group_size}, but {name} reads "
                          f"{shape[1]} inputs; exclude it (--exclude), or use fp8")


def check_gguf_mask(scheme: QuantScheme, ctxs: list[LayerContext]) -> None:
    """The affine GGUF grids (q4_1, q5_1) have no exact zero: refuse them after pruning."""
    kind = scheme.gguf
    if kind is not None and kind.affine and any(c.mask is not None for c in ctxs):
        raise RecipeError(f"{scheme.name} stores min + d·q per block, which cannot keep pruned weights exactly 0; "
                          "after pruning use gguf-q4_0, gguf-q5_0 or gguf-q8_0")


def float_quantize(weights: list[torch.Tensor], scheme: QuantScheme) -> list[tuple[torch.Tensor, QuantState]]:
    """Round-to-nearest of linears reading one input on a float grid; nvfp4's global scale is shared by
    them (vLLM fuses q/k/v and gate/up into one matrix with one global scale)."""
    out = []
    if scheme.fmt == "nvfp4":
        amax = torch.stack([w.abs().amax() for w in weights]).amax() if weights[0].numel() else 0.0
        shared = nvfp4_global_scale(amax)
        for w in weights:
            Wq, scales, g = nvfp4_weight(w, shared)
            out.append((Wq, QuantState(scheme, scales, torch.zeros_like(scales), global_scale=g.cpu())))
    else:
        for w in weights:
            Wq, scale = fp8_weight(w)
            out.append((Wq, QuantState(scheme, scale, torch.zeros_like(scale))))
    return out


class RTN(Method):
    name = "rtn"
    relative_cost = 0.1  # data-free
    param_help = {"scheme": SCHEME_HELP}

    def __init__(self, scheme: str = "w4g128"):
        self._scheme = parse_scheme(scheme)
        self.scheme = self._scheme.name

    @property
    def statistics(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("max_abs",) if self._scheme.act_static else ()

    def quant_plan(self) -> QuantState:
        return QuantState(self._scheme)

    def validate(self, name: str, shape: tuple[int, int]) -> None:
        check_block_width(self._scheme, name, shape)

    def fallback(self, name: str, shape: tuple[int, int]) -> str | None:
        return gguf_fallback(self._scheme, shape)

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        return self.compress_group([weight], stats, [ctx])[0]

    def compress_group(
        self, weights: list[torch.Tensor], stats: LayerStats | None, ctxs: list[LayerContext]
    ) -> list[torch.Tensor]:
        scheme = self._scheme
        check_gguf_mask(scheme, ctxs)
        if scheme.float_fmt:
            amax = input_amax(scheme, stats)
            outs = []
            for (Wq, state), ctx in zip(float_quantize(weights, scheme), ctxs, strict=True):
                if ctx.mask is not None:
                    Wq = Wq.masked_fill(ctx.mask, 0.0)
                state.input_amax = amax
                ctx.quant = state
                outs.append(Wq)
            return outs
        return [self._compress_grid(w, c) for w, c in zip(weights, ctxs, strict=True)]

    def _compress_grid(self, weight: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """An integer or GGUF grid (the GGUF types' scales and minima kept as the state's scale and zero)."""
        scheme = self._scheme
        if scheme.lorc_rank and ctx.mask is not None:
            raise RecipeError("LoRC cannot follow pruning: the rank-r correction would fill the pruned weights")
        Wq, scale, zero = fake_quant_weight(weight, scheme)
        if ctx.mask is not None:
            Wq = Wq.masked_fill(ctx.mask, 0.0)  # 0 is on every grid; explicit all the same
        if scheme.lorc_rank:
            Wq = Wq + lorc(weight - Wq, scheme.lorc_rank)
        g_idx = None
        if scheme.granularity == "group":
            g_idx = torch.arange(weight.shape[1], device=weight.device) // scheme.group_size
        ctx.quant = QuantState(scheme, scale, zero, g_idx)
        return Wq
