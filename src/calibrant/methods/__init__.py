"""Compression methods: one file per method, one registry line each (:mod:`calibrant.methods.registry`)."""

from __future__ import annotations

from calibrant.methods.base import BlockMethod, LayerContext, Method
from calibrant.methods.gptq import GPTQ
from calibrant.methods.magnitude import Magnitude
from calibrant.methods.registry import (
    METHODS,
    make_method,
    make_recipe,
    method_class,
    needs_data,
    parameters,
    recipe_classes,
    split_params,
)
from calibrant.methods.rtn import RTN
from calibrant.methods.sparsegpt import SparseGPT
from calibrant.methods.stats import STATISTICS, LayerStats, Statistic
from calibrant.methods.wanda import Wanda

__all__ = [
    "GPTQ", "METHODS", "RTN", "STATISTICS", "BlockMethod", "LayerContext", "LayerStats", "Magnitude", "Method",
    "SparseGPT", "Statistic", "Wanda", "make_method", "make_recipe", "method_class", "needs_data", "parameters",
    "recipe_classes", "split_params",
]
