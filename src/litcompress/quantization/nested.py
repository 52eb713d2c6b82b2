"""Models whose inputs are containers (``forward(self, batch)`` reading ``batch["x"]``), for the int8 backends.

torch.export, the ONNX exporter and ONNX Runtime take tensors as positional inputs. `FlatInputs` gives such a model
that signature: it takes the tensors found in the example inputs (flattened as ``torch.utils._pytree`` does) and
rebuilds the containers around them (dicts with their keys sorted); non-tensor leaves (flags, sizes) are held
as constants. `NestedInputs` is the other way round: it lets a model built from a `FlatInputs` (an int8
candidate) be called with the user's containers, as `quantize`'s result is. A saved file takes the flattened
tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

Inputs = tuple[Any, ...]


def is_nested(inputs: Sequence[object]) -> bool:
    """Whether any positional input is something other than a tensor: a container (a dict, list or tuple), whose
    tensors exporters take one by one, or a number or None (``forward(x, temperature)``), which they cannot take at
    all and which the quantized model holds as a constant."""
    return any(not isinstance(x, torch.Tensor) for x in inputs)


def _canonical(value: Any) -> Any:
    """`value` with every dict's entries ordered by key: a batch whose dict was built in another order is the same
    input (the model reads it by key), and flattens to the same tensors in the same places."""
    if isinstance(value, Mapping):
        return {key: _canonical(value[key]) for key in sorted(value, key=repr)}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_canonical(item) for item in value))
    if type(value) in (list, tuple):  # (other subclasses are leaves to pytree)
        return type(value)(_canonical(item) for item in value)
    return value


def batch_size(inputs: Sequence[object]) -> int | None:
    """The size of dim 0 of the first tensor with dimensions among `inputs` (in containers too), else None."""
    return next((int(leaf.shape[0]) for leaf in pytree.tree_leaves(_canonical(tuple(inputs)))
                 if isinstance(leaf, torch.Tensor) and leaf.dim()), None)


@dataclass(frozen=True)
class InputStructure:
    """Where the tensors sit among the flattened leaves of a model's positional inputs, and the other leaves."""

    spec: pytree.TreeSpec
    tensor_positions: tuple[int, ...]
    constants: tuple[tuple[int, Any], ...]  # (leaf position, value) of each non-tensor leaf

    @classmethod
    def of(cls, inputs: Inputs) -> InputStructure:
        leaves, spec = pytree.tree_flatten(_canonical(tuple(inputs)))
        tensors = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
        constants = tuple((i, leaf) for i, leaf in enumerate(leaves) if not isinstance(leaf, torch.Tensor))
        return cls(spec, tensors, constants)

    def flatten(self, inputs: Inputs, what: str = "the inputs") -> Inputs:
        """The tensors of `inputs`, which must be structured as the example inputs were (dicts in any order)."""
        leaves, spec = pytree.tree_flatten(_canonical(tuple(inputs)))
        if spec != self.spec:
            raise ValueError(f"{what} are not structured as the example inputs were (the containers, their keys "
                             f"and lengths must match): expected {self.spec}, got {spec}.")
        for position, value in self.constants:
            if not _same(leaves[position], value):
                raise ValueError(f"{what}: the non-tensor entry {value!r} of the example inputs is part of the "
                                 f"quantized model (a constant there), but this call gives {leaves[position]!r}.")
        return tuple(leaves[i] for i in self.tensor_positions)

    def __reduce__(self) -> tuple:
        # pickled as the containers with each leaf's position in its place: torch deprecates pickling a TreeSpec
        skeleton = pytree.tree_unflatten(list(range(self.spec.num_leaves)), self.spec)
        return _structure_of_skeleton, (skeleton, self.tensor_positions, self.constants)

    def unflatten(self, tensors: Inputs) -> Inputs:
        leaves: list[Any] = [None] * (len(self.tensor_positions) + len(self.constants))
        for position, tensor in zip(self.tensor_positions, tensors):
            leaves[position] = tensor
        for position, value in self.constants:
            leaves[position] = value
        return pytree.tree_unflatten(leaves, self.spec)


