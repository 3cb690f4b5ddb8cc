"""Layer-sequential compression (as in SparseGPT / Wanda / GPTQ).

Capture the inputs of block 0 for the whole calibration set, then for each block in turn: hook its
linear layers and stream their input statistics, let each method rewrite each linear, re-run the
block to produce the next block's inputs. Only one block's inputs and outputs are held in memory
(two ``[n, L, hidden]`` buffers that swap roles), whatever the depth of the model.
"""

from __future__ import annotations

import fnmatch
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import greenlet
import torch
from torch import nn
from tqdm.auto import tqdm

from calibrant.errors import CalibrationError, NumericalError, RecipeError
from calibrant.heap import bound_heap, prefault_for_write, relax_heap, release_freed_memory
from calibrant.methods.base import LayerContext, LayerStats, Method, all_finite, max_need
from calibrant.methods.quant import fake_quant_activations
from calibrant.models.adapter import Adapter, is_linear, set_weight, weight_of

PROPAGATE = ("compressed", "dense")
PIPELINES = ("one-pass", "two-pass")


class _Capture(nn.Module):
    """Stands in for a block during capture: records its inputs and passes hidden states through."""

    def __init__(self, index: int, block: nn.Module, sink: Callable[..., None]):
        super().__init__()
        self.index = index
        self.block = block
        self._sink = sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._sink(self.index, hidden_states, args, kwargs)
        return hidden_states

    def __getattr__(self, name: str) -> Any:  # loops may read block attributes (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


