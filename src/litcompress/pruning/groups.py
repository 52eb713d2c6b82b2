"""Channel groups across residual additions and gating products: prune them together, then remove them with
`shrink`.

In ``y = relu(x + bn2(conv2(h)))`` the channels of ``x`` (the stem's or the previous block's output) and of
``conv2`` are one channel space: a channel can only leave the model if it leaves every layer that writes into the
space (the *producers*), every BatchNorm on the way, and every layer that reads from it (the *consumers*: the next
blocks' first convolutions, the classifier). :func:`residual_groups` finds these spaces in a ``torch.fx`` graph;
:func:`prune_groups_` prunes the same output channels in all producers of a group (ranked by the sum of their
norms), and :func:`remove_zero_group_channels_` removes the channels that are exactly zero in the whole space.

A gated feed-forward block, ``w2(silu(w1(x)) * w3(x))`` (SwiGLU, GeGLU: the MLP of LLaMA-style Transformers), is
such a space too, joined by a multiplication: ``w1`` and ``w3`` write into it and ``w2`` reads it. A channel of a
product is zero when either factor's is, so a channel zero in ``w1`` alone leaves ``w3`` and ``w2`` as well. A
fused ``w13`` whose output is chunked in two (``a, b = w13(x).chunk(2, dim=-1)``) writes both factors: its rows
``j`` and ``hidden + j`` are the group's channel ``j``, and leave together.

Exactly zero, not constant: a residual stream feeds zero-padded convolutions, where a constant channel does not
fold into a bias. With ``zero_batch_norm`` (the pipeline's default) a pruned channel's BatchNorm shift is held at
zero, so a group's pruned channels are exactly zero after ReLU-like activations (which map 0 to 0).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import Tensor, fx, nn

from litcompress.pruning.engine import (apply_mask_, check_fraction, check_keep_multiple_of, effective_tensor,
                                        trainable_tensor)
from litcompress.pruning.parametrizations import has_computed_tensors
from litcompress.pruning.schedules import structured_pruned_count
from litcompress.pruning.shrink import (_AVG_POOLING, _AVG_POOLING_FUNCTIONS, _BATCH_NORM, _DROPOUT,
                                        _DROPOUT_FUNCTIONS, _POOLING, _POOLING_FUNCTIONS, _TRANSPOSED,
                                        _VALUE_KEEPING_METHODS, LayerShrink, _called_once_or_stateless,
                                        _elementwise_op, _expanded_as, _flatten_start, _Gate, _is_producer,
                                        _keep_batch_norm_, _keep_depthwise_, _keep_input_channels_, _keep_rows_,
                                        _keeps_features, _normalises_channels, _rank, _reads_shape_only,
                                        _pooled_through_view, _scalar_arithmetic, _self_gate, _spatial_index,
                                        _spatial_reduction,
                                        _squeeze_excitation, _squeezed_rank, _takes_channel_count, _traced,
                                        _value_users, is_depthwise, keep_a_multiple_)

# Element-wise ops that map 0 to 0: an exactly-zero channel stays exactly zero through them.
_ZERO_PRESERVING_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                            nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Identity)
_ZERO_PRESERVING_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
                              F.mish, torch.tanh, F.tanh, F.hardtanh, F.hardswish}
_ZERO_PRESERVING_METHODS = {"relu", "relu_", "tanh", *_VALUE_KEEPING_METHODS}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}
_CHUNK_FUNCTIONS = {torch.chunk}
_CONV_NDIM = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}  # a conv activation's dims: batch, channels, spatial

# When a channel of a space is exactly zero at some node, as an expression over the space's layers:
# ("producer", name): zero rows and bias; ("batch_norm", name, x): x zero and the BatchNorm maps 0 to 0;
# ("all", x, ...): every term zero (a sum); ("any", x, ...): one term zero (a product); ("input", name): the model's
# input, never known to be zero; ("never", width): an op that does not keep zeros (sigmoid(x)), never known to be
# zero either; ("chunk", name, start, width): the producer's output channels start..start + width zero (one of the
# parts its output is chunked into).
ZeroRule = tuple


@dataclass(frozen=True)
class ChannelGroup:
    """One channel space joined by residual additions or gating products."""

    producers: tuple[str, ...]  # write into the space (their output channels)
    batch_norms: tuple[str, ...]  # per-channel, inside the space
    consumers: tuple[str, ...]  # read from it (their input channels, or a flatten's blocks of columns)
    channels: int
    # where the space's channels start among each BatchNorm's (after a concatenation); empty: 0 for all
    batch_norm_starts: tuple[int, ...] = ()
    # when a channel is zero wherever the consumers read the space (a ZeroRule); None: zero in every producer and
    # every BatchNorm, right for sums only
    zero_when: ZeroRule | None = None
    joined_by: tuple[str, ...] = ("addition",)  # "addition" (residual), "multiplication" (gating product)
    # where each producer's channels start among its outputs: a layer chunked into several parts of the space is
    # listed once per part (a fused w13 twice, at 0 and hidden); empty: 0 for all, each listed once
    producer_starts: tuple[int, ...] = ()
    # the excite layers of squeeze-and-excitation gates on the space (x * gate(x), as in SE-ResNets): they write a
    # factor for each channel, and lose the rows of the channels that go (their squeeze layers are consumers)
    gate_excites: tuple[str, ...] = ()
    # depthwise convs inside the space (a Conformer's after its GLU): channel j to channel j, they lose the filters
    # of the channels that go
    depthwise: tuple[str, ...] = ()

    def producer_slices(self) -> dict[str, list[int]]:
        """Each producer with the starts of its parts in the space, in order."""
        starts = self.producer_starts or (0,) * len(self.producers)
        slices: dict[str, list[int]] = {}
        for name, start in zip(self.producers, starts):
            slices.setdefault(name, []).append(start)
        return {name: sorted(found) for name, found in slices.items()}

    @property
    def prunable(self) -> bool:
        """Whether pruning the producers' channels can make the group's channels zero: not where only a zero
        depthwise filter does (after a sigmoid), which structured pruning leaves dense (its channels are the layer's
        before it)."""
        return self.zero_when is None or _can_be_zero(self.zero_when, by_depthwise_filters=False)

    @property
    def gated(self) -> bool:
        """Whether a multiplication joins the space."""
        return "multiplication" in self.joined_by

    def describe(self) -> str:
        """How the space is joined, for reports."""
        kinds = {"addition": "residual additions", "multiplication": "a gating product (element-wise multiplication)"}
        return " and ".join(kinds[kind] for kind in self.joined_by)


@dataclass
class _Space:
    channels: int
    kind: type | None  # the producers' class (None: the model's input)
    producers: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # per producer: where its part starts among its outputs
    batch_norms: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    joined: bool = False  # an addition or a multiplication merged spaces
    blocked: bool = False  # something other than the ops below touches it
    joined_by: set[str] = field(default_factory=set)  # "addition", "multiplication"
    read: list[ZeroRule] = field(default_factory=list)  # the ZeroRule of what each consumer reads
    excites: list[str] = field(default_factory=list)  # squeeze-and-excitation gates' excite layers on the space
    depthwise: list[str] = field(default_factory=list)  # depthwise convs inside the space

    @property
    def is_conv(self) -> bool:
        return self.kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _joining_op(node: fx.Node) -> str | None:
    """"all" for an addition (a sum's channel is zero when all terms' are), "any" for a multiplication (when one
    factor's is), else None."""
    if node.kwargs:
        return None
    if node.op == "call_function":
        return "all" if node.target in _ADD_FUNCTIONS else "any" if node.target in _MUL_FUNCTIONS else None
    if node.op == "call_method":
        return "all" if node.target in _ADD_METHODS else "any" if node.target in _MUL_METHODS else None
    return None


_SCALING = {operator.mul, torch.mul, operator.truediv, torch.div, "mul", "div"}


def _scales_by_a_number(node: fx.Node) -> bool:
    """``x * c``, ``c * x`` or ``x / c`` with `c` a non-zero number (residual scaling, ``x + 0.1 * f(x)``): a zero
    channel stays zero (a shift by a number, which shrink's chains pass too, does not keep it)."""
    tensors = node.all_input_nodes
    op = _scalar_arithmetic(node, tensors[0]) if len(tensors) == 1 else None
    return op is not None and op.target in _SCALING and op.rest[0] != 0


def _clamps_zero_away(node: fx.Node, module: nn.Module | None) -> bool:
    """A hardtanh whose bounds leave out 0 (``Hardtanh(0.1, 2.0)`` maps 0 to 0.1): its zero channels are constants."""
    if isinstance(module, nn.Hardtanh):
        bounds = (module.min_val, module.max_val)
    elif module is None and node.op == "call_function" and node.target is F.hardtanh:
        given = dict(zip(("min_val", "max_val"), node.args[1:3])) | {
            k: v for k, v in node.kwargs.items() if k in ("min_val", "max_val")}
        bounds = (given.get("min_val", -1.0), given.get("max_val", 1.0))
    else:
        return False
    return not all(isinstance(b, (int, float)) for b in bounds) or not bounds[0] <= 0 <= bounds[1]


def _passes_through(node: fx.Node, module: nn.Module | None, is_conv: bool) -> bool:
    """A per-channel op that keeps an exactly-zero channel exactly zero."""
    if _clamps_zero_away(node, module):
        return False
    if module is not None:
        return isinstance(module, (*_ZERO_PRESERVING_MODULES, *_DROPOUT)) or (
            is_conv and isinstance(module, (*_POOLING, *_AVG_POOLING)))  # pooling zeros gives zeros, padded or not
    if _scales_by_a_number(node):
        return True
    if node.op == "call_function":
        return node.target in _ZERO_PRESERVING_FUNCTIONS or node.target in _DROPOUT_FUNCTIONS or (
            is_conv and node.target in _POOLING_FUNCTIONS | _AVG_POOLING_FUNCTIONS)
    return node.op == "call_method" and node.target in _ZERO_PRESERVING_METHODS


def _channel_chunks(node: fx.Node, producer: nn.Module) -> int | None:
    """How many equal parts ``chunk`` splits `node` (a layer's output, its only use) into along the channels: dim -1
    of a Linear's output, dim 1 of a conv's; None for anything else. ``split`` with sizes is left out: its sizes are
    written in the code, and would not follow the layer's new width."""
    if not ((node.op == "call_method" and node.target == "chunk") or
            (node.op == "call_function" and node.target in _CHUNK_FUNCTIONS)):
        return None
    args = list(node.args[1:]) + [node.kwargs[k] for k in ("chunks", "dim") if k in node.kwargs]
    if len(args) == 1:
        args.append(0)  # chunk's default dim
    if len(args) != 2 or not all(isinstance(a, int) for a in args):
        return None
    chunks, dim = args
    channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    if chunks < 2 or channels % chunks or dim != (-1 if isinstance(producer, nn.Linear) else 1):
        return None
    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
               for u in users) or sorted(u.args[1] for u in users) != list(range(chunks)):
        return None  # each part taken once, by index
    return chunks


