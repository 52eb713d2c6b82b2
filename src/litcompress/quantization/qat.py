"""Quantization-aware training (QAT): train through int8 rounding, then convert to a real int8 model.

Post-training quantization rounds weights and activations the model never saw rounded; where that costs more accuracy
than the tuner's per-layer fallback can win back, a few epochs of training with the rounding simulated ("fake
quantization") let the weights adapt to it. The flow is torchao's PT2E QAT, the one torch maintains: ``torch.export``
the model, ``prepare_qat_pt2e`` with the x86 inductor quantizer (static int8: per-channel weights, per-tensor
activations), train, ``convert_pt2e``. The int8 model is the PT2E backend's (saved as a ``.pt2`` program by
:func:`save_quantized`, loaded by :func:`load_quantized`).

Framework-free: :func:`prepare_qat` gives a module any training loop can train; the Lightning callback
(:class:`litcompress.callbacks.QuantizationAwareTraining`) is a thin adapter over it. A data-parallel loop (DDP,
Fabric) calls :meth:`QATModel.sync_ranges_` after every step, so that every process converts the same int8 model.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import functools
import os
import traceback
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from litcompress._inputs import copied
from litcompress.pruning.engine import deepcopy_model, holds_pruning_zeros

from .config import Recipe
from .backends import ExportError, Inputs, cpu_has_vnni
from .shapes import DynamicDims, normalize_dynamic_dims, resolve_dynamic_dims

def sparse_weight_masks(module: nn.Module) -> dict[str, torch.Tensor]:
    """The keep-masks (``weight != 0``) of `module`'s parameters that ``keep_sparsity`` holds, by parameter name:
    those of 2 dims or more holding zeros as pruning leaves them (:func:`~litcompress.pruning.engine.
    holds_pruning_zeros`: at least 1% exact zeros, not all zeros, an initialisation which training must move), and
    the 1-d ones (biases: ``ModelPruning``'s default targets) holding such zeros in a layer whose weights are held:
    a bias partly zero at initialisation (an LSTM's beside its forget gate's ones) in a layer never pruned trains."""
    masks, seen = {}, set()
    for path, owner in module.named_modules():
        own = list(owner.named_parameters(recurse=False))  # a tied weight held under another name counts here too
        held = {name for name, param in own if param.dim() >= 2 and holds_pruning_zeros(owner, name)}
        if held:
            held |= {name for name, param in own if param.dim() == 1 and holds_pruning_zeros(owner, name, vectors=True)}
        for name, param in own:
            if name in held and id(param) not in seen:  # (a tied weight's mask under its first name)
                masks[f"{path}.{name}" if path else name] = param.detach() != 0
        seen.update(id(param) for _, param in own)
    return masks


def check_float32_parameters(model: nn.Module, owner: str) -> None:
    """Refuse trainable parameters of a floating dtype other than float32, in words (torch's dtype error came from
    inside the trace): torchao's fake quantizers compute in float32. A frozen half-precision parameter, or a buffer,
    that the model casts itself is left alone."""
    other = sorted({str(p.dtype) for p in model.parameters()
                    if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32})
    if other:
        raise TypeError(f"{owner}: the model's trainable parameters are {', '.join(other)}; QAT trains a float32 "
                        "graph: pass model.float() (and float32 inputs).")


_MODE_FLAGS = ("observer_enabled", "fake_quant_enabled")


@dataclass(frozen=True)
class QATConfig:
    """How a model is prepared for quantization-aware training.

    Args:
        fp32_layers: qualified names of layers (``"classifier"``, ``"blocks.0.fc"``) that stay in fp32, as the PTQ
            tuner's per-layer fallback keeps them (see ``QuantizationResult.recipe.fp32_layers``).
        reduce_range: int8 activations with 7 bits. None: chosen from the CPU, as the PT2E backend does (without
            VNNI the int8 kernels' 16-bit intermediate sums saturate on 8-bit activations).
        keep_sparsity: the weights and biases that hold at least 1% exact zeros when training starts, a pruned
            model's, keep those zeros: they are reset before every training forward and before conversion (and, in
            the Lightning callback, after every optimizer step, so checkpoints and validation hold them too; a plain
            loop calls :meth:`QATModel.apply_masks_` after ``optimizer.step()`` for that), so training does not grow
            them back and the int8 model is as sparse as the model it came from. A weight that is all zeros (a
            zero-initialised layer, not a pruned one) trains.
        dynamic_dims: input dims that vary between batches besides the batch dim (a sequence length), which the
            graph and the saved file then leave free: ``{input_index: dim or dims}``, as in ``PTQConfig``.
    """

    fp32_layers: tuple[str, ...] = ()
    reduce_range: bool | None = None
    keep_sparsity: bool = True
    dynamic_dims: DynamicDims | Mapping[int, int | Sequence[int]] | None = None

    def __post_init__(self) -> None:
        given = self.fp32_layers
        layers = None if isinstance(given, str) or not isinstance(given, Iterable) else tuple(given)  # (once: a
        if layers is None or not all(isinstance(n, str) for n in layers):  # generator checked first is used up)
            raise TypeError(f"QATConfig(fp32_layers={given!r}): give a sequence of qualified layer names, "
                            "e.g. ('classifier',).")
        if "" in layers:  # the root's name in named_modules(): every layer would stay fp32, and nothing train as int8
            raise ValueError(f"QATConfig(fp32_layers={layers!r}): '' names the whole model, which would leave "
                             "nothing to quantize; name the layers to keep in fp32, e.g. ('classifier',).")
        object.__setattr__(self, "fp32_layers", layers)
        if self.reduce_range is not None and not isinstance(self.reduce_range, bool):
            raise TypeError(f"QATConfig(reduce_range={self.reduce_range!r}): use True, False or None (from the CPU).")
        if not isinstance(self.keep_sparsity, bool):
            raise TypeError(f"QATConfig(keep_sparsity={self.keep_sparsity!r}): use True or False.")
        object.__setattr__(self, "dynamic_dims", normalize_dynamic_dims(self.dynamic_dims, "QATConfig"))

    def recipe(self) -> Recipe:
        """The recipe the converted model is described (and saved) with."""
        reduce_range = (not cpu_has_vnni()) if self.reduce_range is None else self.reduce_range
        return Recipe("pt2e", "static", per_channel=True, calibration="minmax", fp32_layers=self.fp32_layers,
                      reduce_range=reduce_range)


def modules_pruned_with_masks(model: nn.Module) -> list[str]:
    """Modules of `model` whose weights are computed from a mask in forward (torch.nn.utils.prune's hooks, or a
    parametrization holding a mask: torch.ao.pruning's FakeSparsity). Other parametrizations (weight_norm,
    spectral_norm) are traced into the QAT graph and folded at conversion like any weight computation."""
    from torch.nn.utils import parametrize, prune

    names = []
    for name, module in model.named_modules():
        masked_parametrization = parametrize.is_parametrized(module) and any(
            "mask" in buffer for parametrizations in module.parametrizations.values()
            for parametrization in parametrizations for buffer, _ in parametrization.named_buffers())
        if masked_parametrization or any(
                isinstance(hook, prune.BasePruningMethod) for hook in module._forward_pre_hooks.values()):
            names.append(name or type(model).__name__)
    return names


def masks_refused_message(owner: str, names: Sequence[str]) -> str:
    return (f"{owner}: {list(names)[:5]} compute their weights from pruning masks in forward, which the int8 "
            "conversion cannot fold; make the pruning permanent first (litcompress.make_permanent_(model), or "
            "ModelPruning(make_pruning_permanent=True) at the end of its fit): QATConfig(keep_sparsity=True) keeps "
            "the zeros.")


def check_layer_names(model: nn.Module, names: Sequence[str]) -> None:
    """ValueError naming the `names` (``QATConfig.fp32_layers``) that are no layer of `model`."""
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"QATConfig(fp32_layers=...): {unknown} name no layer of {type(model).__name__}; its layers "
                         f"are e.g. {[n for n in modules if n][:8]}.")


def _not_float32_cause(graph: nn.Module, args: tuple) -> str | None:
    """What runs a QAT graph in another precision than float32: autocast, its weights, or its inputs (None: none)."""
    casting = [device for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)]
    if casting:
        dtype = torch.get_autocast_dtype(casting[0])
        return f"its forward runs under autocast to {str(dtype).removeprefix('torch.')} (a mixed precision)"
    weights = sorted({str(p.dtype).removeprefix("torch.") for p in graph.parameters()
                      if p.is_floating_point() and p.dtype != torch.float32})
    if weights:
        return f"its weights are {', '.join(weights)} (a half-precision cast of the prepared model)"
    inputs = sorted({str(a.dtype).removeprefix("torch.") for a in args
                     if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float32})
    return f"its inputs are {', '.join(inputs)}" if inputs else None


class QATModel(nn.Module):
    """A model's fake-quantized training graph: train it as the model (same parameters, same inputs and outputs),
    then :meth:`convert` it to int8.

    ``train()``/``eval()`` switch the graph between its training form (batch statistics, dropout, observers on) and
    its evaluation form on the next call, as torchao's ``move_exported_model_to_train/eval`` do (the exported graph
    itself refuses those calls); in evaluation form the observers are off too, so evaluating on validation data does
    not move the ranges the int8 model will use.
    """

    def __init__(self, model: nn.Module, graph: torch.fx.GraphModule, config: QATConfig, recipe: Recipe,
                 example_inputs: Inputs) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # not a sub-module: its parameters are the graph's, counted once
        self.graph = graph
        self.config = config
        self.recipe = recipe  # what the graph was prepared with (reduce_range read from the CPU once, there)
        self.example_inputs = tuple(example_inputs)
        self.dynamic_dims: DynamicDims | None = None  # per input, the free dims (prepare_qat sets them)
        self._graph_training = True
        # The observers' on/off flags are the user's (a late-QAT freeze of the int8 ranges) in either form: an
        # evaluation turns them off for its own forward only, so a freeze made between an evaluation and the next
        # training step is not undone by the switch back.
        self._fake_quantizers = [module for module in graph.modules()
                                 if isinstance(getattr(module, "observer_enabled", None), torch.Tensor)]
        self._model_keys = frozenset(model.state_dict())
        # the model's batch norms (their statistics are the graph's buffers), named for the single-row check
        self._batch_norms = _batch_norms_of(model)
        self._masks: dict[str, torch.Tensor] = sparse_weight_masks(graph) if config.keep_sparsity else {}

    @property
    def held_sparse(self) -> tuple[str, ...]:
        """The weights whose zeros training keeps (``keep_sparsity``)."""
        return tuple(self._masks)

    def train(self, mode: bool = True) -> "QATModel":
        self.training = mode
        return self

    def _sync_mode(self) -> None:
        if self._graph_training == self.training:
            return
        switched_(self.graph, training=self.training)
        self._graph_training = self.training

    def freeze_ranges_(self) -> None:
        """Turn the observers off in training too, so that the int8 ranges stay as they are from here (the usual
        last-epochs step of QAT, as torchao's ``disable_observer``); :meth:`fake_quant_state` keeps them off."""
        for module in self._fake_quantizers:
            module.observer_enabled[0] = 0

    @property
    def ranges_frozen(self) -> bool:
        """Whether every observer is off in training (:meth:`freeze_ranges_`)."""
        return all(not bool(module.observer_enabled[0]) for module in self._fake_quantizers)

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """Reset the held zeros (``keep_sparsity``) of the weights: after an optimizer step has moved them."""
        params = dict(self.graph.named_parameters())
        for name, mask in self._masks.items():
            params[name].mul_(mask)

    def held_masks(self) -> dict[str, torch.Tensor]:
        """The keep-masks of the held weights (``keep_sparsity``), for a checkpoint: :meth:`load_held_masks` puts them
        back, so that a resumed fit holds the zeros it held, not the ones its weights happen to have."""
        return {name: mask.clone() for name, mask in self._masks.items()}

    def load_held_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Hold the zeros of `masks` (what :meth:`held_masks` returned for a graph prepared from the same model)."""
        params = dict(self.graph.named_parameters())
        wrong = [name for name, mask in masks.items() if name not in params or params[name].shape != mask.shape]
        if wrong:
            raise ValueError(f"QATModel.load_held_masks: {wrong[:5]} are no weights of this graph (or of another "
                             "shape): the masks were saved for another model.")
        self._masks = {name: mask.to(device=params[name].device, dtype=torch.bool) for name, mask in masks.items()}
        self.apply_masks_()

    def forward(self, *args: torch.Tensor) -> object:
        self._sync_mode()
        if self.training and self._masks:
            self.apply_masks_()
        try:
            if self.training and self._batch_norms and _one_row(args):
                return self._forward_guarding_batch_norms(args)
            if not self.training:
                with _observers_off(self._fake_quantizers), _batch_counts_kept(self._batch_norms.values()):
                    return self.graph(*args)  # (the eval form still counts batch norms' batches)
            return self.graph(*args)
        except RuntimeError as error:  # torchao's fake quantizers compute in float32: "expected scalar type Float"
            dtypes = ("expected scalar type", "must have the same dtype")  # (the eval form's matmul says the latter)
            cause = _not_float32_cause(self.graph, args) if any(said in str(error) for said in dtypes) else None
            if cause is None:
                raise
            raise TypeError(f"QAT: {cause}; the graph's fake quantizers compute in float32 ({error}). Train the QAT "
                            "model in float32: without autocast (Fabric/Trainer precision='32-true'), with float32 "
                            "weights and inputs.") from None
        except AssertionError as error:  # torch.export's guard on a dim traced fixed: "Guard failed: x.size()[1] == 5"
            if "Guard failed" not in str(error):
                raise
            shapes = [tuple(t.shape) for t in self.example_inputs]
            free = [list(dims) for dims in self.dynamic_dims or ()]
            raise ValueError(f"QAT: the graph was traced on inputs of shapes {shapes}, free only along dims {free} "
                             "(the batch dims and those of QATConfig.dynamic_dims), and these inputs, of shapes "
                             f"{[tuple(getattr(a, 'shape', ())) for a in args]}, differ in another one ({error}). "
                             "Declare the dims that vary: QATConfig(dynamic_dims={input_index: dim}), e.g. {0: 1} for "
                             "a sequence length.") from None

    def _forward_guarding_batch_norms(self, args: tuple) -> object:
        """A training batch of one row. The eager model refuses batch norm over one value per channel; the traced
        graph instead writes NaN into the running variance, the user's own buffer, which the int8 conversion then
        folds into every weight. Here that is caught and undone, and said."""
        saved = {name: [t.clone() for t in _statistics(m)] for name, m in self._batch_norms.items()}
        outputs = self.graph(*args)
        broken = [name for name, m in self._batch_norms.items()
                  if bool(torch.isnan(m.running_var).any()) and not bool(torch.isnan(saved[name][1]).any())]
        if broken:
            with torch.no_grad():
                for name, m in self._batch_norms.items():
                    for buffer, value in zip(_statistics(m), saved[name]):
                        buffer.copy_(value)
            raise ValueError(f"QAT: batch norm {broken[:5]} saw one value per channel in a training batch of one row "
                             "(torch's eager model refuses this: 'Expected more than 1 value per channel when "
                             "training'); its running variance would have become NaN, so it is left as it was. Train "
                             "on batches of at least 2 rows, e.g. DataLoader(..., drop_last=True) when the last batch "
                             "can hold a single sample.")
        return outputs

    @torch.no_grad()
    def sync_ranges_(self, group: "torch.distributed.ProcessGroup | None" = None) -> int:
        """In a distributed run (``torch.distributed`` initialised, more than one process in `group`): give every
        process the same int8 ranges, each observer's minimum the smallest and its maximum the largest any process
        holds, and the fake quantizers' scales and zero points that follow from them. Returns how many quantizers
        had differed between the processes (the same number on each; 0 outside a distributed run).

        Call it after every training step, on every process (the callback does). Each process's observers see only
        its own batches, so without it they drift apart and every process would convert to another int8 model. The
        observers keep moving averages, ``m + c (x - m)``, of each batch's extreme: started equal and synced after
        every step, they hold exactly the averages of the extremes over all the processes' batches (that update is
        monotone in ``x``), as one process seeing every batch would: bit for bit for the model's inputs; deeper in,
        approximately, since within a step each process computes its activations with its own scales.
        Weights are the same on every process under DDP, so their quantizers, like every quantizer that already
        agreed, are left bit for bit."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
            return 0
        found = [(m, found) for m in self.graph.modules() if (found := _observed_range(m)) is not None]
        if not found:
            return 0
        quantizers, ranges = zip(*found)
        own = torch.cat([torch.cat([-low.reshape(-1), high.reshape(-1)]) for low, high in ranges])
        widest = own.clone()
        dist.all_reduce(widest, op=dist.ReduceOp.MAX, group=group)  # max of -min: the min, in the same call
        # per quantizer, whether any of its values moved here: one vector (no host sync per quantizer on a GPU)
        sizes = torch.tensor([low.numel() + high.numel() for low, high in ranges], device=own.device)
        owner = torch.repeat_interleave(torch.arange(len(ranges), device=own.device), sizes)
        differed = torch.zeros(len(ranges), dtype=torch.int32, device=own.device)
        differed.index_add_(0, owner, (widest != own).to(torch.int32))
        differed.clamp_(max=1)
        dist.all_reduce(differed, op=dist.ReduceOp.MAX, group=group)  # moved on any process: recomputed on all
        start = 0
        for quantizer, (low, high), flag in zip(quantizers, ranges, differed.tolist()):
            middle, end = start + low.numel(), start + low.numel() + high.numel()
            if flag:
                low.copy_(-widest[start:middle].view_as(low))
                high.copy_(widest[middle:end].view_as(high))
                scale, zero_point = quantizer.calculate_qparams()
                for buffer, value in ((quantizer.scale, scale), (quantizer.zero_point, zero_point)):
                    if buffer.shape != value.shape:
                        buffer.resize_(value.shape)
                    buffer.copy_(value)
            start = end
        return int(differed.sum())

    def fake_quant_state(self) -> dict[str, torch.Tensor]:
        """What the graph holds beyond the model's own state: the observers' ranges and the fake quantizers' scales,
        and their on/off flags (a late-QAT freeze of the ranges is training state: an evaluation turns the observers
        off for its own forward only); a checkpoint of the model does not have them, :meth:`load_fake_quant_state`
        puts them back."""
        return {k: v.detach().clone() for k, v in self.graph.state_dict().items() if k not in self._model_keys}

    def load_fake_quant_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`fake_quant_state` returned, into a graph prepared from the same model (a state saved
        before the flags were part of it loads, the flags left as they are)."""
        expected = set(self.fake_quant_state())
        if not any(k.endswith(_MODE_FLAGS) for k in state):
            expected = {k for k in expected if not k.endswith(_MODE_FLAGS)}
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state))[:5], sorted(set(state) - expected)[:5]
            raise ValueError(f"QATModel.load_fake_quant_state: the state is not this graph's (missing {missing}, "
                             f"unexpected {unexpected}): it was saved for another model or QATConfig.")
        # with the modules' versions: an observer reads an unversioned state as an old one and resets its eps
        versioned = OrderedDict(state)
        versioned._metadata = getattr(self.graph.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
        self.graph.load_state_dict(versioned, strict=False)

    def convert(self, *, compile: bool = False) -> "QATResult":
        """The int8 model: a copy of the graph in evaluation form, the held zeros reset, converted (the QAT model
        stays trainable). Before any training step the ranges are those of the example inputs.

        The converted program runs torch's reference int8 ops (quantize, dequantize, fp32 kernels): correct, slower
        than fp32. ``compile=True`` runs it through ``torch.compile`` (inductor, freezing), which fuses them into
        int8 x86 kernels, as the PT2E backend's ``PTQConfig(compile=True)`` does (1.8-2.6x faster than fp32 in
        ``benchmarks/qat.py``); it needs a C++ compiler and compiles on this call. Saved files are the same either
        way."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        from .backends.exported import ExportedInference
        from .backends.pt2e import _drop_unused_tensors, check_cpp_compiler

        if compile:
            check_cpp_compiler("QATModel.convert(compile=True)")  # (inductor's own error, after the conversion)
        self.apply_masks_()
        graph = copy_module.deepcopy(self.graph)
        switched_(graph, training=False)  # idempotent
        _eps_into_running_var_(graph)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            converted = convert_pt2e(graph)
        _drop_unused_tensors(converted)
        model = (compile_converted(converted, self.example_inputs) if compile
                 else ExportedInference(converted, dims_declared_in="QATConfig"))
        return QATResult(model, self.recipe, self.example_inputs, held_sparse=self.held_sparse,
                         dynamic_dims=self.dynamic_dims)


