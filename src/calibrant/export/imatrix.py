"""llama.cpp importance matrices from any calibrant calibration set.

llama.cpp's quantizer (``llama-quantize --imatrix``) weighs each input column of a weight by the mean of
``x_j²`` over calibration tokens: the importance matrix. ``llama-imatrix`` computes it from a text file;
here it comes from calibrant's engine (the same ``sq_norms`` statistic Wanda reads, streamed block by
block over the dense model), so the calibration text is any calibrant source, with its provenance.

Two layouts, both read by ``llama-quantize``:

- ``.gguf`` (llama.cpp's current format): per weight ``<name>.in_sum2`` (F32 ``[1, cols]``: ``Σ_t x_tj²``)
  and ``<name>.counts`` (F32 ``[1, 1]``: tokens seen), ``general.type = imatrix``, ``imatrix.datasets``,
  ``imatrix.chunk_count`` (windows) and ``imatrix.chunk_size`` (tokens per window); calibrant's
  provenance goes in ``calibrant.*`` keys of the same file.
- ``.dat`` (the legacy binary that older llama.cpp builds read): per weight its name, ``ncall`` (windows)
  and ``mean(x²) · ncall``; then the window count and the dataset name. The format has no room for
  provenance, so it goes in a sidecar ``<file>.dat.json``.

Names are llama.cpp's (``blk.N.attn_q.weight`` …, from ``gguf.TensorNameMap``). The weights of one block
that read one input (q/k/v, gate/up) get identical entries, as llama-imatrix gives them. Only the
decoder blocks' linears are covered (llama-imatrix leaves the output head out by default too). Rows of
q/k are permuted in llama.cpp's files, their input columns are not, so no column order changes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrant.cache import atomic_path, release_output
from calibrant.errors import CalibrantError, disk_errors
from calibrant.export.hf import check_output_file
from calibrant.methods.base import LayerContext, LayerStats, Method

IMATRIX_SUFFIXES = (".gguf", ".dat")
# Hugging Face model_type → gguf.MODEL_ARCH member whose tensor names llama.cpp uses for it
IMATRIX_ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "gemma3": "GEMMA3", "gemma3_text": "GEMMA3",
                 "gemma2": "GEMMA2", "phi3": "PHI3", "gpt_neox": "GPTNEOX"}


@dataclass
class Imatrix:
    """Per llama.cpp tensor name: ``Σ x²`` per input column (float64) and the tokens counted."""

    sums: dict[str, torch.Tensor]
    counts: dict[str, int]
    chunk_count: int
    chunk_size: int
    datasets: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)

    def mean(self, name: str) -> torch.Tensor:
        """What ``llama-quantize`` weighs ``name``'s columns by: ``Σ x² / tokens``."""
        return self.sums[name] / self.counts[name]


class ImatrixCollector(Method):
    """Records each linear's ``sq_norms`` and leaves the weight as it is (the engine runs the dense model)."""

    name = "imatrix"
    statistics = ("sq_norms",)
    relative_cost = 1.0

    def __init__(self) -> None:
        self._seen: dict[str, tuple[torch.Tensor, int]] = {}

    def params(self) -> dict[str, Any]:
        return {}

    def compress(self, weight: torch.Tensor, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        assert stats is not None
        stats.check_finite(ctx.name)
        self._seen[ctx.name] = (stats.sq_norms.detach().to("cpu", torch.float64).clone(), int(stats.tokens))
        return weight


def check_imatrix_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, an output that is not ``.gguf``/``.dat``, exists (without ``overwrite``), or
    cannot be written."""
    out = Path(out)
    if out.suffix.lower() not in IMATRIX_SUFFIXES:
        raise CalibrantError(f"--out {out}: an importance matrix is written as .gguf (llama.cpp's current format) "
                             f"or .dat (the legacy one); e.g. --out {out.with_suffix('.gguf').name}")
    if out.is_dir():
        raise CalibrantError(f"--out {out} is a directory; give a file name, e.g. --out {out / 'model.imatrix.gguf'}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CalibrantError(f"output '{out}' already exists; pass --overwrite to replace it or choose another --out")
    return check_output_file(out, "--out", "model.imatrix.gguf")


def tensor_names(model: torch.nn.Module) -> dict[str, str]:
    """llama.cpp's weight name for each decoder-block linear of ``model`` (module name → ``blk.N.…weight``)."""
    import gguf

    family = getattr(model.config, "model_type", None)
    arch = IMATRIX_ARCHS.get(family)
    if arch is None:
        known = sorted(IMATRIX_ARCHS)
        raise CalibrantError(f"llama.cpp tensor names are known here for the {', '.join(known)} families, not "
                             f"'{family}'; an importance matrix for it would not match any llama.cpp file")
    text_config = getattr(model.config, "text_config", None) or model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], int(text_config.num_hidden_layers))
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            gguf_name = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
            if gguf_name is not None:
                out[name] = gguf_name
    if not out:
        raise CalibrantError(f"no linear of this {family} model has a llama.cpp name; it cannot be given an "
                             "importance matrix")
    return out


