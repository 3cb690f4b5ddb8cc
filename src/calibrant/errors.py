"""One exception family for everything a user can get wrong.

Every message says what was wrong *and* what to do about it; the CLI prints it on one line and
exits with code 2.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterable, Iterator


class CalibrantError(Exception):
    """Base class of every user-facing error."""


class ModelError(CalibrantError):
    """A model could not be found, acquired, loaded or adapted."""


class CalibrationError(CalibrantError):
    """A calibration source or set is unusable."""


class RecipeError(CalibrantError):
    """A compression method or its parameters are invalid."""


class NumericalError(CalibrantError):
    """The maths broke down (singular Hessian, NaN) in a way the user must act on."""


class OutputExistsError(CalibrantError):
    """Refusing to overwrite an existing output."""


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """``exc``'s message on one line (runs of whitespace, newlines included, become one space), cut to
    ``limit`` characters with a trailing ``…`` when longer: for quoting a library's error inside ours."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def suggest(name: str, choices: Iterable[str]) -> str:
    """' Did you mean X?' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


_FULL = {28: "no space left on the device", 27: "the file-size limit was reached", 122: "the disk quota was reached"}


def disk_full_reason(exc: BaseException) -> str | None:
    """Why a write failed when the disk (or a size limit) was full; None for any other error. Recognises
    OSError and the errors of libraries that wrap the OS's (safetensors: ``I/O error: … (os error 28)``,
    SQLite: ``database or disk is full``)."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code not in _FULL:
        code = next((c for c in _FULL if any(f.format(c) in text for f in ("(os error {})", "code: {},", "[Errno {}]"))),
                    None)
    if code is None and "disk is full" in text:
        code = 28
    if code is None and re.search(r"\b\d+ requested and \d+ written\b", text):  # numpy's short write
        return "the write was cut short (a full disk or a file-size limit)"
    return None if code is None else _FULL[code]


def disk_full(exc: BaseException, what: str | None = None, needed: str | None = None) -> str | None:
    """One line for a write the full disk stopped: what could not be written, why, how much it needs and
    what to do; None when ``exc`` is not such an error."""
    reason = disk_full_reason(exc)
    if reason is None:
        return None
    what = what or getattr(exc, "filename", None)
    return (f"could not write{f' {what}' if what else ''}: {reason}"
            f"{f' (it needs about {needed})' if needed else ''}; nothing was kept — free space (or raise the "
            "limit) and run the command again")


@contextlib.contextmanager
def disk_errors(what: str, needed: str | None = None) -> Iterator[None]:
    """Turn a write the full disk (or a file-size limit) stopped into one CalibrantError naming ``what``."""
    try:
        yield
    except Exception as exc:
        line = disk_full(exc, what, needed)
        if line is None:
            raise
        raise CalibrantError(line) from None
