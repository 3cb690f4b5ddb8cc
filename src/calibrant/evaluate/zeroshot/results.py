"""What a zero-shot run returns: per-task results (metrics, stderr, split, counts, per-document items)
and the run as a whole (averages, protocol), and their rows for a table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]  # acc, acc_norm where lm-eval's task defines it (LAMBADA: acc, perplexity)
    stderr: dict[str, float]  # lm-eval's standard error of each metric
    split: str  # the split scored, with lm-eval's standard split when they differ
    n_items: int  # documents scored
    n_available: int  # documents in the split
    num_fewshot: int
    seconds: float
    source: str  # where the data came from
    items: list[dict[str, Any]] = field(default_factory=list, repr=False)  # per document: doc_id, target, lls, pred
    # the shared-prefix scorer's work: requests, tokens run, padded, forwards, distinct (empty for lm-eval's backend)
    scorer_counts: dict[str, int] = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.n_items / self.seconds if self.seconds > 0 else float("nan")

    @property
    def acc(self) -> float:
        return self.metrics["acc"]

    @property
    def acc_norm(self) -> float | None:
        return self.metrics.get("acc_norm")

    def to_dict(self, items: bool = False) -> dict[str, Any]:
        out = asdict(self)
        out["items_per_s"] = self.items_per_s
        if not items:
            out.pop("items")
        return out


@dataclass
class ZeroShotResult:
    tasks: dict[str, TaskResult]
    limit: int | None
    num_fewshot: int
    batch_size: int
    seconds: float
    lm_eval_version: str
    protocol: dict[str, Any] = field(default_factory=dict)

    def average_of(self, metric: str = "acc", fallback: str | None = "acc") -> float:
        """Unweighted mean of ``metric`` over the tasks (``fallback`` where a task lacks it)."""
        vals = []
        for r in self.tasks.values():
            v = r.metrics.get(metric, r.metrics.get(fallback) if fallback else None)
            if v is not None:
                vals.append(v)
        return sum(vals) / len(vals) if vals else float("nan")

    @property
    def average(self) -> float:
        """Unweighted mean accuracy over the tasks."""
        return self.average_of("acc")

    @property
    def average_norm(self) -> float:
        """Mean of acc_norm where the task defines it, acc elsewhere (the usual "headline" convention)."""
        return self.average_of("acc_norm", "acc")

    @property
    def n_items(self) -> int:
        return sum(r.n_items for r in self.tasks.values())

    def to_dict(self, items: bool = False) -> dict[str, Any]:
        return {
            "tasks": {k: v.to_dict(items) for k, v in self.tasks.items()},
            "average": self.average,
            "average_norm": self.average_norm,
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "batch_size": self.batch_size,
            "seconds": self.seconds,
            "n_items": self.n_items,
            "lm_eval_version": self.lm_eval_version,
            "protocol": self.protocol,
        }



def format_table(result: ZeroShotResult) -> list[list[Any]]:
    """Rows for a table: task, split, n, acc ± stderr, acc_norm ± stderr, seconds, items/s."""

    def pm(r: TaskResult, m: str) -> str:
        if m not in r.metrics:
            return "-"
        se = r.stderr.get(m)
        return f"{r.metrics[m]:.4f}" + (f" ± {se:.4f}" if se is not None and math.isfinite(se) else "")

    rows: list[list[Any]] = []
    for r in result.tasks.values():
        extra = f" (ppl {r.metrics['perplexity']:.2f})" if "perplexity" in r.metrics else ""
        rows.append([r.task, r.split, r.n_items, pm(r, "acc") + extra, pm(r, "acc_norm"), f"{r.seconds:.1f}",
                     f"{r.items_per_s:.2f}"])
    if len(result.tasks) > 1:
        rows.append(["average", "", result.n_items, f"{result.average:.4f}", f"{result.average_norm:.4f}*",
                     f"{sum(r.seconds for r in result.tasks.values()):.1f}",
                     f"{result.n_items / max(sum(r.seconds for r in result.tasks.values()), 1e-9):.2f}"])
    return rows

