"""AWQ: scale search beats RTN on salient channels, folds keep the function, chains with GPTQ, exports packed."""

from __future__ import annotations

import pytest
import torch

from calibrant.engine import compress
from calibrant.errors import RecipeError
from calibrant.methods import make_method, make_recipe
from calibrant.methods.awq import awq_scales, clip_weight, output_error
from calibrant.methods.quant import fake_quant_weight, parse_scheme
from tests.conftest import FAMILIES, tiny_model, token_batch


def _salient_layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 30.0  # a few input channels with much larger activations, as in real LLMs
    W = torch.randn(64, 128, generator=g) * 0.05
    return x, W


def test_awq_scales_beat_rtn_on_planted_salient_channels():
    x, W = _salient_layer()
    scheme = parse_scheme("w3g32-asym")
    alpha, s, errors = awq_scales(x, x.abs().mean(0), W, scheme, grid=20)
    rtn = output_error(x, W, fake_quant_weight(W, scheme)[0])
    awq = output_error(x, W, fake_quant_weight(W * s, scheme)[0] / s)
    assert errors[0] == pytest.approx(rtn, rel=1e-5)  # α = 0 is plain RTN
    assert alpha > 0 and awq == pytest.approx(min(errors), rel=1e-5) and awq < 0.8 * rtn


def test_clip_search_never_does_worse_than_no_clip_per_group():
    x, W = _salient_layer(1)
    scheme = parse_scheme("w3g32")
    clipped = clip_weight(W, x, scheme, grid=10)
    assert (clipped.abs() <= W.abs() + 1e-7).all()
    assert output_error(x, W, fake_quant_weight(clipped, scheme)[0]) <= output_error(x, W, fake_quant_weight(W, scheme)[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_w8_keeps_the_model_close_and_every_weight_on_its_grid(family):
    model = tiny_model(family)
    ids = token_batch(n=8, length=16)
    with torch.no_grad():
        dense = model(ids).logits
    report = compress(model, ids, make_method("awq", scheme="w8g16-asym"), progress=False, batch_size=4)
    assert all(r.info["scheme"] == "w8g16-asym" for r in report.layers)
    with torch.no_grad():
        assert (model(ids).logits - dense).abs().max() < 0.02 * dense.abs().max()


def test_awq_beats_rtn_on_a_model_at_3_bits():
    ids = token_batch(n=16, length=32)
    errs = {}
    for recipe in ("rtn", "awq"):
        model = tiny_model("llama", seed=2)
        with torch.no_grad():
            for block in model.model.layers:  # salient channels after each norm
                block.input_layernorm.weight[:3] *= 20.0
                block.post_attention_layernorm.weight[:3] *= 20.0
            dense = model(ids).logits
        compress(model, ids, make_recipe(recipe, scheme="w3g16-asym"), progress=False)
        with torch.no_grad():
            errs[recipe] = float((model(ids).logits - dense).square().mean())
    assert errs["awq"] < errs["rtn"]


def test_awq_then_gptq_leaves_rounding_to_gptq_and_keeps_the_folds():
    model = tiny_model("llama")
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    report = compress(model, token_batch(), make_recipe("awq+gptq", scheme="w4g16-asym"), progress=False)
    assert all(r.info["scheme"] == "w4g16-asym" and r.rel_error is not None for r in report.layers)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)  # scales were folded


def test_awq_exports_packed_and_reloads_exactly(tmp_path):
    pytest.importorskip("compressed_tensors")
    import transformers as T

    from calibrant.export.packed import save_packed

    model = tiny_model("llama")
    compress(model, token_batch(), make_method("awq", scheme="w4g16-asym"), progress=False)
    out = save_packed(model, None, tmp_path / "packed", {})
    reloaded = T.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=T.CompressedTensorsConfig(dequantize=True)).eval()
    state = reloaded.state_dict()
    for name, param in model.named_parameters():
        assert torch.equal(state[name], param), name


@pytest.mark.parametrize("params, message", [
    ({"scheme": "w8a8"}, "weight-only method"),
    ({"grid": 1}, "at least 2 points"),
])
def test_bad_awq_parameters(params, message):
    with pytest.raises(RecipeError, match=message):
        make_method("awq", **params)
