import platform

import pytest

from calibrant import heap
from calibrant.errors import CalibrantError


def test_threshold_setting_reads_the_environment(monkeypatch):
    monkeypatch.delenv("CALIBRANT_MMAP_THRESHOLD", raising=False)
    assert heap.mmap_threshold_setting() == heap.DEFAULT_MMAP_THRESHOLD
    monkeypatch.setenv("CALIBRANT_MMAP_THRESHOLD", "0")
    assert heap.mmap_threshold_setting() == 0
    assert heap.bound_heap() is None  # 0: the allocator is left alone
    monkeypatch.setenv("CALIBRANT_MMAP_THRESHOLD", "4194304")
    assert heap.mmap_threshold_setting() == 4 << 20


@pytest.mark.parametrize("bad", ["lots", "-1", "1.5"])
def test_bad_threshold_is_one_clear_error(monkeypatch, bad):
    monkeypatch.setenv("CALIBRANT_MMAP_THRESHOLD", bad)
    with pytest.raises(CalibrantError, match="CALIBRANT_MMAP_THRESHOLD"):
        heap.bound_heap()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_bound_heap_sets_the_threshold_once(monkeypatch):
    monkeypatch.delenv("CALIBRANT_MMAP_THRESHOLD", raising=False)
    assert heap.bound_heap() == heap.DEFAULT_MMAP_THRESHOLD
    assert heap.bound_heap() == heap.DEFAULT_MMAP_THRESHOLD  # idempotent
    heap.release_freed_memory()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_relax_heap_ends_the_bound(monkeypatch):
    monkeypatch.delenv("CALIBRANT_MMAP_THRESHOLD", raising=False)
    assert heap.bound_heap() == heap.DEFAULT_MMAP_THRESHOLD
    heap.relax_heap()
    assert heap._BOUND is None
    assert heap.bound_heap() == heap.DEFAULT_MMAP_THRESHOLD  # a later compression bounds it again
    heap.relax_heap()