def compile_converted(program: nn.Module, example_inputs: Inputs) -> nn.Module:
    """A converted int8 program run through ``torch.compile`` (see :meth:`QATModel.convert`), compiled now."""
    from .backends.pt2e import CompiledInference

    model = CompiledInference(program)
    model(*copied(example_inputs))  # pay the compile cost here, not in the first call
    return model


@dataclass
class QATResult:
    """The int8 model :meth:`QATModel.convert` built, the recipe it is saved with and the inputs it was traced on."""

    model: nn.Module
    recipe: Recipe
    example_inputs: Inputs
    held_sparse: tuple[str, ...] = field(default_factory=tuple)
    dynamic_dims: DynamicDims | None = None  # per input, the dims the file leaves free (None: the batch dims)

    def save(self, path: str | os.PathLike) -> int:
        """Write the int8 model as a ``.pt2`` program (:func:`litcompress.load_quantized` reads it); returns its size in
        bytes."""
        from .artifact import save_quantized

        return save_quantized(self.model, self.recipe, path, self.example_inputs, dynamic_dims=self.dynamic_dims)


def prepare_qat(model: nn.Module, example_inputs: Sequence[torch.Tensor], config: QATConfig | None = None, *,
                copy: bool = True) -> QATModel:
    """`model` ready for quantization-aware training: trace it on `example_inputs` (positional tensors, any batch
    size: the batch dim stays free) and insert fake quantization where the int8 model will round.

    ``copy=True`` (the default) traces a copy, so `model` is left as it was; the QAT model trains the copy's
    parameters (``QATModel.model`` holds the copy). ``copy=False`` trains `model`'s own parameters, which an optimizer
    built on them before keeps updating: what a training loop that switches to QAT part-way needs.

    A model pruned with masks (``torch.nn.utils.prune`` or parametrizations) is refused: make the pruning permanent
    first (``litcompress.make_permanent_``); ``keep_sparsity`` then keeps its zeros. So is a model with no layer to
    quantize (none torchao's x86 quantizer takes, or every one in ``fp32_layers``).
    """
    config = QATConfig() if config is None else config
    if not isinstance(config, QATConfig):
        raise TypeError(f"prepare_qat(config={config!r}): expected a QATConfig.")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not example_inputs or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("prepare_qat(example_inputs=...): give the model's positional inputs as a tuple of tensors.")
    wrapped = getattr(model, "_original_module", None)
    if isinstance(wrapped, nn.Module) and wrapped is not model:  # (torch.export failed on its forward(*args, **kw))
        raise TypeError(f"prepare_qat: {type(model).__name__} wraps {type(wrapped).__name__} (Lightning Fabric's "
                        "fabric.setup): prepare the module it wraps (`.module`), then set up the QAT model with "
                        "Fabric (fabric.setup(qat, optimizer)).")
    masked = modules_pruned_with_masks(model)
    if masked:
        raise ValueError(masks_refused_message("prepare_qat", masked))
    check_float32_parameters(model, "prepare_qat")  # (inputs are not checked: a model may cast them itself)
    check_layer_names(model, config.fp32_layers)
    frozen = frozen_inside(model)
    if model.training and frozen:  # (the Lightning callback says it in its own words)
        warnings.warn(frozen_inside_message("prepare_qat", model, frozen), UserWarning, stacklevel=2)
    if copy:
        model = deepcopy_model(model)
    dynamic_dims = resolve_dynamic_dims([example_inputs], config.dynamic_dims)  # the batch dims and the declared
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    recipe = config.recipe()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True,
                                                                          reduce_range=recipe.reduce_range))
    for name in config.fp32_layers:
        quantizer.set_module_name_qconfig(name, None)
    try:
        graph = _export_for_training(model, example_inputs, dynamic_dims)
    except ExportError as error:
        cumulative = [name for name, m in model.named_modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None]
        # the guard on the count a cumulative average divides by: a data-dependent value, raised in batch norm's
        # forward (another module's data-dependent branch is not theirs to answer for)
        cause = error.__cause__
        in_batch_norm = cause is not None and any(
            frame.filename.endswith(os.path.join("modules", "batchnorm.py"))
            for frame in traceback.extract_tb(cause.__traceback__))
        if cumulative and in_batch_norm and "data-dependent" in str(cause):
            raise ExportError(f"{error} Batch norms with momentum=None ({cumulative[:4]}) average over a count "
                              "torch.export cannot trace; give them a momentum (e.g. 0.1).") from error.__cause__
        raise
    try:  # (the model traced: what fails from here is torchao's QAT graph)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*skip annotate.*")
            warnings.simplefilter("ignore", DeprecationWarning)
            kept = _kept_arguments(graph)
            prepared = prepare_qat_pt2e(graph, quantizer)
            restore_kept_arguments_(prepared, kept)  # its conv-bn fusion writes eps=1e-5, momentum=0.1
        with _batch_counts_kept(_batch_norms_of(model).values()):
            _observe_(prepared, example_inputs)
    except Exception as error:
        if any(said in str(error) for said in ("expected scalar type", "must have the same dtype")):
            # a frozen layer in another precision (the trainable ones were refused above), or float64 inputs
            others = [f"{name} ({str(p.dtype).removeprefix('torch.')})" for name, p in model.named_parameters()
                      if p.is_floating_point() and p.dtype != torch.float32]
            inputs = sorted({str(t.dtype).removeprefix("torch.") for t in example_inputs
                             if t.is_floating_point() and t.dtype != torch.float32})
            if others or inputs:
                found = ([f"its parameters {', '.join(others[:4])}{' ...' if len(others) > 4 else ''} are not "
                          "float32"] if others else []) + ([f"its inputs are {', '.join(inputs)}"] if inputs else [])
                layers = sorted({name.rpartition(".")[0] for name, p in model.named_parameters()
                                 if p.is_floating_point() and p.dtype != torch.float32} - {""})
                kept = (f", or, for layers its forward runs in their own precision, keep them out of int8: "
                        f"QATConfig(fp32_layers={tuple(layers[:4])!r})" if layers else "")
                raise TypeError(f"prepare_qat: {'; '.join(found)}, and the graph's fake quantizers compute in float32 "
                                f"({error}). Pass model.float() and float32 inputs{kept}.") from None
        cause = _batch_norm_cause(model, config) or (
            _reused_modules_cause(model, example_inputs) if "more than one output node" in str(error) else None)
        if cause is None:
            raise
        raise ExportError(f"prepare_qat: {cause} ({type(error).__name__} in torchao: "
                          f"{(str(error).strip().splitlines() or [''])[0][:160]})") from error
    qat = QATModel(model, prepared, config, recipe, tuple(t.detach().clone() for t in example_inputs))
    if not qat._fake_quantizers:  # it would train and "convert" to the fp32 model, saved as int8
        left = (f" (fp32_layers={list(config.fp32_layers)} keeps in fp32 those it would take)" if config.fp32_layers
                else "")
        raise ValueError(f"prepare_qat: no layer of {type(model).__name__} is quantized{left}: torchao's x86 "
                         "quantizer takes Linear and Conv2d layers, and a Conv1d an nn.ReLU module follows (and the "
                         "ops around them); with none, "
                         "QAT would train an fp32 model and convert it to itself.")
    left_in_fp32 = _layers_left_in_fp32(model, prepared, config.fp32_layers)
    if left_in_fp32:  # (the int8 model would run them in fp32, and nothing said so)
        # every name, those given too: the suggestion copied as it is keeps them fp32 and silences the warning
        listed = tuple(config.fp32_layers) + tuple(name.split(" ")[0] for name in left_in_fp32)
        warnings.warn(f"prepare_qat: torchao's x86 quantizer takes Linear and Conv2d layers, and a Conv1d an "
                      "nn.ReLU module follows; "
                      f"{', '.join(left_in_fp32[:6])}{' ...' if len(left_in_fp32) > 6 else ''} "
                      f"{'stays' if len(left_in_fp32) == 1 else 'stay'} float32 in the int8 model (not "
                      f"fake-quantized). To say that is meant, list them in QATConfig(fp32_layers={listed!r}).",
                      UserWarning, stacklevel=2)
    qat.dynamic_dims = dynamic_dims
    return qat


