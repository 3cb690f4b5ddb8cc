"""Calibration spec strings: ``SOURCE[:options][:SAMPLING]:NxL``.

Examples: ``wiki:128x512``, ``random-vocab:32x2048``, ``file:./my.txt:64x512``,
``file:./data.jsonl:text:64x512`` (``text`` is the JSON field holding the document),
``hf:allenai/c4:en:train:text:128x2048`` (dataset, config, split, column),
``self:128x512`` or ``self:t=1.5..0.8:top_p=0.95:128x512`` (self-calibration; ``self:chat:128x512`` answers
templated prompts: :mod:`calibrant.calibration.selfchat`), ``dialogue:chat:128x512`` or
``file:./chats.jsonl:chat:64x512`` (chat-formatted: :mod:`calibrant.calibration.chat`),
``mix(wiki=0.5,austen:docs=0.3,pydocs=0.2):128x512`` (a mixture: :mod:`calibrant.calibration.mixture`).

``SAMPLING`` (text sources only; the last option before ``NxL``) is one of
``windows`` (default: random windows over the documents joined into one stream),
``docs`` (document-bounded windows: each window lies inside one document of at least L tokens) and
``packed`` (whole documents in a seeded random order, packed back to back into the n rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from calibrant.errors import CalibrationError

SPEC_FORM = "SOURCE[:options]:NxL"
SAMPLING_HELP = ("the last option may choose the sampling: windows (default, random windows across documents), "
                 "docs (windows inside documents of >= L tokens) or packed (whole documents packed)")
SPEC_EXAMPLES = ("e.g. wiki:128x512, wiki:docs:128x512, file:./my.txt:64x512, file:./data.jsonl:text:64x512, "
                 "hf:allenai/c4:en:train:text:128x2048, self:t=1.5..0.8:128x512 or mix(wiki=0.5,pydocs=0.5):128x512")
SAMPLING_MODES: dict[str, str] = {
    "windows": "random-windows",  # random windows over the concatenation (crossing document boundaries)
    "docs": "document-windows",  # a window never crosses a document boundary; documents hold >= L tokens
    "packed": "packed-documents",  # whole documents, seeded order, packed back to back
}
DEFAULT_SAMPLING = "windows"
_SHAPE = re.compile(r"^\s*(-?\d+)\s*[x×X*]\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class CalibSpec:
    """A parsed spec: ``n`` sequences of ``seq_len`` tokens drawn from ``source``."""

    source: str
    options: tuple[str, ...]
    n: int
    seq_len: int
    sampling: str = DEFAULT_SAMPLING
    """``windows``, ``docs`` or ``packed`` (see :data:`SAMPLING_MODES`)."""

    @property
    def L(self) -> int:  # noqa: N802 - the field's own notation
        return self.seq_len

    @property
    def sampling_name(self) -> str:
        """The sampling mode's name in provenance (``random-windows``, ``document-windows``, ``packed-documents``)."""
        return SAMPLING_MODES[self.sampling]

    def __str__(self) -> str:
        if self.source == "mix":
            return f"mix({','.join(self.options)}):{self.n}x{self.seq_len}"
        mode = [self.sampling] if self.sampling != DEFAULT_SAMPLING else []
        plain = [o for o in self.options if not _SELECTION_OPTION.match(o)]
        chosen = [o for o in self.options if _SELECTION_OPTION.match(o)]
        return ":".join([self.source, *plain, *mode, *chosen, f"{self.n}x{self.seq_len}"])


def _bad(spec: str, why: str) -> CalibrationError:
    return CalibrationError(f"calibration spec '{spec}' {why}; expected {SPEC_FORM} ({SAMPLING_HELP}), {SPEC_EXAMPLES}")


def _split_file_options(rest: str) -> tuple[str, ...]:
    """``PATH`` or ``PATH:FIELD`` -> (path, [field]). A trailing ``:FIELD`` is an option when it holds no path
    separator and the part before it names an existing file or has a file suffix (``data.jsonl``)."""
    if not rest or Path(rest).exists() or ":" not in rest:
        return (rest,)
    path, opt = rest.rsplit(":", 1)
    if opt and not any(c in opt for c in "/\\") and (Path(path).exists() or Path(path).suffix):
        return (path, opt)
    return (rest,)


def _pop_sampling(rest: str, is_file: bool) -> tuple[str, str]:
    """``"a:b:docs"`` -> (``"a:b"``, ``"docs"``); a rest without a trailing sampling keyword keeps the default."""
    if is_file and rest and Path(rest).exists():  # a file whose name happens to end in ':docs' is still a file
        return rest, DEFAULT_SAMPLING
    head, sep, last = rest.rpartition(":")
    if not sep:
        head, last = "", rest
    if last.strip().lower() in SAMPLING_MODES and (head or not is_file):
        return head, last.strip().lower()
    return rest, DEFAULT_SAMPLING


_SELECTION_OPTION = re.compile(r"^\s*(select|pool|layer)\s*=", re.I)


def _pop_selection(rest: str, is_file: bool) -> tuple[str, tuple[str, ...]]:
    """Take the selection options (``select=``, ``pool=``, ``layer=``: :mod:`calibrant.calibration.selection`)
    out of ``rest``: anywhere for named sources, from the end only after a file path."""
    parts = rest.split(":") if rest else []
    if not is_file:
        keep = [p for p in parts if not _SELECTION_OPTION.match(p)]
        return ":".join(keep), tuple(p.strip() for p in parts if _SELECTION_OPTION.match(p))
    picked: list[str] = []
    while len(parts) > 1 and _SELECTION_OPTION.match(parts[-1]):
        picked.insert(0, parts.pop().strip())
    return ":".join(parts), tuple(picked)


_CHAT_OPTIONS = ("chat", "assistant-only")


def _pop_chat(rest: str) -> tuple[str, tuple[str, ...]]:
    """A file path's trailing ``:chat`` / ``:assistant-only`` (:mod:`calibrant.calibration.chat`), unless the
    whole rest names an existing file."""
    if not rest or Path(rest).exists():
        return rest, ()
    parts = rest.split(":")
    picked: list[str] = []
    while len(parts) > 1 and parts[-1].strip().lower() in _CHAT_OPTIONS:
        picked.insert(0, parts.pop().strip().lower())
    return ":".join(parts), tuple(picked)


def parse_spec(spec: str) -> CalibSpec:
    """Parse ``SOURCE[:options][:SAMPLING]:NxL``; a malformed spec or a non-positive N or L raises CalibrationError."""
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
    if re.match(r"\s*mix\s*\(", head, re.I):
        inner = re.fullmatch(r"\s*mix\s*\((.*)\)\s*", head, re.S | re.I)
        if inner is None:
            raise _bad(spec, "writes a mixture whose mix(...) is not closed right before :NxL")
        return CalibSpec("mix", tuple(p.strip() for p in inner.group(1).split(",") if p.strip()), n, seq_len)
    source, _, rest = head.partition(":")
    source = source.strip().lower()
    if not source:
        raise _bad(spec, "names no source")
    rest, selection = _pop_selection(rest, is_file=source == "file")
    rest, sampling = _pop_sampling(rest, is_file=source == "file")
    if source == "file":
        rest, chat = _pop_chat(rest)
        parts = _split_file_options(rest)
        if not parts[0]:
            raise _bad(spec, "gives no path after 'file:'")
        return CalibSpec("file", parts + chat + selection, n, seq_len, sampling)
    options = tuple(o for o in rest.split(":")) if rest else ()
    if any(not o for o in options):
        raise _bad(spec, "has an empty option between ':'")
    return CalibSpec(source, options + selection, n, seq_len, sampling)
