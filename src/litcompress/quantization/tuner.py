"""Accuracy-aware, speed-aware post-training quantization search across backends."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import logging
import math
import numbers
import os
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from litcompress.pruning.engine import (check_lazy_layers_called, compiled_module_names, deepcopy_model, eager_copy,
                                        make_permanent_)
from litcompress.pruning.parametrizations import fold_parametrizations_
from litcompress.pruning.shrink import eval_outputs
from litcompress.report.size import model_size_bytes

from .backends import (Backend, BackendUnavailableError, ExportError, Inputs, as_linear_layers_, get_backend,
                       quantizable_layers, to_inputs, torchscript_parts)
from .config import PTQConfig, Recipe
from .latency import measure_latencies, pinned_threads
from .nested import FlatInputs, InputAdapter, InputStructure, NestedInputs, flat_inputs, is_nested
from .outputs import tensor_leaves
from .sensitivity import layer_sensitivity
from .shapes import DynamicDims, describe_fixed, dims_for, fixed_size_hint, resolve_dynamic_dims

logger = logging.getLogger("litcompress.quantization")

EvalFn = Callable[[nn.Module], float]


class QuantizationGoalWarning(UserWarning):
    """The accuracy goal was not met: the best model found is returned anyway."""


@dataclass
class Trial:
    """One evaluated candidate (a row of the trial table)."""

    index: int
    recipe: Recipe
    metric: float | None = None
    latency_s: float | None = None  # as its file runs once loaded (Backend.timed_form)
    size_bytes: int | None = None  # its weights in memory (state dict; ONNX Runtime's: its model), not its file
    meets_goal: bool = False
    error: str | None = None
    seconds: float = 0.0

    def as_row(self) -> dict[str, Any]:
        return {"trial": self.index, "config": self.recipe.describe(), "metric": self.metric,
                "latency_ms": None if self.latency_s is None else self.latency_s * 1e3,
                "size_bytes": self.size_bytes, "meets_goal": self.meets_goal, "error": self.error}


@dataclass
class QuantizationResult:
    """What :func:`quantize` found: the chosen model (never None), its recipe and the trial table."""

    model: nn.Module
    recipe: Recipe | None
    metric: float
    baseline_metric: float
    latency_s: float
    baseline_latency_s: float
    size_bytes: int  # the chosen model's weights in memory (as Trial.size_bytes): save() returns its file's size
    baseline_size_bytes: int
    goal_met: bool
    trials: list[Trial] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    tuning_seconds: float = 0.0
    example_inputs: Inputs = ()
    dynamic_dims: DynamicDims | None = None  # per input, the dims its files leave free (None: the batch dims)
    goal: float | None = None  # the goal's limit, at least or at most (met within 1e-12 of it: equal figures pass)

    @property
    def speedup(self) -> float:
        """fp32 latency / chosen model latency, measured interleaved on this host."""
        return self.baseline_latency_s / self.latency_s if self.latency_s > 0 else float("nan")

    def table(self) -> str:
        """The trial table as aligned text."""
        # metrics with as many digits as tell them apart (a candidate's 1.000005 against fp32's 1 was shown as 1)
        # (and from the goal, which the messages give: 0.890996 was shown as 0.891, "no", beside a goal of >= 0.891)
        measured = [t.metric for t in self.trials if t.metric is not None]
        # (not a goal some metric meets within the check's epsilon, 1e-12 of it: "0.7" for 0.7 against a goal of
        # 0.7000000000000001 would have taken 16 digits, and meets it)
        goal = self.goal if self.goal is not None and math.isfinite(self.goal) and not any(
            abs(m - self.goal) <= 1e-12 * max(1.0, abs(self.goal)) for m in measured) else None
        compared = [self.baseline_metric, *measured, *([] if goal is None else [goal])]
        shown = dict(zip(compared, significant_apart(*compared)))
        # (weights: the state dict in memory; a file holds more, e.g. a graph: compress's report gives files' sizes)
        lines = [f"{'#':>3} {'metric':>10} {'latency ms':>11} {'weights KiB':>11} {'goal':>5}  config",
                 f"{'fp32':>3} {shown[self.baseline_metric]:>10} {self.baseline_latency_s * 1e3:>11.4f} "
                 f"{self.baseline_size_bytes / 1024:>11.1f} {'':>5}  baseline"]
        for t in self.trials:
            metric = "-" if t.metric is None else shown[t.metric]
            latency = "-" if t.latency_s is None else f"{t.latency_s * 1e3:.4f}"
            size = "-" if t.size_bytes is None else f"{t.size_bytes / 1024:.1f}"
            note = f"  ERROR: {t.error}" if t.error else ""
            lines.append(f"{t.index:>3} {metric:>10} {latency:>11} {size:>11} {'yes' if t.meets_goal else 'no':>5}  "
                         f"{t.recipe.describe()}{note}")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike, *, fp32_format: str | None = None) -> int:
        """Write the chosen model as one artefact; returns its size on disk in bytes.

        A quantized model is written in its backend's format. The fp32 model (``recipe`` None: no candidate was
        built, or none was fast enough for ``min_speedup``) in `fp32_format` (see :func:`save_quantized`); None:
        ONNX for a path ending in ``.onnx``, else a ``torch.export`` program.
        """
        from .artifact import FP32_SUFFIXES, save_quantized

        if fp32_format is None:
            fp32_format = "onnx" if os.fspath(path).lower().endswith(".onnx") else "export"
        suffix = get_backend(self.recipe.backend).artifact_suffix if self.recipe else FP32_SUFFIXES.get(fp32_format)
        given = os.path.splitext(os.fspath(path))[1].lower()
        if suffix and given in set(FP32_SUFFIXES.values()) and given != suffix:
            # e.g. save_path="model.onnx" before the search chose torch_ao: another tool would take it for ONNX
            which = f"the {self.recipe.backend} backend's" if self.recipe else f"fp32_format={fp32_format!r}'s"
            advice = ("; for an ONNX file, give the search backends=('onnxruntime',)" if given == ".onnx"
                      else f"; name it with {suffix}")
            warnings.warn(f"{os.fspath(path)} is written in {which} format ({suffix} files), not the one its suffix "
                          f"names: litcompress.load_quantized reads it{advice}.", UserWarning, stacklevel=2)
        return save_quantized(self.model, self.recipe, path, self.example_inputs, fp32_format=fp32_format,
                              dynamic_dims=self.dynamic_dims)


def _apart(values: tuple[float, ...], places: int, kind: str, most: int) -> list[str]:
    """`values` formatted with `places` of `kind` ('f': decimals, 'g': significant digits), or as many more (up to
    `most`) as tell different ones apart (NaNs alike, -0.0 as 0); their repr beyond."""
    distinct = len({float(value) for value in values if value == value}) + any(value != value for value in values)
    for more in range(places, most):
        shown = [f"{value + 0.0:.{more}{kind}}" for value in values]
        if len(set(shown)) == distinct:
            return shown
    return [repr(float(value) + 0.0) for value in values]


def figures_apart(*values: float, decimals: int = 3) -> list[str]:
    """`values` with `decimals` decimals, or as many more as tell different ones apart: "slower than fp32 (0.021 ms
    vs 0.021 ms)" said two equal figures."""
    return _apart(values, decimals, "f", 40)


def significant_apart(*values: float, digits: int = 6) -> list[str]:
    """`values` with `digits` significant digits, or as many more as tell different ones apart: a goal of "metric
    <= 1" was said missed by a metric shown as 1 (1.000005); -0.0 is said as 0."""
    return _apart(values, digits, "g", 18)


def milliseconds_apart(*seconds: float) -> list[str]:
    """`seconds` in milliseconds, as :func:`figures_apart` gives them."""
    return figures_apart(*(s * 1e3 for s in seconds))


def dataset_of_samples_error(where: str, argument: str, dataset: object) -> TypeError:
    """The error for a ``Dataset`` given where batches are read: its items are single samples."""
    return TypeError(f"{where}({argument}={type(dataset).__name__}): a Dataset gives single samples, without a batch "
                     "dim; give batches: DataLoader(dataset, batch_size=32).")


