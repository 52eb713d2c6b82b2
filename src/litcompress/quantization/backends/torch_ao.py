"""torch.ao.quantization backend (FX graph mode static, eager dynamic).

torch.ao.quantization is deprecated in torch but is still the fast int8 path on
x86 CPUs; everything that touches it lives in this module so that its removal
breaks this backend only. Its deprecation warnings are silenced locally.
"""

from __future__ import annotations

import contextlib
import json
import operator
import re
import traceback
import warnings
import weakref
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import Embedding as QuantizedEmbedding
from torch.ao.nn.quantized import EmbeddingBag as QuantizedEmbeddingBag

from litcompress._inputs import copied
from litcompress.pruning.engine import deepcopy_model
from litcompress.pruning.shrink import eval_outputs

from ..config import Recipe
from ..outputs import RebuiltOutputs, Structure, tensor_leaves_of, untraceable_structure
from ..tracing import numbers_read_from_constants, taking_only_inputs_, tracer_warnings_that_matter
from . import (RECURRENT_LAYERS, Backend, BackendUnavailableError, ExportError, FixedDimError, Inputs,
               _reads_weight_tensors, check_free_dims, cpu_has_vnni, is_quantizable_embedding,
               is_quantizable_embedding_bag, is_quantizable_recurrent, nonfloat_input_error)

METADATA_FILE = "litcompress.json"
OUTPUTS_FILE = "litcompress_outputs.json"  # the output structure, when the script returns its tensors flat


@contextlib.contextmanager
def _quiet_torch_ao() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quant_min and quant_max.*")
        warnings.filterwarnings("ignore", message=".*torch.quantize_per_tensor.*")
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


# torch.ao's dynamic int8 Linear has a `weight()` method instead of a tensor, so the Linears of modules that read
# their weight tensors directly stay fp32 (pytorch/pytorch#109987).

def _inside_fx_leaves(model: nn.Module) -> set[str]:
    """The layers inside a torch.nn module that FX traces as one call (``nn.TransformerEncoderLayer``,
    ``nn.MultiheadAttention``): static FX quantization never reaches them, so naming them fp32 changes nothing."""
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    inside: set[str] = set()
    for name, module in model.named_modules():
        # (a bare nn.Module() holding layers has no forward: never called, its layers are called one by one)
        if name and type(module).__module__.startswith("torch.nn") and not isinstance(module, containers) \
                and type(module).forward is not nn.Module.forward:
            inside |= {f"{name}.{sub}" for sub, _ in module.named_modules() if sub}
    return inside


