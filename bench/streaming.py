"""Models larger than memory (issue 15): streamed compression of a 7 B-shaped checkpoint, in-RAM vs streamed
at a quarter of its depth, and streamed vs in-RAM perplexity of real models.

    .venv/bin/python bench/streaming.py synthetic --dir /var/tmp/llama7b   # ~27 GB fp32 written, then compressed
    .venv/bin/python bench/streaming.py quarter --dir /var/tmp/llama7b-q   # 8 blocks: in RAM and streamed
    .venv/bin/python bench/streaming.py real                               # SmolLM2-135M, Gemma-3-270M
    .venv/bin/python bench/streaming.py block                              # one block: each method's memory

``synthetic`` writes a Llama checkpoint of a real 7 B shape (hidden 4096, 32 blocks, MLP 11008, 32 heads,
vocabulary 32000) in float32 with seeded random weights, one safetensors shard per block, then compresses it
streamed with Wanda 50 % and GPTQ w4g128 from 4×128 random-token calibration rows. Each compression runs in
its own process (its peak RSS is its own); the time split comes from its calibrant.json. The first two blocks
of each output are checked against an in-memory reference: a two-block model built from the checkpoint's
embeddings, head and first two blocks, compressed in memory with the same rows (a block's compression depends
only on the blocks before it). Each output is deleted after its check (input and output together are ~55 GB).
Also timed in the same run: one plain dense forward over the calibration rows, streamed (the model does not
fit), and each compression as a multiple of it.

``quarter``: the same shape at 8 blocks (6.9 GB, fits in memory): in-RAM and streamed compressions must give
identical weights; the streaming overhead is the wall-time difference.

``real``: SmolLM2-135M and Gemma-3-270M, each in float32 and bfloat16, Wanda 50 % (wiki 32×512) in memory and
streamed, then wiki perplexity of each output in memory and streamed: all four numbers must be equal per model.

``block``: one block of the 7 B shape in memory (a one-block model, 256-token vocabulary), compressed from the
same 4×128 rows: the memory each method's statistics and solver add to the block's weights (its peak RSS less
the resident set before the compression), in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _llmc import peak_rss_gb  # noqa: E402

HERE = Path(__file__).resolve()
SHAPE = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
         "num_hidden_layers": 32, "vocab_size": 32000, "max_position_embeddings": 2048}
METHODS = {"wanda50": ("wanda", {"sparsity": 0.5}), "gptq-w4g128": ("gptq", {"scheme": "w4g128"})}


# ---- the synthetic checkpoint -------------------------------------------------------------------------------

def write_checkpoint(path: Path, layers: int, seed: int = 0) -> int:
    """A float32 Llama of the 7 B shape with ``layers`` blocks, one safetensors shard per block; returns bytes."""
    import transformers as T
    from safetensors.torch import save_file

    from calibrant.models import load_model

    cfg = T.LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}, tie_word_embeddings=False, dtype="float32")
    path.mkdir(parents=True, exist_ok=False)
    cfg.save_pretrained(path)
    load_model("smollm2-135m", quiet=True).tokenizer.save_pretrained(path)  # ids < 32000 are all it is fed
    h, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    total = layers + 1
    weight_map: dict[str, str] = {}
    size = 0
    for i in range(layers):
        p = f"model.layers.{i}."
        block = {p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h)}
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            block[p + f"self_attn.{name}.weight"] = rand(h, h)
        block[p + "mlp.gate_proj.weight"], block[p + "mlp.up_proj.weight"] = rand(f, h), rand(f, h)
        block[p + "mlp.down_proj.weight"] = rand(h, f)
        name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        save_file(block, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in block})
        size += sum(t.numel() * 4 for t in block.values())
        print(f"# wrote block {i + 1}/{layers}", file=sys.stderr, flush=True)
    rest = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h), "lm_head.weight": rand(v, h)}
    name = f"model-{total:05d}-of-{total:05d}.safetensors"
    save_file(rest, str(path / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in rest})
    size += sum(t.numel() * 4 for t in rest.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                   "weight_map": weight_map}, indent=1))
    return size


def calibration_file(path: Path, n: int, length: int) -> Path:
    from calibrant.calibration import CalibrationSet

    ids = torch.randint(3, SHAPE["vocab_size"], (n, length), generator=torch.Generator().manual_seed(1))
    CalibrationSet.from_tensor(ids, source="random-ids").save(path)
    return path


# ---- child processes: one measurement each, its own peak RSS ---------------------------------------------------

def child(args: argparse.Namespace) -> None:
    """Run one measurement (``--job``) and print one JSON line with its wall time and peak RSS."""
    job = json.loads(args.job)
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if job["kind"] == "compress":
        from calibrant.api import compress_model

        method, params = job["method"], job["params"]
        res = compress_model(job["model"], method, calibration=job["calibration"], out=job["out"], progress=False,
                             stream=job["stream"], batch_size=job.get("batch_size", 4), **params)
        out = {"timings": res.report.timings, "streamed": res.metadata.get("streamed"),
               "activations": res.report.activations, "sparsity": res.report.sparsity}
    elif job["kind"] == "forward":  # one plain dense forward over the calibration rows, streamed
        from calibrant.calibration import CalibrationSet
        from calibrant.evaluate.streamed import streamed_perplexity

        ids = CalibrationSet.load(job["calibration"]).input_ids
        res = streamed_perplexity(job["model"], ids.reshape(-1), seq_len=ids.shape[1], batch_size=ids.shape[0],
                                  progress=False)
        out = {"ppl": res.ppl, "seconds": res.seconds}
    elif job["kind"] == "block":  # one block of the shape in memory: what a method adds to its weights
        SHAPE.update(job["shape"])
        out = _one_block(job["method"], job["params"], job["n"], job["length"])
    elif job["kind"] == "ppl":
        from calibrant.api import evaluate_perplexity

        res = evaluate_perplexity(job["model"], "wiki", max_tokens=job["max_tokens"], progress=False,
                                  stream=job["stream"])["wiki"]
        out = {"ppl": res.ppl, "tokens": res.tokens}
    out.update(wall_s=time.perf_counter() - t0, peak_rss_gb=peak_rss_gb())
    print(json.dumps(out))


def _rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e6
    return 0.0


def _one_block(method: str, params: dict[str, Any], n: int, length: int) -> dict[str, Any]:
    """A one-block model of the shape (seeded random weights, a 256-token vocabulary: the block is what is
    measured), compressed in memory from ``n``×``length`` random rows: resident memory before, the peak during,
    the compression's wall time and one dense forward's over the same rows."""
    import gc

    import transformers as T

    from calibrant.calibration import CalibrationSet
    from calibrant.engine import compress
    from calibrant.methods import make_recipe

    cfg = T.LlamaConfig(**{**SHAPE, "num_hidden_layers": 1, "vocab_size": 256}, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.no_grad():
        model = T.LlamaForCausalLM(cfg).eval()
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    rows = torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t0 = time.perf_counter()
        model(rows)
        forward_s = time.perf_counter() - t0
    gc.collect()
    before = _rss_gb()
    t0 = time.perf_counter()
    compress(model, CalibrationSet.from_tensor(rows, source="random-ids"), make_recipe(method, **params),
             batch_size=n, progress=False)
    return {"forward_s": forward_s, "compress_s": time.perf_counter() - t0, "rss_before_gb": before,
            "block_gb": sum(p.numel() * 4 for p in model.model.layers[0].parameters()) / 1e9}


def block(args: argparse.Namespace) -> None:
    print(f"## One block of the 7 B shape in memory, fp32 — what each method adds to it; calibration {args.n}×"
          f"{args.length}, {torch.get_num_threads()} thread(s); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| method | block weights GB | resident before GB | peak GB | working memory GB | compress s | "
          "× dense forward |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label in args.methods.split(","):
        method, params = METHODS[label]
        r = run_child({"kind": "block", "method": method, "params": params, "n": args.n, "length": args.length,
                       "shape": SHAPE})
        print(f"| {label} | {r['block_gb']:.2f} | {r['rss_before_gb']:.2f} | {r['peak_rss_gb']:.2f} | "
              f"{r['peak_rss_gb'] - r['rss_before_gb']:.2f} | {r['compress_s']:.0f} | "
              f"{r['compress_s'] / r['forward_s']:.1f} |", flush=True)


def run_child(job: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE), "_child", "--job", json.dumps(job)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({job['kind']}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the parts -------------------------------------------------------------------------------------------------

def reference_two_blocks(src: Path, calib: Path, method: str, params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Blocks 0 and 1 compressed in memory: a two-block model from the checkpoint's own tensors."""
    import transformers as T

    from calibrant.calibration import CalibrationSet
    from calibrant.engine import compress
    from calibrant.methods import make_recipe
    from calibrant.models.lazy import LazyCheckpoint

    ckpt = LazyCheckpoint(src)
    cfg = T.LlamaConfig(**{**SHAPE, "num_hidden_layers": 2}, tie_word_embeddings=False)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    state = {k: ckpt.get(k) for k in ckpt.keys() if not k.startswith("model.layers.") or
             k.split(".")[2] in ("0", "1")}
    model.load_state_dict(state, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # computed buffers: off the meta device
    model.eval()
    compress(model, CalibrationSet.load(calib), make_recipe(method, **params), batch_size=4, progress=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("model.layers.")}


def synthetic(args: argparse.Namespace) -> None:
    from calibrant.models.lazy import LazyCheckpoint

    src = Path(args.dir)
    if not (src / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        size = write_checkpoint(src, args.layers)
        print(f"# checkpoint: {size / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    size = LazyCheckpoint(src).nbytes()
    calib = calibration_file(src.parent / "calib-4x128.safetensors", args.n, args.length)
    forward = run_child({"kind": "forward", "model": str(src), "calibration": str(calib)})
    rows = []
    for label in args.methods.split(","):
        method, params = METHODS[label]
        out = src.parent / f"{src.name}-{label}"
        shutil.rmtree(out, ignore_errors=True)
        res = run_child({"kind": "compress", "model": str(src), "method": method, "params": params,
                         "calibration": str(calib), "out": str(out), "stream": True})
        ref = reference_two_blocks(src, calib, method, params)
        written = LazyCheckpoint(out)
        same = all(torch.equal(ref[k], written.get(k)) for k in ref)
        res.update(label=label, first_two_blocks_equal=same, out_bytes=written.nbytes())
        written.close()
        shutil.rmtree(out)
        rows.append(res)
        print(json.dumps(res), file=sys.stderr, flush=True)
    print(f"## Streaming a model larger than memory — {args.layers} blocks of the 7 B shape, fp32\n")
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, RAM "
          f"{_ram_gb():.1f} GB; checkpoint {size / 1e9:.1f} GB ({args.layers + 1} shards); calibration "
          f"{args.n}×{args.length} random token ids; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
          f"One dense forward over the calibration rows, streamed (every block read once): {forward['seconds']:.0f} s "
          f"(peak RSS {forward['peak_rss_gb']:.2f} GB). `compress s` is the engine's own total; `process s` adds "
          "the process start, the checkpoint's content hash (cached after the first run) and the tokenizer.\n")
    print("| method | compress s | × dense forward | process s | peak RSS GB | read s | forwards s | statistics s | "
          "solving s | write s | blocks resident at once | first two blocks = in-memory reference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        t = r["timings"]
        fwd = t.get("capture_s", 0) + t.get("forward_s", 0)
        print(f"| {r['label']} | {t['total_s']:.0f} | {t['total_s'] / forward['seconds']:.2f} | {r['wall_s']:.0f} | "
              f"{r['peak_rss_gb']:.2f} "
              f"| {t.get('read_s', 0):.0f} | {fwd:.0f} | {t.get('stats_s', 0):.0f} | {t.get('compress_s', 0):.0f} | "
              f"{t.get('write_s', 0):.0f} | {r['streamed']['peak_resident_blocks']} | "
              f"{'yes' if r['first_two_blocks_equal'] else '**no**'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "forward": forward, "rows": rows}, indent=2))


def quarter(args: argparse.Namespace) -> None:
    from calibrant.models.lazy import LazyCheckpoint

    src = Path(args.dir)
    if not (src / "model.safetensors.index.json").is_file():
        write_checkpoint(src, 8)
    calib = calibration_file(src.parent / "calib-4x128.safetensors", args.n, args.length)
    print(f"## In memory vs streamed — 8 blocks of the 7 B shape, fp32 ({LazyCheckpoint(src).nbytes() / 1e9:.1f} "
          f"GB), calibration {args.n}×{args.length}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| method | in memory s | peak RSS GB | streamed s | peak RSS GB | overhead | identical weights |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label in args.methods.split(","):
        method, params = METHODS[label]
        res = {}
        for stream in (False, True):
            out = src.parent / f"{src.name}-{label}-{'streamed' if stream else 'ram'}"
            shutil.rmtree(out, ignore_errors=True)
            res[stream] = run_child({"kind": "compress", "model": str(src), "method": method, "params": params,
                                     "calibration": str(calib), "out": str(out), "stream": stream})
        a = LazyCheckpoint(src.parent / f"{src.name}-{label}-ram")
        b = LazyCheckpoint(src.parent / f"{src.name}-{label}-streamed")
        same = sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
        a.close()
        b.close()
        for stream in (False, True):
            shutil.rmtree(src.parent / f"{src.name}-{label}-{'streamed' if stream else 'ram'}")
        ram, st = res[False], res[True]
        print(f"| {label} | {ram['wall_s']:.0f} | {ram['peak_rss_gb']:.2f} | {st['wall_s']:.0f} | "
              f"{st['peak_rss_gb']:.2f} | {100 * (st['wall_s'] / ram['wall_s'] - 1):+.1f} % | "
              f"{'yes' if same else '**no**'} |")


def real(args: argparse.Namespace) -> None:
    import transformers as T

    from calibrant.models.loader import resolve_model_dir

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"## Streamed vs in memory on real models — Wanda 50 % (wiki 32×512), wiki perplexity on the first "
          f"{args.max_tokens} held-out tokens; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| model | dtype | compress in memory s | streamed s | ppl: in-memory output, in memory | same output, "
          "streamed | streamed output, in memory | streamed output, streamed | all equal |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for alias in args.models.split(","):
        src = resolve_model_dir(alias, quiet=True)
        for dtype in ("float32", "bfloat16"):
            model_dir = work / f"{alias}-{dtype}"
            if not model_dir.is_dir():
                m = T.AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
                m.save_pretrained(model_dir)
                T.AutoTokenizer.from_pretrained(src).save_pretrained(model_dir)
                del m
            outs, times = {}, {}
            for stream in (False, True):
                out = work / f"{alias}-{dtype}-{'streamed' if stream else 'ram'}"
                shutil.rmtree(out, ignore_errors=True)
                # both paths compute in float32 and write the checkpoint's dtype; this bench compares their
                # outputs through perplexity (tests/models/test_streamed.py compares the weights)
                times[stream] = run_child({"kind": "compress", "model": str(model_dir), "method": "wanda",
                                           "params": {"sparsity": 0.5}, "calibration": "wiki:32x512",
                                           "out": str(out), "stream": stream})["wall_s"]
                outs[stream] = out
            ppl = [run_child({"kind": "ppl", "model": str(outs[s]), "stream": e, "max_tokens": args.max_tokens})["ppl"]
                   for s in (False, True) for e in (False, True)]
            for out in outs.values():
                shutil.rmtree(out)
            print(f"| {alias} | {dtype} | {times[False]:.0f} | {times[True]:.0f} | "
                  + " | ".join(f"{p:.4f}" for p in ppl) + f" | {'yes' if len(set(ppl)) == 1 else 'no'} |")


def _ram_gb() -> float:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("synthetic")
    s.add_argument("--dir", required=True, help="where the checkpoint is written (kept for reruns)")
    s.add_argument("--layers", type=int, default=32)
    s.add_argument("--methods", default="wanda50,gptq-w4g128")
    s.add_argument("--n", type=int, default=4)
    s.add_argument("--length", type=int, default=128)
    s.add_argument("--json", default=None)
    q = sub.add_parser("quarter")
    q.add_argument("--dir", required=True)
    q.add_argument("--methods", default="wanda50,gptq-w4g128")
    q.add_argument("--n", type=int, default=4)
    q.add_argument("--length", type=int, default=128)
    r = sub.add_parser("real")
    r.add_argument("--dir", default="/var/tmp/calibrant-streaming-real")
    r.add_argument("--models", default="smollm2-135m,gemma3-270m")
    r.add_argument("--max-tokens", type=int, default=16384)
    b = sub.add_parser("block")
    b.add_argument("--methods", default="wanda50,gptq-w4g128")
    b.add_argument("--n", type=int, default=4)
    b.add_argument("--length", type=int, default=128)
    for part in (s, q, b):
        part.add_argument("--small", action="store_true", help="a 16x narrower shape: a smoke test of the bench")
    c = sub.add_parser("_child")
    c.add_argument("--job", required=True)
    args = p.parse_args()
    if getattr(args, "small", False):
        SHAPE.update(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4)
    {"synthetic": synthetic, "quarter": quarter, "real": real, "block": block, "_child": child}[args.part](args)


if __name__ == "__main__":
    main()
