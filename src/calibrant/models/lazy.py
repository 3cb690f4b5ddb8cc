"""Models larger than memory: a checkpoint read one module at a time.

:class:`LazyCheckpoint` indexes a Hugging Face directory's safetensors files (one file, or the shards
``model.safetensors.index.json`` lists) and reads a tensor only when asked, memory-mapped by safetensors.
:func:`skeleton` builds the model from its config with every parameter on the meta device (no memory);
buffers that are computed rather than stored (rotary frequencies, causal masks) are real. A
:class:`Materializer` then loads one module at a time (a decoder block, the embeddings) into the skeleton, in
a given dtype (calibrant computes in float32) or the checkpoint's own, and releases it back to the meta
device when it is done, counting the decoder blocks that are resident so that a caller (and the tests) can
hold it to a bound.

Loading assigns ``parameter.data``: parameters shared between modules (tied input and output embeddings)
are one object, so they are loaded and released together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from torch import nn

from calibrant.errors import ModelError

INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class LazyCheckpoint:
    """The safetensors tensors of a model directory, read on demand (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"{index} is unreadable ({exc}); re-save the model") from exc
            files = {name: self.path / shard for name, shard in weight_map.items()}
        else:
            single = sorted(self.path.glob("*.safetensors"))
            if not single:
                bins = sorted(self.path.glob("pytorch_model*.bin"))
                what = f"only PyTorch {bins[0].name}" if bins else "no weight files"
                raise ModelError(f"{self.path} has {what}; streaming reads safetensors: convert it once with "
                                 "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) on a machine "
                                 "with enough memory, or load it in memory")
            files = {}
            for file in single:
                with safe_open(str(file), framework="pt") as f:
                    files.update({name: file for name in f.keys()})
        self.files: dict[str, Path] = files
        self._handles: dict[Path, Any] = {}
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def keys(self) -> list[str]:
        return list(self.files)

    def _open(self, file: Path) -> Any:
        if not file.is_file():
            raise ModelError(f"{file} is missing (listed in {INDEX_FILE}); re-download or re-save the model")
        return safe_open(str(file), framework="pt")

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return self._handles[file]

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype string, shape) of tensor ``name``, read from the header only."""
        if name not in self._meta:  # every tensor of the file at once, and the file not kept mapped
            with self._open(self.files[name]) as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    self._meta[key] = (sl.get_dtype(), tuple(sl.get_shape()))
        return self._meta[name]

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (its pages are read from disk as it is used)."""
        if name not in self.files:
            raise ModelError(f"{self.path} has no tensor '{name}'; the checkpoint does not match its config.json")
        return self._handle(self.files[name]).get_tensor(name)

    def nbytes(self) -> int:
        """The weight files' total size on disk."""
        return sum(f.stat().st_size for f in set(self.files.values()))

    def dtype(self) -> torch.dtype:
        """The floating dtype most of the checkpoint's bytes are in (its ``torch_dtype``)."""
        weight: dict[torch.dtype, int] = {}
        for name in self.files:
            code, shape = self.info(name)
            if code in _DTYPES:
                weight[_DTYPES[code]] = weight.get(_DTYPES[code], 0) + int(torch.Size(shape).numel())
        return max(weight, key=lambda d: weight[d]) if weight else torch.float32

    def unmap(self, names: list[str]) -> None:
        """Close the memory maps of the files holding tensors ``names``: their pages leave the process (a file
        still needed is mapped again on the next :meth:`get`)."""
        for file in {self.files[n] for n in names if n in self.files}:
            self._handles.pop(file, None)

    def close(self) -> None:
        self._handles.clear()


