"""GPTQ's arithmetic noise: how far perplexity moves when only the lazy-batch blocksize and the solve's
float precision change, from one fixed set of calibration ids.

    .venv/bin/python bench/gptq_precision.py                                    # the issue's run (32x512, 32768 eval tokens)
    .venv/bin/python bench/gptq_precision.py --calibration wiki:4x128 --max-eval-tokens 2048 --blocksizes 32,128  # smoke test

In exact arithmetic GPTQ's result does not depend on the blocksize (it only groups the same updates
into GEMMs): any spread across blocksizes is floating-point rounding, carried through every later layer
by GPTQ's error feedback. The bench quantizes SmolLM2-135M to W4 g64 with the two-pass engine
(``compress_model(..., pipeline="two-pass", blocksize=B, precision=P)``) for every blocksize × precision,
each from a freshly loaded model and the *same* calibration set (drawn once), and prints:
- a table: blocksize × precision → held-out wiki and news perplexity, wall time as a multiple of one
  dense forward pass over the calibration tokens (timed at the start and the end of this run), and a
  hash of the compressed decoder weights;
- per precision and corpus: the spread of perplexity over the blocksizes (max − min, and relative to
  the minimum);
- whether the float64 runs are identical across blocksizes (same weights hash).

With on-the-fly groups (calibrant's default GPTQ: no act-order) a lazy block never splits a group, so a
blocksize below the group size runs as the group size (32 → 64 for g64): such rows must be identical.
All configurations run in this one process (no RSS is claimed); the model is reloaded for each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

GROUP_SIZE = 64


def _weights_hash(model: torch.nn.Module) -> str:
    """sha256 (16 hex) over every linear weight inside the decoder blocks, in module order."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            h.update(name.encode())
            h.update(module.weight.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _dense_forward_s(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """The faster of two plain forward passes (LM head, no KV cache) over ``ids``, after a warm-up."""
    passes = []
    with torch.no_grad():
        model(input_ids=ids[: min(2, ids.shape[0]), :16], use_cache=False)
        for _ in range(2):
            t0 = time.perf_counter()
            for b in range(0, ids.shape[0], batch_size):
                model(input_ids=ids[b : b + batch_size], use_cache=False)
            passes.append(time.perf_counter() - t0)
    return min(passes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="wiki:32x512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheme", default=f"w4g{GROUP_SIZE}")
    p.add_argument("--blocksizes", default="32,64,128,256")
    p.add_argument("--precisions", default="float32,float64")
    p.add_argument("--pipeline", default="two-pass")
    p.add_argument("--act-order", action="store_true", help="GPTQ with act-order + static groups (default: without)")
    p.add_argument("--eval", default="wiki,news", help="held-out corpora for perplexity")
    p.add_argument("--max-eval-tokens", type=int, default=32768, help="held-out tokens per corpus")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()

    from calibrant.api import compress_model, evaluate_perplexity
    from calibrant.calibration import make_calibration
    from calibrant.models import load_model

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    blocksizes = [int(b) for b in args.blocksizes.split(",")]
    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    corpora = [c.strip() for c in args.eval.split(",") if c.strip()]
    order = {"act_order": True, "static_groups": True} if args.act_order else {}

    lm = load_model(args.model, quiet=True)
    calib = make_calibration(args.calibration, lm.tokenizer, seed=args.seed)
    print(f"model {args.model}; calibration {args.calibration} seed {args.seed}: {calib.n}x{calib.seq_len} ids, "
          f"hash {calib.hash}", flush=True)
    fwd_start = _dense_forward_s(lm.model, calib.input_ids, args.batch_size)
    dense = evaluate_perplexity(lm, corpora, max_tokens=args.max_eval_tokens, progress=False)
    print(f"dense forward {fwd_start:.1f}s; dense ppl " + ", ".join(f"{c} {dense[c].ppl:.3f}" for c in corpora),
          flush=True)
    del lm

    runs = []
    for precision in precisions:
        for b in blocksizes:
            lm = load_model(args.model, quiet=True)
            t0 = time.perf_counter()
            res = compress_model(lm, "gptq", scheme=args.scheme, calibration=calib, pipeline=args.pipeline,
                                 blocksize=b, precision=precision, batch_size=args.batch_size, progress=False,
                                 **order)
            wall = time.perf_counter() - t0
            ppl = evaluate_perplexity(lm, corpora, max_tokens=args.max_eval_tokens, progress=False)
            run = {"precision": precision, "blocksize": b, "wall_s": wall, "timings": res.report.timings,
                   "weights": _weights_hash(lm.model), "ppl": {c: ppl[c].ppl for c in corpora},
                   "tokens": {c: ppl[c].tokens for c in corpora}}
            runs.append(run)
            print(f"# {precision} blocksize {b}: {wall:.1f}s, " + ", ".join(f"{c} {v:.4f}" for c, v in run["ppl"].items())
                  + f", weights {run['weights']}", flush=True)
            del lm, res

    lm = load_model(args.model, quiet=True)
    fwd_end = _dense_forward_s(lm.model, calib.input_ids, args.batch_size)
    fwd = (fwd_start + fwd_end) / 2

    print(f"\nGPTQ {args.scheme} ({args.pipeline}{', act-order + static groups' if args.act_order else ', no act-order'})"
          f" on {args.model}, one calibration set: {args.calibration} seed {args.seed} (hash {calib.hash})\n")
    head = ["blocksize", "precision", *(f"ppl {c}" for c in corpora), "wall s", "x dense fwd", "weights sha256"]
    rows = [["dense", "-", *(f"{dense[c].ppl:.4f}" for c in corpora), "-", "-", "-"]]
    rows += [[str(r["blocksize"]), r["precision"], *(f"{r['ppl'][c]:.4f}" for c in corpora), f"{r['wall_s']:.1f}",
              f"{r['wall_s'] / fwd:.2f}", r["weights"]] for r in runs]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")

    print("\nspread over the blocksizes (max − min; relative to the min):")
    for precision in precisions:
        mine = [r for r in runs if r["precision"] == precision]
        parts = []
        for c in corpora:
            vals = [r["ppl"][c] for r in mine]
            lo, hi = min(vals), max(vals)
            parts.append(f"{c} {lo:.4f}–{hi:.4f}: {hi - lo:.4f} ({(hi - lo) / lo:.3%})")
        hashes = {r["weights"] for r in mine}
        print(f"- {precision}: " + "; ".join(parts) + f"; {len(hashes)} distinct weight sets over {len(mine)} blocksizes")
    if "float64" in precisions:
        f64 = [r for r in runs if r["precision"] == "float64"]
        same_w = len({r["weights"] for r in f64}) == 1
        same_p = all(len({r["ppl"][c] for r in f64}) == 1 for c in corpora)
        print(f"float64 identical across blocksizes {','.join(str(r['blocksize']) for r in f64)}: "
              f"weights {'yes' if same_w else 'no'}, perplexities {'yes' if same_p else 'no'}")

    tokens = ", ".join(f"{dense[c].tokens} {c}" for c in corpora)
    print(f"\none dense forward over {calib.n}x{calib.seq_len} tokens (fp32, LM head, batch {args.batch_size}): "
          f"{fwd:.1f}s (mean of the best of two passes at the start, {fwd_start:.1f}s, and the end, {fwd_end:.1f}s); "
          f"perplexity on held-out tokens ({tokens}), seq_len 512, non-overlapping; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; started {started}, ended {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if not args.act_order and args.scheme.endswith(f"g{GROUP_SIZE}"):
        print(f"note: without act-order a blocksize below the group size ({GROUP_SIZE}) runs as the group size.")
    print("note: SmolLM2's weights already sit on a Q4_1 grid (blocks of 32) — see shared/ASSETS.md.")
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": {"spec": args.calibration, "seed": args.seed,
                                                               "hash": calib.hash},
                                               "dense": {c: dense[c].ppl for c in corpora},
                                               "dense_forward_s": [fwd_start, fwd_end], "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