def _structure_of_skeleton(skeleton: Inputs, tensor_positions: tuple[int, ...],
                           constants: tuple[tuple[int, Any], ...]) -> InputStructure:
    return InputStructure(pytree.tree_structure(skeleton), tensor_positions, constants)


def _same(a: object, b: object) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a value whose == is not a bool (an array): compare identity
        return a is b


class FlatInputs(nn.Module):
    """`model` called with the tensors of its nested inputs, positionally (what exporters and int8 backends take).

    Use :func:`flat_inputs` to build one: its ``forward`` names each tensor (``input_0``, ``input_1``, ...), as
    torch.fx and torch.export need (they give ``*args`` one proxy, or refuse it)."""

    def __init__(self, model: nn.Module, structure: InputStructure) -> None:
        super().__init__()
        self.model = model
        self.structure = structure

    def call(self, tensors: tuple[torch.Tensor, ...]) -> Any:
        return self.model(*self.structure.unflatten(tensors))

    def __reduce__(self) -> tuple:
        # its class is built at run time (one per tensor count), so pickle rebuilds it rather than import it
        return _rebuilt, (self.model, self.structure, self.training)


def _rebuilt(model: nn.Module, structure: InputStructure, training: bool) -> FlatInputs:
    wrapper = flat_inputs(model, structure)
    wrapper.training = training  # the wrapper's own flag: `model` was pickled with its modes
    return wrapper


_POSITIONAL_CLASSES: dict[tuple[type, int], type] = {}


def positional_class(base: type[nn.Module], count: int) -> type[nn.Module]:
    """`base` (a module whose ``call(inputs)`` takes a tuple) with a ``forward`` of `count` named positional
    parameters, ``input_0`` ... : torch.fx gives ``*args`` one proxy and torch.export matches dynamic shapes to the
    signature, so a wrapper handing on any inputs needs one class per count (as collections.namedtuple builds its
    own)."""
    if (base, count) not in _POSITIONAL_CLASSES:
        names = ", ".join(f"input_{i}" for i in range(count))
        namespace: dict[str, Any] = {}
        parameters, packed = (f", {names}", f"({names},)") if names else ("", "()")
        exec(f"def forward(self{parameters}):\n    return self.call({packed})\n", namespace)
        _POSITIONAL_CLASSES[base, count] = type(f"{base.__name__}{count}", (base,),
                                                {"forward": namespace["forward"], "__module__": base.__module__})
    return _POSITIONAL_CLASSES[base, count]


def flat_inputs(model: nn.Module, structure: InputStructure) -> FlatInputs:
    """A `FlatInputs` for `model` whose forward takes exactly the structure's tensors."""
    count = len(structure.tensor_positions)
    if count == 0:
        raise ValueError("the model's inputs hold no tensor: there is nothing for an int8 model to take.")
    return positional_class(FlatInputs, count)(model, structure)


class InputAdapter(nn.Module):
    """A wrapper that adapts the user's inputs to `model` (an int8 candidate, a file read back): sized as `model`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def model_bytes(self) -> bytes | None:
        """The ONNX bytes of a wrapped ONNX Runtime model (what its size is measured by), else None."""
        return getattr(self.model, "model_bytes", None)


class NestedInputs(InputAdapter):
    """`model` (taking flat tensors, e.g. an int8 model built from a `FlatInputs`) called with nested inputs
    structured as the example inputs were."""

    def __init__(self, model: nn.Module, structure: InputStructure) -> None:
        super().__init__(model)
        self.structure = structure

    def forward(self, *inputs: Any) -> Any:
        return self.model(*self.structure.flatten(inputs, "the model's inputs"))


__all__ = ["FlatInputs", "InputAdapter", "InputStructure", "NestedInputs", "batch_size", "flat_inputs", "is_nested",
           "positional_class"]
