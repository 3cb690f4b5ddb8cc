"""Issue 4's question, with the why: does the calibration source matter, and does self-calibration land
within the spread of real sources?

The grid itself (Wanda 50 % and GPTQ W4 × six sources × seeds, 128×512 tokens each) runs as a study, so
that hours of work survive a crash and share runs with other studies:

    .venv/bin/python -m calibrant study run bench/studies/calibration-sources.yaml \\
        --db bench/results/calibration-sources.sqlite
    .venv/bin/python bench/calibration_sources.py --db bench/results/calibration-sources.sqlite

This script prints the study's perplexity table (mean ± std over the seeds present), then diagnostics of
every calibration set the study used (rebuilt from the cache, hash-checked against the database): the
Jensen–Shannon divergence of its unigram distribution to each held-out evaluation text, its distinct
4-gram ratio, and the dense model's perplexity on its first sequences; and last, self-calibration
generation throughput measured here on an uncached set (``--throughput-n``; run it on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from study_summary import mean_std, summarize  # noqa: E402

from calibrant.studies import ResultStore  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True, help="the study database (see above)")
    p.add_argument("--study", default="calibration-sources")
    p.add_argument("--eval", default="wiki,news", help="held-out corpora for the JS divergence")
    p.add_argument("--ppl-rows", type=int, default=16,
                   help="sequences of each set scored by the dense model (0 to skip)")
    p.add_argument("--throughput-n", type=int, default=16,
                   help="sequences generated (uncached) to measure self-calibration tokens/s; 0 to skip")
    p.add_argument("--json", default=None, help="also write the diagnostics here")
    args = p.parse_args()

    from calibrant.calibration import SelfGenConfig, generate_self_calibration, inspect_calibration
    from calibrant.studies.runner import Workspace

    evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    with ResultStore(args.db, create=False) as store:
        frame = store.frame(args.study)
    runs = frame[(frame["status"] == "done") & frame["calib_source"].notna()]
    if runs.empty:
        sys.exit(f"no finished calibrated runs of study '{args.study}' in {args.db}; run the study first")
    print(f"## Calibration sources — study `{args.study}` ({args.db})\n")
    print(summarize(args.db, args.study))

    ws = Workspace()
    sets = runs[["model", "calibration", "calib_source", "seed", "calib_hash"]].drop_duplicates()
    diag: dict[str, dict[str, list[float]]] = {}
    mismatched = []
    model_spec = str(sets["model"].iloc[0])
    dense = ws.model(model_spec)
    for row in sets.sort_values(["calib_source", "seed"]).itertuples():
        print(f"# {time.strftime('%H:%M:%S')} diagnostics of {row.calibration} seed {row.seed}", file=sys.stderr,
              flush=True)
        cs = ws.calibration(row.model, row.calibration, int(row.seed))
        if cs.hash != row.calib_hash:
            mismatched.append(f"{row.calibration} seed {row.seed}: {cs.hash} != {row.calib_hash}")
        d = inspect_calibration(cs, against=evals, tokenizer=dense.tokenizer)
        entry = diag.setdefault(row.calib_source, {})
        entry.setdefault("seeds", []).append(int(row.seed))
        for name, js in d.js_divergence.items():
            entry.setdefault(f"js_{name}", []).append(js)
        entry.setdefault("distinct4", []).append(d.distinct_ngram_ratio.get(4, float("nan")))
        entry.setdefault("distinct_tokens", []).append(d.distinct_tokens)
        if args.ppl_rows > 0:
            sub = type(cs).from_tensor(cs.input_ids[: args.ppl_rows])
            entry.setdefault("dense_ppl", []).append(inspect_calibration(sub, model=dense.model).perplexity)

    k = args.ppl_rows
    print(f"\nDiagnostics of the calibration sets (mean ± std over the seeds). JS: Jensen–Shannon divergence "
          f"(bits) of the set's unigram distribution to the held-out text; distinct-4: distinct 4-grams / "
          f"4-grams within rows; dense ppl: the uncompressed model's perplexity on the set's first {k} rows.\n")
    head = ["calibration", "seeds", *[f"JS vs {e}" for e in evals], "distinct-4", "distinct tokens", "dense ppl"]
    print("| " + " | ".join(head) + " |")
    print("|---|---|" + "---:|" * (len(head) - 2))
    for source, entry in sorted(diag.items()):
        cells = [mean_std(entry.get(f"js_{e}", []), 3) for e in evals]
        cells += [mean_std(entry["distinct4"], 3), mean_std([float(x) for x in entry["distinct_tokens"]], 0),
                  mean_std(entry.get("dense_ppl", []), 2)]
        print(f"| {source} | {','.join(map(str, entry['seeds']))} | " + " | ".join(cells) + " |")
    if mismatched:
        print("\n**Calibration sets differ from the ones the study used:** " + "; ".join(mismatched))

    throughput = None
    if args.throughput_n > 0:
        length = int(runs["calibration"].iloc[0].rsplit("x", 1)[1])
        config = SelfGenConfig()
        _, info = generate_self_calibration(dense.model, dense.tokenizer, args.throughput_n, length, config,
                                            seed=12345, progress=False)
        throughput = info["timing"]
        n_full = int(runs["calibration"].iloc[0].rsplit(":", 1)[1].split("x")[0])
        print(f"\nSelf-calibration generation, measured now ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{platform.machine()}, {throughput['threads']} threads, {throughput['device']}): "
              f"{throughput['tokens_per_second']:.1f} tokens/s ({throughput['generated_tokens']} tokens in "
              f"{throughput['seconds']:.1f} s; {args.throughput_n}x{length}, batch {config.batch_size}, KV cache); "
              f"{n_full}x{length} takes ≈ {n_full * (length - 1) / throughput['tokens_per_second'] / 60:.1f} min.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "diagnostics": diag, "throughput": throughput,
                       "torch": torch.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
