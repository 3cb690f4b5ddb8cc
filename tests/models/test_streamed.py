"""Models larger than memory: a sharded safetensors checkpoint compressed and evaluated block by block.

Streamed compression must equal in-memory compression bitwise (both compute in float32 and write the
checkpoint's dtype), hold at most one decoder block at a time, and leave nothing behind when interrupted; streamed
perplexity must equal the in-memory one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from calibrant.api import compress_model, evaluate_perplexity
from calibrant.engine import compress
from calibrant.errors import CalibrantError
from calibrant.evaluate.perplexity import perplexity
from calibrant.evaluate.streamed import streamed_perplexity
from calibrant.methods import make_recipe

VOCAB = 96
CALIB = torch.randint(3, VOCAB, (8, 24), generator=torch.Generator().manual_seed(1))
METHODS = [("wanda", {"sparsity": 0.5}), ("sparsegpt", {"sparsity": 0.5}), ("gptq", {"scheme": "w4g32"}),
           ("rtn", {"scheme": "w4g32"}), ("awq", {"scheme": "w4g32"}), ("spqr", {}),
           ("wanda", {"sparsity": 0.5, "sparsity_profile": "owl"})]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *(f"w{j}" for j in range(VOCAB - 3))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def _checkpoint(root: Path, dtype: torch.dtype, tied: bool = True) -> Path:
    """A 3-block Llama saved in ``dtype`` over several safetensors shards, with a tokenizer."""
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        tie_word_embeddings=tied)
    torch.manual_seed(0)
    path = root / f"ckpt-{str(dtype).removeprefix('torch.')}"
    T.LlamaForCausalLM(cfg).eval().to(dtype).save_pretrained(path, max_shard_size="40KB")
    _tokenizer().save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("name, params", METHODS, ids=[f"{m}-{'-'.join(map(str, p.values()))}" for m, p in METHODS])
def test_streamed_equals_in_memory_fp32(tmp_path, name, params):
    src = _checkpoint(tmp_path, torch.float32)
    ram = compress_model(str(src), name, calibration=CALIB, out=tmp_path / "ram", progress=False, stream=False,
                         **params)
    streamed = compress_model(str(src), name, calibration=CALIB, out=tmp_path / "streamed", progress=False,
                              stream=True, **params)
    a, b = _tensors(tmp_path / "ram"), _tensors(tmp_path / "streamed")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    meta = json.loads((tmp_path / "streamed" / "calibrant.json").read_text())
    assert meta["streamed"]["peak_resident_blocks"] == 1 and meta["streamed"]["dtype"] == "float32"
    assert meta["overall_sparsity"] == ram.report.sparsity == streamed.report.sparsity
    assert {"read_s", "write_s"} <= streamed.report.timings.keys()
    if (tmp_path / "ram" / "calibrant-extras").exists():  # SpQR's outliers and statistics travel too
        assert _tensors(tmp_path / "ram" / "calibrant-extras").keys() == \
            _tensors(tmp_path / "streamed" / "calibrant-extras").keys()
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(back(CALIB[:2]).logits, ram.loaded.model(CALIB[:2]).logits)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name, params", METHODS[:3])
def test_bf16_computes_in_float32_and_stays_bf16_streamed_or_in_memory(tmp_path, name, params, tied):
    src = _checkpoint(tmp_path, torch.bfloat16, tied=tied)
    ram = compress_model(str(src), name, calibration=CALIB, out=tmp_path / "ram", progress=False, stream=False,
                         **params)
    compress_model(str(src), name, calibration=CALIB, out=tmp_path / "out", progress=False, stream=True, **params)
    written, in_memory = _tensors(tmp_path / "out"), _tensors(tmp_path / "ram")
    assert {t.dtype for t in written.values()} == {t.dtype for t in in_memory.values()} == {torch.bfloat16}
    assert written.keys() == in_memory.keys()
    assert [k for k in written if not torch.equal(written[k], in_memory[k])] == []
    for out in ("out", "ram"):
        assert json.loads((tmp_path / out / "config.json").read_text())["dtype"] == "bfloat16"
        assert json.loads((tmp_path / out / "calibrant.json").read_text())["dtype"] == \
            {"stored": "bfloat16", "compute": "float32"}
    # computed in float32, not in bf16: a bf16 forward would give other statistics, other weights
    reference = T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    compress(reference, CALIB, make_recipe(name, **params), progress=False)
    assert [k for k, v in reference.state_dict().items() if k in written
            and not torch.equal(v.to(torch.bfloat16), written[k])] == []
    # the in-memory result holds, in float32, exactly the bf16 weights it wrote
    state = ram.loaded.model.state_dict()
    assert [k for k in written if not torch.equal(state[k], written[k].float())] == []


def _mapped(directory: Path) -> set[str]:
    """Files of ``directory`` this process has memory-mapped now (Linux)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {Path(line.split(maxsplit=5)[5]).name for line in lines
            if len(line.split(maxsplit=5)) == 6 and line.split(maxsplit=5)[5].startswith(str(directory))}


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps")
def test_no_input_shard_stays_mapped_while_blocks_are_compressed(tmp_path, monkeypatch):
    # a block compressed in place inside the shard's private map turns its pages into anonymous memory that
    # lives as long as the map: on a 7 B model every block read so far stayed in memory (found by the bench)
    from calibrant.export import streamed

    src = _checkpoint(tmp_path, torch.float32)
    seen: list[set[str]] = []
    original = streamed.StreamedBlocks.leave

    def leave(self, index, final):
        seen.append(_mapped(src))
        original(self, index, final)

    monkeypatch.setattr(streamed.StreamedBlocks, "leave", leave)
    compress_model(str(src), "wanda", sparsity=0.5, calibration=CALIB, out=tmp_path / "out", progress=False,
                   stream=True)
    assert len(seen) == 3 and seen == [set()] * 3


