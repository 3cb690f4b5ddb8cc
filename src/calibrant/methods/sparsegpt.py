"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with lazy block updates.

Columns are processed left to right in blocks. Within a block the mask is chosen from
``w² / [H⁻¹]_jj²`` (exactly ``sparsity`` of the block's weights, or M−N of every M for N:M), and
each pruned weight's error is spread over the not-yet-processed columns through the upper Cholesky
factor of the damped inverse Hessian. Updates to later blocks are applied once per block (lazy).
"""

from __future__ import annotations

import torch

from calibrant.errors import RecipeError
from calibrant.methods.base import LayerContext, LayerStats, single_threaded
from calibrant.methods.hessian import SOLVER_PARAM_HELP, damped_inverse_cholesky, solve_dtype
from calibrant.methods.sparsity import PruningMethod, lowest_k_mask


def sparsegpt_prune(
    weight: torch.Tensor,
    hinv_upper: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` [out, in] given ``U`` with ``UᵀU = H⁻¹``. Returns (new weight, prune mask)."""
    W = weight.clone()
    rows, cols = W.shape
    U = hinv_upper
    mask = torch.zeros_like(W, dtype=torch.bool)
    total_pruned = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        Err1 = torch.empty_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            # exactly floor(sparsity · rows · i2) weights pruned up to this block: layer total is exact
            k = int(sparsity * rows * i2) - total_pruned
            scores = (W1.square() / d.square().unsqueeze(0)).reshape(1, -1)
            mask1 = lowest_k_mask(scores, k).reshape(rows, count)
            total_pruned += k
        for i in range(count):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                scores = W1[:, i : i + m].square() / d[i : i + m].square().unsqueeze(0)
                mask1[:, i : i + m] = lowest_k_mask(scores, m - n)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            err = (w - q) / d[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        if i2 < cols:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    return W.masked_fill(mask, 0.0), mask


class SparseGPT(PruningMethod):
    name = "sparsegpt"
    relative_cost = 1.9  # bench/pruning_vs_llmcompressor.py
    statistics = ("hessian",)
    param_help = {**PruningMethod.param_help, **SOLVER_PARAM_HELP}

    def __init__(
        self, sparsity: float | None = None, pattern: str | None = None, blocksize: int = 128, damp: float = 0.01,
        precision: str = "float32", sparsity_profile: str = "uniform", owl_m: float = 5.0, owl_lambda: float = 0.08,
    ):
        super().__init__(sparsity, pattern, sparsity_profile, owl_m, owl_lambda)
        self._dtype = solve_dtype(precision)
        self.precision = precision
        if blocksize < 1 or not 0 <= damp < 1:
            raise RecipeError(f"SparseGPT needs blocksize ≥ 1 and damp in [0, 1), got {blocksize} and {damp}")
        m = self._nm[1] if self._nm else 1
        self.blocksize = max(m, int(blocksize) // m * m)  # N:M groups must not straddle blocks
        self.damp = float(damp)

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        assert stats is not None
        U, dead, damp_used = damped_inverse_cholesky(stats, self.damp, ctx.name, dtype=self._dtype)
        W = weight.to(self._dtype, copy=True)
        W[:, dead] = 0.0
        with single_threaded():
            W, mask = sparsegpt_prune(W, U.to(W.device), self.target_sparsity(ctx), self._nm, self.blocksize)
        W = W.to(weight.dtype)
        ctx.mask = mask
        if damp_used != self.damp:
            ctx.info["damp_used"] = damp_used
        return W
