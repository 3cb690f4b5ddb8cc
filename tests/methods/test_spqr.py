"""SpQR: against a brute-force OBS reference, against GPTQ when the statistics are exact, outliers that
follow τ, the paper's bit count, and a model saved dense with its outliers beside it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from calibrant.engine import compress
from calibrant.errors import RecipeError
from calibrant.export.hf import EXTRAS_FILE, save_model
from calibrant.methods import make_method, make_recipe
from calibrant.methods.gptq import gptq_quantize
from calibrant.methods.quant import parse_scheme, qparams, quant_state_of
from calibrant.methods.spqr import leave_one_out_error, minmax_quantize, spqr_effective_bits, spqr_quantize
from tests.conftest import tiny_model, token_batch

ROWS, COLS = 24, 48


def _layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(400, COLS, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, COLS, dtype=torch.float64)
    W = torch.randn(ROWS, COLS, generator=g, dtype=torch.float64)
    W[3, 7] = 9.0  # a planted outlier weight
    H = X.t() @ X / X.shape[0]
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(COLS, dtype=torch.float64)
    perm = torch.argsort(H.diagonal(), descending=True)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd[perm][:, perm]), upper=True)
    return W, H, Hd, perm, U


def _brute_force(W, Hd, perm, bits, group, stat_bits, stat_group):
    """Column-by-column OBS with the explicit inverse Hessian, downdated after each column (no Cholesky,
    no lazy blocks), each group's grid from its current weights with quantized statistics."""
    W, Hinv, maxq = W.clone()[:, perm], torch.linalg.inv(Hd[perm][:, perm]), 2**bits - 1
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        if j % group == 0:
            s, z = qparams(W[:, j:j + group], bits, False)
            s, z = minmax_quantize(s, stat_bits, stat_group)[0], minmax_quantize(z, stat_bits, stat_group)[0]
        Q[:, j] = (torch.clamp(torch.round(W[:, j] / s + z), 0, maxq) - z) * s
        W[:, j + 1:] -= torch.outer((W[:, j] - Q[:, j]) / Hinv[j, j], Hinv[j, j + 1:])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out


def test_tau_infinite_is_obs_with_quantized_statistics():
    W, _, Hd, perm, U = _layer()
    res = spqr_quantize(W.clone(), U, 3, 16, 3, 16, math.inf, perm=perm, blocksize=32)
    assert not res["outliers"].any()
    assert torch.allclose(res["weight"], _brute_force(W, Hd, perm, 3, 16, 3, 16), atol=1e-10)


def test_tau_infinite_with_exact_statistics_equals_gptq():
    W, _, _, perm, U = _layer(1)
    # one row per second-level chunk: every statistic is its own chunk's minimum, exactly
    res = spqr_quantize(W.clone(), U, 3, 16, 8, 1, math.inf, perm=perm, blocksize=32)
    gptq, scale, zero, g_idx = gptq_quantize(W.clone(), U, parse_scheme("w3g16-asym"), blocksize=32, perm=perm)
    assert torch.allclose(res["weight"], gptq, atol=1e-10)
    assert torch.allclose(res["scale"], scale) and torch.allclose(res["zero"], zero)
    assert torch.equal(res["g_idx"], g_idx)


def test_outlier_fraction_follows_tau_and_outliers_lower_the_error():
    W, H, _, perm, U = _layer(2)
    fractions, errors = [], []
    for tau in (0.05, 0.2, 1.0, 5.0, math.inf):
        res = spqr_quantize(W.clone(), U, 3, 16, 3, 16, tau, perm=perm, blocksize=32)
        fractions.append(float(res["outliers"].double().mean()))
        D = res["weight"] - W
        errors.append(float((D @ H @ D.t()).trace()))
        assert torch.equal(res["weight"][res["outliers"]] != 0, torch.ones(int(res["outliers"].sum()), dtype=torch.bool))
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > 0.05 and fractions[-1] == 0.0
    assert errors[0] < errors[2] < errors[-1]
    strict = spqr_quantize(W.clone(), U, 3, 16, 3, 16, 0.05, perm=perm, blocksize=32)
    assert strict["outliers"][3, 7]  # the planted weight is kept


def test_leave_one_out_error_matches_a_loop():
    g = torch.Generator().manual_seed(3)
    G, d = torch.randn(5, 16, generator=g), torch.rand(16, generator=g) + 0.5
    G[2, 4] = 12.0
    fast = leave_one_out_error(G, d, 3)
    for r in range(5):
        for i in range(16):
            others = torch.cat([G[r, :i], G[r, i + 1:]])[None]
            s, z = qparams(others, 3, False)
            q = (torch.clamp(torch.round(G[r, i] / s) + z, 0, 7) - z) * s
            assert fast[r, i] == pytest.approx(float(((G[r, i] - q) / d[i]) ** 2), rel=1e-5, abs=1e-7)
    assert int(fast[2].argmax()) == 4


def test_second_level_quantization_keeps_scales_positive_and_in_range():
    x = torch.rand(37) + 0.01
    xq, codes, step, low = minmax_quantize(x, 3, 16)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 7 and step.shape == (3,)
    assert (xq > 0).all() and ((xq - x).abs() <= step.repeat_interleave(16)[:37] / 2 + 1e-7).all()
    assert torch.equal(minmax_quantize(torch.full((4,), 0.3), 3, 16)[0], torch.full((4,), 0.3))


def test_effective_bits_as_the_paper_counts():
    assert spqr_effective_bits(3, 16, 3, 16, 0.0) == pytest.approx(3 + 6 / 16 + 64 / 256)
    assert spqr_effective_bits(3, 16, 3, 16, 0.01) == pytest.approx(3.625 + 0.32)


