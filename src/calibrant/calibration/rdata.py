"""Just enough of R's serialization format to read character data out of an R package.

R stores a package's data sets in a lazy-load database ``data/Rdata.rdb``: a sequence of blocks, each
a 4-byte big-endian uncompressed length followed by a compressed stream (zlib by default; bzip2 or xz
behind a one-byte type tag), and each stream holds one object written by R's ``serialize`` in XDR
(big-endian binary) form. :func:`read_rdb_objects` walks the blocks; :func:`unserialize` turns one
stream into Python values: character vectors become ``list[str | None]`` (``None`` is ``NA``), integer,
logical and double vectors become lists, lists and pairlists become lists, attributes are dropped.
Anything else (closures, environments, bytecode) is refused with ``ValueError``.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from typing import Any

# SEXP types (R Internals, "Serialization formats")
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19, 20
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP, MISSINGARG_SXP = 255, 254, 253, 242, 241, 251
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10
_LATIN1, _UTF8 = 1 << 2, 1 << 3
NA_INTEGER = -(2**31)


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"truncated R serialization (wanted {n} bytes at offset {self.pos} of {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        levels = flags >> 12
        if kind in (NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP, MISSINGARG_SXP):
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            if not 1 <= index <= len(self.refs):
                raise ValueError(f"bad reference {index} in R serialization")
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if kind == LISTSXP:  # pairlist: [attributes] [tag] car cdr
            values = []
            while True:
                if flags & _HAS_ATTR:
                    self.item()
                if flags & _HAS_TAG:
                    self.item()
                values.append(self.item())
                flags = self.int()
                if flags & 0xFF != LISTSXP:
                    self.pos -= 4
                    tail = self.item()
                    if tail is not None:
                        values.append(tail)
                    return values
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None
            raw = self.take(n)
            return raw.decode("latin-1" if levels & _LATIN1 else "utf-8", errors="replace")
        if kind == STRSXP:
            value: Any = [self.item() for _ in range(self.length())]
        elif kind in (LGLSXP, INTSXP):
            n = self.length()
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            value = [None if v == NA_INTEGER else (bool(v) if kind == LGLSXP else v) for v in ints]
        elif kind == REALSXP:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind in (VECSXP, EXPRSXP):
            value = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"R object of SEXP type {kind} is not supported (only vectors, lists and strings)")
        if flags & _HAS_ATTR:
            self.item()  # attributes (names, class, ...) are not needed here
        return value


def unserialize(data: bytes) -> Any:
    """One object from R's binary ``serialize`` output (format ``X``, versions 2 and 3)."""
    r = _Reader(data)
    if r.take(2) != b"X\n":
        raise ValueError("not an R XDR serialization (it does not start with 'X\\n')")
    version = r.int()
    r.int()  # R version that wrote it
    r.int()  # minimal R version to read it
    if version == 3:
        r.take(r.int())  # native encoding, e.g. "UTF-8"
    elif version != 2:
        raise ValueError(f"R serialization version {version} is not supported (only 2 and 3)")
    return r.item()


def _decompress(block: bytes) -> tuple[bytes, int]:
    """(payload, bytes consumed) of one lazy-load block starting at ``block[0]``."""
    if len(block) < 5:
        raise ValueError("truncated lazy-load block")
    size = struct.unpack(">I", block[:4])[0]
    tag = block[4:5]
    if tag in (b"Z", b"2", b"0"):  # R's type tag for xz, bzip2 and stored blocks
        body = block[5:]
        if tag == b"0":
            return body[:size], 5 + size
        if tag == b"2":
            d: Any = bz2.BZ2Decompressor()
        else:
            d = lzma.LZMADecompressor()
        out = d.decompress(body)
        return out, len(block) - len(d.unused_data)
    dz = zlib.decompressobj()
    out = dz.decompress(block[4:]) + dz.flush()
    if not dz.eof:
        raise ValueError("truncated zlib stream in lazy-load block")
    if len(out) != size:
        raise ValueError(f"lazy-load block holds {len(out)} bytes, its header says {size}")
    return out, len(block) - len(dz.unused_data)


def read_rdb_objects(rdb: bytes) -> list[Any]:
    """Every object of an R lazy-load database (``*.rdb``), in file order."""
    objects = []
    pos = 0
    while pos < len(rdb):
        try:
            payload, used = _decompress(rdb[pos:])
        except (zlib.error, lzma.LZMAError, OSError, EOFError) as e:
            raise ValueError(f"corrupt lazy-load block at offset {pos} ({e})") from e
        objects.append(unserialize(payload))
        pos += used
    return objects
