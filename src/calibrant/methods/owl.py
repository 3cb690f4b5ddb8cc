"""OWL (Yin et al., 2024): outlier-weighed layerwise sparsity — the maths, on plain numbers and tensors.

Per decoder block ``l``, the outlier ratio ``D_l`` is the share of Wanda scores ``|W_ij|·‖X_j‖₂`` over all
the block's targeted linears that exceed ``M`` times their mean. Blocks with more outliers are pruned
less: the block's sparsity falls linearly from ``S + λ`` (fewest outliers) to ``S − λ`` (most), then one
common shift, clipped to ``[S − λ, S + λ]``, makes the parameter-weighted mean exactly ``S`` (the paper
shifts by the plain mean of the ratios, which can leave the band and miss ``S`` when blocks differ in
size; the shift here is found by bisection, where the clipped mean is monotone).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from calibrant.errors import RecipeError


def check_owl(sparsity: float, m: float, lam: float) -> None:
    if not m > 0:
        raise RecipeError(f"OWL's outlier threshold M must be > 0 (a multiple of the mean score), got {m}; e.g. 5")
    if not 0 < lam < sparsity or sparsity + lam >= 1:
        raise RecipeError(
            f"OWL's band [S − λ, S + λ] must lie inside (0, 1): λ={lam} with sparsity S={sparsity} gives "
            f"[{sparsity - lam:g}, {sparsity + lam:g}]; use 0 < λ < min(S, 1 − S), e.g. λ=0.08"
        )


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Share of all entries of ``scores`` (one block's Wanda scores) above ``m`` × their mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
    above = sum(int((s > m * mean).sum()) for s in scores)
    return above / total


def owl_sparsities(ratios: Sequence[float], sizes: Sequence[int], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsity in ``[S − λ, S + λ]``, decreasing in the outlier ratio, with size-weighted mean S."""
    lo, hi = min(ratios), max(ratios)
    spread = hi - lo
    base = [sparsity + lam * (1 - 2 * ((r - lo) / spread if spread > 0 else 0.5)) for r in ratios]
    total = sum(sizes)

    def mean_at(shift: float) -> float:
        return sum(n * min(max(b + shift, sparsity - lam), sparsity + lam) for b, n in zip(base, sizes, strict=True)) / total

    a, b = -2 * lam, 2 * lam  # mean_at(a) = S − λ < S < S + λ = mean_at(b)
    for _ in range(200):
        mid = (a + b) / 2
        if mean_at(mid) < sparsity:
            a = mid
        else:
            b = mid
    shift = (a + b) / 2
    return [min(max(x + shift, sparsity - lam), sparsity + lam) for x in base]
