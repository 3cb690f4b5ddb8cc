"""Sampling modes: random windows (default), document-bounded windows, packed whole documents."""

from __future__ import annotations

import pytest
import torch
from calib_helpers import build_tokenizer

from calibrant.calibration import CalibSpec, make_calibration, parse_spec
from calibrant.errors import CalibrationError


@pytest.fixture
def docs():
    # documents of different lengths (10..49 words), each with its own vocabulary
    return [" ".join(f"d{i}w{j}" for j in range(10 + i)) for i in range(40)]


def _doc_of(tok, corpus):
    """token id -> index of the (calib) document that holds it."""
    out = {}
    for i, d in enumerate(corpus.split("calib")):
        for t in tok(d, add_special_tokens=False)["input_ids"]:
            out[t] = i
    return out


@pytest.mark.parametrize(
    ("spec", "sampling", "options"),
    [
        ("wiki:docs:4x8", "docs", ()),
        ("wiki:PACKED:4x8", "packed", ()),
        ("wiki:windows:4x8", "windows", ()),
        ("file:./a.jsonl:text:docs:4x8", "docs", ("./a.jsonl", "text")),
        ("file:./a.txt:packed:4x8", "packed", ("./a.txt",)),
        ("file:./docs:4x8", "windows", ("./docs",)),
        ("hf:allenai/c4:en:train:text:docs:4x8", "docs", ("allenai/c4", "en", "train", "text")),
        ("self:t=1.5..0.5:top_k=5:4x8", "windows", ("t=1.5..0.5", "top_k=5")),
    ],
)
def test_spec_sampling_option(spec, sampling, options):
    cs = parse_spec(spec)
    assert (cs.sampling, cs.options) == (sampling, options)
    assert parse_spec(str(cs)) == cs
    assert CalibSpec("wiki", (), 4, 8) == parse_spec("wiki:4x8")  # default sampling keeps old specs equal


def test_spec_error_names_the_sampling_modes():
    with pytest.raises(CalibrationError, match="windows .*docs .*packed"):
        parse_spec("wiki:docs")


def test_document_windows_never_cross_documents(corpus, tok):
    owner = _doc_of(tok, corpus)
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in corpus.split("calib")]
    L = 30
    seen_docs = set()
    for seed in range(10):
        cs = make_calibration(f"news:docs:16x{L}", tok, seed=seed)
        assert cs.input_ids.shape == (16, L)
        assert tok.eos_token_id not in cs.input_ids  # no joiner: never across a boundary
        for row in cs.input_ids.tolist():
            homes = {owner[t] for t in row}
            assert len(homes) == 1  # the whole window inside one document
            (home,) = homes
            assert lengths[home] >= L  # only documents holding at least L tokens
            seen_docs.add(home)
            # and it is a contiguous slice of that document
            doc_ids = tok(corpus.split("calib")[home], add_special_tokens=False)["input_ids"]
            start = doc_ids.index(row[0])
            assert doc_ids[start:start + L] == row
    eligible = sum(n >= L for n in lengths)
    assert len(seen_docs) > eligible // 2
    p = cs.provenance
    assert (p["sampling"], p["eligible_documents"], p["min_document_tokens"]) == ("document-windows", eligible, L)
    assert p["spec"] == f"news:docs:16x{L}"


def test_document_windows_reproducible_and_seeded(corpus, tok):
    a = make_calibration("news:docs:8x12", tok, seed=0)
    assert torch.equal(a.input_ids, make_calibration("news:docs:8x12", tok, seed=0).input_ids)
    assert not torch.equal(a.input_ids, make_calibration("news:docs:8x12", tok, seed=1).input_ids)
    # a different sampling mode is a different set, with a different hash, even with the same seed
    assert a.hash != make_calibration("news:8x12", tok, seed=0).hash


def test_document_windows_need_a_long_enough_document(corpus, tok):
    with pytest.raises(CalibrationError, match=r"no document .* holds L=60 tokens \(the longest has 49\)"):
        make_calibration("news:docs:2x60", tok)


def test_packed_documents(corpus, tok):
    cs = make_calibration("news:packed:10x25", tok, seed=4)
    p = cs.provenance
    assert p["sampling"] == "packed-documents" and p["documents_used"] >= 1
    calib = corpus.split("calib")
    stream = cs.input_ids.reshape(-1).tolist()
    # the rows are consecutive pieces of whole documents joined by EOS, each document used at most once
    pieces, cur = [], []
    for t in stream:
        if t == tok.eos_token_id:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    pieces.append(cur)
    doc_ids = [tok(d, add_special_tokens=False)["input_ids"] for d in calib]
    used = []
    for k, piece in enumerate(pieces):
        matches = [i for i, d in enumerate(doc_ids) if (d == piece if k < len(pieces) - 1 else d[:len(piece)] == piece)]
        assert matches, "a packed piece is not a whole document"
        used.append(matches[0])
    assert len(set(used)) == len(used) == p["documents_used"]
    assert torch.equal(cs.input_ids, make_calibration("news:packed:10x25", tok, seed=4).input_ids)
    assert not torch.equal(cs.input_ids, make_calibration("news:packed:10x25", tok, seed=5).input_ids)


def test_packed_refuses_more_than_the_source(corpus, tok):
    with pytest.raises(CalibrationError, match="fewer than the n×L .* requested for packing"):
        make_calibration("news:packed:100x100", tok)


def test_lengths_cache_survives_and_is_rebuilt(corpus, tok, cache):
    make_calibration("news:4x8", tok)  # windows need no document lengths, but they are cached anyway
    lengths = list((cache / "tokens").glob("*.lengths"))
    assert len(lengths) == 1
    lengths[0].unlink()  # an older cache entry without lengths: re-tokenized when a mode needs them
    a = make_calibration("news:docs:4x8", tok)
    assert len(list((cache / "tokens").glob("*.lengths"))) == 1
    assert torch.equal(a.input_ids, make_calibration("news:docs:4x8", tok).input_ids)


@pytest.mark.parametrize("spec", ["random-vocab:docs:2x4", "self:packed:2x4"])
def test_sampling_only_for_text_sources(tok, spec):
    with pytest.raises(CalibrationError, match="applies to text sources only"):
        make_calibration(spec, tok)


def test_file_sources_take_sampling(tmp_path, cache):
    path = tmp_path / "notes.txt"
    path.write_text("alpha beta gamma delta\n\nepsilon zeta eta theta iota\n")
    tok = build_tokenizer([path.read_text()])
    cs = make_calibration(f"file:{path}:paragraphs:docs:3x5", tok, seed=0)
    assert cs.provenance["eligible_documents"] == 1  # only the second paragraph holds 5 tokens
    assert set(cs.input_ids.flatten().tolist()) <= set(tok("epsilon zeta eta theta iota")["input_ids"])
