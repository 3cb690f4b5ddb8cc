"""Statistic observers (calibrant.methods.stats) against brute-force float64 references, and the engine
streaming a statistic defined outside the package."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from calibrant.engine import compress
from calibrant.errors import NumericalError, RecipeError
from calibrant.methods import LayerContext, Method
from calibrant.methods.stats import STATISTICS, Hessian, LayerStats, OutlierCounts, RowSample, Statistic
from calibrant.models.adapter import Adapter
from tests.conftest import tiny_model, token_batch

BUILTIN = ("hessian", "sq_norms", "mean_abs", "max_abs", "outlier_counts", "rows")


def batches(dim: int, sizes: tuple[int, ...] = (7, 1, 33, 16), seed: int = 0, scale: float = 3.0) -> list[torch.Tensor]:
    """Random float32 inputs fed in several ``add`` calls; some 3-D ([b, L, dim]) as the hooks see them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(sizes):
        x = torch.randn(n, dim, generator=g) * scale + torch.randn(dim, generator=g)
        out.append(x.reshape(1, n, dim) if k % 2 else x)
    return out


def rows_of(xs: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat([x.reshape(-1, dim) for x in xs]).double()


def test_every_builtin_statistic_is_registered():
    assert set(BUILTIN) <= set(STATISTICS)
    assert all(issubclass(STATISTICS[k], Statistic) and STATISTICS[k].key == k for k in STATISTICS)


@pytest.mark.parametrize("dim", [24, 600, 1100])  # 600: the triangular CPU path (4 chunks); 1100: 6 chunks
def test_hessian_matches_float64(dim):
    assert (dim >= Hessian.TRIANGULAR_MIN_DIM) == (dim > 24)
    xs = batches(dim, sizes=(5, 40, 3, 19))
    st = LayerStats(dim, ("hessian",))
    ref = torch.zeros(dim, dim, dtype=torch.float64)
    for x in xs:
        st.add(x)
        x64 = x.reshape(-1, dim).double()
        ref += x64.T @ x64
        H = st.hessian  # read between adds: mirroring must not disturb later accumulation
        assert H.dtype == torch.float32 and H.shape == (dim, dim)
        assert torch.equal(H, H.T)  # exactly symmetric
        err = (H.double() - ref).abs().max().item()
        assert err <= 1e-5 * ref.abs().max().item(), err
    assert st.tokens == sum(x.reshape(-1, dim).shape[0] for x in xs)


def test_hessian_triangular_path_equals_one_gemm():
    dim = 520
    xs = batches(dim, sizes=(64, 64))
    tri = Hessian(dim, "cpu")
    for x in xs:
        tri.update(x.reshape(-1, dim))
    full = sum(x.reshape(-1, dim).T @ x.reshape(-1, dim) for x in xs)
    torch.testing.assert_close(tri.result(), full, rtol=1e-5, atol=1e-4 * full.abs().max().item())
    assert torch.equal(tri.result(), tri.result().T)


def test_sq_norms_mean_abs_max_abs_match_float64():
    dim = 37
    xs = batches(dim)
    st = LayerStats(dim, ("sq_norms", "mean_abs", "max_abs"))
    for x in xs:
        st.add(x)
    X = rows_of(xs, dim)
    torch.testing.assert_close(st.get("sq_norms").double(), X.square().sum(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(st.sq_norms.double(), X.square().sum(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(st.get("mean_abs").double(), X.abs().mean(0), rtol=1e-6, atol=0)
    assert torch.equal(st.get("max_abs").double(), X.abs().amax(0))  # a max is exact
    assert st.tokens == X.shape[0]
    for key in ("sq_norms", "mean_abs", "max_abs"):
        assert st.get(key).shape == (dim,) and st.get(key).dtype == torch.float32


def test_max_abs_of_all_negative_inputs():
    st = LayerStats(3, ("max_abs",))
    st.add(torch.tensor([[-5.0, -1.0, -2.0]]))
    st.add(torch.tensor([[-4.0, -3.0, -0.5]]))
    assert st.get("max_abs").tolist() == [5.0, 3.0, 2.0]


def test_outlier_counts_with_planted_values():
    t = OutlierCounts.THRESHOLD
    dim = 6
    g = torch.Generator().manual_seed(1)
    xs = [torch.rand(10, dim, generator=g) * (t - 1) * torch.sign(torch.randn(10, dim, generator=g)) for _ in range(3)]
    # planted: above (both signs) counts, the threshold itself and just below do not
    xs[0][0, 0], xs[0][1, 0], xs[1][2, 0] = t + 0.5, -(t + 2.0), t + 1e-3
    xs[0][3, 1], xs[2][4, 1] = t, -t  # exactly the threshold: not an outlier (strict >)
    xs[1][5, 2] = t - 1e-3
    xs[2][:, 3] = -100.0  # every token of channel 3
    st = LayerStats(dim, ("outlier_counts",))
    for x in xs:
        st.add(x)
    counts = st.get("outlier_counts")
    X = rows_of(xs, dim)
    assert counts.dtype == torch.int64
    assert counts.tolist() == (X.abs() > t).sum(0).tolist() == [3, 0, 0, 10, 0, 0]


@pytest.fixture
def small_capacity(monkeypatch) -> Iterator[int]:
    monkeypatch.setattr(RowSample, "CAPACITY", 16)
    yield 16


def _sample(xs: list[torch.Tensor], dim: int) -> torch.Tensor:
    st = LayerStats(dim, ("rows",))
    for x in xs:
        st.add(x)
    return st.get("rows")


def test_rows_capacity_determinism_and_membership(small_capacity):
    dim = 5
    xs = batches(dim, sizes=(7, 3, 30, 11, 49))
    rows = _sample(xs, dim)
    assert rows.shape == (small_capacity, dim)
    assert torch.equal(rows, _sample([x.clone() for x in xs], dim))  # same input sequence, same sample
    X = torch.cat([x.reshape(-1, dim) for x in xs])
    matches = (rows[:, None, :] == X[None, :, :]).all(-1)  # [kept, all]
    assert bool(matches.any(1).all())  # every kept row is an input row, verbatim
    kept = matches.float().argmax(1)
    assert len(set(kept.tolist())) == small_capacity  # no row kept twice
    assert int(kept.max()) >= small_capacity  # a later row did replace an early one


def test_rows_fewer_than_capacity_keeps_all_in_order(small_capacity):
    dim = 4
    xs = batches(dim, sizes=(3, 5, 4))  # 12 < 16
    rows = _sample(xs, dim)
    assert torch.equal(rows, torch.cat([x.reshape(-1, dim) for x in xs]))
    exactly = batches(dim, sizes=(10, 6))  # exactly the capacity, across the boundary of an add
    assert torch.equal(_sample(exactly, dim), torch.cat([x.reshape(-1, dim) for x in exactly]))


def test_rows_sample_is_uniform_over_positions(monkeypatch):
    """Reservoir sampling: each of n rows is kept with probability k/n, early or late."""
    k, n, trials = 8, 64, 300
    monkeypatch.setattr(RowSample, "CAPACITY", k)
    X = torch.arange(n, dtype=torch.float32)[:, None]
    hits = torch.zeros(n)
    for seed in range(trials):
        monkeypatch.setattr(RowSample, "SEED", seed)
        st = LayerStats(1, ("rows",))
        for chunk in X.split(5):
            st.add(chunk)
        kept = st.get("rows").flatten().long()
        assert kept.numel() == k and len(set(kept.tolist())) == k
        hits[kept] += 1
    rate = hits / trials  # expected k/n = 0.125 for every row
    quarters = rate.reshape(4, -1).mean(1)
    assert torch.allclose(quarters, torch.full((4,), k / n), atol=0.02), quarters


def test_sq_norms_is_the_hessian_diagonal_when_both_are_asked():
    dim = 600  # the triangular path
    xs = batches(dim, sizes=(20, 13))
    st = LayerStats(dim, ("hessian", "sq_norms"))
    for x in xs:
        st.add(x)
    assert torch.equal(st.get("sq_norms"), torch.diagonal(st.hessian))
    assert torch.equal(st.sq_norms, torch.diagonal(st.hessian))
    alone = LayerStats(dim, ("sq_norms",))
    for x in xs:
        alone.add(x)
    torch.testing.assert_close(st.sq_norms, alone.sq_norms, rtol=1e-5, atol=0)


def test_uncollected_statistic_is_named():
    st = LayerStats(4, ("mean_abs",))
    st.add(torch.ones(2, 4))
    for key in ("hessian", "sq_norms", "rows"):
        with pytest.raises(RecipeError, match=f"'{key}' was not collected") as info:
            st.get(key)
        assert "mean_abs" in str(info.value)  # what was collected
    with pytest.raises(RecipeError, match="without XᵀX"):
        st.hessian = torch.eye(4)
    assert st.hessian is None


def test_unknown_statistic_lists_known_ones():
    with pytest.raises(RecipeError, match="unknown statistic no_such_stat") as info:
        LayerStats(4, ("sq_norms", "no_such_stat"))
    for key in BUILTIN:
        assert key in str(info.value)
    with pytest.raises(RecipeError, match="unknown statistic"):
        LayerStats(4, "no_such_stat")  # one key as a plain string


@pytest.mark.parametrize("needs", [("sq_norms",), ("hessian",), ("mean_abs", "max_abs"), ("rows",)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_names_the_layer(needs, bad):
    st = LayerStats(8, needs)
    st.add(torch.randn(5, 8))
    st.check_finite("model.layers.3.mlp.down_proj")  # finite: no error
    x = torch.randn(5, 8)
    x[2, 5] = bad
    st.add(x)
    with pytest.raises(NumericalError, match=r"model\.layers\.3\.mlp\.down_proj"):
        st.check_finite("model.layers.3.mlp.down_proj")


def test_release_drops_the_statistics():
    st = LayerStats(4, ("sq_norms",))
    st.add(torch.ones(3, 4))
    st.cache["factor"] = torch.eye(4)
    st.release()
    assert st.cache == {}
    with pytest.raises(RecipeError):
        st.get("sq_norms")


# ---- a statistic defined outside calibrant, streamed by the unchanged engine -------------------------------

@pytest.fixture
def token_count_statistic() -> Iterator[str]:
    class TokenAndSum(Statistic):
        """Counts tokens and sums every input element in float64."""

        key = "test_token_and_sum"

        def __init__(self, dim, device):
            super().__init__(dim, device)
            self.tokens = 0
            self.total = torch.zeros((), dtype=torch.float64)
            self.shapes: set[tuple[int, ...]] = set()

        def update(self, x):
            assert x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == self.dim
            self.shapes.add(tuple(x.shape))
            self.tokens += x.shape[0]
            self.total += x.double().sum()

        def result(self):
            return self.tokens, float(self.total)

    try:
        assert STATISTICS["test_token_and_sum"] is TokenAndSum  # registered by subclassing alone
        yield "test_token_and_sum"
    finally:
        STATISTICS.pop("test_token_and_sum", None)


@pytest.mark.parametrize("pipeline", ["one-pass", "two-pass"])
def test_new_statistic_is_streamed_by_the_engine(token_count_statistic, pipeline):
    key = token_count_statistic
    seen: dict[str, tuple[int, float]] = {}

    class Probe(Method):
        name = "probe"
        statistics = (key,)

        def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
            assert stats is not None
            seen[ctx.name] = stats.get(key)
            assert stats.tokens == seen[ctx.name][0]
            return weight

    model = tiny_model("llama")
    ids = token_batch(n=6, length=20)
    # reference: every targeted linear's input sum over the dense model (Probe leaves weights unchanged)
    adapter = Adapter(model)
    linears = {n: m for i in range(len(adapter.blocks)) for n, m in adapter.block_linears(i).items()}
    ref: dict[str, float] = dict.fromkeys(linears, 0.0)
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: ref.__setitem__(n, ref[n] + args[0].double().sum().item()))
               for n, m in linears.items()]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()

    report = compress(model, ids, Probe(), batch_size=4, progress=False, pipeline=pipeline)
    assert report.block_pipelines == [pipeline] * 2
    assert set(seen) == set(linears)
    for name, (tokens, total) in seen.items():
        assert tokens == 6 * 20, name
        assert total == pytest.approx(ref[name], rel=1e-4, abs=1e-3), name
