"""Real text corpora that work offline, acquired once from PyPI or Debian and cached with checksums.

Four English corpora come out of one source distribution, ``bigbench==1.0.0`` (358 MB on PyPI):
it is downloaded with ``pip download`` (never installed), its sha256 is verified, only four
``task.json`` members are streamed out of the tarball (all through :mod:`calibrant.acquire`), each is
parsed into documents, and each corpus is stored under ``$CALIBRANT_CACHE/corpora`` as ``NAME.json``
with a sidecar ``NAME.json.sha256``.
The tarball is deleted afterwards. Every later use re-checks the file against its sidecar and
re-acquires on mismatch.

Two more come from Debian packages, fetched with ``apt-get download`` (pinned version and sha256),
read without installing, and cached the same way: ``austen`` (six Jane Austen novels, one document per
chapter) and ``pydocs`` (the Python 3.11 documentation, one document per file); their packages and
parsers are in :mod:`calibrant.calibration.debian`.

Hub corpora (``c4``, ``wikitext2``, ``ptb``, ``redpajama``, ``cosmopedia`` and any ``hf:`` dataset) are for
online users, loaded through ``datasets`` and cached like the others; offline they fail in one line
naming the offline sources.

Every corpus is split *by document* into ``calib`` (90 %) and ``heldout`` (10 %, at least one document)
with a content hash, so the split is identical on every machine; calibration draws only from
``calib``, evaluation only from ``heldout``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibrant.acquire import PyPIFile, acquire_once, pip_download, read_members, scratch_dir, verify_sha256
from calibrant.cache import atomic_path, cache_dir, sha256_file, stable_hash
from calibrant.calibration.debian import DEBIAN_SOURCES, fetch_deb, read_deb_files
from calibrant.errors import CalibrationError, one_line, suggest

BIGBENCH_CORPORA: tuple[str, ...] = ("wiki", "news", "wikihow", "dialogue")
DEBIAN_CORPORA: tuple[str, ...] = ("austen", "pydocs")
OFFLINE_CORPORA: tuple[str, ...] = (*BIGBENCH_CORPORA, *DEBIAN_CORPORA)
HUB_CORPORA: tuple[str, ...] = ("c4", "wikitext2", "ptb", "redpajama", "cosmopedia")
SPLITS: tuple[str, ...] = ("calib", "heldout", "all")
HELDOUT_FRACTION = 0.10
CORPUS_FORMAT = "calibrant.corpus/1"

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH = PyPIFile(BIGBENCH_REQUIREMENT, "bigbench-1.0.0.tar.gz", BIGBENCH_SHA256)
_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks"
BIGBENCH_MEMBERS: dict[str, str] = {
    "wiki": f"{_TASKS}/paragraph_segmentation/task.json",
    "news": f"{_TASKS}/gem/xsum/task.json",
    "wikihow": f"{_TASKS}/gem/wikilingua_en/task.json",
    "dialogue": f"{_TASKS}/topical_chat/task.json",
}
# Sanity ranges for the real sdist (document counts after parsing); a parse outside them means the
# parser no longer understands the data, which must fail loudly rather than cache a wrong corpus.
EXPECTED_DOCUMENTS: dict[str, tuple[int, int]] = {
    "wiki": (950, 1100),
    "news": (1001, 1001),
    "wikihow": (950, 1001),
    "dialogue": (1000, 1100),
    "austen": (269, 269),  # 55 + 48 + 31 + 24 + 61 + 50 chapters
    "pydocs": (497, 497),
}

OFFLINE_SOURCES: tuple[str, ...] = (*OFFLINE_CORPORA, "file:PATH", "random-vocab", "self")
_OFFLINE_HINT = "use an offline source: " + ", ".join(OFFLINE_SOURCES)


# --------------------------------------------------------------------------------------------------
# Corpus


def _doc_key(name: str, index: int, text: str) -> str:
    return hashlib.sha256(f"{name}\0{text}".encode()).hexdigest() + f"{index:09d}"


def heldout_indices(name: str, documents: tuple[str, ...] | list[str],
                    fraction: float = HELDOUT_FRACTION) -> frozenset[int]:
    """Indices of the held-out documents: the ``ceil(fraction * k)`` (at least 1, at most k-1 when
    k >= 2) documents whose sha256 of ``name + NUL + text`` is smallest. Identical on every machine."""
    k = len(documents)
    if k == 0:
        return frozenset()
    m = max(1, math.ceil(fraction * k))
    if k >= 2:
        m = min(m, k - 1)
    else:
        m = 0  # a one-document corpus is all calibration; there is nothing to hold out
    order = sorted(range(k), key=lambda i: _doc_key(name, i, documents[i]))
    return frozenset(order[:m])


@dataclass(frozen=True)
class Corpus:
    """Documents of one named corpus; ``checksum`` is the sha256 of its cached file."""

    name: str
    documents: tuple[str, ...]
    checksum: str
    heldout: frozenset[int] | None = field(default=None, repr=False, compare=False)
    """Explicit held-out indices (hub corpora with an official test split); else hash-chosen."""

    @functools.cached_property
    def _heldout(self) -> frozenset[int]:
        if self.heldout is not None:
            return self.heldout
        return heldout_indices(self.name, self.documents)

    def split(self, part: str) -> list[str]:
        """Documents of ``part``: ``"calib"`` (for calibration), ``"heldout"`` (for evaluation) or ``"all"``."""
        if part == "all":
            return list(self.documents)
        held = self._heldout
        if part == "heldout":
            return [d for i, d in enumerate(self.documents) if i in held]
        if part == "calib":
            return [d for i, d in enumerate(self.documents) if i not in held]
        raise CalibrationError(
            f"unknown corpus split '{part}';{suggest(part, SPLITS)} use one of: {', '.join(SPLITS)}"
        )


# --------------------------------------------------------------------------------------------------
# The cache: NAME.json + NAME.json.sha256


def corpus_path(name: str) -> Path:
    return cache_dir("corpora") / f"{name}.json"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _store_corpus(name: str, documents: list[str] | tuple[str, ...], source: dict[str, Any] | None = None,
                  heldout: frozenset[int] | None = None) -> Path:
    """Write one corpus into the cache (file first, then its sidecar; both atomically)."""
    path = corpus_path(name)
    payload: dict[str, Any] = {
        "format": CORPUS_FORMAT,
        "name": name,
        "source": source or {},
        "documents": list(documents),
    }
    if heldout is not None:
        payload["heldout"] = sorted(heldout)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    digest = sha256_file(path)
    with atomic_path(_sidecar(path)) as tmp:
        tmp.write_text(digest + "\n")
    return path


def _load_cached(name: str) -> Corpus | None:
    """The cached corpus if its file matches its sidecar checksum, else None."""
    path = corpus_path(name)
    side = _sidecar(path)
    if not path.is_file() or not side.is_file():
        return None
    expected = side.read_text().strip()
    digest = sha256_file(path)
    if digest != expected:
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        docs = tuple(payload["documents"])
    except (ValueError, KeyError, TypeError):
        return None
    if payload.get("format") != CORPUS_FORMAT or not all(isinstance(d, str) for d in docs):
        return None
    held = payload.get("heldout")
    return Corpus(name=name, documents=docs, checksum=digest,
                  heldout=frozenset(held) if held is not None else None)


# --------------------------------------------------------------------------------------------------
# Parsers of the four bigbench tasks

_WORDS = re.compile(r"[^\W\d_]+")
_EN_FUNCTION_WORDS = frozenset(
    "the of and is was which with from by that his it were has are he she for to an at on this be".split()
)


def english_score(text: str) -> float:
    """Fraction of the words that are common English function words (English prose: ~0.2-0.4;
    other European languages: < 0.1)."""
    words = _WORDS.findall(text.lower())
    if not words:
        return 0.0
    return sum(w in _EN_FUNCTION_WORDS for w in words) / len(words)


def _examples(task: dict[str, Any], member: str) -> list[dict[str, Any]]:
    ex = task.get("examples")
    if not isinstance(ex, list) or not ex:
        raise CalibrationError(f"bigbench member {member} has no 'examples' list; the sdist is not the "
                               f"expected {BIGBENCH_REQUIREMENT}: clear $CALIBRANT_CACHE/corpora and retry")
    return ex


def _parse_wiki(task: dict[str, Any]) -> list[str]:
    # 9 languages in blocks of 1000 articles; keep the English ones, one sentence per line.
    ex = _examples(task, BIGBENCH_MEMBERS["wiki"])
    return [e["input"] for e in ex if english_score(e["input"]) > 0.15]


def _parse_inputs(task: dict[str, Any], name: str) -> list[str]:
    return [e["input"].strip() for e in _examples(task, BIGBENCH_MEMBERS[name]) if e["input"].strip()]


_TURN = re.compile(r"(?:^|\s)agent_[AB]: ")


def _turns(text: str) -> list[str]:
    parts = [p.strip() for p in _TURN.split(text)]
    turns = []
    for p in parts:
        if not p:
            continue
        if len(p) >= 2 and p[0] == '"' and p[-1] == '"':
            p = p[1:-1].strip()
        turns.append(p)
    return turns


def _parse_dialogue(task: dict[str, Any]) -> list[str]:
    # Each example is a conversation prefix plus the next turn; the examples of one conversation share
    # its id in "comment". The longest prefix plus its target is the whole conversation.
    longest: dict[str, dict[str, Any]] = {}
    for e in _examples(task, BIGBENCH_MEMBERS["dialogue"]):
        cid = e.get("comment") or e["input"][:200]
        if cid not in longest or len(e["input"]) > len(longest[cid]["input"]):
            longest[cid] = e
    docs = []
    for e in longest.values():
        turns = _turns(e["input"]) + _turns(str(e.get("target", "")))
        if turns:
            docs.append("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns)))
    return docs


PARSERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "wiki": _parse_wiki,
    "news": lambda task: _parse_inputs(task, "news"),
    "wikihow": lambda task: _parse_inputs(task, "wikihow"),
    "dialogue": _parse_dialogue,
}


def _dedupe(docs: list[str]) -> list[str]:
    """Drop exact duplicates (keeping the first) so a text can never sit on both sides of the split."""
    seen: set[str] = set()
    out = []
    for d in docs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


# --------------------------------------------------------------------------------------------------
# Acquisition


def _download_sdist(dest: Path) -> Path:
    """``pip download`` the bigbench sdist into ``dest``; returns the tarball's path (not yet verified)."""
    print(f"calibrant: downloading {BIGBENCH_REQUIREMENT} (358 MB sdist) from PyPI once, to build the "
          f"offline corpora {', '.join(BIGBENCH_CORPORA)}", file=sys.stderr)
    hint = "check that pip works and PyPI is reachable, then retry, or calibrate from a local file with file:PATH:NxL"
    return pip_download([BIGBENCH], dest, error=CalibrationError, hint=hint, sdist=True, show_progress=True)[0]


