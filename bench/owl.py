"""OWL (outlier-weighed layerwise sparsity) against uniform sparsity on the real default model: Wanda and
SparseGPT at 50 / 60 / 70 % unstructured sparsity, every row on the same calibration ids.

    nice -n 19 .venv/bin/python bench/owl.py --targets 0.7,0.6,0.5 --json owl.json   # 12 runs + 2 dense timings
    .venv/bin/python bench/owl.py --render owl.json       # the tables of a saved (possibly interrupted) run
    .venv/bin/python bench/owl.py --calibration wiki:8x512 --max-eval-tokens 2048 --methods wanda --targets 0.7

Columns: perplexity on the held-out split of each corpus, wall time of ``compress`` (also as a multiple
of one plain dense forward over the same calibration tokens, timed in the same run at its start and its
end), peak RSS of the run's own process, and for OWL the smallest and largest per-layer sparsity of the
plan (``CompressionReport.plans``). Last, the per-block outlier ratios ``D_l`` the OWL plan at the highest
target was built from, to explain how far OWL moves away from uniform on this model.

Each configuration runs in its own process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from pruning import _eval, _peak_rss_gb, _setup, child_dense  # noqa: E402


def _block_of(layer: str) -> int:
    m = re.search(r"\.(\d+)\.", layer)
    return int(m.group(1)) if m else -1


def child_run(args) -> dict:
    from calibrant.engine import compress
    from calibrant.methods import make_method

    lm, calib = _setup(args)
    kwargs = {"sparsity": float(args.target), "sparsity_profile": args.profile}
    if args.profile == "owl":
        kwargs.update(owl_m=args.owl_m, owl_lambda=args.owl_lambda)
    method = make_method(args.method, **kwargs)
    t0 = time.perf_counter()
    report = compress(lm.model, calib, method, batch_size=args.batch_size, progress=False)
    wall = time.perf_counter() - t0
    rss = _peak_rss_gb()
    plan = next(iter(report.plans.values()), {}) if report.plans else {}
    layers = {name: {"sparsity": float(p["sparsity"]), "outlier_ratio": float(p["outlier_ratio"])}
              for name, p in plan.items()}
    measured = {r.name: r.sparsity for r in report.layers}
    return {"method": args.method, "target": args.target, "profile": args.profile, "wall_s": wall,
            "timings": report.timings, "sparsity": report.sparsity, "peak_rss_gb": rss, "plan": layers,
            "layer_sparsity": measured, "calibration_hash": calib.hash, "ppl": _eval(lm, args)}


def _depth_summary(blocks: dict[int, float], parts: int = 3) -> str:
    """Mean of the values over the first, middle and last third of the blocks."""
    keys = sorted(blocks)
    size = len(keys) / parts
    chunks = [keys[round(i * size): round((i + 1) * size)] for i in range(parts)]
    return ", ".join(f"blocks {c[0]}–{c[-1]}: {statistics.mean(blocks[k] for k in c):.4f}" for c in chunks if c)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="wiki:32x512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="wiki,news")
    p.add_argument("--max-eval-tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--targets", default="0.7,0.6,0.5", help="in the order run (the most telling first)")
    p.add_argument("--profiles", default="uniform,owl")
    p.add_argument("--owl-m", type=float, default=5.0)
    p.add_argument("--owl-lambda", type=float, default=0.08)
    p.add_argument("--json", default=None, help="also write all raw results here (after every configuration)")
    p.add_argument("--child", choices=["dense", "run"], help=argparse.SUPPRESS)
    p.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--profile", help=argparse.SUPPRESS)
    p.add_argument("--render", default=None, metavar="JSON", help="only print the tables of a saved --json")
    args = p.parse_args()
    if args.render:
        with open(args.render) as f:
            render(json.load(f))
        return
    if args.child:
        result = child_dense(args) if args.child == "dense" else child_run(args)
        print("RESULT " + json.dumps(result))
        return

    common = [sys.executable, __file__, "--model", args.model, "--calibration", args.calibration, "--seed",
              str(args.seed), "--eval", args.eval, "--max-eval-tokens", str(args.max_eval_tokens),
              "--batch-size", str(args.batch_size), "--owl-m", str(args.owl_m), "--owl-lambda", str(args.owl_lambda)]

    def child(*extra: str) -> dict:
        proc = subprocess.run(common + list(extra), capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"child {extra} failed:\n{proc.stderr[-3000:]}")
        return json.loads(lines[-1][7:])

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    saved = {"args": vars(args), "started": started, "dense": None, "again": None, "runs": []}

    def save() -> None:  # after every child, so that an interrupted run can still be printed (--render)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(saved, f, indent=2)

    saved["dense"] = child("--child", "dense")
    save()
    for target in args.targets.split(","):  # the targets in the order given: put the most telling first
        for method in args.methods.split(","):
            for profile in args.profiles.split(","):
                r = child("--child", "run", "--method", method, "--target", target, "--profile", profile)
                saved["runs"].append(r)
                save()
                print(f"# {time.strftime('%H:%M:%S')} done {method} {target} {profile}: {r['wall_s']:.1f}s "
                      f"ppl {({k: round(v['ppl'], 2) for k, v in r['ppl'].items()})}", file=sys.stderr, flush=True)
    saved["again"] = child("--child", "dense", "--no-eval")  # the machine may be shared: time the dense forward twice
    saved["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    save()
    render(saved)


def render(saved: dict) -> None:
    """The tables, from the results gathered so far (all of a run, or what an interrupted one saved)."""
    args = argparse.Namespace(**saved["args"])
    dense, again, runs = saved["dense"], saved.get("again"), saved["runs"]
    fwd_runs = [dense["dense_forward_with_head_s"]] + ([again["dense_forward_with_head_s"]] if again else [])
    fwd = sum(fwd_runs) / len(fwd_runs)
    hashes = {r["calibration_hash"] for r in runs} | {dense["calibration"]["hash"]}
    planned = len(args.targets.split(",")) * len(args.methods.split(",")) * len(args.profiles.split(","))

    corpora = list(dense["ppl"])
    print(f"## OWL vs uniform sparsity — {args.model}, calibration {args.calibration} (seed {args.seed}, hash "
          f"{dense['calibration']['hash']}; {'the same ids in every row' if len(hashes) == 1 else 'HASHES DIFFER: ' + str(hashes)})\n")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; started "
          f"{saved['started']}, " + (f"finished {saved['finished']}" if saved.get("finished") else
                                     f"**interrupted: {len(runs)} of {planned} configurations done**")
          + f". OWL: M={args.owl_m:g}, λ={args.owl_lambda:g}. Perplexity on the held-out split of "
          f"{', '.join(corpora)} (first {args.max_eval_tokens} tokens, seq_len 512, non-overlapping; "
          f"{dense['ppl'][corpora[0]]['tokens']} scored tokens).\n")
    when = "at the start and at the end of the run" if again else "at the start of the run (the end timing did not run)"
    print(f"Dense forward over the calibration tokens (batch {args.batch_size}, with the LM head), timed {when}: "
          + " and ".join(f"{t:.1f} s" for t in fwd_runs) + ". `× dense fwd` = wall s / "
          + ("their mean" if again else "that") + f" ({fwd:.1f} s).\n")
    head = "| method | sparsity | profile | " + " | ".join(f"ppl {c}" for c in corpora)
    print(head + " | wall s | × dense fwd | peak RSS GB | plan min sparsity | plan max sparsity | measured sparsity |")
    print("|---|---:|---|" + "---:|" * (len(corpora) + 6))
    print("| dense | 0 | – | " + " | ".join(f"{dense['ppl'][c]['ppl']:.2f}" for c in corpora)
          + " | – | – | – | – | – | – |")
    for r in runs:
        plan = [v["sparsity"] for v in r["plan"].values()]
        lo, hi = (f"{min(plan):.3f}", f"{max(plan):.3f}") if plan else ("–", "–")
        print(f"| {r['method']} | {float(r['target']):.0%} | {r['profile']} | "
              + " | ".join(f"{r['ppl'][c]['ppl']:.2f}" for c in corpora)
              + f" | {r['wall_s']:.1f} | {r['wall_s'] / fwd:.2f} | {r['peak_rss_gb']:.2f} | {lo} | {hi} | "
              f"{r['sparsity']:.3f} |")

    owl = [r for r in runs if r["profile"] == "owl" and r["plan"]]
    if owl:
        top = max(float(r["target"]) for r in owl)
        print(f"\n### OWL's plan at {top:.0%}: per-block outlier ratios D_l (share of Wanda scores |W|·‖X‖ above "
              f"M={args.owl_m:g} × the block's mean) and the block sparsities\n")
        for r in (r for r in owl if float(r["target"]) == top):
            ratios: dict[int, float] = {}
            sps: dict[int, float] = {}
            for name, v in r["plan"].items():
                ratios[_block_of(name)] = v["outlier_ratio"]
                sps[_block_of(name)] = v["sparsity"]
            vals = [ratios[k] for k in sorted(ratios)]
            print(f"**{r['method']}** ({len(vals)} blocks): D_l min {min(vals):.4f} (block "
                  f"{min(ratios, key=ratios.get)}), median {statistics.median(vals):.4f}, max {max(vals):.4f} (block "
                  f"{max(ratios, key=ratios.get)}); max/min {max(vals) / min(vals):.2f}, coefficient of variation "
                  f"{statistics.pstdev(vals) / statistics.mean(vals):.2f}. By depth (mean D_l): "
                  f"{_depth_summary(ratios)}. Block sparsity by depth: {_depth_summary(sps)}.\n")
            print("| block | " + " | ".join(str(k) for k in sorted(ratios)) + " |")
            print("|---|" + "---:|" * len(ratios))
            print("| D_l (%) | " + " | ".join(f"{100 * ratios[k]:.2f}" for k in sorted(ratios)) + " |")
            print("| sparsity (%) | " + " | ".join(f"{100 * sps[k]:.1f}" for k in sorted(sps)) + " |\n")


if __name__ == "__main__":
    main()
