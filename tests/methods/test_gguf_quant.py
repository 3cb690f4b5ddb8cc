"""GGUF block grids: llama.cpp's reference quantizer (the gguf package's numpy port) bit for bit; RTN and GPTQ on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from calibrant.errors import RecipeError
from calibrant.methods import LayerContext, LayerStats, make_method
from calibrant.methods.gptq import gptq_quantize
from calibrant.methods.quant import parse_scheme
from calibrant.methods.quant.ggufgrid import GGUF_TYPES, gguf_type, gguf_weight, recover_codes

TYPES = list(GGUF_TYPES)


def _reference(W: torch.Tensor, name: str) -> torch.Tensor:
    qtype = GGMLQuantizationType[name.upper()]
    return torch.from_numpy(dequantize(quantize(W.numpy().astype(np.float32), qtype), qtype)).reshape(W.shape)


def _hard_blocks(seed: int = 0) -> torch.Tensor:
    """Random blocks over many magnitudes plus all-zero, constant, tied (±v, x.5 after scaling), one-hot, tiny
    (scale underflows float16) and negative-maximum blocks."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 128, generator=g) * 10.0 ** torch.randint(-5, 3, (48, 1), generator=g)
    W[0] = 0
    W[1, :32] = 0.75
    W[2, :32] = torch.tensor([1.0, -1.0] * 16)
    W[3, :32] = torch.arange(32) / 2 - 8  # codes land on exact halves for q4_0
    W[4, :32] = 0
    W[4, 7] = -3.0
    W[5, :32] = torch.randn(32, generator=g) * 1e-9
    W[6, :32] = torch.round(torch.randn(32, generator=g) * 8) / 8
    W[7, 32:64] = -W[7, 32:64].abs()
    return W


@pytest.mark.parametrize("name", TYPES)
def test_rtn_grid_is_llama_cpps_reference_quantizer(name):
    for seed in range(3):
        W = _hard_blocks(seed)
        Wq, d16, m16 = gguf_weight(W, gguf_type(name))
        assert torch.equal(Wq, _reference(W, name)), seed
        assert torch.equal(d16, d16.half().float()) and torch.equal(m16, m16.half().float())
        assert recover_codes(Wq, d16, m16, gguf_type(name)) is not None


def _layer(rows=32, cols=128, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * torch.rand(cols, generator=g) * 3
    return W, X


def _stats(X):
    s = LayerStats(X.shape[1], ("hessian",))
    s.add(X)
    return s


@pytest.mark.parametrize("name", TYPES)
def test_rtn_and_gptq_land_on_the_grid_and_gptq_lowers_the_output_error(name):
    W, X = _layer()
    errs = {}
    for method in ("rtn", "gptq"):
        ctx = LayerContext("l")
        Wq = make_method(method, scheme=f"gguf-{name}").compress(W.clone(), _stats(X), ctx)
        state = ctx.quant
        assert state.scheme.name == f"gguf-{name}" and state.scale.shape == (32, 4)
        assert recover_codes(Wq, state.scale, state.zero, gguf_type(name)) is not None, method
        errs[method] = float(((W - Wq) @ X.T).square().sum())
    assert errs["gptq"] < 0.8 * errs["rtn"], errs


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("static_groups", [False, True])
def test_gptq_without_error_feedback_is_llama_cpps_rounding(name, static_groups):
    """``U = I``: no error reaches another column, so GPTQ must write exactly llama.cpp's own quantization."""
    W = _hard_blocks(1)[:16]
    Q, d16, m16, _ = gptq_quantize(W.clone(), torch.eye(128), parse_scheme(f"gguf-{name}"), blocksize=48,
                                   static_groups=static_groups)
    want, want_d, want_m = gguf_weight(W, gguf_type(name))
    assert torch.equal(Q, want) and torch.equal(d16, want_d) and torch.equal(m16, want_m)


def test_gptq_float64_solve_stays_on_the_grid():
    W, X = _layer(rows=8, cols=64)
    ctx = LayerContext("l")
    Wq = make_method("gptq", scheme="gguf-q4_1", precision="float64").compress(W.clone(), _stats(X), ctx)
    assert Wq.dtype == torch.float32
    assert recover_codes(Wq, ctx.quant.scale, ctx.quant.zero, gguf_type("q4_1")) is not None


def test_pruned_weights_stay_zero_and_affine_grids_refuse_masks():
    W, X = _layer(rows=8, cols=64)
    mask = torch.rand(8, 64, generator=torch.Generator().manual_seed(1)) < 0.5
    for method in ("rtn", "gptq"):
        ctx = LayerContext("l", mask=mask)
        Wq = make_method(method, scheme="gguf-q4_0").compress(W.clone(), _stats(X), ctx)
        assert torch.all(Wq[mask] == 0), method
        with pytest.raises(RecipeError, match="gguf-q4_0, gguf-q5_0 or gguf-q8_0"):
            make_method(method, scheme="gguf-q5_1").compress(W.clone(), _stats(X), LayerContext("l", mask=mask))


def test_scheme_strings_and_refusals():
    s = parse_scheme("gguf-q4_1")
    assert (s.bits, s.group_size, s.symmetric, s.name) == (4, 32, False, "gguf-q4_1")
    assert parse_scheme(s.name) == s
    assert [parse_scheme(f"gguf-{t}").effective_bits((64, 64)) for t in TYPES] == [4.5, 5.0, 5.5, 6.0, 8.5]
    with pytest.raises(RecipeError, match=r"blocks of 32.*not group size 128; write 'gguf-q4_0'"):
        parse_scheme("gguf-q4_0g128")
    with pytest.raises(RecipeError, match="not channel scales"):
        parse_scheme("gguf-q8_0-channel")
    with pytest.raises(RecipeError, match="unknown GGUF type.*gguf-q4_0, gguf-q4_1"):
        parse_scheme("gguf-q4_k")
    with pytest.raises(RecipeError, match="symmetric by definition"):
        parse_scheme("gguf-q4_0-asym")
    with pytest.raises(RecipeError, match="--static-groups"):
        make_method("gptq", scheme="gguf-q4_0", act_order=True)
    rtn = make_method("rtn", scheme="gguf-q8_0")  # a width the blocks cannot hold: left unquantized, with the reason
    assert rtn.fallback("mlp.down_proj", (16, 48)) == "48 inputs are not a multiple of gguf-q8_0's blocks of 32"
    assert rtn.fallback("mlp.down_proj", (16, 64)) is None
