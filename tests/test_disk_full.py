"""Issue 20, item 2: a disk that is full (or a file-size limit) while a model is saved gives one line naming
the output and its size, exit 2, and no output or temporary; a disk known to be too small is refused before
the compression starts."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from calibrant.errors import disk_full, disk_full_reason
from tests.calibration.calib_helpers import run_cli, tiny_model_dir

TEXT = " ".join(f"word{i % 50} and the of" for i in range(400))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    path = tiny_model_dir(root, TEXT)
    text = root / "calib.txt"
    text.write_text(TEXT)
    return path, text


def test_disk_full_errors_are_recognised():
    assert disk_full_reason(OSError(28, "No space left on device")) == "no space left on the device"
    assert disk_full_reason(Exception("Error while serializing: I/O error: File too large (os error 27)")) \
        == "the file-size limit was reached"
    assert disk_full_reason(Exception("database or disk is full")) == "no space left on the device"
    assert disk_full_reason(OSError(13, "Permission denied")) is None
    assert disk_full_reason(ValueError("os error 280")) is None
    line = disk_full(OSError(28, "No space left on device"), "out", "1.2 GB")
    assert line.startswith("could not write out: no space left on the device (it needs about 1.2 GB); nothing")


def test_file_size_limit_while_saving(tiny, tmp_path):
    model, text = tiny
    limit = (model / "model.safetensors").stat().st_size // 2  # the tokenizer fits, the weights do not

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "calibrant", "compress", "--model", str(model), "--method",
                           "magnitude", "--sparsity", "0.5", "--out", str(work / "out"), "--quiet"],
                          capture_output=True, text=True, preexec_fn=cap, cwd=ROOT, timeout=300,
                          env={**os.environ, "CALIBRANT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"calibrant: error: could not write {work / 'out'}: the file-size limit was "
                                  "reached (it needs about "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert list(work.iterdir()) == []


def test_too_little_space_refused_before_compressing(tiny, tmp_path, capsys, monkeypatch):
    model, text = tiny

    def boom(*args, **kwargs):
        raise AssertionError("compression started although the output could not fit")

    monkeypatch.setattr("calibrant.api.compress", boom)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("calibrant.cache.shutil.disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    code, _, err = run_cli(capsys, "compress", "--model", model, "--method", "wanda", "--sparsity", "0.5",
                           "--calibration", f"file:{text}:4x16", "--out", tmp_path / "out", "--quiet")
    assert code == 2 and err.count("\n") == 1, err
    assert f"not enough disk space for --out {tmp_path / 'out'}: it needs about " in err and "1.0 kB free" in err
    assert not (tmp_path / "out").exists()


def test_file_size_limit_while_saving_a_calibration_set(tiny, tmp_path):
    model, text = tiny

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))  # the set's 64x16 int64 ids alone are 8 kB

    out = tmp_path / "work" / "calib.safetensors"
    out.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "calibrant", "calib", "make", f"file:{text}:64x16", "--model",
                           str(model), "--out", str(out), "--quiet"], capture_output=True, text=True,
                          preexec_fn=cap, cwd=ROOT, timeout=300,
                          env={**os.environ, "CALIBRANT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"calibrant: error: could not write {out}: the file-size limit was reached "
                                  "(it needs about 8.2 kB)"), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert list(out.parent.iterdir()) == []
