"""``import calibrant`` alone makes structurally pruned directories loadable with plain transformers, cheaply."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "search"))
from search_helpers import gqa_model, tokens, word_tokenizer  # noqa: E402

from calibrant.models.structured import save_structured  # noqa: E402
from calibrant.search import StructuredConfig, StructuredPruner, compute_importance  # noqa: E402


def _fresh(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter (nothing imported yet), from a neutral directory."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parent)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    model = gqa_model("llama")
    importance = compute_importance(model, None, "magnitude", progress=False, cache=False)
    StructuredPruner(model, importance).apply(StructuredConfig((1, 3, 2), (40, 96, 16)))
    ids = tokens()
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    out = save_structured(model, word_tokenizer(), tmp_path_factory.mktemp("structured") / "het")
    torch.save({"ids": ids, "logits": expected}, out.parent / "expected.pt")
    return out, ids, expected


IMPORTS = {
    "calibrant first": "import calibrant\nimport transformers",
    "transformers first": "import transformers\ntransformers.AutoModelForCausalLM\nimport calibrant",
    # the Auto classes load while LlamaConfig's module is half-initialised: registration must wait for it
    "a config class first": "import warnings\nwarnings.simplefilter('error')\nimport calibrant\n"
                            "from transformers import LlamaConfig, LlamaForCausalLM\nimport transformers",
}


@pytest.mark.parametrize("order", sorted(IMPORTS))
def test_import_calibrant_registers_structured_types(pruned_dir, order):
    out, _, _ = pruned_dir
    imports = IMPORTS[order]
    proc = _fresh(f"""
        {imports.replace(chr(10), chr(10) + '        ')}
        import torch

        model = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        assert model.config.model_type == "calibrant_llama", model.config.model_type
        ref = torch.load({str(out.parent / 'expected.pt')!r})
        with torch.no_grad():
            logits = model(input_ids=ref["ids"], use_cache=False).logits
        assert torch.equal(logits, ref["logits"]), "reloaded logits differ"
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_without_calibrant_transformers_refuses(pruned_dir):
    out, _, _ = pruned_dir
    proc = _fresh(f"""
        import transformers
        transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})
    """)
    assert proc.returncode != 0 and "calibrant_llama" in proc.stderr


def test_import_calibrant_stays_cheap():
    proc = _fresh("""
        import sys
        import calibrant
        heavy = sorted(m for m in ("torch", "transformers", "numpy", "calibrant.models", "calibrant.search")
                       if m in sys.modules)
        print(heavy)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
