"""ONNX Runtime backend: export with ``torch.onnx.export``, then ORT ``quantize_dynamic``/``quantize_static``."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from litcompress._inputs import copied
from litcompress.pruning.engine import deepcopy_model, tied_parameters
from litcompress.pruning.shrink import eval_outputs

from ..config import Recipe
from ..outputs import (TENSOR, Structure, output_structure, rebuild, tensor_leaves, tensor_leaves_of,
                       traces_as_it_is)
from ..shapes import DynamicDims, fixed_size_hint, onnx_dynamic_axes, shrunk_along_free_dims
from ..tracing import taking_only_inputs_, tracer_warnings_that_matter
from . import Backend, BackendUnavailableError, ExportError, Inputs, check_free_dims, cpu_has_vnni

METADATA_KEY = "litcompress"
#: the JSON structure of the model's output (see `..outputs`), when it is not a single tensor
OUTPUTS_KEY = "litcompress.outputs"
INPUTS_KEY = "litcompress.inputs"  # how many positional inputs the model took (the graph may read fewer)


def _session_options(num_threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Spinning ORT threads steal the cores torch uses in the same process.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


_OUR_INPUT_NAME = re.compile(r"input_(\d+)")


def input_feed(names: Sequence[str], inputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    """ONNX Runtime's feed of the graph inputs `names` from the model's positional `inputs`. Our files name input i
    ``input_i``, and the exporter leaves out an input the graph never reads (a mask the model ignores, a label in
    a dict of inputs), so such names are matched by their index; other files' inputs are taken in order."""
    matches = [_OUR_INPUT_NAME.fullmatch(name) for name in names]
    if all(matches) and all(int(m.group(1)) < len(inputs) for m in matches):
        return {name: inputs[int(m.group(1))].detach().cpu().numpy() for name, m in zip(names, matches)}
    return {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)}


