"""Write a compressed model as a Hugging Face directory (safetensors) plus ``calibrant.json``.

The directory loads with ``transformers.AutoModelForCausalLM.from_pretrained``. It is written to a
temporary sibling and renamed, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from calibrant.cache import atomic_path, claim_output, human_bytes, release_output
from calibrant.errors import CalibrantError, OutputExistsError, disk_errors
from calibrant.models.adapter import TRANSPOSED_WEIGHTS

METADATA_FILE = "calibrant.json"
EXTRAS_FILE = "calibrant-extras/quant.safetensors"  # what a method keeps beside the dense weights (SpQR)


OUTPUT_MARKERS = (METADATA_FILE, "search.json")  # a directory holding one is an earlier calibrant output


def check_output(out: str | Path, overwrite: bool, *, inputs: tuple[Any, ...] = (), flag: str = "--out") -> Path:
    """Refuse, before any long work, an output directory that cannot be written or must not be replaced: an
    existing one without ``overwrite``; with ``overwrite``, anything but an earlier calibrant output (a
    directory holding ``calibrant.json`` or ``search.json``) or an empty directory; the current directory
    or one holding it; an input (``inputs``: model paths) or a directory holding one; a location under a
    regular file or in a directory that cannot be written."""
    out = Path(out)
    target = out.resolve()
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise OutputExistsError(f"{flag} {out} is the current directory (or holds it), which is never replaced; "
                                f"give a new directory, e.g. {flag} compressed")
    for source in inputs:
        source = getattr(source, "path", source)  # a LoadedModel: the directory it was loaded from
        if isinstance(source, str | Path) and Path(source).exists():
            held = Path(source).resolve()
            if target == held or target in held.parents:
                raise OutputExistsError(f"{flag} {out} is the input model --model {source} (or holds it); writing "
                                        f"there would replace the model being read — choose another {flag}")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output '{out}' already exists; pass --overwrite to replace it or choose another "
                                    f"{flag}")
        if not out.is_dir():
            raise OutputExistsError(f"{flag} {out} is a file, not an earlier calibrant output directory; --overwrite "
                                    f"replaces only those — choose another {flag}")
        if any(out.iterdir()) and not any((out / marker).is_file() for marker in OUTPUT_MARKERS):
            raise OutputExistsError(f"{flag} {out} is not a calibrant output (it has no {METADATA_FILE}) and holds "
                                    f"other files, which --overwrite never deletes; choose another {flag} or empty "
                                    "the directory yourself")
    check_writable(out, flag)
    claim_output(out, flag)
    return out


def check_output_file(path: str | Path, flag: str, example: str) -> Path:
    """Refuse, before any long work, an output file path that is an existing directory or cannot be written
    (``example``: a file name to suggest, e.g. ``results.json``)."""
    path = Path(path)
    if path.is_dir():
        raise CalibrantError(f"{flag} {path} is a directory; {flag} takes a file path such as "
                             f"{path / example if example else 'out.json'}")
    check_writable(path, flag)
    return path


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as a dense save writes them (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def check_writable(path: str | Path, flag: str) -> None:
    """Refuse a ``path`` that cannot be created: its nearest existing ancestor must be a directory in which a
    probe directory can be made (and is removed at once); checks permissions, read-only file systems and
    immutable directories, for root too."""
    path = Path(path).absolute()
    parent = path.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CalibrantError(f"cannot write {flag} {path}: {parent} is a file, not a directory; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CalibrantError(f"cannot write {flag} {path}: {parent} is not writable (no write permission); choose "
                             f"a directory you can write to")
    try:
        probe = tempfile.mkdtemp(prefix=".calibrant-probe.", dir=parent)
    except OSError as exc:
        raise CalibrantError(f"cannot write {flag} {path}: {parent} is not writable ({exc.strerror or exc}); choose "
                             f"another {flag}") from None
    os.rmdir(probe)


HALF_DTYPES = (torch.bfloat16, torch.float16)


@torch.no_grad()
def round_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every floating parameter of a float32 ``model`` to ``dtype`` (bf16/fp16) in place, kept in
    float32: a model computed on in float32 holds exactly the weights it is written with in its
    checkpoint's dtype. Buffers (rotary frequencies) are computed, not stored, and stay as they are."""
    for p in model.parameters():
        if p.dtype == torch.float32 and not p.is_meta:
            p.copy_(p.to(dtype))


def stored_state(model: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor] | None:
    """The state dict to write the model in ``dtype``: its float32 tensors cast (a tensor shared by two
    names, tied embeddings, stays one tensor); None when nothing needs casting."""
    if dtype is None or dtype == torch.float32:
        return None
    cast: dict[tuple[Any, ...], torch.Tensor] = {}
    state = {}
    for name, t in model.state_dict().items():
        if t.dtype == torch.float32:
            t = cast.setdefault((t.data_ptr(), tuple(t.shape), t.stride()), t.to(dtype))
        state[name] = t
    return state


