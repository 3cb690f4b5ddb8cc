"""SpQR (Dettmers et al., 2023): GPTQ-style sequential rounding on small groups whose statistics are
themselves quantized, plus a sparse set of outlier weights kept in 16 bit.

Per linear, with ``U`` the upper Cholesky factor of the damped inverse Hessian (``UᵀU = H⁻¹``) and the
columns in act-order (descending ``H_jj``, the paper's default):

1. **small groups** of ``group`` consecutive processed columns (default 16) get an asymmetric min-max
   grid per output row, fitted on the group's *current* (error-updated) weights when the loop reaches
   it — as GPTQ's dynamic groups;
2. **quantized statistics**: each group's per-row scales and zero points are quantized again, min-max
   with ``stat_bits`` bits (default 3) over chunks of ``stat_group`` consecutive rows (default 16), and
   the weights are rounded on the *dequantized* statistics (what a SpQR kernel reconstructs);
3. **outliers**: the OBS error of rounding a weight is ``((w − q) / U_jj)²``, the increase of the layer's
   output error. A weight whose error exceeds ``τ · σ̄²`` stays unquantized and passes no error on (the
   dense weight keeps the model's dtype; the side file stores it in fp16 and the bit count charges 16
   bits, as the paper, whose models are fp16). ``σ̄² = mean_j Var_rows(W_:,j) / U_jj²`` is the layer's error scale — the OBS error of replacing
   every column by its mean — so ``τ`` is relative and the same τ means the same thing in every layer
   (default 0.2, the paper's). ``τ = inf`` keeps no outliers: SpQR is then GPTQ with quantized
   statistics. Before a group's grid is fitted, weights that would be outliers *because they stretch
   the group's range* are found by a leave-one-out test (each weight rounded on the range of the other
   weights of its row in the group) and left out of the fit, so one outlier does not coarsen the grid
   of the other fifteen.

Effective bits, as the paper counts them: ``bits + 2·stat_bits / group`` (the quantized scale and zero
of every group) ``+ 64 / (group · stat_group)`` (a 16-bit scale and zero for each of the two second-level
quantizers) ``+ 32 · outlier fraction`` (a 16-bit value and a 16-bit index per outlier). The act-order
permutation (one index per input column) is not counted, as in the paper.

No inference runtime reads SpQR's packed format: calibrant saves SpQR results dense (``--format hf``,
loads anywhere) and writes the outliers and quantized statistics beside them
(:mod:`calibrant.export.hf`, ``calibrant-extras/``); compressed-tensors export is refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from calibrant.errors import RecipeError
from calibrant.methods.base import LayerContext, LayerStats, Method, single_threaded
from calibrant.methods.hessian import SOLVER_PARAM_HELP, solve_dtype, stacked_problem, undamped_loss
from calibrant.methods.quant import QuantScheme, QuantState, parse_scheme, qparams

NOT_PACKABLE = ("SpQR keeps unstructured 16-bit outliers and quantized group statistics, which no runtime format "
                "stores")


def minmax_quantize(x: torch.Tensor, bits: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
    """Second-level quantization of a statistic ``x`` [rows]: min-max over chunks of ``chunk`` consecutive
    rows, ``bits`` bits, no widening to 0 (a scale stays positive). Returns ``(x̂, codes, step, low)``
    with ``x̂ = low + codes · step`` per chunk."""
    rows = x.shape[0]
    pad = -rows % chunk
    xp = torch.cat([x, x[-1:].expand(pad)]) if pad else x  # pad with a copy: it changes no chunk's range
    xc = xp.reshape(-1, chunk)
    low, high = xc.min(1).values, xc.max(1).values
    step = (high - low) / (2**bits - 1)
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant chunk: code 0 is exact
    codes = torch.clamp(torch.round((xc - low[:, None]) / step[:, None]), 0, 2**bits - 1)
    xq = (low[:, None] + codes * step[:, None]).reshape(-1)[:rows]
    return xq, codes.reshape(-1)[:rows].to(torch.uint8), step, low


def leave_one_out_error(G: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, g]``: each weight's OBS error ``((w − q) / d)²`` when rounded on the asymmetric min-max grid
    of the *other* weights of its row (range widened to 0, as :func:`qparams`)."""
    maxq = 2**bits - 1
    if G.shape[1] < 2:
        return torch.zeros_like(G)
    low2, ilow = G.topk(2, dim=1, largest=False)
    high2, ihigh = G.topk(2, dim=1, largest=True)
    cols = torch.arange(G.shape[1], device=G.device)
    lo = torch.where(cols == ilow[:, :1], low2[:, 1:], low2[:, :1]).clamp(max=0.0)  # min without this weight
    hi = torch.where(cols == ihigh[:, :1], high2[:, 1:], high2[:, :1]).clamp(min=0.0)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale)
    q = (torch.clamp(torch.round(G / scale) + zero, 0, maxq) - zero) * scale
    return ((G - q) / d).square()


