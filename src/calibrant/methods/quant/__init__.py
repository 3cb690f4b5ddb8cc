"""Quantization maths shared by every quantizing method: schemes, integer and float grids, the per-layer state."""

from calibrant.methods.quant.floatgrid import (
    fp8_activations,
    fp8_weight,
    nvfp4_activations,
    nvfp4_global_scale,
    nvfp4_weight,
    round_e2m1,
    round_e4m3,
)
from calibrant.methods.quant.grid import (
    expand_groups,
    fake_quant,
    fake_quant_activations,
    fake_quant_weight,
    group_slices,
    lorc,
    qparams,
    qrange,
    weight_qparams,
)
from calibrant.methods.quant.scheme import SCHEME_EXAMPLES, QuantScheme, parse_scheme
from calibrant.methods.quant.state import QuantState, attach_quant_state, quant_state_of

__all__ = [
    "fp8_activations", "fp8_weight", "nvfp4_activations", "nvfp4_global_scale", "nvfp4_weight", "round_e2m1",
    "round_e4m3",
    "SCHEME_EXAMPLES", "QuantScheme", "QuantState", "attach_quant_state", "expand_groups", "fake_quant", "fake_quant_activations",
    "fake_quant_weight", "group_slices", "lorc", "parse_scheme", "qparams", "qrange", "quant_state_of",
    "weight_qparams",
]
