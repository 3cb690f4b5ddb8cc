"""Compressing a model larger than memory: when to stream it (the run itself: ``calibrant.api``).

``compress_model(..., stream=True)`` (CLI ``--stream``), or automatically when the model would not fit
(:func:`would_not_fit`), runs the same engine over a :func:`~calibrant.models.lazy.skeleton` whose decoder
blocks are read from the checkpoint's safetensors files one at a time and written to the output as soon as
they are compressed (:class:`~calibrant.export.streamed.StreamedBlocks`). The model keeps its checkpoint's
dtype on disk (a bf16 checkpoint gives a bf16 output); the block in memory is computed on in float32, as an
in-memory run computes, so both give the same weights. Peak memory is one block's weights in float32 plus
the calibration activations plus the statistics, whatever the depth; ``calibrant.json`` records the dtypes
and the peak count of resident blocks under ``streamed``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from calibrant.errors import CalibrantError

FIT_SHARE = 0.8  # a model is loaded in memory only when its weights stay under this share of free RAM
ACTIVATION_SHARE = 0.25  # the default activation budget: this share of the memory available when a run starts
_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (``MemAvailable``; total RAM where unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def in_memory_bytes(path: Path, dtype: torch.dtype = torch.float32) -> int:
    """What loading directory ``path`` in ``dtype`` takes: its weight files' bytes scaled from their dtype."""
    from calibrant.models.lazy import LazyCheckpoint

    checkpoint = LazyCheckpoint(path)
    return checkpoint.nbytes() * _BYTES.get(dtype, 4) // _BYTES.get(checkpoint.dtype(), 4)


def would_not_fit(path: Path, dtype: torch.dtype = torch.float32) -> tuple[bool, int, int]:
    """(stream?, bytes the in-memory load needs, bytes available): stream when a ``dtype`` load of the
    checkpoint's safetensors would exceed FIT_SHARE of the available memory. A checkpoint without
    safetensors is never streamed (it cannot be read lazily)."""
    free = available_memory()
    try:
        need = in_memory_bytes(path, dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError):
        return False, 0, free  # unreadable weight files: the in-memory loader names the damage in one line
    except CalibrantError as exc:  # no safetensors: it loads in memory if it fits, else the fix is said
        from calibrant.cache import human_bytes

        bins = sum(f.stat().st_size for f in Path(path).glob("pytorch_model*.bin"))
        if bins * _BYTES.get(dtype, 4) // 2 > FIT_SHARE * free:  # .bin checkpoints are mostly 16-bit
            raise CalibrantError(f"the model needs about {human_bytes(bins * 2)} in memory and "
                                 f"{human_bytes(free)} is available, and {exc}") from None
        return False, bins, free
    return need > FIT_SHARE * free, need, free


def activation_budget_bytes(value: int | str | None) -> int:
    """The calibration activations' budget in bytes: ``value`` (an int, or a size such as ``"2G"``), or by
    default ACTIVATION_SHARE of the memory available now."""
    if value is None:
        return int(ACTIVATION_SHARE * available_memory())
    if isinstance(value, str):
        import argparse

        from calibrant.argtypes import byte_size

        try:
            return byte_size(value)
        except argparse.ArgumentTypeError as e:
            raise CalibrantError(f"max_activation_memory {e}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CalibrantError(f"max_activation_memory must be a positive number of bytes or a size such as '2G', "
                             f"got {value!r}")
    return value


def block_memory(model: torch.nn.Module, statistics: set[str], activation_bytes: int) -> dict[str, int]:
    """Bytes a streamed compression holds at its peak, by part, everything in float32 (the compute dtype): one
    decoder block's weights plus a working copy of its largest linear; the embeddings, final norm and head
    (an upper bound: an untied head is read only at the end); the input statistics (``XᵀX`` of every distinct
    input width, three times for the solver's factorisations, when a method needs the Hessian; ``[in]``
    vectors otherwise); and the activation buffers held in memory (at most ``activation_bytes``)."""
    from calibrant.models.adapter import Adapter, weight_of

    adapter = Adapter(model)
    block = adapter.blocks[0]
    item = 4
    weights = sum(p.numel() for p in block.parameters()) * item
    linears = adapter.block_linears(0).values()
    largest = max((weight_of(m).numel() for m in linears), default=0) * 4
    rest = sum(p.numel() for p in model.parameters()) * item - weights * len(adapter.blocks)
    widths = {weight_of(m).shape[1] for m in linears}
    stats = sum(3 * w * w * 4 if "hessian" in statistics else 2 * w * 4 for w in widths) if statistics else 0
    return {"block weights": weights + largest, "embeddings and head": max(rest, 0), "statistics": stats,
            "activations": activation_bytes}


def check_block_fits(parts: dict[str, int], free: int | None = None) -> None:
    """Refuse, before any work, a streamed run whose peak (:func:`block_memory`) exceeds the memory available."""
    from calibrant.cache import human_bytes

    free = available_memory() if free is None else free
    total = sum(parts.values())
    if total > free:
        detail = ", ".join(f"{k} {human_bytes(v)}" for k, v in parts.items())
        raise CalibrantError(f"one block of this model does not fit in memory even streamed: it needs about "
                             f"{human_bytes(total)} ({detail}) and {human_bytes(free)} is available; lower "
                             "--max-activation-memory or --batch-size, or use a machine with more memory")