class OnnxRuntimeModule(nn.Module):
    """An ONNX model run by ONNX Runtime, usable like the torch module it came from."""

    def __init__(self, model_bytes: bytes, num_threads: int | None = None,
                 dims_declared_in: str | None = None) -> None:
        super().__init__()
        self.model_bytes = model_bytes
        self.num_threads = num_threads
        # where an input size it refuses is said to be declared (None: a file read back, which PTQ, QAT or the
        # pipeline may have written)
        self.dims_declared_in = dims_declared_in
        self._make_session()

    def _make_session(self) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(self.model_bytes, _session_options(self.num_threads),
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        metadata = self.session.get_modelmeta().custom_metadata_map
        structure = metadata.get(OUTPUTS_KEY)
        self.output_structure = json.loads(structure) if structure else None
        self.input_count = int(metadata[INPUTS_KEY]) if INPUTS_KEY in metadata else None  # older files: unknown

    def forward(self, *inputs: torch.Tensor) -> object:
        """The model's output: a tensor, or the tuples, lists and dicts of tensors the exported model returned."""
        if self.input_count is not None and len(inputs) > self.input_count:
            raise TypeError(f"this ONNX model takes {self.input_count} positional input(s), those of its example, "
                            f"and was given {len(inputs)}: the others (a flag, say) are fixed at their defaults in the "
                            "file, and would be dropped.")
        if not all(isinstance(x, torch.Tensor) for x in inputs):  # a torch.fx proxy: the session crashed the process
            raise TypeError(f"this ONNX model runs an ONNX Runtime session on tensors, and was given "
                            f"{[type(x).__name__ for x in inputs]}: it cannot be traced (torch.fx, shrink).")
        feed = input_feed(self.input_names, inputs)
        try:
            ran = self.session.run(None, feed)
        except Exception as error:  # ONNX Runtime's own class: "Got invalid dimensions for input: input_0 ..."
            hint = fixed_size_hint(str(error), getattr(self, "dims_declared_in", None))
            if hint is None:
                raise
            shapes = [tuple(x.shape) for x in inputs]
            raise ValueError(f"inputs of shapes {shapes} ({error}): {hint}.") from None
        outputs = [torch.from_numpy(np.asarray(o)) for o in ran]
        if self.output_structure is not None:
            return rebuild(self.output_structure, outputs)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def __deepcopy__(self, memo: dict) -> "OnnxRuntimeModule":
        return OnnxRuntimeModule(self.model_bytes, self.num_threads, getattr(self, "dims_declared_in", None))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("session", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_session()


class _RMSNormInOps(nn.Module):
    """``nn.RMSNorm`` written with ops the legacy ONNX exporter knows (it has no ``aten::rms_norm`` at any opset):
    ``x * rsqrt(mean(x^2) + eps) * weight``, as torch computes it."""

    def __init__(self, norm: nn.RMSNorm) -> None:
        super().__init__()
        self.dims = tuple(range(-len(norm.normalized_shape), 0))
        self.eps, self.weight = norm.eps, norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        y = x * torch.rsqrt(x.pow(2).mean(self.dims, keepdim=True) + eps)
        return y if self.weight is None else y * self.weight


def _exportable_(model: nn.Module, free_lengths: bool = False) -> nn.Module:
    """Replace, in place, the modules of `model` the legacy ONNX exporter cannot export with equivalent ones; with
    `free_lengths` (an input dim besides the batch must stay free), torch's attentions too, whose traced reshapes
    keep the example's sequence length."""
    if free_lengths:
        from litcompress.pruning.heads import rewrite_attentions_

        model = rewrite_attentions_(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.RMSNorm):
            parent, _, attribute = name.rpartition(".")
            if not attribute:
                return _RMSNormInOps(module)
            setattr(model.get_submodule(parent), attribute, _RMSNormInOps(module))
    return model


def export_onnx(model: nn.Module, example_inputs: Inputs, dynamic_dims: DynamicDims | None = None) -> bytes:
    """The bytes of :func:`export_onnx_with_structure`, for an fp32 file: tied weights (an output layer holding its
    input embedding's matrix) are stored once, as the exporter's constant folding would store the output layer's
    transposed copy besides (ONNX Runtime folds that transpose in memory when it loads the file)."""
    tied = bool(tied_parameters(model.named_modules()))
    return export_onnx_with_structure(model, example_inputs, dynamic_dims, fold_constants=not tied)[0]


def _fed_packed_sequences(model: nn.Module, example_inputs: Inputs) -> list[str]:
    """Names of the recurrent layers `model` (a private copy) calls on a ``PackedSequence`` for `example_inputs`."""
    fed: list[str] = []

    def note(name: str) -> Callable[..., None]:
        return lambda _module, args: fed.append(name) if args and isinstance(args[0], PackedSequence) else None

    hooks = [module.register_forward_pre_hook(note(name)) for name, module in model.named_modules()
             if isinstance(module, nn.RNNBase)]
    try:
        eval_outputs(model, example_inputs)
    except Exception:  # noqa: BLE001 (only a hint for an error already raised)
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(fed))


def export_onnx_with_structure(model: nn.Module, example_inputs: Inputs, dynamic_dims: DynamicDims | None = None, *,
                               fold_constants: bool = True) -> tuple[bytes, Structure]:
    """Export a deep copy of ``model`` (the legacy exporter may modify the module it is given; and RMSNorm is
    written in ops it knows; with free dims besides the batch, its nn.MultiheadAttentions as HeadPrunedAttentions
    of all their heads, whose traced reshapes keep no sequence length), leaving the batch dims and `dynamic_dims`
    free; raises :class:`FixedDimError` when the file turns out to fix one (the exporter traces). Returns the file's
    bytes and the structure of the model's output, which they record when it is not a single tensor.
    `fold_constants`: the exporter's constant folding (which lets ONNX Runtime's quantizer see a tied output layer's
    weight as an initializer of its own)."""
    original = model  # the file is compared with it (the exporter may modify the copy it is given)
    # forward's other parameters (flags) keep their defaults: the exporter would pass keyword-only ones by position
    model = taking_only_inputs_(deepcopy_model(model).eval(), len(example_inputs))
    model = _exportable_(model, free_lengths=shrunk_along_free_dims(example_inputs, dynamic_dims) is not None)
    names = [f"input_{i}" for i in range(len(example_inputs))]
    reference = eval_outputs(original, example_inputs)
    try:
        structure = output_structure(reference)
    except TypeError as exc:
        raise ExportError(f"onnxruntime: {exc}") from exc
    leaves = tensor_leaves(reference)
    if not traces_as_it_is(structure):  # a None or a dataclass: the graph returns the tensors, rebuilt when read
        model = tensor_leaves_of(model, example_inputs)
    output_names = ["output"] if len(leaves) == 1 else [f"output_{i}" for i in range(len(leaves))]
    batches = {int(leaf.shape[0]) for leaf in tensor_leaves(tuple(example_inputs)) if leaf.dim()}
    output_axes = {name: {0: f"{name}_batch"} for name, leaf in zip(output_names, leaves)
                   if leaf.dim() and int(leaf.shape[0]) in batches}
    buffer = io.BytesIO()
    try:
        # No warning but a TracerWarning from data-dependent code (the file keeps the path the trace took).
        with tracer_warnings_that_matter(), _native_output_held():
            torch.onnx.export(model, copied(tuple(example_inputs)), buffer, dynamo=False, input_names=names,
                              output_names=output_names, opset_version=17, do_constant_folding=fold_constants,
                              dynamic_axes={**onnx_dynamic_axes(names, example_inputs, dynamic_dims), **output_axes})
    except Exception as exc:
        packed = _fed_packed_sequences(deepcopy_model(original).eval(), example_inputs)  # (the names of the model's)
        hint = (f" (the model feeds a PackedSequence to {', '.join(map(repr, packed))}: torch.onnx.export fails on "
                "packed sequences, sorted or not; backend 'torch_ao' quantizes such a model, that layer in fp32)"
                if packed else "")
        raise ExportError(f"onnxruntime: torch.onnx.export failed: {type(exc).__name__}: {exc}{hint}") from exc
    model_bytes = with_output_structure(buffer.getvalue(), structure, inputs=len(example_inputs))
    check_free_dims(lambda *inputs: eval_outputs(original, inputs), _quiet_session(model_bytes), example_inputs,
                    dynamic_dims, "torch.onnx.export")
    return model_bytes, structure


@contextlib.contextmanager
def _native_output_held() -> Iterator[None]:
    """Hold what native code writes to stdout and stderr (file descriptors 1 and 2) in the block, and write it out
    after the block only if the block succeeds. torch's legacy ONNX exporter prints the whole TorchScript graph to
    stdout when an export fails (it enables its own log), pages of noise before the error it raises anyway, which
    says what went wrong."""
    streams = ((1, sys.stdout), (2, sys.stderr))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        saved = []
        for (fd, stream), held in zip(streams, (out, err)):
            stream.flush()
            saved.append(os.dup(fd))
            os.dup2(held.fileno(), fd)
        try:
            yield
        finally:
            for (fd, stream), kept in zip(streams, saved):
                stream.flush()
                os.dup2(kept, fd)
                os.close(kept)
        for (_, stream), held in zip(streams, (out, err)):
            held.seek(0)
            text = held.read().decode(errors="replace")
            if text:
                stream.write(text)


@contextlib.contextmanager
def _root_logger_kept() -> Iterator[None]:
    """Remove the handlers the block adds to the root logger. ORT's quantizer logs through the module-level
    ``logging.info``, which calls ``logging.basicConfig()`` when the root logger has none: the stderr handler left
    behind made the application's own ``logging.basicConfig(...)`` do nothing."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


def with_output_structure(model_bytes: bytes, structure: Structure, *, inputs: int | None = None) -> bytes:
    """`model_bytes` with `structure` in its metadata (none for a single tensor, which needs none), and with `inputs`,
    the number of positional inputs the model took."""
    import onnx

    if structure == TENSOR and inputs is None:
        return model_bytes
    proto = onnx.load_from_string(model_bytes)
    kept = [p for p in proto.metadata_props if p.key not in (OUTPUTS_KEY, INPUTS_KEY)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    if structure != TENSOR:
        entry = proto.metadata_props.add()
        entry.key, entry.value = OUTPUTS_KEY, json.dumps(structure)
    if inputs is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = INPUTS_KEY, str(inputs)
    return proto.SerializeToString()


def _quiet_session(model_bytes: bytes) -> Callable[..., list[torch.Tensor]]:
    """A one-thread ORT session as a function of torch inputs to its outputs, which does not log its failures
    (expected ones)."""
    import onnxruntime as ort

    options = _session_options(1)
    options.log_severity_level = 4  # fatal only
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
        outputs = session.run(None, input_feed(names, inputs))
        return [torch.from_numpy(np.asarray(o)) for o in outputs]
    return run


def _scope_candidates(node_name: str, module_names: Sequence[str]) -> set[str]:
    """The modules of `module_names` a node of the legacy exporter may have been traced in. A scope is a child's
    attribute name or a container's child's name relative to the module above the container ("mlp.0" in
    ``blocks.0.mlp.0``); a ModuleDict's child goes by its key alone ("cls" in ``blocks.0.heads.cls``), and a second
    scope of one name gets a suffix ("cls_1"). Each resolves to the nearest modules under the one before whose names
    end with it: two at one depth (two ModuleDicts with a "cls") are both kept, as the name cannot tell them apart."""
    frontier = {""}
    for part in node_name.split("/")[1:-1]:
        resolved: set[str] = set()
        for qualified in frontier:
            found = _nearest_named(qualified, part, module_names)
            deduplicated = re.fullmatch(r"(.+)_\d+", part)
            if not found and deduplicated:
                found = _nearest_named(qualified, deduplicated.group(1), module_names)
            joined = part if not qualified or part.startswith(f"{qualified}.") else f"{qualified}.{part}"
            resolved |= set(found) if found else {joined}
        frontier = resolved
    return frontier


def _nearest_named(qualified: str, part: str, module_names: Sequence[str]) -> list[str]:
    """The modules under `qualified` whose names are `part` or end with ``.part``, the least deep ones."""
    prefix = f"{qualified}." if qualified else ""
    found = [n for n in module_names
             if n.startswith(prefix) and n != qualified and (n == part or n.endswith(f".{part}"))]
    depth = min((n.count(".") for n in found), default=0)
    return [n for n in found if n.count(".") == depth]


def _nodes_of_layers(onnx_model, layers: Sequence[str], module_names: Sequence[str]) -> list[str]:
    """ONNX node names that implement the given torch module names (or modules inside them); `module_names` (the
    model's) resolve the nodes' scopes (:func:`_scope_candidates`: a node that may be in a named layer is kept fp32
    with it, the safe side)."""
    wanted = set(layers)
    nodes = []
    for node in onnx_model.graph.node:
        scopes = _scope_candidates(node.name, module_names)
        for layer in wanted:
            # Parameter names stay where the weight is used as is ("fc.weight"); a transposed copy for a MatMul is
            # renamed ("onnx::MatMul_12"), so the node's scope is what names its module.
            if any(i in (f"{layer}.weight", f"{layer}.bias") for i in node.input) \
                    or any(scope == layer or scope.startswith(f"{layer}.") for scope in scopes):
                # Dynamic per-channel Gemm is rewritten to "<node>_MatMul" + Add before quantizing.
                nodes += [node.name, f"{node.name}_MatMul"]
                break
    return nodes


class _Reader:
    """ORT CalibrationDataReader over our calibration batches."""

    def __init__(self, names: list[str], calibration: Sequence[Inputs]) -> None:
        self._items = iter([input_feed(names, inputs) for inputs in calibration])

    def get_next(self):
        return next(self._items, None)


class OnnxRuntimeBackend(Backend):
    """Int8 QDQ static and dynamic quantization run by ONNX Runtime's CPU provider."""

    name = "onnxruntime"
    approaches = ("dynamic", "static")
    table_scale_per_row = False  # its Gather quantization: one scale per table, per_channel or not
    artifact_suffix = ".onnx"

    def quantizable_layers(self, model: nn.Module, approach: str) -> list[str]:
        layers = super().quantizable_layers(model, approach)
        if approach != "dynamic":
            return layers
        # no int8 GRU op; a bag exports as a Loop of Gathers, which the dynamic quantizer does not reach
        float_kept = {name for name, module in model.named_modules() if isinstance(module, (nn.GRU, nn.EmbeddingBag))}
        return [name for name in layers if name not in float_kept]

    def check_available(self) -> None:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            from onnxruntime.quantization import quantize_static  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailableError(
                f"onnxruntime backend needs the packages 'onnx' and 'onnxruntime' ({exc}); "
                "install them (pip install onnx onnxruntime) or drop 'onnxruntime' from backends."
            ) from exc

    def recipes(self, approach: str) -> list[Recipe]:
        reduce_range = not cpu_has_vnni()
        if approach == "dynamic":
            return [Recipe(self.name, approach, per_channel=True, reduce_range=reduce_range),
                    Recipe(self.name, approach, per_channel=False, reduce_range=reduce_range)]
        return [Recipe(self.name, approach, per_channel=True, calibration="minmax", reduce_range=reduce_range),
                Recipe(self.name, approach, per_channel=True, calibration="percentile",
                       reduce_range=reduce_range)]

    def quantize(self, model: nn.Module, recipe: Recipe, example_inputs: Inputs,
                 calibration: Sequence[Inputs]) -> nn.Module:
        import onnx
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        fp32_bytes, structure = export_onnx_with_structure(model, example_inputs, self.dynamic_dims)
        with tempfile.TemporaryDirectory(prefix="litcompress_ort_") as tmp, _root_logger_kept():
            src, pre, dst = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
            with open(src, "wb") as f:
                f.write(fp32_bytes)
            try:  # shape inference + graph cleanup, as ORT recommends before quantizing
                quant_pre_process(src, pre, skip_symbolic_shape=True)
            except Exception:
                pre = src
            exclude = _nodes_of_layers(onnx.load(pre), recipe.fp32_layers, [n for n, _ in model.named_modules()])
            if recipe.approach == "dynamic":
                # Gather: an embedding table (ORT quantizes a Gather whose table is a weight, not one of activations)
                quantize_dynamic(pre, dst, op_types_to_quantize=["MatMul", "Gemm", "LSTM", "Gather"],
                                 per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                                 weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
            elif recipe.approach == "static":
                method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                          "histogram": CalibrationMethod.Entropy}[recipe.calibration]
                proto = onnx.load(pre)
                initializers = {tensor.name for tensor in proto.graph.initializer}
                names = [i.name for i in proto.graph.input if i.name not in initializers]  # those the graph reads
                quantize_static(pre, dst, _Reader(names, calibration), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                                per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=exclude, calibrate_method=method,
                                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
            else:
                raise ValueError(f"onnxruntime backend does not support approach {recipe.approach!r}.")
            with open(dst, "rb") as f:
                return OnnxRuntimeModule(with_output_structure(f.read(), structure, inputs=len(example_inputs)),
                                         dims_declared_in="PTQConfig")

    def save(self, quantized: nn.Module, path: str, metadata: str, example_inputs: Inputs, *,
             dynamic_dims=None) -> None:
        import onnx

        if not isinstance(quantized, OnnxRuntimeModule):
            raise TypeError("onnxruntime backend can only save OnnxRuntimeModule results.")
        proto = onnx.load_from_string(quantized.model_bytes)
        fixed = _fixed_declared_dims(proto, dynamic_dims)
        if fixed:  # the search's file is written as it is: it cannot free a dim its export fixed
            raise ValueError(f"save_quantized(dynamic_dims=...): this ONNX Runtime result was exported during the "
                             f"search with {', '.join(fixed)} fixed, so its file cannot leave them free. Quantize "
                             "again with PTQConfig(dynamic_dims=...) naming them (result.save() keeps the search's "
                             "free dims).")
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, metadata
        onnx.save(proto, path)


def _fixed_declared_dims(proto: Any, dynamic_dims: Any) -> list[str]:
    """The dims `dynamic_dims` declares free (the batch dims aside) that the graph's inputs fix, in words."""
    fixed = []
    for graph_input in proto.graph.input:
        match = _OUR_INPUT_NAME.fullmatch(graph_input.name)
        if match is None or dynamic_dims is None or int(match.group(1)) >= len(dynamic_dims):
            continue
        index, dims = int(match.group(1)), graph_input.type.tensor_type.shape.dim
        for d in dynamic_dims[index]:
            if 0 < d < len(dims) and dims[d].HasField("dim_value"):
                fixed.append(f"dim {d} of input {index} (size {dims[d].dim_value})")
    return fixed


def load_onnx(path: str) -> tuple[nn.Module, dict]:
    """Load an artefact written by :meth:`OnnxRuntimeBackend.save`."""
    import onnx

    proto = onnx.load(path)
    metadata = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} is an ONNX file but not a litcompress artefact (no '{METADATA_KEY}' metadata).")
    with open(path, "rb") as f:
        return OnnxRuntimeModule(f.read()), json.loads(metadata[METADATA_KEY])
