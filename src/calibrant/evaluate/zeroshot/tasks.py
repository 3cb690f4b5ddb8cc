"""The task catalogue: the offline tasks (lm-eval's built-in prompt definitions, over local data) and
the validation of a request against them and against lm-eval's own task names.

Each offline task mirrors lm-eval's built-in task of the same name (same ``doc_to_text`` /
``doc_to_choice`` / ``doc_to_target`` / metrics); where its local split differs from the one lm-eval
scores (ARC, OpenBookQA and SciQ are validation splits here; lm-eval scores their test splits), its
``note`` says so. LAMBADA is the OpenAI version (lm-eval's ``lambada_openai``). ``mmlu`` is a group of
57 subjects (test split, few-shot examples from ``dev`` in order). Any other name is looked up in
lm-eval's own task index and runs online (``"hub"``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from calibrant.cache import quiet_loggers
from calibrant.errors import CalibrantError, suggest

SCORERS = ("prefix", "hf")  # calibrant's shared-prefix scorer; lm-eval's Hugging Face backend


class TaskError(CalibrantError):
    """An unknown task or an invalid evaluation option."""


# --------------------------------------------------------------------------------------------------
# The offline tasks: lm-eval's built-in prompt definitions over the local data


def _acc(*extra: str) -> list[dict[str, Any]]:
    return [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", *extra)]


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


def short_list() -> str:
    names = [t for t in OFFLINE_TASKS if not t.startswith("mmlu_")]
    return ", ".join(names) + ", lambada (= lambada_openai), mmlu (or mmlu_<subject>, 57 subjects)"


def members_of(name: str) -> tuple[str, ...]:
    return GROUPS.get(name, (name,))


# --------------------------------------------------------------------------------------------------
# Validation (cheap: before any model is loaded)


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs at INFO/WARNING about things calibrant reports itself; keep it to errors. It also asks
    ``git describe`` for the working directory's commit (not calibrant's; calibrant records its own version),
    and git prints ``fatal: not a git repository`` outside one: that question is skipped while inside."""
    import lm_eval.evaluator as evaluator

    asked = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        with quiet_loggers("lm_eval", "lm-eval"):
            yield
    finally:
        evaluator.get_git_commit_hash = asked


@functools.cache
def hub_manager() -> Any:
    """lm-eval's TaskManager over its own task definitions (indexing them takes a few seconds, once)."""
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval():
        return TaskManager()


def _lm_eval_index() -> tuple[str, ...]:
    return tuple(hub_manager().all_tasks)


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
                        f"{short_list()}; lm-eval's own task names run with --hub (online)")
    try:
        known = _lm_eval_index()
    except Exception as e:  # lm-eval missing or its task index unreadable
        raise TaskError(f"unknown task '{raw}' and lm-eval's task index is unavailable ({type(e).__name__}: {e}); "
                        f"offline tasks: {short_list()}") from e
    if name in known:
        return name, "hub"
    if hub:
        raise TaskError(f"unknown lm-eval task '{raw}'.{suggest(name, known)} (lm-eval knows {len(known)} task "
                        "names; run `lm-eval ls tasks` to list them)")
    hint = suggest(name, available_tasks()) or suggest(name, known)
    raise TaskError(f"unknown task '{raw}'.{hint} Offline tasks: {short_list()}; or any of lm-eval's "
                    f"{len(known)} task names (online)")


def check_tasks(
    tasks: list[str] | str, *, limit: int | None = None, num_fewshot: int = 0, batch_size: int = 8,
    hub: bool | None = None, scorer: str = "prefix", token_budget: int | None = None,
) -> list[tuple[str, str]]:
    """Validate the request; ``[(task, "offline" | "hub"), …]`` in order, duplicates removed."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise TaskError(f"no tasks given; choose from {short_list()}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise TaskError(f"--limit must be a positive number of documents per task, got {limit!r}")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise TaskError(f"--fewshot must be a non-negative integer, got {num_fewshot!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise TaskError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if scorer not in SCORERS:
        raise TaskError(f"unknown --scorer {scorer!r}.{suggest(str(scorer), list(SCORERS))} Choose from: prefix "
                        "(calibrant's shared-prefix scorer, the default), hf (lm-eval's Hugging Face backend)")
    if token_budget is not None and (isinstance(token_budget, bool) or not isinstance(token_budget, int)
                                     or token_budget <= 0):
        raise TaskError(f"--token-budget must be a positive number of tokens, got {token_budget!r}")
    out: list[tuple[str, str]] = []
    for name in names:
        resolved = _resolve(name, hub)
        if resolved not in out:
            out.append(resolved)
    return out
