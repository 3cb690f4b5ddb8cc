"""How much can any structured configuration beat uniform pruning? The search run on the evaluation text itself.

    OMP_NUM_THREADS=1 .venv/bin/python bench/structured_oracle.py --budget 0.9 --json oracle_0.9.json

The predictor-guided search (the ablation's settings: 48 initial configurations, at most 6 rounds of 6, Wanda
importance from wiki:32x512) with one change: its proxy is the *first* ``--oracle-tokens`` tokens of the wiki
and news evaluation text (an equal share of whole windows from each) — the text every arm of
``bench/structured_ablation.py`` is then scored on — instead of the last tokens of the held-out splits. The
search then optimises (part of) what is measured, so its margin over uniform pruning at the full budget shows
what a proxy matching the scored text gives in this search space (one search: a reference, not a bound — another
search with another proxy can still do better). The winner and the uniform configuration
are scored on the first ``--eval-tokens`` tokens of wiki and news, split into the windows the search saw
(``in-sample``) and the rest (``unseen``), and on the tail windows the default proxy uses.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _structured import load_search_bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.9)
    ap.add_argument("--calibration", default="wiki:32x512")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--oracle-tokens", type=int, default=4096, help="proxy tokens taken from the evaluation text")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    seq_len = 512
    share = args.oracle_tokens // 2 // seq_len * seq_len
    if share < seq_len or share > args.eval_tokens:
        raise SystemExit(f"--oracle-tokens must give each corpus 1..{args.eval_tokens // seq_len} windows of "
                         f"{seq_len} tokens")

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    bench = load_search_bench(args.model, args.calibration, args.seed, args.batch_size)
    lm, calib, fwd_s, streams = bench.lm, bench.calib, bench.forward_s, bench.streams
    import calibrant.search.search as search_mod
    from calibrant.evaluate.perplexity import perplexity
    from calibrant.search import StructuredConfig, search_structured

    def head_proxy(spec: str, tokenizer: Any, tokens: int, seq: int, progress: bool | None = None
                   ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        return (torch.cat([streams[c][:share] for c in ("wiki", "news")]),
                [{"corpus": c, "tokens": share, "checksum": None} for c in ("wiki", "news")])

    search_mod.proxy_token_ids = head_proxy  # the oracle: the search's proxy is the evaluation text's head
    t0 = time.perf_counter()
    res = search_structured(lm, calib, args.budget, args.samples, rounds=args.rounds, top_k=args.top_k,
                            seed=args.seed, proxy_tokens=2 * share, quantum=64, batch_size=args.batch_size,
                            progress=False, save_model=False, proxy_corpus="wiki,news")
    search_s = time.perf_counter() - t0
    pruner = res.pruner

    def nll(ids: torch.Tensor) -> float:
        return math.log(perplexity(lm.model, ids, batch_size=args.batch_size, progress=False).ppl)

    def score(cfg: StructuredConfig) -> dict[str, float]:
        pruner.apply(cfg)
        out: dict[str, float] = {}
        n_all = args.eval_tokens
        for c, s in streams.items():
            seen, unseen = nll(s[:share]), nll(s[share:n_all])
            out[f"{c}_seen"], out[f"{c}_unseen"] = math.exp(seen), math.exp(unseen)
            out[c] = math.exp((seen * share + unseen * (n_all - share)) / n_all)  # whole windows: exact
            out[f"{c}_tail"] = math.exp(nll(s[-share:]))
        return out

    rows = {"oracle winner": score(res.best.config), "uniform": score(res.uniform.config),
            "dense": score(StructuredConfig.dense(pruner.shape))}
    summary = {"settings": vars(args), "started": started, "forward_s": fwd_s, "search_s": search_s,
               "measured": res.extra["measured"], "origin": res.best.origin, "round": res.best.round,
               "kept": {"oracle winner": res.best.kept_fraction, "uniform": res.uniform.kept_fraction},
               "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))

    print(f"## Structured search on the evaluation text (oracle) — {args.model}, budget {args.budget:g}\n")
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; started {started}. "
          f"Proxy: the first {share} tokens of the wiki and news evaluation text; {res.extra['measured']} measured "
          f"configurations; winner from {res.best.origin} (round {res.best.round}); search {search_s:.0f} s "
          f"({search_s / fwd_s:.1f} dense forwards of {fwd_s:.1f} s).\n")
    cols = [f"{c}_{part}" for c in ("wiki", "news") for part in ("seen", "unseen", "tail")] + ["wiki", "news"]
    heads = [f"{c} {part}" for c in ("wiki", "news") for part in
             (f"in-sample ({share})", f"unseen ({args.eval_tokens - share})", f"tail ({share})")]
    print("| configuration | kept | " + " | ".join(heads) + f" | wiki ({args.eval_tokens}) | news ({args.eval_tokens}) |")
    print("|---|---:|" + "---:|" * len(cols))
    kept = {**summary["kept"], "dense": 1.0}
    for name, r in rows.items():
        print(f"| {name} | {kept[name]:.4f} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    w, u = rows["oracle winner"], rows["uniform"]
    print("| winner vs uniform | | " + " | ".join(f"{100 * (w[c] / u[c] - 1):+.2f} %" for c in cols) + " |")
    print(f"\npeak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
