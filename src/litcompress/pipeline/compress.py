"""One call from a trained model to a compressed file: prune -> shrink -> quantize -> export, with a report.

Framework-free: the model is any ``nn.Module``, accuracy comes from ``eval_fn(model) -> float`` and fine-tuning, if
any, from ``fine_tune(model, step)``, a training loop that calls ``step(t)`` after its t-th optimizer step.
:mod:`litcompress.pipeline.lightning` supplies all three from a LightningModule and a DataModule.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import logging
import numbers
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from litcompress._files import (cannot_write, folders_in_the_way, partial_path, what_is_in_the_way,
                                written_atomically)
from litcompress.pruning.engine import (ATTENTION_PROJECTIONS, Target, check_lazy_layers_called, close_names,
                                        compiled_module_names, deepcopy_model, distinct_targets, eager_copy, eager_name,
                                        effective_tensor, is_compiled, is_excluded, is_pruned,
                                        keep_bypassed_weights_current_, make_permanent_, outside_inference_mode,
                                        permanent_state_dict, prune_to_sparsity_, pruned_count, pruned_targets,
                                        qualified_names,
                                        trainable_tensor, with_tied_targets)
from litcompress.pruning.gradual import GradualPruner
from litcompress.pruning.groups import BatchNormZeroer, ChannelGroup, prune_groups_
from litcompress.pruning.heads import (heads_multiple, heads_to_prune, none_pruned_message, prunable_attentions,
                                       prune_heads_)
from litcompress.pruning.methods import check_method_kwargs
from litcompress.pruning.parametrizations import (fold_parametrizations_, is_scripted, parametrized_tensors,
                                                  tied_folded_tensors, unfold_state_dict)
from litcompress.pruning.recurrent import RECURRENT_LAYERS, prune_units_, units_why_not
from litcompress.pruning.narrow import keyed_as_compiled_parts
from litcompress.pruning.schedules import block_multiple, check_channel_multiple, structured_pruned_count
from litcompress.pruning.shrink import (_TRANSPOSED, MODEL_OUTPUT_REASON, ChannelPlan, ShrinkReport, ShrinkResult,
                                        _out_channels, channel_plan, eval_outputs, is_depthwise, max_output_difference,
                                        shrink)
from litcompress.pruning.sparse import SparseLinear, sparsify
from litcompress.quantization.artifact import (FP32_FORMATS, FP32_SUFFIXES, Fp32FormatError, bfloat16_tensors,
                                              load_quantized, save_quantized, taking_inputs_like)
from litcompress.quantization.backends import BackendUnavailableError, get_backend, is_transposed_linear
from litcompress.quantization.config import Recipe
from litcompress.quantization.latency import measure_latencies, pinned_threads
from litcompress.quantization.nested import batch_size
from litcompress.quantization.shapes import DynamicDims, resolve_dynamic_dims
from litcompress.quantization.tracing import guards_an_error as _guards_an_error
from litcompress.quantization.tuner import (UNUSED_MODEL_MESSAGE, QuantizationResult, batch_inputs, call_keeping_modes,
                                            check_calibration_batches, check_calibration_data,
                                            check_declared_dims_vary, check_metric, check_model_on_cpu,
                                            check_model_runs, default_input_fn, evaluate_noting_use,
                                            example_as_inputs, metric_fn_name, model_input_fn, quantize,
                                            warn_time_major_inputs, warn_unused_model)
from litcompress.report.compression import CompressionReport, Latency, StageMetrics
from litcompress.report.size import compressed_size_bytes, serialized_weights
from litcompress.report.sparsity import SparsityReport, plain_values, sparsity_report

from .config import CompressionConfig, PrunableLayers, PruneConfig, RecurrentLayers, tensor_names

logger = logging.getLogger("litcompress.pipeline")

EvalFn = Callable[[nn.Module], float]
FineTuneFn = Callable[[nn.Module, Callable[[int], None]], None]

PRUNED_STATE_FILE = "pruned_state_dict.pt"
SHRUNK_STATE_FILE = "shrunk_state_dict.pt"
# every file `compress` may write into its output directory (the model's suffix is its format's: the quantized
# backends' files are .pt, .pt2 and .onnx too)
OUTPUT_FILES = (PRUNED_STATE_FILE, SHRUNK_STATE_FILE, *sorted(f"model{suffix}" for suffix in {*FP32_SUFFIXES.values()}))
REPORT_FILES = ("report.json", "report.md", "report.png")  # what CompressionReport.save writes beside them
SLOWER = 1.1  # a quantized model this much slower than the fp32 one it came from is said not to pay off (not noise)


def report_files(plot: bool | None) -> tuple[str, ...]:
    """What ``CompressionReport.save(directory, plot=plot)`` writes: the plot where asked, or matplotlib is there."""
    plots = plot is True or (plot is None and importlib.util.find_spec("matplotlib") is not None)
    return REPORT_FILES if plots else tuple(name for name in REPORT_FILES if not name.endswith(".png"))


@dataclass
class CompressionResult:
    """The compressed model, every stage's model, and the report.

    ``model`` is the last stage's model in memory (quantized, else shrunk, else pruned, else a copy of the input);
    ``artifact`` is the exported file (None without ``output_dir`` or with ``export=False``); ``stage_models`` holds
    each stage's model as measured in the report (the last one read back from ``artifact`` when exported);
    ``state_files`` the state-dict files this run wrote into ``output_dir`` (``pruned_state_dict.pt``, and
    ``shrunk_state_dict.pt`` when channels were removed).
    """

    model: nn.Module
    report: CompressionReport
    stage_models: dict[str, nn.Module]
    artifact: Path | None = None
    sparsity: SparsityReport | None = None
    shrink: ShrinkReport | None = None
    quantization: QuantizationResult | None = None
    state_files: tuple[Path, ...] = ()


def prune_targets(model: nn.Module, config: PruneConfig, example_inputs: tuple | None = None) -> list[Target]:
    """The ``(module, name)`` pairs `config` prunes in `model`, in module order (with `example_inputs`, as
    :func:`compress` given them selects them). Like :func:`compress`, which prunes a copy with its parametrized
    weights folded (``weight_norm``), it selects them on such a copy; the pairs name `model`'s modules."""
    work, _ = as_pruned(model)
    plan = _traced_plan(work, example_inputs) if _filters_removable(config) else None
    targets = _select_targets(work, config, plan)[0]
    if work is model:
        return targets
    # `model`'s modules by the copy's names: a compiled part's eager module (`net._orig_mod.0`) is the copy's `net.0`
    modules = {}
    for name, module in model.named_modules():
        if not is_compiled(module):
            modules.setdefault(eager_name(name), module)
    names = {id(m): name for name, m in work.named_modules()}
    return [(modules[names[id(module)]], name) for module, name in targets]


def check_keep_multiple_of_prunes(model: nn.Module, config: PruneConfig, keep_multiple_of: int,
                                  example_inputs: tuple | None = None) -> None:
    """ValueError, as :func:`compress` would raise it before pruning, when `keep_multiple_of` leaves every layer
    `config` prunes all its channels (structured methods), or rounds its heads fraction to no head (any method: the
    heads are removed whatever prunes beside them). The plan is made on a copy of `model`."""
    _Pruning.plan(as_pruned(deepcopy_model(model))[0], config, keep_multiple_of if config.structured else None,
                  lambda _: None, example_inputs, heads_keep_multiple_of=keep_multiple_of)