def residual_groups(model: nn.Module, *, tracer: type[fx.Tracer] = fx.Tracer,
                    example_inputs: Tensor | tuple | None = None) -> list[ChannelGroup]:
    """The channel spaces of `model` that residual additions or gating products (the element-wise product of two
    layers' outputs of one width) join, and that can lose channels as a whole.

    A space is left out when anything other than a Linear/ungrouped Conv (called once), a BatchNorm, a
    zero-preserving activation, a scaling by a number (``x + 0.1 * f(x)``), dropout, a conv's pooling, a flatten into
    a Linear or another addition or multiplication within the space touches it: the model's input or output, a
    concatenation, a product with a tensor from elsewhere (a learned scale), a normalisation over channels. An
    element-wise op that does not keep zeros (the sigmoid of a GLU, ``a * sigmoid(b)``) leaves channels never known to
    be zero: through a product with a factor that keeps them, the space stays; a space read only through such ops is
    left out. ValueError if the model cannot be traced. With `example_inputs`, whose ranks tell a Linear layer's
    features from its tokens, a space of Linear features goes through a BatchNorm1d on a 2-d input too, as in
    ``shrink(model, example_inputs)``.
    """
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    return _traced(model, tracer, example_inputs).groups


def _residual_groups(graph: fx.Graph, modules: dict[str, nn.Module], calls: dict[str, int]) -> list[ChannelGroup]:
    parent: list[int] = []  # union-find over spaces: an addition merges two
    spaces: list[_Space] = []

    def new(space: _Space) -> int:
        parent.append(len(parent))
        spaces.append(space)
        return parent[-1]

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def block(i: int) -> None:
        spaces[find(i)].blocked = True

    def merge(a: int, b: int, joined_by: str) -> int:
        """One space of the roots `a` and `b` (a residual addition or a gating product joins them); its root."""
        if a != b:
            parent[b] = a
            merged, other = spaces[a], spaces[b]
            merged.producers += other.producers
            merged.starts += other.starts
            merged.batch_norms += other.batch_norms
            merged.consumers += other.consumers
            merged.read += other.read
            merged.excites += other.excites
            merged.depthwise += other.depthwise
            merged.blocked = merged.blocked or other.blocked
            merged.joined_by |= other.joined_by
        spaces[a].joined = True
        spaces[a].joined_by.add(joined_by)
        return a

    space_of: dict[fx.Node, int] = {}
    rule_of: dict[fx.Node, ZeroRule] = {}  # when a channel of the node's value is zero
    flattened: set[fx.Node] = set()
    chunked: list[list[int]] = []  # the spaces of each chunked layer's parts
    handled: set[fx.Node] = set()  # chunk and getitem nodes, made spaces with their layer
    # x * f(x) with f element-wise (Swish written as x * sigmoid(x)): zero where x is zero, whatever f(0) is; the
    # product takes x's space, and f's path (which nothing else reads) is passed over
    self_gated: dict[fx.Node, fx.Node] = {}
    # x * excite(act(squeeze(pool(x)))), a squeeze-and-excitation gate: zero where x is zero too; the product takes
    # x's space, the squeeze layer reads it, the excite layer loses the rows of its channels
    excited: dict[fx.Node, tuple[fx.Node, _Gate]] = {}
    for node in graph.nodes:
        users = _value_users(node)
        gated = _self_gate(node, users, modules) if len(users) == 2 else None
        if gated is not None:
            self_gated[gated[1]] = node
            handled.update(gated[2])
        templates = _expanded_as(node, users)
        if len(users) - len(templates) == 2:
            found = _squeeze_excitation(node, [u for u in users if u not in templates], None, modules, calls,
                                        templates)
            if found is not None:
                excited[found[1]] = (node, found[0])
                handled.update(found[2])
    # x.view(x.size(0), x.size(1), -1).mean(-1), a global pool through a view that reads the channel count: the
    # view's reduction, by the view (the count read only by the view)
    pooled_views = {node: reduction for node in graph.nodes if node.op == "call_method" and node.args
                    and isinstance(node.args[0], fx.Node)
                    and (reduction := _pooled_through_view(node, node.args[0], modules)) is not None}
    view_reductions = set(pooled_views.values())
    for node in graph.nodes:
        inputs = [a for a in node.all_input_nodes if a in space_of]
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        once = module is None or _called_once_or_stateless(module, str(node.target), calls)
        if node.op == "placeholder":  # the model's input keeps its width
            space_of[node] = new(_Space(0, None, blocked=True))
            rule_of[node] = ("input", node.name)  # blocks its space: never evaluated
            continue
        if node.op == "output":  # so does its output
            for a in inputs:
                block(space_of[a])
            continue
        if module is not None and _is_producer(module) and not isinstance(module, _TRANSPOSED):
            # a weight computed by a parametrization or a weight-norm hook (a TCN's weight_norm convs) would be
            # computed again at its full width: such a layer keeps its channels, in and out
            editable = once and not has_computed_tensors(module)
            for a in inputs:
                space = spaces[find(space_of[a])]
                width = module.in_features if isinstance(module, nn.Linear) else module.in_channels
                # channels are dim 1: a space is read by a layer of its producers' kind (a Linear on a conv's output
                # would read its last spatial dim), a flattened conv space by a Linear over blocks of columns
                if editable and ((a in flattened and isinstance(module, nn.Linear) and space.channels
                              and width % space.channels == 0)
                             or (a not in flattened and width == space.channels and type(module) is space.kind)):
                    space.consumers.append(str(node.target))
                    space.read.append(rule_of[a])
                else:
                    block(space_of[a])
            out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            users = list(node.users)
            chunks = _channel_chunks(users[0], module) if len(users) == 1 else None
            if len(users) == 1 and _is_glu(users[0], module, modules):
                # F.glu(x, dim) = a * sigmoid(b) for the halves a, b of the channels: one space, zero where a is
                width = out // 2
                value, gate = (new(_Space(width, type(module), [str(node.target)], [start], blocked=not editable))
                               for start in (0, width))
                space_of[users[0]] = merge(value, gate, "multiplication")
                rule_of[users[0]] = ("chunk", str(node.target), 0, width)
                chunked.append([value, gate])
                handled.add(users[0])
            elif chunks is None:
                space_of[node] = new(_Space(out, type(module), [str(node.target)], [0], blocked=not editable))
                rule_of[node] = ("producer", str(node.target))
            else:  # each part is a space of its own, written by the layer's rows start..start + width
                width = out // chunks
                parts = []
                for part in sorted(users[0].users, key=lambda u: u.args[1]):
                    start = part.args[1] * width
                    space_of[part] = new(_Space(width, type(module), [str(node.target)], [start], blocked=not editable))
                    rule_of[part] = ("chunk", str(node.target), start, width)
                    parts.append(space_of[part])
                chunked.append(parts)
                handled.update({users[0], *users[0].users})
            continue
        if node in handled:
            continue
        if node in self_gated and self_gated[node] in space_of:
            source = self_gated[node]
            space_of[node], rule_of[node] = find(space_of[source]), rule_of[source]
            if source in flattened:
                flattened.add(node)
            continue
        if node in excited and excited[node][0] in space_of:
            source, gate = excited[node]
            space = spaces[find(space_of[source])]
            if space.is_conv and source not in flattened and space.channels == gate.excite.weight.shape[0]:
                space.consumers.append(gate.names[0])
                space.read.append(rule_of[source])
                space.excites.append(gate.names[1])
                space_of[node], rule_of[node] = find(space_of[source]), rule_of[source]
            else:
                block(space_of[source])
            continue
        if not inputs:
            continue  # constants, attribute reads: nothing of a space
        if _reads_shape_only(node):
            space = spaces[find(space_of[inputs[0]])]
            ndim = _CONV_NDIM[space.kind] if space.is_conv and inputs[0] not in flattened else None
            if not _takes_channel_count(node, ndim, handled | pooled_views.keys()):
                # x.size(0) in pool(x).view(x.size(0), -1), x.size()[2:] in F.avg_pool2d(x, x.size()[2:]), sizes
                # only a gate's reshapes use: nothing of the space's channels
                continue
        joining = _joining_op(node)
        if joining and len(inputs) == 2 and len(node.args) == 2 and all(a in space_of for a in node.args):
            a, b = (find(space_of[x]) for x in inputs)
            if (spaces[a].channels, spaces[a].kind, inputs[0] in flattened) != \
                    (spaces[b].channels, spaces[b].kind, inputs[1] in flattened):
                block(a)  # broadcasting, not one channel space
                block(b)
            space_of[node] = merge(find(a), b, "addition" if joining == "all" else "multiplication")
            rule_of[node] = _combined(joining, (rule_of[x] for x in inputs))
            if inputs[0] in flattened:
                flattened.add(node)
            continue
        source = inputs[0]
        root = find(space_of[source])
        convs = spaces[root].is_conv and source not in flattened
        if len(inputs) == 1 and once and isinstance(module, _BATCH_NORM) and source not in flattened \
                and module.affine and module.running_mean is not None \
                and _normalises_channels(module, convs, spaces[root].channels, _rank(source)):
            spaces[root].batch_norms.append(str(node.target))
            space_of[node] = root
            rule_of[node] = ("batch_norm", str(node.target), rule_of[source])
        elif len(inputs) == 1 and once and convs and module is not None and is_depthwise(module) \
                and module.weight.dim() == _CONV_NDIM.get(spaces[root].kind) \
                and module.in_channels == spaces[root].channels and not has_computed_tensors(module):
            # channel j from channel j: zero where its input is (or its filter), and its bias
            spaces[root].depthwise.append(str(node.target))
            space_of[node] = root
            rule_of[node] = ("depthwise", str(node.target), rule_of[source])
        elif len(inputs) == 1 and once and _passes_through(node, module, convs):
            space_of[node] = root
            rule_of[node] = rule_of[source]
            if source in flattened:
                flattened.add(node)
        elif len(inputs) == 1 and convs and (node in pooled_views or node in view_reductions):
            # the view keeps each channel's values together (batch, channels, positions); its reduction pools them:
            # (batch, channels) left, read as features, as after a flatten
            space_of[node] = root
            rule_of[node] = rule_of[source]
            if node in view_reductions:
                flattened.add(node)
        elif len(inputs) == 1 and (convs or source in flattened) and _flatten_start(node, modules) == 1:
            # a conv's channels become features; (batch, features) already, as after x.mean((2, 3)), stay as they are
            space_of[node] = root
            rule_of[node] = rule_of[source]
            flattened.add(node)
        elif len(inputs) == 1 and convs and (reduced := _spatial_reduction(node, _CONV_NDIM[spaces[root].kind])):
            # global pooling written as a reduction, x.mean((2, 3)): a zero channel averages to zero
            space_of[node] = root
            rule_of[node] = rule_of[source]
            if reduced == "all":  # (batch, channels) left: read as features, as after a flatten
                flattened.add(node)
        elif len(inputs) == 1 and convs and (squeezed := _squeezed_rank(node, source)) is not None:
            # pool(x).squeeze(-1).squeeze(-1), as the example inputs' shapes tell
            space_of[node] = root
            rule_of[node] = rule_of[source]
            if squeezed == 2:
                flattened.add(node)
        elif len(inputs) == 1 and convs and (indexed := _spatial_index(node, source, _CONV_NDIM[spaces[root].kind])):
            # a chomp or crop of spatial dims (x[:, :, :-2]), or one position of each (x[:, :, -1])
            space_of[node] = root
            rule_of[node] = rule_of[source]
            if indexed == "all":
                flattened.add(node)
        elif len(inputs) == 1 and spaces[root].kind is nn.Linear and source not in flattened \
                and _keeps_features(node, source):
            # a stream of Linear features pooled over tokens (x.mean(1), the class token), as the example inputs'
            # ranks tell: a zero feature stays zero
            space_of[node] = root
            rule_of[node] = rule_of[source]
        elif len(inputs) == 1 and _elementwise_op(node, source, modules) is not None:
            # an element-wise op that does not keep zeros (the sigmoid of a GLU's a * sigmoid(b)): its channels are
            # never known to be zero, which a product with a factor that can be zero makes no matter
            space_of[node] = root
            rule_of[node] = ("never", spaces[root].channels)
            if source in flattened:
                flattened.add(node)
        else:  # a concatenation, a product with a tensor from elsewhere, a normalisation over channels, a shape read
            for a in inputs:
                block(space_of[a])
    for parts in chunked:  # a layer's rows leave by the group's channel: all its parts must be in one group
        if len({find(part) for part in parts}) > 1:
            for part in parts:
                block(part)
    return [ChannelGroup(tuple(space.producers), tuple(space.batch_norms), tuple(space.consumers), space.channels,
                         zero_when=_combined("all", space.read), joined_by=tuple(sorted(space.joined_by)),
                         producer_starts=tuple(space.starts) if any(space.starts) else (),
                         gate_excites=tuple(space.excites), depthwise=tuple(space.depthwise))
            for i, space in enumerate(spaces)
            if find(i) == i and space.joined and not space.blocked and space.producers and space.consumers
            and _can_be_zero(_combined("all", space.read))]


