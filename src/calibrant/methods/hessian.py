"""Shared second-order maths: damping a Hessian and the upper Cholesky factor of its inverse."""

from __future__ import annotations

from typing import Any

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
    key = _factor_key(damp, perm, dtype)
    if key in stats.cache:
        return stats.cache[key]
    if stats.hessian is None or stats.tokens == 0:
        raise NumericalError(f"no calibration statistics reached {where}; check the calibration set is not empty")
    stats.check_finite(where)
    # U is found without forming H⁻¹: with J the reversal permutation, the lower Cholesky factor of JHJ
    # gives H = R Rᵀ with R = J L J upper triangular, so H⁻¹ = R⁻ᵀR⁻¹ and U = R⁻¹ = J L⁻¹ J (one Cholesky
    # and one triangular solve, 1.8x faster than Cholesky → inverse → Cholesky at 1536). Both run in
    # place, and so do the permutation and the final flip, so two n×n matrices besides the statistics' XᵀX
    # are alive at once: this runs while the one-pass engine holds every batch's activations at a layer
    # boundary, where calibrant's peak RSS is (and a 7 B down-projection's XᵀX is 0.5 GB).
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


def _factor_key(damp: float, perm: torch.Tensor | None, dtype: torch.dtype) -> str:
    return f"inv_chol:{damp}:{'perm' if perm is not None else ''}:{dtype}"


def row_scaled_factor(
    stats: LayerStats, damp: float, where: str, perm: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, float]:
    """``((V, inv_d), dead, damp_used)``: the factor of :func:`damped_inverse_cholesky` with each row divided by
    its diagonal entry (``V = U / diag(U)``, ``inv_d = 1 / diag(U)``), what GPTQ's column loop multiplies by.
    ``V`` is ``U`` scaled in place, so a solver holds one n×n matrix instead of two (0.5 GB at a 7 B
    down-projection); it is cached in place of ``U``, which a later caller would factorise again."""
    key = "row_scaled:" + _factor_key(damp, perm, dtype)
    if key not in stats.cache:
        U, dead, lam = damped_inverse_cholesky(stats, damp, where, perm, dtype)
        stats.cache.pop(_factor_key(damp, perm, dtype), None)
        inv_d = 1.0 / torch.diagonal(U)
        stats.cache[key] = ((U.mul_(inv_d[:, None]), inv_d), dead, lam)
    return stats.cache[key]


def _inverse_factor(
    hessian: torch.Tensor, order: torch.Tensor, undamped: torch.Tensor, damping: float, tokens: int,
    dtype: torch.dtype, out_dtype: torch.dtype,
) -> torch.Tensor | None:
    """U (in ``out_dtype``) for ``order`` (reversal composed with act-order's) and the absolute ``damping``
    added to the diagonal, factorised in ``dtype``; None if ``dtype`` is not enough."""
    H = _permuted(hessian, order).to(dtype)  # JHJ (of the permuted H)
    H /= tokens
    torch.add(undamped, damping, out=torch.diagonal(H))
    info = torch.empty((), dtype=torch.int32, device=H.device)
    # LAPACK works on column-major storage: handed H (row-major) it factorises a column-major copy, a third
    # n×n matrix; handed the transposed view (column-major, the same numbers since H is symmetric) it works in
    # place, with bitwise the same factor, held in that view
    L = H.mT
    torch.linalg.cholesky_ex(L, out=(L, info))  # L's upper triangle is zeroed
    if info != 0:
        return None
    inv = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    torch.linalg.solve_triangular(L, inv, upper=False, out=inv)  # L⁻¹
    del H, L
    if not all_finite(inv):
        return None
    return flip_both_(inv.to(out_dtype))


def _permuted(hessian: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``hessian[order][:, order]`` as one new matrix: the reversal as a flip, any other order gathered by
    rows into the copy and then by columns in place, a slice of rows at a time (no second n×n matrix)."""
    n = hessian.shape[0]
    if torch.equal(order, torch.arange(n - 1, -1, -1, device=order.device)):
        return flip_both_(hessian.clone())
    H = hessian.index_select(0, order)
    step = max(1, (1 << 22) // max(n, 1))
    for r in range(0, n, step):
        H[r:r + step] = H[r:r + step].index_select(1, order)
    return H


def flip_both_(M: torch.Tensor) -> torch.Tensor:
    """``M.flip(0, 1)`` in place for a contiguous matrix (the reversal of its flat storage), swapping slices of a
    few MB from either end, so no second matrix is allocated; returns ``M``."""
    flat = M.view(-1)
    n = flat.numel()
    half = n // 2
    step = 1 << 20
    for a in range(0, half, step):
        b = min(a + step, half)
        front = flat[a:b].clone()
        flat[a:b] = flat[n - b:n - a].flip(0)
        flat[n - b:n - a] = front.flip(0)
    return M


def undamped_loss(loss: torch.Tensor, W: torch.Tensor, Q: torch.Tensor, stats: LayerStats, damp_used: float,
                  dead: torch.Tensor) -> None:
    """Take ``λ‖w − ŵ‖²`` off each row's OBS loss (in place): the column loop's loss is for ``H + λI``, the
    caller wants the error on ``H`` alone (``λ`` as :func:`damped_inverse_cholesky` added it)."""
    diag = torch.diagonal(stats.hessian).to(torch.float64) / stats.tokens
    lam = damp_used * float(torch.where(dead, 1.0, diag).mean())
    step = max(1, (1 << 22) // max(W.shape[1], 1))  # rows per slice: the difference's copy stays a few MB
    for r in range(0, W.shape[0], step):
        loss[r:r + step] -= lam * (W[r:r + step] - Q[r:r + step]).square().sum(1).to(torch.float64)


def stacked_problem(
    weights: list[torch.Tensor], masks: list[torch.Tensor | None], stats: LayerStats, damp: float, where: str,
    act_order: bool, dtype: torch.dtype, row_scaled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, Any, torch.Tensor | None, torch.Tensor, float]:
    """What a column-wise OBS solver (GPTQ, SpQR) starts from for linears that read one input:
    ``(W, mask, U, perm, dead, damp_used)`` — the weights stacked in ``dtype`` with dead columns zeroed (one
    weight without dead columns is not copied: the solvers only read ``W``),
    their pruning masks stacked (None if none), and the damped inverse factor in act-order when asked
    (``row_scaled``: as ``(V, inv_d)``, :func:`row_scaled_factor`)."""
    perm = torch.argsort(torch.diagonal(stats.hessian), descending=True) if act_order else None
    factor = row_scaled_factor if row_scaled else damped_inverse_cholesky
    U, dead, damp_used = factor(stats, damp, where, perm, dtype)
    if len(weights) == 1 and not bool(dead.any()):  # read only by the solvers: the caller's copy serves
        W = weights[0].to(dtype)
    else:
        W = torch.cat(weights, 0).to(dtype)
        W[:, dead] = 0.0
    mask = None
    if any(m is not None for m in masks):
        mask = torch.cat([m if m is not None else torch.zeros_like(w, dtype=torch.bool)
                          for w, m in zip(weights, masks, strict=True)], 0)
    return W, mask, U, perm, dead, damp_used
