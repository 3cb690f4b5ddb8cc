from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from calib_helpers import build_tokenizer, make_docs

from calibrant.calibration import (
    CalibrationSet,
    calibset,
    heldout_token_ids,
    make_calibration,
    tokenizer_hash,
)
from calibrant.errors import CalibrationError


@pytest.fixture
def docs():
    return make_docs(40, 30)


def _ids_of(tok, texts):
    return {i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]}


# ---------------------------------------------------------------------------------------------- sampling


def test_same_seed_same_ids_different_seed_differs(corpus, tok):
    a = make_calibration("news:8x16", tok, seed=0)
    b = make_calibration("news:8x16", tok, seed=0)
    c = make_calibration("news:8x16", tok, seed=1)
    assert a.input_ids.dtype == torch.long and a.input_ids.shape == (8, 16) and (a.n, a.seq_len) == (8, 16)
    assert torch.equal(a.input_ids, b.input_ids) and a.hash == b.hash and len(a.hash) == 16
    assert not torch.equal(a.input_ids, c.input_ids) and a.hash != c.hash


def test_windows_come_only_from_calib_documents(corpus, tok):
    held_only = _ids_of(tok, corpus.split("heldout")) - _ids_of(tok, corpus.split("calib"))
    assert len(held_only) >= 4 * 30  # 4 held-out documents, each with its own 30 words
    seen = set()
    for seed in range(20):
        cs = make_calibration("news:16x20", tok, seed=seed)
        seen |= set(cs.input_ids.flatten().tolist())
    assert not seen & held_only
    assert len(seen) > 0.9 * len(_ids_of(tok, corpus.split("calib")))  # and they cover the calib text


def test_windows_are_contiguous_slices_of_the_eos_joined_calib_text(corpus, tok):
    flat = []
    for i, d in enumerate(corpus.split("calib")):
        flat += ([tok.eos_token_id] if i else []) + tok(d, add_special_tokens=False)["input_ids"]
    cs = make_calibration("news:6x40", tok, seed=3)
    text = torch.tensor(flat)
    for row in cs.input_ids:
        windows = text.unfold(0, 40, 1)
        assert (windows == row).all(dim=1).any()
    p = cs.provenance
    assert p["source_tokens"] == len(flat) and p["documents"] == 36
    assert (p["joiner"], p["joiner_ids"], p["bos"], p["sampling"]) == ("eos", [tok.eos_token_id], False,
                                                                        "random-windows")
    assert (p["source"], p["split"], p["seed"], p["n"], p["seq_len"]) == ("news", "calib", 3, 6, 40)
    assert p["corpus_checksum"] == corpus.checksum and p["tokenizer_hash"] == tokenizer_hash(tok)
    assert "calibrant_version" in p
    assert tok.bos_token_id not in cs.input_ids  # no BOS added


