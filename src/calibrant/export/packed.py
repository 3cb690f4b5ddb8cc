"""Packed integer export in the compressed-tensors format (what vLLM and transformers load).

Each quantized linear is written with its *integer* weights and calibrant's own scales and zero
points — the library is used for the on-disk layout (bit packing, config schema) and never to
recompute a scale. The integers are recovered exactly from the dequantized weight the engine left
in the model: ``q = round(W / scale) + zero`` (``W`` lies on the grid by construction; a weight that
does not is refused rather than silently re-rounded).

Convention mapping (calibrant → compressed-tensors, whose integers are always signed):

- symmetric: the same integers in ``[-2^(b-1), 2^(b-1) - 1]``, no zero point stored;
- asymmetric: calibrant's ``q, z ∈ [0, 2^b - 1]`` are shifted by ``-2^(b-1)`` into the signed range,
  which leaves ``(q - z) · s`` unchanged; zero points are stored (packed along the output dimension
  for channel/group strategies, as the library does);
- scales: per tensor ``[1]``, per channel ``[out, 1]``, per group ``[out, in / group_size]``.

Weight-only schemes are written as ``pack-quantized`` (all bit widths 2–8), schemes that also
quantize activations (w8a8, w4a8) as ``int-quantized`` with dynamic symmetric per-token (or
per-tensor) input quantization — the formats the library itself picks for those schemes.

Float schemes (:mod:`calibrant.methods.quant.floatgrid`), in the formats of the library's FP8_DYNAMIC /
NVFP4 presets with calibrant's own numbers:

- ``fp8`` / ``fp8-static`` → ``float-quantized``: ``weight`` in ``float8_e4m3fn`` ``[out, in]``,
  ``weight_scale`` ``[out, 1]`` (strategy channel); inputs per token and dynamic, or (``fp8-static``)
  per tensor with ``input_scale`` ``[1]`` float32 ``= amax / 448`` (``observer: static_minmax``);
- ``nvfp4`` → ``nvfp4-pack-quantized`` (strategy ``tensor_group``, group size 16): ``weight_packed``
  ``uint8 [out, in / 2]`` (two E2M1 codes a byte, low nibble first), ``weight_scale`` ``float8_e4m3fn
  [out, in / 16]``, ``weight_global_scale`` float32 ``[1]``; inputs ``dynamic: local`` (block scales at
  run time) under the calibrated ``input_global_scale`` float32 ``[1]``. Both global scales are
  multipliers (``448 · 6 / amax``): a value is ``e2m1 · weight_scale / weight_global_scale``.

Refused, with the alternative named: LoRC (the low-rank correction is not part of the format),
act-order GPTQ with dynamic groups (``g_idx``; compressed-tensors ≥ 0.20 removed it — rerun with
static groups), a group size that does not divide the input dimension (the format has no short
last group), layers that are not ``torch.nn.Linear`` (GPT-2's Conv1D), and models whose grid
parameters are unknown (loaded back from a dequantized directory). ``save_model`` (``--format hf``)
can always write any of them as dequantized floats.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibrant.cache import atomic_path, human_bytes, release_output
from calibrant.errors import CalibrantError, disk_errors
from calibrant.export.hf import METADATA_FILE, check_output
from calibrant.methods.quant import (
    QuantScheme,
    QuantState,
    expand_groups,
    group_slices,
    qrange,
    quant_state_of,
)

FORMAT_NAME = "compressed-tensors"
_HF_HINT = "use --format hf (dequantized floats), which can store any scheme"


class ExportError(CalibrantError):
    """A model cannot be written in the requested export format."""


def _ct() -> Any:
    try:
        import compressed_tensors
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ExportError(
            f"the compressed-tensors package is needed for --format {FORMAT_NAME} ({exc}); "
            f"pip install 'compressed-tensors>=0.20', or {_HF_HINT}"
        ) from None
    return compressed_tensors


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that carry calibrant's quantization state (:class:`QuantState`), by name."""
    return {n: m for n, m in model.named_modules() if quant_state_of(m) is not None}


