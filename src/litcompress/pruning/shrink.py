"""Physically remove pruned channels, so a pruned model really gets smaller and faster.

Pruning only masks: a Linear layer whose rows are zero still multiplies by them. `shrink` finds every output
channel (a Linear row, a Conv filter) whose weights are all zero, removes it from its layer (and from a
BatchNorm after it), removes the matching input columns of the layer that consumes it, and folds what the removed
channel still contributed into that consumer's bias: a channel with zero weights outputs a constant (its bias,
through BatchNorm and the activation), so its effect downstream is a constant too. The shrunk model computes the
same function as the masked one in eval mode (exactly up to float rounding), with fewer parameters and FLOPs.

Where the graph does not allow that to be done exactly, the channels stay and the report says why: shrink sees
through a chain from a producer (Linear, Conv, grouped Conv, transposed Conv, or Embedding: its dims) to a
consumer (the same but an Embedding; only zero
channels leave a transposed conv's inputs, where a constant does not stay constant; a grouped conv, as producer or
consumer, loses as many channels from each of its groups, and keeps the zero channels that would unbalance them)
over BatchNorm (after a Linear layer, given example inputs: a BatchNorm1d of its width on a 2-d input),
element-wise activations and arithmetic with a number, dropout, a conv's spatial max/adaptive pooling (average
pooling without padding) and upsampling, depthwise convolutions (a MobileNet block's middle layer: its channel j
reads only channel j, so it loses the same channels)
and a flatten from conv to Linear (``x.view(x.size(0), -1)`` too, and, with example inputs, squeezes of pooled 1x1
maps). With example inputs, whose ranks tell a Linear layer's features from its tokens, a Linear layer's chain also
passes a pooling over tokens (``ff(x).mean(1)``, ``amax``, the class token ``h[:, 0]``; with weights per token, as
attention pooling or a padding mask weigh them, only zero features pass), a squeeze, unsqueeze or flatten of dims
before the features (``h.flatten(0, 1)``), and a PReLU on a 2-d input, and a BatchNorm1d over tokens as many as the
features ends it; a swap of the last two dims (``x.transpose(1, 2)``) takes features into a Conv1d, or a Conv1d's
channels into a Linear layer or an LSTM; a residual stream of Linear features pooled so stays a group. An output with
several users branches (Inception-style heads, multi-task models): a channel goes only if it reaches every branch's
consumer as a constant, and each consumer folds the constant of its own branch. A concatenation along the channels
(DenseNet, Inception, U-Net skips) places the producer's channels among the others, whose widths are read from the
layers that make them; the ops after it lose the channels at that place. A residual add, a LayerNorm, a layer used
twice, the model's output, or a concatenation whose inputs' widths the graph does not tell, on any branch, end the
chain and keep the producer as it is. The feed-forward blocks of torch's Transformer layers, which fx does not trace
into, are chains too. Channel spaces that residual additions or gating products (``w2(silu(w1(x)) * w3(x))``) join
are handled as groups (:mod:`litcompress.pruning.groups`): a channel exactly zero wherever the group's readers read
it (in all terms of a sum, in one factor of a product) leaves all of the group's layers. The hidden units of
``nn.LSTM``/``nn.GRU``/``nn.RNN`` layers that output zero (:mod:`litcompress.pruning.recurrent`) leave the layer and
the inputs of what reads its output sequence or final states (a Linear, through indexing of time, batch or layer dims
that example inputs tell, or another recurrent layer); a recurrent layer is a consumer too, also of a
``pack_padded_sequence``, and a packed output is followed through ``pad_packed_sequence`` (zero padding).

The model's ``forward`` must be traceable by ``torch.fx.symbolic_trace``, or become so with its bool flags held
(``return_features=False``: every combination is traced, and a layer loses channels only where all agree); the
module objects of the model itself are edited (weights replaced by smaller ones), so the model keeps its class, its
``forward`` and its hooks.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from litcompress._inputs import copied
from litcompress.pruning.engine import (compiled_module_names, eager_copy, lazy_parameter_names, make_permanent_,
                                        refuse_tied_holders_computing_otherwise, tied_parameters)
from litcompress.pruning.parametrizations import has_computed_tensors
from litcompress.pruning.heads import HeadPrunedAttention, HeadShrink, remove_zero_heads_
from litcompress.pruning.recurrent import (RECURRENT_LAYERS, is_projected, keep_inputs_, keep_units_,
                                           units_why_not, zero_units)
from litcompress.pruning.schedules import check_channel_multiple, kept_multiple

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Transposed convs (U-Net up-convolutions): output channels are their weight's dim 1, input channels dim 0. A constant
# input channel does not give a constant output (kernel taps land unevenly), so only zero channels leave their inputs.
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_LIKE = (*_CONV, *_TRANSPOSED)
_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Embeddings: their dims (the weight's columns) are output channels; a zero one outputs zeros (a bag's sum, mean or
# max of zeros too)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_INSTANCE_NORM = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
# Element-wise (per channel) ops: a constant channel stays a constant channel, whose value we compute by running
# the op on it.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, torch.relu_, F.relu_,
    # with numbers for bounds (a tensor bound is another input, which ends a chain): ReLU6 written as a clamp
    torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max,
}
# copies, layouts and casts keep every value: x.contiguous() after a transpose, x.float() in mixed precision
_VALUE_KEEPING_METHODS = {"contiguous", "clone", "detach", "to", "float", "half", "bfloat16", "double"}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "relu_", "sigmoid_", "tanh_", "clamp", "clip", "clamp_min",
                        "clamp_max", "clamp_", "clip_", "clamp_min_", "clamp_max_", *_VALUE_KEEPING_METHODS}
# Ops that pass a constant channel through unchanged (eval mode): dropout, and spatial pooling that never pads with
# zeros or resampling (U-Net decoders' upsampling: every mode interpolates a constant map to the same constant).
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_POOLING = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
_POOLING_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear,
}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
# Average pooling keeps a constant only without zero padding (counted in the average by default) and without a
# divisor override (DenseNet's transitions: no padding).
_AVG_POOLING = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_AVG_POOLING_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}


def _is_unpadded(padding: object) -> bool:
    return padding == 0 or (isinstance(padding, (tuple, list)) and all(p == 0 for p in padding))


def _pools_constants(node: fx.Node, module: nn.Module | None) -> bool:
    """Spatial pooling that maps a constant channel to the same constant."""
    if module is not None:
        return isinstance(module, _POOLING) or (isinstance(module, _AVG_POOLING) and _is_unpadded(module.padding)
                                                and getattr(module, "divisor_override", None) is None)
    if node.op != "call_function":
        return False
    if node.target in _AVG_POOLING_FUNCTIONS:
        padding = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
        divisor = node.args[6] if len(node.args) > 6 else node.kwargs.get("divisor_override")
        return _is_unpadded(padding) and divisor is None
    return node.target in _POOLING_FUNCTIONS


@dataclass(frozen=True)
class LayerShrink:
    """One producer layer that lost output channels (and its consumer, which lost the matching inputs)."""

    name: str
    consumer: str
    channels_before: int
    channels_after: int
    folded: int  # removed channels with a non-zero constant output, added to the consumer's bias
    left: int = 0  # all-zero channels that had to stay (non-zero constants into a zero-padded conv or a gate)
    left_reason: str = ""  # why the `left` ones stay: how many for which cause ("" when none is left)
    through: tuple[str, ...] = ()  # layers between the two that lost the same channels (depthwise, gates' convs)
    units: bool = False  # a recurrent layer: its "channels" are hidden units

    @property
    def removed(self) -> int:
        return self.channels_before - self.channels_after


@dataclass(frozen=True)
class ShrinkReport:
    """What `shrink_` removed, what it kept and why, and the parameter counts before and after."""

    layers: tuple[LayerShrink, ...]
    kept: tuple[tuple[str, str], ...]  # (layer, reason) for layers with all-zero channels that had to stay
    parameters_before: int
    parameters_after: int
    heads: tuple[HeadShrink, ...] = ()  # attentions that lost heads adding nothing (value rows all zero)

    @property
    def channels_removed(self) -> int:
        """Output channels removed from Linear and conv layers."""
        return sum(layer.removed for layer in self.layers if not layer.units)

    @property
    def units_removed(self) -> int:
        """Hidden units removed from LSTM/GRU/RNN layers."""
        return sum(layer.removed for layer in self.layers if layer.units)

    @property
    def heads_removed(self) -> int:
        return sum(head.removed for head in self.heads)

    @property
    def parameter_ratio(self) -> float:
        """Parameters after / before (1.0 when nothing was removed)."""
        return self.parameters_after / self.parameters_before if self.parameters_before else 1.0

    def table(self) -> str:
        """A plain-text table: one line per shrunk layer, one per layer kept with its reason, and the totals."""
        lines = [f"{'layer':<32} {'consumer':<32} {'channels':>15} {'folded':>7} {'left':>5}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<32} {layer.consumer:<32} "
                         f"{f'{layer.channels_before} -> {layer.channels_after}':>15} {layer.folded:>7} "
                         f"{layer.left:>5}" + (f"  via {', '.join(layer.through)}" if layer.through else "")
                         + ("  hidden units" if layer.units else ""))
            if layer.left:
                lines.append(f"{'':<32} left: {layer.left_reason}")
        for head in self.heads:
            heads = f"{head.heads_before} -> {head.heads_after}"
            lines.append(f"{head.name:<32} {'(attention heads)':<32} {heads:>15} {'':>7} {'':>5}  "
                         f"heads of {head.head_dim}")
        for name, reason in self.kept:
            lines.append(f"{name:<32} kept: {reason}")
        lines.append(f"parameters {self.parameters_before:,} -> {self.parameters_after:,} "
                     f"({self.parameter_ratio:.3f}x)")
        return "\n".join(lines)


@dataclass(frozen=True)
class ShrinkResult:
    """The shrunk copy and its report (the model given to `shrink` is left untouched)."""

    model: nn.Module
    report: ShrinkReport = field(repr=False)


# ------------------------------------------------------------------------------------------------ the chain
@dataclass(frozen=True)
class _Depthwise:
    """A depthwise conv inside a chain, and whether it pads with zeros (then only a zero input channel gives a
    constant output channel)."""

    name: str
    conv: nn.Module
    zero_padded: bool


@dataclass(frozen=True)
class _Gate:
    """A squeeze-and-excitation gate inside a chain: ``x * excite(act(squeeze(pool(x))))`` (MobileNetV3,
    EfficientNet). A zero channel of x stays zero whatever its gate, so it leaves `squeeze`'s inputs and `excite`'s
    outputs; a non-zero constant does not (its gate varies with the input)."""

    names: tuple[str, str]
    squeeze: nn.Module
    excite: nn.Module


@dataclass(frozen=True)
class _BatchNorm:
    """A BatchNorm inside a chain, applied as in eval mode (the mode shrink keeps the function in)."""

    bn: nn.Module

    def __call__(self, x: Tensor) -> Tensor:
        bn = self.bn
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


@dataclass(frozen=True)
class _PReLU:
    """A PReLU with a slope per channel inside a conv's chain (dim 1, where a conv's channels are): it loses the
    slopes of the channels that go."""

    prelu: nn.PReLU

    def __call__(self, x: Tensor) -> Tensor:
        return F.prelu(x, self.prelu.weight.detach())


@dataclass(frozen=True)
class _Concat:
    """A concatenation along the channels (DenseNet, Inception): from here on the producer's channels are
    ``[start, start + channels)`` of the `total` channels the ops after it see."""

    name: str
    start: int
    total: int


@dataclass(frozen=True)
class _ZerosOnly:
    """An op that keeps a zero feature zero but not a non-zero constant constant: a product with weights that vary
    over tokens but not over the features (attention pooling, ``(softmax(score(h), 1) * h).sum(1)``, a padding
    mask), a sum over tokens, a matrix product mixing tokens (``torch.bmm(weights, h)``)."""

    name: str


_Op = Callable[[Tensor], Tensor] | _BatchNorm | _PReLU | _Depthwise | _Gate | _Concat | _ZerosOnly


@dataclass
class _Branch:
    """One way from a producer to a consumer: what lies between them, in order."""

    producer_channels: int
    consumer: nn.Module | None = None
    consumer_name: str = ""
    # per-channel ops, in order; a _BatchNorm, a _Depthwise (depthwise conv) and a _Gate lose channels too, and a
    # _Concat places the producer's channels in a wider space
    ops: list[_Op] = field(default_factory=list)
    flattened: bool = False
    # only zero constants fold exactly into the consumer: a conv that pads with zeros, or a transposed conv
    zeros_only: bool = False
    # a Linear layer's (or an embedding's) features moved to dim 1 (``x.transpose(1, 2)``), as a Conv1d reads them
    transposed: bool = False

    @property
    def width(self) -> int:
        """The channels the branch carries where it is now (more than the producer's after a concatenation)."""
        last = self._last_concat()
        return last.total if last else self.producer_channels

    @property
    def start(self) -> int:
        """Where the producer's channels start among those the branch carries where it is now."""
        last = self._last_concat()
        return last.start if last else 0

    def _last_concat(self) -> _Concat | None:
        return next((op for op in reversed(self.ops) if isinstance(op, _Concat)), None)

    @property
    def batch_norms(self) -> list[tuple[nn.Module, int]]:
        """The BatchNorms on the branch, each with where the producer's channels start among its channels (0 before
        any concatenation)."""
        found, start = [], 0
        for op in self.ops:
            if isinstance(op, _Concat):
                start = op.start
            elif isinstance(op, _BatchNorm):
                found.append((op.bn, start))
        return found

    @property
    def needs_zeros_before_a_batch_norm(self) -> bool:
        """Whether a pruned channel must be exactly zero somewhere before an affine BatchNorm (which zero_batch_norm
        holds at zero for it) makes it so: at a gate (its squeeze reads every channel), an op keeping only zeros, a
        zero-padded depthwise conv, or a consumer that takes only zeros, none after such a BatchNorm."""
        for op in self.ops:
            if isinstance(op, _BatchNorm) and op.bn.affine:
                return False
            if isinstance(op, (_Gate, _ZerosOnly)) or (isinstance(op, _Depthwise) and op.zero_padded):
                return True
        return self.zeros_only

    def fork(self) -> _Branch:
        return _Branch(self.producer_channels, self.consumer, self.consumer_name, list(self.ops), self.flattened,
                       self.zeros_only, self.transposed)


@dataclass
class _Chain:
    """A producer and every way its output takes to a consumer (one, or several where its output branches)."""

    producer: nn.Module
    branches: list[_Branch]

    @property
    def batch_norms(self) -> dict[nn.Module, int]:
        """The BatchNorms of all branches (one before a fork is on every branch after it), each with where the
        producer's channels start among its channels: holding them at zero for pruned channels makes those channels
        zero."""
        return {bn: start for branch in self.branches for bn, start in branch.batch_norms}

    @property
    def consumer_names(self) -> str:
        return ", ".join(branch.consumer_name for branch in self.branches)


def _unique(items: Iterable[Any]) -> list[Any]:
    """`items` without repeats (by identity), in order."""
    seen: set[int] = set()
    unique = []
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            unique.append(item)
    return unique


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _keeping_narrowed_attention(tracer: type[fx.Tracer]) -> type[fx.Tracer]:
    """`tracer` that keeps :class:`HeadPrunedAttention` (from an earlier shrink) as one module, as fx keeps torch's
    attention: its forward branches on its inputs' shapes, as torch's does."""

    class Tracer(tracer):  # type: ignore[valid-type, misc]
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return isinstance(module, HeadPrunedAttention) or super().is_leaf_module(module, qualified_name)

    return Tracer


# Packing for recurrent layers: fx cannot trace through them (a PackedSequence is built from the values), so the
# tracer keeps them as calls (fx's `autowrap_functions`), where forward's module imports them by name.
_PACKING = (nn.utils.rnn.pack_padded_sequence, nn.utils.rnn.pad_packed_sequence)


def _tracer_instance(tracer: type[fx.Tracer]) -> fx.Tracer:
    """An instance of `tracer` that keeps narrowed attention and the packing functions as calls; a tracer whose
    constructor takes no `autowrap_functions` is built without them."""
    cls = _keeping_narrowed_attention(tracer)
    try:
        return cls(autowrap_functions=_PACKING)
    except TypeError:
        return cls()


def _packing_hint(model: nn.Module) -> str:
    """A hint for a model whose forward calls a packing function through its module (``nn.utils.rnn.
    pack_padded_sequence(...)``), which fx traces into and fails on: by name it is kept as a call."""
    for cls in {type(module) for module in model.modules()}:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        for function in _PACKING:
            if f".{function.__name__}(" in source:
                return (f" ({cls.__name__}.forward calls {function.__name__} by its module path, which fx traces "
                        f"into: import it by name, `from torch.nn.utils.rnn import {function.__name__}`, and the "
                        "trace keeps it as one call)")
    return ""


def trace(model: nn.Module, tracer: type[fx.Tracer] = fx.Tracer, flags: dict[str, bool] | None = None
          ) -> tuple[fx.Graph, dict[str, nn.Module], dict[str, int]]:
    """`model`'s ``torch.fx`` graph (with `flags`, forward's parameters of those names held at those values), its
    modules by name and how often the graph calls each; ValueError (with fx's message) when it cannot be traced."""
    try:
        graph = _tracer_instance(tracer).trace(model, concrete_args=flags or None)
    except Exception as error:  # fx raises many types
        compiled = compiled_module_names(model)
        hint = (f" (torch.compile'd: {', '.join(repr(n) if n else 'the model' for n in compiled)}; trace the eager "
                "module, `._orig_mod`, or use shrink()/compress(), which work on an eager copy)") if compiled else ""
        raise ValueError(f"tracing {type(model).__name__} with torch.fx failed: {error}{hint or _packing_hint(model)}"
                         ) from error
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _PACKING:
            # fx would make a GraphModule of this graph register the function by its dotted name in its
            # process-wide table of wrapped functions, which breaks every later trace: the calls stay plain calls
            node.meta.pop("is_wrapped", None)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    modules = dict(model.named_modules())
    # a module holding a tensor that other modules hold too (tied weights) is used by their calls as well
    for name, others in _tied_modules(modules).items():
        if name in calls:
            calls[name] += sum(calls.get(other, 0) for other, _ in others)
    return graph, modules, calls


#: at most this many flags are traced in all their combinations (2 ** 4 traces)
MAX_TRACED_FLAGS = 4


@dataclass
class _Trace:
    """One trace of forward: its graph, how often it calls each module, and the flags held (empty: none)."""

    graph: fx.Graph
    calls: dict[str, int]
    flags: dict[str, bool | None] = field(default_factory=dict)
    changed: tuple[str, ...] = ()  # the flags not at forward's defaults; one not in `flags` was traced as given

    def describe(self) -> str:
        return ", ".join(f"{name}={self.flags[name]}" if name in self.flags else f"{name} given"
                         for name in self.changed)


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    """The parameters of `model`'s class's forward after ``self``; none when it has ``*args`` or ``**kwargs`` (fx
    cannot hold those) or no signature."""
    try:
        parameters = list(inspect.signature(type(model).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    if any(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for p in parameters):
        return []
    return parameters


def _forward_flags(model: nn.Module) -> list[inspect.Parameter]:
    """The parameters of `model`'s class's forward with a bool default (``return_features=False``)."""
    return [p for p in _forward_parameters(model) if isinstance(p.default, bool)]


def _graph_ops(graph: fx.Graph) -> list[tuple[str, object]]:
    """What `graph` computes, placeholders and fx's own checks of held arguments aside."""
    return [(node.op, node.target) for node in graph.nodes
            if node.op not in ("placeholder", "output") and getattr(node.target, "__name__", "") != "_assert_is_none"]


def _with_optional_arguments_left_out(model: nn.Module, tracer: type[fx.Tracer], given: _Trace) -> list[_Trace]:
    """The traces of a forward that fx traced as it is: with parameters that default to None (``labels=None``),
    fx traced them as given (``labels is None`` is False for its proxy), so the default path, the one inference
    calls, comes first, traced with them held at None, where it computes otherwise."""
    optional = [p.name for p in _forward_parameters(model) if p.default is None]
    if not optional:
        return [given]
    try:
        graph, _, calls = trace(model, tracer, dict.fromkeys(optional))
    except ValueError:  # the default path cannot be traced: shrink goes on as before, along the path traced
        return [given]
    if _graph_ops(graph) == _graph_ops(given.graph):
        return [given]
    return [_Trace(graph, calls, dict.fromkeys(optional)), dataclasses.replace(given, changed=tuple(optional))]


def trace_all(model: nn.Module, tracer: type[fx.Tracer] = fx.Tracer) -> tuple[dict[str, nn.Module], list[_Trace]]:
    """`model`'s modules by name and its traces: one, when fx traces forward as it is; else, when forward has flags
    (parameters with a bool default, read by Python ``if``s, which fx cannot trace symbolically), one per
    combination of their values, forward's defaults first: a layer's channels may go only where every path agrees.
    ValueError (with fx's message) when a trace fails."""
    try:
        graph, modules, calls = trace(model, tracer)
        return modules, _with_optional_arguments_left_out(model, tracer, _Trace(graph, calls))
    except ValueError as error:
        flags = _forward_flags(model)
        if not flags or len(flags) > MAX_TRACED_FLAGS:
            raise
        first_error = error
    traces = []
    for flipped in itertools.product((False, True), repeat=len(flags)):
        values = {p.name: p.default != flip for p, flip in zip(flags, flipped)}
        try:
            graph, modules, calls = trace(model, tracer, values)
        except ValueError as error:
            held = ", ".join(f"{name}={value}" for name, value in values.items())
            message = (f"{error} (also with forward's flags held at {held})" if str(error) == str(first_error)
                       else f"{first_error}; with forward's flags held at {held}, {error}")
            raise ValueError(message) from error.__cause__
        traces.append(_Trace(graph, calls, values, tuple(p.name for p, flip in zip(flags, flipped) if flip)))
    return modules, traces


def _flag_inputs(model: nn.Module, example_inputs: tuple, flags: dict[str, bool]) -> tuple | None:
    """`example_inputs` followed by a value for each further parameter of forward (a placeholder of a trace that
    holds `flags`: its value there, else its default); None when one has no default."""
    if not flags:
        return example_inputs
    parameters = list(inspect.signature(type(model).forward).parameters.values())[1 + len(example_inputs):]
    if any(p.name not in flags and p.default is inspect.Parameter.empty for p in parameters):
        return None
    return (*example_inputs, *(flags.get(p.name, p.default) for p in parameters))


def _op_key(op: object) -> object:
    """What a chain op does, comparable between traces (modules by identity)."""
    if isinstance(op, (_BatchNorm, _PReLU)):
        return type(op).__name__, id(op.bn if isinstance(op, _BatchNorm) else op.prelu)
    if isinstance(op, _Depthwise):
        return "depthwise", op.name, op.zero_padded
    if isinstance(op, _SelfGate):
        return "self-gate", tuple(_op_key(o) for o in op.ops)
    if isinstance(op, nn.Module):
        return "module", id(op)
    return op  # a _Gate, _Concat or _Function (dataclasses that compare by value), or a function


def _chain_key(chain: _Chain) -> tuple:
    return id(chain.producer), tuple((branch.consumer_name, branch.flattened, branch.zeros_only, branch.transposed,
                                      tuple(_op_key(op) for op in branch.ops)) for branch in chain.branches)


def _same(a: object, b: object) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a tensor among an op's arguments: not provably the same
        return False


def _chain_modules(name: str, chain: _Chain, names: dict[int, str]) -> set[str]:
    """The modules a chain's edit touches, by name."""
    found = {name}
    for branch in chain.branches:
        found.add(branch.consumer_name)
        for op in branch.ops:
            found |= {names.get(id(m), "") for m in (getattr(op, "bn", None), getattr(op, "prelu", None),
                                                     getattr(op, "conv", None)) if m is not None}
            found |= set(getattr(op, "names", ()))
    return found - {""}


def _touches(trace: _Trace, module_names: Iterable[str]) -> str | None:
    """The first of `module_names` that the trace's forward calls (itself, or inside a module fx keeps whole)."""
    called = _called_modules(trace.graph)
    return next((name for name in module_names
                 if name in called or any(name.startswith(leaf + ".") for leaf in called)), None)


def _flag_disagreements(traces: list[_Trace], modules: dict[str, nn.Module], producers: set[str],
                        groups: list) -> tuple[dict[str, str], list]:
    """With several traces (forward's flags in all combinations; the first holds the defaults, and is the one
    shrink edits along): the producers of the first trace whose chain another trace does not share, each with why,
    and the first trace's channel groups that every other trace shares (or never reaches)."""
    from litcompress.pruning.groups import _residual_groups

    if len(traces) == 1:
        return {}, groups
    names = {id(module): name for name, module in modules.items()}
    main = dict(_producer_chains(traces[0].graph, modules, traces[0].calls, producers))
    reasons: dict[str, str] = {}
    shared_groups = list(groups)
    for other in traces[1:]:
        held = f"with forward's {other.describe()}"
        chains = dict(_producer_chains(other.graph, modules, other.calls, producers))
        for name, chain in main.items():
            if not isinstance(chain, _Chain) or name in reasons:
                continue
            theirs = chains.get(name)
            if theirs is None:
                used = _touches(other, _chain_modules(name, chain, names) - {name})
                if used is not None:
                    reasons[name] = f"{held}, forward calls {used} but not {name}"
            elif isinstance(theirs, str):
                reasons[name] = f"{held}, {theirs}"
            elif not _same(_chain_key(theirs), _chain_key(chain)):
                way = "other ops" if theirs.consumer_names == chain.consumer_names else "another way"
                reasons[name] = f"{held}, its output takes {way} to {theirs.consumer_names}"
        their_groups = _residual_groups(other.graph, modules, other.calls)
        for group in list(shared_groups):
            members = (*group.producers, *group.batch_norms, *group.consumers)
            if not any(_same(group, g) for g in their_groups) and _touches(other, members) is not None:
                shared_groups.remove(group)
                for producer in group.producers:
                    reasons.setdefault(producer, f"{held}, its {'gated' if group.gated else 'residual'} group "
                                                 "cannot lose channels (it meets the model's output or an op shrink "
                                                 "does not see through, or is joined otherwise)")
    return reasons, shared_groups


@dataclass
class _Traced:
    """What shrink, `channel_plan` and `residual_groups` read from a model: its modules, its traces (one per flag
    combination, forward's defaults first, shapes annotated from the example inputs), its producers, the channel
    groups every trace shares and, for the producers some trace disagrees on, why they keep their channels."""

    modules: dict[str, nn.Module]
    traces: list[_Trace]
    producers: set[str]
    groups: list
    disagreements: dict[str, str]

    @property
    def graph(self) -> fx.Graph:
        return self.traces[0].graph

    @property
    def calls(self) -> dict[str, int]:
        return self.traces[0].calls


def _traced(model: nn.Module, tracer: type[fx.Tracer], example_inputs: tuple | None) -> _Traced:
    """`model` traced (ValueError with fx's message when it cannot be) and read as `_Traced` says."""
    from litcompress.pruning.groups import _residual_groups

    modules, traces = trace_all(model, tracer)
    for each in traces:
        annotate_shapes_(each.graph, model, example_inputs, each.flags)  # ranks: a Linear's features, or its tokens
    producers = {name for name, module in modules.items() if _has_channels(module)}
    disagreements, groups = _flag_disagreements(traces, modules, producers,
                                                _residual_groups(traces[0].graph, modules, traces[0].calls))
    return _Traced(modules, traces, producers, groups, disagreements)


def _tied_modules(modules: dict[str, nn.Module]) -> dict[str, list[tuple[str, str]]]:
    """Each module (by name) holding a parameter that other modules hold too (tied weights: a language model's
    output layer and its input embedding), with those others and the parameter's name there."""
    tied: dict[str, list[tuple[str, str]]] = {}
    for group in tied_parameters(modules.items()):
        for name, _, _ in group:
            tied.setdefault(name, []).extend((other, key) for other, _, key in group if other != name)
    return tied


def _reuse_reason(name: str, modules: dict[str, nn.Module], subject: str = "it") -> str:
    """Why module `name` (`subject` in the sentence), used more than once by the graph's calls, keeps its channels:
    it is called more than once, or a tensor of it is tied to another module's."""
    others = _tied_modules(modules).get(name)
    if not others:
        return f"{subject} is called more than once"
    tied = ", ".join(f"{other}.{key}" for other, key in others)
    return f"{subject} holds a tensor tied to {tied} (one parameter in two modules), which narrowing it would untie"


def _called_once_or_stateless(module: nn.Module, name: str, calls: dict[str, int]) -> bool:
    """Whether the graph's calls of `module` leave it free to lose channels: a module called more than once (a layer
    shared by two paths), or holding weights tied to another module's, cannot lose them for one use only, but an
    activation, dropout or pooling module has no channels of its own and is often reused (``self.relu`` in
    torchvision's ResNet blocks)."""
    return calls[name] == 1 or _is_elementwise_module(module) or isinstance(module, (*_DROPOUT, *_POOLING,
                                                                                       *_AVG_POOLING))


class _ShapeRecorder(fx.Interpreter):
    """Runs a graph and records the shape of each tensor a node computes (``node.meta["shape"]``). fx's ShapeProp
    cannot: it rebuilds every tuple it finds, and a PackedSequence (a tuple) refuses its tensor metadata."""

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        if isinstance(result, Tensor):
            node.meta["shape"] = result.shape
        return result


def annotate_shapes_(graph: fx.Graph, model: nn.Module, example_inputs: tuple | None,
                     flags: dict[str, bool] | None = None) -> None:
    """Record the shape of each tensor `graph` computes on `example_inputs` (``node.meta["shape"]``, run in eval
    mode without gradients, modes restored), which tells a Linear layer's features from its tokens where ranks
    matter; `flags`: those the graph's trace held. Nothing is recorded without inputs or when the run fails: the
    walk then assumes no rank."""
    if example_inputs is None:
        return
    example_inputs = _flag_inputs(model, example_inputs, flags or {})
    if example_inputs is None:
        return
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        runnable = fx.GraphModule(model, copy.deepcopy(graph))  # a copy: a GraphModule takes its graph over
        with torch.no_grad():
            _ShapeRecorder(runnable).run(*copied(example_inputs))
        shapes = {node.name: node.meta.get("shape") for node in runnable.graph.nodes}
    except Exception:  # noqa: BLE001 - the shapes only refine the walk
        return
    finally:
        for module, training in modes:
            module.training = training
    for node in graph.nodes:
        if shapes.get(node.name) is not None:
            node.meta["shape"] = shapes[node.name]


def _shape(node: fx.Node) -> torch.Size | None:
    """`node`'s tensor's shape on the example inputs, when `annotate_shapes_` recorded it."""
    shape = node.meta.get("shape")
    return shape if isinstance(shape, torch.Size) else None


def _rank(node: fx.Node) -> int | None:
    """The number of dims of `node`'s tensor on the example inputs, when `annotate_shapes_` recorded it."""
    shape = _shape(node)
    return None if shape is None else len(shape)


def _normalises_channels(bn: nn.Module, after_conv: bool, channels: int, rank: int | None = None) -> bool:
    """Whether BatchNorm `bn` normalises its input's `channels` channels. BatchNorm normalises dim 1: a conv's
    channels, but a Linear layer's features only for a 2-d input (on (batch, tokens, features) a BatchNorm1d
    normalises the tokens). The `rank` of its input tells (shrink with example inputs); without it a Linear layer's
    BatchNorm1d is not trusted (as many tokens as features would be narrowed, and fail at the first call)."""
    if after_conv:
        return bn.num_features == channels
    return isinstance(bn, nn.BatchNorm1d) and bn.num_features == channels and rank == 2


def _leading_index(index: object) -> tuple:
    """An index as a tuple, without a last entry that takes all of the last dim (``h[-1, :, :]`` is ``h[-1, :]``;
    ``h[-1, ...]`` is ``h[-1]``): what is left indexes leading dims only when it is shorter than the rank."""
    index = index if isinstance(index, tuple) else (index,)
    return index[:-1] if index[-1:] in ((slice(None),), (Ellipsis,)) else index


def _keeps_features(user: fx.Node, node: fx.Node) -> bool:
    """Whether `user` maps `node`, a Linear layer's (batch, ..., features) output of known rank, to a tensor whose
    last dim is still those features, each a constant where it was one: a mean/amax/amin over token dims (a
    sequence model's pooling, ``ff(x).mean(1)``; or over the batch: a constant's mean is that constant), or an index
    that keeps the batch and the features (``h[:, 0]``, the class token), or a squeeze, unsqueeze or flatten of dims
    before the features (``flatten(0, 1)``: tokens as a batch). Dim 1 of a 2-d output is the features: no reduction
    there passes."""
    rank = _rank(node)
    if rank is None or rank < 2:
        return False
    if user.op == "call_method" and user.target in ("squeeze", "unsqueeze", "flatten") and not user.kwargs:
        dims = user.args[1:]
        if not dims or not all(isinstance(d, int) for d in dims):
            return False
        if user.target == "unsqueeze":  # a new dim before the features
            return -rank - 1 <= dims[0] <= rank and dims[0] % (rank + 1) < rank
        if user.target == "squeeze":
            return len(dims) == 1 and -rank <= dims[0] < rank and dims[0] % rank < rank - 1
        return len(dims) == 2 and all(-rank <= d < rank for d in dims) and dims[1] % rank < rank - 1
    reduced = _reduction_dims(user)
    if reduced is not None:  # over any dims but the features (the batch too: a time-major RNN's out.mean(0))
        return all(-rank <= d < rank and d % rank != rank - 1 for d in reduced[0])
    if rank < 3:
        return False
    if user.op == "call_function" and user.target is operator.getitem and user.args[0] is node:
        index = _leading_index(user.args[1])
        return (0 < len(index) < rank and index[0] == slice(None)
                and all(isinstance(i, int) or (isinstance(i, slice) and all(
                    isinstance(b, (int, type(None))) for b in (i.start, i.stop, i.step))) for i in index[1:]))
    return False


def _is_elementwise_module(module: nn.Module) -> bool:
    """An activation module without channels of its own (a PReLU of one slope too)."""
    return isinstance(module, _ELEMENTWISE_MODULES) or (isinstance(module, nn.PReLU) and module.num_parameters == 1)


def _is_producer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, _CONV_LIKE) and module.groups == 1)


def is_grouped(module: nn.Module) -> bool:
    """A conv of ``groups > 1`` that is not depthwise (ResNeXt, RegNet): its channels go in equal numbers per group."""
    return isinstance(module, _CONV) and module.groups > 1 and not is_depthwise(module)


def _has_channels(module: nn.Module) -> bool:
    """A layer whose output channels shrink can remove (grouped convs in equal numbers per group; an embedding's
    dims, its weight's columns)."""
    return _is_producer(module) or is_grouped(module) or isinstance(module, _EMBEDDINGS)


def _balance_(dead: Tensor, groups: int, offset: int = 0, total: int | None = None) -> None:
    """Unmark `dead` channels until each of a grouped conv's `groups` loses as many: channel j is its channel
    ``offset + j`` of `total` (its input channels), or of ``dead.numel()`` (its own output channels). A group that
    none of them falls in loses none, so then neither does any other."""
    total = dead.numel() if total is None else total
    group_of = (torch.arange(dead.numel(), device=dead.device) + offset) // (total // groups)
    per_group = [(dead & (group_of == g)).nonzero().flatten() for g in range(groups)]
    fewest = min(int(found.numel()) for found in per_group)
    for found in per_group:
        dead[found[fewest:]] = False


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, _EMBEDDINGS):
        return module.embedding_dim
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _filters(module: nn.Module) -> Tensor:
    """The weight with output channels first (a transposed conv keeps them in dim 1, an embedding its dims)."""
    weight = module.weight.detach()
    return weight.transpose(0, 1) if isinstance(module, (*_TRANSPOSED, *_EMBEDDINGS)) else weight


