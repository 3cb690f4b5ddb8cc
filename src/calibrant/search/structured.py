"""Shapes and configurations of structured pruning: what each decoder block keeps.

:class:`ModelShape` reads the dense shapes pruning works in from a model (and the exact parameter
cost of one KV group, one MLP channel and the rest of a block); :class:`StructuredConfig` says, per
block, how many KV groups and MLP channels it keeps or that it is removed. Scoring the units is
:mod:`calibrant.search.importance`, slicing a model to a configuration :mod:`calibrant.search.pruner`,
and saving / loading the result :mod:`calibrant.models.structured`.

Under grouped-query attention a KV group is one KV head plus the ``n_heads / n_kv`` query heads that
read it; removing whole groups keeps ``num_key_value_groups`` unchanged, so transformers' attention
(which reshapes with ``-1`` heads and ``config.head_dim``) runs the sliced modules as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from torch import nn

from calibrant.errors import CalibrantError, ModelError
from calibrant.models.adapter import Adapter
from calibrant.models.structured import CONFIG_KEY, STRUCTURED_FAMILIES

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


# why a family calibrant loads cannot be sliced: the slicer cuts q/k/v/o_proj (KV groups) and gate/up/down_proj
WHY_NOT = {
    "opt": "its MLP is fc1 → fc2 without a gate, its attention output out_proj, and its heads have no KV groups",
    "gpt2": "its attention is one fused c_attn (q, k and v in one transposed Conv1D matrix) and its MLP "
            "c_fc → c_proj has no gate",
    "gpt_neox": "its attention is one fused query_key_value with interleaved heads and its MLP "
                "dense_h_to_4h → dense_4h_to_h has no gate",
}


def check_prunable(model: nn.Module) -> Adapter:
    """The model's adapter, or a CalibrantError saying why its family cannot be pruned structurally and which
    can."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in STRUCTURED_FAMILIES:
        why = WHY_NOT.get(str(model_type), "its attention/MLP layout is not the q/k/v/o_proj + gate/up/down_proj "
                                           "one the slicer cuts")
        raise CalibrantError(f"structured pruning of '{model_type}' models is not supported: {why}; supported "
                             f"families: {', '.join(STRUCTURED_FAMILIES)}")
    if getattr(model.config, CONFIG_KEY, None):
        raise CalibrantError(
            "this model is already structurally pruned; search and prune starting from the dense model"
        )
    adapter = Adapter(model)
    for block in adapter.blocks:
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if attn is None or mlp is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTN_LINEARS) or \
                not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP_LINEARS):
            raise CalibrantError(
                f"{type(model).__name__} blocks lack the q/k/v/o_proj + gate/up/down_proj layout structured "
                f"pruning slices; supported families: {', '.join(STRUCTURED_FAMILIES)}"
            )
    return adapter


# ----------------------------------------------------------------------------------------------
# shapes and configurations


@dataclass(frozen=True)
class ModelShape:
    """The dense shapes pruning works in, and the exact parameter cost of each unit.

    ``block_params(g, c) = fixed + per_group·g + per_channel·c`` for a block keeping ``g`` KV groups
    and ``c`` MLP channels (biases included); a removed block costs 0.
    """

    model_type: str
    n_blocks: int
    hidden: int
    head_dim: int
    n_heads: int
    n_kv: int
    intermediate: int
    per_group: int
    per_channel: int
    fixed: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def dense_block_params(self) -> int:
        return self.fixed + self.per_group * self.n_kv + self.per_channel * self.intermediate

    def block_params(self, groups: int, channels: int, removed: bool = False) -> int:
        return 0 if removed else self.fixed + self.per_group * groups + self.per_channel * channels

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        adapter = check_prunable(model)
        cfg = model.config
        block = adapter.blocks[0]
        attn, mlp = block.self_attn, block.mlp
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        n_heads, n_kv = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
        if n_heads % n_kv or n_heads * head_dim != attn.q_proj.out_features:
            raise ModelError(f"cannot read the head layout of {type(model).__name__} (q_proj "
                             f"{tuple(attn.q_proj.weight.shape)}, head_dim {head_dim})")
        hidden, inter = cfg.hidden_size, mlp.gate_proj.out_features
        r = n_heads // n_kv

        def bias(m: nn.Linear) -> int:
            return 1 if m.bias is not None else 0

        per_group = (hidden * head_dim * r + bias(attn.q_proj) * head_dim * r
                     + 2 * (hidden * head_dim + bias(attn.k_proj) * head_dim)
                     + head_dim * r * hidden)
        per_channel = 2 * hidden + bias(mlp.gate_proj) + bias(mlp.up_proj) + hidden
        total = sum(p.numel() for p in block.parameters())
        fixed = total - per_group * n_kv - per_channel * inter
        for b in adapter.blocks:
            if sum(p.numel() for p in b.parameters()) != total:
                raise CalibrantError("the model's decoder blocks differ in size; structured search needs a dense "
                                     "model whose blocks all have the same shape")
        return cls(str(cfg.model_type), len(adapter.blocks), hidden, head_dim, n_heads, n_kv, inter,
                   per_group, per_channel, fixed)


