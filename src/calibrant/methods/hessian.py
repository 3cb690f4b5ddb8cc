"""Shared second-order maths: damping a Hessian and the upper Cholesky factor of its inverse."""

from __future__ import annotations

import torch

from calibrant.errors import NumericalError, RecipeError
from calibrant.methods.base import LayerStats, all_finite

DAMP_RETRIES = 3  # each retry multiplies the damping by 10
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}  # a solver's ``precision`` option
FLOAT32_FACTOR_DTYPES = (torch.float32, torch.float64)  # a float32 factor: tried in this order at each damping
SOLVER_PARAM_HELP = {  # the CLI help of the parameters every OBS-style solver (GPTQ, SparseGPT) takes
    "blocksize": "columns per lazy update block (default 128)",
    "damp": "Hessian damping, fraction of the mean diagonal (default 0.01)",
    "precision": "float32 (default) or float64 solves; float64 results do not depend on the blocksize "
                 "(bench/gptq_precision.py)",
}


def solve_dtype(precision: str) -> torch.dtype:
    """The dtype of a ``precision`` option ("float32" | "float64"); anything else is refused."""
    if precision not in PRECISIONS:
        raise RecipeError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    return PRECISIONS[precision]


def damped_inverse_cholesky(
    stats: LayerStats, damp: float, where: str, perm: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return ``(U, dead, damp_used)`` with ``Uᵀ U = (H + λI)⁻¹`` for ``H = XᵀX / tokens``.

    With ``perm`` the inverse is of the permuted Hessian ``H[perm][:, perm]`` (GPTQ's act-order);
    ``dead`` is always in the original column order. ``U`` is returned in ``dtype``: float32 factorises
    in float32 first and falls back to float64 at each damping; float64 factorises in float64 only.
    ``λ = damp · mean(diag H)``. Columns whose input is always zero ("dead") get ``H_jj = 1`` so the
    matrix stays invertible; their weights carry no signal and the caller zeroes them. If the
    Cholesky factorisation fails, the damping is raised tenfold up to ``DAMP_RETRIES`` times; if it
    still fails a NumericalError names the layer and the fix. Cached per input group in
    ``stats.cache`` so q/k/v (and gate/up) share one factorisation.
    """
    key = f"inv_chol:{damp}:{'perm' if perm is not None else ''}:{dtype}"
    if key in stats.cache:
        return stats.cache[key]
    if stats.hessian is None or stats.tokens == 0:
        raise NumericalError(f"no calibration statistics reached {where}; check the calibration set is not empty")
    stats.check_finite(where)
    # U is found without forming H⁻¹: with J the reversal permutation, the lower Cholesky factor of JHJ
    # gives H = R Rᵀ with R = J L J upper triangular, so H⁻¹ = R⁻ᵀR⁻¹ and U = R⁻¹ = J L⁻¹ J (one Cholesky
    # and one triangular solve, 1.8x faster than Cholesky → inverse → Cholesky at 1536). Both run in
    # place, so at most two n×n matrices are alive at once: this runs while the one-pass engine holds
    # every batch's activations at a layer boundary, where calibrant's peak RSS is.
    # Precision: float32 first, as the GPTQ and SparseGPT references factorise; float64 when float32
    # fails at a damping, before the damping is raised. bench/gptq_kernels.py times both and compares
    # the GPTQ layer error each gives on real layers.
    hessian = stats.hessian
    dead = torch.diagonal(hessian) == 0
    order = torch.arange(hessian.shape[0] - 1, -1, -1, device=hessian.device)  # J, composed with act-order's
    if perm is not None:
        order = perm.to(hessian.device).flip(0)
    undamped = torch.diagonal(hessian).index_select(0, order).to(torch.float64) / stats.tokens
    undamped[dead.index_select(0, order)] = 1.0  # dead columns: H_jj = 1 keeps the matrix invertible
    mean_diag = float(torch.mean(undamped))
    lam = damp
    for _ in range(DAMP_RETRIES + 1 if damp > 0 else 1):  # damp=0 is an explicit request for none
        for factor_dtype in FLOAT32_FACTOR_DTYPES if dtype == torch.float32 else (dtype,):
            U = _inverse_factor(hessian, order, undamped, lam * mean_diag, stats.tokens, factor_dtype, dtype)
            if U is not None:
                result = (U, dead, lam)
                stats.cache[key] = result
                return result
        lam *= 10
    raise NumericalError(
        f"the Hessian of {where} stays singular after damping up to {max(lam / 10, damp):g}·mean(diag); use more "
        "or more varied calibration data (larger n×L), or a larger `damp`"
    )


def _inverse_factor(
    hessian: torch.Tensor, order: torch.Tensor, undamped: torch.Tensor, damping: float, tokens: int,
    dtype: torch.dtype, out_dtype: torch.dtype,
) -> torch.Tensor | None:
    """U (in ``out_dtype``) for ``order`` (reversal composed with act-order's) and the absolute ``damping``
    added to the diagonal, factorised in ``dtype``; None if ``dtype`` is not enough."""
    H = hessian.index_select(0, order).index_select(1, order).to(dtype)  # JHJ (of the permuted H)
    H /= tokens
    torch.add(undamped, damping, out=torch.diagonal(H))
    info = torch.empty((), dtype=torch.int32, device=H.device)
    torch.linalg.cholesky_ex(H, out=(H, info))  # H now holds L (its upper triangle is zeroed)
    if info != 0:
        return None
    inv = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    torch.linalg.solve_triangular(H, inv, upper=False, out=inv)  # L⁻¹
    del H
    if not all_finite(inv):
        return None
    return inv.to(out_dtype).flip(0, 1)


def undamped_loss(loss: torch.Tensor, W: torch.Tensor, Q: torch.Tensor, stats: LayerStats, damp_used: float,
                  dead: torch.Tensor) -> None:
    """Take ``λ‖w − ŵ‖²`` off each row's OBS loss (in place): the column loop's loss is for ``H + λI``, the
    caller wants the error on ``H`` alone (``λ`` as :func:`damped_inverse_cholesky` added it)."""
    diag = torch.diagonal(stats.hessian).to(torch.float64) / stats.tokens
    lam = damp_used * float(torch.where(dead, 1.0, diag).mean())
    loss -= lam * (W - Q).square().sum(1).to(torch.float64)


def stacked_problem(
    weights: list[torch.Tensor], masks: list[torch.Tensor | None], stats: LayerStats, damp: float, where: str,
    act_order: bool, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor, float]:
    """What a column-wise OBS solver (GPTQ, SpQR) starts from for linears that read one input:
    ``(W, mask, U, perm, dead, damp_used)`` — the weights stacked in ``dtype`` with dead columns zeroed,
    their pruning masks stacked (None if none), and the damped inverse factor in act-order when asked."""
    perm = torch.argsort(torch.diagonal(stats.hessian), descending=True) if act_order else None
    U, dead, damp_used = damped_inverse_cholesky(stats, damp, where, perm, dtype)
    W = torch.cat(weights, 0).to(dtype)
    W[:, dead] = 0.0
    mask = None
    if any(m is not None for m in masks):
        mask = torch.cat([m if m is not None else torch.zeros_like(w, dtype=torch.bool)
                          for w, m in zip(weights, masks, strict=True)], 0)
    return W, mask, U, perm, dead, damp_used