def _layers_left_in_fp32(model: nn.Module, graph: torch.fx.GraphModule, fp32_layers: Sequence[str]) -> list[str]:
    """The convolution and Linear layers of `model` (``"name (Type)"``) whose weights reach no fake quantizer in the
    prepared `graph` before their own layer's op (a Conv3d, a ConvTranspose2d), besides those `fp32_layers` keeps."""
    layers = {f"{name}.weight": (name, module) for name, module in model.named_modules()
              if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
              and not any(name == kept or name.startswith(kept + ".") for kept in fp32_layers)}
    fake_quantizer_names = {name for name, module in graph.named_modules()
                            if isinstance(getattr(module, "observer_enabled", None), torch.Tensor)}
    layer_ops = ("conv", "linear", "mm", "matmul")  # (past these, a fake quantizer is the activation's)
    left = []
    for node in graph.graph.nodes:
        if node.op != "get_attr" or node.target not in layers:
            continue
        frontier, quantized = list(node.users), False
        while frontier and not quantized:
            user = frontier.pop()
            if user.op == "call_module" and user.target in fake_quantizer_names:
                quantized = True
            elif user.op == "call_function" and not any(op in str(user.target) for op in layer_ops):
                frontier.extend(user.users)  # (QAT's conv-bn fusion scales the weight first)
        if not quantized:
            name, module = layers[node.target]
            left.append(f"{name} ({type(module).__name__})")
    return left


