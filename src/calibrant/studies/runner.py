"""Running a study: prepare each run's identity, skip finished ones, execute the rest, store results.

The driver (the process that owns the database) *prepares* every run: loads the model once (for its
content hash and tokenizer), builds each calibration set once (shared by every method that uses
it), and computes the run's content key. Runs whose key is already in the database are skipped.
The rest are *executed* by an executor — in this process, in local worker processes, or as Ray
tasks — and every result comes back to the driver, which writes it in one transaction. A crash
anywhere loses at most the runs in flight, which the next invocation redoes.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import resource
import signal
import socket
import sqlite3
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from calibrant import __version__
from calibrant.cache import stable_hash
from calibrant.calibration import CalibrationSet, heldout_token_ids, make_calibration
from calibrant.errors import CalibrantError
from calibrant.models.loader import LoadedModel, load_model
from calibrant.studies.spec import DENSE, PlannedRun, StudySpec
from calibrant.studies.store import ResultStore, now, store_error

EXECUTORS = ("local", "processes", "ray")

# Compression cost per calibration token, in dense forward passes over the same tokens (measured in
# BENCHMARKS.md on SmolLM2-135M, 2-core CPU); used only for `study plan`'s estimate.


class StudyInterrupted(CalibrantError):
    """The study stopped before every run finished (a worker died); rerunning the command resumes it."""


@dataclass
class Task:
    """What an executor needs to run one run: everything is plain data (picklable for processes and Ray)."""

    key: str
    study: str
    run: PlannedRun
    calibration: CalibrationSet | None
    model_hash: str


def run_key(run: PlannedRun, model_hash: str, calib_hash: str | None) -> str:
    """The content hash that identifies a run's result: any change of model weights, method or parameters,
    calibration data, evaluation or calibrant version gives a different key."""
    return stable_hash({
        "model_hash": model_hash, "method": run.method, "params": run.params_dict,
        "propagate": run.options_dict.get("propagate", "compressed"),
        "pipeline": run.options_dict.get("pipeline", "one-pass"), "calib_hash": calib_hash,
        "evaluation": run.measured_eval,
        "calibrant_version": __version__,
    }, length=20)


# ---------------------------------------------------------------- per-process caches
class Workspace:
    """Models, calibration sets and held-out token streams, loaded once per process."""

    def __init__(self, progress: bool = False):
        self.progress = progress
        self._models: dict[str, LoadedModel] = {}
        self._calib: dict[tuple[str, str, int], CalibrationSet] = {}
        self._heldout: dict[tuple[str, str], tuple[torch.Tensor, dict[str, Any]]] = {}

    def model(self, spec: str) -> LoadedModel:
        if spec not in self._models:
            self._models[spec] = load_model(spec, quiet=not self.progress)
        return self._models[spec]

    def fresh_model(self, spec: str) -> LoadedModel:
        """A private copy of the dense model: a run compresses it in place without touching the original."""
        base = self.model(spec)
        return replace(base, model=copy.deepcopy(base.model))

    def calibration(self, model_spec: str, calib_spec: str, seed: int) -> CalibrationSet:
        key = (model_spec, calib_spec, seed)
        if key not in self._calib:
            loaded = self.model(model_spec)
            self._calib[key] = make_calibration(calib_spec, loaded.tokenizer, seed=seed,
                                                max_length=loaded.context_length,
                                                model=loaded, progress=None if self.progress else False)
        return self._calib[key]

    def heldout(self, model_spec: str, corpus: str) -> tuple[torch.Tensor, dict[str, Any]]:
        key = (model_spec, corpus)
        if key not in self._heldout:
            self._heldout[key] = heldout_token_ids(corpus, self.model(model_spec).tokenizer, progress=False)
        return self._heldout[key]


_WORKSPACE: Workspace | None = None


def _workspace() -> Workspace:
    global _WORKSPACE
    if _WORKSPACE is None:
        _WORKSPACE = Workspace()
    return _WORKSPACE


# ---------------------------------------------------------------- one run
def execute_task(task: Task, workspace: Workspace | None = None) -> dict[str, Any]:
    """Compress and evaluate one run; never raises for a failure of the run itself (it is returned)."""
    from calibrant.engine import compress
    from calibrant.evaluate.perplexity import perplexity
    from calibrant.evaluate.zeroshot import evaluate_tasks
    from calibrant.heap import release_freed_memory
    from calibrant.methods import make_recipe

    ws = workspace or _workspace()
    run = task.run
    started, t0 = now(), time.perf_counter()
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    if task.calibration is not None:  # where the tokens came from (and, for self, how fast they were generated)
        details["calibration"] = task.calibration.provenance
    row: dict[str, Any] = {"status": "done", "error": None}
    compress_s = eval_s = 0.0
    try:
        loaded = ws.fresh_model(run.model)
        opts, ev = run.options_dict, run.eval_dict
        if run.method != DENSE:
            params = run.params_dict
            methods = make_recipe(run.method, **params)
            report = compress(loaded.model, task.calibration, methods, batch_size=int(opts.get("batch_size", 8)),
                              device=opts.get("device"), propagate=opts.get("propagate", "compressed"),
                              pipeline=opts.get("pipeline", "one-pass"), progress=False)
            compress_s = report.timings.get("total_s", time.perf_counter() - t0)
            metrics["sparsity"] = report.sparsity
            if report.effective_bits is not None:
                metrics["effective_bits"] = report.effective_bits
            details["timings"] = report.timings
            details["recipe"] = report.recipe
        t1 = time.perf_counter()
        for corpus in ev.get("perplexity", []):
            ids, meta = ws.heldout(run.model, corpus)
            res = perplexity(loaded.model, ids, seq_len=int(ev.get("seq_len", 512)), max_tokens=ev.get("max_tokens"),
                             batch_size=int(ev.get("batch_size", 8)), progress=False, meta=meta)
            metrics[f"ppl:{corpus}"] = res.ppl
            details.setdefault("perplexity", {})[corpus] = {"ppl": res.ppl, "tokens": res.tokens,
                                                           "protocol": res.protocol}
        if ev.get("tasks"):
            zs = evaluate_tasks(loaded.model, loaded.tokenizer, list(ev["tasks"]), limit=ev.get("limit"),
                                num_fewshot=int(ev.get("num_fewshot", 0)), batch_size=int(ev.get("batch_size", 8)),
                                scorer=ev.get("scorer", "prefix"), token_budget=ev.get("token_budget"),
                                progress=False)
            for name, tr in zs.tasks.items():
                for metric in ("acc", "acc_norm"):
                    if metric in tr.metrics:
                        metrics[f"{metric}:{name}"] = tr.metrics[metric]
                details.setdefault("tasks", {})[name] = {"metrics": tr.metrics, "n_items": tr.n_items, "split": tr.split}
            metrics["acc:avg"] = zs.average
        eval_s = time.perf_counter() - t1
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:
            row.update(status="failed", error="non-finite results: " + ", ".join(f"{k}={v}" for k, v in bad.items())
                       + " — the compressed model is numerically broken")
        del loaded
    except Exception as exc:  # a run's failure is data, not a reason to stop the study
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:2000])
        details["traceback"] = traceback.format_exc()[-4000:]
    gc.collect()
    release_freed_memory()  # the run's model copy: give it back before the next run
    row.update(
        key=task.key, study=task.study, model_hash=task.model_hash,
        calib_hash=task.calibration.hash if task.calibration is not None else None,
        wall_s=time.perf_counter() - t0, compress_s=compress_s, eval_s=eval_s,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, host=socket.gethostname(),
        calibrant_version=__version__, started=started, finished=now(), details={**details, "pid": os.getpid()},
    )
    return {"row": row, "metrics": metrics}


def _row_for(run: PlannedRun) -> dict[str, Any]:
    return {"spec_key": run.spec_key, "model": run.model, "method": run.method, "label": run.label,
            "params": run.params_dict, "calibration": run.calibration,
            "calib_source": run.calibration.split(":", 1)[0] if run.calibration else None, "seed": run.seed,
            "evaluation": run.eval_dict}


# ---------------------------------------------------------------- executors
def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    # the driver stops the workers (SIGTERM, from _stop_workers): Ctrl-C reaches it alone, and a worker told to
    # stop unwinds quietly (SystemExit), releasing what it holds
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_worker)
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock, which a stopped worker would leak


def _exit_worker(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


def _processes(tasks: list[Task], workers: int, address: str | None, ws: Workspace) -> Iterator[tuple[Task, Any]]:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(execute_task, t): t for t in tasks}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        yield futures[fut], fut.result()
                    except BrokenProcessPool:
                        for other in pending:
                            other.cancel()
                        raise StudyInterrupted("a worker process died (killed or out of memory); finished runs "
                                               "are saved — rerun the same command to resume") from None
        except KeyboardInterrupt:  # SIGINT/SIGTERM to this process: stop the workers' runs now, not after them
            _stop_workers(pool)
            raise


def _stop_workers(pool: Any) -> None:
    """Terminate a process pool's workers (their unfinished runs stay unrecorded: the next run redoes them)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.terminate()  # SIGTERM: the worker exits through SystemExit (_init_worker)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    pool.shutdown(wait=True, cancel_futures=True)  # the workers are gone: this only releases the queues


