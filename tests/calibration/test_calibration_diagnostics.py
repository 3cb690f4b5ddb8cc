"""Diagnostics: diversity, repetition, perplexity on the set, JS divergence to a corpus."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from calib_helpers import build_tokenizer, make_docs, tiny_llama

from calibrant.calibration import (
    CalibrationSet,
    heldout_token_ids,
    inspect_calibration,
    js_divergence,
    make_calibration,
)
from calibrant.calibration.diagnostics import distinct_ngram_ratios, repetition_rate, unigram_counts
from calibrant.errors import CalibrationError


@pytest.fixture
def docs():
    return make_docs(40, 30) + make_docs(40, 30, prefix="z")


def test_js_divergence_properties():
    p = np.array([5, 3, 2, 0])
    assert js_divergence(p, p) == 0.0
    assert js_divergence(p, 7 * p) == pytest.approx(0.0, abs=1e-12)  # scale-free
    q = np.array([0, 0, 0, 9])
    assert js_divergence(p, q) == pytest.approx(1.0)  # disjoint supports: the maximum, 1 bit
    r = np.array([4, 4, 1, 1])
    assert 0 < js_divergence(p, r) < 1 and js_divergence(p, r) == pytest.approx(js_divergence(r, p))
    assert js_divergence(np.array([1, 1]), np.array([1, 1, 0, 0])) == 0.0  # different lengths, same support
    with pytest.raises(CalibrationError, match="non-empty"):
        js_divergence(np.zeros(3), p)


def test_js_zero_for_a_corpus_against_itself_larger_for_unrelated_text(fake_corpus):
    rng = np.random.default_rng(0)
    news = [" ".join(rng.choice([f"n{i}" for i in range(50)], 40)) for _ in range(30)]  # shared vocabulary
    wiki = [" ".join(rng.choice([f"w{i}" for i in range(50)], 40)) for _ in range(30)]  # another one
    tok = build_tokenizer(news + wiki)
    fake_corpus(news, "news")
    fake_corpus(wiki, "wiki")
    held, _ = heldout_token_ids("news", tok)
    same = CalibrationSet.from_tensor(held.unsqueeze(0), source="news-heldout")
    d = inspect_calibration(same, against=["news", "wiki"], tokenizer=tok)
    assert d.js_divergence["news"] == 0.0
    assert d.js_divergence["wiki"] > 0.9
    calib = make_calibration("news:8x16", tok, seed=0)  # calibration part of news: related, not identical
    d2 = inspect_calibration(calib, against="news,wiki", tokenizer=tok)
    assert 0 < d2.js_divergence["news"] < 0.3 < 0.9 < d2.js_divergence["wiki"]


def test_ngram_ratios_and_repetition():
    loop = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2, 3]])
    fresh = torch.arange(9).unsqueeze(0)
    assert distinct_ngram_ratios(fresh) == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert distinct_ngram_ratios(loop)[1] == pytest.approx(3 / 9)
    assert distinct_ngram_ratios(loop)[4] == pytest.approx(3 / 6)
    assert repetition_rate(fresh) == 0.0 and repetition_rate(loop) == pytest.approx(0.5)
    # n-grams never span two rows
    two = torch.tensor([[1, 2], [3, 4]])
    assert distinct_ngram_ratios(two) == {1: 1.0, 2: 1.0} and repetition_rate(two) is None
    assert unigram_counts(two, 6).tolist() == [0, 1, 1, 1, 1, 0]


def test_inspect_with_model_perplexity(fake_corpus, tok, docs):
    fake_corpus(docs[:40], "news")
    model = tiny_llama(len(tok))
    cs = make_calibration("news:4x16", tok, seed=0)
    d = inspect_calibration(cs, model=model, tokenizer=tok)
    with torch.no_grad():
        logits = model(cs.input_ids).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), cs.input_ids[:, 1:].reshape(-1))
    assert d.perplexity == pytest.approx(math.exp(float(ref)), rel=1e-4)
    assert (d.n, d.seq_len, d.tokens, d.hash, d.sampling) == (4, 16, 64, cs.hash, "random-windows")
    assert d.distinct_tokens == len(set(cs.input_ids.flatten().tolist()))
    names = [r[0] for r in d.rows()]
    assert "dense model perplexity on the set" in names and "distinct 4-grams / 4-grams" in names
    assert d.to_dict()["distinct_ngram_ratio"][1] == pytest.approx(d.distinct_tokens / 64)


def test_inspect_refuses_another_tokenizer(fake_corpus, tok, docs):
    fake_corpus(docs[:40], "news")
    cs = make_calibration("news:4x16", tok, seed=0)
    other = build_tokenizer(docs, extra=["zzz"])
    with pytest.raises(CalibrationError, match="remake the calibration set"):
        inspect_calibration(cs, tokenizer=other)
    bare = CalibrationSet.from_tensor(cs.input_ids)  # no tokenizer recorded and none given
    with pytest.raises(CalibrationError, match="--model M"):
        inspect_calibration(bare, against=["news"])
