"""The Debian corpora (``austen``, ``pydocs``): their pinned packages, how to fetch a package with
``apt-get download`` and read files out of it without installing it, and how the files become documents.

A ``.deb`` is an ``ar`` archive whose ``data.tar.{xz,gz,bz2,zst}`` member holds the files; we stream that
member through :func:`calibrant.acquire.tar_members` (``.zst`` goes through ``dpkg-deb --fsys-tarfile``)
and keep only the wanted paths in memory. Nothing is installed and nothing needs root, except that
``apt-get download`` needs the package lists (``apt-get update``) once: as root we run it ourselves when
the package is not found; otherwise the error says to run it.

A package whose exact pinned version the mirror no longer carries (Debian replaces superseded point
releases) is downloaded at the mirror's version instead; apt checks it against the signed archive index,
and the corpus records ``pinned: false`` with the actual sha256, so provenance stays exact. The pinned
version itself must match its sha256 (:func:`calibrant.acquire.verify_sha256`).

``austen`` is ``r-cran-janeaustenr``: six Jane Austen novels from the package's R lazy-load database, one
document per chapter; ``pydocs`` is ``python3.11-doc``: the reST sources of the Python 3.11
documentation, one document per file. :mod:`calibrant.calibration.corpora` caches them.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from calibrant.acquire import tar_members, verify_sha256
from calibrant.cache import cache_dir, sha256_file
from calibrant.calibration.rdata import read_rdb_objects
from calibrant.errors import CalibrationError, one_line

_AR_MAGIC = b"!<arch>\n"


@dataclass(frozen=True)
class DebPackage:
    """A Debian binary package pinned by version and the sha256 of its ``.deb``."""

    package: str
    version: str
    sha256: str
    pool_url: str  # where to fetch it by hand when apt-get is unavailable

    @property
    def filename(self) -> str:
        return f"{self.package}_{self.version.replace(':', '%3a')}_all.deb"


@dataclass(frozen=True)
class FetchedDeb:
    path: Path
    version: str
    sha256: str
    pinned: bool  # True when the file is the exact pinned one


def _manual_hint(pkg: DebPackage) -> str:
    return (f"or download {pkg.filename} by hand ({pkg.pool_url}) into {cache_dir('downloads')} and retry; "
            "calibrant checks its sha256")


def _run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CalibrationError(f"could not run {' '.join(cmd[:2])} ({type(e).__name__}: {one_line(e)})") from e


def _can_update() -> bool:
    """Whether we may run ``apt-get update`` ourselves (only as root: it writes the system's package lists)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _not_found(output: str) -> bool:
    return "Unable to locate package" in output or "has no installation candidate" in output or (
        "Version '" in output and "was not found" in output)


def _apt_download(pkg: DebPackage, dest: Path, why: str) -> Path:
    """``apt-get download`` the pinned version (else the mirror's current one) into ``dest``."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise CalibrationError(f"{why} comes from the Debian package {pkg.package} {pkg.version}, fetched with "
                               f"apt-get, which is not on this machine: run on Debian/Ubuntu (apt-get install apt), "
                               f"{_manual_hint(pkg)}")
    print(f"calibrant: fetching the Debian package {pkg.package} {pkg.version} with apt-get download "
          f"(once, for {why})", file=sys.stderr)
    updated = False
    for spec in (f"{pkg.package}={pkg.version}", pkg.package):
        while True:
            proc = _run([apt, "download", spec], dest)
            output = (proc.stdout or "") + (proc.stderr or "")
            if proc.returncode == 0:
                found = sorted(dest.glob(f"{pkg.package}_*.deb"))
                if not found:
                    raise CalibrationError(f"apt-get download {spec} produced no .deb in {dest}; {_manual_hint(pkg)}")
                if spec == pkg.package:
                    print(f"calibrant: the mirror no longer has {pkg.package} {pkg.version}; using its current "
                          f"version {found[0].name} (recorded in the corpus provenance)", file=sys.stderr)
                return found[0]
            if not _not_found(output):
                last = output.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                raise CalibrationError(f"apt-get download {spec} failed ({last[0][:200]}); check access to the "
                                       f"Debian mirror, {_manual_hint(pkg)}")
            if updated:
                break  # this spec is not available even with fresh package lists: try the next one
            if not _can_update():
                raise CalibrationError(f"apt-get cannot find {pkg.package}: its package lists are missing or stale; "
                                       f"run `sudo apt-get update` once and retry, {_manual_hint(pkg)}")
            print("calibrant: running apt-get update once (package lists are missing or stale)", file=sys.stderr)
            up = _run([apt, "update"], dest)
            if up.returncode != 0:
                last = ((up.stdout or "") + (up.stderr or "")).strip().splitlines()[-1:] or [f"exit {up.returncode}"]
                raise CalibrationError(f"apt-get update failed ({last[0][:200]}); fix the machine's apt sources, "
                                       f"{_manual_hint(pkg)}")
            updated = True
    raise CalibrationError(f"no Debian mirror known to apt here carries {pkg.package} (this machine's release may "
                           f"not have it), {_manual_hint(pkg)}")


def _version_of(path: Path, pkg: DebPackage) -> str:
    stem = path.name[len(pkg.package) + 1:]
    return stem.rsplit("_", 1)[0].replace("%3a", ":")


def fetch_deb(pkg: DebPackage, dest: Path, why: str) -> FetchedDeb:
    """The package's ``.deb``: a hand-placed copy in the downloads cache if its sha256 is the pinned one,
    else ``apt-get download`` into ``dest``. A pinned version whose sha256 differs is refused."""
    manual = cache_dir("downloads") / pkg.filename
    if manual.is_file() and sha256_file(manual) == pkg.sha256:
        return FetchedDeb(manual, pkg.version, pkg.sha256, True)
    path = _apt_download(pkg, dest, why)
    version = _version_of(path, pkg)
    if version == pkg.version:
        return FetchedDeb(path, version, verify_sha256(path, pkg.sha256, error=CalibrationError), True)
    return FetchedDeb(path, version, sha256_file(path), False)


# --------------------------------------------------------------------------------------------------
# Reading a .deb


def _ar_members(f: IO[bytes]) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of the members of an ``ar`` archive."""
    if f.read(8) != _AR_MAGIC:
        raise ValueError("not an ar archive (a .deb starts with '!<arch>')")
    members = {}
    while True:
        header = f.read(60)
        if not header:
            return members
        if len(header) < 60 or header[58:60] != b"`\n":
            raise ValueError("corrupt ar member header")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = (f.tell(), size)
        f.seek(size + (size & 1), io.SEEK_CUR)


class _Slice(io.RawIOBase):
    """A read-only window ``[offset, offset + size)`` of a file."""

    def __init__(self, f: IO[bytes], offset: int, size: int):
        self.f, self.left = f, size
        f.seek(offset)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        if n <= 0:
            return 0
        data = self.f.read(n)
        b[:len(data)] = data
        self.left -= len(data)
        return len(data)


def read_deb_files(deb: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The regular files of the package whose path (without a leading ``./``) ``wanted`` accepts."""
    try:
        with open(deb, "rb") as f:
            members = _ar_members(f)
            data = next((n for n in members if n.startswith("data.tar")), None)
            if data is None:
                raise ValueError("no data.tar member")
            if data.endswith(".zst"):
                dpkg = shutil.which("dpkg-deb")
                if dpkg is None:
                    raise ValueError("data.tar.zst needs dpkg-deb to unpack")
                proc = subprocess.run([dpkg, "--fsys-tarfile", str(deb)], capture_output=True, check=True)
                with tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r|") as tf:
                    return tar_members(tf, wanted)
            else:
                stream = io.BufferedReader(_Slice(f, *members[data]), buffer_size=1 << 20)
                with tarfile.open(fileobj=stream, mode="r|*") as tf:
                    return tar_members(tf, wanted)
    except (OSError, ValueError, tarfile.TarError, EOFError, subprocess.CalledProcessError) as e:
        raise CalibrationError(f"could not read the Debian package {deb.name} ({one_line(e)}); delete it and retry") from e


# --------------------------------------------------------------------------------------------------
# The Debian corpora: austen (r-cran-janeaustenr), pydocs (python3.11-doc)

AUSTEN_DEB = DebPackage(
    "r-cran-janeaustenr", "1.0.0-1", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    "https://deb.debian.org/debian/pool/main/r/r-cran-janeaustenr/r-cran-janeaustenr_1.0.0-1_all.deb")
PYDOCS_DEB = DebPackage(
    "python3.11-doc", "3.11.2-6+deb12u8", "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
    "https://deb.debian.org/debian/pool/main/p/python3.11/python3.11-doc_3.11.2-6+deb12u8_all.deb")
AUSTEN_MEMBER = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
PYDOCS_PREFIX = "usr/share/doc/python3.11/html/_sources/"

_CHAPTER = re.compile(r"^\s*chapter\s+(?:\d+|[ivxlc]+)\b\.?", re.IGNORECASE)
_VOLUME = re.compile(r"^\s*volume\s+(?:\d+|[ivxlc]+)\s*$", re.IGNORECASE)


def _unwrap(lines: list[str]) -> str:
    """Hard-wrapped lines -> paragraphs (blank-line separated in the source) joined by a blank line."""
    paras: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            paras[-1].append(line.strip())
        elif paras[-1]:
            paras.append([])
    return "\n\n".join(" ".join(p) for p in paras if p)


def split_chapters(lines: list[str | None]) -> list[str]:
    """One novel (its lines, as janeaustenr stores them) -> one document per chapter.

    The title page and anything before the first ``CHAPTER`` heading are dropped, as are ``VOLUME``
    headings; each chapter keeps its heading as its first paragraph.
    """
    chapters: list[list[str]] = []
    for line in lines:
        text = line or ""
        if _CHAPTER.match(text):
            chapters.append([text.strip(), ""])
        elif chapters and not _VOLUME.match(text):
            chapters[-1].append(text)
    return [doc for doc in (_unwrap(c) for c in chapters) if doc]


def parse_austen(rdb: bytes) -> list[str]:
    """janeaustenr's ``Rdata.rdb`` -> chapters of all its novels (character vectors), in file order."""
    try:
        objects = read_rdb_objects(rdb)
    except (ValueError, zlib.error, OSError, EOFError) as e:
        raise CalibrationError(f"could not read {AUSTEN_MEMBER} ({e}); the package is not the expected "
                               f"{AUSTEN_DEB.package} {AUSTEN_DEB.version}: clear $CALIBRANT_CACHE/corpora and retry") from e
    docs: list[str] = []
    for obj in objects:
        if isinstance(obj, list) and obj and all(isinstance(x, str) or x is None for x in obj):
            docs.extend(split_chapters(obj))
    return docs


def parse_pydocs(files: dict[str, bytes]) -> list[str]:
    """reST sources -> one document per file (sorted by path), UTF-8 text as written."""
    return [t for t in (files[k].decode("utf-8", errors="replace").strip() for k in sorted(files)) if t]


@dataclass(frozen=True)
class DebCorpus:
    """A corpus read out of a Debian package: which files, and how they become documents."""

    deb: DebPackage
    wanted: Callable[[str], bool]
    parse: Callable[[dict[str, bytes]], list[str]]
    what: str


DEBIAN_SOURCES: dict[str, DebCorpus] = {
    "austen": DebCorpus(AUSTEN_DEB, lambda p: p == AUSTEN_MEMBER,
                        lambda files: parse_austen(files[AUSTEN_MEMBER]), AUSTEN_MEMBER),
    "pydocs": DebCorpus(PYDOCS_DEB, lambda p: p.startswith(PYDOCS_PREFIX) and p.endswith(".rst.txt"),
                        parse_pydocs, PYDOCS_PREFIX + "**.rst.txt"),
}
