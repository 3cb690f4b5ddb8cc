"""Machinery shared by the benches that put llm-compressor beside calibrant
(``gptq_vs_llmcompressor.py``, ``pruning_vs_llmcompressor.py``, ``awq_vs_llmcompressor.py``,
``smoothquant_vs_llmcompressor.py``).

- llm-compressor lives in its own virtual environment (``.venv-llmc``, git-ignored): it pins
  transformers and compressed-tensors below calibrant's. ``ensure_llmc_venv`` creates it on first use
  with calibrant's own torch build (never a CUDA download) plus ``bench/requirements-llmcompressor.txt``.
- Every side runs in its own child process, so its wall time and peak RSS (``ru_maxrss``) are its own.
  A child prints one ``RESULT {json}`` line; ``run_child`` starts it and parses that line.
  ``child_argv`` builds a child's command line from the parent's parsed options.
- Both sides read the same ``[n, L]`` calibration token ids, drawn once by calibrant and saved to a
  file (``prepare_ids``); ``llmc_dataset`` turns them into the dataset ``oneshot`` takes.
- Perplexity is one protocol for everyone (``perplexities``: ``calibrant.api.evaluate_perplexity``);
  ``use_calibrant_act_quant`` makes a compressed-tensors model read back by calibrant's loader simulate
  its activation quantization with calibrant's own hooks, so both sides are measured the same way.

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
    """This process's own peak resident set so far, GB: ``VmHWM`` on Linux. Not ``ru_maxrss``: Linux carries
    it across ``exec``, so a child started by a large parent reports the parent's resident set at the fork
    (a 13.6 MB child of a 1.5 GB parent reads 1.48 GB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux, elsewhere an upper bound


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


def child_argv(name: str, args: Any, keys: tuple[str, ...] | list[str], **extra: Any) -> list[str]:
    """``--child name`` and, for each option in ``keys`` that ``args`` holds, ``--key value`` (a flag
    alone when True; None and False left out), then ``extra`` the same way."""
    argv = ["--child", name]
    for key, value in [*((k, getattr(args, k, None)) for k in keys), *extra.items()]:
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def machine_line() -> str:
    """The processor, CPU count and torch's thread count, for a footer."""
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads default"


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


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


def perplexities(model: Any, corpora: str, max_tokens: int | None) -> dict:
    """Held-out perplexity of ``model`` (a LoadedModel or a directory) on each corpus, calibrant's one
    protocol (seq_len 512, non-overlapping): ``{corpus: {"ppl", "tokens"}}``. Calibrant's venv only."""
    from calibrant.api import evaluate_perplexity

    res = evaluate_perplexity(model, corpora, max_tokens=max_tokens, progress=False)
    return {k: {"ppl": r.ppl, "tokens": r.tokens} for k, r in res.items()}


def use_calibrant_act_quant(model: Any, act_bits: int, granularity: str = "token") -> int:
    """A compressed-tensors model read back by calibrant's loader (transformers' compressed-tensors
    integration) simulates the dynamic activation quantization in its config with compressed-tensors'
    own fake-quant (scale ``amax / 127.5``); calibrant's hooks use ``amax / 127``. Decompress the weights
    (one tiny forward), turn compressed-tensors' fake-quant off on every linear that quantizes its inputs
    and put calibrant's pre-hook there instead, so that activations are quantized the same way on both
    sides. Returns how many linears were switched. Calibrant's venv only."""
    import torch

    from calibrant.methods.quant import QuantState, attach_quant_state, parse_scheme

    with torch.no_grad():  # compressed-tensors decompresses on the first forward (a pre-hook on the model)
        model(input_ids=torch.tensor([[1, 2]]), use_cache=False)
    scheme = parse_scheme(f"w8a{act_bits}" + ("t" if granularity == "tensor" else ""))  # only act_bits is read
    count = 0
    for module in model.modules():
        qs = getattr(module, "quantization_scheme", None)
        if isinstance(module, torch.nn.Linear) and qs is not None and qs.input_activations is not None:
            if qs.input_activations.num_bits != act_bits:
                raise RuntimeError(f"the saved model quantizes activations to {qs.input_activations.num_bits} bits, "
                                   f"not {act_bits}")
            module.quantization_enabled = False  # weights are decompressed already: no weight fake-quant either
            attach_quant_state(module, QuantState(scheme))
            count += 1
    return count


def child_dense(args: Any) -> dict:
    """The dense child: ``passes`` plain forwards over the calibration ids (``dense_forward_passes``) and,
    unless ``args.no_eval``, the dense model's perplexity on ``args.eval``. Calibrant's venv only."""
    from calibrant.calibration import CalibrationSet
    from calibrant.models import load_model

    lm = load_model(args.model, quiet=True)
    passes = dense_forward_passes(lm.model, CalibrationSet.load(args.ids).input_ids, args.batch_size)
    out: dict[str, Any] = {"dense_forward_s": min(passes), "passes": passes}
    if not args.no_eval:
        out["ppl"] = perplexities(lm, args.eval, args.max_eval_tokens)
    return out


def child_calibrant_recipe(args: Any, recipe: str, **params: Any) -> dict:
    """Calibrant compresses ``args.model`` with ``make_recipe(recipe, **params)`` over the saved ids
    (engine defaults, batch ``args.batch_size``); wall time and peak RSS right after compression, then
    the in-memory model's perplexity on ``args.eval`` (activation quantization simulated by the hooks
    the engine attached). Calibrant's venv only."""
    from calibrant.calibration import CalibrationSet
    from calibrant.engine import compress
    from calibrant.methods import make_recipe
    from calibrant.models import load_model

    lm = load_model(args.model, quiet=True)
    calib = CalibrationSet.load(args.ids)
    methods = make_recipe(recipe, **params)
    t0 = time.perf_counter()
    report = compress(lm.model, calib, methods, batch_size=args.batch_size, progress=False)
    wall = time.perf_counter() - t0
    rss = peak_rss_gb()
    hooked = sum(1 for m in lm.model.modules() if getattr(m, "_calibrant_act_hook", None) is not None)
    return {"wall_s": wall, "peak_rss_gb": rss, "timings": report.timings, "act_quant_linears": hooked,
            "ppl": perplexities(lm, args.eval, args.max_eval_tokens),
            "settings": {"recipe": recipe, "methods": [{"method": m.name, **m.params()} for m in methods],
                         "pipeline": report.pipeline}}


def child_eval_dir(args: Any, act_bits: int | None = None) -> dict:
    """Perplexity of the directory llm-compressor saved (``args.out``), read back by calibrant's loader.
    With ``act_bits``: first as loaded (compressed-tensors' own activation fake-quant, ``ppl_own``), then
    with calibrant's activation hooks instead (``ppl``: the protocol calibrant's rows use)."""
    from calibrant.models import load_model

    lm = load_model(args.out, quiet=True)
    if not act_bits:
        return {"ppl": perplexities(lm, args.eval, args.max_eval_tokens)}
    own = perplexities(lm, args.eval, args.max_eval_tokens)
    switched = use_calibrant_act_quant(lm.model, act_bits)
    return {"ppl_own": own, "ppl": perplexities(lm, args.eval, args.max_eval_tokens), "act_quant_linears": switched}


def print_results(header: str, rows: list[tuple[str, dict | None]], dense: dict, fwd: float) -> None:
    """The markdown table: dense first, then each ``(label, result)`` with wall s, × dense forward,
    peak RSS and perplexity per corpus (rows whose result is None are left out)."""
    corpora = list(dense["ppl"])
    table = [["dense fp32", "-", "-", "-", *(f"{dense['ppl'][c]['ppl']:.3f}" for c in corpora)]]
    for label, r in rows:
        if r:
            table.append([label, f"{r['wall_s']:.1f}", f"{r['wall_s'] / fwd:.2f}", f"{r['peak_rss_gb']:.3f}",
                          *(f"{r['ppl'][c]['ppl']:.3f}" for c in corpora)])
    head = [header, "wall s", "x dense fwd", "peak RSS GB", *(f"ppl {c}" for c in corpora)]
    widths = [max(len(str(r[i])) for r in [head, *table]) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|")
    for r in table:
        print("| " + " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                for i, (c, w) in enumerate(zip(r, widths, strict=True))) + " |")


def llmc_cpu_patches() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations (``IntermediatesCache.pin_memory``) before
    each grid search, which raises "Cannot access accelerator device" on a CPU-only machine; pinning only
    speeds host-to-device copies, so without an accelerator it is skipped (a no-op here). llm-compressor venv."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *a, **k: None


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


def llmc_save_dequantized(model: Any, tokenizer: Any, model_dir: str | Path, out: str | Path) -> dict:
    """Save llm-compressor's quantized model as a plain fp32 HF directory: a fresh dense copy of
    ``model_dir`` takes every parameter of ``model`` (AWQ's smoothed norms and balanced weights
    included), each quantized linear's weight replaced by its dequantized grid values (compressed-tensors'
    ``forward_quantize``, the quantize-dequantize its own forward applies). Any loader reads the result;
    calibrant's venv (newer compressed-tensors) cannot read 0.14's asymmetric ``pack-quantized`` checkpoint
    (a size mismatch on load). Weights only: activation quantization is not carried. Returns the largest
    logit difference between ``model`` and the copy on a short input (the check that nothing was lost).
    llm-compressor venv."""
    import torch
    from compressed_tensors.quantization import forward_quantize
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    modules = dict(model.named_modules())
    quantized = 0
    with torch.no_grad():
        for name, param in dense.named_parameters():
            owner, _, leaf = name.rpartition(".")
            src = modules[owner]
            value = getattr(src, leaf).detach()
            scheme = getattr(src, "quantization_scheme", None)
            if leaf == "weight" and scheme is not None and scheme.weights is not None:
                value = forward_quantize(src, value, "weight", scheme.weights)
                quantized += 1
            param.copy_(value.to(param.dtype))
        ids = torch.arange(1, 65).unsqueeze(0)
        diff = float((model(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max())
    dense.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"dequantized_linears": quantized, "dequantized_max_logit_diff": diff}


def llmc_version() -> str:
    import llmcompressor

    return llmcompressor.__version__
