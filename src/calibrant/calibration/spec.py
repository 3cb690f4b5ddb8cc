"""Calibration spec strings: ``SOURCE[:options]:NxL``.

Examples: ``wiki:128x512``, ``random-vocab:32x2048``, ``file:./my.txt:64x512``,
``file:./data.jsonl:text:64x512`` (``text`` is the JSON field holding the document).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from calibrant.errors import CalibrationError

SPEC_FORM = "SOURCE[:options]:NxL"
SPEC_EXAMPLES = "e.g. wiki:128x512, file:./my.txt:64x512 or file:./data.jsonl:text:64x512"
_SHAPE = re.compile(r"^\s*(-?\d+)\s*[x×X*]\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class CalibSpec:
    """A parsed spec: ``n`` sequences of ``seq_len`` tokens drawn from ``source``."""

    source: str
    options: tuple[str, ...]
    n: int
    seq_len: int

    @property
    def L(self) -> int:  # noqa: N802 - the field's own notation
        return self.seq_len

    def __str__(self) -> str:
        return ":".join([self.source, *self.options, f"{self.n}x{self.seq_len}"])


def _bad(spec: str, why: str) -> CalibrationError:
    return CalibrationError(f"calibration spec '{spec}' {why}; expected {SPEC_FORM}, {SPEC_EXAMPLES}")


def _split_file_options(rest: str) -> tuple[str, ...]:
    """``PATH`` or ``PATH:FIELD`` -> (path, [field]). A trailing ``:FIELD`` is an option when it holds no path
    separator and the part before it names an existing file or has a file suffix (``data.jsonl``)."""
    if not rest or Path(rest).exists() or ":" not in rest:
        return (rest,)
    path, opt = rest.rsplit(":", 1)
    if opt and not any(c in opt for c in "/\\") and (Path(path).exists() or Path(path).suffix):
        return (path, opt)
    return (rest,)


def parse_spec(spec: str) -> CalibSpec:
    """Parse ``SOURCE[:options]:NxL``; a malformed spec or a non-positive N or L raises CalibrationError."""
    if not isinstance(spec, str) or ":" not in spec:
        raise _bad(str(spec), "has no ':NxL' part")
    head, shape = spec.strip().rsplit(":", 1)
    m = _SHAPE.match(shape)
    if not m:
        raise _bad(spec, f"ends in '{shape}', which is not NxL (two integers, e.g. 128x512)")
    n, seq_len = int(m.group(1)), int(m.group(2))
    if n <= 0 or seq_len <= 0:
        raise _bad(spec, f"asks for {n}x{seq_len}; N (sequences) and L (tokens each) must both be > 0")
    if not head:
        raise _bad(spec, "names no source")
    source, _, rest = head.partition(":")
    source = source.strip().lower()
    if not source:
        raise _bad(spec, "names no source")
    if source == "file":
        parts = _split_file_options(rest)
        if not parts[0]:
            raise _bad(spec, "gives no path after 'file:'")
        return CalibSpec("file", parts, n, seq_len)
    options = tuple(o for o in rest.split(":")) if rest else ()
    if any(not o for o in options):
        raise _bad(spec, "has an empty option between ':'")
    return CalibSpec(source, options, n, seq_len)
