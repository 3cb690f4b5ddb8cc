"""Layer-sequential engine on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch

from calibrant.engine import BlockwiseRunner, compress
from calibrant.errors import CalibrationError, ModelError, RecipeError
from calibrant.methods import make_method
from calibrant.methods.base import LayerStats
from calibrant.methods.stats import Hessian
from calibrant.models.adapter import Adapter, weight_of
from tests.conftest import FAMILIES, tiny_model, token_batch


@pytest.mark.parametrize("family", FAMILIES)
def test_uncompressed_block_inputs_equal_dense_hidden_states(family):
    model = tiny_model(family)
    ids = token_batch(n=5, length=24)  # 5 rows with batch size 2: a ragged last batch too
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    runner = BlockwiseRunner(model, batch_size=2)
    x = runner.capture(ids)
    for i in range(len(runner.adapter.blocks)):
        torch.testing.assert_close(x, hidden[i], rtol=0, atol=1e-5)
        y = torch.empty_like(x)
        runner.run_block(i, x, y)
        x = y


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_sparsity_every_layer(family, method):
    model = tiny_model(family)
    report = compress(model, token_batch(), make_method(method, sparsity=0.5), batch_size=4, progress=False)
    adapter = Adapter(model)
    names = [n for i in range(len(adapter.blocks)) for n in adapter.block_linears(i)]
    assert [r.name for r in report.layers] == names
    for i in range(len(adapter.blocks)):
        for name, module in adapter.block_linears(i).items():
            W = weight_of(module)
            zeros = int((W == 0).sum())
            expected = W.shape[0] * int(W.shape[1] * 0.5) if method == "wanda" else int(W.numel() * 0.5)
            assert zeros == expected, name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_nm_pattern_holds_in_model_and_head_stays_dense(family):
    model = tiny_model(family)
    head_before = model.get_output_embeddings().weight.detach().clone()
    compress(model, token_batch(), make_method("sparsegpt", pattern="2:4"), progress=False)
    adapter = Adapter(model)
    for i in range(len(adapter.blocks)):
        for module in adapter.block_linears(i).values():
            W = weight_of(module)
            assert int((W.reshape(W.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    assert torch.equal(model.get_output_embeddings().weight, head_before)


def test_include_exclude_patterns():
    model = tiny_model("llama")
    report = compress(model, token_batch(), make_method("wanda"), include=["mlp"], exclude=["down_proj"], progress=False)
    assert report.layers and all("mlp" in r.name and "down_proj" not in r.name for r in report.layers)
    assert float((weight_of(model.model.layers[0].self_attn.q_proj) == 0).float().mean()) == 0.0
    with pytest.raises(RecipeError, match="select no linear"):
        compress(tiny_model("llama"), token_batch(), make_method("wanda"), include=["nothing_like_this"], progress=False)


def test_sparsegpt_beats_magnitude_on_block_outputs():
    ids = token_batch(n=8, length=32)
    dense = tiny_model("llama")
    with torch.no_grad():
        ref = dense(ids, output_hidden_states=True).hidden_states[-1]
    errs = {}
    for name in ("magnitude", "sparsegpt"):
        model = tiny_model("llama")
        compress(model, ids, make_method(name, sparsity=0.5), progress=False)
        with torch.no_grad():
            errs[name] = float((model(ids, output_hidden_states=True).hidden_states[-1] - ref).square().mean())
    assert errs["sparsegpt"] < errs["magnitude"]


def test_dense_propagation_and_shared_hessians():
    model = tiny_model("llama")
    report = compress(model, token_batch(), make_method("sparsegpt"), propagate="dense", progress=False)
    assert report.propagate == "dense" and report.timings["forward_s"] > 0
    assert all(r.rel_error is not None and 0 < r.rel_error < 1 for r in report.layers)


def test_data_free_method_needs_no_calibration_but_others_do():
    report = compress(tiny_model("llama"), None, make_method("magnitude"), progress=False)
    assert abs(report.sparsity - 0.5) < 1e-9
    with pytest.raises(CalibrationError, match="needs calibration data"):
        compress(tiny_model("llama"), None, make_method("wanda"), progress=False)


def test_calibration_longer_than_context_is_refused():
    with pytest.raises(CalibrationError, match="exceeds the model's context of 128"):
        compress(tiny_model("llama"), token_batch(n=2, length=200), make_method("wanda"), progress=False)


def test_nm_indivisible_layer_refused_before_anything_changes():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match="not divisible by M=48"):
        compress(model, token_batch(), make_method("wanda", pattern="2:48"), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unsupported_architecture_lists_supported():
    import transformers as T

    cfg = T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with pytest.raises(ModelError, match="supports .*llama.*opt"):
        Adapter(T.BertForMaskedLM(cfg))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gptq_in_engine_puts_every_weight_on_its_grid(family):
    from calibrant.methods.quant import expand_groups, parse_scheme

    model = tiny_model(family)
    report = compress(model, token_batch(), make_method("gptq", scheme="w4g16"), progress=False)
    adapter = Adapter(model)
    for i in range(len(adapter.blocks)):
        for module in adapter.block_linears(i).values():
            W = weight_of(module).float()
            q = module.calibrant_quant
            assert q.scale.shape == (W.shape[0], -(-W.shape[1] // 16))
            scale = expand_groups(q.scale, W.shape[1], parse_scheme("w4g16"))
            ints = W / scale  # symmetric: zero point 0
            assert torch.allclose(ints, ints.round(), atol=1e-3) and ints.abs().max() <= 8
    assert report.effective_bits == pytest.approx(4 + 16 / 16)


def test_w8a8_simulates_activation_quantization_and_survives_save(tmp_path):
    import transformers as T

    from calibrant.export import read_metadata, restore_activation_quant, save_model

    ids = token_batch(n=2, length=16, seed=9)
    w8 = tiny_model("llama")
    compress(w8, None, make_method("rtn", scheme="w8-channel"), progress=False)
    w8a8 = tiny_model("llama")
    report = compress(w8a8, None, make_method("rtn", scheme="w8a8"), progress=False)
    with torch.no_grad():
        a, b = w8(ids).logits, w8a8(ids).logits
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.05)  # activations are rounded too, slightly
    meta = {"layers": [{"name": r.name, **r.info} for r in report.layers]}
    save_model(w8a8, None, tmp_path / "m", meta)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert restore_activation_quant(reloaded, read_metadata(tmp_path / "m")) == len(report.layers)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, b)


def _one_block_llama(seed: int = 0, blocks: int = 1) -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=blocks,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return T.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method, params", [("gptq", {"scheme": "w4g16"}), ("sparsegpt", {"sparsity": 0.5}),
                                            ("wanda", {"sparsity": 0.5}), ("gptq", {"scheme": "w8a8"})])
def test_one_pass_is_true_sequential(method, params):
    """One pass over a block == compressing its linear groups one call at a time, each call re-capturing
    the inputs through the groups compressed before it (q/k/v, then o, then gate/up, then down)."""
    ids = token_batch(n=10, length=32)  # batches 4, 4, 2: three threads
    fused, reference = _one_block_llama(), _one_block_llama()
    report = compress(fused, ids, make_method(method, **params), batch_size=4, progress=False)
    assert report.pipeline == "one-pass" and len(report.layers) == 7
    for group in (["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]):
        compress(reference, ids, make_method(method, **params), batch_size=4, progress=False, pipeline="two-pass",
                 include=group)
    for (name, a), b in zip(fused.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_one_pass_outputs_written_over_inputs_feed_the_next_block_exactly():
    """One-pass blocks write each batch's outputs over its inputs: over three blocks the result must
    still equal compressing one group at a time, every call re-capturing all inputs from scratch."""
    ids = token_batch(n=10, length=32)
    fused, reference = _one_block_llama(blocks=3), _one_block_llama(blocks=3)
    report = compress(fused, ids, make_method("gptq", scheme="w4g16"), batch_size=4, progress=False)
    assert report.pipeline == "one-pass" and len(report.layers) == 21
    for i in range(3):
        for group in (["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]):
            compress(reference, ids, make_method("gptq", scheme="w4g16"), batch_size=4, progress=False,
                     pipeline="two-pass", include=[f"*layers.{i}.*{g}" for g in group])
    for (name, a), b in zip(fused.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_one_pass_is_deterministic_and_differs_from_two_pass():
    ids = token_batch(n=6, length=24)
    models = [tiny_model("llama") for _ in range(3)]
    for m, pipeline in zip(models, ["one-pass", "one-pass", "two-pass"], strict=True):
        compress(m, ids, make_method("gptq", scheme="w4g16"), batch_size=2, progress=False, pipeline=pipeline)
    a, b, c = (list(m.parameters()) for m in models)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(a, c, strict=True))  # o/down see compressed inputs


def _count_live_forwards(model):
    """Wrap block 0's forward: live[0] is how many of its calls have not returned or unwound."""
    block = Adapter(model).blocks[0]
    original, live = block.forward, [0]

    def counted(*args, **kwargs):
        live[0] += 1
        try:
            return original(*args, **kwargs)
        finally:
            live[0] -= 1

    block.forward = counted
    return live