def frozen_inside(model: nn.Module) -> list[str]:
    """The batch norms and dropouts of `model` (not itself) in eval mode: a QAT graph switches between its training
    and evaluation form as a whole, so they would train with the rest."""
    return [name for name, sub in model.named_modules() if name and not sub.training
            and isinstance(sub, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))]


def frozen_inside_message(owner: str, model: nn.Module, frozen: Sequence[str]) -> str:
    return (f"{owner}: {', '.join(frozen[:4])}{' ...' if len(frozen) > 4 else ''} in eval mode inside "
            f"{type(model).__name__}, which trains: the QAT graph switches between training and evaluation form as a "
            "whole, so they train as the rest does (batch norm statistics move, dropout drops). Freeze them another "
            "way (momentum=0, p=0), or keep them out of the quantized model.")


def _batch_norm_cause(model: nn.Module, config: QATConfig) -> str | None:
    """What torchao's QAT conv-batch-norm fusion cannot take in `model`, where that explains a failure of torchao's
    QAT graph on a model that traced (its own errors were an IndexError or a missing tensor, naming no layer); None
    otherwise."""
    batch_norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not batch_norms:
        return None
    partial = [name for name, m in batch_norms.items() if m.weight is None or m.running_var is None]
    if partial:
        return (f"{partial[:4]} are batch norms without an affine weight or running statistics (affine=False or "
                "track_running_stats=False), which torchao's QAT conv-batch-norm fusion needs; build them with the "
                "defaults, or keep them out of the quantized model.")
    convolutions = [f"{name}.{sub}" if sub else name for name in config.fp32_layers
                    for sub, m in model.get_submodule(name).named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if convolutions:
        return (f"QATConfig(fp32_layers=...) keeps the convolutions {convolutions[:4]} in fp32, which torchao's QAT "
                "cannot do for a convolution a batch norm follows (its conv-batch-norm fusion expects it quantized); "
                "leave such convolutions to int8, or fold their batch norms into them first "
                "(torch.nn.utils.fusion.fuse_conv_bn_eval, on a model in eval mode).")
    return None


#: activations torchao's QAT quantizer fuses into a conv/linear(-batch-norm) pattern
_FUSED_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)


