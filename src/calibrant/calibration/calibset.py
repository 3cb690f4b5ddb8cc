"""CalibrationSet: ``[n, L]`` token ids plus the provenance that makes them reproducible.

``make_calibration("wiki:128x512", tokenizer, seed=0)`` tokenizes the corpus's ``calib`` documents
(without special tokens), joins them with the tokenizer's EOS id between documents, and draws ``n``
windows of ``L`` tokens at start offsets uniform over the concatenation ("random-windows", with
replacement) from ``torch.Generator().manual_seed(seed)``. ``wiki:docs:128x512`` keeps every window
inside one document ("document-windows") and ``wiki:packed:128x512`` packs whole documents in a seeded
order ("packed-documents"); see :mod:`calibrant.calibration.sampling`. Tokenized corpora are cached under
``$CALIBRANT_CACHE/tokens`` keyed by (corpus checksum, tokenizer hash), so only the first call pays
for tokenization. ``self:128x512`` is self-calibration (:mod:`calibrant.calibration.selfgen`) and needs
the model. ``:chat`` / ``:assistant-only`` (:mod:`~calibrant.calibration.chat`), ``mix(...)``
(:mod:`~calibrant.calibration.mixture`) and ``select=`` (:mod:`~calibrant.calibration.selection`) are
dispatched from :func:`make_calibration`; their logic lives in those modules.

One module (over 500 lines) because its parts share the rules that decide whether two calibration
sets are the same: the tokenizer fingerprint and joiner that key the token cache, the provenance
every source fills in, and which provenance keys the content hash leaves out (``COSMETIC_KEYS``).
The tokenizer fingerprint and token cache (its first two sections) are the part that could stand
alone, as ``calibration/tokens.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrant.cache import atomic_path, cache_dir, human_bytes, quiet_loggers, sha256_file, stable_hash
from calibrant.calibration.chat import (
    ASSISTANT_ONLY,
    CHAT_OPTION,
    assistant_token_masks,
    render_chat,
    template_hash,
)
from calibrant.calibration.corpora import (
    HUB_CORPORA,
    OFFLINE_CORPORA,
    check_corpus_name,
    get_corpus,
    get_hf_corpus,
)
from calibrant.calibration.sampling import document_windows, packed_documents, random_windows
from calibrant.calibration.selfchat import PROMPT_CORPUS, chat_prompts, generated_mask
from calibrant.calibration.selfgen import (
    generate_after_prefixes,
    generate_self_calibration,
    parse_self_options,
)
from calibrant.calibration.spec import DEFAULT_SAMPLING, SAMPLING_MODES, SPEC_FORM, CalibSpec, parse_spec
from calibrant.errors import CalibrationError, disk_errors, disk_full_reason, suggest

SAVE_FORMAT = "calibrant.calibset/1"
TOKEN_CACHE_FORMAT = 1
SOURCES: tuple[str, ...] = (*OFFLINE_CORPORA, "file", "random-vocab", "self", "mix", *HUB_CORPORA, "hf")
SELF_CACHE_FORMAT = 1
# Provenance keys that describe but do not determine the ids: left out of the content hash so that the
# same ids from the same data keep their hash across calibrant versions, tokenizer paths and file paths
# ("spec" and "options" only repeat source, field, n and L, plus the file's path).
# "model_name", "generation_timing" (self-calibration) and "selection_timing" say where and how fast, not what.
COSMETIC_KEYS = frozenset({"calibrant_version", "tokenizer_name", "path", "spec", "options", "model_name",
                           "generation_timing", "selection_timing"})
_TEXT_FILE_OPTIONS = ("paragraphs",)


def calibrant_version() -> str:
    try:
        from importlib.metadata import version

        return version("calibrant")
    except Exception:  # not installed (source checkout)
        return "0+unknown"


# --------------------------------------------------------------------------------------------------
# Tokenizer fingerprints


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    out = {}
    for role in ("bos", "eos", "unk", "pad", "sep", "cls", "mask"):
        tok = getattr(tokenizer, f"{role}_token", None)
        if tok is not None:
            out[role] = [str(tok), getattr(tokenizer, f"{role}_token_id", None)]
    return out


def tokenizer_hash(tokenizer: Any) -> str:
    """Stable 16-hex fingerprint of a tokenizer: its vocabulary (with added tokens) and special tokens.

    The Python class is deliberately left out: the same tokenizer files load as different classes under
    different transformers versions, and that must not make calibration sets look incompatible.
    """
    try:
        vocab = tokenizer.get_vocab()
    except Exception as e:
        raise CalibrationError(f"cannot fingerprint tokenizer {type(tokenizer).__name__}: it has no get_vocab() "
                               f"({e}); pass a Hugging Face tokenizer (AutoTokenizer.from_pretrained)") from e
    h = hashlib.sha256()
    for token, idx in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])):
        h.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    return stable_hash({"vocab": h.hexdigest(), "size": len(vocab), "special": _special_tokens(tokenizer)})


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _vocab_size(tokenizer: Any) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        return int(tokenizer.vocab_size)


def _joiner(tokenizer: Any) -> tuple[str, list[int]]:
    """What goes between documents: the EOS id (else SEP), else the tokenization of a blank line."""
    for role in ("eos", "sep"):
        idx = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(idx, int):
            return role, [idx]
    ids = list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])
    if not ids:
        raise CalibrationError(f"tokenizer {_tokenizer_name(tokenizer)} has no EOS token and encodes a blank line "
                               "as nothing, so documents cannot be separated; set tokenizer.eos_token first")
    return "blank-line", ids


# --------------------------------------------------------------------------------------------------
# Tokenization with a content-keyed cache


def _quiet_length_warnings() -> contextlib.AbstractContextManager[None]:
    """Silence transformers' 'sequence longer than model_max_length' warning: documents are not model inputs."""
    return quiet_loggers("transformers.tokenization_utils_base", "transformers")


