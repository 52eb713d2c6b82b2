"""What the compression pipeline does, as configuration validated on construction."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from litcompress._numbers import python_numbers_
from litcompress.pruning.engine import recurrent_weight_names
from litcompress.pruning.methods import (PRUNING_METHODS, accepted_kwargs, check_countable_slices, check_takes_amount,
                                         is_import_path, required_kwargs, resolve_method)
from litcompress.pruning.schedules import LinearSchedule, PolynomialDecay, SparsitySchedule
from litcompress.quantization.artifact import FP32_FORMATS
from litcompress.quantization.config import PTQConfig
from litcompress.quantization.shapes import DynamicDims, normalize_dynamic_dims

ScheduleShape = Literal["cubic", "linear", "oneshot"]
SCHEDULE_SHAPES: tuple[str, ...] = ("cubic", "linear", "oneshot")
# Recurrent layers: their "weight" is every weight matrix (weight_ih_l0, weight_hh_l0, ...). Unstructured methods prune
# those; structured ones prune the hidden units of nn.LSTM/GRU/RNN (litcompress.pruning.recurrent), not single rows
# (a row of a gate-stacked matrix is no channel that shrink could remove), and leave the cells.
RecurrentLayers = (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
# transposed convs too: structured pruning of output channels prunes them along dim 1, where theirs are
PrunableLayers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, *RecurrentLayers)


class _DerivedScope(str):
    """A scope :class:`PruneConfig` chose from its method (none was given). ``dataclasses.replace`` passes it on as
    if given: marked, it is chosen again for the new method (a structured config replaced by an unstructured one
    stayed local)."""

    __slots__ = ()


class _DerivedSparsity(float):
    """A sparsity :class:`PruneConfig` took from its schedule: taken again from a new schedule given to
    ``dataclasses.replace`` (the old one's disagreed with it)."""

    __slots__ = ()


def tensor_names(module: nn.Module, name: str) -> list[str]:
    """The tensors `name` stands for in `module`: for an RNN/LSTM/GRU (or cell), ``"weight"`` is each of its weight
    matrices and ``"bias"`` each of its bias vectors; otherwise `name` itself when the module has such a tensor."""
    if name in ("weight", "bias") and isinstance(module, RecurrentLayers):
        return recurrent_weight_names(module, name)
    return [name] if isinstance(getattr(module, name, None), torch.Tensor) else []


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how far.

    Args:
        sparsity: the final fraction of the pruned entries (or, for structured methods, of the rows/channels of
            each layer) in [0, 1). Not needed with a :class:`SparsitySchedule` (its ``final_sparsity`` is used).
        method: a ``torch.nn.utils.prune`` function name (``"l1_unstructured"``, ``"ln_structured"``,
            ``"random_unstructured"``, ``"random_structured"``) or a ``BasePruningMethod`` subclass.
        schedule: how sparsity grows while fine-tuning: ``"cubic"`` (Zhu & Gupta) or ``"linear"`` from 0 to
            ``sparsity`` between the fractions ``begin`` and ``end`` of the fine-tuning steps, ``"oneshot"``
            (everything before fine-tuning), or a :class:`SparsitySchedule` in optimizer steps. Without
            fine-tuning every shape prunes at once.
        begin, end: fractions of the fine-tuning steps where a shaped schedule starts and reaches ``sparsity``.
        rounds: pruning rounds along a shaped schedule (evenly spaced; the last at ``end``; one per step when the
            span has fewer steps).
        scope: ``"global"`` ranks all tensors together, ``"local"`` prunes each tensor to ``sparsity``; default
            global for unstructured methods, local for structured ones (which only work locally).
        parameter_names: which tensors of each layer to prune.
        layer_types: the layer classes whose tensors are pruned. The default includes ``nn.LSTM``/``GRU``/``RNN``
            and their cells, whose ``"weight"`` is each of their weight matrices (``"bias"`` each of their bias
            vectors), for unstructured methods;
            structured methods on output channels prune the hidden units of ``nn.LSTM``/``GRU``/``RNN`` layers
            instead (the same fraction of each layer's units, ranked by the ``norm`` of their rows in every gate,
            layer and direction: :func:`litcompress.pruning.recurrent.prune_units_`), which ``shrink`` removes,
            and leave the cells;
            with ``nn.Linear`` among them, unstructured methods prune Hugging Face's ``Conv1D`` layers too (GPT-2's
            Linear layers, their weights stored transposed); with ``nn.Embedding`` (not in the default), structured
            methods on output channels prune an embedding's dims (its weight's columns), which ``shrink`` removes.
        exclude: names of modules (as in ``model.named_modules()``; a ``torch.compile``'d part's with or without
            ``_orig_mod``) left dense, with every module inside them (a block's name leaves all its layers).
            Default: for structured methods the layer(s) whose outputs are the model's (the classifier, as the
            trace finds it, wherever ``__init__`` registers it; without a trace the last prunable layer registered,
            of any prunable type, so ``layer_types=(nn.Conv2d,)`` leaves a Linear head out without taking the last
            conv for it), else none.
            Structured methods never prune depthwise convolutions (a MobileNet block's middle layer): their
            channels are those of the layer before them, and ``shrink`` removes them with that layer's.
        dim, norm: for structured methods, the dimension whose slices are removed (0: output channels, what
            :func:`litcompress.shrink` removes) and the norm that ranks them (``ln_structured``).
        zero_batch_norm: a channel whose filter is pruned also loses its BatchNorm scale and shift (held at zero
            after every fine-tuning step; set once without fine-tuning), in a channel group (below) its
            producers' biases, and its layer's bias where a zero-padded conv or a gate reads it before any
            BatchNorm does (a U-Net's transposed conv), so it outputs exactly zero: ``shrink`` then removes it even
            before a zero-padded convolution, where a constant channel has to stay. False: pruned channels keep them
            and output a constant, which ``shrink`` folds into the next layer where no zero padding reads it.
        group_residuals: with ``ln_structured`` (and ``zero_batch_norm``), the layers whose outputs
            residual additions join (a ResNet stage's stem and last convs of each block), or a gating product (the
            ``w1`` and ``w3`` of a SwiGLU feed-forward block, ``w2(silu(w1(x)) * w3(x))``), are pruned as one group:
            the same channels in all of them, ranked by the sum of their norms, so ``shrink`` can remove them from
            every layer that writes or reads the group's channels. Otherwise each such layer keeps its pruned
            channels.
        removable_only: with a structured method on output channels (``dim=0``), prune only the layers whose
            channels ``shrink`` can then remove (``litcompress.pruning.shrink.removable_channels``); the others
            (e.g. the layers writing into a Transformer's LayerNorm'd residual stream, or the attention's output)
            would lose accuracy and keep their size; so do the layers of a residual group that is only partly among
            the targets (one of its layers excluded). The report names the layers left out and why. False prunes
            every target. A model ``torch.fx`` cannot trace (shrink would remove nothing) is refused with the
            trace's error before any training; False masks its channels anyway.
        heads: the fraction of each ``nn.MultiheadAttention``'s heads to prune (those with the smallest norm of
            their query, key, value and output weights; at least one stays), along the same schedule as
            ``sparsity``, with any method. ``shrink`` then removes them: the attention narrows to the kept heads
            (:class:`litcompress.pruning.heads.HeadPrunedAttention`). 0 (the default) prunes none; attentions named
            in ``exclude`` keep theirs.
    """

    sparsity: float | None = None
    # the class first: LightningCLI then reads `mymodule.MyMethod` as the class, and torch's names as strings
    method: Union[type[torch_prune.BasePruningMethod], str] = "l1_unstructured"
    schedule: Union[ScheduleShape, SparsitySchedule] = "cubic"
    begin: float = 0.0
    end: float = 0.6
    rounds: int = 20
    scope: Literal["global", "local"] | None = None
    parameter_names: tuple[str, ...] = ("weight",)
    layer_types: tuple[type[nn.Module], ...] = PrunableLayers
    exclude: tuple[str, ...] | None = None
    dim: int = 0
    norm: float = 2
    zero_batch_norm: bool = True
    group_residuals: bool = True
    removable_only: bool = True
    heads: float = 0.0

    def __post_init__(self) -> None:
        # values this method derived last time (dataclasses.replace passes every field on) are derived again
        if isinstance(self.scope, _DerivedScope):
            object.__setattr__(self, "scope", None)
        if isinstance(self.sparsity, _DerivedSparsity):
            object.__setattr__(self, "sparsity", None if isinstance(self.schedule, SparsitySchedule)
                               else float(self.sparsity))
        python_numbers_(self)
        method = resolve_method(self.method)  # ValueError/TypeError naming the choices
        builtin = next((name for name, cls in PRUNING_METHODS.items() if cls is method), None)
        if builtin is not None:  # torch's names, however spelt or given (class, path): the pipeline compares them
            object.__setattr__(self, "method", builtin)
        elif is_import_path(self.method):  # the class, as LightningCLI gives it where it can import it
            object.__setattr__(self, "method", method)
        if isinstance(self.schedule, SparsitySchedule):
            if self.schedule.unit != "step":
                raise ValueError(f"PruneConfig(schedule=...): the pipeline counts optimizer steps, got a schedule in "
                                 f"{self.schedule.unit!r}s; build it with unit='step'.")
            final = float(self.schedule.final_sparsity)
            if self.sparsity is not None and not math.isclose(self.sparsity, final):
                raise ValueError(f"PruneConfig(sparsity={self.sparsity!r}) disagrees with the schedule's final "
                                 f"sparsity {final}; give one of them.")
            object.__setattr__(self, "sparsity", _DerivedSparsity(final))
        elif self.schedule not in SCHEDULE_SHAPES:
            raise ValueError(f"PruneConfig(schedule={self.schedule!r}): use one of {SCHEDULE_SHAPES} or a "
                             "SparsitySchedule.")
        if self.sparsity is None:
            raise ValueError("PruneConfig(sparsity=None): give the final sparsity, e.g. sparsity=0.9.")
        for flag in ("zero_batch_norm", "group_residuals", "removable_only"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"PruneConfig({flag}={getattr(self, flag)!r}): expected True or False.")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"PruneConfig(sparsity={self.sparsity!r}): expected a fraction in [0, 1), e.g. 0.9.")
        if not (all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (self.begin, self.end))
                and 0.0 <= self.begin < self.end <= 1.0):
            raise ValueError(f"PruneConfig(begin={self.begin!r}, end={self.end!r}): expected fractions of the "
                             "fine-tuning steps with 0 <= begin < end <= 1, e.g. begin=0.0, end=0.6.")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"PruneConfig(rounds={self.rounds!r}): expected an int >= 1.")
        structured = getattr(method, "PRUNING_TYPE", None) == "structured"
        if self.scope is None:
            object.__setattr__(self, "scope", _DerivedScope("local" if structured else "global"))
        if self.scope not in ("global", "local"):
            raise ValueError(f"PruneConfig(scope={self.scope!r}): use 'global' or 'local'.")
        if self.scope == "global" and getattr(method, "PRUNING_TYPE", None) != "unstructured":
            raise ValueError(f"PruneConfig(scope='global'): global pruning ranks single weights and needs an "
                             f"unstructured method, got {method.__name__}; use scope='local'.")
        object.__setattr__(self, "parameter_names", _names("parameter_names", self.parameter_names))
        if not self.parameter_names:
            raise ValueError("PruneConfig(parameter_names=()): name at least one tensor, e.g. ('weight',).")
        if structured and "bias" in self.parameter_names:
            given = repr(self.method) if isinstance(self.method, str) else method.__name__  # (a class: its name)
            raise ValueError(f"PruneConfig(method={given}, parameter_names={self.parameter_names!r}): "
                             "a structured method prunes slices of multidimensional tensors, and a bias has one "
                             "dimension (torch would refuse it at the first round). Leave 'bias' out: shrink "
                             "removes a removed channel's bias with it.")
        layer_types = tuple(self.layer_types) if isinstance(self.layer_types, Sequence) else (self.layer_types,)
        if not layer_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types):
            raise ValueError(f"PruneConfig(layer_types={self.layer_types!r}): expected nn.Module classes, "
                             "e.g. (nn.Linear, nn.Conv2d).")
        object.__setattr__(self, "layer_types", layer_types)
        if self.exclude is not None:
            object.__setattr__(self, "exclude", _names("exclude", self.exclude))
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise ValueError(f"PruneConfig(dim={self.dim!r}): expected an int (0: output channels).")
        if isinstance(self.norm, bool) or not isinstance(self.norm, (int, float)) or not self.norm > 0:
            raise ValueError(f"PruneConfig(norm={self.norm!r}): expected a number > 0 (or math.inf), e.g. 2.")
        if isinstance(self.heads, bool) or not isinstance(self.heads, (int, float)) or not 0.0 <= self.heads < 1.0:
            raise ValueError(f"PruneConfig(heads={self.heads!r}): expected the fraction of each attention's heads "
                             "to prune, in [0, 1), e.g. 0.5.")
        # what the method class alone decides, refused here rather than after compress evaluated the model
        check_takes_amount(method, "PruneConfig")
        check_countable_slices(method, self.method_kwargs(), "PruneConfig")
        missing = sorted(required_kwargs(method) - set(self.method_kwargs()))
        if missing:
            raise TypeError(f"PruneConfig(method={method.__name__}): it needs {', '.join(map(repr, missing))}, which "
                            "PruneConfig cannot pass (it gives a structured method `dim` and `n`, from dim= and "
                            "norm=); give those parameters defaults in a subclass, or prune with "
                            "litcompress.prune_ and compress with prune=None.")

    @property
    def pruning_method(self) -> type[torch_prune.BasePruningMethod]:
        return resolve_method(self.method)

    @property
    def structured(self) -> bool:
        return getattr(self.pruning_method, "PRUNING_TYPE", None) == "structured"

    def method_kwargs(self) -> dict[str, object]:
        """Keyword arguments for the pruning method: those of ``dim`` and ``n`` (the norm) it takes
        (``random_structured`` takes no norm, and the gradual pruner refuses what its method does not take)."""
        if not self.structured:
            return {}
        return accepted_kwargs(self.pruning_method, {"dim": self.dim, "n": self.norm}, via_apply=True)

    def step_schedule(self, total_steps: int) -> SparsitySchedule:
        """The schedule over ``total_steps`` fine-tuning steps (``self.schedule`` when it is one already)."""
        if isinstance(self.schedule, SparsitySchedule):
            return self.schedule
        assert self.sparsity is not None
        if self.schedule == "oneshot" or total_steps < 2:
            return PolynomialDecay(final_sparsity=self.sparsity, initial_sparsity=self.sparsity, begin=0, end=1)
        begin = min(round(self.begin * total_steps), total_steps - 1)
        end = max(round(self.end * total_steps), begin + 1)
        shape = PolynomialDecay if self.schedule == "cubic" else LinearSchedule
        return shape(final_sparsity=self.sparsity, begin=begin, end=end, rounds=self.rounds)

    def describe(self, scheduled: bool = True) -> str:
        """Method, scope and sparsity, and with `scheduled` the schedule's shape (a one-shot run follows none)."""
        method = self.method if isinstance(self.method, str) else self.pruning_method.__name__
        shape = type(self.schedule).__name__ if isinstance(self.schedule, SparsitySchedule) else self.schedule
        heads = f" and {self.heads:.0%} of the attention heads" if self.heads else ""
        return f"{method} {self.scope} to {self.sparsity:.1%}{heads}" + (f" ({shape})" if scheduled else "")

    def heads_at(self, sparsity: float) -> float:
        """The fraction of heads pruned when the schedule is at `sparsity`: ``heads`` in proportion (all of it at
        once when ``sparsity`` is 0, where the schedule has no progress to follow)."""
        assert self.sparsity is not None
        return self.heads * min(1.0, sparsity / self.sparsity) if self.sparsity > 0 else self.heads


def _names(argument: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, (str, Iterable)):  # exclude=3 failed in tuple() with "'int' object is not iterable"
        raise TypeError(f"PruneConfig({argument}={value!r}): expected a name or a list of names (non-empty strings).")
    names = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"PruneConfig({argument}={value!r}): expected names (non-empty strings).")
    return names


@dataclass(frozen=True)
class CompressionConfig:
    """The pipeline: prune (optionally while fine-tuning) -> shrink -> quantize -> export, each stage optional.

    Args:
        prune: what to prune, or None to skip pruning (a model pruned earlier is still shrunk).
        shrink: physically remove all-zero channels (:func:`litcompress.shrink`).
        quantize: post-training quantization (:func:`litcompress.quantization.quantize`), or None.
        export: write the final model as one file (ONNX, TorchScript or ``torch.export``) into the output
            directory and measure it as read back from disk.
        fp32_format: the file format of an unquantized final model. ``"auto"``: each of ONNX (when onnx and
            onnxruntime are installed; the file runs in ONNX Runtime) and ``torch.export`` is written, read back and
            timed, and the faster one is kept (one that fails to export is skipped, and said; when both fail,
            TorchScript is written, which keeps an LSTM fed packed sequences). Or one format:
            ``"onnx"`` (``model.onnx``), ``"export"`` (``model.pt2``) or ``"torchscript"`` (``model.pt``,
            deprecated by torch). A quantized model keeps its backend's format.
        latency_repeats: interleaved timed calls per stage for the report (medians reported).
        num_threads: torch threads while timing (None: torch's current setting, recorded in the report).
        sparse_kernels: after shrink, run the Linear layers left mostly zeros by unstructured pruning on sparse CSR
            kernels where that is measured faster here (:func:`litcompress.pruning.sparsify`: each layer timed on
            the example batch, dense against CSR), as a ``sparse`` stage. An alternative to int8 (give
            ``quantize=None``); the file is TorchScript (ONNX and ``torch.export`` files cannot hold sparse
            tensors).
        dynamic_dims: without quantization, the input dims besides the batch dim that the fp32 file leaves free
            (``{0: 1}``: input 0's dim 1, a sequence length), as ``PTQConfig(dynamic_dims=...)`` does for an int8
            file; None: those that vary in the batches seen.
        keep_multiple_of: the channels each layer (or residual group) keeps, after structured pruning and after
            shrink, are rounded up to a multiple of this (a few fewer are pruned or removed): CPU kernels run faster
            on channel counts that fill their SIMD blocks, depthwise convolutions most (16 on AVX-512, 8 on AVX2;
            ``benchmarks/channel_multiples.py``). None: the sparsity exactly, every removable channel removed.
    """

    prune: PruneConfig | None = None
    shrink: bool = True
    quantize: PTQConfig | None = None
    export: bool = True
    fp32_format: Literal["auto", "onnx", "export", "torchscript"] = "auto"
    latency_repeats: int = 30
    num_threads: int | None = None
    keep_multiple_of: int | None = None
    sparse_kernels: bool = False
    dynamic_dims: DynamicDims | Mapping[int, int | Sequence[int]] | None = None

    def __post_init__(self) -> None:
        python_numbers_(self)
        object.__setattr__(self, "dynamic_dims", normalize_dynamic_dims(self.dynamic_dims, "CompressionConfig"))
        if self.dynamic_dims and self.quantize is not None:
            raise ValueError("CompressionConfig(dynamic_dims=..., quantize=PTQConfig(...)): the dims an unquantized "
                             "file leaves free; a quantized one's are PTQConfig(dynamic_dims=...): give them there.")
        if self.prune is not None and not isinstance(self.prune, PruneConfig):
            raise TypeError(f"CompressionConfig(prune={self.prune!r}): expected a PruneConfig or None.")
        if self.quantize is not None and not isinstance(self.quantize, PTQConfig):
            raise TypeError(f"CompressionConfig(quantize={self.quantize!r}): expected a PTQConfig or None.")
        for flag in ("shrink", "export", "sparse_kernels"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"CompressionConfig({flag}={getattr(self, flag)!r}): expected True or False.")
        if self.sparse_kernels and self.quantize is not None:
            raise ValueError("CompressionConfig(sparse_kernels=True, quantize=...): sparse fp32 kernels and int8 "
                             "dense kernels are alternatives; give quantize=None, or run the pipeline once with each "
                             "and compare their reports.")
        if self.sparse_kernels and self.shrink and self.prune is not None and self.prune.structured:
            # it ran the whole fine-tuning to say, after shrink, that no layer was sparse enough to time
            method = self.prune.method if isinstance(self.prune.method, str) else self.prune.method.__name__
            raise ValueError(f"CompressionConfig(sparse_kernels=True) with PruneConfig(method={method!r}): shrink "
                             "removes the slices a structured method zeroes, so no layer is left sparse for the "
                             "sparse kernels; prune unstructured (method='l1_unstructured') for them, or keep "
                             "the smaller dense layers without sparse kernels.")
        if self.sparse_kernels and self.fp32_format in ("onnx", "export"):
            raise ValueError(f"CompressionConfig(sparse_kernels=True, fp32_format={self.fp32_format!r}): "
                             f"{self.fp32_format} files cannot hold sparse tensors; use fp32_format='auto' or "
                             "'torchscript'.")
        if self.fp32_format != "auto" and self.fp32_format not in FP32_FORMATS:
            raise ValueError(f"CompressionConfig(fp32_format={self.fp32_format!r}): use 'auto' or one of "
                             f"{FP32_FORMATS}.")
        if isinstance(self.latency_repeats, bool) or not isinstance(self.latency_repeats, int) \
                or self.latency_repeats < 1:
            raise ValueError(f"CompressionConfig(latency_repeats={self.latency_repeats!r}): expected an int >= 1.")
        if self.num_threads is not None and (isinstance(self.num_threads, bool)
                                             or not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ValueError(f"CompressionConfig(num_threads={self.num_threads!r}): expected an int >= 1 or None.")
        if self.keep_multiple_of is not None and (isinstance(self.keep_multiple_of, bool) or not isinstance(
                self.keep_multiple_of, int) or self.keep_multiple_of < 1):
            raise ValueError(f"CompressionConfig(keep_multiple_of={self.keep_multiple_of!r}): expected an int >= 1 "
                             "(e.g. 16) or None.")


__all__ = ["CompressionConfig", "PruneConfig", "PrunableLayers", "RecurrentLayers", "tensor_names"]