def check_calibration_data(calibration_data: object, where: str) -> None:
    """Refuse a ``Dataset`` given as calibration data: its items are single samples, without the batch dim every
    backend traces and calibrates with (each candidate failed with its own shape error, and the fp32 model came
    back)."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(calibration_data, Dataset) and not isinstance(calibration_data, DataLoader):
        raise dataset_of_samples_error(where, "calibration_data", calibration_data)
    if isinstance(calibration_data, torch.Tensor):  # iterated, it gives its rows: single samples, as a Dataset
        raise TypeError(f"{where}(calibration_data=<a tensor of shape {tuple(calibration_data.shape)}>): iterating a "
                        "tensor gives its rows, single samples without the batch dim; give batches: "
                        "list(tensor.split(32)) or a DataLoader.")
    if isinstance(calibration_data, Mapping):  # iterated, it gives its keys: strings the error called batches
        raise TypeError(f"{where}(calibration_data=<a {type(calibration_data).__name__} with keys "
                        f"{list(calibration_data)[:4]}>): a dict is one batch; give batches: [batch, ...] or a "
                        "DataLoader.")
    if (isinstance(calibration_data, (tuple, list)) and len(calibration_data) == 2
            and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in calibration_data)
            and calibration_data[1].dim() == 1 and not calibration_data[1].is_floating_point()
            and len(calibration_data[1]) == len(calibration_data[0]) and calibration_data[0].dim() > 1):
        # iterated, it gives the inputs, then the labels as a second batch of inputs (every candidate failed)
        raise TypeError(f"{where}(calibration_data=(inputs of shape {tuple(calibration_data[0].shape)}, labels of "
                        f"shape {tuple(calibration_data[1].shape)})): that is one (inputs, targets) batch, iterated "
                        "tensor by tensor; give batches: [(inputs, targets)] or a DataLoader.")
    if isinstance(calibration_data, (str, bytes)):  # iterated, its characters: refused after the whole fit
        raise TypeError(f"{where}(calibration_data={calibration_data!r}): expected batches (a DataLoader or a list "
                        "of input batches), not a string.")
    if calibration_data is not None and not isinstance(calibration_data, Iterable):  # a bare TypeError, later
        raise TypeError(f"{where}(calibration_data={calibration_data!r}): expected batches (a DataLoader or a list "
                        "of input batches).")
    if isinstance(calibration_data, (list, tuple)) and not calibration_data:  # taken for "none given" later
        raise ValueError(f"{where}(calibration_data={calibration_data!r}): no batch to calibrate on; give at least "
                         "one.")


#: Said (warned, and in the result's messages) when the first evaluation returned without running the model.
UNUSED_MODEL_MESSAGE = (
    "eval_fn returned its metric without running the model it was given, so every model it judges scores alike: "
    "fine for a constant metric (no accuracy goal), but an eval_fn that runs another model, one it closes over "
    "(lambda m: accuracy(model) for lambda m: accuracy(m)), judges nothing.")


def warn_unused_model() -> None:
    warnings.warn(UNUSED_MODEL_MESSAGE, UserWarning, stacklevel=3)


def call_keeping_modes(eval_fn: Callable[[nn.Module], object], model: nn.Module) -> object:
    """``eval_fn(model)``, with every module of `model` put back in the mode it had: an eval_fn that ends with
    ``model.train()``, as a training loop's validation does, left the model it scored timed (dropout on, 2x slower
    than the int8 candidates) and returned in training mode."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        return eval_fn(model)
    finally:
        for module, training in modes:
            module.training = training


def evaluate_noting_use(eval_fn: Callable[[nn.Module], object], model: nn.Module) -> tuple[object, bool]:
    """``eval_fn(model)`` (its modes kept, see `call_keeping_modes`), and whether it ran `model` (the forward of any of
    its modules)."""
    calls = 0

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(count))
    except RuntimeError:  # a module that takes no hooks: not counted, not said
        calls = 1
    try:
        return call_keeping_modes(eval_fn, model), calls > 0
    finally:
        for handle in handles:
            handle.remove()


def metric_fn_name(name: str, fn: object) -> str:
    """How errors name the metric function `fn` given as `name` ("eval_fn"), with what it reads when it says
    (a Lightning step's logged metric: ``lightning_eval_fn``)."""
    source = getattr(fn, "metric_source", None)
    return f"{name} ({source})" if isinstance(source, str) else name


def named_as(wrapper: EvalFn, fn: EvalFn) -> EvalFn:
    """`wrapper` of the metric function `fn`, named in errors as `fn` is (:func:`metric_fn_name`)."""
    source = getattr(fn, "metric_source", None)
    if source is not None:
        wrapper.metric_source = source  # type: ignore[attr-defined]
    return wrapper


def check_metric(value: object, where: str, returned_by: str = "eval_fn") -> float:
    """`value` as a finite float; else an error naming `returned_by`, the function that returned it."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif type(value).__name__ == "ndarray" and getattr(value, "size", None) == 1:  # numpy's, as a tensor's
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{returned_by} returned {value!r} ({type(value).__name__}) for {where}; "
                         "it must return one finite number (e.g. accuracy as a float).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{returned_by} returned {value} for {where}; it must return a finite number.")
    return value


def devices_off_the_cpu(model: nn.Module) -> list[str]:
    """The device types other than the CPU that `model`'s parameters and buffers are on (none: a CPU model)."""
    return sorted({t.device.type for t in (*model.parameters(), *model.buffers())} - {"cpu"})


def check_model_on_cpu(model: nn.Module, caller: str) -> None:
    """The int8 backends (torch.ao, ONNX Runtime, PT2E's x86 kernels) build and time CPU models: one whose tensors
    are elsewhere (a GPU) would fail deep in a backend, or after a pipeline's fine-tuning, with a device error."""
    devices = devices_off_the_cpu(model)
    if devices:
        raise ValueError(f"{caller}: the model's tensors are on {', '.join(devices)}, and int8 quantization here "
                         "builds models for CPU inference. Pass a CPU copy (copy.deepcopy(model).cpu()), with an "
                         "eval_fn, example inputs and calibration data on the CPU too; quantize_lightning, "
                         "compress_lightning and the fit-end callbacks make that copy of a LightningModule "
                         "themselves.")


def check_model_runs(model: nn.Module, inputs: Inputs, *, what: str, default_input_fn_used: bool) -> None:
    """Call `model` once on `inputs` (eval mode, no grad; its modes are restored) and turn a failure into an error
    that names the inputs and, for a batch the default `input_fn` split as ``(inputs, target)``, the remedy.

    The search calls the model on these inputs only after the baseline evaluation (and the pipeline only after
    fine-tuning): a model that cannot take them should fail here, before any of that work.
    """
    try:
        eval_outputs(model, inputs)
    except Exception as error:
        shapes = ", ".join(f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                           for x in inputs)
        hint = ""
        if default_input_fn_used:
            hint = (" The default input_fn passes a batch's tensors as the model's positional inputs, but reads "
                    "a batch of two as (inputs, target) for a forward that takes one input, a batch of one more "
                    "than forward takes as ending with its target, and ((x, mask), y) as (x, mask): for another "
                    "batch layout, pass input_fn=, a function that returns the model's positional inputs (e.g. "
                    "input_fn=lambda batch: tuple(batch)).")
        raise ValueError(f"The model could not be called as model(*inputs) on {what} (inputs: {shapes}): "
                         f"{type(error).__name__}: {error}.{hint}") from error


def check_calibration_batches(model: nn.Module, batches: Sequence[Inputs], calibration_data: object,
                              default_input_fn_used: bool) -> None:
    """:func:`check_model_runs` on each of `batches` (the model's inputs of `calibration_data`'s first batches): a
    later one the model cannot take failed every candidate, and the fp32 model came back. One forward each."""
    for i, batch in enumerate(batches):
        try:
            check_model_runs(model, batch, what="the first calibration batch" if i == 0 else f"calibration batch {i}",
                             default_input_fn_used=default_input_fn_used)
        except ValueError as error:
            if (i == 1 and isinstance(calibration_data, (tuple, list)) and len(calibration_data) == 2
                    and isinstance(calibration_data[0], torch.Tensor)):  # (x, y): two tensors, not two batches
                raise ValueError(f"{error} calibration_data is read batch by batch: for one (inputs, targets) batch, "
                                 "give [(inputs, targets)].") from error
            raise


def check_batches_match_example(batches: Sequence[Inputs], example_inputs: Inputs) -> None:
    """Refuse calibration batches that give forward other inputs than `example_inputs` (more, fewer, or a tensor
    where the example gives none) for static int8: every static candidate is traced or exported on the example, and
    calibrated on the batches through it (torch.ao's and pt2e's failed on them in words about forward's arguments;
    ONNX Runtime's dropped the extra tensors from its feeds and calibrated without them)."""
    def kinds(inputs: Inputs) -> list[str]:
        return ["a tensor" if isinstance(x, torch.Tensor) else "None" if x is None else type(x).__name__
                for x in inputs]

    example = kinds(example_inputs)
    for i, batch in enumerate(batches):
        given = kinds(batch)
        if len(given) != len(example) or any((a == "a tensor") != (b == "a tensor") for a, b in zip(given, example)):
            raise ValueError(
                f"quantize: calibration batch {i} gives the model {len(given)} input(s) ({', '.join(given)}), "
                f"example_inputs {len(example)} ({', '.join(example) or 'none'}): the candidates are traced or "
                "exported on example_inputs and take only what it gives. Give example_inputs the inputs the batches "
                "give (leave it out: the first calibration batch is used), or an input_fn that maps each batch to "
                "the inputs of example_inputs.")


