"""llama.cpp's own tools for the GGUF benchmark: built once from the llama.cpp source that PyPI's
``llama-cpp-python`` sdist carries (``vendor/llama.cpp``), into the calibrant cache. Benchmark only: calibrant
never needs llama.cpp, and CI never builds it.

    .venv/bin/python bench/_llamacpp.py        # build (minutes on 2 cores; needs cmake and a C++ compiler)

The sdist is pinned by version and sha256 (``bench/requirements-llamacpp.txt``); the build is CPU-only and
static, with llama-perplexity, llama-quantize, llama-imatrix and llama-tokenize.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("requirements-llamacpp.txt")
TOOLS = ("llama-perplexity", "llama-quantize", "llama-imatrix", "llama-tokenize")


def pinned() -> tuple[str, str]:
    """(version, sha256) of the llama-cpp-python sdist named in requirements-llamacpp.txt."""
    text = REQUIREMENTS.read_text()
    version = re.search(r"llama-cpp-python==([\w.]+)", text)
    digest = re.search(r"--hash=sha256:([0-9a-f]{64})", text)
    if not version or not digest:
        raise SystemExit(f"{REQUIREMENTS} must pin llama-cpp-python==VERSION --hash=sha256:DIGEST")
    return version.group(1), digest.group(1)


def tools_dir() -> Path:
    from calibrant.cache import cache_dir

    return cache_dir("llamacpp") / pinned()[0] / "bin"


def ensure_tools(quiet: bool = False) -> Path:
    """The directory holding llama.cpp's tools, building them first if they are not there yet."""
    dest = tools_dir()
    if all((dest / t).is_file() for t in TOOLS):
        return dest
    version, digest = pinned()
    log = subprocess.DEVNULL if quiet else None
    with tempfile.TemporaryDirectory(prefix="llamacpp-build.", dir=dest.parent.parent) as work:
        work = Path(work)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                        "-d", str(work), f"llama-cpp-python=={version}"], check=True, stdout=log)
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        have = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if have != digest:
            raise SystemExit(f"{sdist.name}: sha256 {have} is not the pinned {digest}")
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            tar.extractall(work, members=[m for m in tar.getmembers() if m.name.startswith(prefix)], filter="data")
        source, build = work / prefix, work / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"], check=True, stdout=log)
        subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TOOLS],
                       check=True, stdout=log)
        staged = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for tool in TOOLS:
            shutil.copy2(build / "bin" / tool, staged / tool)
        staged.rename(dest)
    return dest


if __name__ == "__main__":
    print(ensure_tools())