def _can_be_zero(rule: ZeroRule, by_depthwise_filters: bool = True) -> bool:
    """Whether some weights make a channel zero by `rule`: not where a consumer reads an op that is never known to
    keep zeros (``sigmoid(x)`` on its own), whose group could lose no channel. `by_depthwise_filters`: whether a zero
    depthwise filter counts (shrink's masks may hold one; structured pruning never prunes depthwise convs)."""
    kind, *terms = rule
    if kind == "never":
        return False
    if kind == "depthwise":  # a zero filter and bias: a zero channel, whatever comes in
        return by_depthwise_filters or _can_be_zero(terms[1], by_depthwise_filters)
    if kind in ("all", "any"):
        return (all if kind == "all" else any)(_can_be_zero(term, by_depthwise_filters) for term in terms)
    return True


def _is_glu(node: fx.Node, producer: nn.Module, modules: dict[str, nn.Module]) -> bool:
    """``F.glu(x, dim)`` or ``nn.GLU(dim)`` of a layer's output `x` (its only use) over its channels: dim -1 of a
    Linear's output, dim 1 of a conv's, an even number of them."""
    if node.op == "call_function" and node.target is F.glu:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    elif node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.GLU):
        dim = modules[str(node.target)].dim
    else:
        return False
    channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    return channels % 2 == 0 and dim == (-1 if isinstance(producer, nn.Linear) else 1)


