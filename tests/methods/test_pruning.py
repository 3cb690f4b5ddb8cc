"""Pruning maths against brute-force references on small matrices."""

from __future__ import annotations

import pytest
import torch

from calibrant.errors import NumericalError, RecipeError
from calibrant.methods import LayerContext, LayerStats, make_method
from calibrant.methods.sparsegpt import sparsegpt_prune
from calibrant.methods.sparsity import nm_mask, parse_pattern


def _stats(X: torch.Tensor, need) -> LayerStats | None:
    """The statistics a method lists (None for a data-free one), over the rows of X."""
    if not need:
        return None
    s = LayerStats(X.shape[1], need)
    s.add(X)
    return s


def _layer(rows=16, cols=32, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    # correlated inputs with very different column scales, like real activations
    X = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * torch.rand(cols, generator=g) * 3
    return W, X


def _recon_error(W, W_hat, X):
    return float(((W - W_hat) @ X.T).square().sum())


def test_wanda_mask_equals_brute_force():
    W, X = _layer(rows=8, cols=12)
    out = make_method("wanda", sparsity=0.5).compress(W.clone(), _stats(X, "sq_norms"), ctx := LayerContext("l"))
    norms = torch.sqrt((X.double() ** 2).sum(0))
    for r in range(W.shape[0]):
        scores = [(abs(float(W[r, j])) * float(norms[j]), j) for j in range(W.shape[1])]
        pruned = {j for _, j in sorted(scores)[:6]}
        assert {j for j in range(W.shape[1]) if ctx.mask[r, j]} == pruned
        assert all(out[r, j] == 0 for j in pruned) and all(out[r, j] == W[r, j] for j in range(12) if j not in pruned)


def test_wanda_per_layer_compares_across_rows():
    W, X = _layer(rows=8, cols=12)
    ctx = LayerContext("l")
    make_method("wanda", sparsity=0.25, per_layer=True).compress(W, _stats(X, "sq_norms"), ctx)
    scores = W.abs() * X.square().sum(0).sqrt()
    assert int(ctx.mask.sum()) == int(0.25 * W.numel())
    assert scores[ctx.mask].max() <= scores[~ctx.mask].min()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_exact_unstructured_sparsity(method, sparsity):
    W, X = _layer(rows=16, cols=64)
    need = make_method(method).statistics
    out = make_method(method, sparsity=sparsity).compress(W, _stats(X, need), LayerContext("l"))
    zeros = int((out == 0).sum())
    if method == "wanda":  # per output row
        assert zeros == W.shape[0] * int(W.shape[1] * sparsity)
    else:
        assert zeros == int(W.numel() * sparsity)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_groups_have_at_most_n_nonzeros(method, pattern):
    n, m = parse_pattern(pattern)
    W, X = _layer(rows=16, cols=64)
    need = make_method(method).statistics
    out = make_method(method, pattern=pattern).compress(W, _stats(X, need), LayerContext("l"))
    nnz = (out.reshape(16, -1, m) != 0).sum(-1)
    assert int(nnz.max()) <= n
    assert int((out == 0).sum()) == W.numel() * (m - n) // m


def test_nm_mask_prunes_smallest_in_each_group():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 9.0, 8.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern):
    W, X = _layer(rows=32, cols=64, tokens=512)
    errs = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        need = make_method(name).statistics
        out = make_method(name, sparsity=None if pattern else 0.5, pattern=pattern).compress(
            W.clone(), _stats(X, need), LayerContext("l"))
        errs[name] = _recon_error(W, out, X)
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"]


def _obs_reference(W, H, sparsity, nm):
    """Textbook sequential OBS in float64 with explicit inverses of the remaining sub-Hessian."""
    W = W.double().clone()
    H = H.double()
    rows, cols = W.shape
    mask = torch.zeros_like(W, dtype=torch.bool)
    if nm is None:  # one block covering all columns: choose the mask up front
        d2 = torch.tensor([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(cols)], dtype=torch.float64)
        scores = (W.square() / d2).flatten()
        k = int(sparsity * W.numel())
        mask.view(-1)[torch.argsort(scores)[:k]] = True
    for i in range(cols):
        Hinv = torch.linalg.inv(H[i:, i:])
        if nm is not None and i % nm[1] == 0:
            n, m = nm
            d2 = torch.tensor([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(i, i + m)], dtype=torch.float64)
            scores = W[:, i : i + m].square() / d2
            idx = torch.argsort(scores, dim=1)[:, : m - n]
            mask[:, i : i + m].scatter_(1, idx, True)
        q = torch.where(mask[:, i], torch.zeros_like(W[:, i]), W[:, i])
        err = (W[:, i] - q) / Hinv[0, 0]
        W[:, i:] -= err.unsqueeze(1) * Hinv[0].unsqueeze(0)
        W[:, i] = q
    return W, mask


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_matches_explicit_obs_reference(nm):
    W, X = _layer(rows=6, cols=16, tokens=200, seed=3)
    H = (X.double().T @ X.double()) / X.shape[0] + 0.01 * torch.eye(16, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True).float()
    blocksize = 16 if nm is None else 4  # lazy updates across blocks for N:M must not change the result
    ours, mask = sparsegpt_prune(W, U, 0.5, nm, blocksize=blocksize)
    ref, ref_mask = _obs_reference(W, H, 0.5, nm)
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(ours.double(), ref, atol=1e-4, rtol=1e-4)


def test_sparsegpt_zeroes_dead_inputs_and_shares_factorisation():
    W, X = _layer(rows=8, cols=16)
    X[:, 3] = 0  # a feature that is never active
    stats = _stats(X, "hessian")
    m = make_method("sparsegpt", sparsity=0.25)
    out = m.compress(W, stats, LayerContext("a"))
    assert torch.all(out[:, 3] == 0)
    assert len(stats.cache) == 1
    m.compress(W, stats, LayerContext("b"))  # a second linear reading the same input reuses it
    assert len(stats.cache) == 1


def test_singular_hessian_without_damping_is_refused():
    W, X = _layer(rows=8, cols=32, tokens=4)  # rank 4 < 32: singular
    with pytest.raises(NumericalError, match="singular"):
        make_method("sparsegpt", damp=0.0).compress(W, _stats(X, "hessian"), LayerContext("layer.x"))


def test_nan_activations_are_refused():
    W, X = _layer(rows=8, cols=16)
    X[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        make_method("wanda").compress(W, _stats(X, "sq_norms"), LayerContext("layer.x"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, r"outside \[0, 1\)"),
        ({"sparsity": -0.1}, r"outside \[0, 1\)"),
        ({"pattern": "4:2"}, "0 < N < M"),
        ({"pattern": "2-4"}, "not N:M"),
    ],
)
def test_bad_targets(kwargs, match):
    with pytest.raises(RecipeError, match=match):
        make_method("wanda", **kwargs)


def test_unknown_method_suggests():
    with pytest.raises(RecipeError, match="Did you mean 'wanda'"):
        make_method("wandaa")


def test_nm_needs_divisible_columns():
    with pytest.raises(RecipeError, match="not divisible by M=8"):
        make_method("magnitude", pattern="4:8").validate("blk.fc", (16, 20))