def _tokenize(docs: Sequence[str], tokenizer: Any, label: str, progress: bool | None,
              batch_size: int = 64) -> list[list[int]]:
    from tqdm.auto import tqdm

    out: list[list[int]] = []
    bar = tqdm(total=len(docs), desc=f"tokenizing {label}", unit="doc",
               disable=(None if progress is None else not progress), leave=False)
    with _quiet_length_warnings(), bar:
        for i in range(0, len(docs), batch_size):
            batch = list(docs[i:i + batch_size])
            enc = tokenizer(batch, add_special_tokens=False, truncation=False)["input_ids"]
            out.extend(list(e) for e in enc)
            bar.update(len(batch))
    return out


def _load_array(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            arr = np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None  # corrupt cache entry: recompute and overwrite it
    return arr if arr.ndim == 1 else None


def _save_array(path: Path, arr: np.ndarray) -> None:
    """Cache ``arr``; a full disk only costs the cache entry (the work goes on, recomputed next time)."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    except Exception as exc:
        if disk_full_reason(exc) is None:
            raise
        logging.getLogger("calibrant").debug("not cached (%s): %s", disk_full_reason(exc), path)


def document_token_ids(docs: Sequence[str], tokenizer: Any, content_key: dict[str, Any], label: str,
                       progress: bool | None = None, need_lengths: bool = True
                       ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """:func:`joined_token_ids` plus each document's token count (int64, in document order), so that
    document ``i`` is ``flat[starts[i]:starts[i] + lengths[i]]`` with ``starts`` from :func:`document_starts`.

    The lengths are cached beside the ids (``KEY.npy`` + ``KEY.lengths``); an ids entry without its lengths
    is re-tokenized when they are needed (``need_lengths``), else served as is with ``None`` lengths.
    """
    tok_hash = tokenizer_hash(tokenizer)
    joiner, joiner_ids = _joiner(tokenizer)
    key = stable_hash({"content": content_key, "tokenizer": tok_hash, "joiner": joiner_ids,
                       "format": TOKEN_CACHE_FORMAT}, length=24)
    path = cache_dir("tokens") / f"{key}.npy"
    lengths_path = path.with_suffix(".lengths")
    meta = {"joiner": joiner, "joiner_ids": joiner_ids, "tokenizer_hash": tok_hash, "documents": len(docs)}
    arr = _load_array(path)
    if arr is not None and arr.dtype == np.int32:
        lengths = _load_array(lengths_path)
        sep = len(joiner_ids) * max(0, len(docs) - 1)
        if lengths is not None and (lengths.size != len(docs) or int(lengths.sum()) + sep != arr.size):
            lengths = None  # stale or foreign: recompute
        if lengths is not None or not need_lengths:
            return arr, lengths, {**meta, "tokens": int(arr.size)}
    vocab = _vocab_size(tokenizer)
    if vocab >= 2**31:
        raise CalibrationError(f"tokenizer vocabulary of {vocab} ids does not fit int32; use a smaller tokenizer")
    pieces: list[np.ndarray] = []
    sep_arr = np.asarray(joiner_ids, dtype=np.int32)
    lengths_list = []
    for i, ids in enumerate(_tokenize(docs, tokenizer, label, progress)):
        if i:
            pieces.append(sep_arr)
        pieces.append(np.asarray(ids, dtype=np.int32))
        lengths_list.append(len(ids))
    arr = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    lengths = np.asarray(lengths_list, dtype=np.int64)
    _save_array(path, arr)
    _save_array(lengths_path, lengths)
    return arr, lengths, {**meta, "tokens": int(arr.size)}


def document_starts(lengths: np.ndarray, joiner_len: int) -> np.ndarray:
    """Offsets of the documents in the joined stream (each document is followed by ``joiner_len`` ids)."""
    starts = np.zeros(lengths.size, dtype=np.int64)
    if lengths.size > 1:
        starts[1:] = np.cumsum(lengths[:-1] + joiner_len)
    return starts


def joined_token_ids(docs: Sequence[str], tokenizer: Any, content_key: dict[str, Any], label: str,
                     progress: bool | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Token ids (int32, 1-D) of ``docs`` joined with the joiner between documents, cached on disk.

    ``content_key`` must identify the documents' text (e.g. corpus checksum and split); it is combined with
    the tokenizer hash and the joiner to form the cache key. Returns (ids, {"joiner", "joiner_ids",
    "tokenizer_hash", "documents", "tokens"}).
    """
    arr, _, meta = document_token_ids(docs, tokenizer, content_key, label, progress, need_lengths=False)
    return arr, meta


# --------------------------------------------------------------------------------------------------
# CalibrationSet


def _ids_digest(ids: torch.Tensor) -> str:
    arr = ids.detach().cpu().contiguous().to(torch.int64).numpy().astype("<i8", copy=False)
    h = hashlib.sha256(f"{list(arr.shape)}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _validate_ids(input_ids: Any) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        try:
            input_ids = torch.as_tensor(np.asarray(input_ids))
        except Exception as e:
            raise CalibrationError(f"calibration ids of type {type(input_ids).__name__} are not a tensor; "
                                   "pass a 2-D integer torch.Tensor [n, L]") from e
    if input_ids.dtype in (torch.bool,) or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex:
        raise CalibrationError(f"calibration ids have dtype {input_ids.dtype}; pass integer token ids "
                               "(torch.long), e.g. tokenizer(...)['input_ids']")
    if input_ids.dim() != 2:
        raise CalibrationError(f"calibration ids have shape {list(input_ids.shape)}; pass a 2-D tensor [n, L] "
                               "(use ids.unsqueeze(0) for a single sequence)")
    n, seq_len = input_ids.shape
    if n <= 0 or seq_len <= 0:
        raise CalibrationError(f"calibration ids have shape [{n}, {seq_len}]; need n > 0 sequences of L > 0 tokens")
    if int(input_ids.min()) < 0:
        raise CalibrationError(f"calibration ids contain a negative id ({int(input_ids.min())}); "
                               "token ids must be >= 0 (remove padding markers such as -100)")
    return input_ids.detach().cpu().to(torch.long).contiguous()


@dataclass
class CalibrationSet:
    """``input_ids`` (LongTensor [n, L]) and the provenance that says exactly how they were made.

    ``token_mask`` (bool [n, L], optional): the tokens whose activations the statistics count (e.g. only the
    assistant's turns of chat-formatted data); every token still runs through the model as context."""

    input_ids: torch.Tensor
    provenance: dict[str, Any]
    token_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.input_ids = _validate_ids(self.input_ids)
        if self.token_mask is not None:
            mask = torch.as_tensor(self.token_mask).detach().cpu()
            if tuple(mask.shape) != tuple(self.input_ids.shape):
                raise CalibrationError(f"token_mask has shape {tuple(mask.shape)}, the ids {tuple(self.input_ids.shape)}"
                                       "; give one flag per token")
            self.token_mask = mask.to(torch.bool).contiguous()
            if not bool(self.token_mask.any()):
                raise CalibrationError("token_mask selects no token; the statistics would count nothing")
        self.provenance = dict(self.provenance)
        self.provenance.setdefault("n", int(self.input_ids.shape[0]))
        self.provenance.setdefault("seq_len", int(self.input_ids.shape[1]))

    @property
    def n(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def hash(self) -> str:
        """16-hex content hash of the ids and the provenance (minus purely descriptive keys)."""
        prov = {k: v for k, v in self.provenance.items() if k not in COSMETIC_KEYS}
        content = {"ids": _ids_digest(self.input_ids), "provenance": prov}
        if self.token_mask is not None:
            content["token_mask"] = _ids_digest(self.token_mask.to(torch.int64))
        return stable_hash(content)

    def __repr__(self) -> str:
        return (f"CalibrationSet(n={self.n}, seq_len={self.seq_len}, source={self.provenance.get('source')!r}, "
                f"hash={self.hash})")

    @classmethod
    def from_tensor(cls, input_ids: Any, source: str = "user-tensor", **provenance: Any) -> CalibrationSet:
        """Wrap user-made ids (2-D, integer, n and L > 0) with whatever provenance the user can give."""
        ids = _validate_ids(input_ids)
        prov = {"source": source, **provenance, "n": int(ids.shape[0]), "seq_len": int(ids.shape[1])}
        prov.setdefault("calibrant_version", calibrant_version())
        return cls(ids, prov)

    def save(self, path: str | Path) -> None:
        """Write a .safetensors file with the ids and the provenance (JSON) in its metadata, atomically."""
        from safetensors.torch import save_file

        metadata = {"format": SAVE_FORMAT, "provenance": json.dumps(self.provenance, sort_keys=True, default=str),
                    "hash": self.hash}
        tensors = {"input_ids": self.input_ids}
        if self.token_mask is not None:
            tensors["token_mask"] = self.token_mask.to(torch.uint8)
        size = self.input_ids.numel() * 8 + (0 if self.token_mask is None else self.token_mask.numel())
        with disk_errors(str(path), human_bytes(size)), atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        """Read a file written by :meth:`save`; a missing, corrupt or foreign file raises CalibrationError."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"calibration set file '{path}' does not exist; check the path or create it "
                                   "with make_calibration(...).save(path)")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                ids = f.get_tensor("input_ids")
                mask = f.get_tensor("token_mask") if "token_mask" in f.keys() else None
            if metadata.get("format") != SAVE_FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}")
            provenance = json.loads(metadata["provenance"])
        except Exception as e:
            raise CalibrationError(f"calibration set file '{path}' is corrupt or not a calibrant calibration set "
                                   f"({type(e).__name__}: {str(e)[:80]}); recreate it with "
                                   "make_calibration(...).save(path)") from e
        try:
            cs = cls(ids, provenance, mask)
        except CalibrationError as e:
            raise CalibrationError(f"calibration set file '{path}' is corrupt: {e}") from e
        if metadata.get("hash") and metadata["hash"] != cs.hash:
            raise CalibrationError(f"calibration set file '{path}' is corrupt: its content hash {cs.hash} differs "
                                   f"from the recorded {metadata['hash']}; recreate it with make_calibration")
        return cs

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer other than the one the ids were made with (or one whose vocab is too small)."""
        want = self.provenance.get("tokenizer_hash")
        if want:
            have = tokenizer_hash(tokenizer)
            if have != want:
                made = self.provenance.get("tokenizer_name", "?")
                raise CalibrationError(
                    f"calibration set {self.hash} was tokenized with '{made}' (tokenizer hash {want}) but the model's "
                    f"tokenizer is '{_tokenizer_name(tokenizer)}' (hash {have}); remake the calibration set with "
                    "the model's tokenizer"
                )
        vocab = _vocab_size(tokenizer)
        top = int(self.input_ids.max())
        if top >= vocab:
            raise CalibrationError(f"calibration set {self.hash} holds token id {top} but tokenizer "
                                   f"'{_tokenizer_name(tokenizer)}' has only {vocab} ids; remake it with this tokenizer")


# --------------------------------------------------------------------------------------------------
# Sources


Messages = list[dict[str, str]]
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


def _jsonl_messages(value: Any, where: str) -> Messages:
    """A JSONL ``messages`` field checked: a list of ``{"role": ..., "content": text}`` objects."""
    if not isinstance(value, list):
        raise CalibrationError(f"{where} field 'messages' is {type(value).__name__}, not a list of "
                               '{"role": ..., "content": ...} objects')
    out: Messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise CalibrationError(f"{where} message {i} is not an object with a text 'role' and 'content'; write "
                                   'messages as [{"role": "user", "content": "..."}, ...]')
        if m["role"] not in MESSAGE_ROLES:
            raise CalibrationError(f"{where} message {i} has role '{m['role']}';{suggest(m['role'], MESSAGE_ROLES)} "
                                   f"roles: {', '.join(MESSAGE_ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _file_documents(spec: CalibSpec) -> tuple[list[str], dict[str, Any], list[Messages] | None]:
    raw_path, *opts = spec.options
    path = Path(raw_path).expanduser()
    if not path.is_file():
        raise CalibrationError(f"calibration file '{raw_path}' does not exist; give an existing .txt or .jsonl "
                               f"path as file:PATH:NxL")
    suffix = path.suffix.lower()
    messages: list[Messages] | None = None
    if suffix in (".jsonl", ".ndjson"):
        field = opts[0] if opts else None
        docs: list[str] = []
        with open(path, encoding="utf-8", errors="strict") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise CalibrationError(f"calibration file '{raw_path}' line {lineno} is not JSON ({e}); "
                                           "give one JSON object per line") from e
                if field is None:  # the default: 'text', or a chat dataset's 'messages' when there is no 'text'
                    field = "messages" if isinstance(obj, dict) and "text" not in obj and "messages" in obj else "text"
                if not isinstance(obj, dict) or field not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else []
                    raise CalibrationError(
                        f"calibration file '{raw_path}' line {lineno} has no field '{field}'"
                        f"{suggest(field, keys)} (fields: {', '.join(keys) or 'none'}); "
                        f"name the text field as file:{raw_path}:FIELD:{spec.n}x{spec.seq_len}")
                value = obj[field]
                if field == "messages" or isinstance(value, list):
                    conv = _jsonl_messages(value, f"calibration file '{raw_path}' line {lineno}")
                    if conv:
                        messages = [] if messages is None else messages
                        messages.append(conv)
                        docs.append("\n".join(f"{m['role']}: {m['content']}" for m in conv))
                    continue
                if messages is not None:
                    raise CalibrationError(f"calibration file '{raw_path}' line {lineno} field '{field}' is text "
                                           "where earlier lines hold messages; keep one kind per file")
                if not isinstance(value, str):
                    raise CalibrationError(f"calibration file '{raw_path}' line {lineno} field '{field}' is "
                                           f"{type(value).__name__}, not text; name a text field")
                if value.strip():
                    docs.append(value)
        options: dict[str, Any] = {"field": field}
        if messages is not None:
            options["messages"] = True
    else:
        if len(opts) > 1 or (opts and opts[0] not in _TEXT_FILE_OPTIONS):
            raise CalibrationError(f"text file source takes at most the option 'paragraphs', got "
                                   f"{':'.join(opts)}; use file:PATH:NxL or file:PATH:paragraphs:NxL")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CalibrationError(f"calibration file '{raw_path}' is not UTF-8 text ({e.reason}); convert it to "
                                   "UTF-8 or use a .jsonl file") from e
        if opts:  # one document per blank-line separated paragraph
            docs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        else:  # the whole file is one document
            docs = [text] if text.strip() else []
        options = {"paragraphs": bool(opts)}
    if not docs:
        raise CalibrationError(f"calibration file '{raw_path}' contains no text; give a file with documents in it")
    info = {"source": "file", "path": str(raw_path), "file_sha256": sha256_file(path), **options}
    return docs, info, messages


def _hf_documents(spec: CalibSpec) -> tuple[list[str], dict[str, Any]]:
    if not 1 <= len(spec.options) <= 4:
        raise CalibrationError(f"hf source takes DATASET[:CONFIG[:SPLIT[:COLUMN]]], got "
                               f"'{':'.join(spec.options) or 'nothing'}'; e.g. hf:allenai/c4:en:train:text:"
                               f"{spec.n}x{spec.seq_len} ('-' for no config)")
    dataset, config, split, column = [*spec.options, *[None, None, "train", "text"][len(spec.options):]]
    config = None if config in (None, "-") else config
    corpus = get_hf_corpus(str(dataset), config, str(split), str(column))
    info = {"source": "hf", "dataset": dataset, "config": config, "split": split, "column": column,
            "corpus_checksum": corpus.checksum}
    return list(corpus.documents), info


def _source_documents(spec: CalibSpec) -> tuple[list[str], dict[str, Any], list[Messages] | None]:
    """Documents to calibrate on, what identifies them (for provenance and the token cache key) and, for a
    JSONL file of ``messages``, each document's messages (the documents are then their ``role: text`` lines)."""
    if spec.source == "file":
        return _file_documents(spec)
    if spec.source == "hf":
        return (*_hf_documents(spec), None)
    if spec.source in OFFLINE_CORPORA or spec.source in HUB_CORPORA:
        if spec.options:
            raise CalibrationError(f"corpus '{spec.source}' takes no options, got ':{':'.join(spec.options)}'; "
                                   f"write {spec.source}:{spec.n}x{spec.seq_len} or {spec.source}:SAMPLING:"
                                   f"{spec.n}x{spec.seq_len} with SAMPLING one of {', '.join(SAMPLING_MODES)}")
        corpus = get_corpus(spec.source)
        return (corpus.split("calib"), {"source": corpus.name, "split": "calib", "corpus_checksum": corpus.checksum},
                None)
    raise CalibrationError(
        f"unknown calibration source '{spec.source}';{suggest(spec.source, SOURCES)} use one of: "
        f"{', '.join(OFFLINE_CORPORA)}, file:PATH, random-vocab, self, mix(SOURCE=WEIGHT,...) (offline) or "
        f"{', '.join(HUB_CORPORA)}, "
        f"hf:DATASET (hub, online), as {SPEC_FORM}"
    )


def _model_identity(model: Any) -> tuple[torch.nn.Module, str, str]:
    """(module, content hash, name) of a LoadedModel or a bare transformers model."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", model)  # LoadedModel.model
    if not isinstance(module, torch.nn.Module):
        raise CalibrationError(f"model of type {type(model).__name__} is not a torch model; pass a LoadedModel "
                               "(calibrant.models.load_model) or a transformers model")
    digest = getattr(model, "model_hash", None)
    if not isinstance(digest, str):
        from calibrant.models.loader import state_dict_hash

        digest = state_dict_hash(module)
    name = str(getattr(model, "spec", None) or getattr(module, "name_or_path", "") or type(module).__name__)
    return module, digest, name


def _self_calibration(cs: CalibSpec, tokenizer: Any, seed: int, model: Any, common: dict[str, Any],
                      progress: bool | None) -> CalibrationSet:
    if model is None:
        raise CalibrationError(f"self-calibration ('{cs}') generates text with the model itself, but no model was "
                               "given; pass model=... to make_calibration (CLI: --model M), or use a text source")
    chat, assistant_only = CHAT_OPTION in cs.options, ASSISTANT_ONLY in cs.options
    if assistant_only and not chat:
        raise CalibrationError(f"assistant-only counts the model's answers of self:chat; write "
                               f"self:chat:assistant-only:{cs.n}x{cs.seq_len}")
    config = parse_self_options([o for o in cs.options if o not in (CHAT_OPTION, ASSISTANT_ONLY)])
    module, model_hash, model_name = _model_identity(model)
    context = getattr(getattr(module, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and cs.seq_len > context:
        raise CalibrationError(f"self-calibration length L={cs.seq_len} exceeds the model's context length "
                               f"{context}; use L <= {context}")
    content = {"format": SELF_CACHE_FORMAT, "model": model_hash, "tokenizer": common["tokenizer_hash"],
               "n": cs.n, "seq_len": cs.seq_len, "seed": seed, "generation": config.to_dict()}
    if chat:  # the rows start with templated prompts: the template and the prompts' corpus are content too
        content["chat"] = {"template": template_hash(tokenizer), "prompts": get_corpus(PROMPT_CORPUS).checksum}
    path = cache_dir("selfcal") / f"{stable_hash(content, length=24)}.safetensors"
    result = None
    if path.is_file():
        try:
            cached = CalibrationSet.load(path)
            if cached.input_ids.shape == (cs.n, cs.seq_len) and (cached.token_mask is not None) == chat:
                cached.provenance.update({k: common[k] for k in COSMETIC_KEYS & common.keys()})
                cached.provenance["model_name"] = model_name
                result = cached
        except CalibrationError:
            pass  # corrupt cache entry: generate again and overwrite it
    if result is None:
        result = _generate_self(cs, tokenizer, seed, module, config, chat, progress,
                                {**common, "model_hash": model_hash, "model_name": model_name})
        result.save(path)  # a chat set is cached with its mask of sampled tokens; see below
    if chat and not assistant_only:  # the same ids, every token counted
        prov = {k: v for k, v in result.provenance.items() if k != "token_mask"}
        return CalibrationSet(result.input_ids, prov)
    return result


def _generate_self(cs: CalibSpec, tokenizer: Any, seed: int, module: torch.nn.Module, config: Any, chat: bool,
                   progress: bool | None, common: dict[str, Any]) -> CalibrationSet:
    if not chat:
        ids, info = generate_self_calibration(module, tokenizer, cs.n, cs.seq_len, config, seed, progress=progress)
        prov = {"source": "self", "sampling": "self-generated", **common,
                "bos": info["generation"]["start_token"] == "bos", "generation": info["generation"],
                "generation_timing": info["timing"]}
        return CalibrationSet(ids, prov)
    prefixes, prompts = chat_prompts(tokenizer, cs.n, cs.seq_len, seed)
    ids, info = generate_after_prefixes(module, tokenizer, prefixes, cs.seq_len, config, seed, progress=progress)
    mask = generated_mask([len(p) for p in prefixes], cs.seq_len)
    prov = {"source": "self", "sampling": "self-generated", **common, "format": "chat",
            "chat_template_sha256": prompts["chat_template_sha256"], "prompts": prompts,
            "generation": info["generation"], "generation_timing": info["timing"],
            "token_mask": {"kind": "generated (assistant) tokens", "share": round(float(mask.float().mean()), 6)}}
    return CalibrationSet(ids, prov, mask)


def _assistant_flags(docs: list[str], conversations: list[Messages], tokenizer: Any, content_key: dict[str, Any],
                     lengths: np.ndarray, joiner_len: int, size: int) -> np.ndarray:
    """1 on every assistant token of the joined stream of rendered conversations (int64, ``size`` long); cached
    beside the token ids under the same content, as finding them re-tokenizes every document with offsets."""
    key = stable_hash({"content": content_key, "tokenizer": tokenizer_hash(tokenizer), "format": TOKEN_CACHE_FORMAT,
                       "mask": ASSISTANT_ONLY}, length=24)
    path = cache_dir("tokens") / f"{key}.assistant.npy"
    cached = _load_array(path)
    if cached is not None and cached.size == size and cached.dtype == np.uint8:
        return cached.astype(np.int64)
    flags = np.zeros(size, dtype=np.uint8)
    masks = assistant_token_masks(docs, conversations, tokenizer, lengths)
    for start, mask in zip(document_starts(lengths, joiner_len), masks, strict=True):
        flags[start:start + mask.size] = mask
    _save_array(path, flags)
    return flags.astype(np.int64)


def make_calibration(spec: str, tokenizer: Any, seed: int = 0, max_length: int | None = None,
                     progress: bool | None = None, model: Any = None) -> CalibrationSet:
    """Build the calibration set a spec string describes (``wiki:128x512``, ``wiki:docs:128x512``,
    ``file:a.txt:64x512``, ``self:128x512``, ...).

    ``max_length`` is the model's context length; a longer L is refused. ``progress`` shows a
    tokenization or generation bar (None: only on a terminal). ``model`` (a LoadedModel or a transformers
    model) is needed only by ``self`` (self-calibration), whose sets are cached under
    ``$CALIBRANT_CACHE/selfcal`` by (model hash, tokenizer, n, L, seed, generation parameters).
    """
    cs = parse_spec(spec)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CalibrationError(f"seed {seed!r} is not an integer; pass e.g. seed=0")
    if max_length is not None and cs.seq_len > max_length:
        raise CalibrationError(f"calibration sequence length L={cs.seq_len} (from '{spec}') exceeds the model's "
                               f"context length max_length={max_length}; use L <= {max_length}")
    common = {"spec": str(cs), "options": list(cs.options), "n": cs.n, "seq_len": cs.seq_len, "seed": seed,
              "tokenizer_hash": tokenizer_hash(tokenizer), "tokenizer_name": _tokenizer_name(tokenizer),
              "bos": False, "calibrant_version": calibrant_version()}
    if cs.source != "mix":
        from calibrant.calibration.selection import make_selected, split_selection

        plain, selection = split_selection(str(cs), cs.options)
        if selection is not None:
            return make_selected(dataclasses.replace(cs, options=plain), selection, tokenizer, seed, max_length,
                                 progress, model, common, make_calibration, COSMETIC_KEYS, _model_identity)
    if cs.source in ("random-vocab", "self") and cs.sampling != DEFAULT_SAMPLING:
        raise CalibrationError(f"sampling '{cs.sampling}' applies to text sources only; {cs.source} generates its "
                               f"own tokens: write {cs.source}:{cs.n}x{cs.seq_len}")

    if cs.source == "random-vocab":
        if cs.options:
            raise CalibrationError(f"random-vocab takes no options, got ':{':'.join(cs.options)}'; "
                                   f"write random-vocab:{cs.n}x{cs.seq_len}")
        vocab = _vocab_size(tokenizer)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (cs.n, cs.seq_len), generator=gen, dtype=torch.long)
        prov = {"source": "random-vocab", "sampling": "uniform-vocab", "vocab_size": vocab, **common}
        return CalibrationSet(ids, prov)
    if cs.source == "self":
        return _self_calibration(cs, tokenizer, seed, model, common, progress)
    if cs.source == "mix":
        from calibrant.calibration.mixture import make_mixture

        return make_mixture(cs, tokenizer, seed, max_length, progress, model, common, make_calibration, COSMETIC_KEYS)

    chat, assistant_only = CHAT_OPTION in cs.options, ASSISTANT_ONLY in cs.options
    if assistant_only and not chat:
        raise CalibrationError(f"assistant-only counts the assistant's turns of chat-formatted data; write "
                               f"{cs.source}:chat:assistant-only:{cs.n}x{cs.seq_len}")
    if chat:
        cs = dataclasses.replace(cs, options=tuple(o for o in cs.options if o not in (CHAT_OPTION, ASSISTANT_ONLY)))
    docs, info, messages = _source_documents(cs)
    conversations: list[Messages] = []
    if chat:
        docs, chat_info = render_chat(messages if messages is not None else docs, tokenizer, str(info["source"]),
                                      conversations)
        info = {**info, **chat_info}
    content_key = {k: v for k, v in info.items() if k not in COSMETIC_KEYS}
    need_lengths = cs.sampling != DEFAULT_SAMPLING or assistant_only
    flat, lengths, meta = document_token_ids(docs, tokenizer, content_key, label=str(info["source"]),
                                             progress=progress, need_lengths=need_lengths)
    joiner_ids = meta["joiner_ids"]
    if assistant_only:  # sample (id, flag) pairs packed as 2·id + flag, so the mask follows the ids exactly
        assert lengths is not None
        flags = _assistant_flags(docs, conversations, tokenizer, content_key, lengths, len(joiner_ids), flat.size)
        if not flags.any():
            raise CalibrationError(f"source '{info['source']}' has no assistant turns to count; drop "
                                   "':assistant-only' or use a conversational source")
        flat = flat.astype(np.int64) * 2 + flags
        joiner_ids = [2 * j for j in joiner_ids]
    total = int(flat.size)
    what = f"'{info['source']}'" + (" (calib split)" if info.get("split") == "calib" else "")
    if total < cs.seq_len and cs.sampling != "packed":
        raise CalibrationError(f"source {what} has only {total} tokens, fewer than one window of L={cs.seq_len}; "
                               "use a smaller L or a bigger source")
    if cs.n * cs.seq_len > total and cs.sampling == DEFAULT_SAMPLING:
        raise CalibrationError(f"source {what} has {total} tokens, fewer than the n×L = {cs.n}×{cs.seq_len} = "
                               f"{cs.n * cs.seq_len} requested; use a smaller n or L, or a bigger source")
    gen = torch.Generator().manual_seed(seed)
    extra: dict[str, Any] = {}
    if cs.sampling == DEFAULT_SAMPLING:
        ids = random_windows(flat, cs.n, cs.seq_len, gen)
    else:
        assert lengths is not None
        starts = document_starts(lengths, len(meta["joiner_ids"]))
        if cs.sampling == "docs":
            ids, extra = document_windows(flat, starts, lengths, cs.n, cs.seq_len, gen, f"source {what}")
        else:
            ids, extra = packed_documents(flat, starts, lengths, joiner_ids, cs.n, cs.seq_len, gen,
                                          f"source {what}")
    prov = {**info, "sampling": cs.sampling_name, **common, "documents": meta["documents"], "source_tokens": total,
            "joiner": meta["joiner"], "joiner_ids": meta["joiner_ids"], **extra}
    token_mask = None
    if assistant_only:
        token_mask, ids = (ids % 2).bool(), ids // 2
        if not bool(token_mask.any()):
            raise CalibrationError(f"no window of '{cs}' holds an assistant token; draw more or longer windows")
        prov["token_mask"] = {"kind": ASSISTANT_ONLY, "share": round(float(token_mask.float().mean()), 6)}
    return CalibrationSet(ids, prov, token_mask)


def check_heldout_name(name: str) -> tuple[str, str]:
    """Refuse a held-out text name that cannot be right — an unknown corpus or option — before anything is
    loaded (cheap: nothing is acquired). Returns the corpus key and the option ('' or 'chat')."""
    corpus_name, _, option = str(name).partition(":")
    if option and option.strip().lower() != CHAT_OPTION:
        raise CalibrationError(f"held-out text '{name}' has option '{option}'; write CORPUS or CORPUS:chat "
                               "(conversations rendered through the chat template), e.g. wiki or dialogue:chat")
    return check_corpus_name(corpus_name), option.strip().lower()


def heldout_token_ids(name: str, tokenizer: Any, progress: bool | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """1-D LongTensor of the corpus's held-out documents joined like calibration (joiner between documents),
    and a description of it for the perplexity protocol. ``CORPUS:chat`` (e.g. ``dialogue:chat``) renders each
    held-out conversation through the tokenizer's chat template first, as the model sees it when served."""
    corpus_name, option = check_heldout_name(name)
    corpus = get_corpus(corpus_name)
    docs = corpus.split("heldout")
    if not docs:
        raise CalibrationError(f"corpus '{corpus.name}' has no held-out documents (it has {len(corpus.documents)}); "
                               "evaluate on a corpus with at least two documents")
    key: dict[str, Any] = {"source": corpus.name, "split": "heldout", "corpus_checksum": corpus.checksum}
    chat_info: dict[str, Any] = {}
    if option:
        docs, chat_info = render_chat(docs, tokenizer, corpus.name)
        key.update(format="chat", chat_template_sha256=chat_info["chat_template_sha256"])
    label = f"{corpus.name}{':chat' if option else ''} heldout"
    flat, meta = joined_token_ids(docs, tokenizer, key, label=label, progress=progress)
    info = {"corpus": corpus.name, "split": "heldout", "checksum": corpus.checksum, "documents": meta["documents"],
            "tokens": meta["tokens"], "joiner": meta["joiner"], "joiner_ids": meta["joiner_ids"],
            "tokenizer_hash": meta["tokenizer_hash"], "bos": False, **chat_info}
    return torch.from_numpy(flat.astype(np.int64)), info
