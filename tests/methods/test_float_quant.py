"""FP8 (E4M3) and NVFP4 (E2M1) schemes: rounding against brute-force nearest-value references over every
representable value (ties to the even mantissa, saturation, subnormals, signed zeros), the weight and
activation grids against element-wise references, RTN/GPTQ on the float grids, calibrated activation
scales, and the one-line refusals."""

from __future__ import annotations

import math
import re

import pytest
import torch

from calibrant.engine import compress
from calibrant.errors import RecipeError
from calibrant.methods import LayerContext, LayerStats, make_method
from calibrant.methods.gptq import gptq_quantize
from calibrant.methods.quant import (
    QuantState,
    attach_quant_state,
    fp8_activations,
    fp8_weight,
    nvfp4_activations,
    nvfp4_global_scale,
    nvfp4_weight,
    parse_scheme,
    quant_state_of,
    round_e2m1,
    round_e4m3,
)
from tests.conftest import tiny_model, token_batch

# ---- brute-force references -------------------------------------------------------------------------------


def _e4m3_grid() -> list[tuple[float, int]]:
    """Every finite E4M3 value with its mantissa bit (the code's lowest bit), decoded by hand from the 8 bits."""
    out = []
    for code in range(256):
        sign, exp, man = code >> 7, (code >> 3) & 0xF, code & 0x7
        if exp == 0xF and man == 0x7:
            continue  # the NaN encodings (S.1111.111); float8_e4m3fn has no infinities
        value = man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
        out.append((-value if sign else value, man & 1, sign))
    return out


def _e2m1_grid() -> list[tuple[float, int]]:
    out = []
    for code in range(16):
        sign, exp, man = code >> 3, (code >> 1) & 0x3, code & 0x1
        value = man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1)
        out.append((-value if sign else value, man, sign))
    return out


E4M3 = _e4m3_grid()
E2M1 = _e2m1_grid()


def _nearest(x: float, grid) -> float:
    """The grid value nearest to ``x``; ties to the even mantissa; a zero keeps ``x``'s sign; beyond the largest
    magnitude (infinities included) the largest of ``x``'s sign (saturation)."""
    top = max(v for v, _, _ in grid)
    if math.isinf(x) or abs(x) > top:
        return math.copysign(top, x)
    best = min(abs(x - v) for v, _, _ in grid)
    ties = [(v, man, sign) for v, man, sign in grid if abs(x - v) == best]
    ties.sort(key=lambda t: (t[1], t[2] != (math.copysign(1, x) < 0)))  # even mantissa, then x's own sign
    return ties[0][0]


def _probe_values(grid) -> list[float]:
    """Grid values, the exact midpoints between neighbours (ties), points just either side of them, values
    beyond the largest, zeros of both signs and a few random magnitudes."""
    values = sorted({v for v, _, _ in grid})
    mids = torch.tensor([(a + b) / 2 for a, b in zip(values[:-1], values[1:], strict=True)])  # exact in float32
    near = [torch.nextafter(mids, torch.full_like(mids, v)) for v in (-math.inf, math.inf)]  # one float32 ulp off
    top = values[-1]
    extra = [top * 1.01, top * 1.0625, top * 1.5, top * 1e6, -top * 1.2, math.inf, -math.inf, 0.0, -0.0]
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(200, generator=g) * top / 3
    return torch.cat([torch.tensor(values), mids, *near, torch.tensor(extra), rand]).tolist()


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(got, want), (got - want).abs().max()
    assert torch.equal(torch.signbit(got), torch.signbit(want))  # −0 stays −0


@pytest.mark.parametrize("grid, fn", [(E4M3, round_e4m3), (E2M1, round_e2m1)], ids=["e4m3", "e2m1"])
def test_rounding_matches_brute_force_nearest(grid, fn):
    probes = _probe_values(grid)
    x = torch.tensor(probes, dtype=torch.float32)
    want = torch.tensor([_nearest(v, grid) for v in probes], dtype=torch.float32)
    _assert_same(fn(x), want)
    assert torch.isnan(fn(torch.tensor([float("nan")]))).all()


