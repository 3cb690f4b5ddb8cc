"""Curated selection: draw a pool larger than ``n``, keep ``n`` rows by a named strategy.

Spec options (any source): ``select=STRATEGY`` and ``pool=K`` (the pool holds ``K·n`` rows, default 8),
plus ``layer=I`` for ``coverage``; e.g. ``wiki:select=coverage:pool=8:128x512``. The pool is the set the
spec without these options gives for ``K·n`` rows at the same seed; its hash, the strategy and the kept
row indices (ascending) go in the provenance. Strategies:

- ``random``: ``n`` rows uniformly at random (seeded) — the control arm;
- ``diverse``: lexical diversity (ZipCal-style): greedily the row that adds the most token types not yet
  covered (the first one: the row with the most distinct tokens; ties: the lower index);
- ``coverage``: activation coverage (COLA-style): k-center greedy on the dense model's mean-pooled hidden
  states after block ``layer`` (default: the middle one), Euclidean; starts from the row nearest the pool's
  mean, then adds the row farthest from every row kept. Costs one forward over the pool up to that block;
- ``ppl-filter``: for self-generated text: scores every pool row by the dense model's perplexity and drops
  the lowest (the repetitive loops of degenerate generation), keeping the ``n`` highest.

``diverse`` and ``random`` need no model; ``coverage`` and ``ppl-filter`` need the model (CLI: ``--model``)
and keep what they chose under ``$CALIBRANT_CACHE/selection`` by (pool content, n, strategy, layer, model
weights, calibrant version), so a resumed study or a second method does not run the pool forward again; the
provenance then carries the selection time of when it was made, marked ``cached``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from calibrant.errors import CalibrationError, suggest

STRATEGIES = ("random", "diverse", "coverage", "ppl-filter")
SELECTION_KEYS = ("select", "pool", "layer")
DEFAULT_POOL = 8


def split_selection(spec: str, options: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, Any] | None]:
    """The spec's options without the selection ones, and the selection asked for (None: no selection)."""
    rest, found = [], {}
    for opt in options:
        key, sep, value = opt.partition("=")
        if sep and key.strip().lower() in SELECTION_KEYS:
            found[key.strip().lower()] = value.strip()
        else:
            rest.append(opt)
    if not found:
        return tuple(options), None
    strategy = found.get("select")
    if strategy is None:
        raise CalibrationError(f"calibration spec '{spec}' sets {', '.join(f'{k}=' for k in found)} without "
                               f"select=STRATEGY; add one of {', '.join(STRATEGIES)}")
    if strategy not in STRATEGIES:
        raise CalibrationError(f"unknown selection strategy '{strategy}' in '{spec}';{suggest(strategy, STRATEGIES)} "
                               f"use one of: {', '.join(STRATEGIES)}")
    pool = _int_option(spec, "pool", found.get("pool"), DEFAULT_POOL)
    if pool < 2:
        raise CalibrationError(f"pool={pool} in '{spec}' leaves nothing to select from; a pool holds pool·n rows, "
                               "use pool >= 2 (default 8)")
    layer = found.get("layer")
    if layer is not None and strategy != "coverage":
        raise CalibrationError(f"layer= applies to select=coverage only (the block whose hidden states are covered); "
                               f"drop it from '{spec}'")
    return tuple(rest), {"strategy": strategy, "pool": pool,
                         "layer": None if layer is None else _int_option(spec, "layer", layer, 0)}


def _int_option(spec: str, key: str, value: str | None, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise CalibrationError(f"{key}={value} in '{spec}' is not an integer") from None


def select_rows(ids: torch.Tensor, n: int, strategy: str, seed: int, model: Any = None, layer: int | None = None,
                batch_size: int = 8) -> tuple[list[int], dict[str, Any]]:
    """Indices (ascending) of the ``n`` rows of the pool ``ids`` that ``strategy`` keeps, and what it measured."""
    if strategy == "random":
        gen = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(ids.shape[0], generator=gen)[:n].tolist()), {}
    if strategy == "diverse":
        return diverse_rows(ids, n)
    module = _module(model, strategy)
    if strategy == "coverage":
        return coverage_rows(module, ids, n, layer, batch_size)
    return ppl_filter_rows(module, ids, n, batch_size)


def _module(model: Any, strategy: str) -> torch.nn.Module:
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
    if not isinstance(module, torch.nn.Module):
        raise CalibrationError(f"select={strategy} reads the dense model; pass model=... to make_calibration (CLI: "
                               "--model M), or use select=diverse or select=random, which need none")
    return module


