"""How calibrant keeps glibc's heap from holding on to freed memory.

Layer-wise compression allocates and frees the same large temporaries block after block (batch
activations, weight copies, Hessians). glibc serves allocations above its mmap threshold with their
own mappings, returned to the OS on free, and everything below from heaps that keep freed memory for
reuse; the threshold grows on its own (up to 32 MB) after large frees, so most of these temporaries
end up in heaps. The freed-but-kept memory counts as resident: on SmolLM2-135M it was a third of a
GPTQ run's peak RSS.

:func:`bound_heap` fixes the mmap and trim thresholds at ``CALIBRANT_MMAP_THRESHOLD`` bytes (default
1 MiB; ``0`` leaves the allocator alone) when a compression starts, and :func:`relax_heap` sets them to
glibc's warmed-up values (32 MiB / 64 MiB) when it ends; :func:`release_freed_memory` trims the heaps
between blocks. The bound only decides where *new* memory comes from: free chunks a heap already holds
(after earlier work in a long-lived process) are still reused first, so the bound helps most in a
fresh process such as one `calibrant compress` run. All are no-ops where glibc's ``mallopt`` /
``malloc_trim`` do not exist (macOS, musl).

The bound costs time: memory given back is zeroed again by the kernel when it is reused. The
trade-off, measured by bench/gptq_vs_llmcompressor.py and bench/heap_policy.py, is in BENCHMARKS.md
(GPTQ on SmolLM2-135M: one arena without the bound was 2.5 s faster per run and held 0.18 GB more).
The bound is lifted at the end of each compression because forward-bound work (perplexity
evaluation) paid for it most.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

from calibrant.errors import CalibrantError

DEFAULT_MMAP_THRESHOLD = 1 << 20
RELAXED_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold (64-bit)
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3

_LIBC: Any = None
_BOUND: int | None = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC


def mmap_threshold_setting() -> int:
    """The threshold asked for by ``CALIBRANT_MMAP_THRESHOLD`` (bytes; 0 = leave glibc's default)."""
    text = os.environ.get("CALIBRANT_MMAP_THRESHOLD", "").strip()
    if not text:
        return DEFAULT_MMAP_THRESHOLD
    try:
        value = int(text)
    except ValueError:
        raise CalibrantError(
            f"CALIBRANT_MMAP_THRESHOLD must be a number of bytes (0 to disable), got '{text}'"
        ) from None
    if value < 0:
        raise CalibrantError(f"CALIBRANT_MMAP_THRESHOLD must be ≥ 0 (0 to disable), got {value}")
    return value


def bound_heap() -> int | None:
    """Fix glibc's mmap and trim thresholds (see the module docstring); returns the threshold in force
    (None when the allocator is left alone). Process-wide and idempotent."""
    global _BOUND
    value = mmap_threshold_setting()
    if value == 0 or not _libc():
        return None
    if _BOUND != value and _libc().mallopt(_M_MMAP_THRESHOLD, value) == 1:
        _libc().mallopt(_M_TRIM_THRESHOLD, value)
        _BOUND = value
    return _BOUND


def relax_heap() -> None:
    """Undo :func:`bound_heap` as far as glibc allows: the thresholds its dynamic adjustment reaches."""
    global _BOUND
    if _BOUND is not None and _libc():
        _libc().mallopt(_M_MMAP_THRESHOLD, RELAXED_MMAP_THRESHOLD)
        _libc().mallopt(_M_TRIM_THRESHOLD, 2 * RELAXED_MMAP_THRESHOLD)
        _BOUND = None


def release_freed_memory() -> None:
    """Give memory freed since the last call (weight copies, Hessians, activations) back to the OS."""
    if _libc():
        _libc().malloc_trim(0)


_MADV_POPULATE_WRITE = 23  # Linux ≥ 5.14 (asm-generic/mman-common.h)
_PAGE = 4096
_POPULATE_WORKS = True


def prefault_for_write(tensors: list[Any]) -> None:
    """Make the pages of CPU ``tensors`` writable now, in one ``madvise`` call per tensor.

    Weights loaded from safetensors are a private, copy-on-write mapping of the file: the first write
    to each 4 KiB page (compression writing its weights back) faults and copies it, one trap per page.
    One ``MADV_POPULATE_WRITE`` per tensor does the same copies in the kernel at once, several times
    faster here (bench/weight_writes.py, figures in BENCHMARKS.md). Contents are unchanged; a no-op
    for pages already private, on other devices, and where the call does not exist.
    """
    global _POPULATE_WORKS
    lib = _libc()
    if not lib or not _POPULATE_WORKS:
        return
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        span = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1  # elements, views too
        last = t.data_ptr() + span * t.element_size()
        start = t.data_ptr() // _PAGE * _PAGE  # the pages under this tensor's elements only
        end = -(-last // _PAGE) * _PAGE
        if lib.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_POPULATE_WRITE) != 0:
            _POPULATE_WORKS = False  # older kernel (EINVAL) or an unusual mapping: plain faults it is
            return