class TorchAOBackend(Backend):
    """Static int8 via FX graph mode (convolutions + Linear), dynamic int8 via ``quantize_dynamic`` (Linear, LSTM, GRU
    and the recurrent cells; embedding tables as int8 rows)."""

    name = "torch_ao"
    approaches = ("dynamic", "static")
    artifact_suffix = ".pt"
    takes_torchscript = False  # (quantize_dynamic and FX swap nn.Linear/Conv modules)

    def __init__(self) -> None:
        # each candidate's checked trace, what its file holds: timed in its place (see timed_form)
        self._traces: weakref.WeakKeyDictionary[nn.Module, torch.jit.ScriptModule] = weakref.WeakKeyDictionary()

    def quantizable_layers(self, model: nn.Module, approach: str) -> list[str]:
        if approach != "dynamic":  # FX calls torch.nn's modules as one op: the layers inside them stay float
            inside = _inside_fx_leaves(model)
            return [name for name in super().quantizable_layers(model, approach) if name not in inside]
        from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings

        read = _with_tied_layers(model, _reads_weight_tensors(model))  # their weights are read, not called
        # quantize_dynamic swaps a child module whose type its mapping holds: a subclass of nn.Linear stays fp32, and
        # so does the model itself (a bare nn.Linear or nn.LSTM): a search over such layers returned an fp32 model
        # as int8
        swapped = get_default_dynamic_quant_module_mappings()
        return [name for name in super().quantizable_layers(model, approach) if name and name not in read
                and type(model.get_submodule(name)) in swapped and not _bias_less_recurrent(model.get_submodule(name))]

    def fp32_with(self, model: nn.Module, layers: Sequence[str]) -> set[str]:
        """A layer kept in fp32 keeps those tied to it too (:func:`_with_tied_layers`)."""
        return _with_tied_layers(model, set(layers))

    def takes_scripted_parts(self, approach: str) -> bool:
        return approach == "dynamic"  # quantize_dynamic swaps the eager layers around them (FX cannot trace them)

    def check_available(self) -> None:
        try:
            with _quiet_torch_ao():
                import torch.ao.quantization  # noqa: F401
                from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx  # noqa: F401
        except ImportError as exc:  # removed from a future torch
            raise BackendUnavailableError(
                f"torch_ao backend: torch.ao.quantization is not available in torch {torch.__version__} "
                f"({exc}); use backends=('onnxruntime', 'pt2e')."
            ) from exc
        # The packed int8 weights follow the process-wide engine, which we leave to the user.
        if torch.backends.quantized.engine not in ("x86", "fbgemm", "onednn"):
            raise BackendUnavailableError(
                f"torch_ao backend: quantized engine {torch.backends.quantized.engine!r} is not an x86 "
                "engine; set torch.backends.quantized.engine = 'x86' (qnnpack is slower than fp32 on x86)."
            )

    def recipes(self, approach: str) -> list[Recipe]:
        # Without VNNI, fbgemm's int8 kernels can saturate 16-bit accumulators: reduce_range avoids it.
        reduce_range = not cpu_has_vnni()
        if approach == "dynamic":
            return [Recipe(self.name, approach, per_channel=True, reduce_range=reduce_range),
                    Recipe(self.name, approach, per_channel=False, reduce_range=reduce_range)]
        return [Recipe(self.name, approach, per_channel=True, calibration="minmax", reduce_range=reduce_range),
                Recipe(self.name, approach, per_channel=True, calibration="histogram", reduce_range=reduce_range)]

    # --- qconfigs -------------------------------------------------------------------------------
    @staticmethod
    def _static_qconfig(recipe: Recipe):
        from torch.ao.quantization import QConfig
        from torch.ao.quantization.observer import (HistogramObserver, MinMaxObserver,
                                                    PerChannelMinMaxObserver)

        if recipe.calibration == "minmax":
            activation = MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=recipe.reduce_range)
        else:  # histogram/percentile: HistogramObserver minimises quantization error over the histogram
            activation = HistogramObserver.with_args(dtype=torch.quint8, reduce_range=recipe.reduce_range)
        if recipe.per_channel:
            weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        else:
            weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        return QConfig(activation=activation, weight=weight)

    @classmethod
    def _static_qconfig_mapping(cls, recipe: Recipe):
        """The recipe's qconfig for every op, with the exceptions torch's own x86 mapping makes (float weights for
        LayerNorm; the fixed output ranges of sigmoid, tanh, hardsigmoid and softmax, which their int8 kernels assume:
        any other observer leaves them fp32 between a dequantize and a quantize), and transposed convs left fp32:
        torch's int8 ConvTranspose2d gives wrong outputs on x86 for common shapes (torch 2.13, fbgemm and x86 engines:
        kernel 2 with 8 or more channels in and out, the U-Net upsampling layer, is off by 2-4x the output's range,
        and its rows depend on the batch: ``benchmarks/torch_ao_kernels.py``). PReLU stays fp32 too
        (:class:`_FloatPReLU`)."""
        from torch.ao.quantization import QConfig, get_default_qconfig_mapping
        from torch.ao.quantization.observer import FixedQParamsObserver, ReuseInputObserver

        qconfig = cls._static_qconfig(recipe)
        mapping = get_default_qconfig_mapping("x86").set_global(qconfig)
        for object_type, special in list(mapping.object_type_qconfigs.items()):
            if special is None or isinstance(special.activation(), (FixedQParamsObserver, ReuseInputObserver)):
                continue  # the output range is the op's, not calibrated
            # the exception is in the weights: calibrate the activations as the recipe says
            mapping.set_object_type(object_type, QConfig(activation=qconfig.activation, weight=special.weight))
        for transposed in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, F.conv_transpose1d,
                           F.conv_transpose2d, F.conv_transpose3d):
            mapping.set_object_type(transposed, None)
        return mapping

    @staticmethod
    def _dynamic_qconfig(recipe: Recipe):
        # The dynamic int8 kernels choose activation scales per batch (and apply fbgemm's
        # reduce_range themselves); only the weight observer is a knob.
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

        return per_channel_dynamic_qconfig if recipe.per_channel else default_dynamic_qconfig

    # --- quantize -------------------------------------------------------------------------------
    def quantize(self, model: nn.Module, recipe: Recipe, example_inputs: Inputs,
                 calibration: Sequence[Inputs]) -> nn.Module:
        model = model.eval()
        with _quiet_torch_ao(), torch.no_grad():
            if recipe.approach == "dynamic":
                quantized = self._quantize_dynamic(model, recipe)
            elif recipe.approach == "static":
                quantized = self._quantize_static(model, recipe, example_inputs, calibration)
            else:
                raise ValueError(f"torch_ao backend does not support approach {recipe.approach!r}.")
            # its file is a trace: a candidate whose trace fixes a size that must stay free could not be saved
            try:
                self._traces[quantized] = _trace_checked(quantized, example_inputs, self.dynamic_dims)[0]
            except FixedDimError as exc:
                # torch.ao's int8 LSTM/GRU turns a packed sequence's batch into a Python number; the float ones do not
                recurrent = [name for name, module in quantized.named_modules()
                             if isinstance(module, _int8_recurrent_types()) and name not in recipe.fp32_layers]
                raise FixedDimError(str(exc), fp32_layers=recurrent) from exc
        return quantized

    def _quantize_dynamic(self, model: nn.Module, recipe: Recipe) -> nn.Module:
        from torch.ao.quantization import float_qparams_weight_only_qconfig, quantize_dynamic

        qconfig = self._dynamic_qconfig(recipe)
        skip = _with_tied_layers(model, set(recipe.fp32_layers) | _reads_weight_tensors(model))
        int8 = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
                or is_quantizable_recurrent(module) and not _bias_less_recurrent(module)]
        spec = {name: qconfig for name in int8 if name not in skip}
        # an embedding table is looked up, not multiplied: int8 rows, each with its own float scale and offset
        spec.update({name: float_qparams_weight_only_qconfig for name, module in model.named_modules()
                     if (is_quantizable_embedding(module) or is_quantizable_embedding_bag(module))
                     and name not in skip})
        quantized = quantize_dynamic(model, qconfig_spec=spec, dtype=torch.qint8, inplace=True)
        _look_up_contiguous_indices_(quantized)
        return quantized

    def _quantize_static(self, model: nn.Module, recipe: Recipe, example_inputs: Inputs,
                         calibration: Sequence[Inputs]) -> nn.Module:
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        mapping = self._static_qconfig_mapping(recipe)
        for name in recipe.fp32_layers:
            mapping.set_module_name(name, None)
        from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

        from litcompress.pruning.heads import HeadPrunedAttention

        # an attention narrowed by shrink branches on its inputs' shapes, as torch's (which fx keeps whole) does
        custom = PrepareCustomConfig().set_non_traceable_module_classes([HeadPrunedAttention])
        _keep_prelu_float_(model)
        model = taking_only_inputs_(model, len(example_inputs))
        try:
            if recipe.fp32_layers:
                _keep_fp32_around_(mapping, recipe.fp32_layers, model, example_inputs, custom)
            prepared = prepare_fx(model, mapping, example_inputs, prepare_custom_config=custom)
        except Exception as exc:  # symbolic tracing fails on data-dependent control flow
            raise ExportError(f"torch_ao static: torch.fx could not trace the model or place its observers: "
                              f"{type(exc).__name__}: {exc}") from exc
        called_again = _layers_called_more_than_once(prepared, self.quantizable_layers(model, "static"),
                                                     recipe.fp32_layers)
        if called_again:  # its int8 module has one output scale: the calls' other ranges were clipped (0.13 off)
            raise ExportError(f"torch_ao static: {', '.join(called_again)} called more than once in forward, and "
                              "torch.ao's int8 layer holds one output scale for all its calls (the ranges of the "
                              "others are clipped)", fp32_layers=called_again)
        # a tensor that is not float (a bool mask, ids; an input, or one computed: x > 0) read by an int8 op gets an
        # observer, which fails on it at every knob variant alike: said once, and the backend left (not each variant
        # a failed trial)
        try:
            for inputs in calibration:
                prepared(*copied(inputs))
            converted = convert_fx(prepared)
            _views_as_reshapes_(converted)
            if recipe.fp32_layers:
                _methods_read_fp32_(converted, example_inputs)
            with torch.no_grad():  # (a min-max observer takes bool values; the converted quantize op fails on them)
                converted(*copied(example_inputs))
            return converted
        except (RuntimeError, NotImplementedError) as exc:
            said = nonfloat_input_error(exc, example_inputs, "torch_ao static")
            if said is None:  # another failure: as it is
                raise
            raise said from exc
        except AttributeError as exc:
            # prepare_fx observes arithmetic on shapes too (``g.view(g.shape + (1, 1))``: an operator.add of a
            # torch.Size), and the observer fails on the non-tensor at every knob variant alike
            in_observer = any(frame.filename.replace("\\", "/").endswith("torch/ao/quantization/observer.py")
                              for frame in traceback.extract_tb(exc.__traceback__))
            if not in_observer or re.search(r"'(torch\.Size|int|float|tuple|list)' object has no attribute",
                                            str(exc)) is None:
                raise  # (a model's own AttributeError, as it is)
            raise ExportError("torch_ao static: torch.ao placed an observer on arithmetic of shapes or sizes, which is "
                              f"no tensor ({type(exc).__name__}: {exc}), as in g.view(g.shape + (1, 1)) or "
                              "h * h.shape[-1] ** -0.5: write it with tensor ops or constants (g[:, :, None, None], "
                              "a scale computed in __init__); the onnxruntime and pt2e backends' static int8 quantize "
                              "such a model") from exc

    def timed_form(self, quantized: nn.Module, example_inputs: Inputs) -> nn.Module:
        """The TorchScript trace its file holds: torch's eager int8 modules run each op from Python, 2-3x slower than
        the trace on a small model (0.20 vs 0.08 ms for a 64-256-10 MLP at batch 64), which would judge torch.ao by
        a form no file ships."""
        traced = self._traces.get(quantized)
        if traced is None:
            with _quiet_torch_ao(), torch.no_grad():
                traced = self._traces[quantized] = _trace_checked(quantized, example_inputs, self.dynamic_dims)[0]
        return traced

    # --- save -----------------------------------------------------------------------------------
    def save(self, quantized: nn.Module, path: str, metadata: str, example_inputs: Inputs, *,
             dynamic_dims=None) -> None:
        with _quiet_torch_ao(), torch.no_grad():
            inner = quantized.model if isinstance(quantized, RebuiltOutputs) else quantized
            if isinstance(inner, torch.jit.ScriptModule):  # a file loaded again: a copy of it loses its forward
                scripted = inner
                structure = quantized.structure if isinstance(quantized, RebuiltOutputs) else None
            else:
                scripted, structure = _trace_checked(quantized, example_inputs, dynamic_dims)
            extra = {METADATA_FILE: metadata}
            if structure is not None:
                extra[OUTPUTS_FILE] = json.dumps(structure)
            torch.jit.save(scripted, path, _extra_files=extra)


