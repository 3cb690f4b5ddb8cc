"""How one decoder block is compressed: the pipelines, and the per-group compression they share.

- **one-pass** (default with compressed propagation): the block runs once; every group of linears that
  read the same input is compressed as soon as all calibration batches have reached it, and the batches
  go on through the compressed layer (GPTQ's "true sequential"); the block's output is the next input;
- **two-pass**: statistics from one run of the dense block, compression, then a second run for the next
  block's inputs (the SparseGPT / Wanda reference order; holds one batch's intermediates, not all);
- **data-free**: no activations at all (RTN, magnitude).

A block whose targeted linears are not each called exactly once per forward cannot run one-pass and
runs two-pass; the report records which pipeline each block ran.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable

import greenlet
import torch
from torch import nn

from calibrant.engine.report import LayerRecord
from calibrant.engine.runner import BlockwiseRunner
from calibrant.engine.stopwatch import Stopwatch
from calibrant.errors import NumericalError
from calibrant.heap import prefault_for_write
from calibrant.methods.base import LayerContext, Method
from calibrant.methods.quant import attach_quant_state, quant_state_of
from calibrant.methods.stats import LayerStats, all_finite
from calibrant.models.adapter import is_linear, set_weight, weight_of

Plans = dict[int, dict[str, dict]]  # recipe position → layer name → parameter overrides


def call_order(runner: BlockwiseRunner, index: int, inps: torch.Tensor) -> list[tuple[str, int]]:
    """Linears of block ``index`` in the order its forward calls them, with an id of their input tensor
    (equal ids: the same tensor, as q/k/v or gate/up read). Names are relative to the block; one
    sample's forward is enough, and every block of a model has the same structure."""
    block = runner.adapter.blocks[index]
    calls: list[tuple[str, int]] = []
    inputs: list[torch.Tensor] = []  # kept alive so that ids are not reused during the probe

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            slot = next((k for k, t in enumerate(inputs) if t is x), None)
            if slot is None:
                inputs.append(x)
                slot = len(inputs) - 1
            calls.append((name, slot))

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in block.named_modules() if n and is_linear(m)]
    try:
        b0, b1 = runner.batches(inps.shape[0])[0]
        with torch.no_grad():
            runner.run_block(index, inps[b0:b1], None)
    finally:
        for h in handles:
            h.remove()
    return calls


def structure_key(block: nn.Module) -> tuple:
    """What decides the order in which a block calls its linears: each submodule's name, class and forward
    (a forward replaced on the instance counts). Blocks with equal keys share one probed call order."""
    return tuple((name, type(m), m.__dict__.get("forward", type(m).forward)) for name, m in block.named_modules())


def groups_for(
    order: list[tuple[str, int]], layers: dict[str, nn.Module], prefix: str, index: int
) -> list[list[str]] | None:
    """The block's targeted linears grouped by shared input, groups in call order; None when a targeted
    linear is called other than exactly once per forward (then the two-pass pipeline is used)."""
    head = f"{prefix}.{index}."
    relative = {name[len(head):]: name for name in layers}
    counts: dict[str, int] = {}
    for name, _ in order:
        counts[name] = counts.get(name, 0) + 1
    if any(counts.get(rel) != 1 for rel in relative):
        return None
    groups: dict[int, list[str]] = {}
    for name, slot in order:
        if name in relative:
            groups.setdefault(slot, []).append(relative[name])
    return list(groups.values())


