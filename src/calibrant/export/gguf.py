"""GGUF export (what llama.cpp, Ollama and LM Studio load): the codes calibrant chose, on llama.cpp's block grids.

Linears quantized with a ``gguf-*`` scheme (:mod:`calibrant.methods.quant.ggufgrid`) are written in that
type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) with calibrant's own float16 scales and minima; their codes are
recovered exactly from the dequantized weight the engine left (a weight off its grid is refused, never
re-rounded), so a GGUF reader dequantizes each tensor to calibrant's fake-quant weight bit for bit.
Everything else is written unquantized and reported per tensor: 1-D tensors (norms, biases) as F32, other
tensors (embeddings, output head, linears the recipe left dense) as F16, or F32 with ``gguf_type="f32"``.

Layout: tensor names are llama.cpp's (``gguf.TensorNameMap``), and the rows of ``q_proj``/``k_proj`` are
permuted per head back to llama.cpp's rotary order (the inverse of what the GGUF import undoes), so a
GGUF → calibrant → GGUF round trip gives llama.cpp's layout back. Row permutations keep blocks whole.

Metadata: a model converted from a ``.gguf`` keeps that file's keys beside it
(:mod:`calibrant.models.ggufmeta`); they are copied (tokenizer, chat template, ``general.*``,
hyper-parameters), ``general.file_type`` is updated and calibrant's provenance added under ``calibrant.*``.
A model without that record is written with the llama hyper-parameters from its config and no tokenizer
only when no tokenizer is given (API use); otherwise refused, naming the fix. Llama-architecture models
only (SmolLM2, Llama, TinyLlama, …).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calibrant.cache import atomic_path, check_space, human_bytes, release_output
from calibrant.errors import disk_errors
from calibrant.export.hf import check_output_file
from calibrant.export.packed import ExportError
from calibrant.methods.quant import QuantScheme, quant_state_of
from calibrant.methods.quant.ggufgrid import GGUF_BLOCK, GGUF_TYPES, GGUFType, recover_codes
from calibrant.models.ggufmeta import KV, SOURCE_KV_FILE, add_kv, read_kv

FORMAT_NAME = "gguf"
GGUF_FAMILIES = {"llama": "llama"}  # Hugging Face model_type → GGUF architecture
GGUF_EXPORT_TYPES = (*GGUF_TYPES, "f16", "f32")


def scheme_for(scheme: QuantScheme) -> str:
    """The GGUF scheme closest to an integer scheme, to name in a refusal."""
    if scheme.bits >= 6:
        return "gguf-q8_0"
    return f"gguf-q{5 if scheme.bits == 5 else 4}_{0 if scheme.symmetric else 1}"


def _require_grid(scheme: QuantScheme) -> None:
    if scheme.gguf is None:
        raise ExportError(f"--format gguf stores llama.cpp's block grids, and scheme {scheme.name} is not one; "
                          f"quantize onto the grid the file will hold, e.g. --scheme {scheme_for(scheme)}")


def check_gguf_recipe(methods: list[Any], gguf_type_name: str | None = None, model: nn.Module | None = None,
                      source_dir: Path | None = None, tokenizer: Any = None) -> str:
    """Refuse, before any work, a recipe or model the GGUF writer cannot store; returns the file's type name."""
    planned = [state.scheme for m in methods if (state := m.quant_plan()) is not None]
    wanted = None if gguf_type_name is None else str(gguf_type_name).lower().removeprefix("gguf-")
    if wanted is not None and wanted not in GGUF_EXPORT_TYPES:
        raise ExportError(f"unknown GGUF type '{gguf_type_name}'; choose one of {', '.join(GGUF_EXPORT_TYPES)}")
    for scheme in planned:
        _require_grid(scheme)
    kinds = sorted({s.gguf.name for s in planned if s.gguf is not None})
    if wanted is None:
        wanted = kinds[0] if len(kinds) == 1 else "f16"
    if kinds and wanted not in kinds:
        raise ExportError(f"--gguf-type {wanted} differs from the recipe's grid ({', '.join(kinds)}); GPTQ/AWQ must "
                          f"target the grid the file stores — use --scheme gguf-{wanted}, or drop --gguf-type")
    if not kinds and wanted in GGUF_TYPES:
        raise ExportError(f"--gguf-type {wanted} needs weights quantized on its grid; add a quantizer, e.g. "
                          f"--method rtn --scheme gguf-{wanted} (or gptq), or use --gguf-type f16")
    if model is not None:
        check_gguf_model(model, source_dir, tokenizer)
    return wanted


