"""Self-calibration: the model generates its calibration text from BOS with a temperature schedule."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from calib_helpers import build_tokenizer, tiny_llama

from calibrant.calibration import calibset, make_calibration, parse_self_options, selfgen
from calibrant.calibration.selfgen import SelfGenConfig, sample_next, temperature_schedule
from calibrant.errors import CalibrationError

WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture
def tok():
    return build_tokenizer([" ".join(WORDS)])


@pytest.fixture
def model(tok):
    return tiny_llama(len(tok))


def test_reproducible_starts_from_bos_and_seeded(tok, model, cache, tmp_path, monkeypatch):
    a = make_calibration("self:6x12", tok, seed=0, model=model)
    assert a.input_ids.shape == (6, 12) and a.input_ids.dtype == torch.long
    assert (a.input_ids[:, 0] == tok.bos_token_id).all()
    assert int(a.input_ids.max()) < len(tok)
    # same seed in a fresh cache (generated again, not served from the cache): identical ids and hash
    monkeypatch.setenv("CALIBRANT_CACHE", str(tmp_path / "other"))
    b = make_calibration("self:6x12", tok, seed=0, model=model)
    assert torch.equal(a.input_ids, b.input_ids) and a.hash == b.hash
    c = make_calibration("self:6x12", tok, seed=1, model=model)
    assert not torch.equal(a.input_ids[:, 1:], c.input_ids[:, 1:]) and a.hash != c.hash
    p = a.provenance
    g = p["generation"]
    assert (p["source"], p["sampling"], p["bos"], p["seed"]) == ("self", "self-generated", True, 0)
    assert (g["start_token"], g["start_token_id"], g["schedule"]) == ("bos", tok.bos_token_id, "linear")
    assert (g["t_start"], g["t_end"], g["top_k"], g["top_p"], g["ramp"]) == (1.0, 0.6, None, None, None)
    assert p["generation_timing"]["tokens_per_second"] > 0 and p["generation_timing"]["generated_tokens"] == 66
    assert len(p["model_hash"]) == 16


def test_same_ids_in_another_process(tok, model, tmp_path):
    a = make_calibration("self:t=1.2..0.7:top_p=0.9:4x10", tok, seed=3, model=model)
    tok.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    code = textwrap.dedent(f"""
        import transformers as T
        from calibrant.calibration import make_calibration
        path = {str(tmp_path / 'm')!r}
        model = T.AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
        tok = T.AutoTokenizer.from_pretrained(path)
        print(make_calibration("self:t=1.2..0.7:top_p=0.9:4x10", tok, seed=3, model=model).hash)
    """)
    env = {**os.environ, "CALIBRANT_CACHE": str(tmp_path / "fresh")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == a.hash


def test_cached_by_model_parameters_and_seed(tok, model, cache, monkeypatch):
    a = make_calibration("self:4x8", tok, seed=0, model=model)
    assert len(list((cache / "selfcal").glob("*.safetensors"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("generated again despite the cache")

    monkeypatch.setattr(calibset, "generate_self_calibration", boom)
    assert make_calibration("self:4x8", tok, seed=0, model=model).hash == a.hash
    for spec, seed, m in [("self:4x8", 1, model), ("self:t=1.0:4x8", 0, model), ("self:4x8", 0, tiny_llama(len(tok), 1))]:
        with pytest.raises(AssertionError, match="generated again"):
            make_calibration(spec, tok, seed=seed, model=m)


def test_temperature_schedule_is_applied_per_position(tok, model, monkeypatch):
    calls = []
    real = selfgen.sample_next

    def spy(logits, temperature, top_k, top_p, generator):
        calls.append((logits.shape[0], temperature, top_k, top_p))
        return real(logits, temperature, top_k, top_p, generator)

    monkeypatch.setattr(selfgen, "sample_next", spy)
    make_calibration("self:t=2.0..0.5:top_k=7:batch=3:5x11", tok, seed=0, model=model)
    # two batches (3 + 2 rows), ten sampled positions each, temperature 2.0 -> 0.5 linearly
    expected = [2.0 - 1.5 * i / 9 for i in range(10)]
    assert [c[0] for c in calls] == [3] * 10 + [2] * 10
    assert [c[1] for c in calls] == pytest.approx(expected * 2)
    assert {(c[2], c[3]) for c in calls} == {(7, None)}
    calls.clear()
    make_calibration("self:t=0.7:top_p=0.5:2x6", tok, seed=0, model=model)
    assert [c[1] for c in calls] == [0.7] * 5 and {c[3] for c in calls} == {0.5}


def test_schedule_and_options():
    cfg = parse_self_options(["t=1.5..0.5", "top_k=40", "top_p=0.9", "batch=4"])
    assert cfg == SelfGenConfig(1.5, 0.5, "linear", 40, 0.9, 4)
    assert temperature_schedule(5, cfg) == pytest.approx([1.5, 1.25, 1.0, 0.75, 0.5])
    ramped = parse_self_options(["t=2..1", "ramp=3"])
    assert temperature_schedule(5, ramped) == pytest.approx([2.0, 1.5, 1.0, 1.0, 1.0])  # then t_end
    assert temperature_schedule(2, ramped) == pytest.approx([2.0, 1.0])
    assert temperature_schedule(3, parse_self_options(["t=0.9"])) == [0.9, 0.9, 0.9]
    assert parse_self_options([]) == SelfGenConfig()
    assert parse_self_options(["temperature=1.0..0.6"]) == parse_self_options(["t=1.0..0.6"])


def test_greedy_matches_generate_with_the_kv_cache(tok, model):
    """top_k=1 is greedy decoding: our cached loop must agree with transformers' generate."""
    cs = make_calibration("self:top_k=1:3x16", tok, seed=0, model=model)
    ref = model.generate(torch.full((1, 1), tok.bos_token_id), do_sample=False, max_new_tokens=15,
                         min_new_tokens=15, pad_token_id=tok.eos_token_id)
    assert torch.equal(cs.input_ids[0], ref[0])
    assert (cs.input_ids == cs.input_ids[0]).all()  # greedy: every row the same


