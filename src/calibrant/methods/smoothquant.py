"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8 / W4A8 quantization.

For each norm that feeds linears (q/k/v after the attention norm, gate/up or fc1 after the MLP norm),
per input channel ``j``: ``s_j = max|X_j|^α / max|W_j|^(1−α)`` (``max|W_j|`` over every linear reading
the norm), folded into the block (:mod:`calibrant.models.folds`): the norm's channel ``j`` is divided
by ``s_j`` and the linears' input column ``j`` multiplied by it, so the model computes the same function
in floating point and the activations the quantizer sees have a flatter range. A block-level method:
chain it with the quantizer that follows, ``smoothquant+rtn`` or ``smoothquant+gptq``, with a scheme
that quantizes activations (``w8a8``, ``w4a8g128``).
"""

from __future__ import annotations

from typing import Any

import torch

from calibrant.errors import RecipeError
from calibrant.methods.base import BlockMethod
from calibrant.methods.quant import parse_scheme
from calibrant.models.adapter import weight_of


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|X_j|^α / max|W_j|^(1−α)``, in float64, with both maxima floored at 1e-5 (dead channels)."""
    a = act_max.to(torch.float64).clamp(min=1e-5)
    w = weight_max.to(torch.float64).clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


class SmoothQuant(BlockMethod):
    name = "smoothquant"
    relative_cost = 1.0  # one observing pass per block (the quantizer after it adds its own)
    param_help = {
        "alpha": "SmoothQuant: migration strength α in [0, 1] (default 0.5; 0 moves nothing into the weights)",
        "scheme": "quantization scheme of the quantizer that follows; it must quantize activations (w8a8, w4a8g128)",
    }

    def __init__(self, alpha: float = 0.5, scheme: str = "w8a8"):
        if not 0.0 <= float(alpha) <= 1.0:
            raise RecipeError(f"SmoothQuant's alpha must lie in [0, 1], got {alpha}; the paper uses 0.5 (0.75–0.85 "
                              "for models with stronger outliers)")
        parsed = parse_scheme(scheme)
        if not parsed.act_bits:
            raise RecipeError(f"SmoothQuant only changes results when activations are quantized, and scheme "
                              f"{parsed.name} quantizes weights only; use e.g. w8a8 or w4a8g128")
        self.alpha = float(alpha)
        self.scheme = parsed.name

    def validate_recipe(self, methods: list[Any]) -> None:
        later = methods[methods.index(self) + 1:]
        weight_only = [s.scheme.name for m in later if (s := m.quant_plan()) is not None and not s.scheme.act_bits]
        if weight_only:
            raise RecipeError(f"smoothquant only changes results when activations are quantized, but the quantizer "
                              f"after it uses {weight_only[0]} (weights only); pass a scheme such as w8a8 or w4a8g128")

    def compress_block(self, block: Any) -> None:
        folds = [f for f in block.folds if f.kind == "norm" and all(t in block.linears for t in f.targets)]
        if not folds:
            return
        firsts = [next(iter(f.targets)) for f in folds]
        stats = block.observe(("max_abs",), firsts)  # one pass: every norm's output maximum, dense block
        for fold, first in zip(folds, firsts, strict=True):
            weight_max = torch.cat([weight_of(t).abs() for t in fold.targets.values()]).amax(0)
            fold.apply(smoothing_scales(stats[first].get("max_abs"), weight_max, self.alpha))
