"""Save a quantized model as one self-contained artefact and load it back without re-tuning.

Formats: ONNX (``onnxruntime`` backend, or an fp32 model on request; recipe in the model's
metadata), TorchScript (``torch_ao`` backend, or an fp32 model on request) and a ``torch.export``
program (``pt2e`` and ``torchao`` backends, and fp32 models by default), each with the recipe
stored inside the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from litcompress._files import cannot_write, what_is_in_the_way, written_atomically

from .backends import BackendUnavailableError, ExportError, FixedDimError, get_backend, torchscript_parts
from .config import Recipe
from .outputs import RebuiltOutputs
from .shapes import DynamicDims, normalize_dynamic_dims, resolve_dynamic_dims

FORMAT_VERSION = 1


#: File formats of an unquantized (fp32) model, and the suffix each is given.
FP32_FORMATS: tuple[str, ...] = ("export", "torchscript", "onnx")
FP32_SUFFIXES: dict[str, str] = {"export": ".pt2", "torchscript": ".pt", "onnx": ".onnx"}


def save_quantized(model: nn.Module, recipe: Recipe | None, path: str | os.PathLike,
                   example_inputs: torch.Tensor | Sequence[torch.Tensor], *, fp32_format: str = "export",
                   dynamic_dims: DynamicDims | Mapping[int, int | Sequence[int]] | None = None) -> int:
    """Write ``model`` (built from ``recipe``) to ``path``; return the file size in bytes.

    A quantized model is saved in its backend's format. An fp32 model (``recipe=None``) is saved as a ``torch.export``
    program (``fp32_format="export"``), as TorchScript (``"torchscript"``, deprecated by torch) or as ONNX
    (``"onnx"``, run by ONNX Runtime once loaded). A model whose inputs are containers (a dict, a tuple) is saved as
    one that takes the tensors in them, flattened as ``torch.utils._pytree.tree_flatten`` orders them (dict entries
    by sorted key). The file leaves the batch dim of every input free, and the `dynamic_dims` (``{input_index:
    dims}``, as in :class:`PTQConfig`; ``QuantizationResult.save`` passes the ones its search used); a format that
    cannot leave one free raises an error that says which. A model the recipe did not build (another backend's, an
    int8 model with ``recipe=None``) is refused: the file would name the wrong recipe.
    """
    from .nested import InputStructure, NestedInputs, flat_inputs, is_nested
    from .tuner import FloatInputs, float32_inputs

    if not isinstance(model, nn.Module):  # ("'NoneType' object has no attribute 'named_modules'")
        raise TypeError(f"save_quantized(model={type(model).__name__}): expected the nn.Module to write "
                        "(QuantizationResult.model, or an fp32 model with recipe=None).")
    if recipe is not None and not isinstance(recipe, Recipe):  # (failed in the writer: 'str' has no 'to_dict')
        raise TypeError(f"save_quantized(recipe={recipe!r}): give the Recipe the model was built from "
                        "(QuantizationResult.recipe), or None for an fp32 model.")
    if example_inputs is None or isinstance(example_inputs, (str, bytes)) or \
            not isinstance(example_inputs, (torch.Tensor, Sequence, Mapping)):
        # (a numpy array: "the model's inputs hold no tensor: there is nothing for an int8 model to take")
        given = "None" if example_inputs is None else type(example_inputs).__name__
        raise TypeError(f"save_quantized(example_inputs={given}): give the model's inputs "
                        "for one batch as torch tensors (a tensor, or a tuple of them; torch.from_numpy(array) for "
                        "a numpy array): the file is traced or exported on them.")
    arrays = [i for i, value in enumerate(example_inputs if isinstance(example_inputs, (list, tuple)) else ())
              if type(value).__module__ == "numpy"]
    if arrays:  # (the same "hold no tensor" words)
        raise TypeError(f"save_quantized(example_inputs=...): input {arrays[0]} is a numpy "
                        f"{type(example_inputs[arrays[0]]).__name__}; give torch tensors (torch.from_numpy(array)).")
    if not isinstance(path, (str, os.PathLike)):  # (os.fspath's words, naming no argument)
        raise TypeError(f"save_quantized(path={path!r}): expected the file to write, a str or os.PathLike.")
    _check_made_by(model, recipe)
    path = os.fspath(path)
    if not path or path.endswith(("/", os.sep)):  # else the export ran and wrote a file named like the folder
        raise ValueError(f"save_quantized: {path!r} names a folder; give a file path (e.g. "
                         f"{os.path.join(path or '.', 'model.pt')!r}).")
    if isinstance(example_inputs, torch.Tensor):  # one input, as quantize() takes it (a tensor is a sequence of rows)
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):  # iterated, its keys were taken for inputs: "the inputs hold no tensor"
        raise TypeError(f"save_quantized(example_inputs={{{', '.join(map(repr, example_inputs))}}}): give the "
                        "model's positional inputs as a tuple: (batch,) for a forward that takes the dict itself, or "
                        "the tensors in the order of forward's parameters.")
    model = _eager(model)
    if isinstance(model, NestedInputs):  # a result for a model of container inputs: its file takes their tensors
        model, example_inputs = model.model, model.structure.flatten(tuple(example_inputs), "example_inputs")
    elif is_nested(example_inputs):  # the same for a float model of container inputs
        structure = InputStructure.of(tuple(example_inputs))
        model, example_inputs = flat_inputs(model, structure), structure.flatten(tuple(example_inputs))
    if isinstance(model, FloatInputs):  # a bf16/fp16/fp64 model's result: its file takes float32 inputs
        model, example_inputs = model.model, float32_inputs(tuple(example_inputs))
    model = _eager(model)
    dynamic_dims = normalize_dynamic_dims(dynamic_dims, "save_quantized")
    if dynamic_dims is not None:  # the declared dims, and every input's batch dim (declaring a length fixed the batch)
        dynamic_dims = resolve_dynamic_dims([tuple(example_inputs)], dynamic_dims)
    if fp32_format not in FP32_FORMATS:
        raise ValueError(f"save_quantized(fp32_format={fp32_format!r}): use one of {FP32_FORMATS}.")
    from .backends.onnxruntime import OnnxRuntimeModule

    sessions = [name for name, m in model.named_modules() if isinstance(m, OnnxRuntimeModule)]
    if recipe is None and sessions and (sessions != [""] or fp32_format != "onnx"):
        # (torch.export and TorchScript trace torch code: torch's own error, or a false "fixed dim" one; the ONNX
        # exporter traces through a session inside another module and writes none of its ops)
        raise ValueError(f"save_quantized(fp32_format={fp32_format!r}): this fp32 model runs "
                         + ("in ONNX Runtime (read from an .onnx file), which only an ONNX file holds; save it with "
                            "fp32_format='onnx'." if sessions == [""] else
                            f"an ONNX Runtime session inside it ({', '.join(sessions[:3])}), which no file format "
                            "holds; save the torch model that file was exported from."))
    if os.path.isdir(path):  # else found only at the rename, after the whole export, naming a `.partial` file
        raise IsADirectoryError(f"save_quantized: {path!r} is a directory; give a file path in it (e.g. "
                                f"{os.path.join(path, 'model.pt')!r}).")
    blocking = what_is_in_the_way(Path(path).parent)
    if blocking is not None:  # mkdir's "File exists"
        raise NotADirectoryError(f"save_quantized: {os.fspath(path)!r}: {blocking}.")
    # a missing folder is made, as the pipeline's report does (it failed after the export, in each backend's words);
    # one that cannot be written fails here, naming the path (torch's writer failed after the export, naming no file)
    why = cannot_write(Path(path).parent)
    if why is not None:
        raise PermissionError(f"save_quantized: cannot write {os.fspath(path)!r} ({why}).")
    metadata = json.dumps({"litcompress_format": FORMAT_VERSION,
                           "recipe": None if recipe is None else recipe.to_dict()})
    # written beside `path` and renamed over it once complete: a file there is never lost to a failed or killed write
    with written_atomically(Path(path)) as partial:
        _write(model, recipe, os.fspath(partial), metadata, tuple(example_inputs), fp32_format, dynamic_dims)
    return os.path.getsize(path)


# the packages whose module classes are int8 layers of torch.ao (eager or FX convert), less the fp32 ones among
# them: FloatFunctional (an fp32 model's residual adds, e.g. torchvision's quantizable models) and the reference
# modules (fp32 weights)
_TORCH_AO_INT8 = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized",
                  "torch.nn.intrinsic.quantized")
_TORCH_AO_FP32 = ("torch.ao.nn.quantized.reference", "torch.nn.quantized._reference")
_BUILT_IN_BACKENDS = ("torch_ao", "torchao", "pt2e", "onnxruntime")


def _int8_parts(model: nn.Module) -> dict[str, list[str]]:
    """Per backend, the parts of `model` that show it made them: torch.ao's int8 modules (or an fx program calling
    its int8 ops, or a TorchScript one: a torch_ao file read back), torchao's quantized weight tensors (its tensor
    subclasses), a PT2E program's quantize/dequantize ops, an ONNX Runtime session running int8 ops. A torchao
    program read back from its file shows nothing here."""
    from .backends.exported import ExportedInference
    from .backends.onnxruntime import OnnxRuntimeModule

    parts: dict[str, list[str]] = {}
    scripted: list[str] = []  # (a scripted module's own modules are read with it)
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule) and not any(name.startswith(f"{s}.") or not s
                                                                  for s in scripted):
            scripted.append(name)
            try:
                calls_int8 = "quantized::" in str(module.inlined_graph)
            except (AttributeError, RuntimeError):  # (no forward)
                calls_int8 = False
            if calls_int8:
                parts.setdefault("torch_ao", []).append(f"{name or 'the'} TorchScript program's quantized ops")
        if isinstance(module, OnnxRuntimeModule) and _runs_int8_onnx(module.model_bytes):
            parts.setdefault("onnxruntime", []).append(f"{name or 'the'} ONNX graph's int8 ops")
        kind = type(module).__module__
        if kind.startswith(_TORCH_AO_INT8) and not kind.startswith(_TORCH_AO_FP32) and \
                type(module).__name__ not in ("FloatFunctional", "FXFloatFunctional"):
            parts.setdefault("torch_ao", []).append(name or type(module).__name__)
        graph = getattr(module.program, "graph", None) if isinstance(module, ExportedInference) else None
        if graph is not None and any(node.op == "call_function" and str(node.target).startswith(
                "quantized_decomposed.") for node in graph.nodes):  # PT2E's q/dq ops (a torchao program has none)
            parts.setdefault("pt2e", []).append(f"{name or 'the'} program's quantize/dequantize ops")
        if isinstance(module, torch.fx.GraphModule) and any(  # FX's convert: int8 functional ops (a Linear subclass)
                node.op == "call_function" and (str(node.target).startswith("quantized.")
                                                or getattr(node.target, "__name__", "") == "quantize_per_tensor")
                for node in module.graph.nodes):
            parts.setdefault("torch_ao", []).append(f"{name or 'the'} fx program's quantized ops")
        for tensor_name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if isinstance(tensor, torch.Tensor) and type(tensor).__module__.startswith("torchao."):
                parts.setdefault("torchao", []).append(f"{name}.{tensor_name}" if name else tensor_name)
    return parts


# ONNX Runtime's int8 operators (its quantizer writes these for dynamic, static QDQ and QOperator models)
_ONNX_INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                            "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul", "QGemm",
                            "QAttention", "DynamicQuantizeLSTM", "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul"})


def _runs_int8_onnx(model_bytes: bytes) -> bool:
    import onnx

    proto = onnx.load_from_string(model_bytes)
    graphs, seen = [proto.graph], False
    while graphs and not seen:
        graph = graphs.pop()
        for node in graph.node:
            seen = seen or node.op_type in _ONNX_INT8_OPS
            graphs.extend(attribute.g for attribute in node.attribute if attribute.HasField("g"))
    return seen


def _check_made_by(model: nn.Module, recipe: Recipe | None) -> None:
    """Refuse a model the recipe did not build, as far as its parts show it (:func:`_int8_parts`): an int8 model
    saved as fp32 (its exporters failed in words about an fp32 model, TorchScript wrote a file whose checksums then
    read as damaged, an int8 ONNX file read back was written with no recipe), one made by another backend (torch's
    errors from inside its writer, or the wrong recipe written into the file). (A model with no int8 part under a
    recipe is written: a search can return one, e.g. with every layer the backend could take kept in fp32.)"""
    from .backends.onnxruntime import OnnxRuntimeModule

    parts = _int8_parts(model)
    if recipe is None:
        if parts:
            backend, names = next(iter(parts.items()))
            raise ValueError(f"save_quantized(recipe=None): this model holds int8 parts of {backend} "
                             f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}), and recipe=None saves an "
                             "fp32 model: give the Recipe it was built from (QuantizationResult.save(path) passes "
                             "it).")
        return
    if recipe.backend not in _BUILT_IN_BACKENDS:  # a backend registered in BACKEND_REGISTRY builds what it likes
        return
    other = {backend: names for backend, names in parts.items() if backend != recipe.backend}
    sessions = recipe.backend != "onnxruntime" and any(isinstance(m, OnnxRuntimeModule) for m in model.modules())
    if other or sessions:
        backend, names = ("onnxruntime", ["an ONNX Runtime session"]) if sessions else next(iter(other.items()))
        raise ValueError(f"save_quantized(recipe={recipe.describe()}): this model was made by {backend} "
                         f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}), not {recipe.backend}: give "
                         "the Recipe it was built from (QuantizationResult.recipe).")


def _eager(model: nn.Module) -> nn.Module:
    """`model` without its ``torch.compile`` wrapper, and a copy of it with its compiled parts' eager modules where it
    compiles a part: the exporters trace eager modules (torch.export failed on a compiled one in words about
    `dynamic_shapes`, TorchScript and ONNX in words about FX and dynamo)."""
    from litcompress.pruning.engine import compiled_module_names, eager_copy, is_compiled

    while is_compiled(model):
        model = model._orig_mod
    return eager_copy(model) if compiled_module_names(model) else model


class Fp32FormatError(ExportError):
    """An fp32 model that one file format cannot hold (its exporter's error is the cause); another format may."""


_OTHER_FP32_FORMATS = ("another fp32_format may write it: 'torchscript' traces what the other two refuse (a "
                       "forward that packs sequences with pack_padded_sequence, for one), as the pipeline's 'auto' "
                       "tries each in turn.")


def bfloat16_tensors(model: nn.Module) -> list[str]:
    """The names of `model`'s bfloat16 parameters: its layers compute in bfloat16, which ONNX Runtime's CPU kernels
    do not take (a bfloat16 buffer alone, a scale the forward casts, is no sign of it)."""
    return [name for name, tensor in model.named_parameters() if tensor.dtype == torch.bfloat16]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else "no message"


def _raised_in_torch_export(error: BaseException) -> bool:
    """Whether `error` came from inside ``torch.export.export``'s tracing (not from the model run eagerly before it,
    nor from writing the archive: ``torch.export.save`` lives beside the tracer, in ``torch/export``)."""
    import traceback

    marks = [os.sep + os.path.join("torch", "export", "_trace.py"), os.sep + os.path.join("torch", "_dynamo") + os.sep]
    return any(any(mark in frame.filename for mark in marks) for frame in traceback.extract_tb(error.__traceback__))


#: what torch.save's legacy (pickle, not zip) files begin with, after the pickle protocol (and a frame): its magic
#: number 0x1950a86a20f9469cfc6c as a 10-byte long
_LEGACY_TORCH_SAVE = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def _write(model: nn.Module, recipe: Recipe | None, path: str, metadata: str, example_inputs: tuple,
           fp32_format: str, dynamic_dims: DynamicDims | None) -> None:
    if recipe is None and fp32_format == "export":
        from litcompress.pruning.shrink import eval_outputs

        from .backends.exported import save_loaded_program, save_program

        eval_outputs(model, example_inputs)  # inputs the model does not take fail here, in the model's own words
        scripted = torchscript_parts(model)
        if scripted:  # torch.export refuses it, from outside its tracer (so it was raised unwrapped, without advice)
            what = ("is TorchScript, which torch.export does not trace; fp32_format='torchscript' writes it as it is, "
                    "and 'onnx' exports it" if scripted == [""] else
                    f"holds TorchScript modules ({', '.join(scripted[:3])}), which torch.export (and the ONNX "
                    "exporter) cannot trace through; fp32_format='torchscript' writes it")
            raise Fp32FormatError(f"save_quantized(fp32_format='export'): this fp32 model {what}.")
        try:
            if not save_loaded_program(model, path, metadata, example_inputs, dynamic_dims=dynamic_dims):
                save_program(model, path, metadata, example_inputs, dynamic_dims=dynamic_dims)
        except FixedDimError as exc:
            raise FixedDimError(f"save_quantized: {exc}; fp32_format='onnx' or 'torchscript' may keep it free") \
                from exc
        except Exception as exc:
            if not _raised_in_torch_export(exc):  # the model failing on its inputs, a copy failing: as they are
                raise
            # torch.export's own words, and no advice
            raise Fp32FormatError(f"save_quantized(fp32_format='export'): torch.export failed on this fp32 model "
                                  f"({type(exc).__name__}: {_first_line(exc)}); {_OTHER_FP32_FORMATS}") from exc
        return
    backend_name = "torch_ao" if recipe is None else recipe.backend
    if recipe is None and fp32_format == "onnx":
        from .backends.onnxruntime import OnnxRuntimeModule, export_onnx

        backend_name = "onnxruntime"
        if not isinstance(model, OnnxRuntimeModule):
            scripted = [part for part in torchscript_parts(model) if part]  # (a whole TorchScript model exports)
            if scripted:  # the exporter failed in torch's words ("not part of the active trace")
                raise Fp32FormatError(f"save_quantized(fp32_format='onnx'): this fp32 model holds TorchScript "
                                      f"modules ({', '.join(scripted[:3])}), which the ONNX exporter cannot trace "
                                      "through; fp32_format='torchscript' writes it.")
            bfloat16 = bfloat16_tensors(model)
            if bfloat16:  # exported, its session failed: "Could not find an implementation for Gemm(13)"
                raise Fp32FormatError(f"save_quantized(fp32_format='onnx'): the model computes in bfloat16 "
                                      f"({', '.join(bfloat16[:3])}{', ...' if len(bfloat16) > 3 else ''}), which "
                                      "ONNX Runtime's CPU kernels do not take (Gemm, MatMul, Conv); fp32_format="
                                      "'export' or 'torchscript' writes it, or cast the model to float32 first.")
            try:
                model = OnnxRuntimeModule(export_onnx(model, example_inputs, dynamic_dims))
            except FixedDimError:
                raise
            except ExportError as exc:
                raise Fp32FormatError(f"save_quantized(fp32_format='onnx'): {exc}; {_OTHER_FP32_FORMATS}") from exc
    get_backend(backend_name).save(model, path, metadata, example_inputs, dynamic_dims=dynamic_dims)


def taking_inputs_like(loaded: nn.Module, saved: nn.Module, example_inputs: Sequence[object]) -> nn.Module:
    """`loaded` (a file `save_quantized` wrote for `saved`) wrapped to take the inputs `saved` takes: the
    containers of a model of nested inputs, the bfloat16/float16/float64 inputs of such a model's result."""
    from .nested import InputStructure, NestedInputs, is_nested
    from .tuner import FloatInputs

    structure = None
    if isinstance(saved, NestedInputs):
        saved, structure = saved.model, saved.structure
    elif is_nested(example_inputs):
        structure = InputStructure.of(tuple(example_inputs))
    if isinstance(saved, FloatInputs):
        loaded = FloatInputs(loaded)
    return loaded if structure is None else NestedInputs(loaded, structure)


def load_quantized(path: str | os.PathLike, *, compile: bool = False) -> tuple[nn.Module, Recipe | None]:
    """Load an artefact written by :func:`save_quantized` (or ``QuantizationResult.save``, ``QATResult.save``).

    Returns the runnable model and the recipe it was built from (None for an fp32 fallback).

    A ``torch.export`` program (``.pt2``: the pt2e and torchao backends', quantization-aware training's) runs torch's
    reference int8 ops as loaded, slower than fp32; ``compile=True`` runs it through ``torch.compile`` (inductor,
    freezing: fused int8 x86 kernels; a C++ compiler, compiled on the first call of each input shape, up to torch's
    recompile limit, 8 shapes by default, beyond which the reference ops run). ONNX and TorchScript files run their
    runtimes' own kernels and are refused with it.
    """
    if not isinstance(compile, bool):
        raise TypeError(f"load_quantized(compile={compile!r}): use True or False.")
    model, recipe = _load(path)
    if compile:
        from .backends.exported import ExportedInference
        from .backends.pt2e import CompiledInference, check_cpp_compiler

        inner = model.model if isinstance(model, RebuiltOutputs) else model
        if not isinstance(inner, ExportedInference):
            raise ValueError(f"load_quantized({os.fspath(path)!r}, compile=True): compile applies to torch.export "
                             f"programs (.pt2); this file runs in {type(inner).__name__}, with its runtime's own "
                             "kernels: load it without compile.")
        check_cpp_compiler(f"load_quantized({os.fspath(path)!r}, compile=True)")  # (else at the first call)
        compiled = CompiledInference(inner.program)
        model = RebuiltOutputs(compiled, model.structure) if isinstance(model, RebuiltOutputs) else compiled
    return model, recipe


def _first_damaged_member(archive: zipfile.ZipFile) -> tuple[str, str] | None:
    """The name of the first member of `archive` that does not read back, with what is wrong, or None."""
    for info in archive.infolist():
        try:
            with archive.open(info) as member:
                while member.read(1 << 20):
                    pass
        except (zipfile.BadZipFile, zlib.error, EOFError):
            return info.filename, "fails its checksum"
        # a changed byte in the member's records: a name that no longer decodes, an unknown compression method, an
        # offset outside the file
        except (ValueError, NotImplementedError, OverflowError, OSError) as error:
            return info.filename, f"does not read ({type(error).__name__}: {error})"
    return None


@contextlib.contextmanager
def _read_by_torch(path: str) -> Iterator[None]:
    """torch's reading errors of an archive whose checksums pass, in load_quantized's words: its zip reader's (a
    changed byte in the directory records) and its deserializers' (TorchScript's pickle records, torch.export's
    program, whose cause torch logs before it). Other errors (torchao missing for a pt2e file) keep their own."""
    try:
        yield
    except BackendUnavailableError:
        raise
    # (torch.export's reader asserts the archive's format; a changed byte in a record it decodes or parses)
    except (RuntimeError, AssertionError, UnicodeDecodeError, json.JSONDecodeError) as error:
        text = str(error).strip()
        first = text.splitlines()[0] if text else type(error).__name__
        if "PytorchStreamReader" in text:
            raise ValueError(f"load_quantized: {path!r} is damaged: torch's zip reader fails on it ({first}); save "
                             "or copy the model file again.") from error
        # a reader's error, not one of torch's own about the host (a CUDA file on a CPU-only machine says so itself)
        if isinstance(error, RuntimeError) and ("CUDA" in text or "device" in text or not any(
                reader in text for reader in ("deserializ", "PROTO opcode", "pickle", "archive", "record",
                                              "Unknown builtin op"))):
            raise
        raise ValueError(f"load_quantized: torch cannot read the model in {path!r} ({first}): bytes changed since it "
                         "was written (save or copy the file again), a file written by another torch version, or an "
                         "operator the model calls that this process has not registered (import the library that "
                         "defines it before loading; torch's warning above names it, if it logged one).") from error


# (model.load_state_dict alone refuses a masked state's `weight_orig`/`weight_mask` and a shrunk one's widths)
_STATE_DICT_ADVICE = ("A state dict loads into your model with litcompress.load_pruned_state_dict(model, "
                      "torch.load(path)) (pruning masks too), one of a model shrink narrowed with "
                      "litcompress.load_shrunk_state_dict, a Lightning checkpoint with "
                      "litcompress.load_module_from_checkpoint(YourModule, path).")


def _load(path: str | os.PathLike) -> tuple[nn.Module, Recipe | None]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_quantized: no file at {path!r}.")
    if os.path.isdir(path):
        raise IsADirectoryError(f"load_quantized: {path!r} is a directory; give the model file in it (model.onnx, "
                                "model.pt or model.pt2).")
    not_ours = (f"load_quantized: {path!r} is not a model file litcompress wrote (save_quantized, "
                "QuantizationResult.save or `litcompress compress`)")
    if os.path.getsize(path) == 0:  # ONNX reads an empty file as an empty model: "no metadata" would mislead
        raise ValueError(f"{not_ours}: it is empty (0 bytes), as a write cut short by another program leaves one.")
    with open(path, "rb") as file:
        head = file.read(32)
    starts_as_zip = head.startswith(b"PK\x03\x04")
    # (else read as ONNX, and called a model file cut short or changed); a pickle protocol >= 4 frames it first
    if head.startswith(b"\x80") and _LEGACY_TORCH_SAVE in head:
        raise ValueError(f"{not_ours}: it is a torch.save file of the legacy format (_use_new_zipfile_serialization="
                         f"False: a state dict or a pickled object). {_STATE_DICT_ADVICE}")
    cut_short = (f"load_quantized: {path!r} is a zip archive whose end is missing, as a copy or download cut short "
                 "leaves one; save or copy the model file again.")

    def directory_damaged(error: Exception) -> str:
        return f"load_quantized: {path!r} is damaged: its zip directory does not read ({error}); save or copy the " \
            "model file again."

    try:
        is_zip = zipfile.is_zipfile(path)
    except zipfile.BadZipFile as error:  # an end record found, with values changed ("span multiple disks")
        raise ValueError(directory_damaged(error)) from error
    if is_zip:
        try:
            archive = zipfile.ZipFile(path)
        # an end record found, its directory unreadable (a changed byte: a name, a version, an offset)
        except (zipfile.BadZipFile, ValueError, NotImplementedError, OverflowError, OSError) as error:
            raise ValueError(directory_damaged(error)) from error
        with archive:
            names = archive.namelist()
            # the end found is that of a zip stored inside (torch.export nests torch.save archives): the outer end
            # was cut off
            if starts_as_zip and min((info.header_offset for info in archive.infolist()), default=0) > 0:
                raise ValueError(cut_short)
            damaged = _first_damaged_member(archive)
        if damaged is not None:
            raise ValueError(f"load_quantized: {path!r} is damaged: its member {damaged[0]!r} {damaged[1]} (bytes "
                             "changed since it was written); save or copy the model file again.")
        torchscript = any(n.endswith("constants.pkl") or "/code/" in n for n in names)
        exported = any(n.endswith("/archive_format") for n in names)
        if torchscript and any(n.endswith("extra/litcompress.json") for n in names):
            from .backends.torch_ao import load_torchscript

            with _read_by_torch(path):
                model, metadata = load_torchscript(path)
        elif torchscript:
            raise ValueError(f"{not_ours}: it is a TorchScript archive without litcompress's metadata; "
                             "torch.jit.load(path) runs it.")
        elif any(n.endswith(".pkl") for n in names) and not any("/models/" in n or "/extra/" in n for n in names):
            # torch.save's archive (a state dict, a pickled module): no program to run
            raise ValueError(f"{not_ours}: it is a torch.save file (a state dict or a pickled object). "
                             f"{_STATE_DICT_ADVICE}")
        elif not exported:
            raise ValueError(f"{not_ours}: it is a zip archive of another kind (neither TorchScript nor torch.export).")
        else:
            from .backends.exported import load_program

            with _read_by_torch(path):
                model, metadata = load_program(path)
    elif starts_as_zip:
        raise ValueError(cut_short)
    else:
        from .backends.onnxruntime import load_onnx

        unreadable = (f"{not_ours}, or one cut short or changed since it was written: it reads neither as ONNX nor "
                      "as a zip archive (TorchScript, torch.export); if it is a model.onnx litcompress wrote, save "
                      "or copy it again")
        try:
            model, metadata = load_onnx(path)
        except UnicodeDecodeError as error:  # a changed byte in the metadata (a ValueError too, but not ours)
            raise ValueError(f"{unreadable} ({type(error).__name__}: {error}).") from error
        except ValueError:
            raise
        except Exception as error:  # protobuf's DecodeError, ONNX Runtime's graph checks: not (intact) ONNX
            raise ValueError(f"{unreadable} ({type(error).__name__}: {error}).") from error
    recipe = metadata.get("recipe")
    return model, None if recipe is None else Recipe.from_dict(recipe)