def test_sampler_truncation():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 4)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 1.0, 1, None, g).tolist() == [1] * 4
    assert sample_next(logits, 1.0, None, 1e-6, g).tolist() == [1] * 4  # nucleus keeps the top token
    draws = torch.cat([sample_next(logits, 5.0, 2, None, g) for _ in range(50)])
    assert set(draws.tolist()) == {1, 3}  # top-2 only, both drawn at a high temperature


def test_starts_from_eos_without_bos(model):
    tok = build_tokenizer([" ".join(WORDS)])
    tok.bos_token = None
    cs = make_calibration("self:2x6", tok, seed=0, model=model)
    assert (cs.input_ids[:, 0] == tok.eos_token_id).all()
    assert cs.provenance["generation"]["start_token"] == "eos" and cs.provenance["bos"] is False


def test_model_vocab_larger_than_tokenizer(tok):
    cs = make_calibration("self:4x20", tok, seed=0, model=tiny_llama(len(tok) + 40), progress=False)
    assert int(cs.input_ids.max()) < len(tok)


def test_loaded_model_is_accepted(tok, model):
    from calibrant.models.loader import LoadedModel

    loaded = LoadedModel(model=model, tokenizer=tok, spec="tiny", path=None, model_hash="f" * 16)
    cs = make_calibration("self:2x6", tok, seed=0, model=loaded)
    assert cs.provenance["model_hash"] == "f" * 16 and cs.provenance["model_name"] == "tiny"


@pytest.mark.parametrize(
    ("spec", "kwargs", "match"),
    [
        ("self:4x8", {}, r"no model was given; pass model=\.\.\. .*--model M"),
        ("self:topk=5:4x8", {"model": True}, "unknown key 'topk'; Did you mean 'top_k'"),
        ("self:t=0:4x8", {"model": True}, "must be finite and > 0"),
        ("self:t=1.5..x:4x8", {"model": True}, "not a number"),
        ("self:top_p=1.5:4x8", {"model": True}, r"top_p must be in \(0, 1\]"),
        ("self:top_k=0:4x8", {"model": True}, "must be >= 1"),
        ("self:t=1:ramp=4:4x8", {"model": True}, "nothing to ramp"),
        ("self:batch:4x8", {"model": True}, "is not KEY=VALUE"),
        ("self:4x1", {"model": True}, "L >= 2"),
        ("self:4x200", {"model": True, "max_length": 128}, "exceeds the model's context length"),
    ],
)
def test_bad_input(tok, model, spec, kwargs, match):
    if kwargs.get("model") is True:
        kwargs = {**kwargs, "model": model}
    with pytest.raises(CalibrationError, match=match) as err:
        make_calibration(spec, tok, **kwargs)
    assert "\n" not in str(err.value)


def test_context_length_inferred_from_the_model(tok):
    with pytest.raises(CalibrationError, match="L=40 exceeds the model's context length 32"):
        make_calibration("self:2x40", tok, model=tiny_llama(len(tok), context=32))