def is_depthwise(module: nn.Module) -> bool:
    """A conv whose output channel j reads only input channel j (``groups == in_channels == out_channels > 1``)."""
    return (isinstance(module, _CONV) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _unremoved_conv_reason(module: nn.Module) -> str:
    """Why a conv that no producer chain reached keeps its all-zero output channels."""
    if is_depthwise(module):
        return ("a depthwise conv (its channel j reads input channel j only): its channels go only with those of the "
                "layer that writes its input, and no such layer lost them")
    if isinstance(module, _TRANSPOSED) and module.groups > 1:
        return "a grouped transposed conv: shrink removes no channels of it"
    return "shrink removes no output channels of it here (no layer reading them that it can narrow)"


def _zero_channels(module: nn.Module) -> Tensor:
    """Boolean per output channel: True where all of the channel's weights are zero."""
    weight = _filters(module)
    return (weight.reshape(weight.shape[0], -1) == 0).all(dim=1)


def _pads_with_zeros(conv: nn.Module) -> bool:
    """True for a conv that pads its input with zeros: a constant channel is not constant at its border."""
    padding = conv.padding
    return conv.padding_mode == "zeros" and (padding == "same" if isinstance(padding, str)
                                             else any(p != 0 for p in padding))


_KEEPING_DIM_0 = (*_CONV_LIKE, *_BATCH_NORM, *_POOLING, *_AVG_POOLING, *_DROPOUT, *_ELEMENTWISE_MODULES, nn.Linear,
                  nn.PReLU)


def _same_dim_0(source: fx.Node, modules: dict[str, nn.Module] | None) -> list[fx.Node]:
    """`source` and the nodes it derives from (by its first input) through layers and ops that keep the size of
    dim 0 (convs, Linear layers, BatchNorm, pooling, dropout, element-wise ops): a size read of any of them is
    `source`'s batch size (``self.pool(x).view(x.size(0), -1)``)."""
    found = [source]
    node = source
    while modules is not None and len(found) < 32:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        keeps = isinstance(module, _KEEPING_DIM_0) or (node.op == "call_function" and node.target in (
            _ELEMENTWISE_FUNCTIONS | _POOLING_FUNCTIONS | _AVG_POOLING_FUNCTIONS | _DROPOUT_FUNCTIONS)) or (
            node.op == "call_method" and node.target in _ELEMENTWISE_METHODS) or _keeps_dim_0_reducing(node)
        if not keeps or not node.args or not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]
        found.append(node)
    return found


def _keeps_dim_0_reducing(node: fx.Node) -> bool:
    """Whether `node` is a reduction (``x.mean((2, 3))``, a sum, amax, amin) over dims that are not dim 0: written
    as positive dims, or as negative ones of a tensor whose rank the example inputs showed."""
    reduced = _reduction_dims(node, ("mean", "sum", "amax", "amin"))
    if reduced is None or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    rank = _rank(node.args[0])
    return all(d >= 1 if d >= 0 else rank is not None and -rank < d for d in reduced[0])