def check_gguf_model(model: nn.Module, source_dir: Path | None, tokenizer: Any) -> None:
    family = getattr(model.config, "model_type", None)
    if family not in GGUF_FAMILIES:
        raise ExportError(f"the GGUF writer knows the {', '.join(GGUF_FAMILIES)} architecture (SmolLM2, Llama, "
                          f"TinyLlama), not '{family}'; use --format hf or compressed-tensors for this model")
    if tokenizer is not None and not _source_kv_path(source_dir):
        raise ExportError("--format gguf carries the tokenizer from the model's GGUF source, and this model was not "
                          "loaded from a .gguf (or was converted by an older calibrant): load it from its .gguf file "
                          "(--model file.gguf; for a cached conversion delete it under $CALIBRANT_CACHE/models to "
                          "convert again), or write --format hf")


def check_gguf_output(out: str | Path, overwrite: bool, inputs: tuple[Any, ...] = ()) -> Path:
    """Refuse, before any work, a ``.gguf`` output that exists (without ``overwrite``), is a directory, is an
    input, or cannot be written."""
    out = Path(out)
    for source in inputs:
        source = getattr(source, "path", source)
        if isinstance(source, str | Path) and Path(source).exists() and Path(source).resolve() == out.resolve():
            raise ExportError(f"--out {out} is the input model; choose another --out")
    if out.suffix.lower() != ".gguf":
        raise ExportError(f"--format gguf writes one file; give --out a .gguf file name, e.g. --out {out}.gguf")
    if (out.exists() or out.is_symlink()) and not out.is_dir() and not overwrite:
        raise ExportError(f"output '{out}' already exists; pass --overwrite to replace it or choose another --out")
    return check_output_file(out, "--out", "model.gguf")


def _source_kv_path(source_dir: Path | None) -> Path | None:
    path = None if source_dir is None else Path(source_dir) / SOURCE_KV_FILE
    return path if path is not None and path.is_file() else None


def _llama_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order of llama.cpp's rotary layout: per head, the halves interleaved (convert_hf_to_gguf's permute)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _pack(codes: torch.Tensor, d16: torch.Tensor, m16: torch.Tensor, kind: GGUFType) -> np.ndarray:
    """GGUF block bytes ``[rows, blocks · type_size]`` of codes ``[rows, cols]`` (centred for symmetric types)."""
    rows, cols = codes.shape
    nb = cols // GGUF_BLOCK
    q = codes.reshape(rows * nb, GGUF_BLOCK).numpy()
    parts = [d16.reshape(-1, 1).numpy().astype(np.float16).view(np.uint8)]
    if kind.affine:
        parts.append(m16.reshape(-1, 1).numpy().astype(np.float16).view(np.uint8))
    if kind.name == "q8_0":
        parts.append(q.astype(np.int8).view(np.uint8))
    else:
        u = (q if kind.affine else q + kind.levels).astype(np.uint8)  # stored codes are unsigned
        if kind.bits == 5:  # the fifth bits, one uint32 (little endian) per block
            parts.append(np.packbits(u >> 4, axis=-1, bitorder="little").reshape(-1, 4))
        half = GGUF_BLOCK // 2
        parts.append((u[:, :half] & 0x0F) | ((u[:, half:] & 0x0F) << 4))
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def build_gguf_tensors(model: nn.Module, fallback: str = "f16", reasons: dict[str, str] | None = None
                       ) -> tuple[list[tuple[str, np.ndarray, Any]], list[dict[str, Any]]]:
    """``(name, data, raw type)`` per tensor in llama.cpp's names and layout, and a report row per tensor;
    ``reasons``: why the recipe left a linear unquantized (module name → reason, the report's fallbacks)."""
    import gguf

    config = model.config
    n_blocks = int(config.num_hidden_layers)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    heads, kv_heads = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None) or
                                                            config.num_attention_heads)
    modules = dict(model.named_modules())
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors, report = [], []
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads the embedding as the output head when output.weight is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"the GGUF writer has no llama.cpp name for tensor {key}; write --format hf")
        module_name = key.rsplit(".", 1)[0]
        state = quant_state_of(modules[module_name]) if key.endswith(".weight") else None
        perm = None
        if ".self_attn.q_proj." in key or ".self_attn.k_proj." in key:
            perm = _llama_permutation(value.shape[0], heads if ".q_proj." in key else kv_heads)
        value = value.detach().to("cpu")
        if state is not None and state.scheme.gguf is not None:
            kind = state.scheme.gguf
            if not state.has_grid:
                raise ExportError(f"{key}: its GGUF grid was not kept (a model loaded back from a directory); export "
                                  "right after compression (calibrant compress --format gguf)")
            codes = recover_codes(value, state.scale.cpu(), state.zero.cpu(), kind)
            if codes is None:
                raise ExportError(f"{key} does not lie on its {state.scheme.name} grid (changed after quantization, or "
                                  "held in a dtype that cannot hold it: load the model in float32); re-run the "
                                  "compression")
            d16, m16 = state.scale.cpu().float(), state.zero.cpu().float()
            if perm is not None:
                codes, d16, m16 = codes[perm], d16[perm], m16[perm]
            qtype = gguf.GGMLQuantizationType[kind.name.upper()]
            tensors.append((name, _pack(codes, d16, m16, kind), qtype))
            report.append({"tensor": name, "source": key, "type": kind.name.upper(), "shape": list(value.shape),
                           "why": f"quantized ({state.scheme.name})"})
            continue
        if perm is not None:
            value = value[perm]
        if value.dim() == 1 or fallback == "f32":
            data, qtype = value.to(torch.float32).numpy(), gguf.GGMLQuantizationType.F32
            why = "1-D (norm or bias)" if value.dim() == 1 else "not quantized by the recipe"
        else:
            data, qtype = value.to(torch.float16).numpy(), gguf.GGMLQuantizationType.F16
            why = "not quantized by the recipe"
        if state is not None:
            why = f"scheme {state.scheme.name} has no GGUF grid"
        elif module_name in (reasons or {}):
            why = f"fallback: {reasons[module_name]}"
        report.append({"tensor": name, "source": key, "type": qtype.name, "shape": list(value.shape), "why": why})
        tensors.append((name, data, qtype))
    return tensors, report


