"""llama.cpp importance matrices: the engine's per-column Σx² against a brute-force hook over the same tokens,
both file layouts read back as llama-quantize reads them, llama.cpp's names, provenance, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGUFReader

from calibrant.api import compute_imatrix
from calibrant.calibration import CalibrationSet
from calibrant.errors import CalibrantError
from calibrant.export.imatrix import collect_imatrix, read_imatrix, tensor_names, write_imatrix
from calibrant.models.loader import LoadedModel
from tests.calibration.calib_helpers import run_cli, tiny_model_dir
from tests.conftest import tiny_model, token_batch


def _brute_force(model, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """Σx² per input column and the token count of every decoder linear, from hooks on one plain forward."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: seen.setdefault(name, []).append(
        inp[0].detach().reshape(-1, inp[0].shape[-1]).double()))
        for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {k: (torch.cat(v).square().sum(0), sum(x.shape[0] for x in v)) for k, v in seen.items()}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sums_and_counts_match_a_brute_force_forward(family):
    model = tiny_model(family)
    ids = token_batch(5, 24)
    expected = _brute_force(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    imatrix = collect_imatrix(model, CalibrationSet.from_tensor(ids), batch_size=2, progress=False)
    names = tensor_names(model)
    assert set(imatrix.sums) == set(names.values()) and len(names) == len(expected)
    for module, gguf_name in names.items():
        sums, count = expected[module]
        assert imatrix.counts[gguf_name] == count == 5 * 24
        torch.testing.assert_close(imatrix.sums[gguf_name], sums, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left unchanged
    assert imatrix.chunk_count == 5 and imatrix.chunk_size == 24


def test_names_are_llama_cpps_and_shared_inputs_get_identical_entries():
    model = tiny_model("llama")
    names = tensor_names(model)
    assert names["model.layers.0.self_attn.q_proj"] == "blk.0.attn_q.weight"
    assert names["model.layers.1.mlp.down_proj"] == "blk.1.ffn_down.weight"
    imatrix = collect_imatrix(model, CalibrationSet.from_tensor(token_batch(3, 16)), progress=False)
    assert torch.equal(imatrix.sums["blk.0.attn_q.weight"], imatrix.sums["blk.0.attn_v.weight"])
    assert torch.equal(imatrix.sums["blk.1.ffn_gate.weight"], imatrix.sums["blk.1.ffn_up.weight"])
    assert imatrix.sums["blk.1.ffn_down.weight"].numel() == model.config.intermediate_size


@pytest.fixture(scope="module")
def matrix():
    model = tiny_model("llama")
    calib = CalibrationSet.from_tensor(token_batch(4, 20), source="test-tokens", seed=3)
    return collect_imatrix(model, calib, progress=False)


def test_gguf_layout_reads_back_as_llama_quantize_reads_it(matrix, tmp_path):
    out = tmp_path / "m.imatrix.gguf"
    assert write_imatrix(out, matrix) == [out]
    reader = GGUFReader(str(out))
    fields = {f.name: f.contents() for f in reader.fields.values()}
    assert fields["general.type"] == "imatrix" and fields["imatrix.datasets"] == ["test-tokens"]
    assert fields["imatrix.chunk_count"] == 4 and fields["imatrix.chunk_size"] == 20
    assert json.loads(fields["calibrant.provenance"])["calibration"]["seed"] == 3
    tensors = {t.name: t for t in reader.tensors}
    q = tensors["blk.0.attn_q.weight.in_sum2"]
    assert q.tensor_type.name == "F32" and list(q.shape) == [64, 1]  # ggml order: ne0 = columns, ne1 = 1 matrix
    assert float(tensors["blk.0.attn_q.weight.counts"].data.reshape(-1)[0]) == 80
    names = [t.name for t in reader.tensors]  # as llama-imatrix writes: by weight name, in_sum2 then counts
    bases = [n.removesuffix(".in_sum2") for n in names[::2]]
    assert bases == sorted(bases) and names[1::2] == [f"{b}.counts" for b in bases]
    means = read_imatrix(out)
    for name in matrix.sums:
        torch.testing.assert_close(means[name], matrix.mean(name), rtol=1e-6, atol=0)


def test_legacy_layout_reads_back_and_keeps_provenance_beside_it(matrix, tmp_path):
    out = tmp_path / "m.dat"
    written = write_imatrix(out, matrix)
    assert written == [out, tmp_path / "m.dat.json"]
    means = read_imatrix(out)
    assert set(means) == set(matrix.sums)
    for name in matrix.sums:
        torch.testing.assert_close(means[name], matrix.mean(name), rtol=1e-6, atol=0)
    sidecar = json.loads((tmp_path / "m.dat.json").read_text())
    assert sidecar["chunk_count"] == 4 and sidecar["calibration"]["source"] == "test-tokens"
    tail = out.read_bytes()[-4 - len("test-tokens") - 4:]
    assert int.from_bytes(tail[:4], "little") == 4 and tail[8:] == b"test-tokens"  # windows, then the dataset


@pytest.mark.parametrize("name, message", [
    ("m.txt", "written as .gguf"),
    ("exists.gguf", "already exists; pass --overwrite"),
])
def test_bad_outputs_are_refused(matrix, tmp_path, name, message):
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    with pytest.raises(CalibrantError, match=message):
        write_imatrix(tmp_path / name, matrix)
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep" and len(list(tmp_path.iterdir())) == 1


def test_unknown_family_is_refused_before_any_data_is_drawn(tmp_path):
    gpt2 = LoadedModel(model=tiny_model("gpt2"), tokenizer=None, spec="tiny-gpt2", path=None, model_hash="0" * 16)
    with pytest.raises(CalibrantError, match="known here for the .*llama.* not 'gpt2'"):
        compute_imatrix(gpt2, "wiki:2x16", out=tmp_path / "x.gguf", progress=False)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), "the cat sat on the mat and the dog sat on the log " * 20)