def test_one_pass_error_in_a_group_unwinds_every_parked_batch():
    from calibrant.errors import NumericalError
    from calibrant.methods.base import Method

    class Exploding(Method):
        name = "exploding"
        statistics = ("sq_norms",)

        def compress(self, weight, stats, ctx):
            if "o_proj" in ctx.name:
                return weight * float("nan")
            return weight

    model = tiny_model("llama")
    live = _count_live_forwards(model)
    with pytest.raises(NumericalError, match="o_proj"):
        compress(model, token_batch(n=6, length=16), Exploding(), batch_size=2, progress=False)
    assert live[0] == 0  # the batches parked at o_proj were unwound, not left suspended


def test_one_pass_error_in_one_batch_forward_is_raised_and_unwinds_the_others():
    model = tiny_model("llama")
    live = _count_live_forwards(model)
    calls = [0]

    def fail_second_batch(module, args):  # call 1 is the engine's call-order probe, 2 batch 0, 3 batch 1
        calls[0] += 1
        if calls[0] == 3:
            raise ValueError("batch 1 broke")

    Adapter(model).blocks[0].mlp.down_proj.register_forward_pre_hook(fail_second_batch)
    with pytest.raises(ValueError, match="batch 1 broke"):
        compress(model, token_batch(n=6, length=16), make_method("gptq", scheme="w4g16"), batch_size=2,
                 progress=False)
    assert live[0] == 0  # batch 0 (parked at down_proj) and batch 2 (at gate/up) were unwound
    assert calls[0] == 3  # batch 2 never reached down_proj


@pytest.mark.parametrize("dim", [Hessian.TRIANGULAR_MIN_DIM + 37, 1024 + 37])  # 4 and 6 unequal chunks
def test_triangular_hessian_accumulation_matches_float64(dim):
    st = LayerStats(dim, "hessian")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(300, dim, generator=g) for _ in range(3)]
    for x in xs:
        st.add(x)
    ref = sum(x.double().t() @ x.double() for x in xs)
    H = st.hessian
    assert torch.equal(H, H.t())
    torch.testing.assert_close(H.double(), ref, rtol=1e-5, atol=1e-3)
    st.add(xs[0])  # reading does not stop accumulation
    torch.testing.assert_close(st.hessian.double(), ref + xs[0].double().t() @ xs[0].double(), rtol=1e-5, atol=1e-3)
