"""The results store: one SQLite file per study database (WAL mode, one transaction per finished run).

Schema (version 1) — query it with plain SQL or ``pandas.read_sql``::

    meta(key TEXT PRIMARY KEY, value TEXT)            -- schema_version, created, calibrant_version
    runs(key TEXT PRIMARY KEY,                         -- content hash: model, method+params, calibration
                                                       --   set, evaluation, calibrant version
         spec_key TEXT, study TEXT, status TEXT,       -- status: 'done' | 'failed'
         model TEXT, model_hash TEXT, method TEXT, label TEXT, params TEXT (JSON),
         calibration TEXT, calib_source TEXT, seed INTEGER, calib_hash TEXT,
         evaluation TEXT (JSON), error TEXT, wall_s REAL, compress_s REAL, eval_s REAL,
         peak_rss_mb REAL, host TEXT, calibrant_version TEXT, started TEXT, finished TEXT,
         details TEXT (JSON: compression report, perplexity protocols, task results))
    metrics(run_key TEXT, name TEXT, value REAL,       -- e.g. ('ppl:wiki', 23.1), ('acc:arc_easy', 0.51)
            PRIMARY KEY (run_key, name))
    attempts(run_key TEXT, study TEXT, started TEXT, pid INTEGER, host TEXT)  -- a run began; never deleted
    study_runs(study TEXT, run_key TEXT)               -- a run found done by another study is shared, not redone

A run's row and its metrics are written in one transaction, so a crash (even ``kill -9``) leaves
either the whole finished run or nothing of it; the ``attempts`` table keeps the trace of runs that
were interrupted. A second study cannot write to a database another running study holds: the
holder takes an exclusive lock on ``<db>.lock`` for its lifetime (released by the OS if it dies).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

from calibrant.cache import try_lock
from calibrant.errors import CalibrantError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY, spec_key TEXT NOT NULL, study TEXT NOT NULL, status TEXT NOT NULL,
    model TEXT, model_hash TEXT, method TEXT, label TEXT, params TEXT,
    calibration TEXT, calib_source TEXT, seed INTEGER, calib_hash TEXT, evaluation TEXT,
    error TEXT, wall_s REAL, compress_s REAL, eval_s REAL, peak_rss_mb REAL, host TEXT,
    calibrant_version TEXT, started TEXT, finished TEXT, details TEXT
);
CREATE INDEX IF NOT EXISTS runs_study ON runs (study);
CREATE INDEX IF NOT EXISTS runs_spec_key ON runs (spec_key);
CREATE TABLE IF NOT EXISTS metrics (
    run_key TEXT NOT NULL REFERENCES runs(key), name TEXT NOT NULL, value REAL, PRIMARY KEY (run_key, name)
);
CREATE TABLE IF NOT EXISTS attempts (run_key TEXT NOT NULL, study TEXT, started TEXT, pid INTEGER, host TEXT);
"""
# which studies a run belongs to: a run is stored once (by content key) and shared by every study that plans it
_MEMBERS = """
CREATE TABLE IF NOT EXISTS study_runs (study TEXT NOT NULL, run_key TEXT NOT NULL, PRIMARY KEY (study, run_key));
INSERT OR IGNORE INTO study_runs SELECT study, key FROM runs;
"""

RUN_COLUMNS = ("key", "spec_key", "study", "status", "model", "model_hash", "method", "label", "params",
               "calibration", "calib_source", "seed", "calib_hash", "evaluation", "error", "wall_s", "compress_s",
               "eval_s", "peak_rss_mb", "host", "calibrant_version", "started", "finished", "details")


class StoreError(CalibrantError):
    """The results database cannot be used (wrong schema, locked by another study, not a database)."""


# the columns every reader relies on (a version-1 meta over other tables is someone else's database)
_REQUIRED = {"runs": RUN_COLUMNS, "metrics": ("run_key", "name", "value"), "attempts": ("run_key", "study")}


