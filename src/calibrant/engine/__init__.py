"""The layer-sequential compression engine: plan → per-block pipelines → report.

``compress`` (:mod:`calibrant.engine.core`) is the entry point; :mod:`~calibrant.engine.plan` decides
and checks what will be done, :mod:`~calibrant.engine.pipelines` compresses one block (one-pass,
two-pass, data-free), :mod:`~calibrant.engine.block` is what block-level methods see,
:mod:`~calibrant.engine.runner` runs the model block by block, :mod:`~calibrant.engine.report` records
the result and :mod:`~calibrant.engine.stopwatch` where the time went.
"""

from calibrant.engine.core import compress
from calibrant.engine.plan import PIPELINES, PROPAGATE, selected
from calibrant.engine.report import CompressionReport, LayerRecord
from calibrant.engine.runner import BlockwiseRunner

__all__ = ["PIPELINES", "PROPAGATE", "BlockwiseRunner", "CompressionReport", "LayerRecord", "compress", "selected"]