def _ct_float_args(scheme: QuantScheme) -> tuple[Any, Any]:
    from compressed_tensors.quantization import QuantizationArgs

    if scheme.fmt == "nvfp4":
        fp8 = {"scale_dtype": torch.float8_e4m3fn, "zp_dtype": torch.float8_e4m3fn}
        weights = QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group",
                                   group_size=scheme.group_size, dynamic=False, **fp8)
        acts = QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group",
                                group_size=scheme.group_size, dynamic="local", observer="static_minmax", **fp8)
        return weights, acts
    weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel", dynamic=False)
    if scheme.act_static:
        acts = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False,
                                observer="static_minmax")
    else:
        acts = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
    return weights, acts


def _ct_args(scheme: QuantScheme) -> tuple[Any, Any | None]:
    from compressed_tensors.quantization import QuantizationArgs

    if scheme.float_fmt:
        return _ct_float_args(scheme)
    if scheme.granularity == "group":
        weights = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric, strategy="group",
                                   group_size=scheme.group_size)
    else:
        weights = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
                                   strategy=scheme.granularity)
    acts = None
    if scheme.act_bits:
        acts = QuantizationArgs(num_bits=scheme.act_bits, type="int", symmetric=True, dynamic=True,
                                strategy="token" if scheme.act_granularity == "token" else "tensor")
    return weights, acts


def _short_group_error(name: str, cols: int, scheme: QuantScheme) -> ExportError:
    if scheme.fmt == "nvfp4":
        return ExportError(f"{name} has {cols} input columns, not a multiple of 16: nvfp4 stores blocks of 16 — "
                           f"exclude it (--exclude), use fp8, or {_HF_HINT}")
    g = scheme.group_size or cols
    fit = next((d for d in range(g - 1, 0, -1) if cols % d == 0 and d & (d - 1) == 0), 1)  # a power of two
    return ExportError(
        f"{name} has {cols} input columns, not a multiple of group size {g}: {FORMAT_NAME} has no short last group "
        f"— use a group size that divides {cols} (e.g. w{scheme.bits}g{fit}) or {_HF_HINT}"
    )


def _check_representable(name: str, module: nn.Module, quant: QuantState) -> QuantScheme:
    scheme = quant.scheme
    if not quant.has_grid or (scheme.fmt == "nvfp4" and quant.global_scale is None):
        raise ExportError(
            f"{name} has no quantization grid (scales/zero points) in memory — a model loaded from a dequantized "
            f"directory cannot be packed; export right after compression (calibrant compress --format {FORMAT_NAME})"
        )
    if not isinstance(module, nn.Linear):
        raise ExportError(
            f"{name} is a {type(module).__name__}, not torch.nn.Linear; {FORMAT_NAME} packs Linear layers only — {_HF_HINT}"
        )
    if quant.unpackable:
        raise ExportError(f"{name}: {quant.unpackable} — {_HF_HINT}")
    if scheme.act_static and quant.input_amax is None:
        raise ExportError(f"{name}: scheme {scheme.name} needs its calibrated activation scale, which this model "
                          f"does not carry; export right after compression, or {_HF_HINT}")
    if quant.lorc:
        raise ExportError(
            f"scheme {scheme.name} adds a LoRC low-rank correction, which {FORMAT_NAME} cannot store — {_HF_HINT}, "
            "or quantize without +lorc"
        )
    if quant.act_order:
        raise ExportError(
            f"{name} was quantized with act-order and dynamic groups (a g_idx column→group map), which "
            f"{FORMAT_NAME} ≥ 0.20 no longer stores — rerun GPTQ with --static-groups (or without --act-order), "
            f"or {_HF_HINT}"
        )
    cols = module.in_features
    if scheme.granularity == "group" and cols % scheme.group_size:
        raise _short_group_error(name, cols, scheme)
    g_idx = quant.g_idx
    if g_idx is not None and scheme.granularity == "group":
        contiguous = torch.arange(cols, device=g_idx.device) // scheme.group_size
        if not torch.equal(g_idx.long(), contiguous):
            raise ExportError(
                f"{name} uses non-contiguous groups (g_idx), which {FORMAT_NAME} ≥ 0.20 cannot store — rerun GPTQ "
                f"with --static-groups, or {_HF_HINT}"
            )
    return scheme