@torch.no_grad()
def one_pass(
    runner: BlockwiseRunner,
    index: int,
    layers: dict[str, nn.Module],
    groups: list[list[str]],
    methods: list[Method],
    statistics: Iterable[str],
    inps: torch.Tensor,
    clock: Stopwatch,
    plans: Plans,
) -> list[LayerRecord]:
    """Run block ``index`` once over all batches, compressing each group of linears when every batch has
    reached it; each batch's outputs replace its inputs in ``inps`` (a batch's input is dead once its
    forward returns), so no second ``[n, L, hidden]`` buffer is held.

    Each batch's forward is a greenlet: a coroutine on this thread that parks at each group's first
    linear and hands over to the next batch, round-robin in batch order (statistics accumulate in the
    same order as in the two-pass pipeline). The last batch to arrive compresses the group, then all go
    on through the compressed weights. Every op runs on this one thread, with its one OpenMP team, BLAS
    buffers and malloc arena (cheaper in time and peak RSS than an OS thread per batch:
    bench/forward_overhead.py)."""
    block = runner.adapter.blocks[index]
    spans = runner.batches(inps.shape[0])
    scheduler = greenlet.getcurrent()
    running = [0]  # the batch whose greenlet runs now
    records: list[LayerRecord] = []
    handles = []

    def make_hook(names: list[str]) -> Callable:
        leader = layers[names[0]]
        st = LayerStats(weight_of(leader).shape[1], statistics, device=runner.device)

        arrivals = [0]

        def hook(module: nn.Module, args: tuple) -> tuple | None:
            arrivals[0] += 1
            if arrivals[0] > len(spans):
                raise RuntimeError(f"block {index}: {names[0]} was called more than once per forward, unlike the "
                                   "probed block it was taken to match; rerun with pipeline='two-pass'")
            with clock.section("stats_s"):
                st.add(args[0], runner.mask_for(spans[running[0]]))
            if running[0] == len(spans) - 1:  # every batch has contributed: compress the group now
                with clock.section("compress_s"):
                    records.extend(compress_linears({n: layers[n] for n in names}, methods,
                                                    dict.fromkeys(names, st), runner.device, plans))
                    st.release()  # its Hessian and factor would otherwise live until the block ends
            scheduler.switch()  # park; resumed once every batch has reached this group and it is compressed
            state = quant_state_of(module)
            if state is not None and state.scheme.act_bits:  # its hook was added during this very call
                return (state.fake_quant_input(args[0]), *args[1:])
            return None

        return hook

    def forward(b: int) -> None:
        b0, b1 = spans[b]
        args, kwargs = runner.block_kwargs[index][b1 - b0]
        out = block(inps[b0:b1], *args, **kwargs)
        inps[b0:b1] = out[0] if isinstance(out, tuple | list) else out

    for names in groups:
        handles.append(layers[names[0]].register_forward_pre_hook(make_hook(names)))
    batches = [greenlet.greenlet(functools.partial(forward, b)) for b in range(len(spans))]
    try:
        with clock.section("forward_s"):
            while not batches[-1].dead:  # one round per group, and a last one to finish the block
                for b, g in enumerate(batches):
                    running[0] = b
                    g.switch()  # an error inside a batch's forward is raised here
        if not all(g.dead for g in batches):
            raise RuntimeError(f"block {index}: the batches did not all reach the same layers")
    finally:
        for h in handles:
            h.remove()
        for g in batches:  # after an error: unwind the parked forwards now, not at garbage collection
            if not g.dead:
                g.throw()
    by_name = {r.name: r for r in records}
    return [by_name[n] for n in layers if n in by_name]


def observe(
    runner: BlockwiseRunner,
    index: int,
    layers: dict[str, nn.Module],
    statistics: Iterable[str],
    inps: torch.Tensor,
    outs: torch.Tensor | None,
    clock: Stopwatch | None = None,
) -> dict[str, LayerStats]:
    """One pass of block ``index`` streaming each linear's input statistics (block outputs into ``outs``
    when given). Linears that receive the very same input tensor (q/k/v, gate/up) share one LayerStats,
    so each statistic is accumulated once for them."""
    clock = clock or Stopwatch()
    stats: dict[str, LayerStats] = {}
    leaders: set[str] = set()
    seen: list[tuple[torch.Tensor, LayerStats]] = []
    first_batch = [True]
    current = [(0, 0)]  # the rows of the batch running now (its token mask)

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            with clock.section("stats_s"):
                x = args[0]
                if first_batch[0]:
                    shared = next((s for tensor, s in seen if tensor is x), None)
                    if shared is None:
                        shared = LayerStats(x.shape[-1], statistics, device=x.device)
                        seen.append((x, shared))
                        leaders.add(name)
                    stats[name] = shared
                if name in leaders:
                    stats[name].add(x, runner.mask_for(current[0]))

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        with clock.section("forward_s"):
            for b0, b1 in runner.batches(inps.shape[0]):
                current[0] = (b0, b1)
                runner.run_block(index, inps[b0:b1], None if outs is None else outs[b0:b1])
                if first_batch[0]:
                    first_batch[0] = False
                    seen.clear()
    finally:
        for h in handles:
            h.remove()
    return stats


