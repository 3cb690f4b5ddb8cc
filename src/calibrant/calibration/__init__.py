"""Calibration data as a first-class, measured, reproducible input.

``get_corpus`` gives offline real corpora (acquired once, checksummed, split by document into
``calib``/``heldout``); ``make_calibration`` turns a spec string such as ``wiki:128x512`` (or
``wiki:docs:128x512``, ``self:128x512``, ``hf:allenai/c4:en:train:text:128x2048``) into a
:class:`CalibrationSet` of token ids whose provenance and content hash say exactly how it was made;
``heldout_token_ids`` gives evaluation the held-out text joined the same way; ``inspect_calibration``
measures a set (diversity, repetition, perplexity, distance to a corpus).
"""

from calibrant.calibration.calibset import (
    CalibrationSet,
    check_heldout_name,
    heldout_token_ids,
    make_calibration,
    tokenizer_hash,
)
from calibrant.calibration.chat import read_chat_template
from calibrant.calibration.corpora import (
    HUB_CORPORA,
    OFFLINE_CORPORA,
    OFFLINE_SOURCES,
    Corpus,
    get_corpus,
    get_hf_corpus,
)
from calibrant.calibration.diagnostics import CalibrationDiagnostics, inspect_calibration, js_divergence
from calibrant.calibration.selfgen import SelfGenConfig, generate_self_calibration, parse_self_options
from calibrant.calibration.spec import SAMPLING_MODES, CalibSpec, parse_spec

__all__ = [
    "HUB_CORPORA",
    "OFFLINE_CORPORA",
    "OFFLINE_SOURCES",
    "SAMPLING_MODES",
    "CalibSpec",
    "CalibrationDiagnostics",
    "CalibrationSet",
    "Corpus",
    "SelfGenConfig",
    "check_heldout_name",
    "generate_self_calibration",
    "get_corpus",
    "get_hf_corpus",
    "heldout_token_ids",
    "inspect_calibration",
    "js_divergence",
    "make_calibration",
    "parse_self_options",
    "parse_spec",
    "read_chat_template",
    "tokenizer_hash",
]
