"""GGUF export: files that the gguf package dequantizes to calibrant's fake-quant weights bit for bit; metadata and
tokenizer carried through GGUF → calibrant → GGUF; refusals before any work."""

from __future__ import annotations

import gguf
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from calibrant.api import compress_model
from calibrant.engine import compress
from calibrant.export.gguf import _llama_permutation, save_gguf
from calibrant.export.packed import ExportError
from calibrant.methods import make_method
from calibrant.methods.quant import quant_state_of
from calibrant.models.ggufmeta import read_kv
from calibrant.models.loader import LoadedModel, load_model
from tests.calibration.calib_helpers import run_cli, tiny_model_dir
from tests.conftest import tiny_model, token_batch

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def _tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file dequantized by the gguf package, as ``[rows, cols]`` float32."""
    out = {}
    for t in GGUFReader(str(path)).tensors:
        shape = [int(s) for s in reversed(t.shape.tolist())]
        out[t.name] = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(shape)
    return out


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def _gguf_name(key: str, n_blocks: int) -> str:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks).get_name(key, try_suffixes=(".weight", ".bias"))


def _hf_layout(name: str, w: torch.Tensor, config) -> torch.Tensor:
    """A GGUF tensor back in Hugging Face's row order (q/k rows are llama.cpp's rotary order in the file)."""
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(name.split(".")[-2])
    if heads is None:
        return w
    return w[torch.argsort(_llama_permutation(w.shape[0], heads))]


def _assert_exact(path, model) -> int:
    """Each quantized linear of ``model`` equals its tensor in ``path`` dequantized; returns how many."""
    got, types = _tensors(path), _types(path)
    n = 0
    for name, module in model.named_modules():
        state = quant_state_of(module)
        if state is None:
            continue
        key = _gguf_name(f"{name}.weight", model.config.num_hidden_layers)
        assert types[key] == state.scheme.gguf.name.upper(), key
        assert torch.equal(_hf_layout(key, got[key], model.config), module.weight.detach()), key
        n += 1
    return n


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("name", TYPES)
def test_export_dequantizes_exactly_to_the_fake_quant_weights(tmp_path, name, method):
    model = tiny_model("llama")
    m = make_method(method, scheme=f"gguf-{name}")
    compress(model, token_batch() if m.reads_data() else None, m, progress=False)
    out, summary = save_gguf(model, tmp_path / "m.gguf", {"recipe": [{"method": method}]})
    assert _assert_exact(out, model) == 14
    types = _types(out)
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" in types  # the tiny llama's head is not tied to its embedding
    assert summary["file_type"] == f"MOSTLY_{name.upper()}"
    assert {r["why"] for r in summary["tensors"] if r["type"] == "F16"} == {"not quantized by the recipe"}
    kv = {p.key: p.value for p in read_kv(out)}
    assert kv["general.architecture"] == "llama" and kv["llama.block_count"] == 2
    assert kv["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{name.upper()}"])


@pytest.mark.parametrize("name", ["q4_0", "q4_1"])
def test_awq_searches_and_rounds_on_the_gguf_grid(tmp_path, name):
    model = tiny_model("llama")
    compress(model, token_batch(), make_method("awq", scheme=f"gguf-{name}"), progress=False)
    out, _ = save_gguf(model, tmp_path / "awq.gguf", {})
    assert _assert_exact(out, model) == 14


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_a_linear_the_grid_cannot_hold_falls_back_to_f16_with_its_reason(tmp_path, method):
    import transformers as T

    from tests.conftest import tiny_config

    cfg = tiny_config("llama")
    cfg.intermediate_size = 80  # down_proj reads 80 inputs: not a multiple of the blocks of 32
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    dense_down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    m = make_method(method, scheme="gguf-q4_0")
    report = compress(model, token_batch() if m.reads_data() else None, m, progress=False)
    downs = {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert set(report.fallbacks) == downs and "80 inputs" in report.fallbacks[min(downs)]
    assert {r.name for r in report.layers}.isdisjoint(downs) and len(report.layers) == 12
    if method != "awq":  # AWQ may fold a scale into it; RTN and GPTQ leave it untouched
        assert torch.equal(model.model.layers[0].mlp.down_proj.weight, dense_down)
    out, summary = save_gguf(model, tmp_path / "m.gguf", {"fallbacks": report.fallbacks})
    types = _types(out)
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"
    assert _assert_exact(out, model) == 12
    rows = {r["tensor"]: r for r in summary["tensors"]}
    assert rows["blk.1.ffn_down.weight"]["why"].startswith("fallback: 80 inputs are not a multiple")


# ---- GGUF → calibrant → GGUF ----------------------------------------------------------------------------------


def _write_source_gguf(path, model) -> None:
    """A tiny llama GGUF as llama.cpp's converter writes one: F32 tensors in llama.cpp's layout, a byte-level BPE
    tokenizer (gpt2 model) with one merge, special token ids and a chat template."""
    cfg = model.config
    # GPT-2's byte-level alphabet: printable ASCII stands for itself, the space byte is "Ġ"
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġ", *(chr(b) for b in range(33, 124)), "Ġt"]
    assert len(tokens) == cfg.vocab_size
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for key, value in model.state_dict().items():
        name = _gguf_name(key, cfg.num_hidden_layers)
        if ".attn_q." in name or ".attn_k." in name:
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            value = value[_llama_permutation(value.shape[0], heads)]
        w.add_tensor(name, value.detach().to(torch.float32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_metadata_tokenizer_and_layout_survive_gguf_to_calibrant_to_gguf(tmp_path):
    source_model = tiny_model("llama")
    src = tmp_path / "tiny.gguf"
    _write_source_gguf(src, source_model)

    # an unquantized F32 export gives back the source's tensors exactly (llama.cpp's q/k row order included)
    loaded = load_model(src, quiet=True)
    for key, value in source_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    plain, _ = save_gguf(loaded.model, tmp_path / "plain.gguf", {}, source_dir=loaded.path,
                         tokenizer=loaded.tokenizer, gguf_type_name="f32")
    want, got = _tensors(src), _tensors(plain)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    result = compress_model(src, "gptq", scheme="gguf-q4_0", calibration=token_batch(), out=tmp_path / "q.gguf",
                            export_format="gguf", progress=False)
    assert _assert_exact(tmp_path / "q.gguf", result.loaded.model) == 14
    before = {p.key: p for p in read_kv(src)}
    after = {p.key: p for p in read_kv(tmp_path / "q.gguf")}
    changed = {"general.file_type"}
    for key, p in before.items():
        if key not in changed:
            assert (after[key].value, after[key].type, after[key].sub_type) == (p.value, p.type, p.sub_type), key
    assert after["tokenizer.ggml.tokens"].value == before["tokenizer.ggml.tokens"].value
    assert after["general.file_type"].value == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    extra = set(after) - set(before)
    assert extra == {"calibrant.version", "calibrant.recipe", "calibrant.calibration_hash", "calibrant.base_model"}
    assert "gptq" in after["calibrant.recipe"].value
    assert after["calibrant.calibration_hash"].value == result.calibration.hash


@pytest.mark.parametrize("method, name", [("gptq", "q4_0"), ("awq", "q4_1"), ("rtn", "q8_0")])
def test_an_output_directory_exports_later_to_the_same_bytes(tmp_path, capsys, method, name):
    """compress --out DIR, then calibrant export DIR --format gguf: the file equals the one compress --format gguf
    writes from the same run, tensor for tensor, and its metadata is the source's."""
    src = tmp_path / "tiny.gguf"
    _write_source_gguf(src, tiny_model("llama"))
    result = compress_model(src, method, scheme=f"gguf-{name}", calibration=token_batch(), out=tmp_path / "dir",
                            progress=False)
    direct, _ = save_gguf(result.loaded.model, tmp_path / "direct.gguf", result.metadata,
                          source_dir=result.loaded.path, tokenizer=result.loaded.tokenizer)
    code, stdout, err = run_cli(capsys, "export", tmp_path / "dir", "--format", "gguf", "--out",
                                tmp_path / "later.gguf", "--quiet")
    assert code == 0, err
    assert f"14 {name.upper()}" in stdout and "saved:" in stdout
    later = {t.name: t for t in GGUFReader(str(tmp_path / "later.gguf")).tensors}
    first = {t.name: t for t in GGUFReader(str(direct)).tensors}
    assert set(later) == set(first)
    for key, t in first.items():
        assert t.tensor_type == later[key].tensor_type and bytes(t.data) == bytes(later[key].data), key
    assert _assert_exact(tmp_path / "later.gguf", result.loaded.model) == 14
    kv = {p.key: p.value for p in read_kv(tmp_path / "later.gguf")}
    assert kv["tokenizer.ggml.tokens"] == {p.key: p.value for p in read_kv(src)}["tokenizer.ggml.tokens"]
    assert method in kv["calibrant.recipe"]


