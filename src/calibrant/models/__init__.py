"""Model loading (aliases, HF dirs, GGUF, hub ids) and per-family adapters."""

from calibrant.models.adapter import (
    FAMILIES,
    Adapter,
    context_length_of,
    inference_mode,
    set_weight,
    weight_of,
)
from calibrant.models.loader import ALIASES, DEFAULT_MODEL, LoadedModel, load_model, resolve_model_dir
from calibrant.models.structured import load_structured, register_structured_families, save_structured

__all__ = [
    "ALIASES", "DEFAULT_MODEL", "FAMILIES", "Adapter", "LoadedModel", "context_length_of", "inference_mode", "load_model",
    "load_structured", "register_structured_families", "resolve_model_dir", "save_structured", "set_weight",
    "weight_of",
]
