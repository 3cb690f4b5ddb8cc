"""The shared-prefix scorer against lm-eval's own HF backend: the same log-likelihoods (1e-4, fp32) and the same
greedy flags for every request shape, whatever the token budget; its packing and masks against brute force.

Fast tests use tiny random models; the slow ones score 20 real documents of each request shape (shared-context
multiple choice, WinoGrande's partial evaluation, single-token continuations, LAMBADA's greedy flag) and rolling
windows over real held-out text.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import transformers as T

from calibrant.evaluate.zeroshot import TaskError, evaluate_tasks, prefix
from calibrant.evaluate.zeroshot import scorer as zs_scorer
from tests.conftest import FAMILIES, tiny_config
from tests.evaluate.test_zeroshot import byte_tokenizer, synthetic_store  # noqa: F401 - a fixture

TOL = 1e-4


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def small_llama(vocab: int, max_len: int = 96, seed: int = 0) -> torch.nn.Module:
    cfg = tiny_config("llama")
    cfg.vocab_size, cfg.max_position_embeddings = vocab, max_len
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tok):
    return small_llama(len(tok))


def lms(model, tok, budget=None):
    return (zs_scorer._lm_class()(model, tok, 4, False),
            zs_scorer._prefix_lm_class()(model, tok, 4, False, budget))


@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def request_mix(model, seed: int = 0) -> list[tuple]:
    """Every shape lm-eval produces: several continuations of one context (single- and multi-token), contexts
    that share a prefix and differ at the end (WinoGrande), greedy continuations (is_greedy True), requests
    longer than the model (left-truncated), duplicates."""
    rng = random.Random(seed)
    out = []

    def toks(n):
        return [rng.randrange(3, 250) for _ in range(n)]

    for item in range(12):
        ctx = toks(rng.randint(1, 30))
        for choice in range(rng.randint(2, 4)):
            out.append(((f"i{item}", f"c{choice}"), ctx, toks(1 if item % 3 == 0 else rng.randint(1, 12))))
        out.append(((f"i{item}", "greedy"), ctx, greedy(model, ctx, rng.randint(1, 4))))
    for item in range(6):  # partial evaluation: two contexts that differ only at their end, one continuation
        stem, cont = toks(rng.randint(5, 20)), toks(rng.randint(2, 8))
        out += [((f"w{item}", "1"), stem + toks(2), cont), ((f"w{item}", "2"), stem + toks(3), cont)]
    out.append((("long", "0"), toks(90), toks(20)))  # 110 > max length 96: truncated from the left
    out.append(out[0])
    return out


def assert_same(a, b, tol=TOL):
    assert len(a) == len(b)
    for (la, ga), (lb, gb) in zip(a, b, strict=True):
        assert abs(la - lb) <= tol, (la, lb)
        assert ga == gb


def test_every_request_shape_matches_lm_evals_backend(model, tok):
    reqs = request_mix(model)
    hf, px = lms(model, tok)
    with torch.no_grad():
        want = hf._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = px._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert_same(want, got)
    assert sum(g for _, g in want) >= 12  # the greedy continuations are flagged greedy by both
    assert px.counts["requests"] == len(reqs)
    assert px.counts["tokens"] < px.counts["distinct"] < sum(len(c) + len(x) - 1 for _, c, x in reqs)


@pytest.mark.parametrize("budget", [110, 200, 1000])
def test_results_do_not_depend_on_the_token_budget(model, tok, budget):
    reqs = request_mix(model, seed=1)
    _, ref = lms(model, tok)
    _, px = lms(model, tok, budget)
    assert_same(ref._loglikelihood_tokens(reqs, disable_tqdm=True), px._loglikelihood_tokens(reqs, disable_tqdm=True),
                tol=1e-5)
    assert px.counts["forwards"] >= (2 if budget < 1000 else 1)


def test_deterministic_across_runs(model, tok):
    reqs = request_mix(model, seed=2)
    _, px = lms(model, tok, 300)
    assert px._loglikelihood_tokens(reqs, disable_tqdm=True) == px._loglikelihood_tokens(reqs, disable_tqdm=True)


def test_budget_smaller_than_the_longest_request_says_the_minimum(model, tok):
    reqs = [(("a", "b"), list(range(3, 40)), [5, 6])]
    _, px = lms(model, tok, 16)
    with pytest.raises(TaskError, match=r"--token-budget 16 is smaller than the longest request \(38 tokens\); "
                                        r"pass --token-budget 38"):
        px._loglikelihood_tokens(reqs, disable_tqdm=True)


def test_rolling_windows_match_lm_evals_backend(model, tok):
    from lm_eval.api.instance import Instance

    rng = random.Random(3)
    texts = ["".join(rng.choice("abcdefgh ijk") for _ in range(n)) for n in (5, 95, 96, 97, 300)]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    hf, px = lms(model, tok)
    with torch.no_grad():
        want = hf.loglikelihood_rolling(reqs, disable_tqdm=True)
    got = px.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert len(want) == len(got) == len(texts)
    for a, b in zip(want, got, strict=True):
        assert abs(a - b) <= TOL * max(1.0, abs(a) / 100), (a, b)


def test_sliding_window_model_matches(tok):
    """Gemma-3 (sliding window 8 on two of its three layers): the packed masks carry the window per layer type."""
    cfg = tiny_config("gemma3")
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    gemma = T.Gemma3ForCausalLM(cfg).eval()
    assert prefix.probe(gemma, torch.device("cpu"), len(tok)) is None
    reqs = request_mix(gemma, seed=4)[:-2]  # no truncation case: max length 128 here
    hf, px = lms(gemma, tok)
    with torch.no_grad():
        want = hf._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert_same(want, px._loglikelihood_tokens(reqs, disable_tqdm=True))


def test_packing_places_each_request_once_with_its_positions_and_ancestors():
    rng = random.Random(5)
    reqs = []
    for i in range(40):
        base = tuple(rng.randrange(10) for _ in range(rng.randint(1, 12)))
        reqs.append(prefix._Request(i, base + tuple(rng.randrange(10) for _ in range(rng.randint(0, 5))), 0, (1,)))
    rows = prefix.pack(reqs, 24)
    seen = set()
    for row in rows:
        # a row is 24 tokens, or exactly as long as the one prefix group larger than 24 that it holds
        assert len(row) <= row.capacity == 24 or len(row) == row.capacity > 24
        mask = prefix.row_mask(row, len(row) + 3)
        for (_shared, path), (index, _scored) in zip(row.paths, row.scored, strict=True):
            r = reqs[index]
            assert [row.tokens[p] for p in path] == list(r.tokens)  # the path spells the request
            assert [row.positions[p] for p in path] == list(range(len(r.tokens)))
            for j, node in enumerate(path):  # brute force: a node sees exactly its path's prefix
                assert set(np.flatnonzero(mask[node])) == set(path[: j + 1].tolist())
            seen.add(index)
        assert mask[len(row):, len(row):].diagonal().all()  # padding attends to itself only
    assert seen == set(range(40))
    assert sum(len(r) for r in rows) < sum(len(r.tokens) for r in reqs)  # shared prefixes are stored once


def test_batches_respect_the_budget_and_the_logits_bound():
    rows = [prefix._Row(capacity=64, tokens=[1] * n) for n in (60, 10, 33, 64, 5, 40)]
    groups = prefix.batches(rows, 128)
    assert sorted(len(r) for g in groups for r in g) == sorted(len(r) for r in rows)
    assert all(len(g) * max(len(r) for r in g) <= 128 for g in groups)
    rng = random.Random(7)
    reqs = [prefix._Request(i, tuple(rng.randrange(50) for _ in range(rng.randint(3, 20))), 1, (1,) * 2)
            for i in range(60)]
    rows = prefix.pack(reqs, 32)
    for limit in (5, 40):
        groups = prefix.batches(rows, 10_000, max_scored=limit)
        assert all(sum(r.scored_positions() for r in g) <= limit or len(g) == 1 for g in groups)
        assert sorted(id(r) for g in groups for r in g) == sorted(id(r) for r in rows)


@pytest.mark.usefixtures("synthetic_store")
def test_nan_logits_are_refused_not_scored(tok):
    from calibrant.errors import NumericalError

    m = small_llama(len(tok), max_len=512)
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="logits are not finite"):  # the probe, before any task runs
        zs_scorer.make_lm(m, tok, scorer="prefix", progress=False)
    with pytest.raises(NumericalError, match="task 'piqa': the model's log-likelihoods are NaN"):
        evaluate_tasks(m, tok, ["piqa"], limit=2, scorer="hf", progress=False)


@pytest.mark.parametrize("family", FAMILIES + ["llama-eager"])
def test_every_family_gets_lm_evals_numbers(tok, family):
    """Each supported family either takes the packed forward (and then matches lm-eval's backend) or is
    handed to lm-eval's backend by the probe; either way the numbers are lm-eval's."""
    cfg = tiny_config(family.removesuffix("-eager"))
    cfg.vocab_size = len(tok)
    # eager attention adds the mask to the scores: the booleans must become 0 / -inf
    impl = "eager" if family.endswith("-eager") else None
    torch.manual_seed(0)
    m = T.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()
    assert m.config._attn_implementation == (impl or "sdpa")
    reqs = [r for r in request_mix(m, seed=6) if len(r[1]) + len(r[2]) <= 100]
    hf = zs_scorer._lm_class()(m, tok, 4, False)
    lm = zs_scorer.make_lm(m, tok, progress=False)
    with torch.no_grad():
        want = hf._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert_same(want, lm._loglikelihood_tokens(reqs, disable_tqdm=True))
    if family in ("llama", "llama-eager", "gemma3", "gpt2", "gpt_neox"):  # these take explicit positions
        assert isinstance(lm, zs_scorer._prefix_lm_class()), family


class IgnoresMask(T.LlamaForCausalLM):
    """A model whose forward drops a custom attention mask (as some remote-code models do)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kw):
        return super().forward(input_ids=input_ids, **kw)