def rel_error(
    original: torch.Tensor, new: torch.Tensor, stats: LayerStats | None, sq_error: float | None = None
) -> float | None:
    """‖(W − Ŵ)X‖² / ‖WX‖² from XᵀX; ``sq_error`` is the numerator when the recipe already knows it
    (GPTQ's OBS loss, tested against this formula), which saves one of the two GEMMs."""
    if stats is None or stats.hessian is None:
        return None
    H = stats.hessian
    den = float(torch.sum((original @ H) * original))
    if sq_error is None:
        delta = original - new
        sq_error = float(torch.sum((delta @ H) * delta))
    return max(sq_error, 0.0) / den if den > 0 else None


def _non_finite(method: Method, name: str) -> NumericalError:
    fix = " and raise `damp`" if "damp" in method.params() else ""
    return NumericalError(f"{method.name} produced NaN/Inf weights in {name}; nothing was saved — check the model "
                          f"loads in float32{fix}")


@torch.no_grad()
def compress_linears(
    layers: dict[str, nn.Module], methods: list[Method], stats: dict[str, LayerStats], device: torch.device,
    plans: Plans | None = None,
) -> list[LayerRecord]:
    """Apply the recipe to linears of one block; linears sharing an input are handed over together."""
    groups: dict[int, list[str]] = {}
    for name in layers:
        st = stats.get(name)
        groups.setdefault(id(st) if st is not None else id(name), []).append(name)
    prefault_for_write([weight_of(m) for m in layers.values()])  # the write-back below, without a fault per page
    records = []
    for names in groups.values():
        t0 = time.perf_counter()
        st = stats.get(names[0])
        # the module's own storage when it is float32 on ``device`` already: read-only until set_weight
        originals = [weight_of(layers[n]).to(device=device, dtype=torch.float32) for n in names]
        weights = [w.clone() for w in originals]
        ctxs = [LayerContext(n) for n in names]
        for position, method in enumerate(methods):
            layer_plans = (plans or {}).get(position, {})
            for ctx in ctxs:
                ctx.plan = layer_plans.get(ctx.name, {})
            weights = method.compress_group(weights, st, ctxs)
            for n, w in zip(names, weights, strict=True):
                if not all_finite(w):
                    raise _non_finite(method, n)
        seconds = (time.perf_counter() - t0) / len(names)
        for n, original, weight, ctx in zip(names, originals, weights, ctxs, strict=True):
            module = layers[n]
            known = ctx.sq_error if len(methods) == 1 else None  # a later method's is not against the original
            error = rel_error(original, weight, st, known)  # before set_weight overwrites ``original``
            zeros = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
            set_weight(module, weight)
            if ctx.quant is not None:
                attach_quant_state(module, ctx.quant)
                ctx.info["scheme"] = ctx.quant.scheme.name
                ctx.info["effective_bits"] = ctx.quant.effective_bits(tuple(weight.shape))
                if ctx.quant.input_amax is not None:  # a static activation scale: restored from calibrant.json
                    ctx.info["input_amax"] = float(ctx.quant.input_amax.reshape(-1)[0])
            records.append(LayerRecord(n, tuple(weight.shape), zeros, seconds, error, ctx.info))
    return records
