"""Debian corpora (austen, pydocs): R serialization, .deb reading, apt-get acquisition, parsers."""

from __future__ import annotations

import dataclasses
import gzip
import io
import shutil
import struct
import tarfile
import zlib

import pytest

from calibrant.cache import sha256_file
from calibrant.calibration import OFFLINE_CORPORA, corpora, debian, get_corpus
from calibrant.calibration.rdata import read_rdb_objects, unserialize
from calibrant.errors import CalibrationError

# ---------------------------------------------------------------------------------------------- fakes


def _charsxp(s: str | None) -> bytes:
    if s is None:
        return struct.pack(">ii", 9, -1)
    b = s.encode()
    return struct.pack(">ii", 9 | (8 << 12), len(b)) + b  # CHARSXP, UTF-8 flag


def r_serialize(body: bytes, version: int = 3) -> bytes:
    head = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
    if version == 3:
        head += struct.pack(">i", 5) + b"UTF-8"
    return head + body


def r_strings(lines: list[str | None]) -> bytes:
    return struct.pack(">ii", 16, len(lines)) + b"".join(_charsxp(s) for s in lines)


def rdb(objects: list[bytes]) -> bytes:
    """A lazy-load database: per object a 4-byte big-endian length and a zlib stream."""
    return b"".join(struct.pack(">I", len(o)) + zlib.compress(o) for o in objects)


NOVEL_A = ["A TALE", "", "By Nobody", "", "VOLUME I", "", "CHAPTER I", "", "It was a dark and", "stormy night.",
           "", "Rain fell.", "", "", "CHAPTER II", "", "Morning came", "at last.", None, "VOLUME II", "",
           "CHAPTER I", "", "A new volume begins."]
NOVEL_B = ["Another", "", "Chapter 1", "", "Short first", "chapter.", "", "Chapter 2.", "", "The end.", ""]


