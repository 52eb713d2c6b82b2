"""Backends behind one interface, looked up by name in a registry.

Each backend module imports its framework lazily (inside methods), so importing
``litcompress.quantization`` never needs onnxruntime or torchao, and the removal of
deprecated ``torch.ao.quantization`` from torch breaks ``torch_ao.py`` only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from ..config import Recipe

if TYPE_CHECKING:
    from ..config import PTQConfig

Inputs = tuple  # positional model inputs, e.g. (tensor,)


class BackendUnavailableError(RuntimeError):
    """The backend's framework is not installed or does not work on this host."""


class ExportError(RuntimeError):
    """The model could not be exported/traced for a backend that needs a graph."""


class Backend:
    """Interface of a quantization backend.

    Subclasses set ``name`` and ``approaches`` and implement the methods below.
    """

    name: str = ""
    approaches: tuple[str, ...] = ()
    artifact_suffix: str = ".pt"

    def check_available(self) -> None:
        """Raise :class:`BackendUnavailableError` with an actionable message if unusable."""

    def configure(self, config: "PTQConfig") -> None:
        """Read the options of ``config`` that concern this backend (default: none)."""

    def recipes(self, approach: str) -> list[Recipe]:
        """Knob variants to try first (before falling back layers), most promising first."""
        raise NotImplementedError

    def quantize(self, model: nn.Module, recipe: Recipe, example_inputs: Inputs,
                 calibration: Sequence[Inputs]) -> nn.Module:
        """Return a new quantized module; ``model`` is a private copy the backend may consume."""
        raise NotImplementedError

    def save(self, quantized: nn.Module, path: str, metadata: str, example_inputs: Inputs) -> None:
        """Write one self-contained artefact holding ``metadata`` (JSON text)."""
        raise NotImplementedError


# name -> "module:Class"; modules are imported only when a backend is used.
BACKEND_REGISTRY: dict[str, str] = {
    "torch_ao": "litcompress.quantization.backends.torch_ao:TorchAOBackend",
    "onnxruntime": "litcompress.quantization.backends.onnxruntime:OnnxRuntimeBackend",
    "pt2e": "litcompress.quantization.backends.pt2e:PT2EBackend",
    "torchao": "litcompress.quantization.backends.torchao_weight_only:TorchAOWeightOnlyBackend",
}


def get_backend(name: str) -> Backend:
    """Instantiate the backend registered under ``name``."""
    if name not in BACKEND_REGISTRY:
        raise ValueError(f"Unknown backend {name!r}; use one of {tuple(BACKEND_REGISTRY)}.")
    module_name, class_name = BACKEND_REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()


# Modules whose forward reads their Linear layers' `.weight` as a plain tensor instead of calling them: the Transformer
# layers' fast-path checks, and MultiheadAttention, which passes out_proj.weight to F.multi_head_attention_forward. A
# quantized Linear there (torch.ao's packed weights, torchao's tensor subclass) fails at the first call.
_READS_WEIGHT_TENSORS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)


def _reads_weight_tensors(model: nn.Module) -> set[str]:
    """Names of the Linear layers inside modules that read their weight tensors directly. An encoder layer whose
    attention shrink narrowed (a HeadPrunedAttention) never takes its fast path: its Linears are called."""
    from litcompress.pruning.heads import HeadPrunedAttention

    return {f"{outer}.{inner}" if outer else inner
            for outer, module in model.named_modules() if isinstance(module, _READS_WEIGHT_TENSORS)
            and not (isinstance(module, nn.TransformerEncoderLayer) and isinstance(module.self_attn,
                                                                                HeadPrunedAttention))
            for inner, child in module.named_modules() if inner and isinstance(child, nn.Linear)}


def quantizable_layers(model: nn.Module, approach: str) -> list[str]:
    """Names of the layers a backend quantizes for ``approach`` (Linear, plus Conv2d when static)."""
    types: tuple[type, ...] = (nn.Linear, nn.Conv2d) if approach == "static" else (nn.Linear,)
    return [name for name, module in model.named_modules() if isinstance(module, types)]


def cpu_has_vnni() -> bool:
    """True when the CPU has AVX512-VNNI or AVX-VNNI (int8 dot products without saturation)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    except OSError:
        pass
    # Unknown host (not Linux): be safe, reduce_range costs a little accuracy only.
    return False


def to_inputs(batch: object) -> Inputs:
    """Normalise a batch to positional model inputs."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    raise TypeError(f"Expected a tensor or a tuple of tensors as model inputs, got {type(batch).__name__}.")