def _extract_members(tarball: Path, members: dict[str, str]) -> dict[str, bytes]:
    """Stream the tarball once and return the bytes of the wanted members (by corpus name)."""
    found = read_members(tarball, set(members.values()), error=CalibrationError)
    missing = sorted(name for name, path in members.items() if path not in found)
    if missing:
        raise CalibrationError(f"{tarball.name} lacks the task files of {', '.join(missing)}; it is not the "
                               f"expected {BIGBENCH_REQUIREMENT}: retry, or use a file:PATH source")
    return {name: found[path] for name, path in members.items()}


def acquire_bigbench_corpora() -> dict[str, Path]:
    """Download the sdist once, verify it, extract and cache all four offline corpora, delete it."""
    with scratch_dir("calibrant-bigbench-") as tmp:
        tarball = _download_sdist(tmp)
        verify_sha256(tarball, BIGBENCH_SHA256, error=CalibrationError)
        raw = _extract_members(tarball, BIGBENCH_MEMBERS)
        tarball.unlink()
        paths = {}
        for name, blob in raw.items():
            try:
                task = json.loads(blob.decode("utf-8"))
            except ValueError as e:
                raise CalibrationError(f"{BIGBENCH_MEMBERS[name]} is not valid JSON ({e}); retry the "
                                       "acquisition or use a file:PATH source") from e
            docs = _dedupe(PARSERS[name](task))
            lo, hi = EXPECTED_DOCUMENTS.get(name, (1, sys.maxsize))
            if not lo <= len(docs) <= hi:
                raise CalibrationError(f"parsed {len(docs)} documents for corpus '{name}', expected {lo}–{hi}; "
                                       "the parser does not match the data: report this as a calibrant bug")
            source = {"pypi": BIGBENCH_REQUIREMENT, "sha256": BIGBENCH_SHA256, "member": BIGBENCH_MEMBERS[name]}
            paths[name] = _store_corpus(name, docs, source)
        return paths


