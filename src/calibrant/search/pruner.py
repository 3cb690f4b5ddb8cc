"""Slicing a model to a structured configuration, and measuring what it became.

:class:`StructuredPruner` holds references to the dense weights and applies any
:class:`~calibrant.search.structured.StructuredConfig` by slicing them into new, smaller ``nn.Linear``
modules (never mutating the dense tensors), so trying many configurations costs only the slicing.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from calibrant.errors import CalibrantError
from calibrant.models.adapter import Adapter, inference_mode
from calibrant.models.structured import CONFIG_KEY
from calibrant.search.importance import Importance
from calibrant.search.structured import ATTN_LINEARS, MLP_LINEARS, ModelShape, StructuredConfig


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` wrapping the given tensors (no initialisation, no copy)."""
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    m.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        m.bias = nn.Parameter(bias, requires_grad=False)
    return m


def _rows(lin: tuple[torch.Tensor, torch.Tensor | None], idx: torch.Tensor | None) -> nn.Linear:
    w, b = lin
    if idx is None:
        return _linear(w, b)
    return _linear(w.index_select(0, idx), None if b is None else b.index_select(0, idx))


def _cols(lin: tuple[torch.Tensor, torch.Tensor | None], idx: torch.Tensor | None) -> nn.Linear:
    w, b = lin
    return _linear(w if idx is None else w.index_select(1, idx), b)


def _group_rows(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of whole groups of ``width`` consecutive rows."""
    return (groups[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


class StructuredPruner:
    """Applies structured configurations to one model by slicing its dense weights (kept by reference).

    ``apply(config)`` can be called any number of times in any order: every call slices from the dense
    tensors captured at construction, so no reload or state-dict copy is needed between configurations.
    The model's config is kept truthful (``num_hidden_layers``, ``layer_types``, the per-block shapes under
    ``calibrant_structured``) so saving it with ``save_pretrained`` records what it is.
    """

    def __init__(self, model: nn.Module, importance: Importance):
        self.model = model
        self.shape = ModelShape.of(model)
        self.importance = importance
        if len(importance.groups) != self.shape.n_blocks:
            raise CalibrantError("the importance scores were computed for a different model; recompute them")
        adapter = Adapter(model)
        self.blocks_path = adapter.block_prefix
        self.blocks: list[nn.Module] = list(adapter.blocks)
        self.dense: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = []
        for block in self.blocks:
            linears = {}
            for part, names in (("self_attn", ATTN_LINEARS), ("mlp", MLP_LINEARS)):
                for n in names:
                    m = getattr(getattr(block, part), n)
                    linears[n] = (m.weight.data, None if m.bias is None else m.bias.data)
            self.dense.append(linears)
        cfg = model.config
        self._dense_config = {k: getattr(cfg, k) for k in ("num_hidden_layers", "num_attention_heads",
                                                           "num_key_value_heads", "intermediate_size",
                                                           "layer_types") if hasattr(cfg, k)}
        self.current = StructuredConfig.dense(self.shape)

    @torch.no_grad()
    def apply(self, config: StructuredConfig) -> nn.Module:
        shape = self.shape
        config.validate(shape)
        r, hd = shape.group_size, shape.head_dim
        kept: list[nn.Module] = []
        kept_index: list[int] = []
        for i, block in enumerate(self.blocks):
            if config.removed[i]:
                continue
            d = self.dense[i]
            g, c = config.kv_groups[i], config.mlp_channels[i]
            groups = None if g == shape.n_kv else self.importance.kept_groups(i, g)
            q_idx = None if groups is None else _group_rows(groups, r * hd)
            kv_idx = None if groups is None else _group_rows(groups, hd)
            attn, mlp = block.self_attn, block.mlp
            attn.q_proj = _rows(d["q_proj"], q_idx)
            attn.k_proj = _rows(d["k_proj"], kv_idx)
            attn.v_proj = _rows(d["v_proj"], kv_idx)
            attn.o_proj = _cols(d["o_proj"], q_idx)
            for attr, value in (("num_heads", g * r), ("num_attention_heads", g * r), ("num_key_value_heads", g)):
                if hasattr(attn, attr):
                    setattr(attn, attr, value)
            ch = None if c == shape.intermediate else self.importance.kept_channels(i, c)
            mlp.gate_proj = _rows(d["gate_proj"], ch)
            mlp.up_proj = _rows(d["up_proj"], ch)
            mlp.down_proj = _cols(d["down_proj"], ch)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = c
            attn.layer_idx = len(kept)
            if hasattr(block, "layer_idx"):
                block.layer_idx = len(kept)
            kept.append(block)
            kept_index.append(i)
        _set_path(self.model, self.blocks_path, nn.ModuleList(kept))
        cfg = self.model.config
        for k, v in self._dense_config.items():
            setattr(cfg, k, list(v) if isinstance(v, list) else v)
        if config.is_dense(shape):
            if hasattr(cfg, CONFIG_KEY):
                delattr(cfg, CONFIG_KEY)
        else:
            kv = [config.kv_groups[i] for i in kept_index]
            inter = [config.mlp_channels[i] for i in kept_index]
            cfg.num_hidden_layers = len(kept)
            if isinstance(self._dense_config.get("layer_types"), list):
                cfg.layer_types = [self._dense_config["layer_types"][i] for i in kept_index]
            # the largest kept shapes at top level: a uniform model then loads with plain from_pretrained
            cfg.num_key_value_heads = max(kv)
            cfg.num_attention_heads = max(kv) * r
            cfg.intermediate_size = max(inter)
            cfg.head_dim = hd
            setattr(cfg, CONFIG_KEY, {
                "num_key_value_heads": kv,
                "num_attention_heads": [g * r for g in kv],
                "intermediate_size": inter,
                "removed_blocks": [i for i, rm in enumerate(config.removed) if rm],
                "original_num_hidden_layers": shape.n_blocks,
            })
        self.current = config
        return self.model

    def restore(self) -> nn.Module:
        return self.apply(StructuredConfig.dense(self.shape))


def count_block_params(model: nn.Module) -> int:
    """Parameters of the decoder blocks as they are now (what a structured config's ``params`` predicts)."""
    return sum(p.numel() for p in Adapter(model).blocks.parameters())


def count_params(model: nn.Module) -> int:
    """All distinct parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def tokens_per_second(model: nn.Module, token_ids: torch.Tensor, batch_size: int = 4, repeats: int = 1) -> float:
    """Measured forward throughput (full model, logits included) over ``token_ids`` ``[n, L]``."""
    device = next(model.parameters()).device
    with inference_mode(model):
        start = time.perf_counter()
        for _ in range(repeats):
            for b in range(0, token_ids.shape[0], batch_size):
                model(input_ids=token_ids[b:b + batch_size].to(device))
        seconds = time.perf_counter() - start
    return repeats * token_ids.numel() / seconds


__all__ = ["StructuredPruner", "count_block_params", "count_params", "tokens_per_second"]
