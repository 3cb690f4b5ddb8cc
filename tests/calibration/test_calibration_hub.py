"""Hub sources (online users): named corpora and any hf:DATASET[:CONFIG[:SPLIT[:COLUMN]]], with a fake
``datasets`` module; offline they fail in one line naming the offline sources."""

from __future__ import annotations

import sys
import types

import pytest
from calib_helpers import build_tokenizer

from calibrant.calibration import corpora, get_corpus, get_hf_corpus, make_calibration
from calibrant.errors import CalibrationError

ROWS = [{"text": f"hub document {i} about topic {i % 7} .", "meta": i} for i in range(50)] + [{"text": "  "}]


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []

    def load_dataset(path, config=None, split=None, streaming=False, **kwargs):
        calls.append({"path": path, "config": config, "split": split, "streaming": streaming, **kwargs})
        return iter(ROWS)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_source_streams_caches_and_records(fake_datasets, cache):
    tok = build_tokenizer([r["text"] for r in ROWS])
    cs = make_calibration("hf:someone/data:-:train:text:4x6", tok, seed=0)
    assert fake_datasets == [{"path": "someone/data", "config": None, "split": "train", "streaming": True}]
    p = cs.provenance
    assert (p["source"], p["dataset"], p["config"], p["split"], p["column"]) == ("hf", "someone/data", None, "train",
                                                                                 "text")
    assert p["documents"] == 50 and len(p["corpus_checksum"]) == 64
    again = make_calibration("hf:someone/data:-:train:text:4x6", tok, seed=0)
    assert len(fake_datasets) == 1 and again.hash == cs.hash  # served from the cache
    docs = make_calibration("hf:someone/data:4x6", tok, seed=0)  # defaults: no config, train, text
    assert docs.provenance["config"] is None and docs.provenance["split"] == "train"


def test_hf_missing_column_suggests(fake_datasets, cache):
    with pytest.raises(CalibrationError, match="has no column 'txt'; Did you mean 'text'"):
        get_hf_corpus("someone/data", None, "train", "txt")


def test_hf_bad_options(cache):
    tok = build_tokenizer(["a b"])
    with pytest.raises(CalibrationError, match=r"hf source takes DATASET\[:CONFIG\[:SPLIT\[:COLUMN\]\]\]"):
        make_calibration("hf:a:b:c:d:e:2x2", tok)


def test_hf_offline_one_line_naming_offline_sources(cache, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/data' on the Hub (ConnectError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(CalibrationError) as err:
        make_calibration("hf:someone/data:2x2", build_tokenizer(["a"]))
    msg = str(err.value)
    assert "unreachable" in msg and "\n" not in msg
    assert all(s in msg for s in corpora.OFFLINE_SOURCES)


@pytest.mark.parametrize(("name", "path", "extra"), [
    ("redpajama", "togethercomputer/RedPajama-Data-1T-Sample", {"revision": "refs/convert/parquet"}),
    ("cosmopedia", "HuggingFaceTB/cosmopedia-100k", {}),
])
def test_streamed_hub_corpora(fake_datasets, cache, name, path, extra):
    c = get_corpus(name)
    assert fake_datasets == [{"path": path, "config": None, "split": "train", "streaming": True, **extra}]
    assert len(c.documents) == 50 and len(c.split("heldout")) == 5  # hash-chosen held-out documents
    get_corpus(name)
    assert len(fake_datasets) == 1


def test_hub_limit(fake_datasets, cache, monkeypatch):
    monkeypatch.setattr(corpora, "HUB_MAX_DOCUMENTS", 10)
    assert len(get_corpus("cosmopedia").documents) == 10
