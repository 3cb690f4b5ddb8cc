"""The method interface: which statistics a method needs, and what it rewrites.

A method never loads data or models; the engine never knows a method's maths. Three scopes:

- **linear-level** (:class:`Method`): lists the input ``statistics`` it needs (keys of
  :mod:`calibrant.methods.stats`); the engine streams them once per input tensor into a
  :class:`LayerStats` shared by the linears reading that tensor (q/k/v, gate/up) and calls
  ``compress(weight, stats, ctx)`` with a float32 ``[out, in]`` weight, or ``compress_group`` for
  linears that read one input (GPTQ solves them as one stacked matrix);
- **block-level** (:class:`BlockMethod`): ``compress_block(block)`` sees one decoder block, its
  calibration inputs and the family's fold map (:class:`calibrant.engine.block.BlockContext`); it may
  run the block under candidate transforms and fold per-channel scales, before the linear-level
  methods of the recipe compress the block's linears;
- **model-level plan**: a method with ``plan_statistics`` gets the dense model's statistics of every
  targeted linear once, before compression (``summarize`` per block, then ``plan`` over all of them),
  and returns per-layer overrides of its parameters (``LayerContext.plan``); the plan is recorded.

A new method is one file plus one registry line (:mod:`calibrant.methods.registry`); its
``__init__`` signature is its parameter list, which the CLI and studies read.

Worked example — Wanda (a linear-level method) is::

    class Wanda(PruningMethod):
        name = "wanda"
        statistics = ("sq_norms",)

        def compress(self, weight, stats, ctx):
            scores = weight.abs() * stats.sq_norms.sqrt()      # |W_ij| · ‖X_j‖₂
            ctx.mask = unstructured_mask(scores, self.target_sparsity(ctx), per_row=True)
            return weight.masked_fill(ctx.mask, 0.0)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from calibrant.errors import RecipeError
from calibrant.methods.quant.state import QuantState
from calibrant.methods.stats import LayerStats, all_finite

__all__ = ["BlockMethod", "LayerContext", "LayerStats", "Method", "all_finite", "single_threaded"]


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run a loop of tiny tensor ops on one CPU thread.

    Column-by-column solvers (OBS, GPTQ) issue thousands of ops on a few hundred kB each; intra-op
    threading only adds synchronisation, and when another process holds a core the threads' spin
    waits make it 40x slower (measured: 0.06 s vs 2.8 s for one 960x576 GPTQ solve). No effect on CUDA.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class LayerContext:
    """Per-layer state handed from one method of a recipe to the next, plus what goes in the report."""

    name: str
    mask: torch.Tensor | None = None  # True where a weight was pruned; later methods keep those zero
    quant: QuantState | None = None  # the grid of a quantized weight (export reads it)
    plan: dict[str, Any] = field(default_factory=dict)  # this layer's overrides from a model-level plan
    sq_error: float | None = None  # ‖(W − Ŵ)X‖² over the calibration tokens, W as the method received it, if known
    info: dict[str, Any] = field(default_factory=dict)


class Method:
    """A linear-level method. Subclasses set ``name`` and ``statistics`` and implement :meth:`compress`."""

    name: ClassVar[str]
    statistics: ClassVar[tuple[str, ...]] = ()  # input statistics per linear; () = data-free
    plan_statistics: tuple[str, ...] = ()  # dense-model statistics for a model-level plan (may be a property)
    scope: ClassVar[str] = "linear"
    param_help: ClassVar[dict[str, str]] = {}  # one line per parameter, for the CLI's --help

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    # wall time of a compression in dense forward passes over the calibration tokens (study cost estimates);
    # measured by the benches named in each method's file, a guess where a method says so
    relative_cost: ClassVar[float] = 2.0

    def cost(self) -> float:
        """Estimated wall time in dense forwards over the calibration tokens (a plan adds its dense pass)."""
        return self.relative_cost + (1.0 if self.plan_statistics else 0.0)

    def reads_data(self) -> bool:
        """Whether the method reads calibration activations (statistics, a plan, or block-level work)."""
        return bool(self.statistics or self.plan_statistics or self.scope == "block")

    def validate(self, name: str, shape: tuple[int, int]) -> None:
        """Raise RecipeError before any layer is touched if this layer cannot be served."""

    def fallback(self, name: str, shape: tuple[int, int]) -> str | None:
        """Why the recipe must leave this layer as it is (it is then written unquantized and the reason
        reported, as llama.cpp's converter does), or None. For shapes a storage grid cannot hold: a GGUF block
        grid over an input width that is not a multiple of its block."""
        return None

    def quant_plan(self) -> QuantState | None:
        """The grid this method will leave on every linear (no scales yet), for checks before compression
        (e.g. whether an export format can store it); None for methods that do not quantize."""
        return None

    def validate_recipe(self, methods: list[Method]) -> None:
        """Raise RecipeError if this method cannot serve the recipe it is part of (e.g. what follows it)."""

    def validate_model(self, adapter: Any) -> None:
        """Raise before anything is touched if this model cannot be served (e.g. no fold is possible)."""

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        raise NotImplementedError

    def compress_group(
        self, weights: list[torch.Tensor], stats: LayerStats | None, ctxs: list[LayerContext]
    ) -> list[torch.Tensor]:
        """Compress linears that read the same input (q/k/v, gate/up). Methods whose maths is row-wise
        independent override this to solve them as one stacked matrix."""
        return [self.compress(w, stats, c) for w, c in zip(weights, ctxs, strict=True)]

    # model-level plan (used when ``plan_statistics`` is not empty)
    def summarize(self, layers: dict[str, tuple[torch.Tensor, LayerStats]]) -> dict[str, Any]:
        """What the plan needs of one block's targeted linears, by name, from their dense float32 weights and
        ``plan_statistics`` (keep it small: it is held for every layer until :meth:`plan`)."""
        raise NotImplementedError

    def plan(self, summaries: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> dict[str, dict[str, Any]]:
        """Per-layer parameter overrides from every targeted layer's summary; recorded with the result."""
        raise NotImplementedError


class BlockMethod(Method):
    """A block-level method: acts on a whole decoder block before its linears are compressed.

    ``needs_folds``: the method folds per-channel scales (``block.folds``), so a model whose family allows
    none is refused before anything is touched, naming the family and the reason."""

    scope = "block"
    needs_folds: ClassVar[bool] = True

    def validate_model(self, adapter: Any) -> None:
        if not self.needs_folds:
            return
        from calibrant.models.folds import fold_impossible

        reason = fold_impossible(adapter.model)
        if reason is not None:
            raise RecipeError(f"{self.name} folds per-channel scales into the layers before the linears, but for "
                              f"{adapter.model_type} ({type(adapter.model).__name__}) {reason}")

    def compress_block(self, block: Any) -> None:
        """``block`` is a :class:`calibrant.engine.block.BlockContext`: the block, its calibration inputs,
        ``run()``/``observe()`` and its folds."""
        raise NotImplementedError

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        return weight  # its work is done on the block; the linears pass through unchanged
