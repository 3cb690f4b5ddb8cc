"""Magnitude pruning: drop the smallest |W| — per layer (one threshold) or per N:M group. Data-free."""

from __future__ import annotations

import torch

from calibrant.methods.base import LayerContext, LayerStats
from calibrant.methods.sparsity import PruningMethod


class Magnitude(PruningMethod):
    name = "magnitude"
    relative_cost = 0.05  # data-free: seconds, whatever the calibration size

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        ctx.mask = self.prune_mask(weight.abs(), ctx, per_row=False)
        return weight.masked_fill(ctx.mask, 0.0)