def _reused_modules_cause(model: nn.Module, example_inputs: tuple) -> str | None:
    """Activations one forward calls more than once (one ``nn.ReLU`` after two conv-batch-norm pairs), which
    torchao's QAT annotation of conv/linear-batch-norm-activation patterns cannot take ("Input partition has more than
    one output node", naming no layer); None when there is none (a Linear or an embedding called in a loop, tied
    weights, it takes). Counted on a copy in eval mode (the user's batch norms keep their statistics)."""
    from litcompress.pruning.engine import deepcopy_model

    copy = deepcopy_model(model).eval()
    calls: dict[str, int] = {}
    def counted(name: str) -> Callable[..., None]:
        return lambda module, args: calls.__setitem__(name, calls.get(name, 0) + 1)

    handles = [module.register_forward_pre_hook(counted(name))
               for name, module in copy.named_modules() if name and isinstance(module, _FUSED_ACTIVATIONS)]
    try:
        with torch.no_grad():
            copy(*copied(example_inputs))
    except Exception:  # noqa: BLE001 - no answer here: torchao's error stands
        return None
    finally:
        for handle in handles:
            handle.remove()
    reused = [name for name, count in calls.items() if count > 1]
    if not reused:
        return None
    return (f"{reused[:4]} {'is' if len(reused) == 1 else 'are each'} called at several places in forward (one "
            "activation object after several layers), which torchao's QAT annotation cannot quantize as one; give "
            "each call its own instance (e.g. self.relu1 = nn.ReLU(), self.relu2 = nn.ReLU()).")