def save_model(
    model: torch.nn.Module, tokenizer: Any, out: str | Path, metadata: dict[str, Any], overwrite: bool = False,
    source_dir: str | Path | None = None, dtype: torch.dtype | None = None,
) -> Path:
    """``source_dir``: the directory the model was loaded from; a GGUF source's metadata kept there
    (:mod:`calibrant.models.ggufmeta`) is copied along, so ``calibrant export OUT --format gguf`` can carry
    the tokenizer later. ``dtype``: the dtype to write a float32 model's floating tensors in (its
    checkpoint's, e.g. bfloat16), recorded in config.json; None writes them as they are."""
    from calibrant.models.ggufmeta import SOURCE_KV_FILE

    out = check_output(out, overwrite)
    source_kv = None if source_dir is None else Path(source_dir) / SOURCE_KV_FILE
    with disk_errors(str(out), human_bytes(model_bytes(model))), atomic_path(out, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        state = stored_state(model, dtype)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        if state is not None:  # save_pretrained records the in-memory dtype; the files hold ``dtype``
            config = json.loads((tmp / "config.json").read_text())
            config["dtype"] = str(dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        extras = quant_extras(model)
        if extras:
            (tmp / EXTRAS_FILE).parent.mkdir()
            save_file(extras, str(tmp / EXTRAS_FILE))
            metadata = {**metadata, "extras_file": EXTRAS_FILE}
        if source_kv is not None and source_kv.is_file():
            shutil.copyfile(source_kv, tmp / SOURCE_KV_FILE)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    release_output(out)
    return out


GGUF_GRID_KEYS = ("gguf_d", "gguf_m")  # a gguf-* layer's block scales and minima, kept for a later GGUF export


def quant_extras(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors methods keep beside a layer's dense weight (``QuantState.extras["tensors"]``: SpQR's
    outliers and quantized statistics), keyed ``<module>.<name>``. A sub-directory keeps them out of the
    ``*.safetensors`` files that transformers and :func:`inspect_weights` read. A layer on a GGUF block grid
    also keeps its scales and minima (``<module>.gguf_d``/``.gguf_m``, float16 where that is exact), so the
    directory can be exported to GGUF later without re-rounding anything. ``prefix``: the name of ``model``
    within the whole model, when it is a part of one (a streamed block)."""
    from calibrant.methods.quant import quant_state_of

    out = {}
    for name, module in model.named_modules(prefix=prefix):
        state = quant_state_of(module)
        for key, tensor in (state.extras.get("tensors") or {}).items() if state is not None else ():
            out[f"{name}.{key}"] = tensor.detach().to("cpu", copy=True).contiguous()  # q/k/v share g_idx
        if state is not None and state.scheme.gguf is not None and state.has_grid:
            for key, tensor in zip(GGUF_GRID_KEYS, (state.scale, state.zero), strict=True):
                t = tensor.detach().to("cpu", torch.float32)
                half = t.to(torch.float16)
                out[f"{name}.{key}"] = (half if torch.equal(half.float(), t) else t).contiguous()
    return out


# calibrant.json's keys that readers index, and the JSON type each must have
_METADATA_SHAPE = {"recipe": list, "layers": list, "calibration": dict, "base_model": dict, "plans": dict}


def read_metadata(model_dir: str | Path, strict: bool = False) -> dict[str, Any] | None:
    """``calibrant.json`` of a model directory (None without one); a damaged one is one CalibrantError naming it.

    Always checked: a JSON object whose ``layers`` (read when a model is loaded) is a list of objects;
    ``strict`` (readers that show the record, ``calibrant info``): the recipe, calibration and plans too."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        return None
    fix = f"recreate the output, or delete {path.name} to use the weights without calibrant's record"
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CalibrantError(f"{path} is not UTF-8 text; the output was damaged — {fix}") from None
    except json.JSONDecodeError as exc:
        raise CalibrantError(f"{path} is not valid JSON ({exc}); the output was damaged — {fix}") from None
    if not isinstance(meta, dict):
        raise CalibrantError(f"{path} is not a JSON object (it holds a {type(meta).__name__}); the output was "
                             f"damaged — {fix}")
    for key, kind in _METADATA_SHAPE.items() if strict else [("layers", list)]:
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or
                                  (kind is list and not all(isinstance(v, dict) for v in value))):
            want = "a list of objects" if kind is list else "an object"
            raise CalibrantError(f"{path}: '{key}' is not {want} (it holds {json.dumps(value)[:40]}); the output was "
                                 f"damaged — {fix}")
    return meta


def restore_activation_quant(model: torch.nn.Module, metadata: dict[str, Any] | None) -> int:
    """Re-attach the simulated activation quantization recorded in ``calibrant.json``; returns how many."""
    from calibrant.methods.quant import QuantState, attach_quant_state, parse_scheme

    count = 0
    modules = dict(model.named_modules())
    for layer in (metadata or {}).get("layers", []):
        scheme = layer.get("scheme")
        if scheme and parse_scheme(scheme).act_bits and layer["name"] in modules:
            amax = layer.get("input_amax")  # a static activation scale (fp8-static, nvfp4)
            attach_quant_state(modules[layer["name"]], QuantState(
                parse_scheme(scheme), input_amax=None if amax is None else torch.tensor([float(amax)])))
            count += 1
    return count


def nm_pattern_of(weight: torch.Tensor, candidates: tuple[tuple[int, int], ...] = ((2, 4), (4, 8), (1, 4))) -> str | None:
    """The tightest listed N:M pattern this ``[out, in]`` weight satisfies, if any."""
    best = None
    for n, m in candidates:
        if weight.shape[1] % m:
            continue
        nnz = (weight.reshape(weight.shape[0], -1, m) != 0).sum(-1)
        if int(nnz.max()) <= n and (best is None or n / m < best[0] / best[1]):
            best = (n, m)
    return f"{best[0]}:{best[1]}" if best else None


# tensors a compressed-tensors export stores beside a quantized weight (not parameters of the model)
_QUANT_COMPANIONS = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "input_scale",
                     "input_zero_point", "weight_global_scale", "input_global_scale")


