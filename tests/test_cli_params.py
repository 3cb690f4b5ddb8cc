"""CLI method options derived from the registered methods' signatures, ``--param``, and how API parameter
names in messages become flags."""

from __future__ import annotations

import json

import pytest
import torch

from calibrant.calibration import CalibrationSet
from calibrant.cli import _cli_names, _method_params, build_parser, main
from calibrant.errors import CalibrantError, RecipeError
from calibrant.methods import METHODS, LayerContext, Method, make_recipe
from calibrant.methods import registry as methods_registry
from calibrant.methods.stats import LayerStats
from tests.conftest import VOCAB, tiny_model, token_batch


class Toy(Method):
    """A data-free method with one parameter of each option type; it scales every weight by ``toy_gain``."""

    name = "toy"
    param_help = {"toy_gain": "multiply every weight by this", "toy_flip": "negate the weights"}

    def __init__(self, toy_window: int = 4, toy_gain: float = 1.0, toy_flip: bool = False, toy_label: str = "x",
                 toy_any=None):
        self.toy_window = toy_window
        self.toy_gain = toy_gain
        self.toy_flip = toy_flip
        self.toy_label = toy_label
        self.toy_any = toy_any

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        return weight * self.toy_gain * (-1.0 if self.toy_flip else 1.0)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(methods_registry.METHODS, "toy", Toy)
    assert METHODS["toy"] is Toy  # the one registry dict the CLI reads
    return Toy


def parse(*argv: str):
    return build_parser().parse_args(["compress", "--method", "toy", *argv])


def test_new_method_parameters_become_typed_options(toy):
    args = parse("--toy-window", "7", "--toy-gain", "0.25", "--toy-flip", "--toy-label", "abc", "--toy-any", "3")
    params = _method_params(args)
    assert params == {"toy_window": 7, "toy_gain": 0.25, "toy_flip": True, "toy_label": "abc", "toy_any": "3"}
    assert type(params["toy_window"]) is int and type(params["toy_gain"]) is float
    assert _method_params(parse("--no-toy-flip")) == {"toy_flip": False}
    assert _method_params(parse()) == {}  # unset options are not passed: the signature's defaults apply
    with pytest.raises(SystemExit):
        parse("--toy-window", "seven")  # typed: an int option refuses a word
    recipe = make_recipe("toy", **_method_params(parse("--toy-window", "9", "--toy-flip")))
    assert recipe[0].params() == {"toy_window": 9, "toy_gain": 1.0, "toy_flip": True, "toy_label": "x",
                                  "toy_any": None}


