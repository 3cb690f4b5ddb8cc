"""Structured pruning search on the real default model: searched vs uniform vs dense at one budget.

    .venv/bin/python bench/structured_search.py    # the issue's run (41 min on the shared 2-core machine)
    .venv/bin/python bench/structured_search.py --samples 24 --heldout 6 --eval-tokens 4096 --limit 20  # quick

Prints Markdown tables: perplexity on the wiki/news held-out splits (first --eval-tokens tokens; the
search's proxy is a separate slice, the *last* --proxy-tokens tokens of --proxy-corpus's held-out split),
zero-shot accuracy (lm-eval, --limit items per task), parameters and measured forward throughput of
the dense model, the best uniform configuration (same budget, same importance score) and the searched
one; the predictor's Spearman ρ (K-fold CV and on held-out random configurations); each phase's wall
time, also as a multiple of one plain dense forward pass over the calibration tokens timed in this
run; peak RSS.
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time

import torch


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.8)
    ap.add_argument("--samples", type=int, default=64, help="measured configurations the predictor learns from")
    ap.add_argument("--heldout", type=int, default=10, help="extra random configurations to test the predictor on")
    ap.add_argument("--calibration", default="wiki:32x512")
    ap.add_argument("--score", default="wanda", choices=["wanda", "magnitude"])
    ap.add_argument("--proxy-tokens", type=int, default=2048)
    ap.add_argument("--proxy-corpus", default="wiki",
                    help="held-out corpora of the proxy (default wiki: this bench's figures in BENCHMARKS.md; the "
                         "search's own default is wiki,news)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--corpora", default="wiki,news")
    ap.add_argument("--tasks", default="arc_easy,piqa", help="zero-shot tasks ('' to skip)")
    ap.add_argument("--limit", type=int, default=100, help="items per zero-shot task")
    ap.add_argument("--quantum", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="keep the search output directory here (default: a temp dir)")
    args = ap.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from calibrant.api import resolve_calibration
    from calibrant.calibration import heldout_token_ids
    from calibrant.evaluate.perplexity import perplexity
    from calibrant.evaluate.zeroshot import evaluate_tasks
    from calibrant.models import load_model
    from calibrant.search import StructuredConfig, count_params, search_structured
    from calibrant.search.pruner import tokens_per_second

    started = time.strftime("%Y-%m-%d %H:%M")
    wall0 = time.perf_counter()
    t0 = time.perf_counter()
    lm = load_model(args.model, quiet=True)
    calib = resolve_calibration(args.calibration, lm.tokenizer, args.seed, lm.context_length,
                                progress=False)
    load_s = time.perf_counter() - t0

    # one plain dense forward pass over the calibration tokens (the unit of the phase times)
    ids = calib.input_ids
    with torch.no_grad():
        t0 = time.perf_counter()
        for b in range(0, ids.shape[0], args.batch_size):
            lm.model(input_ids=ids[b:b + args.batch_size], use_cache=False)
        fwd_s = time.perf_counter() - t0

    out_dir = args.out or tempfile.mkdtemp(prefix="structured-search-") + "/run"
    res = search_structured(
        lm, calib, args.budget, args.samples, score=args.score, seed=args.seed, out=out_dir,
        overwrite=True, proxy_corpus=args.proxy_corpus, proxy_tokens=args.proxy_tokens, quantum=args.quantum,
        top_k=args.top_k, rounds=args.rounds,
        heldout_samples=args.heldout, batch_size=args.batch_size, progress=True,
    )
    pruner = res.pruner
    shape = pruner.shape
    configs = {"dense": StructuredConfig.dense(shape), "uniform": res.uniform.config, "searched": res.best.config}
    corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    streams = {c: heldout_token_ids(c, lm.tokenizer, progress=False)[0] for c in corpora}
    rows = {}
    t_eval = time.perf_counter()
    for label, cfg in configs.items():
        pruner.apply(cfg)
        row = {"kept": cfg.kept_fraction(shape), "params": count_params(lm.model), "proxy": None}
        # forward throughput: best of 3 passes over the first 4x512 calibration tokens (robust to a shared CPU)
        row["tok_s"] = max(tokens_per_second(lm.model, ids[:4], batch_size=4) for _ in range(3))
        for c, stream in streams.items():
            r = perplexity(lm.model, stream, max_tokens=args.eval_tokens, batch_size=args.batch_size, progress=False)
            row[c] = r.ppl
        if tasks:
            zs = evaluate_tasks(lm.model, lm.tokenizer, tasks, limit=args.limit, batch_size=8, progress=False)
            row["zs"] = {n: t.metrics.get("acc_norm", t.metrics.get("acc")) for n, t in zs.tasks.items()}
            row["zs_avg"] = zs.average_norm
        rows[label] = row
        print(f"evaluated {label} ({time.perf_counter() - t_eval:.0f}s so far)", flush=True)
    eval_s = time.perf_counter() - t_eval
    rows["dense"]["proxy"], rows["uniform"]["proxy"], rows["searched"]["proxy"] = \
        res.dense.ppl, res.uniform.ppl, res.best.ppl

    # ---------------------------------------------------------------------------------------- tables
    print(f"\nModel {args.model} (hash {lm.model_hash}); budget {args.budget:g} of block parameters; score "
          f"{args.score}; calibration {args.calibration} seed {args.seed} (hash {calib.hash}); {args.samples} "
          f"measured configurations + {args.heldout} held-out; proxy: last {args.proxy_tokens} tokens of "
          f"{args.proxy_corpus} held-out; evaluation: first {args.eval_tokens} tokens of each held-out split, "
          f"seq_len 512; zero-shot "
          f"limit {args.limit} per task (acc_norm where defined); forward tok/s: best of 3 full-model passes over "
          f"4x512 calibration tokens\n")
    uni = res.uniform.config
    uni_desc = f"{uni.kv_groups[0]}/{shape.n_kv} KV groups, {uni.mlp_channels[0]}/{shape.intermediate} channels"
    head = ["model", "kept block params", "params", "proxy ppl", *[f"{c} ppl" for c in corpora],
            *[f"{t}" for t in tasks], *(["zero-shot avg"] if tasks else []), "forward tok/s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    names = {"dense": "dense", "uniform": f"uniform ({uni_desc})", "searched": "searched"}
    for label, row in rows.items():
        cells = [names[label], f"{row['kept']:.4f}", f"{row['params'] / 1e6:.2f} M", f"{row['proxy']:.3f}",
                 *[f"{row[c]:.3f}" for c in corpora], *[f"{row['zs'][t]:.3f}" for t in tasks if tasks],
                 *([f"{row['zs_avg']:.3f}"] if tasks else []), f"{row['tok_s']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    best = res.best.config
    print(f"\nsearched configuration (per block): KV groups {list(best.kv_groups)}; MLP channels "
          f"{list(best.mlp_channels)}; found by: {res.best.origin}")
    cv, ho = res.cv, res.heldout
    print(f"\npredictor (LightGBM on log-perplexity): K-fold CV Spearman ρ {cv.spearman:.3f}, MAE {cv.mae:.4f} "
          f"(n={cv.n}); held-out random configurations Spearman ρ "
          f"{ho.spearman if ho else float('nan'):.3f}, MAE {ho.mae if ho else float('nan'):.4f} "
          f"(n={ho.n if ho else 0})\n")
    t = res.timings
    phases = [("load model + calibration", load_s), ("plain dense forward over the calibration tokens", fwd_s),
              ("importance (wanda, one pass)", t.get("importance_s", 0.0)),
              (f"measure {args.samples} configurations", t.get("pairs_s", 0.0)),
              (f"measure {args.heldout} held-out configurations", t.get("heldout_pairs_s", 0.0)),
              ("fit predictor + CV", t.get("fit_s", 0.0)), ("narrow + evolutionary search", t.get("search_s", 0.0)),
              (f"re-evaluate top {args.top_k}", t.get("reeval_s", 0.0)), ("save", t.get("save_s", 0.0)),
              ("final evaluation (throughput, ppl, zero-shot; 3 models)", eval_s)]
    print("| phase | wall s | × dense forward |")
    print("|---|---:|---:|")
    for name, s in phases:
        print(f"| {name} | {s:.1f} | {s / fwd_s:.2f} |")
    total = time.perf_counter() - wall0
    print(f"| **total** | {total:.1f} | {total / fwd_s:.2f} |")
    print(f"\npeak RSS {_peak_rss_gb():.2f} GB; {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}; started {started}; output {res.out}")


if __name__ == "__main__":
    main()
