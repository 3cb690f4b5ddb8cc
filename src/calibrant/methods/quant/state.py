"""What a quantized linear carries after compression: one typed object that export reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from calibrant.errors import CalibrantError
from calibrant.methods.quant.floatgrid import E4M3_MAX, fp8_activations, nvfp4_activations, nvfp4_global_scale
from calibrant.methods.quant.grid import fake_quant_activations
from calibrant.methods.quant.scheme import QuantScheme


@dataclass
class QuantState:
    """A quantized linear's grid. Set by the method on ``LayerContext.quant``; the engine attaches it to
    the module (``module.calibrant_quant``), packed export and ``calibrant info`` read it.

    ``scale``/``zero``: ``[out, n_groups]`` (per tensor: every row the same; ``zero`` all 0 when
    symmetric; for ``nvfp4`` the E4M3 block scales, the values being multiplied by ``scale / global_scale``);
    ``global_scale``: ``nvfp4``'s per-tensor multiplier ``[1]`` (``448 · 6 / max|W|``, shared by fused linears);
    ``input_amax``: ``[1]``, the largest ``|x|`` over the calibration tokens, for schemes with a static
    activation scale (``fp8-static``: ``amax / 448``; ``nvfp4``: global ``448 · 6 / amax``); ``g_idx``: ``[in]``, the group each input column uses (None: contiguous groups);
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
    global_scale: torch.Tensor | None = None
    input_amax: torch.Tensor | None = None

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

    @property
    def input_scale(self) -> torch.Tensor | None:
        """``fp8-static``'s activation scale ``amax / 448`` (float32 ``[1]``); None for other schemes."""
        if self.scheme.fmt != "fp8" or not self.scheme.act_static or self.input_amax is None:
            return None
        amax = self.input_amax.to(torch.float32).reshape(1)
        return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))

    @property
    def input_global_scale(self) -> torch.Tensor | None:
        """``nvfp4``'s activation global scale ``448 · 6 / amax`` (float32 ``[1]``); None for other schemes."""
        if self.scheme.fmt != "nvfp4" or self.input_amax is None:
            return None
        return nvfp4_global_scale(self.input_amax)

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """The linear's input as its scheme's activation quantization leaves it (``x`` itself for weight-only)."""
        scheme = self.scheme
        if not scheme.act_bits:
            return x
        if scheme.act_static and self.input_amax is None:
            raise CalibrantError(f"scheme {scheme.name} quantizes activations with a scale calibrated at compression "
                                 "time, and this layer's scale is unknown (calibrant.json lacks 'input_amax'); "
                                 "re-run the compression")
        if scheme.fmt == "fp8":
            return fp8_activations(x, self.input_scale)
        if scheme.fmt == "nvfp4":
            return nvfp4_activations(x, self.input_global_scale)
        return fake_quant_activations(x, scheme.act_bits, scheme.act_granularity)


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
    if state.scheme.act_bits:

        def fake_quant_input(mod: nn.Module, args: tuple) -> tuple:
            return (state.fake_quant_input(args[0]), *args[1:])

        module._calibrant_act_hook = module.register_forward_pre_hook(fake_quant_input)
