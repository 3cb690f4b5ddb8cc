"""Fixtures for the study tests: a tiny Llama saved to disk and fake offline corpora in a private cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent.parent / "calibration"))

from calib_helpers import build_tokenizer, tiny_llama  # noqa: E402


def make_docs(k: int, prefix: str) -> list[str]:
    return [" ".join(f"{prefix}{(i * 7 + j) % 50}" for j in range(60)) + " ." for i in range(k)]


@pytest.fixture
def study_env(tmp_path, monkeypatch):
    """A model directory and the corpora 'wiki' and 'news' (fake, offline) in a private cache."""
    from calibrant.calibration import corpora

    monkeypatch.setenv("CALIBRANT_CACHE", str(tmp_path / "cache"))
    wiki, news = make_docs(40, "w"), make_docs(40, "n")
    corpora._store_corpus("wiki", wiki, {"fake": True})
    corpora._store_corpus("news", news, {"fake": True})
    tok = build_tokenizer(wiki + news)
    model_dir = tmp_path / "model"
    tiny_llama(len(tok), context=64).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def write_spec(path: Path, model_dir: Path, **overrides) -> Path:
    spec = {
        "name": "t",
        "models": [str(model_dir)],
        "methods": [{"name": "dense"}, {"name": "wanda", "sparsity": 0.5}, {"name": "magnitude", "sparsity": 0.5}],
        "calibration": {"sources": ["wiki", "news"], "n": 4, "length": 32, "seeds": [0, 1]},
        "evaluation": {"perplexity": ["wiki"], "max_tokens": 256, "seq_len": 32},
    }
    spec.update(overrides)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
