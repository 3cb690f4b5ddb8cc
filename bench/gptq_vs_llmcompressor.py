"""GPTQ side by side: llm-compressor's ``oneshot`` against calibrant, on the same model, scheme and
calibration token ids, in one run.

    .venv/bin/python bench/gptq_vs_llmcompressor.py                                 # the issue's 32x512 run
    .venv/bin/python bench/gptq_vs_llmcompressor.py --calibration wiki:4x128 --max-eval-tokens 2048  # smoke test

Both sides quantize SmolLM2-135M (fp32) to W4, symmetric, group size 64, every decoder linear (lm_head
left dense), from the *same* ``[n, L]`` token ids: calibrant draws them once
(``make_calibration(spec, tokenizer, seed)``) and saves them to a file that both children read.
Each side runs in its own process, so its wall time and peak RSS (``ru_maxrss`` of that child, read
right after quantization, model load included) are its own. A third child measures one plain dense
forward pass (fp32, LM head included, batch 8) over the same tokens, and each wall time is also
reported as a multiple of it. Perplexity: held-out wiki through ``calibrant.api.evaluate_perplexity``
with one protocol for everyone — on calibrant's in-memory model, and on the directory llm-compressor
saves (its own compressed-tensors format, read back by calibrant's loader).

llm-compressor is a benchmark-only dependency. It pins transformers (0.14.x: ≤ 5.17) and
compressed-tensors (0.19) below calibrant's, so it lives in its own virtual environment,
``.venv-llmc`` beside ``.venv`` (git-ignored). This script creates it when missing with the same
torch build as calibrant's venv (never a CUDA download) plus ``bench/requirements-llmcompressor.txt``;
``--llmc-venv`` points elsewhere. If it cannot be installed the llm-compressor side is skipped with
the reason, and calibrant's side still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _llmc import (
    DEFAULT_VENV,
    child_argv,
    dense_forward_passes,
    emit,
    ensure_llmc_venv,
    llmc_load,
    llmc_oneshot,
    llmc_version,
    peak_rss_gb,
    prepare_ids,
    print_table,
)
from _llmc import run_child as _run

GROUP_SIZE = 64


# --------------------------------------------------------------------------------------- children
def child_dense(args: argparse.Namespace) -> dict:
    """One plain dense forward (with LM head, batch ``--batch-size``) over the calibration ids + dense perplexity."""
    from calibrant.api import evaluate_perplexity
    from calibrant.calibration import CalibrationSet
    from calibrant.models import load_model

    lm = load_model(args.model, quiet=True)
    ids = CalibrationSet.load(args.ids).input_ids
    passes = dense_forward_passes(lm.model, ids, args.batch_size)
    if args.no_eval:
        return {"dense_forward_s": min(passes), "passes": passes}
    ppl = evaluate_perplexity(lm, "wiki", max_tokens=args.max_eval_tokens, progress=False)["wiki"]
    return {"dense_forward_s": min(passes), "passes": passes, "ppl": ppl.ppl, "ppl_tokens": ppl.tokens}


def child_calibrant(args: argparse.Namespace) -> dict:
    from calibrant.api import evaluate_perplexity
    from calibrant.calibration import CalibrationSet
    from calibrant.engine import compress
    from calibrant.methods import make_method
    from calibrant.models import load_model

    lm = load_model(args.model, quiet=True)
    calib = CalibrationSet.load(args.ids)
    order = {"act_order": True, "static_groups": True} if args.calibrant_act_order else {}
    method = make_method("gptq", scheme=f"w4g{GROUP_SIZE}", **order)
    t0 = time.perf_counter()
    report = compress(lm.model, calib, method, batch_size=args.batch_size, progress=False, pipeline=args.pipeline)
    wall = time.perf_counter() - t0
    rss = peak_rss_gb()
    ppl = evaluate_perplexity(lm, "wiki", max_tokens=args.max_eval_tokens, progress=False)["wiki"]
    return {"wall_s": wall, "peak_rss_gb": rss, "timings": report.timings, "ppl": ppl.ppl, "ppl_tokens": ppl.tokens,
            "settings": {**method.params(), "pipeline": report.pipeline}}


def child_llmcompressor(args: argparse.Namespace) -> dict:
    """Runs inside the llm-compressor venv: no calibrant import here (its pins differ)."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    model, tokenizer = llmc_load(args.model_dir)
    modifier = GPTQModifier(
        targets="Linear",
        ignore=["lm_head"],
        config_groups={"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP_SIZE}}},
    )
    res = llmc_oneshot(model, tokenizer, args.ids, modifier)
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    settings = {k: str(v) for k, v in modifier.model_dump().items()
                if k in ("block_size", "dampening_frac", "actorder", "offload_hessians", "sequential_targets")}
    return {**res, "version": llmc_version(), "settings": settings}


def child_eval_dir(args: argparse.Namespace) -> dict:
    from calibrant.api import evaluate_perplexity

    ppl = evaluate_perplexity(args.out, "wiki", max_tokens=args.max_eval_tokens, progress=False)["wiki"]
    return {"ppl": ppl.ppl, "ppl_tokens": ppl.tokens}


CHILDREN = {"dense": child_dense, "calibrant": child_calibrant, "llmcompressor": child_llmcompressor,
            "eval-dir": child_eval_dir}


# --------------------------------------------------------------------------------------- parent
CHILD_OPTIONS = ("ids", "model", "batch_size", "max_eval_tokens", "calibrant_act_order", "no_eval")


def run_child(python: Path | str, name: str, args: argparse.Namespace, **extra: str) -> dict:
    return _run(python, __file__, child_argv(name, args, CHILD_OPTIONS, **extra))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="wiki:32x512", help="calibration spec (both sides get these ids)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="batch of the dense forward and of calibrant's GPTQ")
    p.add_argument("--max-eval-tokens", type=int, default=None, help="held-out wiki tokens for perplexity (all)")
    p.add_argument("--llmc-venv", default=str(DEFAULT_VENV), help="virtual env with llm-compressor")
    p.add_argument("--skip-llmc", action="store_true", help="run calibrant's side only")
    p.add_argument("--calibrant-act-order", action="store_true",
                   help="calibrant with act-order + static groups, the ordering llm-compressor 0.14 uses by default "
                        "(actorder='static'); default: calibrant's default GPTQ (no act-order)")
    p.add_argument("--pipelines", default="one-pass,two-pass",
                   help="calibrant engine pipelines to run, comma-separated (one-pass: each block once, true-sequential; "
                        "two-pass: stats from the dense block, then a second run)")
    p.add_argument("--pipeline", default="one-pass", help=argparse.SUPPRESS)  # the child's
    p.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)  # the dense child's, at the end
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory (ids, llm-compressor's model)")
    # children
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        emit(CHILDREN[args.child](args))
        return

    work = Path(tempfile.mkdtemp(prefix="gptq-bench-"))  # ids file + llm-compressor's saved model; removed at the end
    try:
        args.ids = str(work / "calibration.safetensors")
        model_dir, calib = prepare_ids(args.model, args.calibration, args.seed, Path(args.ids))
        _compare(args, model_dir, calib, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _compare(args: argparse.Namespace, model_dir: Path, calib: Any, work: Path) -> None:
    print(f"model {args.model} ({model_dir}); calibration {args.calibration} seed {args.seed}: "
          f"{calib.n}x{calib.seq_len} ids, hash {calib.hash} → {args.ids}", flush=True)

    results: dict[str, dict] = {}
    results["dense"] = run_child(sys.executable, "dense", args)
    print(f"dense forward (LM head, batch {args.batch_size}): {results['dense']['dense_forward_s']:.1f}s", flush=True)
    pipelines = [x.strip() for x in args.pipelines.split(",") if x.strip()]
    for pipeline in pipelines:
        key = "calibrant" if pipeline == pipelines[0] else f"calibrant-{pipeline}"
        results[key] = run_child(sys.executable, "calibrant", args, pipeline=pipeline)
        print(f"calibrant GPTQ ({pipeline}): {results[key]['wall_s']:.1f}s", flush=True)

    llmc_note = "skipped (--skip-llmc)"
    if not args.skip_llmc:
        py, info = ensure_llmc_venv(Path(args.llmc_venv))
        if py is None:
            llmc_note = f"skipped: llm-compressor could not be installed ({info})"
        else:
            out = work / "llmc-w4g64"
            try:
                results["llmcompressor"] = run_child(py, "llmcompressor", args, model_dir=str(model_dir), out=str(out))
                results["llmcompressor"].update(run_child(sys.executable, "eval-dir", args, out=str(out)))
                llmc_note = f"llm-compressor {info.split()[0]} (torch {info.split()[1]}) in {args.llmc_venv}"
            except RuntimeError as exc:
                llmc_note = f"failed: {exc}"
    print(f"llm-compressor side: {llmc_note}", flush=True)
    args.no_eval = True  # the dense forward again, after every compression: the ratio uses the mean of both
    results["dense-end"] = run_child(sys.executable, "dense", args)
    starts, ends = results["dense"]["passes"], results["dense-end"]["passes"]
    print(f"dense forward passes: at the start {', '.join(f'{x:.1f}s' for x in starts)}; at the end "
          f"{', '.join(f'{x:.1f}s' for x in ends)}\n")

    fwd = (min(starts) + min(ends)) / 2
    rows = [["dense fp32", "-", "-", "-", f"{results['dense']['ppl']:.3f}"]]
    labels = [("llmcompressor", "llm-compressor oneshot GPTQ")] + [
        ("calibrant" if p == pipelines[0] else f"calibrant-{p}", f"calibrant GPTQ ({p})") for p in pipelines]
    for key, label in labels:
        r = results.get(key)
        if r:
            rows.append([label, f"{r['wall_s']:.1f}", f"{r['wall_s'] / fwd:.2f}", f"{r['peak_rss_gb']:.3f}",
                         f"{r['ppl']:.3f}"])
    print_table(["W4 sym g64, lm_head dense", "wall s", "x dense fwd", "peak RSS GB", "ppl wiki (held-out)"], rows)
    print(f"\none dense forward over {calib.n}x{calib.seq_len} tokens (fp32, LM head, batch {args.batch_size}): "
          f"{fwd:.1f}s (mean of the best of two passes before and after the compressions); perplexity on {results['dense']['ppl_tokens']} held-out wiki tokens, seq_len 512; "
          f"calibration hash {calib.hash}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads default; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for key, _ in labels:
        if key in results:
            print(f"{key} GPTQ settings: {results[key]['settings']}")
    for key, _ in labels[1:]:
        if "timings" in results.get(key, {}):
            t = results[key]["timings"]
            print(f"{key} time split: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    print("note: SmolLM2's weights already sit on a Q4_1 grid (blocks of 32) — see shared/ASSETS.md.")
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": {"spec": args.calibration, "seed": args.seed,
                                                               "hash": calib.hash}, "llmc": llmc_note, **results},
                                              indent=2, default=str))


if __name__ == "__main__":
    main()
