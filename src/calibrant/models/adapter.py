"""Where the parts of a causal LM live, per architecture family.

The engine only ever talks to an :class:`Adapter`: the list of decoder blocks, the module that runs
them (so block-0 inputs and per-block keyword arguments can be captured), the compressible linear
layers of a block, and the embeddings / final norm / LM head that stay dense by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from calibrant.errors import ModelError


@dataclass(frozen=True)
class Family:
    base: str  # attribute path of the module whose forward runs the blocks
    blocks: str  # attribute path of the nn.ModuleList of decoder blocks
    embeddings: tuple[str, ...]
    final_norm: str | None
    lm_head: str = "lm_head"


_LLAMA = Family("model", "model.layers", ("model.embed_tokens",), "model.norm")
FAMILIES: dict[str, Family] = {
    **{
        t: _LLAMA
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "phi3")
    },
    # structurally pruned models with per-block shapes (calibrant.models.structured.STRUCTURED_FAMILIES)
    **{f"calibrant_{t}": _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")},
    "opt": Family(
        "model.decoder",
        "model.decoder.layers",
        ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        "model.decoder.final_layer_norm",
    ),
    "gpt2": Family("transformer", "transformer.h", ("transformer.wte", "transformer.wpe"), "transformer.ln_f"),
    "gpt_neox": Family("gpt_neox", "gpt_neox.layers", ("gpt_neox.embed_in",), "gpt_neox.final_layer_norm"),
}


# families whose checkpoint stores block linears as [in, out] (transformers' Conv1D)
TRANSPOSED_WEIGHTS: dict[str, tuple[str, ...]] = {"gpt2": ("c_attn.weight", "c_proj.weight", "c_fc.weight")}


def context_length_of(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (None when it states none)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@contextlib.contextmanager
def inference_mode(model: nn.Module, *, kv_cache: bool = False) -> Iterator[nn.Module]:
    """Eval mode, no KV cache (``config.use_cache = False``) and no autograd while inside; the model's
    training flag and ``use_cache`` are restored on the way out, also after an error.

    ``kv_cache=True`` leaves ``config.use_cache`` as it is, for callers that decode step by step with
    ``past_key_values`` themselves."""
    config = getattr(model, "config", None) if not kv_cache else None
    use_cache = getattr(config, "use_cache", None)
    was_training = model.training
    if config is not None:
        config.use_cache = False
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        if config is not None:
            config.use_cache = use_cache
        model.train(was_training)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Conv1D)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view; GPT-2's Conv1D stores it transposed)."""
    if isinstance(module, Conv1D):
        return module.weight.data.t()
    return module.weight.data


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``[out, in]`` weight back in the module's own layout and dtype, in place."""
    target = weight_of(module)
    if weight.shape != target.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} != {tuple(target.shape)}")
    target.copy_(weight.to(dtype=target.dtype, device=target.device))


def in_features(module: nn.Module) -> int:
    return weight_of(module).shape[1]


def _get(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj  # type: ignore[return-value]


class Adapter:
    """Family-specific knowledge about one loaded model."""

    def __init__(self, model: nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in FAMILIES:
            raise ModelError(
                f"unsupported architecture '{model_type}' ({type(model).__name__}); calibrant supports "
                f"{', '.join(sorted(FAMILIES))} — convert the model to one of these or open an issue"
            )
        self.model = model
        self.family = FAMILIES[model_type]
        self.model_type = model_type
        base = _get(model, self.family.base)
        blocks = _get(model, self.family.blocks)
        if base is None or not isinstance(blocks, nn.ModuleList):
            raise ModelError(
                f"{type(model).__name__} does not have the expected '{self.family.blocks}' layout of a "
                f"'{model_type}' model; is it a causal LM (AutoModelForCausalLM)?"
            )
        self.base: nn.Module = base
        self.blocks: nn.ModuleList = blocks

    @property
    def block_prefix(self) -> str:
        return self.family.blocks

    def block_linears(self, index: int) -> dict[str, nn.Module]:
        """Compressible linear layers of block ``index``, keyed by their full module name."""
        prefix = f"{self.family.blocks}.{index}"
        return {f"{prefix}.{n}": m for n, m in self.blocks[index].named_modules() if is_linear(m)}

    def context_length(self) -> int | None:
        return context_length_of(self.model)
