"""OWL: per-block sparsity from the dense model's outlier ratios — the maths, the plan, the exact result."""

from __future__ import annotations

import pytest
import torch

from calibrant.engine import compress
from calibrant.errors import RecipeError
from calibrant.methods import make_method, needs_data
from calibrant.methods.owl import outlier_ratio, owl_sparsities
from calibrant.models import Adapter, weight_of
from tests.conftest import tiny_model, token_batch


def test_outlier_ratio_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(8, 16, generator=g) ** 4, torch.rand(4, 32, generator=g) ** 4]
    flat = torch.cat([s.flatten() for s in scores]).double()
    expected = float((flat > 3 * flat.mean()).double().mean())
    assert outlier_ratio(scores, 3.0) == pytest.approx(expected, abs=1e-12) and 0 < expected < 0.5


@pytest.mark.parametrize("seed", range(5))
def test_owl_sparsities_stay_in_the_band_and_average_to_the_target(seed):
    g = torch.Generator().manual_seed(seed)
    ratios = (torch.rand(12, generator=g) * 0.05).tolist()
    sizes = (torch.randint(1, 50, (12,), generator=g) * 1000).tolist()
    S, lam = 0.6, 0.08
    s = owl_sparsities(ratios, sizes, S, lam)
    assert all(S - lam - 1e-12 <= x <= S + lam + 1e-12 for x in s)
    assert sum(x * n for x, n in zip(s, sizes, strict=True)) / sum(sizes) == pytest.approx(S, abs=1e-9)
    order = sorted(range(12), key=lambda i: ratios[i])  # more outliers → pruned less
    assert all(s[a] >= s[b] - 1e-12 for a, b in zip(order, order[1:], strict=False))


def test_equal_outlier_ratios_give_the_uniform_sparsity():
    assert owl_sparsities([0.01] * 4, [10, 20, 30, 40], 0.5, 0.1) == pytest.approx([0.5] * 4, abs=1e-12)


def _blocks(model):
    adapter = Adapter(model)
    return [adapter.block_linears(i) for i in range(len(adapter.blocks))]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_owl_plan_is_applied_exactly_and_recorded(method):
    model = tiny_model("llama", seed=1)
    S, lam = 0.6, 0.1
    report = compress(model, token_batch(n=8, length=32), make_method(method, sparsity=S, sparsity_profile="owl",
                                                                      owl_lambda=lam), progress=False)
    plan = report.plans[method]
    weighted = total = 0.0
    for layers in _blocks(model):
        block_sparsity = {plan[n]["sparsity"] for n in layers}
        assert len(block_sparsity) == 1  # one sparsity per decoder block, as the paper
        s = block_sparsity.pop()
        assert S - lam - 1e-9 <= s <= S + lam + 1e-9
        for name, module in layers.items():
            W = weight_of(module)
            rows, cols = W.shape
            zeros = int((W == 0).sum())
            expected = {"wanda": rows * int(cols * s), "sparsegpt": int(s * rows * cols)}.get(method, int(rows * cols * s))
            assert zeros == expected, name
            weighted += s * W.numel()
            total += W.numel()
    assert weighted / total == pytest.approx(S, abs=1e-3)
    assert len({round(plan[n]["sparsity"], 9) for n in plan}) > 1  # the blocks differ
    # magnitude reads calibration data for its plan only: it compresses without a block forward
    assert report.block_pipelines[0] == ("data-free" if method == "magnitude" else "one-pass")


def test_owl_magnitude_needs_data_and_uniform_magnitude_does_not():
    assert not needs_data("magnitude") and needs_data("magnitude", sparsity_profile="owl")


@pytest.mark.parametrize("params, message", [
    ({"sparsity": 0.5, "owl_lambda": 0.5}, r"λ=0.5 with sparsity S=0.5"),
    ({"sparsity": 0.95, "owl_lambda": 0.08}, r"\[0.87, 1.03\]"),
    ({"sparsity": 0.5, "owl_m": 0}, "threshold M must be > 0"),
    ({"pattern": "2:4"}, "pattern 2:4 fixes it at 0.5 in every layer"),
])
def test_bad_owl_parameters_are_refused(params, message):
    with pytest.raises(RecipeError, match=message):
        make_method("wanda", sparsity_profile="owl", **params)


def test_unknown_profile_lists_the_choices():
    with pytest.raises(RecipeError, match="choose one of uniform, owl"):
        make_method("sparsegpt", sparsity_profile="owls")


def test_the_recorded_recipe_holds_the_owl_parameters_and_nothing_internal():
    params = make_method("wanda", sparsity=0.7, sparsity_profile="owl").params()
    assert params == {"sparsity": 0.7, "pattern": None, "sparsity_profile": "owl", "owl_m": 5.0, "owl_lambda": 0.08,
                      "per_layer": False}


def test_info_summarises_a_recorded_plan():
    from calibrant.cli import _plan_line

    plan = {"a": {"sparsity": 0.4, "outlier_ratio": 0.02}, "b": {"sparsity": 0.6, "outlier_ratio": 0.01}}
    layers = {"a": {"shape": [10, 10]}, "b": {"shape": [10, 30]}}
    line = _plan_line("wanda", plan, layers)
    assert line == ("wanda plan: sparsity per layer 0.4000–0.6000, parameter-weighted mean 0.5500, over 2 layers "
                    "(per-layer values in calibrant.json)")
