"""Fixtures for the calibration tests: a private cache and fake corpora written into it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from calibrant.calibration import corpora


@pytest.fixture(autouse=True)
def cache(request, tmp_path, monkeypatch):
    """A private $CALIBRANT_CACHE for every test except the slow ones, which use (and warm) the real one."""
    if request.node.get_closest_marker("slow"):
        return None
    root = tmp_path / "cache"
    monkeypatch.setenv("CALIBRANT_CACHE", str(root))
    return root


@pytest.fixture
def fake_corpus(cache) -> Callable[..., corpora.Corpus]:
    """Write documents into the private cache under an offline corpus name and return the Corpus."""

    def write(docs: list[str], name: str = "news") -> corpora.Corpus:
        corpora._store_corpus(name, docs, {"fake": True})
        corpus = corpora.get_corpus(name)
        assert corpus.documents == tuple(docs)
        return corpus

    return write


@pytest.fixture
def tok(docs):
    """A word-level tokenizer over the module's ``docs`` fixture."""
    from calib_helpers import build_tokenizer

    return build_tokenizer(docs)


@pytest.fixture
def corpus(fake_corpus, docs):
    """The module's ``docs`` stored as the offline corpus 'news' in the private cache."""
    return fake_corpus(docs, "news")