def _is_batch_size(node: object, source: fx.Node, modules: dict[str, nn.Module] | None = None) -> bool:
    """True for ``source.size(0)`` or ``source.shape[0]`` (as traced by fx); given `modules`, also for those of a
    tensor `source` derives from through ops that keep dim 0's size."""
    if not isinstance(node, fx.Node):
        return False
    sources = _same_dim_0(source, modules)
    if node.op == "call_method" and node.target == "size" and any(node.args[0] is s for s in sources):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim == 0
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        inner = node.args[0]
        return isinstance(inner, fx.Node) and any(
            (inner.op == "call_method" and inner.target == "size" and inner.args[0] is s and len(inner.args) == 1)
            or (inner.op == "call_function" and inner.target is getattr and inner.args[0] is s
                and inner.args[1] == "shape") for s in sources
        )
    return False


def _is_spatial_index(index: object, ndim: int) -> bool:
    """Whether `index` (a dim, or a slice ``d:`` of dims) picks only spatial dims of an `ndim`-d conv output."""
    if isinstance(index, slice):
        return index.stop is None and index.step is None and _is_spatial_index(index.start, ndim)
    return isinstance(index, int) and not isinstance(index, bool) and (2 <= index < ndim or -(ndim - 2) <= index <= -1)


def _takes_channel_count(read: fx.Node, ndim: int | None, allowed: set[fx.Node] = frozenset()) -> bool:
    """Whether `read`, a read of a tensor's shape (``_reads_shape_only``), takes what narrowing the tensor's channels
    would change: its channel count (``x.size(1)``, ``c`` of ``b, c, h, w = x.size()``) or the whole shape, used by
    anything but the `allowed` nodes (a squeeze-and-excitation gate's reshapes). Reads of the rank, the batch size,
    the spatial sizes of an `ndim`-d conv output (None: not a conv output), and unpacked sizes never used do not."""

    def harmless(index: object, readers: Iterable[fx.Node]) -> bool:
        readers = list(readers)
        return not readers or index == 0 or (ndim is not None and _is_spatial_index(index, ndim)) or all(
            r in allowed for r in readers)

    if read.target == "dim" or (read.op == "call_function" and read.args[1] == "ndim"):
        return False
    if read.op == "call_method":  # x.size(d), or x.size()
        dim = read.args[1] if len(read.args) > 1 else read.kwargs.get("dim")
        if dim is not None:
            return not harmless(dim, read.users)
    for item in read.users:  # x.size() or x.shape: each item taken from it, or the whole of it
        is_item = item.op == "call_function" and item.target is operator.getitem
        if not (harmless(item.args[1], item.users) if is_item else item in allowed):
            return True
    return False


def _channel_count_read(node: fx.Node, ndim: int, gate_path: set[fx.Node]) -> fx.Node | None:
    """A read of `node`'s shape (an `ndim`-d conv output) that takes its channel count for something other than
    reshaping a squeeze-and-excitation gate's values (`gate_path`): narrowing the channels would change it."""
    return next((user for user in node.users if _reads_shape_only(user)
                 and _takes_channel_count(user, ndim, gate_path)), None)


def _feature_count_read(node: fx.Node, known_rank: int | None = None) -> fx.Node | None:
    """A read of `node`'s feature count, its last dim (``h.size(-1)``, ``h.shape[-1]``, a slice through the end, the
    whole shape, or the last dim of the rank the example inputs gave, else of `known_rank`), where `node` holds
    features (a Linear's or a flattened conv's output): narrowing them would change it. Without a rank a positive
    index may be the tokens'."""
    rank = _rank(node) if _rank(node) is not None else known_rank

    def takes_last(index: object) -> bool:
        if isinstance(index, slice):
            return index.step is None and (index.stop is None or (rank is not None and isinstance(index.stop, int)
                                                                   and index.stop >= rank))
        return isinstance(index, int) and not isinstance(index, bool) and index in (-1, None if rank is None
                                                                                     else rank - 1)

    for read in node.users:
        if not _reads_shape_only(read) or read.target == "dim" or (read.op == "call_function"
                                                                   and read.args[1] == "ndim"):
            continue
        dim = (read.args[1] if len(read.args) > 1 else read.kwargs.get("dim")) if read.op == "call_method" else None
        if dim is not None:
            if read.users and takes_last(dim):
                return read
            continue
        for item in read.users:
            is_item = item.op == "call_function" and item.target is operator.getitem
            if not is_item or (item.users and takes_last(item.args[1])):
                return read
    return None


def _reads_shape_only(node: fx.Node) -> bool:
    """True for a node that only reads its input's shape (``x.size(...)``, ``x.shape``): it does not use its values."""
    return (node.op == "call_method" and node.target in ("size", "dim")) or (
        node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim")
    )


def _unread_padding(node: fx.Node) -> bool:
    """True for ``pad_packed_sequence(...)`` whose results nobody reads (``output, lengths = pad_packed_sequence(
    packed)`` with neither used after: a trace keeps the call)."""
    return (node.op == "call_function" and node.target is nn.utils.rnn.pad_packed_sequence
            and all(user.op == "call_function" and user.target is operator.getitem and not user.users
                    for user in node.users))


def _value_users(node: fx.Node) -> list[fx.Node]:
    return [user for user in node.users if not _reads_shape_only(user) and not _unread_padding(user)]


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
                       operator.ilshift, operator.irshift}


def _overwrites(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `user` writes its result into `node`'s tensor: an ``inplace=True`` activation (module or function),
    a method or function whose name ends in ``_`` (``h.relu_()``, ``torch.relu_(h)``), ``h += y``."""
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_module":
        return getattr(modules.get(str(user.target)), "inplace", False) is True
    name = str(user.target) if user.op == "call_method" else getattr(user.target, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        return True
    if user.op != "call_function":
        return False
    if user.target in _IN_PLACE_OPERATORS or user.kwargs.get("inplace") is True:
        return True
    try:  # positionally: F.relu(h, True), F.dropout(h, 0.5, False, True)
        return inspect.signature(user.target).bind(*user.args, **user.kwargs).arguments.get("inplace") is True
    except (TypeError, ValueError):
        return False


def _overwritten_then_read(node: fx.Node, users: list[fx.Node], modules: dict[str, nn.Module]) -> fx.Node | None:
    """The user of `node` that overwrites its tensor in place while another of `users` reads it afterwards (that
    one sees the overwritten values, not `node`'s: a constant channel would reach it changed), else None."""
    for user in users:
        if not _overwrites(user, node, modules):
            continue
        later, others = user.next, set(users) - {user}
        while later.op != "root" and others:  # the graph's order is the order forward ran them in
            if later in others:
                return user
            later = later.next
    return None


_DROPS_WHEN_EVALUATED = ("its output goes to {}, which drops entries even when the model is evaluated (training=True, "
                         "F.dropout's default, or a dropout module left training: Monte Carlo dropout), so a constant "
                         "channel does not stay constant there")


def _drops_when_evaluated(user: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the dropout `user` stays random while the model is in eval mode: a functional one called with
    ``training=True`` (its default), or a dropout module left in training mode. (In a model in training mode,
    ``training=self.training`` reads True too, and nothing tells the two apart: shrink's outputs are eval mode's.)"""
    root = modules.get("")
    if root is None or root.training:
        return False
    if user.op == "call_module":
        return bool(modules[str(user.target)].training)
    try:
        arguments = inspect.signature(user.target).bind(*user.args, **user.kwargs)
    except (TypeError, ValueError):
        return False
    arguments.apply_defaults()
    return arguments.arguments.get("training") is True and arguments.arguments.get("p") != 0


def _expanded_as(node: fx.Node, users: list[fx.Node]) -> list[fx.Node]:
    """The `users` that are ``y.expand_as(node)``: they read only `node`'s shape, which a gate's path may do."""
    return [user for user in users if user.op == "call_method" and user.target == "expand_as"
            and len(user.args) == 2 and user.args[1] is node and user.args[0] is not node]


def _reads_channels(node: object, source: fx.Node) -> bool:
    """True for ``source.size(1)`` or ``source.shape[1]``, also as unpacked from ``b, c, h, w = source.size()``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "size" and node.args[0] is source:
        return (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")) == 1
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 1:
        inner = node.args[0]
        return isinstance(inner, fx.Node) and inner.args[0] is source and (
            (inner.op == "call_method" and inner.target == "size" and len(inner.args) == 1)
            or (inner.op == "call_function" and inner.target is getattr and inner.args[1] == "shape"))
    return False


def _reshapes_pooled_channels(step: fx.Node, previous: fx.Node, origin: fx.Node) -> bool:
    """Whether `step` only reshapes `previous`, a gate's (batch, channels) values of `origin`'s channels, between
    (batch, channels) and (batch, channels, 1, ...), its sizes read from `origin` at run time (so they follow its
    width): ``y.view(b, c)``, ``y.view(b, c, 1, 1)``, ``y.flatten(1)``, ``y.squeeze(-1)``, ``y.unsqueeze(-1)``,
    ``y.expand_as(origin)``, as hand-written squeeze-and-excitation layers do."""
    if step.op != "call_method" or not step.args or step.args[0] is not previous or step.kwargs:
        return False
    args = step.args[1:]
    if step.target in ("view", "reshape"):
        sizes = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return (len(sizes) >= 2 and _is_batch_size(sizes[0], origin)
                and (_reads_channels(sizes[1], origin) or sizes[1] == -1) and all(size == 1 for size in sizes[2:]))
    if step.target == "flatten":
        return list(args) == [1]
    if step.target in ("squeeze", "unsqueeze"):
        return len(args) == 1 and isinstance(args[0], int) and (args[0] >= 2 or args[0] == -1)
    return step.target == "expand_as" and list(args) == [origin]


def _reads_spatial_size(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module] | None, ndim: int) -> bool:
    """True for a read of spatial sizes of `source` (a conv's `ndim`-d output) or of a tensor it derives from
    through convs, pooling and element-wise ops (as `_same_dim_0` finds them): ``x.size(3)``, ``x.shape[-1]``,
    ``x.size()[2:]`` (a global pool written ``F.avg_pool2d(x, x.size()[2:])``), which do not depend on the
    channels."""
    sources = _same_dim_0(source, modules)
    if node.op == "call_method" and node.target == "size" and any(node.args[0] is s for s in sources):
        return _is_spatial_index(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"), ndim)
    if node.op == "call_function" and node.target is operator.getitem and _is_spatial_index(node.args[1], ndim):
        inner = node.args[0]
        return isinstance(inner, fx.Node) and any(inner.args and inner.args[0] is s for s in sources) and (
            (inner.op == "call_method" and inner.target == "size" and len(inner.args) == 1)
            or (inner.op == "call_function" and inner.target is getattr and inner.args[1] == "shape"))
    return False


def _tensor_args(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module] | None = None,
                 spatial_ndim: int | None = None) -> list[fx.Node]:
    """The node's tensor inputs, not counting reads of `source`'s batch size (see `_is_batch_size`) nor, for a conv's
    `spatial_ndim`-d output, of its spatial sizes."""
    return [a for a in node.all_input_nodes if not _is_batch_size(a, source, modules) and not (
        spatial_ndim is not None and _reads_spatial_size(a, source, modules, spatial_ndim))]


# Ops that shrink follows only when it knows the ranks of their inputs: a conv's squeezed maps (which dims are 1) or
# a Conv1d's channels swapped last (into a Linear layer: which dims are swapped), a Linear layer's tokens pooled or
# picked (which dim holds the features).
_CONV_DIM_READERS = frozenset({"squeeze"})
_CONV1D_DIM_READERS = _CONV_DIM_READERS | {"transpose", "permute"}
_DIM_READERS = frozenset({"squeeze", "unsqueeze", "flatten", "view", "reshape", "transpose", "permute", "mean", "sum",
                          "amax", "max", "select", "getitem"})
_NO_SHAPES_HINT = (" (without example inputs the dims it touches are unknown: pass example_inputs, which may let it "
                   "through)")


def _weight_ndim(module: nn.Module) -> int:
    """The rank of `module`'s ``weight`` (0 without one: a recurrent layer's are ``weight_ih_l0``, ...)."""
    weight = getattr(module, "weight", None)
    return weight.dim() if isinstance(weight, Tensor) else 0


def _reads_dims(node: fx.Node, after_conv: bool, weight_ndim: int) -> bool:
    """Whether the walk follows `node` only given the ranks of its input, a conv's output (`weight_ndim`: 3 for a
    Conv1d, whose channels a swap puts last, where a Linear layer reads them) or a Linear layer's."""
    if node.op not in ("call_method", "call_function"):
        return False
    readers = (_CONV1D_DIM_READERS if weight_ndim == 3 else _CONV_DIM_READERS) if after_conv else _DIM_READERS
    return getattr(node.target, "__name__", str(node.target)) in readers


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[str(node.target)]).__name__})"
    if node.op == "output":
        return "the model's output"
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def _flatten_start(node: fx.Node, modules: dict[str, nn.Module]) -> int | None:
    """`start_dim` if `node` flattens all dimensions from there to the end, else None."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        if isinstance(module, nn.Flatten) and module.end_dim == -1:
            return module.start_dim
        return None
    if not node.args:
        return None
    args = list(node.args[1:])
    start = node.kwargs.get("start_dim", args[0] if args else 0)
    end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        return start if end == -1 and isinstance(start, int) else None
    # x.view(x.size(0), -1) / x.reshape(x.shape[0], -1): a fixed feature count would break once channels go
    source = node.args[0]
    if node.op == "call_method" and node.target in ("view", "reshape") and len(node.args) == 3 and not node.kwargs:
        return 1 if _is_batch_size(node.args[1], source, modules) and node.args[2] == -1 else None
    return None


def _squeezed_rank(user: fx.Node, node: fx.Node) -> int | None:
    """The rank left when `user` squeezes size-1 dims of a conv's output `node` whose other spatial dims are all 1
    too (after a global pool: ``pool(x).squeeze(-1).squeeze(-1)``), keeping the batch and the channels; None
    otherwise, or when the example inputs gave no shapes."""
    squeeze = (user.op == "call_method" and user.target == "squeeze") or (
        user.op == "call_function" and user.target is torch.squeeze)
    shapes = [_shape(n) for n in (node, user)]
    if not squeeze or not user.args or user.args[0] is not node or None in shapes:
        return None
    before, after = (tuple(int(d) for d in shape) for shape in shapes)
    if len(before) < 3 or after[:2] != before[:2] or any(d != 1 for d in before[2:]) or any(d != 1 for d in after[2:]):
        return None
    return len(after)


def _spatial_index(user: fx.Node, node: fx.Node, ndim: int) -> str | None:
    """For an index of an `ndim`-d conv activation `node` that keeps the batch and every channel and indexes spatial
    dims only, with constant bounds: ``"keep"`` when it only slices them (a TCN's chomp, ``x[:, :, :-2]``, a crop,
    ``x[..., 2:-2, 2:-2]``: still a conv activation), ``"all"`` when it takes one position of every spatial dim
    (``x[:, :, -1]``, a sequence's last step: ``(batch, channels)`` is left); else None. Either way each channel
    keeps its constant."""
    if not (user.op == "call_function" and user.target is operator.getitem and user.args[0] is node):
        return None
    index = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
    if index[:1] == (Ellipsis,):
        spatial = index[1:]
    elif index[:2] == (slice(None), slice(None)):
        spatial = index[2:]
    else:
        return None
    if not spatial or len(spatial) > ndim - 2:
        return None
    constant = [isinstance(i, int) or (isinstance(i, slice) and all(isinstance(b, (int, type(None)))
                                                                    for b in (i.start, i.stop, i.step)))
                for i in spatial]
    if not all(constant) or any(isinstance(i, bool) for i in spatial):
        return None
    taken = sum(isinstance(i, int) for i in spatial)
    if taken == 0:
        return "keep"
    return "all" if taken == len(spatial) == ndim - 2 else None


_REDUCTIONS = ("mean", "amax", "amin")  # each maps a constant to itself (a sum would scale it)


_PRODUCTS = {operator.mul, torch.mul}
_QUOTIENTS = {operator.truediv, torch.div}
_MATRIX_PRODUCTS = {operator.matmul, torch.matmul, torch.bmm}


def _keeps_zero_features(user: fx.Node, node: fx.Node) -> bool:
    """Whether `user` maps `node`, a (batch, ..., features) output of known rank, to a tensor of the same features
    last, each zero where it was zero (a non-zero constant need not stay one): a product with, or a quotient by,
    a tensor of one entry along the features (weights per token, a padding mask, ``x / mask.sum(1)``), a sum over
    dims before the features, or a matrix product with `node` second (``torch.bmm(weights, h)``: each output
    feature mixes only that feature over the tokens)."""
    shape, result = _shape(node), _shape(user)
    if shape is None or result is None or len(shape) < 2 or result[-1:] != shape[-1:]:
        return False
    rank = len(shape)
    others = [a for a in user.all_input_nodes if a is not node]
    call = user.target if user.op == "call_function" else None
    method = user.target if user.op == "call_method" else None
    quotient = call in _QUOTIENTS or method == "div"
    if quotient or call in _PRODUCTS or method == "mul":
        if quotient and (user.args[0] is not node or len(user.args) != 2 or user.kwargs):
            return False  # a number divided by the features: a zero becomes no zero
        if len(others) != 1 or node not in user.args[:2] or result != shape:
            return False
        factor = _shape(others[0])
        return factor is not None and (len(factor) == 0 or factor[-1] == 1)
    if call in _MATRIX_PRODUCTS:
        return len(user.args) == 2 and user.args[1] is node and user.args[0] is not node and not user.kwargs
    summed = _reduction_dims(user, ("sum",))
    return summed is not None and not others and all(-rank <= d < rank and d % rank != rank - 1 for d in summed[0])


def _reduction_dims(node: fx.Node, reductions: tuple[str, ...] = _REDUCTIONS) -> tuple[tuple[int, ...], bool] | None:
    """The dims and keepdim of ``x.mean(dims)`` / ``amax`` / ``amin`` (method or ``torch.`` function; by default those,
    each of which maps a constant to itself, else the `reductions` named), when written with int dims; else None."""
    if not ((node.op == "call_method" and node.target in reductions)
            or (node.op == "call_function" and node.target in tuple(getattr(torch, r) for r in reductions))):
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims) \
            or not isinstance(keepdim, bool):
        return None
    return tuple(dims), keepdim


def _spatial_reduction(node: fx.Node, ndim: int) -> str | None:
    """For ``x.mean(dims)`` / ``amax`` / ``amin`` (method or ``torch.`` function) over spatial dims only of an
    `ndim`-d conv activation: ``"keep"`` with keepdim (still a conv activation), ``"all"`` when every spatial dim goes
    (a global pool: ``(batch, channels)`` is left, e.g. ``x.mean((2, 3))`` or a Conv1d's ``x.mean(-1)``); else None.
    """
    reduced = _reduction_dims(node)
    if reduced is None:
        return None
    dims, keepdim = reduced
    spatial = {d % ndim for d in dims}
    if not spatial <= set(range(2, ndim)) or len(spatial) != len(dims):
        return None
    if keepdim:
        return "keep"
    return "all" if spatial == set(range(2, ndim)) else None


def _pooled_through_view(view: fx.Node, node: fx.Node, modules: dict[str, nn.Module] | None) -> fx.Node | None:
    """For a global pool written through a view of `node`, a conv activation, with its sizes read at run time,
    ``x.view(x.size(0), x.size(1), -1).mean(-1)`` (or ``reshape``, ``mean(2)``, ``amax``, ``amin``): the reduction,
    whose ``(batch, channels)`` are features as after a flatten; else None. The view reads the channel count, which
    follows the width."""
    if view.op != "call_method" or view.target not in ("view", "reshape") or view.kwargs or view.args[0] is not node:
        return None
    sizes = view.args[1] if len(view.args) == 2 and isinstance(view.args[1], (tuple, list)) else view.args[1:]
    if not (len(sizes) == 3 and _is_batch_size(sizes[0], node, modules) and _reads_channels(sizes[1], node)
            and sizes[2] == -1):
        return None
    users = _value_users(view)
    if len(users) != 1 or users[0].args[0] is not view or _channel_count_read(view, 3, set()) is not None:
        return None  # (``v.size(1)`` of the view is the channel count too)
    reduced = _reduction_dims(users[0])
    return users[0] if reduced is not None and reduced[0] in ((2,), (-1,)) and not reduced[1] else None


@dataclass(frozen=True)
class _Function:
    """A graph node's element-wise function (or tensor method) applied to a tensor standing for its input, the
    node's other arguments kept; equal for nodes that compute the same (traces of one forward with other flags)."""

    target: Any
    method: bool
    rest: tuple
    kwargs: tuple

    def __call__(self, x: Tensor) -> Tensor:
        kwargs = dict(self.kwargs)
        if self.method:
            return getattr(x, str(self.target))(*self.rest, **kwargs)
        return self.target(x, *self.rest, **kwargs)


def _function_op(node: fx.Node) -> Callable[[Tensor], Tensor]:
    """The node's element-wise function applied to a tensor standing for its input (other arguments kept)."""
    kwargs = tuple((k, v) for k, v in node.kwargs.items() if k != "inplace")
    return _Function(node.target, node.op == "call_method", tuple(node.args[1:]), kwargs)


_MUL_FUNCTIONS = {operator.mul, torch.mul}


def _is_global_average_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(x, 1)`` or ``x.mean((2, 3), keepdim=True)``."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return (node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")) in (1, (1, 1))
    if (node.op == "call_method" and node.target == "mean") or (node.op == "call_function"
                                                                 and node.target is torch.mean):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return node.kwargs.get("keepdim", False) is True and isinstance(dims, (tuple, list)) \
            and sorted(d % 4 for d in dims) == [2, 3]
    return False


