"""Lightning callbacks: thin adapters over the framework-free engines."""

from litcompress.callbacks.distillation import KnowledgeDistillation
from litcompress.callbacks.heads import HeadPruning
from litcompress.callbacks.lottery import find_lottery_ticket
from litcompress.callbacks.pruning import ModelPruning, load_module_from_checkpoint, load_pruned_checkpoint
from litcompress.callbacks.qat import QuantizationAwareTraining
from litcompress.callbacks.units import UnitPruning
from litcompress.pipeline.lightning import CompressOnFitEnd
from litcompress.quantization.lightning import QuantizeOnFitEnd

__all__ = ["CompressOnFitEnd", "HeadPruning", "KnowledgeDistillation", "ModelPruning", "QuantizationAwareTraining",
           "QuantizeOnFitEnd", "UnitPruning", "find_lottery_ticket", "load_module_from_checkpoint",
           "load_pruned_checkpoint"]
