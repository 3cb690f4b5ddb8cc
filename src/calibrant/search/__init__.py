"""Structured pruning (KV groups, MLP channels, whole blocks) and a predictor-guided search over its configurations.

``structured`` slices a dense model into a really smaller one and saves/loads it; ``space`` defines
per-block keep ratios under a parameter budget; ``predictor`` learns log-perplexity from measured
configurations; ``search`` samples and measures pairs, fits the predictor and searches with it.
"""

from calibrant.search.predictor import Featurizer, Predictor, cross_validate
from calibrant.search.search import PairStore, SearchResult, prune_structured, search_structured
from calibrant.search.space import SearchSpace
from calibrant.search.structured import (
    SCORES,
    STRUCTURED_FAMILIES,
    Importance,
    ModelShape,
    StructuredConfig,
    StructuredPruner,
    compute_importance,
    count_block_params,
    count_params,
    load_structured,
    save_structured,
)

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
    "STRUCTURED_FAMILIES",
    "Importance",
    "ModelShape",
    "StructuredConfig",
    "StructuredPruner",
    "compute_importance",
    "count_block_params",
    "count_params",
    "load_structured",
    "save_structured",
]
