"""The method interface through the engine: block-level methods, model-level plans, data-free recipes,
the one-pass → two-pass fallback, recorded sparsity, parameter errors and the stopwatch."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import transformers as T

from calibrant.api import compress_model
from calibrant.engine import compress
from calibrant.engine.stopwatch import Stopwatch
from calibrant.errors import ModelError, RecipeError
from calibrant.export.hf import read_metadata
from calibrant.methods import BlockMethod, Wanda, make_method, make_recipe, parameters
from calibrant.methods.stats import LayerStats
from calibrant.models.adapter import Adapter, weight_of
from calibrant.models.folds import fold_impossible
from calibrant.models.loader import LoadedModel
from tests.conftest import VOCAB, tiny_config, tiny_model, token_batch


def linears_of(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    adapter = Adapter(model)
    return {n: m for i in range(len(adapter.blocks)) for n, m in adapter.block_linears(i).items()}


def count_block_forwards(model: torch.nn.Module) -> list[int]:
    """Wrap each decoder block's forward; the returned list counts calls per block."""
    counts = [0] * len(Adapter(model).blocks)
    for i, block in enumerate(Adapter(model).blocks):
        original = block.forward

        def forward(*args: Any, _i: int = i, _f: Any = original, **kwargs: Any) -> Any:
            counts[_i] += 1
            return _f(*args, **kwargs)

        block.forward = forward
    return counts


# ---- block-level ---------------------------------------------------------------------------------------------

