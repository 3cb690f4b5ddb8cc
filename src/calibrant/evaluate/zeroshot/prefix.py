"""Shared-prefix scoring of lm-eval's log-likelihood requests: every distinct token is run once.

A multiple-choice item asks for ``log p(continuation | context)`` for 2–5 continuations of one context;
lm-eval's Hugging Face backend runs ``context + continuation`` once per choice, padded to the longest
member of a fixed-size batch. Here all requests of a run are put in one prefix tree instead:

- each request's model input (``context + continuation[:-1]``, left-truncated to the model's length as
  lm-eval truncates it) is a path from the root; requests are sorted by their tokens, so a request
  shares the longest prefix it can with the one before it (the choices of one item, WinoGrande's two
  partial contexts), and consecutive requests that share at least half their tokens form a group;
- groups are laid into rows of ``ROW_TOKENS`` (first fit, largest first; a larger group gets a row of
  its own size). In a row each token of a group is placed once, with the position it has in its own
  sequence, and attends to its ancestors only (a 4-D boolean attention mask: the tree's ancestor
  relation, and the sliding window where the model has one);
- rows go to the model longest first, in batches of at most ``token_budget`` tokens, and only the
  positions whose logits are scored are projected onto the vocabulary (``logits_to_keep``).

What a request gets back is what lm-eval's backend computes: the sum of the continuation tokens'
log-probabilities (log-softmax in float32) and whether each is the greedy token. The attention of a
token over its ancestors is the attention it has in its own unpadded sequence, so the numbers agree
to float rounding (the matrices have other shapes). :func:`probe` checks that on the model itself
before a run: a model that does not honour a custom 4-D mask, explicit positions or ``logits_to_keep``
is scored by lm-eval's backend instead, with a one-line warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from calibrant.errors import NumericalError

DEFAULT_TOKEN_BUDGET = 4096  # tokens per forward (rows × row length)
ROW_TOKENS = 256  # row length, unless one request is longer: longer rows pay attention over more masked pairs, shorter ones pack groups less well


@dataclass
class _Request:
    index: int  # position in the caller's list
    tokens: tuple[int, ...]  # the model input: context + continuation[:-1], left-truncated
    first: int  # index in ``tokens`` of the first position whose logits are scored
    targets: tuple[int, ...]  # the continuation's tokens


@dataclass
class _Row:
    capacity: int = 0
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    paths: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (shared prefix length, node indices)
    scored: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (request index, node indices scored)

    def __len__(self) -> int:
        return len(self.tokens)

    def scored_positions(self) -> int:
        """Distinct positions of this row whose logits are scored (one per continuation token, shared where
        continuations share their first token's position)."""
        return int(np.unique(np.concatenate([nodes for _, nodes in self.scored])).size) if self.scored else 0


def prepare(requests: Sequence[tuple[Any, Sequence[int], Sequence[int]]], max_length: int) -> list[_Request]:
    """lm-eval's ``(key, context tokens, continuation tokens)`` triples as model inputs, truncated from the
    left to ``max_length`` exactly as lm-eval's backend truncates them."""
    out = []
    for i, (_, context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError("a log-likelihood request needs a non-empty context and continuation")
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        tokens = tuple(whole[:-1])
        out.append(_Request(i, tokens, len(tokens) - len(continuation), tuple(continuation)))
    return out


def _shared(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def _groups(requests: list[_Request]) -> list[list[tuple[int, _Request]]]:
    """Requests in token order, cut into groups that share prefixes: a request joins the group of the one
    before it when they share at least half of the shorter's tokens. Each request comes with the number of
    tokens it shares with the one before it in its group (0 for the first)."""
    groups: list[list[tuple[int, _Request]]] = []
    previous: tuple[int, ...] = ()
    for r in sorted(requests, key=lambda r: r.tokens):
        shared = _shared(previous, r.tokens)
        if groups and 2 * shared >= min(len(previous), len(r.tokens)) and shared > 0:
            groups[-1].append((shared, r))
        else:
            groups.append([(0, r)])
        previous = r.tokens
    return groups


def pack(requests: list[_Request], row: int) -> list[_Row]:
    """Lay the requests' prefix groups into rows of ``row`` tokens (first fit, largest groups first, among the
    last few open rows; a group larger than ``row`` gets a row of its own size)."""
    rows: list[_Row] = []
    sized = [(sum(len(r.tokens) - shared for shared, r in g), g) for g in _groups(requests)]
    sized.sort(key=lambda x: x[0], reverse=True)
    open_rows: list[_Row] = []
    for size, group in sized:
        target = next((r for r in open_rows if len(r) + size <= r.capacity), None)
        if target is None:
            target = _Row(capacity=max(row, size))
            rows.append(target)
            open_rows = [*open_rows[-7:], target]
        path = np.zeros(0, dtype=np.int64)
        for shared, r in group:
            n, start = len(r.tokens), len(target)
            path = np.concatenate([path[:shared], np.arange(start, start + n - shared)])
            target.tokens.extend(r.tokens[shared:])
            target.positions.extend(range(shared, n))
            target.paths.append((shared, path))
            target.scored.append((r.index, path[r.first:]))
    return rows


def _tril(n: int, cache: dict[int, np.ndarray]) -> np.ndarray:
    if n not in cache:
        cache[n] = np.tril(np.ones((n, n), dtype=bool))
    return cache[n]


def row_mask(row: _Row, length: int) -> np.ndarray:
    """``[length, length]`` booleans: node i attends to node j iff j is i or one of its ancestors.
    Padding attends to itself."""
    mask = np.zeros((length, length), dtype=bool)
    cache: dict[int, np.ndarray] = {}
    for shared, path in row.paths:
        if shared < len(path):
            mask[np.ix_(path[shared:], path)] = _tril(len(path), cache)[shared:]
    idle = np.arange(len(row), length)
    mask[idle, idle] = True
    return mask


def _sliding(config: Any) -> tuple[int | None, tuple[str, ...] | None]:
    """The model's sliding window (None: none) and its per-layer attention types where it has them."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None, None
    types = getattr(config, "layer_types", None)
    return window, (tuple(types) if types else None)


def _mask_argument(masks: dict[str | None, torch.Tensor], model: Any) -> Any:
    """What the model's forward takes as ``attention_mask``: one 4-D mask, or one per layer type."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")

    def convert(m: torch.Tensor) -> torch.Tensor:
        if impl == "eager":  # eager attention adds the mask to the scores
            dtype = next(model.parameters()).dtype
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
        return m

    if None in masks:
        return convert(masks[None])
    return {k: convert(v) for k, v in masks.items()}


def forward_rows(model: Any, rows: list[_Row], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over ``rows``: ``(log-probs [kept, vocab] float32, flat index [batch, length])`` where
    ``flat[b, t]`` is the row of the output holding node t of row b (-1: not kept)."""
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), dtype=np.int64)
    pos = np.zeros((len(rows), length), dtype=np.int64)
    keep = np.zeros((len(rows), length), dtype=bool)
    window, types = _sliding(model.config)
    deepest = max(max(r.positions) for r in rows)
    window = window if window is not None and deepest >= window else None
    full, slide = [], []
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r.tokens
        pos[b, : len(r)] = r.positions
        for _, nodes in r.scored:
            keep[b, nodes] = True
        base = row_mask(r, length)
        full.append(base)
        if window is not None:
            p = pos[b]
            slide.append(base & ((p[:, None] - p[None, :]) < window))
    to = {"device": device}
    masks: dict[str | None, torch.Tensor] = {}
    full_t = torch.from_numpy(np.stack(full))[:, None].to(**to)
    if window is None:
        masks[None] = full_t
    else:
        slide_t = torch.from_numpy(np.stack(slide))[:, None].to(**to)
        if types is None:
            masks[None] = slide_t
        else:
            masks = {t: (slide_t if "sliding" in t else full_t) for t in set(types)}
    keep_t = torch.from_numpy(keep).to(**to)
    out = model(input_ids=torch.from_numpy(ids).to(**to), position_ids=torch.from_numpy(pos).to(**to),
                attention_mask=_mask_argument(masks, model), logits_to_keep=keep_t, use_cache=False)
    logits = out.logits
    if logits.dim() == 3:  # [1, kept, vocab] on models that keep the batch dimension
        logits = logits.reshape(-1, logits.shape[-1])
    if logits.shape[0] != int(keep.sum()):
        raise RuntimeError(f"the model returned {logits.shape[0]} logit rows for {int(keep.sum())} kept positions "
                           "(logits_to_keep is not honoured)")
    flat = torch.full(keep.shape, -1, dtype=torch.long)
    flat[torch.from_numpy(keep)] = torch.arange(int(keep.sum()))
    logits = logits.float()  # no copy for a float32 model: the log-softmax is taken in place
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True)), flat


def batches(rows: list[_Row], budget: int, max_scored: int | None = None) -> list[list[_Row]]:
    """Rows grouped, longest first, so that rows × longest row ≤ ``budget`` tokens (little padding) and the
    positions whose logits are kept stay ≤ ``max_scored`` (a row that alone exceeds it goes alone)."""
    out: list[list[_Row]] = []
    scored = 0
    for r in sorted(rows, key=len, reverse=True):
        n = r.scored_positions()
        if out and (len(out[-1]) + 1) * len(out[-1][0]) <= budget and (max_scored is None
                                                                       or scored + n <= max_scored):
            out[-1].append(r)
            scored += n
        else:
            out.append([r])
            scored = n
    return out


MAX_LOGITS_BYTES = 512 << 20  # the kept positions' float32 logits of one forward


def max_scored_positions(model: Any) -> int:
    """How many positions' logits one forward may keep: ``MAX_LOGITS_BYTES`` over a row of the vocabulary."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    return max(1, MAX_LOGITS_BYTES // (4 * vocab)) if vocab else 1 << 30


@torch.no_grad()
def score(model: Any, requests: list[_Request], *, token_budget: int, device: torch.device,
          progress: Any = None, counts: dict[str, int] | None = None) -> list[tuple[float, bool]]:
    """``(sum of continuation log-probs, all greedy)`` for each request, in the given order.

    ``counts`` (if given) is incremented with what was run: ``requests``, ``tokens`` (the tree's nodes,
    each token run once), ``padded`` (rows × length of each forward), ``forwards`` and ``distinct`` (the
    tokens of the distinct contexts plus those of each distinct context's distinct continuations — the
    floor the issue compares against; the tree's nodes are fewer where contexts share prefixes)."""
    if not requests:
        return []
    longest = max(len(r.tokens) for r in requests)
    if longest > token_budget:
        raise TokenBudgetError(token_budget, longest)
    rows = pack(requests, min(ROW_TOKENS, token_budget))
    result: list[tuple[float, bool] | None] = [None] * len(requests)
    targets = {r.index: r.targets for r in requests}
    groups = batches(rows, token_budget, max_scored_positions(model))
    if counts is not None:
        contexts = {r.tokens[: r.first + 1] for r in requests}
        pairs = {(r.tokens[: r.first + 1], r.targets) for r in requests}
        for key, n in (("requests", len(requests)), ("tokens", sum(len(r) for r in rows)),
                       ("padded", sum(len(g) * max(len(r) for r in g) for g in groups)), ("forwards", len(groups)),
                       ("distinct", sum(len(c) for c in contexts) + sum(len(t) - 1 for _, t in pairs))):
            counts[key] = counts.get(key, 0) + n
    for group in groups:
        logp, flat = forward_rows(model, group, device)
        greedy = logp.argmax(dim=-1)
        done = 0
        for b, r in enumerate(group):
            for index, nodes in r.scored:
                at = flat[b, torch.from_numpy(nodes)].to(logp.device)
                want = torch.tensor(targets[index], dtype=torch.long, device=logp.device)
                # a NaN is refused by evaluate_tasks once the task is scored, for either scorer
                result[index] = (float(logp[at, want].sum()), bool((greedy[at] == want).all()))
                done += 1
        if progress is not None:
            progress.update(done)
    assert all(r is not None for r in result), "a request was not placed in any row"
    return result  # type: ignore[return-value]


class TokenBudgetError(ValueError):
    def __init__(self, budget: int, longest: int) -> None:
        super().__init__(f"--token-budget {budget} is smaller than the longest request ({longest} tokens); "
                         f"pass --token-budget {longest} or more (default {DEFAULT_TOKEN_BUDGET}, raised to the "
                         "longest request automatically)")
        self.budget, self.longest = budget, longest


@torch.no_grad()
def probe(model: Any, device: torch.device, vocab: int) -> str | None:
    """Why the shared-prefix scorer would not reproduce the plain forward on this model (None: it does).

    Three requests sharing a prefix, packed into one row, against each request run alone; with a
    sliding window shorter than 1024 tokens the requests are made longer than it, so the window's
    mask is checked too."""
    window, _ = _sliding(model.config)
    n = window + 8 if window is not None and window < 1024 else 12
    g = torch.Generator().manual_seed(0)
    base = torch.randint(3, max(vocab, 4), (n + 4,), generator=g).tolist()
    seqs = [base[:n] + base[n:n + 3], base[:n] + [base[0], base[1]], base[: n - 3] + base[n + 1:n + 4]]
    reqs = [_Request(i, tuple(s[:-1]), len(s) - 4, tuple(s[-3:])) for i, s in enumerate(seqs)]
    try:
        packed = score(model, reqs, token_budget=4 * n, device=device)
        tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
        for r, (ll, _greedy) in zip(reqs, packed, strict=True):
            ids = torch.tensor([list(r.tokens)], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, r.first:].float()
            if not torch.isfinite(logits).all():
                raise NumericalError("the model's logits are not finite (NaN/Inf in its weights or activations)")
            want = torch.log_softmax(logits, -1)[torch.arange(len(r.targets)), torch.tensor(r.targets, device=device)]
            if not abs(float(want.sum()) - ll) <= tol * max(1.0, abs(ll)):
                return (f"packed log-likelihood {ll:.6f} differs from the plain forward's {float(want.sum()):.6f} "
                        "(the model ignores a custom 4-D attention mask or explicit positions)")
    except NumericalError:
        raise
    except Exception as e:  # noqa: BLE001 - any other failure means: use the reference backend
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    return None
