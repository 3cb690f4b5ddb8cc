"""Perplexity with its protocol recorded.

Protocol (the field's standard, made explicit): the evaluation documents are joined into one token
stream (the joiner is recorded by whoever made the stream); windows of ``seq_len`` tokens start
every ``stride`` tokens (``stride = seq_len``: non-overlapping); in each window only the tokens not
scored by an earlier window are scored, each with all the window's earlier tokens as context; the
last, shorter window is kept (tail included). The result is the token-weighted mean NLL, exp'd.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from calibrant.errors import CalibrantError, NumericalError
from calibrant.models.adapter import inference_mode


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    protocol: dict[str, Any]
    seconds: float
    kl: float | None = None  # mean KL(reference ‖ model) per scored token (nats), with a ``reference``
    logprobs: list[torch.Tensor] | None = field(default=None, repr=False)  # with ``keep_logprobs``

    def to_dict(self) -> dict[str, Any]:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "protocol": self.protocol,
                "seconds": self.seconds, **({} if self.kl is None else {"kl": self.kl})}


def windows(total: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_target)``: window tokens ``[begin, end)``, scored targets ``[first_target, end)``."""
    out = []
    scored_until = 1  # token 0 has no context and is never scored
    begin = 0
    while scored_until < total:
        end = min(begin + seq_len, total)
        out.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
        begin += stride
        if end == total:
            break
    return out


def group_windows(spans: list[tuple[int, int, int]], size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of equal length in groups of at most ``size`` (all but possibly the last, shorter
    tail window have the same length)."""
    groups: list[list[tuple[int, int, int]]] = []
    for span in spans:
        if groups and len(groups[-1]) < size and groups[-1][0][1] - groups[-1][0][0] == span[1] - span[0]:
            groups[-1].append(span)
        else:
            groups.append([span])
    return groups


MAX_LOGITS_BYTES = 256 << 20  # one batch's float32 logits: the largest tensor of an evaluation


def bounded_batch(model: nn.Module, seq_len: int, batch_size: int) -> int:
    """``batch_size`` lowered so one batch's logits stay under ``MAX_LOGITS_BYTES`` (a 49k vocabulary at
    512 tokens is 100 MB per sequence: batch 8 would hold 0.8 GB of logits, twice with the loss)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = getattr(head, "out_features", None) or getattr(model.config, "vocab_size", None) or 1
    return max(1, min(int(batch_size), MAX_LOGITS_BYTES // (seq_len * int(vocab) * 4)))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    *,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    keep_logprobs: bool = False,
    reference: list[torch.Tensor] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on a 1-D stream of token ids (see the module docstring for the protocol).

    ``keep_logprobs``: also return the log-probabilities of every scored position (float16, one ``[scored, vocab]``
    tensor per window, on the CPU) — the reference another model's divergence is measured against.
    ``reference``: such a list from the same stream and protocol; the result's ``kl`` is then the mean over scored
    tokens of KL(reference ‖ model), accumulated in float64. The full next-token distribution at each position
    makes it a steadier measure of how far a compressed model moved than the likelihood of the one observed token.
    """
    stride = seq_len if stride is None else stride  # 0 is refused below, not read as "unset"
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if seq_len < 2:
        raise CalibrantError(f"evaluation length (--seq-len) must be at least 2 tokens, got {seq_len}; e.g. --seq-len 512")
    if context and seq_len > context:
        raise CalibrantError(
            f"evaluation length {seq_len} is outside [2, {context}] (the model's context); pass a smaller --seq-len"
        )
    if not 0 < stride <= seq_len:
        raise CalibrantError(f"stride {stride} must be in [1, seq_len={seq_len}]")
    ids = token_ids.reshape(-1).long()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise CalibrantError("the evaluation text has fewer than 2 tokens; use a longer corpus")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    spans = windows(ids.numel(), seq_len, stride)
    batch_size = bounded_batch(model, seq_len, batch_size)
    groups = group_windows(spans, batch_size)
    if reference is not None and len(reference) != len(spans):
        raise CalibrantError(f"the reference holds {len(reference)} windows, this evaluation has {len(spans)}: "
                             "compute it on the same tokens with the same seq_len and stride")
    kept: list[torch.Tensor] = []
    total_kl = torch.zeros((), dtype=torch.float64)
    window = 0
    total_nll = torch.zeros((), dtype=torch.float64)
    scored = 0
    to_score = sum(e - first for _b, e, first in spans)
    label = (meta or {}).get("corpus", "")
    start = time.perf_counter()
    with inference_mode(model):
        bar = tqdm(groups, desc=f"perplexity {label}".strip(), unit="batch", disable=not progress)
        for i, group in enumerate(bar):
            batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            logits = model(input_ids=batch).logits
            for row, (b, _e, first) in enumerate(group):
                # logits[j] predicts token j+1; score targets [first, e) of this window
                lo = first - b - 1
                part = F.cross_entropy(logits[row, lo:-1].float(), batch[row, lo + 1 :], reduction="none")
                total_nll += part.double().sum().cpu()
                scored += part.numel()
                if keep_logprobs or reference is not None:
                    logp = F.log_softmax(logits[row, lo:-1].float(), dim=-1)
                    if keep_logprobs:
                        kept.append(logp.to(torch.float16).cpu())
                    if reference is not None:
                        if reference[window].shape != logp.shape:
                            raise CalibrantError(f"reference window {window} has shape {tuple(reference[window].shape)}"
                                                 f", the model's {tuple(logp.shape)}: compute it on the same tokens "
                                                 "with a model of the same vocabulary")
                        # renormalised after the float16 round trip: a proper distribution, so every term is ≥ 0
                        ref = F.log_softmax(reference[window].to(device=logp.device, dtype=torch.float32), dim=-1)
                        total_kl += (ref.exp() * (ref - logp)).sum(-1).double().sum().cpu()
                window += 1
            del logits
            if progress and i == 0 and len(groups) > 1:  # the estimate, once the first batch has been timed
                rate = scored / (time.perf_counter() - start)
                tqdm.write(f"calibrant: perplexity{' on ' + label if label else ''}: {to_score:,} tokens in "
                           f"{len(spans)} windows of {seq_len} (batch {batch_size}), about "
                           f"{_duration(to_score / rate)} at {rate:.0f} tokens/s", file=sys.stderr)
            if progress:
                bar.set_postfix(ppl=f"{math.exp(total_nll.item() / scored):.2f}", tok_s=f"{scored / (time.perf_counter() - start):.0f}")
    mean = total_nll.item() / scored
    if not math.isfinite(mean):
        raise NumericalError("perplexity is NaN/Inf: the model produces non-finite logits on this text")
    kl = None if reference is None else total_kl.item() / scored
    if kl is not None and not math.isfinite(kl):
        raise NumericalError("the divergence from the reference is NaN/Inf: the model produces non-finite logits")
    protocol = {
        "seq_len": seq_len,
        "stride": stride,
        "windows": len(spans),
        "tail": "included",
        "bos": "none added",
        "stream_tokens": ids.numel(),
        **(meta or {}),
    }
    return PerplexityResult(math.exp(mean), mean, scored, protocol, time.perf_counter() - start, kl,
                            kept if keep_logprobs else None)
