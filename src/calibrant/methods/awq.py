"""AWQ (Lin et al., 2023): activation-aware weight quantization — protect the salient input channels by
scaling them up before round-to-nearest, with the inverse scale folded into the layer before.

Per decoder block, for each fold (:mod:`calibrant.models.folds`: q/k/v after the attention norm, o after
v where the shapes allow, gate/up after the MLP norm, down after up), on a bounded random sample of the
targets' calibration inputs ``X`` (the ``rows`` statistic) and their per-channel mean ``|x|``:

- scale search: ``s = mean|x|^α``, normalised by ``sqrt(max s · min s)``, for α on a grid in [0, 1); the
  α whose quantized, rescaled weights ``Q(W·diag(s))·diag(s)⁻¹`` give the smallest output error
  ``‖X Ŵᵀ − X Wᵀ‖²`` wins (α = 0 is plain RTN, so the search never does worse on the sample); ``s`` is
  folded into the block (the block's function is unchanged before quantization);
- clip search: per output row and group, the shrink ratio of the weight range in [0.5, 1] that minimises
  the group's output error after quantization (skipped for q and k, whose errors the softmax amplifies,
  as the reference does);
- quantization: round-to-nearest on the scheme's grid (default ``w4g128-asym``, AWQ's). Followed by
  another quantizer in the recipe (``awq+gptq``), AWQ leaves the rounding to it. With a GGUF scheme
  (``gguf-q4_0`` …) the scale and clip searches and the rounding all use llama.cpp's grid.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from calibrant.errors import RecipeError
from calibrant.methods.base import BlockMethod, LayerContext, LayerStats
from calibrant.methods.quant import QuantState, fake_quant_weight, parse_scheme, qrange, weight_qparams
from calibrant.methods.quant.ggufgrid import gguf_weight
from calibrant.methods.rtn import check_block_width, check_gguf_mask, gguf_fallback
from calibrant.models.adapter import set_weight, weight_of

SEARCH_ROWS = 512  # sampled calibration rows the searches score on (of the `rows` statistic's sample)
NO_CLIP = ("q_proj", "k_proj", "query_key_value", "c_attn", "qkv_proj")


def output_error(x: torch.Tensor, W: torch.Tensor, Wq: torch.Tensor) -> float:
    """Mean squared error of the outputs ``x Ŵᵀ`` against ``x Wᵀ``."""
    return float((x @ (Wq - W).t()).square().mean())


def awq_scales(x: torch.Tensor, mean_abs: torch.Tensor, W: torch.Tensor, scheme: Any, grid: int = 20
               ) -> tuple[float, torch.Tensor, list[float]]:
    """The best ``(α, s, errors per α)`` for the stacked targets ``W`` [out, in] reading inputs ``x`` [n, in]."""
    base = mean_abs.to(torch.float32).clamp(min=1e-4)
    errors: list[float] = []
    best = (math.inf, 0.0, torch.ones_like(base))
    for i in range(grid):
        alpha = i / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        Wq = fake_quant_weight(W * s, scheme)[0] / s
        err = output_error(x, W, Wq)
        errors.append(err)
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2], errors


def clip_weight(W: torch.Tensor, x: torch.Tensor, scheme: Any, grid: int = 20, min_ratio: float = 0.5) -> torch.Tensor:
    """``W`` with each (row, group) range shrunk by the ratio in [min_ratio, 1] whose quantized output error
    on ``x`` is smallest; per-channel and per-tensor schemes clip per row."""
    rows, cols = W.shape
    g = scheme.group_size if scheme.granularity == "group" else cols
    if cols % g:  # a short last group: search on the full groups, leave the rest unclipped
        full = cols // g * g
        return torch.cat([clip_weight(W[:, :full], x[:, :full], scheme, grid, min_ratio), W[:, full:]], 1) \
            if full else W
    Wg = W.reshape(rows, cols // g, g)
    xg = x.reshape(x.shape[0], cols // g, g)
    wmax, wmin = Wg.amax(-1, keepdim=True), Wg.amin(-1, keepdim=True)
    if scheme.symmetric:
        wmax = torch.maximum(wmax.abs(), wmin.abs())
        wmin = -wmax
    lo, hi = qrange(scheme.bits, scheme.symmetric)
    best_err = torch.full((rows, cols // g), math.inf, dtype=torch.float32, device=W.device)
    best_ratio = torch.ones_like(best_err)
    for i in range(grid):
        ratio = 1.0 - i * (1.0 - min_ratio) / (grid - 1) if grid > 1 else 1.0
        clipped = torch.minimum(torch.maximum(Wg, wmin * ratio), wmax * ratio)
        if scheme.gguf is not None:  # llama.cpp's grid, as the export stores it
            Wq = gguf_weight(clipped.reshape(rows, cols), scheme.gguf)[0].reshape(rows, cols // g, g)
        else:
            Wq = _quantize_groups(clipped, scheme, lo, hi)
        err = torch.einsum("ngk,rgk->ngr", xg, Wq - Wg).square().mean(0).t()  # [rows, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    r = best_ratio.unsqueeze(-1)
    return torch.minimum(torch.maximum(Wg, wmin * r), wmax * r).reshape(rows, cols)


def _quantize_groups(Wg: torch.Tensor, scheme: Any, lo: int, hi: int) -> torch.Tensor:
    """Round-to-nearest of ``[rows, groups, g]`` with one scale (and zero point) per (row, group)."""
    rows, groups, g = Wg.shape
    flat = Wg.reshape(rows * groups, g)
    per_row = parse_scheme(f"w{scheme.bits}-channel{'' if scheme.symmetric else '-asym'}")
    scale, zero = weight_qparams(flat, per_row)
    q = torch.clamp(torch.round(flat / scale) + zero, lo, hi)
    return ((q - zero) * scale).reshape(rows, groups, g)


class AWQ(BlockMethod):
    name = "awq"
    relative_cost = 7.2  # bench/awq_vs_llmcompressor.py (w4g64-asym, 32x512; the scale and clip searches dominate)
    param_help = {
        "scheme": "quantization scheme (default w4g128-asym, as AWQ); rtn/gptq grids",
        "grid": "AWQ: points of the α grid in [0, 1) for the scale search, and of the clip ratio (default 20)",
        "clip": "AWQ: search a weight clipping range per group after scaling (default on)",
    }

    def __init__(self, scheme: str = "w4g128-asym", grid: int = 20, clip: bool = True):
        parsed = parse_scheme(scheme)
        if parsed.act_bits or parsed.lorc_rank:
            raise RecipeError(f"AWQ is a weight-only method; scheme {parsed.name} also quantizes activations or adds "
                              "LoRC — use a weight-only scheme such as w4g128-asym (or smoothquant for W8A8)")
        if grid < 2:
            raise RecipeError(f"AWQ's grid needs at least 2 points, got {grid}; the paper uses 20")
        self.scheme = parsed.name
        self.grid = int(grid)
        self.clip = bool(clip)
        self._scheme = parsed
        self._quantize = True

    def quant_plan(self) -> QuantState:
        return QuantState(self._scheme)

    def validate(self, name: str, shape: tuple[int, int]) -> None:
        check_block_width(self._scheme, name, shape)

    def fallback(self, name: str, shape: tuple[int, int]) -> str | None:
        return gguf_fallback(self._scheme, shape)

    def validate_recipe(self, methods: list[Any]) -> None:
        """Followed by another quantizer (``awq+gptq``), AWQ scales and clips and leaves the rounding to it."""
        later = methods[methods.index(self) + 1:]
        self._quantize = not any(m.quant_plan() is not None for m in later)

    def compress_block(self, block: Any) -> None:
        folds = [f for f in block.folds if all(t in block.linears for t in f.targets)]
        stats: dict[str, LayerStats] = block.observe(("mean_abs", "rows"))  # one pass, the dense block
        inputs = {name: st.get("rows")[:SEARCH_ROWS] for name, st in stats.items()}
        for fold in folds:
            first = next(iter(fold.targets))
            W = torch.cat([weight_of(t).to(torch.float32) for t in fold.targets.values()])
            alpha, s, _ = awq_scales(inputs[first], stats[first].get("mean_abs"), W, self._scheme, self.grid)
            if alpha > 0:
                fold.apply(s)
                for name in fold.targets:  # the targets now read x / s
                    inputs[name] = inputs[name] / s
        if self.clip:
            for name, module in block.linears.items():
                if name.rsplit(".", 1)[-1] in NO_CLIP:
                    continue
                W = weight_of(module).to(torch.float32)
                set_weight(module, clip_weight(W, inputs[name], self._scheme, self.grid))

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        if not self._quantize:
            return weight
        check_gguf_mask(self._scheme, [ctx])
        Wq, scale, zero = fake_quant_weight(weight, self._scheme)
        if ctx.mask is not None:
            Wq = Wq.masked_fill(ctx.mask, 0.0)
        g_idx = None
        if self._scheme.granularity == "group":
            g_idx = torch.arange(weight.shape[1], device=weight.device) // self._scheme.group_size
        ctx.quant = QuantState(self._scheme, scale, zero, g_idx)
        return Wq
