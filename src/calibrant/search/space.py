"""The search space: per-block KV groups and MLP channels (quantised), optional block removal, a budget.

A budget is the kept fraction of the decoder blocks' parameters (embeddings, final norm and LM head
are never pruned and not counted). :meth:`SearchSpace.kept_fraction` is exact (integer parameter
counts), and every configuration the space produces by sampling, mutation or crossover is repaired
into the band ``[budget − tol, budget]`` — never over budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from calibrant.errors import CalibrantError
from calibrant.search.structured import ModelShape, StructuredConfig


def check_ratio(name: str, value: float) -> float:
    if not isinstance(value, int | float) or not 0 < float(value) <= 1:
        raise CalibrantError(f"{name} must be a keep ratio in (0, 1], got {value}; e.g. 0.8 keeps 80 %")
    return float(value)


@dataclass
class Bounds:
    """Per-block inclusive ranges of KV groups and channel levels (what the search may vary)."""

    g_lo: np.ndarray
    g_hi: np.ndarray
    c_lo: np.ndarray
    c_hi: np.ndarray


class SearchSpace:
    """Configurations of one model shape: ``g ∈ [1, n_kv]`` KV groups, ``c`` a multiple of ``quantum`` channels."""

    def __init__(self, shape: ModelShape, quantum: int = 64, allow_removal: bool = False, tol: float = 0.005):
        if quantum < 1:
            raise CalibrantError(f"the channel quantum must be a positive number of channels, got {quantum}")
        self.shape = shape
        self.quantum = min(int(quantum), shape.intermediate)
        self.levels = -(-shape.intermediate // self.quantum)  # level k keeps min(k·quantum, I) channels
        self.allow_removal = allow_removal
        self.tol = tol
        self.total = shape.dense_block_params * shape.n_blocks

    # -- encoding -------------------------------------------------------------------------------
    def channels(self, level: np.ndarray | int) -> np.ndarray:
        return np.minimum(np.asarray(level) * self.quantum, self.shape.intermediate)

    def level_of(self, channels: int) -> int:
        return max(1, min(self.levels, -(-int(channels) // self.quantum)))

    def encode(self, cfg: StructuredConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = np.array(cfg.kv_groups, dtype=np.int64)
        c = np.array([self.level_of(x) for x in cfg.mlp_channels], dtype=np.int64)
        return g, c, np.array(cfg.removed, dtype=bool)

    def decode(self, g: np.ndarray, c: np.ndarray, rm: np.ndarray | None = None) -> StructuredConfig:
        rm = np.zeros(len(g), dtype=bool) if rm is None else rm
        return StructuredConfig(tuple(int(x) for x in g), tuple(int(x) for x in self.channels(c)),
                                tuple(bool(x) for x in rm))

    # -- counting -------------------------------------------------------------------------------
    def params_arrays(self, g: np.ndarray, c: np.ndarray, rm: np.ndarray) -> int:
        s = self.shape
        per = s.fixed + s.per_group * g + s.per_channel * self.channels(c)
        return int(np.where(rm, 0, per).sum())

    def kept_fraction(self, cfg: StructuredConfig) -> float:
        """Exact kept fraction of block parameters."""
        return cfg.params(self.shape) / self.total

    def minimum_fraction(self) -> float:
        s = self.shape
        smallest = s.fixed + s.per_group + s.per_channel * min(self.quantum, s.intermediate)
        if self.allow_removal:
            return smallest / self.total  # everything removed but one minimal block
        return smallest * s.n_blocks / self.total

    def check_budget(self, budget: float) -> float:
        budget = check_ratio("the budget", budget)
        low = self.minimum_fraction()
        if budget < low:
            how = "removing all blocks but one" if self.allow_removal else \
                f"1 KV group and {self.quantum} MLP channels per block"
            raise CalibrantError(
                f"budget {budget:g} cannot be met: the smallest configuration ({how}) keeps {low:.4f} of the "
                f"block parameters; use --budget ≥ {low:.4f}{'' if self.allow_removal else ' or allow block removal'}"
            )
        return budget

    # -- special configurations ----------------------------------------------------------------
    def full_bounds(self) -> Bounds:
        n = self.shape.n_blocks
        return Bounds(np.ones(n, np.int64), np.full(n, self.shape.n_kv, np.int64), np.ones(n, np.int64),
                      np.full(n, self.levels, np.int64))

    def uniform(self, budget: float) -> list[StructuredConfig]:
        """For each KV-group count, the same shape in every block with the most MLP channels within budget —
        counted in single channels, not in quanta, so the uniform baseline uses the full budget (with
        1,536 channels and a 64-channel quantum, uniform pruning to 0.9 would otherwise keep 0.875).
        Its channel counts need not be a multiple of the quantum; the pruner, the featurizer and the
        parameter counts take any count, and variation rounds them to the quantum's levels."""
        s = self.shape
        n = s.n_blocks
        allowed = math.floor(budget * self.total)
        out = []
        for g in range(s.n_kv, 0, -1):
            c = min(s.intermediate, (allowed // n - s.fixed - s.per_group * g) // s.per_channel)
            if c >= 1:
                out.append(StructuredConfig((g,) * n, (int(c),) * n, (False,) * n))
        return out

    def from_ratios(self, heads: float | Sequence[float], mlp: float | Sequence[float]) -> StructuredConfig:
        """Per-block (or uniform) keep ratios → a configuration: KV groups rounded to the nearest whole group
        (at least 1), channels rounded to the nearest multiple of the quantum (at least one quantum)."""
        n = self.shape.n_blocks
        hs = [heads] * n if isinstance(heads, int | float) else list(heads)
        ms = [mlp] * n if isinstance(mlp, int | float) else list(mlp)
        if len(hs) != n or len(ms) != n:
            raise CalibrantError(f"give one keep ratio or {n} (one per block) for heads and for MLP channels")
        g = np.array([max(1, round(check_ratio("a head keep ratio", h) * self.shape.n_kv)) for h in hs])
        c = np.array([max(1, round(check_ratio("an MLP keep ratio", m) * self.shape.intermediate / self.quantum))
                      for m in ms])
        return self.decode(g, np.minimum(c, self.levels))

    # -- random configurations, repair, variation -------------------------------------------------
    def repair(self, g: np.ndarray, c: np.ndarray, rm: np.ndarray, budget: float, rng: np.random.Generator,
               bounds: Bounds | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Move a configuration into ``[budget − tol, budget]`` by random single steps (clamped to ``bounds``).

        Over budget: shrink random dimensions; under the band: grow random dimensions while they fit.
        If the bounds cannot reach the budget, the full ranges are used, so the result is never over budget.
        """
        b = bounds or self.full_bounds()
        g = np.clip(g, b.g_lo, b.g_hi).astype(np.int64)
        c = np.clip(c, b.c_lo, b.c_hi).astype(np.int64)
        rm = rm.copy() if self.allow_removal else np.zeros_like(rm)
        cap = math.floor(budget * self.total)
        low = max(budget - self.tol, 0.0) * self.total
        s = self.shape
        per_level = s.per_channel * self.quantum
        params = self.params_arrays(g, c, rm)
        while params > cap:
            shrink_g = np.flatnonzero((g > b.g_lo) & ~rm)
            shrink_c = np.flatnonzero((c > b.c_lo) & ~rm)
            if not len(shrink_g) and not len(shrink_c):
                if bounds is not None:
                    return self.repair(g, c, rm, budget, rng, None)
                raise CalibrantError(f"budget {budget:g} is below what the search space can reach "
                                     f"({self.minimum_fraction():.4f})")
            # choose a dimension with probability proportional to the parameters one step frees
            w = np.concatenate([np.full(len(shrink_g), s.per_group), np.full(len(shrink_c), per_level)]).astype(float)
            k = rng.choice(len(w), p=w / w.sum())
            if k < len(shrink_g):
                g[shrink_g[k]] -= 1
            else:
                c[shrink_c[k - len(shrink_g)]] -= 1
            params = self.params_arrays(g, c, rm)
        while params < low:
            room = cap - params
            grow_g = np.flatnonzero((g < b.g_hi) & ~rm) if s.per_group <= room else np.array([], np.int64)
            grow_c = np.flatnonzero((c < b.c_hi) & ~rm) if per_level <= room else np.array([], np.int64)
            if not len(grow_g) and not len(grow_c):
                break
            w = np.concatenate([np.full(len(grow_g), s.per_group), np.full(len(grow_c), per_level)]).astype(float)
            k = rng.choice(len(w), p=w / w.sum())
            if k < len(grow_g):
                g[grow_g[k]] += 1
            else:
                c[grow_c[k - len(grow_g)]] += 1
            params = self.params_arrays(g, c, rm)
        return g, c, rm

    def random(self, budget: float, rng: np.random.Generator, bounds: Bounds | None = None,
               removal_prob: float = 0.05) -> StructuredConfig:
        """A random configuration in the budget band: independent per-block draws, then :meth:`repair`.

        Each draw picks its own attention/MLP balance, so samples cover head-heavy and MLP-heavy regions.
        """
        b = bounds or self.full_bounds()
        n = self.shape.n_blocks
        head_bias, mlp_bias = rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0)
        g = np.clip(np.round(b.g_lo + (b.g_hi - b.g_lo) * rng.beta(4 * head_bias, 1.5, n)), b.g_lo, b.g_hi)
        c = np.clip(np.round(b.c_lo + (b.c_hi - b.c_lo) * rng.beta(4 * mlp_bias, 1.5, n)), b.c_lo, b.c_hi)
        rm = (rng.random(n) < removal_prob) if self.allow_removal else np.zeros(n, dtype=bool)
        if rm.all():
            rm[rng.integers(n)] = False
        return self.decode(*self.repair(g.astype(np.int64), c.astype(np.int64), rm, budget, rng, b))

    def mutate(self, cfg: StructuredConfig, budget: float, rng: np.random.Generator, bounds: Bounds | None = None,
               blocks: int = 3) -> StructuredConfig:
        """Change ``blocks`` random blocks by a step or two (one head group, 1–2 channel levels, removal flip)."""
        g, c, rm = self.encode(cfg)
        n = len(g)
        for i in rng.choice(n, size=min(blocks, n), replace=False):
            kind = rng.random()
            if self.allow_removal and kind < 0.1:
                rm[i] = not rm[i]
            elif kind < 0.45:
                g[i] += rng.choice([-1, 1])
            else:
                c[i] += rng.choice([-2, -1, 1, 2])
        if rm.all():
            rm[rng.integers(n)] = False
        return self.decode(*self.repair(g, c, rm, budget, rng, bounds))

    def crossover(self, a: StructuredConfig, b: StructuredConfig, budget: float, rng: np.random.Generator,
                  bounds: Bounds | None = None) -> StructuredConfig:
        """Each block's genes from either parent (uniform crossover), repaired to the budget."""
        ga, ca, ra = self.encode(a)
        gb, cb, rb = self.encode(b)
        pick = rng.random(len(ga)) < 0.5
        g, c, rm = np.where(pick, ga, gb), np.where(pick, ca, cb), np.where(pick, ra, rb)
        if rm.all():
            rm[rng.integers(len(rm))] = False
        return self.decode(*self.repair(g, c, rm, budget, rng, bounds))

    def within(self, cfg: StructuredConfig, budget: float) -> bool:
        return cfg.params(self.shape) <= math.floor(budget * self.total)