EXPORT_FORMATS = ("hf", "compressed-tensors", "packed", "gguf")  # "packed" is an alias of compressed-tensors


def normalize_format(export_format: str) -> str:
    """``"hf"``, ``"compressed-tensors"`` or ``"gguf"``; anything else is refused with the valid choices."""
    fmt = str(export_format).strip().lower()
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format '{export_format}'; choose hf (dequantized floats), "
                          f"{FORMAT_NAME} (packed integers, loads in vLLM) or gguf (llama.cpp)")
    return fmt if fmt in ("hf", "gguf") else FORMAT_NAME


def check_packable_recipe(methods: Iterable[Any], model: nn.Module | None = None,
                          include: Iterable[str] | None = None, exclude: Iterable[str] | None = None) -> None:
    """Refuse, before any compression work, a recipe whose result compressed-tensors cannot store.

    With ``model``, also checks every selected linear's input width against the group size.
    """
    planned = [state for m in methods if (state := m.quant_plan()) is not None]
    if not planned:
        raise ExportError(f"the recipe quantizes nothing, so there is nothing to pack into {FORMAT_NAME}; add a "
                          "quantization method (e.g. --method gptq --scheme w4g64) or save with --format hf")
    for state in planned:
        scheme = state.scheme
        if scheme.gguf is not None:
            raise ExportError(f"scheme {scheme.name} is llama.cpp's grid: write it with --format gguf (or --format hf)")
        if state.unpackable:
            raise ExportError(f"{state.unpackable} — {_HF_HINT}")
        if state.lorc:
            raise ExportError(f"scheme {scheme.name} adds a LoRC low-rank correction, which {FORMAT_NAME} cannot "
                              f"store — {_HF_HINT}, or quantize without +lorc")
        if state.act_order:
            raise ExportError(f"GPTQ act-order with dynamic groups needs a g_idx map, which {FORMAT_NAME} ≥ 0.20 no "
                              f"longer stores — add --static-groups (or drop --act-order), or {_HF_HINT}")
        if model is None or scheme.granularity != "group":
            continue
        from calibrant.engine.plan import selected
        from calibrant.models.adapter import Adapter, in_features

        adapter = Adapter(model)
        for i in range(len(adapter.blocks)):
            for name, lin in adapter.block_linears(i).items():
                cols = in_features(lin)
                if cols % scheme.group_size and selected(name, include and list(include), exclude and list(exclude)):
                    raise _short_group_error(name, cols, scheme)


def integer_weight(name: str, weight: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor,
                   zero: torch.Tensor) -> torch.Tensor:
    """calibrant's integers ``q = round(W / s) + z`` (in calibrant's range) from a dequantized ``[out, in]`` weight.

    Refuses a weight that is not on its grid (changed after compression) instead of re-rounding it.
    """
    W = weight.detach().to(torch.float32)
    cols = W.shape[1]
    s = expand_groups(scale.to(W.device, torch.float32), cols, scheme)
    z = expand_groups(zero.to(W.device, torch.float32), cols, scheme)
    exact = W / s + z
    q = torch.round(exact)
    lo, hi = qrange(scheme.bits, scheme.symmetric)
    off_grid = float((exact - q).abs().max()) if W.numel() else 0.0
    limit = 0.01 if weight.dtype in (torch.float32, torch.float64) else 0.3  # 16-bit weights carry their own rounding
    if off_grid > limit or (W.numel() and (q.min() < lo or q.max() > hi)):
        raise ExportError(
            f"{name}'s weights are not on their {scheme.name} grid (off by up to {off_grid:.3g} steps, or outside "
            f"[{lo}, {hi}]); was the model changed after compression? Re-run the compression, or {_HF_HINT}"
        )
    return q