def _ray(tasks: list[Task], workers: int, address: str | None, ws: Workspace) -> Iterator[tuple[Task, Any]]:
    try:
        import ray
    except ImportError:
        raise CalibrantError("--executor ray needs Ray: pip install 'ray>=2.9'") from None
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False, "include_dashboard": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = workers
        try:
            ray.init(**kwargs)
        except Exception as exc:
            raise CalibrantError(f"cannot start or reach Ray{' at ' + address if address else ''}: "
                                 f"{str(exc).splitlines()[0]}; check --address or run without --executor ray") from None
    remote = ray.remote(num_cpus=1, max_retries=1)(execute_task)
    refs = {remote.remote(t): t for t in tasks}
    lost = 0
    try:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    yield refs[ref], ray.get(ref)
                except ray.exceptions.RayError as exc:  # a lost worker or node, not a failure of the run
                    lost += 1
                    print(f"calibrant: run {refs[ref].run.label} lost its Ray worker ({type(exc).__name__}); it will "
                          "be redone on the next invocation", file=sys.stderr)
    finally:
        if started_here:
            ray.shutdown()
    if lost:
        raise StudyInterrupted(f"{lost} run(s) lost their Ray worker; finished runs are saved — rerun the same "
                               "command to resume")


# the local executor is _local_with_attempts: it records each attempt as the run starts
_EXECUTORS: dict[str, Callable[[list[Task], int, str | None, Workspace], Iterable[tuple[Task, Any]]]] = {
    "processes": _processes, "ray": _ray,
}


