"""Structural checks on quantized models, per backend (no mocks: they read the real artefacts)."""

from __future__ import annotations

import torch
from torch import nn


def quantized_layers(model: nn.Module, backend: str, layers: list[str]) -> dict[str, bool]:
    """For each torch layer name: True when the backend's model runs that layer with int8 weights."""
    if backend == "onnxruntime":
        import onnx

        proto = onnx.load_from_string(model.model_bytes)
        int8 = {init.name for init in proto.graph.initializer  # (an embedding table's Gather: uint8)
                if init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
        # ORT names a quantized weight "<layer>.weight_quantized"; a dynamic MatMul may keep a transposed copy.
        return {name: any(i.startswith(f"{name}.weight") for i in int8) for name in layers}
    if backend == "torch_ao":
        modules = dict(model.named_modules())
        result = {}
        for name in layers:
            module = modules[name]
            if isinstance(module, nn.Sequential):  # an fp32 layer fused with its ReLU (LinearReLU, ConvReLU2d)
                module = module[0]
            weight = module.weight() if callable(getattr(module, "weight", None)) else module.weight
            result[name] = weight.dtype in (torch.qint8, torch.quint8)  # (an embedding table: quint8)
        return result
    if backend == "torchao":  # weight-only: the Linear weight becomes a torchao int8 tensor subclass
        modules = dict(model.named_modules())
        return {name: type(modules[name].weight) is not torch.nn.Parameter
                and modules[name].weight.__class__.__name__ != "Tensor" for name in layers}
    if backend == "pt2e":
        module = getattr(model, "program", model)  # the graph inside ExportedInference
        float_weights = {n for n, _ in list(module.named_parameters()) + list(module.named_buffers())}
        # convert_pt2e folds quantized weights into int8 constants; fp32 layers keep "<layer>.weight".
        return {name: f"{name}.weight" not in float_weights for name in layers}
    raise ValueError(backend)


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def backend_missing(name: str) -> str | None:
    """Why a backend cannot run here (optional package missing), or None."""
    from litcompress.quantization import BackendUnavailableError, get_backend

    try:
        get_backend(name).check_available()
    except (BackendUnavailableError, ImportError) as exc:
        return str(exc)
    return None
