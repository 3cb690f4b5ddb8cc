"""The README's worked block-level example runs as written: folded scales leave the model's function."""

from __future__ import annotations

import pytest
import torch

from calibrant.engine import compress
from calibrant.methods import BlockMethod, make_method
from tests.conftest import FAMILIES, tiny_model, token_batch


class ScaleToMeanAbs(BlockMethod):
    name, statistics = "scale-example", ()

    def compress_block(self, block):
        dense = block.run()
        for fold in block.folds:
            first = next(iter(fold.targets))
            s = block.observe(("mean_abs",), [first])[first].get("mean_abs").clamp(min=1e-5).sqrt()
            fold.apply(s)
        assert torch.allclose(block.run(), dense, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_readme_block_method_keeps_logits(family):
    model = tiny_model(family)
    ids = token_batch(n=4, length=16)
    with torch.no_grad():
        before = model(ids).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = compress(model, ids, [ScaleToMeanAbs(), make_method("rtn", scheme="w8-channel")], progress=False,
                      batch_size=2)
    assert report.block_pipelines == ["two-pass"] * len(report.block_pipelines)  # no statistics: no one-pass
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, weights[n])]
    assert any("norm" in n or "ln_" in n for n in changed)  # the scales went into the norms
    with torch.no_grad():  # W8 per-channel RTN after the folds: close to the dense logits
        after = model(ids).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_readme_block_method_alone_is_exact_up_to_rounding(family):
    model = tiny_model(family)
    ids = token_batch(n=4, length=16)
    with torch.no_grad():
        before = model(ids).logits
    report = compress(model, ids, ScaleToMeanAbs(), progress=False, batch_size=2)
    assert all(r.sparsity == 0 and "scheme" not in r.info for r in report.layers)
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() < 1e-4 * before.abs().max()


def test_block_method_on_a_family_without_folds_is_refused_before_any_change():
    import transformers as T

    from calibrant.errors import RecipeError
    from tests.conftest import tiny_config

    config = tiny_config("opt")
    config.do_layer_norm_before = False  # post-LN (OPT-350m): no norm feeds the linears
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RecipeError, match=r"scale-example folds .* opt \(OPTForCausalLM\) .*post-LN"):
        compress(model, token_batch(), ScaleToMeanAbs(), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