def _keep_fp32_around_(mapping, fp32_layers: Sequence[str], model: nn.Module, example_inputs: Inputs,
                       custom) -> None:
    """Extend `mapping` (layers named in `fp32_layers` already off) so that the ops around those layers compute in
    fp32 too: a functional op or a module holding no Linear or convolution (``torch.relu``, ``+``, ``torch.cat``,
    ``nn.ReLU``, ``nn.LayerNorm``) that reads no int8 value and either reads an fp32 layer's output (or such an op's)
    or passes its values only to such layers and ops. With the layers' qconfigs alone, the global qconfig still
    quantized them: a residual block with both Linears in fp32 kept its input, its ReLU and its add int8, 0.028 from
    the fp32 outputs against 0.034 with both in int8, and the fallback could not reach an accuracy goal it promised to.

    torch.ao assigns a qconfig to a functional op by its place among the calls of that function in the module whose
    forward calls it, so the graph is traced as ``prepare_fx`` traces it (on a copy) to find those places. Tensor
    methods (``x.transpose(1, 2)``, ``x.sigmoid()``) have no such place in torch.ao: they keep the global qconfig, and
    :func:`_methods_read_fp32_` lets them read the fp32 values instead."""
    from torch.ao.quantization.observer import ObserverBase
    from torch.ao.quantization.quantize_fx import prepare_fx

    with _quiet_torch_ao():
        dry = prepare_fx(deepcopy_model(model), mapping, example_inputs, prepare_custom_config=custom)
        passes_on, quantizes = _torch_ao_op_kinds()
    attributes = dry.meta["_observed_graph_module_attrs"]
    scope, qconfigs = attributes.node_name_to_scope, attributes.node_name_to_qconfig

    def observer(node: torch.fx.Node) -> bool:
        return node.op == "call_module" and isinstance(dry.get_submodule(node.target), ObserverBase)

    def source(node: torch.fx.Node) -> torch.fx.Node:  # through the observers the dry run put in
        while observer(node):
            node = node.args[0]
        return node

    def inside(path: str) -> bool:
        return any(path == name or path.startswith(name + ".") for name in fp32_layers)

    def op_of(node: torch.fx.Node) -> object:  # what torch.ao's backend config knows the op by
        return type(dry.get_submodule(node.target)) if node.op == "call_module" else node.target

    ops = [node for node in dry.graph.nodes if node.op in ("call_function", "call_module", "call_method")
           and not observer(node)]
    # where torch.ao will look each op up: (module path, function or module type, index among those calls)
    places: dict[torch.fx.Node, tuple[str, object, int]] = {}
    counts: dict[tuple[str, object], int] = {}
    for node in ops:
        if node.op == "call_method":
            continue
        path, module_type = scope[node.name]
        key = (path, node.target) if node.op == "call_function" else (path.rpartition(".")[0], module_type)
        places[node] = (*key, counts.get(key, 0))
        counts[key] = counts.get(key, 0) + 1

    layer_outputs = {node for node in ops if node.op == "call_module" and inside(node.target)
                     or node.op == "call_function" and inside(places[node][0])}
    weighted = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def may_turn(node: torch.fx.Node) -> bool:  # an op the fallback may take out of int8: no layer, not fp32 already
        if node in layer_outputs or qconfigs.get(node.name) is None:
            return False
        if node.op == "call_function":
            return node.target not in (F.linear, F.conv1d, F.conv2d, F.conv3d)
        return node.op == "call_module" and not any(isinstance(m, weighted)
                                                    for m in dry.get_submodule(node.target).modules())

    turned = {node for node in ops if may_turn(node)}
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in ops:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)

    def users_of(node: torch.fx.Node) -> list[torch.fx.Node]:
        return [u for user in node.users for u in (user.users if observer(user) else [user])]

    # the largest set of ops that can run fp32 together (an op read by a layer and by an add that reads that layer
    # too: each qualifies only once the other does): all candidates first, dropping those that do not qualify
    while True:
        kind: dict[torch.fx.Node, str] = {}  # of each op's output: "layer" (fp32 layers' values), "fp32", "int8"
        for node in ops:  # (in graph order: inputs first)
            inputs = {"input" if n.op in ("placeholder", "get_attr") else kind.get(n, "fp32")
                      for n in map(source, node.all_input_nodes)}
            op = op_of(node)
            if node in turned or node in layer_outputs:
                kind[node] = "layer"
            elif op in ("size", "shape") or op is getattr:  # numbers, not tensors
                kind[node] = "input"
            elif op in passes_on:  # (a view, a ReLU, a pooling, cat: int8 where what they read is)
                kind[node] = next((k for k in ("int8", "layer", "fp32") if k in inputs), "input")
            elif node.op != "call_method" and qconfigs.get(node.name) is not None and op in quantizes:
                kind[node] = "int8"
            else:  # an op torch.ao has no int8 kernel for (an nn.MultiheadAttention) computes fp32
                kind[node] = "fp32"
        dropped = set()
        for node in turned:
            inputs = [kind.get(source(n), "input") for n in node.all_input_nodes]
            users = users_of(node)
            if "int8" in inputs or not ("layer" in inputs or users and all(
                    u in turned or u in layer_outputs for u in users)):
                dropped.add(node)
            # a module called at several places is one module, int8 or not (convert swaps it for all its calls)
            elif node.op == "call_module" and not all(call in turned for call in calls[node.target]):
                dropped.add(node)
            # an op that passes on its input's int8 (a ReLU module shared with an int8 branch, a cat joining one)
            # given an fp32 value: torch.ao then left the layer after it fp32 as well
            elif any(u.op != "call_method" and u not in turned and u not in layer_outputs and op_of(u) in passes_on
                     for u in users):
                dropped.add(node)
        if not dropped:
            break
        turned -= dropped
    for node in turned:
        mapping.set_module_name_object_type_order(*places[node], None)