class FoldAndCheck(BlockMethod):
    """Per block: output, fold random scales through every fold, output again (must be equal); a weight change
    that is not a fold must change run()'s output; observe(max_abs) must equal a forward hook's max |x|."""

    name = "fold_and_check"

    def __init__(self) -> None:
        self._calls: list[int] = []
        self._folded: list[int] = []

    def compress_block(self, block: Any) -> None:
        self._calls.append(block.index)
        ref = block.run()
        assert ref.shape == block.inputs.shape
        g = torch.Generator().manual_seed(100 + block.index)
        for fold in block.folds:
            dim = weight_of(next(iter(fold.targets.values()))).shape[1]
            fold.apply(torch.exp(torch.randn(dim, generator=g) * 0.5))
            self._folded.append(block.index)
        again = block.run()
        torch.testing.assert_close(again, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
        # run() reads the weights as they are now: double o_proj (not a fold) and the output moves
        o_proj = weight_of(block.module.self_attn.o_proj)
        with torch.no_grad():
            o_proj.mul_(2.0)
            moved = block.run()
            o_proj.div_(2.0)
        assert (moved - ref).abs().max().item() > 1e-3 * ref.abs().max().item()
        # observe(): max |x| of down_proj's input equals a hook's over every calibration row
        name = f"model.layers.{block.index}.mlp.down_proj"
        assert name in block.linears
        seen = torch.zeros(weight_of(block.linears[name]).shape[1])

        def record(module: Any, args: tuple) -> None:
            torch.maximum(seen, args[0].reshape(-1, seen.numel()).abs().amax(0), out=seen)

        handle = block.linears[name].register_forward_pre_hook(record)
        try:
            block.run()
        finally:
            handle.remove()
        stats = block.observe(("max_abs",))
        assert set(stats) == set(block.linears)
        assert torch.equal(stats[name].get("max_abs"), seen)
        assert stats[name].tokens == block.inputs.shape[0] * block.inputs.shape[1]
        q, k = (stats[f"model.layers.{block.index}.self_attn.{p}_proj"] for p in "qk")
        assert q is k  # one LayerStats for linears reading one tensor


def test_block_method_folds_then_rtn_quantizes():
    model = tiny_model("llama")
    ids = token_batch(n=6, length=16)
    dense = model(ids).logits.detach()
    method = FoldAndCheck()
    report = compress(model, ids, [method, make_method("rtn", scheme="w8-channel")], batch_size=4, progress=False)
    assert method._calls == [0, 1]
    assert method._folded == [0, 0, 0, 1, 1, 1]  # three folds per block under GQA
    names = list(linears_of(model))
    assert [r.name for r in report.layers] == names
    assert all(r.info.get("scheme") == "w8-channel" for r in report.layers)
    assert [r["method"] for r in report.recipe] == ["fold_and_check", "rtn"]
    assert report.calibration is not None
    assert report.timings["block_s"] > 0
    # folds preserve the function and w8 per channel is fine: the logits barely move
    after = model(ids).logits.detach()
    assert (after - dense).abs().max().item() < 0.05 * dense.abs().max().item()


class NeedsFolds(BlockMethod):
    name = "needs_folds"

    def __init__(self) -> None:
        self._blocks = 0

    def validate_model(self, adapter: Any) -> None:
        reason = fold_impossible(adapter.model)
        if reason is not None:
            raise ModelError(f"{self.name} needs folds: {reason}")

    def compress_block(self, block: Any) -> None:
        self._blocks += 1
        for fold in block.folds:
            fold.apply(torch.full((weight_of(next(iter(fold.targets.values()))).shape[1],), 2.0))


def test_block_method_refuses_post_ln_before_any_weight_changes():
    config = tiny_config("opt")
    config.do_layer_norm_before = False
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counts = count_block_forwards(model)
    method = NeedsFolds()
    with pytest.raises(ModelError, match="post-LN"):
        compress(model, token_batch(), [method, make_method("rtn", scheme="w8-channel")], progress=False)
    assert method._blocks == 0 and counts == [0, 0]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_block_method_on_pre_ln_opt_runs():
    model = tiny_model("opt")
    method = NeedsFolds()
    compress(model, token_batch(), [method], progress=False)
    assert method._blocks == 2


# ---- model-level plan --------------------------------------------------------------------------------------

class PlannedWanda(Wanda):
    """Wanda whose per-layer sparsity comes from a plan over the dense model's mean Σx²."""

    name = "planned_wanda"
    plan_statistics = ("sq_norms",)

    def summarize(self, layers: dict[str, tuple[torch.Tensor, LayerStats]]) -> dict[str, float]:
        return {name: float(stats.sq_norms.mean()) for name, (weight, stats) in layers.items()}

    def plan(self, summaries: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> dict[str, dict[str, Any]]:
        self._summaries = dict(summaries)
        self._shapes = dict(shapes)
        ordered = sorted(summaries, key=lambda n: (summaries[n], n))
        half = len(ordered) // 2
        return {n: {"sparsity": 0.3 if k < half else 0.7} for k, n in enumerate(ordered)}


def dense_mean_sq_norms(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in linears_of(model).items():
        def hook(m: Any, args: tuple, _n: str = name) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[_n] = sums.get(_n, 0) + x.square().sum(0)
        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return {n: float(s.mean()) for n, s in sums.items()}


class _Tokenizer:
    """Just enough tokenizer for compress_model with a token-id calibration tensor and an output dir."""

    def __len__(self) -> int:
        return VOCAB

    def save_pretrained(self, path: Any) -> None:
        pass


@pytest.mark.parametrize("pipeline", ["one-pass", "two-pass"])
def test_model_level_plan_sets_each_layers_sparsity(pipeline):
    model = tiny_model("llama")
    ids = token_batch(n=6, length=16)
    reference = dense_mean_sq_norms(model, ids)
    method = PlannedWanda()
    report = compress(model, ids, method, batch_size=4, progress=False, pipeline=pipeline)
    linears = linears_of(model)
    assert set(method._summaries) == set(linears)
    for name, value in method._summaries.items():
        assert value == pytest.approx(reference[name], rel=1e-4), name
        assert method._shapes[name] == tuple(weight_of(linears[name]).shape)
    plan = report.plans["planned_wanda"]
    assert set(report.plans) == {"planned_wanda"} and set(plan) == set(linears)
    assert sorted(p["sparsity"] for p in plan.values()) == [0.3] * 7 + [0.7] * 7
    records = {r.name: r for r in report.layers}
    for name, module in linears.items():
        W = weight_of(module)
        rows, cols = W.shape
        expected = rows * int(cols * plan[name]["sparsity"])  # per output row
        assert int((W == 0).sum()) == expected, name
        assert int((W == 0).sum(1).min()) == int((W == 0).sum(1).max())  # the same count in every row
        assert records[name].sparsity == pytest.approx(expected / W.numel())
    low = [n for n, p in plan.items() if p["sparsity"] == 0.3]
    high = [n for n, p in plan.items() if p["sparsity"] == 0.7]
    assert max(reference[n] for n in low) <= min(reference[n] for n in high)
    assert report.timings["plan_s"] > 0


def test_compress_model_writes_the_plan_into_calibrant_json(tmp_path):
    model = tiny_model("llama")
    loaded = LoadedModel(model, _Tokenizer(), "tiny-llama", None, "0" * 16)
    out = tmp_path / "out"
    result = compress_model(loaded, [PlannedWanda()], calibration=token_batch(n=4, length=16), out=out,
                            progress=False)
    assert result.metadata["plans"] == result.report.plans
    meta = read_metadata(out)
    assert meta is not None and set(meta["plans"]) == {"planned_wanda"}
    assert meta["plans"]["planned_wanda"] == result.report.plans["planned_wanda"]
    assert {p["sparsity"] for p in meta["plans"]["planned_wanda"].values()} == {0.3, 0.7}
    # without a plan, no "plans" key
    plain = compress_model(LoadedModel(tiny_model("llama"), _Tokenizer(), "tiny-llama", None, "0" * 16), "wanda",
                           calibration=token_batch(n=4, length=16), progress=False)
    assert "plans" not in plain.metadata


# ---- data-free ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["rtn", "magnitude", "magnitude+rtn"])
def test_data_free_recipe_runs_no_forward(recipe):
    model = tiny_model("llama")
    counts = count_block_forwards(model)
    embeds = [0]
    model.get_input_embeddings().register_forward_hook(lambda *a: embeds.__setitem__(0, embeds[0] + 1))
    methods = make_recipe(recipe, scheme="w8-channel") if "rtn" in recipe else make_recipe(recipe)
    report = compress(model, token_batch(), methods, progress=False)
    assert counts == [0, 0] and embeds == [0]
    assert report.calibration is None
    assert report.pipeline == "data-free" and report.block_pipelines == ["data-free", "data-free"]
    assert len(report.layers) == 14
    if "magnitude" in recipe:
        assert report.sparsity == pytest.approx(0.5)


def test_forward_counter_sees_a_data_reading_recipe():
    model = tiny_model("llama")
    counts = count_block_forwards(model)
    report = compress(model, token_batch(n=6), make_method("wanda"), batch_size=4, progress=False)
    assert all(c > 0 for c in counts)
    assert report.calibration is not None and report.pipeline == "one-pass"


# ---- one-pass → two-pass fallback ------------------------------------------------------------------------

def call_down_proj_twice(model: torch.nn.Module, index: int) -> None:
    mlp = model.model.layers[index].mlp

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        return 0.5 * (mlp.down_proj(h) + mlp.down_proj(h))

    mlp.forward = forward


@pytest.mark.parametrize("index", [1, 0])
def test_block_calling_a_linear_twice_falls_back_to_two_pass_alone(index):
    model = tiny_model("llama")
    call_down_proj_twice(model, index)
    report = compress(model, token_batch(n=6), make_method("wanda"), batch_size=4, progress=False)
    expected = ["one-pass", "one-pass"]
    expected[index] = "two-pass"
    assert report.block_pipelines == expected
    assert report.pipeline == ("one-pass (blocks 0); two-pass (blocks 1)" if index == 1
                               else "two-pass (blocks 0); one-pass (blocks 1)")
    for W in (weight_of(m) for m in linears_of(model).values()):  # every layer still pruned exactly
        assert int((W == 0).sum()) == W.shape[0] * (W.shape[1] // 2)


# ---- recorded sparsity --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize(("pattern", "share"), [("2:4", 0.5), ("1:4", 0.75), ("4:8", 0.5)])
def test_pattern_decides_the_recorded_sparsity(method, pattern, share):
    m = make_method(method, sparsity=0.9, pattern=pattern)
    assert m.params()["sparsity"] == share and m.params()["pattern"] == pattern
    model = tiny_model("llama")
    report = compress(model, token_batch(n=4, length=16), m, progress=False)
    assert report.recipe[0]["sparsity"] == share
    zeros = total = 0
    n, mm = map(int, pattern.split(":"))
    for W in (weight_of(x) for x in linears_of(model).values()):
        zeros += int((W == 0).sum())
        total += W.numel()
        assert int((W.reshape(W.shape[0], -1, mm) != 0).sum(-1).max()) <= n
    assert zeros / total == share
    assert report.sparsity == pytest.approx(share)


# ---- parameter errors --------------------------------------------------------------------------------------

def test_a_parameter_the_method_does_not_take_names_its_parameters():
    with pytest.raises(RecipeError) as info:
        make_recipe("wanda", scheme="w4g128")
    message = str(info.value)
    assert "'scheme'" in message and "wanda" in message
    for p in parameters("wanda"):
        assert p in message
    assert set(parameters("wanda")) == {"sparsity", "pattern", "per_layer", "sparsity_profile", "owl_m", "owl_lambda"}


def test_a_typo_in_a_chain_suggests_the_close_name():
    with pytest.raises(RecipeError, match="Did you mean 'blocksize'") as info:
        make_recipe("sparsegpt+gptq", blocksise=64)
    assert "the chain 'sparsegpt+gptq'" in str(info.value)
    with pytest.raises(RecipeError, match="Did you mean 'damp'"):
        make_recipe("sparsegpt+gptq", dampp=0.1)
    chain = make_recipe("sparsegpt+gptq", blocksize=64, sparsity=0.5, scheme="w4g32")
    assert [type(m).__name__ for m in chain] == ["SparseGPT", "GPTQ"]
    assert chain[0].params()["sparsity"] == 0.5 and chain[1].params()["scheme"] == "w4g32"


# ---- stopwatch ---------------------------------------------------------------------------------------------

def test_stopwatch_excludes_nested_sections_from_the_outer_one():
    clock = Stopwatch("outer", "inner")
    t0 = time.perf_counter()
    with clock.section("outer"):
        time.sleep(0.03)
        with clock.section("inner"):
            time.sleep(0.1)
            with clock.section("deeper"):  # not declared: added on first use
                time.sleep(0.15)
        time.sleep(0.03)
    elapsed = time.perf_counter() - t0
    totals = dict(clock.totals)
    assert 0.06 <= totals["outer"] < 0.2  # ≥ 0.31 if the nested sections were counted in it
    assert 0.1 <= totals["inner"] < 0.22  # ≥ 0.25 if "deeper" were counted in it
    assert totals["deeper"] >= 0.15
    assert sum(totals.values()) == pytest.approx(elapsed, abs=0.01)  # each second counted once
    with clock.section("outer"):  # a section accumulates over its uses
        time.sleep(0.02)
    assert clock.totals["outer"] >= totals["outer"] + 0.02
    assert clock.totals["inner"] == totals["inner"]
