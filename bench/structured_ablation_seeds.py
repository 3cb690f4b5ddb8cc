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

    print(f"## Structured search ablation across seeds — {first['model']}, proxy {first.get('proxy_metric', 'ppl')} on "
          f"{first.get('proxy_corpus', 'wiki')} held-out, "
          f"{first['samples']} initial configurations, at most {first['rounds']} rounds of {first['top_k']}\n")
    print("| budget | seed | measured | winner from | predictor wiki / news | random wiki / news | "
          "evolution wiki / news | uniform wiki / news | vs uniform wiki / news | beats random | beats evolution | "
          "held-out ρ | predictor search s |")
    print("|---|---:|---:|---|---|---|---|---|---|---|---|---:|---:|")
    wins: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    rhos: dict[str, list[float]] = defaultdict(list)
    secs: dict[str, list[float]] = defaultdict(list)
    for _, run in runs:
        seed = run["settings"]["seed"]
        for budget, r in sorted(run["budgets"].items(), key=lambda kv: -float(kv[0])):
            rows: dict[str, Any] = r["rows"]
            p = rows["predictor"]
            beats = {a: verdict(p, rows[a]) for a in ARMS}
            wins[budget]["runs"] += 1
            rhos[budget].append(r["heldout"]["spearman"])
            secs[budget].append(r["predictor_s"])
            for a in ARMS:
                wins[budget][f"{a} {beats[a]}"] += 1
            pair = {a: f"{rows[a]['wiki']:.3f} / {rows[a]['news']:.3f}" for a in ("predictor", *ARMS)}
            print(f"| {budget} | {seed} | {r['measured']} | {p['origin']} (round {p['round']}) | {pair['predictor']} | "
                  f"{pair['random']} | {pair['evolution']} | {pair['uniform']} | {margin(p, rows['uniform'])} | {beats['random']} | {beats['evolution']} "
                  f"| {rhos[budget][-1]:.3f} | {secs[budget][-1]:.0f} |")
    print("\n| budget | runs | predictor vs random: yes / tie / no | vs evolution | vs uniform | held-out ρ min – max "
          "| predictor search s, max |")
    print("|---|---:|---|---|---|---|---:|")
    for budget, w in sorted(wins.items(), key=lambda kv: -float(kv[0])):
        cells = [" / ".join(str(w[f"{a} {v}"]) for v in ("yes", "tie", "no")) for a in ARMS]
        print(f"| {budget} | {w['runs']} | {' | '.join(cells)} | {min(rhos[budget]):.3f} – {max(rhos[budget]):.3f} "
              f"| {max(secs[budget]):.0f} |")
    print("\n(\"yes\": lower wiki *and* news perplexity than that arm's winner; \"tie\": the same perplexities — "
          "both arms ended on one configuration.)")


def margin(p: dict[str, Any], other: dict[str, Any]) -> str:
    return " / ".join(f"{100 * (p[c] / other[c] - 1):+.2f} %" for c in ("wiki", "news"))


def verdict(p: dict[str, Any], other: dict[str, Any]) -> str:
    if all(p[c] == other[c] for c in ("wiki", "news")):
        return "tie"
    return "yes" if all(p[c] < other[c] for c in ("wiki", "news")) else "no"


if __name__ == "__main__":
    main()
