"""PTQ design-space benchmark on the real default model: RTN vs GPTQ × bits × granularity, plus
activation quantization, with effective bits per weight and held-out perplexity.

    .venv/bin/python bench/quantization.py                       # the issue's grid (~35 min on 2 cores)
    .venv/bin/python bench/quantization.py --bits 4 --grans g64 --max-eval-tokens 4096   # quick look

Note: SmolLM2-135M's weights come from a Q4_1 GGUF (blocks of 32 with scale + min), so they already
sit on a 4-bit grid: 4-bit results with group size 32 can look artificially good on this model.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="wiki:32x512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="wiki")
    p.add_argument("--max-eval-tokens", type=int, default=32768)
    p.add_argument("--bits", default="8,4,3")
    p.add_argument("--grans", default="channel,g128,g64,g32")
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--act", default="w8a8,w4a8g64", help="weight+activation schemes (empty to skip)")
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ with act-order (static groups for group-wise schemes), as llm-compressor's default")
    args = p.parse_args()

    from calibrant.api import evaluate_perplexity, resolve_calibration
    from calibrant.engine import compress
    from calibrant.methods import make_method
    from calibrant.methods.quant import parse_scheme
    from calibrant.models import load_model

    def fresh():
        return load_model(args.model, quiet=True)

    def ppl(lm) -> float:
        return evaluate_perplexity(lm, args.eval, max_tokens=args.max_eval_tokens, progress=False)[args.eval].ppl

    lm = fresh()
    calib = resolve_calibration(args.calibration, lm.tokenizer, args.seed, lm.context_length)
    with torch.no_grad():
        t0 = time.perf_counter()
        for b in range(0, calib.n, 8):
            lm.model(input_ids=calib.input_ids[b : b + 8], use_cache=False)
        fwd = time.perf_counter() - t0
    dense = ppl(lm)

    schemes = [f"w{b}{'-channel' if g == 'channel' else g}" for b in args.bits.split(",") for g in args.grans.split(",")]
    schemes += [s for s in args.act.split(",") if s]
    rows = []
    for scheme in schemes:
        for method in args.methods.split(","):
            lm = fresh()
            order = {}
            if method == "gptq" and args.act_order:
                order = {"act_order": True, "static_groups": parse_scheme(scheme).granularity == "group"}
            m = make_method(method, scheme=scheme, **order)
            t0 = time.perf_counter()
            rep = compress(lm.model, calib if m.reads_data() else None, m, progress=False)
            wall = time.perf_counter() - t0
            rows.append((scheme, method, rep.effective_bits, ppl(lm), wall))
            print(f"# {scheme} {method}: ppl {rows[-1][3]:.3f} in {wall:.1f}s", flush=True)

    print(f"## Quantization — {args.model}, GPTQ calibration {args.calibration} (seed {args.seed}, hash {calib.hash})\n")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}. Perplexity on the held-out split of {args.eval} (first "
          f"{args.max_eval_tokens} tokens, seq_len 512, non-overlapping). Dense fp32: **{dense:.3f}**. "
          f"One dense forward over the calibration tokens (with LM head): {fwd:.1f} s.\n")
    print("SmolLM2-135M's weights already carry Q4_1 rounding (4-bit, blocks of 32, scale + min) from its GGUF "
          "source: 4-bit schemes with group size 32 can look artificially good here.\n")
    if args.act_order:
        print("GPTQ runs with act-order (descending Hessian diagonal; static groups for group-wise schemes).\n")
    print("| scheme | effective bits | RTN ppl | GPTQ ppl | GPTQ wall s | GPTQ × fwd |")
    print("|---|---|---|---|---|---|")
    by = {(s, m): (b, q, w) for s, m, b, q, w in rows}
    for scheme in schemes:
        r, g = by.get((scheme, "rtn")), by.get((scheme, "gptq"))
        bits = (r or g)[0]
        print(f"| {scheme} | {bits:.3f} | {r[1] if r else float('nan'):.3f} | {g[1] if g else float('nan'):.3f} | "
              f"{g[2] if g else float('nan'):.1f} | {(g[2] / fwd) if g else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
