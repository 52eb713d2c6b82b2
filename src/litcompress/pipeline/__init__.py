"""The compression pipeline: prune (while fine-tuning) -> shrink -> quantize -> export, with a report.

:func:`compress` is framework-free; :mod:`litcompress.pipeline.lightning` runs it on a LightningModule and a
DataModule (imported on demand, so this package does not import Lightning).
"""

from litcompress.pipeline.compress import CompressionResult, compress, preview_shrink, prune_targets, weight_sparsity
from litcompress.pipeline.config import CompressionConfig, PruneConfig
from litcompress.report.compression import CompressionReport, Latency, StageMetrics

__all__ = [
    "CompressionConfig",
    "CompressionReport",
    "CompressionResult",
    "Latency",
    "PruneConfig",
    "StageMetrics",
    "compress",
    "preview_shrink",
    "prune_targets",
    "weight_sparsity",
]
