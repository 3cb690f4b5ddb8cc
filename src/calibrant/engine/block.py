"""What a block-level method sees of one decoder block (:class:`calibrant.methods.base.BlockMethod`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from calibrant.engine.pipelines import observe
from calibrant.engine.runner import BlockwiseRunner
from calibrant.methods.stats import LayerStats
from calibrant.models.folds import BlockFold, block_folds


class BlockContext:
    """One decoder block with its calibration inputs, before its linears are compressed.

    ``inputs`` is the engine's own ``[n, L, hidden]`` buffer (not a copy: read it, never write it).
    :meth:`run` gives the block's outputs for those inputs under the block's current weights, so a
    method can compare candidate transforms against the dense output; :meth:`observe` streams input
    statistics of chosen linears; ``folds`` are the scales the block can absorb
    (:mod:`calibrant.models.folds`), each applied with ``fold.apply(scales)``.
    """

    def __init__(self, runner: BlockwiseRunner, index: int, linears: dict[str, nn.Module], inputs: torch.Tensor):
        self.index = index
        self.module: nn.Module = runner.adapter.blocks[index]
        self.linears = linears
        self.inputs = inputs
        self._runner = runner
        self._folds: list[BlockFold] | None = None

    @property
    def folds(self) -> list[BlockFold]:
        if self._folds is None:
            self._folds = block_folds(self._runner.model, self.index)
        return self._folds

    @torch.no_grad()
    def run(self, rows: slice | None = None) -> torch.Tensor:
        """The block's outputs for ``inputs[rows]`` (all rows by default), in a new tensor."""
        x = self.inputs if rows is None else self.inputs[rows]
        out = self._runner.empty(tuple(x.shape), x.dtype)
        self._runner.run_block(self.index, x, out)
        return out

    def observe(self, statistics: Iterable[str], names: Iterable[str] | None = None) -> dict[str, LayerStats]:
        """Input statistics of the named linears (default: the targeted ones) over all calibration inputs,
        from one run of the block as it is now; linears reading one tensor share one LayerStats."""
        chosen = self.linears if names is None else {n: self.linears[n] for n in names}
        return observe(self._runner, self.index, chosen, tuple(statistics), self.inputs, None)
