"""Magnitude pruning: drop the smallest |W| — per layer (one threshold) or per N:M group. Data-free."""

from __future__ import annotations

import torch

from calibrant.methods.base import LayerContext, LayerStats, Method
from calibrant.methods.sparsity import (
    check_nm_shape,
    check_sparsity,
    nm_mask,
    parse_pattern,
    unstructured_mask,
)


class Magnitude(Method):
    name = "magnitude"
    needs = "none"

    def __init__(self, sparsity: float = 0.5, pattern: str | None = None):
        self.sparsity = check_sparsity(sparsity)
        self.pattern = pattern
        self._nm = parse_pattern(pattern)

    def validate(self, name: str, shape: tuple[int, int]) -> None:
        check_nm_shape(name, shape, self._nm)

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        scores = weight.abs()
        if self._nm:
            mask = nm_mask(scores, *self._nm)
        else:
            mask = unstructured_mask(scores, self.sparsity, per_row=False)
        ctx.mask = mask
        return weight.masked_fill(mask, 0.0)