def _rows(weight: Tensor) -> Tensor:
    return weight.reshape(weight.shape[0], -1)


def _output_rows(module: nn.Module, weight: Tensor) -> Tensor:
    """`weight` (of `module`) as one row per output channel: a transposed conv keeps them in dim 1."""
    return _rows(weight.transpose(0, 1) if isinstance(module, _TRANSPOSED) else weight)


@torch.no_grad()
def prune_groups_(model: nn.Module, groups: list[ChannelGroup], sparsity: float, norm: float = 2,
                  keep_multiple_of: int | None = None) -> int:
    """Prune ``round(sparsity * channels)`` output channels of each group in all its producers at once: those with
    the smallest sum over producers of the norm of their rows (channels pruned before rank lowest and stay); with
    `keep_multiple_of`, the channels kept are rounded up to a multiple of it. Returns how many channels were newly
    pruned, over all groups."""
    # 1.5 returned more channels than the groups hold, 1.0 zeroed whole residual streams
    sparsity = check_fraction(sparsity, "prune_groups_", "sparsity", "each group's channels")
    keep_multiple_of = check_keep_multiple_of(keep_multiple_of, torch_prune.LnStructured)
    modules = dict(model.named_modules())
    newly = 0
    for group in groups:
        slices = group.producer_slices()
        weights = {p: effective_tensor(modules[p], "weight") for p in slices}
        importance = sum(torch.linalg.vector_norm(_rows(weights[p])[start:start + group.channels], ord=norm, dim=1)
                         for p, starts in slices.items() for start in starts)
        count = structured_pruned_count(group.channels, sparsity, keep_multiple_of)
        if count <= 0:
            continue
        before = int((importance == 0).sum())
        pruned = torch.argsort(importance, stable=True)[:count]
        for producer, starts in slices.items():
            mask = torch.ones_like(weights[producer])
            for start in starts:
                mask[pruned + start] = 0
            apply_mask_(modules[producer], "weight", mask)
        newly += max(count - before, 0)
    return newly


