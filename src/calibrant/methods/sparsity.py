"""Shared pruning maths: validated sparsity targets, per-row / per-layer top-k masks, N:M masks."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from calibrant.errors import RecipeError
from calibrant.methods.base import LayerContext, LayerStats, Method
from calibrant.methods.owl import check_owl, outlier_ratio, owl_sparsities


def parse_pattern(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"2:4"`` → ``(2, 4)``: at most N non-zeros in every M consecutive input weights."""
    if pattern is None or pattern == "":
        return None
    if isinstance(pattern, str):
        try:
            n_str, m_str = pattern.split(":")
            n, m = int(n_str), int(m_str)
        except ValueError:
            raise RecipeError(f"pattern '{pattern}' is not N:M; write it like 2:4 or 4:8") from None
    else:
        n, m = pattern
    if not 0 < n < m:
        raise RecipeError(f"N:M pattern {n}:{m} needs 0 < N < M (keep N of every M weights), e.g. 2:4")
    return n, m


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, int | float) or not 0.0 <= float(sparsity) < 1.0:
        raise RecipeError(f"sparsity {sparsity!r} is outside [0, 1); use e.g. `sparsity` 0.5 for 50 %")
    return float(sparsity)


def check_nm_shape(name: str, shape: tuple[int, int], nm: tuple[int, int] | None) -> None:
    if nm is not None and shape[1] % nm[1]:
        raise RecipeError(
            f"layer {name} has {shape[1]} input features, not divisible by M={nm[1]} of the {nm[0]}:{nm[1]} "
            f"pattern; choose an M that divides {shape[1]} or exclude the layer (`exclude`)"
        )


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (True = prune) of exactly the ``k`` lowest entries of each row of ``scores``.

    An unsorted top-k selects by partition instead of sorting the ``k`` entries, 2.5x faster at half a
    row, and picks the same entries, ties included (tests/test_regression.py holds the weights)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=-1, largest=False, sorted=False).indices
        mask.scatter_(-1, idx, True)
    return mask


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Prune ``floor(sparsity · count)`` lowest scores per output row, or across the whole layer."""
    if per_row:
        return lowest_k_mask(scores, int(scores.shape[1] * sparsity))
    flat = scores.reshape(1, -1)
    return lowest_k_mask(flat, int(flat.shape[1] * sparsity)).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``m - n`` lowest scores in every group of ``m`` consecutive input columns."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    return lowest_k_mask(groups, m - n).reshape(rows, cols)


DEFAULT_SPARSITY = 0.5
PROFILES = ("uniform", "owl")


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's score ``|W_ij| · ‖X_j‖₂``: |W| scaled by each input feature's L2 norm over the calibration tokens."""
    return weight.abs() * sq_norms.sqrt().to(weight.dtype).unsqueeze(0)


class PruningMethod(Method):
    """Shared target handling, the one place that decides what a pruning recipe records: an unstructured
    ``sparsity`` (default 0.5), or an N:M ``pattern``, which prunes and records 1 − N/M whatever sparsity
    is also given (a study grid may cross both).

    ``sparsity_profile="owl"`` (unstructured only) plans a sparsity per decoder block from the dense
    model's outliers (:mod:`calibrant.methods.owl`, parameters ``owl_m`` and ``owl_lambda``); the plan sets
    ``ctx.plan["sparsity"]``, which :meth:`target_sparsity` reads, and is recorded with the result."""

    def __init__(self, sparsity: float | None = None, pattern: str | None = None, sparsity_profile: str = "uniform",
                 owl_m: float = 5.0, owl_lambda: float = 0.08):
        self._nm = parse_pattern(pattern)
        if self._nm:  # the pattern decides what is pruned, so it decides what is recorded
            self.sparsity = 1 - self._nm[0] / self._nm[1]
        else:
            self.sparsity = check_sparsity(DEFAULT_SPARSITY if sparsity is None else sparsity)
        self.pattern = f"{self._nm[0]}:{self._nm[1]}" if self._nm else None
        if sparsity_profile not in PROFILES:
            raise RecipeError(f"unknown sparsity profile '{sparsity_profile}'; choose one of {', '.join(PROFILES)}")
        self.sparsity_profile = sparsity_profile
        if sparsity_profile == "owl":
            if self._nm:
                raise RecipeError(f"OWL varies the sparsity from layer to layer, but the pattern {self.pattern} fixes it "
                                  f"at {self.sparsity:g} in every layer; use OWL with unstructured sparsity (no pattern)")
            check_owl(self.sparsity, owl_m, owl_lambda)
            self.owl_m, self.owl_lambda = float(owl_m), float(owl_lambda)

    param_help: ClassVar[dict[str, str]] = {
        "sparsity": "fraction of weights to prune, in [0, 1) (default 0.5)",
        "pattern": "N:M semi-structured pattern, e.g. 2:4 (at most N non-zeros per M inputs); sets the sparsity",
        "sparsity_profile": "uniform (default: every layer at the sparsity) or owl (per-block sparsity from the "
                            "dense model's outlier ratios, mean = the sparsity)",
        "owl_m": "OWL: a score is an outlier above M × its block's mean score (default 5)",
        "owl_lambda": "OWL: block sparsities lie in [S − λ, S + λ] (default 0.08)",
    }

    @property
    def plan_statistics(self) -> tuple[str, ...]:  # type: ignore[override]
        """OWL plans from the dense model's Σx² (the Wanda scores' ‖X_j‖); the uniform profile plans nothing."""
        return ("sq_norms",) if self.sparsity_profile == "owl" else ()

    def summarize(self, layers: dict[str, tuple[torch.Tensor, LayerStats]]) -> dict[str, Any]:
        """OWL: the block's outlier ratio over all its targeted linears' Wanda scores, and its weight count."""
        scores = [wanda_scores(w, st.sq_norms) for w, st in layers.values()]
        block = {"outlier_ratio": outlier_ratio(scores, self.owl_m), "weights": sum(s.numel() for s in scores),
                 "layers": list(layers)}
        return dict.fromkeys(layers, block)

    def plan(self, summaries: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> dict[str, dict[str, Any]]:
        blocks = list({id(b): b for b in summaries.values()}.values())
        ratios = owl_sparsities([b["outlier_ratio"] for b in blocks], [b["weights"] for b in blocks],
                                self.sparsity, self.owl_lambda)
        return {name: {"sparsity": s, "outlier_ratio": b["outlier_ratio"]}
                for b, s in zip(blocks, ratios, strict=True) for name in b["layers"]}

    def validate(self, name: str, shape: tuple[int, int]) -> None:
        check_nm_shape(name, shape, self._nm)

    def target_sparsity(self, ctx: LayerContext) -> float:
        """This layer's unstructured target: the plan's, where a model-level plan set one."""
        return float(ctx.plan.get("sparsity", self.sparsity))

    def prune_mask(self, scores: torch.Tensor, ctx: LayerContext, per_row: bool) -> torch.Tensor:
        """True where a weight is pruned: the N:M pattern's lowest scores, else this layer's target sparsity."""
        if self._nm:
            return nm_mask(scores, *self._nm)
        return unstructured_mask(scores, self.target_sparsity(ctx), per_row=per_row)
