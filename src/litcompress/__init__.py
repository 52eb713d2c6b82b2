"""litcompress: model compression for PyTorch and Lightning.

Importing the package does not import Lightning: the Lightning adapters (`ModelPruning`) load on first use.
"""

from __future__ import annotations

import logging as _logging
from typing import TYPE_CHECKING, Any

from litcompress.pruning import (
    ShrinkReport,
    ShrinkResult,
    load_pruned_state_dict,
    load_shrunk_state_dict,
    make_permanent_,
    permanent_state_dict,
    prune_,
    prune_model_,
    shrink,
    shrink_,
)
from litcompress.report.sparsity import SparsityReport, sparsity_report

if TYPE_CHECKING:
    from litcompress.callbacks.pruning import ModelPruning, load_module_from_checkpoint, load_pruned_checkpoint
    from litcompress.callbacks.distillation import KnowledgeDistillation
    from litcompress.callbacks.qat import QuantizationAwareTraining
    from litcompress.distillation import DistillationConfig, Distiller
    from litcompress.pipeline import CompressionConfig, CompressionReport, CompressionResult, PruneConfig, compress
    from litcompress.pipeline.lightning import compress_lightning
    from litcompress.quantization import (
        AccuracyCriterion,
        PTQConfig,
        QuantizationGoalWarning,
        QuantizationResult,
        load_quantized,
        quantize,
        save_quantized,
    )

__version__ = "0.1.0"

# Like Lightning: INFO lines (the pruning callback's `verbose` logs) are shown unless the application configured
# logging itself.
_logger = _logging.getLogger(__name__)
_logger.setLevel(_logging.INFO)
if not _logging.getLogger().hasHandlers():
    _logger.addHandler(_logging.StreamHandler())
    _logger.propagate = False

_LAZY = {
    "ModelPruning": "litcompress.callbacks.pruning",
    "QuantizationAwareTraining": "litcompress.callbacks.qat",
    "KnowledgeDistillation": "litcompress.callbacks.distillation",
    "DistillationConfig": "litcompress.distillation",
    "Distiller": "litcompress.distillation",
    "load_pruned_checkpoint": "litcompress.callbacks.pruning",
    "load_module_from_checkpoint": "litcompress.callbacks.pruning",
    "compress_lightning": "litcompress.pipeline.lightning",
    **dict.fromkeys(
        ("CompressionConfig", "CompressionReport", "CompressionResult", "PruneConfig", "compress"),
        "litcompress.pipeline",
    ),
    **dict.fromkeys(
        ("AccuracyCriterion", "PTQConfig", "QuantizationGoalWarning", "QuantizationResult", "load_quantized",
         "quantize", "save_quantized"),
        "litcompress.quantization",
    ),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AccuracyCriterion",
    "CompressionConfig",
    "CompressionReport",
    "CompressionResult",
    "DistillationConfig",
    "Distiller",
    "KnowledgeDistillation",
    "ModelPruning",
    "PTQConfig",
    "PruneConfig",
    "QuantizationGoalWarning",
    "QuantizationAwareTraining",
    "QuantizationResult",
    "ShrinkReport",
    "ShrinkResult",
    "SparsityReport",
    "compress",
    "compress_lightning",
    "load_module_from_checkpoint",
    "load_pruned_checkpoint",
    "load_pruned_state_dict",
    "load_shrunk_state_dict",
    "load_quantized",
    "make_permanent_",
    "permanent_state_dict",
    "prune_",
    "prune_model_",
    "quantize",
    "save_quantized",
    "shrink",
    "shrink_",
    "sparsity_report",
]
