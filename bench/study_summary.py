"""Calibration-source table of a study database: per method and source, mean ± std over seeds of each
perplexity, the spread of the real sources, and the self-calibration generation throughput recorded
with the self-generated sets. Prints Markdown.

    .venv/bin/python -m calibrant study run impact --db docs/example-study/impact.sqlite
    .venv/bin/python -m calibrant study run self-calibration --db docs/example-study/impact.sqlite  # shares runs
    .venv/bin/python bench/study_summary.py docs/example-study/impact.sqlite
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from calibrant.studies import ResultStore  # noqa: E402

REAL = ("wiki", "news", "wikihow", "dialogue", "austen", "pydocs")


def mean_std(values: list[float], digits: int = 2) -> str:
    """``mean ± std`` over seeds; one value alone when there is a single seed."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(db: str, study: str | None = None) -> str:
    """The Markdown summary of a study database (see the module docstring)."""
    with ResultStore(db, create=False) as store:
        frame = store.frame(study)
    ok = frame[frame["status"] == "done"]
    metrics = sorted(c for c in ok.columns if c.startswith("ppl:"))
    dense = ok[ok["method"] == "dense"]
    out = ["| method | calibration | n runs | " + " | ".join(f"{m} mean ± std" for m in metrics) + " |",
           "|---|---|---:|" + "---:|" * len(metrics)]
    if not dense.empty:
        out.append("| dense | – | 1 | " + " | ".join(f"{dense[m].iloc[0]:.2f}" for m in metrics) + " |")
    verdicts = []
    for label, cframe in ok[ok["method"] != "dense"].groupby("label", sort=True):
        sources = sorted(cframe["calib_source"].dropna().unique(), key=lambda s: (s not in REAL, s))
        for source in sources:
            sframe = cframe[cframe["calib_source"] == source]
            cells = [mean_std(sframe[m].dropna().tolist()) for m in metrics]
            out.append(f"| {label} | {source} | {len(sframe)} | " + " | ".join(cells) + " |")
        for m in metrics:
            means = {s: cframe[cframe["calib_source"] == s][m].mean() for s in sources}
            real = [v for s, v in means.items() if s in REAL]
            if "self" in means and real:
                inside = min(real) <= means["self"] <= max(real)
                verdicts.append(f"{label}, {m}: self {means['self']:.2f} vs real sources {min(real):.2f}–"
                                f"{max(real):.2f} → {'within' if inside else 'outside'} the real spread"
                                + ("" if inside else f" ({'below' if means['self'] < min(real) else 'above'})"))
    if verdicts:
        out.append("\nDoes self-calibration land within the spread of the real sources (means over seeds)?")
        out += [f"- {v}" for v in verdicts]
    rates = []
    for details in frame["details"].dropna():
        cal = json.loads(details).get("calibration") or {}
        timing = cal.get("generation_timing")
        if cal.get("source") == "self" and timing:
            rates.append((cal.get("seed"), cal.get("n"), cal.get("seq_len"), timing["tokens_per_second"],
                          timing["seconds"], timing.get("threads")))
    if rates:
        out.append("\nSelf-calibration generation (recorded when each set was made; cached sets keep their first "
                   "timing):")
        out += [f"- seed {seed}: {n}x{length} tokens in {secs:.1f}s = {tps:.0f} tok/s ({threads} threads)"
                for seed, n, length, tps, secs, threads in sorted(set(rates))]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("db")
    p.add_argument("--study", default=None)
    args = p.parse_args()
    print(summarize(args.db, args.study))


if __name__ == "__main__":
    main()
