"""Pruning side by side: llm-compressor's Wanda and SparseGPT (``oneshot``) against calibrant's, on the
same model, target and calibration token ids, in one run.

    .venv/bin/python bench/pruning_vs_llmcompressor.py --max-eval-tokens 32768             # the issue's 32x512 run
    .venv/bin/python bench/pruning_vs_llmcompressor.py --calibration wiki:4x128 --max-eval-tokens 2048  # smoke test

Every side prunes SmolLM2-135M (fp32) to 50 % unstructured sparsity in every decoder linear (lm_head
dense) from the *same* ``[n, L]`` token ids, drawn once by calibrant and saved to one file.
- llm-compressor: ``WandaPruningModifier`` / ``SparseGPTModifier`` with its defaults (SparseGPT: block
  128, damping 0.01), targets the decoder layers, run by ``oneshot`` in its own venv (``.venv-llmc``,
  see ``bench/_llmc.py``); it saves a plain (uncompressed) HF directory.
- calibrant: ``make_method("wanda" | "sparsegpt", sparsity=0.5)`` with its defaults and the default
  engine pipeline (one-pass; ``--calibrant-pipeline two-pass`` for the reference order).
Each side runs in its own process, so its wall time and peak RSS (``ru_maxrss`` right after pruning,
model load included) are its own. A dense child times one plain forward pass (fp32, LM head, batch 8)
over the same tokens at the start and again at the end; ``x dense fwd`` divides by the mean of the two.
Perplexity: held-out wiki and news through ``calibrant.api.evaluate_perplexity`` with one protocol for
everyone — on calibrant's in-memory model and on the directory llm-compressor saved (read back by
calibrant's loader). The sparsity column is counted on the weights each side produced.
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
    run_child,
)

METHODS = ("wanda", "sparsegpt")
LABELS = {"wanda": "Wanda", "sparsegpt": "SparseGPT"}


def _decoder_sparsity(model: Any) -> dict:
    """Share of zeros over every linear inside the decoder blocks, and a hash of lm_head (kept dense)."""
    import hashlib

    import torch

    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            zeros += int(module.weight.numel() - torch.count_nonzero(module.weight))
            total += module.weight.numel()
    head = model.get_output_embeddings().weight.detach().contiguous()
    return {"sparsity": zeros / total if total else 0.0, "decoder_linear_params": total,
            "lm_head_sha256": hashlib.sha256(head.numpy().tobytes()).hexdigest()[:16]}


def _ppl(model: Any, args: argparse.Namespace) -> dict:
    from calibrant.api import evaluate_perplexity

    res = evaluate_perplexity(model, args.eval, max_tokens=args.max_eval_tokens, progress=False)
    return {k: {"ppl": r.ppl, "tokens": r.tokens} for k, r in res.items()}


# --------------------------------------------------------------------------------------- children
def child_dense(args: argparse.Namespace) -> dict:
    from calibrant.calibration import CalibrationSet
    from calibrant.models import load_model

    lm = load_model(args.model, quiet=True)
    passes = dense_forward_passes(lm.model, CalibrationSet.load(args.ids).input_ids, args.batch_size)
    out = {"dense_forward_s": min(passes), "passes": passes}
    if not args.no_eval:
        out["ppl"] = _ppl(lm, args)
        out["lm_head_sha256"] = _decoder_sparsity(lm.model)["lm_head_sha256"]
    return out


def child_calibrant(args: argparse.Namespace) -> dict:
    from calibrant.calibration import CalibrationSet
    from calibrant.engine import compress
    from calibrant.methods import make_method
    from calibrant.models import load_model

    lm = load_model(args.model, quiet=True)
    calib = CalibrationSet.load(args.ids)
    method = make_method(args.method, sparsity=args.sparsity)
    t0 = time.perf_counter()
    report = compress(lm.model, calib, method, batch_size=args.batch_size, progress=False, pipeline=args.pipeline)
    wall = time.perf_counter() - t0
    rss = peak_rss_gb()
    return {"wall_s": wall, "peak_rss_gb": rss, "timings": report.timings, **_decoder_sparsity(lm.model),
            "ppl": _ppl(lm, args), "settings": {**method.params(), "pipeline": report.pipeline}}


def child_llmcompressor(args: argparse.Namespace) -> dict:
    """Runs inside the llm-compressor venv: no calibrant import here (its pins differ)."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    model, tokenizer = llmc_load(args.model_dir)
    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[args.method]
    # the decoder layers are the targets (as llm-compressor's own pruning examples do): every linear
    # in them is pruned, lm_head is never touched
    modifier = cls(sparsity=args.sparsity, mask_structure="0:0", targets=[r"re:model\.layers\.\d+$"])
    res = llmc_oneshot(model, tokenizer, args.ids, modifier)
    sparsity = _decoder_sparsity(model)
    model.save_pretrained(args.out, save_compressed=False)  # plain dense safetensors: any loader reads them
    tokenizer.save_pretrained(args.out)
    keep = ("sparsity", "mask_structure", "targets", "block_size", "dampening_frac", "sparsity_profile")
    settings = {k: v for k, v in modifier.model_dump().items() if k in keep}
    return {**res, **sparsity, "version": llmc_version(), "settings": settings}