def _squeeze_excitation(node: fx.Node, users: list[fx.Node], channels: int | None, modules: dict[str, nn.Module],
                        calls: dict[str, int], templates: Sequence[fx.Node] = ()
                        ) -> tuple[_Gate, fx.Node, set[fx.Node]] | None:
    """If `node`'s two users are ``node * gate`` and the gate's path from `node` (global average pooling, a 1x1
    conv from its `channels`, element-wise ops, a 1x1 conv back to `channels`, element-wise ops; or the same with
    Linear layers and reshapes between (batch, channels) and (batch, channels, 1, 1) whose sizes come from `node`;
    nothing else reads it), the gate, the multiplication and the nodes of the gate's path. `templates`: the users
    ``y.expand_as(node)`` of `node`, which must all lie on the gate's path. `channels`: `node`'s, which the gate must
    read and write (None: only that it writes as many as it reads)."""
    for mul, path_start in ((users[0], users[1]), (users[1], users[0])):
        is_mul = (mul.op == "call_function" and mul.target in _MUL_FUNCTIONS) or (
            mul.op == "call_method" and mul.target == "mul")
        if not is_mul or len(mul.all_input_nodes) != 2 or mul.kwargs or not _is_global_average_pool(path_start,
                                                                                                     modules):
            continue
        convs: list[str] = []
        path: set[fx.Node] = set()
        step = path_start
        while True:
            next_users = _value_users(step)
            gated = _self_gate(step, next_users, modules) if len(next_users) == 2 else None
            if gated is not None:  # Swish written as x * sigmoid(x) inside the gate: on from its product
                step = gated[1]
                next_users = _value_users(step)
            if len(next_users) != 1:
                break
            previous, step = step, next_users[0]
            if step is mul:
                break
            path.add(step)
            module = modules.get(str(step.target)) if step.op == "call_module" else None
            if module is not None and not _called_once_or_stateless(module, str(step.target), calls):
                break
            if module is not None and _is_producer(module) and isinstance(module, (nn.Conv2d, nn.Linear)):
                if has_computed_tensors(module) or getattr(module, "kernel_size", (1, 1)) != (1, 1) or is_grouped(
                        module):
                    break
                convs.append(str(step.target))
            elif _elementwise_op(step, previous, modules) is None and not _reshapes_pooled_channels(step, previous,
                                                                                                    node):
                break
        if step is not mul or len(convs) != 2 or not path.issuperset(templates):
            continue
        squeeze, excite = modules[convs[0]], modules[convs[1]]
        read = getattr(squeeze, "in_channels", getattr(squeeze, "in_features", None))
        written = getattr(excite, "out_channels", getattr(excite, "out_features", None))
        if read != written or (channels is not None and read != channels):
            continue
        return _Gate((convs[0], convs[1]), squeeze, excite), mul, path | {path_start}
    return None


@dataclass(frozen=True)
class _SelfGate:
    """``x * f(x)`` with `f` element-wise (Swish written as ``x * torch.sigmoid(x)``): element-wise as a whole, so a
    constant channel stays a constant one."""

    ops: tuple[Callable[[Tensor], Tensor], ...]

    def __call__(self, x: Tensor) -> Tensor:
        gate = x
        for op in self.ops:
            gate = op(gate.clone())
        return x * gate


def _elementwise_op(step: fx.Node, previous: fx.Node,
                    modules: dict[str, nn.Module]) -> Callable[[Tensor], Tensor] | None:
    """`step` as a function of `previous`, its only tensor input, when it is element-wise (None otherwise)."""
    if _tensor_args(step, previous) != [previous]:
        return None
    module = modules.get(str(step.target)) if step.op == "call_module" else None
    if module is not None:  # modules without channels of their own: free to be reused
        return module if _is_elementwise_module(module) else None
    if (step.op == "call_function" and step.target in _ELEMENTWISE_FUNCTIONS) or (
            step.op == "call_method" and step.target in _ELEMENTWISE_METHODS):
        return _function_op(step)
    return _scalar_arithmetic(step, previous)


# arithmetic with one number, each with whether the number may come first (``2 * x``)
_SCALAR_FUNCTIONS = {operator.mul: True, operator.add: True, operator.truediv: False, operator.sub: False,
                     torch.mul: True, torch.add: True, torch.div: False, torch.sub: False}
_SCALAR_METHODS = {"mul", "add", "div", "sub"}


def _scalar_arithmetic(step: fx.Node, previous: fx.Node) -> _Function | None:
    """`step` as a function of `previous` when it scales or shifts it by a number (``x * self.scale``,
    ``x / 2``, ``2 * x``): element-wise, a constant channel stays a constant."""
    if step.kwargs or len(step.args) != 2:
        return None
    if step.op == "call_function" and step.target in _SCALAR_FUNCTIONS:
        number = step.args[1] if step.args[0] is previous else step.args[0] if _SCALAR_FUNCTIONS[step.target] else None
    elif step.op == "call_method" and step.target in _SCALAR_METHODS and step.args[0] is previous:
        number = step.args[1]
    else:
        return None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        return None
    return _Function(step.target, step.op == "call_method", (number,), ())


def _self_gate(node: fx.Node, users: list[fx.Node],
               modules: dict[str, nn.Module]) -> tuple[_SelfGate, fx.Node, list[fx.Node]] | None:
    """If `node`'s two users are ``node * f(node)`` with `f` a path of element-wise ops that nothing else reads, the
    gate, the multiplication and the path's nodes."""
    for mul, path_start in ((users[0], users[1]), (users[1], users[0])):
        is_mul = (mul.op == "call_function" and mul.target in _MUL_FUNCTIONS) or (
            mul.op == "call_method" and mul.target == "mul")
        if not is_mul or len(mul.args) != 2 or mul.kwargs or node not in mul.args:
            continue
        ops: list[Callable[[Tensor], Tensor]] = []
        path: list[fx.Node] = []
        previous, step = node, path_start
        while step is not mul:
            op = _elementwise_op(step, previous, modules)
            next_users = _value_users(step)
            if op is None or len(next_users) != 1:
                break
            ops.append(op)
            path.append(step)
            previous, step = step, next_users[0]
        if step is mul and ops and set(mul.args) == {node, previous}:
            return _SelfGate(tuple(ops)), mul, path
    return None


_CONCATENATIONS = {torch.cat, torch.concat, torch.concatenate}


def _is_concatenation(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CONCATENATIONS


def _concat_parts(node: fx.Node) -> tuple[list[object], object]:
    """A concatenation's inputs and its dim, as written."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    if len(node.args) > 1:
        dim = node.args[1]
    else:
        dim = node.kwargs.get("dim", node.kwargs.get("axis", 0))
    return list(parts) if isinstance(parts, (list, tuple)) else [parts], dim


def _is_channel_dim(dim: object, producer: nn.Module, rank: int | None = None) -> bool:
    """Whether `dim` is the channel dimension of `producer`'s output, of `rank` dims where the example inputs tell:
    1 (or its negative) for a conv, the last for a Linear's features (its output may have any number of leading
    dimensions), a recurrent layer's hidden units or an embedding's dims."""
    if isinstance(producer, _CONV_LIKE):
        return dim in (1, 1 - producer.weight.dim())  # a conv's output has as many dims as its weight
    return dim == -1 or (rank is not None and dim == rank - 1)  # features last: ``dim=1`` joins 2-d outputs


def _width(node: object, conv: bool, modules: dict[str, nn.Module], dim: object) -> int | None:
    """The channels of the tensor `node` stands for, read from the graph (the layer that made it, through
    per-channel ops), or None where the graph does not tell."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        module = modules[str(node.target)]
        if isinstance(module, nn.Linear) and not conv:
            return module.out_features
        if isinstance(module, _CONV_LIKE) and conv:
            return module.out_channels
        if isinstance(module, (*_BATCH_NORM, *_INSTANCE_NORM)) and conv:
            return module.num_features
        if isinstance(module, nn.GroupNorm) and conv:
            return module.num_channels
        if isinstance(module, nn.PReLU) and conv and module.num_parameters > 1:  # a slope per channel
            return module.num_parameters
        passes = isinstance(module, (*_ELEMENTWISE_MODULES, *_DROPOUT, nn.PReLU)) or (
            conv and isinstance(module, (*_POOLING, *_AVG_POOLING)))
    elif _is_concatenation(node):
        parts, node_dim = _concat_parts(node)
        if node_dim != dim:
            return None
        widths = [_width(part, conv, modules, dim) for part in parts]
        return None if None in widths else sum(widths)  # type: ignore[arg-type]
    else:
        pooling = _POOLING_FUNCTIONS | _AVG_POOLING_FUNCTIONS if conv else set()
        passes = (node.op == "call_function" and node.target in (_ELEMENTWISE_FUNCTIONS | _DROPOUT_FUNCTIONS
                                                                   | pooling)) or (
            node.op == "call_method" and node.target in _ELEMENTWISE_METHODS) or (
            # a crop of spatial dims (x[:, :, 2:-2]) keeps the channels (slices only: any conv's rank will do)
            conv and bool(node.args) and _spatial_index(node, node.args[0], 5) == "keep")
    return _width(node.args[0], conv, modules, dim) if passes and node.args else None


def _channel_concat(cat: fx.Node, node: fx.Node, producer: nn.Module, branch: _Branch,
                    modules: dict[str, nn.Module]) -> _Concat | str:
    """Where the concatenation `cat` puts the channels `branch` carries (`node`), or why shrink cannot follow."""
    parts, dim = _concat_parts(cat)
    described = _describe(cat, modules)
    if branch.flattened:
        return f"its flattened output goes to the concatenation {described}"
    if not _is_channel_dim(dim, producer, _rank(node)):
        if isinstance(producer, _CONV_LIKE):
            along = "dim=1"
        else:  # features last (a recurrent layer's or an embedding's, spelt as its rank, passed above)
            kind = ("a Linear's features" if isinstance(producer, nn.Linear) else "an embedding's dims"
                    if isinstance(producer, _EMBEDDINGS) else "a recurrent layer's hidden units")
            along = f"dim=-1 for {kind}"
        return f"its output is concatenated along dim={dim!r} in {described}, not along its channels ({along})"
    if sum(part is node for part in parts) != 1:
        return f"its output enters the concatenation {described} more than once"
    conv = isinstance(producer, _CONV_LIKE)
    widths: list[int] = []
    for part in parts:
        width = branch.width if part is node else _width(part, conv, modules, dim)
        if width is None:
            return (f"the concatenation {described} also reads "
                    f"{_describe(part, modules) if isinstance(part, fx.Node) else repr(part)}, whose width shrink "
                    "cannot read from the graph")
        widths.append(width)
    index = next(i for i, part in enumerate(parts) if part is node)
    return _Concat(cat.name, branch.start + sum(widths[:index]), sum(widths))


def _follow(start: fx.Node, producer_name: str, modules: dict[str, nn.Module],
            calls: dict[str, int]) -> _Chain | str:
    """The chain from the producer node `start` to its consumers, or the reason there is none. Where the output
    branches, every branch must reach a consumer: a channel can only go from all of them."""
    producer = modules[producer_name]
    branches: list[_Branch] = []
    reason = _walk(start, producer, _Branch(_out_channels(producer)), branches, modules, calls)
    if reason is not None:
        return reason
    return _meet_again(branches) or _Chain(producer, branches)


def _meet_again(branches: list[_Branch]) -> str | None:
    """Why the `branches` of one producer cannot be edited one by one: two of them enter one concatenation (its
    channels would sit twice in one space, from one edit); else None. The same _Concat object on several branches
    is one concatenation before a fork; two objects of one name are two branches entering it."""
    concats = [op.name for op in _unique(op for branch in branches for op in branch.ops) if isinstance(op, _Concat)]
    twice = next((name for name in concats if concats.count(name) > 1), None)
    return None if twice is None else f"two of its branches meet again in the concatenation {twice}"


def _walk(node: fx.Node, producer: nn.Module, branch: _Branch, done: list[_Branch], modules: dict[str, nn.Module],
          calls: dict[str, int]) -> str | None:
    """Follow `branch` on from `node` to its consumer(s), appending each branch that reaches one to `done`; the
    reason a branch does not, else None."""
    is_conv = isinstance(producer, _CONV_LIKE)
    if is_conv and not branch.flattened and _rank(node) not in (None, producer.weight.dim()):
        return (f"its output on the example inputs is {_rank(node)}-d, unbatched, where shrink takes dim 1 for the "
                "channels")
    while True:
        users = _value_users(node)
        overwriting = _overwritten_then_read(node, users, modules) if len(users) > 1 else None
        if overwriting is not None:
            return (f"{_describe(overwriting, modules)} overwrites its output in place, which another branch reads "
                    "afterwards (it would see other constants than the branches shrink follows; use inplace=False "
                    "there)")
        templates = _expanded_as(node, users)  # an SE gate's y.expand_as(node), if any: on the gate's path
        found = None
        if len(users) - len(templates) == 2 and is_conv and not branch.flattened:
            found = _squeeze_excitation(node, [u for u in users if u not in templates], branch.width, modules, calls,
                                        templates)
        if is_conv and not branch.flattened:
            pooling_views = {user for user in users if _pooled_through_view(user, node, modules) is not None}
            read = _channel_count_read(node, producer.weight.dim(), (found[2] if found else set()) | pooling_views)
            if read is not None:
                return f"its channel count is read ({_describe(read, modules)}) where the width would change"
        else:
            # (a conv's channels pooled or flattened are (batch, features): dim 1 is theirs, example inputs or not)
            read = _feature_count_read(node, 2 if is_conv else None)
            if read is not None:
                return f"its feature count is read ({_describe(read, modules)}) where the width would change"
        if found is not None:
            branch.ops.append(found[0])
            node = found[1]  # on from the multiplication
            continue
        if len(users) == 2:
            gated = _self_gate(node, users, modules)
            if gated is not None:
                branch.ops.append(gated[0])
                node = gated[1]  # on from the multiplication
                continue
        if not users:
            return "its output is not used"
        if len(users) > 1:  # each user starts a branch of its own
            for user in users:
                reason = _step(user, node, producer, branch.fork(), done, modules, calls)
                if reason is not None:
                    return reason
            return None
        next_node = _step(users[0], node, producer, branch, done, modules, calls, walk_on=False)
        if not isinstance(next_node, fx.Node):
            return next_node
        node = next_node


def _through_packing(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module], is_conv: bool) -> fx.Node | str:
    """Where a branch goes on from `user`, a packing call that reads `node`: ``pack_padded_sequence(node, lengths)``
    (its PackedSequence holds `node`'s feature vectors, features last, for a recurrent layer), or the padded output
    ``pad_packed_sequence(node)[0]`` of a recurrent layer that read one, whose padding must be zeros (what a removed
    unit outputs at every step); the reason it cannot go on."""
    function = user.target.__name__
    if is_conv or not user.args or user.args[0] is not node:
        return f"its output goes to {_describe(user, modules)} other than as the sequence of feature vectors"
    if user.target is nn.utils.rnn.pack_padded_sequence:
        return user
    padding = user.kwargs.get("padding_value", user.args[2] if len(user.args) > 2 else 0.0)
    if not isinstance(padding, (int, float)) or padding != 0:
        return f"{function} pads its output with {padding!r}, not with the zeros a removed unit outputs"
    items = _value_users(user)
    if not all(_is_item(item, user, (0, 1)) for item in items):
        other = next(item for item in items if not _is_item(item, user, (0, 1)))
        return (f"the (output, lengths) pair of {function} goes to {_describe(other, modules)}, which shrink does "
                "not see through")
    sequences = [item for item in items if item.args[1] == 0]
    if len(sequences) != 1:
        return "its output is not used" if not sequences else f"the output of {function} is read twice"
    return sequences[0]


def _swaps_last_two_dims(user: fx.Node, node: fx.Node) -> bool:
    """Whether `user` swaps the last two dims of `node`, a 3-d tensor by the example inputs' shapes (``x.transpose(1,
    2)``, ``torch.transpose(x, -1, -2)``, ``x.permute(0, 2, 1)``)."""
    if _rank(node) != 3 or not user.args or user.args[0] is not node or user.kwargs:
        return False
    rest = user.args[1:]
    if (user.op == "call_method" and user.target == "transpose") or (
            user.op == "call_function" and user.target is torch.transpose):
        return len(rest) == 2 and all(type(d) is int for d in rest) and sorted(d % 3 for d in rest) == [1, 2]
    if user.op == "call_method" and user.target == "permute":
        dims = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)
        return all(type(d) is int for d in dims) and tuple(d % 3 for d in dims) == (0, 2, 1)
    return False


