"""Round-to-nearest quantization: the data-free baseline of every PTQ study."""

from __future__ import annotations

import torch

from calibrant.errors import RecipeError
from calibrant.methods.base import LayerContext, LayerStats, Method
from calibrant.methods.quant import QuantState, fake_quant_weight, lorc, parse_scheme


class RTN(Method):
    name = "rtn"
    relative_cost = 0.1  # data-free
    param_help = {"scheme": "quantization scheme: w4g128, w4g64-asym, w8-channel, w8a8, w3g64+lorc8, ... (default w4g128)"}

    def __init__(self, scheme: str = "w4g128"):
        self._scheme = parse_scheme(scheme)
        self.scheme = self._scheme.name

    def quant_plan(self) -> QuantState:
        return QuantState(self._scheme)

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
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
