"""GGUF export checked on the real default model: compress on a llama.cpp grid, write the .gguf, read it back
through transformers' GGUF loader (which dequantizes with the ``gguf`` package), and compare.

    .venv/bin/python bench/gguf_roundtrip.py                      # RTN gguf-q4_0, 8192 held-out wiki tokens
    .venv/bin/python bench/gguf_roundtrip.py --method gptq --scheme gguf-q4_1 --calibration wiki:32x512

Prints the file size, the largest difference between any reloaded projection weight and calibrant's
in-memory fake-quant weight (0 means bit for bit), and held-out wiki perplexity of both. The token
embedding is written F16 (not quantized by the recipe), so the perplexities may differ in the last digits.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    from calibrant.api import compress_model, evaluate_perplexity
    from calibrant.models import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="rtn")
    p.add_argument("--scheme", default="gguf-q4_0")
    p.add_argument("--calibration", default="wiki:32x512")
    p.add_argument("--max-eval-tokens", type=int, default=8192)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.gguf"
        res = compress_model(args.model, args.method, scheme=args.scheme, calibration=args.calibration, out=out,
                             export_format="gguf", progress=False)
        back = load_model(str(out), quiet=True)
        mem = res.loaded.model.state_dict()
        diff = max((mem[k].float() - v.float()).abs().max().item()
                   for k, v in back.model.state_dict().items() if k in mem and "proj" in k)
        ppl_mem = evaluate_perplexity(res.loaded, "wiki", max_tokens=args.max_eval_tokens, progress=False)["wiki"]
        ppl_back = evaluate_perplexity(back, "wiki", max_tokens=args.max_eval_tokens, progress=False)["wiki"]
        print(f"## GGUF round trip — {args.model}, {args.method} {args.scheme}")
        print()
        print("| file MB | max abs projection weight difference | ppl wiki in memory | ppl wiki reloaded | tokens |")
        print("|---:|---:|---:|---:|---:|")
        print(f"| {out.stat().st_size / 1e6:.1f} | {diff:.3g} | {ppl_mem.ppl:.4f} | {ppl_back.ppl:.4f} | {ppl_mem.tokens} |")


if __name__ == "__main__":
    main()