class BlockwiseRunner:
    """Runs a model one decoder block at a time over a fixed batch of token ids."""

    def __init__(self, model: nn.Module, device: torch.device | str | None = None, batch_size: int = 8):
        self.model = model
        self.adapter = Adapter(model)
        self.model_device = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else self.model_device
        self.batch_size = max(1, int(batch_size))
        self.block_kwargs: list[dict[int, tuple[tuple, dict]]] = []

    def batches(self, n: int) -> list[tuple[int, int]]:
        return [(b, min(b + self.batch_size, n)) for b in range(0, n, self.batch_size)]

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Inputs of block 0 as one ``[n, L, hidden]`` tensor; remembers every block's other arguments."""
        blocks = self.adapter.blocks
        self.block_kwargs = [{} for _ in blocks]
        n = input_ids.shape[0]
        first: list[torch.Tensor] = []  # one [n, L, hidden] buffer, filled batch by batch
        row = [0]

        def sink(index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
            size = hidden.shape[0]
            if size not in self.block_kwargs[index]:
                self.block_kwargs[index][size] = _to_device((args, kwargs), self.device)
            if index == 0:
                if not first:
                    first.append(torch.empty((n, *hidden.shape[1:]), dtype=hidden.dtype, device=self.device))
                first[0][row[0] : row[0] + size] = hidden
                row[0] += size

        originals = list(blocks)
        for i, block in enumerate(originals):
            blocks[i] = _Capture(i, block, sink)
        try:
            for b0, b1 in self.batches(input_ids.shape[0]):
                ids = input_ids[b0:b1].to(self.model_device)
                self.adapter.base(input_ids=ids, use_cache=False)
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block
        return first[0]

    @torch.no_grad()
    def run_block(self, index: int, inputs: torch.Tensor, outputs: torch.Tensor | None) -> None:
        """Run block ``index`` over ``inputs`` batch by batch, writing into ``outputs`` (if given)."""
        block = self.adapter.blocks[index]
        for b0, b1 in self.batches(inputs.shape[0]):
            args, kwargs = self.block_kwargs[index][b1 - b0]
            out = block(inputs[b0:b1], *args, **kwargs)
            if isinstance(out, tuple | list):
                out = out[0]
            if outputs is not None:
                outputs[b0:b1] = out


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    sparsity: float
    seconds: float
    rel_error: float | None = None  # ‖(W−Ŵ)X‖² / ‖WX‖² over the calibration inputs, when XᵀX is known
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompressionReport:
    recipe: list[dict[str, Any]]
    calibration: dict[str, Any] | None
    propagate: str
    layers: list[LayerRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    pipeline: str = "two-pass"

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all compressed layers' weights."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0

    @property
    def effective_bits(self) -> float | None:
        """Parameter-weighted bits per weight of the quantized layers (None if nothing was quantized)."""
        quantized = [r for r in self.layers if "effective_bits" in r.info]
        if not quantized:
            return None
        total = sum(r.shape[0] * r.shape[1] for r in quantized)
        return sum(r.info["effective_bits"] * r.shape[0] * r.shape[1] for r in quantized) / total

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overall_sparsity"] = self.sparsity
        d["effective_bits"] = self.effective_bits
        return d


def _selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    def hit(patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) if any(c in p for c in "*?[") else p in name for p in patterns)

    return (not include or hit(include)) and not (exclude and hit(exclude))


def _as_ids(calibration: Any) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    if calibration is None:
        return None, None
    if isinstance(calibration, torch.Tensor):
        ids = calibration
        meta: dict[str, Any] | None = {"source": "user-tensor", "n": ids.shape[0], "L": ids.shape[-1]}
    else:  # a CalibrationSet
        ids = calibration.input_ids
        meta = {**calibration.provenance, "hash": calibration.hash}
    if ids.dim() != 2 or ids.numel() == 0 or ids.dtype not in (torch.int32, torch.int64):
        raise CalibrationError(
            f"calibration token ids must be a non-empty 2-D integer tensor [n, L], got shape "
            f"{tuple(ids.shape)} of {ids.dtype}"
        )
    return ids.long(), meta


def _rel_error(
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
) -> CompressionReport:
    """Compress ``model`` in place, block by block, and return what was done.

    ``calibration`` is a CalibrationSet, a ``[n, L]`` token-id tensor, or None for data-free
    methods. ``recipe`` is one method or several applied in order to each linear (a pruning mask set
    by an earlier method is kept by later ones). ``propagate="compressed"`` feeds each block the
    outputs of the already-compressed previous blocks (the SparseGPT/GPTQ default);
    ``"dense"`` feeds the dense model's activations and saves one block forward per block.

    ``pipeline="one-pass"`` (with compressed propagation) runs each block once: every group of linears
    that read the same input is compressed as soon as all calibration batches have reached it, and the
    batches then go on through the compressed layer, so later linears see the compressed earlier ones
    (GPTQ's "true sequential") and the block's output is the next block's input. ``"two-pass"`` runs
    each block twice: once to collect every linear's statistics from the block's dense computation,
    once more after compressing it (the SparseGPT / Wanda reference order); it holds less: one batch's
    intermediate activations instead of all batches' at a layer boundary.
    """
    methods = [recipe] if isinstance(recipe, Method) else list(recipe)
    if propagate not in PROPAGATE:
        raise RecipeError(f"propagate must be one of {PROPAGATE}, got '{propagate}'")
    if pipeline not in PIPELINES:
        raise RecipeError(f"pipeline must be one of {PIPELINES}, got '{pipeline}'")
    need = max_need([m.needs for m in methods])
    ids, calib_meta = _as_ids(calibration)
    if ids is None and need != "none":
        names = ", ".join(m.name for m in methods if m.needs != "none")
        raise CalibrationError(f"{names} needs calibration data; pass --calibration (e.g. wiki:128x512)")

    runner = BlockwiseRunner(model, device=device, batch_size=batch_size)
    adapter = runner.adapter
    context = adapter.context_length()
    if ids is not None and context is not None and ids.shape[1] > context:
        raise CalibrationError(
            f"calibration length {ids.shape[1]} exceeds the model's context of {context} tokens; use L ≤ {context}"
        )
    targets = [
        {n: m for n, m in adapter.block_linears(i).items() if _selected(n, include, exclude)}
        for i in range(len(adapter.blocks))
    ]
    if not any(targets):
        raise RecipeError("the include/exclude patterns select no linear layer; check them against `calibrant info`")
    for layer_map in targets:  # refuse before touching anything
        for name, module in layer_map.items():
            for m in methods:
                m.validate(name, tuple(weight_of(module).shape))

    report = CompressionReport([{"method": m.name, **m.params()} for m in methods], calib_meta, propagate,
                               pipeline=pipeline if need != "none" and propagate == "compressed" else "two-pass")
    timings = dict.fromkeys(("capture_s", "forward_s", "stats_s", "compress_s"), 0.0)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    bounded = bound_heap()  # for the compression only: see calibrant.heap
    try:
        if ids is None:  # data-free: no activations needed at all
            for layer_map in tqdm(targets, desc=f"compress {methods[0].name}", disable=not progress):
                t0 = time.perf_counter()
                report.layers += _compress_block(layer_map, methods, {}, runner.device)
                timings["compress_s"] += time.perf_counter() - t0
            return report
        t0 = time.perf_counter()
        inps = runner.capture(ids)
        outs: torch.Tensor | None = None  # two-pass blocks' outputs; one-pass blocks write over inps
        timings["capture_s"] = time.perf_counter() - t0
        bar = tqdm(range(len(adapter.blocks)), desc=f"compress {'+'.join(m.name for m in methods)}",
                   disable=not progress, unit="block")
        order: list[tuple[str, int]] | None = None
        for i in bar:
            block = adapter.blocks[i]
            moved = runner.device != runner.model_device
            if moved:
                block.to(runner.device)
            stats: dict[str, LayerStats] = {}
            if need != "none" and targets[i] and propagate == "compressed" and pipeline == "one-pass":
                order = order or _call_order(runner, i, inps)
                groups = _groups_for(order, targets[i], adapter.block_prefix, i)
                if groups is not None:
                    t0 = time.perf_counter()
                    records, spent = _one_pass(runner, i, targets[i], groups, methods, need, inps)
                    report.layers += records
                    timings["stats_s"] += spent["stats"]
                    timings["compress_s"] += spent["compress"]
                    timings["forward_s"] += time.perf_counter() - t0 - spent["stats"] - spent["compress"]
                    if moved:
                        block.to(runner.model_device)
                    release_freed_memory()
                    continue
            if outs is None:
                outs = torch.empty_like(inps)
            if need != "none" and targets[i]:
                t0 = time.perf_counter()
                stats_time = _observe(runner, i, targets[i], need, inps, outs if propagate == "dense" else None, stats)
                timings["stats_s"] += stats_time
                timings["forward_s"] += time.perf_counter() - t0 - stats_time
            t0 = time.perf_counter()
            report.layers += _compress_block(targets[i], methods, stats, runner.device)
            timings["compress_s"] += time.perf_counter() - t0
            del stats
            if propagate == "compressed" or need == "none" or not targets[i]:
                t0 = time.perf_counter()
                runner.run_block(i, inps, outs)
                timings["forward_s"] += time.perf_counter() - t0
            if moved:
                block.to(runner.model_device)
            inps, outs = outs, inps
            release_freed_memory()
        return report
    finally:
        if bounded is not None:
            relax_heap()
        timings["total_s"] = time.perf_counter() - start
        report.timings = timings
        model.config.use_cache = use_cache
        model.train(was_training)


def _call_order(runner: BlockwiseRunner, index: int, inps: torch.Tensor) -> list[tuple[str, int]]:
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


def _groups_for(
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
def _one_pass(
    runner: BlockwiseRunner,
    index: int,
    layers: dict[str, nn.Module],
    groups: list[list[str]],
    methods: list[Method],
    need: str,
    inps: torch.Tensor,
) -> tuple[list[LayerRecord], dict[str, float]]:
    """Run block ``index`` once over all batches, compressing each group of linears when every batch has
    reached it (see :func:`compress`); each batch's outputs replace its inputs in ``inps`` (a batch's
    input is dead once its forward returns), so no second ``[n, L, hidden]`` buffer is held.

    Each batch's forward is a greenlet: a coroutine on this thread that parks at each group's first
    linear and hands over to the next batch, round-robin in batch order (statistics accumulate in the
    same order as in the two-pass pipeline). The last batch to arrive compresses the group, then all go
    on through the compressed weights. Every op runs on this one thread, with its one OpenMP team, BLAS
    buffers and malloc arena; an OS thread per batch (the previous design) cost time and peak RSS
    (BENCHMARKS.md, GPTQ against llm-compressor)."""
    block = runner.adapter.blocks[index]
    spans = runner.batches(inps.shape[0])
    scheduler = greenlet.getcurrent()
    running = [0]  # the batch whose greenlet runs now
    records: list[LayerRecord] = []
    spent = {"stats": 0.0, "compress": 0.0}
    handles = []

    def make_hook(names: list[str]) -> Callable:
        leader = layers[names[0]]
        st = LayerStats(weight_of(leader).shape[1], need, device=runner.device)  # type: ignore[arg-type]

        def hook(module: nn.Module, args: tuple) -> tuple | None:
            t = time.perf_counter()
            st.add(args[0])
            spent["stats"] += time.perf_counter() - t
            if running[0] == len(spans) - 1:  # every batch has contributed: compress the group now
                t = time.perf_counter()
                records.extend(_compress_block({n: layers[n] for n in names}, methods, dict.fromkeys(names, st),
                                               runner.device))
                st.release()  # its Hessian and factor would otherwise live until the block ends
                spent["compress"] += time.perf_counter() - t
            scheduler.switch()  # park; resumed once every batch has reached this group and it is compressed
            quant = getattr(module, "calibrant_quant", None)
            if quant is not None and quant["scheme"].act_bits:  # its hook was added during this very call
                scheme = quant["scheme"]
                return (fake_quant_activations(args[0], scheme.act_bits, scheme.act_granularity), *args[1:])
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
    return [by_name[n] for n in layers if n in by_name], spent


def _observe(
    runner: BlockwiseRunner,
    index: int,
    layers: dict[str, nn.Module],
    need: str,
    inps: torch.Tensor,
    outs: torch.Tensor | None,
    stats: dict[str, LayerStats],
) -> float:
    """One pass of block ``index`` streaming each linear's input statistics; returns the time in hooks.

    Linears that receive the very same input tensor (q/k/v, gate/up) share one LayerStats, so XᵀX is
    accumulated once for them.
    """
    leaders: set[str] = set()
    seen: list[tuple[torch.Tensor, LayerStats]] = []
    first_batch = [True]
    spent = [0.0]

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            t = time.perf_counter()
            x = args[0]
            if first_batch[0]:
                shared = next((s for tensor, s in seen if tensor is x), None)
                if shared is None:
                    shared = LayerStats(x.shape[-1], need, device=x.device)  # type: ignore[arg-type]
                    seen.append((x, shared))
                    leaders.add(name)
                stats[name] = shared
            if name in leaders:
                stats[name].add(x)
            spent[0] += time.perf_counter() - t

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        for b0, b1 in runner.batches(inps.shape[0]):
            runner.run_block(index, inps[b0:b1], None if outs is None else outs[b0:b1])
            if first_batch[0]:
                first_batch[0] = False
                seen.clear()
    finally:
        for h in handles:
            h.remove()
    return spent[0]


@torch.no_grad()
def _compress_block(
    layers: dict[str, nn.Module], methods: list[Method], stats: dict[str, LayerStats], device: torch.device
) -> list[LayerRecord]:
    """Apply the recipe to every linear of one block; linears sharing an input are handed over together."""
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
        for method in methods:
            weights = method.compress_group(weights, st, ctxs)
            for n, w in zip(names, weights, strict=True):
                if not all_finite(w):
                    raise NumericalError(
                        f"{method.name} produced NaN/Inf weights in {n}; nothing was saved — check the model "
                        "loads in float32 and raise --damp"
                    )
        seconds = (time.perf_counter() - t0) / len(names)
        for n, original, weight, ctx in zip(names, originals, weights, ctxs, strict=True):
            module = layers[n]
            known = ctx.sq_error if len(methods) == 1 else None  # a later method's is not against the original
            rel_error = _rel_error(original, weight, st, known)  # before set_weight overwrites ``original``
            zeros = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
            set_weight(module, weight)
            if ctx.quant is not None:
                attach_quant_state(module, ctx.quant)
                ctx.info["scheme"] = ctx.quant["scheme"].name
                ctx.info["effective_bits"] = ctx.quant["scheme"].effective_bits(tuple(weight.shape))
            records.append(LayerRecord(n, tuple(weight.shape), zeros, seconds, rel_error, ctx.info))
    return records


def attach_quant_state(module: nn.Module, quant: dict[str, Any]) -> None:
    """Remember a quantized linear's grid (for packed export) and simulate its activation quantization."""
    module.calibrant_quant = quant
    scheme = quant["scheme"]
    old = getattr(module, "_calibrant_act_hook", None)
    if old is not None:
        old.remove()
        module._calibrant_act_hook = None
    if scheme.act_bits:
        bits, granularity = scheme.act_bits, scheme.act_granularity

        def fake_quant_input(mod: nn.Module, args: tuple) -> tuple:
            return (fake_quant_activations(args[0], bits, granularity), *args[1:])

        module._calibrant_act_hook = module.register_forward_pre_hook(fake_quant_input)
