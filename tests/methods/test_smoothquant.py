"""SmoothQuant: its folds keep the model's function; with activation quantization it beats plain RTN."""

from __future__ import annotations

import pytest
import torch

from calibrant.engine import compress
from calibrant.errors import RecipeError
from calibrant.methods import make_method, make_recipe
from calibrant.methods.smoothquant import smoothing_scales
from tests.conftest import FAMILIES, tiny_model, token_batch


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_alone_keeps_the_logits(family):
    model = tiny_model(family)
    ids = token_batch(n=4, length=16)
    before = _logits(model, ids)
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n or "ln_" in n}
    compress(model, ids, make_method("smoothquant", alpha=0.5), progress=False, batch_size=2)
    assert any(not torch.equal(p, norms[n]) for n, p in model.named_parameters() if n in norms)
    assert (_logits(model, ids) - before).abs().max() < 1e-5 * before.abs().max()


def test_scales_follow_the_formula():
    s = smoothing_scales(torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0]), 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, (1e-5) ** 0.5 / 2 ** 0.5], dtype=torch.float64))


def test_smoothquant_rtn_beats_plain_rtn_on_planted_activation_outliers():
    ids = token_batch(n=8, length=32)
    errors = {}
    for recipe in ("rtn", "smoothquant+rtn"):
        model = tiny_model("llama", seed=3)
        with torch.no_grad():  # a few channels with 40x larger activations after each norm, as in real LLMs
            for block in model.model.layers:
                for norm in (block.input_layernorm, block.post_attention_layernorm):
                    norm.weight[:3] *= 40.0
        dense = _logits(model, ids)
        compress(model, ids, make_recipe(recipe, scheme="w8a8"), progress=False)
        errors[recipe] = float((_logits(model, ids) - dense).square().mean())
    assert errors["smoothquant+rtn"] < 0.5 * errors["rtn"]


@pytest.mark.parametrize("params, message", [
    ({"alpha": 1.5}, r"alpha must lie in \[0, 1\]"),
    ({"alpha": -0.1}, r"alpha must lie in \[0, 1\]"),
    ({"scheme": "w4g128"}, "only changes results when activations are quantized.*w8a8"),
])
def test_bad_smoothquant_parameters(params, message):
    with pytest.raises(RecipeError, match=message):
        make_method("smoothquant", **params)


def test_a_weight_only_quantizer_after_smoothquant_is_refused_before_any_change():
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    methods = [make_method("smoothquant"), make_method("rtn", scheme="w4g16")]
    with pytest.raises(RecipeError, match="after it uses w4g16 \\(weights only\\)"):
        compress(model, token_batch(), methods, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("recipe", ["smoothquant+rtn", "smoothquant+gptq"])
def test_smoothed_w8a8_exports_packed_and_reloads_with_the_folded_weights_and_norms(tmp_path, recipe):
    pytest.importorskip("compressed_tensors")
    import transformers as T

    from calibrant.export.packed import save_packed

    model = tiny_model("llama")
    compress(model, token_batch(), make_recipe(recipe, scheme="w8a8"), progress=False)
    out = save_packed(model, None, tmp_path / "packed", {})
    reloaded = T.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=T.CompressedTensorsConfig(dequantize=True)).eval()
    state = reloaded.state_dict()
    for name, param in model.named_parameters():  # folded norms and quantized weights, exactly
        assert torch.equal(state[name], param), name
