"""Quantization grids, RTN and GPTQ against brute-force references on small matrices."""

from __future__ import annotations

import pytest
import torch

from calibrant.errors import RecipeError
from calibrant.methods import LayerContext, LayerStats, make_method, make_recipe
from calibrant.methods.gptq import gptq_quantize
from calibrant.methods.quant import QuantScheme, fake_quant_weight, parse_scheme, qrange


def _stats(X):
    s = LayerStats(X.shape[1], "hessian")
    s.add(X)
    return s


def _layer(rows=16, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * torch.rand(cols, generator=g) * 3
    return W, X


def _err(W, Wq, X):
    return float(((W - Wq) @ X.T).square().sum())


@pytest.mark.parametrize("scheme", ["w4g8", "w3g8-asym", "w8-channel", "w2-tensor", "w4g6", "w5g8-asym"])
def test_round_trip_is_exact_on_grid_values(scheme):
    s = parse_scheme(scheme)
    lo, hi = qrange(s.bits, s.symmetric)
    rows, cols = 5, 20
    g = torch.Generator().manual_seed(1)
    width = cols if s.granularity != "group" else s.group_size
    starts = [0] if s.granularity == "tensor" else list(range(0, cols, width))
    scale = torch.rand(rows, len(starts), generator=g) + 0.1
    zero = torch.zeros_like(scale) if s.symmetric else torch.randint(1, hi, (rows, len(starts)), generator=g).float()
    if s.granularity == "tensor":
        scale, zero = scale[:1].expand(rows, 1), zero[:1].expand(rows, 1)
    qlo = lo if not s.symmetric else -hi  # the symmetric grid is the restricted range [-hi, hi]
    q = torch.randint(qlo, hi + 1, (rows, cols), generator=g).float()
    for a in starts:  # make each group span its whole grid so the derived scale is exact
        b = min(a + width, cols)
        r = slice(None) if s.granularity != "tensor" else slice(0, 1)
        q[r, a] = qlo
        q[r, b - 1] = hi
    sc = torch.repeat_interleave(scale, torch.tensor([min(a + width, cols) - a for a in starts]), 1)
    ze = torch.repeat_interleave(zero, torch.tensor([min(a + width, cols) - a for a in starts]), 1)
    W = (q - ze) * sc
    Wq, s_out, z_out = fake_quant_weight(W, s)
    torch.testing.assert_close(Wq, W, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z_out, zero)


def test_short_last_group_gets_its_own_scale():
    W = torch.randn(3, 20)
    W[:, 16:] *= 10  # the short last group (4 columns of a g8 layout) has a much larger range
    _, scale, _ = fake_quant_weight(W, parse_scheme("w4g8"))
    assert scale.shape == (3, 3)
    torch.testing.assert_close(scale[:, 2], W[:, 16:].abs().amax(1) / 7)
    torch.testing.assert_close(scale[:, 0], W[:, :8].abs().amax(1) / 7)


@pytest.mark.parametrize("scheme", ["w4g16", "w3g16", "w4-channel", "w3g16-asym", "w4g12"])
def test_gptq_beats_rtn_on_layer_output(scheme):
    W, X = _layer()
    rtn = make_method("rtn", scheme=scheme).compress(W.clone(), None, LayerContext("l"))
    gptq = make_method("gptq", scheme=scheme).compress(W.clone(), _stats(X), LayerContext("l"))
    assert _err(W, gptq, X) < 0.8 * _err(W, rtn, X)


def _gptq_reference(W, H, scheme):
    """Sequential OBS quantization in float64 with explicit inverses (per-channel grid fixed up front)."""
    W = W.double().clone()
    _, scale, zero = fake_quant_weight(W.float(), scheme)
    lo, hi = qrange(scheme.bits, scheme.symmetric)
    scale, zero = scale.double()[:, 0], zero.double()[:, 0]
    for i in range(W.shape[1]):
        Hinv = torch.linalg.inv(H[i:, i:])
        q = (torch.clamp(torch.round(W[:, i] / scale) + zero, lo, hi) - zero) * scale
        W[:, i:] -= ((W[:, i] - q) / Hinv[0, 0]).unsqueeze(1) * Hinv[0].unsqueeze(0)
        W[:, i] = q
    return W


def test_gptq_matches_explicit_obs_reference_with_lazy_blocks():
    W, X = _layer(rows=6, cols=16, tokens=300, seed=2)
    H = X.double().T @ X.double() / 300 + 0.01 * torch.eye(16, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True).float()
    scheme = parse_scheme("w3-channel")
    ours, *_ = gptq_quantize(W, U, scheme, blocksize=4)
    torch.testing.assert_close(ours.double(), _gptq_reference(W, H, scheme), atol=1e-4, rtol=1e-4)


def _gptq_grouped_reference(W, H, scheme):
    """Sequential OBS in float64 with on-the-fly groups: a group's grid comes from its columns as they are
    when the group's first column is reached (after every earlier column's error has been spread)."""
    from calibrant.methods.quant import qparams

    W = W.double().clone()
    lo, hi = qrange(scheme.bits, scheme.symmetric)
    g = scheme.group_size
    for i in range(W.shape[1]):
        if i % g == 0:
            scale, zero = qparams(W[:, i : i + g].float(), scheme.bits, scheme.symmetric)
            scale, zero = scale.double(), zero.double()
        Hinv = torch.linalg.inv(H[i:, i:])
        q = (torch.clamp(torch.round(W[:, i] / scale) + zero, lo, hi) - zero) * scale
        W[:, i:] -= ((W[:, i] - q) / Hinv[0, 0]).unsqueeze(1) * Hinv[0].unsqueeze(0)
        W[:, i] = q
    return W


@pytest.mark.parametrize("scheme, blocksize", [("w4g20-asym", 64), ("w3g24", 48), ("w4g100", 128)])
def test_gptq_grouped_matches_reference_across_slices_and_blocks(scheme, blocksize):
    """100 columns: several lazy blocks, 32-column rank-1 slices, and groups that start inside a slice."""
    W, X = _layer(rows=5, cols=100, tokens=600, seed=3)
    H = X.double().T @ X.double() / 600
    H += 0.01 * torch.diagonal(H).mean() * torch.eye(100, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True).float()
    parsed = parse_scheme(scheme)
    ours, *_ = gptq_quantize(W, U, parsed, blocksize=blocksize)
    torch.testing.assert_close(ours.double(), _gptq_grouped_reference(W, H, parsed), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("act_order", [False, True])
def test_inverse_cholesky_factor_matches_explicit_inverse(act_order):
    from calibrant.methods.hessian import damped_inverse_cholesky

    _, X = _layer(cols=40, tokens=300, seed=5)
    X[:, 7] = 0.0  # a dead input
    stats = _stats(X)
    perm = torch.argsort(torch.diagonal(stats.hessian), descending=True) if act_order else None
    U, dead, damp = damped_inverse_cholesky(stats, 0.01, "layer", perm)
    H = stats.hessian.double() / stats.tokens
    H[7, 7] = 1.0
    if perm is not None:
        H = H[perm][:, perm]
    H += 0.01 * torch.diagonal(H).mean() * torch.eye(40, dtype=torch.float64)
    assert dead.nonzero().flatten().tolist() == [7] and damp == 0.01
    assert torch.equal(U, torch.triu(U)) and bool((torch.diagonal(U) > 0).all())
    torch.testing.assert_close(U.double().T @ U.double(), torch.linalg.inv(H), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scheme, static", [("w4-channel", False), ("w4g8", True)])
def test_act_order_permutation_is_undone(scheme, static):
    """On a diagonal Hessian no error propagates, so act-order must give exactly the in-order result."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(8, 32, generator=g)
    X = torch.randn(256, 32, generator=g) * torch.linspace(0.1, 3, 32)
    stats = LayerStats(32, "hessian")
    stats.hessian = torch.diag((X * X).sum(0))
    stats.tokens = 256
    plain = make_method("gptq", scheme=scheme, static_groups=static).compress(W.clone(), stats, LayerContext("a"))
    ordered = make_method("gptq", scheme=scheme, act_order=True, static_groups=static)
    out = ordered.compress(W.clone(), stats, ctx := LayerContext("b"))
    torch.testing.assert_close(out, plain)
    assert not ctx.quant.act_order  # static groups keep contiguous groups


def test_act_order_without_static_groups_records_g_idx():
    W, X = _layer(rows=8, cols=32)
    ctx = LayerContext("l")
    make_method("gptq", scheme="w4g8", act_order=True).compress(W, _stats(X), ctx)
    g_idx = ctx.quant.g_idx
    assert ctx.quant.act_order and sorted(torch.bincount(g_idx).tolist()) == [8, 8, 8, 8]
    assert not torch.equal(g_idx, torch.arange(32) // 8)


def test_mask_survives_gptq_and_rtn():
    W, X = _layer(rows=16, cols=64)
    for recipe in ("sparsegpt+gptq", "wanda+rtn"):
        methods = make_recipe(recipe, pattern="2:4", scheme="w4g16")
        ctx, w = LayerContext("l"), W.clone()
        st = _stats(X) if recipe.startswith("sparsegpt") else None
        for m in methods:
            stats = st if "hessian" in m.statistics else None
            if "sq_norms" in m.statistics:
                stats = LayerStats(64, "sq_norms")
                stats.add(X)
            w = m.compress(w, stats, ctx)
        assert int((w.reshape(16, -1, 4) != 0).sum(-1).max()) <= 2
        assert torch.equal(w == 0, ctx.mask | (w == 0)) and int(ctx.mask.sum()) == W.numel() // 2


def test_grouped_solve_equals_one_by_one():
    W, X = _layer(rows=24, cols=32)
    st = _stats(X)
    m = make_method("gptq", scheme="w4g8")
    parts = [W[:8].clone(), W[8:20].clone(), W[20:].clone()]
    together = m.compress_group([p.clone() for p in parts], st, [LayerContext(str(i)) for i in range(3)])
    alone = [m.compress(p.clone(), st, LayerContext("x")) for p in parts]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b)


def test_lorc_reduces_error_and_counts_bits():
    W, X = _layer(rows=32, cols=64)
    plain = make_method("rtn", scheme="w3g16").compress(W.clone(), None, LayerContext("l"))
    with_lorc = make_method("rtn", scheme="w3g16+lorc8").compress(W.clone(), None, LayerContext("l"))
    assert (W - with_lorc).norm() < (W - plain).norm()
    s = parse_scheme("w3g16+lorc8")
    assert s.effective_bits((32, 64)) == pytest.approx(3 + 16 / 16 + 16 * 8 * 96 / (32 * 64))


def test_effective_bits_short_last_group():
    # 576 columns in groups of 128: 5 groups (the last has 64 columns), each with a 16-bit scale
    assert parse_scheme("w4g128").effective_bits((10, 576)) == pytest.approx(4 + 5 * 16 / 576)
    assert parse_scheme("w4g64-asym").effective_bits((10, 576)) == pytest.approx(4 + 9 * 20 / 576)


@pytest.mark.parametrize(
    "text, match",
    [("w9g128", "outside 2–8"), ("w1", "outside 2–8"), ("w4g0", "≥ 1"), ("w4a2", "activation bits"),
     ("w4g128x", "Did you mean 'w4g128'"), ("w4-sym-asym", "pick one")],
)
def test_bad_schemes(text, match):
    with pytest.raises(RecipeError, match=match):
        parse_scheme(text)


def test_scheme_names_round_trip():
    for text in ["w4g128", "w4g64-asym", "w8-channel", "w8a8", "w3g64+lorc8", "w4a8tg32-asym-mse"]:
        s = parse_scheme(text)
        assert parse_scheme(s.name) == s and isinstance(s, QuantScheme)


def test_option_it_cannot_serve():
    with pytest.raises(RecipeError, match="static groups need a group-wise scheme"):
        make_method("gptq", scheme="w4-channel", static_groups=True)
    with pytest.raises(RecipeError, match="method 'rtn' does not take 'act_order' \\(it takes scheme\\)"):
        make_recipe("rtn", scheme="w4g128", act_order=True)


@pytest.mark.parametrize("scheme, act_order, static, masked", [
    ("w4g8", False, False, False), ("w3g8-asym", True, False, False), ("w4g8", True, True, True),
    ("w4-channel", True, False, False), ("w2-tensor", False, False, True),
])
def test_gptq_obs_loss_is_the_layer_error(scheme, act_order, static, masked):
    """The error GPTQ reports from its own loop equals ‖(W − Ŵ)X‖² computed from scratch in float64,
    with a dead input column and damping taken out."""
    W, X = _layer(rows=12, cols=48, tokens=400, seed=7)
    X[:, 5] = 0.0  # a dead input: its weights are zeroed, and its H_jj = 1 must not leak into the error
    ctx = LayerContext("l")
    if masked:
        ctx.mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(2)) < 0.5
        W = W.masked_fill(ctx.mask, 0.0)
    method = make_method("gptq", scheme=scheme, act_order=act_order, static_groups=static, damp=0.05)
    out = method.compress(W.clone(), _stats(X), ctx)
    exact = ((W.double() - out.double()) @ X.double().T).square().sum()
    assert ctx.sq_error == pytest.approx(float(exact), rel=1e-5)  # without the λ term: 17–28 % off


def test_engine_rel_error_from_the_obs_loss_matches_the_gemm():
    from calibrant.engine.pipelines import rel_error as _rel_error

    W, X = _layer(rows=10, cols=40, tokens=300, seed=9)
    stats, ctx = _stats(X), LayerContext("l")
    out = make_method("gptq", scheme="w3g8").compress(W.clone(), stats, ctx)
    assert ctx.sq_error is not None
    assert _rel_error(W, out, stats, ctx.sq_error) == pytest.approx(_rel_error(W, out, stats), rel=1e-4)