def test_new_method_options_and_help_go_away_with_the_method(toy, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--toy-gain" in text and "multiply every weight by this [toy]" in text
    assert "--toy-flip, --no-toy-flip" in text
    monkeypatch.delitem(methods_registry.METHODS, "toy")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--method", "wanda", "--toy-window", "3"])


def test_shared_parameter_lists_every_method_that_takes_it(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[magnitude, wanda, sparsegpt]" in text  # --sparsity and --pattern
    args = build_parser().parse_args(["compress", "--method", "wanda", "--sparsity", "0.6", "--per-layer"])
    assert _method_params(args) == {"sparsity": 0.6, "per_layer": True}


def test_param_key_value_uses_yaml_rules():
    args = build_parser().parse_args([
        "compress", "--method", "gptq", "--param", "damp=0.05", "--param", "blocksize=64", "--param", "act_order=true",
        "--param", "static-groups=no", "--param", "scheme=w4g128", "--param", "note=", "--param", " spaced = 1.5e-3",
    ])
    params = _method_params(args)
    assert params == {"damp": 0.05, "blocksize": 64, "act_order": True, "static_groups": False, "scheme": "w4g128",
                      "note": None, "spaced": 1.5e-3}
    assert type(params["blocksize"]) is int and type(params["damp"]) is float


def test_param_in_exponent_notation_is_a_number_or_a_one_line_error(tmp_path, capsys):
    """``--param damp=1e-3`` is how users write 0.001; PyYAML (YAML 1.1) reads it as the string '1e-3'. Either
    it reaches the method as a number, or the user gets the one-line error with exit code 2 — never a traceback.
    The model does not exist: had the recipe been accepted, that is the error reported."""
    missing = tmp_path / "no-such-model"
    code = main(["compress", "--model", str(missing), "--method", "gptq", "--param", "damp=1e-3", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("calibrant: error:")


def test_param_later_wins_over_the_option():
    args = build_parser().parse_args(["compress", "--method", "gptq", "--damp", "0.01", "--param", "damp=0.2"])
    assert _method_params(args)["damp"] == 0.2


@pytest.mark.parametrize("bad", ["x", "=3", " =3"])
def test_malformed_param_is_a_calibrant_error(bad):
    args = build_parser().parse_args(["compress", "--method", "gptq", "--param", bad])
    with pytest.raises(CalibrantError, match="is not KEY=VALUE"):
        _method_params(args)


def test_malformed_param_exits_2_with_one_line(capsys):
    code = main(["compress", "--method", "gptq", "--param", "damp", "--model", "/nonexistent/model"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("calibrant: error: --param 'damp' is not KEY=VALUE")


def test_cli_names_maps_api_names_to_flags():
    assert _cli_names("pass `calibration` and raise `damp`") == "pass --calibration and raise --damp"
    assert _cli_names("set `per_layer`, `recipe`, `export_format`") == "set --per-layer, --method, --format"
    assert _cli_names("`frobnicate` and `damp`") == "`frobnicate` and --damp"
    assert _cli_names("no names here") == "no names here"


def test_cli_names_maps_a_new_methods_parameter(toy):
    assert _cli_names("lower `toy_gain`") == "lower --toy-gain"


def test_wanda_with_scheme_is_refused_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(RecipeError, match="does not take 'scheme'"):
        make_recipe("wanda", scheme="w4g128")
    missing = tmp_path / "no-such-model"
    code = main(["compress", "--model", str(missing), "--method", "wanda", "--scheme", "w4g128", "--quiet"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("calibrant: error: method 'wanda' does not take 'scheme'")
    assert "per_layer" in lines[0] and "sparsity" in lines[0] and str(missing) not in lines[0]
    assert not missing.exists()


# ---- end to end on a tiny saved model -----------------------------------------------------------------------

def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *(f"w{j}" for j in range(VOCAB - 3))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    calib = tmp_path / "calib.safetensors"
    CalibrationSet.from_tensor(token_batch(n=4, length=16)).save(calib)
    return path, calib


def test_cli_compress_passes_derived_options_to_the_method(toy, tiny_dir, tmp_path, capsys):
    model_dir, calib = tiny_dir
    out = tmp_path / "out"
    code = main(["compress", "--model", str(model_dir), "--method", "toy", "--toy-gain", "0.5", "--toy-window", "3",
                 "--calibration", str(calib), "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "calibrant.json").read_text())
    assert meta["recipe"] == [{"method": "toy", "toy_window": 3, "toy_gain": 0.5, "toy_flip": False,
                               "toy_label": "x", "toy_any": None}]
    assert meta["calibration"] is None and meta["pipeline"] == "data-free"  # toy reads no data
    from safetensors.torch import load_file

    dense = tiny_model("llama").state_dict()
    saved = load_file(out / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(saved[key], dense[key] * 0.5)
    torch.testing.assert_close(saved["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])


def test_cli_compress_wanda_per_layer_with_a_calibration_file(tiny_dir, tmp_path, capsys):
    model_dir, calib = tiny_dir
    out = tmp_path / "out"
    code = main(["compress", "--model", str(model_dir), "--method", "wanda", "--sparsity", "0.25", "--per-layer",
                 "--calibration", str(calib), "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "calibrant.json").read_text())
    assert meta["recipe"] == [{"method": "wanda", "sparsity": 0.25, "pattern": None, "sparsity_profile": "uniform",
                               "per_layer": True}]
    assert meta["calibration"]["hash"] == CalibrationSet.load(calib).hash
    assert meta["overall_sparsity"] == pytest.approx(0.25)