def test_an_untied_head_is_read_only_to_be_written(tmp_path, monkeypatch):
    from calibrant.export import streamed

    src = _checkpoint(tmp_path, torch.float32, tied=False)
    head_loaded: list[bool] = []
    original = streamed.StreamedBlocks.leave

    def leave(self, index, final):
        head_loaded.append(not self.model.lm_head.weight.is_meta)
        original(self, index, final)

    monkeypatch.setattr(streamed.StreamedBlocks, "leave", leave)
    compress_model(str(src), "wanda", sparsity=0.5, calibration=CALIB, out=tmp_path / "out", progress=False,
                   stream=True)
    assert head_loaded == [False] * 3
    assert torch.equal(_tensors(tmp_path / "out")["lm_head.weight"], _tensors(src)["lm_head.weight"])


def test_interrupted_streamed_run_leaves_nothing(tmp_path, monkeypatch):
    from calibrant.export import streamed

    src = _checkpoint(tmp_path, torch.float32)
    original = streamed.StreamedBlocks.leave

    def leave(self, index, final):
        if index == 1:
            raise RuntimeError("injected failure in block 1")
        original(self, index, final)

    monkeypatch.setattr(streamed.StreamedBlocks, "leave", leave)
    with pytest.raises(RuntimeError, match="injected"):
        compress_model(str(src), "wanda", sparsity=0.5, calibration=CALIB, out=tmp_path / "out", progress=False,
                       stream=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # no --out, no temporary sibling


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_perplexity_equals_in_memory(tmp_path, dtype):
    src = _checkpoint(tmp_path, dtype, tied=dtype == torch.float32)
    ids = torch.randint(0, VOCAB, (1000,), generator=torch.Generator().manual_seed(2))
    model = T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()  # calibrant computes in fp32
    ram = perplexity(model, ids, seq_len=64, batch_size=4, progress=False)
    for budget in (64 * 64 * 2 * 4 * 4, 1 << 30):  # several chunks (the model read once per chunk), or one
        out = streamed_perplexity(src, ids, seq_len=64, batch_size=4, max_activation_bytes=budget, progress=False)
        assert out.ppl == ram.ppl and out.tokens == ram.tokens
    assert out.protocol["streamed"]["chunks"] == 2  # 15 full windows, then the tail window on its own


def test_streamed_result_is_refused_in_memory_and_evaluates_from_its_directory(tmp_path):
    src = _checkpoint(tmp_path, torch.float32)
    result = compress_model(str(src), "wanda", sparsity=0.5, calibration=CALIB, out=tmp_path / "out",
                            progress=False, stream=True)
    assert all(p.is_meta for p in result.loaded.model.parameters())  # nothing stays resident
    with pytest.raises(CalibrantError, match="evaluate its output directory"):
        evaluate_perplexity(result.loaded, "wiki", progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"out": None}, "needs an output directory"),
    ({"export_format": "gguf", "scheme": "gguf-q4_0", "method": "rtn"}, "needs the whole model in memory"),
    ({"calibration": "self:4x16"}, "self-calibration generates text with the whole model"),
])
def test_streaming_refusals(tmp_path, kwargs, message):
    src = _checkpoint(tmp_path, torch.float32)
    args = {"method": "wanda", "sparsity": 0.5, "calibration": CALIB, "out": tmp_path / "o", **kwargs}
    if "scheme" in args:
        args.pop("sparsity")
    if args["out"] is not None and args.get("export_format") == "gguf":
        args["out"] = tmp_path / "o.gguf"
    method = args.pop("method")
    with pytest.raises(CalibrantError) as e:
        compress_model(str(src), method, progress=False, stream=True, **args)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.gguf").exists()