def diverse_rows(ids: torch.Tensor, n: int) -> tuple[list[int], dict[str, Any]]:
    """Greedy max-coverage of token types: each step keeps the row adding the most types not yet covered."""
    rows = [np.unique(r) for r in ids.numpy()]
    flat = np.concatenate(rows)
    owner = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    covered = np.zeros(int(ids.max()) + 1, dtype=bool)
    free = np.ones(len(rows), dtype=bool)
    kept = []
    for _ in range(n):
        gains = np.bincount(owner, weights=~covered[flat], minlength=len(rows))
        gains[~free] = -1
        best = int(np.argmax(gains))  # argmax returns the first maximum: ties go to the lower index
        kept.append(best)
        free[best] = False
        covered[rows[best]] = True
    return sorted(kept), {"types_covered": int(covered.sum()), "pool_types": int(np.unique(flat).size)}


class _Reached(Exception):
    """Raised by the hook on block ``layer``: the forward has computed what coverage reads, so it stops."""

    def __init__(self, pooled: torch.Tensor):
        super().__init__("reached the covered block")
        self.pooled = pooled


@torch.no_grad()
def _pooled_states(module: torch.nn.Module, ids: torch.Tensor, layer: int, batch_size: int) -> torch.Tensor:
    """Mean-pooled hidden states after block ``layer`` (0: the embeddings), equal to the model's
    ``hidden_states[layer]``. Below the last block the forward stops at block ``layer``'s input: neither the
    later blocks nor the LM head (its logits are the largest tensor of the forward) run."""
    from calibrant.models.adapter import Adapter, inference_mode

    device = next(module.parameters()).device
    blocks = Adapter(module).blocks
    out = []

    def reached(block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        raise _Reached(hidden.float().mean(dim=1).cpu())

    with inference_mode(module):
        for b in range(0, ids.shape[0], batch_size):
            batch = ids[b:b + batch_size].to(device)
            if layer >= len(blocks):  # after the last block: the model's final norm applies, as in hidden_states
                hidden = module(input_ids=batch, output_hidden_states=True).hidden_states
                out.append(hidden[layer].float().mean(dim=1).cpu())
                continue
            handle = blocks[layer].register_forward_pre_hook(reached, with_kwargs=True)
            try:
                module(input_ids=batch)
            except _Reached as stop:
                out.append(stop.pooled)
            else:
                raise RuntimeError(f"block {layer} did not run in the model's forward")
            finally:
                handle.remove()
    return torch.cat(out)


def coverage_rows(module: torch.nn.Module, ids: torch.Tensor, n: int, layer: int | None,
                  batch_size: int = 8) -> tuple[list[int], dict[str, Any]]:
    """k-center greedy over mean-pooled hidden states after block ``layer`` (0: the embeddings)."""
    blocks = int(getattr(module.config, "num_hidden_layers", 0) or 0)
    layer = blocks // 2 if layer is None else layer
    if not 0 <= layer <= blocks:
        raise CalibrationError(f"layer={layer} is not a block of this model (0 = embeddings … {blocks}); choose "
                               f"0..{blocks}")
    states = _pooled_states(module, ids, layer, batch_size).double()
    if not torch.isfinite(states).all():
        raise CalibrationError(f"the model's hidden states after block {layer} are not finite; coverage cannot be "
                               "measured on them")
    first = int(torch.cdist(states.mean(0, keepdim=True), states).argmin())
    kept = [first]
    dist = torch.cdist(states[first:first + 1], states)[0]
    for _ in range(n - 1):
        dist[kept] = -1.0
        nxt = int(dist.argmax())
        kept.append(nxt)
        dist = torch.minimum(dist, torch.cdist(states[nxt:nxt + 1], states)[0])
    dist[kept] = 0.0
    return sorted(kept), {"layer": layer, "covering_radius": float(dist.max())}


@torch.no_grad()
def ppl_filter_rows(module: torch.nn.Module, ids: torch.Tensor, n: int,
                    batch_size: int = 8) -> tuple[list[int], dict[str, Any]]:
    """The ``n`` rows of highest dense-model perplexity (each row scored on its own)."""
    from calibrant.models.adapter import inference_mode

    device = next(module.parameters()).device
    ppl = []
    with inference_mode(module):
        for b in range(0, ids.shape[0], batch_size):
            batch = ids[b:b + batch_size].to(device)
            logits = module(input_ids=batch).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(dim=1)
            ppl += torch.exp(nll).cpu().tolist()
    if not all(math.isfinite(p) for p in ppl):
        raise CalibrationError("the dense model's perplexity is not finite on some pool rows; ppl-filter cannot rank "
                               "them")
    order = sorted(range(len(ppl)), key=lambda i: (-ppl[i], i))
    kept = sorted(order[:n])
    threshold = min(ppl[i] for i in kept)
    return kept, {"min_kept_ppl": threshold, "pool_median_ppl": float(np.median(ppl))}


def make_selected(cs: Any, selection: dict[str, Any], tokenizer: Any, seed: int, max_length: int | None,
                  progress: bool | None, model: Any, common: dict[str, Any], make: Callable[..., Any],
                  cosmetic: frozenset[str], identify: Callable[[Any], tuple[Any, str, str]]) -> Any:
    """The CalibrationSet of a spec with ``select=``: its pool at ``pool·n`` rows (drawn by ``make``:
    ``make_calibration``), then ``n`` rows kept; ``cosmetic``: provenance keys a hash ignores; ``identify``:
    a model's (module, weights hash, name), for the cache of the selections that read the model."""
    import dataclasses

    pool_spec = dataclasses.replace(cs, n=cs.n * selection["pool"])
    t0 = time.perf_counter()
    try:
        pool = make(str(pool_spec), tokenizer, seed=seed, max_length=max_length, progress=progress,
                                model=model)
    except CalibrationError as e:
        raise CalibrationError(f"the pool of select={selection['strategy']} ({selection['pool']}·n = {pool_spec.n} "
                               f"rows) cannot be drawn: {e}; or use a smaller pool=") from None
    t1 = time.perf_counter()
    cache = _selection_cache(pool.hash, cs.n, selection, model, common["calibrant_version"], identify)
    found = _cached_selection(cache, cs.n, pool.input_ids.shape[0])
    if found is None:
        kept, measured = select_rows(pool.input_ids, cs.n, selection["strategy"], seed, model, selection["layer"])
        timing = {"select_s": round(time.perf_counter() - t1, 3)}
        if cache is not None:
            from calibrant.cache import write_json_atomic

            try:
                write_json_atomic(cache, {"indices": kept, "measured": measured, **timing})
            except OSError:
                pass  # a cache that cannot be written only costs the next run this selection again
    else:
        kept, measured = found["indices"], found["measured"]
        timing = {"select_s": found["select_s"], "cached": True}  # the time it took when it was made
    prov = {k: v for k, v in pool.provenance.items() if k not in cosmetic}
    prov.update(common)
    # where the pool came from a cache (token ids, or a generated self set), pool_s is that lookup's time
    prov["selection_timing"] = {"pool_s": round(t1 - t0, 3), **timing}
    prov["selection"] = {**selection, "pool_spec": str(pool_spec), "pool_hash": pool.hash, "indices": kept,
                         **measured}
    mask = None if pool.token_mask is None else pool.token_mask[kept].clone()
    return type(pool)(pool.input_ids[kept].clone(), prov, mask)


def _selection_cache(pool_hash: str, n: int, selection: dict[str, Any], model: Any, version: str,
                     identify: Callable[[Any], tuple[Any, str, str]]) -> Any:
    """Where a selection that reads the model (``coverage``, ``ppl-filter``: a forward over the whole pool) is
    kept, by the pool's content, the strategy and its options and the model's weights; None for the others,
    which cost less than reading a file."""
    if selection["strategy"] not in ("coverage", "ppl-filter"):
        return None
    from calibrant.cache import cache_dir, stable_hash

    _module(model, selection["strategy"])  # no model: the usual error, before a hash is attempted
    _, model_hash, _ = identify(model)
    key = stable_hash({"format": 1, "pool": pool_hash, "n": n, "strategy": selection["strategy"],
                       "layer": selection["layer"], "model": model_hash, "calibrant_version": version}, length=24)
    return cache_dir("selection") / f"{key}.json"


def _cached_selection(path: Any, n: int, rows: int) -> dict[str, Any] | None:
    """The cached selection at ``path`` when it is whole and fits the pool (else None: select again)."""
    import json

    if path is None or not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
        kept = found["indices"]
        ok = (isinstance(kept, list) and len(kept) == n and all(isinstance(i, int) for i in kept)
              and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < rows
              and isinstance(found.get("measured"), dict) and isinstance(found.get("select_s"), (int, float)))
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return found if ok else None