def _step_transposed(user: fx.Node, node: fx.Node, branch: _Branch, done: list[_Branch], modules: dict[str, nn.Module],
                     calls: dict[str, int], walk_on: bool, producer: nn.Module) -> fx.Node | str | None:
    """`_step` for a branch whose features a transpose moved to dim 1: on through element-wise ops, dropout and a
    BatchNorm1d of its channels, back through another swap, into a Conv1d that reads them (zero channels only, where
    it pads with zeros)."""
    module = modules.get(str(user.target)) if user.op == "call_module" else None
    if module is not None and not _called_once_or_stateless(module, str(user.target), calls):
        return _reuse_reason(str(user.target), modules, subject=str(user.target))
    if _swaps_last_two_dims(user, node):
        branch.transposed = False
    elif module is not None and type(module) is nn.Conv1d and not is_grouped(module) and not is_depthwise(module):
        if has_computed_tensors(module):
            return f"its consumer {user.target} is parametrized"
        if module.in_channels != branch.width or _tensor_args(user, node, modules) != [node]:
            return f"its consumer {_describe(user, modules)} does not take its channels one to one"
        branch.consumer, branch.consumer_name = module, str(user.target)
        branch.zeros_only = _pads_with_zeros(module)
        done.append(branch)
        return None
    elif isinstance(module, nn.BatchNorm1d) and module.num_features == branch.width:
        if module.running_mean is None:
            return f"{user.target} has no running statistics"
        branch.ops.append(_BatchNorm(module))
    elif (op := _elementwise_op(user, node, modules)) is not None:
        branch.ops.append(op)
    elif (module is not None and isinstance(module, _DROPOUT)) or (
            user.op == "call_function" and user.target in _DROPOUT_FUNCTIONS):
        if _drops_when_evaluated(user, modules):
            return _DROPS_WHEN_EVALUATED.format(_describe(user, modules))
        if _tensor_args(user, node, modules) != [node]:
            return f"its output meets another tensor in {_describe(user, modules)}"
    else:
        return (f"its output goes to {_describe(user, modules)} after a transpose (features in dim 1), which shrink "
                "does not see through")
    return _walk(user, producer, branch, done, modules, calls) if walk_on else user


#: Why a producer's channels stay: the model's output (a classifier's logits) is made of them.
MODEL_OUTPUT_REASON = "it produces the model's output, whose width is part of the model's interface"


def _scripted_module_called(user: fx.Node) -> str | None:
    """The name of the TorchScript module `user` calls, if it calls one: fx records ``module._c.forward(x)``."""
    if user.op == "call_method" and user.args and isinstance(user.args[0], fx.Node) \
            and user.args[0].op == "get_attr" and str(user.args[0].target).endswith("._c"):
        return str(user.args[0].target)[:-len("._c")]
    return None


def _step(user: fx.Node, node: fx.Node, producer: nn.Module, branch: _Branch, done: list[_Branch],
          modules: dict[str, nn.Module], calls: dict[str, int], walk_on: bool = True) -> fx.Node | str | None:
    """Take `branch` from `node` into its user `user`: None when `user` is the branch's consumer (the branch is then
    in `done`), the reason when the branch cannot go on, else (with `walk_on`, the rest of the branch walked: its
    outcome) `user`, to walk on from."""
    is_conv = isinstance(producer, _CONV_LIKE)
    if user.op == "output":
        return MODEL_OUTPUT_REASON
    if (scripted := _scripted_module_called(user)) is not None:  # (else: "meets another tensor", its ScriptObject)
        return f"its consumer {scripted} is a TorchScript module, which shrink does not see into"
    if branch.transposed:
        return _step_transposed(user, node, branch, done, modules, calls, walk_on, producer)
    if _swaps_last_two_dims(user, node) and not branch.flattened and (
            not is_conv or (isinstance(producer, nn.Conv1d) and _rank(node) == 3)):
        # a Linear layer's (batch, tokens, features) as a Conv1d reads them, or a Conv1d's channels last, as
        # features (a CRNN's conv front end before its LSTM): channel j is still column j of the consumer
        if is_conv:
            branch.flattened = True
        else:
            branch.transposed = True
        return _walk(user, producer, branch, done, modules, calls) if walk_on else user
    if _is_concatenation(user):
        concat = _channel_concat(user, node, producer, branch, modules)
        if isinstance(concat, str):
            return concat
        branch.ops.append(concat)
        return _walk(user, producer, branch, done, modules, calls) if walk_on else user
    if not is_conv and _keeps_zero_features(user, node):
        branch.ops.append(_ZerosOnly(str(getattr(user.target, "__name__", user.target))))  # alike in every trace
        return _walk(user, producer, branch, done, modules, calls) if walk_on else user
    if user.op == "call_function" and user.target in _PACKING:
        through = _through_packing(user, node, modules, is_conv)
        if isinstance(through, str):
            return through
        return _walk(through, producer, branch, done, modules, calls) if walk_on else through
    if is_conv and not branch.flattened and (pooled := _pooled_through_view(user, node, modules)) is not None:
        branch.flattened = True  # (batch, channels) left: features, as after a flatten; a constant stays one
        return _walk(pooled, producer, branch, done, modules, calls) if walk_on else pooled
    spatial_ndim = producer.weight.dim() if is_conv and not branch.flattened else None
    if _tensor_args(user, node, modules, spatial_ndim) != [node]:
        return f"its output meets another tensor in {_describe(user, modules)}"
    module = modules.get(str(user.target)) if user.op == "call_module" else None
    if module is not None and not _called_once_or_stateless(module, str(user.target), calls):
        return _reuse_reason(str(user.target), modules, subject=str(user.target))
    if module is not None and type(module) in RECURRENT_LAYERS:  # reads its input's last dim: features
        if has_computed_tensors(module):
            return f"its consumer {user.target} is parametrized"
        given = user.args[0] if user.args else user.kwargs.get("input")  # (called as rnn(input=x) too)
        if (is_conv and not branch.flattened) or module.input_size != branch.width or given is not node:
            return f"its consumer {_describe(user, modules)} does not take its channels one to one"
        branch.consumer, branch.consumer_name = module, str(user.target)
        branch.zeros_only = not module.bias  # a constant folds into bias_ih_l0, when there is one
        done.append(branch)
        return None
    if module is not None and _has_channels(module):
        if has_computed_tensors(module):
            return f"its consumer {user.target} is parametrized"
        if branch.flattened:
            ok = isinstance(module, nn.Linear) and module.in_features % branch.width == 0
        elif is_conv:  # a conv or transposed conv of the same number of spatial dims
            ok = (isinstance(module, _CONV_LIKE) and module.weight.dim() == producer.weight.dim()
                  and module.in_channels == branch.width)
        else:
            ok = isinstance(module, nn.Linear) and module.in_features == branch.width
        if not ok:
            return f"its consumer {_describe(user, modules)} does not take its channels one to one"
        branch.consumer, branch.consumer_name = module, str(user.target)
        branch.zeros_only = isinstance(module, _TRANSPOSED) or (isinstance(module, _CONV) and _pads_with_zeros(module))
        done.append(branch)
        return None
    if module is not None and is_depthwise(module):
        if not (is_conv and module.weight.dim() == producer.weight.dim() and not branch.flattened):
            return f"its output goes to the depthwise {_describe(user, modules)}, not of its own kind"
        if has_computed_tensors(module):
            return f"the depthwise {user.target} is parametrized"
        branch.ops.append(_Depthwise(str(user.target), module, _pads_with_zeros(module)))
    elif module is not None and isinstance(module, _BATCH_NORM) and not branch.flattened:
        if not _normalises_channels(module, is_conv, branch.width, _rank(node)):
            if module.num_features == branch.width and _rank(node):
                return (f"its output goes to {_describe(user, modules)}, which normalises dim 1 of its "
                        f"{_rank(node)}-d output (the tokens), not its features")
            if isinstance(module, nn.BatchNorm1d) and module.num_features == branch.width:
                return (f"its output goes to {_describe(user, modules)}, which normalises dim 1: a Linear layer's "
                        "features only for a 2-d input, which shrink knows given example inputs")
            return (f"its output goes to {_describe(user, modules)}, which normalises {module.num_features} entries "
                    f"of dim 1, not its {branch.width} channels")
        if module.running_mean is None:
            return f"{user.target} has no running statistics"
        branch.ops.append(_BatchNorm(module))
    elif (op := _elementwise_op(user, node, modules)) is not None:
        branch.ops.append(op)  # per element: the same before or after a flatten
    elif isinstance(module, nn.PReLU):
        # a slope per entry of dim 1: a conv's channels there; a Linear's features are its input's last dim, which
        # is dim 1 only for a 2-d input, a rank only the example inputs tell
        on_channels = is_conv or _rank(node) == 2
        if not (on_channels and not branch.flattened and module.num_parameters == branch.width):
            return (f"its output goes to {_describe(user, modules)}, whose {module.num_parameters} slopes apply to "
                    "dim 1, which shrink knows to be the channels only after a conv (or, given example inputs, "
                    "for a 2-d input)")
        branch.ops.append(_PReLU(module))
    elif (module is not None and isinstance(module, _DROPOUT)) or (
        user.op == "call_function" and user.target in _DROPOUT_FUNCTIONS
    ):
        if _drops_when_evaluated(user, modules):
            return _DROPS_WHEN_EVALUATED.format(_describe(user, modules))
        # else the identity in eval mode
    elif is_conv and not branch.flattened and _pools_constants(user, module):
        pass  # spatial pooling of a conv's channels (not of a Linear's features): a constant map stays constant
    elif is_conv and not branch.flattened and _flatten_start(user, modules) == 1:
        branch.flattened = True
    elif branch.flattened and _rank(node) in (None, 2) and _flatten_start(user, modules) == 1:
        # (batch, features) already, as after a pooling reduction: flattened again, it stays as it is (a Conv1d's
        # channels moved last, (batch, length, channels), are interleaved by it: their rank is known, 3)
        pass
    elif is_conv and not branch.flattened and (reduced := _spatial_reduction(user, producer.weight.dim())):
        branch.flattened = reduced == "all"  # (batch, channels) left: features, as after a flatten
    elif is_conv and not branch.flattened and (squeezed := _squeezed_rank(user, node)) is not None:
        branch.flattened = squeezed == 2  # (batch, channels) left: features, as after a flatten
    elif is_conv and not branch.flattened and (indexed := _spatial_index(user, node, producer.weight.dim())):
        branch.flattened = indexed == "all"  # a chomp or crop keeps a conv activation; x[:, :, -1] leaves features
    elif type(producer) in RECURRENT_LAYERS and _selects_leading_dims(user, node):
        pass  # a time step, a layer's state, a batch entry: each hidden unit keeps its value (zero, for a dead one)
    elif not is_conv and not branch.flattened and _keeps_features(user, node):
        pass  # tokens pooled or one taken: each feature keeps its constant
    elif type(producer) in RECURRENT_LAYERS and _rank(node) is None and user.target is operator.getitem:
        return (f"its output goes to {_describe(user, modules)}, an index whose dims (time, batch or units) shrink "
                "tells only from the example inputs' shapes: pass example_inputs")
    else:
        return f"its output goes to {_describe(user, modules)}, which shrink does not see through" + (
            _NO_SHAPES_HINT if _rank(node) is None and _reads_dims(user, is_conv, _weight_ndim(producer)) else "")
    return _walk(user, producer, branch, done, modules, calls) if walk_on else user


# ------------------------------------------------------------------------------------------------ the edit
@torch.no_grad()
def _constant_channels(producer: nn.Module, branch: _Branch) -> tuple[Tensor, Tensor]:
    """Which of the producer's channels reach the branch's consumer as a constant whatever the input, and that
    constant (eval mode). A channel whose producer weights are all zero outputs its bias, which the branch's
    per-channel ops (BatchNorm, activations, depthwise convs) map to other constants; a depthwise filter of zeros
    outputs its own bias whatever it reads, so its channel is constant from there on even if the producer's is not.
    After a concatenation the other inputs' channels ride along as zeros (never read: per-channel ops only)."""
    weight = producer.weight.detach()
    bias = getattr(producer, "bias", None)  # an embedding has none: its zero dims output zeros
    value = bias.detach().clone() if bias is not None else weight.new_zeros(_out_channels(producer))
    return _carried_constants(_zero_channels(producer), value, weight.dim() - 2, branch)


@torch.no_grad()
def _carried_constants(constant: Tensor, value: Tensor, spatial_dims: int, branch: _Branch) -> tuple[Tensor, Tensor]:
    """Which channels reach the branch's consumer as a constant, and that constant: `constant` marks the channels
    that leave the producer as the constants `value`, and the branch's per-channel ops map them on (see
    `_constant_channels`); `spatial_dims` is the producer output's, after the channels."""
    channels = constant.numel()
    x = value.view(1, -1, *([1] * spatial_dims))  # [1, C] for Linear, [1, C, 1, ...] for convs
    start = 0
    # channels a gate's squeeze reads other than as exact zeros: removed, its input column would go with them, so
    # no later zero depthwise filter makes them removable
    read_by_gate = torch.zeros_like(constant)
    for op in branch.ops:
        if isinstance(op, _Concat):
            offset = op.start - start  # where this input's channels (all of x) start in the concatenation
            wider = x.new_zeros(1, op.total, *x.shape[2:])
            wider[:, offset:offset + x.shape[1]] = x
            constant = torch.cat([constant.new_zeros(offset), constant,
                                  constant.new_zeros(op.total - offset - constant.numel())])
            read_by_gate = torch.cat([read_by_gate.new_zeros(offset), read_by_gate,
                                      read_by_gate.new_zeros(op.total - offset - read_by_gate.numel())])
            x, start = wider, op.start
        elif isinstance(op, _Depthwise):
            filters = op.conv.weight.detach()
            conv_bias = op.conv.bias.detach() if op.conv.bias is not None else filters.new_zeros(filters.shape[0])
            flat = x.reshape(-1)
            if op.zero_padded:  # a non-zero constant is not constant in the padded border
                constant = constant & (flat == 0)
            zero_filter = _zero_channels(op.conv)
            constant = constant | (zero_filter & ~read_by_gate)
            x = torch.where(zero_filter, conv_bias, flat * filters.reshape(filters.shape[0], -1).sum(1) + conv_bias)
            x = x.view(1, -1, *([1] * spatial_dims))
        elif isinstance(op, (_Gate, _ZerosOnly)):  # 0 * gate is 0; a constant times a varying gate is no constant
            constant = constant & (x.reshape(-1) == 0)
            if isinstance(op, _Gate):
                read_by_gate = read_by_gate | ~constant
        elif isinstance(op, nn.Module):
            was_training = op.training
            op.eval()
            try:
                x = op(x.clone())
            finally:
                op.train(was_training)
        else:
            x = op(x.clone())
    return constant[start:start + channels], x.reshape(-1)[start:start + channels]


def _keep_rows_(module: nn.Module, keep: Tensor) -> None:
    """Keep the `keep` output channels of `module` (rows; a transposed conv's and an embedding's columns)."""
    weight = module.weight.detach()
    kept = weight[:, keep] if isinstance(module, (*_TRANSPOSED, *_EMBEDDINGS)) else weight[keep]
    module.weight = nn.Parameter(kept.clone(), module.weight.requires_grad)
    if isinstance(module, _EMBEDDINGS):
        module.embedding_dim = int(keep.numel())
        return
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias.detach()[keep].clone(), module.bias.requires_grad)
    if isinstance(module, nn.Linear):
        module.out_features = int(keep.numel())
    else:
        module.out_channels = int(keep.numel())


