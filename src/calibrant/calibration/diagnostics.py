"""What a calibration set looks like, so one can see *why* it beat another.

:func:`inspect_calibration` reports tokens, distinct tokens, distinct n-gram ratios (n = 1..4, n-grams taken
inside rows), the repetition rate (mean over rows of ``1 - distinct 4-grams / 4-grams``: degenerate loops
in generated text push it up), the dense model's perplexity on the set (each row scored on its own), and
the Jensen–Shannon divergence (base 2, in [0, 1]) between the set's unigram distribution and that of the
held-out split of each corpus given (0: the same token frequencies). A small set's unigram distribution
is sparse, which alone raises its divergence: compare sets of the same size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from calibrant.calibration.calibset import CalibrationSet, heldout_token_ids, tokenizer_hash
from calibrant.errors import CalibrationError
from calibrant.models.adapter import inference_mode

NGRAM_ORDERS = (1, 2, 3, 4)
REPETITION_N = 4


@dataclass
class CalibrationDiagnostics:
    hash: str
    source: str
    sampling: str
    n: int
    seq_len: int
    tokens: int
    distinct_tokens: int
    distinct_ngram_ratio: dict[int, float]  # distinct n-grams / n-grams over the set (inside rows)
    repetition_rate: float | None  # mean over rows of 1 - distinct 4-grams / 4-grams
    perplexity: float | None = None  # the dense model's, each row scored on its own
    js_divergence: dict[str, float] = field(default_factory=dict)  # corpus -> JS(set || held-out), bits
    provenance: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[list[str]]:
        """(metric, value) rows for a table."""
        out = [["source", f"{self.source} ({self.sampling})"], ["shape", f"{self.n} x {self.seq_len}"],
               ["hash", self.hash]]
        if self.provenance.get("format") == "chat":
            prompts = self.provenance.get("prompts")
            what = (f"{self.n} answers to templated prompts ({prompts['prompt']}s of {prompts['source']})" if prompts
                    else f"{self.provenance.get('conversations')} conversations")
            out.append(["format", f"chat template (sha256 {self.provenance.get('chat_template_sha256')}), {what}"])
        masked = self.provenance.get("token_mask")
        if masked:
            out.append(["token mask", f"{masked['kind']}: statistics count {masked['share']:.1%} of the tokens"])
        sel = self.provenance.get("selection")
        if sel:
            timing = self.provenance.get("selection_timing") or {}
            took = ""
            if timing:
                took = f"; pool drawn in {timing['pool_s']:.2f}s, selected in {timing['select_s']:.2f}s"
                if timing.get("cached"):
                    took += " (when first made; read from the cache now)"
            out.append(["selection", f"{sel['strategy']}: {self.n} of {sel['pool']}·n pool rows ({sel['pool_spec']}, "
                                     f"hash {sel['pool_hash']}){took}"])
        for c in self.provenance.get("components") or []:  # a mixture: each part with its rows and own hash
            out.append([f"  component {c['spec']}", f"{c['n']} rows (weight {c['weight']:g}), seed {c['seed']}, "
                                                   f"hash {c['hash']}"])
        out += [["tokens", f"{self.tokens:,}"],
               ["distinct tokens", f"{self.distinct_tokens:,} ({self.distinct_tokens / max(self.tokens, 1):.2%})"]]
        out += [[f"distinct {k}-grams / {k}-grams", f"{v:.4f}"] for k, v in self.distinct_ngram_ratio.items()]
        rep = "-" if self.repetition_rate is None else f"{self.repetition_rate:.4f}"
        out.append([f"repetition rate (1 - distinct {REPETITION_N}-grams per row)", rep])
        if self.perplexity is not None:
            out.append(["dense model perplexity on the set", f"{self.perplexity:.3f}"])
        out += [[f"JS divergence vs {name} held-out (unigram, bits)", f"{v:.4f}"]
                for name, v in self.js_divergence.items()]
        return out


def _ngrams(ids: np.ndarray, k: int) -> np.ndarray:
    """All k-grams inside the rows of ``ids`` [n, L], as rows of a [m, k] array."""
    if ids.shape[1] < k:
        return np.zeros((0, k), dtype=ids.dtype)
    return np.lib.stride_tricks.sliding_window_view(ids, k, axis=1).reshape(-1, k)


def distinct_ngram_ratios(ids: torch.Tensor, orders: Sequence[int] = NGRAM_ORDERS) -> dict[int, float]:
    """Distinct n-grams / n-grams over the whole set, n-grams taken inside rows (never across two rows)."""
    arr = ids.numpy()
    out = {}
    for k in orders:
        grams = _ngrams(arr, k)
        if len(grams):
            out[k] = len(np.unique(grams, axis=0)) / len(grams)
    return out


def repetition_rate(ids: torch.Tensor, k: int = REPETITION_N) -> float | None:
    """Mean over rows of ``1 - distinct k-grams / k-grams`` of the row (0: no k-gram repeats inside a row)."""
    arr = ids.numpy()
    if arr.shape[1] < k:
        return None
    rates = [1.0 - len(np.unique(_ngrams(row[None], k), axis=0)) / (arr.shape[1] - k + 1) for row in arr]
    return float(np.mean(rates))


def unigram_counts(ids: torch.Tensor, vocab_size: int) -> np.ndarray:
    flat = ids.reshape(-1).numpy()
    return np.bincount(flat, minlength=max(vocab_size, int(flat.max()) + 1 if flat.size else 0))


def js_divergence(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen–Shannon divergence (base 2, in [0, 1]) between two count vectors over the same ids."""
    size = max(p_counts.size, q_counts.size)
    p = np.zeros(size)
    q = np.zeros(size)
    p[:p_counts.size] = p_counts
    q[:q_counts.size] = q_counts
    if p.sum() <= 0 or q.sum() <= 0:
        raise CalibrationError("Jensen–Shannon divergence needs two non-empty token distributions")
    p /= p.sum()
    q /= q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def set_perplexity(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8,
                   progress: bool | None = None) -> float:
    """Perplexity of ``model`` on the rows of ``ids``, each row scored on its own (tokens 2..L)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with inference_mode(model):
        for b in tqdm(range(0, ids.shape[0], batch_size), desc="perplexity on the set", unit="batch",
                      disable=(None if progress is None else not progress), leave=False):
            batch = ids[b:b + batch_size].to(device)
            logits = model(input_ids=batch).logits
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                  reduction="sum")
            total += float(nll)
            count += batch[:, 1:].numel()
    return math.exp(total / max(count, 1))


def _tokenizer_for(calib: CalibrationSet, tokenizer: Any) -> Any:
    """The given tokenizer, else the one named in the provenance if it still loads with the same hash."""
    if tokenizer is not None:
        return tokenizer
    name = calib.provenance.get("tokenizer_name")
    want = calib.provenance.get("tokenizer_hash")
    if name and want and Path(name).is_dir():  # a local tokenizer directory (never a slow hub lookup)
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(name)
            if tokenizer_hash(tok) == want:
                return tok
        except Exception:
            pass
    raise CalibrationError("comparing with a corpus needs the tokenizer the set was made with; pass the model "
                           "(--model M) whose tokenizer made it")


def inspect_calibration(calibration: CalibrationSet | str | Path, *, against: Sequence[str] | str = (),
                        model: Any = None, tokenizer: Any = None, batch_size: int = 8,
                        progress: bool | None = None) -> CalibrationDiagnostics:
    """Diagnostics of a calibration set (or a saved one). ``model`` (a LoadedModel or a transformers model,
    with ``tokenizer``) adds the dense model's perplexity on the set; ``against`` (corpus names) adds the JS
    divergence of unigram distributions to each corpus's held-out split, tokenized with the set's tokenizer."""
    calib = calibration if isinstance(calibration, CalibrationSet) else CalibrationSet.load(calibration)
    names = [a.strip() for a in (against.split(",") if isinstance(against, str) else against) if a.strip()]
    module = model if model is None or isinstance(model, torch.nn.Module) else getattr(model, "model", model)
    if model is not None and tokenizer is None and not isinstance(model, torch.nn.Module):
        tokenizer = getattr(model, "tokenizer", None)  # a LoadedModel carries its tokenizer
    if tokenizer is not None:
        calib.check_tokenizer(tokenizer)
    ids = calib.input_ids
    prov = calib.provenance
    diag = CalibrationDiagnostics(
        hash=calib.hash, source=str(prov.get("source", "?")), sampling=str(prov.get("sampling", "?")),
        n=calib.n, seq_len=calib.seq_len, tokens=ids.numel(), distinct_tokens=int(torch.unique(ids).numel()),
        distinct_ngram_ratio=distinct_ngram_ratios(ids), repetition_rate=repetition_rate(ids), provenance=prov,
    )
    if module is not None:
        if not isinstance(module, torch.nn.Module):
            raise CalibrationError(f"model of type {type(model).__name__} is not a torch model; pass a LoadedModel")
        diag.perplexity = set_perplexity(module, ids, batch_size=batch_size, progress=progress)
    if names:
        tok = _tokenizer_for(calib, tokenizer)
        try:
            vocab = len(tok)
        except TypeError:
            vocab = int(tok.vocab_size)
        mine = unigram_counts(ids, vocab)
        for name in names:
            held, _ = heldout_token_ids(name, tok, progress=progress)
            diag.js_divergence[name] = js_divergence(mine, unigram_counts(held, vocab))
    return diag