def float_codes(name: str, weight: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor) -> torch.Tensor:
    """The E4M3 (``fp8``) or E2M1 (``nvfp4``) codes ``W / scale`` (float32, on the grid) of a dequantized weight,
    ``scale`` being the effective ``[out, n_groups]`` scale; refuses a weight that is off its grid."""
    from calibrant.methods.quant import round_e2m1, round_e4m3

    W = weight.detach().to(torch.float32)
    exact = W / expand_groups(scale.to(W.device, torch.float32), W.shape[1], scheme)
    if scheme.fmt == "fp8":
        q = round_e4m3(exact)
        spacing = torch.exp2(torch.floor(torch.log2(q.abs().clamp(min=2.0**-6))) - 3)  # subnormals: 2^-9
    else:
        q = round_e2m1(exact)
        spacing = torch.where(q.abs() < 2, 0.5, torch.where(q.abs() < 4, 1.0, 2.0))
    off_grid = float(((exact - q).abs() / spacing).max()) if W.numel() else 0.0
    limit = 0.01 if weight.dtype in (torch.float32, torch.float64) else 0.3  # 16-bit weights carry their own rounding
    if not off_grid <= limit:
        raise ExportError(
            f"{name}'s weights are not on their {scheme.name} grid (off by up to {off_grid:.3g} steps); was the model "
            f"changed after compression? Re-run the compression, or {_HF_HINT}"
        )
    return q