def test_same_ids_in_another_process(corpus, tok, cache, tmp_path):
    cs = make_calibration("news:8x16", tok, seed=7)
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    other = tmp_path / "other-cache"  # fresh token cache: the other process tokenizes from scratch
    shutil.copytree(cache / "corpora", other / "corpora")
    code = textwrap.dedent(f"""
        from transformers import AutoTokenizer
        from calibrant.calibration import make_calibration
        cs = make_calibration("news:8x16", AutoTokenizer.from_pretrained({str(tok_dir)!r}), seed=7)
        print(cs.hash)
    """)
    env = {**os.environ, "CALIBRANT_CACHE": str(other), "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == cs.hash
    assert list((other / "tokens").glob("*.npy"))


def test_tokenized_corpus_is_cached(corpus, tok, cache, monkeypatch):
    a = make_calibration("news:4x8", tok, seed=0)
    files = list((cache / "tokens").glob("*.npy"))
    assert len(files) == 1 and np.load(files[0]).dtype == np.int32

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")

    tokenize = calibset._tokenize
    monkeypatch.setattr(calibset, "_tokenize", no_tokenizing)
    assert make_calibration("news:4x8", tok, seed=0).hash == a.hash
    monkeypatch.setattr(calibset, "_tokenize", tokenize)
    files[0].write_bytes(b"garbage")  # a corrupt cache entry is recomputed, not trusted
    assert make_calibration("news:4x8", tok, seed=0).hash == a.hash


def test_random_vocab(tok):
    a = make_calibration("random-vocab:4x64", tok, seed=0)
    assert a.input_ids.shape == (4, 64) and int(a.input_ids.min()) >= 0 and int(a.input_ids.max()) < len(tok)
    assert torch.equal(a.input_ids, make_calibration("random-vocab:4x64", tok, seed=0).input_ids)
    assert not torch.equal(a.input_ids, make_calibration("random-vocab:4x64", tok, seed=1).input_ids)
    assert a.provenance["vocab_size"] == len(tok) and a.provenance["sampling"] == "uniform-vocab"


# ---------------------------------------------------------------------------------------------- held-out


def test_heldout_token_ids(corpus, tok):
    ids, info = heldout_token_ids("news", tok)
    assert ids.dim() == 1 and ids.dtype == torch.long
    held = corpus.split("heldout")
    assert info == {**info, "corpus": "news", "split": "heldout", "checksum": corpus.checksum,
                    "documents": len(held), "tokens": ids.numel(), "joiner": "eos"}
    assert int((ids == tok.eos_token_id).sum()) == len(held) - 1
    assert set(ids.tolist()) - {tok.eos_token_id} <= _ids_of(tok, held)
    assert not set(ids.tolist()) & (_ids_of(tok, corpus.split("calib")) - _ids_of(tok, held))


# ---------------------------------------------------------------------------------------------- files


def test_file_sources(tmp_path, cache):
    txt = tmp_path / "book.txt"
    txt.write_text("alpha beta gamma delta\n\nepsilon zeta eta theta\n")
    tok = build_tokenizer([txt.read_text()])
    whole = make_calibration(f"file:{txt}:2x4", tok, seed=0)
    assert whole.provenance["documents"] == 1 and whole.provenance["source_tokens"] == 8
    para = make_calibration(f"file:{txt}:paragraphs:1x9", tok, seed=0)
    assert para.provenance["documents"] == 2 and para.provenance["source_tokens"] == 9  # + one EOS joiner
    assert whole.provenance["file_sha256"] == para.provenance["file_sha256"]

    jl = tmp_path / "data.jsonl"
    jl.write_text('{"text": "alpha beta gamma", "body": "zeta eta"}\n\n{"text": "delta epsilon", "body": "theta"}\n')
    a = make_calibration(f"file:{jl}:3x2", tok, seed=0)  # field "text" by default
    assert a.provenance["field"] == "text" and a.provenance["documents"] == 2
    b = make_calibration(f"file:{jl}:body:1x3", tok, seed=0)
    assert b.provenance["source_tokens"] == 4 and set(b.input_ids.flatten().tolist()) <= _ids_of(
        tok, ["zeta eta theta"]) | {tok.eos_token_id}


def test_file_hash_ignores_the_path(tmp_path, cache):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in "ab":
        (tmp_path / d / "x.txt").write_text("one two three four five six")
    tok = build_tokenizer(["one two three four five six"])
    a = make_calibration(f"file:{tmp_path / 'a' / 'x.txt'}:2x3", tok)
    b = make_calibration(f"file:{tmp_path / 'b' / 'x.txt'}:2x3", tok)
    assert a.provenance["path"] != b.provenance["path"] and a.hash == b.hash


@pytest.mark.parametrize(
    ("content", "spec_tail", "match"),
    [
        (None, "2x2", "does not exist"),
        ("  \n\n", "2x2", "contains no text"),
        ('{"body": "a b"}\n', "2x2", r"no field 'text'.*\(fields: body\).*:FIELD:2x2"),
        ('{"text": "a b"}\nnot json\n', "text:2x2", "line 2 is not JSON"),
        ('{"text": 5}\n', "text:2x2", "is int, not text"),
        ("a b c", "bogus:2x2", "at most the option 'paragraphs'"),
    ],
)
def test_file_source_errors(tmp_path, cache, content, spec_tail, match):
    suffix = ".txt" if content is None or not content.lstrip().startswith(("{", "  ")) else ".jsonl"
    if content is not None and content.strip() == "":
        suffix = ".txt"
    path = tmp_path / f"data{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CalibrationError, match=match) as err:
        make_calibration(f"file:{path}:{spec_tail}", build_tokenizer(["a b c"]))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("spec", "kwargs", "match"),
    [
        ("news:2x64", {"max_length": 32}, r"L=64 .*max_length=32; use L <= 32"),
        ("news:1x5000", {}, r"has only \d+ tokens, fewer than one window of L=5000; use a smaller L"),
        ("news:100x100", {}, r"n×L = 100×100 = 10000 requested; use a smaller n or L"),
        ("newz:2x4", {}, r"unknown calibration source 'newz'; Did you mean 'news'\?.*wiki, news, wikihow, dialogue"),
        ("news:extra:2x4", {}, "takes no options"),
        ("random-vocab:x:2x4", {}, "takes no options"),
        ("news:2x4", {"seed": "0"}, "seed '0' is not an integer"),
        ("news:0x4", {}, r"SOURCE\[:options\]:NxL"),
    ],
)
def test_make_calibration_errors(corpus, tok, spec, kwargs, match):
    with pytest.raises(CalibrationError, match=match) as err:
        make_calibration(spec, tok, **kwargs)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip(corpus, tok, tmp_path):
    cs = make_calibration("news:4x8", tok, seed=2)
    path = tmp_path / "out" / "calib.safetensors"
    cs.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["calib.safetensors"]  # no temporary left behind
    back = CalibrationSet.load(path)
    assert torch.equal(back.input_ids, cs.input_ids) and back.input_ids.dtype == torch.long
    assert back.provenance == json.loads(json.dumps(cs.provenance)) and back.hash == cs.hash
    back.check_tokenizer(tok)


