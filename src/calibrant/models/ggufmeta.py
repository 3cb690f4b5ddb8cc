"""A GGUF file's key/value metadata (tokenizer, chat template, hyper-parameters), kept beside a converted model.

When a ``.gguf`` model is converted to a Hugging Face directory, its metadata is copied into
``source-gguf-kv.bin`` there: a GGUF file with the same keys, value types and values and no tensors. The
GGUF export reads it back, so a GGUF → calibrant → GGUF round trip keeps the tokenizer and every key
llama.cpp wrote, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE_KV_FILE = "source-gguf-kv.bin"


@dataclass(frozen=True)
class KV:
    key: str
    value: Any
    type: Any  # gguf.GGUFValueType
    sub_type: Any = None  # the element type of an ARRAY


def read_kv(path: str | Path) -> list[KV]:
    """Every key/value pair of a GGUF file, in file order (the reader's ``GGUF.*`` header fields left out)."""
    from gguf import GGUFReader, GGUFValueType

    out = []
    for field in GGUFReader(str(path)).fields.values():
        if field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        out.append(KV(field.name, field.contents(), vtype, sub))
    return out


def write_kv(path: str | Path, kv: list[KV]) -> None:
    """A tensor-less GGUF file holding ``kv`` (its architecture taken from ``general.architecture``)."""
    from gguf import GGUFWriter

    arch = next((str(p.value) for p in kv if p.key == "general.architecture"), "unknown")
    writer = GGUFWriter(str(path), arch)
    add_kv(writer, kv)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_kv(writer: Any, kv: list[KV]) -> None:
    """Add ``kv`` to a ``GGUFWriter`` (replacing what it holds under the same keys, without its warning)."""
    from gguf.gguf_writer import GGUFValue

    for p in kv:
        writer.kv_data[0][p.key] = GGUFValue(value=p.value, type=p.type, sub_type=p.sub_type)