def check_example_keeps_batch_dim(batches: Sequence[Inputs], example_inputs: Inputs) -> None:
    """Refuse `example_inputs` holding one sample without its batch dim (``x[0]`` where the batches hold ``x[:32]``):
    a Linear front takes it, then every candidate was exported with the features as the free batch dim and failed on
    the batches (or the eval data) in its backend's words, and the fp32 model came back."""
    for batch in batches[:1]:
        for i, (given, sample) in enumerate(zip(batch, example_inputs)):
            if (isinstance(given, torch.Tensor) and isinstance(sample, torch.Tensor) and sample.dim() >= 1
                    and given.dim() == sample.dim() + 1 and tuple(given.shape[1:]) == tuple(sample.shape)):
                raise ValueError(
                    f"quantize(example_inputs=...): input {i} has shape {tuple(sample.shape)}, the calibration "
                    f"batches' {tuple(given.shape)}: one sample without its batch dim. Give a batch (x[:1], or "
                    "x.unsqueeze(0) for one sample): every candidate is exported on example_inputs with dim 0 as "
                    "its batch dim.")


def warn_time_major_inputs(model: nn.Module, inputs: Inputs, declared: DynamicDims | None, where: str) -> None:
    """Warn when an input reaches a time-major layer (``batch_first=False``: torch's default for attentions,
    Transformer layers and RNNs) with its dim 1 as that layer's batch, and dim 1 is not declared free: the files
    leave dim 0 free as the batch, which is then the sequence length, and take no other batch size (their check
    grew dim 0 and passed). An input whose dim 1 is not the layer's (a model that transposes) is not named."""
    candidates = {i: x for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.dim() >= 3
                  and x.shape[0] != x.shape[1] and 1 not in dims_for(inputs, declared)[i]}
    # (torch's Transformer layers hold attentions, and keep no batch_first of their own)
    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)) and module.batch_first is False]
    if not candidates or not layers:
        return
    seen: dict[str, int] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            first = args[0] if args else kwargs.get("query", kwargs.get("input"))
            if isinstance(first, torch.Tensor) and first.dim() == 3:
                seen.setdefault(name, int(first.shape[1]))
        return hook

    handles = [module.register_forward_pre_hook(record(name), with_kwargs=True) for name, module in layers]
    try:
        eval_outputs(model, tuple(inputs))
    except Exception:  # noqa: BLE001 - the other checks say why a model does not run
        return
    finally:
        for handle in handles:
            handle.remove()
    for i, x in candidates.items():
        names = [name or type(model).__name__ for name, batch in seen.items() if batch == x.shape[1]]
        if names:
            warnings.warn(f"{where}: input {i} (shape {tuple(x.shape)}) reaches {', '.join(names[:3])}"
                          f"{' ...' if len(names) > 3 else ''} time-major (batch_first=False: its dim 1 is the "
                          f"batch), but the files leave dim 0 free as the batch, so an ONNX or torch.export file "
                          f"would take no other batch size; declare dynamic_dims={{{i}: 1}} (CLI: --dynamic-dims "
                          f"{i}:1).", stacklevel=3)


def check_declared_dims_vary(model: nn.Module, inputs: Inputs, declared: DynamicDims | None, where: str) -> None:
    """Refuse declared free dims (beyond the batch) that `model` cannot take at another size: its code fixes them
    (a Linear's in_features, a reshape), so no file can leave them free (torch.export failed after all the training,
    and an ONNX or TorchScript file declared them free and failed at any other size). The model is called on the
    inputs one shorter there and, if that fails, half as long (a patch embedding takes multiples of its patch)."""
    if not declared:
        return
    fixed = [(i, d, int(x.shape[d])) for i, (x, dims) in enumerate(zip(inputs, dims_for(inputs, declared)))
             if isinstance(x, torch.Tensor) for d in dims if d > 0 and x.shape[d] > 2]
    if not fixed:
        return
    failures = []
    shortened = {i for i, _, _ in fixed}
    lengths_beside = [j for j, x in enumerate(inputs) if j not in shortened and isinstance(x, torch.Tensor)
                      and x.dim() == 1 and x.numel() and not x.is_floating_point() and not x.is_complex()
                      and x.dtype != torch.bool]  # a packed sequence's lengths: as long as its sequences at most
    for length in (lambda size: size - 1, lambda size: size // 2):
        varied = list(inputs)
        for i, d, size in fixed:
            varied[i] = varied[i].narrow(d, 0, length(size))
        # with two sequences shortened to other lengths, which the lengths go with is unknown: each is tried
        bounds = sorted({length(size) for _, _, size in fixed}) if lengths_beside else [None]
        for bound in bounds:
            for j in lengths_beside:
                varied[j] = inputs[j].clamp(max=bound)
            try:
                eval_outputs(model, tuple(varied))
                return
            except Exception as error:  # noqa: BLE001 - any failure: that size is one the model does not take
                failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        failures.append(failure)
    raise ValueError(f"{where} declares {describe_fixed(fixed)} free, but the model fails on the inputs one shorter "
                     f"there and half as long ({failures[0]}): its code fixes that size (a Linear's in_features, a "
                     "reshape), so no file can leave it free. Declare only dims the model takes at any size (a "
                     "sequence length).")


def batch_dependence(model: nn.Module, inputs: Inputs) -> str | None:
    """What differs when `model` (eval mode) computes the first row of `inputs` alone rather than in their batch,
    or None (the same, or not checkable: inputs other than batch-major tensors of one batch size >= 2).

    A forward that branches on the batch size (``if x.shape[0] == 1``) takes one path when exported or traced on
    the example batch, and a file, or an int8 candidate, then computes that path for every batch size."""
    if not inputs or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in inputs):
        return None
    size = inputs[0].shape[0]
    if size < 2 or any(x.shape[0] != size for x in inputs):
        return None
    try:
        whole = tensor_leaves(eval_outputs(model, inputs))
        alone = tensor_leaves(eval_outputs(model, tuple(x[:1] for x in inputs)))
    except Exception:  # a model that cannot take one row: the calls at other batch sizes say so
        return None
    worst = 0.0
    for in_batch, by_itself in zip(whole, alone):
        if in_batch.shape[:1] != (size,) or by_itself.shape != (1, *in_batch.shape[1:]) \
                or not in_batch.is_floating_point():
            continue  # not batch-major (a time-major sequence), or a count: nothing to compare row by row
        a, b = in_batch[:1].float(), by_itself.float()
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))  # equal infinities (masked logits) or NaN in both
        finite = in_batch.float()[torch.isfinite(in_batch)]
        scale = max(1.0, float(finite.abs().max()) if finite.numel() else 0.0)
        difference = torch.where(same, torch.zeros_like(a), (a - b).abs()).nan_to_num(nan=float("inf"))
        worst = max(worst, float(difference.max()) / scale)
    if worst <= 1e-4:  # float rounding of batched kernels
        return None
    return (f"the model's outputs for the first input row differ when computed alone (batch 1) and in the batch of "
            f"{size} (by up to {worst:.3g} of their scale): its forward depends on the batch size or on the other "
            "rows (e.g. `if x.shape[0] == 1`). Exported and traced candidates and files follow the example "
            "batch's path at every batch size: check the result at the batch sizes you serve.")


def batch_inputs(input_fn: Callable[[object], Inputs], batch: object) -> Inputs:
    """``input_fn(batch)`` as the model's positional inputs: a tensor it returns is one input (``tuple()`` split it
    along its batch dim into as many inputs as rows)."""
    inputs = _called(input_fn, batch)
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _called(input_fn: Callable[[object], Any], batch: object) -> Any:
    """``input_fn(batch)``; an error of the user's function, on a batch of their data, said so (it was found in its
    own words, naming no argument)."""
    try:
        return input_fn(batch)
    except Exception as error:
        if (getattr(input_fn, "__module__", None) or "").startswith("litcompress."):  # ours: as it is
            raise
        raise ValueError(f"input_fn failed on a batch ({type(error).__name__}: {error}): it maps a batch of the "
                         "data to the model's positional inputs.") from error


