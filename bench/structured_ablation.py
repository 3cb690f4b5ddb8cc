"""Does the predictor earn its keep? Predictor-guided structured search against random search, evolution
scored by measurement, and uniform pruning — at an equal number of measured configurations, at three budgets.

    .venv/bin/python bench/structured_ablation.py                      # the issue's table (see --help for sizes)
    .venv/bin/python bench/structured_ablation.py --budgets 0.8 --samples 16 --rounds 2 --mmlu-limit 0 --limit 20

Per budget (kept fraction of the decoder blocks' parameters), in one process on one loaded model:

1. ``predictor``: the initial sample (``--samples``: uniform, random and perturbed configurations), then rounds
   until the best measured proxy loss stops improving (``--rounds`` at most); its number of measured
   configurations N is the cost every other arm gets;
2. ``random``: the same initial sample, then random configurations up to N; 3. ``evolution``: the same initial
   sample, then configurations bred from the best measured and each measured, up to N; 4. ``uniform``: every
   block at the same keep ratios, at the full budget in single MLP channels (the best uniform configuration of
   the initial sample: one per KV-group count).

The proxy is perplexity on the *last* ``--proxy-tokens`` tokens of the held-out splits of wiki and news, an
equal share of whole windows from each, as the search does by default (``--proxy-corpus`` and
``--proxy-metric`` change the text and the loss; the wiki-proxy tables in BENCHMARKS.md pass
``--proxy-corpus wiki``); each arm's winner is
then evaluated on the *first* ``--eval-tokens`` tokens of wiki and news (news stands in for PTB offline).
For the predictor's winner, the uniform configuration and the dense model also MMLU (5-shot, all 57 subjects,
``--mmlu-limit`` questions per subject) and the 7-task zero-shot average (``--limit`` documents per task).
Also: the predictor's Spearman ρ on ``--heldout`` random configurations never used for fitting, where the
winner came from (origin and round), and each budget's wall time, with one plain dense forward over the
calibration tokens timed in the same run as the unit.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _structured import load_search_bench  # noqa: E402

SUITE = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="0.9,0.8,0.7")
    ap.add_argument("--samples", type=int, default=48, help="the initial sample every arm shares")
    ap.add_argument("--rounds", type=int, default=6, help="the predictor's rounds at most")
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--heldout", type=int, default=12, help="random configurations to test the predictor on")
    ap.add_argument("--calibration", default="wiki:32x512")
    ap.add_argument("--proxy-tokens", type=int, default=2048)
    ap.add_argument("--proxy-metric", choices=["ppl", "kl"], default="ppl",
                    help="what every arm minimises on the proxy tokens: their perplexity, or the mean KL divergence "
                         "from the dense model's next-token distribution")
    ap.add_argument("--proxy-corpus", default="wiki,news",
                    help="held-out corpora of the proxy, comma-separated (an equal share of each), or one; the "
                         "default is the search's (wiki,news)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--limit", type=int, default=100, help="documents per zero-shot task (0 to skip)")
    ap.add_argument("--mmlu-limit", type=int, default=4, help="questions per MMLU subject, 5-shot (0 to skip)")
    ap.add_argument("--quantum", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="results, written after every budget; a rerun with the same "
                    "options skips the budgets it already holds (a long run spans sessions)")
    args = ap.parse_args()
    settings = {k: v for k, v in vars(args).items() if k not in ("budgets", "json")}
    for key, default in (("proxy_metric", "ppl"), ("proxy_corpus", "wiki")):
        if settings[key] == default:  # runs saved before the option existed hold no such key: ppl on wiki
            del settings[key]
    saved: dict[str, Any] = {}
    if args.json and Path(args.json).is_file():
        saved = json.loads(Path(args.json).read_text())
        if saved.get("settings") != settings:
            raise SystemExit(f"{args.json} holds a run with other options ({saved.get('settings')}); "
                             "pass another --json or the same options")

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    bench = load_search_bench(args.model, args.calibration, args.seed, args.batch_size)
    lm, calib, fwd_s, streams = bench.lm, bench.calib, bench.forward_s, bench.streams
    from calibrant.evaluate.perplexity import perplexity
    from calibrant.evaluate.zeroshot import evaluate_tasks
    from calibrant.search import StructuredConfig, search_structured

    def evaluate(pruner: Any, cfg: StructuredConfig, full: bool) -> dict[str, Any]:
        pruner.apply(cfg)
        row: dict[str, Any] = {c: perplexity(lm.model, s, max_tokens=args.eval_tokens, batch_size=args.batch_size,
                                             progress=False).ppl for c, s in streams.items()}
        if full and args.limit:
            row["zs_avg"] = evaluate_tasks(lm.model, lm.tokenizer, SUITE, limit=args.limit, progress=False).average
        if full and args.mmlu_limit:
            mmlu = evaluate_tasks(lm.model, lm.tokenizer, ["mmlu"], limit=args.mmlu_limit, num_fewshot=5,
                                  progress=False)
            row["mmlu"] = mmlu.average
        return row

    results: dict[str, Any] = saved.get("budgets", {})
    dense_row = saved.get("dense")
    started = saved.get("started", started)

    def save() -> None:
        if args.json:
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps({"settings": settings, "started": started, "dense": dense_row,
                                       "budgets": results, "forward_s": fwd_s}, indent=2, default=str))
            tmp.replace(args.json)
    common = {"score": "wanda", "seed": args.seed, "proxy_tokens": args.proxy_tokens, "quantum": args.quantum,
              "top_k": args.top_k, "batch_size": args.batch_size, "progress": False, "save_model": False,
              "proxy_metric": args.proxy_metric, "proxy_corpus": args.proxy_corpus}
    for budget in [float(b) for b in args.budgets.split(",")]:
        if f"{budget:g}" in results:
            print(f"# budget {budget:g}: already in {args.json}", flush=True)
            continue
        t_budget = time.perf_counter()
        arms: dict[str, Any] = {}
        res = search_structured(lm, calib, budget, args.samples, rounds=args.rounds, heldout_samples=args.heldout,
                                **common)
        predictor_s = time.perf_counter() - t_budget
        dense_cfg = StructuredConfig.dense(res.pruner.shape)
        res.pruner.apply(dense_cfg)  # a search leaves the model pruned to its winner: the next one starts dense
        n = res.extra["measured"]
        arms["predictor"] = res
        for strategy in ("random", "evolution"):
            arms[strategy] = search_structured(lm, calib, budget, args.samples, strategy=strategy, max_samples=n,
                                               **common)
            arms[strategy].pruner.apply(dense_cfg)
        search_s = time.perf_counter() - t_budget
        pruner = res.pruner
        rows: dict[str, Any] = {}
        for name, arm in arms.items():
            rows[name] = {"proxy": arm.best.ppl, "proxy_kl": arm.best.kl, "kept": arm.best.kept_fraction,
                          "origin": arm.best.origin, "round": arm.best.round,
                          **evaluate(pruner, arm.best.config, name == "predictor")}
        rows["uniform"] = {"proxy": res.uniform.ppl, "proxy_kl": res.uniform.kl, "kept": res.uniform.kept_fraction,
                           "origin": "uniform", "round": 0, **evaluate(pruner, res.uniform.config, True)}
        if dense_row is None:
            dense_row = {"proxy": res.dense.ppl, "proxy_kl": res.dense.kl, "kept": 1.0,
                         **evaluate(pruner, StructuredConfig.dense(pruner.shape), True)}
        pruner.apply(StructuredConfig.dense(pruner.shape))
        results[f"{budget:g}"] = {"rows": rows, "measured": n, "stopped": res.extra["stopped"],
                                  "rounds": res.extra["rounds"], "cv": res.cv.to_dict() if res.cv else None,
                                  "heldout": res.heldout.to_dict() if res.heldout else None,
                                  "predictor_s": predictor_s, "search_s": search_s,
                                  "wall_s": time.perf_counter() - t_budget, "forward_s": fwd_s}
        save()
        print(f"# budget {budget:g} done in {results[f'{budget:g}']['wall_s']:.0f}s", flush=True)

    print(f"## Structured search ablation — {args.model}, wanda importance, calibration {args.calibration} "
          f"(hash {calib.hash})\n")
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; started {started}. "
          f"Initial sample {args.samples} configurations (shared by the arms), top-k {args.top_k}, at most "
          f"{args.rounds} rounds; proxy: {'perplexity' if args.proxy_metric == 'ppl' else 'mean KL from the dense model'} "
          f"on the last {args.proxy_tokens} {args.proxy_corpus} held-out tokens; {args.heldout} held-out configurations; ppl: first {args.eval_tokens} "
          f"tokens of each held-out split; zero-shot: 7 tasks at {args.limit} documents; MMLU 5-shot, "
          f"{args.mmlu_limit} questions per subject. One dense forward over the calibration tokens, timed in each "
          f"run (a budget's ratio uses its own run's): {fwd_s:.1f} s in this one.\n")
    kl = args.proxy_metric == "kl"
    print(f"| budget | arm | measured | kept | proxy ppl |{' proxy KL |' if kl else ''} wiki ppl | news ppl | MMLU | "
          "7-task avg | winner from |")
    print(f"|---|---|---:|---:|---:|{'---:|' if kl else ''}---:|---:|---:|---:|---|")
    assert dense_row is not None

    def cell(row: dict[str, Any], key: str, fmt: str = ".3f") -> str:
        return "–" if key not in row else format(row[key], fmt)

    def kl_cell(row: dict[str, Any]) -> str:
        return f" {cell(row, 'proxy_kl', '.4f')} |" if kl else ""

    print(f"| 1.0 | dense | – | 1.0000 | {dense_row['proxy']:.3f} |{kl_cell(dense_row)} {dense_row['wiki']:.3f} | {dense_row['news']:.3f} | "
          f"{cell(dense_row, 'mmlu')} | {cell(dense_row, 'zs_avg')} | – |")
    for budget, r in sorted(results.items(), key=lambda kv: -float(kv[0])):
        for name in ("predictor", "random", "evolution", "uniform"):
            row = r["rows"][name]
            cost = r["measured"] if name != "uniform" else "–"
            print(f"| {budget} | {name} | {cost} | {row['kept']:.4f} | {row['proxy']:.3f} |{kl_cell(row)} {row['wiki']:.3f} | {row['news']:.3f} | "
                  f"{cell(row, 'mmlu')} | {cell(row, 'zs_avg')} | {row['origin']} (round {row['round']}) |")
    print("\n| budget | predictor vs uniform: wiki | news | MMLU (points) | beats random | beats evolution | "
          "held-out ρ | K-fold ρ | rounds run, stopped by | predictor search s | × dense forward | all arms and "
          "evaluations s |")
    print("|---|---:|---:|---:|---|---|---:|---:|---|---:|---:|---:|")
    for budget, r in sorted(results.items(), key=lambda kv: -float(kv[0])):
        p, u = r["rows"]["predictor"], r["rows"]["uniform"]
        mm = f"{100 * (p['mmlu'] - u['mmlu']):+.2f}" if "mmlu" in p and "mmlu" in u else "–"
        beats = {a: all(p[c] < r["rows"][a][c] for c in ("wiki", "news")) for a in ("random", "evolution")}
        print(f"| {budget} | {100 * (p['wiki'] / u['wiki'] - 1):+.2f} % | {100 * (p['news'] / u['news'] - 1):+.2f} % "
              f"| {mm} | {'yes' if beats['random'] else 'no'} | {'yes' if beats['evolution'] else 'no'} | "
              f"{(r['heldout'] or {}).get('spearman', float('nan')):.3f} | {(r['cv'] or {}).get('spearman', float('nan')):.3f} "
              f"| {len(r['rounds'])}, {r['stopped']} | {r['predictor_s']:.0f} | {r['predictor_s'] / r['forward_s']:.1f} | "
              f"{r['wall_s']:.0f} |")
    print(f"\npeak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
