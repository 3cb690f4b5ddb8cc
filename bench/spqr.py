"""SpQR against GPTQ at nearby effective bits: perplexity vs bits per weight, one table.

    .venv/bin/python bench/spqr.py                                                     # the issue's run
    .venv/bin/python bench/spqr.py --calibration wiki:4x128 --max-eval-tokens 2048 --configs spqr,gptq-w3g64  # smoke

Every configuration quantizes SmolLM2-135M (fp32), every decoder linear (lm_head dense), from the same
32×512 wiki calibration ids (drawn once, saved to a file every child reads), in its own child process,
so its wall time and peak RSS (``ru_maxrss`` right after compression, model load included) are its own.
A dense child times one plain forward pass over the same tokens (before and after the compressions;
the ratio uses the mean of the two best passes). Effective bits are the compression report's
parameter-weighted count (SpQR: the paper's count with its outliers, ``calibrant.methods.spqr``; GPTQ:
bits + 16-bit scales (+ zero points when asymmetric) per group). Perplexity: held-out wiki and news.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _llmc import dense_forward_passes, emit, peak_rss_gb, prepare_ids, print_table
from _llmc import run_child as _run

CONFIGS = {  # label → (recipe, parameters)
    "spqr": ("spqr", {}),  # the paper's default: w3, groups of 16, 3-bit statistics, τ = 0.2, act-order
    "spqr-tau-1": ("spqr", {"outlier_threshold": 1.0}),  # fewer outliers
    "spqr-tau-inf": ("spqr", {"outlier_threshold": "inf"}),  # no outliers: GPTQ with quantized statistics
    "gptq-w3g16-asym": ("gptq", {"scheme": "w3g16-asym", "act_order": True}),  # SpQR's grid, 16-bit statistics
    "gptq-w3g64": ("gptq", {"scheme": "w3g64"}),
    "gptq-w4g128": ("gptq", {"scheme": "w4g128"}),
    "gptq-w4g64": ("gptq", {"scheme": "w4g64"}),
}
CORPORA = ("wiki", "news")


def _ppl(lm, args: argparse.Namespace) -> dict:
    from calibrant.api import evaluate_perplexity

    res = evaluate_perplexity(lm, ",".join(CORPORA), max_tokens=args.max_eval_tokens, progress=False)
    return {c: res[c].ppl for c in CORPORA} | {"ppl_tokens": res[CORPORA[0]].tokens}


def child_dense(args: argparse.Namespace) -> dict:
    from calibrant.calibration import CalibrationSet
    from calibrant.models import load_model

    lm = load_model(args.model, quiet=True)
    passes = dense_forward_passes(lm.model, CalibrationSet.load(args.ids).input_ids, args.batch_size)
    return {"passes": passes, **({} if args.no_eval else _ppl(lm, args))}


def child_config(args: argparse.Namespace) -> dict:
    from calibrant.calibration import CalibrationSet
    from calibrant.engine import compress
    from calibrant.methods import make_recipe
    from calibrant.models import load_model

    recipe, params = CONFIGS[args.config]
    lm = load_model(args.model, quiet=True)
    methods = make_recipe(recipe, **params)
    t0 = time.perf_counter()
    report = compress(lm.model, CalibrationSet.load(args.ids), methods, batch_size=args.batch_size, progress=False)
    wall = time.perf_counter() - t0
    rss = peak_rss_gb()
    outliers = [r.info.get("outlier_fraction") for r in report.layers]
    size = sum(r.shape[0] * r.shape[1] for r in report.layers)
    fraction = (sum(f * r.shape[0] * r.shape[1] for f, r in zip(outliers, report.layers, strict=True)) / size
                if None not in outliers else None)
    return {"wall_s": wall, "peak_rss_gb": rss, "bits": report.effective_bits, "outliers": fraction,
            "scheme": report.layers[0].info["scheme"], "settings": methods[0].params(), **_ppl(lm, args)}


def run_child(name: str, args: argparse.Namespace, *extra: str) -> dict:
    argv = ["--child", name, "--ids", args.ids, "--model", args.model, "--batch-size", str(args.batch_size), *extra]
    if args.max_eval_tokens:
        argv += ["--max-eval-tokens", str(args.max_eval_tokens)]
    return _run(sys.executable, __file__, argv)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="wiki:32x512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-eval-tokens", type=int, default=16384, help="held-out tokens per corpus")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--child", choices=["dense", "config"], help=argparse.SUPPRESS)
    p.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        emit((child_dense if args.child == "dense" else child_config)(args))
        return
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        p.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    work = Path(tempfile.mkdtemp(prefix="spqr-bench-"))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        args.ids = str(work / "calibration.safetensors")
        _, calib = prepare_ids(args.model, args.calibration, args.seed, Path(args.ids))
        dense = run_child("dense", args)
        results = {}
        for c in configs:
            results[c] = run_child("config", args, "--config", c)
            print(f"{c}: {results[c]['wall_s']:.1f}s, {results[c]['bits']:.3f} bits, wiki {results[c]['wiki']:.3f}",
                  flush=True)
        end = run_child("dense", args, "--no-eval")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fwd = (min(dense["passes"]) + min(end["passes"])) / 2
    rows = [["dense fp32", "-", "16/32", "-", f"{dense['wiki']:.3f}", f"{dense['news']:.3f}", "-", "-", "-"]]
    for c in sorted(configs, key=lambda c: results[c]["bits"]):
        r = results[c]
        rows.append([c, r["scheme"], f"{r['bits']:.3f}", "-" if r["outliers"] is None else f"{100 * r['outliers']:.2f}",
                     f"{r['wiki']:.3f}", f"{r['news']:.3f}", f"{r['wall_s']:.1f}", f"{r['wall_s'] / fwd:.2f}",
                     f"{r['peak_rss_gb']:.3f}"])
    print()
    print_table(["config", "grid", "effective bits", "outliers %", "ppl wiki", "ppl news", "wall s", "x dense fwd",
                 "peak RSS GB"], rows)
    print(f"\none dense forward over {calib.n}x{calib.seq_len} tokens (fp32, LM head, batch {args.batch_size}): "
          f"{fwd:.1f}s (best passes before {min(dense['passes']):.1f}s and after {min(end['passes']):.1f}s); "
          f"perplexity on {dense['ppl_tokens']} held-out tokens per corpus, seq_len 512; calibration "
          f"{args.calibration} seed {args.seed}, hash {calib.hash}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; started {started}, ended {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for c in configs:
        print(f"{c} settings: {results[c]['settings']}")
    print("note: SmolLM2's weights already sit on a Q4_1 grid (blocks of 32) — see shared/ASSETS.md.")


if __name__ == "__main__":
    main()
