"""The structure of a model's output (a tensor, or tuples, lists and dicts of them), kept across file formats.

An ONNX graph returns a flat list of tensors: the legacy exporter flattens nested tuples, lists and dict values in
order. A model returning ``{"logits": ..., "features": ...}`` (a multi-task head, a Hugging Face style output)
must come back from its ONNX file as that dict, or the user's ``eval_fn`` fails on every ONNX Runtime candidate.
The structure is written as JSON into the file's metadata, so that a file loaded in a fresh process rebuilds it.
A None among the outputs (``return logits, None``) or a dataclass output, which the exporters cannot return, is
exported through `TensorLeaves` (the tensors, flat) and rebuilt from the structure (`RebuiltOutputs`).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

# "tensor" | "none" | {"tuple" or "list": [structure, ...]} | {"dict" or "dataclass": [[key, structure], ...]}, each
# container with an optional "class": "module:qualname" (a named tuple, a Mapping subclass; always for a dataclass)
Structure = Any
TENSOR = "tensor"
NONE = "none"  # a None among the outputs (``return logits, None``): no graph output, put back when rebuilt


def output_structure(output: object, where: str = "output") -> Structure:
    """The JSON-able structure of `output`; raises `TypeError` naming the first leaf that is neither a tensor nor
    None.

    Mappings (``dict`` and its subclasses) are recorded as dicts with their keys in order; a named tuple or a
    mapping of another class (a Hugging Face ``ModelOutput``) also with its class, to be rebuilt as one.
    """
    if isinstance(output, torch.Tensor):
        return TENSOR
    if output is None:
        return NONE
    if isinstance(output, (tuple, list)):
        node = {"list" if isinstance(output, list) else "tuple":
                [output_structure(item, f"{where}[{i}]") for i, item in enumerate(output)]}
    elif isinstance(output, Mapping):
        for key in output:
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} is a dict with a key of type {type(key).__name__}: only str and int keys "
                                "can be written into a model file")
        node = {"dict": [[key, output_structure(value, f"{where}[{key!r}]")] for key, value in output.items()]}
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):  # a model output written as a dataclass
        node = {"dataclass": [[f.name, output_structure(getattr(output, f.name), f"{where}.{f.name}")]
                              for f in dataclasses.fields(output)]}
    else:
        raise TypeError(f"{where} is a {type(output).__name__}, not a tensor: a model file returns tensors only")
    if type(output) not in (tuple, list, dict):  # a named tuple, a Hugging Face ModelOutput: rebuilt when importable
        node["class"] = f"{type(output).__module__}:{type(output).__qualname__}"
        if isinstance(output, tuple) and isinstance(getattr(type(output), "_fields", None), tuple):
            node["fields"] = list(type(output)._fields)  # a named tuple's names, checked when rebuilt
    return node


def tensor_leaves(output: object) -> list[torch.Tensor]:
    """The tensors of `output` in the order the ONNX exporter flattens them (non-tensor leaves skipped)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [leaf for item in output for leaf in tensor_leaves(item)]
    if isinstance(output, Mapping):
        return [leaf for value in output.values() for leaf in tensor_leaves(value)]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [leaf for f in dataclasses.fields(output) for leaf in tensor_leaves(getattr(output, f.name))]
    return []


def traces_as_it_is(structure: Structure, torchscript: bool = False) -> bool:
    """Whether an output of `structure` is made of plain tensors, tuples, lists and dicts with str keys only, which
    TorchScript and the ONNX exporter return as they are; a None, a dataclass, a named tuple, a Mapping subclass (a
    Hugging Face ``ModelOutput``) or a dict with an int key needs `TensorLeaves` and `rebuild` (traced, they came back
    as plain tuples and dicts, TorchScript takes str keys only, the ONNX exporter makes an int key an output, and
    ``torch.export`` cannot save a dataclass), as does an empty container. With `torchscript`, also a dict or a list
    whose items are not all tensors: TorchScript types a dict's values and a list's items by one type."""
    if structure == TENSOR:
        return True
    if structure == NONE or "class" in structure:
        return False
    kind = next(iter(structure))
    if kind == "dataclass" or not structure[kind]:  # (an empty container: the exporters refuse it, or fail)
        return False
    if kind == "dict" and not all(isinstance(key, str) for key, _ in structure[kind]):
        return False
    children = [child for _, child in structure[kind]] if kind == "dict" else structure[kind]
    if torchscript and kind in ("dict", "list") and any(child != TENSOR for child in children):
        return False  # TorchScript types a dict's values and a list's items by one type
    return all(traces_as_it_is(child, torchscript) for child in children)