def test_a_model_that_ignores_the_mask_falls_back_to_lm_evals_backend(tok, capsys):
    cfg = tiny_config("llama")
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    odd = IgnoresMask(cfg).eval()
    assert "differs from the plain forward" in prefix.probe(odd, torch.device("cpu"), len(tok))
    lm = zs_scorer.make_lm(odd, tok, scorer="prefix", progress=False)
    assert not isinstance(lm, zs_scorer._prefix_lm_class())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scoring with lm-eval's HF backend instead" in err[0]


def test_unknown_scorer_lists_the_choices(model, tok):
    with pytest.raises(TaskError, match="unknown --scorer 'fast'.*Choose from: prefix .*hf"):
        evaluate_tasks(model, tok, ["arc_easy"], scorer="fast")
    with pytest.raises(TaskError, match="--token-budget must be a positive"):
        evaluate_tasks(model, tok, ["arc_easy"], token_budget=0)


# --------------------------------------------------------------------------------------------------
# real documents (slow: the offline task data)


@pytest.mark.slow
def test_real_items_of_every_shape_match_lm_evals_backend(tok):
    """20 real documents each: ARC-Easy (shared context, multi-token choices), WinoGrande (partial evaluation),
    BoolQ (single-token continuations, long contexts), LAMBADA (one continuation, greedy flag)."""
    from tests.evaluate.test_zeroshot import tiny_lm

    m = tiny_lm(len(tok))
    tasks = ["arc_easy", "winogrande", "boolq", "lambada"]
    a = evaluate_tasks(m, tok, tasks, limit=20, scorer="hf", progress=False)
    b = evaluate_tasks(m, tok, tasks, limit=20, scorer="prefix", progress=False)
    assert "shared-prefix" in b.protocol["scorer"] and "HF backend" in a.protocol["scorer"]
    for name in a.tasks:
        ia, ib = a.tasks[name].items, b.tasks[name].items
        assert len(ia) == len(ib) == 20
        for x, y in zip(ia, ib, strict=True):
            assert x["doc_id"] == y["doc_id"] and x["pred"] == y["pred"], name
            assert np.allclose(x["lls"], y["lls"], atol=TOL, rtol=0), name
        ma, mb = a.tasks[name].metrics, b.tasks[name].metrics
        assert {k: v for k, v in ma.items() if k.startswith("acc")} == {k: v for k, v in mb.items()
                                                                           if k.startswith("acc")}, name
        assert ma == pytest.approx(mb, rel=1e-4), name  # LAMBADA's perplexity: exp of the summed log-likelihoods
        assert b.tasks[name].scorer_counts["requests"] > 0 and not a.tasks[name].scorer_counts


@pytest.mark.slow
def test_real_text_rolling_windows_match(tok):
    from lm_eval.api.instance import Instance

    from calibrant.calibration.corpora import get_corpus

    docs = [d for d in get_corpus("wiki").split("heldout") if d.strip()][:20]
    m = small_llama(len(tok), max_len=128)
    reqs = [Instance("loglikelihood_rolling", {}, (d[:600],), i) for i, d in enumerate(docs)]
    hf, px = lms(m, tok)
    with torch.no_grad():
        want = hf.loglikelihood_rolling(reqs, disable_tqdm=True)
    got = px.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert np.allclose(want, got, atol=TOL * 10, rtol=1e-6)
