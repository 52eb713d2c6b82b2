"""Which input dimensions an exported model must leave free, and the helpers that check the exporters did.

Exporters fix every input size they are not told is dynamic. A model fed batches of several sequence lengths (text,
audio, time series) therefore exports to a file that rejects every length but the example's. The free dimensions
are the batch dimension of every input, those whose size differs between the batches the search sees, and those
the user declares (``PTQConfig(dynamic_dims=...)``), e.g. a sequence length that calibration data padded to one size.

A dimension is given per positional input: ``((0, 1),)`` says input 0 varies along dims 0 and 1.
"""

from __future__ import annotations

import inspect
import numbers
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

DynamicDims = tuple[tuple[int, ...], ...]


def normalize_dynamic_dims(value: object, owner: str = "PTQConfig") -> DynamicDims | None:
    """Validate a user's declaration: None, ``{input_index: dim | dims}`` or a sequence of dims per input.

    Returns one sorted tuple of dims per input (inputs not named get ``()``); raises ValueError/TypeError that name
    ``owner(dynamic_dims=...)`` otherwise.
    """
    if value is None:
        return None
    where = f"{owner}(dynamic_dims={value!r})"
    example = "e.g. dynamic_dims={0: (1,)} for dim 1 (a sequence length) of input 0"
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = list(enumerate(value))
    else:
        raise TypeError(f"{where}: expected a dict from input index to dims, {example}.")
    per_input: dict[int, tuple[int, ...]] = {}
    for index, dims in items:
        # (numpy's int64, read from an array, taken as Python's)
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or index < 0:
            raise ValueError(f"{where}: input index {index!r} is not an int >= 0; {example}.")
        if isinstance(dims, numbers.Integral) and not isinstance(dims, bool):
            dims = (dims,)
        if not isinstance(dims, Sequence) or isinstance(dims, (str, bytes)) or any(
                isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0 for d in dims):
            raise ValueError(f"{where}: the dims of input {index} must be ints >= 0 (dim 0 is the batch); "
                             f"{example}.")
        per_input[int(index)] = tuple(sorted({int(d) for d in dims}))
    if not per_input:
        return ()
    return tuple(per_input.get(i, ()) for i in range(max(per_input) + 1))


def resolve_dynamic_dims(batches: Sequence[tuple], declared: DynamicDims | None = None) -> DynamicDims:
    """The free dims of each input: the batch dim, the dims whose size differs between `batches` (tuples of
    positional inputs, the first being the example), and the `declared` ones (checked against the inputs)."""
    first = batches[0]
    declared = declared or ()
    if len(declared) > len(first):
        raise ValueError(f"dynamic_dims names input {len(declared) - 1}, but the model takes {len(first)} "
                         f"input(s) (indices 0..{len(first) - 1}).")
    resolved = []
    for i, tensor in enumerate(first):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            if i < len(declared) and declared[i]:
                raise ValueError(f"dynamic_dims names dims {list(declared[i])} of input {i}, which is not a tensor "
                                 "with dimensions.")
            resolved.append(())
            continue
        dims = {0} | set(declared[i] if i < len(declared) else ())
        beyond = [d for d in dims if d >= tensor.dim()]
        if beyond:
            raise ValueError(f"dynamic_dims names dim {beyond[0]} of input {i}, which has {tensor.dim()} dims "
                             f"(shape {tuple(tensor.shape)}).")
        for batch in batches[1:]:
            other = batch[i] if i < len(batch) else None
            if isinstance(other, torch.Tensor) and other.dim() == tensor.dim():
                dims |= {d for d in range(tensor.dim()) if other.shape[d] != tensor.shape[d]}
        resolved.append(tuple(sorted(dims)))
    return tuple(resolved)


def batch_only(inputs: Sequence[object]) -> DynamicDims:
    """The default: the batch dim of every tensor input with dimensions."""
    return tuple((0,) if isinstance(t, torch.Tensor) and t.dim() > 0 else () for t in inputs)


def dims_for(inputs: Sequence[object], dynamic_dims: DynamicDims | None) -> DynamicDims:
    """`dynamic_dims`, or the batch dims when None; one entry per input."""
    if dynamic_dims is None:
        return batch_only(inputs)
    return tuple(dynamic_dims[i] if i < len(dynamic_dims) else () for i in range(len(inputs)))


def export_dynamic_shapes(inputs: Sequence[torch.Tensor], dynamic_dims: DynamicDims | None) -> tuple:
    """``torch.export``'s ``dynamic_shapes`` for `inputs`: ``Dim.AUTO`` on each free dim (export specialises a dim
    the code fixes instead of failing; :func:`export_specialised_dims` tells which)."""
    from torch.export import Dim

    return tuple({d: Dim.AUTO for d in dims} or None for dims in dims_for(inputs, dynamic_dims))