def test_cli_writes_the_matrix_of_a_saved_set(tiny_dir, tmp_path, capsys):
    calib = tmp_path / "set.safetensors"
    CalibrationSet.from_tensor(torch.randint(3, 11, (3, 16), generator=torch.Generator().manual_seed(0))).save(calib)
    out = tmp_path / "m.gguf"
    code, stdout, err = run_cli(capsys, "calib", "imatrix", calib, "--model", tiny_dir, "--out", out, "--quiet")
    assert code == 0, err
    assert "llama-quantize --imatrix" in stdout and len(read_imatrix(out)) == 2 * 7
    assert stdout.splitlines()[2].split()[:3] == ["14", "3", "16"]  # entries, windows, tokens per window
    code, _, err = run_cli(capsys, "calib", "imatrix", calib, "--model", tiny_dir, "--out", out, "--quiet")
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "calib", "imatrix", calib, "--model", tiny_dir, "--out", tmp_path / "m.bin")
    assert code == 2 and ".gguf" in err and not (tmp_path / "m.bin").exists()


@pytest.mark.parametrize("pipeline", ["one-pass", "two-pass"])
def test_a_token_mask_counts_only_its_tokens(pipeline):
    from calibrant.engine import compress
    from calibrant.export.imatrix import ImatrixCollector

    model = tiny_model("llama")
    ids = token_batch(5, 24)
    mask = torch.rand(5, 24, generator=torch.Generator().manual_seed(1)) < 0.4
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: seen.setdefault(name, []).append(
        inp[0].detach()[mask].double()))
        for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    collector = ImatrixCollector()
    compress(model, CalibrationSet(ids, {"source": "test"}, mask), collector, batch_size=2, pipeline=pipeline,
             progress=False)
    for name, parts in seen.items():
        sums, count = collector._seen[name]
        assert count == int(mask.sum())
        torch.testing.assert_close(sums, torch.cat(parts).square().sum(0), rtol=1e-5, atol=1e-7)