def untraceable_structure(model: nn.Module, example_inputs: Sequence[object],
                          torchscript: bool = False) -> Structure | None:
    """The structure of `model`'s output on `example_inputs` (run in eval mode) when an exporter cannot return it as
    it is (a None, a dataclass: export ``TensorLeaves(model)`` and rebuild; see :func:`traces_as_it_is`), else None
    (also when a leaf is of a kind no file returns: the export says so)."""
    from litcompress.pruning.shrink import eval_outputs

    try:
        structure = output_structure(eval_outputs(model, tuple(example_inputs)))
    except TypeError:
        return None
    return None if traces_as_it_is(structure, torchscript) else structure


class TensorLeaves(nn.Module):
    """`model` returning the tensors of its output as a flat tuple (:func:`tensor_leaves`' order), for exporters
    that cannot return a None or a dataclass; :func:`rebuild` with the output's structure gives the output back.
    Built by :func:`tensor_leaves_of`, whose forward names each input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def call(self, inputs: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(tensor_leaves(self.model(*inputs)))


def tensor_leaves_of(model: nn.Module, inputs: Sequence[object]) -> TensorLeaves:
    """A `TensorLeaves` of `model` whose forward takes as many positional inputs as `inputs` holds."""
    from .nested import positional_class

    return positional_class(TensorLeaves, len(inputs))(model)


class RebuiltOutputs(nn.Module):
    """A model (a loaded file) returning flat tensors, called to return the output `structure` they came from."""

    def __init__(self, model: nn.Module, structure: Structure) -> None:
        super().__init__()
        self.model = model
        self.structure = structure

    def forward(self, *inputs: Any) -> object:
        outputs = self.model(*inputs)
        return rebuild(self.structure, [outputs] if isinstance(outputs, torch.Tensor) else list(outputs))


def rebuild(structure: Structure, leaves: Sequence[torch.Tensor]) -> object:
    """The output of `structure` filled with `leaves`, in order (inverse of :func:`tensor_leaves`)."""
    remaining = iter(leaves)

    def build(node: Structure) -> object:
        if node == TENSOR:
            return next(remaining)
        if node == NONE:
            return None
        kind = next(k for k in node if k not in ("class", "fields"))
        if kind in ("dict", "dataclass"):
            built: Any = {key: build(value) for key, value in node[kind]}
        else:
            built = [build(item) for item in node[kind]]
            built = built if kind == "list" else tuple(built)
        return _as_class(built, node["class"], node.get("fields")) if "class" in node else built

    result = build(structure)
    if next(remaining, None) is not None:
        raise ValueError(f"the file returns more outputs than its recorded structure holds ({structure})")
    return result


def _as_class(built: Any, path: str, fields: Sequence[str] | None = None) -> Any:
    """`built` (a dict, list or tuple) as an instance of the class at `path` (``module:qualname``), as the model
    returned it; `built` itself when the class cannot be imported or built from it (a file loaded elsewhere). A named
    tuple whose recorded `fields` the class there does not have (another script's class of that name, which took the
    tensors by position under other names) or cannot be imported is rebuilt as a named tuple of those fields."""
    module_name, _, qualname = path.partition(":")
    try:
        cls: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if fields is not None and tuple(getattr(cls, "_fields", ())) != tuple(fields):
            raise TypeError("another class of that name")
        if isinstance(built, dict):
            return cls(**built) if all(isinstance(k, str) for k in built) else cls(built)
        return cls(*built) if hasattr(cls, "_fields") else cls(built)  # a named tuple takes its fields
    except Exception:  # noqa: BLE001 - any failure leaves the plain structure, which holds the same tensors
        if fields is not None and isinstance(built, tuple) and len(fields) == len(built):
            name = qualname.rpartition(".")[2]
            return collections.namedtuple(name if name.isidentifier() else "Output", fields, rename=True)(*built)
        return built


__all__ = ["NONE", "RebuiltOutputs", "Structure", "TENSOR", "TensorLeaves", "output_structure", "rebuild",
           "tensor_leaves", "tensor_leaves_of", "traces_as_it_is", "untraceable_structure"]
