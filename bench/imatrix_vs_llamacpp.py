"""calibrant's importance matrix against llama.cpp's own ``llama-imatrix`` on the identical token ids.

    .venv/bin/python bench/_llamacpp.py                  # once: build llama.cpp's tools (bench only)
    .venv/bin/python bench/imatrix_vs_llamacpp.py        # 16 windows of 512 held-out wiki tokens

Both read the dense model (calibrant's F32 GGUF export for llama.cpp, the in-memory fp32 model for calibrant)
over the same windows: the held-out wiki text tokenized by ``llama-tokenize``, cut into windows as
``llama-imatrix -c CTX`` cuts it (the first token of each window replaced by BOS when the vocabulary adds
one). Printed: the entries each file holds, the token counts, and how far calibrant's mean x² per column is
from llama.cpp's (largest relative difference per tensor, over all tensors), plus both wall times.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    from _llamacpp import ensure_tools, pinned
    from gguf import GGUFReader
    from gguf_llamacpp import heldout_text, llama_tokens, run

    from calibrant.api import compute_imatrix
    from calibrant.calibration import CalibrationSet
    from calibrant.export.gguf import save_gguf
    from calibrant.export.imatrix import read_imatrix
    from calibrant.models import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    bin_dir = ensure_tools()
    with tempfile.TemporaryDirectory(prefix="imatrix-bench.") as tmp:
        tmp = Path(tmp)
        loaded = load_model(args.model, quiet=True)
        text_file = tmp / "heldout.txt"
        text_file.write_text(heldout_text("wiki", loaded.tokenizer, int(args.ctx * args.chunks * 1.1)))
        dense = tmp / "dense-f32.gguf"
        save_gguf(loaded.model, dense, {}, source_dir=loaded.path, tokenizer=loaded.tokenizer, gguf_type_name="f32")
        ids = torch.tensor(llama_tokens(bin_dir, dense, text_file))
        kv = {f.name: f.contents() for f in GGUFReader(str(dense)).fields.values()}
        windows = ids[: args.chunks * args.ctx].reshape(args.chunks, args.ctx).clone()
        if kv.get("tokenizer.ggml.add_bos_token"):
            windows[:, 0] = int(kv["tokenizer.ggml.bos_token_id"])

        theirs_path = tmp / "llama.imatrix.gguf"
        t0 = time.perf_counter()
        run([bin_dir / "llama-imatrix", "-m", dense, "-f", text_file, "-c", args.ctx, "-b", args.ctx, "--chunks",
             args.chunks, "-t", args.threads, "--no-ppl", "-o", theirs_path])
        theirs_s = time.perf_counter() - t0
        ours_path = tmp / "calibrant.imatrix.gguf"
        t0 = time.perf_counter()
        ours_obj = compute_imatrix(loaded, CalibrationSet.from_tensor(windows, source="llama-tokenize heldout wiki"),
                                   out=ours_path, progress=False)
        ours_s = time.perf_counter() - t0
        theirs, ours = read_imatrix(theirs_path), read_imatrix(ours_path)
        counts = {t.name.removesuffix(".counts"): int(t.data.reshape(-1)[0])
                  for t in GGUFReader(str(theirs_path)).tensors if t.name.endswith(".counts")}

    common = sorted(set(theirs) & set(ours))
    rel = {n: float(((ours[n] - theirs[n]).abs() / theirs[n].abs().clamp_min(1e-12)).max()) for n in common}
    worst = max(rel, key=rel.get)
    ordered = sorted(rel.values())
    print(f"## Importance matrix: calibrant vs llama-imatrix — {args.model}\n")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; llama.cpp "
          f"from llama-cpp-python {pinned()[0]}'s source, {args.threads} threads; {args.chunks} windows of "
          f"{args.ctx} held-out wiki tokens (llama-tokenize ids). {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| | llama-imatrix | calibrant calib imatrix |")
    print("|---|---|---|")
    print(f"| entries | {len(theirs)} | {len(ours)} |")
    print(f"| tokens counted per entry | {sorted(set(counts.values()))} | {sorted(set(ours_obj.counts.values()))} |")
    print(f"| wall s | {theirs_s:.1f} | {ours_s:.1f} |")
    print(f"\nSame names: {len(common)} of {len(theirs)}. Largest relative difference of mean x² per column, per "
          f"tensor: median {ordered[len(ordered) // 2]:.2e}, max {ordered[-1]:.2e} ({worst}).")


if __name__ == "__main__":
    main()
