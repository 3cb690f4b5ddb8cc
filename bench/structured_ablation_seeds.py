"""Is the ablation's verdict luck? Collects runs of ``bench/structured_ablation.py`` made with different seeds
(a seed changes the calibration draw, hence the importance scores, and the search's random numbers) and counts
how often the predictor-guided winner beats each other arm.

    .venv/bin/python bench/structured_ablation_seeds.py bench/results/structured_ablation_fullbudget.json \\
        bench/results/structured_ablation_0.8_seed1.json bench/results/structured_ablation_0.8_seed2.json

Only the settings that shape the search must agree between files (zero-shot and MMLU sizes may differ).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

# options of structured_ablation.py that change what the arms measure or pick
SEARCH_SETTINGS = ("model", "samples", "rounds", "top_k", "heldout", "calibration", "proxy_tokens", "proxy_metric",
                   "proxy_corpus", "eval_tokens", "quantum", "batch_size")
ARMS = ("random", "evolution", "uniform")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="JSON files written by structured_ablation.py --json")
    args = ap.parse_args()
    runs = [(Path(p), json.loads(Path(p).read_text())) for p in args.runs]
    first = runs[0][1]["settings"]
    for path, run in runs[1:]:
        differ = [k for k in SEARCH_SETTINGS if run["settings"].get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"{path} searched with other settings ({', '.join(differ)}) than {runs[0][0]}")

    print(f"## Structured search ablation across seeds — {first['model']}, proxy {first.get('proxy_metric', 'ppl')}, "
          f"{first['samples']} initial configurations, at most {first['rounds']} rounds of {first['top_k']}\n")
    print("| budget | seed | measured | winner from | predictor wiki / news | random wiki / news | "
          "evolution wiki / news | uniform wiki / news | beats random | beats evolution |")
    print("|---|---:|---:|---|---|---|---|---|---|---|")
    wins: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for _, run in runs:
        seed = run["settings"]["seed"]
        for budget, r in sorted(run["budgets"].items(), key=lambda kv: -float(kv[0])):
            rows: dict[str, Any] = r["rows"]
            p = rows["predictor"]
            beats = {a: all(p[c] < rows[a][c] for c in ("wiki", "news")) for a in ARMS}
            wins[budget]["runs"] += 1
            for a in ARMS:
                wins[budget][a] += beats[a]
            pair = {a: f"{rows[a]['wiki']:.3f} / {rows[a]['news']:.3f}" for a in ("predictor", *ARMS)}
            print(f"| {budget} | {seed} | {r['measured']} | {p['origin']} (round {p['round']}) | {pair['predictor']} | "
                  f"{pair['random']} | {pair['evolution']} | {pair['uniform']} | {'yes' if beats['random'] else 'no'} | "
                  f"{'yes' if beats['evolution'] else 'no'} |")
    print("\n| budget | runs | predictor beats random | beats evolution | beats uniform |")
    print("|---|---:|---:|---:|---:|")
    for budget, w in sorted(wins.items(), key=lambda kv: -float(kv[0])):
        print(f"| {budget} | {w['runs']} | {w['random']} | {w['evolution']} | {w['uniform']} |")
    print("\n(\"beats\" = lower wiki *and* news perplexity than that arm's winner.)")


if __name__ == "__main__":
    main()
