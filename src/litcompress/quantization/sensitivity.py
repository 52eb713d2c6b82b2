"""Per-layer sensitivity: SQNR of the model output when only one layer is int8-quantized.

Backend-agnostic: weights and input activations of a single layer are fake-quantized with
torch's fake-quant ops (int8 weights, uint8 activations with min-max ranges from the
calibration data, or per batch for dynamic), and the final output is compared with fp32.
The lowest SQNR marks the layer that loses most when quantized.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from torch import nn

from litcompress._inputs import copied

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


def _first_input_name(module: nn.Module) -> str | None:
    """The name of the first parameter of `module`'s forward (``input`` for torch's layers)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    return parameters[0].name if parameters and parameters[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) else None


def _first_input(args: tuple, kwargs: dict[str, Any], name: str | None) -> Any:
    """A layer call's input: its first positional argument, or the keyword naming it (``fc(input=x)``)."""
    if args:
        return args[0]
    return kwargs.get(name) if name is not None else None


def _replacing_first_input(fn: Callable[[Any], Any], name: str | None) -> Callable:
    """A forward pre-hook (``with_kwargs=True``) that replaces the layer's input by ``fn(input)``."""
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        if name is not None and name in kwargs:
            return args, {**kwargs, name: fn(kwargs[name])}
        return args, kwargs
    return hook


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
    from litcompress.pruning.engine import deepcopy_model, make_permanent_
    from litcompress.pruning.parametrizations import fold_parametrizations_

    # the weights the layers compute with, as plain parameters: a pruned layer's (its mask applied) and a
    # parametrized one's (weight_norm's g and v are not `weight`: only its input was quantized, scored inf)
    model = deepcopy_model(model).eval()
    make_permanent_(model, owner="layer_sensitivity")
    fold_parametrizations_(model)
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:  # a bare KeyError otherwise
        raise ValueError(f"layer_sensitivity(layers=...): {type(model).__name__} has no module named "
                         f"{', '.join(map(repr, unknown))}; its modules: {[n for n in modules if n][:20]}.")
    # a batch that is one tensor is one input (unpacked, its rows were taken for as many inputs)
    calibration = [(inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs) for inputs in calibration]
    reference = [_output_vector(model(*copied(inputs))) for inputs in calibration]

    ranges: dict[str, list[float]] = {}
    if approach == "static":  # observed activation ranges, like a min-max observer
        def observe(name: str):
            first = _first_input_name(modules[name])

            def hook(module, args, kwargs):
                x = _first_input(args, kwargs, first)
                lo, hi = ranges.setdefault(name, [float("inf"), float("-inf")])
                ranges[name] = [min(lo, float(x.min())), max(hi, float(x.max()))]
            return hook
        handles = [modules[name].register_forward_pre_hook(observe(name), with_kwargs=True) for name in layers]
        for inputs in calibration:
            model(*copied(inputs))
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
        first = _first_input_name(module)
        if table:  # weight-only: its input is indices
            quant_input = None
        elif approach == "static":
            lo, hi = ranges[name]
            quant_input = _replacing_first_input(lambda x, lo=lo, hi=hi: _fake_quant_activation(x, lo, hi), first)
        elif approach == "dynamic":
            quant_input = _replacing_first_input(lambda x: x if not isinstance(x, torch.Tensor) else (  # packed
                _fake_quant_activation(x, float(x.min()), float(x.max()))), first)
        else:  # weight_only: activations stay float
            quant_input = None
        handle = module.register_forward_pre_hook(quant_input, with_kwargs=True) if quant_input else None
        try:
            outputs = [_output_vector(model(*copied(inputs))) for inputs in calibration]
        finally:
            for weight, original in zip(weights, originals):
                weight.data = original
            if handle:
                handle.remove()
        scores[name] = sqnr_db(torch.cat(reference), torch.cat(outputs))
    return scores
