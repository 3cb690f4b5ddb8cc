"""Write a compressed model as a Hugging Face directory (safetensors) plus ``calibrant.json``.

The directory loads with ``transformers.AutoModelForCausalLM.from_pretrained``. It is written to a
temporary sibling and renamed, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from calibrant.cache import atomic_path
from calibrant.errors import CalibrantError, OutputExistsError
from calibrant.models.adapter import TRANSPOSED_WEIGHTS

METADATA_FILE = "calibrant.json"
EXTRAS_FILE = "calibrant-extras/quant.safetensors"  # what a method keeps beside the dense weights (SpQR)


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; call before any long work."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output '{out}' already exists; pass --overwrite to replace it or choose another --out")
    return out


def save_model(
    model: torch.nn.Module, tokenizer: Any, out: str | Path, metadata: dict[str, Any], overwrite: bool = False
) -> Path:
    out = check_output(out, overwrite)
    with atomic_path(out, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        extras = quant_extras(model)
        if extras:
            (tmp / EXTRAS_FILE).parent.mkdir()
            save_file(extras, str(tmp / EXTRAS_FILE))
            metadata = {**metadata, "extras_file": EXTRAS_FILE}
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    return out


def quant_extras(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors methods keep beside a layer's dense weight (``QuantState.extras["tensors"]``: SpQR's
    outliers and quantized statistics), keyed ``<module>.<name>``. A sub-directory keeps them out of the
    ``*.safetensors`` files that transformers and :func:`inspect_weights` read."""
    from calibrant.methods.quant import quant_state_of

    out = {}
    for name, module in model.named_modules():
        state = quant_state_of(module)
        for key, tensor in (state.extras.get("tensors") or {}).items() if state is not None else ():
            out[f"{name}.{key}"] = tensor.detach().to("cpu", copy=True).contiguous()  # q/k/v share g_idx
    return out


def read_metadata(model_dir: str | Path) -> dict[str, Any] | None:
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CalibrantError(f"{path} is not valid JSON ({exc}); the output was damaged — recreate it") from None


def restore_activation_quant(model: torch.nn.Module, metadata: dict[str, Any] | None) -> int:
    """Re-attach the simulated activation quantization recorded in ``calibrant.json``; returns how many."""
    from calibrant.methods.quant import QuantState, attach_quant_state, parse_scheme

    count = 0
    modules = dict(model.named_modules())
    for layer in (metadata or {}).get("layers", []):
        scheme = layer.get("scheme")
        if scheme and parse_scheme(scheme).act_bits and layer["name"] in modules:
            attach_quant_state(modules[layer["name"]], QuantState(parse_scheme(scheme)))
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


def inspect_weights(model_dir: str | Path) -> dict[str, Any]:
    """Per-tensor sparsity and sizes read from the safetensors files themselves (not the metadata)."""
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
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                t = f.get_tensor(key)
                n, nz = t.numel(), int(torch.count_nonzero(t))
                total += n
                nonzero += nz
                if t.dim() == 2 and key.endswith("weight"):
                    if key.endswith(transposed):
                        t = t.t()  # report every weight as [out, in] so N:M groups run along inputs
                    layers.append(
                        {
                            "name": key,
                            "shape": list(t.shape),
                            "sparsity": 1 - nz / n,
                            "pattern": nm_pattern_of(t) if nz < n else None,
                            "dtype": str(t.dtype).replace("torch.", ""),
                        }
                    )
    return {
        "files": [f.name for f in files],
        "bytes_on_disk": sum(f.stat().st_size for f in files),
        "parameters": total,
        "nonzero_parameters": nonzero,
        "layers": layers,
    }
