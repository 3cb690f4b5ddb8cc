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
