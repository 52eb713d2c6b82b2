"""litcompress: model compression for PyTorch and Lightning."""

import logging as _logging

from litcompress.callbacks.pruning import ModelPruning
from litcompress.pruning import load_pruned_state_dict, make_permanent_, permanent_state_dict, prune_, prune_model_
from litcompress.report.sparsity import SparsityReport, sparsity_report

__version__ = "0.1.0"

# Like Lightning: INFO lines (the pruning callback's `verbose` logs) are shown unless the application configured
# logging itself.
_logger = _logging.getLogger(__name__)
_logger.setLevel(_logging.INFO)
if not _logging.getLogger().hasHandlers():
    _logger.addHandler(_logging.StreamHandler())
    _logger.propagate = False

__all__ = [
    "ModelPruning",
    "SparsityReport",
    "load_pruned_state_dict",
    "make_permanent_",
    "permanent_state_dict",
    "prune_",
    "prune_model_",
    "sparsity_report",
]
