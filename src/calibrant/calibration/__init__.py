"""Calibration data as a first-class, measured, reproducible input.

``get_corpus`` gives offline real corpora (acquired once, checksummed, split by document into
``calib``/``heldout``); ``make_calibration`` turns a spec string such as ``wiki:128x512`` into a
:class:`CalibrationSet` of token ids whose provenance and content hash say exactly how it was made;
``heldout_token_ids`` gives evaluation the held-out text joined the same way.
"""

from calibrant.calibration.calibset import (
    CalibrationSet,
    heldout_token_ids,
    make_calibration,
    tokenizer_hash,
)
from calibrant.calibration.corpora import HUB_CORPORA, OFFLINE_CORPORA, Corpus, get_corpus
from calibrant.calibration.spec import CalibSpec, parse_spec

__all__ = [
    "HUB_CORPORA",
    "OFFLINE_CORPORA",
    "CalibSpec",
    "CalibrationSet",
    "Corpus",
    "get_corpus",
    "heldout_token_ids",
    "make_calibration",
    "parse_spec",
    "tokenizer_hash",
]
