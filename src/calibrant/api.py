"""The Python API the CLI is a thin layer over: load → calibrate → compress → save → evaluate.

One module (over 500 lines) because each public function checks its arguments before anything is loaded
and the checks share helpers (outputs, devices, calibration, streaming's decision); the streamed run
lives here rather than in :mod:`calibrant.streaming` because it needs this module's calibration and
metadata helpers, and that module must not import this one.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from calibrant import __version__
from calibrant.cache import atomic_path, check_space, human_bytes, release_output
from calibrant.calibration import (
    CalibrationSet,
    check_heldout_name,
    heldout_token_ids,
    make_calibration,
    read_chat_template,
)
from calibrant.engine import CompressionReport, compress
from calibrant.errors import CalibrantError, CalibrationError, RecipeError, disk_errors
from calibrant.evaluate.perplexity import PerplexityResult, perplexity
from calibrant.evaluate.zeroshot import STANDARD_SUITE, ZeroShotResult, check_tasks, evaluate_tasks
from calibrant.export.gguf import check_gguf_model, check_gguf_output, check_gguf_recipe, save_gguf
from calibrant.export.hf import (
    HALF_DTYPES,
    check_output,
    model_bytes,
    read_metadata,
    restore_activation_quant,
    round_weights,
    save_model,
)
from calibrant.export.imatrix import (
    Imatrix,
    check_imatrix_output,
    collect_imatrix,
    tensor_names,
    write_imatrix,
)
from calibrant.export.packed import (
    FORMAT_NAME,
    ExportError,
    check_packable_recipe,
    normalize_format,
    save_packed,
)
from calibrant.methods import Method, make_recipe
from calibrant.models.loader import ALIASES, LoadedModel, load_model
from calibrant.models.structured import load_structured  # noqa: F401 - part of the API (README)
from calibrant.search import SearchResult, StructuredConfig
from calibrant.search import search as structured_search
from calibrant.streaming import activation_budget_bytes

DEFAULT_CALIBRATION = "wiki:128x512"


@dataclass
class CompressResult:
    loaded: LoadedModel
    report: CompressionReport
    calibration: CalibrationSet | None
    out: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def as_loaded(model: str | Path | LoadedModel, device: str | torch.device = "cpu", quiet: bool = False,
              chat_template: str | Path | None = None) -> LoadedModel:
    """A loaded model; a calibrant output directory gets its simulated activation quantization back.
    ``chat_template``: a Jinja template file the tokenizer takes (read and checked before any loading)."""
    if chat_template is not None:
        template = read_chat_template(chat_template)
        loaded = as_loaded(model, device, quiet)
        loaded.tokenizer.chat_template = template
        return loaded
    if isinstance(model, LoadedModel):
        if any(p.is_meta for p in model.model.parameters()):
            raise CalibrantError(f"this model was compressed streamed, so none of its weights are in memory; "
                                 f"evaluate its output directory instead ({model.path}), streamed if it does not fit")
        return model
    local = isinstance(model, str | Path) and Path(model).is_dir()
    meta = read_metadata(model) if local else None  # a damaged calibrant.json is refused before the load
    loaded = load_model(model, device=device, quiet=quiet)
    if loaded.path is not None:
        restore_activation_quant(loaded.model, meta if local and Path(model).resolve() == Path(loaded.path).resolve()
                                 else read_metadata(loaded.path))
    return loaded


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch.device this build can use; an unknown or unavailable one is one CalibrantError."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CalibrantError(f"unknown device '{device}' for `device`; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise CalibrantError(f"`device` {device}: no CUDA device is available (PyTorch {torch.__version__}, "
                                 f"{build}); use `device` cpu or leave `device` unset")
        if dev.index is not None and dev.index >= count:
            raise CalibrantError(f"`device` {device}: this machine has {count} CUDA device(s), cuda:0"
                                 f"{f'..cuda:{count - 1}' if count > 1 else ''}; choose one of them")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise CalibrantError(f"`device` {device}: MPS is not available on this machine; use `device` cpu")
    elif dev.type != "cpu":
        raise CalibrantError(f"`device` {device}: calibrant runs blocks on cpu, cuda or mps; use one of them")
    return dev


def check_pattern_sparsity(sparsity: float | None, pattern: str | None) -> None:
    """Refuse an explicit ``sparsity`` that contradicts the N:M ``pattern`` (which decides what is pruned)."""
    from calibrant.methods.sparsity import parse_pattern

    nm = parse_pattern(pattern) if isinstance(pattern, str | tuple) else None
    if nm is None or sparsity is None or not isinstance(sparsity, int | float):
        return
    implied = 1 - nm[0] / nm[1]
    if abs(float(sparsity) - implied) > 1e-9:
        raise RecipeError(f"`sparsity` {sparsity:g} contradicts `pattern` {nm[0]}:{nm[1]}, which prunes {nm[1] - nm[0]} "
                          f"of every {nm[1]} weights (sparsity {implied:g}); drop `sparsity` (the pattern sets it) or "
                          f"drop `pattern`")


def resolve_calibration(
    calibration: str | Path | CalibrationSet | torch.Tensor | None, tokenizer: Any, seed: int, max_length: int | None,
    model: LoadedModel | torch.nn.Module | None = None, progress: bool | None = None,
) -> CalibrationSet | None:
    """A spec string, a saved calibration file, a CalibrationSet or a token-id tensor → CalibrationSet.

    ``model`` is needed only by self-calibration specs (``self:NxL``), which generate text with it.
    """
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        calib = CalibrationSet.from_tensor(calibration)
    elif isinstance(calibration, CalibrationSet):
        calib = calibration
    elif Path(str(calibration)).suffix == ".safetensors" and Path(str(calibration)).is_file():
        calib = CalibrationSet.load(calibration)
    else:
        return make_calibration(str(calibration), tokenizer, seed=seed, max_length=max_length, model=model,
                                progress=progress)
    calib.check_tokenizer(tokenizer)
    check_fits_context(calib, max_length)
    return calib


def check_fits_context(calib: CalibrationSet, max_length: int | None) -> None:
    """Refuse a set whose sequences are longer than the model's context (as a spec asking for them is)."""
    if max_length is not None and calib.seq_len > max_length:
        raise CalibrationError(f"calibration sequences of L={calib.seq_len} tokens exceed the model's context length "
                               f"{max_length}; make a set with L <= {max_length}")