def inspect_weights(model_dir: str | Path) -> dict[str, Any]:
    """Per-tensor sparsity and sizes read from the safetensors files themselves (not the metadata).

    A compressed-tensors export is read as what it stores: a packed weight (``weight_packed`` + scales,
    zero points and its ``weight_shape``) counts as one ``[out, in]`` weight of ``out·in`` parameters, its
    ``bits`` the bytes it takes on disk per weight (statistics included) and its sparsity unknown (None:
    the values are packed); an int8 weight with a ``weight_scale`` counts its scales in its ``bits``.
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CalibrantError(f"{model_dir} has no .safetensors files; is it a calibrant/Hugging Face model directory?")
    config = model_dir / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    transposed = TRANSPOSED_WEIGHTS.get(model_type, ())
    layers = []
    total = nonzero = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            quantized = {k.rsplit(".", 1)[0] for k in keys if k.endswith((".weight_packed", ".weight_scale"))}

            for key in sorted(keys):
                prefix, _, leaf = key.rpartition(".")
                if prefix in quantized and leaf in _QUANT_COMPANIONS:
                    continue  # counted with its weight
                if leaf == "weight_packed":
                    shape = [int(v) for v in f.get_tensor(f"{prefix}.weight_shape").tolist()] \
                        if f"{prefix}.weight_shape" in keys else None
                    packed_shape = f.get_slice(key).get_shape()
                    if shape is None and f.get_slice(key).get_dtype() == "U8":  # nvfp4: two E2M1 codes a byte
                        shape = [packed_shape[0], 2 * packed_shape[1]]
                    n = shape[0] * shape[1] if shape else f.get_slice(key).get_shape()[0]
                    total += n
                    nonzero += n  # unknown without unpacking: counted as non-zero
                    layers.append({"name": f"{prefix}.weight", "shape": shape, "sparsity": None, "pattern": None,
                                   "dtype": "packed", "bits": 8 * (_nbytes(f, key) + _side_bytes(f, keys, prefix)) / n})
                    continue
                t = f.get_tensor(key)
                dtype, nbytes = str(t.dtype).replace("torch.", ""), t.numel() * t.element_size()
                if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    t = t.to(torch.float32)  # count_nonzero has no float8 kernel
                n, nz = t.numel(), int(torch.count_nonzero(t))
                total += n
                nonzero += nz
                if t.dim() == 2 and key.endswith("weight"):
                    if key.endswith(transposed):
                        t = t.t()  # report every weight as [out, in] so N:M groups run along inputs
                    layer = {"name": key, "shape": list(t.shape), "sparsity": 1 - nz / n,
                             "pattern": nm_pattern_of(t) if nz < n else None, "dtype": dtype}
                    if prefix in quantized:  # an int8 weight stored with its scales
                        layer["bits"] = 8 * (nbytes + _side_bytes(f, keys, prefix)) / n
                    layers.append(layer)
    return {
        "files": [f.name for f in files],
        "bytes_on_disk": sum(f.stat().st_size for f in files),
        "parameters": total,
        "nonzero_parameters": nonzero,
        "packed": any(lay.get("bits") is not None for lay in layers),
        "layers": layers,
    }


def _side_bytes(f: Any, keys: set[str], prefix: str) -> int:
    """Bytes of the scales, zero points and other companions stored beside quantized weight ``prefix``."""
    return sum(_nbytes(f, f"{prefix}.{c}") for c in _QUANT_COMPANIONS if f"{prefix}.{c}" in keys)


def _nbytes(f: Any, key: str) -> int:
    """Bytes of tensor ``key`` in the open safetensors file ``f``, read from its header only."""
    view = f.get_slice(key)
    size = torch.empty((), dtype=getattr(torch, _ST_DTYPES.get(view.get_dtype(), "float32"))).element_size()
    numel = 1
    for d in view.get_shape():
        numel *= d
    return numel * size


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
