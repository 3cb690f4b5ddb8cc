"""Running studies: results stored once, resume without loss or duplicates, failures recorded."""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from calibrant.studies import ResultStore, StoreError, load_study, run_study
from conftest import write_spec


def _rows(db):
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT key, method, status, calib_source, seed FROM runs").fetchall()


def test_local_study_runs_once_and_resumes(study_env, tmp_path):
    spec = load_study(write_spec(tmp_path / "s.yaml", study_env))
    db = tmp_path / "r.sqlite"
    first = run_study(spec, db, progress=False)
    assert (first.planned, first.done, first.failed, first.skipped) == (6, 6, 0, 0)
    rows = _rows(db)
    assert len(rows) == 6 and len({r[0] for r in rows}) == 6
    with sqlite3.connect(db) as conn:
        ppl = dict(conn.execute("SELECT r.label, m.value FROM runs r JOIN metrics m ON m.run_key = r.key "
                                "WHERE m.name = 'ppl:wiki' AND r.method != 'wanda'"))
        sparsity = conn.execute("SELECT value FROM metrics WHERE name='sparsity'").fetchall()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert ppl["magnitude sparsity=0.5"] != ppl["dense"]
    assert sparsity and all(abs(v - 0.5) < 1e-6 for (v,) in sparsity)
    second = run_study(spec, db, progress=False)
    assert (second.done, second.failed, second.skipped) == (0, 0, 6)
    assert sorted(_rows(db)) == sorted(rows)


def test_failing_run_is_recorded_and_study_continues(study_env, tmp_path):
    # 2:3 needs in_features divisible by 3; the tiny model's 32 is not: that run fails, the others finish
    spec = load_study(write_spec(tmp_path / "s.yaml", study_env, methods=[
        {"name": "dense"}, {"name": "wanda", "sparsity": 0.5, "pattern": [None, "2:3"]}],
        calibration={"sources": ["wiki"], "n": 4, "length": 32, "seeds": [0]}))
    db = tmp_path / "r.sqlite"
    summary = run_study(spec, db, progress=False)
    assert (summary.done, summary.failed) == (2, 1)
    with sqlite3.connect(db) as conn:
        status, error = conn.execute("SELECT status, error FROM runs WHERE label LIKE '%2:3%'").fetchone()
    assert status == "failed" and "2:3" in error and "RecipeError" in error
    assert run_study(spec, db, progress=False).skipped == 3  # failures are not retried by default
    retried = run_study(spec, db, progress=False, retry_failed=True)
    assert (retried.failed, retried.skipped) == (1, 2) and len(_rows(db)) == 3


def test_non_finite_result_is_a_failure(study_env, tmp_path, monkeypatch):
    P = importlib.import_module("calibrant.evaluate.perplexity")  # the package re-exports a function of that name
    real = P.perplexity

    def broken(*args, **kwargs):
        res = real(*args, **kwargs)
        res.ppl = float("nan")
        return res

    monkeypatch.setattr(P, "perplexity", broken)
    spec = load_study(write_spec(tmp_path / "s.yaml", study_env, methods=[{"name": "dense"}]))
    run_study(spec, tmp_path / "r.sqlite", progress=False)
    with sqlite3.connect(tmp_path / "r.sqlite") as conn:
        status, error = conn.execute("SELECT status, error FROM runs").fetchone()
    assert status == "failed" and "non-finite" in error and "ppl:wiki=nan" in error


def test_store_refuses_bad_databases(tmp_path):
    db = tmp_path / "r.sqlite"
    with ResultStore(db, lock=True):
        with pytest.raises(StoreError, match="locked by another running study"):
            ResultStore(db, lock=True)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value='0' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="schema version 0.*start a new --db"):
        ResultStore(db)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a calibrant study database"):
        ResultStore(junk)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a calibrant study database"):
        ResultStore(other)


def _meta_only(path, version: str, runs_sql: str | None = None):
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (version,))
        if runs_sql:
            conn.execute(runs_sql)


@pytest.mark.parametrize("create", [True, False])
def test_store_refuses_damaged_and_foreign_schemas(tmp_path, create):
    _meta_only(tmp_path / "abc.sqlite", "abc")
    with pytest.raises(StoreError, match="unreadable study schema version 'abc'"):
        ResultStore(tmp_path / "abc.sqlite", create=create)
    _meta_only(tmp_path / "foreign.sqlite", "1", "CREATE TABLE runs (a INTEGER)")
    with pytest.raises(StoreError, match="tables do not match.*runs lacks .*not written by calibrant"):
        ResultStore(tmp_path / "foreign.sqlite", create=create)


def test_read_only_opening_changes_nothing(tmp_path, study_env):
    """status / export / report open with create=False: the file keeps its journal mode and its tables."""
    db = tmp_path / "r.sqlite"
    spec = load_study(write_spec(tmp_path / "s.yaml", study_env, methods=[{"name": "dense"}]))
    run_study(spec, db, progress=False)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("DROP TABLE study_runs")  # as an older calibrant wrote it
    before = db.read_bytes()
    with ResultStore(db, create=False) as store:
        assert store.counts(spec.name) == {"done": 1}
    assert db.read_bytes() == before
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with pytest.raises(StoreError, match="empty file, not a calibrant study database"):
        ResultStore(empty, create=False)
    assert empty.read_bytes() == b""


