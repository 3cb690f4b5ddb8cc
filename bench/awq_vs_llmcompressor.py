"""AWQ side by side: llm-compressor's ``AWQModifier`` (``oneshot``) against calibrant's AWQ, RTN, GPTQ and
``awq+gptq``, on the same model, scheme and calibration token ids, in one run.

    .venv/bin/python bench/awq_vs_llmcompressor.py --max-eval-tokens 32768                   # the issue's 32x512 run
    .venv/bin/python bench/awq_vs_llmcompressor.py --calibration wiki:4x128 --max-eval-tokens 2048  # smoke test

Every side quantizes every decoder linear of SmolLM2-135M (fp32) to 4-bit asymmetric weights with
groups of ``--group-size`` (lm_head dense) from the *same* ``[n, L]`` token ids, drawn once by calibrant
(wiki, seed 0) and saved to one file.

Group size: AWQ's default is 128, but SmolLM2-135M's hidden size is 576 = 4.5 × 128, so q/k/v/o/gate/up
have a short last group. Calibrant quantizes that short group; llm-compressor 0.14 cannot — it refuses
those layers at initialisation, and with ``bypass_divisibility_checks=True`` its weight observer fails
(``unflatten: sizes [-1, 128] don't multiply up to 576``). So the default here is group 64 (576 = 9 × 64,
1536 = 24 × 64), the grid the GPTQ bench uses; ``--group-size 128`` runs calibrant's rows at AWQ's
default (the llm-compressor row then fails and says why).

- llm-compressor: ``AWQModifier()`` with its defaults (mappings inferred for Llama: input_layernorm →
  q/k/v, v → o, post_attention_layernorm → gate/up, up → down; ``n_grid=20``, ``duo_scaling=True``; no clip
  search) followed by ``QuantizationModifier(targets=["Linear"], ignore=["lm_head"], config_groups=…)``
  with int4, asymmetric, group strategy — what the deprecated ``llmcompressor.modifiers.awq.AWQModifier(
  scheme="W4A16_ASYM", targets=["Linear"], ignore=["lm_head"])`` expands to, with the group size set.
  Runs in its own venv (``.venv-llmc``, see ``bench/_llmc.py``). Its model is saved as a plain fp32
  directory of the dequantized weights (``_llmc.llmc_save_dequantized``, checked against its own
  quantized forward): calibrant's venv (compressed-tensors 0.20) fails to load 0.14's asymmetric
  pack-quantized checkpoint (a size mismatch).
- calibrant: ``rtn``, ``gptq``, ``awq`` (defaults: grid 20, clip search on) and ``awq+gptq`` with scheme
  ``w4g<size>-asym``; GPTQ with act-order + static groups (llm-compressor's GPTQ default, ``actorder=
  "static"``; ``--no-act-order`` for calibrant's plain order), block 128, damping 0.01.
Each side runs in its own process, so its wall time and peak RSS (``ru_maxrss`` right after
compression, model load included) are its own. A dense child times one plain forward pass (fp32, LM
head, batch 8) over the same tokens at the start and again at the end; ``x dense fwd`` divides by the
mean of the two. Perplexity: held-out wiki and news through ``calibrant.api.evaluate_perplexity`` with
one protocol for everyone — on calibrant's in-memory models and on the directory llm-compressor saved
(read back by calibrant's loader).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from _llmc import (
    DEFAULT_VENV,
    child_argv,
    child_calibrant_recipe,
    child_dense,
    child_eval_dir,
    emit,
    ensure_llmc_venv,
    llmc_cpu_patches,
    llmc_load,
    llmc_oneshot,
    llmc_save_dequantized,
    llmc_version,
    machine_line,
    prepare_ids,
    print_results,
    run_child,
    utc_now,
)

RECIPES = ("rtn", "gptq", "awq", "awq+gptq")
LABELS = {"rtn": "calibrant RTN", "gptq": "calibrant GPTQ", "awq": "calibrant AWQ", "awq+gptq": "calibrant AWQ+GPTQ"}


def _scheme(args: argparse.Namespace) -> str:
    return f"w4g{args.group_size}-asym"


# --------------------------------------------------------------------------------------- children
def child_calibrant(args: argparse.Namespace) -> dict:
    params: dict[str, Any] = {"scheme": _scheme(args)}
    if "gptq" in args.recipe and not args.no_act_order:
        params.update(act_order=True, static_groups=True)
    return child_calibrant_recipe(args, args.recipe, **params)


def child_llmcompressor(args: argparse.Namespace) -> dict:
    """Runs inside the llm-compressor venv: no calibrant import here (its pins differ)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    llmc_cpu_patches()
    model, tokenizer = llmc_load(args.model_dir)
    awq = AWQModifier()
    quant = QuantizationModifier(targets=["Linear"], ignore=["lm_head"], config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                           "group_size": args.group_size}}})
    res = llmc_oneshot(model, tokenizer, args.ids, [awq, quant])
    # a plain fp32 directory with the dequantized weights: calibrant's venv cannot read llm-compressor
    # 0.14's asymmetric pack-quantized checkpoint (see llmc_save_dequantized)
    res.update(llmc_save_dequantized(model, tokenizer, args.model_dir, args.out))
    settings = {k: str(v) for k, v in awq.model_dump().items() if k in ("mappings", "duo_scaling", "n_grid")}
    settings["mappings"] = [f"{m.smooth_layer} -> {m.balance_layers}" for m in (awq.mappings or [])] or "inferred"
    return {**res, "version": llmc_version(), "settings": settings}


CHILDREN = {"dense": child_dense, "calibrant": child_calibrant, "llmcompressor": child_llmcompressor,
            "eval-dir": child_eval_dir}
