"""GPTQ (Frantar et al., 2023): quantize columns left to right, spreading each column's rounding error
over the columns not yet quantized through the Cholesky factor of the damped inverse Hessian.

Options: lazy block updates (``blocksize``), act-order (columns by descending Hessian diagonal),
static groups (group parameters fixed from the original weight before any update, so that act-order
keeps contiguous groups), and a pruning mask from an earlier method that stays exactly zero.
Linears that read the same input (q/k/v, gate/up) are solved as one stacked matrix: GPTQ is row-wise
independent given the shared Hessian, so this is exact and saves a loop per extra linear.

Float grids (``fp8``, ``nvfp4``: :mod:`calibrant.methods.quant.floatgrid`) run the same column loop:
each column is divided by its scale and rounded onto the E4M3 / E2M1 grid instead of the integers, and
its error is fed back exactly as for an integer grid. nvfp4's global scale is fixed from the whole
stacked weight before the loop (shared by the fused linears); its block scales are chosen per group of
16 columns like integer group scales (on the fly, or from the original weight with static groups).

GGUF grids (``gguf-q4_0`` …: :mod:`calibrant.methods.quant.ggufgrid`): each block of 32 columns takes
llama.cpp's parameters from its current (error-updated) weights when it starts, each column is rounded
as llama.cpp rounds, and the error fed back is against the value a GGUF reader dequantizes (the float16
scale and minimum), so the result lies exactly on the grid the exported file stores.
"""

from __future__ import annotations

import torch

from calibrant.errors import RecipeError
from calibrant.methods.base import LayerContext, LayerStats, Method, single_threaded
from calibrant.methods.hessian import SOLVER_PARAM_HELP, solve_dtype, stacked_problem, undamped_loss
from calibrant.methods.quant import (
    QuantScheme,
    QuantState,
    lorc,
    nvfp4_global_scale,
    parse_scheme,
    qparams,
    qrange,
    round_e4m3,
    weight_qparams,
)
from calibrant.methods.quant.floatgrid import (
    fp8_channel_scale,
    nvfp4_block_scales,
    nvfp4_effective,
    round_float_,
)
from calibrant.methods.quant.ggufgrid import BlockGrid, block_codes, block_grid, block_values
from calibrant.methods.rtn import SCHEME_HELP, check_block_width, check_gguf_mask, gguf_fallback, input_amax

SUBBLOCK = 32  # columns per rank-1 update slice inside a lazy block (see _gptq_loop)


