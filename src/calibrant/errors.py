"""One exception family for everything a user can get wrong.

Every message says what was wrong *and* what to do about it; the CLI prints it on one line and
exits with code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
