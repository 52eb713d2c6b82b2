"""TracerWarnings that say something about a traced file, told from those that do not.

Tracing (``torch.jit.trace``, the legacy ONNX exporter) warns on every Python condition it evaluates on a tensor.
Most such conditions in torch's own modules only guard an error (``if hx.size() != expected: raise ...`` in the
RNNs, the shape checks of nn.MultiheadAttention): the trace takes the one path that does not fail, and the file is
right for other inputs. A condition that chooses what to compute is kept as it was taken, which matters.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import warnings
from collections.abc import Iterator

import torch
from torch import fx, nn


def guards_an_error(caught: warnings.WarningMessage) -> bool:
    """Whether a warning comes from a condition that only guards an error (``if <check>: raise ...`` or an
    ``assert``). Conditions that choose what to compute (data-dependent branches) are not."""
    line = linecache.getline(caught.filename, caught.lineno).strip()
    if line.startswith("assert "):
        return True
    if not line.startswith("if "):
        return False
    for following in range(caught.lineno + 1, caught.lineno + 4):
        text = linecache.getline(caught.filename, following).strip()
        if text:
            return text.startswith("raise ")
    return False


_NUMBER_TYPES = {"float", "int", "number", "SymInt", "Optional[float]", "Optional[int]", "Optional[number]"}


def numbers_read_from_constants(model: nn.Module) -> bool:
    """Whether `model`'s FX graphs call ops with number arguments (a float scale, an int zero point) and take every
    such tensor-held number from an attribute, a constant, never from data: torch.ao's converted residual adds,
    ``quantized.add_relu(x, y, scale, zero_point)``. Tracing then warns that it converts a tensor to a Python number,
    which is right for every input."""
    found = False
    for module in model.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, fx.Graph):
            continue
        for node in graph.nodes:
            target = node.target
            overload = getattr(target, "default", None) if isinstance(target, torch._ops.OpOverloadPacket) else target
            schema = getattr(overload, "_schema", None)
            if node.op != "call_function" or schema is None:
                continue
            for argument, value in zip(schema.arguments, node.args):
                if str(argument.type) in _NUMBER_TYPES and isinstance(value, fx.Node):
                    if value.op != "get_attr":
                        return False
                    found = True
    return found


def _converts_a_constant(caught: warnings.WarningMessage) -> bool:
    """A warning raised by an op call (not by model code) for converting a tensor argument to a Python number."""
    return str(caught.message).startswith("Converting a tensor to a Python") and \
        caught.filename.replace("\\", "/").endswith("torch/_ops.py")


@contextlib.contextmanager
def tracer_warnings_that_matter(numbers_are_constants: bool = False) -> Iterator[None]:
    """Within the block, other warnings are ignored and TracerWarnings recorded; after it, those that do not guard an
    error are warned again, where they were raised (a caller recording warnings sees them as before). With
    `numbers_are_constants` (see :func:`numbers_read_from_constants`), neither are an op's conversions of its
    number arguments."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", torch.jit.TracerWarning)
        yield
    for warning in caught:
        if not issubclass(warning.category, torch.jit.TracerWarning) or guards_an_error(warning):
            continue
        if numbers_are_constants and _converts_a_constant(warning):
            continue
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def taking_only_inputs_(model: nn.Module, count: int) -> nn.Module:
    """Make `model` (a private copy: its class is swapped) take exactly `count` positional inputs, when its class's
    ``forward`` has further parameters with defaults (``return_features=False``, ``*, need_weights=True``): those
    then keep their defaults as constants, as a call with `count` inputs does. Tracers need this: torch.fx symbolises
    every parameter of the class's forward, so a flag used in an ``if`` fails the trace, and the legacy ONNX exporter
    passes keyword-only defaults by position. Returns `model`, unchanged when there is nothing to hold."""

    cls = type(model)
    try:
        parameters = list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError, AttributeError):  # no Python signature (a TorchScript module's _CachedForward)
        return model
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    inputs, rest = parameters[:count], parameters[count:]
    if (len(inputs) < count or any(p.kind not in positional for p in inputs) or not rest
            or any(p.default is inspect.Parameter.empty for p in rest
                   if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))):
        return model  # *args among the inputs, nothing beyond them, or a required parameter the call would miss
    names = ", ".join(p.name for p in inputs)
    namespace: dict[str, object] = {"_forward": cls.forward}
    # a generated def: fx reads the parameters from the function's code object
    exec(f"def forward(self, {names}):\n    return _forward(self, {names})\n", namespace)  # noqa: S102
    model.__class__ = type(cls.__name__, (cls,), {"forward": namespace["forward"], "__module__": cls.__module__,
                                                  "__qualname__": cls.__qualname__})
    return model
