"""Zero-shot benchmark on the real default model: dense vs Wanda 50 % vs GPTQ W4 (g64).

Scored by calibrant's shared-prefix scorer (``--scorer hf``: lm-eval's HF backend, as before issue 16).

For each model: compression wall time, perplexity on the held-out `wiki` and `news` corpora, and the
7-task zero-shot suite of the pruning papers (BoolQ, RTE, HellaSwag, WinoGrande, ARC-Easy,
ARC-Challenge, OpenBookQA) through lm-eval on the in-memory model, offline. Prints markdown tables.

    .venv/bin/python bench/zeroshot.py                            # full validation sets (hours on 2 cores)
    .venv/bin/python bench/zeroshot.py --limit 200                # first 200 documents of each task
    .venv/bin/python bench/zeroshot.py --limit 5 --max-eval-tokens 4096 --configs dense   # smoke test

ARC-Easy, ARC-Challenge and OpenBookQA are scored on their validation splits here (lm-eval's standard
is test, which the offline data do not include); the tables say so.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import torch

CONFIGS: dict[str, dict[str, Any]] = {
    "dense": {},
    "wanda50": {"method": "wanda", "sparsity": 0.5},
    "gptq-w4g64": {"method": "gptq", "scheme": "w4g64"},
}
SHORT = {"boolq": "BoolQ", "rte": "RTE", "hellaswag": "HellaSwag", "winogrande": "WinoG", "arc_easy": "ARC-e",
         "arc_challenge": "ARC-c", "openbookqa": "OBQA"}


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any] | None:
    from calibrant.api import compress_model, evaluate_perplexity, evaluate_zeroshot
    from calibrant.errors import CalibrantError
    from calibrant.methods import make_method
    from calibrant.models import load_model

    spec = dict(CONFIGS[name])
    method = spec.pop("method", None)
    if method is not None:
        try:
            make_method(method, **spec)
        except (CalibrantError, TypeError, ValueError) as e:  # e.g. GPTQ not available yet
            print(f"# skipping {name}: {e}", file=sys.stderr, flush=True)
            return None
    loaded = load_model(args.model, quiet=True)
    out: dict[str, Any] = {"config": name, "compress_s": 0.0, "calibration": None}
    if method is not None:
        t0 = time.perf_counter()
        result = compress_model(loaded, method, calibration=args.calibration, seed=args.seed, progress=False, **spec)
        out["compress_s"] = time.perf_counter() - t0
        out["sparsity"] = result.report.sparsity
        out["calibration"] = result.calibration.hash if result.calibration is not None else None
    t0 = time.perf_counter()
    ppl = evaluate_perplexity(loaded, args.ppl.split(","), max_tokens=args.max_eval_tokens, progress=False)
    out["ppl_s"] = time.perf_counter() - t0
    out["ppl"] = {k: {"ppl": r.ppl, "tokens": r.tokens} for k, r in ppl.items()}
    zs = evaluate_zeroshot(loaded, args.tasks.split(","), limit=args.limit, num_fewshot=args.fewshot,
                           batch_size=args.batch_size, progress=not args.quiet, scorer=args.scorer,
                           token_budget=args.token_budget)
    out["zeroshot"] = zs.to_dict()
    print(f"# done {name}: compress {out['compress_s']:.1f}s, zero-shot {zs.seconds:.1f}s "
          f"({zs.n_items / zs.seconds:.2f} items/s), avg acc {zs.average:.4f}", file=sys.stderr, flush=True)
    return out


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    tasks = args.tasks.split(",")
    corpora = args.ppl.split(",")
    first = results[0]["zeroshot"]
    print(f"## Zero-shot — {args.model}, {'zero-shot' if not args.fewshot else f'{args.fewshot}-shot'}, "
          f"limit {args.limit or 'none (full splits)'}")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"lm-eval {first['lm_eval_version']}; data {first['protocol'].get('data')}; scored by "
          f"{first['protocol'].get('scorer', f'lm-eval HF backend (batch {args.batch_size})')}; "
          f"calibration {args.calibration} seed {args.seed}; perplexity on held-out documents"
          f"{f', first {args.max_eval_tokens} tokens' if args.max_eval_tokens else ''}, seq_len 512. "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print()
    head = ["model", "compress s"] + [f"ppl {c}" for c in corpora] + [SHORT.get(t, t) for t in tasks] + \
        ["avg acc", "avg acc_norm*", "zero-shot s", "items/s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        z = r["zeroshot"]
        n = sum(t["n_items"] for t in z["tasks"].values())
        cells = [r["config"], f"{r['compress_s']:.0f}"] + [f"{r['ppl'][c]['ppl']:.2f}" for c in corpora]
        cells += [f"{z['tasks'][t]['metrics']['acc']:.3f}" for t in tasks]
        cells += [f"{z['average']:.4f}", f"{z['average_norm']:.4f}", f"{z['seconds']:.0f}", f"{n / z['seconds']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    print()
    print("Per task: acc ± stderr / acc_norm ± stderr (lm-eval's), split and documents scored.")
    print()
    print("| task | split | n | " + " | ".join(r["config"] for r in results) + " |")
    print("|" + "---|" * (3 + len(results)))
    for t in tasks:
        base = first["tasks"][t]
        cells = [t, base["split"], str(base["n_items"])]
        for r in results:
            m = r["zeroshot"]["tasks"][t]
            cell = f"{m['metrics']['acc']:.3f} ± {m['stderr'].get('acc', float('nan')):.3f}"
            if "acc_norm" in m["metrics"]:
                cell += f" / {m['metrics']['acc_norm']:.3f} ± {m['stderr'].get('acc_norm', float('nan')):.3f}"
            cells.append(cell)
        print("| " + " | ".join(cells) + " |")
    print()
    print("avg acc: unweighted mean of acc over the tasks; avg acc_norm*: acc_norm where the task defines it "
          "(HellaSwag, ARC, OBQA), acc elsewhere.")


def main() -> None:
    from calibrant.evaluate.zeroshot import STANDARD_SUITE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--calibration", default="wiki:128x512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl", default="wiki,news")
    p.add_argument("--max-eval-tokens", type=int, default=None, help="perplexity on the first N held-out tokens")
    p.add_argument("--tasks", default=",".join(STANDARD_SUITE))
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (default: all)")
    p.add_argument("--fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (--scorer hf)")
    p.add_argument("--scorer", default="prefix", help="prefix (calibrant's shared-prefix scorer) or hf (lm-eval's)")
    p.add_argument("--token-budget", type=int, default=None, help="tokens per forward of the prefix scorer")
    p.add_argument("--json", default=None, help="also write all raw results here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    from calibrant.evaluate.zeroshot import check_tasks

    check_tasks(args.tasks, limit=args.limit, num_fewshot=args.fewshot, batch_size=args.batch_size, hub=False,
                scorer=args.scorer, token_budget=args.token_budget)
    results = [r for r in (run_config(c, args) for c in names) if r is not None]
    if not results:
        sys.exit("nothing ran")
    print_tables(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