def _torch_ao_op_kinds() -> tuple[frozenset, frozenset]:
    """The ops of torch.ao's native backend config (what ``prepare_fx`` uses): those whose int8 output shares its
    input's scale (views, ReLU, pooling, cat: int8 exactly where their input is), and the others it has int8 kernels
    for. An op in neither computes fp32 whatever its qconfig."""
    import torch.ao.quantization.backend_config.utils  # noqa: F401 - (get_native_backend_config needs it loaded)
    from torch.ao.quantization.backend_config import ObservationType, get_native_backend_config

    passes_on, quantizes = set(), set()
    for config in get_native_backend_config().configs:
        if config.pattern is None or isinstance(config.pattern, tuple):
            continue
        shares = config.observation_type == ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT
        (passes_on if shares else quantizes).add(config.pattern)
    return frozenset(passes_on), frozenset(quantizes)


def _views_as_reshapes_(converted: torch.fx.GraphModule) -> None:
    """Make the model's ``x.view(...)`` calls ``x.reshape(...)``: torch.ao's int8 convolutions return channels-last
    tensors, which ``view`` cannot flatten, so the classic ``x.view(x.size(0), -1)`` before the classifier failed every
    static candidate ("view size is not compatible with input tensor's size and stride"). ``reshape`` is ``view``
    wherever ``view`` works, and copies where it cannot."""
    def a_dtype(arg: object) -> bool:  # view(dtype) reinterprets the bits: no reshape
        return isinstance(arg, torch.dtype) or (isinstance(arg, torch.fx.Node) and arg.op == "call_function"
                                                and arg.target is getattr and arg.args[1] == "dtype")

    views = [node for node in converted.graph.nodes if node.op == "call_method" and node.target == "view"
             and "dtype" not in node.kwargs and not any(a_dtype(arg) for arg in node.args[1:])]
    for node in views:
        node.target = "reshape"
    if views:
        converted.recompile()