def skeleton(path: str | Path, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """The model of directory ``path`` built from its config with parameters on the meta device."""
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied input and output embeddings: one parameter, loaded once
    model.eval()
    return model


class Materializer:
    """Loads modules of a :func:`skeleton` from a :class:`LazyCheckpoint` and releases them (see the module
    docstring). ``resident`` holds the decoder blocks loaded now, ``peak_blocks`` the most at any moment."""

    def __init__(self, model: nn.Module, checkpoint: LazyCheckpoint, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None):
        self.model = model
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.dtype = dtype
        prefix = getattr(model, "base_model_prefix", "") or ""
        self._strip = f"{prefix}." if prefix else ""
        self.resident: set[int] = set()
        self.peak_blocks = 0
        # every (module, attribute) holding each parameter, under the parameter's first name: a tied weight
        # is replaced in all its owners at once
        self._owners: dict[str, list[tuple[nn.Module, str]]] = {}
        self._aliases: dict[str, list[str]] = {}  # every name of each parameter
        self._name_of: dict[tuple[int, str], str] = {}
        first: dict[int, str] = {}
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for attr, p in module._parameters.items():
                if p is None:
                    continue
                full = f"{mod_name}.{attr}" if mod_name else attr
                canonical = first.setdefault(id(p), full)
                self._owners.setdefault(canonical, []).append((module, attr))
                self._aliases.setdefault(canonical, []).append(full)
                self._name_of[(id(module), attr)] = canonical

    def _params(self, prefix: str) -> list[str]:
        """Canonical names of the parameters of module ``prefix`` (each shared one once)."""
        module = self.model.get_submodule(prefix)
        names = []
        for sub in module.modules():
            for attr, p in sub._parameters.items():
                if p is not None:
                    names.append(self._name_of[(id(sub), attr)])
        return list(dict.fromkeys(names))

    def _set(self, canonical: str, value: torch.Tensor) -> None:
        param = nn.Parameter(value, requires_grad=False)
        for module, attr in self._owners[canonical]:
            module._parameters[attr] = param

    def load(self, prefix: str, block: int | None = None) -> None:
        """Materialise module ``prefix`` (e.g. ``model.layers.3``) from the checkpoint; ``block``: its
        decoder-block index, counted in :attr:`resident`."""
        read: list[str] = []
        for name in self._params(prefix):
            module, attr = self._owners[name][0]
            current = module._parameters[attr]
            assert current is not None
            if not current.is_meta:
                continue  # already loaded (a tied weight loaded with its other owner)
            source = next((c for c in self._candidates(name) if c in self.checkpoint), None)
            if source is None:
                raise ModelError(f"{self.checkpoint.path} has no tensor '{name}'; the checkpoint does not match "
                                 "its config.json")
            value = self.checkpoint.get(source)
            read.append(source)
            if tuple(value.shape) != tuple(current.shape):
                raise ModelError(f"{self.checkpoint.path}: tensor {name} is {tuple(value.shape)} but the config "
                                 f"makes it {tuple(current.shape)}; use the config.json these weights were saved with")
            dtype = self.dtype if (self.dtype is not None and value.is_floating_point()) else value.dtype
            # a copy, always: ``value`` lives in the shard's private memory map, and compressing it in place
            # would turn each written page into anonymous memory held until the file is closed — every
            # block of the run at once
            self._set(name, value.to(device=self.device, dtype=dtype, copy=True))
        # copied: the shards read are unmapped, or their pages would count in this process's memory, every
        # block read so far
        self.checkpoint.unmap(read)
        if block is not None:
            self.resident.add(block)
            self.peak_blocks = max(self.peak_blocks, len(self.resident))

    def _candidates(self, name: str) -> list[str]:
        """Checkpoint names to try for parameter ``name``: each of its names (a checkpoint stores a tied weight
        under one of them), each also without the base model's prefix."""
        out = []
        for full in self._aliases[name]:
            out.append(full)
            if self._strip and full.startswith(self._strip):
                out.append(full[len(self._strip):])
        return out

    def release(self, prefix: str, block: int | None = None) -> None:
        """Give module ``prefix``'s tensors back to the meta device (their memory is freed)."""
        for name in self._params(prefix):
            module, attr = self._owners[name][0]
            current = module._parameters[attr]
            assert current is not None
            if not current.is_meta:
                self._set(name, torch.empty(current.shape, dtype=current.dtype, device="meta"))
        if block is not None:
            self.resident.discard(block)