def gptq_quantize(
    W: torch.Tensor,
    U: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    scheme: QuantScheme,
    *,
    blocksize: int = 128,
    perm: torch.Tensor | None = None,
    static_groups: bool = False,
    mask: torch.Tensor | None = None,
    loss: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``W`` [out, in] given ``U`` (``UᵀU = H⁻¹``, already permuted if ``perm``), or ``U`` with its
    rows divided by its diagonal, as ``(V, 1 / diag(U))`` (:func:`~calibrant.methods.hessian.row_scaled_factor`).

    Returns ``(Ŵ, scales [out, G], zeros [out, G], g_idx [in])`` in the original column order;
    ``g_idx[c]`` is the group whose parameters column ``c`` uses. ``loss`` ([out], float64), when given,
    receives each row's ``Σ_j (w_j − q_j)² / U_jj²`` over the columns as quantized: the sum of the OBS
    steps' error increases, which is ``(w − ŵ) H (w − ŵ)ᵀ`` for the Hessian that ``U`` factors.
    The solve runs in ``W``'s dtype; ``out_dtype`` (default: the same) is the dtype of ``Ŵ`` and the
    scales, which are rounded to it before the integer codes are scaled, so ``Ŵ`` lies exactly on the
    grid it reports.

    Float grids: ``fp8`` returns its per-row scales; ``nvfp4`` its E4M3 block scales, under
    ``global_scale`` (default: ``W``'s own, ``448 · 6 / max|W|``); its values are formed in float32 as
    ``e2m1 · (block / global)`` and then cast to ``out_dtype``, as a reader of the exported scales forms them.
    """
    rows, cols = W.shape
    fmt = scheme.float_fmt
    if fmt == "nvfp4" and global_scale is None:
        global_scale = nvfp4_global_scale(W.abs().amax() if W.numel() else 0.0)
    if global_scale is not None:
        global_scale = global_scale.to(device=W.device, dtype=torch.float32)
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
    kind = scheme.gguf
    grids: list[BlockGrid | None] | None = None
    if kind is not None:  # llama.cpp's block parameters, kept as computed (the scales alone do not round)
        grids = [block_grid(W[:, c:c + g], kind) for c in range(0, cols, g)] if static_groups else [None] * n_groups
        scale = torch.ones(rows, n_groups, dtype=W.dtype, device=W.device)
        zero = torch.zeros_like(scale)
        on_the_fly = not static_groups
        if on_the_fly:  # a block's parameters need all earlier columns' errors: no block straddles two lazy blocks
            blocksize = max(g, blocksize // g * g) if g <= blocksize else g
    elif not grouped or static_groups:  # parameters fixed from the original weight
        scale, zero = _float_qparams(W, fmt, global_scale, g) if fmt else weight_qparams(W, scheme)
        on_the_fly = False
    else:
        scale = torch.ones(rows, n_groups, dtype=W.dtype, device=W.device)
        zero = torch.zeros_like(scale)
        on_the_fly = True
        blocksize = max(g, blocksize // g * g) if g <= blocksize else g  # a group never straddles two blocks
    # the column loop runs on the transpose: column j of W is the contiguous row j of WpT (transposing
    # first and gathering rows is several times faster than gathering columns of W); without act-order the
    # order is the identity and nothing is gathered (a copy of W less)
    WpT = _in_order(_transposed(W), perm)
    maskT = _in_order(mask.t().contiguous(), perm) if mask is not None else None
    scaleT, zeroT = scale.t().contiguous(), zero.t().contiguous()
    QT = torch.empty_like(WpT)
    groups_p = g_idx[order]
    if isinstance(U, torch.Tensor):
        inv_d = 1.0 / torch.diagonal(U)
        V = U * inv_d[:, None]
    else:
        V, inv_d = U
    with single_threaded():
        _gptq_loop(WpT, V, inv_d, QT, scaleT, zeroT, groups_p.tolist(), maskT, scheme, lo, hi, g, blocksize,
                   on_the_fly, loss, global_scale, grids)
    del maskT
    out_dtype = out_dtype or W.dtype
    restore = None if perm is None else torch.argsort(order)

    def output(rows: torch.Tensor) -> torch.Tensor:
        """``rows`` back in column order, transposed to ``[out, in]``: into ``WpT``'s storage, dead after the
        loop and always the function's own copy (a weight-sized matrix less at the peak)."""
        rows = _in_order(rows, restore)
        if rows.dtype != WpT.dtype:
            return rows.t().contiguous()
        return WpT.view(W.shape).copy_(rows.t())
    if grids is not None:  # QT holds the dequantized values; report the stored float16 scales and minima
        assert all(grid is not None for grid in grids)
        out = output(QT.to(out_dtype))
        d16 = torch.stack([grid.d16 for grid in grids], dim=1)  # type: ignore[union-attr]
        m16 = torch.stack([grid.m16 for grid in grids], dim=1)  # type: ignore[union-attr]
        return out, d16, m16, g_idx
    if fmt == "nvfp4":  # float32 values from the float32 effective scales; report the E4M3 block scales
        eff = scaleT.to(torch.float32)
        QT = _scale_rows_(QT.to(torch.float32), eff, groups_p).to(out_dtype)
        out = output(QT)
        blocks = round_e4m3(eff * global_scale).t().contiguous()
        return out, blocks, torch.zeros_like(blocks), g_idx
    QT, scaleT, zeroT = QT.to(out_dtype), scaleT.to(out_dtype), zeroT.to(out_dtype)  # no copies at W's dtype
    _scale_rows_(QT, scaleT, groups_p)  # integer codes (zero point taken off) → values
    out = output(QT)
    return out, scaleT.t().contiguous(), zeroT.t().contiguous(), g_idx


def _scale_rows_(QT: torch.Tensor, scaleT: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``QT[j] *= scaleT[groups[j]]`` in place, a slice of rows at a time (the gathered scales of all rows
    would be a weight-sized matrix); returns ``QT``."""
    step = max(1, (1 << 22) // max(QT.shape[1], 1))
    for r in range(0, QT.shape[0], step):
        QT[r:r + step].mul_(scaleT.index_select(0, groups[r:r + step]))
    return QT


def _transposed(W: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``Wᵀ``, always a copy (``W.t().contiguous()`` is ``W`` itself for one row)."""
    out = torch.empty(W.shape[1], W.shape[0], dtype=W.dtype, device=W.device)
    return out.copy_(W.t())


def _in_order(rows: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """``rows`` gathered in ``order``; None is the identity (``rows`` itself, no copy)."""
    return rows if order is None else rows.index_select(0, order)


def _float_qparams(W: torch.Tensor, fmt: str, global_scale: torch.Tensor | None,
                   g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float grid's scales ``[rows, n_groups]`` (nvfp4: the effective ``block / global``) from ``W``, computed
    in float32 and returned in ``W``'s dtype, with zero points 0."""
    Wf = W.to(torch.float32)
    if fmt == "fp8":
        scale = fp8_channel_scale(Wf)[:, None]
    else:
        assert global_scale is not None
        amax = torch.stack([Wf[:, c:c + g].abs().amax(dim=1) for c in range(0, W.shape[1], g)], dim=1)
        scale = nvfp4_effective(nvfp4_block_scales(amax, global_scale), global_scale)
    scale = scale.to(W.dtype)
    return scale, torch.zeros_like(scale)


def _gptq_loop(
    WpT: torch.Tensor,
    V: torch.Tensor,
    inv_d: torch.Tensor,
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
    loss: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
    grids: list[BlockGrid | None] | None = None,
) -> None:
    """The column loop of :func:`gptq_quantize` on the transposed, permuted weight ``WpT`` [in, out]
    (updated in place); fills ``QT`` with each column's integer codes minus its zero point (the caller
    scales them) and, for on-the-fly groups, the rows of ``scaleT``/``zeroT`` [G, out].

    Row j of ``WpT`` is column j of the weight, so every per-column step reads and writes contiguous
    memory. Updates are lazy at two levels: the error of column j goes to the next columns of its
    ``SUBBLOCK``-column slice with one rank-1 ``addr_``, a finished slice updates the rest of its block
    with one GEMM, and a finished block the columns after it (GPTQ's lazy batch). This is the same sum
    as column-by-column updates, with 4x less memory traffic in the rank-1 step than slices of 128.

    Five ops per column: the code ``t = clamp(round(w / s), lo − z, hi − z)`` (three, into ``QT``), the
    rounding error ``w − t·s`` (one ``addcmul``) and its update. GPTQ's error is that difference over
    ``U_jj``; the division is folded into the rows of ``V = U / diag(U)`` (``inv_d = 1 / diag(U)``), which carry
    every update.
    Float grids round ``w / s`` onto their grid (:func:`round_float_`) in place of round-and-clamp. GGUF grids
    (``grids``: one :class:`BlockGrid` per block, filled on the fly when None) write the dequantized value of
    each column into ``QT`` and feed back ``w`` minus it."""
    cols = WpT.shape[0]
    fmt = scheme.float_fmt
    zero_point = not scheme.symmetric
    # per-column views made once (indexing a tensor in the loop costs as much as the arithmetic)
    wrows, qrows, vrows = WpT.unbind(0), QT.unbind(0), V.unbind(0)
    srows = scaleT.unbind(0)  # on-the-fly groups write into scaleT (and the bounds below): the views see it
    mrows = maskT.unbind(0) if maskT is not None else None
    if zero_point:  # per-row code bounds lo − z, hi − z: the zero point never needs adding or taking off
        lowT, highT = lo - zeroT, hi - zeroT
        lrows, hrows = lowT.unbind(0), highT.unbind(0)
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
                if grids is not None:
                    kind = scheme.gguf
                    assert kind is not None
                    if grids[grp] is None:  # the block's parameters from its current (error-updated) weights
                        grids[grp] = block_grid(WpT[j : j + g].t(), kind)
                    grid = grids[grp]
                    assert grid is not None
                    codes = block_codes(wrows[j], grid, kind)
                    if mrows is not None:
                        codes.masked_fill_(mrows[j], 0.0)  # symmetric GGUF grids: code 0 is the value 0
                    value = block_values(codes, grid, kind)
                    qrows[j].copy_(value)
                    err = torch.sub(wrows[j], qrows[j], out=erows[j - i1])
                    if j + 1 < s2:
                        WpT[j + 1 : s2].addr_(vrows[j][j + 1 : s2], err, alpha=-1.0)
                    continue
                if on_the_fly and j % g == 0 and fmt:  # nvfp4: the block's E4M3 scale from its current weights
                    assert global_scale is not None
                    amax = WpT[j : j + g].abs().amax(0).to(torch.float32)
                    scaleT[grp] = nvfp4_effective(nvfp4_block_scales(amax, global_scale), global_scale)
                elif on_the_fly and j % g == 0:  # group's parameters from its current (error-updated) weights
                    sc, z = qparams(WpT[j : j + g].t(), scheme.bits, scheme.symmetric, scheme.clip)
                    scaleT[grp], zeroT[grp] = sc, z
                    if zero_point:
                        torch.sub(lo, z, out=lowT[grp])
                        torch.sub(hi, z, out=highT[grp])
                w, scale = wrows[j], srows[grp]
                t = torch.div(w, scale, out=qrows[j])
                if fmt:
                    round_float_(t, fmt)
                elif zero_point:
                    t.round_().clamp_(lrows[grp], hrows[grp])
                else:
                    t.round_().clamp_(lo, hi)
                if mrows is not None:
                    t.masked_fill_(mrows[j], 0.0)
                err = torch.addcmul(w, t, scale, value=-1.0, out=erows[j - i1])
                if j + 1 < s2:
                    WpT[j + 1 : s2].addr_(vrows[j][j + 1 : s2], err, alpha=-1.0)
            if s2 < i2:
                WpT[s2:i2].addmm_(V[s1:s2, s2:i2].t(), Err[s1 - i1 : s2 - i1], alpha=-1.0)
        if loss is not None:  # the OBS steps' error increases: ((w − q) / U_jj)²
            loss.add_(Err1.mul(inv_d[i1:i2, None]).square_().sum(0))
        if i2 < cols:
            WpT[i2:].addmm_(V[i1:i2, i2:].t(), Err1, alpha=-1.0)


class GPTQ(Method):
    name = "gptq"
    relative_cost = 1.9  # bench/gptq_vs_llmcompressor.py
    param_help = {
        "scheme": SCHEME_HELP,
        "act_order": "quantize columns by descending Hessian diagonal",
        "static_groups": "fix group scales from the original weight before any update",
        **SOLVER_PARAM_HELP,
    }

    def __init__(
        self,
        scheme: str = "w4g128",
        blocksize: int = 128,
        damp: float = 0.01,
        act_order: bool = False,
        static_groups: bool = False,
        precision: str = "float32",
    ):
        parsed = parse_scheme(scheme)
        self._dtype = solve_dtype(precision)
        if blocksize < 1 or not 0 <= damp < 1:
            raise RecipeError(f"GPTQ needs blocksize ≥ 1 and damp in [0, 1), got {blocksize} and {damp}")
        if static_groups and parsed.granularity != "group":
            raise RecipeError(f"static groups need a group-wise scheme such as w4g128, not '{parsed.name}'")
        if parsed.gguf is not None and act_order and not static_groups:
            raise RecipeError(f"{parsed.name} stores blocks of 32 consecutive inputs; act-order with dynamic groups "
                              "would group other columns — add --static-groups or drop --act-order")
        self.scheme = parsed.name
        self.blocksize = int(blocksize)
        self.damp = float(damp)
        self.act_order = bool(act_order)
        self.static_groups = bool(static_groups)
        self.precision = precision
        self._scheme = parsed

    @property
    def statistics(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("hessian", "max_abs") if self._scheme.act_static else ("hessian",)

    def validate(self, name: str, shape: tuple[int, int]) -> None:
        check_block_width(self._scheme, name, shape)

    def fallback(self, name: str, shape: tuple[int, int]) -> str | None:
        return gguf_fallback(self._scheme, shape)

    def quant_plan(self) -> QuantState:
        """Act-order with dynamic groups leaves a non-contiguous g_idx (static groups keep them contiguous)."""
        dynamic = self.act_order and not self.static_groups and self._scheme.granularity == "group"
        return QuantState(self._scheme, act_order=dynamic)

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        return self.compress_group([weight], stats, [ctx])[0]

    def compress_group(
        self, weights: list[torch.Tensor], stats: LayerStats | None, ctxs: list[LayerContext]
    ) -> list[torch.Tensor]:
        assert stats is not None
        scheme = self._scheme
        check_gguf_mask(scheme, ctxs)
        if scheme.lorc_rank and any(c.mask is not None for c in ctxs):
            raise RecipeError("LoRC cannot follow pruning: the rank-r correction would fill the pruned weights")
        if scheme.granularity == "tensor" and len(weights) > 1:  # one scale per layer: solve them one by one
            return [self.compress_group([w], stats, [c])[0] for w, c in zip(weights, ctxs, strict=True)]
        W, mask, (V, inv_d), perm, dead, damp_used = stacked_problem(
            weights, [c.mask for c in ctxs], stats, self.damp, ctxs[0].name, self.act_order, self._dtype,
            row_scaled=True)
        loss = None if scheme.lorc_rank else torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
        global_scale = None
        if scheme.fmt == "nvfp4":  # one global scale for the linears vLLM fuses (they read one input)
            global_scale = nvfp4_global_scale(torch.stack([w.abs().amax() for w in weights]).amax())
        amax = input_amax(scheme, stats)
        Q, scale, zero, g_idx = gptq_quantize(
            W, (V.to(W.device), inv_d.to(W.device)), scheme, blocksize=self.blocksize,
            perm=None if perm is None else perm.to(W.device),
            static_groups=self.static_groups, mask=mask, loss=loss, out_dtype=weights[0].dtype,
            global_scale=global_scale,
        )
        if loss is not None:
            undamped_loss(loss, W, Q, stats, damp_used, dead)
        outs, r0 = [], 0
        for w, ctx in zip(weights, ctxs, strict=True):
            r1 = r0 + w.shape[0]
            q = Q[r0:r1]
            if scheme.lorc_rank:
                q = q + lorc(w - q, scheme.lorc_rank)
            ctx.quant = QuantState(scheme, scale[r0:r1], zero[r0:r1], g_idx, act_order=self.quant_plan().act_order,
                                   global_scale=None if global_scale is None else global_scale.cpu(),
                                   input_amax=amax)
            if damp_used != self.damp:
                ctx.info["damp_used"] = damp_used
            if loss is not None:
                ctx.sq_error = float(loss[r0:r1].sum()) * stats.tokens
            outs.append(q)
            r0 = r1
        return outs
