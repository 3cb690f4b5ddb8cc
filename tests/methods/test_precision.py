"""The solvers' ``precision`` option: float64 solves do not depend on the lazy-batch block size."""

from __future__ import annotations

import pytest
import torch

from calibrant.errors import RecipeError
from calibrant.methods import make_method
from calibrant.methods.base import LayerContext, LayerStats
from calibrant.methods.gptq import gptq_quantize
from calibrant.methods.hessian import damped_inverse_cholesky
from calibrant.methods.quant import parse_scheme
from calibrant.methods.sparsegpt import sparsegpt_prune

BLOCKSIZES = (32, 64, 128, 256)


def gptq_by_blocksize(W: torch.Tensor, st: LayerStats, dtype: torch.dtype) -> list[torch.Tensor]:
    U, _, _ = damped_inverse_cholesky(st, 0.01, "layer", dtype=dtype)
    scheme = parse_scheme("w4g64")
    return [gptq_quantize(W.to(dtype), U, scheme, blocksize=b, out_dtype=torch.float32)[0] for b in BLOCKSIZES]


@pytest.mark.slow
def test_float64_gptq_and_sparsegpt_are_blocksize_invariant_on_a_real_layer():
    from calibrant.calibration import make_calibration
    from calibrant.models import load_model

    lm = load_model("smollm2-135m", quiet=True)
    ids = make_calibration("wiki:8x128", lm.tokenizer, seed=0, progress=False).input_ids
    module = lm.model.model.layers[3].mlp.down_proj
    st = LayerStats(module.in_features, "hessian")
    handle = module.register_forward_pre_hook(lambda mod, args: st.add(args[0]))
    with torch.no_grad():
        lm.model.model(input_ids=ids)
    handle.remove()
    W = module.weight.data.clone()

    q64 = gptq_by_blocksize(W, st, torch.float64)
    assert all(torch.equal(q64[0], q) for q in q64[1:])
    U64, _, _ = damped_inverse_cholesky(st, 0.01, "layer", dtype=torch.float64)
    # N:M masks are chosen per group of M columns (unstructured masks per lazy block, by design)
    pruned = [sparsegpt_prune(W.double(), U64, 0.5, nm=(2, 4), blocksize=b)[0] for b in (64, 128)]
    assert torch.equal(pruned[0].float(), pruned[1].float())
    # float32 solves follow their order of operations: blocksizes change some weights, not the layer error
    q32 = gptq_by_blocksize(W, st, torch.float32)
    H = st.hessian.double()
    errors = [float(((W - q).double() @ H * (W - q).double()).sum()) for q in (*q32, q64[0])]
    assert max(errors) / min(errors) < 1.05


def test_float64_gptq_is_blocksize_invariant_on_random_layers():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 96, generator=g) * torch.rand(96, generator=g) * 3
    st = LayerStats(96, "hessian")
    st.add(X)
    W = torch.randn(40, 96, generator=g)
    q64 = gptq_by_blocksize(W, st, torch.float64)
    assert all(torch.equal(q64[0], q) for q in q64[1:])


def test_precision_is_validated_and_recorded():
    with pytest.raises(RecipeError, match="precision must be one of float32, float64"):
        make_method("gptq", precision="float16")
    gptq = make_method("gptq", scheme="w4g16", precision="float64")
    assert gptq.params()["precision"] == "float64"
    g = torch.Generator().manual_seed(1)
    st = LayerStats(32, "hessian")
    st.add(torch.randn(256, 32, generator=g))
    W = torch.randn(8, 32, generator=g)
    ctx = LayerContext("layer")
    Q = gptq.compress(W.clone(), st, ctx)
    assert Q.dtype == torch.float32
    scale = ctx.quant.scale.repeat_interleave(16, 1)  # the float32 weights sit exactly on their float32 grid
    assert torch.equal(Q, (Q / scale).round() * scale)
