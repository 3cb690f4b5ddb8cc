"""What a quantized linear carries after compression: one typed object that export reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from calibrant.methods.quant.grid import fake_quant_activations
from calibrant.methods.quant.scheme import QuantScheme


@dataclass
class QuantState:
    """A quantized linear's grid. Set by the method on ``LayerContext.quant``; the engine attaches it to
    the module (``module.calibrant_quant``), packed export and ``calibrant info`` read it.

    ``scale``/``zero``: ``[out, n_groups]`` (per tensor: every row the same; ``zero`` all 0 when
    symmetric); ``g_idx``: ``[in]``, the group each input column uses (None: contiguous groups);
    ``act_order``: groups follow GPTQ's activation order (a non-contiguous ``g_idx``); ``extras``: what a
    method keeps beside the grid (e.g. SpQR's outliers and quantized statistics: ``extras["tensors"]`` is
    saved beside the model, ``extras["effective_bits"]`` replaces the scheme's count). A state restored from
    ``calibrant.json`` has the scheme only (``scale is None``): enough to simulate activation quantization,
    not to pack.
    """

    scheme: QuantScheme
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    act_order: bool = False
    extras: dict[str, Any] = field(default_factory=dict)
    unpackable: str | None = None  # why no packed format can store this layer (e.g. SpQR's outliers), if so

    @property
    def has_grid(self) -> bool:
        return self.scale is not None and self.zero is not None

    @property
    def lorc(self) -> bool:
        """A low-rank correction was added on top of the grid (the weight is then off the grid)."""
        return bool(self.scheme.lorc_rank)

    def effective_bits(self, shape: tuple[int, int]) -> float:
        """Bits per weight: the method's own count when it keeps more than the grid, else the scheme's."""
        return float(self.extras.get("effective_bits") or self.scheme.effective_bits(shape))


def quant_state_of(module: nn.Module) -> QuantState | None:
    state = getattr(module, "calibrant_quant", None)
    return state if isinstance(state, QuantState) else None


def attach_quant_state(module: nn.Module, state: QuantState) -> None:
    """Remember a quantized linear's grid on the module (export reads it) and simulate its activation
    quantization with a forward pre-hook (replacing an earlier one)."""
    module.calibrant_quant = state
    old = getattr(module, "_calibrant_act_hook", None)
    if old is not None:
        old.remove()
        module._calibrant_act_hook = None
    scheme = state.scheme
    if scheme.act_bits:
        bits, granularity = scheme.act_bits, scheme.act_granularity

        def fake_quant_input(mod: nn.Module, args: tuple) -> tuple:
            return (fake_quant_activations(args[0], bits, granularity), *args[1:])

        module._calibrant_act_hook = module.register_forward_pre_hook(fake_quant_input)