def store_error(path: Path, exc: sqlite3.Error) -> StoreError:
    """One line for an SQLite failure: a file that is not a database is not the same fault as a full disk."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_NOTADB:
        return StoreError(f"{path} is not a calibrant study database ({exc}); give a new --db path")
    if code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR) or "disk" in str(exc):
        return StoreError(f"could not read or write {path}: {exc} (disk full or failing?); free space or move "
                          "--db, then rerun: the database keeps every run it had")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return StoreError(f"cannot open {path}: {exc}; check its permissions or give another --db")
    return StoreError(f"{path}: {exc}; if the file is not a calibrant study database, give a new --db path")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class ResultStore:
    """A study database. ``ResultStore(path)`` opens (and creates) it; ``lock=True`` makes this process
    the only writer until :meth:`close`."""

    def __init__(self, path: str | Path, *, create: bool = True, lock: bool = False):
        """``create=False`` opens an existing database read-only: nothing in the file is changed (its
        journal mode included), so status, export and report can be pointed at any file safely."""
        self.path = Path(path)
        self._lock_file = None
        self.readonly = not create
        if not self.path.exists() and not create:
            raise StoreError(f"no study database at {self.path}; run 'calibrant study run SPEC --db {self.path}' first")
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory; --db takes a file path such as results.sqlite")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if lock:
            self._take_lock()
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=30.0)
            if not self.readonly:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            self._release_lock()
            raise store_error(self.path, exc) from None
        except BaseException:
            self._release_lock()
            raise

    # ------------------------------------------------------------ locking
    def _take_lock(self) -> None:
        f, holder = try_lock(self.path.with_name(self.path.name + ".lock"), f" since {now()}")
        if f is None:
            raise StoreError(f"{self.path} is locked by another running study ({holder or 'another process'}); "
                             "wait for it to finish or give a different --db")
        self._lock_file = f

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            import fcntl

            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()
        self._release_lock()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ schema
    def _check_schema(self) -> None:
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            raise StoreError(f"{self.path} is an SQLite database but not a calibrant study database (tables: "
                             f"{', '.join(sorted(tables))}); give a new --db path")
        if "meta" in tables:
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            try:
                version = int(row[0]) if row else None
            except (TypeError, ValueError):
                raise StoreError(f"{self.path} has an unreadable study schema version {row[0]!r} (a damaged or "
                                 "foreign database); give a new --db path") from None
            if version != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has study schema version {version}, this calibrant writes version {SCHEMA_VERSION}; "
                    "export its results with the calibrant that wrote it ('calibrant study export --csv') and start "
                    "a new --db, or rerun the study into a new --db (finished runs cannot be mixed across schemas)")
            missing = {table: sorted(set(columns) - self._columns(table)) for table, columns in _REQUIRED.items()}
            missing = {t: c for t, c in missing.items() if c}
            if missing:
                raise StoreError(f"{self.path} says study schema version {version} but its tables do not match ("
                                 + "; ".join(f"{t} lacks {', '.join(c[:3])}{', …' if len(c) > 3 else ''}"
                                             for t, c in missing.items())
                                 + "); it was not written by calibrant: give a new --db path")
            if self.readonly:  # older databases lack study_runs: derive it in a temporary table, not in the file
                if "study_runs" not in tables:
                    self.conn.executescript(_MEMBERS.replace("CREATE TABLE IF NOT EXISTS study_runs",
                                                             "CREATE TEMP TABLE study_runs"))
                return
            with self.conn:
                self.conn.executescript(_MEMBERS)
            return
        if self.readonly:
            raise StoreError(f"{self.path} is an empty file, not a calibrant study database; run 'calibrant study "
                             f"run SPEC --db {self.path}' first")
        from calibrant import __version__

        with self.conn:
            self.conn.executescript(_SCHEMA + _MEMBERS)
            self.conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema_version", str(SCHEMA_VERSION)), ("created", now()), ("calibrant_version", __version__)])

    def _columns(self, table: str) -> set[str]:
        return {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}

    # ------------------------------------------------------------ writing
    def record_attempt(self, key: str, study: str, pid: int | None = None) -> None:
        with self.conn:
            self.conn.execute("INSERT INTO attempts VALUES (?, ?, ?, ?, ?)",
                              (key, study, now(), pid or os.getpid(), socket.gethostname()))

    def record_run(self, row: dict[str, Any], metrics: dict[str, float]) -> bool:
        """Write a finished (or failed) run and its metrics in one transaction; False if the key exists."""
        values = {c: row.get(c) for c in RUN_COLUMNS}
        for c in ("params", "evaluation", "details"):
            if values[c] is not None and not isinstance(values[c], str):
                values[c] = json.dumps(values[c], sort_keys=True, default=str)
        with self.conn:
            old = self.conn.execute("SELECT status FROM runs WHERE key=?", (values["key"],)).fetchone()
            if old and old[0] == "done":
                return False
            if old:  # a failed run being retried
                self.conn.execute("DELETE FROM metrics WHERE run_key=?", (values["key"],))
                self.conn.execute("DELETE FROM runs WHERE key=?", (values["key"],))
            self.conn.execute(f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})",
                              [values[c] for c in RUN_COLUMNS])
            self.conn.executemany("INSERT INTO metrics VALUES (?, ?, ?)",
                                  [(values["key"], k, _finite_or_none(v)) for k, v in sorted(metrics.items())])
            self.conn.execute("INSERT OR IGNORE INTO study_runs VALUES (?, ?)", (values["study"], values["key"]))
        return True

    def add_to_study(self, study: str, key: str) -> None:
        """Count an existing run (finished by another study) as part of ``study`` too."""
        with self.conn:
            self.conn.execute("INSERT OR IGNORE INTO study_runs VALUES (?, ?)", (study, key))

    # ------------------------------------------------------------ reading
    def status_of(self, key: str) -> str | None:
        row = self.conn.execute("SELECT status FROM runs WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    _IN_STUDY = " WHERE key IN (SELECT run_key FROM study_runs WHERE study=?)"

    def counts(self, study: str | None = None) -> dict[str, int]:
        q, args = "SELECT status, COUNT(*) FROM runs", ()
        if study:
            q, args = q + self._IN_STUDY, (study,)
        return dict(self.conn.execute(q + " GROUP BY status", args).fetchall())

    def studies(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT study FROM study_runs ORDER BY study")]

    def spec_keys(self, study: str | None = None) -> dict[str, str]:
        q, args = "SELECT spec_key, status FROM runs", ()
        if study:
            q, args = q + self._IN_STUDY, (study,)
        return dict(self.conn.execute(q, args).fetchall())

    def interrupted(self, study: str | None = None) -> list[str]:
        """Keys that were started but have no row: runs a crash interrupted (redone by the next run)."""
        q = "SELECT DISTINCT run_key FROM attempts WHERE run_key NOT IN (SELECT key FROM runs)"
        args: tuple[Any, ...] = ()
        if study:
            q, args = q + " AND study=?", (study,)
        return [r[0] for r in self.conn.execute(q, args)]

    def frame(self, study: str | None = None) -> Any:
        """One row per run, one column per metric (``ppl:wiki``, ``acc:arc_easy``, ...): a pandas DataFrame."""
        import pandas as pd

        q, args = "SELECT * FROM runs", ()
        if study:
            q, args = q + self._IN_STUDY, (study,)
        runs = pd.read_sql_query(q + " ORDER BY finished, key", self.conn, params=args)
        metrics = pd.read_sql_query("SELECT run_key, name, value FROM metrics", self.conn)
        if not metrics.empty:
            wide = metrics.pivot(index="run_key", columns="name", values="value")
            runs = runs.merge(wide, left_on="key", right_index=True, how="left")
        return runs


def _finite_or_none(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
