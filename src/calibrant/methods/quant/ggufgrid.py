"""GGUF's block grids (llama.cpp's legacy types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), bit for bit.

Each row of a weight ``[out, in]`` is cut into blocks of 32 consecutive inputs; a block stores a float16
scale ``d`` (and, for the ``_1`` types, a float16 minimum ``m``) and one small integer per weight. The
rounding follows llama.cpp's reference quantizer (``ggml-quants.c``, mirrored by the ``gguf`` package's
``quants.py``), all in float32, so that round-to-nearest here writes the codes llama.cpp itself would:

- ``q4_0`` / ``q5_0`` (``h`` = 8 / 16): ``d = v / −h`` with ``v`` the signed value of largest ``|x|`` (the
  first one on ties), ``q = clamp(trunc(x · (1/d) + h + ½), 0, 2h − 1)``, value ``(q − h) · f16(d)``;
- ``q4_1`` / ``q5_1`` (``n`` = 15 / 31): ``d = (max − min) / n``, ``q = clamp(trunc((x − min) · (1/d) + ½), 0, n)``,
  value ``q · f16(d) + f16(min)``;
- ``q8_0``: ``d = max|x| / 127``, ``q = round-half-away(x · (1/d))``, value ``q · f16(d)``.

``1/d`` is taken of the unrounded ``d`` (0 when ``d`` is 0), as the reference does; the value uses the
stored float16 ``d``, so the fake-quant weight is exactly what a GGUF reader dequantizes. The codes of
the symmetric types are kept centred (``q − h``), so that 0 is code 0 as on the integer grids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GGUF_BLOCK = 32
GGUF_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


@dataclass(frozen=True)
class GGUFType:
    name: str
    bits: int
    affine: bool  # a stored minimum (q4_1, q5_1)

    @property
    def levels(self) -> int:
        """Largest code of the affine types; for the symmetric ones ``h`` of ``q − h`` (q8_0: 127, no offset)."""
        if self.name == "q8_0":
            return 127
        return 2**self.bits - 1 if self.affine else 2 ** (self.bits - 1)

    @property
    def bits_per_weight(self) -> float:
        """What a block takes on disk per weight: codes plus float16 scale (and minimum)."""
        return self.bits + 16 * (2 if self.affine else 1) / GGUF_BLOCK


def gguf_type(name: str) -> GGUFType:
    name = name.lower().removeprefix("gguf-")
    return GGUFType(name, int(name[1]), name.endswith("_1"))


@dataclass
class BlockGrid:
    """One block's parameters per row: the reciprocal used for rounding, the stored scale and minimum, the
    raw minimum the codes are taken from (affine types). All float32 ``[rows]``."""

    inv: torch.Tensor
    d16: torch.Tensor
    m16: torch.Tensor
    mn: torch.Tensor


def _recip(d: torch.Tensor) -> torch.Tensor:
    # a tensor division (correctly rounded, as C's 1.0f/d); 0 where d is 0
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / safe)


def _f16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def block_grid(x: torch.Tensor, kind: GGUFType) -> BlockGrid:
    """Parameters of the blocks ``x`` ``[rows, k]`` (one block per row; ``k`` ≤ 32), from float32 values."""
    x = x.to(torch.float32)
    zeros = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    if kind.affine:
        mx, mn = x.amax(dim=1), x.amin(dim=1)
        d = (mx - mn) / torch.full_like(mx, float(kind.levels))
        return BlockGrid(_recip(d), _f16(d), _f16(mn), mn)
    if kind.name == "q8_0":
        d = x.abs().amax(dim=1) / torch.full_like(zeros, 127.0)
        return BlockGrid(_recip(d), _f16(d), zeros, zeros)
    v = x.gather(1, x.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    d = v / -float(kind.levels)  # a power of two: exact
    return BlockGrid(_recip(d), _f16(d), zeros, zeros)


def block_codes(x: torch.Tensor, grid: BlockGrid, kind: GGUFType) -> torch.Tensor:
    """Codes (float32) of ``x`` ``[rows, k]`` under per-row ``grid``: ``q − h`` for the symmetric types, ``q``
    for the affine ones. ``x`` may be a column ``[rows]`` (GPTQ), with ``grid`` per row."""
    x = x.to(torch.float32)
    col = x.dim() == 1
    inv = grid.inv if col else grid.inv[:, None]
    if kind.affine:
        mn = grid.mn if col else grid.mn[:, None]
        return torch.trunc((x - mn) * inv + 0.5).clamp_(0, kind.levels)
    t = x * inv
    if kind.name == "q8_0":  # round half away from zero, as llama.cpp's roundf (exact for |t| < 2^23)
        a = t.abs()
        fl = torch.floor(a)
        return torch.copysign(fl + torch.floor(2 * (a - fl)), t).clamp_(-127, 127)
    h = kind.levels
    return torch.trunc(t + (h + 0.5)).clamp_(0, 2 * h - 1) - h


def block_values(codes: torch.Tensor, grid: BlockGrid, kind: GGUFType) -> torch.Tensor:
    """Dequantized float32 values of ``codes`` as a GGUF reader forms them (``d·q`` then ``+ m``, no FMA)."""
    col = codes.dim() == 1
    d16 = grid.d16 if col else grid.d16[:, None]
    out = codes.to(torch.float32) * d16
    if kind.affine:
        out = out + (grid.m16 if col else grid.m16[:, None])
    return out


def gguf_weight(W: torch.Tensor, kind: GGUFType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of ``W`` ``[rows, cols]`` on ``kind``'s grid, exactly as llama.cpp's reference quantizer:
    (``ŵ`` float32, stored scales ``[rows, cols / 32]``, stored minima (zeros for the symmetric types)).
    ``cols`` must be a multiple of 32."""
    rows, cols = W.shape
    assert cols % GGUF_BLOCK == 0, cols
    blocks = W.to(torch.float32).reshape(rows * (cols // GGUF_BLOCK), GGUF_BLOCK)
    grid = block_grid(blocks, kind)
    values = block_values(block_codes(blocks, grid, kind), grid, kind)
    return values.reshape(rows, cols), grid.d16.reshape(rows, -1), grid.m16.reshape(rows, -1)


def recover_codes(W: torch.Tensor, d16: torch.Tensor, m16: torch.Tensor, kind: GGUFType) -> torch.Tensor | None:
    """Codes ``[rows, cols]`` (int64; ``q − h`` for symmetric types) that dequantize exactly to ``W`` under the
    stored scales/minima ``[rows, cols / 32]``, or None if ``W`` is not on that grid."""
    rows, cols = W.shape
    Wf = W.to(torch.float32)
    d = torch.repeat_interleave(d16.to(torch.float32), GGUF_BLOCK, dim=1)
    m = torch.repeat_interleave(m16.to(torch.float32), GGUF_BLOCK, dim=1)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.where(d == 0, torch.zeros_like(d), ((Wf.double() - m.double()) / safe.double()).round().float())
    lo, hi = (0, kind.levels) if kind.affine else (-127, 127) if kind.name == "q8_0" else (-kind.levels,
                                                                                           kind.levels - 1)

    def values(c: torch.Tensor) -> torch.Tensor:
        v = c * d
        return v + m if kind.affine else v

    q = q.clamp(lo, hi)
    bad = values(q) != Wf
    for step in (-1.0, 1.0):  # float32 rounding of d·q + m can make the nearest code a neighbour
        if not bool(bad.any()):
            break
        alt = (q + step).clamp(lo, hi)
        fix = bad & (values(alt) == Wf)
        q = torch.where(fix, alt, q)
        bad = bad & ~fix
    return None if bool(bad.any()) else q.to(torch.int64)
