"""Fold maps (calibrant.models.folds): folding positive per-channel scales leaves the model's function
unchanged, in every family that has folds."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from calibrant.errors import ModelError
from calibrant.models.adapter import Adapter, weight_of
from calibrant.models.folds import BlockFold, block_folds, fold_impossible
from tests.conftest import FAMILIES, tiny_config, tiny_model, token_batch

# fp32 logits after folding every fold of every block must equal the unfolded ones within
# ATOL_REL × max|logit| (float32 rounding of one division and one multiplication per weight)
ATOL_REL = 1e-4

# folds per block of the conftest's tiny models: llama and gemma3 use GQA (no v → o fold)
FOLD_COUNT = {"llama": 3, "opt": 4, "gpt2": 2, "gpt_neox": 2, "gemma3": 3}


def randomize_vectors(model: torch.nn.Module, seed: int = 1) -> None:
    """Random init leaves norm weights at 1 (0 for gemma's 1 + w) and biases at 0: make both matter, so a
    fold that forgot a bias or the norm offset shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def scales_for(fold: BlockFold, g: torch.Generator) -> torch.Tensor:
    dims = {weight_of(t).shape[1] for t in fold.targets.values()}
    assert len(dims) == 1
    return torch.exp(torch.randn(dims.pop(), generator=g) * 0.5)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_every_conftest_family_has_folds():
    assert set(FOLD_COUNT) == set(FAMILIES)
    assert all(fold_impossible(tiny_model(f)) is None for f in FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_every_fold_of_every_block_keeps_the_logits(family):
    model = tiny_model(family)
    randomize_vectors(model)
    ids = token_batch(n=3, length=16)
    before = logits(model, ids)
    adapter = Adapter(model)
    weights_before = {n: weight_of(m).detach().clone() for i in range(len(adapter.blocks))
                      for n, m in adapter.block_linears(i).items()}
    g = torch.Generator().manual_seed(0)
    applied = []
    for i in range(len(adapter.blocks)):
        folds = block_folds(model, i)
        assert len(folds) == FOLD_COUNT[family]
        for fold in folds:
            fold.apply(scales_for(fold, g))
            applied.append(fold.source_name)
    after = logits(model, ids)
    atol = ATOL_REL * before.abs().max().item()
    torch.testing.assert_close(after, before, rtol=0, atol=atol)
    # and the folds did change the weights: every fold target now differs
    changed = {n for n, m in dict(model.named_modules()).items() if n in weights_before
               and not torch.equal(weight_of(m), weights_before[n])}
    targets = {n for i in range(len(adapter.blocks)) for f in block_folds(model, i) for n in f.targets}
    assert targets and targets <= changed
    assert len(applied) >= 2 * len(adapter.blocks)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_wrong_fold_does_change_the_logits(family):
    """The test above is not vacuous: scales applied to the targets only change the logits."""
    model = tiny_model(family)
    randomize_vectors(model)
    ids = token_batch(n=2, length=12)
    before = logits(model, ids)
    fold = block_folds(model, 0)[0]
    s = scales_for(fold, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in fold.targets.values():
            w = weight_of(t)
            w.copy_(w * s[None, :])
    assert (logits(model, ids) - before).abs().max().item() > 100 * ATOL_REL * before.abs().max().item()


def test_gemma3_norm_offset_is_used():
    model = tiny_model("gemma3")
    fold = block_folds(model, 0)[0]
    assert fold.kind == "norm" and fold.offset == 1.0
    w0 = fold.source.weight.detach().clone()
    s = torch.full_like(w0, 2.0)
    fold.apply(s)
    torch.testing.assert_close(fold.source.weight, (w0 + 1) / 2 - 1)  # (1 + w) / s, stored as w


def _llama(kv_heads: int) -> torch.nn.Module:
    config = tiny_config("llama")
    config.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).eval()


def test_v_to_o_fold_absent_under_gqa_and_present_with_mha():
    gqa = _llama(2)
    assert gqa.config.num_attention_heads == 4 and gqa.config.num_key_value_heads == 2
    for i in range(gqa.config.num_hidden_layers):
        sources = [f.source_name for f in block_folds(gqa, i)]
        assert f"model.layers.{i}.self_attn.v_proj" not in sources
        assert sources == [f"model.layers.{i}.{s}" for s in ("input_layernorm", "post_attention_layernorm",
                                                              "mlp.up_proj")]
    mha = _llama(4)
    folds = block_folds(mha, 1)
    vo = [f for f in folds if f.source_name == "model.layers.1.self_attn.v_proj"]
    assert len(vo) == 1 and vo[0].kind == "linear"
    assert list(vo[0].targets) == ["model.layers.1.self_attn.o_proj"]
    # and folding it keeps the function
    randomize_vectors(mha)
    ids = token_batch(n=2, length=12)
    before = logits(mha, ids)
    vo[0].apply(torch.exp(torch.randn(64, generator=torch.Generator().manual_seed(3)) * 0.5))
    torch.testing.assert_close(logits(mha, ids), before, rtol=0, atol=ATOL_REL * before.abs().max().item())


def test_post_ln_opt_is_refused():
    config = tiny_config("opt")
    config.do_layer_norm_before = False
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    reason = fold_impossible(model)
    assert reason is not None and "post-LN" in reason
    with pytest.raises(ModelError, match="post-LN"):
        block_folds(model, 0)


def test_unknown_model_type_is_refused_naming_known_ones():
    model = tiny_model("llama")
    model.config.model_type = "no_such_family"
    reason = fold_impossible(model)
    assert reason is not None and "no_such_family" in reason and "llama" in reason
    with pytest.raises(ModelError, match="no_such_family"):
        block_folds(model, 0)


def test_opt_fc1_fold_needs_relu():
    config = tiny_config("opt")
    config.activation_function = "gelu"
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    assert "model.decoder.layers.0.fc1" not in [f.source_name for f in block_folds(model, 0)]
    assert "model.decoder.layers.0.fc1" in [f.source_name for f in block_folds(tiny_model("opt"), 0)]

