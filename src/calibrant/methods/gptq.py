"""GPTQ (Frantar et al., 2023): quantize columns left to right, spreading each column's rounding error
over the columns not yet quantized through the Cholesky factor of the damped inverse Hessian.

Options: lazy block updates (``blocksize``), act-order (columns by descending Hessian diagonal),
static groups (group parameters fixed from the original weight before any update, so that act-order
keeps contiguous groups), and a pruning mask from an earlier method that stays exactly zero.
Linears that read the same input (q/k/v, gate/up) are solved as one stacked matrix: GPTQ is row-wise
independent given the shared Hessian, so this is exact and saves a loop per extra linear.
"""

from __future__ import annotations

import torch

from calibrant.errors import RecipeError
from calibrant.methods.base import LayerContext, LayerStats, Method, single_threaded
from calibrant.methods.hessian import damped_inverse_cholesky
from calibrant.methods.quant import (
    QuantScheme,
    fake_quant,
    lorc,
    parse_scheme,
    qparams,
    qrange,
    weight_qparams,
)

SUBBLOCK = 32  # columns per rank-1 update slice inside a lazy block (see _gptq_loop)


def gptq_quantize(
    W: torch.Tensor,
    U: torch.Tensor,
    scheme: QuantScheme,
    *,
    blocksize: int = 128,
    perm: torch.Tensor | None = None,
    static_groups: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``W`` [out, in] given ``U`` (``UᵀU = H⁻¹``, already permuted if ``perm``).

    Returns ``(Ŵ, scales [out, G], zeros [out, G], g_idx [in])`` in the original column order;
    ``g_idx[c]`` is the group whose parameters column ``c`` uses.
    """
    rows, cols = W.shape
    lo, hi = qrange(scheme.bits, scheme.symmetric)
    grouped = scheme.granularity == "group"
    g = scheme.group_size or cols
    order = perm if perm is not None else torch.arange(cols, device=W.device)
    if grouped and (static_groups or perm is None):
        g_idx = torch.arange(cols, device=W.device) // g  # contiguous groups in the original order
    elif grouped:
        g_idx = torch.empty(cols, dtype=torch.long, device=W.device)
        g_idx[order] = torch.arange(cols, device=W.device) // g  # groups of consecutive *processed* columns
    else:
        g_idx = torch.zeros(cols, dtype=torch.long, device=W.device)
    n_groups = int(g_idx.max()) + 1
    if not grouped or static_groups:  # parameters fixed from the original weight
        scale, zero = weight_qparams(W, scheme)
        on_the_fly = False
    else:
        scale = torch.ones(rows, n_groups, dtype=W.dtype, device=W.device)
        zero = torch.zeros_like(scale)
        on_the_fly = True
        blocksize = max(g, blocksize // g * g) if g <= blocksize else g  # a group never straddles two blocks
    # the column loop runs on the transpose: column j of W is the contiguous row j of WpT (transposing
    # first and gathering rows is several times faster than gathering columns of W)
    WpT = W.t().contiguous().index_select(0, order)
    maskT = mask.t().contiguous().index_select(0, order) if mask is not None else None
    scaleT, zeroT = scale.t().contiguous(), zero.t().contiguous()
    QT = torch.empty_like(WpT)
    groups_p = g_idx[order].tolist()
    with single_threaded():
        _gptq_loop(WpT, U, QT, scaleT, zeroT, groups_p, maskT, scheme, lo, hi, g, blocksize, on_the_fly)
    out = QT.index_select(0, torch.argsort(order)).t().contiguous()
    return out, scaleT.t().contiguous(), zeroT.t().contiguous(), g_idx


def _gptq_loop(
    WpT: torch.Tensor,
    U: torch.Tensor,
    QT: torch.Tensor,
    scaleT: torch.Tensor,
    zeroT: torch.Tensor,
    groups_p: list[int],
    maskT: torch.Tensor | None,
    scheme: QuantScheme,
    lo: int,
    hi: int,
    g: int,
    blocksize: int,
    on_the_fly: bool,
) -> None:
    """The column loop of :func:`gptq_quantize` on the transposed, permuted weight ``WpT`` [in, out]
    (updated in place); fills ``QT`` and, for on-the-fly groups, the rows of ``scaleT``/``zeroT`` [G, out].

    Row j of ``WpT`` is column j of the weight, so every per-column step reads and writes contiguous
    memory. Updates are lazy at two levels: the error of column j goes to the next columns of its
    ``SUBBLOCK``-column slice with one rank-1 ``addr_``, a finished slice updates the rest of its block
    with one GEMM, and a finished block the columns after it (GPTQ's lazy batch). This is the same sum
    as column-by-column updates, with 4x less memory traffic in the rank-1 step than slices of 128."""
    cols = WpT.shape[0]
    inv_d = (1.0 / torch.diagonal(U)).tolist()
    zero_point = not scheme.symmetric  # symmetric grids have zero points of 0: skip adding/subtracting them
    # per-column views made once (indexing a tensor in the loop costs as much as the arithmetic)
    wrows, qrows, urows = WpT.unbind(0), QT.unbind(0), U.unbind(0)
    srows, zrows = scaleT.unbind(0), zeroT.unbind(0)  # on-the-fly groups write into scaleT/zeroT: views see it
    mrows = maskT.unbind(0) if maskT is not None else None
    Err = torch.empty(min(blocksize, cols), WpT.shape[1], dtype=WpT.dtype, device=WpT.device)
    erows = Err.unbind(0)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        n1 = i2 - i1
        Err1 = Err[:n1]
        # slice starts: every SUBBLOCK columns and, for on-the-fly groups, every group start (a group's
        # parameters need its columns to have received the errors of every earlier column)
        starts = set(range(0, n1, SUBBLOCK)) | (set(range(0, n1, g)) if on_the_fly else set())
        bounds = [i1 + b for b in sorted(starts)] + [i2]
        for s1, s2 in zip(bounds[:-1], bounds[1:], strict=True):
            for j in range(s1, s2):
                grp = groups_p[j]
                if on_the_fly and j % g == 0:  # group's parameters from its current (error-updated) weights
                    s, z = qparams(WpT[j : j + g].t(), scheme.bits, scheme.symmetric, scheme.clip)
                    scaleT[grp], zeroT[grp] = s, z
                w = wrows[j]
                q = fake_quant(w, srows[grp], zrows[grp] if zero_point else None, lo, hi, out=qrows[j])
                if mrows is not None:
                    q.masked_fill_(mrows[j], 0.0)
                err = torch.sub(w, q, out=erows[j - i1]).mul_(inv_d[j])
                if j + 1 < s2:
                    WpT[j + 1 : s2].addr_(urows[j][j + 1 : s2], err, alpha=-1.0)
            if s2 < i2:
                WpT[s2:i2].addmm_(U[s1:s2, s2:i2].t(), Err[s1 - i1 : s2 - i1], alpha=-1.0)
        if i2 < cols:
            WpT[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)


class GPTQ(Method):
    name = "gptq"
    needs = "hessian"

    def __init__(
        self,
        scheme: str = "w4g128",
        blocksize: int = 128,
        damp: float = 0.01,
        act_order: bool = False,
        static_groups: bool = False,
    ):
        parsed = parse_scheme(scheme)
        if blocksize < 1 or not 0 <= damp < 1:
            raise RecipeError(f"GPTQ needs blocksize ≥ 1 and damp in [0, 1), got {blocksize} and {damp}")
        if static_groups and parsed.granularity != "group":
            raise RecipeError(f"static groups need a group-wise scheme such as w4g128, not '{parsed.name}'")
        self.scheme = parsed.name
        self.blocksize = int(blocksize)
        self.damp = float(damp)
        self.act_order = bool(act_order)
        self.static_groups = bool(static_groups)
        self._scheme = parsed

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        return self.compress_group([weight], stats, [ctx])[0]

    def compress_group(
        self, weights: list[torch.Tensor], stats: LayerStats | None, ctxs: list[LayerContext]
    ) -> list[torch.Tensor]:
        assert stats is not None
        scheme = self._scheme
        if scheme.lorc_rank and any(c.mask is not None for c in ctxs):
            raise RecipeError("LoRC cannot follow pruning: the rank-r correction would fill the pruned weights")
        if scheme.granularity == "tensor" and len(weights) > 1:  # one scale per layer: solve them one by one
            return [self.compress_group([w], stats, [c])[0] for w, c in zip(weights, ctxs, strict=True)]
        perm = torch.argsort(torch.diagonal(stats.hessian), descending=True) if self.act_order else None
        U, dead, damp_used = damped_inverse_cholesky(stats, self.damp, ctxs[0].name, perm)
        W = torch.cat(weights, 0)
        W[:, dead] = 0.0
        masks = [c.mask if c.mask is not None else torch.zeros_like(w, dtype=torch.bool) for w, c in zip(weights, ctxs, strict=True)]
        mask = torch.cat(masks, 0) if any(c.mask is not None for c in ctxs) else None
        Q, scale, zero, g_idx = gptq_quantize(
            W, U.to(W.device), scheme, blocksize=self.blocksize, perm=None if perm is None else perm.to(W.device),
            static_groups=self.static_groups, mask=mask,
        )
        outs, r0 = [], 0
        for w, ctx in zip(weights, ctxs, strict=True):
            r1 = r0 + w.shape[0]
            q = Q[r0:r1]
            if scheme.lorc_rank:
                q = q + lorc(w - q, scheme.lorc_rank)
            ctx.quant = {"scheme": scheme, "scale": scale[r0:r1], "zero": zero[r0:r1], "g_idx": g_idx,
                         "act_order": self.act_order and not self.static_groups and scheme.granularity == "group",
                         "lorc": bool(scheme.lorc_rank)}
            if damp_used != self.damp:
                ctx.info["damp_used"] = damp_used
            outs.append(q)
            r0 = r1
        return outs
