"""Self-calibration (Williams, Chrysostomou & Aletras, 2024): the model writes its own calibration text.

Every row starts from the tokenizer's BOS id (EOS where there is no BOS; provenance says which) and the
model samples the remaining ``L - 1`` tokens, batched, with its KV cache, one position at a time, so the
temperature can change per position: linearly from ``t_start`` at the first sampled token to ``t_end`` at
the last (the paper's schedule ``t_i = t_start + i/n (t_end - t_start)`` with n the whole sequence), or
over only the first ``ramp`` sampled tokens and ``t_end`` after them (the paper's ``i > n`` branch), or
constant. Optional top-k and top-p (nucleus) truncation.

Defaults: 1.0 -> 0.6 over the whole sequence, no truncation, batches of 32 rows. The paper's own
values could not be checked offline when this was written; on SmolLM2-135M a start of 1.5 gives word
salad for the first hundred tokens, while 1.0 -> 0.6 reads as prose. Memory: the KV cache holds
``batch x L`` positions (for SmolLM2-135M, 46 KB each: 32 x 512 -> 0.75 GB); lower ``batch`` for big models. A sampled EOS does not end a row: generation goes on after it, as it would
over a document boundary. Sampling uses one CPU ``torch.Generator`` seeded with the seed, on float32
probabilities moved to the CPU, so a fixed (model, parameters, seed, batch size) gives the same ids on
every run (CPU matmuls are deterministic for a fixed thread count).

Spec options, each ``KEY=VALUE`` before ``NxL``: ``t=START..END`` (linear) or ``t=VALUE`` (constant),
``ramp=R``, ``top_k=K``, ``top_p=P``, ``batch=B``; e.g. ``self:128x512``, ``self:t=1.0:top_p=0.95:64x512`` or
``self:t=2.0..0.8:ramp=32:128x512`` (hot first 32 tokens, then 0.8).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from calibrant.errors import CalibrationError, suggest
from calibrant.models.adapter import inference_mode

DEFAULT_T_START = 1.0
DEFAULT_T_END = 0.6
DEFAULT_BATCH = 32
SELF_FORM = "self[:t=START..END|t=T][:ramp=R][:top_k=K][:top_p=P][:batch=B]:NxL"
_KEYS = ("t", "ramp", "top_k", "top_p", "batch")


@dataclass(frozen=True)
class SelfGenConfig:
    """Generation parameters of self-calibration (all of them go into the cache key and the provenance)."""

    t_start: float = DEFAULT_T_START
    t_end: float = DEFAULT_T_END
    schedule: str = "linear"  # "linear" (t_start -> t_end) or "constant" (t_start throughout)
    top_k: int | None = None
    top_p: float | None = None
    batch_size: int = DEFAULT_BATCH
    ramp: int | None = None  # sampled tokens over which t goes from t_start to t_end (None: all of them)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bad(option: str, why: str) -> CalibrationError:
    return CalibrationError(f"self-calibration option '{option}' {why}; expected {SELF_FORM}, "
                            "e.g. self:128x512, self:t=1.5..0.8:top_p=0.95:128x512 or self:t=1.0:64x512")


def _positive_float(option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(option, f"has '{text}', which is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise _bad(option, f"has temperature {text}; temperatures must be finite and > 0")
    return value


def parse_self_options(options: Sequence[str]) -> SelfGenConfig:
    """``("t=1.5..0.8", "top_p=0.9")`` -> SelfGenConfig; unknown keys or bad values raise CalibrationError."""
    kw: dict[str, Any] = {}
    for opt in options:
        key, eq, value = opt.partition("=")
        key, value = key.strip().lower().replace("-", "_"), value.strip()
        key = {"temp": "t", "temperature": "t", "batch_size": "batch"}.get(key, key)
        if not eq or not value:
            raise _bad(opt, "is not KEY=VALUE")
        if key not in _KEYS:
            raise _bad(opt, f"has unknown key '{key}';{suggest(key, _KEYS)} keys: {', '.join(_KEYS)}")
        if key == "t":
            if ".." in value:
                a, _, b = value.partition("..")
                kw.update(t_start=_positive_float(opt, a), t_end=_positive_float(opt, b), schedule="linear")
            else:
                t = _positive_float(opt, value)
                kw.update(t_start=t, t_end=t, schedule="constant")
        elif key in ("top_k", "batch", "ramp"):
            try:
                number = int(value)
            except ValueError:
                raise _bad(opt, f"has '{value}', which is not an integer") from None
            if number < 1:
                raise _bad(opt, f"has {number}; it must be >= 1")
            kw[{"batch": "batch_size"}.get(key, key)] = number
        else:
            try:
                p = float(value)
            except ValueError:
                raise _bad(opt, f"has '{value}', which is not a number") from None
            if not 0 < p <= 1:
                raise _bad(opt, f"has {value}; top_p must be in (0, 1]")
            kw["top_p"] = p
    if kw.get("ramp") is not None and kw.get("schedule") == "constant":
        raise _bad("ramp", "needs a schedule t=START..END (a constant temperature has nothing to ramp)")
    return SelfGenConfig(**kw)


def temperature_schedule(steps: int, config: SelfGenConfig) -> list[float]:
    """The temperature of each of ``steps`` sampled positions: linear from t_start (first) to t_end (last
    position, or position ``ramp`` and every one after it)."""
    if config.schedule == "constant" or steps <= 1:
        return [config.t_start] * max(steps, 0)
    span = config.t_end - config.t_start
    ramp = min(config.ramp or steps, steps)
    if ramp <= 1:
        return [config.t_end] * steps
    return [config.t_start + span * min(i, ramp - 1) / (ramp - 1) for i in range(steps)]


def sample_next(logits: torch.Tensor, temperature: float | torch.Tensor, top_k: int | None, top_p: float | None,
                generator: torch.Generator) -> torch.Tensor:
    """One token id per row of ``logits`` [b, V] (float32, CPU), sampled at ``temperature`` (one for all rows,
    or one per row as a [b] tensor) after top-k/top-p."""
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.float().reshape(-1, 1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
        drop_sorted = before >= top_p  # the first token is always kept (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def start_token(tokenizer: Any) -> tuple[str, int]:
    """(role, id) of the token every generated row starts with: BOS, else EOS."""
    for role in ("bos", "eos"):
        idx = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(idx, int):
            return role, idx
    raise CalibrationError("self-calibration starts every sequence from the tokenizer's BOS (or EOS) token, and "
                           "this tokenizer has neither; set tokenizer.bos_token first")


def generate_self_calibration(model: torch.nn.Module, tokenizer: Any, n: int, seq_len: int, config: SelfGenConfig,
                              seed: int, progress: bool | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """``n`` rows of ``seq_len`` ids sampled from ``model`` (see the module docstring); returns (ids, info)
    where info holds the generation parameters and, under ``timing``, tokens/s."""
    from tqdm.auto import tqdm

    if seq_len < 2:
        raise CalibrationError(f"self-calibration needs L >= 2 (a start token plus generated text), got L={seq_len}")
    role, start_id = start_token(tokenizer)
    try:
        vocab = len(tokenizer)
    except TypeError:
        vocab = int(tokenizer.vocab_size)
    device = next(model.parameters()).device
    temps = temperature_schedule(seq_len - 1, config)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.empty((n, seq_len), dtype=torch.long)
    ids[:, 0] = start_id
    generated = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n * (seq_len - 1), desc="self-calibration", unit="tok", unit_scale=True, leave=False,
               disable=(None if progress is None else not progress))
    cache_arg = cache_keyword(model)
    with inference_mode(model, kv_cache=True):  # generation keeps its own KV cache
        with bar:
            for b0 in range(0, n, config.batch_size):
                b = min(config.batch_size, n - b0)
                current = torch.full((b, 1), start_id, dtype=torch.long, device=device)
                past = None
                for step in range(seq_len - 1):
                    out = model(input_ids=current, **{cache_arg: past}, use_cache=True)
                    past = getattr(out, cache_arg)  # the output's field has the same name
                    logits = out.logits[:, -1, :].float().cpu()
                    if logits.shape[-1] > vocab:  # embedding rows beyond the tokenizer's ids are never sampled
                        logits[:, vocab:] = float("-inf")
                    nxt = sample_next(logits, temps[step], config.top_k, config.top_p, gen)
                    ids[b0:b0 + b, step + 1] = nxt
                    current = nxt.unsqueeze(1).to(device)
                    generated += b
                    bar.update(b)
                    if step % 16 == 0:
                        bar.set_postfix(tok_s=f"{generated / max(time.perf_counter() - t0, 1e-9):.0f}")
                del past
    seconds = time.perf_counter() - t0
    info = {
        "start_token": role, "start_token_id": start_id, **config.to_dict(),
        "t_first": temps[0], "t_last": temps[-1], "after_eos": "continue",
        "sampler": "torch.multinomial on float32 CPU probabilities, torch.Generator(seed)",
    }
    timing = {"seconds": seconds, "generated_tokens": generated, "tokens_per_second": generated / max(seconds, 1e-9),
              "device": str(device), "threads": torch.get_num_threads()}
    return ids, {"generation": info, "timing": timing}


def generate_after_prefixes(model: torch.nn.Module, tokenizer: Any, prefixes: Sequence[Sequence[int]], seq_len: int,
                            config: SelfGenConfig, seed: int,
                            progress: bool | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Rows of ``seq_len`` ids, each its prefix (e.g. a chat-templated prompt) followed by tokens the model
    samples after it, batched with left padding and the KV cache. Each row's temperature follows the schedule
    over its own ``seq_len - len(prefix)`` sampled tokens. Returns (ids, info) like
    :func:`generate_self_calibration`."""
    from tqdm.auto import tqdm

    lengths = [len(p) for p in prefixes]
    if not prefixes or min(lengths) < 1 or max(lengths) >= seq_len:
        raise CalibrationError(f"every prefix must hold 1 to L-1 = {seq_len - 1} tokens, got lengths "
                               f"{min(lengths, default=0)}..{max(lengths, default=0)}")
    try:
        vocab = len(tokenizer)
    except TypeError:
        vocab = int(tokenizer.vocab_size)
    device = next(model.parameters()).device
    n = len(prefixes)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.empty((n, seq_len), dtype=torch.long)
    schedules = [torch.tensor(temperature_schedule(seq_len - k, config), dtype=torch.float32) for k in lengths]
    generated = 0
    t0 = time.perf_counter()
    bar = tqdm(total=sum(seq_len - k for k in lengths), desc="self-calibration (chat)", unit="tok", unit_scale=True,
               leave=False, disable=(None if progress is None else not progress))
    cache_arg = cache_keyword(model)
    with inference_mode(model, kv_cache=True), bar:
        for b0 in range(0, n, config.batch_size):
            rows = list(range(b0, min(b0 + config.batch_size, n)))
            width = max(lengths[r] for r in rows)
            prompt = torch.zeros((len(rows), width), dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):  # left padding: every row's next token is at the same column
                prompt[j, width - lengths[r]:] = torch.as_tensor(list(prefixes[r]), dtype=torch.long)
                attention[j, width - lengths[r]:] = 1
                ids[r, :lengths[r]] = prompt[j, width - lengths[r]:]
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            steps = seq_len - min(lengths[r] for r in rows)
            current, past = prompt.to(device), None
            attention, positions = attention.to(device), positions.to(device)
            for step in range(steps):
                out = model(input_ids=current, attention_mask=attention, position_ids=positions,
                            **{cache_arg: past}, use_cache=True)
                past = getattr(out, cache_arg)  # the output's field has the same name
                logits = out.logits[:, -1, :].float().cpu()
                if torch.isnan(logits).any():
                    raise CalibrationError("the model's logits are not finite while generating self-calibration "
                                           "text; check the model's weights and dtype")
                if logits.shape[-1] > vocab:
                    logits[:, vocab:] = float("-inf")
                temps = torch.stack([schedules[r][min(step, len(schedules[r]) - 1)] for r in rows])
                nxt = sample_next(logits, temps, config.top_k, config.top_p, gen)
                live = [(j, r) for j, r in enumerate(rows) if lengths[r] + step < seq_len]
                for j, r in live:
                    ids[r, lengths[r] + step] = nxt[j]
                generated += len(live)
                bar.update(len(live))
                current = nxt.unsqueeze(1).to(device)
                attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=1)
                positions = positions[:, -1:] + 1
            del past
    seconds = time.perf_counter() - t0
    info = {**config.to_dict(), "after_eos": "continue", "prefix_tokens": {"min": min(lengths), "max": max(lengths),
            "mean": round(sum(lengths) / n, 2)}, "padding": "left",
            "sampler": "torch.multinomial on float32 CPU probabilities, torch.Generator(seed)"}
    timing = {"seconds": seconds, "generated_tokens": generated, "tokens_per_second": generated / max(seconds, 1e-9),
              "device": str(device), "threads": torch.get_num_threads()}
    return ids, {"generation": info, "timing": timing}


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward's KV-cache argument: ``cache`` in transformers that renamed it (``past_key_values`` is
    deprecated there and goes in 5.40), ``past_key_values`` before; the output's field is named alike."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

