"""Round-to-nearest quantization: the data-free baseline of every PTQ study."""

from __future__ import annotations

import torch

from calibrant.errors import RecipeError
from calibrant.methods.base import LayerContext, LayerStats, Method
from calibrant.methods.quant import fake_quant_weight, lorc, parse_scheme


class RTN(Method):
    name = "rtn"
    needs = "none"

    def __init__(self, scheme: str = "w4g128"):
        self._scheme = parse_scheme(scheme)
        self.scheme = self._scheme.name

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
        ctx.quant = {"scheme": scheme, "scale": scale, "zero": zero, "g_idx": g_idx, "act_order": False,
                     "lorc": bool(scheme.lorc_rank)}
        return Wq
