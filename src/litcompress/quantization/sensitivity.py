"""Per-layer sensitivity: SQNR of the model output when only one layer is int8-quantized.

Backend-agnostic: weights and input activations of a single layer are fake-quantized with
torch's fake-quant ops (int8 weights, uint8 activations with min-max ranges from the
calibration data, or per batch for dynamic), and the final output is compared with fp32.
The lowest SQNR marks the layer that loses most when quantized.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .outputs import tensor_leaves


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better, inf when equal).

    Entries equal in both count as no noise, equal infinities (masked logits) and NaNs in both included; an
    infinite or NaN entry in one only is infinite noise (-inf dB). The signal is that of the finite entries."""
    reference, approximation = reference.float(), approximation.float()
    same = (reference == approximation) | (torch.isnan(reference) & torch.isnan(approximation))
    noise = torch.where(same, 0.0, reference - approximation).pow(2).mean()
    signal = torch.where(torch.isfinite(reference), reference, 0.0).pow(2).mean()
    if noise == 0:
        return float("inf")
    if not torch.isfinite(noise):
        return float("-inf")
    return float(10 * torch.log10(signal / noise))


def _fake_quant_weight(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    if per_channel:
        scale = weight.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-12) / 127
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -128, 127)
    scale = float(weight.detach().abs().max().clamp_min(1e-12)) / 127
    return torch.fake_quantize_per_tensor_affine(weight, scale, 0, -128, 127)


def _fake_quant_activation(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255, 1e-12)
    zero_point = int(round(-lo / scale))
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


def _output_vector(output: object) -> torch.Tensor:
    """Every tensor of a model output (tuples, lists and dicts of them) as one float vector."""
    leaves = tensor_leaves(output)
    if not leaves:
        raise TypeError(f"the model output ({type(output).__name__}) holds no tensor to compare")
    return torch.cat([leaf.detach().float().flatten() for leaf in leaves])


@torch.no_grad()
def layer_sensitivity(model: nn.Module, layers: Sequence[str], calibration: Sequence[tuple | torch.Tensor],
                      approach: str = "static", per_channel: bool = True,
                      table_scale_per_row: bool = True) -> dict[str, float]:
    """SQNR (dB) of the model output on ``calibration`` with only that layer quantized, per layer; inf for a layer
    the calibration data never reaches (a training-only head: quantizing it changes no output). An embedding table's
    weights get a scale per row (torch's int8 tables), or with ``table_scale_per_row=False`` one for the table
    (ONNX Runtime's)."""
    model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:  # a bare KeyError otherwise
        raise ValueError(f"layer_sensitivity(layers=...): {type(model).__name__} has no module named "
                         f"{', '.join(map(repr, unknown))}; its modules: {[n for n in modules if n][:20]}.")
    # a batch that is one tensor is one input (unpacked, its rows were taken for as many inputs)
    calibration = [(inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs) for inputs in calibration]
    reference = [_output_vector(model(*inputs)) for inputs in calibration]

    ranges: dict[str, list[float]] = {}
    if approach == "static":  # observed activation ranges, like a min-max observer
        def observe(name: str):
            def hook(module, args):
                x = args[0]
                lo, hi = ranges.setdefault(name, [float("inf"), float("-inf")])
                ranges[name] = [min(lo, float(x.min())), max(hi, float(x.max()))]
            return hook
        handles = [modules[name].register_forward_pre_hook(observe(name)) for name in layers]
        for inputs in calibration:
            model(*inputs)
        for handle in handles:
            handle.remove()

    scores: dict[str, float] = {}
    for name in layers:
        module = modules[name]
        if approach == "static" and name not in ranges:  # never called: no observed range, and nothing to change
            scores[name] = float("inf")
            continue
        # a Linear or conv has `weight`; an LSTM/GRU (or cell) one weight matrix per gate set and layer
        weights = [p for n, p in module.named_parameters(recurse=False) if n.startswith("weight") and p.dim() >= 2]
        originals = [w.data.clone() for w in weights]
        table = isinstance(module, (nn.Embedding, nn.EmbeddingBag))
        for weight, original in zip(weights, originals):
            weight.data = _fake_quant_weight(original, table_scale_per_row if table else per_channel)
        if table:  # weight-only: its input is indices
            quant_input = None
        elif approach == "static":
            lo, hi = ranges[name]
            quant_input = lambda m, args, lo=lo, hi=hi: (_fake_quant_activation(args[0], lo, hi), *args[1:])
        elif approach == "dynamic":
            quant_input = lambda m, args: args if not isinstance(args[0], torch.Tensor) else (  # a PackedSequence
                _fake_quant_activation(args[0], float(args[0].min()), float(args[0].max())), *args[1:])
        else:  # weight_only: activations stay float
            quant_input = None
        handle = module.register_forward_pre_hook(quant_input) if quant_input else None
        try:
            outputs = [_output_vector(model(*inputs)) for inputs in calibration]
        finally:
            for weight, original in zip(weights, originals):
                weight.data = original
            if handle:
                handle.remove()
        scores[name] = sqnr_db(torch.cat(reference), torch.cat(outputs))
    return scores
