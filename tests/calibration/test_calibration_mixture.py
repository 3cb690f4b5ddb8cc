"""Mixtures of calibration sources: exact per-source row counts, rows from their own source, seeded and
reproducible, each component's hash recorded; bad mixtures refused in one line."""

from __future__ import annotations

import random

import pytest
from calib_helpers import build_tokenizer, make_docs

from calibrant.calibration import make_calibration
from calibrant.calibration.mixture import component_seed, split_rows
from calibrant.calibration.spec import parse_spec
from calibrant.errors import CalibrationError

NEWS, WIKI = make_docs(12, 40, prefix="n"), make_docs(12, 40, prefix="w")


@pytest.fixture
def tok():
    return build_tokenizer(NEWS + WIKI)


@pytest.fixture
def corpora_written(fake_corpus):
    fake_corpus(NEWS, "news")
    fake_corpus(WIKI, "wiki")


def test_row_counts_are_exact_and_follow_the_largest_remainders():
    assert split_rows(128, [0.5, 0.3, 0.2]) == [64, 38, 26]
    assert split_rows(10, [1 / 3, 1 / 3, 1 / 3]) == [4, 3, 3]
    rng = random.Random(0)
    for _ in range(200):
        raw = [rng.random() + 1e-3 for _ in range(rng.randint(1, 6))]
        weights = [r / sum(raw) for r in raw]
        n = rng.randint(1, 300)
        counts = split_rows(n, weights)
        assert sum(counts) == n and all(abs(c - n * w) < 1 for c, w in zip(counts, weights, strict=True))


def test_spec_round_trips():
    cs = parse_spec("mix( news=0.25 , wiki:docs=0.75 ):8x16")
    assert (cs.source, cs.options, cs.n, cs.seq_len) == ("mix", ("news=0.25", "wiki:docs=0.75"), 8, 16)
    assert str(cs) == "mix(news=0.25,wiki:docs=0.75):8x16" and parse_spec(str(cs)) == cs


def _vocab_of(tok, prefix: str) -> set[int]:
    return {i for w, i in tok.get_vocab().items() if w.startswith(prefix)}


def test_rows_come_from_their_source_in_the_stated_counts(tok, corpora_written):
    calib = make_calibration("mix(news=0.75,wiki=0.25):8x16", tok, seed=3)
    assert tuple(calib.input_ids.shape) == (8, 16)
    news, wiki = _vocab_of(tok, "n"), _vocab_of(tok, "w")
    for r, row in enumerate(calib.input_ids.tolist()):
        words = set(row) - {tok.convert_tokens_to_ids(".")} - set(calib.provenance["components"][0]["provenance"]
                                                                      ["joiner_ids"])
        assert words <= (news if r < 6 else wiki), r
    comps = calib.provenance["components"]
    assert [(c["spec"], c["weight"], c["n"]) for c in comps] == [("news", 0.75, 6), ("wiki", 0.25, 2)]
    for i, c in enumerate(comps):  # each component is the set its own spec and seed give, alone
        assert c["seed"] == component_seed(3, i, c["spec"])
        alone = make_calibration(f"{c['spec']}:{c['n']}x16", tok, seed=c["seed"])
        assert alone.hash == c["hash"]
    assert calib.provenance["source"] == "mix" and calib.provenance["spec"] == "mix(news=0.75,wiki=0.25):8x16"


def test_seeded_and_reproducible(tok, corpora_written):
    a = make_calibration("mix(news=0.5,wiki=0.5):6x16", tok, seed=0)
    b = make_calibration("mix(news=0.5,wiki=0.5):6x16", tok, seed=0)
    c = make_calibration("mix(news=0.5,wiki=0.5):6x16", tok, seed=1)
    assert a.hash == b.hash and a.input_ids.equal(b.input_ids)
    assert a.hash != c.hash and not a.input_ids.equal(c.input_ids)


@pytest.mark.parametrize("spec, message", [
    ("mix(news=0.5,wiki=0.4):8x16", "sum to 0.9, not 1; e.g. news=0.556,wiki=0.444"),
    ("mix(news=0.5,wikk=0.5):8x16", "mixture component 'wikk': unknown calibration source 'wikk'; Did you mean 'wiki'"),
    ("mix(news=0.95,wiki=0.05):8x16", "gives wiki (weight 0.05) 0 of 8 rows"),
    ("mix(news=1,mix(wiki=1)=0):8x16", "is not SOURCE=WEIGHT"),
    ("mix(news=0.5,news=0.5):8x16", "lists a source twice"),
    ("mix(news=half,wiki=0.5):8x16", "weight 'half', which is not a number"),
    ("mix(news=-0.5,wiki=1.5):8x16", "weights must be > 0"),
    ("mix(news=1:8x16", "is not closed"),
    ("mix():8x16", "names no component"),
])
def test_bad_mixtures_are_one_line_errors(tok, corpora_written, spec, message):
    with pytest.raises(CalibrationError) as e:
        make_calibration(spec, tok, seed=0)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_inspect_lists_every_component(tok, corpora_written):
    from calibrant.calibration import inspect_calibration

    calib = make_calibration("mix(news=0.75,wiki=0.25):8x16", tok, seed=3)
    rows = dict(map(tuple, inspect_calibration(calib, progress=False).rows()))
    comps = calib.provenance["components"]
    assert rows["  component news"] == f"6 rows (weight 0.75), seed {comps[0]['seed']}, hash {comps[0]['hash']}"
    assert rows["  component wiki"].startswith("2 rows (weight 0.25)") and rows["source"] == "mix (mixture)"
