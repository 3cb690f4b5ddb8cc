"""Perplexity of a model larger than memory: the evaluation windows run block by block.

The windows are those of :func:`calibrant.evaluate.perplexity.perplexity` (same protocol, same batches).
They go through the model in chunks: the embeddings of a chunk's windows are captured, then each decoder
block is read from the checkpoint, run over the whole chunk and released, and the model's own forward
finishes each batch from the last block's output (final norm, LM head and whatever else the family
applies), so the logits are the ones an in-memory forward gives: blocks are computed on in float32, as an
in-memory load computes, whatever the checkpoint's dtype. Each chunk reads the model once; its size follows
``max_activation_bytes`` (two float32 ``[windows, L, hidden]`` buffers).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from calibrant.engine.runner import BlockwiseRunner
from calibrant.errors import CalibrantError, NumericalError
from calibrant.evaluate.perplexity import PerplexityResult, bounded_batch, group_windows, windows
from calibrant.models.adapter import Adapter, inference_mode
from calibrant.models.lazy import LazyCheckpoint, Materializer, skeleton


class _Replay(nn.Module):
    """Stands in for block 0 when the model's forward finishes a batch: returns the last block's output."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor):
        super().__init__()
        self.block = block
        self.hidden = hidden

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.hidden

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


class _Identity(_Replay):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@torch.no_grad()
def streamed_perplexity(model_dir: str | Path, token_ids: torch.Tensor, *, seq_len: int = 512, stride: int | None = None,
                        batch_size: int = 8, max_tokens: int | None = None, max_activation_bytes: int = 1 << 30,
                        progress: bool = True, meta: dict[str, Any] | None = None) -> PerplexityResult:
    """Perplexity of the model in ``model_dir`` (safetensors), streamed block by block (module docstring)."""
    checkpoint = LazyCheckpoint(model_dir)
    model = skeleton(model_dir, torch.float32)  # computed in float32, as an in-memory load computes
    stride = seq_len if stride is None else stride
    context = getattr(model.config, "max_position_embeddings", None)
    if seq_len < 2 or (context and seq_len > context) or not 0 < stride <= seq_len:
        raise CalibrantError(f"evaluation length {seq_len} / stride {stride} do not fit the model (context "
                             f"{context}); use 2 <= seq_len <= context and 1 <= stride <= seq_len")
    ids = token_ids.reshape(-1).long()[:max_tokens]
    if ids.numel() < 2:
        raise CalibrantError("the evaluation text has fewer than 2 tokens; use a longer corpus")
    adapter = Adapter(model)
    materializer = Materializer(model, checkpoint, dtype=torch.float32)
    family = adapter.family
    rest = [*family.embeddings, *([family.final_norm] if family.final_norm else []), family.lm_head]
    for prefix in rest:
        materializer.load(prefix)
    spans = windows(ids.numel(), seq_len, stride)
    batch = bounded_batch(model, seq_len, batch_size)
    hidden = int(model.config.hidden_size)
    per_window = 2 * seq_len * hidden * 4
    chunk = max(batch, max_activation_bytes // per_window // batch * batch)
    chunks = group_windows(spans, chunk)  # the tail window, shorter, is its own chunk
    total_nll = torch.zeros((), dtype=torch.float64)
    scored = 0
    start = time.perf_counter()
    n_blocks = len(adapter.blocks)
    bar = tqdm(total=len(chunks) * n_blocks, desc=f"perplexity {(meta or {}).get('corpus', '')} (streamed)",
               unit="block", disable=not progress)
    with inference_mode(model), bar:
        for group in chunks:
            rows = torch.stack([ids[b:e] for b, e, _ in group])
            runner = BlockwiseRunner(model, batch_size=batch)
            inps = runner.capture(rows)
            outs = torch.empty_like(inps)
            for i in range(n_blocks):
                materializer.load(f"{adapter.block_prefix}.{i}", i)
                runner.run_block(i, inps, outs)
                materializer.release(f"{adapter.block_prefix}.{i}", i)
                inps, outs = outs, inps
                bar.update(1)
            del outs
            originals = list(adapter.blocks)
            try:
                for b0, b1 in runner.batches(rows.shape[0]):
                    adapter.blocks[0] = _Replay(originals[0], inps[b0:b1])
                    for i in range(1, n_blocks):
                        adapter.blocks[i] = _Identity(originals[i], inps[b0:b1])
                    logits = model(input_ids=rows[b0:b1]).logits
                    for row, (b, _e, first) in enumerate(group[b0:b1]):
                        lo = first - b - 1
                        part = F.cross_entropy(logits[row, lo:-1].float(), rows[b0 + row, lo + 1:], reduction="none")
                        total_nll += part.double().sum()
                        scored += part.numel()
                    del logits
            finally:
                for i, block in enumerate(originals):
                    adapter.blocks[i] = block
            del inps
            if progress and scored:
                bar.set_postfix(ppl=f"{math.exp(total_nll.item() / scored):.2f}")
    mean = total_nll.item() / scored
    if not math.isfinite(mean):
        raise NumericalError("perplexity is NaN/Inf: the model produces non-finite logits on this text")
    if progress:
        print(f"calibrant: streamed perplexity read the model {len(chunks)} time(s), "
              f"{len(spans)} windows in chunks of up to {chunk}", file=sys.stderr)
    protocol = {"seq_len": seq_len, "stride": stride, "windows": len(spans), "tail": "included", "bos": "none added",
                "stream_tokens": ids.numel(), "streamed": {"chunks": len(chunks), "windows_per_chunk": chunk},
                **(meta or {})}
    return PerplexityResult(math.exp(mean), mean, scored, protocol, time.perf_counter() - start)
