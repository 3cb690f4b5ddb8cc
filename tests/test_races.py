"""Issue 20, item 5: two commands racing for one output. The second is refused at once, naming the
process that holds the output; an output that appears from elsewhere mid-run is neither clobbered nor
allowed to swallow this run's result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from calibrant.cache import atomic_path, release_output
from calibrant.errors import OutputExistsError
from calibrant.export.hf import check_output
from tests.calibration.calib_helpers import run_cli, tiny_model_dir

TEXT = " ".join(f"word{i % 50} and the of" for i in range(400))
ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from calibrant.export.hf import check_output
check_output(sys.argv[1], False)
print("HELD", flush=True)
time.sleep(120)
"""


def test_second_writer_of_one_output_is_refused_at_once(tmp_path, capsys):
    model = tiny_model_dir(tmp_path, TEXT)
    capsys.readouterr()
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env=os.environ.copy())
    try:
        assert holder.stdout.readline() == "HELD\n"
        code, _, err = run_cli(capsys, "compress", "--model", model, "--method", "magnitude", "--sparsity", "0.5",
                               "--out", out, "--quiet")
        assert code == 2 and err.count("\n") == 1, err
        assert f"--out {out} is being written by pid {holder.pid} on " in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_cli(capsys, "compress", "--model", model, "--method", "magnitude", "--sparsity", "0.5",
                           "--out", out, "--quiet")  # the holder is gone: the output is free again
    assert code == 0, err
    assert (out / "calibrant.json").is_file()


def test_one_process_may_claim_its_own_output_again(tmp_path):
    out = tmp_path / "out"
    check_output(out, False)
    check_output(out, False)
    release_output(out)


def test_output_appearing_meanwhile_is_not_clobbered_and_the_result_is_kept(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(OutputExistsError, match=f"this result is kept as {final}.{os.getpid()}"):
        with atomic_path(final, overwrite=False) as tmp:
            tmp.write_text("ours")
            final.write_text("theirs")
    assert final.read_text() == "theirs"
    assert (tmp_path / f"out.{os.getpid()}").read_text() == "ours"


ACQUIRE = """
import pathlib, sys, time
from calibrant.acquire import acquire_once
log, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def ready():
    return target.read_text() if target.is_file() else None
def acquire():
    with open(log, "a") as f:
        f.write("acquired\\n")
    time.sleep(2)
    target.write_text("asset")
print(acquire_once("models", ready, acquire), flush=True)
"""


def test_two_processes_acquiring_one_asset_acquire_it_once(tmp_path):
    env = {**os.environ, "CALIBRANT_CACHE": str(tmp_path / "cache")}
    args = [str(tmp_path / "log"), str(tmp_path / "asset")]
    procs = [subprocess.Popen([sys.executable, "-c", ACQUIRE, *args], stdout=subprocess.PIPE, text=True, env=env,
                              cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == ["asset\n", "asset\n"]
    assert (tmp_path / "log").read_text() == "acquired\n"  # the second waited for the first, then found it ready