def _keep_input_channels_(consumer: nn.Module, keep: Tensor, channels: int) -> None:
    """Keep the input columns of `consumer` that read the `keep` ones of `channels` (a flatten of a conv's output
    gives each channel a block of columns, channel-major; a transposed conv reads its inputs in dim 0; a grouped
    conv's rows of group g read its input channels of group g, as columns of their own)."""
    weight = consumer.weight.detach()
    if is_grouped(consumer):
        groups, per_group = consumer.groups, channels // consumer.groups
        rows = weight.shape[0] // groups
        keep = keep.to(weight.device)
        parts = [weight[g * rows:(g + 1) * rows][:, keep[(keep >= g * per_group) & (keep < (g + 1) * per_group)]
                                                  - g * per_group] for g in range(groups)]
        consumer.weight = nn.Parameter(torch.cat(parts).clone(), consumer.weight.requires_grad)
        consumer.in_channels = int(keep.numel())
        return
    if isinstance(consumer, _TRANSPOSED):
        kept = keep.to(weight.device)
        consumer.weight = nn.Parameter(weight[kept].clone(), consumer.weight.requires_grad)
        consumer.in_channels = int(kept.numel())
        return
    columns = torch.arange(weight.shape[1], device=weight.device).view(channels, weight.shape[1] // channels)
    kept = columns[keep.to(weight.device)].flatten()
    consumer.weight = nn.Parameter(weight[:, kept].clone(), consumer.weight.requires_grad)
    if isinstance(consumer, nn.Linear):
        consumer.in_features = int(kept.numel())
    else:
        consumer.in_channels = int(kept.numel())


def _keep_batch_norm_(bn: nn.Module, keep: Tensor) -> None:
    for name in ("weight", "bias"):
        p = getattr(bn, name)
        if p is not None:
            setattr(bn, name, nn.Parameter(p.detach()[keep].clone(), p.requires_grad))
    for name in ("running_mean", "running_var"):
        setattr(bn, name, getattr(bn, name)[keep].clone())
    bn.num_features = int(keep.numel())


def _keep_prelu_(prelu: nn.PReLU, keep: Tensor) -> None:
    prelu.weight = nn.Parameter(prelu.weight.detach()[keep].clone(), prelu.weight.requires_grad)
    prelu.num_parameters = int(keep.numel())


def keep_a_multiple_(dead: Tensor, multiple: int | None) -> None:
    """Unmark as few of the `dead` (removable) channels as leave a multiple of `multiple` kept (all, if none
    does): kernels run faster on channel counts that fill their SIMD blocks, and a channel kept changes nothing."""
    kept = int((~dead).sum())
    extra = kept_multiple(dead.numel(), kept, multiple) - kept
    if extra > 0:
        dead[dead.nonzero().flatten()[:extra]] = False


def _keep_a_multiple_evenly_(dead: Tensor, multiple: int, blocks: int) -> None:
    """:func:`keep_a_multiple_` for channels removed in equal numbers from `blocks` equal blocks (a grouped conv's
    groups): each block keeps the least count that balances them and makes the total a multiple (all, if none
    does). Unmarking the first removable channels, all in the first block, made the balance then keep every
    channel."""
    _balance_(dead, blocks)
    size = dead.numel() // blocks
    kept = size - int(dead[:size].sum())  # the same in every block, once balanced
    step = multiple // math.gcd(multiple, blocks)  # blocks * per-block kept is a multiple of `multiple`
    target = min(size, -(-kept // step) * step)
    for block in dead.view(blocks, size):  # (rows of a view: writing them writes `dead`)
        extra = target - (size - int(block.sum()))
        if extra > 0:
            block[block.nonzero().flatten()[:extra]] = False


def _keep_depthwise_(conv: nn.Module, keep: Tensor) -> None:
    _keep_rows_(conv, keep)
    conv.in_channels = conv.groups = int(keep.numel())


def _shrink_chain_(chain: _Chain, producer_name: str, keep_multiple_of: int | None = None
                   ) -> LayerShrink | str | None:
    """Remove the producer's channels that reach every consumer as constants, where the chain allows it (and the
    depthwise convs' on the way); each consumer absorbs the constants its branch delivers."""
    producer = chain.producer
    channels = _out_channels(producer)
    zero = _zero_channels(producer)
    dead = torch.ones_like(zero)
    constants: list[Tensor] = []
    for branch in chain.branches:
        constant, value = _constant_channels(producer, branch)
        if branch.zeros_only:
            # a constant channel is not constant at a zero-padded conv's border, nor through a transposed conv
            constant &= value == 0
        dead &= constant
        constants.append(value)
    ops = _unique(op for branch in chain.branches for op in branch.ops)

    def constants_reason() -> str:
        padded = [op.name for op in ops if isinstance(op, _Depthwise) and op.zero_padded]
        recurrent = [branch.consumer_name for branch in chain.branches
                     if branch.zeros_only and type(branch.consumer) in RECURRENT_LAYERS]
        padded += [branch.consumer_name for branch in chain.branches if branch.zeros_only
                   and not isinstance(branch.consumer, _TRANSPOSED) and branch.consumer_name not in recurrent]
        transposed = [branch.consumer_name for branch in chain.branches if isinstance(branch.consumer, _TRANSPOSED)]
        gates = [op.names[0] for op in ops if isinstance(op, _Gate)]
        varying = _unique(op.name for op in ops if isinstance(op, _ZerosOnly))
        places = (([f"the zero-padded conv(s) {', '.join(padded)}"] if padded else [])
                  + ([f"the transposed conv(s) {', '.join(transposed)}"] if transposed else [])
                  + ([f"the recurrent layer(s) without biases {', '.join(recurrent)}"] if recurrent else [])
                  + ([f"the gate(s) of {', '.join(gates)}"] if gates else [])
                  + ([f"the product(s) or sum(s) {', '.join(varying)}"] if varying else []))
        where = (", which have no bias to fold them into" if recurrent and len(places) == 1 else
                 ", where they are not constant (a BatchNorm held at zero for them, as the pipeline's zero_batch_norm "
                 "does, makes them zero)")
        return ("its zero channels output non-zero constants into "
                + (" and ".join(places) if places else f"ops on the way to {chain.consumer_names}") + where)

    if not bool(dead.any()):
        return constants_reason() if bool(zero.any()) else None
    held_back = bool((zero & ~dead).any())  # zero channels whose constants cannot go where they are read
    # Grouped convs, the producer or a consumer, lose channels in equal numbers per group.
    balances = [(producer.groups, 0, None)] if is_grouped(producer) else []
    for branch in chain.branches:
        if is_grouped(branch.consumer):
            start = next((op.start for op in reversed(branch.ops) if isinstance(op, _Concat)), 0)
            balances.append((branch.consumer.groups, start, branch.consumer.in_channels))
    if balances and all(offset == 0 and total in (None, channels) for _, offset, total in balances):
        # One partition into lcm(groups) equal blocks: even over those is even over each conv's groups, and keeps
        # more than balancing over each in turn (which can end with nothing left to remove)
        balances = [(math.lcm(*(groups for groups, _, _ in balances)), 0, None)]
    one_partition = len(balances) == 1 and balances[0][1:] == (0, None) and keep_multiple_of
    multiple_left_none = False
    removable = dead.clone()
    kept_for: set[str] = set()  # why removable channels stay: the report says it

    def step(cause: str, keep_: Callable[[], None]) -> None:
        was = dead & zero
        keep_()
        if not torch.equal(was, dead & zero):  # (said of zero channels: constant ones of a zero depthwise filter
            kept_for.add(cause)               # are not counted as left)

    while True:  # each step only keeps channels: it ends
        before = dead.clone()
        if one_partition:
            step("balance", lambda: _balance_(dead, balances[0][0]))  # (as the next does first: said apart)
            step("multiple", lambda: _keep_a_multiple_evenly_(dead, keep_multiple_of, balances[0][0]))
        else:
            step("multiple", lambda: keep_a_multiple_(dead, keep_multiple_of))
        multiple_left_none = multiple_left_none or (bool(before.any()) and not bool(dead.any()))
        if bool(dead.all()):
            dead[0] = False  # keep one channel: zero-width layers break exporters and some kernels
            if bool(zero[0]):
                kept_for.add("one")
        for groups, offset, total in balances:
            step("balance", lambda: _balance_(dead, groups, offset, total))
        if torch.equal(before, dead):
            break
    if multiple_left_none and not bool(dead.any()):
        return f"keeping a multiple of {keep_multiple_of} channels leaves none of its zero channels to remove"
    if balances and not bool(dead.any()):
        uneven = ("not spread evenly over the groups of the grouped conv(s) "
                  + ", ".join([producer_name] * is_grouped(producer)
                              + [b.consumer_name for b in chain.branches if is_grouped(b.consumer)])
                  + ", which must each lose as many")
        # evenly pruned, they can end uneven once those held back are left: the cause to mend is those
        return (f"{constants_reason()}; those left are {uneven}" if held_back
                else f"its zero channels are {uneven}")
    if not all(math.isfinite(float(value[dead].abs().sum())) for value in constants):
        return "its zero channels output non-finite constants"
    grouped = [producer_name] * is_grouped(producer) + [b.consumer_name for b in chain.branches
                                                        if is_grouped(b.consumer)]  # (before the edits narrow them)
    folded, through = _edit_branches_(chain.branches, constants, dead)
    _keep_rows_(producer, (~dead).nonzero().flatten())
    causes = {"multiple": f"a multiple of {keep_multiple_of} channels is kept",
              "balance": f"each group of the grouped conv(s) {', '.join(grouped)} loses as many",
              "one": "one channel is kept (a zero-width layer breaks exporters and kernels)"}
    left_reason = _left_reason(int((zero & ~removable).sum()), constants_reason,
                               int((zero & removable & ~dead).sum()), [causes[c] for c in causes if c in kept_for])
    return LayerShrink(producer_name, chain.consumer_names, channels, int((~dead).sum()), int(folded.sum()),
                       left=int((zero & ~dead).sum()), left_reason=left_reason, through=tuple(through))


def _left_reason(held: int, held_reason: Callable[[], str], kept: int, kept_for: list[str]) -> str:
    """Why a layer's zero channels (or units) stay: `held` ones for `held_reason`'s cause (their constants cannot go
    where they are read), `kept` removable ones `kept_for` those causes."""
    parts = [f"{held} because {held_reason()}"] if held else []
    if kept:
        parts.append(f"{kept} removable one(s) stay so that {' and '.join(kept_for)}")
    return "; ".join(parts)


def _edit_branches_(branches: list[_Branch], constants: list[Tensor], dead: Tensor) -> tuple[Tensor, list[str]]:
    """Remove the `dead` ones of a producer's channels from the per-channel layers on its `branches` and from their
    consumers, each folding the `constants` its branch delivers; returns which removed channels were folded (non-zero
    constants) and the layers passed through that lost channels."""
    channels = dead.numel()
    keep = (~dead).nonzero().flatten()
    remove = dead.nonzero().flatten()

    def kept_in(start: int, total: int) -> Tensor:
        """The channels kept of `total`, among which the producer's are ``[start, start + channels)``."""
        return torch.cat([torch.arange(start, device=keep.device), keep + start,
                          torch.arange(start + channels, total, device=keep.device)])

    folded = torch.zeros_like(dead)
    through: list[str] = []
    edited: set[int] = set()  # ops before a fork are on several branches
    for branch, value in zip(branches, constants):
        start, total = 0, channels
        for op in branch.ops:
            if isinstance(op, _Concat):
                start, total = op.start, op.total
            if id(op) in edited or not isinstance(op, (_BatchNorm, _PReLU, _Depthwise, _Gate)):
                continue
            edited.add(id(op))
            if isinstance(op, _BatchNorm):
                _keep_batch_norm_(op.bn, kept_in(start, total))
            elif isinstance(op, _PReLU):
                _keep_prelu_(op.prelu, kept_in(start, total))
            elif isinstance(op, _Depthwise):
                _keep_depthwise_(op.conv, kept_in(start, total))
                through.append(op.name)
            else:
                _keep_input_channels_(op.squeeze, kept_in(start, total), total)
                _keep_rows_(op.excite, kept_in(start, total))
                through += op.names
        folded |= dead & (value != 0)
        _fold_and_drop_inputs_(branch, remove + start, value[remove], kept_in(start, total), total)
    return folded, through


def _fold_and_drop_inputs_(branch: _Branch, remove: Tensor, constants: Tensor, keep: Tensor, channels: int) -> None:
    """Add what the `remove`d ones of the consumer's input `channels` contributed (the `constants` they carry) to
    the consumer's bias, then keep only the inputs that read the `keep` ones."""
    consumer = branch.consumer
    if type(consumer) in RECURRENT_LAYERS:
        keep_inputs_(consumer, keep, constants, remove)
        return
    if bool((constants != 0).any()) and is_grouped(consumer):  # an unpadded one: input channel c, group g's rows
        weight = consumer.weight.detach().double()  # summed in float64, rounded once into the bias (see below)
        per_group, rows = channels // consumer.groups, weight.shape[0] // consumer.groups
        contribution = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        for channel, constant in zip(remove.tolist(), constants.tolist()):
            group = channel // per_group
            block = weight[group * rows:(group + 1) * rows, channel - group * per_group]
            contribution[group * rows:(group + 1) * rows] += block.reshape(rows, -1).sum(1) * constant
        _add_to_bias_(consumer, contribution)
    elif bool((constants != 0).any()):  # never into a transposed conv: only zero constants are removed before one
        weight = consumer.weight.detach().double()
        # consumer inputs: channel j is column j, or columns [j*s, (j+1)*s) after flattening a conv's s positions
        per_channel = weight.shape[1] // channels if branch.flattened else 1
        columns = torch.arange(weight.shape[1], device=weight.device).view(channels, per_channel)
        removed_columns = columns[remove]  # [r, s]
        contribution = weight[:, removed_columns.flatten()].reshape(weight.shape[0], remove.numel(), per_channel, -1)
        contribution = (contribution * constants.double().view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
        _add_to_bias_(consumer, contribution)
    _keep_input_channels_(consumer, keep, channels)


def _add_to_bias_(consumer: nn.Module, contribution: Tensor) -> None:
    """Add `contribution` (float64) to `consumer`'s bias (created if it has none), rounding once to its dtype: a
    bfloat16 bias would otherwise round the sum term by term, and the shrunk model drift from the masked one."""
    weight = consumer.weight
    if consumer.bias is None:
        consumer.bias = nn.Parameter(torch.zeros(contribution.shape[0], dtype=weight.dtype, device=weight.device),
                                     weight.requires_grad)
    consumer.bias.data = (consumer.bias.data.double() + contribution).to(consumer.bias.dtype)


# torch's Transformer layers are leaf modules to fx (it does not trace into torch.nn). Their feed-forward block is a
# chain all the same: ``linear2(dropout(activation(linear1(x))))`` (the layers' ``_ff_block``), so linear1's channels
# can go. Exact types only: a subclass may have another forward.
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_TRANSFORMER_LEAVES = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder, *_TRANSFORMER_LAYERS)


def _feed_forward_chain(layer_name: str, layer: nn.Module) -> _Chain | str:
    activation = layer.activation
    if not (isinstance(activation, _ELEMENTWISE_MODULES) or activation in _ELEMENTWISE_FUNCTIONS):
        return f"the activation of {layer_name} ({activation!r}) is not one shrink knows to be element-wise"
    for part in ("linear1", "linear2"):
        if has_computed_tensors(getattr(layer, part)):
            return f"{layer_name}.{part} is parametrized"
    return _Chain(layer.linear1, [_Branch(layer.linear1.out_features, layer.linear2, f"{layer_name}.linear2",
                                          ops=[activation])])


def _producer_chains(graph: fx.Graph, modules: dict[str, nn.Module], calls: dict[str, int],
                     producers: set[str]) -> Iterator[tuple[str, _Chain | str]]:
    """Each of `producers` that the graph calls, once, in graph order (a consumer after its producer), with its
    chain to its consumer or the reason there is none; then the feed-forward blocks of torch's Transformer layers.
    Lazy: a chain is read when it is reached, after the edits of the chains before it."""
    seen: set[str] = set()
    # tensors the forward reads itself (`self.fc1.weight.abs().mean()`): narrowed, they would read otherwise
    read: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            read.setdefault(str(node.target).rpartition(".")[0], str(node.target))
    for node in graph.nodes:
        name = str(node.target)
        if node.op != "call_module" or name in seen:
            continue
        seen.add(name)
        module = modules[name]
        if name in producers:
            if calls[name] > 1:
                yield name, _reuse_reason(name, modules)
            elif has_computed_tensors(module):
                yield name, "it is parametrized (litcompress.pruning.fold_parametrizations_ first)"
            elif name in read:
                yield name, f"the forward reads its tensor {read[name]} itself, which narrowing would change"
            elif _user_hooks(module):
                yield name, "it has forward hooks, which the traced graph does not show (they may change its output)"
            else:
                chain = _follow(node, name, modules, calls)
                consumers = [] if isinstance(chain, str) else [b.consumer_name for b in chain.branches
                                                                if b.consumer_name in read]
                yield name, (f"the forward reads its consumer's tensor {read[consumers[0]]} itself, which narrowing "
                             "would change" if consumers else chain)
        elif type(module) in _TRANSFORMER_LEAVES:
            for sub_name, layer in module.named_modules():
                if type(layer) in _TRANSFORMER_LAYERS:
                    layer_name = f"{name}.{sub_name}" if sub_name else name
                    yield f"{layer_name}.linear1", ("it is called more than once" if calls[name] > 1
                                                    else _feed_forward_chain(layer_name, layer))


def _user_hooks(module: nn.Module) -> bool:
    """Whether `module` has forward hooks (pre or post) other than the pruning engine's own and torch's pruning
    masks (shrink makes those permanent before it narrows anything)."""
    from litcompress.pruning.engine import is_bypass_hook

    pre = [hook for hook in module._forward_pre_hooks.values()
           if not is_bypass_hook(hook) and not isinstance(hook, torch.nn.utils.prune.BasePruningMethod)]
    return bool(pre or module._forward_hooks)


def _selects_leading_dims(user: fx.Node, node: fx.Node) -> bool:
    """Whether `user` indexes only dims of `node` (of a rank the example inputs gave) before its last, the hidden
    units of a recurrent layer's output or state, with numbers and slices: ``out[:, -1]``, ``out[-1]``,
    ``h_n[-1]``. Each unit keeps its values (zero everywhere, for a dead one)."""
    rank = _rank(node)
    if rank is None or user.op != "call_function" or user.target is not operator.getitem or user.args[0] is not node:
        return False
    index = _leading_index(user.args[1])
    return 0 < len(index) < rank and all(
        (isinstance(i, int) and not isinstance(i, bool))
        or (isinstance(i, slice) and all(isinstance(b, (int, type(None))) for b in (i.start, i.stop, i.step)))
        for i in index)


@dataclass
class _RecurrentChain:
    """A recurrent layer and, for each of its outputs that the graph reads (the output sequence, the last hidden
    state, an LSTM's last cell state), the branches to its consumers and how many hidden units wide its last dim is
    (the directions for the output sequence, whose features are ``[forward units, backward units]``; 1 for a
    state)."""

    rnn: nn.Module
    outputs: list[tuple[list[_Branch], int]]

    @property
    def consumer_names(self) -> str:
        names = [branch.consumer_name for branches, _ in self.outputs for branch in branches]
        return ", ".join(dict.fromkeys(names))


def _is_item(node: fx.Node, source: fx.Node, indices: tuple[int, ...]) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem and node.args[0] is source
            and type(node.args[1]) is int and node.args[1] in indices)


def _recurrent_chain(node: fx.Node, name: str, modules: dict[str, nn.Module], calls: dict[str, int],
                     traces: list[_Trace]) -> _RecurrentChain | str:
    """The chain from the recurrent layer `name`'s call `node` to the consumers of its outputs, or the reason its
    hidden units cannot be removed."""
    rnn = modules[name]
    why = units_why_not(rnn)
    if why is not None:
        return why
    if calls[name] > 1:
        return _reuse_reason(name, modules)
    if has_computed_tensors(rnn):
        return "it is parametrized (litcompress.pruning.fold_parametrizations_ first)"
    # (its input by keyword, `rnn(input=x)`, or `rnn(x, None)` start from zeros too)
    if (node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")) is not None or len(node.args) > 2 or (
            node.kwargs.keys() - {"input", "hx"}):
        return "it is called with an initial state (hx), from which a zero unit does not stay zero"
    if any(name in _called_modules(trace.graph) for trace in traces[1:]):
        return "forward has bool flags, and shrink removes recurrent units only from models without them"
    directions = 2 if rnn.bidirectional else 1
    projected = is_projected(rnn)  # its output and h_n are projections: its units show in c_n only
    # the nodes of each output, by its place in the (output, state) pair: fx makes a node per index, so `hidden[0]`
    # written twice (``torch.cat((hidden[0][-2], hidden[0][-1]), dim=1)``) is two nodes of one h_n
    outputs: dict[tuple[int, ...], tuple[list[fx.Node], int]] = {}
    for user in _value_users(node):
        if not _is_item(user, node, (0, 1)):
            return f"its (output, state) pair goes to {_describe(user, modules)}, which shrink does not see through"
        if user.args[1] == 0:
            if not projected:
                outputs.setdefault((0,), ([], directions))[0].append(user)
        elif rnn.mode != "LSTM":
            outputs.setdefault((1,), ([], 1))[0].append(user)
        else:
            for inner in _value_users(user):  # (h_n, c_n)
                if not _is_item(inner, user, (0, 1)):
                    return f"its (h_n, c_n) pair goes to {_describe(inner, modules)}, which shrink does not see through"
                if inner.args[1] == 1 or not projected:
                    outputs.setdefault((1, inner.args[1]), ([], 1))[0].append(inner)
    chain = _RecurrentChain(rnn, [])
    for tensors, width in outputs.values():
        tensors = [tensor for tensor in tensors if _value_users(tensor)]
        # a state (or a unidirectional output) whose layers' and directions' entries one concatenation may join
        joined = _joined_states(tensors) if width == 1 and tensors else None
        if joined is not None:
            tensors, width = [joined[0]], joined[1]
        for tensor in tensors:
            branches: list[_Branch] = []
            reason = _walk(tensor, rnn, _Branch(width * rnn.hidden_size), branches, modules, calls)
            if reason is not None:
                return reason
            chain.outputs.append((branches, width))
    if not chain.outputs and not projected:
        return "its output is not used"
    return _meet_again([branch for branches, _ in chain.outputs for branch in branches]) or chain


def _joined_states(states: list[fx.Node]) -> tuple[fx.Node, int] | None:
    """Where a recurrent layer's state (h_n or c_n: one entry of `hidden_size` units per layer and direction), the
    `states` nodes each standing for it (``hidden[0]`` written twice is two), is read only as entries that one
    concatenation joins along the units, ``torch.cat((h[-2], h[-1]), dim=1)`` (a bidirectional layer's last forward
    and backward states): that concatenation, whose channel j is unit ``j % hidden_size``, and how many entries it
    joins; else None."""
    pairs = [(user, state) for state in states for user in _value_users(state)]
    if not pairs or not all(_selects_leading_dims(user, state) and len(_value_users(user)) == 1
                            for user, state in pairs):
        return None
    selections = [user for user, _ in pairs]
    joins = {_value_users(user)[0] for user in selections}
    if len(joins) != 1:
        return None
    (cat,) = joins
    if not _is_concatenation(cat):
        return None
    parts, dim = _concat_parts(cat)
    rank = _rank(selections[0])
    if rank is None or dim not in (-1, rank - 1) or not all(
            isinstance(part, fx.Node) and part in selections and _rank(part) == rank for part in parts):
        return None
    return cat, len(parts)


def _recurrent_chains(traced: _Traced) -> Iterator[tuple[str, _RecurrentChain | str]]:
    """Each recurrent layer (nn.LSTM, nn.GRU, nn.RNN) that the graph calls, once, with its chain or the reason its
    hidden units cannot be removed."""
    seen: set[str] = set()
    for node in traced.graph.nodes:
        name = str(node.target)
        if node.op == "call_module" and name not in seen and isinstance(traced.modules[name], RECURRENT_LAYERS):
            seen.add(name)
            yield name, _recurrent_chain(node, name, traced.modules, traced.calls, traced.traces)


def _shrink_units_(chain: _RecurrentChain, name: str, keep_multiple_of: int | None = None) -> LayerShrink | str | None:
    """Remove the recurrent layer's hidden units that output zero (:func:`zero_units`) and reach every consumer as
    constants, from the layer, the per-channel layers on its branches and its consumers (which fold the constants
    their branches make of the zeros, e.g. a sigmoid's 0.5)."""
    rnn, hidden = chain.rnn, chain.rnn.hidden_size
    zero = zero_units(rnn)
    if not bool(zero.any()):
        return None
    dead = zero.clone()
    values: list[list[Tensor]] = []
    for branches, width in chain.outputs:
        weights = rnn.weight_ih_l0  # zeros in its dtype: the ops on the branches (a BatchNorm) expect it
        values.append([])
        for branch in branches:
            constant, value = _carried_constants(zero.repeat(width).to(weights.device),
                                                 weights.new_zeros(width * hidden), 0, branch)
            if branch.zeros_only:
                constant &= value == 0
            dead &= constant.cpu().view(width, hidden).all(0)
            values[-1].append(value)
    if not bool(dead.any()):  # (said as channel_plan says it: which op makes them constants, where they go)
        branches = [branch for each, _ in chain.outputs for branch in each]
        return _zeros_made_constants(branches, "hidden units", False) or (
            f"its zero hidden units output non-zero constants into {chain.consumer_names}, where only exact zeros "
            "can go")
    removable = dead.clone()
    kept_for: list[str] = []  # why removable units stay: the report says it
    keep_a_multiple_(dead, keep_multiple_of)
    if not bool(dead.any()):
        return f"keeping a multiple of {keep_multiple_of} units leaves none of its zero units to remove"
    if not torch.equal(dead, removable):
        kept_for.append(f"a multiple of {keep_multiple_of} units is kept")
    if is_projected(rnn):  # torch's LSTM needs more units than proj_size: keep zero ones to make up the count
        least = rnn.proj_size + 1
        if keep_multiple_of:
            least = math.ceil(least / keep_multiple_of) * keep_multiple_of
        if least > int((~dead).sum()):
            kept_for.append(f"the LSTM keeps more hidden units than its proj_size ({rnn.proj_size})")
        dead[dead.nonzero().flatten()[:max(least - int((~dead).sum()), 0)]] = False
        if not bool(dead.any()):
            return (f"an LSTM needs more hidden units than its proj_size ({rnn.proj_size}), which leaves none of its "
                    "zero units to remove")
    if bool(dead.all()):
        dead[0] = False  # keep one unit: a zero-width layer breaks exporters and kernels
        keep_a_multiple_(dead, keep_multiple_of)  # (a width of 1 is no multiple)
        if not bool(dead.any()):
            return f"keeping a multiple of {keep_multiple_of} units leaves none of its zero units to remove"
        kept_for.append("one unit is kept (a zero-width layer breaks exporters and kernels)"
                        + (f", as a multiple of {keep_multiple_of}" if int((~dead).sum()) > 1 else ""))
    if not all(math.isfinite(float(value.view(-1, hidden)[:, dead].abs().sum()))
               for each in values for value in each):
        return "its zero units output non-finite constants"
    folded = torch.zeros_like(dead)
    for (branches, width), constants in zip(chain.outputs, values):
        on_branches, _ = _edit_branches_(branches, constants, dead.repeat(width))
        folded |= on_branches.view(width, hidden).any(0)
    keep_units_(rnn, (~dead).nonzero().flatten())
    left_reason = _left_reason(
        int((zero & ~removable).sum()),
        lambda: (f"its zero hidden units output non-zero constants into {chain.consumer_names}, where only exact "
                 "zeros can go"),
        int((zero & removable & ~dead).sum()), kept_for)
    return LayerShrink(name, chain.consumer_names or f"{name} (its projection)", hidden, int((~dead).sum()),
                       int(folded.sum()), left=int((zero & ~dead).sum()), left_reason=left_reason, units=True)


def _called_modules(graph: fx.Graph) -> set[str]:
    return {str(node.target) for node in graph.nodes if node.op == "call_module"}


def _unreached_reason(name: str, traces: list[_Trace], modules: dict[str, nn.Module]) -> str:
    """Why a producer that the first trace (forward's defaults) does not call keeps its channels."""
    other = next((t for t in traces[1:] if name in _called_modules(t.graph)), None)
    if other is not None:
        return (f"forward calls it only with {other.describe()}, and shrink narrows layers along forward's default "
                "path")
    return _hidden_reason(name, _called_modules(traces[0].graph), modules)


def _hidden_reason(name: str, called: set[str], modules: dict[str, nn.Module]) -> str:
    """Why a producer that no graph node calls (`called`: the names graph nodes call) keeps its channels."""
    leaf = max((t for t in called if name.startswith(t + ".")), key=len, default=None)
    module = modules.get(name)
    base = next((cls for cls in type(module).__mro__[1:] if cls.__module__.startswith("torch.nn.")), None)
    if leaf is None and base is not None and not type(module).__module__.startswith("torch."):
        if type(module).forward is base.forward:  # (state added: get_extra_state, a buffer) fx traces into it too
            return (f"{type(module).__name__} subclasses {base.__name__} (with its forward), which torch.fx traces "
                    f"into (it keeps only torch's own layers whole): pass a tracer that keeps {type(module).__name__} "
                    "as a leaf module")
        return (f"{type(module).__name__} subclasses {base.__name__} with a forward of its own, which torch.fx traces "
                "into (it keeps only torch's own layers whole): if that forward is a plain "
                f"{base.__name__}'s on its weights, pass a tracer that keeps {type(module).__name__} as a leaf module")
    if leaf is None:
        return "forward does not call it (as torch.fx traces forward)"
    kind = type(modules[leaf]).__name__
    if isinstance(modules[leaf], HeadPrunedAttention):  # prune_heads_ prunes nn.MultiheadAttention's heads only
        return (f"it is inside {leaf} ({kind}: an attention shrink already narrowed to its kept heads), whose "
                "channels are its heads' and the stream's: prune heads of the nn.MultiheadAttention it came from "
                "(prune_heads_ or PruneConfig(heads=...)) before shrinking")
    if isinstance(modules[leaf], nn.MultiheadAttention):
        return (f"it is inside {leaf} ({kind}), whose output channels are the stream's: the attention "
                "loses whole heads instead (pruned with prune_heads_ or PruneConfig(heads=...))")
    if type(modules[leaf]) in _TRANSFORMER_LEAVES:
        return (f"it is inside {leaf} ({kind}), where only the feed-forward blocks' first layers (linear1) can lose "
                "channels: the others write into the LayerNorm'd residual stream or the attention heads")
    return f"it is inside {leaf} ({kind}), which torch.fx keeps as one module: pass a tracer that traces into it"


@dataclass(frozen=True)
class ChannelPlan:
    """What one trace of a model tells about its channels: for every producer layer (Linear, Conv, grouped or
    transposed Conv), in module order, the reason `shrink` cannot remove its channels on its own (None when it
    can); the channel groups that residual additions or gating products join; and the BatchNorms on each removable
    producer's way to its consumers, each with where the producer's channels start among its channels (after a
    concatenation, past the other inputs')."""

    reasons: dict[str, str | None]
    groups: list  # list[ChannelGroup] (litcompress.pruning.groups imports this module)
    batch_norms: dict[str, dict[str, int]]
    layers: dict[str, str] = field(default_factory=dict)  # each producer described: "Conv2d 16 -> 32"
    # LSTM/GRU/RNN layers (and cells), described
    recurrent: dict[str, str] = field(default_factory=dict)
    # for each of them, why shrink cannot remove its hidden units once zero (None: it can)
    units: dict[str, str | None] = field(default_factory=dict)
    # producers whose channels go in equal numbers from each of that many groups (grouped convs, or their inputs)
    slice_groups: dict[str, int] = field(default_factory=dict)
    # producers whose channels go only when exactly zero, not as constants: a branch reaches a zero-padded conv
    # (depthwise ones on the way too) or a transposed conv, or passes an op that keeps only zeros (_ZerosOnly)
    zeros_only: frozenset = frozenset()
    # of those, the producers whose channels must be zero before any affine BatchNorm on one of their branches makes
    # them so: zero_batch_norm holds their pruned channels' biases at zero too
    zeros_before_batch_norm: frozenset = frozenset()

    def removable(self, residual_groups: bool = True) -> dict[str, str | None]:
        """`reasons`, with the producers of channel groups (residual or gated) removable when `residual_groups`
        (pruned as one)."""
        grouped = {name for group in self.groups if group.prunable
                   for name in group.producers} if residual_groups else set()
        return {name: None if name in grouped else reason for name, reason in self.reasons.items()}

    def table(self, pruned_by: str = "structured pruning with PruneConfig(removable_only=True)",
              embeddings_by: str = "with nn.Embedding among its layer_types, CLI --prune-embeddings") -> str:
        """A plain-text table: per producer, whether `shrink` can remove its pruned output channels (on its own, or
        with its residual group when the group is pruned as one) and why not; then the groups and the BatchNorms
        that zero_batch_norm holds at zero. `pruned_by`, `embeddings_by`: what prunes only those layers, and an
        embedding's dims, in the caller's terms."""
        group_of = {name: i for i, group in enumerate(self.groups, 1) if group.prunable
                    for name in (*group.producers, *group.gate_excites)}  # a gate's excite loses them too
        width = max([len(name) for name in (*self.reasons, *self.recurrent)] + [5])
        lines = [f"{'layer':<{width}}  {'kind':<24}  {'shrinks':<9}  why not"]
        for name, reason in self.reasons.items():
            verdict = ("dims" if self.layers.get(name, "").startswith("Embedding") else "yes") if reason is None \
                else f"group {group_of[name]}" if name in group_of else "no"
            lines.append(f"{name:<{width}}  {self.layers.get(name, ''):<24}  {verdict:<9}  "
                         f"{reason if verdict == 'no' else ''}".rstrip())
        for name, kind in self.recurrent.items():
            reason = self.units.get(name, CELL_REASON)
            lines.append(f"{name:<{width}}  {kind:<24}  {'no' if reason else 'units':<9}  {reason or ''}".rstrip())
        for i, group in enumerate(self.groups, 1):
            writers = [name if len(starts) == 1 else f"{name} ({len(starts)} chunks)"
                       for name, starts in group.producer_slices().items()]
            gates = f"; gated by {', '.join(group.gate_excites)}" if group.gate_excites else ""
            depthwise = f"; through the depthwise {', '.join(group.depthwise)}" if group.depthwise else ""
            if not group.prunable:  # (shrink removes such channels where a user's masks left a zero filter)
                depthwise += " (zero only where its filter is: structured pruning leaves depthwise convs dense)"
            lines.append(f"group {i}: {group.channels} channels joined by {group.describe()}, written by "
                         f"{', '.join(writers)}; read by {', '.join(group.consumers)}{gates}{depthwise}")
        held = sorted({bn for places in self.batch_norms.values() for bn in places})
        if held:
            lines.append(f"BatchNorms held at zero for pruned channels while pruning (zero_batch_norm; a group's own "
                         f"are held with it): {', '.join(held)}")
        removable = sum(reason is None or name in group_of for name, reason in self.reasons.items())
        removable += sum(self.units.get(name, CELL_REASON) is None for name in self.recurrent)
        embeddings = any(kind.startswith("Embedding") for kind in self.layers.values())
        lines.append(f"{removable} of {len(self.reasons) + len(self.recurrent)} layers can lose channels; {pruned_by} "
                     "prunes only those" + (f" (an embedding's dims: {embeddings_by})." if embeddings else "."))
        return "\n".join(lines)


def _slice_groups(chain: _Chain) -> int:
    """In how many equal groups the producer's channels must be removed: the least common multiple of its own
    groups and those of the grouped convs reading them (after a concatenation, those it puts equal numbers of the
    producer's channels in: then they are its equal blocks; others are said not removable, see
    :func:`_groups_out_of_reach`)."""
    groups = [chain.producer.groups] if is_grouped(chain.producer) else []
    width = _out_channels(chain.producer)
    for branch in chain.branches:
        if not is_grouped(branch.consumer):
            continue
        concat = next((op for op in reversed(branch.ops) if isinstance(op, _Concat)), None)
        if concat is None or len(set(_counts_per_group(concat, width, branch.consumer))) == 1:
            groups.append(branch.consumer.groups)
    return math.lcm(*groups) if groups else 1


def _one_channel_per_group(chain: _Chain) -> str | None:
    """Why none of the producer's channels can go when the groups they must be removed in (:func:`_slice_groups`)
    hold one channel each (a depthwise conv with a channel multiplier, ``Conv2d(8, 16, 3, groups=8)``, reading them):
    shrink removes as many from each group and keeps one in each; else None."""
    groups, width = _slice_groups(chain), _out_channels(chain.producer)
    if groups <= 1 or width > groups:
        return None
    by = ([f"its own {chain.producer.groups} groups"] if is_grouped(chain.producer) else []) + [
        f"the {branch.consumer.groups} groups of the grouped conv {branch.consumer_name}" for branch in chain.branches
        if is_grouped(branch.consumer)]  # (after a concatenation too: one spreading them unevenly is said before)
    return (f"its {width} channels go one to a group ({' and '.join(by)}): shrink removes as many channels from each "
            "group and keeps one in each, so none of them can go")


def _groups_out_of_reach(chain: _Chain) -> str | None:
    """Why the producer's channels can never go where a concatenation puts them among a grouped conv's inputs and
    they reach only some of its groups: shrink removes as many from each group, and a group they miss loses none
    (pruned, they would stay, at a cost in accuracy); else None."""
    width = _out_channels(chain.producer)
    for branch in chain.branches:
        concat = next((op for op in reversed(branch.ops) if isinstance(op, _Concat)), None)
        if concat is None or not is_grouped(branch.consumer):
            continue
        groups = branch.consumer.groups
        counts = _counts_per_group(concat, width, branch.consumer)
        reached = sum(count > 0 for count in counts)
        if reached < groups:
            return (f"a concatenation puts its channels among the inputs of the grouped conv {branch.consumer_name}, "
                    f"in {reached} of its {groups} groups: shrink removes as many channels from each group, and "
                    "the others lose none, so none of these can go")
        if len(set(counts)) > 1:  # structured pruning prunes equal blocks of a layer's channels, not these
            return (f"a concatenation puts its channels among the inputs of the grouped conv {branch.consumer_name} "
                    f"unevenly ({', '.join(map(str, counts))} in its {groups} groups): shrink removes as many "
                    "channels from each group, which structured pruning of this layer's channels does not aim at")
    return None


def _counts_per_group(concat: _Concat, width: int, consumer: nn.Module) -> list[int]:
    """How many of a producer's `width` channels, placed at ``concat.start`` by a concatenation, each input group of
    the grouped conv `consumer` reads."""
    size = consumer.in_channels // consumer.groups
    counts = [0] * consumer.groups
    for j in range(width):
        counts[(concat.start + j) // size] += 1
    return counts


def _zeros_made_constants(branches: Iterable[_Branch], what: str = "channels",
                          batch_norms_held: bool = True) -> str | None:
    """Why not removable, for a branch whose pruned channels (a recurrent layer's zero hidden units: `what`) reach a
    place that needs exact zeros (a zero-padded or transposed conv, a gate, a zero-padded depthwise conv, a
    recurrent layer without biases) as a non-zero constant: the value of a pruned channel is followed through the
    branch's ops (a BatchNorm held at zero, as the pipeline holds it, gives 0 again; a depthwise conv's bias a
    constant; an element-wise op its value there, e.g. sigmoid(0) = 0.5). No bias or BatchNorm held at zero makes
    such channels zero, so pruning them costs accuracy and shrink removes none. Without `batch_norms_held` (a
    recurrent layer's units, whose BatchNorms the pipeline does not hold), a BatchNorm maps a zero to its shift."""
    def reason(where: str, made_by: str) -> str:
        return (f"its zero {what} reach {where} as a non-zero constant ({made_by} makes them one), where only "
                f"exact zeros can go: no bias or BatchNorm held at zero makes them zero, so none of them can go")

    for branch in branches:
        value, made_by = 0.0, ""
        for op in branch.ops:
            if isinstance(op, _BatchNorm) and batch_norms_held:  # held at zero for the pruned channels
                value = 0.0
            elif isinstance(op, _BatchNorm):  # its shift, -mean / std * weight + bias: a constant, as a rule not 0
                value, made_by = 1.0, "a BatchNorm's shift"
            elif isinstance(op, _Depthwise):
                if op.zero_padded and value != 0:
                    return reason(f"the zero-padded depthwise conv {op.name}", made_by)
                if getattr(op.conv, "bias", None) is not None:  # a zero input channel comes out as its bias
                    value, made_by = 1.0, f"the bias of {op.name}"
            elif isinstance(op, (_Gate, _ZerosOnly)):
                if value != 0:
                    return reason("a gate" if isinstance(op, _Gate) else op.name, made_by)
            elif isinstance(op, (_Concat, _PReLU)):
                continue  # (a PReLU keeps a zero zero, and a constant a non-zero constant)
            else:
                try:
                    with torch.no_grad():
                        new = float(torch.as_tensor(op(torch.full((1, 1), value))).reshape(-1)[0])
                except Exception:  # noqa: BLE001 - not element-wise: not followed here
                    break
                if value == 0 and new != 0:
                    name = getattr(op, "target", None) or type(op).__name__
                    made_by = str(getattr(name, "__name__", name))
                value = new
        else:
            if branch.zeros_only and value != 0:
                return reason(branch.consumer_name or "its consumer", made_by)
    return None


def channel_plan(model: nn.Module, *, tracer: type[fx.Tracer] = fx.Tracer,
                 example_inputs: Tensor | tuple | None = None) -> ChannelPlan:
    """`model`'s :class:`ChannelPlan`; ValueError if the model cannot be traced. With `example_inputs`, the ranks
    they give let more chains through (a sequence model's token pooling), as in ``shrink(model, example_inputs)``."""
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    traced = _traced(model, tracer, example_inputs)
    modules, producers = traced.modules, traced.producers
    names = {id(module): name for name, module in modules.items()}
    chains = {name: traced.disagreements.get(name, chain)
              for name, chain in _producer_chains(traced.graph, modules, traced.calls, producers)}
    chains = {name: (_groups_out_of_reach(chain) or _one_channel_per_group(chain) or chain)
              if isinstance(chain, _Chain) else chain for name, chain in chains.items()}
    chains = {name: (_zeros_made_constants(chain.branches) or chain) if isinstance(chain, _Chain) else chain
              for name, chain in chains.items()}
    reasons = {name: None if isinstance(chain, _Chain) else chain for name, chain in chains.items()}
    reasons.update({name: _unreached_reason(name, traced.traces, modules) for name in producers - reasons.keys()})
    called = _called_modules(traced.graph)
    return ChannelPlan(
        reasons={name: reasons[name] for name in modules if name in reasons},
        slice_groups={name: groups for name, chain in chains.items() if isinstance(chain, _Chain)
                      and (groups := _slice_groups(chain)) > 1},
        groups=traced.groups,
        batch_norms={name: {names[id(bn)]: start for bn, start in chain.batch_norms.items()}
                     for name, chain in chains.items() if isinstance(chain, _Chain) and chain.batch_norms},
        # (a gate too: its zero channels must be zero where the gate's excitation reads them)
        zeros_only=frozenset(name for name, chain in chains.items() if isinstance(chain, _Chain) and any(
            branch.zeros_only or any((isinstance(op, _Depthwise) and op.zero_padded)
                                     or isinstance(op, (_ZerosOnly, _Gate)) for op in branch.ops)
            for branch in chain.branches)),
        zeros_before_batch_norm=frozenset(name for name, chain in chains.items() if isinstance(chain, _Chain) and any(
            branch.needs_zeros_before_a_batch_norm for branch in chain.branches)),
        layers={name: _describe_layer(modules[name]) for name in modules if name in reasons},
        recurrent={name: f"{type(m).__name__} {m.input_size} -> {m.hidden_size}" for name, m in model.named_modules()
                   if isinstance(m, (nn.RNNBase, nn.RNNCellBase))},
        # (a chain whose zero units become constants where only zeros can go keeps them, as shrink does)
        units={**{name: chain if isinstance(chain, str) else _zeros_made_constants(
                      [branch for branches, _ in chain.outputs for branch in branches], "hidden units", False)
                  for name, chain in _recurrent_chains(traced)},
               **{name: _hidden_reason(name, called, modules) for name, m in modules.items()
                  if isinstance(m, RECURRENT_LAYERS) and name not in called}},
    )


CELL_REASON = ("a recurrent cell, called once per time step: shrink removes the hidden units of nn.LSTM, nn.GRU and "
               "nn.RNN layers only; unstructured pruning prunes its weights")


def _describe_layer(module: nn.Module) -> str:
    if isinstance(module, _EMBEDDINGS):
        return f"{type(module).__name__} {module.num_embeddings} x {module.embedding_dim}"
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features} -> {module.out_features}"
    groups = f", {module.groups} groups" if is_grouped(module) else ""
    return f"{type(module).__name__} {module.in_channels} -> {module.out_channels}{groups}"


def removable_channels(model: nn.Module, *, residual_groups: bool = True, tracer: type[fx.Tracer] = fx.Tracer,
                       example_inputs: Tensor | tuple | None = None) -> dict[str, str | None]:
    """For every producer layer (Linear, Conv, grouped or transposed Conv) of `model`, in module order: None where
    `shrink` can remove its output channels once they are zero (a consumer takes them one to one, it is a
    Transformer layer's ``linear1``, or, with `residual_groups`, it writes into a channel group joined by residual
    additions or a gating product, whose layers lose a channel together), else the reason it cannot. ValueError if
    the model cannot be traced.

    Structured pruning of the other layers masks channels that stay: it costs accuracy and saves nothing.
    `example_inputs` (one batch, as ``shrink`` takes it) gives the shapes some chains need: a squeeze after an
    adaptive pool, a sequence model's token pooling; without them such layers are said not removable.
    """
    return channel_plan(model, tracer=tracer, example_inputs=example_inputs).removable(residual_groups)


def _group_decides(chain_reason: str) -> bool:
    """Whether a producer's chain reason is only where its channels meet the rest of their group (a sum, a product,
    the parts of a chunk, a GLU's halves), which the group reads through: the group's own reason says why it kept
    them."""
    return chain_reason.startswith("its output meets another tensor") or (
        chain_reason.startswith("its output goes to") and any(f" {op}," in chain_reason or f" {op} " in chain_reason
                                                              for op in ("chunk", "split", "glu")))


def _group_kept_reason(group: Any, keep_multiple_of: int | None, zero_channels: Tensor) -> str:
    """Why a channel group's producer lost nothing: the group removes only what is exactly zero in its space (the
    chain's own reason, "meets another tensor in add/mul", names the join, not the cause); keep_multiple_of kept
    the channels that are (`zero_channels`: those of its space), or the one channel every layer keeps."""
    joined = f"{', '.join(dict.fromkeys(group.producers))}, joined by {group.describe()}"  # (a chunk's: one layer)
    zeros = int(zero_channels.sum())
    if zeros:
        if zeros == zero_channels.numel() == 1:
            return (f"its one channel is zero, and a layer keeps one channel at least (zero-width layers break "
                    f"exporters and some kernels) ({joined})")
        if keep_multiple_of is not None and keep_multiple_of > 1:
            return (f"keeping a multiple of {keep_multiple_of} channels leaves none of its group's {zeros} zero "
                    f"channels to remove ({joined})")
    return (f"its channels leave with its group ({joined}) only "
            "where the group's channel space is exactly zero (in every writer of a sum, in either factor of a "
            "product), and none is: prune the group as one, and a pruned row with a non-zero bias outputs a "
            "constant, which a group does not fold (hold the biases at zero, as the pipeline does)")


def eval_outputs(model: nn.Module, example_inputs: tuple) -> object:
    """`model`'s outputs on `example_inputs` in eval mode, without gradients. Each module's mode is restored (a
    BatchNorm kept in eval mode inside a training model stays so)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return model(*copied(example_inputs))
    finally:
        for module, training in modes:
            module.training = training


def _leaves(output: object) -> list[object]:
    """The tensors (and other values) of a model output, nested tuples/lists/dicts/dataclasses flattened in order."""
    if isinstance(output, (tuple, list)):
        return [leaf for item in output for leaf in _leaves(item)]
    if isinstance(output, dict):
        return [leaf for key in output for leaf in (key, *_leaves(output[key]))]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):  # its == would compare tensors
        return [type(output), *(leaf for f in dataclasses.fields(output)
                                for leaf in (f.name, *_leaves(getattr(output, f.name))))]
    return [output]


def max_output_difference(a: object, b: object) -> float:
    """Largest absolute difference between two outputs; inf when their structure or shapes differ."""
    leaves_a, leaves_b = _leaves(a), _leaves(b)
    if len(leaves_a) != len(leaves_b):
        return math.inf
    worst = 0.0
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            if x.shape != y.shape:
                return math.inf
            if x.numel():
                if not torch.equal(x.isnan(), y.isnan()):  # max() would drop a NaN: NaN where the other is not
                    return math.inf
                difference = (x.double() - y.double()).abs()
                # equal infinities (inf - inf is NaN) and NaN in both places differ by nothing
                difference = difference.masked_fill((x == y) | x.isnan(), 0.0)
                worst = max(worst, float(difference.max()))
        elif x != y:
            return math.inf
    return worst


def _scale(output: object) -> float:
    """Largest finite absolute value among the output's tensors (an -inf of masked logits sets no scale)."""
    return max((float(x.double().abs().nan_to_num(0.0, 0.0, 0.0).max()) for x in _leaves(output)
                if isinstance(x, Tensor) and x.numel()), default=0.0)


def _scale_where_they_differ(reference: object, other: object) -> float:
    """Largest finite absolute value of `reference` where `other` differs from it: entries equal in both (a
    sentinel such as -1e9 filling masked logits) set no scale, which would let any difference elsewhere pass."""
    worst = 0.0
    for x, y in zip(_leaves(reference), _leaves(other)):
        if isinstance(x, Tensor) and isinstance(y, Tensor) and x.shape == y.shape and x.numel():
            differs = (x != y) & x.isfinite()
            if bool(differs.any()):
                worst = max(worst, float(x.double().abs()[differs].max()))
    return worst


# Folding a removed channel's constant into the next bias changes where the sums round: in bfloat16 or float16 by
# about one unit of the last place of the output (measured: at most 1.1 eps on 7-layer MLPs). The check allows this
# many, so a half-precision model is not refused for its own rounding.
ROUNDING_EPS = 8
# The largest rtol the refusal suggests as rounding's (bfloat16's eps is 0.0078): a larger difference is the forward's
_ROUNDING_RTOL = 1e-2


def _outputs_drawing_alike(model: nn.Module, example_inputs: object) -> object:
    """``eval_outputs`` with the random streams seeded alike at every call, the caller's left as they were: a dropout
    left on in eval mode (Monte Carlo dropout, which keeps its layer's channels) draws the same masks before and
    after the shrink, so that the check compares what the shrink changed."""
    cuda = sorted({t.device.index or 0 for t in itertools.chain(model.parameters(), model.buffers())
                   if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(0)
        return eval_outputs(model, example_inputs)


def _rounding_floor(output: object) -> float:
    """The relative difference that rounding alone can make in `output`: ``ROUNDING_EPS`` times the machine epsilon
    of its least precise floating-point tensor (negligible for float32: 1e-6)."""
    return max((ROUNDING_EPS * torch.finfo(x.dtype).eps for x in _leaves(output)
                if isinstance(x, Tensor) and x.is_floating_point()), default=0.0)


def shrink_(
    model: nn.Module,
    example_inputs: Tensor | tuple | None = None,
    *,
    rtol: float = 1e-4,
    tracer: type[fx.Tracer] = fx.Tracer,
    keep_multiple_of: int | None = None,
) -> ShrinkReport:
    """Remove `model`'s all-zero output channels in place (see the module docstring); returns what was done.

    Pruning re-parametrisations are made permanent first. Parameters of edited layers are replaced, so build the
    optimizer after shrinking. With `example_inputs`, the outputs (eval mode) before and after are compared and a
    difference above ``rtol`` times the largest output raises ``ValueError`` (use `shrink`, which works on a copy,
    to keep the model intact in that case); for bfloat16 or float16 outputs the bound is at least ``ROUNDING_EPS``
    times their dtype's epsilon (folding constants into biases rounds them anew). Give them: what the traced graph
    cannot show, the check catches (``h += y`` is traced as a new tensor ``h + y``, so a branch that reads ``h``
    through another name afterwards looks as if it read the old values). `tracer` can be a
    ``torch.fx.Tracer`` subclass that keeps more modules as leaves. With `keep_multiple_of`, each layer keeps a
    multiple of that many channels (a few removable ones stay): a depthwise conv with a count that does not fill its
    SIMD blocks can run slower than before.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"shrink expects an nn.Module, got {type(model).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if isinstance(rtol, bool) or not (isinstance(rtol, numbers.Real) and rtol >= 0):  # (numpy's float32 taken)
        raise ValueError(f"rtol must be a number >= 0, got {rtol!r}")
    rtol = float(rtol)
    keep_multiple_of = check_channel_multiple(keep_multiple_of, "shrink")  # (numpy's int64(8) taken)
    lazy = lazy_parameter_names(model)
    if lazy:  # lazy layers (nn.LazyLinear) have no weights until their first call
        if example_inputs is None:
            raise ValueError(f"shrink: {', '.join(lazy[:3])}{', ...' if len(lazy) > 3 else ''} belong to lazy layers "
                             "never called, whose weights have no shape yet: pass example_inputs (or call the model "
                             "once first).")
        eval_outputs(model, example_inputs)
    before = _count_parameters(model)
    refuse_tied_holders_computing_otherwise(model, "shrink")
    make_permanent_(model)
    reference = _outputs_drawing_alike(model, example_inputs) if example_inputs is not None else None
    # Groups and flag disagreements are decided before any edit: a depthwise conv left with one channel looks like an
    # ungrouped conv. The chain edits below change no residual space's width (a space's producers end no chain).
    # With flags, forward's paths in all their combinations: a layer loses channels only where every path agrees.
    try:
        traced = _traced(model, tracer, example_inputs)
    except ValueError as error:  # the user needs the original message and what to do
        if isinstance(model, (nn.RNNBase, nn.MultiheadAttention)):  # ("shrink the sub-module that holds the layers"
            # was advice for a model that is the layer)
            what = "units" if isinstance(model, nn.RNNBase) else "heads"
            raise ValueError(
                f"shrink: the model is itself an nn.{type(model).__name__}, whose forward torch.fx cannot trace "
                f"({error}); shrink removes a layer's {what} inside a model whose forward calls it: shrink that "
                "model" + (" (a bare recurrent layer's units are its outputs, which shrink keeps)."
                           if what == "units" else ".")
            ) from error.__cause__
        raise ValueError(
            f"shrink needs a model torch.fx can trace, and {error}. Shrink the traceable sub-module that holds the "
            "layers instead, or pass a tracer that keeps the untraceable parts as leaf modules."
        ) from error.__cause__
    modules, traces, producers, groups = traced.modules, traced.traces, traced.producers, traced.groups
    graph, calls, disagreements = traced.graph, traced.calls, traced.disagreements

    from litcompress.pruning.groups import exactly_zero_channels, remove_zero_group_channels_

    layers: list[LayerShrink] = []
    kept: list[tuple[str, str]] = []
    reached: set[str] = set()
    for name, chain in _producer_chains(graph, modules, calls, producers):
        reached.add(name)
        chain = disagreements.get(name, chain)  # a chain, or a group's producer, that another path disagrees with
        if isinstance(chain, str):
            if bool(_zero_channels(modules[name]).any()):
                kept.append((name, chain))
            continue
        outcome = _shrink_chain_(chain, name, keep_multiple_of)
        if isinstance(outcome, LayerShrink):
            layers.append(outcome)
        elif isinstance(outcome, str):
            kept.append((name, outcome))
    kept += [(name, _unreached_reason(name, traces, modules)) for name in modules
             if name in producers - reached and bool(_zero_channels(modules[name]).any())]
    # Recurrent layers lose the hidden units that output zero (their consumers' inputs were narrowed above, if any).
    for name, chain in _recurrent_chains(traced):
        reached.add(name)
        outcome = chain if isinstance(chain, str) else _shrink_units_(chain, name, keep_multiple_of)
        if isinstance(outcome, LayerShrink):
            layers.append(outcome)
        elif isinstance(outcome, str) and units_why_not(modules[name]) is None and bool(zero_units(
                modules[name]).any()):
            kept.append((name, outcome))
    kept += [(name, _hidden_reason(name, _called_modules(graph), modules)) for name, module in modules.items()
             if isinstance(module, RECURRENT_LAYERS) and name not in reached and units_why_not(module) is None
             and bool(zero_units(module).any())]
    # Channel spaces joined by residual additions or gating products lose the channels that are exactly zero
    # wherever they are read.
    grouped = remove_zero_group_channels_(model, groups, keep_multiple_of)
    layers += grouped
    handled = {layer.name for layer in grouped}
    group_of = {producer: group for group in groups for producer in group.producers}
    kept = [(name, _group_kept_reason(group_of[name], keep_multiple_of, exactly_zero_channels(modules, group_of[name]))
             if name in group_of and _group_decides(reason) else reason)
            for name, reason in kept if name not in handled]
    # A conv none of the passes above reached (a depthwise one that no narrowed layer writes into, a grouped transposed
    # one) keeps its zero output channels: said, rather than left out of the report.
    said = {name for name, _ in kept} | {n for layer in layers for n in (layer.name, *layer.through)}
    kept += [(name, _unremoved_conv_reason(module)) for name, module in modules.items()
             if isinstance(module, _CONV_LIKE) and name not in said and isinstance(getattr(module, "weight", None),
                                                                                  Tensor)
             and bool(_zero_channels(module).any())]
    # Last: an attention is replaced by another module, and the tracing above saw the original.
    heads, heads_kept = remove_zero_heads_(model, keep_multiple_of)
    report = ShrinkReport(tuple(layers), tuple(kept + heads_kept), before, _count_parameters(model), tuple(heads))
    if example_inputs is not None:
        shrunk = [layer.name for layer in layers] + [f"{head.name} ({head.removed} heads)" for head in heads]
        try:
            after = _outputs_drawing_alike(model, example_inputs)
        except Exception as error:  # a shape shrink misread (a rank the graph does not show): say so, not torch's
            raise ValueError(
                f"the shrunk model fails on the example inputs ({type(error).__name__}: {error}): its forward "
                f"depends on a layer's width in a way the traced graph does not show. Shrunk: {shrunk}."
            ) from error
        difference = max_output_difference(reference, after)
        scale = _scale_where_they_differ(reference, after)
        if not difference <= max(rtol * max(scale, 1.0), _rounding_floor(reference) * scale):
            # the rtol that would take it, said only where half-precision rounding can explain it (a width-dependent
            # forward that halved the outputs was told "rtol=1 takes this one")
            needed = (10.0 ** math.ceil(math.log10(difference / max(scale, 1.0)))
                      if math.isfinite(difference) else math.inf)
            raise ValueError(
                f"the shrunk model's outputs differ from the original's by {difference:.3g} (more than rtol={rtol} "
                f"of the largest output it changed): its forward probably depends on a layer's width (a hard-coded "
                f"shape, size() arithmetic, a width read as an attribute, a forward hook). Shrunk: {shrunk}." + (
                    " Attentions lost heads: one returning its attention weights (need_weights=True, torch's "
                    "default) averages them over its kept heads only; a TransformerEncoder given a "
                    "src_key_padding_mask in eval mode takes torch's nested-tensor path only with torch's own "
                    "attention, which outputs zeros at the padded positions (the narrowed one computes them; the "
                    "other positions are unchanged). Compare those outputs without them (need_weights=False, the "
                    "padded positions masked)." if heads else "")
                # an entry rounds by the eps of the sums it came from, which may be larger than itself (0.0096 moved
                # by 0.000114 in float16, its sums 0.2): the bound cannot tell that from a width-dependent change
                # in a small output beside large ones (it took the outputs' largest, and let 50% errors through)
                + (f" In {_half_dtype_names(reference)}, an output smaller than the sums it comes from can move by "
                   "their rounding alone: if the difference is that small, pass a larger rtol (rtol="
                   f"{needed:g} takes this one)." if _half_dtype_names(reference) and needed <= _ROUNDING_RTOL else "")
            )
    return report


def _half_dtype_names(output: object) -> str:
    """The half-precision dtypes among `output`'s tensors, as a message names them ('' without one)."""
    return " and ".join(sorted({str(x.dtype).removeprefix("torch.") for x in _leaves(output)
                                if isinstance(x, Tensor) and x.dtype in (torch.float16, torch.bfloat16)}))


def following_batch_norms(model: nn.Module, *, tracer: type[fx.Tracer] = fx.Tracer,
                          example_inputs: Tensor | tuple | None = None) -> dict[str, list[str]]:
    """For each producer (Linear, Conv, grouped or transposed Conv) whose channels `shrink` can remove, the names of the
    BatchNorms on its way to its consumers; producers without one are left out. ValueError if the model cannot be
    traced.

    Zeroing a BatchNorm's scale and shift for the channels whose filters are pruned makes those channels exactly
    zero (not a constant), which `shrink` removes even before a zero-padded convolution. After a concatenation the
    producer's channel j is the BatchNorm's channel ``start + j``: ``channel_plan(model).batch_norms`` gives each
    BatchNorm's `start`. A Linear layer's BatchNorm1d counts where `example_inputs` show it a 2-d input (on
    (batch, tokens, features) it normalises the tokens), as in ``shrink(model, example_inputs)``.
    """
    plan = channel_plan(model, tracer=tracer, example_inputs=example_inputs)
    return {name: list(places) for name, places in plan.batch_norms.items()}


def shrink(
    model: nn.Module,
    example_inputs: Tensor | tuple | None = None,
    *,
    rtol: float = 1e-4,
    tracer: type[fx.Tracer] = fx.Tracer,
    keep_multiple_of: int | None = None,
) -> ShrinkResult:
    """A shrunk deep copy of `model` and its report; `model` itself is not changed (see `shrink_`)."""
    if not isinstance(model, nn.Module):  # before the copy, which would fail on it with an AttributeError
        raise TypeError(f"shrink expects an nn.Module, got {type(model).__name__}")
    copied = eager_copy(model)  # fx traces eager modules, not torch.compile'd ones
    report = shrink_(copied, example_inputs, rtol=rtol, tracer=tracer, keep_multiple_of=keep_multiple_of)
    return ShrinkResult(copied, report)


__all__ = ["ChannelPlan", "LayerShrink", "ShrinkReport", "ShrinkResult", "channel_plan", "following_batch_norms",
           "is_depthwise", "is_grouped", "removable_channels", "shrink", "shrink_"]