def default_input_fn(batch: object) -> Inputs:
    """The model's positional inputs from a DataLoader batch: ``(x,)`` for an ``(x, y)`` pair, ``(x, mask)`` for a
    ``((x, mask), y)`` pair (a model of several inputs), else the batch."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs = batch[0]
        if isinstance(inputs, torch.Tensor):
            return (inputs,)
        if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(x, torch.Tensor) for x in inputs):
            return tuple(inputs)
    if not isinstance(batch, (torch.Tensor, tuple, list)):
        keys = f" (keys: {sorted(map(str, batch))})" if isinstance(batch, dict) else ""
        raise TypeError(f"A batch of type {type(batch).__name__}{keys} is not the model's inputs: pass "
                        "input_fn=, a function from a batch to the model's positional inputs, e.g. "
                        "input_fn=lambda batch: (batch['x'],).")
    return to_inputs(batch)


# Float dtypes that int8 kernels do not take activations in: a ``bf16-true`` Lightning run's weights, and float64
# (ONNX Runtime's quantizer leaves a double MatMul in float64, so its "int8" file would be a float64 one)
NON_FLOAT32_DTYPES = (torch.bfloat16, torch.float16, torch.float64)


def non_float32_dtypes(model: nn.Module) -> set[torch.dtype]:
    """The float dtypes other than float32 among `model`'s parameters and buffers (``NON_FLOAT32_DTYPES``)."""
    return {t.dtype for t in itertools.chain(model.parameters(), model.buffers()) if t.dtype in NON_FLOAT32_DTYPES}


def float32_inputs(inputs: Inputs) -> Inputs:
    """`inputs` with every bfloat16/float16/float64 tensor cast to float32 (integer inputs, token ids, as they
    are)."""
    return tuple(x.float() if isinstance(x, torch.Tensor) and x.dtype in NON_FLOAT32_DTYPES else x for x in inputs)


class FloatInputs(InputAdapter):
    """`model` (an int8 candidate, or the float32 copy of a bfloat16/float16/float64 model) called with such float
    inputs cast to float32, which int8 kernels and ONNX Runtime need; what `quantize` returns for such a model.
    Saving it saves `model`, whose file takes float32 inputs."""

    def forward(self, *inputs: Any) -> Any:
        return self.model(*float32_inputs(inputs))


def signature_or_none(function: Callable) -> inspect.Signature | None:
    """`function`'s signature, or None when it has none Python can read (a builtin, a TorchScript method)."""
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):
        return None


def forward_parameters(model: nn.Module) -> list[str]:
    """The names of ``model.forward``'s positional parameters, in order (empty when it has no signature)."""
    return [p.name for p in _positional_parameters(model) or () if p.kind is not inspect.Parameter.VAR_POSITIONAL]


def _positional_parameters(model: nn.Module) -> list[inspect.Parameter] | None:
    """``model.forward``'s positional parameters, a trailing ``*args`` included; None without a signature."""
    signature = signature_or_none(model.forward)
    if signature is None:
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.VAR_POSITIONAL)
    return [parameter for parameter in signature.parameters.values() if parameter.kind in kinds]


