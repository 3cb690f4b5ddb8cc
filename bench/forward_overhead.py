"""Where a one-pass GPTQ run's time goes, against one plain dense forward over the same tokens.

    .venv/bin/python bench/forward_overhead.py                   # SmolLM2-135M, wiki 32x512, batch 8

One process, one model load; each line is the best of ``--repeats`` runs, in this order:

1. the dense forward with the LM head (what the llm-compressor bench divides by);
2. the decoder alone (no LM head): the part of (1) any layer-wise method must redo;
3. block by block: capture block 0's inputs, then every block over all batches (the two-pass engine's
   propagation pass, no hooks);
4. the one-pass engine with a method that changes nothing and needs only activation norms: (3) plus
   the batch greenlets, hooks and per-group hand-offs;
5. the same with a method that needs XᵀX: (4) plus Hessian accumulation and the per-layer
   relative-error report;
6. GPTQ W4 g64 act-order, the llm-compressor bench's calibrant setting.

Rows 4–6 run ``engine.compress`` on a model whose weights rows 4–5 leave unchanged; row 6 is last as it
changes them. Times are in seconds and as a multiple of row 1.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="wiki:32x512")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    from calibrant.api import resolve_calibration
    from calibrant.engine import BlockwiseRunner, compress
    from calibrant.methods import make_method
    from calibrant.methods.base import Method
    from calibrant.models import load_model

    lm = load_model(args.model, quiet=True)
    ids = resolve_calibration(args.calibration, lm.tokenizer, 0, None).input_ids
    bs = args.batch_size

    def Unchanged(needs: str) -> Method:  # noqa: N802 - reads as the class it makes
        """A method that streams one statistic and leaves every weight as it is."""
        cls = type(f"Unchanged_{needs}", (Method,), {"name": f"unchanged-{needs}", "statistics": (needs,),
                                                     "compress": lambda self, weight, stats, ctx: weight})
        return cls()

    def best(fn) -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    @torch.no_grad()
    def dense(module) -> None:
        for b in range(0, ids.shape[0], bs):
            module(input_ids=ids[b : b + bs], use_cache=False)

    @torch.no_grad()
    def blockwise() -> None:
        runner = BlockwiseRunner(lm.model, batch_size=bs)
        inps = runner.capture(ids)
        outs = torch.empty_like(inps)
        for i in range(len(runner.adapter.blocks)):
            runner.run_block(i, inps, outs)
            inps, outs = outs, inps

    timings: dict[str, dict] = {}

    def engine(method: Method, label: str) -> None:
        report = compress(lm.model, ids, method, batch_size=bs, progress=False)
        timings[label] = report.timings

    dense(lm.model)  # warm-up
    rows = [("dense forward, LM head", best(lambda: dense(lm.model))),
            ("decoder only", best(lambda: dense(lm.model.model))),
            ("block by block, no hooks", best(blockwise)),
            ("one-pass, unchanged, norms", best(lambda: engine(Unchanged("sq_norms"), "norms"))),
            ("one-pass, unchanged, XᵀX", best(lambda: engine(Unchanged("hessian"), "hessian")))]
    gptq = make_method("gptq", scheme="w4g64", act_order=True, static_groups=True)
    t0 = time.perf_counter()
    engine(gptq, "gptq")
    rows.append(("one-pass GPTQ W4 g64 act-order", time.perf_counter() - t0))

    unit = rows[0][1]
    print(f"{args.model}, {args.calibration} token ids, batch {bs}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; best of {args.repeats} (GPTQ: one run)\n")
    print("| run | s | × dense fwd |")
    print("|---|---:|---:|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.1f} | {seconds / unit:.2f} |")
    print("\nengine timings of the last run of each (s): capture / forward / stats / compress")
    for label, t in timings.items():
        print(f"- {label}: {t['capture_s']:.1f} / {t['forward_s']:.1f} / {t['stats_s']:.1f} / {t['compress_s']:.1f}")


if __name__ == "__main__":
    main()