# --------------------------------------------------------------------------------------------------
# Debian corpora: austen, pydocs (packages and parsers in calibrant.calibration.debian)

def acquire_debian_corpus(name: str) -> Path:
    """Fetch the corpus's pinned .deb, verify it, parse the needed files into the cache, delete the .deb."""
    spec = DEBIAN_SOURCES[name]
    with scratch_dir(f"calibrant-{name}-") as tmp:
        fetched = fetch_deb(spec.deb, tmp, f"corpus '{name}'")
        files = read_deb_files(fetched.path, spec.wanted)
        if not files:
            raise CalibrationError(f"{fetched.path.name} holds no {spec.what}; it is not the expected package: "
                                   f"report this as a calibrant bug")
        docs = _dedupe(spec.parse(files))
        lo, hi = EXPECTED_DOCUMENTS.get(name, (1, sys.maxsize))
        if not fetched.pinned:
            lo, hi = max(1, lo // 2), hi * 2  # another version of the package: allow some drift
        if not lo <= len(docs) <= hi:
            raise CalibrationError(f"parsed {len(docs)} documents for corpus '{name}', expected {lo}–{hi}; "
                                   "the parser does not match the data: report this as a calibrant bug")
        source = {"debian": spec.deb.package, "version": fetched.version, "sha256": fetched.sha256,
                  "pinned": fetched.pinned, "member": spec.what}
        return _store_corpus(name, docs, source)


# --------------------------------------------------------------------------------------------------
# Hub corpora (online users only)

# name -> (dataset path, config, calibration split, evaluation split or None, text field). Without an
# evaluation split the documents are split by hash like the offline corpora.
_HUB: dict[str, tuple[str, str | None, str, str | None, str]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "test", "sentence"),
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
    # the 1B-token sample, read from the hub's parquet export (its loading script no longer runs)
    "redpajama": ("togethercomputer/RedPajama-Data-1T-Sample", None, "train", None, "text"),
    "cosmopedia": ("HuggingFaceTB/cosmopedia-100k", None, "train", None, "text"),
}
_HUB_REVISION = {"redpajama": "refs/convert/parquet"}
_C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
_C4_DOCS = {"train": 20000, "validation": 2000}
HUB_MAX_DOCUMENTS = 20000  # streamed corpora keep their first this many documents