def spqr_quantize(
    W: torch.Tensor,
    U: torch.Tensor,
    bits: int,
    group: int,
    stat_bits: int,
    stat_group: int,
    threshold: float,
    *,
    perm: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    blocksize: int = 128,
    loss: torch.Tensor | None = None,
    parts: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize ``W`` [out, in] given ``U`` (``UᵀU = H⁻¹``, already permuted if ``perm``); ``threshold`` is τ.

    ``parts``: the row counts of the matrices stacked in ``W`` (q/k/v read one input and share ``U``); τ is
    relative to each matrix's own error scale, so stacking them changes nothing but the speed.

    Returns, in the original column order: ``weight`` (Ŵ, outliers at their 16-bit values), ``outliers``
    (bool [out, in]), ``scale``/``zero`` (the dequantized statistics [out, G]), ``g_idx`` [in], and the
    stored form of the statistics: ``scale_codes``/``zero_codes`` (uint8 [out, G]) with their second-level
    ``scale_step``/``scale_low``/``zero_step``/``zero_low`` ([⌈out / stat_group⌉, G]). ``loss`` ([out],
    float64), when given, receives each row's OBS error ``Σ_j ((w_j − ŵ_j) / U_jj)²``.
    """
    rows, cols = W.shape
    maxq = 2**bits - 1
    order = perm if perm is not None else torch.arange(cols, device=W.device)
    WpT = W.t().contiguous().index_select(0, order)  # row j = processed column j (contiguous, as GPTQ's loop)
    maskT = mask.t().contiguous().index_select(0, order) if mask is not None else None
    d = torch.diagonal(U).clone()
    V = U / d[:, None]  # the update of column k from column j's rounding error w − q is (w − q) · V_jk
    n_groups = -(-cols // group)
    sizes = parts or [rows]
    limit = torch.full((rows,), math.inf, dtype=W.dtype, device=W.device)  # per row: its matrix's τ · σ̄²
    outlying = math.isfinite(threshold)
    if outlying:  # τ relative to each matrix's error scale (module docstring)
        r0 = 0
        for n in sizes:
            limit[r0:r0 + n] = threshold * float((WpT[:, r0:r0 + n].var(dim=1, unbiased=False) / d.square()).mean())
            r0 += n
    QT = torch.empty_like(WpT)
    outT = torch.zeros(cols, rows, dtype=torch.bool, device=W.device)
    ErrT = torch.empty_like(WpT)  # w − ŵ per processed column
    stored: dict[str, list[torch.Tensor]] = {k: [] for k in ("scale", "zero", "scale_codes", "zero_codes",
                                                            "scale_step", "scale_low", "zero_step", "zero_low")}
    blocksize = max(group, blocksize // group * group)  # a group never straddles two lazy blocks
    with single_threaded():
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            for j in range(i1, i2):
                if (j - i1) % group == 0:
                    g2 = min(j + group, i2)
                    scale, zero = _group_grid(WpT[j:g2].t(), d[j:g2], bits, limit if outlying else None)
                    scale, scode, sstep, slow = _per_part(scale, stat_bits, stat_group, sizes)
                    zero, zcode, zstep, zlow = _per_part(zero, stat_bits, stat_group, sizes)
                    for key, value in zip(stored, (scale, zero, scode, zcode, sstep, slow, zstep, zlow), strict=True):
                        stored[key].append(value)
                w = WpT[j]
                q = torch.div(w, scale).add_(zero).round_().clamp_(0, maxq).sub_(zero).mul_(scale)  # z need not be an integer
                if maskT is not None:
                    q.masked_fill_(maskT[j], 0.0)
                if outlying:
                    out = ((w - q) / d[j]).square_() > limit
                    if maskT is not None:
                        out &= ~maskT[j]
                    q = torch.where(out, w, q)
                    outT[j] = out
                QT[j] = q
                err = torch.sub(w, q, out=ErrT[j])
                if j + 1 < i2:
                    WpT[j + 1 : i2].addr_(V[j, j + 1 : i2], err, alpha=-1.0)
            if i2 < cols:
                WpT[i2:].addmm_(V[i1:i2, i2:].t(), ErrT[i1:i2], alpha=-1.0)
    if loss is not None:
        loss.add_((ErrT / d[:, None]).square().sum(0).to(torch.float64))
    inverse = torch.argsort(order)
    g_idx = torch.empty(cols, dtype=torch.long, device=W.device)
    g_idx[order] = torch.arange(cols, device=W.device) // group
    result = {
        "weight": QT.index_select(0, inverse).t().contiguous(),
        "outliers": outT.index_select(0, inverse).t().contiguous(),
        "g_idx": g_idx,
    }
    for key, values in stored.items():
        result[key] = torch.stack(values, 1)
    assert result["scale"].shape[1] == n_groups
    return result


def _per_part(x: torch.Tensor, bits: int, chunk: int, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """:func:`minmax_quantize` on each stacked matrix's rows separately (no chunk spans two matrices)."""
    if len(sizes) == 1:
        return minmax_quantize(x, bits, chunk)
    pieces = [minmax_quantize(part, bits, chunk) for part in x.split(sizes)]
    return tuple(torch.cat(column) for column in zip(*pieces, strict=True))


def _group_grid(G: torch.Tensor, d: torch.Tensor, bits: int,
                limit: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row asymmetric scale and zero of a group ``G`` [rows, g], fitted without the weights the
    leave-one-out test marks as outliers against the rows' ``limit`` (replaced by the mean of the others in
    their row)."""
    if limit is not None:
        likely = leave_one_out_error(G, d, bits) > limit[:, None]
        if bool(likely.any()):
            keep = (~likely).to(G.dtype)
            mean = (G * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1.0)
            G = torch.where(likely, mean, G)
    return qparams(G, bits, symmetric=False)


def spqr_effective_bits(bits: int, group: int, stat_bits: int, stat_group: int, outlier_fraction: float) -> float:
    """Bits per weight as the SpQR paper counts them (module docstring)."""
    return bits + 2 * stat_bits / group + 64 / (group * stat_group) + 32 * outlier_fraction


class SpQR(Method):
    name = "spqr"
    relative_cost = 3.5  # a guess: its column loop takes 2x GPTQ's on one 576x1536 layer (1.9 s vs 1.0 s)
    statistics = ("hessian",)
    param_help = {
        "scheme": "SpQR: weight bits, e.g. w3 (default) or w3g16; the grid is asymmetric, groups along the inputs",
        "group": "SpQR: group size (default 16, or the scheme's)",
        "stat_bits": "SpQR: bits of the quantized group scales and zero points (default 3)",
        "stat_group": "SpQR: rows per second-level group of the statistics (default 16)",
        "outlier_threshold": "SpQR: τ, relative OBS error above which a weight stays 16-bit (default 0.2; inf: none)",
        "act_order": "quantize columns by descending Hessian diagonal (SpQR default on)",
        **SOLVER_PARAM_HELP,
    }

    def __init__(
        self,
        scheme: str = "w3",
        group: int | None = None,
        stat_bits: int = 3,
        stat_group: int = 16,
        outlier_threshold: float = 0.2,
        act_order: bool = True,
        blocksize: int = 128,
        damp: float = 0.01,
        precision: str = "float32",
    ):
        parsed = parse_scheme(scheme)
        if parsed.act_bits or parsed.lorc_rank or parsed.clip != "none" or parsed.granularity == "tensor":
            raise RecipeError(f"SpQR quantizes weights on small asymmetric groups; scheme {parsed.name} is not one "
                              "— use e.g. w3 or w3g16 (weight-only, no -tensor/-mse/+lorc)")
        scheme_group = parsed.group_size if parsed.granularity == "group" else None
        if group is not None and scheme_group is not None and group != scheme_group:
            raise RecipeError(f"scheme {parsed.name} says group {scheme_group} but group is {group}; give one of them")
        group = group if group is not None else scheme_group or 16
        if group < 1 or stat_group < 1:
            raise RecipeError(f"SpQR's group sizes must be ≥ 1 (got group {group}, stat_group {stat_group}); "
                              "the paper uses 16 and 16")
        if not 2 <= stat_bits <= 8:
            raise RecipeError(f"SpQR's stat_bits must be in 2–8, got {stat_bits}; the paper uses 3")
        if not outlier_threshold > 0:  # also refuses NaN
            raise RecipeError(f"SpQR's outlier_threshold τ must be positive, got {outlier_threshold}; the paper uses "
                              "0.2, and inf keeps no outliers")
        if blocksize < 1 or not 0 <= damp < 1:
            raise RecipeError(f"SpQR needs blocksize ≥ 1 and damp in [0, 1), got {blocksize} and {damp}")
        self._dtype = solve_dtype(precision)
        self._scheme = QuantScheme(bits=parsed.bits, group_size=group, granularity="group", symmetric=False)
        self.scheme = self._scheme.name
        self.group = int(group)
        self.stat_bits = int(stat_bits)
        self.stat_group = int(stat_group)
        self.outlier_threshold = float(outlier_threshold)
        self.act_order = bool(act_order)
        self.blocksize = int(blocksize)
        self.damp = float(damp)
        self.precision = precision

    def quant_plan(self) -> QuantState:
        return QuantState(self._scheme, act_order=self.act_order, unpackable=NOT_PACKABLE)

    def effective_bits(self, outlier_fraction: float) -> float:
        return spqr_effective_bits(self._scheme.bits, self.group, self.stat_bits, self.stat_group, outlier_fraction)

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        return self.compress_group([weight], stats, [ctx])[0]

    def compress_group(
        self, weights: list[torch.Tensor], stats: LayerStats | None, ctxs: list[LayerContext]
    ) -> list[torch.Tensor]:
        assert stats is not None
        W, mask, U, perm, dead, damp_used = stacked_problem(weights, [c.mask for c in ctxs], stats, self.damp,
                                                            ctxs[0].name, self.act_order, self._dtype)
        loss = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
        full = spqr_quantize(
            W, U.to(W.device), self._scheme.bits, self.group, self.stat_bits, self.stat_group,
            self.outlier_threshold, perm=None if perm is None else perm.to(W.device), mask=mask,
            blocksize=self.blocksize, loss=loss, parts=[w.shape[0] for w in weights],
        )
        undamped_loss(loss, W, full["weight"], stats, damp_used, dead)
        bounds = torch.tensor([0] + [w.shape[0] for w in weights]).cumsum(0).tolist()
        outs, c0 = [], 0
        for r0, r1, w, ctx in zip(bounds[:-1], bounds[1:], weights, ctxs, strict=True):
            res = {k: v if k == "g_idx" else v[r0:r1] for k, v in full.items() if not k.endswith(("_step", "_low"))}
            chunks = slice(c0, c0 + -(-w.shape[0] // self.stat_group))
            c0 = chunks.stop
            res |= {k: v[chunks] for k, v in full.items() if k.endswith(("_step", "_low"))}
            q = res["weight"].to(w.dtype)
            outliers = res.pop("outliers")
            n_out = int(outliers.sum())
            fraction = n_out / outliers.numel()
            rows_, cols_ = outliers.nonzero(as_tuple=True)
            tensors: dict[str, Any] = {
                "outlier_rows": rows_.to(torch.int32), "outlier_cols": cols_.to(torch.int32),
                "outlier_values": q[rows_, cols_].to(torch.float16),
                **{k: v for k, v in res.items() if k not in ("weight", "scale", "zero")},
            }
            if perm is not None:
                tensors["perm"] = perm.to(torch.int32)
            ctx.quant = QuantState(self._scheme, res["scale"].to(w.dtype), res["zero"].to(w.dtype), res["g_idx"],
                                   act_order=self.act_order, unpackable=NOT_PACKABLE,
                                   extras={"tensors": tensors, "effective_bits": self.effective_bits(fraction)})
            ctx.info.update(outliers=n_out, outlier_fraction=fraction, stat_bits=self.stat_bits,
                            effective_bits=self.effective_bits(fraction))
            if damp_used != self.damp:
                ctx.info["damp_used"] = damp_used
            ctx.sq_error = float(loss[r0:r1].sum()) * stats.tokens
            outs.append(q)
        return outs
