"""Issue 20, item 4: NaN/Inf is refused before any output, naming where it is — the weight tensor that
holds it, or the block and the calibration sequences whose activations carry it — never blamed on a
method's damping or on the calibration data when the checkpoint is at fault."""

from __future__ import annotations

import pytest
import torch

from calibrant.engine import compress
from calibrant.errors import NumericalError
from calibrant.methods import make_method
from tests.conftest import tiny_model, token_batch


def test_nan_in_a_norm_weight_names_the_tensor():
    model = tiny_model("llama")
    norm = model.model.layers[1].post_attention_layernorm.weight
    with torch.no_grad():
        norm[3] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NumericalError) as exc:
        compress(model, token_batch(), make_method("gptq", scheme="w4g16"), progress=False)
    message = str(exc.value)
    assert "model.layers.1.post_attention_layernorm.weight holds 1 NaN/Inf value before any compression" in message
    assert "damp" not in message and "calibration" not in message
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or k.endswith("post_attention_layernorm.weight") for k in before)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "gptq"])
def test_activations_that_overflow_name_the_block_and_the_sequences(method):
    model = tiny_model("llama")

    def overflow_on_some(module, args, output):  # a block that overflows on sequences 2 and 4 only
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[[2, 4], 5] = float("inf")
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    model.model.layers[0].register_forward_hook(overflow_on_some)
    kwargs = {"scheme": "w4g16"} if method == "gptq" else {"sparsity": 0.5}
    with pytest.raises(NumericalError) as exc:
        compress(model, token_batch(n=6), make_method(method, **kwargs), batch_size=6, progress=False)
    assert "entering block 1 are NaN/Inf for calibration sequences 2, 4 (of 6): block 0 overflows" in str(exc.value)
