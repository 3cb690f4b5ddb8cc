"""Bitwise regression: the compressed weights of every method × scheme stay what they were.

A refactor of the engine or the method interface must not move a single bit of a result. Each case
compresses a tiny random model (every family) or the real default model with a small calibration set
and hashes every parameter; the expected hashes live in ``regression_hashes.json`` beside this file.

Data-free cases (magnitude, RTN) are elementwise maths: bitwise the same on any machine. The others
read activations from float32 GEMMs, which round differently on another CPU or BLAS build (README
"Reproducibility"), so their hashes are kept per machine fingerprint (CPU model, torch's CPU capability,
torch version, threads) and checked where one was recorded. On a new machine, record them at the commit
*before* a refactor (``python -m tests.test_regression --update`` adds this machine's), then check the
refactor against them. After a change *meant* to move results, record them anew and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

from calibrant.engine import compress
from calibrant.methods import make_recipe
from tests.conftest import FAMILIES, tiny_model, token_batch

GOLDEN = Path(__file__).with_name("regression_hashes.json")
DATA_FREE = ("magnitude", "rtn")


def fingerprint() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    return f"{cpu} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__} | {torch.get_num_threads()} threads"

# (recipe, parameters, engine options): every method, every scheme shape, both pipelines, both propagations
CASES: dict[str, tuple[str, dict, dict]] = {
    "magnitude-50": ("magnitude", {"sparsity": 0.5}, {}),
    "magnitude-2:4": ("magnitude", {"pattern": "2:4"}, {}),
    "wanda-50": ("wanda", {"sparsity": 0.5}, {}),
    "wanda-2:4": ("wanda", {"pattern": "2:4"}, {}),
    "wanda-60-per-layer": ("wanda", {"sparsity": 0.6, "per_layer": True}, {}),
    "wanda-50-dense": ("wanda", {"sparsity": 0.5}, {"propagate": "dense"}),
    "sparsegpt-50": ("sparsegpt", {"sparsity": 0.5}, {}),
    "sparsegpt-4:8-two-pass": ("sparsegpt", {"pattern": "4:8"}, {"pipeline": "two-pass"}),
    "rtn-w4g16": ("rtn", {"scheme": "w4g16"}, {}),
    "rtn-w8-channel": ("rtn", {"scheme": "w8-channel"}, {}),
    "rtn-w4-tensor": ("rtn", {"scheme": "w4-tensor"}, {}),
    "rtn-w3g16-asym-mse": ("rtn", {"scheme": "w3g16-asym-mse"}, {}),
    "rtn-w8a8": ("rtn", {"scheme": "w8a8"}, {}),
    "rtn-w4g16+lorc4": ("rtn", {"scheme": "w4g16+lorc4"}, {}),
    "gptq-w4g16": ("gptq", {"scheme": "w4g16"}, {}),
    "gptq-w4g16-two-pass": ("gptq", {"scheme": "w4g16"}, {"pipeline": "two-pass"}),
    "gptq-w4g16-act-order": ("gptq", {"scheme": "w4g16", "act_order": True}, {}),
    "gptq-w4g16-static": ("gptq", {"scheme": "w4g16", "act_order": True, "static_groups": True}, {}),
    "gptq-w4-channel-asym-bs8": ("gptq", {"scheme": "w4-channel-asym", "blocksize": 8}, {}),
    "gptq-w4-tensor": ("gptq", {"scheme": "w4-tensor"}, {}),
    "gptq-w8a8": ("gptq", {"scheme": "w8a8"}, {}),
    "gptq-w4a8g16": ("gptq", {"scheme": "w4a8g16"}, {}),
    "gptq-w3g16+lorc4": ("gptq", {"scheme": "w3g16+lorc4"}, {}),
    "sparsegpt+gptq-2:4-w4g16": ("sparsegpt+gptq", {"pattern": "2:4", "scheme": "w4g16"}, {}),
    "wanda+rtn-50-w4g16": ("wanda+rtn", {"sparsity": 0.5, "scheme": "w4g16"}, {}),
}
REAL_CASES = ["wanda-50", "sparsegpt-50", "rtn-w4g16", "gptq-w4g16", "gptq-w4g16-act-order", "sparsegpt+gptq-2:4-w4g16"]
REAL_SCHEME = {"w4g16": "w4g64"}  # SmolLM2's 576 columns: the bench's group size


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def run_tiny(family: str, case: str) -> str:
    recipe, params, options = CASES[case]
    model = tiny_model(family)
    compress(model, token_batch(n=6, length=32), make_recipe(recipe, **params), batch_size=4, progress=False,
             **options)
    return weights_hash(model)


def run_real(model_dir: Path, ids: torch.Tensor, case: str) -> str:
    from calibrant.models import load_model

    recipe, params, options = CASES[case]
    params = {k: REAL_SCHEME.get(v, v) if k == "scheme" else v for k, v in params.items()}
    loaded = load_model(model_dir, quiet=True)
    compress(loaded.model, ids, make_recipe(recipe, **params), batch_size=4, progress=False, **options)
    return weights_hash(loaded.model)


def real_inputs() -> tuple[Path, torch.Tensor]:
    from calibrant.calibration import make_calibration
    from calibrant.models import load_model

    loaded = load_model("smollm2-135m", quiet=True)
    calib = make_calibration("wiki:8x64", loaded.tokenizer, seed=0, progress=False)
    return loaded.path, calib.input_ids


def golden(key: str) -> str:
    """The recorded hash of ``key`` on this machine; a data-free case's from any machine."""
    recorded = json.loads(GOLDEN.read_text())
    if fingerprint() in recorded:
        return recorded[fingerprint()][key]
    if CASES[key.split("/", 1)[1]][0] in DATA_FREE:
        return next(iter(recorded.values()))[key]
    pytest.skip(f"no hashes recorded on this machine ({fingerprint()}); record them at the commit before a "
                "change with `python -m tests.test_regression --update`, then compare")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_tiny_weights_bitwise_unchanged(family, case):
    assert run_tiny(family, case) == golden(f"{family}/{case}")


@pytest.mark.slow
def test_real_model_weights_bitwise_unchanged():
    expected = {case: golden(f"smollm2-135m/{case}") for case in REAL_CASES}
    model_dir, ids = real_inputs()
    assert {case: run_real(model_dir, ids, case) for case in REAL_CASES} == expected


if __name__ == "__main__" and "--update" in sys.argv:
    hashes = {f"{family}/{case}": run_tiny(family, case) for family in FAMILIES for case in CASES}
    model_dir, ids = real_inputs()
    hashes.update({f"smollm2-135m/{case}": run_real(model_dir, ids, case) for case in REAL_CASES})
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    recorded[fingerprint()] = hashes
    GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(hashes)} hashes for {fingerprint()} to {GOLDEN}")
