"""Zero-shot scoring side by side: lm-eval's Hugging Face backend vs calibrant's shared-prefix scorer,
on the same in-memory model, tasks and documents, in one run.

    .venv/bin/python bench/zeroshot_scorer.py                                 # the issue's run: 200 per task
    .venv/bin/python bench/zeroshot_scorer.py --limit 10 --configs dense      # smoke test

For each model (SmolLM2-135M dense, and Wanda 50 % from wiki:128x512 seed 0), the 7-task suite of the
pruning papers is scored twice through ``calibrant.evaluate.zeroshot.evaluate_tasks`` — ``scorer="hf"``
(lm-eval's HFLM, batch ``--batch-size``, its defaults otherwise) and ``scorer="prefix"`` (token budget
``--token-budget``, default 4096) — and the two runs' per-document log-likelihoods and answers are
compared: the number of documents whose prediction differs (argmax over the choices' log-likelihoods;
acc and acc_norm per document) must be 0.

The floor: before the scoring runs, one plain forward pass (fp32, LM head, batch 8 × 512, no KV cache)
over the first ``--forward-sequences`` held-out wiki sequences measures this machine's forward
throughput (tokens/s) in the same process. ``distinct`` is the number of input tokens of the distinct
contexts plus those of each context's distinct continuations (what must be computed at least once
without sharing prefixes between contexts); ``floor s`` = distinct / throughput; ``x floor`` is the
scorer's wall time over it. ``run`` and ``padded`` are the tokens the scorer actually ran (its prefix
tree's nodes) and the tokens of its padded batches.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _llmc import peak_rss_gb  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "dense": {},
    "wanda50": {"method": "wanda", "sparsity": 0.5},
    "gptq-w4g128": {"method": "gptq", "scheme": "w4g128"},
}


def forward_throughput(model: Any, tokenizer: Any, sequences: int, batch: int = 8) -> dict[str, float]:
    """Tokens/s of plain forward passes (``batch`` × 512, logits for every position) over held-out wiki."""
    from calibrant.calibration.calibset import heldout_token_ids

    ids, _ = heldout_token_ids("wiki", tokenizer)
    n = sequences * 512
    tokens, size = torch.as_tensor(ids[:n]).reshape(sequences, 512), batch
    with torch.no_grad():
        model(input_ids=tokens[:1, :16], use_cache=False)  # warm-up
        t0 = time.perf_counter()
        for b in range(0, sequences, size):
            model(input_ids=tokens[b:b + size], use_cache=False)
        seconds = time.perf_counter() - t0
    return {"tokens": n, "seconds": seconds, "tokens_per_s": n / seconds}


def compare(hf: dict[str, Any], px: dict[str, Any]) -> dict[str, Any]:
    """Per-document agreement of two runs of one task."""
    a, b = hf["items"], px["items"]
    assert [i["doc_id"] for i in a] == [i["doc_id"] for i in b], "the two runs scored different documents"
    diff_ll = max((abs(x - y) for ia, ib in zip(a, b, strict=True) for x, y in zip(ia["lls"], ib["lls"], strict=True)),
                  default=0.0)
    differ = sum(1 for ia, ib in zip(a, b, strict=True)
                 if ia["pred"] != ib["pred"] or ia.get("acc") != ib.get("acc") or ia.get("acc_norm") != ib.get("acc_norm"))
    return {"max_abs_dll": diff_ll, "differing": differ, "n": len(a)}


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from calibrant.api import compress_model
    from calibrant.evaluate.zeroshot import evaluate_tasks
    from calibrant.models import load_model

    spec = dict(CONFIGS[name])
    method = spec.pop("method", None)
    loaded = load_model(args.model, quiet=True)
    out: dict[str, Any] = {"config": name, "compress_s": 0.0}
    if method is not None:
        t0 = time.perf_counter()
        compress_model(loaded, method, calibration=args.calibration, seed=args.seed, progress=False, **spec)
        out["compress_s"] = time.perf_counter() - t0
    out["forward"] = forward_throughput(loaded.model, loaded.tokenizer, args.forward_sequences)
    tasks = args.tasks.split(",")
    runs: dict[str, Any] = {}
    for scorer in args.order.split(","):
        t0 = time.perf_counter()
        zs = evaluate_tasks(loaded.model, loaded.tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                            scorer=scorer, token_budget=args.token_budget, progress=not args.quiet)
        wall = time.perf_counter() - t0
        runs[scorer] = {"wall_s": wall, **zs.to_dict(items=True)}
        print(f"# {name} {scorer}: {wall:.1f}s, avg acc {zs.average:.4f}", file=sys.stderr, flush=True)
    out["runs"] = runs
    out["compare"] = {t: compare(runs["hf"]["tasks"][t], runs["prefix"]["tasks"][t]) for t in tasks}
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    tasks = args.tasks.split(",")
    print(f"## Zero-shot scorers — {args.model}, 7-task suite, first {args.limit} documents per task")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"lm-eval {results[0]['runs']['hf']['lm_eval_version']}; HF backend batch {args.batch_size}; "
          f"shared-prefix token budget {args.token_budget or 'auto (4096)'}; Wanda calibration {args.calibration} "
          f"seed {args.seed}. {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print()
    for r in results:
        hf, px, fw = r["runs"]["hf"], r["runs"]["prefix"], r["forward"]
        rate = fw["tokens_per_s"]
        print(f"### {r['config']} — forward throughput {rate:.0f} tokens/s (batch 8 × 512, {fw['tokens']} tokens); "
              f"peak RSS {r['peak_rss_gb']:.2f} GB")
        print()
        head = ["task", "docs", "HF s", "prefix s", "speed-up", "distinct tok", "run tok", "padded tok",
                "floor s", "x floor", "max abs dLL", "differing answers", "acc HF", "acc prefix"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        tot = {"hf": 0.0, "px": 0.0, "distinct": 0, "run": 0, "padded": 0, "differ": 0, "dll": 0.0, "n": 0}
        for t in tasks:
            a, b, c = hf["tasks"][t], px["tasks"][t], r["compare"][t]
            counts = b.get("scorer_counts", {})
            floor = counts.get("distinct", 0) / rate
            cells = [t, str(a["n_items"]), f"{a['seconds']:.1f}", f"{b['seconds']:.1f}",
                     f"{a['seconds'] / b['seconds']:.2f}x", str(counts.get("distinct", "-")),
                     str(counts.get("tokens", "-")), str(counts.get("padded", "-")), f"{floor:.1f}",
                     f"{b['seconds'] / floor:.2f}" if floor else "-", f"{c['max_abs_dll']:.1e}", str(c["differing"]),
                     f"{a['metrics']['acc']:.3f}", f"{b['metrics']['acc']:.3f}"]
            print("| " + " | ".join(cells) + " |")
            tot["hf"] += a["seconds"]
            tot["px"] += b["seconds"]
            tot["distinct"] += counts.get("distinct", 0)
            tot["run"] += counts.get("tokens", 0)
            tot["padded"] += counts.get("padded", 0)
            tot["differ"] += c["differing"]
            tot["dll"] = max(tot["dll"], c["max_abs_dll"])
            tot["n"] += a["n_items"]
        floor = tot["distinct"] / rate
        print(f"| **all** | {tot['n']} | {tot['hf']:.1f} | {tot['px']:.1f} | **{tot['hf'] / tot['px']:.2f}x** | "
              f"{tot['distinct']} | {tot['run']} | {tot['padded']} | {floor:.1f} | {tot['px'] / floor:.2f} | "
              f"{tot['dll']:.1e} | {tot['differ']} | {hf['average']:.4f} | {px['average']:.4f} |")
        print()
        print(f"Whole runs (lm-eval's task building included): HF {hf['wall_s']:.1f} s, prefix {px['wall_s']:.1f} s "
              f"({hf['wall_s'] / px['wall_s']:.2f}x); compression {r['compress_s']:.0f} s.")
        print()


def main() -> None:
    from calibrant.evaluate.zeroshot import STANDARD_SUITE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--configs", default="dense,wanda50", help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--calibration", default="wiki:128x512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=",".join(STANDARD_SUITE))
    p.add_argument("--limit", type=int, default=200, help="first N documents of each task")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval HF backend batch size")
    p.add_argument("--token-budget", type=int, default=None, help="shared-prefix scorer tokens per forward")
    p.add_argument("--forward-sequences", type=int, default=16, help="512-token sequences timed for the floor")
    p.add_argument("--order", default="prefix,hf", help="which scorer runs first")
    p.add_argument("--json", default=None, help="also write all raw results (per-document) here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    if sorted(args.order.split(",")) != ["hf", "prefix"]:
        p.error("--order must name hf and prefix once each")
    from calibrant.evaluate.zeroshot import check_tasks

    check_tasks(args.tasks, limit=args.limit, batch_size=args.batch_size, hub=False, token_budget=args.token_budget)
    results = [run_config(c, args) for c in names]
    print_tables(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
