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
