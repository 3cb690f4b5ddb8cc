"""The structured model format: per-block shapes saved with a Hugging Face directory, and loaded back.

A structurally pruned model (:mod:`calibrant.search` makes them) may keep a different number of KV
groups and MLP channels in each decoder block. Its ``config.json`` records the per-block shapes under
``calibrant_structured``. When every kept block has the same shape the top-level config fields
describe it and any transformers loads it with plain ``AutoModelForCausalLM.from_pretrained``.
Heterogeneous models are saved with model type ``calibrant_<family>`` (``calibrant_llama``, …): the
stock family's config and causal-LM classes, except that the model builds each block with its recorded
shape. ``import calibrant`` registers these types with transformers' Auto classes as soon as
transformers loads them (see :mod:`calibrant`), so ``from_pretrained`` works on such a directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibrant.errors import ModelError
from calibrant.models.adapter import Adapter

# the families whose blocks can be sliced (q/k/v/o_proj + gate/up/down_proj); models.adapter.FAMILIES
# lists their ``calibrant_`` types too
STRUCTURED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
CONFIG_KEY = "calibrant_structured"


def is_heterogeneous(record: dict[str, Any] | None) -> bool:
    if not record:
        return False
    return len(set(record["num_key_value_heads"])) > 1 or len(set(record["intermediate_size"])) > 1


STRUCTURED_PREFIX = "calibrant_"
_CLASSES: dict[str, tuple[type, type]] = {}


def _resize_blocks(model: nn.Module, record: dict[str, Any] | None) -> None:
    """Replace each block's linears by empty ones of the shapes recorded in ``calibrant_structured``."""
    if not record:
        return
    blocks = Adapter(model).blocks
    cfg = model.config
    kv, inter = record["num_key_value_heads"], record["intermediate_size"]
    if len(kv) != len(blocks) or len(inter) != len(blocks):
        raise ModelError(f"config.json records {len(kv)} block shapes for {len(blocks)} blocks; the directory is "
                         "damaged — re-save it")
    hd, r = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    for block, g, c in zip(blocks, kv, inter, strict=True):
        attn, mlp = block.self_attn, block.mlp
        for part, name, rows, cols in ((attn, "q_proj", g * r * hd, None), (attn, "k_proj", g * hd, None),
                                       (attn, "v_proj", g * hd, None), (attn, "o_proj", None, g * r * hd),
                                       (mlp, "gate_proj", c, None), (mlp, "up_proj", c, None),
                                       (mlp, "down_proj", None, c)):
            old = getattr(part, name)
            w = old.weight
            setattr(part, name, nn.Linear(cols if cols is not None else old.in_features,
                                          rows if rows is not None else old.out_features,
                                          bias=old.bias is not None, device=w.device, dtype=w.dtype))
        for attr, value in (("num_heads", g * r), ("num_attention_heads", g * r), ("num_key_value_heads", g)):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = c


def structured_classes(base_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) of model type ``calibrant_<base_type>``, registered with transformers' Auto
    classes: the stock family's classes, except that the model builds each block with its recorded shape."""
    if base_type in _CLASSES:
        return _CLASSES[base_type]
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base_config = CONFIG_MAPPING[base_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    new_type = STRUCTURED_PREFIX + base_type
    config_cls = type(f"Structured{base_config.__name__}", (base_config,),
                      {"model_type": new_type, "__module__": __name__})

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        base_model.__init__(self, config, *args, **kwargs)
        _resize_blocks(self, getattr(config, CONFIG_KEY, None))

    model_cls = type(f"Structured{base_model.__name__}", (base_model,),
                     {"config_class": config_cls, "__init__": __init__, "__module__": __name__})
    transformers.AutoConfig.register(new_type, config_cls, exist_ok=True)
    transformers.AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    _CLASSES[base_type] = (config_cls, model_cls)
    return config_cls, model_cls


def register_structured_families() -> None:
    """Make ``calibrant_<family>`` directories loadable with plain ``AutoModelForCausalLM.from_pretrained``."""
    for family in STRUCTURED_FAMILIES:
        structured_classes(family)


def save_structured(model: nn.Module, tokenizer: Any, out: str | Path, metadata: dict[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """Save a structurally pruned model as a Hugging Face directory (atomically), with ``calibrant.json``.

    Blocks of one shape: a stock ``model_type`` whose top-level fields describe them (any transformers
    loads it). Blocks of different shapes: ``model_type`` ``calibrant_<family>``, which loads with plain
    ``AutoModelForCausalLM.from_pretrained`` once ``calibrant`` is imported (and fails loudly, rather than
    silently re-initialising mismatched weights, where it is not).
    """
    from calibrant.export.hf import save_model

    record = getattr(model.config, CONFIG_KEY, None)
    meta = {"structured": record, **(metadata or {})}
    original = model.config
    if is_heterogeneous(record):
        config_cls, model_cls = structured_classes(original.model_type)
        converted = config_cls.from_dict(original.to_dict())
        converted.architectures = [model_cls.__name__]
        model.config = converted
    try:
        return save_model(model, tokenizer, out, meta, overwrite=overwrite)
    finally:
        model.config = original


def load_structured(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """Load a directory saved by :func:`save_structured` (or any HF directory) with transformers' Auto classes."""
    import transformers

    register_structured_families()
    model = transformers.AutoModelForCausalLM.from_pretrained(Path(path), dtype=dtype)
    return model.to(device).eval()


__all__ = [
    "CONFIG_KEY", "STRUCTURED_FAMILIES", "STRUCTURED_PREFIX", "is_heterogeneous", "load_structured",
    "register_structured_families", "save_structured", "structured_classes",
]
