"""Structured pruning (KV groups, MLP channels, whole blocks) and a predictor-guided search over its configurations.

``structured`` slices a dense model into a really smaller one and saves/loads it; ``space`` defines
per-block keep ratios under a parameter budget; ``predictor`` learns log-perplexity from measured
configurations; ``search`` samples and measures pairs, fits the predictor and searches with it.
"""

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