def compress_model(
    model: str | Path | LoadedModel,
    method: str | Method | list[Method],
    *,
    sparsity: float | None = None,
    pattern: str | None = None,
    calibration: str | Path | CalibrationSet | torch.Tensor | None = DEFAULT_CALIBRATION,
    seed: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    propagate: str = "compressed",
    pipeline: str = "one-pass",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    export_format: str = "hf",
    gguf_type: str | None = None,
    chat_template: str | Path | None = None,
    stream: bool | None = None,
    max_activation_memory: int | str | None = None,
    **method_params: Any,
) -> CompressResult:
    """Compress a model end to end; with ``out`` the result is saved as a Hugging Face directory.

    ``export_format="compressed-tensors"`` (alias ``"packed"``) writes packed integer weights with their
    scales and zero points instead of dequantized floats (loads in vLLM); schemes it cannot store are
    refused before the model is compressed. ``export_format="gguf"`` writes ``out`` as one ``.gguf`` file
    (llama.cpp) of a ``gguf-*`` scheme's blocks; ``gguf_type`` (``q4_0`` … or ``f16``/``f32`` for a recipe
    that quantizes nothing) must agree with the scheme, and defaults to it. ``chat_template``: a Jinja file
    the tokenizer takes before chat-formatted calibration (``SOURCE:chat``) is rendered; a saved model
    carries it. ``stream``: read the model block by block from its safetensors and write each compressed
    block to ``out`` at once, for a model larger than memory (:mod:`calibrant.streaming`); None (default)
    streams when an in-memory load would not fit, False never does. ``max_activation_memory`` (bytes, or a
    size such as ``"2G"``; default: a quarter of the memory available when the run starts): above it the
    calibration activations are held in memory-mapped files in the cache directory instead of RAM.

    Everything that can be refused (output exists, unknown method, bad sparsity or pattern) is checked
    before the model is loaded, so bad input costs nothing and writes nothing.
    """
    export_format = normalize_format(export_format)
    if gguf_type is not None and export_format != "gguf":
        raise ExportError(f"`gguf_type` {gguf_type} is for the gguf export format; add --format gguf or drop it")
    if out is not None and export_format == "gguf":
        check_gguf_output(out, overwrite, inputs=(model,))
    elif out is not None:
        check_output(out, overwrite, inputs=(model,))
    device = check_device(device)
    activation_bytes = activation_budget_bytes(max_activation_memory)
    if isinstance(method, str):
        methods = make_recipe(method, sparsity=sparsity, pattern=pattern, **method_params)
        check_pattern_sparsity(sparsity, pattern)
    else:
        methods = [method] if isinstance(method, Method) else list(method)
    if not any(m.reads_data() for m in methods):
        calibration = None  # a data-free recipe reads no activations: no set is drawn, none is recorded
    if decide_streaming(model, stream, out, export_format, progress):
        assert out is not None
        loaded, report, calib = _compress_streamed(
            model, methods, calibration, seed=seed, out=Path(out), overwrite=overwrite, batch_size=batch_size,
            propagate=propagate, pipeline=pipeline, include=include, exclude=exclude, device=device,
            progress=progress, chat_template=chat_template, activation_bytes=activation_bytes)
        return CompressResult(loaded, report, calib, out=Path(out), metadata=read_metadata(out) or {})
    packed = out is not None and export_format == FORMAT_NAME
    if packed:
        check_packable_recipe(methods)
    if out is not None and export_format == "gguf":
        gguf_type = check_gguf_recipe(methods, gguf_type)
    loaded = as_loaded(model, quiet=not progress, chat_template=chat_template)
    if packed:
        check_packable_recipe(methods, loaded.model, include, exclude)
    if out is not None and export_format == "gguf":
        check_gguf_model(loaded.model, loaded.path, loaded.tokenizer)
    if out is not None:  # a packed export is smaller: count its floor (fp32 / 8: 4 bits a weight)
        dense = model_bytes(loaded.model)
        check_space(out, dense if export_format == "hf" else dense // 8, "--out")
    calib = resolve_calibration(calibration, loaded.tokenizer, seed, loaded.context_length,
                                model=loaded, progress=None if progress else False)
    report = compress(
        loaded.model, calib, methods, batch_size=batch_size, device=device, propagate=propagate, pipeline=pipeline,
        include=include, exclude=exclude, progress=progress, max_activation_bytes=activation_bytes,
    )
    metadata = _metadata(report, loaded.spec, loaded.model_hash)
    keep_dtype = export_format == "hf" and loaded.source_dtype in HALF_DTYPES and \
        next(loaded.model.parameters()).dtype == torch.float32
    if keep_dtype:  # computed in float32, the result is the checkpoint's dtype: in memory as written
        round_weights(loaded.model, loaded.source_dtype)
    if export_format == "hf":
        metadata["dtype"] = {"stored": _dtype_name(loaded.source_dtype if keep_dtype else
                                                   next(loaded.model.parameters()).dtype),
                             "compute": _dtype_name(next(loaded.model.parameters()).dtype)}
    result = CompressResult(loaded, report, calib, metadata=metadata)
    if out is not None and export_format == "gguf":
        result.out, result.metadata["export"] = save_gguf(
            loaded.model, out, metadata, source_dir=loaded.path, tokenizer=loaded.tokenizer, gguf_type_name=gguf_type,
            overwrite=overwrite)
    elif packed:
        result.out = save_packed(loaded.model, loaded.tokenizer, out, metadata, overwrite=overwrite)
    elif out is not None:
        result.out = save_model(loaded.model, loaded.tokenizer, out, metadata, overwrite=overwrite,
                                source_dir=loaded.path, dtype=loaded.source_dtype if keep_dtype else None)
    return result


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _metadata(report: CompressionReport, spec: str, model_hash: str) -> dict[str, Any]:
    """``calibrant.json`` of a compression."""
    return {
        "calibrant_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_model": {"spec": spec, "hash": model_hash},
        "recipe": report.recipe,
        "calibration": report.calibration,
        "propagate": report.propagate,
        "pipeline": report.pipeline,
        **({"plans": report.plans} if report.plans else {}),
        **({"fallbacks": report.fallbacks} if report.fallbacks else {}),
        "overall_sparsity": report.sparsity,
        "layers": [
            {"name": r.name, "shape": list(r.shape), "sparsity": r.sparsity, "rel_error": r.rel_error, **r.info}
            for r in report.layers
        ],
        "effective_bits": report.effective_bits,
        "timings": report.timings,
        **({"activations": report.activations} if report.activations else {}),
    }


def _streamed_perplexity(model: str | Path, names: list[str], *, seq_len: int, stride: int | None,
                         max_tokens: int | None, batch_size: int, progress: bool,
                         chat_template: str | Path | None) -> dict[str, PerplexityResult]:
    import transformers

    from calibrant.evaluate.streamed import streamed_perplexity
    from calibrant.models.loader import resolve_model_dir
    from calibrant.streaming import available_memory

    template = read_chat_template(chat_template) if chat_template is not None else None
    path = resolve_model_dir(model, quiet=not progress)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if template is not None:
        tokenizer.chat_template = template
    results = {}
    for name in names:
        ids, meta = heldout_token_ids(name, tokenizer)
        results[name] = streamed_perplexity(path, ids, seq_len=seq_len, stride=stride, batch_size=batch_size,
                                            max_tokens=max_tokens, max_activation_bytes=available_memory() // 4,
                                            progress=progress, meta=meta)
    return results


def decide_streaming(model: str | Path | LoadedModel, stream: bool | None, out: str | Path | None = None,
                     export_format: str = "hf", progress: bool = True, needs_out: bool = True) -> bool:
    """Whether a run on ``model`` streams it (``stream``: True, False, or None to decide by memory); a
    streamed compression that cannot be (no ``out``, a non-HF format) is refused here, before anything is
    read. ``needs_out=False`` for evaluation."""
    if stream is False:
        return False
    if isinstance(model, LoadedModel):
        if stream:
            raise CalibrantError("stream=True reads the model from its checkpoint, but this one is loaded in memory "
                                 "already; pass its directory or alias instead")
        return False
    if stream is None:
        from calibrant.models.loader import resolve_model_dir
        from calibrant.streaming import would_not_fit

        local = Path(str(model)).expanduser()
        if not (local.is_dir() or str(model) in ALIASES):
            return False  # hub ids and .gguf files are converted in memory first
        fits_not, need, free = would_not_fit(resolve_model_dir(model, quiet=not progress))
        if not fits_not:
            return False
        if progress:
            print(f"calibrant: the model needs {human_bytes(need)} in memory in float32, {human_bytes(free)} is "
                  "available: streaming it block by block (--stream)", file=sys.stderr)
    if not needs_out:
        return True
    if out is None:
        raise CalibrantError("a streamed model is written block by block as it is compressed, so it needs an "
                             "output directory: pass --out DIR (or use a machine where the model fits in memory)")
    if export_format != "hf":
        raise CalibrantError(f"a streamed model is written as a Hugging Face directory; --format {export_format} "
                             "needs the whole model in memory: stream to a directory first, then "
                             "`calibrant export DIR --format ...` where it fits")
    return True


def _compress_streamed(model: str | Path, methods: list[Method], calibration: Any, *, seed: int, out: Path,
                       overwrite: bool, batch_size: int, propagate: str, pipeline: str, include: list[str] | None,
                       exclude: list[str] | None, device: torch.device | None, progress: bool,
                       chat_template: str | Path | None,
                       activation_bytes: int | None = None) -> tuple[LoadedModel, CompressionReport, Any]:
    """The streamed run (:mod:`calibrant.streaming`); returns a LoadedModel whose weights are all released."""
    import transformers

    from calibrant.export.streamed import StreamedBlocks
    from calibrant.models.adapter import context_length_of
    from calibrant.models.lazy import LazyCheckpoint, Materializer, skeleton
    from calibrant.models.loader import check_model_dir, model_dir_hash, resolve_model_dir

    template = read_chat_template(chat_template) if chat_template is not None else None
    if isinstance(calibration, str) and calibration.strip().lower().startswith("self"):
        raise CalibrantError("self-calibration generates text with the whole model, which a streamed run never "
                             "holds; make the set first where the model fits (calibrant calib make self:...) and "
                             "pass the saved file, or use a text source")
    path = resolve_model_dir(model, quiet=not progress)
    check_model_dir(path)
    checkpoint = LazyCheckpoint(path)
    dtype = checkpoint.dtype()
    check_space(out, checkpoint.nbytes(), "--out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if template is not None:
        tokenizer.chat_template = template
    # computed in float32 as in memory, each block read in float32 and written back in the checkpoint's dtype
    skel = skeleton(path, torch.float32)
    calib = resolve_calibration(calibration, tokenizer, seed, context_length_of(skel),
                                progress=None if progress else False)
    if calib is not None:
        from calibrant.streaming import block_memory, check_block_fits

        stats = {k for m in methods for k in m.statistics}
        rows = calib.n * calib.seq_len * int(getattr(skel.config, "hidden_size", 0)) * 4
        check_block_fits(block_memory(skel, stats, min(3 * rows, activation_bytes or 3 * rows)))
    digest = model_dir_hash(path)
    materializer = Materializer(skel, checkpoint, device="cpu", dtype=torch.float32)
    with disk_errors(str(out), human_bytes(checkpoint.nbytes())), atomic_path(out, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        blocks = StreamedBlocks(skel, materializer, tmp, dtype)
        report = compress(skel, calib, methods, batch_size=batch_size, device=device, propagate=propagate,
                          pipeline=pipeline, include=include, exclude=exclude, progress=progress, blocks=blocks,
                          max_activation_bytes=activation_bytes)
        metadata = _metadata(report, str(model), digest)
        metadata["dtype"] = {"stored": _dtype_name(dtype), "compute": "float32"}
        metadata["streamed"] = {"dtype": _dtype_name(dtype), "compute_dtype": "float32",
                                "peak_resident_blocks": materializer.peak_blocks,
                                "checkpoint_bytes": checkpoint.nbytes()}
        blocks.finish(tokenizer, metadata, path)
    release_output(out)
    checkpoint.close()
    return LoadedModel(model=skel, tokenizer=tokenizer, spec=str(model), path=out, model_hash=digest), report, calib


def evaluate_perplexity(
    model: str | Path | LoadedModel,
    corpora: list[str] | str = "wiki",
    *,
    seq_len: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    chat_template: str | Path | None = None,
    stream: bool | None = None,
) -> dict[str, PerplexityResult]:
    """Perplexity on the held-out split of each corpus (documents never used for calibration);
    ``CORPUS:chat`` (e.g. ``dialogue:chat``) scores its held-out conversations rendered through the chat
    template (``chat_template``: a Jinja file to use instead of the tokenizer's). ``stream``: run a model
    directory block by block from its safetensors (:mod:`calibrant.evaluate.streamed`), for a model larger
    than memory; None (default) streams when an in-memory load would not fit."""
    names = [c.strip() for c in (corpora.split(",") if isinstance(corpora, str) else corpora) if c.strip()]
    for name in names:
        check_heldout_name(name)  # a typo is refused before the model loads
    if decide_streaming(model, stream, None, "hf", progress, needs_out=False):
        return _streamed_perplexity(model, names, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                                    batch_size=batch_size, progress=progress, chat_template=chat_template)
    loaded = as_loaded(model, quiet=not progress, chat_template=chat_template)
    results = {}
    for name in names:
        ids, meta = heldout_token_ids(name, loaded.tokenizer)
        results[name] = perplexity(
            loaded.model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size, max_tokens=max_tokens,
            progress=progress, meta=meta,
        )
    return results


def evaluate_zeroshot(
    model: str | Path | LoadedModel,
    tasks: list[str] | str = STANDARD_SUITE,
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    hub: bool | None = None,
    progress: bool = True,
    scorer: str = "prefix",
    token_budget: int | None = None,
) -> ZeroShotResult:
    """Zero-/few-shot accuracy through lm-eval on the in-memory model (compressed or not, never saved first).

    ``tasks`` default to the pruning papers' 7-task suite; offline tasks run from pinned local data
    (:mod:`calibrant.evaluate.zeroshot`), other lm-eval task names run online (``hub``). Bad task names
    and options are refused before the model is loaded. ``scorer``: ``"prefix"`` (calibrant's shared-prefix
    scorer: each distinct token once, batches of ``token_budget`` tokens) or ``"hf"`` (lm-eval's HF
    backend, batches of ``batch_size`` requests); both give the same answers.
    """
    names = list(tasks) if not isinstance(tasks, str) else tasks
    check_tasks(names, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, hub=hub, scorer=scorer,
                token_budget=token_budget)
    loaded = as_loaded(model, quiet=not progress)
    return evaluate_tasks(loaded.model, loaded.tokenizer, names, limit=limit, num_fewshot=num_fewshot,
                          batch_size=batch_size, progress=progress, hub=hub, scorer=scorer, token_budget=token_budget)


def export_model(
    model_dir: str | Path,
    out: str | Path,
    *,
    export_format: str = "gguf",
    gguf_type: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Write an already-compressed output directory (``calibrant compress --out DIR``) in another format:
    ``"gguf"`` — one ``.gguf`` file whose quantized tensors are the directory's codes on their GGUF block
    grids (kept in ``calibrant-extras/``), nothing re-rounded; the tokenizer comes from the GGUF source's
    metadata the directory carries. Returns the path and the per-tensor summary."""
    from calibrant.export.gguf import check_exported_type, restore_gguf_grids

    if normalize_format(export_format) != "gguf":
        raise ExportError(f"calibrant export writes --format gguf; a {export_format} output is written by "
                          f"calibrant compress --format {export_format}")
    check_gguf_output(out, overwrite, inputs=(model_dir,))
    check_exported_type(None, gguf_type)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CalibrantError(f"{model_dir} is not a directory; give the --out directory of calibrant compress")
    metadata = read_metadata(model_dir) or {}
    loaded = as_loaded(model_dir, quiet=not progress)
    restore_gguf_grids(loaded.model, model_dir, metadata)
    check_exported_type(loaded.model, gguf_type)
    check_gguf_model(loaded.model, loaded.path, loaded.tokenizer)
    return save_gguf(loaded.model, out, metadata, source_dir=loaded.path, tokenizer=loaded.tokenizer,
                     gguf_type_name=gguf_type, overwrite=overwrite)


def compute_imatrix(
    model: str | Path | LoadedModel,
    calibration: str | Path | CalibrationSet | torch.Tensor = DEFAULT_CALIBRATION,
    *,
    out: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    chat_template: str | Path | None = None,
) -> Imatrix:
    """llama.cpp's importance matrix of the dense ``model`` over any calibration set (``llama-quantize
    --imatrix`` reads it); with ``out`` it is written as ``.gguf`` (provenance inside) or legacy ``.dat``
    (provenance in ``<out>.json``). The output and the model's family are checked before the set is drawn.
    """
    if out is not None:
        check_imatrix_output(out, overwrite)
    device = check_device(device)
    loaded = as_loaded(model, quiet=not progress, chat_template=chat_template)
    tensor_names(loaded.model)
    calib = resolve_calibration(calibration, loaded.tokenizer, seed, loaded.context_length, model=loaded,
                                progress=None if progress else False)
    if calib is None:
        raise CalibrationError("an importance matrix is measured on calibration data; give a set, e.g. wiki:128x512")
    imatrix = collect_imatrix(loaded.model, calib, batch_size=batch_size, device=device, progress=progress)
    imatrix.provenance["model"] = {"spec": loaded.spec, "hash": loaded.model_hash}
    if out is not None:
        write_imatrix(out, imatrix, overwrite=overwrite)
    return imatrix


def _loaded_with_scores_data(
    model: str | Path | LoadedModel, calibration: Any, score: str, seed: int, progress: bool
) -> tuple[LoadedModel, CalibrationSet | None]:
    """The model, and the calibration set its structured importance score reads (``wanda``; none for others)."""
    loaded = as_loaded(model, quiet=not progress)
    calib = resolve_calibration(calibration if score == "wanda" else None, loaded.tokenizer, seed,
                                loaded.context_length, progress=None if progress else False)
    return loaded, calib


def search_structured(
    model: str | Path | LoadedModel,
    budget: float = 0.8,
    samples: int = 64,
    *,
    calibration: str | Path | CalibrationSet | torch.Tensor | None = "wiki:32x512",
    score: str = "wanda",
    seed: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> SearchResult:
    """Predictor-guided search of per-block structured-pruning configurations keeping ``budget`` of the block
    parameters: loads ``model`` and the calibration set (used by the ``wanda`` score only), then runs
    :func:`calibrant.search.search_structured` (``options``: its keyword arguments, e.g. ``proxy_tokens``).

    Bad arguments are refused before the model is loaded.
    """
    if out is not None:
        check_output(out, overwrite, inputs=(model,))
    structured_search.check_search(budget, samples, score=score, out=out, overwrite=overwrite,
                                   **{k: options[k] for k in ("rounds", "top_k", "proxy_tokens", "strategy",
                                                              "max_samples", "patience", "proxy_metric",
                                                              "proxy_corpus", "seq_len")
                                      if k in options})
    loaded, calib = _loaded_with_scores_data(model, calibration, score, seed, progress)
    return structured_search.search_structured(loaded, calib, budget, samples, score=score, seed=seed, out=out,
                                               overwrite=overwrite, progress=progress, **options)


def prune_structured(
    model: str | Path | LoadedModel,
    heads: float,
    mlp: float,
    *,
    calibration: str | Path | CalibrationSet | torch.Tensor | None = "wiki:32x512",
    score: str = "wanda",
    seed: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> tuple[LoadedModel, StructuredConfig, Path | None]:
    """Prune every block to the same keep ratios (``heads`` of KV groups, ``mlp`` of MLP channels), no search:
    loads ``model`` and the calibration set, then runs :func:`calibrant.search.prune_structured` (``options``:
    ``quantum``, ``batch_size``). Returns (loaded model, now pruned; the configuration; the output directory).

    Bad arguments are refused before the model is loaded.
    """
    if out is not None:
        check_output(out, overwrite, inputs=(model,))
    structured_search.check_prune(heads, mlp, score=score, out=out, overwrite=overwrite)
    loaded, calib = _loaded_with_scores_data(model, calibration, score, seed, progress)
    return structured_search.prune_structured(loaded, calib, heads, mlp, score=score, out=out, overwrite=overwrite,
                                              progress=progress, **options)
