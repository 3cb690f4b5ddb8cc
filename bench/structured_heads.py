"""Would a finer attention search space pay? Uniform pruning of query heads inside each KV group, measured.

    .venv/bin/python bench/structured_heads.py --budgets 0.9,0.8

The structured search removes attention only in whole KV groups (a KV head and the query heads that read it).
A finer space would also let a block keep ``h`` of the ``n_heads / n_kv`` query heads of each group (the same
``h`` in every group, so grouped-query attention still runs: ``num_key_value_groups = h``). Before building
that space, this bench measures its uniform points: every block keeps ``g`` KV groups and ``h`` query heads per
group (each group's ``h`` best by the Wanda score of their o_proj input columns, ``Σ|W|·‖X‖``), and as many MLP
channels as the budget leaves (single channels, the full budget). Reported: kept fraction, the search's default
proxy (the last 2,048 tokens of wiki and news held-out, 1,024 each) and perplexity on the first ``--eval-tokens``
of wiki and news. Slicing is done here, by hand, on top of the search's pruner; nothing in calibrant changes.
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _structured import load_search_bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="0.9,0.8")
    ap.add_argument("--calibration", default="wiki:32x512")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    bench = load_search_bench(args.model, args.calibration, 0, args.batch_size, time_forward=False)
    lm, calib, streams = bench.lm, bench.calib, bench.streams
    from calibrant.evaluate.perplexity import perplexity
    from calibrant.methods.stats import LayerStats
    from calibrant.models.adapter import Adapter, inference_mode
    from calibrant.search import StructuredConfig
    from calibrant.search.importance import compute_importance
    from calibrant.search.pruner import StructuredPruner
    from calibrant.search.search import proxy_token_ids

    imp = compute_importance(lm.model, calib.input_ids, "wanda", model_hash=lm.model_hash,
                             calibration_hash=calib.hash, progress=False)
    adapter = Adapter(lm.model)
    # per-query-head scores: Σ|W_o|·‖X‖ over each head's o_proj input columns
    stats = [LayerStats(b.self_attn.o_proj.in_features, "sq_norms") for b in adapter.blocks]
    hooks = [b.self_attn.o_proj.register_forward_pre_hook(lambda _m, a, s=s: s.add(a[0].detach(), None))
             for b, s in zip(adapter.blocks, stats, strict=True)]
    try:
        with inference_mode(lm.model):
            for b in range(0, calib.input_ids.shape[0], args.batch_size):
                adapter.base(input_ids=calib.input_ids[b:b + args.batch_size])
    finally:
        for h in hooks:
            h.remove()
    pruner = StructuredPruner(lm.model, imp)
    shape = pruner.shape
    hd, r = shape.head_dim, shape.group_size
    head_scores = [(b.self_attn.o_proj.weight.float().abs().sum(0) * s.sq_norms.sqrt()).double()
                   .reshape(shape.n_heads, hd).sum(1) for b, s in zip(adapter.blocks, stats, strict=True)]
    proxy, _ = proxy_token_ids("wiki,news", lm.tokenizer, 2048, 512, progress=False)
    # one query head costs its q rows (and bias) and o_proj columns; one KV head its k and v rows (and biases)
    attn0 = adapter.blocks[0].self_attn
    q_cost = hd * (shape.hidden + (attn0.q_proj.bias is not None)) + hd * shape.hidden
    kv_cost = 2 * hd * (shape.hidden + (attn0.k_proj.bias is not None))
    total = shape.dense_block_params * shape.n_blocks

    @torch.no_grad()
    def apply(g: int, h: int, c: int) -> int:
        pruner.apply(StructuredConfig((g,) * shape.n_blocks, (c,) * shape.n_blocks))
        for i, block in enumerate(pruner.blocks):
            attn = block.self_attn
            attn.num_key_value_groups = h
            if h == r:
                continue
            heads = []
            for grp in imp.kept_groups(i, g).tolist():
                sc = head_scores[i][grp * r:(grp + 1) * r]
                heads.append(torch.sort(torch.sort(-sc, stable=True).indices[:h]).values + grp * r)
            cols = (torch.cat(heads)[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
            (q_w, q_b), o_w = pruner.dense[i]["q_proj"], pruner.dense[i]["o_proj"][0]
            attn.q_proj.weight = torch.nn.Parameter(q_w.index_select(0, cols), requires_grad=False)
            if q_b is not None:
                attn.q_proj.bias = torch.nn.Parameter(q_b.index_select(0, cols), requires_grad=False)
            attn.o_proj.weight = torch.nn.Parameter(o_w.index_select(1, cols), requires_grad=False)
            attn.q_proj.out_features = attn.o_proj.in_features = cols.numel()
        return sum(p.numel() for block in pruner.blocks for p in block.parameters())

    print(f"## Uniform query-head pruning inside KV groups — {args.model}\n")
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; started {started}. "
          f"Wanda importance from {args.calibration} (hash {calib.hash}); proxy: the last 2,048 tokens of wiki and "
          f"news held-out; ppl: first {args.eval_tokens} tokens of each.\n")
    print("| budget | KV groups | query heads per group | MLP channels | kept | proxy ppl | wiki ppl | news ppl |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for budget in [float(b) for b in args.budgets.split(",")]:
        allowed = math.floor(budget * total) // shape.n_blocks
        for g, h in ((shape.n_kv, r), (shape.n_kv, r - 1), (shape.n_kv - 1, r)):
            c = (allowed - shape.fixed - g * kv_cost - g * h * q_cost) // shape.per_channel
            if not 1 <= c <= shape.intermediate:
                continue
            kept = apply(g, h, int(c)) / total
            row = [perplexity(lm.model, proxy, batch_size=args.batch_size, progress=False).ppl]
            row += [perplexity(lm.model, s, max_tokens=args.eval_tokens, batch_size=args.batch_size,
                               progress=False).ppl for s in streams.values()]
            print(f"| {budget:g} | {g} | {h} | {c} | {kept:.4f} | " + " | ".join(f"{x:.3f}" for x in row) + " |",
                  flush=True)
    pruner.restore()
    for block in pruner.blocks:
        block.self_attn.num_key_value_groups = r
    print(f"\npeak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
