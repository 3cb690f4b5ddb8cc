"""Fetch a pinned Debian package with ``apt-get download`` and read files out of it without installing it.

A ``.deb`` is an ``ar`` archive whose ``data.tar.{xz,gz,bz2,zst}`` member holds the files; we stream that
member with :mod:`tarfile` (``.zst`` goes through ``dpkg-deb --fsys-tarfile``) and keep only the wanted
paths in memory. Nothing is installed and nothing needs root, except that ``apt-get download`` needs the
package lists (``apt-get update``) once: as root we run it ourselves when the package is not found;
otherwise the error says to run it.

A package whose exact pinned version the mirror no longer carries (Debian replaces superseded point
releases) is downloaded at the mirror's version instead; apt checks it against the signed archive index,
and the corpus records ``pinned: false`` with the actual sha256, so provenance stays exact.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from calibrant.cache import cache_dir, sha256_file
from calibrant.errors import CalibrationError

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
        raise CalibrationError(f"could not run {' '.join(cmd[:2])} ({type(e).__name__}: {e})") from e


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
    digest = sha256_file(path)
    version = _version_of(path, pkg)
    if version == pkg.version and digest != pkg.sha256:
        raise CalibrationError(f"{path.name} has sha256 {digest[:16]}…, expected {pkg.sha256[:16]}…; the download "
                               "is corrupt or tampered with: retry the acquisition")
    return FetchedDeb(path, version, digest, version == pkg.version and digest == pkg.sha256)


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
    out: dict[str, bytes] = {}

    def collect(tf: tarfile.TarFile) -> None:
        for m in tf:
            name = m.name[2:] if m.name.startswith("./") else m.name.lstrip("/")
            if m.isfile() and wanted(name):
                fh = tf.extractfile(m)
                if fh is not None:
                    out[name] = fh.read()

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
                    collect(tf)
            else:
                stream = io.BufferedReader(_Slice(f, *members[data]), buffer_size=1 << 20)
                with tarfile.open(fileobj=stream, mode="r|*") as tf:
                    collect(tf)
    except (OSError, ValueError, tarfile.TarError, EOFError, subprocess.CalledProcessError) as e:
        raise CalibrationError(f"could not read the Debian package {deb.name} ({e}); delete it and retry") from e
    return out
