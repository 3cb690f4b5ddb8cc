"""Quantization schemes: the ``w4g128``-style strings users type, parsed into one frozen object."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from calibrant.errors import RecipeError

SCHEME_EXAMPLES = ("w4g128", "w4g64-asym", "w8-channel", "w4-tensor", "w8a8", "w4a8g128", "w3g64+lorc8", "w4g64-mse")
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
    act_granularity: str = "token"  # "token" | "tensor"
    lorc_rank: int = 0  # ZeroQuant-V2 low-rank compensation of the quantization error

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise RecipeError(f"weight bits {self.bits} outside 2–8; use e.g. w4g128 or w8-channel")
        if self.act_bits is not None and not 4 <= self.act_bits <= 8:
            raise RecipeError(f"activation bits {self.act_bits} outside 4–8; use e.g. w8a8 or w4a8")
        if self.group_size is not None and self.group_size < 1:
            raise RecipeError(f"group size {self.group_size} must be ≥ 1, e.g. w4g128")
        if self.lorc_rank < 0:
            raise RecipeError("LoRC rank must be ≥ 0")

    @property
    def name(self) -> str:
        """Canonical scheme string; ``parse_scheme(s.name) == s``."""
        s = f"w{self.bits}"
        if self.act_bits:
            s += f"a{self.act_bits}" + ("t" if self.act_granularity == "tensor" else "")
        s += f"g{self.group_size}" if self.granularity == "group" else f"-{self.granularity}"
        s += "" if self.symmetric else "-asym"
        s += "-mse" if self.clip == "mse" else ""
        s += f"+lorc{self.lorc_rank}" if self.lorc_rank else ""
        return s

    def effective_bits(self, shape: tuple[int, int]) -> float:
        """Bits per weight including scales (16 bit), zero points (``bits`` bit, asymmetric only) and LoRC factors (16 bit)."""
        rows, cols = shape
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
    m = _SCHEME.match(str(text).strip().lower())
    if not m:
        close = difflib.get_close_matches(str(text).lower(), SCHEME_EXAMPLES, n=1, cutoff=0.3)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(
            f"unknown scheme '{text}'.{hint} Form: w<bits>[a<bits>][g<size>|-channel|-tensor][-asym][-mse][+lorc<r>], "
            f"e.g. {', '.join(SCHEME_EXAMPLES[:5])}"
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
