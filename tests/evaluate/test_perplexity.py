"""Perplexity protocol: exact values on a uniform model, stride bookkeeping, independent reference."""

from __future__ import annotations

import math

import pytest
import torch

from calibrant.errors import CalibrantError
from calibrant.evaluate import perplexity, windows
from tests.conftest import VOCAB, tiny_model, token_batch


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # untied tiny llama: all logits 0 → uniform prediction
    ids = torch.randint(0, VOCAB, (1000,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, ids, seq_len=64, progress=False)
    assert res.ppl == pytest.approx(VOCAB, rel=1e-5)


def _chunks(ids, seq_len):
    """Non-overlapping windows of ``seq_len`` that hold at least one scored token."""
    return [c for c in ids.split(seq_len) if c.numel() >= 2]


def _naive_nonoverlapping(model, ids, seq_len):
    total, count = 0.0, 0
    for chunk in _chunks(ids, seq_len):
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk[None]).logits[0].double(), -1)
        total -= float(logp[torch.arange(chunk.numel() - 1), chunk[1:]].sum())
        count += chunk.numel() - 1
    return math.exp(total / count), count


def test_stride_equal_to_window_matches_independent_nonoverlapping_evaluation():
    model = tiny_model("gpt2")
    ids = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(1))
    ref, count = _naive_nonoverlapping(model, ids, 64)
    res = perplexity(model, ids, seq_len=64, stride=64, batch_size=3, progress=False)
    assert res.tokens == count
    assert res.ppl == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("total, seq_len, stride", [(300, 64, 16), (257, 64, 64), (64, 64, 8), (1000, 128, 100)])
def test_each_token_is_scored_at_most_once_with_context(total, seq_len, stride):
    scored = []
    for begin, end, first in windows(total, seq_len, stride):
        assert begin < first <= end and end - begin <= seq_len
        scored += list(range(first, end))
    if stride < seq_len:  # overlapping windows: every token after the first is scored exactly once
        assert scored == list(range(1, total))
    else:  # the standard non-overlapping protocol: a window's first token has no context and is not scored
        assert scored == [t for t in range(1, total) if t % seq_len]


def test_scored_token_counts_follow_the_protocol():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (600,), generator=torch.Generator().manual_seed(2))
    a = perplexity(model, ids, seq_len=32, stride=32, progress=False)
    b = perplexity(model, ids, seq_len=32, stride=8, progress=False)
    assert a.tokens == 600 - a.protocol["windows"] and a.protocol["windows"] == 19
    assert b.tokens == 599 and b.protocol["stride"] == 8
    assert a.ppl != b.ppl  # more context per scored token changes the number


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(CalibrantError, match="context"):
        perplexity(tiny_model("llama"), torch.arange(500) % VOCAB, seq_len=256, progress=False)


def test_logits_memory_bound_lowers_the_batch_not_the_result(monkeypatch):
    import importlib

    P = importlib.import_module("calibrant.evaluate.perplexity")  # the package re-exports a function of that name
    model = tiny_model("llama")
    ids = token_batch(n=1, length=400).reshape(-1)
    free = P.perplexity(model, ids, seq_len=32, batch_size=8, progress=False)
    # room for the logits of 3 sequences of 32 tokens over the 96-word vocabulary
    monkeypatch.setattr(P, "MAX_LOGITS_BYTES", 3 * 32 * 96 * 4)
    assert P.bounded_batch(model, 32, 8) == 3
    assert P.bounded_batch(model, 4096, 8) == 1
    bounded = P.perplexity(model, ids, seq_len=32, batch_size=8, progress=False)
    assert bounded.tokens == free.tokens
    assert abs(bounded.nll - free.nll) < 1e-6


def test_estimate_is_printed_after_the_first_batch(capsys):
    """Long evaluations say up front how many tokens they will score and about how long it will take."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1000,), generator=torch.Generator().manual_seed(3))
    res = perplexity(model, ids, seq_len=64, batch_size=4, progress=True, meta={"corpus": "wiki"})
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("calibrant: perplexity")]
    assert len(lines) == 1
    assert f"on wiki: {res.tokens:,} tokens in 16 windows of 64 (batch 4), about " in lines[0]
    assert lines[0].endswith("tokens/s")
    perplexity(model, ids, seq_len=64, progress=False)
    assert "calibrant: perplexity" not in capsys.readouterr().err  # quiet runs print nothing


def _naive_kl(dense, pruned, ids, seq_len):
    """Mean KL(dense ‖ pruned) over the next-token distributions of non-overlapping windows, in float64."""
    total, count = 0.0, 0
    for chunk in _chunks(ids, seq_len):
        with torch.no_grad():
            p = torch.log_softmax(dense(chunk[None]).logits[0, :-1].double(), -1)
            q = torch.log_softmax(pruned(chunk[None]).logits[0, :-1].double(), -1)
        total += float((p.exp() * (p - q)).sum())
        count += chunk.numel() - 1
    return total / count


def test_kl_from_a_reference_matches_a_brute_force_divergence_and_is_zero_against_itself():
    import copy

    dense = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(2))
    ref = perplexity(dense, ids, seq_len=64, batch_size=2, progress=False, keep_logprobs=True)
    assert ref.kl is None and len(ref.logprobs) == 5 and ref.logprobs[0].dtype == torch.float16
    assert ref.logprobs[0].shape == (63, VOCAB) and ref.logprobs[-1].shape == (300 - 4 * 64 - 1, VOCAB)
    same = perplexity(dense, ids, seq_len=64, batch_size=3, progress=False, reference=ref.logprobs)
    assert 0 <= abs(same.kl) < 1e-5 and same.ppl == pytest.approx(ref.ppl, rel=1e-6)
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned.model.layers[0].mlp.down_proj.weight.mul_(0.3)
        pruned.model.layers[1].self_attn.o_proj.weight.mul_(-1.0)
    moved = perplexity(pruned, ids, seq_len=64, batch_size=2, progress=False, reference=ref.logprobs)
    naive = _naive_kl(dense, pruned, ids, 64)
    assert naive > 1e-3 and moved.kl == pytest.approx(naive, rel=1e-2)  # float16 reference: ~1e-3 relative
    assert "kl" in moved.to_dict() and "logprobs" not in ref.to_dict()


def test_a_reference_from_other_windows_is_refused():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(3))
    ref = perplexity(model, ids, seq_len=64, progress=False, keep_logprobs=True)
    with pytest.raises(CalibrantError, match="reference holds 5 windows, this evaluation has 3"):
        perplexity(model, ids, seq_len=128, progress=False, reference=ref.logprobs)
    with pytest.raises(CalibrantError, match="same tokens"):
        perplexity(model, ids[:299], seq_len=64, progress=False, reference=ref.logprobs)