def grouped_as_forward_takes(module: nn.Module, shapes: tuple) -> tuple:
    """`shapes` (one per positional input) grouped as ``torch.export`` matches them to `module`'s forward: those
    past a ``*args`` parameter in one tuple (flat, they were refused as a structure mismatch, on every backend that
    exports and in the fp32 file)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # (a forward without a readable signature: as given)
        return shapes
    positional = [p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                      inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      inspect.Parameter.VAR_POSITIONAL)]
    for index, parameter in enumerate(positional):
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return shapes[:index] + (tuple(shapes[index:]),)
    return shapes


def export_specialised_dims(program: torch.export.ExportedProgram, inputs: Sequence[torch.Tensor],
                            dynamic_dims: DynamicDims | None) -> list[tuple[int, int, int]]:
    """``(input, dim, size)`` for every dim that was asked to be free but that ``torch.export`` fixed (an RNN unrolls
    over its sequence length, for one; code that reshapes to a constant batch)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    placeholders = [node for node in program.graph.nodes if node.op == "placeholder"]
    user_inputs = [node for node, spec in zip(placeholders, program.graph_signature.input_specs)
                   if spec.kind.name == "USER_INPUT"]
    fixed = []
    for i, (node, dims) in enumerate(zip(user_inputs, dims_for(inputs, dynamic_dims))):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        for d in dims:
            if is_concrete_int(value.shape[d]):  # a plain int, or a SymInt that export specialised
                fixed.append((i, d, int(value.shape[d])))
    return fixed


def describe_fixed(fixed: Sequence[tuple[int, int, int]]) -> str:
    return ", ".join(f"dim {d} of input {i} (size {size})" for i, d, size in fixed)


def onnx_dynamic_axes(names: Sequence[str], inputs: Sequence[object], dynamic_dims: DynamicDims | None) -> dict:
    """The legacy ONNX exporter's ``dynamic_axes``: one named axis per free dim, each input its own batch axis (a
    name shared by two inputs tells ONNX Runtime their sizes are equal: a query batch and a key batch are not)."""
    axes = {}
    for name, dims in zip(names, dims_for(inputs, dynamic_dims)):
        if dims:
            axes[name] = {d: f"{name}_batch" if d == 0 else f"{name}_dim{d}" for d in dims}
    return axes


def shrunk_along_free_dims(inputs: Sequence[object], dynamic_dims: DynamicDims | None) -> tuple | None:
    """`inputs` cut by one along each free non-batch dim (kept >= 2 long), to check that an exported file really
    accepts other sizes there; None when there is no such dim."""
    cut, changed = [], False
    for tensor, dims in zip(inputs, dims_for(inputs, dynamic_dims)):
        if isinstance(tensor, torch.Tensor):
            for d in dims:
                if d > 0 and tensor.shape[d] > 2:
                    tensor, changed = tensor.narrow(d, 0, tensor.shape[d] - 1), True
        cut.append(tensor)
    return tuple(cut) if changed else None


def grown_along_batch(inputs: Sequence[object], dynamic_dims: DynamicDims | None, rows: int = 1) -> tuple | None:
    """`inputs` with their first row put `rows` times more before it along the batch dim (a batch that much larger,
    of inputs the model takes), to check that an exported file takes other batch sizes; None when no input has a
    batch dim.

    Before, not after: sorted rows stay sorted either way (an EmbeddingBag's offsets, which a first offset (0)
    appended made descend: torch read out of bounds, outputs changing from run to run; lengths sorted for packing),
    and every row moves, so a file that kept a row's position as a number (``x[int(x.shape[0]) - 1]``, the last
    row) reads another one (an appended copy of the last row would have been read as the last row)."""
    grown, changed = [], False
    for tensor, dims in zip(inputs, dims_for(inputs, dynamic_dims)):
        if isinstance(tensor, torch.Tensor) and 0 in dims and tensor.shape[0] > 0:
            tensor, changed = torch.cat([tensor[:1].expand(rows, *tensor.shape[1:]), tensor]), True
        grown.append(tensor)
    return tuple(grown) if changed else None


# ORT's message for an input whose size the file fixed, and torch.export's guard on one.
_FIXED_SIZE_ERRORS = (re.compile(r"Got invalid dimensions for input: (\S+) for the following indices\s+index: (\d+) "
                                 r"Got: (\d+) Expected: (\d+)"),
                      re.compile(r"Expected input at \*args\[(\d+)\]\.shape\[(\d+)\] to be equal to (\d+), but got "
                                 r"(\d+)"),
                      re.compile(r"Guard failed: (\w+)\.size\(\)\[(\d+)\] == (\d+)"))


def fixed_size_hint(error: str, config: str | None = "PTQConfig") -> str | None:
    """For an error raised because an exported model got another input size than it was exported with, what to
    do about it (`config`: the configuration whose ``dynamic_dims`` declare it; None, a file read back: any of those
    that write one); None for other errors."""
    for pattern in _FIXED_SIZE_ERRORS:
        match = pattern.search(error)
        if match:
            which, dim = match.group(1), int(match.group(2))
            if dim == 0:
                return None
            index = which if which.isdigit() else which[len("input_"):] if re.fullmatch(r"input_\d+", which) else None
            what = f"input {index}" if index is not None else f"input {which!r}"
            key = index if index is not None else "INPUT_INDEX"
            declared = f"dynamic_dims={{{key}: ({dim},)}}"
            where = (f"{config}({declared})" if config is not None else
                     f"{declared} of PTQConfig, QATConfig or CompressionConfig, where the file was written")
            return (f"the exported model fixed dim {dim} of {what} to the example's size, and a batch had another; "
                    f"if that size varies (a sequence length), declare it: {where}"
                    + (f" (CLI: --dynamic-dims {key}:{dim})" if config in ("PTQConfig", None) else ""))
    return None