def test_export_refuses_a_type_other_than_the_grid_and_directories_without_grids(tmp_path, capsys):
    src = tmp_path / "tiny.gguf"
    _write_source_gguf(src, tiny_model("llama"))
    compress_model(src, "rtn", scheme="gguf-q4_0", calibration=None, out=tmp_path / "dir", progress=False)
    capsys.readouterr()  # transformers' GGUF conversion bar
    out = tmp_path / "x.gguf"
    for argv, message in [(["--gguf-type", "q8_0"], "on the q4_0 grid; --gguf-type q8_0 would re-round them"),
                          (["--gguf-type", "q3_k"], "unknown GGUF type 'q3_k'"),
                          (["--format", "compressed-tensors"], "calibrant export writes --format gguf")]:
        code, _, err = run_cli(capsys, "export", tmp_path / "dir", *argv, "--out", out, "--quiet")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    (tmp_path / "dir" / "calibrant-extras" / "quant.safetensors").unlink()  # as an older output: no grids kept
    code, _, err = run_cli(capsys, "export", tmp_path / "dir", "--out", out, "--quiet")
    assert code == 2 and "does not keep the GGUF grid" in err and not out.exists()


# ---- refusals ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), "the cat sat on the mat and the dog sat on the log " * 20)


@pytest.mark.parametrize("argv, message", [
    (["--method", "rtn", "--scheme", "gguf-q4_0g128"], "blocks of 32 weights (one float16 scale each), not group "
                                                       "size 128; write 'gguf-q4_0'"),
    (["--method", "rtn", "--scheme", "w4g32"], "--scheme gguf-q4_0"),
    (["--method", "rtn", "--scheme", "w8-channel"], "--scheme gguf-q8_0"),
    (["--method", "rtn", "--scheme", "gguf-q4_0", "--gguf-type", "q8_0"], "use --scheme gguf-q8_0"),
    (["--method", "wanda", "--sparsity", "0.5", "--gguf-type", "q4_0"], "--method rtn --scheme gguf-q4_0"),
    (["--method", "rtn", "--scheme", "gguf-q4_0"], "load it from its .gguf file"),  # no GGUF source: no tokenizer
])
def test_cli_refusals_are_one_line_exit_2_and_write_nothing(tiny_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "out.gguf"
    code, _, err = run_cli(capsys, "compress", "--model", tiny_dir, *argv, "--format", "gguf", "--out", out,
                           "--calibration", "wiki:2x16", "--quiet")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unknown_family_names_the_supported_ones(tmp_path):
    opt = LoadedModel(model=tiny_model("opt"), tokenizer=None, spec="tiny-opt", path=None, model_hash="0" * 16)
    with pytest.raises(ExportError, match="knows the llama architecture .* not 'opt'"):
        compress_model(opt, "rtn", scheme="gguf-q8_0", calibration=None, out=tmp_path / "o.gguf",
                       export_format="gguf", progress=False)
    with pytest.raises(ExportError, match="write it with --format gguf"):
        compress_model(opt, "rtn", scheme="gguf-q8_0", calibration=None, out=tmp_path / "o",
                       export_format="compressed-tensors", progress=False)
    assert not list(tmp_path.iterdir())
