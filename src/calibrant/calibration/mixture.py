"""Mixtures of calibration sources: ``mix(wiki=0.5,austen:docs=0.3,pydocs=0.2):128x512``.

Each component is any non-mixture spec without its ``NxL`` (options and sampling included) and a weight;
weights are positive and sum to 1. The ``n`` rows are split exactly by the largest-remainder rule (each
component gets ``floor(n·w)``, the rows left go to the largest fractional parts, ties to the earlier
component), every component is drawn as its own set with a seed derived from the mixture's seed and its
position, and the rows are stacked in component order. Provenance lists every component with its spec,
weight, row count, seed and its own content hash, so each part can be rebuilt and checked alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from calibrant.cache import stable_hash
from calibrant.errors import CalibrationError

MIX_FORM = "mix(SOURCE=WEIGHT,SOURCE[:options]=WEIGHT,...):NxL"
_COMPONENT = re.compile(r"^\s*(?P<spec>[^=]+?)\s*=\s*(?P<weight>[^=]+?)\s*$")


def parse_components(spec: str, options: tuple[str, ...]) -> list[tuple[str, float]]:
    """``("wiki=0.5", "austen:docs=0.5")`` → ``[("wiki", 0.5), ("austen:docs", 0.5)]``, checked."""
    if not options:
        raise CalibrationError(f"calibration spec '{spec}' names no component; write {MIX_FORM}, e.g. "
                               "mix(wiki=0.5,pydocs=0.5):128x512")
    out = []
    for part in options:
        m = _COMPONENT.match(part)
        if m is None:
            raise CalibrationError(f"mixture component '{part}' of '{spec}' is not SOURCE=WEIGHT; write {MIX_FORM}")
        try:
            weight = float(m.group("weight"))
        except ValueError:
            raise CalibrationError(f"mixture component '{part}' of '{spec}' has weight '{m.group('weight')}', which "
                                   "is not a number") from None
        if not weight > 0 or weight != weight:
            raise CalibrationError(f"mixture component '{part}' of '{spec}' has weight {weight}; weights must be > 0")
        source = m.group("spec").strip()
        if re.match(r"mix\s*\(", source, re.I):
            raise CalibrationError(f"mixture component '{part}' of '{spec}' is itself a mixture; list its sources "
                                   "in the outer mixture instead")
        out.append((source, weight))
    total = sum(w for _, w in out)
    if abs(total - 1.0) > 1e-6:
        raise CalibrationError(f"mixture weights of '{spec}' sum to {total:g}, not 1; e.g. "
                               f"{','.join(f'{s}={w / total:.3g}' for s, w in out)}")
    names = [s for s, _ in out]
    if len(set(names)) != len(names):
        raise CalibrationError(f"mixture '{spec}' lists a source twice; give each source once with its total weight")
    return out


def split_rows(n: int, weights: list[float]) -> list[int]:
    """Exact row counts summing to ``n``: floors of ``n·w``, the rest to the largest remainders (earlier first)."""
    raw = [n * w for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(weights)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def component_seed(seed: int, index: int, spec: str) -> int:
    """The seed a component is drawn with: independent of the other components, stable across machines."""
    return int(stable_hash({"mixture_seed": seed, "index": index, "spec": spec}), 16) % (2**31 - 1)


def make_mixture(cs: Any, tokenizer: Any, seed: int, max_length: int | None, progress: bool | None, model: Any,
                 common: dict[str, Any], make: Callable[..., Any], cosmetic: frozenset[str]) -> Any:
    """The CalibrationSet of a parsed ``mix(...)`` spec (see the module docstring); ``make`` draws one
    component (``make_calibration``), ``cosmetic`` names the provenance keys a hash ignores."""
    components = parse_components(str(cs), cs.options)
    counts = split_rows(cs.n, [w for _, w in components])
    for (source, weight), count in zip(components, counts, strict=True):
        if count == 0:
            raise CalibrationError(f"mixture gives {source} (weight {weight:g}) 0 of {cs.n} rows; raise n or its "
                                   "weight")
    parts, recorded = [], []
    for i, ((source, weight), count) in enumerate(zip(components, counts, strict=True)):
        sub_seed = component_seed(seed, i, source)
        try:
            part = make(f"{source}:{count}x{cs.seq_len}", tokenizer, seed=sub_seed, max_length=max_length,
                                    progress=progress, model=model)
        except CalibrationError as e:
            raise CalibrationError(f"mixture component '{source}': {e}") from None
        parts.append(part)
        recorded.append({"spec": source, "weight": weight, "n": count, "seed": sub_seed, "hash": part.hash,
                         "provenance": {k: v for k, v in part.provenance.items() if k not in cosmetic}})
    ids = torch.cat([p.input_ids for p in parts], dim=0)
    mask = None  # components without a token mask count every token
    if any(p.token_mask is not None for p in parts):
        mask = torch.cat([p.token_mask if p.token_mask is not None else torch.ones_like(p.input_ids, dtype=torch.bool)
                          for p in parts], dim=0)
    prov = {"source": "mix", "sampling": "mixture", **common, "components": recorded,
            "bos": any(r["provenance"].get("bos") for r in recorded)}
    return type(parts[0])(ids, prov, mask)