def _batch_norms_of(model: nn.Module) -> dict[str, nn.Module]:
    """The batch norms of `model` that keep running statistics (in a QAT graph: its buffers), by qualified name."""
    return {name or type(model).__name__: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None}


def _statistics(batch_norm: nn.Module) -> list[torch.Tensor]:
    """Running mean, running variance and, where kept, the batch count: what a training call moves."""
    return [t for t in (batch_norm.running_mean, batch_norm.running_var, batch_norm.num_batches_tracked)
            if t is not None]


@contextlib.contextmanager
def _batch_counts_kept(batch_norms: Iterable[nn.Module]) -> Iterator[None]:
    """Keep the batch norms' ``num_batches_tracked``: torchao's evaluation form of a training graph switches batch
    norm to its running statistics but still adds 1 per call, so validation would count as training in the model's
    checkpoints."""
    counts = [(m.num_batches_tracked, m.num_batches_tracked.clone()) for m in batch_norms
              if isinstance(getattr(m, "num_batches_tracked", None), torch.Tensor)]
    try:
        yield
    finally:
        with torch.no_grad():
            for count, value in counts:
                count.copy_(value)


def _one_row(args: tuple) -> bool:
    """Whether the first tensor input has a leading (batch) dim of size 1."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return first is not None and first.dim() >= 1 and first.shape[0] == 1


def _observed_range(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The running (min, max) of a fake quantizer whose observer tracks one, with the scale and zero point it sets;
    None for any other module."""
    observer = getattr(module, "activation_post_process", None)
    low, high = getattr(observer, "min_val", None), getattr(observer, "max_val", None)
    if not (isinstance(low, torch.Tensor) and isinstance(high, torch.Tensor) and hasattr(module, "calculate_qparams")
            and isinstance(getattr(module, "scale", None), torch.Tensor)
            and isinstance(getattr(module, "zero_point", None), torch.Tensor)):
        return None
    return low, high


