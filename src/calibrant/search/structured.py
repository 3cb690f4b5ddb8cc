"""Structured pruning that really shrinks a model: KV groups, MLP channels, whole decoder blocks.

Three pieces, each usable alone:

* :func:`compute_importance` — one pass of the dense model over the calibration batches, with hooks
  that accumulate float32 sums of squares of the inputs of every ``o_proj`` and ``down_proj`` (memory:
  one vector per layer). Scores are Wanda-style ``Σ_i |W_ij|·‖X_j‖`` summed over a KV group's columns
  of ``o_proj`` (all the query heads that share the KV head) and per column of ``down_proj``;
  ``magnitude`` is the same aggregate with unit activation norms (no data). Cached by model hash +
  calibration hash + score.
* :class:`StructuredPruner` — holds references to the dense weights and applies any
  :class:`StructuredConfig` by slicing them into new, smaller ``nn.Linear`` modules (never mutating the
  dense tensors), so trying many configurations costs only the slicing.
* :func:`save_structured` / :func:`load_structured` — a Hugging Face directory whose ``config.json``
  records the per-block shapes under ``calibrant_structured``. When every kept block has the same
  shape the top-level config fields describe it and plain ``AutoModelForCausalLM.from_pretrained``
  loads it; heterogeneous models load through :func:`load_structured` (and ``calibrant``'s own
  ``load_model``), which returns a stock transformers model whose modules have the recorded shapes.

Under grouped-query attention a KV group is one KV head plus the ``n_heads / n_kv`` query heads that
read it; removing whole groups keeps ``num_key_value_groups`` unchanged, so transformers' attention
(which reshapes with ``-1`` heads and ``config.head_dim``) runs the sliced modules as they are.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from calibrant.cache import atomic_path, cache_dir, stable_hash
from calibrant.errors import CalibrantError, ModelError
from calibrant.models.adapter import Adapter

STRUCTURED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SCORES = ("wanda", "magnitude")
CONFIG_KEY = "calibrant_structured"
IMPORTANCE_VERSION = 1
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def check_prunable(model: nn.Module) -> Adapter:
    """The model's adapter, or a CalibrantError saying which families can be pruned structurally."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in STRUCTURED_FAMILIES:
        raise CalibrantError(
            f"structured pruning of '{model_type}' models is not supported yet (their attention/MLP layout "
            f"cannot be sliced); supported families: {', '.join(STRUCTURED_FAMILIES)}"
        )
    if getattr(model.config, CONFIG_KEY, None):
        raise CalibrantError(
            "this model is already structurally pruned; search and prune starting from the dense model"
        )
    adapter = Adapter(model)
    for block in adapter.blocks:
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if attn is None or mlp is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in _ATTN) or \
                not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in _MLP):
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


# ----------------------------------------------------------------------------------------------
# importance


@dataclass
class Importance:
    """Per-block scores of each KV group and each MLP channel (higher = keep), plus block influence."""

    score: str
    groups: list[torch.Tensor]  # per block, [n_kv] float64
    channels: list[torch.Tensor]  # per block, [intermediate] float64
    block_influence: torch.Tensor  # per block, 1 − mean cos(input, output) (NaN without data)
    meta: dict[str, Any] = field(default_factory=dict)

    def kept_groups(self, block: int, k: int) -> torch.Tensor:
        """Indices (ascending) of the ``k`` highest-scoring KV groups of ``block``."""
        return _top(self.groups[block], k)

    def kept_channels(self, block: int, k: int) -> torch.Tensor:
        return _top(self.channels[block], k)

    def save(self, path: str | Path) -> None:
        tensors = {f"groups.{i}": g.contiguous() for i, g in enumerate(self.groups)}
        tensors |= {f"channels.{i}": c.contiguous() for i, c in enumerate(self.channels)}
        tensors["block_influence"] = self.block_influence.contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"score": self.score, "meta": json.dumps(self.meta, default=str)})

    @classmethod
    def load(cls, path: str | Path) -> Importance:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            md = f.metadata()
        t = load_file(str(path))
        n = sum(1 for k in t if k.startswith("groups."))
        return cls(md["score"], [t[f"groups.{i}"] for i in range(n)], [t[f"channels.{i}"] for i in range(n)],
                   t["block_influence"], json.loads(md["meta"]))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k >= scores.numel():
        return torch.arange(scores.numel())
    # stable sort: equal scores keep the lower index, so the same scores always keep the same units
    order = torch.sort(-scores, stable=True).indices[:k]
    return torch.sort(order).values


def _model_key(model: nn.Module, model_hash: str | None) -> str:
    if model_hash:
        return model_hash
    from calibrant.models.loader import state_dict_hash

    return state_dict_hash(model)


