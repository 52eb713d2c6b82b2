"""How many bytes a model takes: serialized, and after general-purpose compression."""

from __future__ import annotations

import io
import warnings
import zlib

import torch
from torch import nn


def serialized_weights(model: nn.Module) -> bytes:
    """What a model's weights take when saved: the ONNX bytes of an ONNX Runtime model, the ``torch.jit.save`` bytes
    of a TorchScript one (its int8 layers' packed weights are in no state dict: an int8 file of 81 KB was sized
    1.5 KB), else ``torch.save`` of its state dict (zeros from pruning still take their 4 bytes), of the weights it
    computes with where torch's pruning masks are live (not ``<name>_orig`` and ``<name>_mask``: twice as much)."""
    from litcompress.pruning.engine import permanent_state_dict, pruned_targets  # (pruning imports the report)

    model_bytes = getattr(model, "model_bytes", None)
    if isinstance(model_bytes, bytes):
        return model_bytes
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(model, torch.jit.ScriptModule):
            torch.jit.save(model, buffer)
        else:
            torch.save(permanent_state_dict(model) if pruned_targets(model) else model.state_dict(), buffer)
    return buffer.getvalue()


def model_size_bytes(model: nn.Module) -> int:
    """Serialized size of a model's weights (ONNX bytes for ORT models; a TorchScript model's file, its code
    included)."""
    return len(serialized_weights(model))


def compressed_size_bytes(data: bytes) -> int:
    """Size after zlib (gzip's deflate, level 6): what unstructured sparsity saves in a compressed download."""
    return len(zlib.compress(data, 6))
