"""What a compression will do, decided and checked before any weight is touched.

The plan holds the targeted linears of every block, the statistics the recipe needs, whether it reads
calibration activations at all (a data-free recipe given a calibration set ignores it: no capture and
no forward), and the pipeline. Every refusal happens here, naming the API parameter to change (written
as `name`; the CLI maps it to its flag).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from calibrant.errors import CalibrationError, RecipeError
from calibrant.methods.base import Method
from calibrant.models.adapter import Adapter, context_length_of, weight_of

PROPAGATE = ("compressed", "dense")
PIPELINES = ("one-pass", "two-pass")


def selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    """Whether a linear named ``name`` is targeted: glob patterns (``*?[``) match the whole name, plain
    strings any part of it; ``exclude`` wins over ``include``."""

    def hit(patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) if any(c in p for c in "*?[") else p in name for p in patterns)

    return (not include or hit(include)) and not (exclude and hit(exclude))


def as_ids(calibration: Any) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """A CalibrationSet or an ``[n, L]`` id tensor → (ids, provenance); None → (None, None)."""
    if calibration is None:
        return None, None
    if isinstance(calibration, torch.Tensor):
        ids = calibration
        meta: dict[str, Any] | None = {"source": "user-tensor", "n": ids.shape[0], "L": ids.shape[-1]}
    else:  # a CalibrationSet
        ids = calibration.input_ids
        meta = {**calibration.provenance, "hash": calibration.hash}
    if ids.dim() != 2 or ids.numel() == 0 or ids.dtype not in (torch.int32, torch.int64):
        raise CalibrationError(
            f"calibration token ids must be a non-empty 2-D integer tensor [n, L], got shape "
            f"{tuple(ids.shape)} of {ids.dtype}"
        )
    return ids.long(), meta


@dataclass
class Plan:
    methods: list[Method]
    targets: list[dict[str, nn.Module]]  # per block: targeted linears by full name
    statistics: frozenset[str]  # union of the linear-level statistics of the recipe
    ids: torch.Tensor | None  # calibration ids, None when the recipe reads no activations
    calibration: dict[str, Any] | None  # their provenance
    propagate: str
    pipeline: str
    fallbacks: dict[str, str] = field(default_factory=dict)  # layers left as they are (Method.fallback), and why
    token_mask: torch.Tensor | None = None  # [n, L] bool: the tokens the statistics count (None: all)

    @property
    def block_methods(self) -> list[Method]:
        return [m for m in self.methods if m.scope == "block"]

    @property
    def planners(self) -> list[Method]:
        return [m for m in self.methods if m.plan_statistics]

    @property
    def layer_sequential(self) -> bool:
        """Compression itself reads activations (statistics or block-level work); a recipe that reads data
        only for its plan (OWL magnitude) compresses data-free after the planning pass."""
        return self.ids is not None and bool(self.statistics or self.block_methods)


def make_plan(
    model: nn.Module,
    calibration: Any,
    methods: list[Method],
    *,
    propagate: str,
    pipeline: str,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
) -> Plan:
    if not methods:
        raise RecipeError("the recipe has no method; pass one, e.g. `recipe`=make_method('wanda')")
    if propagate not in PROPAGATE:
        raise RecipeError(f"`propagate` must be one of {', '.join(PROPAGATE)}, got '{propagate}'")
    if pipeline not in PIPELINES:
        raise RecipeError(f"`pipeline` must be one of {', '.join(PIPELINES)}, got '{pipeline}'")
    adapter = Adapter(model)
    reads_data = any(m.reads_data() for m in methods)
    ids, meta = as_ids(calibration) if reads_data else (None, None)
    if ids is None and reads_data:
        names = ", ".join(m.name for m in methods if m.reads_data())
        raise CalibrationError(f"{names} needs calibration data; pass `calibration` (e.g. wiki:128x512)")
    context = context_length_of(model)
    if ids is not None and context is not None and ids.shape[1] > context:
        raise CalibrationError(
            f"calibration length {ids.shape[1]} exceeds the model's context of {context} tokens; use L ≤ {context}"
        )
    targets = [
        {n: m for n, m in adapter.block_linears(i).items() if selected(n, include, exclude)}
        for i in range(len(adapter.blocks))
    ]
    if not any(targets):
        raise RecipeError("the `include`/`exclude` patterns select no linear layer; check them against `calibrant info`")
    fallbacks = {}
    for layer_map in targets:
        for name, module in list(layer_map.items()):
            why = next((w for m in methods if (w := m.fallback(name, tuple(weight_of(module).shape)))), None)
            if why is not None:
                fallbacks[name] = why
                del layer_map[name]
    if not any(targets):
        raise RecipeError(f"no linear layer can be compressed by this recipe (e.g. {next(iter(fallbacks))}: "
                          f"{next(iter(fallbacks.values()))})")
    for m in methods:
        m.validate_recipe(methods)
        m.validate_model(adapter)
    for layer_map in targets:  # refuse before touching anything
        for name, module in layer_map.items():
            for m in methods:
                m.validate(name, tuple(weight_of(module).shape))
    stats = frozenset().union(*(m.statistics for m in methods))
    mask = getattr(calibration, "token_mask", None) if ids is not None else None
    return Plan(methods, targets, stats, ids, meta, propagate, pipeline, fallbacks, mask)
