"""Compression methods: one file per method, one registry line each."""

from __future__ import annotations

import inspect
from typing import Any

from calibrant.errors import RecipeError, suggest
from calibrant.methods.base import LayerContext, LayerStats, Method
from calibrant.methods.gptq import GPTQ
from calibrant.methods.magnitude import Magnitude
from calibrant.methods.rtn import RTN
from calibrant.methods.sparsegpt import SparseGPT
from calibrant.methods.wanda import Wanda

METHODS: dict[str, type[Method]] = {
    "magnitude": Magnitude,
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
    "rtn": RTN,
    "gptq": GPTQ,
}


def _accepted(cls: type[Method]) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def make_method(name: str, **params: Any) -> Method:
    """Instantiate a registered method; unknown names and parameters give one clear error."""
    cls = METHODS.get(name.strip().lower())
    if cls is None:
        raise RecipeError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}.{suggest(name, METHODS)}")
    params = {k: v for k, v in params.items() if v is not None}
    unknown = set(params) - _accepted(cls)
    if unknown:
        raise RecipeError(
            f"method '{name}' does not take {', '.join(sorted(unknown))}; it takes {', '.join(sorted(_accepted(cls)))}"
        )
    return cls(**params)


def make_recipe(spec: str, **params: Any) -> list[Method]:
    """``"sparsegpt+gptq"`` → methods applied in order; each takes the parameters it accepts.

    A parameter no method of the chain accepts is an error (a typo must not be silently ignored).
    """
    names = [n.strip().lower() for n in spec.split("+") if n.strip()]
    if not names:
        raise RecipeError(f"empty method '{spec}'; choose one of {', '.join(METHODS)}")
    for n in names:
        if n not in METHODS:
            raise RecipeError(f"unknown method '{n}'; choose one of {', '.join(METHODS)}.{suggest(n, METHODS)}")
    params = {k: v for k, v in params.items() if v is not None}
    unused = set(params) - set().union(*(_accepted(METHODS[n]) for n in names))
    if unused:
        raise RecipeError(f"{', '.join(sorted(unused))} is not a parameter of {spec}; remove it or pick a method that takes it")
    return [make_method(n, **{k: v for k, v in params.items() if k in _accepted(METHODS[n])}) for n in names]


__all__ = [
    "METHODS", "GPTQ", "RTN", "LayerContext", "LayerStats", "Magnitude", "Method", "SparseGPT", "Wanda",
    "make_method", "make_recipe",
]
