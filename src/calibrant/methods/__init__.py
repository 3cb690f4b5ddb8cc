"""Compression methods: one file per method, one registry line each."""

from __future__ import annotations

from typing import Any

from calibrant.errors import RecipeError, suggest
from calibrant.methods.base import LayerContext, LayerStats, Method
from calibrant.methods.magnitude import Magnitude
from calibrant.methods.sparsegpt import SparseGPT
from calibrant.methods.wanda import Wanda

METHODS: dict[str, type[Method]] = {
    "magnitude": Magnitude,
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
}


def make_method(name: str, **params: Any) -> Method:
    """Instantiate a registered method; unknown names and parameters give one clear error."""
    cls = METHODS.get(name.lower())
    if cls is None:
        raise RecipeError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}.{suggest(name, METHODS)}")
    try:
        return cls(**{k: v for k, v in params.items() if v is not None})
    except TypeError as exc:
        raise RecipeError(f"method '{name}' does not take these parameters: {exc}") from None


__all__ = ["METHODS", "LayerContext", "LayerStats", "Method", "make_method", "Magnitude", "Wanda", "SparseGPT"]
