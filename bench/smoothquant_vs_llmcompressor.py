"""SmoothQuant side by side: llm-compressor's ``SmoothQuantModifier`` + ``GPTQModifier`` (``oneshot``) against
calibrant's RTN, GPTQ, ``smoothquant+rtn`` and ``smoothquant+gptq``, for W8A8 and W4A8, on the same model
and calibration token ids, in one run.

    .venv/bin/python bench/smoothquant_vs_llmcompressor.py --max-eval-tokens 32768                   # the issue's 32x512 run
    .venv/bin/python bench/smoothquant_vs_llmcompressor.py --calibration wiki:4x128 --max-eval-tokens 2048  # smoke test

Every side quantizes every decoder linear of SmolLM2-135M (fp32), lm_head dense, from the *same*
``[n, L]`` token ids (wiki, seed 0, drawn once by calibrant and saved to one file), for each scheme:
- ``w8a8``: int8 weights, symmetric, per output channel; int8 activations, symmetric, dynamic per token
  (llm-compressor's ``W8A8`` preset);
- ``w4a8g64``: int4 weights, symmetric, groups of 64; activations as above (llm-compressor's ``W4A8``
  preset with group 64 instead of 128: SmolLM2's hidden size 576 is not a multiple of 128, and
  llm-compressor 0.14 cannot quantize a short last group — see ``awq_vs_llmcompressor.py``).
- llm-compressor: ``SmoothQuantModifier()`` (defaults: ``smoothing_strength=0.5``, mappings inferred for
  Llama: input_layernorm → q/k/v, post_attention_layernorm → gate/up) then ``GPTQModifier(targets=
  ["Linear"], ignore=["lm_head"], config_groups=…)`` with its defaults (block 128, damping 0.01,
  ``actorder="static"``), in its own venv (``.venv-llmc``, see ``bench/_llmc.py``); saves compressed-tensors.
- calibrant: ``rtn``, ``gptq``, ``smoothquant+rtn``, ``smoothquant+gptq`` (alpha 0.5, the same two folds);
  GPTQ with act-order (+ static groups for group-wise schemes) as llm-compressor's default, block 128,
  damping 0.01 (``--no-act-order``: calibrant's plain order).
Each side runs in its own process (wall time and peak RSS = ``ru_maxrss`` right after compression,
model load included, are its own). A dense child times one plain forward pass (fp32, LM head, batch 8)
over the same tokens at the start and at the end; ``x dense fwd`` divides by the mean of the two.

Perplexity (held-out wiki and news, ``calibrant.api.evaluate_perplexity``) with activation fake-quant
simulated the same way on every row: calibrant's models carry the engine's forward pre-hooks (dynamic
symmetric per-token int8, scale ``amax / 127``). llm-compressor's saved directory is read back by
calibrant's loader, where transformers' compressed-tensors integration decompresses the weights and
fake-quantizes each linear's input with compressed-tensors' own quantizer (scale ``amax / 127.5``,
range [-128, 127]); the table's llm-compressor rows replace that with calibrant's pre-hook
(``_llmc.use_calibrant_act_quant``), and the footer gives the same model's perplexity with its own.
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
    llmc_load,
    llmc_oneshot,
    llmc_version,
    machine_line,
    prepare_ids,
    print_results,
    run_child,
    utc_now,
)

SCHEMES = ("w8a8", "w4a8g64")
RECIPES = ("rtn", "gptq", "smoothquant+rtn", "smoothquant+gptq")
LABELS = {"rtn": "calibrant RTN", "gptq": "calibrant GPTQ", "smoothquant+rtn": "calibrant SmoothQuant+RTN",
          "smoothquant+gptq": "calibrant SmoothQuant+GPTQ"}


def llmc_scheme(scheme: str) -> dict:
    """calibrant's scheme string → llm-compressor's ``config_groups`` entry (calibrant's venv)."""
    from calibrant.methods.quant import parse_scheme

    s = parse_scheme(scheme)
    if not s.act_bits or s.granularity == "tensor" or s.clip != "none" or s.lorc_rank:
        raise SystemExit(f"scheme {scheme}: this bench compares weight+activation schemes such as w8a8 or w4a8g64")
    weights = {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric, "strategy": s.granularity}
    if s.granularity == "group":
        weights["group_size"] = s.group_size
    acts = {"num_bits": s.act_bits, "type": "int", "symmetric": True, "dynamic": True,
            "strategy": "token" if s.act_granularity == "token" else "tensor"}
    return {"targets": ["Linear"], "weights": weights, "input_activations": acts}


# --------------------------------------------------------------------------------------- children
def child_calibrant(args: argparse.Namespace) -> dict:
    from calibrant.methods.quant import parse_scheme

    params: dict[str, Any] = {"scheme": args.scheme}
    if "gptq" in args.recipe and not args.no_act_order:
        params["act_order"] = True
        if parse_scheme(args.scheme).granularity == "group":
            params["static_groups"] = True
    if "smoothquant" in args.recipe:
        params["alpha"] = args.alpha
    return child_calibrant_recipe(args, args.recipe, **params)


def child_llmcompressor(args: argparse.Namespace) -> dict:
    """Runs inside the llm-compressor venv: no calibrant import here (its pins differ)."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    model, tokenizer = llmc_load(args.model_dir)
    smooth = SmoothQuantModifier(smoothing_strength=args.alpha)
    gptq = GPTQModifier(targets="Linear", ignore=["lm_head"], config_groups={"group_0": json.loads(args.llmc_config)})
    res = llmc_oneshot(model, tokenizer, args.ids, [smooth, gptq])
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    settings = {"smoothquant": {"smoothing_strength": smooth.smoothing_strength,
                                "mappings": [str(m) for m in (smooth.mappings or [])] or "inferred"},
                "gptq": {k: str(v) for k, v in gptq.model_dump().items()
                         if k in ("block_size", "dampening_frac", "actorder")},
                "config_group": json.loads(args.llmc_config)}
    return {**res, "version": llmc_version(), "settings": settings}


def child_eval(args: argparse.Namespace) -> dict:
    return child_eval_dir(args, act_bits=args.act_bits)


CHILDREN = {"dense": child_dense, "calibrant": child_calibrant, "llmcompressor": child_llmcompressor,
            "eval-dir": child_eval}
CHILD_OPTIONS = ("ids", "model", "batch_size", "alpha", "eval", "max_eval_tokens", "no_act_order", "no_eval")


# --------------------------------------------------------------------------------------- parent
def _child(python: Path | str, name: str, args: argparse.Namespace, **extra: str) -> dict:
    return run_child(python, __file__, child_argv(name, args, CHILD_OPTIONS, **extra))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="wiki:32x512", help="calibration spec (every side gets these ids)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schemes", default=",".join(SCHEMES), help="calibrant scheme strings with activation bits")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"calibrant recipes, a subset of {','.join(RECIPES)}")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (both sides)")
    p.add_argument("--no-act-order", action="store_true", help="calibrant's GPTQ in plain column order")
    p.add_argument("--eval", default="wiki,news", help="held-out corpora for perplexity")
    p.add_argument("--batch-size", type=int, default=8, help="batch of the dense forward and of calibrant's engine")
    p.add_argument("--max-eval-tokens", type=int, default=None, help="held-out tokens per corpus (all)")
    p.add_argument("--llmc-venv", default=str(DEFAULT_VENV), help="virtual env with llm-compressor")
    p.add_argument("--skip-llmc", action="store_true", help="run calibrant's side only")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory (ids, llm-compressor's models)")
    # children
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--scheme", help=argparse.SUPPRESS)
    p.add_argument("--llmc-config", help=argparse.SUPPRESS)
    p.add_argument("--act-bits", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        emit(CHILDREN[args.child](args))
        return
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    configs = {s: llmc_scheme(s) for s in schemes}
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if set(recipes) - set(RECIPES):
        p.error(f"--recipes takes a comma-separated subset of {','.join(RECIPES)}")

    work = Path(tempfile.mkdtemp(prefix="smoothquant-bench-"))  # ids file + llm-compressor's saved models
    try:
        args.ids = str(work / "calibration.safetensors")
        model_dir, calib = prepare_ids(args.model, args.calibration, args.seed, Path(args.ids))
        _compare(args, schemes, configs, recipes, model_dir, calib, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _compare(args: argparse.Namespace, schemes: list[str], configs: dict[str, dict], recipes: list[str],
             model_dir: Path, calib: Any, work: Path) -> None:
    started = utc_now()
    print(f"model {args.model} ({model_dir}); calibration {args.calibration} seed {args.seed}: "
          f"{calib.n}x{calib.seq_len} ids, hash {calib.hash}; schemes {', '.join(schemes)}", flush=True)
    results: dict[str, dict] = {"dense": _child(sys.executable, "dense", args)}
    print(f"dense forward (LM head, batch {args.batch_size}): {results['dense']['dense_forward_s']:.1f}s", flush=True)
    for scheme in schemes:
        for recipe in recipes:
            results[f"{scheme}/{recipe}"] = r = _child(sys.executable, "calibrant", args, recipe=recipe, scheme=scheme)
            print(f"calibrant {recipe} {scheme}: {r['wall_s']:.1f}s", flush=True)

    llmc_note = "skipped (--skip-llmc)"
    if not args.skip_llmc:
        py, info = ensure_llmc_venv(Path(args.llmc_venv))
        if py is None:
            llmc_note = f"skipped: llm-compressor could not be installed ({info})"
        else:
            llmc_note = f"llm-compressor {info.split()[0]} (torch {info.split()[1]}) in {args.llmc_venv}"
            for scheme in schemes:
                out = work / f"llmc-{scheme}"
                try:
                    r = _child(py, "llmcompressor", args, model_dir=str(model_dir), out=str(out),
                               llmc_config=json.dumps(configs[scheme]))
                    r.update(_child(sys.executable, "eval-dir", args, out=str(out),
                                    act_bits=configs[scheme]["input_activations"]["num_bits"]))
                    results[f"{scheme}/llmcompressor"] = r
                    print(f"llm-compressor SmoothQuant+GPTQ {scheme}: {r['wall_s']:.1f}s", flush=True)
                except RuntimeError as exc:
                    llmc_note += f"; {scheme} failed: {exc}"
                shutil.rmtree(out, ignore_errors=True)
    print(f"llm-compressor side: {llmc_note}", flush=True)
    args.no_eval = True  # the dense forward again, after every compression: the ratio uses the mean of both
    results["dense-end"] = _child(sys.executable, "dense", args)
    starts, ends = results["dense"]["passes"], results["dense-end"]["passes"]
    print(f"dense forward passes: at the start {', '.join(f'{x:.1f}s' for x in starts)}; at the end "
          f"{', '.join(f'{x:.1f}s' for x in ends)}\n")

    fwd = (min(starts) + min(ends)) / 2
    for scheme in schemes:
        rows = [("llm-compressor SmoothQuant+GPTQ (oneshot)", results.get(f"{scheme}/llmcompressor"))]
        rows += [(LABELS[r], results.get(f"{scheme}/{r}")) for r in recipes]
        print_results(f"{scheme}, lm_head dense", rows, results["dense"], fwd)
        print()
    tokens = ", ".join(f"{v['tokens']} {c}" for c, v in results["dense"]["ppl"].items())
    print(f"one dense forward over {calib.n}x{calib.seq_len} tokens (fp32, LM head, batch {args.batch_size}): "
          f"{fwd:.1f}s (mean of the best of two passes before and after the compressions); perplexity on held-out "
          f"tokens ({tokens}), seq_len 512, non-overlapping, activation fake-quant by calibrant's pre-hooks on every "
          f"row; calibration hash {calib.hash}; {machine_line()}; started {started}, ended {utc_now()}")
    for scheme in schemes:
        r = results.get(f"{scheme}/llmcompressor")
        if r and "ppl_own" in r:
            own = ", ".join(f"{c} {v['ppl']:.3f}" for c, v in r["ppl_own"].items())
            print(f"llm-compressor {scheme} with compressed-tensors' own activation fake-quant (amax/127.5): {own} "
                  f"(table: calibrant's hooks on its {r['act_quant_linears']} linears)")
    for key, r in results.items():
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