def test_disk_errors_are_not_called_foreign_databases(tmp_path):
    from calibrant.studies.store import store_error

    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    assert "disk full" in str(store_error(tmp_path / "r.sqlite", full))
    assert "not a calibrant" not in str(store_error(tmp_path / "r.sqlite", full))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def _count(db, status="done") -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs WHERE status=?", (status,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.parametrize("victim", ["worker", "driver", "sigterm"])
def test_kill_mid_study_then_resume_loses_and_duplicates_nothing(study_env, tmp_path, victim):
    methods = [{"name": "dense"}, {"name": "sparsegpt", "sparsity": [0.3, 0.5, 0.7]}]
    spec_path = write_spec(tmp_path / "s.yaml", study_env, methods=methods,
                           calibration={"sources": ["wiki", "news"], "n": 8, "length": 64, "seeds": [0, 1, 2]},
                           evaluation={"perplexity": ["wiki", "news"], "max_tokens": 4096, "seq_len": 64})
    total = 1 + 3 * 2 * 3
    db = tmp_path / "r.sqlite"
    cmd = [sys.executable, "-m", "calibrant", "study", "run", str(spec_path), "--db", str(db), "--quiet",
           "--executor", "processes", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    deadline = time.time() + 240
    while _count(db) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    before = _count(db)
    assert proc.poll() is None and before < total, "the study finished before it could be interrupted"
    workers = _children(proc.pid)
    if victim == "worker":
        os.kill(workers[-1], signal.SIGKILL)
    elif victim == "sigterm":  # the driver only (as `kill PID` does): it must stop its workers itself
        os.kill(proc.pid, signal.SIGTERM)
    else:
        for child in workers:
            os.kill(child, signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)
    stopping = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    if victim == "worker":
        assert "worker process died" in err and "rerun the same command" in err
    if victim == "sigterm":
        assert proc.returncode == 143 and time.time() - stopping < 30, err
        assert err.strip().splitlines()[-1] == ("calibrant: SIGTERM; stopped: the runs already finished are kept in "
                                                "--db; rerun the same command to resume"), err
        time.sleep(1)
        assert not [w for w in workers if _alive(w)], "workers outlived their driver"
    after_kill = _rows(db)
    assert len(after_kill) >= before and len({r[0] for r in after_kill}) == len(after_kill)
    with sqlite3.connect(db) as conn:
        started = conn.execute("SELECT COUNT(DISTINCT run_key) FROM attempts").fetchone()[0]
    assert started > len(after_kill)  # some runs were in flight when it died

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert rerun.returncode == 0, rerun.stderr
    rows = _rows(db)
    assert len(rows) == total and len({r[0] for r in rows}) == total
    assert all(r[2] == "done" for r in rows)
    assert set(after_kill) <= set(rows)  # nothing finished before the crash was lost or rewritten
    assert f"{len(after_kill)} already in" in rerun.stdout


def test_ray_local_two_run_study(study_env, tmp_path):
    pytest.importorskip("ray")
    spec = load_study(write_spec(tmp_path / "s.yaml", study_env, methods=[{"name": "dense"},
                                                                         {"name": "magnitude", "sparsity": 0.5}]))
    ray_db, local_db = tmp_path / "ray.sqlite", tmp_path / "local.sqlite"
    summary = run_study(spec, ray_db, executor="ray", workers=2, progress=False)
    assert (summary.done, summary.failed) == (2, 0)
    run_study(spec, local_db, progress=False)

    def metrics(db):
        with sqlite3.connect(db) as conn:
            return dict(((k, n), v) for k, n, v in conn.execute("SELECT run_key, name, value FROM metrics"))

    ray_m, local_m = metrics(ray_db), metrics(local_db)
    assert ray_m.keys() == local_m.keys()
    assert all(math.isclose(ray_m[k], local_m[k], rel_tol=1e-5) for k in ray_m)
    with sqlite3.connect(ray_db) as conn:
        pids = {json.loads(d).get("pid") for (d,) in conn.execute("SELECT details FROM runs")} - {None}
    assert os.getpid() not in pids


def test_runs_are_shared_between_studies(study_env, tmp_path):
    db = tmp_path / "r.sqlite"
    first = load_study(write_spec(tmp_path / "a.yaml", study_env, name="a"))
    run_study(first, db, progress=False)
    second = load_study(write_spec(tmp_path / "b.yaml", study_env, name="b", methods=[
        {"name": "dense"}, {"name": "wanda", "sparsity": 0.5}, {"name": "wanda", "sparsity": 0.6}]))
    summary = run_study(second, db, progress=False)
    assert (summary.skipped, summary.done) == (5, 4)  # dense + 4 wanda-0.5 runs were finished by study a
    with ResultStore(db) as store:
        assert store.studies() == ["a", "b"]
        assert store.counts("a") == {"done": 6} and store.counts("b") == {"done": 9}
        assert len(store.frame("b")) == 9 and len(store.frame()) == 10


def test_disk_full_while_recording_names_the_database(study_env, tmp_path, monkeypatch):
    from calibrant.studies.store import ResultStore as Store

    def full(self, row, metrics):
        exc = sqlite3.OperationalError("database or disk is full")
        exc.sqlite_errorcode = sqlite3.SQLITE_FULL
        raise exc

    monkeypatch.setattr(Store, "record_run", full)
    spec = load_study(write_spec(tmp_path / "s.yaml", study_env, methods=[{"name": "dense"}]))
    with pytest.raises(StoreError, match=r"could not read or write .*r\.sqlite: database or disk is full .*"
                                         r"the database keeps every run it had"):
        run_study(spec, tmp_path / "r.sqlite", progress=False)
