import json
import os
import platform
import subprocess
import sys

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


_PROBE = r"""
import json
import torch
from calibrant import heap


def rss_anon_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024


big = torch.ones(4 << 20)  # a freed 16 MB mapping raises glibc's dynamic threshold, as real runs do
del big
heap.bound_heap()
before = rss_anon_mb()
held, pins = [], []
for _ in range(100):
    held.append(torch.ones(512 * 1024))  # 2 MiB, pages touched
    pins.append(torch.ones(4096))  # 16 KiB that stay
grown = rss_anon_mb() - before
del held
print(json.dumps({"grown": grown, "left": rss_anon_mb() - before}))
"""


def _probe(threshold: str) -> dict:
    """Run the allocation pattern in a fresh interpreter: a long test session's heap already holds
    free chunks (trimmed to zero pages) that malloc reuses before it ever considers an mmap, which
    is not the state a compression run starts from."""
    env = {**os.environ, "CALIBRANT_MMAP_THRESHOLD": threshold}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_bounded_heap_gives_freed_tensors_back():
    """With the bound, 2 MiB tensors are served by their own mappings: freeing them lowers RSS at once,
    even when small long-lived tensors sit between them; without it they stay as holes in a heap."""
    bounded = _probe("")  # the default bound
    assert bounded["grown"] > 150
    assert bounded["left"] < 0.2 * bounded["grown"]
    unbounded = _probe("0")
    assert unbounded["grown"] > 150
    assert unbounded["left"] > 0.5 * unbounded["grown"]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_prefault_makes_a_private_file_mapping_writable_without_faults(tmp_path):
    import mmap
    import resource

    import torch

    data = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB: 1024 pages
    path = tmp_path / "weights.bin"
    path.write_bytes(data.numpy().tobytes())

    def mapped() -> tuple[mmap.mmap, torch.Tensor]:
        with open(path, "r+b") as f:  # copy-on-write, as transformers maps safetensors
            m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        t = torch.frombuffer(m, dtype=torch.float32)
        assert float(t.sum()) == float(data.sum())  # read: the pages are mapped, still shared with the file
        return m, t

    def faults_writing(t: torch.Tensor) -> int:
        src = torch.full_like(t, 2.0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t.copy_(src)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    m1, plain = mapped()
    assert faults_writing(plain) >= 1000  # one copy-on-write fault per page
    m2, weights = mapped()
    heap.prefault_for_write([weights[100:]])  # a view: its pages, from the one holding element 100
    if not heap._POPULATE_WORKS:
        pytest.skip("MADV_POPULATE_WRITE is not available on this kernel")
    assert torch.equal(weights, data)  # contents unchanged
    assert faults_writing(weights) < 50
    assert path.read_bytes() == data.numpy().tobytes()  # private: the file is untouched
    del plain, weights
    m1.close()
    m2.close()
