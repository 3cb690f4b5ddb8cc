"""Evaluation: perplexity with a recorded protocol; zero-shot tasks through lm-eval on the in-memory model."""

from calibrant.evaluate.perplexity import PerplexityResult, perplexity, windows
from calibrant.evaluate.zeroshot import (
    STANDARD_SUITE,
    TaskDataError,
    TaskError,
    TaskResult,
    ZeroShotResult,
    available_tasks,
    evaluate_tasks,
)

__all__ = [
    "STANDARD_SUITE",
    "PerplexityResult",
    "TaskDataError",
    "TaskError",
    "TaskResult",
    "ZeroShotResult",
    "available_tasks",
    "evaluate_tasks",
    "perplexity",
    "windows",
]
