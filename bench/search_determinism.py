"""Is the predictor-guided structured search deterministic on one machine? Run it twice, compare every pair.

    .venv/bin/python bench/search_determinism.py --budget 0.9

Runs :func:`calibrant.search.search_structured` twice in one process with the ablation's settings
(``bench/structured_ablation.py`` defaults, but the proxy on wiki: ``--proxy-corpus``) and reports, for each run, the number of measured configurations,
the rounds, the winner's proxy perplexity and origin, and whether the two runs measured the same
configurations in the same order with bit-identical proxy losses (the first pair where they differ, if any).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.9)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--calibration", default="wiki:32x512")
    ap.add_argument("--proxy-tokens", type=int, default=2048)
    ap.add_argument("--proxy-corpus", default="wiki",
                    help="held-out corpora of the proxy (default wiki: this bench's figures in BENCHMARKS.md; the "
                         "search's own default is wiki,news)")
    ap.add_argument("--quantum", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    from calibrant.api import resolve_calibration
    from calibrant.models import load_model
    from calibrant.search import StructuredConfig, search_structured

    lm = load_model(args.model, quiet=True)
    calib = resolve_calibration(args.calibration, lm.tokenizer, args.seed, lm.context_length, progress=False)
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        res = search_structured(lm, calib, args.budget, args.samples, score="wanda", seed=args.seed,
                                proxy_corpus=args.proxy_corpus, proxy_tokens=args.proxy_tokens, quantum=args.quantum,
                                rounds=args.rounds,
                                top_k=args.top_k, progress=False, save_model=False)
        res.pruner.apply(StructuredConfig.dense(res.pruner.shape))
        pairs = [(json.dumps(p.config.to_dict(), sort_keys=True), p.nll.hex(), p.origin, p.round) for p in res.pairs]
        runs.append({"pairs": pairs, "best": res.best, "rounds": len(res.extra["rounds"]),
                     "stopped": res.extra["stopped"], "s": time.perf_counter() - t0})
    print(f"## Search determinism — {args.model}, budget {args.budget:g}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| run | measured | rounds, stopped by | winner proxy ppl | winner from | pairs digest | s |")
    print("|---|---:|---|---:|---|---|---:|")
    for i, r in enumerate(runs, 1):
        digest = hashlib.sha256(json.dumps(r["pairs"]).encode()).hexdigest()[:16]
        print(f"| {i} | {len(r['pairs'])} | {r['rounds']}, {r['stopped']} | {r['best'].ppl:.6f} | "
              f"{r['best'].origin} (round {r['best'].round}) | {digest} | {r['s']:.0f} |")
    a, b = runs[0]["pairs"], runs[1]["pairs"]
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if first is None and len(a) == len(b):
        print(f"\nidentical: the same {len(a)} configurations in the same order, bit-identical proxy losses")
    else:
        where = first if first is not None else min(len(a), len(b))
        print(f"\nthe runs differ from pair {where} on (of {len(a)} and {len(b)})")


if __name__ == "__main__":
    main()
