"""Importance of each KV group and MLP channel of a dense model: which units structured pruning keeps.

:func:`compute_importance` runs one pass of the dense model over the calibration batches, streaming the
engine's own ``sq_norms`` statistic (:class:`calibrant.methods.stats.LayerStats`, the Σx² Wanda uses)
of the inputs of every ``o_proj`` and ``down_proj`` (memory: one vector per layer). Scores are Wanda-style ``Σ_i |W_ij|·‖X_j‖`` summed over a KV group's columns
of ``o_proj`` (all the query heads that share the KV head) and per column of ``down_proj``;
``magnitude`` is the same aggregate with unit activation norms (no data). Cached by model hash +
calibration hash + score.
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
from calibrant.errors import CalibrantError
from calibrant.methods.stats import LayerStats
from calibrant.models.adapter import Adapter, inference_mode
from calibrant.search.structured import ModelShape

SCORES = ("wanda", "magnitude")
IMPORTANCE_VERSION = 1


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
    token_mask: torch.Tensor | None = None,
) -> Importance:
    """Score every KV group and MLP channel of the dense ``model`` (see the module docstring).

    ``calibration``: ``[n, L]`` token ids (needed for ``wanda``; ``magnitude`` ignores it); ``token_mask``
    (bool ``[n, L]``, e.g. a chat set's assistant tokens): the tokens the statistics count, the others run as
    context only. Cached under ``$CALIBRANT_CACHE/structured`` by model hash, calibration (and mask) and
    score when ``cache``.
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
        calib_key: Any = (calibration_hash or _tensor_digest(calibration)) if needs_data else None
        if needs_data and token_mask is not None:
            calib_key = [calib_key, _tensor_digest(token_mask.long())]
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
    device = next(model.parameters()).device
    cos_sum = torch.zeros(shape.n_blocks, dtype=torch.float64)
    tokens = 0
    o_stats: list[LayerStats] = []
    d_stats: list[LayerStats] = []
    if needs_data:
        assert calibration is not None
        handles = []

        current: list[torch.Tensor | None] = [None]  # the mask of the batch running now

        def observe(stats: LayerStats) -> Any:
            def hook(_m: nn.Module, args: tuple) -> None:
                stats.add(args[0].detach(), current[0])

            return hook

        def influence(i: int) -> Any:
            def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
                x = args[0] if args else kwargs["hidden_states"]
                y = out[0] if isinstance(out, tuple | list) else out
                cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
                if current[0] is not None:
                    cos = cos[current[0].to(cos.device)]
                cos_sum[i] += cos.double().sum().cpu()

            return hook

        for i, block in enumerate(adapter.blocks):
            o_stats.append(LayerStats(shape.n_heads * hd, "sq_norms", device=device))
            d_stats.append(LayerStats(shape.intermediate, "sq_norms", device=device))
            handles.append(block.self_attn.o_proj.register_forward_pre_hook(observe(o_stats[i])))
            handles.append(block.mlp.down_proj.register_forward_pre_hook(observe(d_stats[i])))
            handles.append(block.register_forward_hook(influence(i), with_kwargs=True))
        ids = calibration.long()
        try:
            spans = [(b, min(b + batch_size, ids.shape[0])) for b in range(0, ids.shape[0], batch_size)]
            with inference_mode(model):
                for b0, b1 in tqdm(spans, desc=f"importance ({score})", unit="batch", disable=not progress):
                    current[0] = None if token_mask is None else token_mask[b0:b1].bool()
                    adapter.base(input_ids=ids[b0:b1].to(device))
                    tokens += (b1 - b0) * ids.shape[1] if token_mask is None else int(current[0].sum())
        finally:
            for h in handles:
                h.remove()
    groups, channels = [], []
    for i, block in enumerate(adapter.blocks):
        w_o = block.self_attn.o_proj.weight.detach().float().abs().sum(0).cpu()  # [n_heads*hd]
        w_d = block.mlp.down_proj.weight.detach().float().abs().sum(0).cpu()  # [intermediate]
        if needs_data:
            w_o = w_o * o_stats[i].sq_norms.cpu().sqrt()
            w_d = w_d * d_stats[i].sq_norms.cpu().sqrt()
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



__all__ = ["IMPORTANCE_VERSION", "SCORES", "Importance", "compute_importance"]