def _group_rows(rows: list[str], name: str) -> list[str]:
    """Hub rows -> documents: wikitext articles by their top-level heading; ptb in blocks of 100 sentences."""
    if name == "wikitext2":
        docs: list[list[str]] = []
        for r in rows:
            if re.match(r"^ = [^=].* = \n?$", r) or not docs:
                docs.append([])
            docs[-1].append(r)
        return [d for d in ("".join(x).strip() for x in docs) if d]
    if name == "ptb":
        return ["\n".join(s.strip() for s in rows[i:i + 100]) for i in range(0, len(rows), 100)]
    return [r for r in rows if r.strip()]


def _load_dataset_fn(what: str) -> Callable[..., Any]:
    try:
        from datasets import load_dataset  # optional dependency, imported lazily
    except ImportError as e:
        raise CalibrationError(f"{what} is on the Hugging Face hub and needs the 'datasets' package: "
                               f"pip install datasets (and be online), or {_OFFLINE_HINT}") from e
    return load_dataset


def _hub_failure(what: str, e: Exception) -> CalibrationError:
    detail = one_line(e, 160)
    return CalibrationError(f"{what} is on the Hugging Face hub, which is unreachable or refused it "
                            f"({type(e).__name__}{': ' + detail if detail else ''}); {_OFFLINE_HINT}")


def _stream_column(ds: Any, column: str, limit: int, what: str) -> list[str]:
    """The first ``limit`` non-empty string values of ``column`` of a (possibly streaming) dataset."""
    out: list[str] = []
    for row in ds:
        if column not in row:
            keys = sorted(row)
            raise CalibrationError(f"{what} has no column '{column}';{suggest(column, keys)} columns: "
                                   f"{', '.join(keys)}; name the text column as hf:DATASET:CONFIG:SPLIT:COLUMN")
        value = row[column]
        if isinstance(value, str) and value.strip():
            out.append(value)
            if len(out) >= limit:
                break
    return out


