"""A streamed model's blocks: read from the checkpoint when a block starts, written to the output when it ends.

:class:`StreamedBlocks` is the engine's :class:`~calibrant.engine.core.BlockStore` for a model larger than
memory. The embeddings and final norm are loaded once (the capture runs them), the LM head only at the end,
to be written; decoder block ``i`` is materialised from the checkpoint when the engine enters it and, when
the engine leaves it, its compressed weights go at once into their own shard of the output directory (in the
checkpoint's dtype: a block is computed on in float32) and its memory is released. ``finish`` writes the
shard of the embeddings, norm and head, the shard index, the config, the tokenizer and ``calibrant.json``.
Everything is written inside the temporary sibling directory that :func:`calibrant.cache.atomic_path` renames into place only at the very
end, so an interrupted run leaves no output (and its temporary directory is swept by the next run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from calibrant.errors import NumericalError
from calibrant.export.hf import EXTRAS_FILE, METADATA_FILE, quant_extras
from calibrant.models.adapter import Adapter
from calibrant.models.lazy import INDEX_FILE, Materializer


def shard_name(k: int, total: int) -> str:
    return f"model-{k:05d}-of-{total:05d}.safetensors"


class StreamedBlocks:
    """See the module docstring. ``out`` is the (temporary) output directory, created already."""

    def __init__(self, model: nn.Module, materializer: Materializer, out: Path, dtype: torch.dtype | None = None):
        self.model = model
        self.dtype = dtype  # the floating dtype tensors are written in (the checkpoint's); None: as computed
        self.adapter = Adapter(model)
        self.materializer = materializer
        self.out = out
        self.total = len(self.adapter.blocks) + 1  # one shard per block, one for the rest
        self.weight_map: dict[str, str] = {}
        self.extras: dict[str, torch.Tensor] = {}
        self.bytes = 0
        family = self.adapter.family
        self.rest = [*family.embeddings, *([family.final_norm] if family.final_norm else []), family.lm_head]
        self.rest = [p for p in self.rest if _has(model, p)]
        # the capture runs the base model (embeddings, blocks, final norm); an untied head (half a GB at 7 B in
        # float32) is read only by ``finish``, to write it
        self.head = family.lm_head
        for prefix in self.rest:
            if prefix != self.head:
                self._load(prefix)

    def _load(self, prefix: str) -> None:
        self.materializer.load(prefix)
        _check_finite(self.model.get_submodule(prefix), prefix)

    def prefix(self, index: int) -> str:
        return f"{self.adapter.block_prefix}.{index}"

    def enter(self, index: int) -> None:
        self.materializer.load(self.prefix(index), index)
        _check_finite(self.adapter.blocks[index], self.prefix(index))

    def leave(self, index: int, final: bool) -> None:
        prefix = self.prefix(index)
        if final:
            block = self.adapter.blocks[index]
            self._write(index + 1, _state(block, prefix, self.dtype))
            self.extras.update(quant_extras(block, prefix))
        self.materializer.release(prefix, index)

    def _write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        name = shard_name(k, self.total)
        save_file(tensors, str(self.out / name), metadata={"format": "pt"})
        self.weight_map.update({key: name for key in tensors})
        self.bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self, tokenizer: Any, metadata: dict[str, Any], source_dir: Path | None) -> None:
        """The last shard (embeddings, norm, head), the index, config, tokenizer and metadata."""
        from calibrant.models.ggufmeta import SOURCE_KV_FILE

        rest: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        if self.head in self.rest:
            self._load(self.head)  # a tied one is resident already, with the embeddings
        for prefix in self.rest:
            for name, p in self.model.get_submodule(prefix).named_parameters(prefix=prefix):
                if id(p) not in seen:  # a tied head is stored once, under the embeddings' name
                    seen.add(id(p))
                    rest[name] = _stored(p, self.dtype)
        self._write(self.total, rest)
        (self.out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": self.bytes},
                                                       "weight_map": dict(sorted(self.weight_map.items()))},
                                                      indent=2) + "\n")
        if self.dtype is not None:  # config.json names the dtype the files hold
            self.model.config.dtype = self.dtype
        self.model.config.save_pretrained(self.out)
        generation = getattr(self.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(self.out)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.out)
        if self.extras:
            (self.out / EXTRAS_FILE).parent.mkdir()
            save_file(self.extras, str(self.out / EXTRAS_FILE))
            metadata = {**metadata, "extras_file": EXTRAS_FILE}
        if source_dir is not None and (Path(source_dir) / SOURCE_KV_FILE).is_file():
            shutil.copyfile(Path(source_dir) / SOURCE_KV_FILE, self.out / SOURCE_KV_FILE)
        (self.out / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        for prefix in self.rest:
            self.materializer.release(prefix)


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _state(module: nn.Module, prefix: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The module's parameters under their full names, on the CPU, floating ones in ``dtype``."""
    return {name: _stored(p, dtype) for name, p in module.named_parameters(prefix=prefix)}


def _stored(p: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    cast = dtype if dtype is not None and p.is_floating_point() else p.dtype
    return p.detach().to(device="cpu", dtype=cast).contiguous()


def _check_finite(module: nn.Module, prefix: str) -> None:
    for name, p in module.named_parameters(prefix=prefix):
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise NumericalError(f"the model's weight {name} holds NaN/Inf values before any compression: the "
                                 "checkpoint is damaged (or overflowed when cast to a lower precision); re-save it")

