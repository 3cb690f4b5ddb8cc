"""Perplexity on the full held-out splits: wall time and throughput next to the forward's best rate.

    .venv/bin/python bench/perplexity_speed.py                              # full held-out wiki and news
    .venv/bin/python bench/perplexity_speed.py --max-tokens 8192            # smoke test

The forward's best rate: plain forward passes (fp32, logits for every position, no KV cache) over
``--forward-sequences`` held-out wiki sequences of 512 tokens, at batch 1, 2, 4 and 8, once before and
once after the perplexity runs (a shared machine drifts: the mean of the two); the fastest batch is the
machine's best rate in this process. Then ``calibrant.api.evaluate_perplexity`` (seq_len 512,
non-overlapping windows, the tail included — calibrant's protocol) on each corpus's whole held-out split
at the CLI's default batch (8, lowered so one batch's logits stay under 256 MB: 2 for a 49k vocabulary),
with the ETA line it prints after its first batch captured, so the estimate can be checked against the
wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zeroshot_scorer import forward_throughput  # noqa: E402


def main() -> None:
    from calibrant.api import evaluate_perplexity
    from calibrant.models import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpora", default="wiki,news")
    p.add_argument("--max-tokens", type=int, default=None, help="only the first N held-out tokens (smoke test)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--forward-sequences", type=int, default=16)
    args = p.parse_args()
    loaded = load_model(args.model, quiet=True)
    def measure() -> dict[int, float]:
        return {b: forward_throughput(loaded.model, loaded.tokenizer, args.forward_sequences, batch=b)["tokens_per_s"]
                for b in (1, 2, 4, 8)}

    before = measure()
    rows = []
    for corpus in args.corpora.split(","):
        err = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(err):
            r = evaluate_perplexity(loaded, [corpus], max_tokens=args.max_tokens, batch_size=args.batch_size,
                                    progress=True)[corpus]
        wall = time.perf_counter() - t0
        eta = re.search(r"calibrant: perplexity.*", err.getvalue())
        rows.append((corpus, r, wall, eta.group(0) if eta else "(no estimate printed)"))
        print(f"# {corpus}: {r.tokens} tokens, {wall:.0f} s", file=sys.stderr, flush=True)
    after = measure()
    rates = {b: (before[b] + after[b]) / 2 for b in before}
    best = max(rates.values())
    print(f"## Perplexity throughput — {args.model}, full held-out splits{'' if not args.max_tokens else f' (first {args.max_tokens} tokens)'}")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print()
    print("Forward rate (batch × 512, logits for every position; mean of a measurement before and one after the "
          "perplexity runs): " + ", ".join(f"batch {b}: {v:.0f} tok/s ({before[b]:.0f} / {after[b]:.0f})"
                                          for b, v in rates.items()) + f"; best {best:.0f} tok/s.")
    print()
    print("| corpus | tokens scored | windows | ppl | wall s | tokens/s | x best forward rate | estimate printed after the first batch |")
    print("|---|---|---|---|---|---|---|---|")
    for corpus, r, wall, eta in rows:
        print(f"| {corpus} | {r.tokens} | {r.protocol['windows']} | {r.ppl:.3f} | {wall:.0f} | {r.tokens / wall:.0f} | "
              f"{(r.tokens / wall) / best:.2f} | {eta.removeprefix('calibrant: ')} |")


if __name__ == "__main__":
    main()