def _load_hub_corpus(name: str) -> Corpus:
    what = f"corpus '{name}'"
    load_dataset = _load_dataset_fn(what)
    path, config, calib_split, eval_split, textf = _HUB[name]
    try:
        parts = {}
        for split in (calib_split, eval_split):
            if split is None:
                continue
            if name == "c4":
                ds = load_dataset(path, data_files={split: _C4_FILES[split]}, split=split)
                ds = ds.select(range(min(len(ds), _C4_DOCS[split])))
                parts[split] = _group_rows([str(r) for r in ds[textf]], name)
            elif eval_split is None:  # big corpora: stream the first documents
                kwargs: dict[str, Any] = {"split": split, "streaming": True}
                if name in _HUB_REVISION:
                    kwargs["revision"] = _HUB_REVISION[name]
                ds = load_dataset(path, config, **kwargs)
                parts[split] = _stream_column(ds, textf, HUB_MAX_DOCUMENTS, what)
            else:
                ds = load_dataset(path, config, split=split)
                parts[split] = _group_rows([str(r) for r in ds[textf]], name)
    except CalibrationError:
        raise
    except Exception as e:  # datasets raises many types when offline; all mean "unusable" here
        raise _hub_failure(what, e) from e
    docs = parts[calib_split] + (parts[eval_split] if eval_split else [])
    held = frozenset(range(len(parts[calib_split]), len(docs))) if eval_split else None
    source: dict[str, Any] = {"hub": path, "config": config, "calib_split": calib_split,
                              "heldout_split": eval_split or "hash-chosen 10 %"}
    if eval_split is None:
        source["max_documents"] = HUB_MAX_DOCUMENTS
    if name in _HUB_REVISION:
        source["revision"] = _HUB_REVISION[name]
    docs = _dedupe(docs) if eval_split is None else docs
    _store_corpus(name, docs, source, heldout=held)
    cached = _load_cached(name)
    if cached is None:  # pragma: no cover - only if the disk is failing
        raise CalibrationError(f"could not cache corpus '{name}' under {corpus_path(name).parent}; check the disk")
    return cached


def get_hf_corpus(dataset: str, config: str | None = None, split: str = "train", column: str = "text",
                  max_documents: int = HUB_MAX_DOCUMENTS) -> Corpus:
    """Any Hugging Face dataset as a corpus: the first ``max_documents`` non-empty values of ``column`` in
    ``split`` (streamed), cached under ``$CALIBRANT_CACHE/corpora`` like the named corpora."""
    key = {"dataset": dataset, "config": config, "split": split, "column": column, "max_documents": max_documents}
    name = "hf-" + stable_hash(key, length=16)
    cached = _load_cached(name)
    if cached is not None:
        return cached
    what = f"dataset '{dataset}'"
    load_dataset = _load_dataset_fn(what)
    try:
        ds = load_dataset(dataset, config, split=split, streaming=True)
        docs = _stream_column(ds, column, max_documents, what)
    except CalibrationError:
        raise
    except Exception as e:
        raise _hub_failure(what, e) from e
    if not docs:
        raise CalibrationError(f"{what} split '{split}' has no non-empty text in column '{column}'; name another "
                               "split or column as hf:DATASET:CONFIG:SPLIT:COLUMN:NxL")
    _store_corpus(name, _dedupe(docs), {"hub": dataset, **key})
    corpus = _load_cached(name)
    if corpus is None:  # pragma: no cover - only if the disk is failing
        raise CalibrationError(f"could not cache {what} under {corpus_path(name).parent}; check the disk")
    return corpus


# --------------------------------------------------------------------------------------------------
# Public entry point


def check_corpus_name(name: str) -> str:
    """The corpus key of ``name`` (trimmed, lower case); an unknown name is refused here, before anything is
    acquired or loaded."""
    key = str(name).strip().lower()
    if key not in OFFLINE_CORPORA and key not in HUB_CORPORA:
        known = OFFLINE_CORPORA + HUB_CORPORA
        raise CalibrationError(f"unknown corpus '{name}';{suggest(key, known)} known corpora: "
                               f"{', '.join(OFFLINE_CORPORA)} (offline), {', '.join(HUB_CORPORA)} (hub, online)")
    return key


def get_corpus(name: str) -> Corpus:
    """The named corpus, acquired and cached on first use, checksum-verified on every use."""
    key = check_corpus_name(name)
    if key in HUB_CORPORA:
        return _load_cached(key) or _load_hub_corpus(key)
    acquire = functools.partial(acquire_debian_corpus, key) if key in DEBIAN_SOURCES else acquire_bigbench_corpora
    corpus = acquire_once("corpora", lambda: _load_cached(key), acquire)
    if corpus is None:
        raise CalibrationError(f"corpus '{key}' failed its checksum right after acquisition; check the disk "
                               f"under {corpus_path(key).parent} and retry")
    return corpus