CHILD_OPTIONS = ("ids", "model", "batch_size", "group_size", "eval", "max_eval_tokens", "no_act_order", "no_eval")


# --------------------------------------------------------------------------------------- parent
def _child(python: Path | str, name: str, args: argparse.Namespace, **extra: str) -> dict:
    return run_child(python, __file__, child_argv(name, args, CHILD_OPTIONS, **extra))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="wiki:32x512", help="calibration spec (every side gets these ids)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=64, help="weight group size, 4-bit asymmetric (see above)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"calibrant recipes, a subset of {','.join(RECIPES)}")
    p.add_argument("--no-act-order", action="store_true", help="calibrant's GPTQ in plain column order")
    p.add_argument("--eval", default="wiki,news", help="held-out corpora for perplexity")
    p.add_argument("--batch-size", type=int, default=8, help="batch of the dense forward and of calibrant's engine")
    p.add_argument("--max-eval-tokens", type=int, default=None, help="held-out tokens per corpus (all)")
    p.add_argument("--llmc-venv", default=str(DEFAULT_VENV), help="virtual env with llm-compressor")
    p.add_argument("--skip-llmc", action="store_true", help="run calibrant's side only")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory (ids, llm-compressor's model)")
    # children
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        emit(CHILDREN[args.child](args))
        return
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if set(recipes) - set(RECIPES):
        p.error(f"--recipes takes a comma-separated subset of {','.join(RECIPES)}")

    work = Path(tempfile.mkdtemp(prefix="awq-bench-"))  # ids file + llm-compressor's saved model
    try:
        args.ids = str(work / "calibration.safetensors")
        model_dir, calib = prepare_ids(args.model, args.calibration, args.seed, Path(args.ids))
        _compare(args, recipes, model_dir, calib, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _compare(args: argparse.Namespace, recipes: list[str], model_dir: Path, calib: Any, work: Path) -> None:
    started = utc_now()
    print(f"model {args.model} ({model_dir}); calibration {args.calibration} seed {args.seed}: "
          f"{calib.n}x{calib.seq_len} ids, hash {calib.hash}; scheme {_scheme(args)}", flush=True)
    results: dict[str, dict] = {"dense": _child(sys.executable, "dense", args)}
    print(f"dense forward (LM head, batch {args.batch_size}): {results['dense']['dense_forward_s']:.1f}s", flush=True)
    for recipe in recipes:
        results[recipe] = r = _child(sys.executable, "calibrant", args, recipe=recipe)
        print(f"calibrant {recipe}: {r['wall_s']:.1f}s", flush=True)

    llmc_note = "skipped (--skip-llmc)"
    if not args.skip_llmc:
        py, info = ensure_llmc_venv(Path(args.llmc_venv))
        if py is None:
            llmc_note = f"skipped: llm-compressor could not be installed ({info})"
        else:
            llmc_note = f"llm-compressor {info.split()[0]} (torch {info.split()[1]}) in {args.llmc_venv}"
            out = work / "llmc-awq"
            try:
                r = _child(py, "llmcompressor", args, model_dir=str(model_dir), out=str(out))
                r.update(_child(sys.executable, "eval-dir", args, out=str(out)))
                results["llmcompressor"] = r
                print(f"llm-compressor AWQ: {r['wall_s']:.1f}s", flush=True)
            except RuntimeError as exc:
                llmc_note += f"; AWQ failed: {exc}"
    print(f"llm-compressor side: {llmc_note}", flush=True)
    args.no_eval = True  # the dense forward again, after every compression: the ratio uses the mean of both
    results["dense-end"] = _child(sys.executable, "dense", args)
    starts, ends = results["dense"]["passes"], results["dense-end"]["passes"]
    print(f"dense forward passes: at the start {', '.join(f'{x:.1f}s' for x in starts)}; at the end "
          f"{', '.join(f'{x:.1f}s' for x in ends)}\n")

    fwd = (min(starts) + min(ends)) / 2
    rows = [("llm-compressor AWQ (oneshot)", results.get("llmcompressor"))]
    rows += [(LABELS[r], results.get(r)) for r in recipes]
    print_results(f"W4 asym g{args.group_size}, lm_head dense", rows, results["dense"], fwd)
    tokens = ", ".join(f"{v['tokens']} {c}" for c, v in results["dense"]["ppl"].items())
    print(f"\none dense forward over {calib.n}x{calib.seq_len} tokens (fp32, LM head, batch {args.batch_size}): "
          f"{fwd:.1f}s (mean of the best of two passes before and after the compressions); perplexity on held-out "
          f"tokens ({tokens}), seq_len 512, non-overlapping; calibration hash {calib.hash}; {machine_line()}; "
          f"started {started}, ended {utc_now()}")
    for key, r in results.items():
        if "settings" in r:
            print(f"{key} settings: {json.dumps(r['settings'])}")
        if "timings" in r:
            print(f"{key} time split: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["timings"].items()))
        if "dequantized_linears" in r:
            print(f"{key} saved as dequantized fp32: {r['dequantized_linears']} linears, largest logit difference to "
                  f"its own quantized forward {r['dequantized_max_logit_diff']:.2e}")
    print(f"llm-compressor side: {llmc_note}")
    print("note: SmolLM2's weights already sit on a Q4_1 grid (blocks of 32) (so groups of 32 would flatter 4-bit).")
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": {"spec": args.calibration, "seed": args.seed,
                                                               "hash": calib.hash}, "llmc": llmc_note, **results},
                                              indent=2, default=str))


if __name__ == "__main__":
    main()