# ---------------------------------------------------------------- the driver
@dataclass
class StudySummary:
    study: str
    planned: int
    skipped: int
    done: int
    failed: int
    seconds: float
    db: Path

    def line(self) -> str:
        return (f"study {self.study}: {self.planned} runs planned, {self.skipped} already in {self.db}, "
                f"{self.done} done, {self.failed} failed, in {self.seconds:.1f}s")


def prepare(spec: StudySpec, ws: Workspace, progress: bool = False) -> tuple[list[Task], list[dict[str, Any]]]:
    """Content keys for every run; calibration sets built once. Runs whose preparation fails (a calibration
    source that is missing, a model that cannot be loaded) come back as failed rows."""
    from tqdm.auto import tqdm

    tasks, failures = [], []
    runs = spec.expand()
    for run in tqdm(runs, desc="preparing runs", unit="run", disable=not progress, leave=False):
        try:
            loaded = ws.model(run.model)
            calib = ws.calibration(run.model, run.calibration, run.seed or 0) if run.calibration else None
            key = run_key(run, loaded.model_hash, calib.hash if calib is not None else None)
            tasks.append(Task(key, spec.name, run, calib, loaded.model_hash))
        except CalibrantError as exc:
            key = stable_hash({"spec_key": run.spec_key, "unprepared": True, "version": __version__}, length=20)
            failures.append({"row": {**_row_for(run), "key": key, "study": spec.name, "status": "failed",
                                     "error": f"{type(exc).__name__}: {exc}", "started": now(), "finished": now(),
                                     "calibrant_version": __version__, "host": socket.gethostname()},
                             "metrics": {}})
    return tasks, failures


