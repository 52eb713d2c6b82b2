"""Backends behind one interface, looked up by name in a registry.

Each backend module imports its framework lazily (inside methods), so importing
``litcompress.quantization`` never needs onnxruntime or torchao, and the removal of
deprecated ``torch.ao.quantization`` from torch breaks ``torch_ao.py`` only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from litcompress._inputs import copied

from ..config import Recipe
from ..outputs import tensor_leaves
from ..shapes import dims_for

if TYPE_CHECKING:
    from ..config import PTQConfig
    from ..shapes import DynamicDims

Inputs = tuple  # positional model inputs, e.g. (tensor,)


class BackendUnavailableError(RuntimeError):
    """The backend's framework is not installed or does not work on this host."""


class ExportError(RuntimeError):
    """The model could not be exported/traced for a backend that needs a graph. `fp32_layers`: layers whose int8
    version is the cause, so that a candidate keeping them fp32 may succeed (the search tries that once)."""

    def __init__(self, message: str, fp32_layers: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.fp32_layers = tuple(fp32_layers)


class FixedDimError(ExportError):
    """An exporter fixed an input dim that has to stay free: the batch, a dim that varies in the data, or a declared
    one. `fp32_layers`: layers whose int8 version fixed it, so that a candidate keeping them fp32 may not (the search
    tries that once)."""


#: torch's names of the non-float dtypes in its error messages (``ScalarType`` names)
_TORCH_TYPE_NAMES = {torch.bool: "Bool", torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short",
                     torch.int32: "Int", torch.int64: "Long"}


def nonfloat_input_error(error: BaseException, example_inputs: Inputs, where: str) -> ExportError | None:
    """An :class:`ExportError` saying that an int8 op reads a tensor that is not float, naming the model's inputs of
    that kind (a bool mask, ids) if it has any, when `error`, raised while calibrating or converting a static int8
    model, is torch's about such a dtype ("Quantize only works on Float Tensor, got Bool", '"linspace_cpu" not
    implemented for 'Long'': observers take float tensors only); None for another error. Which tensor the op reads
    torch does not say: one of those inputs, or one the forward computes (``x > 0``)."""
    import re

    nonfloat = [(i, t) for i, t in enumerate(example_inputs)
                if isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex()]
    names = "|".join(_TORCH_TYPE_NAMES.values())
    said = str(error)
    # torch's words for an observer or a quantize op given such a tensor; or an input's dtype named otherwise
    about_one = re.search(rf"got ({names})\b|implemented for '({names})'", said) is not None
    named = {_TORCH_TYPE_NAMES.get(t.dtype) for _, t in nonfloat} - {None}
    if not (about_one or any(re.search(rf"\b{name}\b", said) for name in named)):
        return None
    inputs = [f"input {i} ({str(t.dtype).removeprefix('torch.')} {tuple(t.shape)})" for i, t in nonfloat]
    examples = (f"the model's {', '.join(inputs)}, or a comparison's result (x > 0)" if inputs
                else "a comparison's result (x > 0) or ids the forward computes")
    return ExportError(f"{where}: an int8 op reads a tensor that is not float, and the observers take float "
                       f"tensors only ({type(error).__name__}: {error}): a mask or ids used in arithmetic, such as "
                       f"{examples}; the onnxruntime backend's static int8, or dynamic int8, quantizes such a model")


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal shapes and values within 0.1% of the largest finite one (NaN where NaN is expected; complex values
    compared part by part)."""
    if got.shape != expected.shape or got.is_complex() != expected.is_complex():
        return False
    if not expected.numel():
        return True
    if expected.is_complex():
        got, expected = torch.view_as_real(got.resolve_conj()), torch.view_as_real(expected.resolve_conj())
    got, expected = got.float(), expected.float()
    finite = expected[expected.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * max(scale, 1e-6), equal_nan=True)


@torch.no_grad()
def check_free_dims(reference: Callable[..., object], exported: Callable[..., object], example_inputs: Inputs,
                    dynamic_dims: "DynamicDims | None", exporter: str) -> None:
    """Raise :class:`FixedDimError` when `exported` (a file's model) does not give `reference`'s output on the
    example with one and two more rows along the batch dim, or cut one shorter along its other free dims: the exporter
    fixed their sizes (a trace keeps a size the code turned into a Python number, as torch.ao's LSTM does with a
    packed sequence's batch; two sizes: a row read at ``int(batch) // 2`` is the same row at one more). A variant
    `reference` itself refuses (a model that needs the example's sizes) is not checked; NaN (an empty segment's mean)
    compares equal to NaN.
    """
    from ..shapes import describe_fixed, grown_along_batch, shrunk_along_free_dims

    dims = dims_for(example_inputs, dynamic_dims)
    tensors = [(i, t) for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor)]
    batch = [(i, 0, int(t.shape[0])) for i, t in tensors if 0 in dims[i]]
    variants = (("with one more row along the batch", grown_along_batch(example_inputs, dynamic_dims), batch),
                ("with two more rows along the batch", grown_along_batch(example_inputs, dynamic_dims, rows=2), batch),
                ("one shorter there", shrunk_along_free_dims(example_inputs, dynamic_dims),
                 [(i, d, int(t.shape[d])) for i, t in tensors for d in dims[i] if d > 0 and t.shape[d] > 2]))
    for how, inputs, changed in variants:
        if inputs is None:
            continue
        try:
            expected = tensor_leaves(reference(*copied(inputs)))
        except Exception:  # the model itself needs the example's sizes: nothing an exporter could keep free
            continue
        try:
            got = tensor_leaves(exported(*copied(inputs)))
            error = None if _same_leaves(got, expected) else "gives other outputs"
        except Exception as exc:
            error = f"fails ({type(exc).__name__})"
        if error and not _same_leaves(tensor_leaves(reference(*copied(inputs))), expected):
            if _same_leaves(tensor_leaves(reference(*copied(example_inputs))),
                            tensor_leaves(reference(*copied(example_inputs)))):
                # steady on the example itself: the variant is no input the model takes (rows that must differ, or
                # an input that must stay as long as another), so it checks nothing
                continue
            # not the file's fault: the model itself answers the same inputs differently from one call to the next
            raise ExportError(f"the model gives other outputs on the same inputs from one call to the next (on the "
                              f"example {how}), so no file can reproduce it: randomness left in eval mode, or an "
                              "(int8) kernel that is wrong for these shapes (keep its layers in fp32_layers, or use "
                              "another backend)")
        if error:
            raise FixedDimError(f"{exporter} did not leave free {describe_fixed(changed)}, which must stay free (the "
                                "batch, a dim that varies in the data or one declared in dynamic_dims): the file "
                                f"{error} on the example {how}")


def _same_leaves(got: list, expected: list) -> bool:
    return len(got) == len(expected) and all(_close(g, e) for g, e in zip(got, expected))


class Backend:
    """Interface of a quantization backend.

    Subclasses set ``name`` and ``approaches`` and implement the methods below.
    """

    name: str = ""
    approaches: tuple[str, ...] = ()
    artifact_suffix: str = ".pt"
    #: an embedding table quantized with a scale per row (torch's); False: one scale for the table, which the
    #: sensitivity ranking must measure so (a table with one outlier row loses every other row's precision)
    table_scale_per_row: bool = True
    #: whether it quantizes a TorchScript model; False: it swaps eager modules, which a scripted model has none of
    #: (its candidate would be the fp32 model under an int8 name), so the search skips it for one
    takes_torchscript: bool = True
    #: per input, the dims an exported candidate leaves free (None: the batch dims); set by :meth:`configure`
    dynamic_dims: "DynamicDims | None" = None

    def takes_scripted_parts(self, approach: str) -> bool:
        """Whether it quantizes an eager model holding TorchScript modules (``torch.jit.script`` of a part): tracers
        (torch.export, FX, the ONNX exporter) cannot trace through one, so by default not."""
        return False

    def check_available(self) -> None:
        """Raise :class:`BackendUnavailableError` with an actionable message if unusable."""

    def configure(self, config: "PTQConfig") -> None:
        """Read the options of ``config`` that concern this backend (an override calls ``super().configure``)."""
        self.dynamic_dims = config.dynamic_dims

    def recipes(self, approach: str) -> list[Recipe]:
        """Knob variants to try first (before falling back layers), most promising first."""
        raise NotImplementedError

    def quantize(self, model: nn.Module, recipe: Recipe, example_inputs: Inputs,
                 calibration: Sequence[Inputs]) -> nn.Module:
        """Return a new quantized module; ``model`` is a private copy the backend may consume."""
        raise NotImplementedError

    def save(self, quantized: nn.Module, path: str, metadata: str, example_inputs: Inputs, *,
             dynamic_dims: "DynamicDims | None" = None) -> None:
        """Write one self-contained artefact holding ``metadata`` (JSON text) that leaves `dynamic_dims` free."""
        raise NotImplementedError

    def timed_form(self, quantized: nn.Module, example_inputs: Inputs) -> nn.Module:
        """The module whose speed is `quantized`'s: what its file runs once loaded (the search times this). Default:
        `quantized` itself."""
        return quantized

    def quantizable_layers(self, model: nn.Module, approach: str) -> list[str]:
        """The layers of `model` this backend makes int8 for `approach`: those the search may keep in fp32 (a
        fallback that keeps all of them is no quantization at all)."""
        return quantizable_layers(model, approach)

    def fp32_with(self, model: nn.Module, layers: Sequence[str]) -> set[str]:
        """The layers a recipe keeping `layers` in fp32 keeps in fp32 in `model` (default: those)."""
        return set(layers)


# name -> "module:Class"; modules are imported only when a backend is used.
BACKEND_REGISTRY: dict[str, str] = {
    "torch_ao": "litcompress.quantization.backends.torch_ao:TorchAOBackend",
    "onnxruntime": "litcompress.quantization.backends.onnxruntime:OnnxRuntimeBackend",
    "pt2e": "litcompress.quantization.backends.pt2e:PT2EBackend",
    "torchao": "litcompress.quantization.backends.torchao_weight_only:TorchAOWeightOnlyBackend",
}


#: The approaches each registered backend does (its class's ``approaches``, here so that a configuration is checked
#: without importing the backends).
BACKEND_APPROACHES: dict[str, tuple[str, ...]] = {
    "torch_ao": ("dynamic", "static"),
    "onnxruntime": ("dynamic", "static"),
    "pt2e": ("dynamic", "static"),
    "torchao": ("weight_only",),
}


def backends_doing(approach: str) -> list[str]:
    """The registered backends that do `approach` (``"dynamic"``, ``"static"``, ``"weight_only"``)."""
    return [name for name, approaches in BACKEND_APPROACHES.items() if approach in approaches]


def get_backend(name: str) -> Backend:
    """Instantiate the backend registered under ``name``."""
    if name not in BACKEND_REGISTRY:
        raise ValueError(f"Unknown backend {name!r}; use one of {tuple(BACKEND_REGISTRY)}.")
    module_name, class_name = BACKEND_REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()


# Modules whose forward reads their Linear layers' `.weight` as a plain tensor instead of calling them: the Transformer
# layers' fast-path checks, and MultiheadAttention, which passes out_proj.weight to F.multi_head_attention_forward. A
# quantized Linear there (torch.ao's packed weights, torchao's tensor subclass) fails at the first call.
_READS_WEIGHT_TENSORS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)


def _reads_weight_tensors(model: nn.Module) -> set[str]:
    """Names of the Linear layers inside modules that read their weight tensors directly. An encoder layer whose
    attention shrink narrowed (a HeadPrunedAttention) never takes its fast path: its Linears are called."""
    from litcompress.pruning.heads import HeadPrunedAttention

    return {f"{outer}.{inner}" if outer else inner
            for outer, module in model.named_modules() if isinstance(module, _READS_WEIGHT_TENSORS)
            and not (isinstance(module, nn.TransformerEncoderLayer) and isinstance(module.self_attn,
                                                                                HeadPrunedAttention))
            for inner, child in module.named_modules() if inner and isinstance(child, nn.Linear)}


#: Recurrent layers with dynamic int8 kernels (torch.ao's; ONNX Runtime quantizes LSTM only).
RECURRENT_LAYERS: tuple[type, ...] = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)


def torchscript_parts(model: nn.Module) -> list[str]:
    """Names of the outermost TorchScript modules in `model` (``""``: the model itself is one)."""
    parts: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule) and not any(
                outer == "" or name.startswith(outer + ".") for outer in parts):
            parts.append(name)
    return parts


def is_quantizable_recurrent(module: nn.Module) -> bool:
    """An LSTM/GRU (or cell) torch.ao's dynamic int8 kernels compute: not an LSTM with projections (``proj_size``)."""
    return isinstance(module, RECURRENT_LAYERS) and not getattr(module, "proj_size", 0)


def is_quantizable_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` whose int8 table (one scale per row) computes what it does: not one with ``max_norm``, which
    renormalises rows as it reads them."""
    return type(module) is nn.Embedding and module.max_norm is None


def is_quantizable_embedding_bag(module: nn.Module) -> bool:
    """An ``nn.EmbeddingBag`` that sums its rows (``mode="sum"``, weighted or not) and does not renormalise them:
    torch.ao's int8 bag computes what it does only then (in ``mean`` and ``max`` mode it returns the sum, off by 2-5x
    the output, torch 2.13; ``benchmarks/torch_ao_kernels.py``)."""
    return type(module) is nn.EmbeddingBag and module.mode == "sum" and module.max_norm is None


def is_transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's layers), or a module of its contract: a Linear layer that stores its weight
    as ``(in, out)`` = ``(nx, nf)`` and computes ``addmm(bias, x, weight)``."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    out_features, in_features = getattr(module, "nf", None), getattr(module, "nx", None)
    return (type(module).__name__ == "Conv1D" and isinstance(out_features, int) and isinstance(in_features, int)
            and isinstance(weight, torch.Tensor) and tuple(weight.shape) == (in_features, out_features)
            and (bias is None or isinstance(bias, torch.Tensor) and tuple(bias.shape) == (out_features,)))


def as_linear_layers_(model: nn.Module) -> list[str]:
    """Replace `model`'s (a private copy's) transposed Linear layers (:func:`is_transposed_linear`) with
    ``nn.Linear`` layers computing the same, checked on a random input; returns their (first) names. The int8 backends
    quantize ``nn.Linear`` (torch_ao) or the ``linear`` op (pt2e), so a GPT-2 otherwise stays fp32 on both."""
    linears: dict[int, nn.Linear] = {}
    replaced = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or not is_transposed_linear(module):
            continue
        if id(module) not in linears:
            weight = module.weight.detach()
            linear = nn.Linear(module.nx, module.nf, bias=module.bias is not None, device=weight.device,
                               dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
                probe = torch.randn(3, module.nx, device=weight.device, dtype=weight.dtype)
                expected = module(probe)
                same = torch.allclose(linear(probe), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
            if not same:  # a Conv1D of another contract: left as it is
                continue
            linears[id(module)] = linear.train(module.training)
            replaced.append(name)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, linears[id(module)])  # under each of its names
    return replaced


def quantizable_layers(model: nn.Module, approach: str) -> list[str]:
    """Names of the layers a backend quantizes for ``approach``: Linear, plus the convolutions (1-, 2- and 3-d) when
    static, plus the recurrent layers (LSTM, GRU and the cells) and embedding tables (and summing bags) when
    dynamic."""
    types: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) if approach == "static" else (nn.Linear,)
    return [name for name, module in model.named_modules() if isinstance(module, types)
            or approach == "dynamic" and (is_quantizable_recurrent(module) or is_quantizable_embedding(module)
                                          or is_quantizable_embedding_bag(module))]


def cpu_has_vnni() -> bool:
    """True when the CPU has AVX512-VNNI or AVX-VNNI (int8 dot products without saturation)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    except OSError:
        pass
    # Unknown host (not Linux): be safe, reduce_range costs a little accuracy only.
    return False


def to_inputs(batch: object) -> Inputs:
    """Normalise a batch to positional model inputs."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    raise TypeError(f"Expected a tensor or a tuple of tensors as model inputs, got {type(batch).__name__}.")
