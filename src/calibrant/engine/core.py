"""Layer-sequential compression (as in SparseGPT / Wanda / GPTQ): the driver.

Capture the inputs of block 0 for the whole calibration set, then for each block in turn: let
block-level methods transform it, stream its linears' input statistics and let each method rewrite
each linear (:mod:`calibrant.engine.pipelines`), and run it to produce the next block's inputs. Only
one block's inputs are held (one ``[n, L, hidden]`` buffer, two for two-pass blocks), whatever the
depth of the model. A model-level plan, when a method asks for one, comes first from one dense pass.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from calibrant.cache import cache_dir, check_space, human_bytes
from calibrant.engine.block import BlockContext
from calibrant.engine.pipelines import (
    Plans,
    call_order,
    compress_linears,
    groups_for,
    observe,
    one_pass,
    structure_key,
)
from calibrant.engine.plan import Plan, make_plan
from calibrant.engine.report import CompressionReport
from calibrant.engine.runner import BlockwiseRunner
from calibrant.engine.stopwatch import Stopwatch
from calibrant.errors import CalibrantError, NumericalError
from calibrant.heap import bound_heap, relax_heap, release_freed_memory
from calibrant.methods.base import Method
from calibrant.methods.stats import LayerStats, all_finite
from calibrant.models.adapter import inference_mode, weight_of

TIMINGS = ("plan_s", "capture_s", "block_s", "forward_s", "stats_s", "compress_s", "read_s", "write_s")


class BlockStore(Protocol):
    """Where a model's decoder blocks live between uses. In memory (``None``, the default) every block is
    always resident; a streamed model (:mod:`calibrant.export.streamed`) loads block ``i`` on ``enter`` and
    writes and releases it on ``leave(i, final=True)`` (``final=False``: a planning pass, release only)."""

    def enter(self, index: int) -> None: ...

    def leave(self, index: int, final: bool) -> None: ...


def compress(
    model: nn.Module,
    calibration: Any,
    recipe: Method | Sequence[Method],
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    propagate: str = "compressed",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    progress: bool = True,
    pipeline: str = "one-pass",
    blocks: BlockStore | None = None,
    max_activation_bytes: int | None = None,
) -> CompressionReport:
    """Compress ``model`` in place, block by block, and return what was done.

    ``calibration`` is a CalibrationSet, a ``[n, L]`` token-id tensor, or None for data-free
    methods (a data-free recipe ignores one it is given: no forward runs). ``recipe`` is one method or
    several applied in order to each linear (a pruning mask set by an earlier method is kept by later
    ones). ``propagate="compressed"`` feeds each block the outputs of the already-compressed previous
    blocks (the SparseGPT/GPTQ default); ``"dense"`` feeds the dense model's activations and saves one
    block forward per block. ``pipeline``: ``"one-pass"`` or ``"two-pass"`` (see
    :mod:`calibrant.engine.pipelines`); with dense propagation every block runs two-pass. ``blocks``: a
    :class:`BlockStore` for a model whose blocks are not all in memory (each is entered before it runs and
    left when it is done; ``read_s`` and ``write_s`` time it). ``max_activation_bytes``: when the calibration
    activations (two ``[n, L, hidden]`` buffers in the model's dtype, three for block-level methods) exceed
    it, they live in memory-mapped files under ``$CALIBRANT_CACHE/spill`` instead (removed as they are
    freed); a budget under one batch's activations is refused.
    """
    methods = [recipe] if isinstance(recipe, Method) else list(recipe)
    check_finite_weights(model)
    plan = make_plan(model, calibration, methods, propagate=propagate, pipeline=pipeline, include=include,
                     exclude=exclude)
    runner = BlockwiseRunner(model, device=device, batch_size=batch_size)
    if plan.token_mask is not None:
        runner.token_mask = plan.token_mask.to(runner.device)
    report = CompressionReport([{"method": m.name, **m.params()} for m in methods], plan.calibration, propagate,
                               fallbacks=dict(plan.fallbacks))
    if plan.layer_sequential and plan.ids is not None:
        report.activations = activation_budget(runner, plan, max_activation_bytes)
    clock = Stopwatch(*TIMINGS)
    bounded = bound_heap()  # for the compression only: see calibrant.heap
    start = time.perf_counter()
    try:
        with inference_mode(model):
            plans: Plans = {}
            store = _Timed(blocks, clock) if blocks is not None else None
            if plan.planners:
                with clock.section("plan_s"):
                    plans = _model_plans(runner, plan, progress, store)
                report.plans = {methods[i].name: p for i, p in plans.items()}
            if not plan.layer_sequential:
                _data_free(runner, plan, report, clock, plans, progress, store)
            else:
                _layer_sequential(runner, plan, report, clock, plans, progress, store)
    finally:
        if bounded is not None:
            relax_heap()
        always = ("capture_s", "forward_s", "stats_s", "compress_s") + (("read_s", "write_s") if blocks else ())
        report.timings = {k: v for k, v in clock.totals.items() if v or k in always}
        report.timings["total_s"] = time.perf_counter() - start
    return report


def activation_budget(runner: BlockwiseRunner, plan: Plan, budget: int | None) -> dict[str, Any]:
    """The calibration activations' size; spill them to disk (``runner.spill_dir``) when over ``budget``,
    refuse a budget under one batch (both before any forward)."""
    assert plan.ids is not None
    cfg = runner.model.config
    hidden = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0)
    dtype = next(p for p in runner.model.parameters() if not p.is_meta).dtype
    row = plan.ids.shape[1] * hidden * dtype.itemsize
    need = (3 if plan.block_methods else 2) * plan.ids.shape[0] * row
    out = {"bytes": need, "budget": budget, "spilled": False}
    if budget is None or need <= budget:
        return out
    one_batch = min(runner.batch_size, plan.ids.shape[0]) * row
    if budget < one_batch:
        raise CalibrantError(f"the activation budget {human_bytes(budget)} (--max-activation-memory) is smaller than "
                             f"one batch of activations, {human_bytes(one_batch)} ({runner.batch_size} x "
                             f"{plan.ids.shape[1]} tokens x {hidden}); raise it or lower --batch-size")
    if runner.device.type != "cpu":
        return out  # a GPU's buffers are not spilled: the budget only bounds host memory
    runner.spill_dir = cache_dir("spill")
    check_space(runner.spill_dir / "activations", need, "the activation spill", fix="free space under "
                f"{runner.spill_dir.parent} (CALIBRANT_CACHE) or raise --max-activation-memory")
    return {**out, "spilled": True, "spill_dir": str(runner.spill_dir)}


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model whose parameters hold NaN/Inf, naming the first such tensor: the checkpoint is at fault,
    not the calibration data or the method (one min/max pass per tensor)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not p.is_meta and not all_finite(p.detach()):  # streamed blocks: on load
            bad = int((~torch.isfinite(p.detach())).sum())
            raise NumericalError(f"the model's weight {name} holds {bad} NaN/Inf value{'s' * (bad != 1)} before "
                                 "any compression: the checkpoint is damaged (or overflowed when cast to a lower "
                                 "precision); re-save or re-download it")


def check_finite_inputs(inps: torch.Tensor, block: int) -> None:
    """Refuse NaN/Inf activations entering ``block``, naming the calibration sequences that carry them."""
    if all_finite(inps):
        return
    rows = [r for r in range(inps.shape[0]) if not all_finite(inps[r])]
    shown = ", ".join(map(str, rows[:8])) + (", …" if len(rows) > 8 else "")
    source = "the embeddings" if block == 0 else f"block {block - 1}"
    raise NumericalError(f"the activations entering block {block} are NaN/Inf for calibration sequence"
                         f"{'s' * (len(rows) != 1)} {shown} (of {inps.shape[0]}): {source} overflows on them — "
                         "load the model in float32, or calibrate on other text")


class _Timed:
    """A BlockStore whose reads and writes are timed (``read_s``, ``write_s``) — and a no-op without one."""

    def __init__(self, store: BlockStore, clock: Stopwatch):
        self.store, self.clock = store, clock

    def enter(self, index: int) -> None:
        with self.clock.section("read_s"):
            self.store.enter(index)

    def leave(self, index: int, final: bool = True) -> None:
        with self.clock.section("write_s" if final else "read_s"):
            self.store.leave(index, final)


def _data_free(runner: BlockwiseRunner, plan: Plan, report: CompressionReport, clock: Stopwatch, plans: Plans,
               progress: bool, store: _Timed | None = None) -> None:
    for i, layer_map in enumerate(tqdm(plan.targets, desc=f"compress {plan.methods[0].name}", disable=not progress)):
        if store is not None:
            store.enter(i)
        with clock.section("compress_s"):
            report.layers += compress_linears(layer_map, plan.methods, {}, runner.device, plans)
        report.block_pipelines.append("data-free")
        if store is not None:
            store.leave(i)


def _layer_sequential(runner: BlockwiseRunner, plan: Plan, report: CompressionReport, clock: Stopwatch,
                      plans: Plans, progress: bool, store: _Timed | None = None) -> None:
    adapter = runner.adapter
    with clock.section("capture_s"):
        inps = runner.capture(plan.ids)
    outs: torch.Tensor | None = None  # two-pass blocks' outputs; one-pass blocks write over inps
    stats_keys = plan.statistics
    bar = tqdm(range(len(adapter.blocks)), desc=f"compress {'+'.join(m.name for m in plan.methods)}",
               disable=not progress, unit="block")
    orders: dict[tuple, list[tuple[str, int]]] = {}  # call order per block structure
    for i in bar:
        if store is not None:
            store.enter(i)
        layers = plan.targets[i]
        block = adapter.blocks[i]
        check_finite_inputs(inps, i)
        moved = runner.device != runner.model_device
        if moved:
            block.to(runner.device)
        if plan.block_methods and layers:
            with clock.section("block_s"):
                context = BlockContext(runner, i, layers, inps)
                for m in plan.block_methods:
                    m.compress_block(context)  # type: ignore[attr-defined]
        groups = None
        if stats_keys and layers and plan.propagate == "compressed" and plan.pipeline == "one-pass":
            key = structure_key(block)
            if key not in orders:  # blocks of one structure call their linears in one order: probe it once
                orders[key] = call_order(runner, i, inps)
            groups = groups_for(orders[key], layers, adapter.block_prefix, i)
        if groups is not None:
            report.layers += one_pass(runner, i, layers, groups, plan.methods, stats_keys, inps, clock, plans)
            report.block_pipelines.append("one-pass")
        else:
            if outs is None:
                outs = runner.empty(tuple(inps.shape), inps.dtype)
            stats: dict[str, LayerStats] = {}
            if stats_keys and layers:
                stats = observe(runner, i, layers, stats_keys, inps, outs if plan.propagate == "dense" else None,
                                clock)
            with clock.section("compress_s"):
                report.layers += compress_linears(layers, plan.methods, stats, runner.device, plans)
            del stats
            if plan.propagate == "compressed" or not stats_keys or not layers:
                with clock.section("forward_s"):
                    runner.run_block(i, inps, outs)
            inps, outs = outs, inps
            report.block_pipelines.append("two-pass")
        if moved:
            block.to(runner.model_device)
        if store is not None:
            store.leave(i)
        release_freed_memory()


def _model_plans(runner: BlockwiseRunner, plan: Plan, progress: bool, store: _Timed | None = None) -> Plans:
    """One pass over the dense model: each planning method summarises every block's targeted linears from
    their dense weights and input statistics, then plans per-layer overrides from all the summaries."""
    planners = {i: m for i, m in enumerate(plan.methods) if m.plan_statistics}
    keys = frozenset().union(*(m.plan_statistics for m in planners.values()))
    summaries: dict[int, dict[str, Any]] = {i: {} for i in planners}
    shapes: dict[str, tuple[int, int]] = {}
    inps = runner.capture(plan.ids)
    outs = runner.empty(tuple(inps.shape), inps.dtype)
    for i in tqdm(range(len(runner.adapter.blocks)), desc="plan (dense pass)", disable=not progress, unit="block"):
        if store is not None:
            store.enter(i)
        layers = plan.targets[i]
        stats = observe(runner, i, layers, keys, inps, outs) if layers else {}
        if not layers:
            runner.run_block(i, inps, outs)
        block = {name: (weight_of(module).to(torch.float32), stats[name]) for name, module in layers.items()}
        shapes.update({name: tuple(w.shape) for name, (w, _) in block.items()})
        for position, m in planners.items():
            summaries[position].update(m.summarize(block) if block else {})
        for st in {id(s): s for s in stats.values()}.values():
            st.release()
        del block
        if store is not None:
            store.leave(i, final=False)
        inps, outs = outs, inps
    del inps, outs
    return {position: m.plan(summaries[position], shapes) for position, m in planners.items()}
