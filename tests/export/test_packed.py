"""Packed compressed-tensors export: reload through transformers reproduces the fake-quant model exactly,
the files are really smaller, the config states calibrant's scheme, and what the format cannot hold is
refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from safetensors import safe_open

from calibrant.api import compress_model
from calibrant.cli import main
from calibrant.engine import compress
from calibrant.errors import CalibrantError, OutputExistsError
from calibrant.export import ExportError, read_metadata, save_model, save_packed
from calibrant.methods import make_method
from tests.calibration.calib_helpers import tiny_model_dir
from tests.conftest import tiny_model, token_batch

pytest.importorskip("compressed_tensors")

# transformers' compressed load path (decompress on first forward) builds asymmetric group/channel
# zero points unpacked, while compressed-tensors' own compressor (and vLLM) store them packed along the
# output dimension: asymmetric exports reload with dequantize=True (llm-compressor issue #1618).
DEQUANTIZE = {"quantization_config": T.CompressedTensorsConfig(dequantize=True)}


def _quantized(method: str, scheme: str, **params) -> torch.nn.Module:
    model = tiny_model("llama")
    method_obj = make_method(method, scheme=scheme, **params)
    compress(model, token_batch() if method_obj.reads_data() else None, method_obj, progress=False)
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch(n=2, length=16, seed=5)).logits


def _qconfig(path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict


@pytest.mark.parametrize(
    ("method", "scheme", "params", "fmt", "strategy"),
    [
        ("gptq", "w4g16", {}, "pack-quantized", "group"),
        ("rtn", "w8-channel", {}, "pack-quantized", "channel"),
        ("gptq", "w4g16-asym", {}, "pack-quantized", "group"),
        ("gptq", "w3g32", {}, "pack-quantized", "group"),
        ("rtn", "w4-tensor", {}, "pack-quantized", "tensor"),
        ("rtn", "w2g32-asym", {}, "pack-quantized", "group"),
        ("gptq", "w8-channel-asym", {}, "pack-quantized", "channel"),
        ("gptq", "w4g16-mse", {"act_order": True, "static_groups": True}, "pack-quantized", "group"),
    ],
)
def test_packed_reload_reproduces_fake_quant_logits(tmp_path, method, scheme, params, fmt, strategy):
    model = _quantized(method, scheme, **params)
    out = save_packed(model, None, tmp_path / "packed", {"recipe": scheme})
    cfg = _qconfig(out)
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == fmt
    assert cfg["quantization_status"] == "compressed" and cfg["ignore"] == ["lm_head"]
    (group,) = cfg["config_groups"].values()
    w = group["weights"]
    bits = int(scheme[1])
    assert (w["num_bits"], w["type"], w["strategy"], w["symmetric"]) == (bits, "int", strategy, "asym" not in scheme)
    assert w["group_size"] == (int(scheme.split("g")[1].split("-")[0]) if strategy == "group" else None)
    assert group["input_activations"] is None and group["targets"] == ["Linear"]
    assert read_metadata(out)["export"]["format"] == "compressed-tensors"

    expected = _logits(model)
    loads = [DEQUANTIZE] if "asym" in scheme else [{}, DEQUANTIZE]
    for kwargs in loads:
        reloaded = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs).eval()
        torch.testing.assert_close(_logits(reloaded), expected, atol=1e-5, rtol=0)

    tensors = _tensors(out)
    q = model.model.layers[0].self_attn.q_proj
    packed = tensors["model.layers.0.self_attn.q_proj.weight_packed"]
    assert packed.dtype == torch.int32 and packed.numel() * 32 == q.weight.numel() * bits  # dense bit packing
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    assert ("model.layers.0.self_attn.q_proj.weight_zero_point" in tensors) == ("asym" in scheme)


def test_packed_files_are_smaller_than_dense(tmp_path):
    model = _quantized("gptq", "w4g16")
    dense = save_model(model, None, tmp_path / "dense", {})
    packed = save_packed(model, None, tmp_path / "packed", {})
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(packed) < 0.4 * size(dense)
    summary = read_metadata(packed)["export"]
    # 4 bits + one fp32 scale per 16 weights = 6 bits per weight, against 32
    assert summary["quantized_weight_bytes"] == pytest.approx(summary["dense_weight_bytes"] * 6 / 32, rel=0.01)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8g16", "w8a8t"])
def test_activation_schemes_are_int_quantized_with_dynamic_inputs(tmp_path, scheme):
    model = _quantized("gptq", scheme)
    out = save_packed(model, None, tmp_path / "packed", {})
    cfg = _qconfig(out)
    assert cfg["format"] == "int-quantized"
    (group,) = cfg["config_groups"].values()
    acts = group["input_activations"]
    assert (acts["num_bits"], acts["type"], acts["symmetric"], acts["dynamic"]) == (8, "int", True, True)
    assert acts["strategy"] == ("tensor" if scheme.endswith("t") else "token")
    assert _tensors(out)["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    # the integer weights decompress to exactly the fake-quantized ones
    reloaded = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **DEQUANTIZE).eval()
    state = reloaded.state_dict()
    for name, module in model.named_modules():
        if hasattr(module, "calibrant_quant"):
            assert torch.equal(state[f"{name}.weight"], module.weight), name
    # loaded compressed, the library simulates the dynamic input quantization itself; its scale is
    # amax/127.5 where calibrant (and vLLM's int8 kernels) use amax/127, hence a looser tolerance
    simulated = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert simulated.model.layers[0].self_attn.q_proj.quantization_scheme.input_activations.dynamic is True
    assert (_logits(simulated) - _logits(model)).abs().max() < 0.05


def test_refusals_say_which_format_can(tmp_path):
    out = tmp_path / "packed"
    cases = [
        (_quantized("rtn", "w4g16+lorc4"), "LoRC.*--format hf"),
        (_quantized("gptq", "w4g48"), "64 input columns, not a multiple of group size 48.*w4g32.*--format hf"),
        (_quantized("gptq", "w4g16", act_order=True), "act-order.*--static-groups.*--format hf"),
    ]
    for model, message in cases:
        with pytest.raises(ExportError, match=message):
            save_packed(model, None, out, {})
        assert not out.exists()
    pruned = tiny_model("llama")
    compress(pruned, token_batch(), make_method("wanda", sparsity=0.5), progress=False)
    with pytest.raises(ExportError, match="no quantized layers.*--format hf"):
        save_packed(pruned, None, out, {})
    gpt2 = tiny_model("gpt2")
    compress(gpt2, None, make_method("rtn", scheme="w8-channel"), progress=False)
    with pytest.raises(ExportError, match="Conv1D.*--format hf"):
        save_packed(gpt2, None, out, {})
    changed = _quantized("gptq", "w4g16")  # packable until a weight leaves its grid
    with torch.no_grad():
        changed.model.layers[1].mlp.up_proj.weight.mul_(1.01)
    with pytest.raises(ExportError, match="up_proj.*not on their w4g16 grid"):
        save_packed(changed, None, out, {})
    assert list(tmp_path.iterdir()) == []
    assert issubclass(ExportError, CalibrantError)


def test_existing_output_refused_unless_overwrite(tmp_path):
    model = _quantized("rtn", "w8-channel")
    out = tmp_path / "packed"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_packed(model, None, out, {})
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(OutputExistsError, match="not a calibrant output"):
        save_packed(model, None, out, {}, overwrite=True)  # --overwrite never deletes a user's own files
    (out / "calibrant.json").write_text("{}")  # an earlier calibrant output is replaced
    save_packed(model, None, out, {}, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


TEXT = " ".join(f"word{i % 50} and the of" for i in range(400))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), TEXT)


def test_api_and_cli_export_format(tiny_dir, tmp_path, capsys):
    out = tmp_path / "api"
    result = compress_model(tiny_dir, "rtn", scheme="w4g32", out=out, export_format="compressed-tensors",
                            progress=False)
    assert _qconfig(out)["format"] == "pack-quantized" and (out / "tokenizer.json").is_file()
    reloaded = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.loaded.model(ids).logits, atol=1e-5, rtol=0)

    code = main(["compress", "--model", str(tiny_dir), "--method", "rtn", "--scheme", "w8-channel", "--format",
                 "compressed-tensors", "--out", str(tmp_path / "cli"), "--quiet"])
    assert code == 0 and _qconfig(tmp_path / "cli")["config_groups"]["group_0"]["weights"]["num_bits"] == 8

    # refused before the model is loaded or anything is written
    for method, params, message in [
        ("rtn", {"scheme": "w4g16+lorc2"}, "LoRC"),
        ("wanda", {"sparsity": 0.5}, "quantizes nothing"),
        ("gptq", {"scheme": "w4g16", "act_order": True}, "--static-groups"),
        ("rtn", {"scheme": "w4g48"}, "not a multiple of group size 48"),  # checked after load, before compressing
    ]:
        with pytest.raises(ExportError, match=message):
            compress_model(tiny_dir, method, out=tmp_path / "bad", export_format="compressed-tensors",
                           calibration=None, progress=False, **params)
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        compress_model(tiny_dir, "rtn", scheme="w4g32", out=tmp_path / "bad", export_format="onnx", progress=False)
    assert not (tmp_path / "bad").exists()
    capsys.readouterr()
    code = main(["compress", "--model", str(tiny_dir), "--method", "rtn", "--scheme", "w4g16+lorc2", "--format",
                 "compressed-tensors", "--out", str(tmp_path / "bad"), "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2 and "LoRC" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("scheme, bits", [("w4g32", 4 + 2 * 16 / 32), ("w8-channel", None)])
def test_info_reads_a_packed_export_as_stored(tiny_dir, tmp_path, capsys, scheme, bits):
    """info on a compressed-tensors export: every quantized linear listed with its real shape and its bytes
    on disk per weight, the parameter count of the model, no 'dequantized floats' or sparsity note."""
    out = tmp_path / "packed"
    result = compress_model(tiny_dir, "rtn", scheme=scheme, out=out, export_format="compressed-tensors",
                            progress=False)
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    linears = {n: m for n, m in result.loaded.model.named_modules() if isinstance(m, torch.nn.Linear)
               and n != "lm_head"}
    for name, module in linears.items():
        line = next(row for row in text.splitlines() if row.startswith(f"{name}.weight "))
        assert f"{module.out_features}x{module.in_features}" in line
        stored = float(line.split()[-1])
        n = module.out_features * module.in_features
        shape = 2 * 64 / n  # the int64 weight_shape tensor
        if bits is not None:  # packed int4, a 16-bit scale and zero point per group of 32
            assert stored == pytest.approx(bits + shape, abs=1e-3), line
        else:  # int8, one float32 scale per row
            assert stored == pytest.approx(8 + 32 / module.in_features + shape, abs=1e-3), line
    params = sum(p.numel() for p in result.loaded.model.parameters())
    assert f": {params:,} parameters" in text
    assert "dequantized floats" not in text and "unstructured sparsity" not in text


# ---- float schemes: fp8 (float-quantized) and nvfp4 (nvfp4-pack-quantized) ---------------------------------

QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantized_modules(model):
    return {n: m for n, m in model.named_modules() if n.endswith(QUANTIZED)}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("scheme", ["fp8", "fp8-static"])
def test_fp8_export_reloads_in_transformers_with_identical_logits(tmp_path, method, scheme):
    """Loaded by transformers as it is stored (compressed-tensors decompresses the E4M3 weights with their
    per-channel scales and quantizes each linear's input itself: per token, or with the stored input_scale),
    a float32 model gives exactly the logits of calibrant's fake-quant model."""
    model = _quantized(method, scheme)
    out = save_packed(model, None, tmp_path / "packed", {})
    cfg = _qconfig(out)
    assert cfg["format"] == "float-quantized" and cfg["ignore"] == ["lm_head"]
    (group,) = cfg["config_groups"].values()
    w, a = group["weights"], group["input_activations"]
    assert (w["num_bits"], w["type"], w["strategy"], w["symmetric"], w["dynamic"]) == (8, "float", "channel", True, False)
    static = scheme == "fp8-static"
    assert (a["num_bits"], a["type"], a["symmetric"]) == (8, "float", True)
    assert (a["strategy"], a["dynamic"]) == (("tensor", False) if static else ("token", True))
    assert a.get("observer") == ("static_minmax" if static else None)

    tensors = _tensors(out)
    for name, module in _quantized_modules(model).items():
        state = module.calibrant_quant
        assert tensors[f"{name}.weight"].dtype == torch.float8_e4m3fn
        assert torch.equal(tensors[f"{name}.weight"].float() * tensors[f"{name}.weight_scale"], module.weight)
        assert torch.equal(tensors[f"{name}.weight_scale"], state.scale) and state.scale.shape == (module.out_features, 1)
        if static:
            assert torch.equal(tensors[f"{name}.input_scale"], state.input_amax / 448)
        else:
            assert f"{name}.input_scale" not in tensors

    expected = _logits(model)
    reloaded = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(_logits(reloaded), expected)
    for name, module in _quantized_modules(reloaded).items():
        assert torch.equal(module.weight, dict(model.named_modules())[name].weight), name
    # dequantize=True: the same weights, the input quantization dropped (so the logits move, slightly)
    dense = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **DEQUANTIZE).eval()
    assert torch.equal(dense.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
    assert 0 < (_logits(dense) - expected).abs().max() < 0.1


def _ct_reload_nvfp4(path):
    """The checkpoint read back with compressed-tensors' own maths in float32: unpack_fp4_from_uint8 and
    dequantize (weight_scale / weight_global_scale per block of 16) for the weights; for the inputs, the
    library's dynamic block scales under input_global_scale (compute_dynamic_scales_and_zp) and fake_quantize."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    (group,) = _qconfig(path)["config_groups"].values()
    wargs, aargs = QuantizationArgs(**group["weights"]), QuantizationArgs(**group["input_activations"])
    tensors = _tensors(path)
    prefixes = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")}
    state = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in prefixes}
    for p in prefixes:
        packed = tensors[f"{p}.weight_packed"]
        codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
        state[f"{p}.weight"] = dequantize(codes, tensors[f"{p}.weight_scale"].to(torch.float32), args=wargs,
                                          global_scale=tensors[f"{p}.weight_global_scale"], dtype=torch.float32)
    model = T.AutoModelForCausalLM.from_config(T.AutoConfig.from_pretrained(path)).eval()
    model.load_state_dict(state, strict=True)
    for p in prefixes:
        gs = tensors[f"{p}.input_global_scale"]

        def quantize_input(module, args, gs=gs):
            scale, zero = compute_dynamic_scales_and_zp(args[0], aargs, module, global_scale=gs)
            return (fake_quantize(args[0], scale, zero, aargs, global_scale=gs), *args[1:])

        model.get_submodule(p).register_forward_pre_hook(quantize_input)
    return model


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nvfp4_export_reloads_with_identical_logits(tmp_path, method):
    """transformers cannot run an NVFP4 checkpoint in float32 on CPU: compressed-tensors (0.20) unpacks the E2M1
    codes to bfloat16, so the decompressed weight meets float32 inputs (a dtype error), and dequantize=True
    rounds the weights to bfloat16 and drops the input quantization. The checkpoint is therefore read back
    with compressed-tensors' own unpacking, dequantization and input fake-quant in float32 (``_ct_reload_nvfp4``),
    which gives exactly the logits of calibrant's fake-quant model; and transformers, loading it in bfloat16,
    decompresses exactly calibrant's weights cast to bfloat16."""
    model = _quantized(method, "nvfp4")
    out = save_packed(model, None, tmp_path / "packed", {})
    cfg = _qconfig(out)
    assert cfg["format"] == "nvfp4-pack-quantized"
    (group,) = cfg["config_groups"].values()
    for args, dynamic in ((group["weights"], False), (group["input_activations"], "local")):
        assert (args["num_bits"], args["type"], args["strategy"], args["group_size"], args["symmetric"]) == (
            4, "float", "tensor_group", 16, True)
        assert args["dynamic"] == dynamic and args["scale_dtype"] == "torch.float8_e4m3fn"

    tensors = _tensors(out)
    for name, module in _quantized_modules(model).items():
        state, (rows, cols) = module.calibrant_quant, module.weight.shape
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        assert packed.dtype == torch.uint8 and packed.shape == (rows, cols // 2)
        assert scale.dtype == torch.float8_e4m3fn and torch.equal(scale.float(), state.scale)
        assert torch.equal(tensors[f"{name}.weight_global_scale"], state.global_scale)
        assert torch.equal(tensors[f"{name}.input_global_scale"], torch.tensor([448.0 * 6]) / state.input_amax)
        assert f"{name}.weight" not in tensors
    for block in ("model.layers.0.self_attn.", "model.layers.1.mlp."):  # fused linears share one global scale
        scales = {float(v) for k, v in tensors.items() if k.startswith(block) and k.endswith("weight_global_scale")
                  and "o_proj" not in k and "down_proj" not in k}
        assert len(scales) == 1
    summary = read_metadata(out)["export"]  # 4 bits + an E4M3 scale per 16 weights, two float32 per layer
    assert summary["quantized_weight_bytes"] == pytest.approx(summary["dense_weight_bytes"] * 4.5 / 32, rel=0.01)

    torch.testing.assert_close(_logits(_ct_reload_nvfp4(out)), _logits(model), atol=0, rtol=0)

    reloaded = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    _logits(reloaded)  # compressed-tensors decompresses on the first forward
    for name, module in _quantized_modules(reloaded).items():
        assert torch.equal(module.weight, dict(model.named_modules())[name].weight.to(torch.bfloat16)), name


def test_float_export_refusals(tmp_path):
    out = tmp_path / "packed"
    changed = _quantized("gptq", "nvfp4")
    with torch.no_grad():
        changed.model.layers[1].mlp.up_proj.weight.mul_(1.01)
    with pytest.raises(ExportError, match="up_proj.*not on their nvfp4 grid"):
        save_packed(changed, None, out, {})
    unscaled = _quantized("rtn", "fp8-static")
    unscaled.model.layers[0].mlp.down_proj.calibrant_quant.input_amax = None
    with pytest.raises(ExportError, match="down_proj.*calibrated activation scale.*--format hf"):
        save_packed(unscaled, None, out, {})
    assert not out.exists()


def test_cli_float_schemes(tiny_dir, tmp_path, capsys):
    code = main(["compress", "--model", str(tiny_dir), "--method", "rtn", "--scheme", "fp8", "--format",
                 "compressed-tensors", "--out", str(tmp_path / "fp8"), "--quiet"])
    assert code == 0 and _qconfig(tmp_path / "fp8")["format"] == "float-quantized"
    capsys.readouterr()
    assert main(["info", str(tmp_path / "fp8")]) == 0
    line = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("model.layers.0.mlp.down_proj.weight "))
    assert line.split()[-2:] == ["fp8", "8.500"]  # E4M3 weights and a float32 scale per row of 64
    for scheme, message in [("nvfp4g32", "nvfp4 uses blocks of 16"), ("fp8g64", "fp8 scales each output channel")]:
        code = main(["compress", "--model", str(tiny_dir), "--method", "gptq", "--scheme", scheme, "--format",
                     "compressed-tensors", "--out", str(tmp_path / "bad"), "--quiet"])
        _, err = capsys.readouterr()
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
