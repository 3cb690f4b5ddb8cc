"""GGUF exports checked by llama.cpp itself: calibrant's Q4_0 / Q4_1 / Q8_0 by RTN, GPTQ and AWQ against
llama.cpp's own quantizer (with and without an importance matrix from the same calibration set).

    .venv/bin/python bench/_llamacpp.py                 # once: build llama.cpp's tools (bench only)
    .venv/bin/python bench/gguf_llamacpp.py             # the table (about an hour on 2 cores)
    .venv/bin/python bench/gguf_llamacpp.py --methods rtn --types q4_0 --chunks 8    # smoke test

One token stream for every number: the held-out wiki documents (joined by blank lines) written to a text
file and tokenized by ``llama-tokenize`` with the model's own GGUF vocabulary. On it:

- **llama.cpp ppl**: ``llama-perplexity -c CTX --chunks K`` on the exported ``.gguf`` (its protocol: K
  windows of CTX tokens, each scored on its second half; llama.cpp computes in its own kernels, e.g. Q4_0
  weights against Q8_0-quantized activations, and an F16 KV cache);
- **calibrant ppl**: the same protocol on the same token ids, computed in PyTorch float32 on calibrant's
  in-memory fake-quantized model (the weights the file holds). The two must agree within 1 %.

llama.cpp's own rows: the dense model written by calibrant as an F32 GGUF, then ``llama-quantize`` to each
type, with the token embedding kept F16 (``--token-embedding-type f16``) as calibrant's files keep it, so
the files have identical layout and size (the table shows the bytes); ``+ imatrix`` rows use the importance
matrix that ``calibrant calib imatrix`` writes from the same calibration set. SmolLM2-135M's source weights
are already on a Q4_1 grid (see ../shared/ASSETS.md): Q4_1 rows can look artificially good.

Also timed: one plain dense forward over the calibration tokens; each compression is given as a multiple.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def heldout_text(corpus: str, tokenizer: Any, tokens: int) -> str:
    """The first held-out documents of ``corpus`` joined by blank lines, about ``tokens`` tokens long."""
    from calibrant.calibration.corpora import get_corpus

    docs, total = [], 0
    for doc in get_corpus(corpus).split("heldout"):
        docs.append(doc.strip())
        total += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 2
        if total >= tokens:
            break
    return "\n\n".join(docs)


def run(cmd: list[str]) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{Path(cmd[0]).name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def llama_tokens(bin_dir: Path, gguf: Path, text_file: Path) -> list[int]:
    out = run([bin_dir / "llama-tokenize", "-m", gguf, "-f", text_file, "--ids", "--no-escape", "--log-disable"])
    return json.loads(out.strip().splitlines()[-1])


def llama_ppl(bin_dir: Path, gguf: Path, text_file: Path, ctx: int, chunks: int, threads: int) -> dict[str, float]:
    t0 = time.perf_counter()
    out = run([bin_dir / "llama-perplexity", "-m", gguf, "-f", text_file, "-c", ctx, "--chunks", chunks,
               "-t", threads, "-b", ctx])
    m = FINAL.search(out)
    if m is None:
        raise SystemExit(f"llama-perplexity printed no final estimate:\n{out[-2000:]}")
    return {"ppl": float(m.group(1)), "pm": float(m.group(2)), "s": time.perf_counter() - t0}


def llama_quantize(bin_dir: Path, src: Path, dst: Path, kind: str, threads: int, imatrix: Path | None,
                   pure: bool = False) -> None:
    extra = (["--imatrix", imatrix] if imatrix is not None else []) + (["--pure"] if pure else [])
    run([bin_dir / "llama-quantize", *extra, "--token-embedding-type", "f16", src, dst, kind.upper(), threads])


@torch.no_grad()
def protocol_ppl(model: Any, ids: torch.Tensor, ctx: int, chunks: int, bos: int | None, batch: int = 4) -> float:
    """llama-perplexity's protocol in float32: ``chunks`` windows of ``ctx`` tokens (the first replaced by BOS
    when the vocabulary adds one), each scored on positions ``ctx/2 .. ctx-2`` predicting the next token."""
    first = ctx // 2
    windows = ids[: chunks * ctx].reshape(chunks, ctx).clone()
    if bos is not None:
        windows[:, 0] = bos
    nll, count = 0.0, 0
    for b in range(0, chunks, batch):
        x = windows[b:b + batch]
        logits = model(input_ids=x, use_cache=False).logits[:, first:ctx - 1].float()
        logp = torch.log_softmax(logits, dim=-1)
        nll -= logp.gather(-1, x[:, first + 1:, None]).double().sum().item()
        count += x.shape[0] * (ctx - 1 - first)
    return float(torch.exp(torch.tensor(nll / count)))


def tensor_types(gguf_path: Path) -> dict[str, int]:
    from collections import Counter

    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(str(gguf_path)).tensors))


def main() -> None:
    from _llamacpp import ensure_tools, pinned
    from _llmc import dense_forward_passes
    from gguf import GGUFReader

    from calibrant.api import compress_model, compute_imatrix
    from calibrant.calibration import make_calibration
    from calibrant.export.gguf import save_gguf
    from calibrant.models import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="wiki:128x512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="rtn,gptq,awq")
    p.add_argument("--types", default="q4_0,q4_1,q8_0")
    p.add_argument("--ctx", type=int, default=512, help="llama-perplexity's window")
    p.add_argument("--chunks", type=int, default=64, help="windows scored (each on its second half)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--no-imatrix", action="store_true",
                   help="llama.cpp's own quantizer without an importance matrix only (saves computing one)")
    args = p.parse_args()
    bin_dir = ensure_tools()
    methods, types = args.methods.split(","), args.types.split(",")
    rows: list[dict[str, Any]] = []

    with tempfile.TemporaryDirectory(prefix="gguf-bench.") as tmp:
        tmp = Path(tmp)
        loaded = load_model(args.model, quiet=True)
        tok = loaded.tokenizer
        text_file = tmp / "heldout.txt"
        text_file.write_text(heldout_text("wiki", tok, int(args.ctx * args.chunks * 1.1)))
        dense_path = tmp / "dense-f32.gguf"
        save_gguf(loaded.model, dense_path, {}, source_dir=loaded.path, tokenizer=tok, gguf_type_name="f32")
        ids = torch.tensor(llama_tokens(bin_dir, dense_path, text_file))
        hf_ids = tok(text_file.read_text(), add_special_tokens=False)["input_ids"]
        kv = {f.name: f.contents() for f in GGUFReader(str(dense_path)).fields.values()
              if f.name.startswith("tokenizer.ggml.add_bos") or f.name == "tokenizer.ggml.bos_token_id"}
        bos = int(kv["tokenizer.ggml.bos_token_id"]) if kv.get("tokenizer.ggml.add_bos_token") else None
        n_tok = len(ids)
        same = ids.tolist()[(bos is not None):] == hf_ids
        if n_tok < args.ctx * args.chunks:
            raise SystemExit(f"only {n_tok} held-out tokens for {args.chunks} windows of {args.ctx}")
        calib = make_calibration(args.calibration, tok, seed=args.seed, max_length=loaded.context_length)
        forward_s = min(dense_forward_passes(loaded.model, calib.input_ids, batch_size=8, passes=1))

        def measure(name: str, path: Path, model: Any | None, compress_s: float | None, **extra: Any) -> None:
            lc = llama_ppl(bin_dir, path, text_file, args.ctx, args.chunks, args.threads)
            ours = protocol_ppl(model, ids, args.ctx, args.chunks, bos) if model is not None else None
            row = {"config": name, "bytes": path.stat().st_size, "types": tensor_types(path), "llama_ppl": lc["ppl"],
                   "llama_pm": lc["pm"], "llama_s": lc["s"], "calibrant_ppl": ours, "compress_s": compress_s,
                   "x_forward": None if compress_s is None else compress_s / forward_s, **extra}
            if ours is not None:
                row["rel_diff"] = lc["ppl"] / ours - 1
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

        measure("dense (F32)", dense_path, loaded.model, None)
        # with an imatrix, llama-quantize stores the first eighth of ffn_down in Q4_1 (Q5_1) for Q4_0 (Q5_0)
        # files; --pure keeps every weight in the one type, the layout (and size) calibrant writes
        variants = {"q4_0": [(False, False), (True, False), (True, True)], "q4_1": [(False, False), (True, False)]}
        if args.no_imatrix:
            variants = {}
        imatrix_path = tmp / "wiki.imatrix.gguf"
        imatrix_s = float("nan")
        if any(im for kind in types for im, _ in variants.get(kind, [])):
            t0 = time.perf_counter()
            compute_imatrix(loaded, calib, out=imatrix_path, progress=False)
            imatrix_s = time.perf_counter() - t0
        for kind in types:
            for use_imatrix, pure in variants.get(kind, [(False, False)]):
                out = tmp / f"llama-{kind}{'-im' if use_imatrix else ''}{'-pure' if pure else ''}.gguf"
                t0 = time.perf_counter()
                llama_quantize(bin_dir, dense_path, out, kind, args.threads, imatrix_path if use_imatrix else None,
                               pure)
                label = f"llama.cpp {kind.upper()}{' + imatrix' if use_imatrix else ''}{' (--pure)' if pure else ''}"
                measure(label, out, None, time.perf_counter() - t0 + (imatrix_s if use_imatrix else 0.0),
                        method="llama-quantize", kind=kind, imatrix=use_imatrix, pure=pure)
                out.unlink()
        del loaded
        for method in methods:
            for kind in types:
                model = load_model(args.model, quiet=True)
                out = tmp / f"{method}-{kind}.gguf"
                t0 = time.perf_counter()
                res = compress_model(model, method, scheme=f"gguf-{kind}", calibration=calib, seed=args.seed, out=out,
                                     export_format="gguf", progress=False)
                compress_s = time.perf_counter() - t0
                measure(f"calibrant {method} {kind.upper()}", out, res.loaded.model, compress_s, method=method,
                        kind=kind, imatrix=False)
                out.unlink()
                del model, res
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

    version, _ = pinned()
    print(f"## GGUF exports measured by llama.cpp — {args.model}\n")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; llama.cpp from "
          f"llama-cpp-python {version}'s source, {args.threads} threads. Held-out wiki: {args.chunks} windows of "
          f"{args.ctx} tokens (of {n_tok} tokenized by llama-tokenize; Hugging Face's tokenizer gives "
          f"{'the same ids' if same else 'different ids'}), each scored on its second half. Calibration "
          f"{args.calibration} seed {args.seed} (hash {calib.hash}); dense forward over it {forward_s:.1f} s; "
          f"imatrix {imatrix_s:.1f} s (nan: not computed); peak RSS {peak_gb:.2f} GB. {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| file | MB | tensor types | ppl by llama.cpp | ppl by calibrant (fake-quant) | llama.cpp / calibrant − 1 "
          "| quantize s | × dense forward |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        types_cell = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()))
        ours = "—" if r["calibrant_ppl"] is None else f"{r['calibrant_ppl']:.3f}"
        diff = "—" if r.get("rel_diff") is None else f"{100 * r['rel_diff']:+.2f} %"
        cs = "—" if r["compress_s"] is None else f"{r['compress_s']:.1f}"
        xf = "—" if r["x_forward"] is None else f"{r['x_forward']:.2f}"
        print(f"| {r['config']} | {r['bytes'] / 1e6:.1f} | {types_cell} | {r['llama_ppl']:.3f} ± {r['llama_pm']:.3f} "
              f"| {ours} | {diff} | {cs} | {xf} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "forward_s": forward_s,
                                               "tokens": n_tok, "hf_same_ids": same}, indent=2))


if __name__ == "__main__":
    main()
