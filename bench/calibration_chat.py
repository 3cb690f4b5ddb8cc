"""Issue 18's question, measured: on an instruction model, which calibration data — raw text, chat-formatted
conversations, a mixture, or the model's own answers (``self:chat``) — and does curated selection from a
pool (``diverse``, ``coverage``) beat a random pick from the same pool at equal n?

The grid runs as a study (hours on 2 cores; it resumes where it stopped):

    .venv/bin/python -m calibrant study run bench/studies/calibration-chat.yaml \\
        --db bench/results/calibration-chat.sqlite
    .venv/bin/python bench/calibration_chat.py --db bench/results/calibration-chat.sqlite

This script prints, per method and calibration source, mean ± std over the seeds of the held-out wiki and
news perplexity, the held-out chat perplexity (``dialogue:chat``: conversations never used for calibration,
rendered through the model's template) and the 7-task zero-shot average; then, per method and metric, the
selection verdicts (does ``diverse`` / ``coverage`` lower the mean and the seed std against ``random`` from
the same pool?); and the time each selection took against drawing its pool, from the sets' provenance.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from study_summary import mean_std  # noqa: E402

from calibrant.studies import ResultStore  # noqa: E402

METRICS = ("ppl:wiki", "ppl:news", "ppl:dialogue:chat", "acc:avg")
LOWER_IS_BETTER = {"ppl:wiki", "ppl:news", "ppl:dialogue:chat"}


def strategy_of(calibration: str) -> str | None:
    for part in calibration.split(":"):
        if part.startswith("select="):
            return part.split("=", 1)[1]
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True, help="the study database (see above)")
    p.add_argument("--study", default="calibration-chat")
    p.add_argument("--json", default=None, help="also write the table's numbers here")
    args = p.parse_args()

    with ResultStore(args.db, create=False) as store:
        frame = store.frame(args.study)
    ok = frame[frame["status"] == "done"]
    if ok.empty:
        sys.exit(f"no finished runs of study '{args.study}' in {args.db}; run the study first")
    metrics = [m for m in METRICS if m in ok.columns]
    order = list(dict.fromkeys(ok["calibration"].dropna()))  # the study's own order of sources
    print(f"## Calibration data for an instruction model — study `{args.study}` ({args.db})\n")
    print(f"{len(ok)} finished runs of {len(frame)}. Mean ± std over seeds; perplexities on the first held-out "
          "tokens the study's evaluation names; acc:avg over the 7 tasks at the study's document limit.\n")
    print("| method | calibration | runs | " + " | ".join(metrics) + " |")
    print("|---|---|---:|" + "---:|" * len(metrics))
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    dense = ok[ok["method"] == "dense"]
    if not dense.empty:
        print("| dense | – | 1 | " + " | ".join(f"{dense[m].iloc[0]:.3f}" if m in dense else "-" for m in metrics)
              + " |")
    for label, mframe in ok[ok["method"] != "dense"].groupby("label", sort=True):
        for calib in order:
            sframe = mframe[mframe["calibration"] == calib]
            if sframe.empty:
                continue
            values = {m: sframe[m].dropna().tolist() for m in metrics}
            table.setdefault(label, {})[calib] = values
            cells = [mean_std(values[m], 3 if m.startswith("acc") else 2) for m in metrics]
            print(f"| {label} | {calib} | {len(sframe)} | " + " | ".join(cells) + " |")

    print("\nSelection against `random` from the same pool (same n, same pool size):\n")
    for label, rows in table.items():
        random_row = next((v for c, v in rows.items() if strategy_of(c) == "random"), None)
        if random_row is None:
            continue
        for calib, values in rows.items():
            strategy = strategy_of(calib)
            if strategy in (None, "random"):
                continue
            for m in metrics:
                a, b = values[m], random_row[m]
                if len(a) < 2 or len(b) < 2:
                    continue
                better = statistics.mean(a) < statistics.mean(b) if m in LOWER_IS_BETTER else \
                    statistics.mean(a) > statistics.mean(b)
                tighter = statistics.stdev(a) < statistics.stdev(b)
                print(f"- {label}, {m}: {strategy} {mean_std(a, 3)} vs random {mean_std(b, 3)} — mean "
                      f"{'better' if better else 'not better'}, seed std {'lower' if tighter else 'not lower'}")

    compressed = ok[ok["method"] != "dense"]
    hashes = compressed.groupby(["calibration", "seed"])["calib_hash"].nunique()
    methods = compressed.groupby(["calibration", "seed"])["method"].nunique()
    shared = int(((methods > 1) & (hashes == 1)).sum())
    print(f"\nCalibration sets: of {int((methods > 1).sum())} (source, seed) pairs run by more than one method, "
          f"{shared} gave every method the same content hash.")

    timings: dict[str, list[tuple[float, float]]] = {}
    generations: list[dict] = []  # self-generated sets' timing
    seen: set[str] = set()  # a set is made once and shared by the methods: count it once, by its content hash
    for calib_hash, details in zip(ok["calib_hash"], ok["details"], strict=True):
        if calib_hash in seen or not isinstance(details, str):
            continue
        seen.add(calib_hash)
        cal = json.loads(details).get("calibration") or {}
        sel, timing = cal.get("selection") or {}, cal.get("selection_timing")
        if sel and timing:
            timings.setdefault(sel["strategy"], []).append((timing["pool_s"], timing["select_s"]))
        if cal.get("generation_timing"):
            generations.append(cal["generation_timing"])
    if timings:
        print("\nSelection time, from each set's provenance (a set is made once per seed and shared by the "
              "methods; drawing the pool reads the cached token ids):\n")
        print("| strategy | sets | pool draw s | selection s | selection / pool draw |")
        print("|---|---:|---:|---:|---:|")
        for strategy, pairs in sorted(timings.items()):
            pool, sel = [a for a, _ in pairs], [b for _, b in pairs]
            ratio = statistics.mean(sel) / max(statistics.mean(pool), 1e-9)
            print(f"| {strategy} | {len(pairs)} | {mean_std(pool, 3)} | {mean_std(sel, 3)} | {ratio:.1f}× |")
    if generations:
        secs = [g["seconds"] for g in generations]
        rates = [g["tokens_per_second"] for g in generations]
        toks = [g["generated_tokens"] for g in generations]
        print(f"\nSelf-generated sets: {len(generations)}, {min(toks)}–{max(toks)} sampled tokens each, "
              f"{min(secs):.0f}–{max(secs):.0f} s ({min(rates):.0f}–{max(rates):.0f} tokens/s, "
              f"{', '.join(sorted({str(g['threads']) for g in generations}))} threads, "
              f"{', '.join(sorted({g['device'] for g in generations}))}).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": table, "selection_timing": timings, "generation_timing": generations}, f, indent=2)


if __name__ == "__main__":
    main()