def _config_kv(config: Any) -> list[KV]:
    """llama hyper-parameters from a Hugging Face config (for models without a GGUF source)."""
    from gguf import GGUFValueType as V

    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    pairs = [
        ("llama.context_length", int(config.max_position_embeddings), V.UINT32),
        ("llama.embedding_length", hidden, V.UINT32),
        ("llama.block_count", int(config.num_hidden_layers), V.UINT32),
        ("llama.feed_forward_length", int(config.intermediate_size), V.UINT32),
        ("llama.rope.dimension_count", head_dim, V.UINT32),
        ("llama.attention.head_count", heads, V.UINT32),
        ("llama.attention.head_count_kv", int(getattr(config, "num_key_value_heads", None) or heads), V.UINT32),
        ("llama.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps), V.FLOAT32),
        ("llama.rope.freq_base", float(getattr(config, "rope_theta", None) or 10000.0), V.FLOAT32),
        ("llama.vocab_size", int(config.vocab_size), V.UINT32),
    ]
    return [KV("general.architecture", "llama", V.STRING), *(KV(k, v, t) for k, v, t in pairs)]


def _check_source_shapes(source: list[KV], config: Any) -> None:
    """The source's hyper-parameters must still describe the model (structured pruning changes them)."""
    have = {p.key: p.value for p in source}
    for p in _config_kv(config):
        if p.type.name == "UINT32" and p.key in have and p.key != "llama.context_length" and int(have[p.key]) != p.value:
            raise ExportError(f"the model no longer matches its GGUF source: {p.key} is {p.value}, the source says "
                              f"{have[p.key]} (structurally pruned?); the GGUF writer keeps the source's metadata "
                              "only for models of its shape — write --format hf")


def save_gguf(model: nn.Module, out: str | Path, metadata: dict[str, Any], *, source_dir: Path | None = None,
              tokenizer: Any = None, gguf_type_name: str | None = None, overwrite: bool = False,
              methods: list[Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Write ``model`` as one ``.gguf`` file at ``out`` (atomically); returns the path and a summary whose
    ``tensors`` lists every tensor's type and why (quantized, or the fallback taken)."""
    import gguf

    out = check_gguf_output(out, overwrite)
    if methods is not None:
        gguf_type_name = check_gguf_recipe(methods, gguf_type_name)
    check_gguf_model(model, source_dir, tokenizer)
    states = [s for m in model.modules() if (s := quant_state_of(m)) is not None]
    kinds = Counter(s.scheme.gguf.name for s in states if s.scheme.gguf is not None)
    for s in states:
        _require_grid(s.scheme)
    main = gguf_type_name or (kinds.most_common(1)[0][0] if kinds else "f16")
    tensors, report = build_gguf_tensors(model, fallback="f32" if main == "f32" else "f16",
                                         reasons=metadata.get("fallbacks"))
    kv_path = _source_kv_path(source_dir)
    source = read_kv(kv_path) if kv_path else []
    if source:
        arch = next((str(p.value) for p in source if p.key == "general.architecture"), None)
        if arch != "llama":
            raise ExportError(f"the model's GGUF source is a '{arch}' model; the GGUF writer knows "
                              f"{', '.join(GGUF_FAMILIES.values())} — write --format hf")
        _check_source_shapes(source, model.config)
    file_type = gguf.LlamaFileType[{"f32": "ALL_F32", "f16": "MOSTLY_F16"}.get(main, f"MOSTLY_{main.upper()}")]
    V = gguf.GGUFValueType
    provenance = [
        KV("general.file_type", int(file_type), V.UINT32),
        KV("calibrant.version", str(metadata.get("calibrant_version", "")), V.STRING),
        KV("calibrant.recipe", json.dumps(metadata.get("recipe", []), sort_keys=True, default=str), V.STRING),
        KV("calibrant.calibration_hash", str((metadata.get("calibration") or {}).get("hash", "")), V.STRING),
        KV("calibrant.base_model", json.dumps(metadata.get("base_model", {}), sort_keys=True, default=str), V.STRING),
    ]
    needed = sum(int(data.nbytes) for _, data, _ in tensors)
    check_space(out, needed, "--out")
    with disk_errors(str(out), human_bytes(needed)), atomic_path(out, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        add_kv(writer, source or _config_kv(model.config))
        add_kv(writer, provenance)
        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    release_output(out)
    summary = {"format": FORMAT_NAME, "file_type": file_type.name, "tensors": report,
               "metadata_from": "gguf source" if source else "model config (no tokenizer)"}
    return out, summary


def restore_gguf_grids(model: nn.Module, model_dir: Path, metadata: dict[str, Any]) -> int:
    """Re-attach the GGUF block grids a calibrant output keeps beside its weights (``calibrant-extras/``) to
    the linears ``calibrant.json`` says were quantized on one; returns how many. A layer whose grid is
    missing (an output written before grids were kept) is refused, naming the fix."""
    from safetensors.torch import load_file

    from calibrant.export.hf import EXTRAS_FILE, GGUF_GRID_KEYS
    from calibrant.methods.quant import QuantState, attach_quant_state, parse_scheme

    modules = dict(model.named_modules())
    layers = [(lay["name"], parse_scheme(lay["scheme"])) for lay in metadata.get("layers", []) if lay.get("scheme")]
    wanted = [(name, scheme) for name, scheme in layers if scheme.gguf is not None]
    for _, scheme in layers:
        _require_grid(scheme)
    extras_path = model_dir / EXTRAS_FILE
    extras = load_file(str(extras_path)) if wanted and extras_path.is_file() else {}
    for name, scheme in wanted:
        keys = [f"{name}.{k}" for k in GGUF_GRID_KEYS]
        if name not in modules or not all(k in extras for k in keys):
            raise ExportError(f"{model_dir} does not keep the GGUF grid of {name} ({scheme.name}; outputs written before "
                              "calibrant kept grids beside the weights do not): compress again, or compress with "
                              "--format gguf to write the .gguf directly")
        d, m = (extras[k].to(torch.float32) for k in keys)
        attach_quant_state(modules[name], QuantState(scheme, scale=d, zero=m))
    return len(wanted)


def check_exported_type(model: nn.Module | None, gguf_type_name: str | None) -> None:
    """Refuse a ``--gguf-type`` other than the grid the weights already lie on (exporting never re-rounds);
    without ``model``, only an unknown type name."""
    if gguf_type_name is None:
        return
    wanted = str(gguf_type_name).lower().removeprefix("gguf-")
    if wanted not in GGUF_EXPORT_TYPES:
        raise ExportError(f"unknown GGUF type '{gguf_type_name}'; choose one of {', '.join(GGUF_EXPORT_TYPES)}")
    if model is None:
        return
    kinds = sorted({s.scheme.gguf.name for m in model.modules()
                    if (s := quant_state_of(m)) is not None and s.scheme.gguf is not None})
    if wanted in GGUF_TYPES and wanted not in kinds:
        have = f"on the {', '.join(kinds)} grid" if kinds else "not quantized on a GGUF grid"
        raise ExportError(f"the directory's weights are {have}; --gguf-type {wanted} would re-round them — drop "
                          f"--gguf-type, or compress again with --scheme gguf-{wanted}")