def _positional_arity(model: nn.Module) -> tuple[int, float]:
    """How many positional inputs ``model.forward`` requires and takes at most (inf with ``*args``); (0, inf)
    when it has no signature."""
    parameters = _positional_parameters(model)
    if parameters is None:
        return 0, math.inf
    named = [p for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    required = sum(1 for p in named if p.default is inspect.Parameter.empty)
    return required, math.inf if len(named) < len(parameters) else len(named)


def model_input_fn(model: nn.Module, *, say_optional_left_out: bool = False) -> Callable[[object], Inputs]:
    """`default_input_fn` for `model`, which also reads a dict batch (``{"input_ids": ..., "attention_mask": ...,
    "labels": ...}``, as Hugging Face datasets give): the values of the keys named like ``forward``'s leading
    parameters, in their order (``labels`` and other keys forward does not take are left out). A flat batch of
    tensors is read by ``forward``'s arity: all of it when forward requires two or more inputs and takes that many
    (``(x, mask)``), all but the last when forward takes exactly one fewer (``(x, mask, y)``, a TensorDataset's).
    With `say_optional_left_out` (the raw batches of a plain `quantize`/`compress` call, no steps to read them), a pair
    read as (inputs, target) for a forward whose second input is optional (``forward(x, mask=None)``) is said once
    in a warning: an ``(x, mask)`` pair loses its mask."""
    names = forward_parameters(model)
    required, most = _positional_arity(model)
    parameters = _positional_parameters(model) or []
    optional = parameters[1].name if say_optional_left_out and required == 1 and len(parameters) >= 2 \
        and parameters[1].kind is not inspect.Parameter.VAR_POSITIONAL else None
    said = []

    def input_fn(batch: object) -> Inputs:
        if isinstance(batch, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in batch):
            if 2 <= required <= len(batch) <= most:
                return tuple(batch)  # (x, mask) for forward(x, mask): not an (inputs, target) pair
            if len(batch) == most + 1 >= 3:
                return tuple(batch[:-1])  # (x, mask, y) for forward(x, mask): the target is left out
            if len(batch) == 2 and optional is not None and not said:
                # (x, y) batches are the common case; an (x, mask) one loses its mask here, so it is said once
                said.append(True)
                warnings.warn(f"batches of two tensors are read as (inputs, target): {type(model).__name__}"
                              f"({parameters[0].name}) is called without its optional `{optional}`. If the second "
                              f"tensor is `{optional}`, pass input_fn=lambda batch: tuple(batch); input_fn=lambda "
                              "batch: (batch[0],) reads them as now, without this warning.", UserWarning, stacklevel=2)
        if not isinstance(batch, Mapping):
            return default_input_fn(batch)
        taken = list(itertools.takewhile(lambda name: name in batch, names))
        skipped = [name for name in names[len(taken):] if name in batch]
        if not taken or skipped:
            gap = f"; {names[len(taken)]!r} is not in the batch but {skipped} are" if skipped else ""
            raise TypeError(f"A batch of type {type(batch).__name__} (keys: {sorted(map(str, batch))}) is read by "
                            f"name as forward's leading parameters ({', '.join(names) or 'none'}){gap}: pass "
                            "input_fn=, a function from a batch to the model's positional inputs, e.g. "
                            "input_fn=lambda batch: (batch['x'],) (CLI: --inputs x), or input_fn=lambda batch: "
                            "(batch,) for a forward that takes the dict itself.")
        return tuple(batch[name] for name in taken)

    input_fn.__qualname__ = f"model_input_fn({type(model).__name__})"
    return input_fn


def example_as_inputs(model: nn.Module, example_inputs: object,
                      input_fn: Callable[[object], Inputs] | None = None) -> Inputs:
    """`example_inputs` as `model`'s positional inputs. A dict is read by forward's parameter names; when its keys
    are not those (a forward that takes the dict itself), by `input_fn`, the function that reads the data's batches,
    if one is given."""
    if not isinstance(example_inputs, Mapping):
        return to_inputs(example_inputs)
    try:
        return to_inputs(model_input_fn(model)(example_inputs))
    except TypeError:
        if input_fn in (None, default_input_fn):
            raise
        return to_inputs(_called(input_fn, example_inputs))


def _is_not_finite(value: object) -> bool:
    """Whether `value` is a NaN or infinite number (a float, or a one-element tensor or array, as check_metric takes
    them): what an overflowing loss gives (a perplexity of inf as often as NaN)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not bool(torch.isfinite(value).all())
    if getattr(value, "size", None) == 1 and callable(getattr(value, "item", None)):  # numpy's
        value = value.item()
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value)


class _BackendSearch:
    """Per-backend search: knob variants first, then fp32 fallback of the most sensitive layers."""

    def __init__(self, backend: Backend, approach: str, layers: Sequence[str],
                 fp32_with: Callable[[Sequence[str]], set[str]] = set) -> None:
        self.backend = backend
        self.layers = set(layers)  # those it makes int8: the only ones a fallback keeps in fp32
        self.fp32_with = fp32_with  # the layers a recipe's fp32 ones keep in fp32 (a tied embedding with its head)
        self.pending = list(backend.recipes(approach))
        self.tried: list[Trial] = []
        self.unscored: list[Trial] = []  # built, and eval_fn gave NaN or inf on them
        self.fallback_started = False
        self.done = False

    def record(self, trial: Trial) -> None:
        self.tried.append(trial)
        if trial.meets_goal:
            self.done = True

    def next_recipe(self, ranking: Callable[[bool, bool], list[str]], score: Callable[[Trial], float],
                    allow_fallback: bool) -> Recipe | None:
        if self.done:
            return None
        if self.pending:
            return self.pending.pop(0)
        base = self._fallback_base(score) if allow_fallback else None
        recipe = None if base is None else self._untried_fallback(
            base, ranking(base.recipe.per_channel, self.backend.table_scale_per_row))
        if recipe is None:
            self.done = True
        else:
            self.fallback_started = True
        return recipe

    def has_next(self, known_ranking: Callable[[bool, bool], list[str] | None], score: Callable[[Trial], float],
                 allow_fallback: bool) -> bool:
        """Whether :meth:`next_recipe` would give a recipe, without taking one; a ranking not computed yet
        (`known_ranking` gives None) counts as leaving one, as the search could not tell without running it."""
        if self.done:
            return False
        if self.pending:
            return True
        base = self._fallback_base(score) if allow_fallback else None
        if base is None:
            return False
        order = known_ranking(base.recipe.per_channel, self.backend.table_scale_per_row)
        if order is None:  # (any order of two or more layers int8 in the base has one to keep in fp32)
            return len(set(self.layers) - set(base.recipe.fp32_layers)) >= 2
        return self._untried_fallback(base, order) is not None

    def _fallback_base(self, score: Callable[[Trial], float]) -> Trial | None:
        """The trial the fallback keeps one more layer of in fp32: the best scored (every variant built but scored
        NaN or inf, a loss overflowing while a layer is int8: the first, since a layer kept in fp32 may be what
        scores); None when none ran."""
        ran = [t for t in self.tried if t.metric is not None]
        return max(ran, key=score) if ran else (self.unscored[0] if self.unscored else None)

    def _untried_fallback(self, base: Trial, ranking: list[str]) -> Recipe | None:
        """`base`'s recipe with one more of its layers in fp32, in `ranking`'s order, that no trial ran; None."""
        order = [name for name in ranking if name in self.layers]
        tried = {t.recipe for t in self.tried}
        # one more layer in fp32 than the best so far; when that recipe ran already (it did not beat the best: ties
        # are common with accuracy), the next larger set, so that no trial repeats one
        # (all layers in fp32 is no quantization at all)
        # The base's own fp32 layers stay: some were put there by a retry (an int8 layer that fixed a size), not by
        # the ranking, and dropped they failed again.
        fixed = tuple(base.recipe.fp32_layers)
        rest = [name for name in order if name not in fixed]
        # what each tried recipe keeps in fp32, with the layers tied to those (the same model, built again, is no
        # new candidate)
        built = {(t.recipe.with_fp32_layers(()), frozenset(self.fp32_with(t.recipe.fp32_layers))) for t in self.tried}
        for j in range(1, len(rest)):
            recipe = base.recipe.with_fp32_layers(fixed + tuple(rest[:j]))
            kept = frozenset(self.fp32_with(recipe.fp32_layers))
            if self.layers <= kept:  # (ties keep the rest in fp32: no int8 layer)
                return None
            if recipe not in tried and (recipe.with_fp32_layers(()), kept) not in built:
                return recipe
        return None


def _quantized_kinds(backend: str, approach: str) -> str:
    """What `backend` makes int8 for `approach`, in words."""
    if approach == "weight_only" or (backend == "pt2e" and approach == "dynamic"):
        return "it quantizes nn.Linear layers"
    if approach == "static":  # (pt2e: see its quantizable_layers)
        return f"it quantizes nn.Linear and {'nn.Conv2d' if backend == 'pt2e' else 'convolutions'}"
    if backend == "torch_ao":
        return ("it quantizes the nn.Linear, recurrent layers (not one without biases or with proj_size) and "
                "embeddings inside the model, of torch's own classes (not a subclass of them, nor the model itself)")
    if backend == "onnxruntime":  # (its quantizable_layers leaves them out)
        return ("it quantizes nn.Linear, LSTM layers and embeddings (not GRU layers nor EmbeddingBag: it has no int8 "
                "GRU op, and a bag exports as a loop its quantizer does not reach)")
    return "it quantizes nn.Linear, recurrent layers and embeddings"


def _keep_session_threads_(model: nn.Module, num_threads: int | None) -> None:
    """Record the pinned thread count on the result's ONNX Runtime sessions: a copy or a pickle round trip of the
    result rebuilds its session, which would otherwise take torch's thread count at that time."""
    if num_threads is None:
        return
    from .backends.onnxruntime import OnnxRuntimeModule

    for module in model.modules():
        if isinstance(module, OnnxRuntimeModule) and module.num_threads is None:
            module.num_threads = num_threads


def quantize(
    model: nn.Module,
    config: PTQConfig | None = None,
    *,
    eval_fn: EvalFn,
    calibration_data: Iterable | None = None,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    input_fn: Callable[[object], Inputs] | None = None,
) -> QuantizationResult:
    """Search int8 candidates across backends; return the fastest one that meets the accuracy goal (with
    ``config.min_speedup``, only one that runs that much faster than fp32, else the fp32 model).

    Args:
        model: the fp32 model (never modified: every candidate is built from a deep copy).
        config: approach, accuracy goal, budget and backends (:class:`PTQConfig`).
        eval_fn: ``model -> metric``; called on the fp32 copy first (the baseline), then on
            each candidate.
        calibration_data: an iterable of batches (tensors, tuples of inputs, ``(inputs, target)`` pairs, or dicts;
            read as :func:`model_input_fn` says); required for ``approach="static"``. Also used to rank layers by
            sensitivity.
        example_inputs: inputs used for export/tracing and latency measurement (a tensor, a tuple, or a dict
            keyed by forward's parameter names); defaults to the
            first calibration batch.
        input_fn: maps a batch of ``calibration_data`` to the model's positional inputs.

    Returns:
        A :class:`QuantizationResult`, always holding a model: the fastest candidate meeting the
        goal, else the most accurate candidate (with a :class:`QuantizationGoalWarning`), else the
        fp32 model when no candidate could be built or none runs ``config.min_speedup`` times as fast
        as fp32 (``recipe`` None, and a message says which).
    """
    config = config if config is not None else PTQConfig()
    if not isinstance(config, PTQConfig):
        raise TypeError(f"quantize(config={config!r}): expected a PTQConfig.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize(model=...): expected a torch.nn.Module, got {type(model).__name__}.")
    if not callable(eval_fn):
        raise TypeError(f"quantize(eval_fn={eval_fn!r}): expected a callable model -> metric.")
    check_model_on_cpu(model, "quantize(model=...)")
    if config.compile and "pt2e" in config.backends:  # (each pt2e candidate failed in inductor's words, after its
        from .backends.pt2e import check_cpp_compiler  # calibration, and the search went on without it)

        check_cpp_compiler("PTQConfig(compile=True)")
    default_input_fn_used = input_fn in (None, default_input_fn)
    input_fn = input_fn or model_input_fn(model, say_optional_left_out=True)

    check_calibration_data(calibration_data, "quantize")
    calibration: list[Inputs] = []
    if calibration_data is not None:
        # islice: a shared iterator (a stream) loses no batch past those read
        for batch in itertools.islice(calibration_data, config.num_calibration_batches):
            calibration.append(batch_inputs(input_fn, batch))
    if config.approach == "static" and not calibration:
        given = "gave no batch (an empty loader, or an iterator already used up)" if calibration_data is not None \
            else "is None"
        raise ValueError(f"quantize(calibration_data=...) {given}: approach='static' needs calibration data "
                         "(a DataLoader or list of input batches) to observe activation ranges.")
    if example_inputs is None:
        if not calibration:
            raise ValueError("quantize(example_inputs=None): give example_inputs (a tensor or tuple of "
                             "tensors) or calibration_data, needed for export and latency measurement.")
        example_inputs = calibration[0]
    # a dict: by forward's parameter names, else by the input_fn given
    example_inputs = example_as_inputs(model, example_inputs, None if default_input_fn_used else input_fn)
    # The checks below run forward: on a copy, so that one that writes state of its own (a counter, a cache) leaves
    # the model passed as it was (they ran on it); eager, as the search quantizes it (nothing compiles for a check)
    check_lazy_layers_called(model, "quantize")  # (they were created in the model itself, by the checks)
    probe = eager_copy(model)
    # every batch (a later one the model cannot take failed every candidate, and the fp32 model came back): one
    # forward each, as one calibration pass
    check_calibration_batches(probe, calibration, calibration_data, default_input_fn_used)
    if not calibration or example_inputs is not calibration[0]:  # checked before eval_fn runs the baseline
        check_example_keeps_batch_dim(calibration, example_inputs)
        check_model_runs(probe, example_inputs, what="example_inputs", default_input_fn_used=False)
        if config.approach == "static":  # (dynamic and weight-only candidates are not calibrated on the batches)
            check_batches_match_example(calibration, example_inputs)
    if not calibration:  # dynamic/weight-only without data: rank layers on the example inputs
        calibration = [example_inputs]
    given_inputs, structure = example_inputs, None
    if is_nested(example_inputs):
        # forward(batch) reading batch["x"]: exporters and int8 backends take tensors, so the search quantizes a
        # model of the flattened tensors, and the result (like each candidate eval_fn sees) takes the containers
        structure = InputStructure.of(example_inputs)
        calibration = [structure.flatten(batch, f"calibration batch {i}") for i, batch in enumerate(calibration)]
        example_inputs = structure.flatten(example_inputs, "example_inputs")
        model, probe = flat_inputs(model, structure), flat_inputs(probe, structure)
        nested_eval_fn = eval_fn
        eval_fn = named_as(lambda candidate: nested_eval_fn(NestedInputs(candidate, structure)), nested_eval_fn)
    declared = config.dynamic_dims
    # Exported candidates leave free the dims that vary in the data (and the declared ones), not only the batch.
    config = dataclasses.replace(config, dynamic_dims=resolve_dynamic_dims([example_inputs, *calibration],
                                                                           config.dynamic_dims))
    check_declared_dims_vary(probe, example_inputs, declared, "quantize(dynamic_dims=...)")
    warn_time_major_inputs(probe, example_inputs, config.dynamic_dims, "quantize")

    # on the example batch, or on the first calibration batch where the example is one row
    depends = batch_dependence(probe, example_inputs) or batch_dependence(probe, calibration[0])
    del probe  # (not held through the search)

    # Pinned for the whole search, so that ORT sessions created by candidates get the same
    # thread count as the torch variants they are timed against.
    with pinned_threads(config.num_threads):
        result = _search(model, config, eval_fn, calibration, example_inputs)
    _keep_session_threads_(result.model, config.num_threads)
    if depends is not None:
        result.messages.insert(0, depends)
        logger.info(depends)
        warnings.warn(depends, UserWarning, stacklevel=2)
    if structure is not None:
        _name_layers_as_the_model_does_(result, model.model)
        result.model, result.example_inputs = NestedInputs(result.model, structure), given_inputs
        constants = ", ".join(repr(value) for _, value in structure.constants)
        message = (f"the model takes containers or non-tensor values as inputs: the result takes them too, and a "
                   f"saved file the {len(structure.tensor_positions)} tensor(s) in them, flattened as "
                   "torch.utils._pytree.tree_flatten orders them (dict entries by sorted key); dynamic_dims indices "
                   "count those tensors."
                   + (f" The non-tensor values of example_inputs ({constants}) are constants of the quantized "
                      "model: a call with others is refused." if constants else ""))
        result.messages.append(message)
        logger.info(message)
    return result


def _name_layers_as_the_model_does_(result: QuantizationResult, inner: nn.Module) -> None:
    """The search of a model of container inputs ran on a wrapper (``FlatInputs``) holding it as ``model``: its
    layers went by ``model.<name>`` in the recipes and the messages, which the model's own names (a
    ``QATConfig(fp32_layers=...)`` taken from the recipe) did not match. Said by the model's names here."""
    names = {name for name, _ in inner.named_modules() if name}

    def renamed(recipe: Recipe | None) -> Recipe | None:
        if recipe is None:
            return None
        return recipe.with_fp32_layers(tuple(n.removeprefix("model.") if n.removeprefix("model.") in names else n
                                             for n in recipe.fp32_layers))

    result.recipe = renamed(result.recipe)
    for trial in result.trials:
        trial.recipe = renamed(trial.recipe)
    prefixed = re.compile(r"(?<![\w.])model\.([\w.]+)")

    def ours(name: str) -> bool:  # a module's name, or a tensor's (`a.weight`: of module `a`)
        return name in names or name.rpartition(".")[0] in names or "." not in name and hasattr(inner, name)

    def said_by_its_names(text: str) -> str:
        return prefixed.sub(lambda m: m[1] if ours(m[1]) else m[0], text)

    result.messages = [said_by_its_names(message) for message in result.messages]
    for trial in result.trials:
        if trial.error:  # (the trial table's: the messages repeat it)
            trial.error = said_by_its_names(trial.error)


def _search(model: nn.Module, config: PTQConfig, eval_fn: EvalFn, calibration: list[Inputs],
            example_inputs: Inputs) -> QuantizationResult:
    messages: list[str] = []

    def note(message: str) -> None:
        messages.append(message)
        logger.info(message)

    compiled = compiled_module_names(model)
    fp32 = eager_copy(model).eval()  # the exporters and the int8 backends need eager modules
    if compiled:
        names = ", ".join(repr(n) if n else "the model" for n in compiled)
        note(f"torch.compile'd module(s) {names} quantized as the eager modules they compile.")
    other_floats = non_float32_dtypes(model)
    if other_floats:
        # int8 kernels take float32 activations: the search quantizes a float32 copy, and every candidate (and the
        # result) casts the user's bfloat16/float16/float64 inputs, so that eval_fn can feed them as it feeds the model
        fp32.float()
        example_inputs, calibration = float32_inputs(example_inputs), [float32_inputs(b) for b in calibration]
        user_eval_fn = eval_fn
        eval_fn = named_as(lambda candidate: user_eval_fn(FloatInputs(candidate)), user_eval_fn)
        note(f"the model's {', '.join(sorted(str(d).removeprefix('torch.') for d in other_floats))} weights were "
             "quantized from a float32 copy; the result casts float inputs to float32, and its file takes float32 "
             "inputs.")
    # int8 kernels and exporters take plain weights: the pruned ones, zeros and all
    if make_permanent_(fp32, owner="quantize"):
        note("the model's pruning masks were made permanent in the copy quantized (the model keeps them).")
    folded = fold_parametrizations_(fp32)  # torch_ao would skip a weight-normed Linear; exports recompute the norm
    if folded:
        note(f"folded {len(folded)} parametrized weight(s) into plain ones in the copy quantized, as for inference: "
             f"{', '.join(folded)}.")
    transposed = as_linear_layers_(fp32)
    if transposed:
        shown = ", ".join(transposed[:3]) + (f" and {len(transposed) - 3} more" if len(transposed) > 3 else "")
        note(f"{len(transposed)} Conv1D layer(s) (Hugging Face's GPT-2 layers: Linear with the weight stored "
             f"transposed) quantized as nn.Linear, which every backend quantizes: {shown}.")
    with torch.no_grad():
        value, ran = evaluate_noting_use(eval_fn, fp32)
    baseline_metric = check_metric(value, "the fp32 baseline", metric_fn_name("eval_fn", eval_fn))
    if not ran:
        warn_unused_model()
        note(UNUSED_MODEL_MESSAGE)
    criterion = config.accuracy
    threshold = criterion.threshold(baseline_metric)
    fp32_shown, goal_shown = significant_apart(baseline_metric, threshold)  # (-0.0 said as 0)
    note(f"fp32 baseline metric {fp32_shown}; goal: metric {'>=' if criterion.higher_is_better else '<='} "
         f"{goal_shown}")
    no_margin = criterion.relative and criterion.tolerable_loss > 0 and baseline_metric == 0
    if no_margin:  # a fidelity loss (the candidate against the fp32 outputs) is 0 for fp32: every int8 model fails
        zero = ("the fp32 metric is 0, so a tolerance relative to it allows no change at all; "
                "AccuracyCriterion(relative=False) makes tolerable_loss an absolute amount.")
        note(zero)
        warnings.warn(f"quantize: {zero}", QuantizationGoalWarning, stacklevel=3)
    if criterion.relative and criterion.higher_is_better and criterion.tolerable_loss > 1 and baseline_metric > 0:
        # 5 meant as 5 %: the fastest int8 model was chosen however wrong. Above 1 only: 1 (100 %) already accepts
        # any metric >= 0, which some mean; and not refused when made: a negative metric (-mse) takes 5 as "up to
        # 6x the error"
        tolerance = criterion.tolerable_loss
        loose = (f"a relative tolerance of {tolerance:g} is {tolerance * 100:g}% of the fp32 metric, so any metric >= "
                 f"{threshold:.6g} meets the goal, a model that gets nothing right included; for {tolerance:g} % give "
                 f"{tolerance / 100:g}.")
        note(loose)
        warnings.warn(f"quantize: {loose}", QuantizationGoalWarning, stacklevel=3)
    baseline_latency = measure_latencies([fp32], example_inputs, config.latency_repeats,
                                         num_threads=config.num_threads)[0]["median"]
    baseline_size = model_size_bytes(fp32)
    started = time.monotonic()  # timeout_s is the search's: the baseline's evaluation and timing are not counted

    searches: list[_BackendSearch] = []
    for name in config.backends:
        try:
            backend = get_backend(name)
            backend.check_available()
        except (BackendUnavailableError, ImportError) as exc:
            note(f"backend {name!r} skipped: {exc}")
            continue
        if config.approach not in backend.approaches:
            note(f"backend {name!r} skipped: it does not support approach {config.approach!r} "
                 f"(supports {backend.approaches}).")
            continue
        backend.configure(config)
        own_layers = backend.quantizable_layers(fp32, config.approach)
        if isinstance(fp32, torch.jit.ScriptModule) and not backend.takes_torchscript:
            # its candidate was the fp32 model, chosen as int8
            note(f"backend {name!r} skipped: it quantizes eager modules, and a TorchScript model's layers are script "
                 "modules it cannot swap; quantize the eager model this one was scripted from.")
            continue
        scripted = [part for part in torchscript_parts(fp32) if part]
        if scripted and not backend.takes_scripted_parts(config.approach):  # torch's words, or a file none loads
            if isinstance(fp32, FlatInputs) and scripted == ["model"]:  # the user's model, under the search's wrapper
                note(f"backend {name!r} skipped: the model is TorchScript and takes containers (dicts, lists), "
                     "which the search hands it through a wrapper this backend would trace, and it cannot trace "
                     "through TorchScript; give it tensors as positional inputs, or quantize the eager model.")
                continue
            note(f"backend {name!r} skipped: it traces the model, and cannot trace through its TorchScript part(s) "
                 f"({', '.join(scripted[:3])}{', ...' if len(scripted) > 3 else ''}); quantize the model with the "
                 "eager modules they were scripted or traced from" + (
                     " (approach='dynamic' quantizes the layers around them)" if name == "torch_ao" else "") + ".")
            continue
        # (a TorchScript model's layers are script modules, whatever they were: not knowable here, so not skipped)
        if not own_layers and not isinstance(fp32, torch.jit.ScriptModule):  # its candidate: the fp32 model as int8
            note(f"backend {name!r} skipped: it quantizes no layer of this model for approach {config.approach!r} "
                 f"({_quantized_kinds(name, config.approach)}).")
            continue
        searches.append(_BackendSearch(backend, config.approach, own_layers,  # (a registered class of the user's
                                       functools.partial(backend.fp32_with, fp32)  # may not derive from Backend)
                                       if hasattr(backend, "fp32_with") else set))

    layers = quantizable_layers(fp32, config.approach)
    if config.approach != "static":  # the file can end larger than the input's, its convolutions fp32, unsaid
        convs = [name for name, module in fp32.named_modules() if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        if convs:
            static = {}  # backend -> the convolutions its static int8 takes (pt2e: Conv2d only)
            for name in config.backends:
                try:
                    backend = get_backend(name)
                    if "static" in backend.approaches:
                        static[name] = set(backend.quantizable_layers(fp32, "static")) & set(convs)
                except Exception:  # (an unavailable backend: said above)
                    continue
            best = max(static, key=lambda name: len(static[name]), default=None)
            if best is not None and static[best]:
                note(f"approach={config.approach!r} leaves the {len(convs)} convolution(s) in fp32 "
                     f"({', '.join(convs[:5])}{' ...' if len(convs) > 5 else ''}): approach='static' quantizes "
                     f"{'them' if static[best] == set(convs) else f'{len(static[best])} of them'} ({best}; CLI: "
                     "--quantize static).")
    rankings: dict[tuple[bool, bool], list[str]] = {}
    modules = dict(fp32.named_modules())
    has_tables = any(isinstance(modules.get(name), (nn.Embedding, nn.EmbeddingBag)) for name in layers)

    def ranking_key(per_channel: bool, table_scale_per_row: bool) -> tuple[bool, bool]:
        return per_channel, table_scale_per_row or not has_tables

    def ranking(per_channel: bool, table_scale_per_row: bool = True) -> list[str]:
        # (a backend's one scale per embedding table ranks the table as it quantizes it: per row, a table with one
        # outlier row looked harmless and was never kept in fp32)
        key = ranking_key(per_channel, table_scale_per_row)
        if key not in rankings:
            try:
                scores = layer_sensitivity(fp32, layers, calibration, config.approach, per_channel, key[1])
            except Exception as exc:  # no ranking means no fallback, not a lost search
                rankings[key] = []
                note(f"layer sensitivity failed ({type(exc).__name__}: {exc}); no fp32 fallback this time.")
                return []
            # a layer whose quantization alone leaves the outputs as they are (one the data never reaches) gains
            # nothing in fp32: no fallback trial is spent on it
            rankings[key] = sorted((n for n in layers if scores[n] != math.inf), key=lambda n: scores[n])
            unchanged = [n for n in layers if scores[n] == math.inf]
            note("layer sensitivity (output SQNR dB, most sensitive first"
                 + ("" if key[1] else ", embedding tables with one scale each") + "): "
                 + ", ".join(f"{n}={scores[n]:.1f}" for n in rankings[key])
                 + (f"; outputs unchanged with {', '.join(unchanged)} quantized alone (not called on the calibration "
                    "data, or no effect): never kept in fp32" if unchanged else ""))
        return rankings[key]

    def score(trial: Trial) -> float:
        if trial.metric is None:
            return float("-inf")
        return trial.metric if criterion.higher_is_better else -trial.metric

    trials: list[Trial] = []
    models: dict[int, nn.Module] = {}
    timed: dict[int, nn.Module] = {}  # what each candidate's file runs (see Backend.timed_form)
    timed_out = interrupted = False
    where = ""  # where a Ctrl-C ended the search: "during trial 3", "after trial 2"
    try:
        while len(trials) < config.max_trials:
            progressed = False
            for search in searches:
                if len(trials) >= config.max_trials:
                    break
                if config.timeout_s is not None and time.monotonic() - started > config.timeout_s:
                    timed_out = True
                    break
                # Once a candidate meets the goal, fp32 fallbacks elsewhere are unlikely to be faster (one that met
                # it earlier in this round counts: the next backend's fallback ran all the same)
                goal_met_somewhere = any(t.meets_goal for t in trials)
                recipe = search.next_recipe(ranking, score, allow_fallback=not goal_met_somewhere)
                if recipe is None:
                    continue
                progressed = True
                trial = Trial(index=len(trials) + 1, recipe=recipe)
                trials.append(trial)
                t0 = time.monotonic()
                not_finite = False  # eval_fn returned NaN or inf (check_metric then fails), which fp32 layers may fix
                try:
                    candidate = search.backend.quantize(deepcopy_model(fp32), recipe, example_inputs, calibration)
                    with torch.no_grad():
                        value = call_keeping_modes(eval_fn, candidate)
                    not_finite = _is_not_finite(value)
                    trial.metric = check_metric(value, f"trial {trial.index} ({recipe.describe()})",
                                                metric_fn_name("eval_fn", eval_fn))
                    met = criterion.is_met(trial.metric, baseline_metric)
                    # timed as its file runs (torch.ao's: a trace, 2-3x faster than its eager int8 modules)
                    timed[trial.index] = search.backend.timed_form(candidate, example_inputs)
                    trial.latency_s = measure_latencies([timed[trial.index]], example_inputs,
                                                        max(3, config.latency_repeats // 2),
                                                        num_threads=config.num_threads)[0]["median"]
                    trial.size_bytes = model_size_bytes(candidate)
                    models[trial.index] = candidate
                    # only a candidate that was measured and kept meets the goal: a failed one must not end the search
                    trial.meets_goal = met
                except ExportError as exc:
                    trial.error = str(exc)
                    retry = tuple(getattr(exc, "fp32_layers", ()))
                    # (every layer it makes int8 in fp32 is no quantization at all: the backend is left instead)
                    if retry and not search.layers <= set(recipe.fp32_layers) | set(retry):
                        # the int8 version of these layers is the cause: once more with them in fp32
                        search.pending.insert(0, recipe.with_fp32_layers(recipe.fp32_layers + retry))
                        # and so in this backend's recipes to come, which would fail alike
                        search.pending[1:] = [r.with_fp32_layers(r.fp32_layers + tuple(
                            name for name in retry if name not in r.fp32_layers)) for r in search.pending[1:]]
                        note(f"trial {trial.index}: {exc}; trying backend {search.backend.name!r} again with "
                             f"{list(retry)} in fp32.")
                    else:
                        search.done = True  # every recipe of this backend needs the same export
                        note(f"trial {trial.index}: {exc}; going on without backend {search.backend.name!r}.")
                except Exception as exc:  # one broken candidate must not end a long search
                    if not_finite and trial.metric is None:  # (a raise or a non-number is eval_fn's, not int8's)
                        search.unscored.append(trial)
                    trial.error = f"{type(exc).__name__}: {exc}"
                    hint = fixed_size_hint(trial.error)
                    if hint and "the exported model fixed dim" not in trial.error:  # (said already by the model)
                        trial.error += f" ({hint})"
                    note(f"trial {trial.index} ({recipe.describe()}) failed: {trial.error}")
                trial.seconds = time.monotonic() - t0
                search.record(trial)
                logger.info("trial %d %s metric=%s goal=%s", trial.index, recipe.describe(), trial.metric,
                            trial.meets_goal)
            if timed_out or not progressed:
                break
    except KeyboardInterrupt:  # Ctrl-C ends the search, not what it found
        interrupted = True
        last = trials[-1] if trials else None
        if last is not None and last.index not in models and last.error is None:  # (also once scored, while timed)
            last.error = "interrupted"
            last.meets_goal = False
            last.seconds = time.monotonic() - t0
            search.record(last)
            where = f"during trial {last.index}"
        else:  # between two trials (choosing the next one: a sensitivity ranking)
            where = f"after trial {len(trials)}"
        note(f"interrupted {where}; keeping the best model so far.")
    if timed_out:
        note(f"timeout_s={config.timeout_s} reached after {len(trials)} trials; keeping the best model so far."
             if trials else f"timeout_s={config.timeout_s} reached before the first trial.")
    elif not interrupted and len(trials) >= config.max_trials and not any(t.meets_goal for t in trials):
        note(f"max_trials={config.max_trials} reached without meeting the goal.")

    def recipes_left() -> bool:
        """Whether a search had a recipe left when a limit ended it (a ranking it did not compute counts as one)."""
        def known_ranking(per_channel: bool, table_scale_per_row: bool = True) -> list[str] | None:
            return rankings.get(ranking_key(per_channel, table_scale_per_row))

        fallback = not any(t.meets_goal for t in trials)
        return any(search.has_next(known_ranking, score, fallback) for search in searches)

    def fast_enough(trial: Trial) -> bool:
        return config.min_speedup is None or trial.latency_s * config.min_speedup <= baseline_latency

    def too_slow(trial: Trial, which: str) -> str:
        return (f"min_speedup={config.min_speedup:g}: no int8 model {which}runs {config.min_speedup:g}x as fast as "
                f"fp32 here (the fastest, trial {trial.index}, "
                f"{figures_apart(baseline_latency / trial.latency_s, config.min_speedup, decimals=2)[0]}x: "
                f"{' vs '.join(milliseconds_apart(trial.latency_s, baseline_latency))} ms): keeping the fp32 model.")

    passing = [t for t in trials if t.meets_goal and t.index in models]
    if passing:
        # Re-measure the finalists interleaved with fp32 so that host noise hits all alike.
        try:
            measured = measure_latencies([fp32] + [timed[t.index] for t in passing], example_inputs,
                                         config.latency_repeats, num_threads=config.num_threads)
            baseline_latency = measured[0]["median"]
            for trial, m in zip(passing, measured[1:]):
                trial.latency_s = m["median"]
        except Exception as exc:  # keep the per-trial timings rather than lose the search
            note(f"final interleaved timing failed ({type(exc).__name__}: {exc}); using per-trial timings.")
        except KeyboardInterrupt:  # Ctrl-C here too ends the timing, not the search's result
            interrupted = True
            note("interrupted during the final interleaved timing; using per-trial timings.")
        chosen = min(passing, key=lambda t: t.latency_s)
        goal_met = True  # by the int8 model chosen, or by the fp32 one kept
        if not fast_enough(chosen):
            note(too_slow(chosen, "meeting the goal "))
            chosen = None
        else:
            note(f"chose trial {chosen.index} ({chosen.recipe.describe()}): fastest of {len(passing)} "
                 "candidates meeting the goal.")
            # its backend may take fewer layers than others do (pt2e's dynamic int8: the Linears, not an LSTM): the
            # file then keeps those fp32, under an int8 name
            own = next((search.layers for search in searches if search.backend.name == chosen.recipe.backend), set())
            others = {name: search.backend.name for search in searches if search.backend.name != chosen.recipe.backend
                      for name in search.layers}
            left = [name for name in layers if name in others and name not in own]
            if left:
                note(f"trial {chosen.index}'s backend ({chosen.recipe.backend}) does not quantize "
                     f"{', '.join(left[:5])}{' ...' if len(left) > 5 else ''}, which {others[left[0]]} does: they "
                     "stay fp32 in it (the fastest candidate meeting the goal all the same); "
                     "PTQConfig(backends=...) without it quantizes them.")
        if chosen is not None and chosen.latency_s > baseline_latency:
            weights = ""
            if chosen.size_bytes is not None and chosen.size_bytes < baseline_size:
                weights = (f"; its weights are smaller "
                           f"({' vs '.join(figures_apart(chosen.size_bytes / 1024, baseline_size / 1024, decimals=1))} "
                           "KiB), though its file may not be")
            note(f"the chosen int8 model is slower than fp32 on this host "
                 f"({' ms vs '.join(milliseconds_apart(chosen.latency_s, baseline_latency))} ms): the model is too"
                 f" small for int8 kernels to pay off{weights}.")
    else:
        ran = [t for t in trials if t.index in models]
        fast = [t for t in ran if fast_enough(t)]
        if ran and not fast:  # the fp32 model meets the goal, and no int8 one pays off
            note(too_slow(min(ran, key=lambda t: t.latency_s), ""))
            chosen, goal_met = None, True
        else:
            goal_met = False
            # the most accurate; of equal metrics (common with accuracy), the fastest, not the first tried
            chosen = max(fast, key=lambda t: (score(t), -t.latency_s)) if fast else None
            if chosen is not None:
                goal, reached, fp32 = significant_apart(threshold, chosen.metric, baseline_metric)
                warning = (f"Accuracy goal not met (metric {'>=' if criterion.higher_is_better else '<='} "
                           f"{goal}): returning the most accurate "
                           f"{'finished ' if interrupted else ''}candidate"
                           f"{' fast enough for min_speedup' if len(fast) < len(ran) else ''}, trial {chosen.index} "
                           f"({chosen.recipe.describe()}) with metric {reached} vs fp32 {fp32}. "
                           + ("The search was interrupted before it ended." if interrupted else
                              "Give an absolute tolerance: AccuracyCriterion(relative=False)." if no_margin else
                              "Raise timeout_s or the tolerable loss." if timed_out and recipes_left() else
                              "Raise max_trials or the tolerable loss." if recipes_left() else
                              # every recipe the search knows was tried: more trials or time change nothing
                              "Every recipe was tried: raise the tolerable loss, or give other backends."))
            elif not trials:  # nothing failed: the search ended before its first trial
                why = ("timeout_s reached before the first trial" if timed_out else
                       "interrupted before the first trial" if interrupted else "no recipe to try")
                warning = f"No quantized candidate was tried ({why}): returning an fp32 copy of the model."
            elif interrupted:  # (the trials before it failed, as result.trials says)
                warning = (f"The search was interrupted {where}, before any quantized candidate was finished: "
                           "returning an fp32 copy of the model.")
            elif any(search.unscored for search in searches):
                unscored = sum(len(search.unscored) for search in searches)
                said = ("eval_fn gave NaN or inf on every one it ran" if unscored == len(trials) else
                        f"eval_fn gave NaN or inf on {unscored} of the {len(trials)} tried, the others failed")
                warning = (f"No quantized candidate could be scored: {said} (see result.messages/trials): returning "
                           "an fp32 copy of the model.")
            else:
                warning = ("No quantized candidate could be built and scored (see result.messages/trials: the "
                           "backend's error, or eval_fn's): returning an fp32 copy of the model.")
            note(warning)
            warnings.warn(warning, QuantizationGoalWarning, stacklevel=3)  # the caller of quantize()

    if other_floats:  # the result takes the model's own inputs, as the candidates were judged
        fp32 = FloatInputs(fp32)
        models = {index: FloatInputs(candidate) for index, candidate in models.items()}
    if chosen is None:
        return QuantizationResult(model=fp32, recipe=None, metric=baseline_metric, baseline_metric=baseline_metric,
                                  latency_s=baseline_latency, baseline_latency_s=baseline_latency,
                                  size_bytes=baseline_size, baseline_size_bytes=baseline_size, goal_met=goal_met,
                                  trials=trials, messages=messages, tuning_seconds=time.monotonic() - started,
                                  example_inputs=example_inputs, dynamic_dims=config.dynamic_dims, goal=threshold)
    return QuantizationResult(model=models[chosen.index], recipe=chosen.recipe, metric=chosen.metric,
                              baseline_metric=baseline_metric, latency_s=chosen.latency_s,
                              baseline_latency_s=baseline_latency, size_bytes=chosen.size_bytes,
                              baseline_size_bytes=baseline_size, goal_met=goal_met, trials=trials,
                              messages=messages, tuning_seconds=time.monotonic() - started,
                              example_inputs=example_inputs, dynamic_dims=config.dynamic_dims, goal=threshold)