def as_pruned(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """`model` as :func:`compress` prunes it, to read without changing it: `model` itself, or, when it has
    parametrized weights (``weight_norm``) or ``torch.compile``'d parts, a deep copy with them folded into plain ones
    and its compiled parts' eager modules (which torch.fx traces); and the folded tensors."""
    if not parametrized_tensors(model) and not compiled_module_names(model):
        return model, []
    work = eager_copy(model)
    return work, fold_parametrizations_(work)


def _eager_name(name: str, names: Sequence[str]) -> str:
    """`name` as the module is named in the copy the pipeline prunes (`names`): a compiled part's eager module,
    ``body._orig_mod.0`` in ``model.named_modules()``, is ``body.0`` there; a name the copy has is kept."""
    eager = eager_name(name)
    return eager if name not in names and eager and eager in names else name


def _traced_plan(model: nn.Module, example_inputs: tuple | None = None) -> ChannelPlan | None:
    """`model`'s channel plan, or None when torch.fx cannot trace it (shrink will say why). The example inputs'
    ranks let more chains through, as shrink sees them."""
    try:
        return channel_plan(model, example_inputs=example_inputs)
    except ValueError:
        return None


def _filters_removable(config: PruneConfig) -> bool:
    return config.structured and config.dim == 0 and config.removable_only


def _method_name(config: PruneConfig) -> str:
    """The method as the config was given it: a torch.nn.utils.prune function's name, or a class's name."""
    return config.method if isinstance(config.method, str) else config.method.__name__


def _check_heads(model: nn.Module, config: PruneConfig, exclude: tuple[str, ...], *, warn: bool = True,
                 keep_multiple_of: int | None = None) -> None:
    """Refuse a ``heads`` fraction with no attention to prune or that rounds to no head in every attention (each
    prunes ``round(heads * num_heads)``, fewer where `keep_multiple_of` asks: 0.2 of 2 heads pruned none, and the
    report said 20%); say it in some."""
    if not config.heads:
        return
    attentions = prunable_attentions(model, exclude)
    if not attentions:
        raise ValueError(f"PruneConfig(heads={config.heads}): the model has no nn.MultiheadAttention whose heads can "
                         "be pruned (outside those excluded); prune no heads.")
    modules = dict(model.named_modules())
    steps = {name: heads_multiple(keep_multiple_of, modules[name].head_dim) for name in attentions}
    none = {name: modules[name].num_heads for name in attentions
            if heads_to_prune(modules[name].num_heads, config.heads, steps[name]) == 0}
    if none:
        counts = {name: functools.partial(heads_to_prune, heads_multiple=steps[name]) for name in none}
        message = none_pruned_message(f"PruneConfig(heads={config.heads:g})", config.heads,
                                      "of each attention's heads", none, counts, keep_multiple_of)
        if len(none) == len(attentions):
            raise ValueError(message + " No head would be pruned.")
        if warn:
            warnings.warn(message + " Those keep all theirs.", UserWarning, stacklevel=4)


def _select_targets(model: nn.Module, config: PruneConfig, plan: ChannelPlan | None, *,
                    heads_keep_multiple_of: int | None = None) -> tuple[list[Target], dict[str, str], list[str]]:
    """`prune_targets`, the layers `removable_only` left out with the reason shrink could not remove their
    channels (none without a `plan`), and the recurrent layers whose hidden units structured pruning prunes."""
    # GPT-2's Conv1D layers (Linear with the weight stored transposed) count as Linear for unstructured pruning;
    # structured pruning would take their input features for channels, and shrink does not narrow them
    transposed_linear = not config.structured and nn.Linear in config.layer_types
    layers = [(name, m) for name, m in model.named_modules()
              if (isinstance(m, config.layer_types) or transposed_linear and is_transposed_linear(m))
              # depthwise convs follow the layer before them; a recurrent layer's rows are gates, not channels
              and not (config.structured and (is_depthwise(m) or isinstance(m, RecurrentLayers)))]
    exclude = config.exclude
    if exclude is None:  # the layer whose outputs are the model's (a classifier's rows), of whatever type is pruned
        # the trace says which it is; without one, the last registered (a head defined first in __init__, before
        # its body, would leave the body's last layer unpruned for it)
        outputs = [name for name, reason in (plan.reasons.items() if plan is not None else ())
                   if reason == MODEL_OUTPUT_REASON]
        last = [name for name, m in model.named_modules() if isinstance(m, (*PrunableLayers, *config.layer_types))
                and not (config.structured and (is_depthwise(m) or isinstance(m, RecurrentLayers)))]
        exclude = (tuple(outputs) or tuple(last[-1:])) if config.structured else ()
    names = [name for name, _ in model.named_modules()]
    exclude = tuple(_eager_name(name, names) for name in exclude)
    unknown = sorted(set(exclude) - set(names))
    if unknown:
        listed = [name for name, _ in layers]
        raise ValueError(f"PruneConfig(exclude=...) names no module of the model: {unknown}"
                         f"{close_names(unknown, names)}; the layers it would prune are "
                         f"{', '.join(listed[:12])}{' ...' if len(listed) > 12 else ''} (names as "
                         "model.named_modules() gives them).")
    layers = [(name, m) for name, m in layers if not is_excluded(name, exclude)]  # a container: all inside it
    # structured pruning of output channels prunes a recurrent layer's hidden units (prune_units_), which shrink removes
    recurrent = [name for name, m in model.named_modules() if config.structured and config.dim == 0
                 and isinstance(m, config.layer_types) and isinstance(m, RECURRENT_LAYERS)
                 and not is_excluded(name, exclude)]
    modules = dict(model.named_modules())
    units = [name for name in recurrent if units_why_not(modules[name]) is None]
    # (compress said it before its first stage; preview_shrink and `litcompress channels` come here only)
    _check_heads(model, config, exclude, warn=False, keep_multiple_of=heads_keep_multiple_of)
    left_out: dict[str, str] = {}
    if _filters_removable(config) and plan is None:
        # Without a trace shrink removes nothing, and every layer pruned by channel would only lose accuracy (a
        # GPT's attention outputs and MLP projections write the residual stream: half of it gone).
        try:
            channel_plan(model)
            failure = "it could not be traced"
        except ValueError as error:
            failure = str(error)
        raise ValueError(
            f"PruneConfig(method={_method_name(config)!r}): structured pruning prunes the channels that "
            f"shrink can remove (removable_only=True), and shrink needs the model traced by torch.fx: {failure}. "
            "Make forward traceable, or compress the traceable sub-module that holds the layers "
            "(compress_lightning(submodule=...), CLI --submodule); removable_only=False masks the channels anyway "
            "(nothing gets smaller), or prune unstructured.")
    if _filters_removable(config) and plan is not None:
        removable = plan.removable(residual_groups=_groups_residuals(config))
        left_out = {name: removable.get(name, "it is no Linear or Conv") for name, _ in layers
                    if removable.get(name, "") is not None}
        left_out.update({name: reason for name in recurrent
                         if (reason := plan.units.get(name, units_why_not(modules[name]))) is not None})
        units = [name for name in units if name not in left_out]
        if len(left_out) == len(layers) + len(recurrent) and left_out:
            grouped = {name for group in plan.groups if group.prunable for name in group.producers} & set(left_out)
            remedy = (f"PruneConfig(group_residuals=True, zero_batch_norm=True) prunes {', '.join(sorted(grouped))} "
                      "as channel groups, which shrink removes; or pass" if grouped else "Pass")
            raise ValueError(
                f"PruneConfig(method={_method_name(config)!r}): shrink can remove the channels of none "
                f"of the layers to prune, so structured pruning would cost accuracy and save nothing: "
                f"{'; '.join(f'{n}: {r}' for n, r in left_out.items())}. {remedy} removable_only=False to mask "
                "them anyway, or prune unstructured.")
        layers = [(name, m) for name, m in layers if name not in left_out]
    targets = [(m, t) for name, m in layers for p in config.parameter_names for t in tensor_names(m, p)]
    if not targets and not units:
        # exclude given, or the layers making the model's outputs (left out by default: their widths are its interface)
        outside = f"outside exclude={list(exclude)}" if config.exclude is not None else (
            f"besides {', '.join(exclude)}, which make(s) the model's outputs (their widths are its interface)"
            if exclude else "")
        raise ValueError(f"nothing to prune: no {[t.__name__ for t in config.layer_types]} layer with a "
                         f"{list(config.parameter_names)} tensor{' ' + outside if outside else ''}.")
    # tied weights: the other modules holding a pruned tensor (an embedding tied to the output layer) are masked too
    return with_tied_targets(model, targets), left_out, units


def _note_dense_matrices(model: nn.Module, prune: PruneConfig, targets: Sequence[Target],
                         note: Callable[[str], None]) -> None:
    """Note the weight matrices unstructured pruning leaves dense outside its layer types, as ModelPruning and the IMP
    driver warn of theirs: attentions' input projections (not named "weight"; with `heads`, those of the attentions
    whose heads cannot be pruned) and embeddings (not in the default layer types), unless `exclude` names them; with
    the share of the model's weights they hold, and what prunes them."""
    exclude = tuple(prune.exclude or ())
    targeted = {(id(m), n) for m, n in targets}
    modules = dict(model.named_modules())
    by_heads = {name for name in prunable_attentions(model, exclude) if modules[name].num_heads > 1}
    embeddings: dict[int, tuple[str, int]] = {}  # by tensor: a tied one is one matrix
    attentions: dict[int, tuple[str, int]] = {}
    for path, module in model.named_modules():
        if is_excluded(path, exclude):
            continue
        if isinstance(module, nn.MultiheadAttention) and not (prune.heads and path in by_heads):
            for n in ATTENTION_PROJECTIONS:
                tensor = getattr(module, n, None)
                if isinstance(tensor, torch.Tensor) and (id(module), n) not in targeted:
                    attentions.setdefault(id(tensor), (f"{path}.{n}" if path else n, tensor.numel()))
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and (id(module), "weight") not in targeted:
            embeddings.setdefault(id(module.weight), (f"{path}.weight" if path else "weight", module.weight.numel()))
    dense = list(embeddings.values()) + list(attentions.values())
    if not dense:
        return
    total = sum(p.numel() for p in model.parameters())
    held = sum(count for _, count in dense)
    names = [name for name, _ in dense]
    remedies = ["the embeddings when nn.Embedding and nn.EmbeddingBag are among PruneConfig(layer_types=...) (from "
                "Python: the CLI's --prune-embeddings takes structured methods)"] if embeddings else []
    heads = [name for name, _ in attentions.values() if name.rpartition(".")[0] in by_heads]
    if attentions:  # (heads only where they can be pruned: not with kdim/vdim, add_bias_kv, add_zero_attn, one head)
        remedies.append("the attentions' projections with nn.MultiheadAttention among the layer_types and their names "
                        "(in_proj_weight, or q/k/v_proj_weight) in PruneConfig(parameter_names=...) (from Python)" + (
                            ", or by heads, PruneConfig(heads=...) (CLI --prune-heads), where heads can be pruned"
                            if heads else ""))
    note(f"unstructured pruning leaves {len(names)} weight matri{'x' if len(names) == 1 else 'ces'} outside its layer "
         f"types dense ({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}: {held:,} of the model's {total:,} "
         f"parameters, {held / max(total, 1):.0%}); the pipeline prunes {' and '.join(remedies)}.")


def _by_output_dim(model: nn.Module, targets: Sequence[Target], prune: PruneConfig,
                   plan: ChannelPlan | None) -> list[tuple[list[Target], dict[str, Any]]]:
    """The targets with the method's keyword arguments, in sets pruned alike: structured pruning of output channels
    (dim 0) prunes a transposed conv along dim 1, where its output channels are (an embedding too: its dims), and
    the channels of grouped convs (and of the layers grouped convs read) evenly over their groups
    (``slice_groups``), which shrink can then remove.
    Unstructured pruning keeps one set (a global threshold spans all of them); an empty set is left out."""
    kwargs = prune.method_kwargs()
    if not (prune.structured and prune.dim == 0):
        return [(list(targets), kwargs)] if targets else []
    # a transposed conv's output channels and an embedding's dims are its weight's columns
    transposed = [t for t in targets if isinstance(t[0], (*_TRANSPOSED, nn.Embedding, nn.EmbeddingBag))]
    regular = [t for t in targets if t not in transposed]
    names = {id(m): name for name, m in model.named_modules()}
    sets = []
    for subset, subset_kwargs in ((regular, kwargs), (transposed, {**kwargs, "dim": 1})):
        # (a transposed conv read by a grouped conv too: its output channels, in dim 1, in equal blocks)
        even = {t: plan.slice_groups[names[id(t[0])]] for t in subset if plan is not None
                and names.get(id(t[0])) in plan.slice_groups}
        if subset:
            sets.append((subset, {**subset_kwargs, "slice_groups": even} if even else subset_kwargs))
    return sets


def _weights(model: nn.Module) -> list[torch.Tensor]:
    """`model`'s weights, pruned or not (a pruned one's original is the parameter object torch's pruning
    re-registered), frozen or not (a loop may unfreeze them): no bias nor BatchNorm parameter, which the pipeline
    may write zeros into between steps."""
    found: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if "bias" not in name:
                found.setdefault(id(parameter), parameter)
    return list(found.values())


def _fingerprints(tensors: Sequence[torch.Tensor]) -> list[tuple[float, float]]:
    """Sums of each tensor's values and squares, in float64: a training step changes them (a copy of every weight
    would double the model's memory)."""
    with torch.no_grad():
        return [(float(t.double().sum()), float(t.double().square().sum())) for t in tensors]


def _groups_residuals(prune: PruneConfig) -> bool:
    """Whether `prune` prunes the layers joined by residual additions or gating products as one group (while
    fine-tuning)."""
    return prune.group_residuals and prune.zero_batch_norm and prune.method == "ln_structured" and prune.dim == 0


#: an attention's input projections, held as its own tensors (out_proj is a Linear)
def weight_sparsity(model: nn.Module, *, embeddings: bool = False, attentions: bool = False,
                    layer_types: tuple[type[nn.Module], ...] = ()) -> float | None:
    """Zeros among the weights of Linear/Conv/recurrent layers, GPT-2's Conv1D too, of `layer_types` (a run's
    layers of one's own), and with `embeddings` and `attentions` (a run that prunes them) embeddings' and
    attentions' input projections (None when the model has none, e.g. ONNX Runtime)."""
    targets = [(m, t) for m in model.modules()
               if isinstance(m, (*PrunableLayers, *layer_types)) or is_transposed_linear(m)
               for t in tensor_names(m, "weight")]
    if embeddings:
        targets += [(m, "weight") for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    if attentions:
        targets += [(m, t) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
                    for t in ATTENTION_PROJECTIONS if isinstance(getattr(m, t, None), torch.Tensor)]
    return sparsity_report(model, targets).sparsity if targets else None


class _Stages:
    """Each stage's model and measurements. The validation and test metrics are taken when a stage is added (a
    metric that cannot be had fails at its stage, before any later work; the input's test metric in
    :meth:`test_first`); latency, report-only, once for the stages kept, in :meth:`report_rows`."""

    def __init__(self, eval_fn: EvalFn, test_fn: EvalFn | None, prune: PruneConfig | None = None) -> None:
        self.eval_fn, self.test_fn = eval_fn, test_fn
        # the sparsity column counts the weights the run prunes, in every stage alike
        self.counted_weights = {"embeddings": prune is not None and any(
            issubclass(t, (nn.Embedding, nn.EmbeddingBag)) for t in prune.layer_types),
            "attentions": prune is not None and prune.heads > 0,
            # (a layer class of one's own the run prunes: the column left it out, and said "-" of a pruned model)
            "layer_types": () if prune is None else tuple(
                t for t in prune.layer_types if not issubclass(t, (*PrunableLayers, nn.Embedding, nn.EmbeddingBag)))}
        self.model_unused = False  # the first evaluation returned without running the model it was given
        self.models: dict[str, nn.Module] = {}
        self.rows: list[StageMetrics] = []

    def add(self, stage: str, model: nn.Module, description: str, seconds: float, *, metric: float | None = None,
            file: Path | None = None, counted: nn.Module | None = None) -> StageMetrics:
        """`file`: the stage's bytes on disk (else its serialized weights); `counted`: the model whose parameters
        are counted (a file read back into ONNX Runtime has none of its own)."""
        model.eval()
        if metric is None:
            with torch.no_grad():
                if self.rows:  # (eval mode kept: an eval_fn ending in model.train() left the stage timed so)
                    value = call_keeping_modes(self.eval_fn, model)
                else:  # the first evaluation tells whether eval_fn runs the model it is given at all
                    value, ran = evaluate_noting_use(self.eval_fn, model)
                    self.model_unused = not ran
            metric = check_metric(value, f"stage {stage!r}", metric_fn_name("eval_fn", self.eval_fn))
        counted = model if counted is None else counted
        shipped = model
        # a model given with live masks or parametrizations (weight_norm, a torch.ao.pruning sparsifier's mask):
        # sized and counted as it would ship, its weights plain (counting a parametrization's originals said
        # "0 zeros" of a masked weight, and its mask buffer went into the size)
        if pruned_targets(model) or parametrized_tensors(model):
            shipped = deepcopy_model(model)
            fold_parametrizations_(shipped)
            make_permanent_(shipped, owner="compress")
            counted = shipped if counted is model else counted
        data = file.read_bytes() if file is not None else serialized_weights(shipped)
        parameters = list(counted.parameters())
        row = StageMetrics(
            stage=stage, description=description, metric=metric,
            parameters=sum(p.numel() for p in parameters) if parameters else None,
            nonzero_parameters=(sum(int(torch.count_nonzero(plain_values(p))) for p in parameters)
                                if parameters else None),
            weight_sparsity=weight_sparsity(counted, **self.counted_weights), size_bytes=len(data),
            gzip_bytes=compressed_size_bytes(data),
            seconds=seconds,
        )
        if self.test_fn is not None and self.rows:  # (the first stage's: test_first)
            # tested now, not when the report is built: a test metric that cannot be had (NaN) failed only after
            # every later stage had run
            row = dataclasses.replace(row, test_metric=self._test(stage, shipped))
        self.models[stage] = shipped  # timed and tested as it would ship (the masks' hooks cost time, not accuracy)
        self.rows.append(row)
        logger.info("%s: metric=%.6g (%s)", stage, metric, description)
        return row

    def _test(self, stage: str, model: nn.Module) -> float:
        with torch.no_grad():
            return check_metric(call_keeping_modes(self.test_fn, model), f"stage {stage!r}",
                                metric_fn_name("test_fn", self.test_fn))

    def test_first(self) -> None:
        """The first stage's test metric now: a test step that cannot judge a model fails before any work."""
        if self.test_fn is not None and self.rows:
            row = self.rows[0]
            self.rows[0] = dataclasses.replace(row, test_metric=self._test(row.stage, self.models[row.stage]))

    def pop(self) -> StageMetrics:
        row = self.rows.pop()
        del self.models[row.stage]
        return row

    def report_rows(self, inputs: tuple, config: CompressionConfig) -> tuple[StageMetrics, ...]:
        """The rows with their latency, all stages timed interleaved in one run."""
        models = [self.models[row.stage] for row in self.rows]
        measured = measure_latencies(models, inputs, config.latency_repeats, num_threads=config.num_threads)
        return tuple(dataclasses.replace(row, latency=Latency(m["min"] * 1e3, m["median"] * 1e3, m["max"] * 1e3))
                     for row, m in zip(self.rows, measured))


@dataclass
class _WrittenFile:
    """One exported candidate: its file (still under its partial name) read back, and the export's warnings."""

    name: str  # the file name it gets when kept
    partial: Path
    loaded: nn.Module
    caught: list[warnings.WarningMessage]


def _first_batches(data: Iterable | None, input_fn: Callable[[object], tuple], limit: int) -> list[tuple]:
    """Up to `limit` batches of `data` as positional inputs; none from a one-shot iterator (reading it would use it
    up) or a batch the input function cannot take."""
    if data is None or iter(data) is data:
        return []
    batches = []
    try:
        for batch in itertools.islice(data, limit):
            batches.append(batch_inputs(input_fn, batch))
    except Exception:  # a dims guess is not worth an error; quantization reports bad batches itself
        return batches
    return batches


def _fp32_formats(requested: str, model: nn.Module) -> list[str]:
    """The formats to write an unquantized model in: `requested`, or for "auto" ONNX (if installed) and export
    (TorchScript alone for a model on sparse kernels, which only it can hold)."""
    if requested != "auto":
        return [requested]
    if any(isinstance(module, SparseLinear) for module in model.modules()):
        return ["torchscript"]
    if any(type(module).__name__ == "OnnxRuntimeModule" for module in model.modules()):
        return ["onnx"]  # a model read from an ONNX file: only ONNX holds its session (save_quantized says so)
    if bfloat16_tensors(model):  # ONNX Runtime's CPU kernels take no bfloat16: its session could not be built
        return ["export"]
    try:
        get_backend("onnxruntime").check_available()
    except BackendUnavailableError:
        return ["export"]
    return ["onnx", "export"]


def _write_and_read_back(model: nn.Module, recipe: Recipe | None, fp32_format: str | None, directory: Path,
                         inputs: tuple, num_threads: int | None, dynamic_dims: DynamicDims | None) -> _WrittenFile:
    """Save `model` beside its final name (under a unique name: :func:`partial_path`) and load it back; the partial
    file is removed if either step fails. `fp32_format` is None for a quantized model (its backend's format)."""
    suffix = get_backend(recipe.backend).artifact_suffix if recipe else FP32_SUFFIXES[fp32_format]
    partial = partial_path(directory / f"model{suffix}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            save_quantized(model, recipe, partial, inputs, fp32_format=fp32_format or "export",
                           dynamic_dims=dynamic_dims)
        with pinned_threads(num_threads):  # an ONNX Runtime session takes torch's thread count
            loaded, _ = load_quantized(partial)
        loaded = taking_inputs_like(loaded, model, inputs)  # judged on the same inputs as the model
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return _WrittenFile(f"model{suffix}", partial, loaded, list(caught))


def _traced_data_dependent_code(caught: warnings.WarningMessage) -> bool:
    return issubclass(caught.category, torch.jit.TracerWarning) and not _guards_an_error(caught)


def _first_line(error: BaseException) -> str:
    if isinstance(error, Fp32FormatError) and error.__cause__ is not None:  # the exporter's words: the format is named
        error = error.__cause__  # in the note, and the formats left are tried next
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def _sparse_file_failure(model: nn.Module, inputs: tuple) -> str | None:
    """Why `model`, on CSR kernels, cannot be written as TorchScript (the one format that holds them), tried in a
    temporary folder; None when it can."""
    with tempfile.TemporaryDirectory(prefix="litcompress_sparse_") as folder:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (the export proper says what its trace says)
                save_quantized(model, None, os.path.join(folder, "model.pt"), inputs, fp32_format="torchscript")
        except Exception as error:
            return _first_line(error)
    return None


def _export(model: nn.Module, recipe: Recipe | None, config: CompressionConfig, directory: Path, inputs: tuple,
            stages: _Stages, note: Callable[[str], None], counted: nn.Module,
            dynamic_dims: DynamicDims | None) -> Path | None:
    """Write the final model, read it back and measure that as the last stage; None (and a warning) on failure.
    `counted`: the model whose parameters the row counts (a file read back has none, or other ones).
    `dynamic_dims`: the input dims the file leaves free (per input).

    An unquantized model with ``fp32_format="auto"`` is written in every available format and the file that runs
    fastest here is kept (TorchScript only when they all fail). Files are written under a partial name and moved
    into place once chosen, so a failure never leaves a half-written file or removes an earlier run's."""
    t0 = time.monotonic()
    formats: list[str | None] = [None] if recipe is not None else list(_fp32_formats(config.fp32_format, model))
    written: list[_WrittenFile] = []
    failures: list[str] = []
    labelled = len(formats) > 1 or (recipe is None and config.fp32_format == "auto")  # which format failed how

    def attempt(fp32_format: str | None) -> None:
        try:
            written.append(_write_and_read_back(model, recipe, fp32_format, directory, inputs, config.num_threads,
                                                dynamic_dims))
        except Exception as error:  # the stages' models and the report stay the caller's
            label = fp32_format or recipe.backend  # type: ignore[union-attr]
            logger.info("export (%s) failed", label, exc_info=error)  # the whole error (torch.export's: pages)
            failures.append(f"{label}: {_first_line(error)}" if labelled else _first_line(error))

    try:
        for fp32_format in formats:
            attempt(fp32_format)
        if not written and recipe is None and config.fp32_format == "auto" and "torchscript" not in formats:
            # the last resort, when every other format failed: TorchScript is deprecated by torch, but its trace
            # keeps an LSTM fed packed sequences, which ONNX and torch.export refuse
            formats.append("torchscript")
            attempt("torchscript")
        if not written:
            message = f"export failed, no model file written: {'; '.join(failures)}"
            if recipe is None and config.fp32_format != "auto":
                others = " or ".join(repr(f) for f in ("auto", *FP32_FORMATS) if f != config.fp32_format)
                message += f" (fp32_format={others} may export it)"
            note(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            return None
        # A file traced through data-dependent code (TracerWarning) may be wrong for other inputs: one exported
        # without is preferred whatever the speed.
        sound = [w for w in written if not any(_traced_data_dependent_code(c) for c in w.caught)]
        for w in written:
            if sound and w not in sound:
                note(f"{w.name} not kept: its export traced through data-dependent code (TracerWarning).")
        candidates = sound or written
        kept = candidates[0]
        if len(candidates) > 1:  # chosen by speed on this host, as the quantization backends are
            try:
                medians = [m["median"] for m in measure_latencies(
                    [w.loaded for w in candidates], inputs, config.latency_repeats, num_threads=config.num_threads)]
            except Exception as error:  # a file that loads but does not run here: keep the first that does
                note(f"timing the fp32 files failed ({_first_line(error)}); kept {kept.name}.")
            else:
                kept = candidates[medians.index(min(medians))]
                timings = ", ".join(f"{w.name} {t * 1e3:.4g} ms" for w, t in zip(candidates, medians))
                note(f"fp32 file format chosen by speed: {timings} (median, batch {batch_size(inputs)}): "
                     f"kept {kept.name}.")
        for failure in failures:
            note(f"export to {failure} (skipped)")
        artifact = directory / kept.name
        try:
            os.replace(kept.partial, artifact)
        except OSError as error:
            message = f"export failed, no model file written: {_first_line(error)}"
            note(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            return None
    finally:
        for w in written:
            w.partial.unlink(missing_ok=True)
    said = set()
    for w in kept.caught:  # e.g. a TracerWarning: the file may not generalize to other inputs; say so in the report
        if issubclass(w.category, torch.jit.TracerWarning) and _guards_an_error(w):
            continue  # a shape check in torch's attention: nothing to say
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        text = f"export: {w.category.__name__}: {w.message}"
        # torch's notices about its own APIs say nothing of this model or file
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) \
                and text not in said:
            said.add(text)
            note(text)
    loaded = kept.loaded
    difference = max_output_difference(eval_outputs(model, inputs), eval_outputs(loaded, inputs))
    seconds = time.monotonic() - t0
    final = stages.rows[-1]
    if final.stage == "input":  # nothing changed the model: the file gets a row of its own
        stages.add("exported", loaded, f"{artifact.name} read back from disk", seconds, file=artifact,
                   counted=counted)
    else:  # the last stage is measured as shipped: the file read back from disk
        stages.pop()
        row = stages.add(final.stage, loaded, f"{final.description}; {artifact.name} read back",
                         final.seconds + seconds, file=artifact, counted=counted)
        if f"{row.metric:.6g}" != f"{final.metric:.6g}":  # as the report shows them: float rounding is no change
            note(f"the exported file scores {row.metric:.6g}, the in-memory {final.stage} model {final.metric:.6g}.")
    note(f"exported {artifact.name}; read back, its outputs differ from the in-memory model's by at most "
         f"{difference:.3g}.")
    return artifact


def folders_message(folders: Sequence[str]) -> str:
    """Why a run refuses an output directory holding `folders` under the names of its files."""
    one = len(folders) == 1
    return (f"{', '.join(folders)} in it {'is a folder' if one else 'are folders'}, where this run writes "
            f"{'a file' if one else 'files'} of that name (the write would fail after the run's work). Move or "
            f"rename {'it' if one else 'them'}, or give another output directory.")


def _note_earlier_outputs(directory: Path, written: set[str], note: Callable[[str], None]) -> None:
    """Name the model and state files of an earlier run into `directory` that this run did not write over (a model
    in another format; a pruned or shrunk state dict where this run pruned nothing or removed no channel): not ours
    to delete, but which file is this run's must not be a guess."""
    model_suffixes = {*FP32_SUFFIXES.values(), ".onnx"}
    earlier = sorted(p.name for p in directory.iterdir() if p.name not in written and ".partial" not in p.name and (
        p.name in (PRUNED_STATE_FILE, SHRUNK_STATE_FILE) or (p.stem == "model" and p.suffix in model_suffixes)))
    if earlier:
        ours = f"this run wrote {', '.join(sorted(written))}" if written else "this run wrote no model or state file"
        note(f"{', '.join(earlier)} in the output directory {'is' if len(earlier) == 1 else 'are'} not from this "
             f"run ({ours}).")


def _names_of(model: nn.Module, targets: Sequence[Target]) -> list[str]:
    names = {id(m): name for name, m in model.named_modules()}
    return [names[id(m)] for m, _ in targets]


def _residual_groups(model: nn.Module, targets: Sequence[Target], prune: PruneConfig, plan: ChannelPlan | None,
                     note: Callable[[str], None]) -> tuple[list[ChannelGroup], list[Target], set[str]]:
    """The channel groups joined by residual additions or gating products that structured pruning prunes as one (the
    same channels in every layer writing into the group), when the config asks for it and all those layers are
    pruning targets; the targets left to prune layer by layer; and, with `removable_only`, the layers of groups
    only partly among the targets (one excluded), left unpruned: shrink removes a group's channel from all of its
    layers or from none."""
    if not _groups_residuals(prune) or plan is None:
        return [], list(targets), set()
    names = _names_of(model, targets)
    groups = [g for g in plan.groups if g.prunable and set(g.producers) <= set(names)]
    grouped = {name for g in groups for name in g.producers}
    if groups:
        joined = " or ".join(sorted({g.describe() for g in groups}))
        layers = f"{len(grouped)} layer{'' if len(grouped) == 1 else 's'}"
        note(f"group_residuals: {len(groups)} channel group(s) joined by {joined} ({layers}) "
             "pruned as one, so shrink can remove their channels.")
    partial = [g for g in plan.groups if g.prunable and set(g.producers) & set(names)
               and not set(g.producers) <= set(names)]
    left = {name for g in partial for name in g.producers} & set(names) if prune.removable_only else set()
    if left:
        outside = sorted({name for g in partial for name in g.producers} - set(names))
        note(f"removable_only: {len(left)} layer(s) left unpruned, as shrink could not remove their channels: "
             f"{', '.join(sorted(left))} write into residual groups with {', '.join(outside)}, which is not pruned "
             "(exclude, layer_types), and a group loses a channel from all its layers or from none. Prune all of "
             "them, or PruneConfig(removable_only=False) to mask these anyway.")
    return groups, [t for t, name in zip(targets, names) if name not in grouped and name not in left], left


def _batch_norm_groups(model: nn.Module, targets: Sequence[Target], plan: ChannelPlan | None,
                       note: Callable[[str], None]) -> tuple[list[ChannelGroup], list[ChannelGroup]]:
    """Each pruned layer with the BatchNorms between it and its consumer, as a one-layer group whose BatchNorm
    :class:`BatchNormZeroer` holds at zero for pruned channels; and each pruned layer with a bias whose channels go
    only when exactly zero somewhere no such BatchNorm comes before (a zero-padded conv, a gate, a product with
    per-token weights), as a one-layer group whose bias it holds at zero (none if the model cannot be traced)."""
    if plan is None:
        return [], []
    modules = dict(model.named_modules())
    pruned = {name for name, (_, n) in zip(_names_of(model, targets), targets) if n == "weight"}
    groups, biased = [], []
    for layer in (name for name in modules if name in pruned):
        # after a concatenation, the layer's channels start past the other inputs' in the BatchNorm
        affine = {name: start for name, start in plan.batch_norms.get(layer, {}).items() if modules[name].affine}
        if affine:
            groups.append(ChannelGroup((layer,), tuple(affine), (), _out_channels(modules[layer]),
                                       batch_norm_starts=tuple(affine.values())))
        if layer in plan.zeros_before_batch_norm and isinstance(getattr(modules[layer], "bias", None), Tensor):
            # a pruned filter still outputs its bias: a constant that a zero-padded conv after it (a U-Net's decoder
            # conv after its transposed conv) does not see as one at the border, nor a product with per-token
            # weights (attention pooling) or a gate, so shrink could not remove it; a BatchNorm held at zero after
            # that place comes too late (a gate, then a concatenation's BatchNorm)
            biased.append(ChannelGroup((layer,), (), (), _out_channels(modules[layer])))
    if groups:
        layers = {name for group in groups for name in group.batch_norms}  # one after a concatenation serves several
        # said before any round (with an unstructured method, a channel may never be emptied): what will be done
        note(f"zero_batch_norm: in {len(layers)} BatchNorm layer(s), the scale and shift of each channel pruning "
             "empties are held at zero, so shrink can remove such channels.")
    if biased:
        note(f"zero_batch_norm: the biases of pruned channels are held at zero in {len(biased)} layer(s) without a "
             f"BatchNorm before a place that needs zeros ({', '.join(g.producers[0] for g in biased)}), so their "
             "channels output zero and shrink can remove them where only a zero passes too (a zero-padded conv, a "
             "gate, a product with per-token weights).")
    return groups, biased


def _check_multiple_leaves_channels_to_prune(model: nn.Module, prune: PruneConfig, multiple: int,
                                             sets: list[tuple[list[Target], dict[str, Any]]],
                                             groups: list[ChannelGroup], units: list[str],
                                             note: Callable[[str], None], owner: str) -> None:
    """keep_multiple_of rounds each layer's kept channels up to a multiple: a layer no wider than that (or whose
    pruned count rounds to none at the final sparsity) is never pruned. Said per layer; refused when it is every
    layer (and no attention head is pruned), before any round: the report described the run as pruning to the
    sparsity asked, beside a pruned row 0.0% sparse."""
    names = {id(module): name for name, module in model.named_modules()}
    # (name, channels, blocks pruned alike: the groups of a grouped conv, or of the grouped convs reading a layer)
    widths = [(f"{names.get(id(module), type(module).__name__)}.{tensor}", getattr(module, tensor).shape[
        kwargs.get("dim", 0)], kwargs.get("slice_groups", {}).get((module, tensor), 1))
        for subset, kwargs in sets for module, tensor in subset]
    widths += [(f"group of {', '.join(group.producers)}", group.channels, 1) for group in groups]
    widths += [(name, model.get_submodule(name).hidden_size, 1) for name in units]
    sparsity = float(prune.sparsity)
    untouched = {name: (width, blocks) for name, width, blocks in widths
                 if structured_pruned_count(width // blocks, sparsity, block_multiple(multiple, blocks)) == 0}
    if not untouched:
        return
    listed = ", ".join(f"{name} ({width}{f' in {blocks} groups' if blocks > 1 else ''})"
                       for name, (width, blocks) in list(untouched.items())[:6])
    listed += ", ..." if len(untouched) > 6 else ""
    given = f"{owner}(keep_multiple_of={multiple})"  # CompressionConfig's field, preview_shrink's argument
    if len(untouched) == len(widths) and not prune.heads:
        raise ValueError(f"{given} keeps every channel of every layer to prune at sparsity {sparsity:.0%} (channels "
                         f"per layer: {listed}): each keeps a multiple of {multiple}, and at least one, so nothing "
                         "would be pruned. Pass a smaller multiple, or none.")
    note(f"{given}: {len(untouched)} of {len(widths)} layer(s) keep all their channels at sparsity {sparsity:.0%}, "
         f"as pruning any would leave no multiple of {multiple}: {listed}.")


@dataclass
class _Pruning:
    """What the pipeline prunes in a model and how: the targets, the channel groups pruned as one, the sets pruned
    alike (per output dim) and the zeroer of pruned channels' BatchNorms and group biases."""

    model: nn.Module
    prune: PruneConfig
    keep_multiple_of: int | None
    targets: list[Target]
    groups: list[ChannelGroup]
    sets: list[tuple[list[Target], dict[str, Any]]]
    held_at_zero: BatchNormZeroer
    heads_masked: int = 0
    units: list[str] = dataclasses.field(default_factory=list)  # recurrent layers losing hidden units
    units_masked: int = 0
    # the multiple of channels each attention's heads keep, whatever the method (an unstructured one's
    # keep_multiple_of is None: shrink alone rounds its channels, but the heads it removes are pruned here)
    heads_keep_multiple_of: int | None = None

    @classmethod
    def plan(cls, model: nn.Module, prune: PruneConfig, keep_multiple_of: int | None,
             note: Callable[[str], None], example_inputs: tuple | None = None, *,
             fine_tuned: bool = False, heads_keep_multiple_of: int | None = None,
             owner: str = "CompressionConfig") -> _Pruning:
        # one trace for the targets, the residual groups and the BatchNorms
        plan = _traced_plan(model, example_inputs)
        heads_multiple_of = keep_multiple_of if heads_keep_multiple_of is None else heads_keep_multiple_of
        targets, left_out, units = _select_targets(model, prune, plan, heads_keep_multiple_of=heads_multiple_of)
        frozen = [f"{name}.{tensor}" for name, (module, tensor) in zip(_names_of(model, targets), targets)
                  if not trainable_tensor(module, tensor).requires_grad]
        if frozen and fine_tuned:  # as ModelPruning and the IMP driver say it (one-shot, every tensor is alike)
            message = (f"{len(frozen)} of the tensors to prune do not train (requires_grad=False): "
                       f"{', '.join(frozen[:5])}{', ...' if len(frozen) > 5 else ''}. They are pruned with the rest "
                       "(a frozen backbone or embedding), and no fine-tuning brings them back; "
                       "PruneConfig(exclude=[...]) leaves them dense.")
            note(message)
            warnings.warn(f"compress: {message}", UserWarning, stacklevel=2)
        if not prune.structured:
            _note_dense_matrices(model, prune, targets, note)
        if left_out:
            by_reason: dict[str, list[str]] = {}
            for name, reason in left_out.items():
                by_reason.setdefault(reason, []).append(name)
            note(f"removable_only: {len(left_out)} layer(s) left unpruned, as shrink could not remove their channels: "
                 + "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())
                 + ". PruneConfig(removable_only=False) prunes them too (masks only; no CLI option: it prunes only "
                   "what shrink removes, or unstructured, --prune l1_unstructured).")
        groups, layer_targets, left = _residual_groups(model, targets, prune, plan, note)
        if left:
            targets = [t for t, name in zip(targets, _names_of(model, targets)) if name not in left]
            if not targets and not units:
                raise ValueError(f"PruneConfig(method={_method_name(prune)!r}): shrink can remove the channels of "
                                 f"none of the layers to prune ({', '.join(sorted(left))}: their residual groups "
                                 "are only partly pruned), so structured pruning would cost accuracy and save "
                                 "nothing. Prune every layer of those groups, or removable_only=False to mask them "
                                 "anyway.")
        # a pruned channel's BatchNorm shift held at zero makes the channel exactly zero, which shrink can remove
        # (and a group's producers' biases: a sum or product of biased Linear layers has no BatchNorm to zero)
        lone_layers, biased = _batch_norm_groups(model, layer_targets, plan, note) if prune.zero_batch_norm \
            else ([], [])
        held_at_zero = BatchNormZeroer(model, groups + lone_layers + biased,
                                       biases=[True] * len(groups) + [False] * len(lone_layers) + [True] * len(biased))
        sets = _by_output_dim(model, layer_targets, prune, plan)
        for subset, kwargs in sets:  # the one-shot path has no GradualPruner to refuse a dim before pruning
            check_method_kwargs(prune.pruning_method, kwargs, "PruneConfig",
                                ndims={getattr(m, n).dim() for m, n in subset})
        if keep_multiple_of is not None and keep_multiple_of > 1:
            _check_multiple_leaves_channels_to_prune(model, prune, keep_multiple_of, sets, groups, units, note,
                                                     owner)
        return cls(model, prune, keep_multiple_of, targets, groups, sets, held_at_zero, units=units,
                   heads_keep_multiple_of=heads_multiple_of)

    def prune_once_(self, sparsity: float) -> int:
        """Prune every set and group to `sparsity` at once (entries pruned before stay); returns how many entries
        were newly masked: in the sets, the channel groups, the attention heads and the recurrent units."""
        prune, multiple = self.prune, self.keep_multiple_of
        before = self.masked_entries()
        for subset, kwargs in self.sets:
            prune_to_sparsity_(subset, prune.pruning_method, sparsity, scope=prune.scope, keep_multiple_of=multiple,
                               **kwargs)
        prune_groups_(self.model, self.groups, sparsity, prune.norm, multiple)
        self.prune_heads_(sparsity)
        self.prune_units_(sparsity)
        self.held_at_zero.refresh().apply_()
        return self.masked_entries() - before

    def masked_entries(self) -> int:
        """Entries the model's pruning masks zero, each tensor counted once."""
        return sum(pruned_count(m, n) for m, n in distinct_targets((m, n) for _, m, n in pruned_targets(self.model)))

    def prune_units_(self, sparsity: float) -> bool:
        """Prune the recurrent layers' hidden units to `sparsity` of each layer's; True if more are masked."""
        if not self.units:
            return False
        masked = sum(prune_units_(self.model, sparsity, n=self.prune.norm, names=tuple(self.units),
                                  keep_multiple_of=self.keep_multiple_of).values())
        grew, self.units_masked = masked > self.units_masked, masked
        return grew

    @property
    def unit_targets(self) -> list[Target]:
        """The weight matrices of the recurrent layers losing hidden units (for the sparsity report)."""
        modules = dict(self.model.named_modules())
        return [(modules[name], t) for name in self.units for t in tensor_names(modules[name], "weight")]

    def prune_heads_(self, sparsity: float) -> bool:
        """Prune the attention heads due at `sparsity` (``PruneConfig.heads`` in proportion); True if any are."""
        if not self.prune.heads:
            return False
        masked = sum(prune_heads_(self.model, self.prune.heads_at(sparsity), exclude=tuple(self.prune.exclude or ()),
                                  keep_multiple_of=self.heads_keep_multiple_of).values())
        grew, self.heads_masked = masked > self.heads_masked, masked
        return grew


def preview_shrink(model: nn.Module, prune: PruneConfig, *, keep_multiple_of: int | None = None,
                   example_inputs: torch.Tensor | tuple | Mapping[str, torch.Tensor] | None = None,
                   input_fn: Callable[[object], tuple] | None = None) -> tuple[ShrinkResult, list[str]]:
    """What structured pruning to ``prune.sparsity`` and shrink do to `model`'s size, without data or training: a
    copy pruned in one shot as :func:`compress` prunes it (the same layers, channel groups, and BatchNorms held at
    zero), then shrunk. The channel counts are those :func:`compress` reaches (fine-tuning moves weights, not
    counts); the weights are not trained. Returns the shrink result (its report: per layer the channels before and
    after, the parameters) and the pipeline's notes (layers left out and why, groups). `model` is not modified.
    Give the `example_inputs` (and `input_fn`, which reads a dict a forward takes whole) that compress will get:
    their ranks let more layers through (a sequence model's token pooling), and shrink checks the outputs on them.
    With ``zero_batch_norm=False`` a pruned channel outputs a constant (its BatchNorm's shift, its bias) that
    shrink removes before a zero-padded convolution only where the activation zeroes it: there the counts follow
    the trained values, which fine-tuning moves (a note says so).
    """
    if not isinstance(prune, PruneConfig) or not prune.structured or prune.dim != 0:
        raise ValueError(f"preview_shrink(prune={prune!r}): give a structured PruneConfig on output channels, e.g. "
                         "PruneConfig(sparsity=0.5, method='ln_structured').")
    keep_multiple_of = check_channel_multiple(keep_multiple_of, "preview_shrink")
    notes: list[str] = []
    work = eager_copy(model)  # as compress does: torch.fx traces the eager modules of compiled parts
    folded = fold_parametrizations_(work)  # as compress does
    if folded:
        notes.append(f"folded {len(folded)} parametrized weight(s) into plain ones, as compress does: "
                     f"{', '.join(folded)}.")
    # a dict by forward's parameter names (or input_fn), as compress reads it
    inputs = None if example_inputs is None else example_as_inputs(work, example_inputs, input_fn)
    if not prune.zero_batch_norm:
        notes.append("zero_batch_norm=False: a pruned channel outputs a constant (its BatchNorm's shift, its bias), "
                     "which shrink removes before a zero-padded convolution only where the activation zeroes it; "
                     "there the channels removed follow the trained values, so after fine-tuning compress may keep "
                     "more or fewer than this preview (zero_batch_norm=True makes them zero).")
    _Pruning.plan(work, prune, keep_multiple_of, notes.append, inputs,
                  owner="preview_shrink").prune_once_(float(prune.sparsity))
    return shrink(work, inputs, keep_multiple_of=keep_multiple_of), notes


def _slower_int8(rows: Sequence[StageMetrics]) -> str | None:
    """What to say when the quantized stage ran clearly slower than the fp32 stage it came from, else None."""
    if len(rows) < 2 or rows[-1].stage != "quantized":
        return None
    fp32, int8 = rows[-2].latency, rows[-1].latency
    if fp32 is None or int8 is None or not int8.median_ms > SLOWER * fp32.median_ms:
        return None
    stage = rows[-2].stage
    return (f"int8 does not pay off here: the quantized model ran {int8.median_ms / fp32.median_ms:.2f}x slower than "
            f"the {stage} fp32 model ({int8.median_ms:.4g} vs {fp32.median_ms:.4g} ms; int8 kernels need larger "
            f"layers). The fp32 model is stage_models[{stage!r}]; quantize=None (CLI: --quantize none) exports it "
            "instead, and PTQConfig(min_speedup=1.0) (CLI: --min-speedup 1) keeps fp32 wherever int8 does not pay "
            "off.")


def _slower_shrunk(rows: Sequence[StageMetrics], report: ShrinkReport | None = None) -> str | None:
    """What to say when the shrunk stage ran clearly slower than the stage before it, else None; the advice to keep
    widths that are multiples of 8 only where some width shrink left is not one (it changed nothing else)."""
    stages = [row.stage for row in rows]
    if "shrunk" not in stages or stages.index("shrunk") == 0:
        return None
    before, shrunk = rows[stages.index("shrunk") - 1], rows[stages.index("shrunk")]
    if before.latency is None or shrunk.latency is None or \
            not shrunk.latency.median_ms > SLOWER * before.latency.median_ms:
        return None
    slow, fast = shrunk.latency.median_ms, before.latency.median_ms
    said = (f"shrink made the model smaller but not faster here: it ran {slow / fast:.2f}x slower than the "
            f"{before.stage} model ({slow:.4g} vs {fast:.4g} ms).")
    odd = None if report is None else [layer.name for layer in report.layers if layer.channels_after % 8]
    if odd is not None and not odd:
        return said + " Its widths are multiples of 8: at this size the narrower layers do not pay off on this host."
    return (said + " Dense kernels can run slower on widths that are no longer multiples of 8 or 16"
            + (f" ({', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''})" if odd else "")
            + "; CompressionConfig(keep_multiple_of=8) (CLI: --keep-multiple-of 8) keeps such widths.")


def _zeros_in(model: nn.Module) -> int:
    """The zeros of every parameter `model` computes with (masks applied; a tensor shared by several modules once):
    the targets, and the recurrent units, attention heads and groups pruned beside them."""
    counted: set[int] = set()
    zeros = 0
    with torch.no_grad():
        for module in model.modules():
            for name, parameter in module._parameters.items():
                if parameter is None or id(parameter) in counted:
                    continue
                counted.add(id(parameter))
                pruned = name.endswith("_orig") and is_pruned(module, name.removesuffix("_orig"))
                tensor = effective_tensor(module, name.removesuffix("_orig")) if pruned else parameter
                zeros += int((tensor == 0).sum())
    return zeros


def compress(
    model: nn.Module,
    config: CompressionConfig | None = None,
    *,
    eval_fn: EvalFn,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    calibration_data: Iterable | None = None,
    fine_tune: FineTuneFn | None = None,
    fine_tune_steps: int | None = None,
    test_fn: EvalFn | None = None,
    output_dir: str | os.PathLike | None = None,
    input_fn: Callable[[object], tuple] | None = None,
    metric_name: str = "metric",
    test_metric_name: str | None = None,
    fine_tune_description: str | None = None,
    higher_is_better: bool | None = None,
) -> CompressionResult:
    """Compress a copy of `model` stage by stage and measure every stage alike; `model` is not modified.

    Args:
        model: the trained fp32 model.
        config: which stages run and how (:class:`CompressionConfig`); default: shrink and export only.
        eval_fn: ``model -> metric`` (which way is better: `higher_is_better`), on validation data: it judges
            quantization candidates and fills the report's metric column.
        example_inputs: one batch of inputs, used to trace (shrink, export) and to time every stage (a tensor, a
            tuple, or a dict keyed by forward's parameter names).
        calibration_data: batches for static quantization and layer sensitivity (see ``quantize``).
        fine_tune: ``fine_tune(model, step)``: trains `model` in place (any loop) and calls ``step(t)`` after
            its t-th optimizer step (t = 1, 2, ...), which prunes when the schedule says so. Without it pruning
            is one-shot.
        fine_tune_steps: how many optimizer steps ``fine_tune`` makes (sets a shaped schedule's length).
        test_fn: ``model -> metric`` on held-out test data, for the report only (never used for decisions).
        output_dir: where the pruned (and shrunk) state dicts and the exported model are written; the report files
            are written by ``result.report.save(output_dir)`` (the CLI and ``CompressOnFitEnd`` do it).
        input_fn: maps a calibration batch to the model's positional inputs.
        metric_name, test_metric_name: column titles in the report (`test_metric_name` defaults to ``"test"`` when
            `test_fn` is given).
        fine_tune_description: what ``fine_tune`` does besides training (e.g. ``"distilled (T=1, alpha=0.5)"``),
            appended to the pruned stage's description in the report.
        higher_is_better: which way `eval_fn`'s metric improves (False: a loss), for the notes on what a stage cost;
            None: as ``config.quantize.accuracy`` says, or, without a quantize stage, unknown (a change either way
            is then noted). Given beside ``config.quantize``, it must agree with its accuracy criterion.
    """
    config = config if config is not None else CompressionConfig()
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"compress(config={config!r}): expected a CompressionConfig.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress(model=...): expected a torch.nn.Module, got {type(model).__name__}.")
    if is_scripted(model) and (config.prune is not None or config.shrink):
        raise TypeError("compress(model=...): a TorchScript module cannot be pruned (its parameters are fixed when "
                        "it is compiled) or shrunk (torch.fx cannot trace it). Pass the nn.Module from before "
                        "torch.jit.script / trace, or CompressionConfig(prune=None, shrink=False) to quantize it only.")
    if not callable(eval_fn):
        raise TypeError(f"compress(eval_fn={eval_fn!r}): expected a callable model -> metric.")
    if test_fn is not None and not callable(test_fn):
        raise TypeError(f"compress(test_fn={test_fn!r}): expected a callable model -> metric, or None.")
    # (the report refused them, after every stage had run)
    if not isinstance(metric_name, str):
        raise TypeError(f"compress(metric_name={metric_name!r}): the report's title of eval_fn's column, a str.")
    if test_metric_name is not None and not isinstance(test_metric_name, str):
        raise TypeError(f"compress(test_metric_name={test_metric_name!r}): the report's title of test_fn's column, "
                        "a str or None.")
    if higher_is_better is not None and not isinstance(higher_is_better, bool):
        raise TypeError(f"compress(higher_is_better={higher_is_better!r}): expected True, False (a loss) or None.")
    if config.quantize is not None:
        if higher_is_better is None:
            higher_is_better = config.quantize.accuracy.higher_is_better
        elif higher_is_better != config.quantize.accuracy.higher_is_better:
            raise ValueError(f"compress(higher_is_better={higher_is_better}) against config.quantize.accuracy's "
                             f"higher_is_better={config.quantize.accuracy.higher_is_better}: the metric improves one "
                             "way; make them agree (or leave higher_is_better=None).")
    if output_dir is not None and os.fspath(output_dir) == "":  # Path("") is the working directory
        raise ValueError("compress(output_dir=''): name a folder to write to (or None to write nothing).")
    if config.quantize is not None:  # before any fine-tuning, which would run on that device first
        check_model_on_cpu(model, "compress(model=...) with config.quantize")
    wrapped = getattr(model, "_original_module", None)
    if isinstance(wrapped, nn.Module) and wrapped is not model and all(
            p.dtype == torch.float32 for p in wrapped.parameters() if p.is_floating_point()):
        # Lightning Fabric's wrapper (fabric.setup) of a float32 module (32-true, or a mixed precision's autocast):
        # fx, shrink and the exporters failed on it (shrink skipped, the pt2e backend refused); the module it wraps
        # is compressed, in float32 as the int8 and CPU stages run. (One in bf16 or float64, whose inputs the
        # wrapper casts, is kept.)
        model = wrapped
    compiled = compiled_module_names(model)
    architecture = model  # (before the eager copy) whose keys the state files take: `body._orig_mod.` of a compiled
    while is_compiled(architecture):  # part; the model itself unwrapped (its eager class is what the user builds)
        architecture = architecture._orig_mod
    if compiled:  # fx, the exporters and the int8 backends need eager modules; a copy, the model given stays compiled
        model = eager_copy(model)
    inputs = example_as_inputs(model, example_inputs, input_fn)  # a dict: by forward's parameter names
    default_input_fn_used = input_fn in (None, default_input_fn)
    # a dict batch is read by forward's parameter names (an optional input left out of a pair: said)
    input_fn = input_fn or model_input_fn(model, say_optional_left_out=True)
    if fine_tune is not None:
        if not callable(fine_tune):
            raise TypeError(f"compress(fine_tune={fine_tune!r}): expected fine_tune(model, step) or None.")
        if config.prune is None:
            raise ValueError("compress(fine_tune=...) without config.prune: fine-tuning runs while pruning; "
                             "give CompressionConfig(prune=PruneConfig(...)).")
        if isinstance(fine_tune_steps, bool) or not isinstance(fine_tune_steps, numbers.Integral) \
                or fine_tune_steps < 1:
            raise ValueError(f"compress(fine_tune_steps={fine_tune_steps!r}): with fine_tune, give the number of "
                             "optimizer steps it makes (an int >= 1), so that the schedule can span them.")
        fine_tune_steps = int(fine_tune_steps)  # numpy's: the schedule and the report hold Python numbers
    elif fine_tune_steps is not None:  # it was ignored: everything pruned at once, with no word
        raise ValueError(f"compress(fine_tune_steps={fine_tune_steps!r}) without fine_tune: nothing would make those "
                         "steps; pass fine_tune(model, step) too, to prune gradually while training.")
    elif config.prune is not None and not isinstance(config.prune.schedule, str):
        raise ValueError("a SparsitySchedule needs fine-tuning to run along: pass fine_tune=..., or use "
                         "PruneConfig(sparsity=..., schedule='oneshot').")
    check_calibration_data(calibration_data, "compress")
    if config.quantize is not None and config.quantize.approach == "static" and calibration_data is None:
        raise ValueError("compress(calibration_data=None): static quantization needs calibration batches.")
    # The checks below run forward: on a copy, so that one that writes state of its own (a counter, a cache) leaves
    # the model passed as it was (they ran on it); eager, as the stages compress it (nothing compiles for a check)
    check_lazy_layers_called(model, "compress")  # (they were created in the model itself, by the checks)
    probe = eager_copy(model)
    # Quantization reads the calibration batches only after fine-tuning: a batch the model cannot take fails here.
    check_model_runs(probe, inputs, what="example_inputs", default_input_fn_used=False)
    # declared dynamic dims that the inputs do not have fail here, not after training
    if config.prune is not None:  # (its other target checks need the traced plan, made after the first evaluation)
        _check_heads(model, config.prune, tuple(config.prune.exclude or ()), keep_multiple_of=config.keep_multiple_of)
    declared = config.quantize.dynamic_dims if config.quantize is not None else config.dynamic_dims
    resolve_dynamic_dims([inputs], declared)
    check_declared_dims_vary(probe, inputs, declared, "compress: dynamic_dims")
    if config.export and output_dir is not None and config.fp32_format == "onnx" and bfloat16_tensors(model):
        # found when the file is written, after every stage (with quantize: when the fp32 model is kept)
        held = bfloat16_tensors(model)
        raise ValueError(f"CompressionConfig(fp32_format='onnx') for a model in bfloat16 "
                         f"({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): ONNX Runtime's CPU kernels do "
                         "not take bfloat16, so its fp32 file cannot be ONNX; use fp32_format='auto' (torch.export "
                         "for such a model), 'export' or 'torchscript', or cast the model to float32.")
    if config.export and output_dir is not None and config.quantize is None:  # (quantize says it for its files)
        # the dims the export leaves free: the declared ones and those that vary in the data (as at the export)
        warn_time_major_inputs(probe, inputs, resolve_dynamic_dims(
            [inputs, *_first_batches(calibration_data, input_fn, 16)], declared), "compress")
    if config.quantize is not None and calibration_data is not None and iter(calibration_data) is not calibration_data:
        # a re-iterable: reading costs nothing but the batches read; a list's every batch the search reads (one
        # that fails was found after the fine-tuning), a loader's first (reading more costs a pass over the data)
        count = config.quantize.num_calibration_batches if isinstance(calibration_data, (list, tuple)) else 1
        batches = [batch_inputs(input_fn, batch) for batch in itertools.islice(calibration_data, count)]
        check_calibration_batches(probe, batches, calibration_data, default_input_fn_used)
    del probe
    directory = Path(output_dir) if output_dir is not None else None
    written: set[str] = set()  # the model and state files this run writes into `directory`
    if directory is not None:
        blocking = what_is_in_the_way(directory, "directory")
        if blocking is not None:  # (mkdir's "Not a directory" for one of its parents)
            raise NotADirectoryError(f"compress(output_dir={str(directory)!r}): {blocking}.")
        why = cannot_write(directory)  # before any stage: it failed at the first file, after all the fine-tuning
        if why is not None:
            raise ValueError(f"compress(output_dir={str(directory)!r}): cannot write there ({why}).")
        folders = folders_in_the_way(directory, OUTPUT_FILES)
        if folders:
            raise ValueError(f"compress(output_dir={str(directory)!r}): {folders_message(folders)}")

    messages: list[str] = []

    def note(message: str) -> None:
        messages.append(message)
        logger.info(message)

    if compiled:
        names = ", ".join(repr(n) if n else "the model" for n in compiled)
        note(f"torch.compile'd module(s) {names} compressed as the eager modules they compile (compile the result "
             "again to run it compiled).")
    stages = _Stages(eval_fn, test_fn, config.prune)
    details: list[tuple[str, str]] = []
    started = time.monotonic()
    stages.add("input", deepcopy_model(model), "the model as given", 0.0)
    if stages.model_unused:
        warn_unused_model()
        note(UNUSED_MODEL_MESSAGE)
    stages.test_first()
    work = deepcopy_model(model)  # fine-tuned and pruned in place; shrink and quantize return new models
    result_sparsity = shrink_report = quantization = None
    folded = fold_parametrizations_(work)  # torch's pruning, shrink and the int8 backends need plain weights
    if folded:
        note(f"folded {len(folded)} parametrized weight(s) into plain ones, as for inference: {', '.join(folded)}.")

    # ---------------------------------------------------------------------------------------- prune
    if config.prune is not None:
        prune = config.prune
        t0 = time.monotonic()
        multiple = config.keep_multiple_of if prune.structured else None  # unstructured: only shrink rounds
        pruning = _Pruning.plan(work, prune, multiple, note, inputs, fine_tuned=fine_tune is not None,
                                heads_keep_multiple_of=config.keep_multiple_of)
        keep_bypassed_weights_current_(work)  # an attention's pruned out_proj is read, never called
        method, targets, groups, target_sets = prune.pruning_method, pruning.targets, pruning.groups, pruning.sets
        held_at_zero = pruning.held_at_zero
        pruners: list[GradualPruner] = []
        if fine_tune is None:
            pruning.prune_once_(float(prune.sparsity))
            how = "one-shot, no fine-tuning"
        else:
            assert fine_tune_steps is not None
            schedule = prune.step_schedule(fine_tune_steps)
            # world_size=1: the pipeline prunes in this process (rank 0 of a finished DDP fit: a broadcast would hang)
            pruners = [GradualPruner(subset, schedule, method, scope=prune.scope, keep_multiple_of=multiple,
                                     target_names=qualified_names(work, subset), world_size=1, **kwargs)
                       for subset, kwargs in target_sets]
            group_rounds: list[int] = []
            last_step = [-1]
            went_back: list[tuple[int, int]] = []  # (t, the last t seen): a loop restarting its count
            target_names = qualified_names(work, targets)

            def check_targets_in_model() -> None:
                layers = {id(module) for module in work.modules()}
                gone = sorted({name.rpartition(".")[0] or name for (module, _), name in zip(targets, target_names)
                               if id(module) not in layers})  # (the layers' names: qualified_names gives tensors')
                if gone:  # (the rounds pruned a detached layer, and the report failed after all the fine-tuning)
                    raise ValueError(f"compress: fine_tune replaced the pruned layer(s) {gone[:3]} in the model: the "
                                     "pruning rounds hold the layers it was given; train them in place (replace a "
                                     "layer before compress, not during fine_tune).")

            def step(t: int) -> None:  # after every optimizer step: the BatchNorm shifts would grow back
                check_targets_in_model()
                if t < last_step[0] and not went_back:
                    went_back.append((t, last_step[0]))
                with outside_inference_mode():  # called in a loop's evaluation: masks made there broke training
                    prune_round(t)

            def prune_round(t: int) -> None:
                for pruner in pruners:
                    pruner.step(t)
                # masks change only at the schedule's rounds (one passed over, as by a GAN's two steps, runs late)
                point = schedule.last_point(last_step[0], t) if t > last_step[0] else None
                last_step[0] = max(last_step[0], t)
                if point is not None:
                    if groups and prune_groups_(work, groups, schedule.target(point), prune.norm, multiple):
                        group_rounds.append(t)
                    if pruning.prune_heads_(schedule.target(point)):
                        group_rounds.append(t)
                    if pruning.prune_units_(schedule.target(point)):
                        group_rounds.append(t)
                    held_at_zero.refresh()
                held_at_zero.apply_()

            step(0)  # rounds scheduled at t=0 (a one-shot schedule) happen before training
            # Whether the loop trains the copy it is given: an optimizer stepping any of its parameters (a loop may
            # train some only: a pruned body's head, BitFit's biases), or, for an update of one's own, its weights
            # changing (not its biases and BatchNorms, which the pipeline writes zeros into between steps)
            weights = _weights(work)
            before_training = _fingerprints(weights)
            parameters = {id(p) for p in work.parameters()}
            stepped = [False]

            def note_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
                stepped[0] = stepped[0] or any(id(p) in parameters for group in optimizer.param_groups
                                               for p in group["params"])

            hook = register_optimizer_step_post_hook(note_step)
            try:
                returned = fine_tune(work, step)
            finally:
                hook.remove()
            if isinstance(returned, nn.Module) and not any(module is work for module in returned.modules()):
                # the model it trained was another (a copy): its weights would be lost, and the report say fine-tuned
                # (a wrapper of the model, Fabric's or torch.compile's, holds it: trained in place)
                raise TypeError("compress: fine_tune returned a model that does not hold the one it was given (a "
                                "copy?); compress keeps the model it passes to fine_tune, which must train it in place "
                                "(and call step(t) after each optimizer step).")
            check_targets_in_model()
            if last_step[0] >= 1 and not stepped[0] and _fingerprints(weights) == before_training:
                # (the pruning rounds change masks only: the weights under them are what training changes)
                untrained = (f"fine_tune made {last_step[0]} optimizer steps, and none changed a weight of the model "
                             "it was given, a copy of yours. If its optimizer was built before compress, on the model "
                             "you passed (model.parameters()), it trains that model instead: build it inside "
                             "fine_tune, from the model it receives.")
                warnings.warn(untrained, stacklevel=2)
                note(untrained)
            if went_back:
                note(f"fine_tune called step({went_back[0][0]}) after step({went_back[0][1]}): t counts the loop's "
                     "optimizer steps from its start, not from each epoch's; the schedule's rounds then came late, or "
                     "not at all.")
            rounds = len({h["t"] for pruner in pruners for h in pruner.history
                          if h["pruned_after"] > h["pruned_before"]} | set(group_rounds))
            zeros_before = _zeros_in(work)
            late = pruning.prune_once_(schedule.final_sparsity)  # the same for groups stopped early
            # (masks made permanent by the loop, zeros kept, are masked again here: counted by `late`, not unpruned)
            late = min(late, _zeros_in(work) - zeros_before) if late else late
            if late and last_step[0] >= schedule.end:
                note(f"fine-tuning reached its schedule's end (step {schedule.end}), but {late:,} entries were "
                     "unpruned when it returned (a state dict loaded without their masks: restored weights?); they "
                     "were pruned again at once afterwards.")
            elif late:
                note(f"fine-tuning stopped at step {last_step[0]}, before its schedule ended "
                     f"(step {schedule.end}); "
                     f"the remaining {late:,} entries were pruned at once afterwards.")
            # the schedule was laid over the steps declared (a schedule of the user's, by its own steps)
            if last_step[0] > fine_tune_steps and isinstance(prune.schedule, str):
                note(f"fine-tuning made {last_step[0]} optimizer steps, past fine_tune_steps={fine_tune_steps}: the "
                     f"schedule, laid over {fine_tune_steps} steps, ended at step {schedule.end} and the steps after "
                     "it only fine-tuned; give fine_tune_steps the number of steps the loop makes "
                     "(compress_lightning counts them from its training loader and epochs: a callback of "
                     "trainer_kwargs that adds steps, such as StochasticWeightAveraging, goes past them).")
            # the steps made (the loop's own count may differ from fine_tune_steps, as the notes say)
            how = (f"{rounds} rounds during {last_step[0]} fine-tuning steps" if last_step[0] > 0 else
                   "during fine-tuning that never called step(t) for a step t >= 1") + (
                ", the rest of the sparsity at once after them" if late else "") + (
                f", {fine_tune_description}" if fine_tune_description else "")
        # every tensor pruned: the heads' input projections too, which no target names
        result_sparsity = sparsity_report(work, targets + pruning.unit_targets
                                          + [(m, n) for _, m, n in pruned_targets(work)])
        make_permanent_(work, owner="compress")
        for pruner in pruners:  # the pruned model loads state dicts as a plain one (its zeros are not re-masked)
            pruner.remove_hooks()
        work.eval()
        description = f"{prune.describe(scheduled=fine_tune is not None)}, {how}" + (
            f", channels kept in multiples of {multiple}" if multiple else "")
        if directory is not None:
            # Saved before anything else can fail: it loads into the user's unchanged architecture.
            state, kept_folded = unfold_state_dict(model, permanent_state_dict(work), folded)
            state = keyed_as_compiled_parts(architecture, state)
            if kept_folded:
                tied = tied_folded_tensors(model, kept_folded)
                untied = [entry for entry in kept_folded if entry not in tied]
                shares = "shares its original" if len(tied) == 1 else "share their originals"
                why = ([f"the parametrization of {', '.join(untied)} does not give a weight back from its value"]
                       if untied else []) + ([f"{', '.join(tied)} {shares} with another layer's weight, which the "
                                              "fold unties"] if tied else [])
                note(f"{PRUNED_STATE_FILE} holds the plain weights of the folded model ({', '.join(folded)}), as "
                     f"{'; '.join(why)}: load it after litcompress.pruning.fold_parametrizations_(model).")
            with written_atomically(directory / PRUNED_STATE_FILE) as partial:
                torch.save(state, partial)
            written.add(PRUNED_STATE_FILE)
        pruned_row = stages.add("pruned", work, description, time.monotonic() - t0)  # later stages work on copies
        given = stages.rows[0].weight_sparsity
        if prune.sparsity is not None and given is not None and given > prune.sparsity + 1e-3 \
                and pruned_row.weight_sparsity == given:  # (the description says 'to 50%', the column 90%)
            note(f"the model as given is {given:.1%} sparse, above the {prune.sparsity:.1%} asked: pruning never "
                 "un-prunes, so it pruned nothing; ask for more to prune further.")
        before = stages.rows[0].metric
        # (a metric that improved needs no remedy; its direction is known when given, or from the quantization goal)
        change = pruned_row.metric - before
        lost = abs(change) if higher_is_better is None else (-change if higher_is_better else change)
        if fine_tune is None and lost > 0.01 * abs(before):
            note(f"pruned in one shot without fine-tuning, the metric went from {before:.6g} to "
                 f"{pruned_row.metric:.6g}: prune gradually while training, which recovers most of it (compress: "
                 "fine_tune= and fine_tune_steps=; compress_lightning: fine_tune_epochs=; the CLI: --prune-epochs; "
                 "CompressOnFitEnd: a ModelPruning schedule in the fit, and no config.prune).")

    if config.prune is None and pruned_targets(work):  # a model given with live masks (a ModelPruning checkpoint's)
        make_permanent_(work, owner="compress")  # the later stages and the file: plain weights, as it ships

    # ---------------------------------------------------------------------------------------- shrink
    if config.shrink:
        t0 = time.monotonic()
        try:
            shrunk = shrink(work, inputs, keep_multiple_of=config.keep_multiple_of)
        except ValueError as error:  # untraceable model or a forward that reads widths: keep the model as is
            note(f"shrink skipped: {error}")
        else:
            shrink_report = shrunk.report
            details.append(("Shrink", shrink_report.table()))
            if shrink_report.channels_removed or shrink_report.heads_removed or shrink_report.units_removed:
                work = shrunk.model.eval()
                removed = [f"{count:,} {what} removed" for count, what in (
                    (shrink_report.channels_removed, "channels"), (shrink_report.units_removed, "hidden units"),
                    (shrink_report.heads_removed, "attention heads"))
                    if count]
                description = f"{', '.join(removed)}, parameters x{shrink_report.parameter_ratio:.3f}"
                if directory is not None:
                    # the narrow fp32 weights: litcompress.load_shrunk_state_dict(Model(...), state) loads them
                    with written_atomically(directory / SHRUNK_STATE_FILE) as partial:
                        torch.save(keyed_as_compiled_parts(architecture, work.state_dict()), partial)
                    written.add(SHRUNK_STATE_FILE)
                    if folded:
                        note(f"{SHRUNK_STATE_FILE} holds plain weights for the parametrized {', '.join(folded)}: "
                             "load it after litcompress.pruning.fold_parametrizations_(model).")
                stages.add("shrunk", work, description, time.monotonic() - t0)
            else:
                note("shrink: no all-zero channel or attention head to remove" + (
                    f" (kept: {'; '.join(f'{n}: {r}' for n, r in shrink_report.kept)})" if shrink_report.kept else ""))

    fp32_work = work  # int8 and CSR weights are its weights: the later rows count its parameters and zeros

    # ---------------------------------------------------------------------------------------- sparse kernels
    if config.sparse_kernels:
        t0 = time.monotonic()
        # the whole model timed too: CSR layers that make it slower are put back dense
        sparse = sparsify(work, inputs, num_threads=config.num_threads)
        sparse_report = sparse.report  # (the table the report shows: the layers as they are written)
        converted, layers = len(sparse.report.converted), len(sparse.report.layers)
        if sparse.report.reverted:
            note(f"sparse kernels: the model ran slower with its CSR layers ({sparse.report.dense_ms:.4g} ms dense, "
                 f"{sparse.report.sparse_ms:.4g} ms on CSR), though each was faster alone: all kept dense (the "
                 "report's 'Sparse kernels' table gives the times).")
        elif converted and (failure := _sparse_file_failure(sparse.model, inputs) if config.export
                            and directory is not None else None):
            # no file at all was written (a dict output mixing types)
            note(f"sparse kernels: the model on CSR kernels cannot be written as TorchScript, the one format that "
                 f"holds them ({failure}): all kept dense.")
            unwritable = "kept dense: the model on CSR kernels cannot be written as TorchScript"
            # ("all put back dense"; the model kept is the dense one: its outputs differ by nothing)
            sparse_report = dataclasses.replace(sparse_report, reverted=True, max_abs_diff=0.0, layers=tuple(
                dataclasses.replace(layer, converted=False, reason=unwritable) if layer.converted else layer
                for layer in sparse_report.layers))
        elif converted:
            work = sparse.model
            stages.add("sparse", work, f"CSR kernels for {converted} of {layers} Linear layers",
                       time.monotonic() - t0, counted=fp32_work)
        elif not any(layer.sparse_ms is not None for layer in sparse.report.layers):
            # nothing was timed: "none ran faster" would send the reader to a table of dashes
            reasons = sorted({layer.reason for layer in sparse.report.layers if layer.reason})
            advice = (": CSR kernels gain at 90%+ zeros; prune to a higher sparsity for them"
                      if any(reason.startswith("sparsity below") for reason in reasons) else "")
            note(f"sparse kernels: none of the {layers} Linear layers was a candidate ({'; '.join(reasons) or 'none'}"
                 f"), so none was timed{advice}.")
        else:
            note(f"sparse kernels: none of the {layers} Linear layers ran at least 1.1x faster on CSR kernels here "
                 "(they gain at 90%+ zeros, most on larger batches and layers; the report's 'Sparse kernels' "
                 "table gives each layer's times).")
        details.append(("Sparse kernels", sparse_report.table()))

    # ---------------------------------------------------------------------------------------- quantize
    if config.quantize is not None:
        t0 = time.monotonic()
        ptq = config.quantize
        if ptq.num_threads is None and config.num_threads is not None:
            # Candidates are timed (and ONNX Runtime sessions made) with the threads the report uses.
            ptq = dataclasses.replace(ptq, num_threads=config.num_threads)
        with warnings.catch_warnings():
            if stages.model_unused:  # said once, for the input
                warnings.filterwarnings("ignore", message=re.escape(UNUSED_MODEL_MESSAGE))
            quantization = quantize(work, ptq, eval_fn=eval_fn, calibration_data=calibration_data,
                                    example_inputs=inputs, input_fn=input_fn)
        details.append(("Quantization trials", quantization.table()))
        messages.extend(f"quantization: {m}" for m in quantization.messages if m != UNUSED_MODEL_MESSAGE)
        if quantization.recipe is not None:
            work = quantization.model
            description = quantization.recipe.describe() + ("" if quantization.goal_met else " (goal missed)")
            stages.add("quantized", work, description, time.monotonic() - t0, metric=quantization.metric,
                       counted=fp32_work)

    # ---------------------------------------------------------------------------------------- export
    artifact: Path | None = None
    if config.export and directory is not None:
        recipe = quantization.recipe if quantization is not None else None
        # The dims the quantization search left free; without one, those that vary in the data seen.
        dynamic_dims = quantization.dynamic_dims if quantization is not None else resolve_dynamic_dims(
            [inputs, *_first_batches(calibration_data, input_fn, 16)], config.dynamic_dims)
        artifact = _export(work, recipe, config, directory, inputs, stages, note, counted=fp32_work,
                           dynamic_dims=dynamic_dims)
    elif config.export:
        note("export skipped: no output_dir given.")
    if directory is not None:
        _note_earlier_outputs(directory, written | ({artifact.name} if artifact is not None else set()), note)

    # ---------------------------------------------------------------------------------------- report
    rows = stages.report_rows(inputs, config)
    for slower in (_slower_shrunk(rows, shrink_report), _slower_int8(rows)):
        if slower:
            note(slower)
    report = CompressionReport(
        stages=rows, metric_name=metric_name,
        test_metric_name=(test_metric_name or "test") if test_fn is not None else None,  # a column, named or not
        batch_size=batch_size(inputs),
        num_threads=config.num_threads or torch.get_num_threads(),
        layer_sparsity=() if result_sparsity is None else result_sparsity.tensors,
        details=tuple(details), messages=tuple(messages), artifact=None if artifact is None else str(artifact),
    )
    logger.info("pipeline finished in %.1f s", time.monotonic() - started)
    return CompressionResult(model=work, report=report, stage_models=stages.models, artifact=artifact,
                             sparsity=result_sparsity, shrink=shrink_report, quantization=quantization,
                             state_files=tuple(directory / name for name in (PRUNED_STATE_FILE, SHRUNK_STATE_FILE)
                                               if name in written))


__all__ = ["CompressionResult", "compress", "preview_shrink", "prune_targets", "weight_sparsity"]