@torch.no_grad()
def compute_importance(
    model: nn.Module,
    calibration: torch.Tensor | None,
    score: str = "wanda",
    *,
    batch_size: int = 4,
    progress: bool = True,
    cache: bool = True,
    model_hash: str | None = None,
    calibration_hash: str | None = None,
) -> Importance:
    """Score every KV group and MLP channel of the dense ``model`` (see the module docstring).

    ``calibration``: ``[n, L]`` token ids (needed for ``wanda``; ``magnitude`` ignores it). Cached under
    ``$CALIBRANT_CACHE/structured`` by model hash, calibration hash and score when ``cache``.
    """
    if score not in SCORES:
        raise CalibrantError(f"unknown importance score '{score}'; use one of {', '.join(SCORES)}")
    shape = ModelShape.of(model)
    adapter = Adapter(model)
    needs_data = score == "wanda"
    if needs_data and (calibration is None or calibration.dim() != 2 or calibration.numel() == 0):
        raise CalibrantError("the wanda importance score needs calibration token ids [n, L]; pass --calibration "
                             "(e.g. wiki:32x512) or use --score magnitude")
    key = None
    if cache:
        calib_key = (calibration_hash or _tensor_digest(calibration)) if needs_data else None
        key = stable_hash({"model": _model_key(model, model_hash), "calibration": calib_key, "score": score,
                           "version": IMPORTANCE_VERSION})
        path = cache_dir("structured") / f"importance-{key}.safetensors"
        if path.is_file():
            try:
                imp = Importance.load(path)
                if len(imp.groups) == shape.n_blocks:
                    imp.meta["cached"] = True
                    return imp
            except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
                pass
    start = time.perf_counter()
    r, hd = shape.group_size, shape.head_dim
    o_sq = [torch.zeros(shape.n_heads * hd, dtype=torch.float32) for _ in range(shape.n_blocks)]
    d_sq = [torch.zeros(shape.intermediate, dtype=torch.float32) for _ in range(shape.n_blocks)]
    cos_sum = torch.zeros(shape.n_blocks, dtype=torch.float64)
    tokens = 0
    if needs_data:
        assert calibration is not None
        handles = []

        def sumsq(buf: torch.Tensor) -> Any:
            def hook(_m: nn.Module, args: tuple) -> None:
                x = args[0].detach().float()
                buf.add_(x.pow(2).reshape(-1, x.shape[-1]).sum(0).cpu())

            return hook

        def influence(i: int) -> Any:
            def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
                x = args[0] if args else kwargs["hidden_states"]
                y = out[0] if isinstance(out, tuple | list) else out
                cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
                cos_sum[i] += cos.double().sum().cpu()

            return hook

        for i, block in enumerate(adapter.blocks):
            handles.append(block.self_attn.o_proj.register_forward_pre_hook(sumsq(o_sq[i])))
            handles.append(block.mlp.down_proj.register_forward_pre_hook(sumsq(d_sq[i])))
            handles.append(block.register_forward_hook(influence(i), with_kwargs=True))
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        ids = calibration.long()
        try:
            spans = [(b, min(b + batch_size, ids.shape[0])) for b in range(0, ids.shape[0], batch_size)]
            for b0, b1 in tqdm(spans, desc=f"importance ({score})", unit="batch", disable=not progress):
                adapter.base(input_ids=ids[b0:b1].to(device), use_cache=False)
                tokens += (b1 - b0) * ids.shape[1]
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
    groups, channels = [], []
    for i, block in enumerate(adapter.blocks):
        w_o = block.self_attn.o_proj.weight.detach().float().abs().sum(0).cpu()  # [n_heads*hd]
        w_d = block.mlp.down_proj.weight.detach().float().abs().sum(0).cpu()  # [intermediate]
        if needs_data:
            w_o = w_o * o_sq[i].sqrt()
            w_d = w_d * d_sq[i].sqrt()
        groups.append(w_o.double().reshape(shape.n_kv, r * hd).sum(1))
        channels.append(w_d.double())
    influence_t = 1 - cos_sum / tokens if tokens else torch.full((shape.n_blocks,), math.nan, dtype=torch.float64)
    meta = {"score": score, "tokens": tokens, "seconds": time.perf_counter() - start, "key": key,
            "calibration_hash": calibration_hash, "cached": False}
    imp = Importance(score, groups, channels, influence_t, meta)
    if key is not None:
        imp.save(cache_dir("structured") / f"importance-{key}.safetensors")
    return imp


def _tensor_digest(t: torch.Tensor | None) -> str | None:
    if t is None:
        return None
    import hashlib

    return hashlib.sha256(t.long().contiguous().numpy().tobytes() + str(tuple(t.shape)).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# pruning by slicing


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
            for part, names in (("self_attn", _ATTN), ("mlp", _MLP)):
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


@torch.no_grad()
def tokens_per_second(model: nn.Module, token_ids: torch.Tensor, batch_size: int = 4, repeats: int = 1) -> float:
    """Measured forward throughput (full model, logits included) over ``token_ids`` ``[n, L]``."""
    device = next(model.parameters()).device
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        start = time.perf_counter()
        for _ in range(repeats):
            for b in range(0, token_ids.shape[0], batch_size):
                model(input_ids=token_ids[b:b + batch_size].to(device))
        seconds = time.perf_counter() - start
    finally:
        model.config.use_cache = use_cache
    return repeats * token_ids.numel() / seconds


# ----------------------------------------------------------------------------------------------
# save / load


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


def structured_record(model_dir: str | Path) -> dict[str, Any] | None:
    """The ``calibrant_structured`` entry of a model directory's config.json, if any."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get(CONFIG_KEY)
    except (OSError, ValueError):
        return None


__all__ = [
    "CONFIG_KEY", "SCORES", "STRUCTURED_FAMILIES", "Importance", "ModelShape", "StructuredConfig",
    "StructuredPruner", "check_prunable", "compute_importance", "count_block_params", "count_params",
    "is_heterogeneous", "load_structured", "register_structured_families", "structured_classes", "save_structured", "structured_record", "tokens_per_second",
]


register_structured_families()
