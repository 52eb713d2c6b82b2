"""The structure of a model's output (a tensor, or tuples, lists and dicts of them), kept across file formats.

An ONNX graph returns a flat list of tensors: the legacy exporter flattens nested tuples, lists and dict values in
order. A model returning ``{"logits": ..., "features": ...}`` (a multi-task head, a Hugging Face style output)
must come back from its ONNX file as that dict, or the user's ``eval_fn`` fails on every ONNX Runtime candidate.
The structure is written as JSON into the file's metadata, so that a file loaded in a fresh process rebuilds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

Structure = Any  # "tensor" | {"tuple": [...]} | {"list": [...]} | {"dict": [[key, structure], ...]}
TENSOR = "tensor"


def output_structure(output: object, where: str = "output") -> Structure:
    """The JSON-able structure of `output`; raises `TypeError` naming the first leaf that is not a tensor.

    Named tuples are recorded as tuples; mappings (``dict`` and its subclasses) as dicts with their keys in order.
    """
    if isinstance(output, torch.Tensor):
        return TENSOR
    if isinstance(output, (tuple, list)):
        return {type(output).__name__ if type(output) in (tuple, list) else "tuple":
                [output_structure(item, f"{where}[{i}]") for i, item in enumerate(output)]}
    if isinstance(output, Mapping):
        for key in output:
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} is a dict with a key of type {type(key).__name__}: only str and int keys "
                                "can be written into a model file")
        return {"dict": [[key, output_structure(value, f"{where}[{key!r}]")] for key, value in output.items()]}
    raise TypeError(f"{where} is a {type(output).__name__}, not a tensor: a model file returns tensors only")


def tensor_leaves(output: object) -> list[torch.Tensor]:
    """The tensors of `output` in the order the ONNX exporter flattens them (non-tensor leaves skipped)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [leaf for item in output for leaf in tensor_leaves(item)]
    if isinstance(output, Mapping):
        return [leaf for value in output.values() for leaf in tensor_leaves(value)]
    return []


def rebuild(structure: Structure, leaves: Sequence[torch.Tensor]) -> object:
    """The output of `structure` filled with `leaves`, in order (inverse of :func:`tensor_leaves`)."""
    remaining = iter(leaves)

    def build(node: Structure) -> object:
        if node == TENSOR:
            return next(remaining)
        (kind, items), = node.items()
        if kind == "dict":
            return {key: build(value) for key, value in items}
        built = [build(item) for item in items]
        return built if kind == "list" else tuple(built)

    result = build(structure)
    if next(remaining, None) is not None:
        raise ValueError(f"the file returns more outputs than its recorded structure holds ({structure})")
    return result


__all__ = ["Structure", "TENSOR", "output_structure", "rebuild", "tensor_leaves"]
