"""Wanda (Sun et al., 2023): prune by |W_ij| · ‖X_j‖₂, comparing weights within each output row."""

from __future__ import annotations

import torch

from calibrant.methods.base import LayerContext, LayerStats
from calibrant.methods.sparsity import PruningMethod, wanda_scores


class Wanda(PruningMethod):
    name = "wanda"
    relative_cost = 1.2  # bench/pruning_vs_llmcompressor.py
    statistics = ("sq_norms",)
    param_help = {**PruningMethod.param_help, "per_layer": "compare weights across the whole layer, not per output row"}

    def __init__(self, sparsity: float | None = None, pattern: str | None = None, per_layer: bool = False,
                 sparsity_profile: str = "uniform", owl_m: float = 5.0, owl_lambda: float = 0.08):
        super().__init__(sparsity, pattern, sparsity_profile, owl_m, owl_lambda)
        self.per_layer = per_layer

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        assert stats is not None
        stats.check_finite(ctx.name)
        ctx.mask = self.prune_mask(wanda_scores(weight, stats.sq_norms), ctx, per_row=not self.per_layer)
        return weight.masked_fill(ctx.mask, 0.0)