def child_eval_dir(args: argparse.Namespace) -> dict:
    from calibrant.models import load_model

    lm = load_model(args.out, quiet=True)
    reloaded = _decoder_sparsity(lm.model)
    return {"ppl": _ppl(lm, args), "reloaded_sparsity": reloaded["sparsity"],
            "reloaded_lm_head_sha256": reloaded["lm_head_sha256"]}


CHILDREN = {"dense": child_dense, "calibrant": child_calibrant, "llmcompressor": child_llmcompressor,
            "eval-dir": child_eval_dir}


# --------------------------------------------------------------------------------------- parent
CHILD_OPTIONS = ("ids", "model", "batch_size", "sparsity", "eval", "max_eval_tokens", "no_eval")


def _child(python: Path | str, name: str, args: argparse.Namespace, **extra: str) -> dict:
    return run_child(python, __file__, child_argv(name, args, CHILD_OPTIONS, **extra))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="wiki:32x512", help="calibration spec (every side gets these ids)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity of every decoder linear")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of wanda,sparsegpt")
    p.add_argument("--eval", default="wiki,news", help="held-out corpora for perplexity")
    p.add_argument("--batch-size", type=int, default=8, help="batch of the dense forward and of calibrant's engine")
    p.add_argument("--max-eval-tokens", type=int, default=None, help="held-out tokens per corpus (all)")
    p.add_argument("--llmc-venv", default=str(DEFAULT_VENV), help="virtual env with llm-compressor")
    p.add_argument("--skip-llmc", action="store_true", help="run calibrant's side only")
    p.add_argument("--calibrant-pipeline", choices=["one-pass", "two-pass"], default="one-pass",
                   help="calibrant's engine pipeline (two-pass: a block's statistics from one pass, then all its linears "
                        "pruned, the order llm-compressor uses)")
    p.add_argument("--pipeline", default="one-pass", help=argparse.SUPPRESS)  # the calibrant child's
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory (ids, llm-compressor's models)")
    # children
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        emit(CHILDREN[args.child](args))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        p.error(f"--methods takes a comma-separated subset of {','.join(METHODS)}")

    work = Path(tempfile.mkdtemp(prefix="pruning-bench-"))  # ids file + llm-compressor's saved models
    try:
        args.ids = str(work / "calibration.safetensors")
        model_dir, calib = prepare_ids(args.model, args.calibration, args.seed, Path(args.ids))
        _compare(args, methods, model_dir, calib, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _compare(args: argparse.Namespace, methods: list[str], model_dir: Path, calib: Any, work: Path) -> None:
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"model {args.model} ({model_dir}); calibration {args.calibration} seed {args.seed}: "
          f"{calib.n}x{calib.seq_len} ids, hash {calib.hash} → {args.ids}", flush=True)
    results: dict[str, dict] = {"dense": _child(sys.executable, "dense", args)}
    print(f"dense forward (LM head, batch {args.batch_size}): {results['dense']['dense_forward_s']:.1f}s", flush=True)
    for m in methods:
        results[f"calibrant-{m}"] = r = _child(sys.executable, "calibrant", args, method=m,
                                               pipeline=args.calibrant_pipeline)
        print(f"calibrant {m}: {r['wall_s']:.1f}s", flush=True)

    llmc_note = "skipped (--skip-llmc)"
    if not args.skip_llmc:
        py, info = ensure_llmc_venv(Path(args.llmc_venv))
        if py is None:
            llmc_note = f"skipped: llm-compressor could not be installed ({info})"
        else:
            llmc_note = f"llm-compressor {info.split()[0]} (torch {info.split()[1]}) in {args.llmc_venv}"
            for m in methods:
                out = work / f"llmc-{m}"
                try:
                    r = _child(py, "llmcompressor", args, method=m, model_dir=str(model_dir), out=str(out))
                    r.update(_child(sys.executable, "eval-dir", args, out=str(out)))
                    results[f"llmcompressor-{m}"] = r
                    print(f"llm-compressor {m}: {r['wall_s']:.1f}s", flush=True)
                except RuntimeError as exc:
                    llmc_note += f"; {m} failed: {exc}"
                shutil.rmtree(out, ignore_errors=True)
    print(f"llm-compressor side: {llmc_note}", flush=True)
    args.no_eval = True  # the dense forward again, after every pruning: the ratio uses the mean of both
    results["dense-end"] = _child(sys.executable, "dense", args)
    starts, ends = results["dense"]["passes"], results["dense-end"]["passes"]
    print(f"dense forward passes: at the start {', '.join(f'{x:.1f}s' for x in starts)}; at the end "
          f"{', '.join(f'{x:.1f}s' for x in ends)}\n")

    fwd = (min(starts) + min(ends)) / 2
    corpora = list(results["dense"]["ppl"])
    rows = [["dense fp32", "-", "-", "-", "-", *(f"{results['dense']['ppl'][c]['ppl']:.3f}" for c in corpora)]]
    for m in methods:
        for side, label in (("llmcompressor", "llm-compressor oneshot"), ("calibrant", "calibrant")):
            r = results.get(f"{side}-{m}")
            if r:
                rows.append([f"{label} {LABELS[m]}", f"{r['sparsity']:.3f}", f"{r['wall_s']:.1f}",
                             f"{r['wall_s'] / fwd:.2f}", f"{r['peak_rss_gb']:.3f}",
                             *(f"{r['ppl'][c]['ppl']:.3f}" for c in corpora)])
    print_table([f"{args.sparsity:.0%} unstructured, lm_head dense", "sparsity", "wall s", "x dense fwd",
                 "peak RSS GB", *(f"ppl {c}" for c in corpora)], rows)
    tokens = ", ".join(f"{results['dense']['ppl'][c]['tokens']} {c}" for c in corpora)
    print(f"\none dense forward over {calib.n}x{calib.seq_len} tokens (fp32, LM head, batch {args.batch_size}): "
          f"{fwd:.1f}s (mean of the best of two passes before and after the prunings); perplexity on held-out "
          f"tokens ({tokens}), seq_len 512, non-overlapping; calibration hash {calib.hash}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads default; "
          f"started {started}, ended {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    dense_head = results["dense"]["lm_head_sha256"]
    heads = {k: r.get("reloaded_lm_head_sha256", r["lm_head_sha256"]) for k, r in results.items()
             if k != "dense" and "lm_head_sha256" in r}
    changed = [k for k, h in heads.items() if h != dense_head]
    print("sparsity: zeros over every linear in the decoder blocks, counted on the weights each side produced; "
          f"lm_head identical to the dense model's on every side: {'no: ' + ', '.join(changed) if changed else 'yes'}")
    for key, r in results.items():
        if "reloaded_sparsity" in r and abs(r["reloaded_sparsity"] - r["sparsity"]) > 1e-9:
            print(f"warning: {key}'s saved directory reads back at sparsity {r['reloaded_sparsity']:.4f}")
        if "settings" in r:
            print(f"{key} settings: {json.dumps(r['settings'])}")
        if "timings" in r:
            print(f"{key} time split: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["timings"].items()))
    print(f"llm-compressor side: {llmc_note}")
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": {"spec": args.calibration, "seed": args.seed,
                                                               "hash": calib.hash}, "llmc": llmc_note, **results},
                                              indent=2, default=str))


if __name__ == "__main__":
    main()