def test_a_checkpoint_without_safetensors_is_refused_with_the_fix(tmp_path):
    src = tmp_path / "bin"
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    src.mkdir()
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")  # an old-style checkpoint: no safetensors
    _tokenizer().save_pretrained(src)
    with pytest.raises(CalibrantError, match="streaming reads safetensors: convert it once"):
        compress_model(str(src), "wanda", sparsity=0.5, calibration=CALIB, out=tmp_path / "o", progress=False,
                       stream=True)
    assert not (tmp_path / "o").exists()


def test_auto_streaming_when_the_model_would_not_fit(tmp_path, monkeypatch, capsys):
    from calibrant import streaming

    src = _checkpoint(tmp_path, torch.float32)
    monkeypatch.setattr(streaming, "in_memory_bytes", lambda *a: 10**15)  # as if it took a petabyte in memory
    result = compress_model(str(src), "wanda", sparsity=0.5, calibration=CALIB, out=tmp_path / "o", progress=True)
    assert result.metadata["streamed"]["peak_resident_blocks"] == 1
    assert "streaming it block by block" in capsys.readouterr().err


def test_cli_streams_and_refuses_what_a_streamed_model_cannot_do(tmp_path, capsys):
    from calibrant.calibration import CalibrationSet
    from calibrant.cli import main

    src = _checkpoint(tmp_path, torch.float32)
    CalibrationSet.from_tensor(CALIB).save(tmp_path / "calib.safetensors")
    code = main(["compress", "--model", str(src), "--method", "wanda", "--sparsity", "0.5", "--calibration",
                 str(tmp_path / "calib.safetensors"), "--out", str(tmp_path / "o"), "--stream", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "streamed: float32 weights, at most 1 block(s) in memory at once" in out
    assert (tmp_path / "o" / "model.safetensors.index.json").is_file()
    code = main(["eval", "--model", str(tmp_path / "o"), "--tasks", "arc_easy", "--stream", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "zero-shot tasks need the model in memory" in err
    code = main(["compress", "--model", str(src), "--method", "rtn", "--scheme", "gguf-q4_0", "--format", "gguf",
                 "--out", str(tmp_path / "o.gguf"), "--stream", "--quiet"])
    assert code == 2 and "needs the whole model in memory" in capsys.readouterr().err
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("name, params", [METHODS[0], METHODS[2], METHODS[4]])  # two-/one-pass, block-level
def test_activations_spill_to_disk_under_a_small_budget_with_identical_results(tmp_path, name, params, monkeypatch):
    import os

    mapped = []
    from_file = torch.from_file
    monkeypatch.setattr(torch, "from_file", lambda *a, **k: mapped.append(a[0]) or from_file(*a, **k))
    src = _checkpoint(tmp_path, torch.float32)
    kept = compress_model(str(src), name, calibration=CALIB, out=tmp_path / "ram", progress=False, stream=True,
                          batch_size=4, **params)
    assert kept.report.activations["spilled"] is False and not mapped
    one_batch = 8 * 24 * 64 * 4
    spilled = compress_model(str(src), name, calibration=CALIB, out=tmp_path / "spill", progress=False, stream=True,
                             max_activation_memory=one_batch, batch_size=4, **params)
    act = spilled.report.activations
    assert act["spilled"] is True and act["bytes"] > act["budget"] == one_batch
    assert mapped  # the [n, L, hidden] buffers really were files in the spill directory
    assert os.listdir(act["spill_dir"]) == []  # the buffers' files are unlinked as soon as they are mapped
    a, b = _tensors(tmp_path / "ram"), _tensors(tmp_path / "spill")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_budget_under_one_batch_is_refused_before_any_work(tmp_path):
    src = _checkpoint(tmp_path, torch.float32)
    with pytest.raises(CalibrantError, match="smaller than one batch of activations"):
        compress_model(str(src), "wanda", sparsity=0.5, calibration=CALIB, out=tmp_path / "o", progress=False,
                       stream=True, max_activation_memory="1k")
    assert not (tmp_path / "o").exists()


def test_block_memory_counts_the_parts_and_a_block_that_cannot_fit_is_refused(tmp_path, monkeypatch):
    from calibrant import streaming
    from calibrant.models.lazy import skeleton

    src = _checkpoint(tmp_path, torch.bfloat16)
    parts = streaming.block_memory(skeleton(src, torch.float32), {"hessian"}, 1000)
    # a bf16 checkpoint's block is computed on in float32: q, o, k, v, gate, up, down, two norms at 4 bytes
    block = 4 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3 + 64 * 2)
    assert parts == {"block weights": block + 4 * 128 * 64, "embeddings and head": 4 * (VOCAB * 64 + 64),
                     "statistics": 3 * 4 * (64 * 64 + 128 * 128), "activations": 1000}
    assert streaming.block_memory(skeleton(src, torch.float32), {"sq_norms"}, 0)["statistics"] == 2 * 4 * (64 + 128)
    monkeypatch.setattr(streaming, "available_memory", lambda: 100_000)
    with pytest.raises(CalibrantError, match=r"does not fit in memory even streamed: it needs about .* statistics"):
        compress_model(str(src), "gptq", scheme="w4g32", calibration=CALIB, out=tmp_path / "o", progress=False,
                       stream=True, max_activation_memory="1G")
    assert not (tmp_path / "o").exists()


def test_a_bin_checkpoint_too_big_for_memory_is_refused_with_the_conversion(tmp_path, monkeypatch):
    from calibrant import streaming

    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"\0" * 10_000)
    monkeypatch.setattr(streaming, "available_memory", lambda: 1000)
    with pytest.raises(CalibrantError, match="is available, and .* has only PyTorch pytorch_model.bin; streaming "
                                             "reads safetensors: convert it once"):
        streaming.would_not_fit(src)
    monkeypatch.setattr(streaming, "available_memory", lambda: 10**9)
    assert streaming.would_not_fit(src)[0] is False  # it fits: loaded in memory as before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_on_cuda_matches_streamed_on_cpu(tmp_path):
    """--device cuda: each block moves to the GPU for its statistics and solve, then back to be written."""
    src = _checkpoint(tmp_path, torch.float32)
    compress_model(str(src), "gptq", scheme="w4g32", calibration=CALIB, out=tmp_path / "cpu", progress=False,
                   stream=True)
    compress_model(str(src), "gptq", scheme="w4g32", calibration=CALIB, out=tmp_path / "gpu", progress=False,
                   stream=True, device="cuda")
    a, b = _tensors(tmp_path / "cpu"), _tensors(tmp_path / "gpu")
    changed = [k for k in a if (a[k] != b[k]).float().mean() > 0.01]  # a few codes may round the other way
    assert changed == []