def _on_grid(weight, state):
    """Recompute each weight's rounding on the layer's recorded (dequantized) statistics."""
    s = state.scale.gather(1, state.g_idx.expand(weight.shape[0], -1))
    z = state.zero.gather(1, state.g_idx.expand(weight.shape[0], -1))
    maxq = 2**state.scheme.bits - 1
    return (torch.clamp(torch.round(weight / s + z), 0, maxq) - z) * s


def test_model_saves_dense_with_outliers_and_statistics_beside_it(tmp_path, capsys):
    model = tiny_model("llama")
    ids = token_batch()
    report = compress(model, ids, make_method("spqr", scheme="w3", outlier_threshold=0.1), progress=False)
    fractions = [r.info["outlier_fraction"] for r in report.layers]
    assert all(r.info["scheme"] == "w3g16-asym" for r in report.layers) and max(fractions) > 0
    for r in report.layers:
        assert r.info["effective_bits"] == pytest.approx(spqr_effective_bits(3, 16, 3, 16, r.info["outlier_fraction"]))
    modules = dict(model.named_modules())
    for r in report.layers[:4]:
        weight = modules[r.name].weight.detach()
        state = quant_state_of(modules[r.name])
        t = state.extras["tensors"]
        outliers = torch.zeros_like(weight, dtype=torch.bool)
        outliers[t["outlier_rows"].long(), t["outlier_cols"].long()] = True
        assert int(outliers.sum()) == r.info["outliers"]
        grid = _on_grid(weight, state)
        assert torch.allclose(grid[~outliers], weight[~outliers], atol=1e-5)  # the rest lies on the grid
    with torch.no_grad():
        logits = model(ids).logits
    layers = [{"name": r.name, "shape": list(r.shape), **r.info} for r in report.layers]
    out = save_model(model, None, tmp_path / "spqr", {"layers": layers, "effective_bits": report.effective_bits})
    import transformers as T

    reloaded = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    meta = json.loads((out / "calibrant.json").read_text())
    assert meta["extras_file"] == EXTRAS_FILE and meta["effective_bits"] > 3.625
    extras = load_file(str(out / EXTRAS_FILE))
    name = report.layers[0].name
    rows, cols = extras[f"{name}.outlier_rows"].long(), extras[f"{name}.outlier_cols"].long()
    assert torch.equal(extras[f"{name}.outlier_values"], modules[name].weight.detach()[rows, cols].half())
    assert extras[f"{name}.scale_codes"].dtype == torch.uint8
    from calibrant.cli import main

    assert main(["info", str(out)]) == 0
    kept = sum(r.info["outliers"] for r in report.layers)
    assert f"SpQR: {kept:,} outlier weights kept in 16 bit" in capsys.readouterr().out


def test_packed_export_is_refused_before_any_work():
    from calibrant.export.packed import ExportError, check_packable_recipe

    with pytest.raises(ExportError, match="SpQR keeps unstructured 16-bit outliers.*--format hf"):
        check_packable_recipe([make_method("spqr")])


@pytest.mark.parametrize("params, message", [
    ({"outlier_threshold": 0}, "must be positive"),
    ({"outlier_threshold": -1.0}, "must be positive"),
    ({"group": 0}, "group sizes must be ≥ 1"),
    ({"stat_group": 0}, "group sizes must be ≥ 1"),
    ({"scheme": "w8a8"}, "use e.g. w3 or w3g16"),
    ({"scheme": "w3g32", "group": 16}, "give one of them"),
    ({"stat_bits": 1}, "stat_bits must be in 2–8"),
])
def test_bad_spqr_parameters(params, message):
    with pytest.raises(RecipeError, match=message):
        make_method("spqr", **params)


def test_scheme_group_and_infinite_threshold_from_strings():
    m = make_method("spqr", scheme="w4g32", outlier_threshold="inf")
    assert m.group == 32 and m.scheme == "w4g32-asym" and math.isinf(m.outlier_threshold)


def test_stacked_matrices_give_the_same_result_as_one_by_one():
    W, _, _, perm, U = _layer(4)
    V = torch.randn(40, COLS, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3.0
    both = spqr_quantize(torch.cat([W, V]), U, 3, 16, 3, 16, 0.2, perm=perm, parts=[ROWS, 40])
    for rows, M in ((slice(0, ROWS), W), (slice(ROWS, ROWS + 40), V)):
        alone = spqr_quantize(M.clone(), U, 3, 16, 3, 16, 0.2, perm=perm)
        assert torch.allclose(both["weight"][rows], alone["weight"], atol=1e-10)
        assert torch.equal(both["outliers"][rows], alone["outliers"]) and alone["outliers"].any()
        assert torch.equal(both["scale_codes"][rows], alone["scale_codes"])


@pytest.mark.parametrize("recipe, params", [
    ("wanda+spqr", {"sparsity": 0.5, "scheme": "w3"}),
    ("wanda+awq", {"sparsity": 0.6, "sparsity_profile": "owl", "owl_lambda": 0.05, "scheme": "w4g16-asym"}),
])
def test_chains_keep_the_pruning_masks(recipe, params):
    model = tiny_model("llama")
    report = compress(model, token_batch(), make_recipe(recipe, **params), progress=False)
    planned = report.plans.get("wanda", {})
    modules = dict(model.named_modules())
    for r in report.layers:  # Wanda's per-row zeros (of the planned ratio) all survive the quantizer
        target = planned.get(r.name, {}).get("sparsity", params["sparsity"])
        zeros_per_row = (modules[r.name].weight == 0).sum(1)
        assert int(zeros_per_row.min()) >= int(r.shape[1] * target), r.name
        assert r.sparsity == pytest.approx(target, abs=0.02), r.name  # and few weights round to 0 besides
