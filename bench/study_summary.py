"""Calibration-source table of a study database: per method and source, mean ± std over seeds of each
perplexity, the spread of the real sources, and the self-calibration generation throughput recorded
with the self-generated sets. Prints Markdown.

    .venv/bin/python -m calibrant study run impact --db docs/example-study/impact.sqlite
    .venv/bin/python -m calibrant study run self-calibration --db docs/example-study/impact.sqlite  # shares runs
    .venv/bin/python bench/study_summary.py docs/example-study/impact.sqlite

``--spread`` adds, per method and metric, the spread over calibration sources (max − min of the per-source
means over seeds) and the seed std (the mean over sources of the per-source std over seeds), optionally
over several databases (e.g. a reference method run by another study) and a subset of sources:

    .venv/bin/python bench/study_summary.py bench/results/awq-owl-sensitivity.sqlite --spread \
        --reference bench/results/calibration-sources.sqlite:calibration-sources --sources wiki,austen,news
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


def spread(frames: list, sources: list[str] | None = None) -> str:
    """Per method (label) and metric: sources (and seeds) present, the spread over sources of the mean over
    seeds, and the seed std (mean over sources of the std over seeds; sources with one seed are left out)."""
    import pandas as pd

    ok = pd.concat([f[(f["status"] == "done") & (f["method"] != "dense")] for f in frames], ignore_index=True)
    if sources:
        ok = ok[ok["calib_source"].isin(sources)]
    metrics = sorted(c for c in ok.columns if c.startswith("ppl:"))
    out = ["| method | metric | sources (seeds) | best source | worst source | spread (max − min of means) | "
           "spread % of best | seed std (mean over sources) | spread / seed std |",
           "|---|---|---|---|---|---:|---:|---:|---:|"]
    for label, cframe in ok.groupby("label", sort=True):
        for m in metrics:
            per = cframe.dropna(subset=[m]).groupby("calib_source")[m]
            means, stds, counts = per.mean(), per.std(), per.count()
            if means.empty:
                continue
            used = ", ".join(f"{s} ({counts[s]})" for s in sorted(means.index, key=lambda s: (s not in REAL, s)))
            width = means.max() - means.min()
            seed_std = stds[counts >= 2].mean() if (counts >= 2).any() else float("nan")
            ratio = width / seed_std if seed_std and seed_std == seed_std else float("nan")
            out.append(f"| {label} | {m} | {used} | {means.idxmin()} {means.min():.2f} | {means.idxmax()} "
                       f"{means.max():.2f} | {width:.2f} | {100 * width / means.min():.1f} | {seed_std:.2f} | {ratio:.1f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("db")
    p.add_argument("--study", default=None)
    p.add_argument("--spread", action="store_true", help="also the spread over sources vs the seed std")
    p.add_argument("--reference", action="append", default=[], metavar="DB[:STUDY]",
                   help="another database (and study) whose runs join the spread table; repeatable")
    p.add_argument("--sources", default=None, help="comma-separated sources the spread table is restricted to")
    args = p.parse_args()
    print(summarize(args.db, args.study))
    if args.spread:
        frames = []
        for db, study in [(args.db, args.study)] + [tuple(r.split(":", 1)) if ":" in r else (r, None)
                                                     for r in args.reference]:
            with ResultStore(db, create=False) as store:
                frames.append(store.frame(study))
        sources = args.sources.split(",") if args.sources else None
        print(f"\nSpread over calibration sources{' (' + ', '.join(sources) + ')' if sources else ''} against the "
              "seed-to-seed std, per method and metric (perplexity; means and stds over seeds):\n")
        print(spread(frames, sources))


if __name__ == "__main__":
    main()
