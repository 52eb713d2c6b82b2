"""Post-training quantization with accuracy-aware, speed-aware tuning across backends, and quantization-aware
training.

Entry points: :func:`quantize` and :func:`prepare_qat` (framework-free); :mod:`litcompress.quantization.lightning`
and :class:`litcompress.callbacks.QuantizationAwareTraining` adapt them to Lightning (imported on demand, so this
package does not import lightning).
"""

from .artifact import load_quantized, save_quantized
from .backends import BACKEND_REGISTRY, BackendUnavailableError, ExportError, get_backend
from .config import AccuracyCriterion, PTQConfig, Recipe
from .latency import measure_latencies
from .qat import QATConfig, QATModel, QATResult, prepare_qat
from .sensitivity import layer_sensitivity, sqnr_db
from .tuner import QuantizationGoalWarning, QuantizationResult, Trial, quantize

__all__ = [
    "AccuracyCriterion",
    "BACKEND_REGISTRY",
    "BackendUnavailableError",
    "ExportError",
    "PTQConfig",
    "QATConfig",
    "QATModel",
    "QATResult",
    "QuantizationGoalWarning",
    "QuantizationResult",
    "Recipe",
    "Trial",
    "get_backend",
    "layer_sensitivity",
    "load_quantized",
    "measure_latencies",
    "prepare_qat",
    "quantize",
    "save_quantized",
    "sqnr_db",
]