_KEPT_ARGUMENTS = ("p", "momentum", "eps")  # dropout's rate, batch norm's momentum and epsilon


def _kept_nodes(graph: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """`graph`'s dropout and batch-norm nodes (aten's ops of those names), in order."""
    return [node for node in graph.graph.nodes if node.op == "call_function"
            and any(kind in getattr(getattr(node.target, "_schema", None), "name", "")
                    for kind in ("dropout", "batch_norm"))]


def _kept_arguments(graph: torch.fx.GraphModule) -> list[tuple[str, dict[str, Any]]]:
    """For each of :func:`_kept_nodes`: its kind and the values of its arguments among :data:`_KEPT_ARGUMENTS`."""
    found = []
    for node in _kept_nodes(graph):
        names = [argument.name for argument in node.target._schema.arguments]
        kept = {name: _argument(node, names, name) for name in _KEPT_ARGUMENTS if name in names}
        found.append(("dropout" if "dropout" in node.target._schema.name else "batch_norm", kept))
    return found


def _argument(node: torch.fx.Node, names: list[str], name: str) -> Any:
    index = names.index(name)
    return node.args[index] if index < len(node.args) else node.kwargs.get(name)


@contextlib.contextmanager
def _observers_off(fake_quantizers: list[nn.Module]) -> Iterator[None]:
    """The observers of `fake_quantizers` off for the duration, then each as it was."""
    were_on = [bool(module.observer_enabled[0]) for module in fake_quantizers]
    for module in fake_quantizers:
        module.observer_enabled[0] = 0
    try:
        yield
    finally:
        for module, on in zip(fake_quantizers, were_on):
            module.observer_enabled[0] = int(on)


def switched_(graph: torch.fx.GraphModule, training: bool) -> None:
    """torchao's ``move_exported_model_to_train/eval`` on `graph`, keeping each dropout's rate and each batch norm's
    momentum and epsilon: its patterns write back torch's defaults (every dropout then trained at p=0.5, a batch norm
    of eps=1e-3 folded with 1e-5 into the int8 weights)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    before = _kept_arguments(graph)
    (move_exported_model_to_train if training else move_exported_model_to_eval)(graph)
    restore_kept_arguments_(graph, before)


def restore_kept_arguments_(graph: torch.fx.GraphModule, before: list[tuple[str, dict[str, Any]]]) -> None:
    """Give `graph`'s dropout and batch-norm nodes, in order, the arguments :func:`_kept_arguments` read `before` a
    torchao rewrite (its train/eval switch; ``prepare_qat_pt2e``'s conv-bn fusion) wrote torch's defaults in."""
    now = _kept_arguments(graph)
    if [kind for kind, _ in before] != [kind for kind, _ in now]:
        warnings.warn("QAT: torchao's rewrite changed the graph's dropout and batch-norm nodes in a way litcompress "
                      "does not know, so they keep torchao's defaults (dropout p=0.5, batch-norm momentum 0.1 and "
                      "eps 1e-5): give the model's dropouts and batch norms those values, or report this.",
                      stacklevel=3)
        return
    changed = [(node, kept) for node, (_, kept), (_, there) in zip(_kept_nodes(graph), before, now) if kept != there]
    for node, kept in changed:
        _set_arguments(node, kept)
    if changed:  # (a recompile at every train/eval switch costs time on a large graph)
        graph.recompile()


def _set_arguments(node: torch.fx.Node, values: dict[str, Any]) -> None:
    """Set `node`'s arguments named in `values`; a batch norm's ``eps`` also where the conv-bn fusion scales the
    weights by ``1 / sqrt(running_var + eps)`` with a literal eps of its own."""
    names = [argument.name for argument in node.target._schema.arguments]
    args, kwargs = list(node.args), dict(node.kwargs)
    for name, value in values.items():
        index = names.index(name)
        if index < len(args):
            args[index] = value
        else:
            kwargs[name] = value
    node.args, node.kwargs = tuple(args), kwargs
    if "eps" in values and "running_var" in names:
        running_var = _argument(node, names, "running_var")
        for user in list(getattr(running_var, "users", ())):  # (setting args re-registers the user)
            if user.target is torch.ops.aten.add.Tensor and len(user.args) == 2 and user.args[0] is running_var \
                    and isinstance(user.args[1], float):
                user.args = (running_var, values["eps"])


# the batch-norm epsilon of torchao's QAT conv-bn patterns: convert_pt2e folds every batch norm with it
_PATTERN_EPS = 1e-5


@torch.no_grad()
def _eps_into_running_var_(graph: torch.fx.GraphModule) -> None:
    """On a copy in evaluation form, about to be converted: each batch norm's own epsilon moved into its running
    variance (``var + eps == (var + eps - 1e-5) + 1e-5``), since ``convert_pt2e`` folds conv-bn pairs with the
    patterns' 1e-5 (a batch norm of eps=0.1 gave int8 outputs off by 1.2 of 3.5)."""
    for node in _kept_nodes(graph):
        names = [argument.name for argument in node.target._schema.arguments]
        if "eps" not in names or "running_var" not in names:
            continue
        eps, running_var = _argument(node, names, "eps"), _argument(node, names, "running_var")
        if not isinstance(eps, float) or eps == _PATTERN_EPS or getattr(running_var, "op", None) != "get_attr":
            continue
        functools.reduce(getattr, running_var.target.split("."), graph).add_(eps - _PATTERN_EPS)
        _set_arguments(node, {"eps": _PATTERN_EPS})
    graph.recompile()


def _observe_(graph: torch.fx.GraphModule, example_inputs: Inputs) -> None:
    """Give every fake quantizer the ranges of `example_inputs`, as calibration would: a model converted (or
    evaluated) before its first training step is then a PTQ model, not one with empty ranges. Run in evaluation form,
    so that no batch-norm statistic of the model moves."""
    switched_(graph, training=False)
    with torch.no_grad():
        graph(*copied(example_inputs))
    switched_(graph, training=True)


def _eager_failure(model: nn.Module, example_inputs: Inputs) -> str | None:
    """What a copy of `model`, in the modes it was exported in and with gradients on, raises on `example_inputs`
    run as they are, on a forked random stream; None when it runs, or cannot be copied (the export's error stands)."""
    try:
        copied = deepcopy_model(model)  # (a forward's side effects, a counter, stay off the user's model)
    except Exception:
        return None
    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):  # (inputs copied: a forward may change them)
            copied(*(t.clone() if isinstance(t, torch.Tensor) else t for t in example_inputs))
    except Exception as error:  # the model's own, whatever it is
        return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
    return None


def _export_for_training(model: nn.Module, example_inputs: Inputs,
                         dynamic_dims: DynamicDims | None = None) -> torch.fx.GraphModule:
    """`model`'s graph in training form, the batch dims (and `dynamic_dims`) free, sharing `model`'s parameters and
    buffers."""
    from .backends import FixedDimError
    from .backends.exported import export_program

    modes = {module: module.training for module in model.modules()}  # each its own: a frozen batch norm stays frozen
    model.train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = export_program(model, example_inputs, dynamic_dims)
    except FixedDimError as exc:
        raise ExportError(f"prepare_qat: {exc}") from exc
    except Exception as exc:
        eager = _eager_failure(model, example_inputs)
        if eager is not None:  # (not a tracing matter: the hint below pointed at control flow)
            raise ExportError(f"prepare_qat: {type(model).__name__} fails on the example inputs themselves, of shapes "
                              f"{[tuple(getattr(t, 'shape', ())) for t in example_inputs]} ({eager}): give the "
                              "inputs its forward takes.") from exc
        raise ExportError(f"prepare_qat: torch.export failed on {type(model).__name__}: {type(exc).__name__}: "
                          f"{str(exc).rstrip('.')}. QAT needs a model torch.export can trace on these inputs (inputs "
                          "it takes, and no data-dependent Python control flow on tensors).") from exc
    finally:
        for module, training in modes.items():
            module.training = training
    return program.module()
