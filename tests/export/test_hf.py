"""Save → load round trips, metadata, atomic writes, info read back from the files."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from calibrant.engine import compress
from calibrant.errors import OutputExistsError
from calibrant.export import inspect_weights, read_metadata, save_model
from calibrant.methods import make_method
from tests.conftest import tiny_model, token_batch


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_save_load_identical_logits_and_metadata(tmp_path, family):
    model = tiny_model(family)
    report = compress(model, token_batch(), make_method("wanda", pattern="2:4"), progress=False)
    out = save_model(model, None, tmp_path / "out", {"overall_sparsity": report.sparsity})
    reloaded = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = token_batch(n=2, length=16, seed=5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert read_metadata(out)["overall_sparsity"] == pytest.approx(0.5)
    info = inspect_weights(out)
    by_name = {lay["name"]: lay for lay in info["layers"]}
    for record in report.layers:  # read back from the files, not from the metadata
        lay = by_name[record.name + ".weight"]
        assert lay["pattern"] == "2:4" and lay["sparsity"] == pytest.approx(0.5)


def test_existing_output_refused_unless_overwrite(tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_model(model, None, out, {})
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(OutputExistsError, match="not a calibrant output"):
        save_model(model, None, out, {}, overwrite=True)  # --overwrite never deletes a user's own files
    assert (out / "keep.txt").read_text() == "user data"
    (out / "calibrant.json").write_text("{}")  # an earlier calibrant output is replaced
    save_model(model, None, out, {"x": 1}, overwrite=True)
    assert read_metadata(out) == {"x": 1} and not (out / "keep.txt").exists()


def test_crash_while_saving_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save_model(model, None, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


RECIPES = [  # every registered method (and OWL), each saved dense and loaded back by transformers
    ("magnitude", {"sparsity": 0.5}),
    ("wanda", {"sparsity": 0.6, "sparsity_profile": "owl", "owl_lambda": 0.05}),
    ("sparsegpt", {"sparsity": 0.5}),
    ("rtn", {"scheme": "w4g16"}),
    ("gptq", {"scheme": "w4g16", "act_order": True}),
    ("awq", {"scheme": "w4g16-asym"}),
    ("smoothquant+gptq", {"scheme": "w8a8"}),
    ("spqr", {"scheme": "w3"}),
    ("sparsegpt+gptq", {"sparsity": 0.5, "scheme": "w4g16"}),
]


@pytest.mark.parametrize("recipe, params", RECIPES, ids=[r for r, _ in RECIPES])
def test_every_method_saves_and_reloads_with_identical_logits(tmp_path, recipe, params):
    from calibrant.export import restore_activation_quant
    from calibrant.methods import METHODS, make_recipe

    assert {m for r, _ in RECIPES for m in r.split("+")} == set(METHODS)  # a new method joins this test
    model = tiny_model("llama")
    ids = token_batch(n=2, length=16, seed=5)
    report = compress(model, token_batch(), make_recipe(recipe, **params), progress=False)
    with torch.no_grad():
        logits = model(ids).logits
    layers = [{"name": r.name, **r.info} for r in report.layers]
    out = save_model(model, None, tmp_path / "out", {"layers": layers})
    reloaded = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert restore_activation_quant(reloaded, read_metadata(out)) == (len(layers) if "smoothquant" in recipe else 0)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