def run_study(
    spec: StudySpec,
    db: str | Path,
    *,
    executor: str = "local",
    workers: int = 1,
    address: str | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> StudySummary:
    """Run every run of ``spec`` that ``db`` does not hold yet; results are written as each run finishes."""

    if executor not in EXECUTORS:
        raise CalibrantError(f"unknown executor '{executor}'; choose one of {', '.join(EXECUTORS)}")
    if workers < 1:
        raise CalibrantError(f"--workers must be at least 1, got {workers}")
    t0 = time.perf_counter()
    try:
        return _run_into(spec, db, executor, workers, address, retry_failed, progress, on_result, t0)
    except sqlite3.Error as exc:  # a full disk or a failing file while recording: say which, keep what is there
        raise store_error(Path(db), exc) from None


def _run_into(spec: StudySpec, db: str | Path, executor: str, workers: int, address: str | None,
              retry_failed: bool, progress: bool, on_result: Callable[[dict[str, Any]], None] | None,
              t0: float) -> StudySummary:
    from tqdm.auto import tqdm

    with ResultStore(db, lock=True) as store:
        ws = Workspace(progress=progress)
        tasks, failures = prepare(spec, ws, progress=progress)
        done = failed = skipped = 0
        for f in failures:
            if store.status_of(f["row"]["key"]) is None or retry_failed:
                store.record_run(f["row"], {})
                failed += 1
            else:
                store.add_to_study(spec.name, f["row"]["key"])
                skipped += 1
        todo, seen = [], set()
        for task in tasks:
            status = store.status_of(task.key)
            if task.key in seen or status == "done" or (status == "failed" and not retry_failed):
                if status is not None:
                    store.add_to_study(spec.name, task.key)  # possibly finished by another study: shared
                skipped += 1
                continue
            seen.add(task.key)
            todo.append(task)
        bar = tqdm(total=len(todo), desc=f"study {spec.name}", unit="run", disable=not progress)
        try:
            if executor == "local":  # attempts are recorded as each run starts
                stream: Iterable[tuple[Task, Any]] = _local_with_attempts(todo, ws, store)
            else:
                for task in todo:
                    store.record_attempt(task.key, spec.name)
                stream = _EXECUTORS[executor](todo, workers, address, ws)
            for task, result in stream:
                row = {**_row_for(task.run), **result["row"]}
                store.record_run(row, result["metrics"])
                if row["status"] == "done":
                    done += 1
                else:
                    failed += 1
                    bar.write(f"run failed: {task.run.label} {task.run.calibration or ''} seed {task.run.seed}: "
                              f"{row['error']}")
                bar.update(1)
                bar.set_postfix_str(task.run.label[:40])
                if on_result is not None:
                    on_result(row)
        finally:
            bar.close()
        return StudySummary(spec.name, len(tasks) + len(failures), skipped, done, failed, time.perf_counter() - t0,
                            Path(db))


def _local_with_attempts(tasks: list[Task], ws: Workspace, store: ResultStore) -> Iterator[tuple[Task, Any]]:
    for task in tasks:
        store.record_attempt(task.key, task.study)
        yield task, execute_task(task, ws)


# ---------------------------------------------------------------- plan
@dataclass
class PlanRow:
    run: PlannedRun
    estimate_s: float


def estimate(spec: StudySpec, progress: bool = False) -> tuple[list[PlanRow], dict[str, float]]:
    """Each run with an estimated wall time: one dense forward is timed per model, and each method's cost
    is a multiple of a dense forward over the calibration tokens (each method's ``cost()``)."""
    from calibrant.methods import make_recipe

    ws = Workspace(progress=progress)
    per_token: dict[str, float] = {}
    for model in spec.models:
        loaded = ws.model(model)
        ids = torch.randint(0, int(loaded.model.config.vocab_size), (1, 256))
        with torch.no_grad():
            loaded.model(ids)  # warm-up
            t = time.perf_counter()
            loaded.model(ids)
        per_token[model] = (time.perf_counter() - t) / ids.numel()
    ev = spec.evaluation
    rows = []
    for run in spec.expand():
        calib_tokens = 0
        if run.calibration:
            n, length = run.calibration.rsplit(":", 1)[1].split("x")
            calib_tokens = int(n) * int(length)
        cost = 0.0 if run.method == DENSE else sum(m.cost() for m in make_recipe(run.method, **run.params_dict))
        ppl_tokens = len(ev["perplexity"]) * int(ev["max_tokens"] or 300_000)
        task_tokens = len(ev["tasks"]) * int(ev["limit"] or 1000) * 4 * 64  # ~4 choices of ~64 tokens per item
        rows.append(PlanRow(run, per_token[run.model] * (cost * calib_tokens + ppl_tokens + task_tokens)))
    return rows, per_token


def plan_table(rows: list[PlanRow], store: ResultStore | None = None, study: str | None = None) -> list[list[str]]:
    done = store.spec_keys(study) if store is not None else {}
    return [[str(i + 1), r.run.model, r.run.label, r.run.calibration or "-", "-" if r.run.seed is None else str(r.run.seed),
             f"{r.estimate_s:.0f}s", done.get(r.run.spec_key, "")] for i, r in enumerate(rows)]
