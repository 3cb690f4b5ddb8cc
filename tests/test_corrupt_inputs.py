"""Issue 20, item 3: corrupt rather than missing inputs — a truncated or garbled checkpoint, a config that is
not JSON or not an object, a config that disagrees with its weights — give one line naming the file, exit 2,
for every command that reads a model, and nothing is written."""

from __future__ import annotations

import shutil

import pytest

from tests.calibration.calib_helpers import run_cli, tiny_model_dir

TEXT = " ".join(f"word{i % 50} and the of" for i in range(400))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    (root / "calib.txt").write_text(TEXT)
    return tiny_model_dir(root, TEXT)


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])


def _garble(d):
    f = d / "model.safetensors"
    f.write_bytes(b"\xff" * 8 + f.read_bytes()[8:])


def _config(old, new):
    def edit(d):
        text = (d / "config.json").read_text()
        assert old in text
        (d / "config.json").write_text(text.replace(old, new))
    return edit


CASES = {  # name -> (corruption, words the one line must hold)
    "truncated weights": (_truncate, ["model.safetensors is truncated (5000 bytes"]),
    "garbled weights": (_garble, ["model.safetensors is not a valid safetensors file"]),
    "config not JSON": (lambda d: (d / "config.json").write_text('{"model_type": "lla'), ["config.json is not valid JSON"]),
    "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"),
                      ["config.json holds a JSON list, not the object"]),
    "fewer layers declared": (_config('"num_hidden_layers": 2', '"num_hidden_layers": 1'),
                              ["config.json does not match the weights", "num_hidden_layers=1",
                               "model.layers.1."]),
    "wrong hidden size": (_config('"hidden_size": 32', '"hidden_size": 48'),
                          ["config.json does not describe the weights", "shapes differ"]),
}
COMMANDS = {
    "info": lambda m, root: ["info", m],
    "compress": lambda m, root: ["compress", "--model", m, "--method", "wanda", "--sparsity", "0.5",
                                 "--calibration", f"file:{root / 'calib.txt'}:4x16", "--out", root / "out", "--quiet"],
    "eval": lambda m, root: ["eval", "--model", m, "--ppl", "wiki", "--max-tokens", "64", "--quiet"],
}
LOADS_WEIGHTS = {"fewer layers declared", "wrong hidden size"}  # info reads headers only: these pass it


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_model_is_one_line(base, tmp_path, capsys, case, command):
    if command == "info" and case in LOADS_WEIGHTS:
        pytest.skip("info reads the tensor headers, not the model: shapes are what the file says")
    model = tmp_path / "model"
    shutil.copytree(base, model)
    corrupt, needles = CASES[case]
    corrupt(model)
    shutil.copy(base.parent / "calib.txt", tmp_path / "calib.txt")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(capsys, *COMMANDS[command](model, tmp_path))
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("calibrant: error: "), err
    for needle in needles:
        assert needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
