"""Selection from a pool: rows are pool rows at the recorded indices; strategies are seeded, differ from random
and hash their options; diverse is greedy type coverage (checked against a plain-Python reference); coverage
takes one row per planted cluster before a second and is within k-center greedy's factor 2 of the optimum;
ppl-filter keeps the highest-perplexity rows; bad selections are one-line errors."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
from calib_helpers import build_tokenizer, make_docs

from calibrant.calibration import make_calibration
from calibrant.calibration.selection import _pooled_states, coverage_rows, diverse_rows, ppl_filter_rows
from calibrant.calibration.spec import parse_spec
from calibrant.errors import CalibrationError

NEWS = make_docs(30, 40, prefix="n")


@pytest.fixture
def tok():
    return build_tokenizer(NEWS)


@pytest.fixture
def news(fake_corpus):
    fake_corpus(NEWS, "news")


@pytest.mark.parametrize("spec, options, sampling", [
    ("wiki:select=coverage:pool=8:128x512", ("select=coverage", "pool=8"), "windows"),
    ("wiki:docs:select=diverse:8x16", ("select=diverse",), "docs"),
    ("wiki:select=diverse:docs:8x16", ("select=diverse",), "docs"),
    ("file:./a.txt:docs:select=random:pool=4:8x16", ("./a.txt", "select=random", "pool=4"), "docs"),
])
def test_specs_parse_and_round_trip(spec, options, sampling):
    cs = parse_spec(spec)
    assert (cs.options, cs.sampling) == (options, sampling)
    assert parse_spec(str(cs)) == cs


@pytest.mark.parametrize("strategy", ["random", "diverse"])
def test_rows_are_the_pool_rows_at_the_recorded_indices(tok, news, strategy):
    calib = make_calibration(f"news:select={strategy}:pool=4:5x16", tok, seed=2)
    sel = calib.provenance["selection"]
    pool = make_calibration("news:20x16", tok, seed=2)
    assert sel["pool_hash"] == pool.hash and sel["pool_spec"] == "news:20x16" and sel["strategy"] == strategy
    assert sel["indices"] == sorted(set(sel["indices"])) and len(sel["indices"]) == 5
    assert torch.equal(calib.input_ids, pool.input_ids[sel["indices"]])
    again = make_calibration(f"news:select={strategy}:pool=4:5x16", tok, seed=2)
    assert again.hash == calib.hash and calib.provenance["spec"] == f"news:select={strategy}:pool=4:5x16"
    from calibrant.calibration import inspect_calibration

    rows = dict(map(tuple, inspect_calibration(calib, progress=False).rows()))
    assert rows["selection"].startswith(f"{strategy}: 5 of 4·n pool rows (news:20x16, hash {pool.hash}); pool drawn in ")
    timing = calib.provenance["selection_timing"]
    assert timing["pool_s"] >= 0 and timing["select_s"] >= 0


def test_strategies_are_seeded_differ_from_random_and_options_change_the_hash(tok, news):
    sets = {s: make_calibration(f"news:select={s}:pool=4:5x16", tok, seed=3) for s in ("random", "diverse")}
    pools = {c.provenance["selection"]["pool_hash"] for c in sets.values()}
    assert len(pools) == 1  # the same pool …
    assert sets["random"].provenance["selection"]["indices"] != sets["diverse"].provenance["selection"]["indices"]
    assert sets["random"].hash != sets["diverse"].hash  # … and another choice from it
    assert make_calibration("news:select=random:pool=4:5x16", tok, seed=4).hash != sets["random"].hash
    assert make_calibration("news:select=diverse:pool=3:5x16", tok, seed=3).hash != sets["diverse"].hash


def test_coverage_takes_one_row_per_planted_cluster_before_a_second(monkeypatch):
    from calibrant.calibration import selection
    from tests.conftest import tiny_model, token_batch

    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0], [50.0, 300.0]])
    cluster = torch.arange(5).repeat_interleave(6)[torch.randperm(30, generator=gen)]  # 5 clusters of 6, shuffled
    states = centres[cluster] + torch.randn(30, 2, generator=gen)  # spread 1 around centres 100 apart
    monkeypatch.setattr(selection, "_pooled_states", lambda *a, **k: states.clone())
    model, pool = tiny_model("llama"), token_batch(30, 4, seed=0)
    for n in range(1, 6):  # the greedy order is one sequence: every prefix of it takes distinct clusters
        kept, _ = coverage_rows(model, pool, n, layer=1)
        assert sorted(cluster[kept].tolist()) == sorted(set(cluster[kept].tolist()))
    kept, info = coverage_rows(model, pool, 5, layer=1)
    assert sorted(cluster[kept].tolist()) == [0, 1, 2, 3, 4] and info["covering_radius"] < 10
    kept, _ = coverage_rows(model, pool, 7, layer=1)  # past one per cluster: every cluster still held
    assert len(kept) == 7 and bool((torch.bincount(cluster[kept], minlength=5) >= 1).all())


@pytest.mark.parametrize("strategy", ["coverage", "ppl-filter"])
def test_model_selections_are_cached_by_pool_options_and_weights(tok, news, monkeypatch, strategy):
    from calib_helpers import tiny_llama

    from calibrant.calibration import inspect_calibration, selection

    model, spec = tiny_llama(len(tok)), f"news:select={strategy}:pool=4:5x16"
    first = make_calibration(spec, tok, seed=2, model=model)
    assert "cached" not in first.provenance["selection_timing"]
    entries = list((Path(os.environ["CALIBRANT_CACHE"]) / "selection").iterdir())
    assert len(entries) == 1

    def refuse(*a, **k):
        raise AssertionError("selected again instead of reading the cache")

    originals = {name: getattr(selection, name) for name in ("coverage_rows", "ppl_filter_rows")}
    for name in originals:
        monkeypatch.setattr(selection, name, refuse)
    again = make_calibration(spec, tok, seed=2, model=model)
    assert again.hash == first.hash and torch.equal(again.input_ids, first.input_ids)
    assert again.provenance["selection"] == first.provenance["selection"]
    assert again.provenance["selection_timing"]["cached"] is True
    assert again.provenance["selection_timing"]["select_s"] == first.provenance["selection_timing"]["select_s"]
    rows = dict(map(tuple, inspect_calibration(again, progress=False).rows()))
    assert rows["selection"].endswith("(when first made; read from the cache now)")
    with pytest.raises(AssertionError, match="selected again"):  # other weights: not the cached selection
        make_calibration(spec, tok, seed=2, model=tiny_llama(len(tok), seed=1))
    with pytest.raises(AssertionError, match="selected again"):  # another pool: another entry
        make_calibration(spec, tok, seed=3, model=model)
    entries[0].write_text('{"indices": [0, 0, 1, 2, 99], "measured": {}, "select_s": 1}')  # damaged: ignored
    for name, fn in originals.items():
        monkeypatch.setattr(selection, name, fn)
    assert make_calibration(spec, tok, seed=2, model=model).hash == first.hash
    assert "cached" not in make_calibration(spec.replace("pool=4", "pool=3"), tok, seed=2, model=model
                                            ).provenance["selection_timing"]


def _greedy_reference(rows: list[list[int]], n: int) -> list[int]:
    covered, kept = set(), []
    for _ in range(n):
        gains = [(-1 if i in kept else len(set(r) - covered), -i) for i, r in enumerate(rows)]
        best = -max(gains)[1]
        kept.append(best)
        covered |= set(rows[best])
    return sorted(kept)


def test_diverse_is_greedy_type_coverage():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        pool = torch.randint(0, 40 + trial, (12, 10), generator=gen)
        kept, info = diverse_rows(pool, 4)
        assert kept == _greedy_reference(pool.tolist(), 4)
        assert info["types_covered"] == len(set(pool[kept].flatten().tolist()))
    repetitive = torch.tensor([[1] * 8, [2] * 8, list(range(3, 11)), list(range(5, 13))])
    assert diverse_rows(repetitive, 2)[0] == [2, 3]  # the two varied rows, never the loops


def test_coverage_is_within_twice_the_optimal_radius():
    from tests.conftest import tiny_model, token_batch

    model = tiny_model("llama")
    pool = token_batch(9, 12, seed=4)
    kept, info = coverage_rows(model, pool, 3, layer=1, batch_size=4)
    states = _pooled_states(model, pool, 1, 4).double()

    def radius(chosen) -> float:
        return float(torch.cdist(states, states[list(chosen)]).min(dim=1).values.max())

    best = min(radius(c) for c in itertools.combinations(range(9), 3))
    assert radius(kept) == pytest.approx(info["covering_radius"]) and radius(kept) <= 2 * best + 1e-9
    assert info["layer"] == 1 and len(kept) == 3


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gpt_neox", "gemma3"])
def test_pooled_states_equal_the_models_hidden_states_without_running_the_head(family):
    from tests.conftest import tiny_model, token_batch

    model = tiny_model(family)
    pool = token_batch(5, 12, seed=6)
    with torch.no_grad():
        full = model(input_ids=pool, output_hidden_states=True).hidden_states
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
    for layer in range(len(full)):
        head_calls.clear()
        states = _pooled_states(model, pool, layer, batch_size=2)
        torch.testing.assert_close(states, full[layer].float().mean(dim=1), rtol=1e-5, atol=1e-6)
        assert len(head_calls) == (3 if layer == len(full) - 1 else 0)  # batches of 2: 3 forwards at the last
    assert not any(m._forward_pre_hooks for m in model.modules())  # the stopping hooks are gone


def test_ppl_filter_keeps_the_highest_perplexity_rows():
    from calibrant.calibration.diagnostics import set_perplexity
    from tests.conftest import tiny_model, token_batch

    model = tiny_model("llama")
    pool = token_batch(8, 12, seed=5)
    pool[1] = 7  # a degenerate loop: the lowest perplexity once the model has seen it
    kept, _ = ppl_filter_rows(model, pool, 5)
    ppl = [set_perplexity(model, pool[i:i + 1], progress=False) for i in range(8)]
    assert min(ppl[i] for i in kept) >= max(ppl[i] for i in range(8) if i not in kept) - 1e-4
    assert len(kept) == 5


@pytest.mark.parametrize("spec, message", [
    ("news:select=diversity:4x16", "strategy 'diversity' in 'news:select=diversity:4x16'; Did you mean 'diverse'? use one of: random, diverse, coverage, ppl-filter"),
    ("news:pool=4:4x16", "without select=STRATEGY"),
    ("news:select=random:pool=1:4x16", "use pool >= 2"),
    ("news:select=diverse:layer=3:4x16", "layer= applies to select=coverage only"),
    ("news:select=coverage:4x16", "reads the dense model; pass model="),
    ("news:select=random:pool=200:4x16", "the pool of select=random (200·n = 800 rows) cannot be drawn"),
])
def test_bad_selections_are_one_line_errors(tok, news, spec, message):
    with pytest.raises(CalibrationError) as e:
        make_calibration(spec, tok, seed=0)
    assert message in str(e.value) and "\n" not in str(e.value)
