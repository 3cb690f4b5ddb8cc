"""What a compression did: per-layer records, per-block pipelines, the plan, timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    sparsity: float
    seconds: float
    rel_error: float | None = None  # ‖(W−Ŵ)X‖² / ‖WX‖² over the calibration inputs, when XᵀX is known
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompressionReport:
    recipe: list[dict[str, Any]]
    calibration: dict[str, Any] | None  # provenance of the calibration set the methods read (None: data-free)
    propagate: str
    layers: list[LayerRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    block_pipelines: list[str] = field(default_factory=list)  # the pipeline each block ran
    plans: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # method → layer → overrides
    fallbacks: dict[str, str] = field(default_factory=dict)  # layers the recipe left as they are, and why
    activations: dict[str, Any] = field(default_factory=dict)  # the [n, L, hidden] buffers: bytes, budget, spilled

    @property
    def pipeline(self) -> str:
        """The pipeline every block ran, or each one with the blocks that ran it when they differ."""
        kinds = list(dict.fromkeys(self.block_pipelines))
        if len(kinds) <= 1:
            return kinds[0] if kinds else "data-free"
        return "; ".join(f"{k} (blocks {_ranges([i for i, p in enumerate(self.block_pipelines) if p == k])})"
                         for k in kinds)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all compressed layers' weights."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0

    @property
    def effective_bits(self) -> float | None:
        """Parameter-weighted bits per weight of the quantized layers (None if nothing was quantized)."""
        quantized = [r for r in self.layers if "effective_bits" in r.info]
        if not quantized:
            return None
        total = sum(r.shape[0] * r.shape[1] for r in quantized)
        return sum(r.info["effective_bits"] * r.shape[0] * r.shape[1] for r in quantized) / total

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pipeline"] = self.pipeline
        d["overall_sparsity"] = self.sparsity
        d["effective_bits"] = self.effective_bits
        return d


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0–2, 5"``."""
    out: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}–{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)
