"""Structured pruning: exact at keep 1.0, equal to masking the removed units, exact parameter counts, reloads."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from search_helpers import gqa_model, tokens, word_tokenizer

from calibrant.errors import CalibrantError
from calibrant.models.structured import load_structured, save_structured
from calibrant.search.importance import compute_importance
from calibrant.search.pruner import StructuredPruner, count_block_params
from calibrant.search.structured import ModelShape, StructuredConfig

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_exact_and_masking_reference_matches(family):
    model = gqa_model(family)
    ids = tokens()
    dense = logits(model, ids)
    imp = compute_importance(model, tokens(8, 16, seed=1), "wanda", progress=False, cache=False)
    pruner = StructuredPruner(model, imp)
    shape = pruner.shape
    assert (shape.n_heads, shape.n_kv, shape.head_dim, shape.intermediate) == (6, 3, 8, 96)

    pruner.apply(StructuredConfig.dense(shape))
    assert torch.equal(logits(model, ids), dense)

    cfg = StructuredConfig((1, 2, 3), (32, 96, 8))
    pruner.apply(cfg)
    pruned = logits(model, ids)
    assert count_block_params(model) == cfg.params(shape)
    for i, block in enumerate(model.model.layers):
        g = cfg.kv_groups[i]
        assert block.self_attn.q_proj.out_features == g * 2 * 8 == block.self_attn.o_proj.in_features
        assert block.self_attn.k_proj.out_features == g * 8 == block.self_attn.v_proj.out_features
        assert block.mlp.down_proj.in_features == cfg.mlp_channels[i]

    # reference: the dense model with the removed groups' o_proj input columns and the removed channels'
    # down_proj columns set to zero
    pruner.restore()
    assert torch.equal(logits(model, ids), dense)
    reference = gqa_model(family)
    with torch.no_grad():
        for i, block in enumerate(reference.model.layers):
            keep_g = imp.kept_groups(i, cfg.kv_groups[i]).tolist()
            for grp in range(3):
                if grp not in keep_g:
                    block.self_attn.o_proj.weight[:, grp * 16:(grp + 1) * 16] = 0
            mask = torch.ones(96, dtype=torch.bool)
            mask[imp.kept_channels(i, cfg.mlp_channels[i])] = False
            block.mlp.down_proj.weight[:, mask] = 0
    torch.testing.assert_close(pruned, logits(reference, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_block_removal_and_dense_restore(family):
    model = gqa_model(family, layers=4)
    ids = tokens()
    dense = logits(model, ids)
    pruner = StructuredPruner(model, compute_importance(model, None, "magnitude", progress=False, cache=False))
    cfg = StructuredConfig((3, 2, 3, 1), (96, 64, 96, 32), (False, True, False, False))
    pruner.apply(cfg)
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    assert count_block_params(model) == cfg.params(pruner.shape)
    out = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)  # KV cache works with fewer blocks
    assert out.shape == (1, 9)
    # the reference: run the dense model with block 1 skipped
    ref = gqa_model(family, layers=4)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in (0, 2, 3)])
    for j, b in enumerate(ref.model.layers):
        b.self_attn.layer_idx = j
    ref.config.num_hidden_layers = 3
    if getattr(ref.config, "layer_types", None):  # per-layer attention kinds (Gemma-3's sliding windows)
        ref.config.layer_types = [ref.config.layer_types[i] for i in (0, 2, 3)]
    ref_pruner = StructuredPruner(ref, compute_importance(ref, None, "magnitude", progress=False, cache=False))
    ref_pruner.apply(StructuredConfig((3, 3, 1), (96, 96, 32)))
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
    pruner.restore()
    assert model.config.num_hidden_layers == 4 and not hasattr(model.config, "calibrant_structured")
    assert torch.equal(logits(model, ids), dense)


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_heterogeneous_save_reload_identical(tmp_path, family):
    model = gqa_model(family)
    ids = tokens()
    pruner = StructuredPruner(model, compute_importance(model, tokens(8, 16), "wanda", progress=False, cache=False))
    pruner.apply(StructuredConfig((1, 3, 2), (40, 96, 16), (False, False, False)))
    expected = logits(model, ids)
    tok = word_tokenizer()
    out = save_structured(model, tok, tmp_path / "het")
    record = json.loads((out / "config.json").read_text())["calibrant_structured"]
    assert record["num_key_value_heads"] == [1, 3, 2] and record["intermediate_size"] == [40, 96, 16]
    assert json.loads((out / "config.json").read_text())["model_type"] == f"calibrant_{family}"
    loaded = load_structured(out)
    assert isinstance(loaded, type(model))
    assert torch.equal(logits(loaded, ids), expected)
    plain = T.AutoModelForCausalLM.from_pretrained(out)  # registered by import calibrant
    assert torch.equal(logits(plain.eval(), ids), expected)
    from calibrant.models.loader import load_model

    assert torch.equal(logits(load_model(out, quiet=True).model, ids), expected)


def test_uniform_pruned_model_loads_with_plain_from_pretrained(tmp_path):
    model = gqa_model("llama", layers=4)
    ids = tokens()
    pruner = StructuredPruner(model, compute_importance(model, None, "magnitude", progress=False, cache=False))
    pruner.apply(StructuredConfig((2,) * 4, (64,) * 4, (False, False, True, False)))
    expected = logits(model, ids)
    out = save_structured(model, None, tmp_path / "uni")
    plain = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.config.num_hidden_layers == 3
    assert torch.equal(logits(plain, ids), expected)


def test_importance_cached_and_refusals(tmp_path):
    model = gqa_model("llama")
    calib = tokens(8, 16, seed=2)
    first = compute_importance(model, calib, "wanda", progress=False)
    again = compute_importance(model, calib, "wanda", progress=False)
    assert again.meta["cached"] and all(torch.equal(a, b) for a, b in zip(first.groups, again.groups, strict=True))
    with pytest.raises(CalibrantError, match="needs calibration"):
        compute_importance(model, None, "wanda", progress=False)
    with pytest.raises(CalibrantError, match="unknown importance score"):
        compute_importance(model, calib, "taylor", progress=False)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=96))
    with pytest.raises(CalibrantError, match="supported families: llama"):
        ModelShape.of(gpt2)
    pruner = StructuredPruner(model, first)
    with pytest.raises(CalibrantError, match="keeps 0 KV groups"):
        pruner.apply(StructuredConfig((0, 3, 3), (96, 96, 96)))


@pytest.mark.slow
def test_real_model_heterogeneous_prune_save_reload(tmp_path):
    """SmolLM2-135M: 30 blocks, 3 KV groups of 3 query heads; a mixed configuration shrinks and reloads exactly."""
    from calibrant.models.loader import load_model

    lm = load_model("smollm2-135m", quiet=True)
    pruner = StructuredPruner(lm.model, compute_importance(lm.model, None, "magnitude", progress=False,
                                                           cache=False))
    shape = pruner.shape
    assert (shape.n_blocks, shape.n_heads, shape.n_kv, shape.head_dim, shape.intermediate) == (30, 9, 3, 64, 1536)
    cfg = StructuredConfig(tuple([3, 2, 1] * 10), tuple([1536, 1024, 512] * 10),
                           tuple(i == 29 for i in range(30)))
    pruner.apply(cfg)
    assert count_block_params(lm.model) == cfg.params(shape)
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    expected = logits(lm.model, ids)
    out = save_structured(lm.model, lm.tokenizer, tmp_path / "smol")
    reloaded = load_model(out, quiet=True).model
    assert reloaded.config.num_hidden_layers == 29
    assert torch.equal(logits(reloaded, ids), expected)


def test_importance_honours_a_token_mask():
    """Rows are independent, so masking whole rows out must give the scores of the kept rows alone; an
    all-true mask gives the unmasked scores, and a mask changes the cache key."""
    model = gqa_model("llama")
    ids = tokens(6, 16, seed=2)
    mask = torch.zeros(6, 16, dtype=torch.bool)
    mask[[1, 4]] = True
    masked = compute_importance(model, ids, "wanda", progress=False, cache=False, token_mask=mask, batch_size=4)
    alone = compute_importance(model, ids[[1, 4]], "wanda", progress=False, cache=False)
    full = compute_importance(model, ids, "wanda", progress=False, cache=False)
    ones = compute_importance(model, ids, "wanda", progress=False, cache=False, token_mask=torch.ones(6, 16).bool())
    for a, b in [(masked, alone), (ones, full)]:
        assert a.meta["tokens"] == b.meta["tokens"]
        for x, y in zip(a.groups + a.channels, b.groups + b.channels, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(a.block_influence, b.block_influence, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(masked.channels[0], full.channels[0])


@pytest.mark.parametrize("family, why", [("opt", "fc1 → fc2 without a gate"), ("gpt_neox", "fused query_key_value")])
def test_families_that_cannot_be_sliced_say_why(family, why):
    from calibrant.search.structured import check_prunable

    cfg = {"opt": T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                              word_embed_proj_dim=32, vocab_size=96),
           "gpt_neox": T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, vocab_size=96)}[family]
    with pytest.raises(CalibrantError, match=f"'{family}' models is not supported: .*{why}.*supported families: "
                                             "llama, mistral, qwen2, qwen3, gemma3_text"):
        check_prunable(T.AutoModelForCausalLM.from_config(cfg))