def _methods_read_fp32_(converted: torch.fx.GraphModule, example_inputs: Inputs) -> None:
    """Let the tensor methods that read ``quantize_per_tensor(v)`` (``transpose``, ``mean``, ``sigmoid``, and the
    methods reading those) read fp32 `v` itself: a result dequantized is then that fp32 result, and one an int8 op
    reads is quantized after the method, at the scale its int8 form had. torch.ao quantizes a method's input
    whatever computes it (a method has no per-call qconfig), so the fp32 values next to layers kept in fp32 went
    through int8 at each ``transpose`` with nothing int8 to compute, and a ``sigmoid``'s input was clipped to the
    [0, 1] its output takes. The methods are the model's own calls, made on fp32 tensors in the model; a method
    reading another tensor, and one whose int8 result's scale is not known, are left as they are."""
    graph = converted.graph

    def numbers(node: torch.fx.Node) -> bool:  # a size read off a tensor, or a number taken from one
        if node.op == "call_method":
            return node.target in ("size", "dim")
        if node.op == "call_function" and node.target is getattr:
            return node.args[1] in ("shape", "ndim")
        return (node.op == "call_function" and node.target is operator.getitem
                and isinstance(node.args[0], torch.fx.Node) and numbers(node.args[0]))

    def dequantize(node: torch.fx.Node) -> bool:
        return node.op == "call_method" and node.target == "dequantize"

    def method(node: torch.fx.Node, parent: torch.fx.Node) -> bool:  # one of the model's, on `parent` alone
        return (node.op == "call_method" and not dequantize(node) and node.args[0] is parent
                and all(n is parent or numbers(n) for n in node.all_input_nodes))

    def tree(root: torch.fx.Node) -> list[torch.fx.Node]:  # `root` and the methods reading it, and so on
        found, index = [root], 0
        while index < len(found):
            found += [user for user in found[index].users if method(user, found[index])]
            index += 1
        return found

    def read_by_int8(node: torch.fx.Node) -> list[torch.fx.Node]:
        return [user for user in node.users if not dequantize(user) and not method(user, node)]

    quantizes = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.quantize_per_tensor]
    trees = {root: tree(root) for q in quantizes for root in q.users if method(root, q)}
    wanted = {node for nodes in trees.values() for node in nodes if read_by_int8(node)}
    scales: dict[torch.fx.Node, tuple[float, int, torch.dtype]] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node):
            out = super().run_node(node)
            if node in wanted and isinstance(out, torch.Tensor) and out.is_quantized \
                    and out.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                scales[node] = (float(out.q_scale()), int(out.q_zero_point()), out.dtype)
            return out

    if wanted:
        with torch.no_grad():
            Recorder(converted).run(*copied(example_inputs))
    changed = False
    for quantize in quantizes:
        source = quantize.args[0]
        for user in list(quantize.users):
            if dequantize(user):
                user.replace_all_uses_with(source)
                graph.erase_node(user)
                changed = True
                continue
            nodes = trees.get(user)
            if nodes is None or any(node in wanted and node not in scales for node in nodes):
                continue
            user.replace_input_with(quantize, source)
            for node in nodes:
                readers = read_by_int8(node)
                if readers:  # quantized after the method, as its int8 form was
                    with graph.inserting_after(node):
                        requantized = graph.call_function(torch.quantize_per_tensor, (node, *scales[node]))
                    for reader in readers:
                        reader.replace_input_with(node, requantized)
                for end in [u for u in node.users if dequantize(u)]:
                    end.replace_all_uses_with(node)
                    graph.erase_node(end)
            changed = True
    if changed:
        graph.eliminate_dead_code()
        converted.recompile()


