"""Issue 20, item 1: SIGINT / SIGTERM stop a command with one line and exit 130 / 143, leaving neither
``--out`` nor its temporary; after a SIGKILL, the next command removes what the killed one left (only
temporaries whose name carries a dead calibrant process's tag), and a swap cut in half is restored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calibrant import interrupts
from calibrant.cache import HOST, atomic_path, check_space, sweep_stale
from calibrant.cli import main
from tests.calibration.calib_helpers import tiny_model_dir

TEXT = " ".join(f"word{i % 50} and the of" for i in range(400))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("CALIBRANT_CACHE", str(path))
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------ in process
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_writing_removes_the_temporary(tmp_path, cache, sig, code):
    interrupts.install()
    final = tmp_path / "out"
    with pytest.raises(interrupts.Interrupted) as exc:
        with atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "shard.safetensors").write_bytes(b"\0" * 4096)
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises at the next bytecode
    assert interrupts.exit_code(exc.value) == code
    assert _siblings(tmp_path) == ["cache"]
    assert list((cache / "inflight").iterdir()) == []


def test_signal_during_the_swap_waits_for_it(tmp_path, cache, monkeypatch):
    """A signal between moving the old output aside and the new one in would lose both: it is held."""
    interrupts.install()
    final = tmp_path / "out"
    final.write_text("old result")
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(interrupts.Interrupted):
        with atomic_path(final) as tmp:
            tmp.write_text("new result")
    assert len(calls) == 2  # both renames ran before the signal was raised
    assert final.read_text() == "new result"
    assert _siblings(tmp_path) == ["cache", "out"]


def test_failed_swap_puts_the_old_output_back(tmp_path, cache, monkeypatch):
    final = tmp_path / "out"
    final.write_text("old result")
    real = os.replace

    def replace(src, dst):
        if Path(dst) == final and str(src).endswith(".tmp"):  # the new output cannot go in
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        with atomic_path(final) as tmp:
            tmp.write_text("new result")
    monkeypatch.undo()
    assert final.read_text() == "old result"
    assert _siblings(tmp_path) == ["cache", "out"]


def test_sweep_removes_only_dead_owners_temporaries(tmp_path, cache):
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".model.{dead}@{HOST}.x1y2.tmp"
    (stale / "sub").mkdir(parents=True)
    live = tmp_path / f".model.{alive}@{HOST}.a1b2.tmp"
    live.mkdir()
    foreign = tmp_path / f".model.{dead}@ffffff.c3d4.tmp"  # another host's: not ours to judge
    foreign.mkdir()
    user = tmp_path / ".model.notes.tmp"
    user.write_text("a user's file")
    inflight = cache / "inflight"
    inflight.mkdir(parents=True)
    for owner, path in ((dead, stale), (alive, live), (dead, foreign)):
        (inflight / f"{owner}@{HOST}.{path.name[-8:-4]}").write_text(str(path))
    done = sweep_stale()
    assert done == [f"removed {stale}"]
    assert not stale.exists() and live.exists() and foreign.exists() and user.read_text() == "a user's file"
    assert sorted(p.name for p in inflight.iterdir()) == [f"{alive}@{HOST}.a1b2"]


def test_space_check_counts_what_a_killed_run_of_the_same_output_left(tmp_path, cache, monkeypatch):
    # a run killed by the OOM killer left its 20 GB temporary beside --out; the API's space check, before any
    # CLI sweep, refused the rerun that would have removed it
    dead = _dead_pid()
    stale = tmp_path / f".out.{dead}@{HOST}.x1y2.tmp"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "shard.safetensors").write_bytes(b"\0" * 4096)
    other = tmp_path / f".elsewhere.{dead}@{HOST}.x1y2.tmp"  # another output's: the CLI's sweep handles it
    other.mkdir()
    free = {"bytes": 1000}
    usage = __import__("collections").namedtuple("usage", "total used free")

    def disk_usage(path):
        return usage(10**9, 0, free["bytes"] + (0 if stale.exists() else 4096))

    monkeypatch.setattr("calibrant.cache.shutil.disk_usage", disk_usage)
    check_space(tmp_path / "out", 4000, "--out")
    assert not stale.exists() and other.exists()


def test_sweep_restores_an_output_a_kill_left_swapped_out(tmp_path, cache):
    dead = _dead_pid()
    old = tmp_path / f".model.{dead}@{HOST}.old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (cache / "inflight").mkdir(parents=True)
    (cache / "inflight" / f"{dead}@{HOST}.zz").write_text(str(old))
    assert sweep_stale() == [f"restored {tmp_path / 'model'} (a replacement was interrupted)"]
    assert (tmp_path / "model" / "config.json").read_text() == "{}" and not old.exists()


def test_cli_exits_143_with_one_line(tmp_path, cache, monkeypatch, capsys):
    def work(args):
        with atomic_path(tmp_path / "out") as tmp:
            tmp.mkdir()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

    monkeypatch.setattr("calibrant.cli.cmd_info", work)
    assert main(["info", str(tmp_path)]) == 143
    err = capsys.readouterr().err
    assert err == "calibrant: SIGTERM; stopped: nothing was written\n"
    assert _siblings(tmp_path) == ["cache"]


# ------------------------------------------------------------------ a real compress, signalled in its save
SAVE_HOLD = """
import sys, time, transformers
real = transformers.PreTrainedModel.save_pretrained
def held(self, *a, **k):
    real(self, *a, **k)
    print("SAVING", flush=True)
    time.sleep(60)
transformers.PreTrainedModel.save_pretrained = held
from calibrant.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _compress_until_saving(model: Path, text: Path, out: Path, env: dict) -> subprocess.Popen:
    argv = [sys.executable, "-c", SAVE_HOLD, "compress", "--model", str(model), "--method", "wanda",
            "--sparsity", "0.5", "--calibration", f"file:{text}:4x16", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    assert line == "SAVING\n", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


@pytest.fixture
def model(tmp_path):
    path = tiny_model_dir(tmp_path / "tiny", TEXT)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    return path, text


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_signal_during_the_final_save(model, tmp_path, cache, sig, code, word):
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "CALIBRANT_CACHE": str(cache)}
    proc = _compress_until_saving(*model, work / "out", env)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"calibrant: {'SIGTERM' if code == 143 else 'interrupted (SIGINT)'}; " \
                                          "stopped: nothing was written", err
    assert word in err
    assert _siblings(work) == []  # neither --out nor its temporary
    assert list((cache / "inflight").iterdir()) == []


def test_kill_9_during_the_final_save_is_cleaned_by_the_next_command(model, tmp_path, cache, capsys):
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "CALIBRANT_CACHE": str(cache)}
    proc = _compress_until_saving(*model, work / "out", env)
    proc.kill()
    proc.communicate(timeout=60)
    (left,) = _siblings(work)
    assert left.startswith(f".out.{proc.pid}@{HOST}.") and left.endswith(".tmp")
    assert (work / left / "model.safetensors").stat().st_size > 0  # a full-size leftover, until now
    assert main(["study", "preset"]) == 0  # any command
    err = capsys.readouterr().err
    assert f"removed {work / left} (left by a killed calibrant process)" in err
    assert _siblings(work) == []