def make_deb(path, files: dict[str, bytes], compression: str = "xz"):
    """A minimal .deb: ar archive with debian-binary, control.tar.gz and data.tar.<compression>."""

    def tar(members: dict[str, bytes], mode: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as tf:
            for name, data in members.items():
                info = tarfile.TarInfo("./" + name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", tar({"control": b"Package: x\n"}, "w:gz")),
               (f"data.tar.{compression}", tar(files, f"w:{compression}"))]
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}".encode() + b"`\n" + data
        if len(data) % 2:
            out += b"\n"
    path.write_bytes(out)
    return path


def austen_deb(tmp_path, name="r-cran-janeaustenr_1.0.0-1_all.deb"):
    blob = rdb([r_serialize(r_strings(NOVEL_A)), r_serialize(r_strings(NOVEL_B), version=2)])
    return make_deb(tmp_path / name, {debian.AUSTEN_MEMBER: blob, "usr/share/doc/x/README": b"readme"})


# ---------------------------------------------------------------------------------------------- parsers


def test_unserialize_vectors_lists_attributes_and_refs():
    names = struct.pack(">i", 0x402) + struct.pack(">i", 1) + _charsxp("names") + r_strings(["a", "b"])
    more = struct.pack(">i", 0x402) + struct.pack(">i", 0xFF | (1 << 8)) + r_strings(["c"]) + struct.pack(">i", 254)
    body = (struct.pack(">ii", 19 | (1 << 9), 2) + struct.pack(">ii", 13, 2) + struct.pack(">ii", 7, -(2**31))
            + struct.pack(">ii", 10, 1) + struct.pack(">i", 1) + names + more)
    assert unserialize(r_serialize(body)) == [[7, None], [True]]
    assert unserialize(r_serialize(r_strings(["x", None, "é"]), version=2)) == ["x", None, "é"]
    with pytest.raises(ValueError, match="not an R XDR"):
        unserialize(b"RDX2\n")
    with pytest.raises(ValueError, match="truncated"):
        unserialize(r_serialize(r_strings(["abc"]))[:-1])
    with pytest.raises(ValueError, match="SEXP type 3"):
        unserialize(r_serialize(struct.pack(">i", 3)))  # a closure


def test_read_rdb_blocks():
    objs = read_rdb_objects(rdb([r_serialize(r_strings(["one"])), r_serialize(r_strings(["two", "three"]))]))
    assert objs == [["one"], ["two", "three"]]
    bad = rdb([r_serialize(r_strings(["one"]))])
    with pytest.raises(ValueError):
        read_rdb_objects(bad[:4] + b"\x00" * 3 + bad[7:])


def test_austen_parser_one_document_per_chapter():
    blob = rdb([r_serialize(r_strings(NOVEL_A)), r_serialize(r_strings(NOVEL_B))])
    docs = debian.parse_austen(blob)
    assert docs == [
        "CHAPTER I\n\nIt was a dark and stormy night.\n\nRain fell.",
        "CHAPTER II\n\nMorning came at last.",  # VOLUME heading dropped
        "CHAPTER I\n\nA new volume begins.",
        "Chapter 1\n\nShort first chapter.",
        "Chapter 2.\n\nThe end.",
    ]
    with pytest.raises(CalibrationError, match="could not read"):
        debian.parse_austen(b"\x00\x00\x00\x05garbage")


def test_pydocs_parser_one_document_per_file():
    files = {f"{debian.PYDOCS_PREFIX}b.rst.txt": b"B doc\n", f"{debian.PYDOCS_PREFIX}a.rst.txt": b"A doc\n",
             f"{debian.PYDOCS_PREFIX}empty.rst.txt": b"  \n"}
    assert debian.parse_pydocs(files) == ["A doc", "B doc"]


@pytest.mark.parametrize("compression", ["xz", "gz", "bz2"])
def test_read_deb_files(tmp_path, compression):
    deb = make_deb(tmp_path / "p_1_all.deb", {"usr/a.txt": b"a", "usr/b.rst.txt": b"bb", "etc/c": b"c"}, compression)
    got = debian.read_deb_files(deb, lambda p: p.startswith("usr/"))
    assert got == {"usr/a.txt": b"a", "usr/b.rst.txt": b"bb"}
    (tmp_path / "bad.deb").write_bytes(b"not an archive")
    with pytest.raises(CalibrationError, match="could not read the Debian package bad.deb"):
        debian.read_deb_files(tmp_path / "bad.deb", lambda p: True)


# ---------------------------------------------------------------------------------------------- acquisition


FAKE_APT = """#!/bin/sh
# a stand-in for apt-get: 'download' fails until 'update' ran once (as on a fresh container)
echo "$@" >> "$FAKE_APT_STATE/calls"
if [ "$1" = update ]; then touch "$FAKE_APT_STATE/updated"; exit 0; fi
if [ "$1" = download ]; then
  if [ ! -f "$FAKE_APT_STATE/updated" ]; then echo "E: Unable to locate package ${2%%=*}" >&2; exit 100; fi
  case "$2" in *=*) if [ -n "$FAKE_APT_NO_PIN" ]; then echo "E: Version '${2#*=}' for '${2%%=*}' was not found" >&2; exit 100; fi;; esac
  cp "$FAKE_APT_DEB" . && exit 0
fi
exit 1
"""


@pytest.fixture
def fake_apt(tmp_path, cache, monkeypatch):
    """apt-get on PATH serving a fake janeaustenr .deb; the pinned sha256 is the fake's."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "apt-get").write_text(FAKE_APT)
    (bindir / "apt-get").chmod(0o755)
    state = tmp_path / "apt-state"
    state.mkdir()
    deb = austen_deb(tmp_path)
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE_APT_STATE", str(state))
    monkeypatch.setenv("FAKE_APT_DEB", str(deb))
    monkeypatch.setattr(debian, "_can_update", lambda: True)
    spec = debian.DEBIAN_SOURCES["austen"]
    monkeypatch.setitem(debian.DEBIAN_SOURCES, "austen",
                        dataclasses.replace(spec, deb=dataclasses.replace(spec.deb, sha256=sha256_file(deb))))
    monkeypatch.setitem(corpora.EXPECTED_DOCUMENTS, "austen", (5, 5))

    def calls() -> list[str]:
        f = state / "calls"
        return f.read_text().splitlines() if f.exists() else []

    return calls


def test_austen_acquired_with_apt_get_update_once(fake_apt, cache):
    c = get_corpus("austen")
    assert fake_apt() == ["download r-cran-janeaustenr=1.0.0-1", "update", "download r-cran-janeaustenr=1.0.0-1"]
    assert len(c.documents) == 5 and c.documents[0].startswith("CHAPTER I")
    assert c.checksum == sha256_file(cache / "corpora" / "austen.json")
    src = __import__("json").loads((cache / "corpora" / "austen.json").read_text())["source"]
    assert src["debian"] == "r-cran-janeaustenr" and src["version"] == "1.0.0-1" and src["pinned"] is True
    assert not list((cache / "downloads").glob("**/*.deb"))  # the package is deleted after extraction
    get_corpus("austen")
    assert len(fake_apt()) == 3  # served from the cache
    path = cache / "corpora" / "austen.json"
    path.write_text(path.read_text().replace("stormy", "sunny"))  # a corrupt cache is re-acquired
    assert get_corpus("austen").documents == c.documents
    assert fake_apt()[-1] == "download r-cran-janeaustenr=1.0.0-1"


def test_superseded_version_is_recorded_unpinned(fake_apt, cache, tmp_path, monkeypatch):
    newer = austen_deb(tmp_path, "r-cran-janeaustenr_1.0.0-2_all.deb")
    monkeypatch.setenv("FAKE_APT_DEB", str(newer))
    monkeypatch.setenv("FAKE_APT_NO_PIN", "1")
    (tmp_path / "apt-state" / "updated").touch()
    c = get_corpus("austen")
    assert fake_apt()[-1] == "download r-cran-janeaustenr"
    src = __import__("json").loads((cache / "corpora" / "austen.json").read_text())["source"]
    assert src["version"] == "1.0.0-2" and src["pinned"] is False and src["sha256"] == sha256_file(newer)
    assert len(c.documents) == 5


def test_wrong_sha_is_refused(fake_apt, cache, monkeypatch):
    spec = debian.DEBIAN_SOURCES["austen"]
    monkeypatch.setitem(debian.DEBIAN_SOURCES, "austen",
                        dataclasses.replace(spec, deb=dataclasses.replace(spec.deb, sha256="0" * 64)))
    with pytest.raises(CalibrationError, match="sha256 .* expected 0000"):
        get_corpus("austen")
    assert not (cache / "corpora" / "austen.json").exists()


def test_without_apt_get_the_error_says_what_to_do(cache, monkeypatch):
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    with pytest.raises(CalibrationError) as err:
        get_corpus("pydocs")
    msg = str(err.value)
    assert "apt-get, which is not on this machine" in msg and "python3.11-doc_3.11.2-6+deb12u8_all.deb" in msg
    assert "https://deb.debian.org/debian/pool/main/p/python3.11/" in msg and "\n" not in msg


def test_hand_placed_deb_is_used_without_apt(cache, tmp_path, monkeypatch):
    deb = austen_deb(tmp_path)
    (cache / "downloads").mkdir(parents=True, exist_ok=True)
    shutil.copy(deb, cache / "downloads" / deb.name)
    spec = debian.DEBIAN_SOURCES["austen"]
    monkeypatch.setitem(debian.DEBIAN_SOURCES, "austen",
                        dataclasses.replace(spec, deb=dataclasses.replace(spec.deb, sha256=sha256_file(deb))))
    monkeypatch.setitem(corpora.EXPECTED_DOCUMENTS, "austen", (5, 5))
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    assert len(get_corpus("austen").documents) == 5


def test_stale_lists_without_root_say_run_update(fake_apt, monkeypatch):
    monkeypatch.setattr(debian, "_can_update", lambda: False)
    with pytest.raises(CalibrationError, match=r"run `sudo apt-get update` once and retry"):
        get_corpus("austen")
    assert fake_apt() == ["download r-cran-janeaustenr=1.0.0-1"]


def test_parser_sanity_range(fake_apt, monkeypatch):
    monkeypatch.setitem(corpora.EXPECTED_DOCUMENTS, "austen", (269, 269))
    with pytest.raises(CalibrationError, match="parsed 5 documents for corpus 'austen', expected 269"):
        get_corpus("austen")


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_debian_corpora():
    """apt-get downloads 1.6 MB + 12.6 MB once (cached under $CALIBRANT_CACHE afterwards)."""
    austen = get_corpus("austen")
    assert len(austen.documents) == 269
    assert austen.documents[0].startswith("CHAPTER I\n\nEmma Woodhouse, handsome, clever, and rich")
    assert 3_900_000 < sum(map(len, austen.documents)) < 4_100_000
    pydocs = get_corpus("pydocs")
    assert len(pydocs.documents) == 497 and 10_000_000 < sum(map(len, pydocs.documents)) < 12_000_000
    assert any(d.startswith(":mod:`abc` --- Abstract Base Classes") for d in pydocs.documents)
    for c in (austen, pydocs):
        held, calib = c.split("heldout"), c.split("calib")
        assert len(held) == -(-len(c.documents) // 10) and set(held).isdisjoint(calib)
    assert {"austen", "pydocs"} <= set(OFFLINE_CORPORA)


def test_gzip_is_not_confused_with_rdb():
    with pytest.raises(ValueError):
        read_rdb_objects(gzip.compress(b"X\n"))