def _float_tensors(name: str, module: nn.Linear, quant: QuantState, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    from calibrant.methods.quant.floatgrid import nvfp4_effective

    weight = module.weight.data.cpu()
    rows, cols = weight.shape
    scale = quant.scale.detach().to(torch.float32).cpu()
    n_groups = len(group_slices(cols, scheme))
    if tuple(scale.shape) != (rows, n_groups):
        raise ExportError(f"{name}: scales of shape {tuple(scale.shape)} do not match {scheme.name} on a "
                          f"{tuple(weight.shape)} weight; re-run the compression")
    if scheme.fmt == "nvfp4":
        global_scale = quant.global_scale.detach().to(torch.float32).cpu().reshape(1)
        q = float_codes(name, weight, scheme, nvfp4_effective(scale, global_scale))
        out = {"weight_packed": pack_fp4_to_uint8(q), "weight_scale": scale.to(torch.float8_e4m3fn),
               "weight_global_scale": global_scale, "input_global_scale": quant.input_global_scale.cpu()}
    else:
        q = float_codes(name, weight, scheme, scale)
        scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        out = {"weight": q.to(torch.float8_e4m3fn), "weight_scale": scale.to(scale_dtype)}
        if scheme.act_static:
            out["input_scale"] = quant.input_scale.cpu()
    return {k: v.contiguous().clone() for k, v in out.items()}  # own storage: fused linears share a global scale


def _module_tensors(name: str, module: nn.Linear, quant: QuantState, scheme: QuantScheme, fmt: str,
                    pack_to_int32: Any) -> dict[str, torch.Tensor]:
    """The tensors that replace one quantized linear's ``weight`` in the checkpoint, under their local names."""
    if scheme.float_fmt:
        return _float_tensors(name, module, quant, scheme)
    weight = module.weight.data
    scale = quant.scale.detach().to(torch.float32).cpu()
    zero = quant.zero.detach().to(torch.float32).cpu()
    rows = weight.shape[0]
    if scale.dim() == 1:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    n_groups = len(group_slices(weight.shape[1], scheme))
    if scheme.granularity != "tensor" and tuple(scale.shape) != (rows, n_groups):
        raise ExportError(f"{name}: scales of shape {tuple(scale.shape)} do not match {scheme.name} on a "
                          f"{tuple(weight.shape)} weight; re-run the compression")
    q = integer_weight(name, weight.cpu(), scheme, scale.expand(rows, n_groups), zero.expand(rows, n_groups))
    shift = 0 if scheme.symmetric else 2 ** (scheme.bits - 1)  # compressed-tensors integers are signed
    q_ct = (q - shift).to(torch.int8)
    zp_ct = (zero - shift).to(torch.int8)
    scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    if scheme.granularity == "tensor":
        if not (torch.all(scale == scale[0, 0]) and torch.all(zero == zero[0, 0])):
            raise ExportError(f"{name}: per-tensor scheme {scheme.name} but the rows carry different scales")
        scale, zp_ct = scale[0, :1].clone(), zp_ct[0, :1].clone()
    out: dict[str, torch.Tensor] = {"weight_scale": scale.to(scale_dtype).contiguous()}
    if fmt == "pack-quantized":
        out["weight_packed"] = pack_to_int32(q_ct, scheme.bits)
        out["weight_shape"] = torch.tensor(tuple(weight.shape))
        if not scheme.symmetric:
            grouped = scheme.granularity in ("group", "channel")
            out["weight_zero_point"] = pack_to_int32(zp_ct, scheme.bits, packed_dim=0) if grouped else zp_ct
    else:  # int-quantized: one int8 per weight
        out["weight"] = q_ct.contiguous()
        if not scheme.symmetric:
            out["weight_zero_point"] = zp_ct.contiguous()
    return out


def _other_linears(model: nn.Module, quantized: Iterable[str]) -> list[str]:
    done = set(quantized)
    return sorted({n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in done})


def build_packed(model: nn.Module) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
    """(state dict with packed layers, a library ``ModelCompressor`` holding the config, a summary); writes nothing."""
    ct = _ct()
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    layers = quantized_linears(model)
    if not layers:
        raise ExportError(
            f"the model has no quantized layers, so there is nothing to pack into {FORMAT_NAME}; quantize it first "
            "(e.g. --method gptq --scheme w4g64) or save it with --format hf"
        )
    schemes = {name: _check_representable(name, m, m.calibrant_quant) for name, m in layers.items()}
    # one config group per distinct scheme
    groups: dict[str, list[str]] = {}
    for name, scheme in schemes.items():
        groups.setdefault(scheme.name, []).append(name)
    ct_schemes: dict[str, Any] = {}
    formats: dict[str, str] = {}
    single = len(groups) == 1
    for i, (scheme_name, names) in enumerate(groups.items()):
        weights, acts = _ct_args(schemes[names[0]])
        targets = ["Linear"] if single else sorted(names)
        probe = QuantizationScheme(targets=targets, weights=weights, input_activations=acts)
        fmt = infer_module_format(nn.Linear, probe).value
        formats[scheme_name] = fmt
        ct_schemes[f"group_{i}"] = QuantizationScheme(targets=targets, weights=weights, input_activations=acts,
                                                      format=fmt)
    ignore = _other_linears(model, layers) if single else []
    global_format = next(iter(formats.values())) if len(set(formats.values())) == 1 else "mixed-precision"
    qconfig = QuantizationConfig(config_groups=ct_schemes, format=global_format, quantization_status="compressed",
                                 ignore=ignore)

    state = model.state_dict()
    packed_bytes = dense_bytes = 0
    for name, module in layers.items():
        scheme = schemes[name]
        tensors = _module_tensors(name, module, module.calibrant_quant, scheme, formats[scheme.name], pack_to_int32)
        dense_bytes += module.weight.numel() * module.weight.element_size()
        del state[f"{name}.weight"]  # the bias, if any, stays as it is
        for key, t in tensors.items():
            state[f"{name}.{key}"] = t
            packed_bytes += t.numel() * t.element_size()
    compressor = ModelCompressor(quantization_config=qconfig)
    summary = {
        "format": FORMAT_NAME,
        "compressed_tensors_version": ct.__version__,
        "quantization_format": global_format,
        "schemes": {s: {"format": formats[s], "layers": len(n)} for s, n in groups.items()},
        "quantized_layers": len(layers),
        "quantized_weight_bytes": packed_bytes,
        "dense_weight_bytes": dense_bytes,
    }
    return state, compressor, summary


def save_packed(
    model: nn.Module, tokenizer: Any, out: str | Path, metadata: dict[str, Any], overwrite: bool = False
) -> Path:
    """Write ``model`` as a compressed-tensors directory (packed integers + scales/zero points + config).

    Loads with ``transformers.AutoModelForCausalLM.from_pretrained(out)`` (compressed-tensors installed)
    and with vLLM. Everything that can be refused is refused before anything is written.
    """
    out = check_output(out, overwrite)
    state, compressor, summary = build_packed(model)
    needed = sum(t.numel() * t.element_size() for t in state.values())
    with disk_errors(str(out), human_bytes(needed)), atomic_path(out, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        compressor.update_config(str(tmp))  # adds quantization_config (quant_method: compressed-tensors)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {**metadata, "export": summary}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    release_output(out)
    return out
