"""How ``n`` rows of ``L`` tokens are drawn from a tokenized source; pure functions of the ids and a seeded
``torch.Generator``, so the same inputs give the same rows on every machine.

- :func:`random_windows` (``windows``, the default): start offsets uniform over the documents joined into
  one stream (with the joiner between them), with replacement; a window may span a document boundary.
- :func:`document_windows` (``docs``): pick a document uniformly among those holding at least ``L`` tokens,
  then a start uniformly inside it, with replacement: a window never crosses a document boundary, as in
  the reference C4 loaders of GPTQ/SparseGPT/Wanda (which redraw a document until it is long enough).
- :func:`packed_documents` (``packed``): whole documents in a seeded random order (without replacement),
  joined by the joiner and cut into consecutive rows, as pre-training packs them; every token is used at
  most once and a document continues on the next row when a row fills up.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from calibrant.errors import CalibrationError


def random_windows(flat: np.ndarray, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` windows of ``seq_len`` consecutive ids, starts uniform over ``[0, len(flat) - seq_len]``."""
    total = int(flat.size)
    starts = torch.randint(0, total - seq_len + 1, (n,), generator=gen, dtype=torch.long)
    flat_t = torch.from_numpy(flat.astype(np.int64))
    return flat_t[starts.unsqueeze(1) + torch.arange(seq_len).unsqueeze(0)]


def document_windows(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n: int, seq_len: int,
                     gen: torch.Generator, what: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """``n`` windows each inside one document of at least ``seq_len`` tokens (documents drawn uniformly)."""
    eligible = np.flatnonzero(lengths >= seq_len)
    if eligible.size == 0:
        longest = int(lengths.max()) if lengths.size else 0
        raise CalibrationError(f"no document of {what} holds L={seq_len} tokens (the longest has {longest}), so "
                               f"document-bounded windows are impossible; use L <= {longest}, or the sampling "
                               "'windows' (across documents) or 'packed'")
    pick = torch.randint(0, eligible.size, (n,), generator=gen, dtype=torch.long).numpy()
    docs = eligible[pick]
    room = lengths[docs] - seq_len + 1  # possible start offsets inside each chosen document
    u = torch.rand(n, generator=gen, dtype=torch.float64).numpy()
    offsets = np.minimum((u * room).astype(np.int64), room - 1)
    begin = torch.from_numpy(starts[docs] + offsets)
    flat_t = torch.from_numpy(flat.astype(np.int64))
    ids = flat_t[begin.unsqueeze(1) + torch.arange(seq_len).unsqueeze(0)]
    info = {"eligible_documents": int(eligible.size), "min_document_tokens": seq_len,
            "distinct_documents": int(np.unique(docs).size)}
    return ids, info


def packed_documents(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, joiner_ids: list[int], n: int,
                     seq_len: int, gen: torch.Generator, what: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Whole documents in a seeded random order, joined by ``joiner_ids``, cut into ``n`` rows of ``seq_len``."""
    need = n * seq_len
    available = int(lengths.sum()) + len(joiner_ids) * max(0, int((lengths > 0).sum()) - 1)
    if available < need:
        raise CalibrationError(f"{what} has {available} tokens, fewer than the n×L = {n}×{seq_len} = {need} "
                               "requested for packing (each token is used once); use a smaller n or L, a bigger "
                               "source, or the sampling 'windows' (which draws with replacement)")
    order = torch.randperm(lengths.size, generator=gen).numpy()
    pieces: list[np.ndarray] = []
    sep = np.asarray(joiner_ids, dtype=np.int32)
    got = used = 0
    for i in order:
        if lengths[i] == 0:
            continue
        if used:
            pieces.append(sep)
            got += sep.size
        pieces.append(flat[starts[i]:starts[i] + lengths[i]])
        got += int(lengths[i])
        used += 1
        if got >= need:
            break
    stream = np.concatenate(pieces)[:need].astype(np.int64)
    ids = torch.from_numpy(stream).reshape(n, seq_len)
    return ids, {"documents_used": used, "order": "seeded permutation of the documents"}
