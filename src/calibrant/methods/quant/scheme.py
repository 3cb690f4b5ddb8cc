"""Quantization schemes: the ``w4g128``-style strings users type, parsed into one frozen object.

Integer schemes follow ``w<bits>[a<bits>][g<size>|-channel|-tensor][-asym][-mse][+lorc<r>]``; the float
schemes are named: ``fp8`` (E4M3 weights per output channel, dynamic per-token E4M3 activations),
``fp8-static`` (the activations' one scale calibrated from the calibration set) and ``nvfp4`` (E2M1
weights with an E4M3 scale per 16 and a global scale; activations likewise, their global scale
calibrated). See :mod:`calibrant.methods.quant.floatgrid`. The GGUF schemes ``gguf-q4_0``, ``gguf-q4_1``,
``gguf-q5_0``, ``gguf-q5_1``, ``gguf-q8_0`` are llama.cpp's block grids (blocks of 32, float16 scales), rounded as
llama.cpp rounds: see :mod:`calibrant.methods.quant.ggufgrid`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from calibrant.errors import RecipeError

if TYPE_CHECKING:
    from calibrant.methods.quant.ggufgrid import GGUFType

SCHEME_EXAMPLES = ("w4g128", "w4g64-asym", "w8-channel", "w4-tensor", "w8a8", "w4a8g128", "w3g64+lorc8", "w4g64-mse",
                   "fp8", "fp8-static", "nvfp4", "gguf-q4_0", "gguf-q8_0")
FLOAT_FORMATS = ("fp8", "nvfp4")
_GGUF_SCHEME = re.compile(r"^gguf-(?P<type>[a-z0-9_]+?)(?:g(?P<group>\d+)|-(?P<gran>channel|tensor))?"
                          r"(?P<flags>(?:-(?:asym|sym|mse))*)$")
_FLOAT_SCHEME = re.compile(r"^(?P<fmt>fp8|nvfp4)(?:g(?P<group>\d+)|-(?P<gran>channel|tensor))?"
                           r"(?P<flags>(?:-(?:static|dynamic))*)$")
_SCHEME = re.compile(
    r"^w(?P<bits>\d+)"
    r"(?:a(?P<abits>\d+)(?P<atensor>t)?)?"
    r"(?:g(?P<group>\d+)|-(?P<gran>channel|tensor))?"
    r"(?P<flags>(?:-(?:asym|sym|mse))*)"
    r"(?:\+lorc(?P<rank>\d+))?$"
)


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 4
    group_size: int | None = None  # None: per output channel (or per tensor, see granularity)
    granularity: str = "channel"  # "tensor" | "channel" | "group"
    symmetric: bool = True
    clip: str = "none"  # "none" | "mse": search a shrunk range per group minimising the rounding error
    act_bits: int | None = None  # dynamic fake-quant of the linear's inputs
    act_granularity: str = "token"  # "token" | "tensor" | "group" (nvfp4: blocks of 16 inputs)
    lorc_rank: int = 0  # ZeroQuant-V2 low-rank compensation of the quantization error
    fmt: str = "int"  # "int" | "fp8" (E4M3) | "nvfp4" (E2M1, E4M3 block scales, a global scale) | "gguf-q4_0" …
    act_static: bool = False  # activation scale calibrated once (max |x| over the calibration tokens)

    def __post_init__(self) -> None:
        if self.fmt.startswith("gguf-"):
            self._check_gguf()
            return
        if self.fmt != "int":
            self._check_float()
            return
        if self.act_static:
            raise RecipeError("static activation scales are for the float schemes (fp8-static, nvfp4); integer "
                              "activation schemes (w8a8) are dynamic")
        if not 2 <= self.bits <= 8:
            raise RecipeError(f"weight bits {self.bits} outside 2–8; use e.g. w4g128 or w8-channel")
        if self.act_bits is not None and not 4 <= self.act_bits <= 8:
            raise RecipeError(f"activation bits {self.act_bits} outside 4–8; use e.g. w8a8 or w4a8")
        if self.group_size is not None and self.group_size < 1:
            raise RecipeError(f"group size {self.group_size} must be ≥ 1, e.g. w4g128")
        if self.lorc_rank < 0:
            raise RecipeError("LoRC rank must be ≥ 0")

    def _check_float(self) -> None:
        from calibrant.methods.quant.floatgrid import NVFP4_BLOCK, require_float8

        if self.fmt not in FLOAT_FORMATS:
            raise RecipeError(f"unknown number format '{self.fmt}'; use int, fp8 or nvfp4")
        if self.fmt == "nvfp4" and (self.granularity != "group" or self.group_size != NVFP4_BLOCK):
            size = f"group size {self.group_size}" if self.granularity == "group" else f"{self.granularity} scales"
            raise RecipeError(f"nvfp4 uses blocks of {NVFP4_BLOCK} weights (one E4M3 scale each), not {size}; "
                              f"write 'nvfp4', or an integer scheme such as w4g{self.group_size or 128}")
        if self.fmt == "fp8" and self.granularity != "channel":
            size = f"groups of {self.group_size}" if self.granularity == "group" else f"{self.granularity} scales"
            raise RecipeError(f"fp8 scales each output channel, not {size}; write 'fp8' or 'fp8-static'")
        expected = {"fp8": (8, 8), "nvfp4": (4, 4)}[self.fmt]
        if (self.bits, self.act_bits) != expected or not self.symmetric or self.clip != "none" or self.lorc_rank:
            raise RecipeError(f"{self.fmt} is symmetric with {expected[0]}-bit weights and activations, without "
                              "clipping search or LoRC; write 'fp8', 'fp8-static' or 'nvfp4'")
        if self.fmt == "nvfp4" and not self.act_static:
            raise RecipeError("nvfp4 calibrates its activations' global scale; there is no dynamic nvfp4 variant")
        require_float8(self.fmt)

    def _check_gguf(self) -> None:
        from calibrant.methods.quant.ggufgrid import GGUF_BLOCK, GGUF_TYPES, gguf_type

        kind = self.fmt.removeprefix("gguf-")
        if kind not in GGUF_TYPES:
            raise RecipeError(f"unknown GGUF type '{kind}'; calibrant quantizes onto "
                              f"{', '.join('gguf-' + t for t in GGUF_TYPES)}")
        if self.granularity != "group" or self.group_size != GGUF_BLOCK:
            size = f"group size {self.group_size}" if self.granularity == "group" else f"{self.granularity} scales"
            raise RecipeError(f"{self.fmt} is llama.cpp's grid of blocks of {GGUF_BLOCK} weights (one float16 scale "
                              f"each), not {size}; write '{self.fmt}' (its group size is always {GGUF_BLOCK}), or an "
                              f"integer scheme such as w{self.bits}g{self.group_size or 128}")
        t = gguf_type(kind)
        if (self.bits, self.symmetric) != (t.bits, not t.affine) or self.clip != "none" or self.act_bits \
                or self.lorc_rank:
            raise RecipeError(f"{self.fmt} is fixed by llama.cpp: {t.bits}-bit codes, "
                              f"{'a float16 minimum per block' if t.affine else 'symmetric'}, no clipping search, "
                              f"weight-only, no LoRC; write '{self.fmt}'")

    @property
    def float_fmt(self) -> str | None:
        """``"fp8"`` / ``"nvfp4"`` for the float schemes, None for integer and GGUF ones."""
        return self.fmt if self.fmt in FLOAT_FORMATS else None

    @property
    def gguf(self) -> GGUFType | None:
        """The GGUF block type (``q4_0`` …) of a ``gguf-*`` scheme, None for the others."""
        from calibrant.methods.quant.ggufgrid import gguf_type

        return gguf_type(self.fmt) if self.fmt.startswith("gguf-") else None

    @property
    def name(self) -> str:
        """Canonical scheme string; ``parse_scheme(s.name) == s``."""
        if self.fmt.startswith("gguf-"):
            return self.fmt
        if self.fmt != "int":
            return self.fmt + ("-static" if self.fmt == "fp8" and self.act_static else "")
        s = f"w{self.bits}"
        if self.act_bits:
            s += f"a{self.act_bits}" + ("t" if self.act_granularity == "tensor" else "")
        s += f"g{self.group_size}" if self.granularity == "group" else f"-{self.granularity}"
        s += "" if self.symmetric else "-asym"
        s += "-mse" if self.clip == "mse" else ""
        s += f"+lorc{self.lorc_rank}" if self.lorc_rank else ""
        return s

    def effective_bits(self, shape: tuple[int, int]) -> float:
        """Bits per weight including scales (16 bit), zero points (``bits`` bit, asymmetric only) and LoRC factors
        (16 bit). ``fp8``: a 16-bit scale per row (the model's dtype, as exported); ``nvfp4``: an 8-bit E4M3
        scale per 16 weights and one 32-bit global scale."""
        rows, cols = shape
        if self.gguf is not None:
            return self.gguf.bits_per_weight
        if self.fmt == "nvfp4":
            return self.bits + 8 / self.group_size + 32 / (rows * cols)
        per_group = 16 + (0 if self.symmetric else self.bits)
        if self.granularity == "tensor":
            overhead = per_group / (rows * cols)
        elif self.granularity == "channel":
            overhead = per_group / cols
        else:
            overhead = per_group * -(-cols // self.group_size) / cols
        lorc = 16 * self.lorc_rank * (rows + cols) / (rows * cols)
        return self.bits + overhead + lorc


def parse_scheme(text: str | QuantScheme) -> QuantScheme:
    """Parse a scheme string such as ``w4g128``, ``w4g64-asym``, ``w8-channel``, ``w8a8``, ``w3g64+lorc8``."""
    if isinstance(text, QuantScheme):
        return text
    gm = _GGUF_SCHEME.match(str(text).strip().lower())
    if gm:
        return _gguf_scheme(str(text), gm)
    fm = _FLOAT_SCHEME.match(str(text).strip().lower())
    if fm:
        return _float_scheme(str(text), fm)
    m = _SCHEME.match(str(text).strip().lower())
    if not m:
        close = difflib.get_close_matches(str(text).lower(), SCHEME_EXAMPLES, n=1, cutoff=0.3)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(
            f"unknown scheme '{text}'.{hint} Form: w<bits>[a<bits>][g<size>|-channel|-tensor][-asym][-mse][+lorc<r>], "
            f"e.g. {', '.join(SCHEME_EXAMPLES[:5])}; or fp8, fp8-static, nvfp4; or gguf-q4_0 (q4_1, q5_0, q5_1, q8_0)"
        )
    flags = set(filter(None, m["flags"].split("-")))
    if {"asym", "sym"} <= flags:
        raise RecipeError(f"scheme '{text}' says both -sym and -asym; pick one")
    if m["group"] is not None:
        granularity, group = "group", int(m["group"])
    else:
        granularity, group = m["gran"] or "channel", None
    return QuantScheme(
        bits=int(m["bits"]),
        group_size=group,
        granularity=granularity,
        symmetric="asym" not in flags,
        clip="mse" if "mse" in flags else "none",
        act_bits=int(m["abits"]) if m["abits"] else None,
        act_granularity="tensor" if m["atensor"] else "token",
        lorc_rank=int(m["rank"] or 0),
    )


def _float_scheme(text: str, m: re.Match) -> QuantScheme:
    fmt = m["fmt"]
    flags = set(filter(None, m["flags"].split("-")))
    if {"static", "dynamic"} <= flags:
        raise RecipeError(f"scheme '{text}' says both -static and -dynamic; pick one")
    if fmt == "nvfp4" and "dynamic" in flags:
        raise RecipeError("nvfp4 calibrates its activations' global scale; there is no dynamic nvfp4 variant — "
                          "write 'nvfp4'")
    if fmt == "nvfp4" and "static" in flags:
        flags.discard("static")  # nvfp4 is always static: nvfp4-static is nvfp4
    if m["group"] is not None:
        granularity, group = "group", int(m["group"])
    else:
        granularity, group = m["gran"] or ("group" if fmt == "nvfp4" else "channel"), None
    if fmt == "nvfp4" and granularity == "group" and group is None:
        group = 16
    bits = 8 if fmt == "fp8" else 4
    static = fmt == "nvfp4" or "static" in flags
    return QuantScheme(bits=bits, group_size=group, granularity=granularity, act_bits=bits,
                       act_granularity="tensor" if fmt == "fp8" and static else "token" if fmt == "fp8" else "group",
                       fmt=fmt, act_static=static)


def _gguf_scheme(text: str, m: re.Match) -> QuantScheme:
    """``gguf-<type>``: llama.cpp's grid; a group size or flags other than the grid's own are refused by the check."""
    from calibrant.methods.quant.ggufgrid import GGUF_BLOCK, GGUF_TYPES, gguf_type

    kind = m["type"]
    if kind not in GGUF_TYPES:
        close = difflib.get_close_matches(kind, GGUF_TYPES, n=1, cutoff=0.5)
        hint = f" Did you mean 'gguf-{close[0]}'?" if close else ""
        raise RecipeError(f"unknown GGUF type in scheme '{text}'.{hint} calibrant quantizes onto "
                          f"{', '.join('gguf-' + t for t in GGUF_TYPES)} (llama.cpp's blocks of {GGUF_BLOCK})")
    t = gguf_type(kind)
    flags = set(filter(None, m["flags"].split("-")))
    if m["group"] is not None:
        granularity, group = "group", int(m["group"])
    elif m["gran"]:
        granularity, group = m["gran"], None
    else:
        granularity, group = "group", GGUF_BLOCK
    symmetric = not t.affine
    if ("asym" in flags and symmetric) or ("sym" in flags and not symmetric):
        raise RecipeError(f"gguf-{kind} is {'symmetric' if symmetric else 'asymmetric (a minimum per block)'} by "
                          f"definition; write 'gguf-{kind}'")
    return QuantScheme(bits=t.bits, group_size=group, granularity=granularity, symmetric=symmetric,
                       clip="mse" if "mse" in flags else "none", fmt=f"gguf-{kind}")
