"""Machinery shared by the benches that put llm-compressor beside calibrant
(``gptq_vs_llmcompressor.py``, ``pruning_vs_llmcompressor.py``).

- llm-compressor lives in its own virtual environment (``.venv-llmc``, git-ignored): it pins
  transformers and compressed-tensors below calibrant's. ``ensure_llmc_venv`` creates it on first use
  with calibrant's own torch build (never a CUDA download) plus ``bench/requirements-llmcompressor.txt``.
- Every side runs in its own child process, so its wall time and peak RSS (``ru_maxrss``) are its own.
  A child prints one ``RESULT {json}`` line; ``run_child`` starts it and parses that line.
- Both sides read the same ``[n, L]`` calibration token ids, drawn once by calibrant and saved to a
  file (``prepare_ids``); ``llmc_dataset`` turns them into the dataset ``oneshot`` takes.

This module is imported inside both venvs: nothing here imports calibrant or llm-compressor at the top.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "bench" / "requirements-llmcompressor.txt"
DEFAULT_VENV = ROOT / ".venv-llmc"


def peak_rss_gb() -> float:
    """This process's peak resident set so far, GB (``ru_maxrss`` is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def emit(result: dict) -> None:
    """A child's answer: the one line ``run_child`` looks for."""
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------- parent side
def ensure_llmc_venv(venv: Path) -> tuple[Path | None, str]:
    """The llm-compressor venv's python (created on first use) and "llmc-version torch-version", or
    None and why not."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import llmcompressor, torch; print(llmcompressor.__version__, torch.__version__)"]
    if py.exists():
        done = subprocess.run(probe, capture_output=True, text=True)
        if done.returncode == 0:
            return py, done.stdout.strip().splitlines()[-1]
    import torch  # calibrant's venv: reuse exactly its torch build, so nothing pulls a CUDA wheel

    print(f"creating {venv} for llm-compressor (one-off, a few minutes) …", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [str(py), "-m", "pip", "install", "-q", f"torch=={torch.__version__}", "-r", str(REQUIREMENTS)],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return None, f"`{' '.join(cmd[-3:])}` failed: {' | '.join(tail)}"
    done = subprocess.run(probe, capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"llm-compressor installed but does not import: {done.stderr.strip().splitlines()[-1:]}"
    return py, done.stdout.strip().splitlines()[-1]


def run_child(python: Path | str, script: str | Path, argv: list[str]) -> dict:
    """Run ``python script argv…`` with calibrant's ``src`` on the path; its ``RESULT`` dict plus
    ``child_s`` (the child's wall time, start-up included). Raises RuntimeError with the child's last
    lines when it prints no result."""
    cmd = [str(python), str(Path(script).resolve()), *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "child_s": time.perf_counter() - t0}
    name = argv[argv.index("--child") + 1] if "--child" in argv else " ".join(argv)
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
    raise RuntimeError(f"child '{name}' failed (exit {done.returncode}):\n{tail}")


def prepare_ids(model: str, calibration: str, seed: int, path: Path) -> tuple[Path, Any]:
    """Draw the calibration ids once with calibrant's tokenizer (so they match its other benchmarks)
    and save them to ``path``; the model's local HF directory (llm-compressor loads it) and the set."""
    sys.path.insert(0, str(ROOT / "src"))
    from calibrant.calibration import make_calibration
    from calibrant.models import load_model, resolve_model_dir

    model_dir = resolve_model_dir(model, quiet=True)
    loaded = load_model(model, quiet=True)
    calib = make_calibration(calibration, loaded.tokenizer, seed=seed)
    del loaded
    calib.save(str(path))
    return model_dir, calib


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    """Plain aligned columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))


# --------------------------------------------------------------------------------------- child side
def dense_forward_passes(model: Any, ids: Any, batch_size: int, passes: int = 2) -> list[float]:
    """Seconds of ``passes`` plain forward passes (LM head included, no KV cache) over ``ids`` in
    batches, after an untimed warm-up. A shared machine's speed drifts: callers take the fastest."""
    import torch

    out = []
    with torch.no_grad():
        model(input_ids=ids[: min(2, ids.shape[0]), :16], use_cache=False)  # warm-up, not timed
        for _ in range(passes):
            t0 = time.perf_counter()
            for b in range(0, ids.shape[0], batch_size):
                model(input_ids=ids[b : b + batch_size], use_cache=False)
            out.append(time.perf_counter() - t0)
    return out


def llmc_load(model_dir: str | Path) -> tuple[Any, Any]:
    """Model (fp32) and tokenizer from an HF directory, inside the llm-compressor venv."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(model_dir)


def llmc_dataset(ids_path: str | Path) -> tuple[Any, Any]:
    """The saved calibration ids as the tokenized ``datasets.Dataset`` that ``oneshot`` takes (rows in
    order, full attention), and the ids tensor."""
    import torch
    from datasets import Dataset
    from safetensors.torch import load_file

    ids = load_file(str(ids_path))["input_ids"].long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}), ids


def llmc_oneshot(model: Any, tokenizer: Any, ids_path: str | Path, recipe: Any) -> dict:
    """Run llm-compressor's ``oneshot`` with ``recipe`` over exactly the saved ids (no shuffling, no
    truncation); its wall time and this process's peak RSS right after (model load included)."""
    from llmcompressor import oneshot

    dataset, ids = llmc_dataset(ids_path)
    t0 = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "peak_rss_gb": peak_rss_gb()}


def llmc_version() -> str:
    import llmcompressor

    return llmcompressor.__version__
