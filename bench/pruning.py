"""Pruning benchmark on the real default model: perplexity, wall time (as a multiple of one dense
forward pass over the same calibration tokens, measured in the same run), and peak RSS.

    .venv/bin/python bench/pruning.py                      # the issue's full grid (~40 min on 2 cores)
    .venv/bin/python bench/pruning.py --calibration wiki:16x512 --max-eval-tokens 4096   # quick look

Each configuration runs in its own process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _setup(args):
    from calibrant.api import resolve_calibration
    from calibrant.models import load_model

    lm = load_model(args.model, quiet=True)
    calib = resolve_calibration(args.calibration, lm.tokenizer, args.seed, lm.context_length)
    return lm, calib


def _eval(lm, args) -> dict:
    from calibrant.api import evaluate_perplexity

    res = evaluate_perplexity(lm, args.eval, max_tokens=args.max_eval_tokens, progress=False)
    return {k: {"ppl": r.ppl, "tokens": r.tokens, "seconds": r.seconds} for k, r in res.items()}


def child_dense(args) -> dict:
    lm, calib = _setup(args)
    ids = calib.input_ids
    out = {}
    with torch.no_grad():
        for label, fn in (("with_head", lm.model), ("without_head", lm.model.get_decoder())):
            t0 = time.perf_counter()
            for b in range(0, ids.shape[0], args.batch_size):
                fn(input_ids=ids[b : b + args.batch_size], use_cache=False)
            out[f"dense_forward_{label}_s"] = time.perf_counter() - t0
    out["calibration"] = {"spec": args.calibration, "seed": args.seed, "hash": calib.hash}
    if not args.no_eval:
        out["ppl"] = _eval(lm, args)
    return out


def child_run(args) -> dict:
    from calibrant.engine import compress
    from calibrant.methods import make_method

    lm, calib = _setup(args)
    target = args.target
    kwargs = {"pattern": target} if ":" in target else {"sparsity": float(target)}
    method = make_method(args.method, **kwargs)
    t0 = time.perf_counter()
    report = compress(lm.model, calib if method.reads_data() else None, method, batch_size=args.batch_size,
                      progress=False)
    wall = time.perf_counter() - t0
    rss = _peak_rss_gb()
    return {"method": args.method, "target": target, "wall_s": wall, "timings": report.timings,
            "sparsity": report.sparsity, "peak_rss_gb": rss, "ppl": _eval(lm, args)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="wiki:128x512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="wiki")
    p.add_argument("--max-eval-tokens", type=int, default=32768)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--targets", default="0.5,2:4,4:8")
    p.add_argument("--json", default=None, help="also write all raw results here")
    p.add_argument("--child", choices=["dense", "run"], help=argparse.SUPPRESS)
    p.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = child_dense(args) if args.child == "dense" else child_run(args)
        print("RESULT " + json.dumps(result))
        return

    common = [sys.executable, __file__, "--model", args.model, "--calibration", args.calibration, "--seed",
              str(args.seed), "--eval", args.eval, "--max-eval-tokens", str(args.max_eval_tokens),
              "--batch-size", str(args.batch_size)]

    def child(*extra: str) -> dict:
        proc = subprocess.run(common + list(extra), capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"child {extra} failed:\n{proc.stderr[-3000:]}")
        return json.loads(lines[-1][7:])

    started = time.strftime("%Y-%m-%d %H:%M")
    dense = child("--child", "dense")
    runs = []
    for method in args.methods.split(","):
        for target in args.targets.split(","):
            r = child("--child", "run", "--method", method, "--target", target)
            runs.append(r)
            print(f"# done {method} {target}: {r['wall_s']:.1f}s ppl {r['ppl']}", file=sys.stderr, flush=True)
    # the machine is shared: time the dense forward again at the end and divide by the mean of both
    again = child("--child", "dense", "--no-eval")
    fwd_runs = [dense["dense_forward_with_head_s"], again["dense_forward_with_head_s"]]
    fwd = sum(fwd_runs) / 2

    corpora = list(dense["ppl"])
    print(f"## Pruning — {args.model}, calibration {args.calibration} (seed {args.seed}, hash "
          f"{dense['calibration']['hash']})\n")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"started {started}. Perplexity on the held-out split of {', '.join(corpora)} "
          f"(first {args.max_eval_tokens} tokens, seq_len 512, non-overlapping; "
          f"{dense['ppl'][corpora[0]]['tokens']} scored tokens).\n")
    print(f"Dense forward over the calibration tokens (batch {args.batch_size}), timed at the start and at the end "
          f"of the run: {fwd_runs[0]:.1f} s and {fwd_runs[1]:.1f} s with the LM head "
          f"({dense['dense_forward_without_head_s']:.1f} s and {again['dense_forward_without_head_s']:.1f} s without). "
          f"`× fwd` = wall time / the mean with-head figure ({fwd:.1f} s).\n")
    head = "| method | target | sparsity | " + " | ".join(f"ppl {c}" for c in corpora)
    print(head + " | wall s | × fwd | block fwd s | stats s | method s | peak RSS GB |")
    print("|" + "---|" * (head.count("|") + 6))
    print("| dense | – | 0 | " + " | ".join(f"{dense['ppl'][c]['ppl']:.2f}" for c in corpora) + " | – | – | – | – | – | – |")
    for r in runs:
        t = r["timings"]
        print(f"| {r['method']} | {r['target']} | {r['sparsity']:.3f} | "
              + " | ".join(f"{r['ppl'][c]['ppl']:.2f}" for c in corpora)
              + f" | {r['wall_s']:.1f} | {r['wall_s'] / fwd:.2f} | {t['forward_s'] + t['capture_s']:.1f} | "
              f"{t['stats_s']:.1f} | {t['compress_s']:.1f} | {r['peak_rss_gb']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense": dense, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
