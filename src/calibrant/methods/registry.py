"""The method registry and the one place method parameters are checked.

A method's ``__init__`` signature is its parameter list: the API, the CLI (options derived from it)
and study specs all go through :func:`split_params` and :func:`make_recipe`, so a new method with a
new parameter touches no other code. A recipe is one method or a chain (``"sparsegpt+gptq"``) applied
in order; each method of a chain takes the parameters it accepts.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from calibrant.errors import RecipeError, suggest
from calibrant.methods.awq import AWQ
from calibrant.methods.base import Method
from calibrant.methods.gptq import GPTQ
from calibrant.methods.magnitude import Magnitude
from calibrant.methods.rtn import RTN
from calibrant.methods.smoothquant import SmoothQuant
from calibrant.methods.sparsegpt import SparseGPT
from calibrant.methods.spqr import SpQR
from calibrant.methods.wanda import Wanda

METHODS: dict[str, type[Method]] = {
    "magnitude": Magnitude,
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
    "rtn": RTN,
    "gptq": GPTQ,
    "awq": AWQ,
    "smoothquant": SmoothQuant,
    "spqr": SpQR,
}


def method_class(name: str) -> type[Method]:
    cls = METHODS.get(name.strip().lower())
    if cls is None:
        raise RecipeError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}.{suggest(name, METHODS)}")
    return cls


def parameters(method: str | type[Method]) -> dict[str, inspect.Parameter]:
    """A method's parameters (name → signature parameter, with its default and annotation)."""
    cls = method_class(method) if isinstance(method, str) else method
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def recipe_classes(spec: str) -> list[type[Method]]:
    """``"sparsegpt+gptq"`` → the method classes in order; unknown names are refused with a suggestion."""
    names = [n.strip().lower() for n in str(spec).split("+")]
    if not spec or not all(names):
        raise RecipeError(f"empty method in '{spec}'; choose one of {', '.join(METHODS)} or a chain such as "
                          "sparsegpt+gptq")
    return [method_class(n) for n in names]


def split_params(spec: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Each method of the recipe with the parameters it takes (None values dropped). A parameter that no
    method of the recipe takes is refused, naming the parameters it does take (a typo must not be ignored)."""
    classes = recipe_classes(spec)
    params = {k: v for k, v in params.items() if v is not None}
    accepted = [set(parameters(c)) for c in classes]
    unknown = sorted(set(params) - set().union(*accepted))
    if unknown:
        takes = ", ".join(sorted(set().union(*accepted))) or "no parameters"
        what = f"method '{spec}'" if len(classes) == 1 else f"the chain '{spec}'"
        raise RecipeError(f"{what} does not take {', '.join(repr(k) for k in unknown)} (it takes {takes})."
                          f"{suggest(unknown[0], set().union(*accepted))}")
    return [{k: v for k, v in params.items() if k in acc} for acc in accepted]


def make_recipe(spec: str, **params: Any) -> list[Method]:
    """Instantiate a recipe; every bad name or value is one RecipeError before anything is loaded."""
    classes = recipe_classes(spec)
    return [cls(**{k: coerce(cls, k, v) for k, v in p.items()})
            for cls, p in zip(classes, split_params(spec, params), strict=True)]


def coerce(cls: type[Method], key: str, value: Any) -> Any:
    """``value`` as the type ``cls``'s signature declares for ``key`` (``"1e-3"`` → 0.001 for a float), or a
    RecipeError naming the parameter and the type it needs."""
    hint = typing.get_type_hints(cls.__init__).get(key)
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
    kind = kinds[0] if len(kinds) == 1 and kinds[0] in (bool, int, float, str) else None
    if kind is None or value is None or (type(value) is kind) or (kind is float and type(value) is int):
        return value
    try:
        if kind is bool and isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        if kind in (int, float) and isinstance(value, str | int | float) and not isinstance(value, bool):
            number = kind(value) if kind is float or isinstance(value, int) else float(value)
            if kind is int and number != int(number):
                raise ValueError
            return kind(number)
        if kind is str and isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    except ValueError:
        pass
    raise RecipeError(f"{cls.name}'s parameter {key} must be {kind.__name__}, got {value!r}")


def make_method(name: str, **params: Any) -> Method:
    """Instantiate one registered method."""
    return make_recipe(method_class(name).name, **params)[0]


def needs_data(spec: str, **params: Any) -> bool:
    """Whether a recipe with these parameters reads calibration activations (any statistic, block-level
    work or a plan: ``magnitude`` is data-free, with ``sparsity_profile="owl"`` it is not)."""
    return any(m.reads_data() for m in make_recipe(spec, **params))
