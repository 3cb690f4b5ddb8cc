"""The CLI and the Python API agree; bad input gives one line, exit code 2, and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from calibrant.api import compress_model
from tests.calibration.calib_helpers import run_cli as _run
from tests.calibration.calib_helpers import tiny_model_dir

TEXT = " ".join(f"word{i % 50} and the of" for i in range(400))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tiny_model_dir(tmp_path_factory.mktemp("tiny"), TEXT)
    text = path.parent / "calib.txt"
    text.write_text(TEXT)
    return path, text


def test_compress_info_and_api_agree(tiny_dir, tmp_path, capsys):
    model_dir, text = tiny_dir
    out = tmp_path / "pruned"
    calib = f"file:{text}:4x16"
    code, stdout, err = _run(capsys, "compress", "--model", model_dir, "--method", "sparsegpt", "--pattern", "2:4",
                             "--calibration", calib, "--seed", "3", "--out", out, "--quiet")
    assert code == 0, err
    meta = json.loads((out / "calibrant.json").read_text())
    assert meta["recipe"][0]["method"] == "sparsegpt" and meta["recipe"][0]["pattern"] == "2:4"
    assert meta["calibration"]["seed"] == 3 and len(meta["calibration"]["hash"]) == 16
    assert meta["overall_sparsity"] == pytest.approx(0.5)

    api = compress_model(model_dir, "sparsegpt", pattern="2:4", calibration=calib, seed=3, progress=False)
    saved = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for key, value in api.loaded.model.state_dict().items():
        assert torch.equal(saved[key], value), key
    assert api.calibration.hash == meta["calibration"]["hash"]

    code, stdout, _ = _run(capsys, "info", out)
    assert code == 0
    assert "2:4" in stdout and "0.5000" in stdout and "sparse kernels" in stdout


def test_unstructured_info_says_it_is_not_smaller(tiny_dir, tmp_path, capsys):
    model_dir, text = tiny_dir
    out = tmp_path / "m"
    assert _run(capsys, "compress", "--model", model_dir, "--method", "magnitude", "--out", out, "--quiet")[0] == 0
    code, stdout, _ = _run(capsys, "info", out)
    assert code == 0 and "no smaller on disk and no faster" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "wanda", "--sparsity", "1.5"], "outside [0, 1)"),
        (["--method", "wanda", "--pattern", "4:2"], "0 < N < M"),
        (["--method", "wandaa"], "Did you mean 'wanda'"),
        (["--method", "wanda", "--pattern", "2:48", "--calibration", "file:{text}:4x16"], "not divisible by M=48"),
        (["--method", "wanda", "--calibration", "file:{text}:2x100"], "exceeds the model's context length max_length=64"),
        (["--method", "wanda", "--calibration", "file:{text}:0x16"], "NxL"),
        (["--method", "wanda", "--calibration", "nosuchcorpus:4x16"], "unknown"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tiny_dir, tmp_path, capsys, args, message):
    model_dir, text = tiny_dir
    out = tmp_path / "out"
    args = [a.replace("{text}", str(text)) for a in args]
    code, _, err = _run(capsys, "compress", "--model", model_dir, *args, "--out", out, "--quiet")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("calibrant: error: ") and message in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_refused_and_untouched(tiny_dir, tmp_path, capsys):
    model_dir, _ = tiny_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("precious")
    code, _, err = _run(capsys, "compress", "--model", model_dir, "--method", "magnitude", "--out", out, "--quiet")
    assert code == 2 and "--overwrite" in err
    assert (out / "results.csv").read_text() == "precious"


def test_unknown_model_alias(capsys):
    code, _, err = _run(capsys, "compress", "--model", "smollm2", "--method", "magnitude", "--quiet")
    assert code == 2 and "smollm2-135m" in err and err.count("\n") == 1


def test_eval_unknown_corpus_lists_known(tiny_dir, capsys):
    model_dir, _ = tiny_dir
    code, _, err = _run(capsys, "eval", "--model", model_dir, "--ppl", "wikki", "--quiet")
    assert code == 2 and "wiki" in err and err.count("\n") == 1
