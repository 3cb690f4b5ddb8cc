"""Running a model one decoder block at a time over a fixed batch of calibration token ids."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibrant.models.adapter import Adapter


class _Capture(nn.Module):
    """Stands in for a block during capture: records its inputs and passes hidden states through."""

    def __init__(self, index: int, block: nn.Module, sink: Callable[..., None]):
        super().__init__()
        self.index = index
        self.block = block
        self._sink = sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._sink(self.index, hidden_states, args, kwargs)
        return hidden_states

    def __getattr__(self, name: str) -> Any:  # loops may read block attributes (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


class BlockwiseRunner:
    """Runs a model one decoder block at a time over a fixed batch of token ids."""

    def __init__(self, model: nn.Module, device: torch.device | str | None = None, batch_size: int = 8):
        self.model = model
        self.adapter = Adapter(model)
        self.model_device = next(p for p in model.parameters() if not p.is_meta).device
        self.device = torch.device(device) if device is not None else self.model_device
        self.batch_size = max(1, int(batch_size))
        self.token_mask: torch.Tensor | None = None  # [n, L] bool: the tokens the statistics count (None: all)
        self.block_kwargs: list[dict[int, tuple[tuple, dict]]] = []
        self.spill_dir: Path | None = None  # set: [n, L, hidden] buffers on the CPU live in files there

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised activation buffer on the runner's device; with :attr:`spill_dir` (CPU only) it is
        a memory-mapped file there, unlinked at once, so the kernel pages it out as needed and nothing is
        left on disk when the buffer is freed or the process dies."""
        if self.spill_dir is None or self.device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=self.device)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="activations.", suffix=".bin", dir=self.spill_dir)
        os.close(fd)
        try:
            buffer = torch.from_file(name, shared=True, size=math.prod(shape), dtype=dtype)
        finally:
            os.unlink(name)
        return buffer.view(shape)

    def mask_for(self, span: tuple[int, int]) -> torch.Tensor | None:
        """The token mask of the calibration rows ``span`` (None: every token counts)."""
        return None if self.token_mask is None else self.token_mask[span[0]:span[1]]

    def batches(self, n: int) -> list[tuple[int, int]]:
        return [(b, min(b + self.batch_size, n)) for b in range(0, n, self.batch_size)]

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Inputs of block 0 as one ``[n, L, hidden]`` tensor; remembers every block's other arguments."""
        blocks = self.adapter.blocks
        self.block_kwargs = [{} for _ in blocks]
        n = input_ids.shape[0]
        first: list[torch.Tensor] = []  # one [n, L, hidden] buffer, filled batch by batch
        row = [0]

        def sink(index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
            size = hidden.shape[0]
            if size not in self.block_kwargs[index]:
                self.block_kwargs[index][size] = _to_device((args, kwargs), self.device)
            if index == 0:
                if not first:
                    first.append(self.empty((n, *hidden.shape[1:]), hidden.dtype))
                first[0][row[0] : row[0] + size] = hidden
                row[0] += size

        originals = list(blocks)
        for i, block in enumerate(originals):
            blocks[i] = _Capture(i, block, sink)
        try:
            for b0, b1 in self.batches(input_ids.shape[0]):
                ids = input_ids[b0:b1].to(self.model_device)
                self.adapter.base(input_ids=ids, use_cache=False)
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block
        return first[0]

    @torch.no_grad()
    def run_block(self, index: int, inputs: torch.Tensor, outputs: torch.Tensor | None) -> None:
        """Run block ``index`` over ``inputs`` batch by batch, writing into ``outputs`` (if given)."""
        block = self.adapter.blocks[index]
        for b0, b1 in self.batches(inputs.shape[0]):
            args, kwargs = self.block_kwargs[index][b1 - b0]
            out = block(inputs[b0:b1], *args, **kwargs)
            if isinstance(out, tuple | list):
                out = out[0]
            if outputs is not None:
                outputs[b0:b1] = out