class _FloatPReLU(nn.PReLU):
    """An ``nn.PReLU`` that torch.ao's static quantization leaves fp32: its int8 PReLU gives wrong outputs on x86
    (torch 2.13: the positive side is off by up to 75% of the output's range, with torch's own default qconfig
    mapping too). A qconfig of None does not keep it fp32: lowering still swaps in the int8 module wherever a
    quantized op follows, as it matches on the exact type."""


def _keep_prelu_float_(model: nn.Module) -> None:
    """Turn `model`'s (a private copy's) ``nn.PReLU`` modules into :class:`_FloatPReLU`: same weights, same outputs."""
    for module in model.modules():
        if type(module) is nn.PReLU:
            module.__class__ = _FloatPReLU


class _ContiguousLookupEmbeddingBag(QuantizedEmbeddingBag):
    """torch.ao's int8 embedding bag, looking its table up with contiguous indices and offsets."""

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None,
                compressed_indices_mapping: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(indices.contiguous(), None if offsets is None else offsets.contiguous(),
                               per_sample_weights, compressed_indices_mapping)


class _ContiguousLookupEmbedding(QuantizedEmbedding):
    """torch.ao's int8 embedding, looking its table up with the indices made contiguous (see
    `_look_up_contiguous_indices_`)."""

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return super().forward(indices.contiguous())


