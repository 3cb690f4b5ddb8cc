"""Setup shared by the structured-search benches (``structured_ablation.py``, ``structured_oracle.py``,
``structured_heads.py``): the model, its calibration set, the wiki and news held-out streams every arm is
scored on, and one plain dense forward over the calibration tokens timed in the same run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from _llmc import dense_forward_passes

EVAL_CORPORA = ("wiki", "news")  # news stands in for PTB offline


@dataclass
class SearchBench:
    lm: Any  # calibrant.models.LoadedModel
    calib: Any  # calibrant.calibration.CalibrationSet
    streams: dict[str, Any]  # corpus → 1-D held-out token ids
    forward_s: float  # one dense forward over the calibration tokens (nan when not timed)


def load_search_bench(model: str, calibration: str, seed: int, batch_size: int,
                      time_forward: bool = True) -> SearchBench:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from calibrant.api import resolve_calibration
    from calibrant.calibration import heldout_token_ids
    from calibrant.models import load_model

    lm = load_model(model, quiet=True)
    calib = resolve_calibration(calibration, lm.tokenizer, seed, lm.context_length, progress=False)
    fwd_s = min(dense_forward_passes(lm.model, calib.input_ids, batch_size=batch_size, passes=1)) \
        if time_forward else float("nan")
    streams = {c: heldout_token_ids(c, lm.tokenizer, progress=False)[0] for c in EVAL_CORPORA}
    return SearchBench(lm, calib, streams, fwd_s)