@dataclass(frozen=True)
class StructuredConfig:
    """What each original block keeps: KV groups, MLP channels, or nothing (removed)."""

    kv_groups: tuple[int, ...]
    mlp_channels: tuple[int, ...]
    removed: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv_groups", tuple(int(g) for g in self.kv_groups))
        object.__setattr__(self, "mlp_channels", tuple(int(c) for c in self.mlp_channels))
        removed = tuple(bool(r) for r in self.removed) or (False,) * len(self.kv_groups)
        object.__setattr__(self, "removed", removed)
        if not len(self.kv_groups) == len(self.mlp_channels) == len(self.removed):
            raise CalibrantError("a structured configuration needs one kv_groups, mlp_channels and removed entry "
                                 "per block")

    @property
    def n_blocks(self) -> int:
        return len(self.kv_groups)

    def validate(self, shape: ModelShape) -> StructuredConfig:
        if self.n_blocks != shape.n_blocks:
            raise CalibrantError(f"the configuration has {self.n_blocks} blocks, the model {shape.n_blocks}")
        for i, (g, c, rm) in enumerate(zip(self.kv_groups, self.mlp_channels, self.removed, strict=True)):
            if rm:
                continue
            if not 1 <= g <= shape.n_kv:
                raise CalibrantError(f"block {i} keeps {g} KV groups; keep 1..{shape.n_kv} (or remove the block)")
            if not 1 <= c <= shape.intermediate:
                raise CalibrantError(f"block {i} keeps {c} MLP channels; keep 1..{shape.intermediate} "
                                     "(or remove the block)")
        if all(self.removed):
            raise CalibrantError("the configuration removes every block; keep at least one")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"kv_groups": list(self.kv_groups), "mlp_channels": list(self.mlp_channels),
                "removed": [i for i, r in enumerate(self.removed) if r]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StructuredConfig:
        n = len(d["kv_groups"])
        gone = set(d.get("removed", []))
        return cls(tuple(d["kv_groups"]), tuple(d["mlp_channels"]), tuple(i in gone for i in range(n)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def dense(cls, shape: ModelShape) -> StructuredConfig:
        return cls((shape.n_kv,) * shape.n_blocks, (shape.intermediate,) * shape.n_blocks)

    def is_dense(self, shape: ModelShape) -> bool:
        return self == StructuredConfig.dense(shape)

    def params(self, shape: ModelShape) -> int:
        """Exact parameter count of the kept decoder blocks."""
        return sum(shape.block_params(g, c, r)
                   for g, c, r in zip(self.kv_groups, self.mlp_channels, self.removed, strict=True))

    def kept_fraction(self, shape: ModelShape) -> float:
        """Kept fraction of the decoder blocks' parameters (embeddings, final norm and LM head excluded)."""
        return self.params(shape) / (shape.dense_block_params * shape.n_blocks)



__all__ = ["ATTN_LINEARS", "MLP_LINEARS", "ModelShape", "StructuredConfig", "check_prunable"]