def test_grids_hold_what_the_formats_define():
    finite = sorted({v for v, _, _ in E4M3})
    assert len(finite) == 253 and finite[-1] == 448.0 and min(v for v in finite if v > 0) == 2.0**-9
    assert sorted({abs(v) for v, _, _ in E2M1}) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    # the hand decoding agrees with torch's float8_e4m3fn
    codes = torch.tensor([c for c in range(256) if (c & 0x7F) != 0x7F], dtype=torch.uint8)
    assert sorted(codes.view(torch.float8_e4m3fn).float().tolist()) == sorted(v for v, _, _ in E4M3)


def test_known_ties_and_saturation():
    x = torch.tensor([1.0625, 1.1875, 17.0, 19.0, 2.0**-10, 3 * 2.0**-11, 464.0, 1e9, -500.0, -2.0**-11])
    assert round_e4m3(x).tolist() == [1.0, 1.25, 16.0, 20.0, 0.0, 2.0**-9, 448.0, 448.0, -448.0, -0.0]
    y = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.2, 100.0])
    assert round_e2m1(y).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, 6.0]


# ---- weight and activation grids against element-wise references ------------------------------------------


def _ref(v: float, grid) -> float:
    return _nearest(float(v), grid)


def _fp8_weight_reference(W: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(W)
    for r in range(W.shape[0]):
        s = torch.tensor(float(W[r].abs().max()), dtype=torch.float32) / 448
        s = s if s > 0 else torch.tensor(1.0)
        for c in range(W.shape[1]):
            out[r, c] = torch.tensor(_ref(W[r, c] / s, E4M3), dtype=torch.float32) * s
    return out


def _nvfp4_weight_reference(W: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(W)
    blocks = torch.empty(W.shape[0], W.shape[1] // 16)
    for r in range(W.shape[0]):
        for b in range(W.shape[1] // 16):
            part = W[r, 16 * b:16 * b + 16]
            raw = float(g * (part.abs().max() / 6))
            blocks[r, b] = _ref(max(raw, 2.0**-9), E4M3)
            eff = (blocks[r, b:b + 1] / g)[0]
            for c in range(16):
                out[r, 16 * b + c] = torch.tensor(_ref(part[c] / eff, E2M1), dtype=torch.float32) * eff
    return out, blocks


def _small_weight(rows=4, cols=32, seed=3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W[0, 5] = 40.0  # an outlier: its row's scale, and the global scale
    W[1] = 0.0  # an all-zero row / blocks
    W[2, 16:] = torch.randn(16, generator=g) * 1e-7  # a block far below the rest (tiny block scale)
    return W


def test_fp8_weight_matches_reference():
    W = _small_weight()
    Wq, scale = fp8_weight(W)
    _assert_same(Wq, _fp8_weight_reference(W))
    assert scale.shape == (4, 1) and float(scale[0, 0]) == pytest.approx(40.0 / 448)
    assert float(Wq[0, 5]) == 40.0  # the row maximum is exact (448 · s)


def test_nvfp4_weight_matches_reference():
    W = _small_weight()
    Wq, blocks, g = nvfp4_weight(W)
    assert torch.equal(g, torch.tensor([448 * 6 / 40.0]))
    want, want_blocks = _nvfp4_weight_reference(W, g)
    _assert_same(Wq, want)
    assert torch.equal(blocks, want_blocks) and torch.equal(round_e4m3(blocks), blocks)  # on the E4M3 grid
    assert float(blocks[0, 0]) == 448.0 and float(Wq[0, 5]) == 40.0  # the largest block spans the whole range
    assert torch.equal(Wq[1], torch.zeros(32))


def test_fp8_activations_match_reference_dynamic_and_static():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 8, generator=g)
    x[0, 1] = 0.0
    want = torch.empty_like(x)
    for idx in torch.cartesian_prod(torch.arange(2), torch.arange(3)).tolist():
        row = x[idx[0], idx[1]]
        s = row.abs().max() / 448 if row.abs().max() > 0 else torch.tensor(1.0)
        want[idx[0], idx[1]] = torch.tensor([_ref(v / s, E4M3) for v in row]) * s
    _assert_same(fp8_activations(x), want)
    s = torch.tensor([0.5 / 448])  # a static scale calibrated on |x| ≤ 0.5: larger inputs saturate at ±0.5
    static = fp8_activations(x, s)
    _assert_same(static, torch.tensor([_ref(v / s, E4M3) for v in x.flatten()]).reshape(x.shape) * s)
    assert float(static.abs().max()) == float(448 * s)


def test_nvfp4_activations_match_reference():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 32, generator=g)
    x[1, :16] = 1e-9  # a block whose E4M3 scale underflows: read as zeros (vLLM, compressed-tensors)
    gs = nvfp4_global_scale(torch.tensor(4.0))
    want = torch.empty_like(x)
    for r in range(3):
        for b in range(2):
            part = x[r, 16 * b:16 * b + 16]
            block = _ref(float(gs * (part.abs().max() / 6)), E4M3)
            if block == 0:
                want[r, 16 * b:16 * b + 16] = 0.0
                continue
            eff = (torch.tensor([block]) / gs)[0]
            want[r, 16 * b:16 * b + 16] = torch.tensor([_ref(v / eff, E2M1) for v in part]) * eff
    _assert_same(nvfp4_activations(x, gs), want)
    with pytest.raises(RecipeError, match="blocks of 16.*20 inputs"):
        nvfp4_activations(torch.randn(2, 20), gs)


# ---- RTN and GPTQ ------------------------------------------------------------------------------------------


def _layer(rows=32, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * torch.rand(cols, generator=g) * 3
    return W, X


def _stats(X, keys=("hessian", "max_abs")):
    s = LayerStats(X.shape[1], keys)
    s.add(X)
    return s


def _on_grid(Wq: torch.Tensor, state: QuantState) -> bool:
    """Re-quantizing ``Wq`` with its own scales gives ``Wq`` back (nvfp4: block scales on the E4M3 grid)."""
    if state.scheme.fmt == "fp8":
        return torch.equal(round_e4m3(Wq / state.scale) * state.scale, Wq)
    eff = torch.repeat_interleave(state.scale / state.global_scale, 16, dim=1)
    return torch.equal(round_e2m1(Wq / eff) * eff, Wq) and torch.equal(round_e4m3(state.scale), state.scale)


@pytest.mark.parametrize("scheme", ["fp8", "fp8-static", "nvfp4"])
def test_rtn_and_gptq_lie_on_the_grid_and_gptq_reconstructs_better(scheme):
    W, X = _layer()
    st = _stats(X)
    errs = {}
    for method in ("rtn", "gptq"):
        ctx = LayerContext("l")
        Wq = make_method(method, scheme=scheme).compress(W.clone(), st, ctx)
        assert _on_grid(Wq, ctx.quant), method
        assert ctx.quant.scheme.name == scheme
        if scheme != "fp8":  # a static activation scale: the largest |x| seen
            assert torch.equal(ctx.quant.input_amax, X.abs().max().reshape(1))
        else:
            assert ctx.quant.input_amax is None
        errs[method] = float(((W - Wq) @ X.T).square().sum())
    assert errs["gptq"] < 0.8 * errs["rtn"]


@pytest.mark.parametrize("scheme", ["fp8", "nvfp4"])
@pytest.mark.parametrize("static_groups", [False, True])
def test_gptq_without_error_feedback_is_rtn(scheme, static_groups):
    """With ``U = I`` (a diagonal Hessian) no column's error reaches another: GPTQ must round exactly as RTN."""
    W, _ = _layer(rows=8, cols=48)
    parsed = parse_scheme(scheme)
    if static_groups and parsed.granularity != "group":
        pytest.skip("static groups are for group-wise schemes")
    Q, scale, _, _ = gptq_quantize(W.clone(), torch.eye(48), parsed, blocksize=16, static_groups=static_groups)
    if scheme == "fp8":
        want, want_scale = fp8_weight(W)
    else:
        want, want_scale, _ = nvfp4_weight(W)
    assert torch.equal(Q, want) and torch.equal(scale, want_scale)


def test_gptq_float64_solve_stays_on_the_float32_grid():
    W, X = _layer(rows=8, cols=32)
    ctx = LayerContext("l")
    Wq = make_method("gptq", scheme="nvfp4", precision="float64").compress(W.clone(), _stats(X), ctx)
    assert Wq.dtype == torch.float32 and _on_grid(Wq, ctx.quant)


def test_fused_linears_share_one_nvfp4_global_scale():
    """q/k/v (one input) are solved together and get one global scale, over all three (vLLM fuses them)."""
    W, X = _layer(rows=24, cols=32)
    parts = [W[:8].clone(), W[8:16].clone() * 3, W[16:].clone()]
    for method in ("rtn", "gptq"):
        ctxs = [LayerContext(str(i)) for i in range(3)]
        make_method(method, scheme="nvfp4").compress_group([p.clone() for p in parts], _stats(X), ctxs)
        want = nvfp4_global_scale(parts[1].abs().max())
        assert all(torch.equal(c.quant.global_scale, want) for c in ctxs), method


def test_masked_weights_stay_zero():
    W, X = _layer(rows=8, cols=32)
    mask = torch.rand(8, 32, generator=torch.Generator().manual_seed(1)) < 0.5
    for method in ("rtn", "gptq"):
        for scheme in ("fp8", "nvfp4"):
            ctx = LayerContext("l", mask=mask)
            Wq = make_method(method, scheme=scheme).compress(W.clone(), _stats(X), ctx)
            assert torch.all(Wq[mask] == 0), (method, scheme)


def _max_input(model, ids, name):
    seen = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return max(seen)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("scheme", ["fp8-static", "nvfp4"])
def test_static_activation_scale_is_calibrated_and_applied(method, scheme):
    """Block 0's q_proj reads the normed embeddings (compression does not change them): its calibrated maximum
    is the largest |x| over the calibration tokens, and the forward uses that scale, saturating beyond it."""
    dense = tiny_model("llama")
    calib = token_batch()
    amax = _max_input(dense, calib, "model.layers.0.self_attn.q_proj")
    model = tiny_model("llama")
    report = compress(model, calib, make_method(method, scheme=scheme), progress=False)
    q = model.model.layers[0].self_attn.q_proj
    state = quant_state_of(q)
    assert torch.equal(state.input_amax, amax.reshape(1))
    record = next(r for r in report.layers if r.name == "model.layers.0.self_attn.q_proj")
    assert record.info["input_amax"] == float(amax) and record.info["scheme"] == scheme
    x = torch.randn(2, 64) * float(amax) * 10  # far beyond the calibrated range
    seen = []
    handle = q.register_forward_hook(lambda m, a, out: seen.append(a[0]))
    with torch.no_grad():
        q(x)
    handle.remove()
    assert float(seen[0].abs().max()) <= float(amax) * (1 + 1e-6)  # saturated at the calibrated maximum
    assert torch.equal(seen[0], state.fake_quant_input(x))


def test_fp8_dynamic_is_data_free_and_static_schemes_read_data():
    assert not make_method("rtn", scheme="fp8").reads_data()
    assert make_method("rtn", scheme="fp8-static").statistics == ("max_abs",)
    assert make_method("gptq", scheme="nvfp4").statistics == ("hessian", "max_abs")
    model = tiny_model("llama")
    report = compress(model, None, make_method("rtn", scheme="fp8"), progress=False)
    assert report.pipeline == "data-free"
    with pytest.raises(RecipeError, match="calibrat"):
        make_method("rtn", scheme="nvfp4").compress(torch.randn(4, 16), None, LayerContext("l"))


def test_restored_state_without_its_scale_says_so():
    lin = torch.nn.Linear(16, 4)
    attach_quant_state(lin, QuantState(parse_scheme("fp8-static")))
    with pytest.raises(Exception, match="input_amax.*re-run"):
        lin(torch.randn(2, 16))


# ---- schemes -----------------------------------------------------------------------------------------------


def test_scheme_names_and_effective_bits():
    for text, name in [("fp8", "fp8"), ("FP8-dynamic", "fp8"), ("fp8-static", "fp8-static"), ("nvfp4", "nvfp4"),
                       ("nvfp4g16", "nvfp4"), ("nvfp4-static", "nvfp4")]:
        assert parse_scheme(text).name == name
        assert parse_scheme(name) == parse_scheme(text)
    fp8, nv = parse_scheme("fp8"), parse_scheme("nvfp4")
    assert (fp8.fmt, fp8.act_bits, fp8.act_static, fp8.granularity) == ("fp8", 8, False, "channel")
    assert (nv.fmt, nv.bits, nv.group_size, nv.act_static) == ("nvfp4", 4, 16, True)
    assert fp8.effective_bits((64, 576)) == pytest.approx(8 + 16 / 576)
    assert nv.effective_bits((64, 576)) == pytest.approx(4 + 8 / 16 + 32 / (64 * 576))


@pytest.mark.parametrize("text, match", [
    ("nvfp4g32", "nvfp4 uses blocks of 16 .*not group size 32.*'nvfp4'"),
    ("nvfp4-channel", "nvfp4 uses blocks of 16"),
    ("fp8g128", "fp8 scales each output channel, not groups of 128"),
    ("nvfp4-dynamic", "no dynamic nvfp4"),
    ("fp8-static-dynamic", "both -static and -dynamic"),
    ("fp9", "unknown scheme 'fp9'.*fp8"),
])
def test_bad_float_schemes_are_one_line(text, match):
    with pytest.raises(RecipeError, match=match) as err:
        parse_scheme(text)
    assert "\n" not in str(err.value)


def test_nvfp4_group_size_checked_when_built_directly():
    from calibrant.methods.quant import QuantScheme

    with pytest.raises(RecipeError, match="blocks of 16"):
        QuantScheme(bits=4, group_size=32, granularity="group", act_bits=4, act_granularity="group", fmt="nvfp4",
                    act_static=True)


def test_missing_float8_names_the_torch_version(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    for scheme in ("fp8", "nvfp4"):
        with pytest.raises(RecipeError, match=rf"torch ≥ 2\.1 .*installed torch is {re.escape(torch.__version__)}.*pip"):
            make_method("gptq", scheme=scheme)  # refused when the recipe is made, before any model is loaded
    assert make_method("rtn", scheme="w8a8").scheme == "w8a8-channel"  # integer schemes do not need it


@pytest.mark.parametrize("scheme", ["fp8-static", "nvfp4", "fp8"])
def test_dequantized_export_restores_the_calibrated_activation_scale(tmp_path, scheme):
    """``--format hf`` stores dequantized floats; the calibrated maximum travels in calibrant.json (``input_amax``)
    and restore_activation_quant re-attaches the activation quantization: identical logits."""
    import transformers as T

    from calibrant.export import read_metadata, restore_activation_quant, save_model

    model = tiny_model("llama")
    report = compress(model, token_batch(), make_method("gptq", scheme=scheme), progress=False)
    ids = token_batch(n=2, length=16, seed=5)
    with torch.no_grad():
        logits = model(ids).logits
    out = save_model(model, None, tmp_path / "out", {"layers": [{"name": r.name, **r.info} for r in report.layers]})
    reloaded = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert restore_activation_quant(reloaded, read_metadata(out)) == len(report.layers)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def test_nvfp4_refuses_a_width_it_cannot_block_before_any_work():
    import transformers as T

    from tests.conftest import tiny_config

    config = tiny_config("llama")
    config.intermediate_size = 120  # down_proj reads 120 inputs: not a multiple of 16
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=r"blocks of 16, but model.layers.0.mlp.down_proj reads 120 inputs.*--exclude"):
        compress(model, token_batch(), make_method("gptq", scheme="nvfp4"), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    compress(model, token_batch(), make_method("rtn", scheme="nvfp4"), exclude=["down_proj"], progress=False)
    assert quant_state_of(model.model.layers[0].mlp.down_proj) is None