def test_load_errors(corpus, tok, tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        CalibrationSet.load(tmp_path / "missing.safetensors")
    path = tmp_path / "c.safetensors"
    make_calibration("news:4x8", tok).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationError, match="corrupt"):
        CalibrationSet.load(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CalibrationError, match="corrupt"):
        CalibrationSet.load(path)
    path.write_bytes(data[:-8] + bytes([data[-8] ^ 1]) + data[-7:])  # change the last id: the content hash sees it
    with pytest.raises(CalibrationError, match="content hash"):
        CalibrationSet.load(path)
    from safetensors.torch import save_file

    save_file({"input_ids": torch.zeros(2, 2, dtype=torch.long)}, str(path))  # not ours
    with pytest.raises(CalibrationError, match="not a calibrant calibration set"):
        CalibrationSet.load(path)


def test_from_tensor():
    cs = CalibrationSet.from_tensor(torch.arange(12, dtype=torch.int32).reshape(3, 4), note="mine")
    assert cs.input_ids.dtype == torch.long and (cs.n, cs.seq_len) == (3, 4)
    assert cs.provenance["source"] == "user-tensor" and cs.provenance["note"] == "mine"
    assert CalibrationSet.from_tensor(np.ones((1, 2), dtype=np.int64)).hash != cs.hash
    assert CalibrationSet.from_tensor(torch.ones(2, 2, dtype=torch.long), note="x").hash != \
        CalibrationSet.from_tensor(torch.ones(2, 2, dtype=torch.long), note="y").hash
    for bad, match in [(torch.ones(4, dtype=torch.long), "2-D"), (torch.ones(2, 2), "dtype"),
                       (torch.ones(0, 4, dtype=torch.long), "n > 0"), (torch.ones(2, 0, dtype=torch.long), "L > 0"),
                       (torch.full((1, 2), -100), "negative"), ("text", "not a tensor|dtype")]:
        with pytest.raises(CalibrationError, match=match):
            CalibrationSet.from_tensor(bad)


# ---------------------------------------------------------------------------------------------- tokenizers


def test_tokenizer_hash_stable_and_discriminating(tok, docs, tmp_path):
    h = tokenizer_hash(tok)
    assert len(h) == 16 and tokenizer_hash(build_tokenizer(docs)) == h
    tok.save_pretrained(tmp_path / "t")
    from transformers import AutoTokenizer

    assert tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path / "t")) == h
    assert tokenizer_hash(build_tokenizer(docs, extra=["newword"])) != h
    assert tokenizer_hash(build_tokenizer(reversed(docs))) != h  # same words, different ids


def test_tokenizer_mismatch_refused(corpus, tok, docs):
    cs = make_calibration("news:4x8", tok)
    cs.check_tokenizer(tok)
    other = build_tokenizer(docs, extra=["zzz"])
    with pytest.raises(CalibrationError) as err:
        cs.check_tokenizer(other)
    msg = str(err.value)
    assert tokenizer_hash(tok) in msg and tokenizer_hash(other) in msg and "remake" in msg
    small = build_tokenizer(["a b"])
    user = CalibrationSet.from_tensor(torch.tensor([[0, len(small) + 3]]))  # no tokenizer hash: range check only
    with pytest.raises(CalibrationError, match=f"has only {len(small)} ids"):
        user.check_tokenizer(small)
