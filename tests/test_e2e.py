"""End to end on the real default model (SmolLM2-135M) and real text, with a small budget."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T

from calibrant.api import compress_model, evaluate_perplexity
from calibrant.models import load_model

pytestmark = pytest.mark.slow
EVAL_TOKENS = 1024


@pytest.fixture(scope="module")
def dense_ppl():
    return evaluate_perplexity(load_model("smollm2-135m", quiet=True), "wiki", max_tokens=EVAL_TOKENS,
                               progress=False)["wiki"]


def test_wanda_beats_magnitude_and_round_trips(dense_ppl, tmp_path):
    wanda = compress_model("smollm2-135m", "wanda", sparsity=0.5, calibration="wiki:8x128", out=tmp_path / "w",
                           progress=False)
    magnitude = compress_model("smollm2-135m", "magnitude", sparsity=0.5, progress=False)
    ppl_w = evaluate_perplexity(wanda.loaded, "wiki", max_tokens=EVAL_TOKENS, progress=False)["wiki"].ppl
    ppl_m = evaluate_perplexity(magnitude.loaded, "wiki", max_tokens=EVAL_TOKENS, progress=False)["wiki"].ppl
    assert math.isfinite(ppl_w) and dense_ppl.ppl < ppl_w < ppl_m
    assert wanda.report.sparsity == pytest.approx(0.5, abs=1e-3)

    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "w", dtype=torch.float32).eval()
    ids = wanda.calibration.input_ids[:2, :64]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, wanda.loaded.model(ids).logits)


def test_w8_rtn_within_one_percent_of_fp32(dense_ppl):
    w8 = compress_model("smollm2-135m", "rtn", scheme="w8-channel", calibration=None, progress=False)
    ppl = evaluate_perplexity(w8.loaded, "wiki", max_tokens=EVAL_TOKENS, progress=False)["wiki"].ppl
    assert abs(ppl / dense_ppl.ppl - 1) < 0.01
    assert w8.report.effective_bits == pytest.approx(8 + 16 / 576, abs=0.01)


def test_gptq_beats_rtn_on_real_layers():
    from calibrant.calibration import make_calibration
    from calibrant.engine import BlockwiseRunner
    from calibrant.engine.pipelines import observe
    from calibrant.methods import LayerContext, make_method
    from calibrant.models import Adapter, weight_of

    lm = load_model("smollm2-135m", quiet=True)
    calib = make_calibration("wiki:8x128", lm.tokenizer, seed=0)
    runner = BlockwiseRunner(lm.model)
    inputs = runner.capture(calib.input_ids)
    layers = Adapter(lm.model).block_linears(0)
    stats = observe(runner, 0, layers, ("hessian",), inputs, None)
    for name, module in layers.items():
        W = weight_of(module).float().clone()
        H = stats[name].hessian
        err = {}
        for method in ("rtn", "gptq"):
            Wq = make_method(method, scheme="w3g64").compress(W.clone(), stats[name], LayerContext(name))
            delta = W - Wq
            err[method] = float(torch.sum((delta @ H) * delta))
        assert err["gptq"] < err["rtn"], name