def _look_up_contiguous_indices_(model: nn.Module) -> None:
    """Make `model`'s (a private copy's) int8 embedding tables accept any indices: torch.ao's int8 lookup refuses
    non-contiguous ones ("Expect weight, indices, and offsets to be contiguous"), which models pass routinely
    (Hugging Face's BERT looks its segment table up with a buffer expanded to the batch), where fp32 takes any."""
    for module in model.modules():
        if type(module) is QuantizedEmbedding:
            module.__class__ = _ContiguousLookupEmbedding
        elif type(module) is QuantizedEmbeddingBag:
            module.__class__ = _ContiguousLookupEmbeddingBag


def _bias_less_recurrent(module: nn.Module) -> bool:
    """An LSTM/GRU or cell without biases: torch.ao's int8 ones assert theirs (torch 2.13), so it stays fp32 and the
    rest of the model is still quantized."""
    return isinstance(module, RECURRENT_LAYERS) and not module.bias  # (a cell takes bias=0 from a config file)


def _int8_recurrent_types() -> tuple[type, ...]:
    """What ``quantize_dynamic`` turns RECURRENT_LAYERS into (its own mapping)."""
    from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings

    mapping = get_default_dynamic_quant_module_mappings()
    return tuple(mapping[layer] for layer in RECURRENT_LAYERS)


