"""Which per-channel scales a decoder block can absorb without changing its function, per family.

A *fold* names a module whose output channels feed some linears and nothing else: a norm (pre-LN
families) or a linear (v → o, up → down, and fc1 → fc2 through a ReLU). Dividing the source's output
channel ``j`` by ``s_j`` and multiplying the targets' input column ``j`` by ``s_j`` leaves the block's
output unchanged; block-level methods (AWQ, SmoothQuant) choose ``s`` to make the targets easier to
quantize. The mappings are data, per model type; a family where no fold is possible says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calibrant.errors import ModelError
from calibrant.models.adapter import Adapter, weight_of


@dataclass(frozen=True)
class Fold:
    source: str  # block-relative path of the norm or linear whose output feeds the targets
    targets: tuple[str, ...]  # block-relative paths of the linears reading it
    kind: str  # "norm" | "linear"


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GLU = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA = (
    Fold("input_layernorm", _ATTN, "norm"),
    Fold("self_attn.v_proj", ("self_attn.o_proj",), "linear"),
    Fold("post_attention_layernorm", _GLU, "norm"),
    Fold("mlp.up_proj", ("mlp.down_proj",), "linear"),
)
_GEMMA2 = (_LLAMA[0], _LLAMA[1], Fold("pre_feedforward_layernorm", _GLU, "norm"), _LLAMA[3])

FOLDS: dict[str, tuple[Fold, ...]] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma")},
    **{f"calibrant_{t}": _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3")},
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "phi3": (Fold("input_layernorm", ("self_attn.qkv_proj",), "norm"),
             Fold("post_attention_layernorm", ("mlp.gate_up_proj",), "norm")),
    "opt": (
        Fold("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
        Fold("self_attn.v_proj", ("self_attn.out_proj",), "linear"),
        Fold("final_layer_norm", ("fc1",), "norm"),
        Fold("fc1", ("fc2",), "linear"),  # through a ReLU, which commutes with positive scales
    ),
    "gpt2": (Fold("ln_1", ("attn.c_attn",), "norm"), Fold("ln_2", ("mlp.c_fc",), "norm")),
    "gpt_neox": (Fold("input_layernorm", ("attention.query_key_value",), "norm"),
                 Fold("post_attention_layernorm", ("mlp.dense_h_to_4h",), "norm")),
}
NORM_OFFSET = {"gemma": 1.0, "gemma2": 1.0, "gemma3_text": 1.0}  # these norms scale by (1 + weight)


@dataclass
class BlockFold:
    """A fold of one block, resolved to its modules."""

    source_name: str
    source: nn.Module
    targets: dict[str, nn.Module]  # full names → linears
    kind: str
    offset: float = 0.0

    @torch.no_grad()
    def apply(self, scales: torch.Tensor) -> None:
        """Divide the source's output channel j by ``scales[j]``, multiply the targets' input column j by it."""
        s = scales.to(torch.float32)
        if self.kind == "norm":
            w = self.source.weight
            w.copy_(((w.float() + self.offset) / s.to(w.device) - self.offset).to(w.dtype))
            bias = getattr(self.source, "bias", None)
            if bias is not None:
                bias.copy_((bias.float() / s.to(bias.device)).to(bias.dtype))
        else:
            w = weight_of(self.source)
            w.copy_((w.float() / s.to(w.device)[:, None]).to(w.dtype))
            bias = getattr(self.source, "bias", None)
            if bias is not None:
                bias.copy_((bias.float() / s.to(bias.device)).to(bias.dtype))
        for target in self.targets.values():
            t = weight_of(target)
            t.copy_((t.float() * s.to(t.device)[None, :]).to(t.dtype))


def fold_impossible(model: nn.Module) -> str | None:
    """Why no scale can be folded in this model's blocks, or None when folds exist."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FOLDS:
        return (f"no fold mapping is known for model type '{model_type}' (known: {', '.join(sorted(FOLDS))})")
    if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        return ("this OPT model normalises after each sub-block (post-LN, do_layer_norm_before=False), so no norm "
                "feeds the linears and no scale can be folded into one")
    return None


def block_folds(model: nn.Module, index: int) -> list[BlockFold]:
    """The folds of block ``index``; a linear → linear fold is kept only where the shapes allow it (v → o
    needs as many value channels as o has inputs: not under grouped-query attention) and, for OPT's
    fc1 → fc2, only behind a ReLU."""
    reason = fold_impossible(model)
    if reason is not None:
        raise ModelError(f"{type(model).__name__}: {reason}")
    adapter = Adapter(model)
    model_type = adapter.model_type
    block = adapter.blocks[index]
    prefix = f"{adapter.block_prefix}.{index}"
    folds = []
    for f in FOLDS[model_type]:
        try:
            source = block.get_submodule(f.source)
            targets = {f"{prefix}.{t}": block.get_submodule(t) for t in f.targets}
        except AttributeError:
            continue  # this block lacks the module (e.g. a structurally removed projection)
        if f.kind == "linear":
            out = weight_of(source).shape[0]
            if any(weight_of(t).shape[1] != out for t in targets.values()):
                continue
            if model_type == "opt" and getattr(model.config, "activation_function", "relu") != "relu":
                continue
        folds.append(BlockFold(f"{prefix}.{f.source}", source, targets, f.kind, NORM_OFFSET.get(model_type, 0.0)))
    return folds