def collect_imatrix(model: torch.nn.Module, calibration: Any, *, batch_size: int = 8,
                    device: torch.device | str | None = None, progress: bool = True,
                    datasets: list[str] | None = None) -> Imatrix:
    """The importance matrix of ``model`` (left unchanged) over ``calibration`` (a CalibrationSet)."""
    from calibrant.engine import compress

    names = tensor_names(model)
    collector = ImatrixCollector()
    compress(model, calibration, collector, batch_size=batch_size, device=device, progress=progress)
    missing = sorted(set(names) - set(collector._seen))
    if missing:
        raise CalibrantError(f"the engine produced no statistics for {len(missing)} linears (e.g. {missing[0]}); "
                             "an importance matrix needs every block's linears")
    sums = {names[k]: collector._seen[k][0] for k in names}
    counts = {names[k]: collector._seen[k][1] for k in names}
    ids = getattr(calibration, "input_ids", calibration)
    n, length = (int(s) for s in ids.shape)
    provenance = dict(getattr(calibration, "provenance", {}) or {})
    calib_hash = getattr(calibration, "hash", None)
    source = provenance.get("spec") or provenance.get("source") or "calibration"
    return Imatrix(sums, counts, n, length, datasets or [str(source)],
                   {"calibration": {"hash": calib_hash, **provenance}})


def write_imatrix(out: str | Path, imatrix: Imatrix, *, overwrite: bool = False) -> list[Path]:
    """Write ``imatrix`` atomically in the layout its suffix names; returns the files written."""
    out = check_imatrix_output(out, overwrite)
    written = [out]
    size = sum(8 * v.numel() + 64 for v in imatrix.sums.values())
    with disk_errors(str(out), f"{size // 1024} kB"):
        if out.suffix.lower() == ".gguf":
            with atomic_path(out, overwrite=overwrite) as tmp:
                _write_gguf(tmp, imatrix)
        else:
            sidecar = out.with_name(out.name + ".json")
            with atomic_path(out, overwrite=overwrite) as tmp:
                tmp.write_bytes(_legacy_bytes(imatrix))
            with atomic_path(sidecar, overwrite=True) as tmp:
                tmp.write_text(json.dumps(_provenance(imatrix), indent=2, default=str) + "\n")
            release_output(sidecar)
            written.append(sidecar)
    release_output(out)
    return written


def _provenance(imatrix: Imatrix) -> dict[str, Any]:
    return {"datasets": imatrix.datasets, "chunk_count": imatrix.chunk_count, "chunk_size": imatrix.chunk_size,
            **imatrix.provenance}


def _write_gguf(path: Path, imatrix: Imatrix) -> None:
    from gguf import GGUFWriter

    from calibrant import __version__

    writer = GGUFWriter(str(path), arch="llama")  # the writer's own key; llama.cpp's reader ignores it
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", list(imatrix.datasets))
    writer.add_uint32("imatrix.chunk_count", int(imatrix.chunk_count))
    writer.add_uint32("imatrix.chunk_size", int(imatrix.chunk_size))
    writer.add_string("calibrant.version", __version__)
    writer.add_string("calibrant.provenance", json.dumps(_provenance(imatrix), sort_keys=True, default=str))
    for name in sorted(imatrix.sums):  # llama-imatrix writes its tensors sorted by name too
        writer.add_tensor(f"{name}.in_sum2", imatrix.sums[name].to(torch.float32).numpy().reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[float(imatrix.counts[name])]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _legacy_bytes(imatrix: Imatrix) -> bytes:
    """llama.cpp's legacy layout: the reader divides each stored value by ``ncall``, giving ``mean(x²)``."""
    ncall = int(imatrix.chunk_count)
    parts = [struct.pack("<i", len(imatrix.sums))]
    for name in sorted(imatrix.sums):
        raw = name.encode("utf-8")
        values = (imatrix.mean(name) * ncall).to(torch.float32).numpy()
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), values.tobytes()]
    dataset = (imatrix.datasets[0] if imatrix.datasets else "").encode("utf-8")
    parts += [struct.pack("<i", ncall), struct.pack("<i", len(dataset)), dataset]
    return b"".join(parts)


def read_imatrix(path: str | Path) -> dict[str, torch.Tensor]:
    """``mean(x²)`` per tensor name of a ``.gguf`` or legacy ``.dat`` importance matrix, as llama-quantize
    computes it from the file (for checks and comparisons)."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        from gguf import GGUFReader

        tensors = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in GGUFReader(str(path)).tensors}
        out = {}
        for key, sums in tensors.items():
            if key.endswith(".in_sum2"):
                name = key.removesuffix(".in_sum2")
                out[name] = torch.from_numpy(sums / tensors[f"{name}.counts"][0])
        return out
    data = path.read_bytes()
    (n,), pos, out = struct.unpack_from("<i", data), 4, {}
    for _ in range(n):
        (length,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4:pos + 4 + length].decode("utf-8")
        ncall, nval = struct.unpack_from("<ii", data, pos + 4 + length)
        pos += 12 + length
        values = np.frombuffer(data, dtype=np.float32, count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        out[name] = torch.from_numpy(values / ncall if ncall > 0 else values)
    return out