def _layers_called_more_than_once(prepared: torch.fx.GraphModule, layers: Sequence[str],
                                  fp32_layers: Sequence[str]) -> list[str]:
    """The `layers` not in `fp32_layers` that the traced graph calls more than once (a block applied twice)."""
    calls: dict[str, int] = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    return [name for name in layers if calls.get(name, 0) > 1 and name not in fp32_layers]


def _with_tied_layers(model: nn.Module, skip: set[str]) -> set[str]:
    """`skip` and every layer sharing a weight with one in it. Each quantized module keeps its own int8 copy: a tied
    table (an embedding that is also the output layer) quantized on one side only adds that copy to the fp32 one."""
    users: dict[int, set[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            users.setdefault(id(weight), set()).add(name)
    tied = set(skip)
    for names in users.values():
        if len(names) > 1 and names & skip:
            tied |= names
    return tied


def _trace_checked(quantized: nn.Module, example_inputs: Inputs,
                   dynamic_dims) -> tuple[torch.jit.ScriptModule, Structure | None]:
    """TorchScript of `quantized` (the one self-contained format torch.ao's packed int8 weights serialise to), and
    the structure of its output when TorchScript cannot return it as it is (a None, a dataclass: the script returns
    the tensors, and :func:`load_torchscript` rebuilds it); :class:`FixedDimError` when the trace fixed a dim that
    must stay free."""
    module = deepcopy_model(quantized).eval()
    structure = untraceable_structure(module, example_inputs, torchscript=True)
    if structure is not None:
        module = tensor_leaves_of(module, example_inputs)
    for sub in module.modules():
        # Tracing probes every attribute, and a LightningModule's `trainer` raises without a Trainer; the
        # flag Lightning's own to_torchscript sets makes it answer None.
        if isinstance(getattr(sub, "_jit_is_scripting", None), bool):
            sub._jit_is_scripting = True
    # The trace's warnings are held until the file is known to take other sizes: a trace that fixed one fails with
    # the reason, and its warnings (dozens, from torch.ao's int8 LSTM on a packed sequence) would only repeat it.
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        try:
            # not those of conditions that only guard an error (the RNNs' checks), nor of the residual adds' constants
            with tracer_warnings_that_matter(numbers_are_constants=numbers_read_from_constants(module)):
                # strict=False: a model returning a dict or a list (of a fixed structure) traces as it is
                scripted = torch.jit.trace(module, copied(example_inputs), check_trace=False, strict=False)
        except Exception as exc:  # every recipe of this model would fail alike
            message = str(exc)
            if "Tracer cannot infer type of" in message:  # the message prints the whole output, tensors and all
                message = ("TorchScript cannot type the model's output (a dict's values must share one type, e.g. "
                           f"all tensors): {message.rsplit(':', 1)[-1].strip()}")
            raise ExportError(f"torch_ao: torch.jit.trace failed: {type(exc).__name__}: {message}") from exc
        # A trace keeps a size the code turned into a Python number: the file must take the other sizes too.
        check_free_dims(lambda *inputs: eval_outputs(quantized, inputs), scripted, example_inputs, dynamic_dims,
                        "torch.jit.trace")
    for warning in held:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return scripted, structure


def load_torchscript(path: str) -> tuple[nn.Module, dict]:
    """Load an artefact written by :meth:`TorchAOBackend.save` (its output rebuilt when the file records how)."""
    extra = {METADATA_FILE: "", OUTPUTS_FILE: ""}
    with _quiet_torch_ao():
        module = torch.jit.load(path, _extra_files=extra)
    if extra[OUTPUTS_FILE]:
        module = RebuiltOutputs(module, json.loads(extra[OUTPUTS_FILE]))
    return module, json.loads(extra[METADATA_FILE])
