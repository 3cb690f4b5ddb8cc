"""Structured pruning (KV groups, MLP channels, whole blocks) and a predictor-guided search over its configurations.

``structured`` defines per-block shapes and configurations; ``importance`` scores each KV group and
MLP channel; ``pruner`` slices a dense model into a really smaller one; ``space`` defines per-block
keep ratios under a parameter budget; ``predictor`` learns log-perplexity from measured
configurations; ``search`` samples and measures pairs, fits the predictor and searches with it.
Saving and loading pruned models is the structured model format, :mod:`calibrant.models.structured`.
The entry points take a loaded model and a calibration set; :mod:`calibrant.api` has the ones that
load them from specs.
"""

from calibrant.search.importance import SCORES, Importance, compute_importance
from calibrant.search.predictor import Featurizer, Predictor, cross_validate
from calibrant.search.pruner import StructuredPruner, count_block_params, count_params
from calibrant.search.search import PairStore, SearchResult, prune_structured, search_structured
from calibrant.search.space import SearchSpace
from calibrant.search.structured import ModelShape, StructuredConfig

__all__ = [
    "Featurizer",
    "PairStore",
    "Predictor",
    "SearchResult",
    "SearchSpace",
    "cross_validate",
    "prune_structured",
    "search_structured",
    "SCORES",
    "Importance",
    "ModelShape",
    "StructuredConfig",
    "StructuredPruner",
    "compute_importance",
    "count_block_params",
    "count_params",
]