@torch.no_grad()
def zero_group_batch_norms_(model: nn.Module, groups: list[ChannelGroup]) -> None:
    """Zero the BatchNorm scale and shift, and the producers' (and depthwise convs') biases, of every channel whose
    rows are zero in all of its group's producers."""
    BatchNormZeroer(model, groups).refresh().apply_()


class BatchNormZeroer:
    """Holds the BatchNorm scale and shift of pruned channels at zero while training, and the producers' (and the
    group's depthwise convs') biases of those channels, so that they output exactly zero (a group without
    BatchNorms, such as two biased Linear layers added or multiplied, has only the biases to hold). Which channels
    are pruned is read from the producers' weights by :meth:`refresh` (after a pruning round: it multiplies out every
    mask); :meth:`apply_` only writes the zeros, cheap enough for every optimizer step.

    `biases`: per group, whether its producers' biases are held too (default: all). A lone layer before a BatchNorm
    needs no bias held, and one whose output also goes elsewhere keeps it: shrink folds that constant.
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], *, biases: list[bool] | None = None) -> None:
        modules = dict(model.named_modules())
        if biases is None:
            biases = [True] * len(groups)
        if len(biases) != len(groups):
            raise ValueError(f"BatchNormZeroer: {len(biases)} biases flags for {len(groups)} groups.")
        # per group: each producer's part (module, start), its BatchNorms with their starts, its channels, the flag
        self._groups: list[tuple[list[tuple[nn.Module, int]], list[tuple[nn.Module, int]], int, bool,
                                 list[nn.Module]]] = []
        for g, hold_biases in zip(groups, biases):
            starts = g.batch_norm_starts or (0,) * len(g.batch_norms)
            parts = [(modules[p], start) for p, found in g.producer_slices().items() for start in found]
            self._groups.append((parts, [(modules[b], start) for b, start in zip(g.batch_norms, starts)],
                                 g.channels, hold_biases, [modules[d] for d in g.depthwise]))
        # each parameter (BatchNorm scale and shift, producer bias) with the entries to hold at zero
        self._zeroed: list[tuple[Tensor, Tensor]] = []

    @torch.no_grad()
    def refresh(self) -> BatchNormZeroer:
        """Re-read which channels are zero in all of a group's producers (returns self)."""
        self._zeroed = []
        for parts, batch_norms, channels, hold_biases, depthwise in self._groups:
            dead = torch.stack([(_output_rows(p, effective_tensor(p, "weight"))[start:start + channels] == 0).all(1)
                                for p, start in parts]).all(0)
            if bool(dead.any()):
                entries = dead.nonzero().flatten()
                # after a concatenation, the producer's channels start past the other inputs' in the BatchNorm
                for bn, start in batch_norms:
                    at = (entries + start).to(bn.weight.device)
                    self._zeroed += [(bn.weight, at), (bn.bias, at)]
                # a pruned bias is computed from its _orig: hold that
                self._zeroed += [(trainable_tensor(p, "bias"), (entries + start).to(p.bias.device))
                                 for p, start in parts if hold_biases and isinstance(getattr(p, "bias", None), Tensor)]
                # a depthwise conv inside the group adds its bias to the zero channel
                self._zeroed += [(trainable_tensor(d, "bias"), entries.to(d.bias.device))
                                 for d in depthwise if hold_biases and isinstance(getattr(d, "bias", None), Tensor)]
        return self

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero the entries of the channels found by the last :meth:`refresh`."""
        for parameter, entries in self._zeroed:
            parameter[entries] = 0.0


def _zero_producer_channels(producer: nn.Module) -> Tensor:
    dead = (_rows(producer.weight.detach()) == 0).all(dim=1).cpu()
    if producer.bias is not None:
        dead &= (producer.bias.detach() == 0).cpu()
    return dead


def _batch_norm_keeps_zero(bn: nn.Module) -> Tensor:
    """True for the channels a BatchNorm maps 0 to 0 (eval mode)."""
    shift = bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return (shift == 0).cpu()


def _combined(kind: str, terms: Iterable[ZeroRule]) -> ZeroRule:
    """("all"|"any", *terms), nested terms of the same kind flattened and repeats dropped (a residual stream's
    readers see ever longer sums of the same layers); one term stands for itself."""
    flat: list[ZeroRule] = []
    for term in terms:
        for part in (term[1:] if term[0] == kind else (term,)):
            if part not in flat:
                flat.append(part)
    return flat[0] if len(flat) == 1 else (kind, *flat)


def _zero_by_rule(modules: dict[str, nn.Module], rule: ZeroRule, known: dict[ZeroRule, Tensor]) -> Tensor:
    if rule not in known:
        kind, *terms = rule
        if kind == "input":
            raise ValueError(f"a channel group reads the model's input {terms[0]}, whose channels cannot go")
        if kind == "never":
            known[rule] = torch.zeros(terms[0], dtype=torch.bool)
        elif kind == "producer":
            known[rule] = _zero_producer_channels(modules[terms[0]])
        elif kind == "chunk":
            start, width = terms[1:]
            known[rule] = _zero_producer_channels(modules[terms[0]])[start:start + width]
        elif kind == "depthwise":  # zero in (or a zero filter) and no bias: zero out, padded or not
            conv = modules[terms[0]]
            filters = (_rows(conv.weight.detach()) == 0).all(1).cpu()
            known[rule] = (_zero_by_rule(modules, terms[1], known) | filters) & (
                True if conv.bias is None else (conv.bias.detach() == 0).cpu())
        elif kind == "batch_norm":  # zero in, zero out; or a scale and shift of zero, whatever comes in
            bn = modules[terms[0]]
            zeroed = ((bn.weight.detach() == 0) & (bn.bias.detach() == 0)).cpu()
            known[rule] = (_zero_by_rule(modules, terms[1], known) & _batch_norm_keeps_zero(bn)) | zeroed
        else:
            values = torch.stack([_zero_by_rule(modules, term, known) for term in terms])
            known[rule] = values.all(0) if kind == "all" else values.any(0)
    return known[rule]


def exactly_zero_channels(modules: dict[str, nn.Module], group: ChannelGroup) -> Tensor:
    """True for the channels that are zero wherever the consumers read the space (with `zero_when`: a product's
    channel is zero when one factor's is; without: zero rows and biases in every producer, and every BatchNorm maps
    zero to zero)."""
    if group.zero_when is not None:
        return _zero_by_rule(modules, group.zero_when, {})
    dead = torch.ones(group.channels, dtype=torch.bool)
    for name, starts in group.producer_slices().items():
        for start in starts:
            dead &= _zero_producer_channels(modules[name])[start:start + group.channels]
    for name in group.batch_norms:
        dead &= _batch_norm_keeps_zero(modules[name])
    return dead


@torch.no_grad()
def remove_zero_group_channels_(model: nn.Module, groups: list[ChannelGroup],
                                keep_multiple_of: int | None = None) -> list[LayerShrink]:
    """Remove each group's exactly-zero channels from its producers, BatchNorms and consumers (in place); with
    `keep_multiple_of`, as few stay as leave a multiple of it."""
    modules = dict(model.named_modules())
    done = []
    for group in groups:
        dead = exactly_zero_channels(modules, group)
        if bool(dead.all()):
            dead[0] = False  # keep one channel: zero-width layers break exporters and some kernels
        keep_a_multiple_(dead, keep_multiple_of)  # (after: the one channel kept above counts towards the multiple)
        if not bool(dead.any()):
            continue
        keep = (~dead).nonzero().flatten()
        slices = group.producer_slices()
        for name, starts in slices.items():  # a chunked layer keeps the channel in each of its parts
            rows = torch.cat([keep + start for start in starts])
            _keep_rows_(modules[name], rows.to(modules[name].weight.device))
        for name in group.batch_norms:
            _keep_batch_norm_(modules[name], keep.to(modules[name].weight.device))
        for name in group.consumers:
            _keep_input_channels_(modules[name], keep, group.channels)
        for name in group.gate_excites:
            _keep_rows_(modules[name], keep.to(modules[name].weight.device))
        for name in group.depthwise:
            _keep_depthwise_(modules[name], keep.to(modules[name].weight.device))
        count = len(group.consumers)
        readers = f"{'gated' if group.gated else 'residual'} group, {count} reader{'' if count == 1 else 's'}"
        done += [LayerShrink(name, readers, group.channels * len(starts), int(keep.numel()) * len(starts), 0)
                 for name, starts in slices.items()]
        done += [LayerShrink(name, f"{readers} (gate)", group.channels, int(keep.numel()), 0)
                 for name in group.gate_excites]
    return done


__all__ = ["BatchNormZeroer", "ChannelGroup", "prune_groups_", "remove_zero_group_channels_", "residual_groups",
           "zero_group_batch_norms_"]
