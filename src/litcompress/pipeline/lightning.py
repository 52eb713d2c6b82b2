"""Lightning adapter for the pipeline: fine-tune with the module's own ``training_step`` and optimizer, judge every
stage with the metric its ``validation_step`` (and ``test_step``) logs.

A thin layer over the framework-free :func:`litcompress.pipeline.compress`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from litcompress._files import cannot_write, folders_in_the_way
from litcompress._numbers import as_python_number
from litcompress.distillation import DistillationConfig
from litcompress.quantization.config import check_metric_mode
from litcompress.quantization.lightning import (QUIET_CPU_TRAINER, MetricCheckedEarly,
                                                check_best_weights_can_be_found, check_fit_end_weights,
                                                check_fit_for_fit_end_work,
                                                check_metric_name, check_output_dir, check_submodule,
                                                check_submodule_name, check_validation_batches, ctrl_c_raises,
                                                detached_copy, first_loader, fit_end_module,
                                                fit_val_dataloaders, float32_for_float32_batches,
                                                inputs_as_steps_give_them,
                                                internal_trainer, known_empty, NO_BATCH,
                                                lightning_eval_fn, lightning_module, on_the_cpu, quiet_unless_asked,
                                                skipped_for_fast_dev_run, trainer_built_quietly,
                                                with_metric_mode)
from litcompress.quantization.tuner import batch_inputs, dataset_of_samples_error, example_as_inputs, model_input_fn

from .compress import OUTPUT_FILES, CompressionResult, compress, folders_message, report_files
from .config import CompressionConfig

logger = logging.getLogger(__name__)


def fit_interruptible(trainer: L.Trainer, model: L.LightningModule, **fit_kwargs: Any) -> None:
    """``trainer.fit(model, **fit_kwargs)``, where Ctrl-C raises KeyboardInterrupt (:func:`ctrl_c_raises`)."""
    with ctrl_c_raises(trainer):
        trainer.fit(model, **fit_kwargs)


class PruneAfterOptimizerSteps(L.Callback):
    """Calls ``step(trainer.global_step)`` after every training batch: the engine prunes when its schedule says so
    (``GradualPruner.step`` ignores a repeated step, as under gradient accumulation). With manual optimization it
    counts training batches instead, as :func:`optimizer_steps` does then: `global_step` counts every optimizer's
    steps (a GAN's two per batch), which no schedule sized before the fit can know."""

    def __init__(self, step: Callable[[int], Any]) -> None:
        self.step = step
        self.batches = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.batches += 1
        self.step(trainer.global_step if pl_module.automatic_optimization else self.batches)


class KeepOutsideFixed(L.Callback):
    """Fine-tuning a sub-module inside its host: the host's layers outside it stay as the pipeline evaluates them
    (the user's), their parameters frozen and their modules in eval mode (a batch norm's statistics too). Trained,
    they would be dropped: only the sub-module is compressed and returned, and judged inside the original host."""

    def __init__(self, host: nn.Module, submodule: str) -> None:
        inside = host.get_submodule(submodule)
        within = {id(p) for p in inside.parameters()}  # a tensor tied into the sub-module trains with it
        self.parameters = [p for p in host.parameters() if id(p) not in within and p.requires_grad]
        ancestors = {".".join(submodule.split(".")[:i]) for i in range(len(submodule.split(".")))}
        below = {id(m) for m in inside.modules()}
        self.modules = [m for name, m in host.named_modules() if name not in ancestors and id(m) not in below]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for parameter in self.parameters:  # before configure_optimizers: one that filters on requires_grad skips them
            parameter.requires_grad_(False)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        for module in self.modules:  # Lightning puts the module in train mode at every epoch: after it
            module.training = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for parameter in self.parameters:
            parameter.requires_grad_(True)


def optimizer_steps(train_batches: int, epochs: int, trainer_kwargs: dict[str, Any]) -> int:
    """Optimizer steps a ``Trainer(max_epochs=epochs, **trainer_kwargs)`` makes over `train_batches` batches (with
    manual optimization, where Lightning refuses gradient accumulation: the batches it trains on)."""
    batches = train_batches
    limit = _train_batch_limit(trainer_kwargs)
    if trainer_kwargs.get("fast_dev_run", False):  # one epoch, whatever max_epochs says
        epochs = 1
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    scheduler = _accumulation_scheduler(trainer_kwargs)
    if scheduler is not None:  # accumulation per epoch (it counted one step per batch: a schedule twice as long)
        total = sum(math.ceil(batches / scheduler.get_accumulate_grad_batches(epoch)) for epoch in range(epochs))
    else:
        total = math.ceil(batches / int(trainer_kwargs.get("accumulate_grad_batches", 1))) * epochs
    max_steps = trainer_kwargs.get("max_steps", -1)
    return min(total, max_steps) if max_steps is not None and max_steps > 0 else total


def _accumulation_scheduler(trainer_kwargs: dict[str, Any]) -> GradientAccumulationScheduler | None:
    """The ``GradientAccumulationScheduler`` among `trainer_kwargs`' callbacks (Lightning takes one at most)."""
    callbacks = trainer_kwargs.get("callbacks") or []
    callbacks = [callbacks] if isinstance(callbacks, L.Callback) else callbacks
    return next((c for c in callbacks if isinstance(c, GradientAccumulationScheduler)), None)


def _train_batch_limit(trainer_kwargs: dict[str, Any]) -> int | float | None:
    """The training batches per epoch a Trainer with `trainer_kwargs` takes at most: ``limit_train_batches``, which
    ``overfit_batches`` (that many batches, or that fraction) and ``fast_dev_run`` (True: one; n: n) override."""
    fast_dev_run, overfit = trainer_kwargs.get("fast_dev_run", False), trainer_kwargs.get("overfit_batches", 0)
    if fast_dev_run:
        return 1 if fast_dev_run is True else int(fast_dev_run)
    if overfit and not isinstance(overfit, bool):
        return overfit
    return trainer_kwargs.get("limit_train_batches")


def _length(loader: Any) -> int | None:
    """``len(loader)``, or None for a loader without one (a DataLoader over an ``IterableDataset``)."""
    try:
        return len(loader)
    except TypeError:  # DataLoader.__len__ raises it for a dataset without __len__
        return None


def _train_batches(loaders: Any) -> int | None:
    """Batches in one training epoch: with several train dataloaders (a list or dict of them), Lightning's default
    ("max_size_cycle") runs as many as the longest has. None when a loader has no length."""
    several = first_loader(loaders) is not loaders
    lengths = [_length(loader) for loader in ((loaders.values() if isinstance(loaders, Mapping) else loaders)
                                              if several else [loaders])]
    return None if None in lengths else max(lengths)


def _fine_tune_steps(loaders: Any, epochs: int, trainer_kwargs: dict[str, Any]) -> int:
    """The optimizer steps the pruning schedule is laid over. A training loader without a length (an
    ``IterableDataset``'s) is sized by an int ``limit_train_batches`` or by ``max_steps``: both bound the run, and a
    run that ends earlier has the rest of its schedule pruned at once, said in the report."""
    batches = _train_batches(loaders)
    if batches is not None:
        return optimizer_steps(batches, epochs, trainer_kwargs)
    limit, max_steps = _train_batch_limit(trainer_kwargs), trainer_kwargs.get("max_steps", -1)
    if isinstance(limit, int) and not isinstance(limit, bool):
        return optimizer_steps(limit, epochs, trainer_kwargs)
    if isinstance(max_steps, int) and max_steps > 0:
        return max_steps
    raise ValueError("compress_lightning(fine_tune_epochs=...): the training dataloader has no length (an "
                     "IterableDataset's), so the pruning schedule cannot be laid over the fine-tuning steps: give "
                     "trainer_kwargs={'max_steps': N} or {'limit_train_batches': N} (an int), or a loader with a "
                     "length (a map-style Dataset).")


def _check_test_metric_source(module: L.LightningModule, datamodule: L.LightningDataModule | None,
                              test_metric: str | None, where: str) -> None:
    """A `test_metric` is logged by the module's ``test_step`` on the DataModule's ``test_dataloader``: both must
    exist (Lightning says so only when the test runs: in CompressOnFitEnd, after the whole fit)."""
    if test_metric is None:
        return
    if not is_overridden("test_step", module):
        raise ValueError(f"{where}(test_metric={test_metric!r}): {type(module).__name__} has no test_step to log "
                         "it; define one, or leave test_metric out.")
    if datamodule is not None and not is_overridden("test_dataloader", datamodule):
        raise ValueError(f"{where}(test_metric={test_metric!r}): {type(datamodule).__name__} has no "
                         "test_dataloader to compute it on; define one, or leave test_metric out.")


def _check_validation_interval(loaders: Any, trainer_kwargs: dict[str, Any]) -> None:
    """An int ``val_check_interval`` longer than a fine-tuning epoch: Lightning refuses it when the fit starts, after
    the input model's evaluation."""
    interval = as_python_number(trainer_kwargs.get("val_check_interval"))
    if isinstance(interval, bool) or not isinstance(interval, int) or trainer_kwargs.get("fast_dev_run") or \
            trainer_kwargs.get("check_val_every_n_epoch", 1) is None:  # (None: validation counted across epochs;
        return  # fast_dev_run: Lightning validates after its batches whatever the interval)
    batches, limit = _train_batches(loaders), as_python_number(_train_batch_limit(trainer_kwargs))
    if isinstance(limit, int) and not isinstance(limit, bool):  # (a loader without a length: the limit bounds it)
        batches = limit if batches is None else min(batches, limit)
    elif batches is not None and isinstance(limit, float):
        batches = int(batches * limit)
    if batches is not None and interval > batches:
        raise ValueError(f"compress_lightning(trainer_kwargs={{'val_check_interval': {interval}}}): a fine-tuning "
                         f"epoch has {batches} training batches; give at most that many, or a fraction of the epoch "
                         "(a float), or check_val_every_n_epoch=None to count batches across epochs.")


def _check_trainer_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse, before any stage runs, arguments the fine-tuning Trainer would fail on (a misspelt one only when it is
    built, after the input model's evaluation) or that contradict the pipeline's."""
    known = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        close = {name: difflib.get_close_matches(name, known, n=1) for name in unknown}
        hints = "; ".join(f"{name!r}: did you mean {match[0]!r}?" for name, match in close.items() if match)
        raise TypeError(f"compress_lightning(trainer_kwargs=...): Trainer takes no {', '.join(map(repr, unknown))}"
                        f"{' (' + hints + ')' if hints else ''}.")
    if "max_epochs" in kwargs:
        raise ValueError("compress_lightning(trainer_kwargs={'max_epochs': ...}): give fine_tune_epochs instead; the "
                         "pruning schedule is laid over exactly those epochs.")
    accumulate = as_python_number(kwargs.get("accumulate_grad_batches", 1))  # (numpy's int64(2) is Lightning's 2)
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        # (0: a ZeroDivisionError sizing the schedule; -1: "compress(fine_tune_steps=-17)"; 2.5: sized as 2)
        raise ValueError(f"compress_lightning(trainer_kwargs={{'accumulate_grad_batches': {accumulate!r}}}): give an "
                         "int >= 1, the batches whose gradients each optimizer step sums.")
    callbacks = kwargs.get("callbacks")
    if callbacks is not None and not isinstance(callbacks, L.Callback) and not (
            isinstance(callbacks, (list, tuple)) and all(isinstance(c, L.Callback) for c in callbacks)):
        # (an AttributeError from inside the fine-tuning fit, after the input model's evaluation)
        raise TypeError(f"compress_lightning(trainer_kwargs={{'callbacks': {callbacks!r}}}): give a Callback or a "
                        "list of them.")
    single = kwargs.get("devices", 1) in (1, "1", [0], (0,), "auto") and kwargs.get("num_nodes", 1) == 1 \
        and kwargs.get("strategy", "auto") in ("auto", "single_device")
    if not single:
        raise ValueError("compress_lightning fine-tunes in this process, on one device (its pruning rounds and the "
                         "evaluations of every stage run here). For multi-device training, prune with "
                         "litcompress.ModelPruning during fit (it keeps ranks in sync) and compress the checkpoint.")


def _fine_tuning_trainer_kwargs(trainer_kwargs: dict[str, Any], epochs: int) -> tuple[dict[str, Any], list]:
    """The fine-tuning Trainer's arguments but its callbacks, and the callbacks given (one alone, as Trainer takes
    it, in a list): litcompress's quiet CPU defaults less those a given callback asks to keep (a ModelCheckpoint,
    a LearningRateMonitor), then `trainer_kwargs`."""
    given = trainer_kwargs.get("callbacks") or []
    given = [given] if isinstance(given, L.Callback) else list(given)
    kwargs = {**quiet_unless_asked(QUIET_CPU_TRAINER, given), **trainer_kwargs, "max_epochs": epochs}
    kwargs.pop("callbacks", None)
    return kwargs, given


def _check_fine_tuning_trainer(kwargs: dict[str, Any], callbacks: list, module: L.LightningModule) -> None:
    """Build the fine-tuning Trainer once before any stage: a value it refuses (`precision="bogus"`) or a callback
    it refuses beside an argument came only after the input model's evaluation. A true half or double precision is
    refused: the fit would convert the pipeline's copy, which every stage evaluates in float32. So are the options
    Lightning refuses under `module`'s manual optimization, which it says only when the fit starts."""
    try:
        trainer = trainer_built_quietly(callbacks=callbacks, **kwargs)
    except Exception as error:  # noqa: BLE001 - Lightning's own words, before any work
        raise ValueError(f"compress_lightning(trainer_kwargs=...): the fine-tuning Trainer cannot be built with them: "
                         f"{type(error).__name__}: {error}") from error
    precision = str(trainer.precision)
    if precision.endswith("-true") and precision != "32-true":
        raise ValueError(f"compress_lightning(trainer_kwargs={{'precision': {kwargs.get('precision')!r}}}): the "
                         f"fit would convert the pipeline's copy to {_TRUE_PRECISION_DTYPES.get(precision, precision)}"
                         ", and every "
                         "stage evaluates, exports and quantizes it in float32; fine-tune in 32-bit or mixed "
                         "precision ('bf16-mixed').")
    if not module.automatic_optimization:
        refused = ([f"'accumulate_grad_batches': {kwargs['accumulate_grad_batches']!r}"]
                   if kwargs.get("accumulate_grad_batches", 1) != 1 else [])
        clip = kwargs.get("gradient_clip_val")
        refused += [f"'gradient_clip_val': {clip!r}"] if clip is not None and clip > 0 else []  # (Lightning's test)
        refused += [f"'callbacks': [{type(c).__name__}(...)]" for c in callbacks
                    if isinstance(c, GradientAccumulationScheduler)]
        if refused:
            raise ValueError(f"compress_lightning(trainer_kwargs={{{', '.join(refused)}, ...}}): "
                             f"{type(module).__name__} uses manual optimization, for which Lightning refuses automatic "
                             "gradient accumulation and clipping (its training_step steps the optimizers itself); drop "
                             "them, or accumulate and clip in training_step.")


def _with_metric_mode(config: CompressionConfig, metric: str, mode: str | None, where: str) -> CompressionConfig:
    """`config` with its quantization goal judging `metric` the way `mode` says (without a quantize stage, `mode`
    only tells the notes which way the metric improves: :func:`compress`'s ``higher_is_better``)."""
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"{where}(config={config!r}): expected a CompressionConfig.")
    if config.quantize is None:
        check_metric_mode(mode, where)
        return config
    return dataclasses.replace(config, quantize=with_metric_mode(config.quantize, metric, mode, where))


class LoadersDataModule(L.LightningDataModule):
    """A DataModule over dataloaders given as they are, as ``trainer.fit(model, train_loader, val_loader)`` takes
    them; ``test_dataloader`` exists only when a test loader is given."""

    def __init__(self, train_dataloaders: Any, val_dataloaders: Any, test_dataloaders: Any = None) -> None:
        super().__init__()
        self._train, self._val, self._test = train_dataloaders, val_dataloaders, test_dataloaders

    def train_dataloader(self) -> Any:
        return self._train

    def val_dataloader(self) -> Any:
        return self._val

    def test_dataloader(self) -> Any:
        if self._test is None:
            raise ValueError("no test dataloader was given: pass test_dataloaders= with test_metric=")
        return self._test


_TRUE_PRECISION_DTYPES = {"16-true": "float16", "bf16-true": "bfloat16", "64-true": "float64"}


def _refuse_a_dataset(loader: Any, argument: str, where: str) -> None:
    """A ``Dataset`` given for a dataloader: its items are single samples, without the batch dim (the first
    evaluation failed inside the module's step, an IndexError, after the whole fit for CompressOnFitEnd)."""
    if isinstance(loader, Dataset) and not isinstance(loader, (DataLoader, IterableDataset)):  # (one may give batches)
        raise dataset_of_samples_error(where, argument, loader)


def _data(datamodule: L.LightningDataModule | None, train: Any, val: Any, test: Any, test_metric: str | None,
          where: str) -> L.LightningDataModule:
    """The DataModule of a run: `datamodule`, or one over the dataloaders given instead."""
    loaders = {"train_dataloaders": train, "val_dataloaders": val, "test_dataloaders": test}
    given = [name for name, loader in loaders.items() if loader is not None]
    for name, loader in loaders.items():
        _refuse_a_dataset(loader, name, where)
    if datamodule is not None:
        if not isinstance(datamodule, L.LightningDataModule):  # (its prepare_data failed: "no attribute")
            raise TypeError(f"{where}(datamodule={type(datamodule).__name__}): expected a LightningDataModule; give "
                            "dataloaders as train_dataloaders= and val_dataloaders= instead.")
        if given:
            raise ValueError(f"{where}(datamodule=..., {', '.join(f'{n}=...' for n in given)}): give a DataModule "
                             "or dataloaders, not both.")
        return datamodule
    if train is None or val is None:
        raise ValueError(f"{where}: give datamodule=, or train_dataloaders= (fine-tuning and calibration) and "
                         "val_dataloaders= (the metric of every stage).")
    if test_metric is not None and test is None:
        raise ValueError(f"{where}(test_metric={test_metric!r}) without test_dataloaders=: give the loader whose "
                         "test_step logs it.")
    if test is not None and test_metric is None:  # the report would have no test column, without a word
        raise ValueError(f"{where}(test_dataloaders=...) without test_metric=: name the metric its test_step logs "
                         "(e.g. test_metric='test_acc'), or leave the test loader out.")
    return LoadersDataModule(train, val, test)


def compress_lightning(
    module: L.LightningModule,
    config: CompressionConfig | None = None,
    *,
    datamodule: L.LightningDataModule | None = None,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    test_dataloaders: Any = None,
    metric: str = "val_acc",
    test_metric: str | None = None,
    fine_tune_epochs: int = 0,
    trainer_kwargs: dict[str, Any] | None = None,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    calibration_data: Iterable | None = None,
    input_fn: Callable[[object], tuple] | None = None,
    submodule: str | None = None,
    output_dir: str | os.PathLike | None = None,
    mode: Literal["max", "min"] | None = None,
    distill: DistillationConfig | None = None,
    outputs_fn: Callable[[Any], torch.Tensor] | None = None,
    trainer: L.Trainer | None = None,
) -> CompressionResult:
    """Run the pipeline on a copy of `module` (never modified; on the CPU), judged by its own logged metrics.

    Args:
        module: the trained LightningModule; with ``submodule=None`` its ``validation_step`` must call
            ``self(...)``, which each stage's model replaces in a private copy.
        config: the stages (:class:`CompressionConfig`).
        datamodule: gives the fine-tuning, validation (and test) data, and calibration batches by default.
        train_dataloaders, val_dataloaders, test_dataloaders: the dataloaders themselves instead of `datamodule`,
            as ``trainer.fit(model, train_loader, val_loader)`` takes them (a test loader only with `test_metric`).
        metric: logged by ``validation_step``; judges quantization candidates and fills the report.
        test_metric: logged by ``test_step``; reported for every stage, never used for decisions.
        fine_tune_epochs: epochs of ``trainer.fit`` while the pruning schedule runs (0: one-shot pruning).
        trainer_kwargs: extra ``Trainer`` arguments for fine-tuning (CPU, no logger, no checkpoints by default).
        example_inputs: the batch used for tracing and timing (default: the inputs of the first validation batch).
        calibration_data: batches for static quantization (default: the training loader).
        input_fn: maps a batch to the model's positional inputs (default: ``x`` of ``(x, y)`` pairs, ``x, mask`` of
            ``((x, mask), y)``, of ``(x, mask)`` and ``(x, mask, y)`` for a forward of two inputs, and the values of
            a dict batch's keys named like forward's parameters; ``lambda batch: (batch,)`` for a forward that
            takes the dict itself).
        submodule: compress ``module.get_submodule(submodule)`` (a dotted path too) instead of the whole module.
            It alone fine-tunes: the layers outside it stay as they are (frozen, in eval mode), as the result is
            judged inside the module given.
        output_dir: where the pruned (and shrunk) state dicts and the exported model go; the report files are
            written by ``result.report.save(output_dir)``. With `submodule`, the state dicts are `module`'s (they
            load into the module class), the exported model is the submodule's.
        mode: "max" (higher `metric` is better) or "min" (a loss), as for Lightning's ``ModelCheckpoint``; None keeps
            ``config.quantize.accuracy``'s direction, and refuses a metric named like a loss or an error under the
            default higher-is-better goal. Without a quantize stage it tells the report's notes which way is better
            (a loss that fell after pruning is not noted as lost).
        distill: fine-tune against the input model as a frozen teacher (knowledge distillation,
            :class:`litcompress.callbacks.KnowledgeDistillation`): the training step's loss becomes
            ``(1 - alpha) * loss + alpha * distillation`` on the outputs of the model (or `submodule`) it calls.
            Needs ``fine_tune_epochs``. The outputs are checked on `example_inputs` before any stage.
        outputs_fn: with `distill`, picks the logits from the model's outputs (default: the outputs, a mapping's
            ``"logits"``, or a tuple's first tensor; a model returning ``(features, logits)`` needs
            ``lambda outputs: outputs[1]``).
        trainer: lends its validation and test limits (``limit_val_batches``, ``limit_test_batches``) to the stages'
            evaluations, which run on a trainer of litcompress's own, as ``quantize_lightning``'s does; it is left
            as it was (``CompressOnFitEnd`` lends the fit's: the input row scores what the fit logged).
    """
    # a module left on a GPU by its fit: a CPU copy, where the int8 kernels run
    module = on_the_cpu(lightning_module(module, "compress_lightning"))
    fine_tune_epochs = as_python_number(fine_tune_epochs)  # numpy's int64 too, as find_lottery_ticket's rounds
    if isinstance(fine_tune_epochs, bool) or not isinstance(fine_tune_epochs, int) or fine_tune_epochs < 0:
        raise ValueError(f"compress_lightning(fine_tune_epochs={fine_tune_epochs!r}): expected an int >= 0.")
    check_metric_name("metric", metric, "compress_lightning", "validation_step")
    if test_metric is not None:
        check_metric_name("test_metric", test_metric, "compress_lightning", "test_step")
    if trainer is not None and not isinstance(trainer, L.Trainer):  # (read after the input model's evaluation)
        raise TypeError(f"compress_lightning(trainer={trainer!r}): expected a lightning Trainer (whose "
                        "limit_val_batches and limit_test_batches the stages' evaluations take) or None.")
    if trainer_kwargs is not None and not isinstance(trainer_kwargs, Mapping):
        raise TypeError(f"compress_lightning(trainer_kwargs={trainer_kwargs!r}): expected a dict of Trainer "
                        "arguments for the fine-tuning, e.g. {'limit_train_batches': 10}, or None.")
    if trainer_kwargs and not fine_tune_epochs:
        warnings.warn(f"compress_lightning(trainer_kwargs={dict(trainer_kwargs)!r}) without fine_tune_epochs: they "
                      "are the fine-tuning Trainer's arguments, and nothing fine-tunes, so they are not used (the "
                      "stages' evaluations take trainer=...'s limit_val_batches and limit_test_batches).",
                      stacklevel=2)
    config = _with_metric_mode(config if config is not None else CompressionConfig(), metric, mode,
                               "compress_lightning")
    if fine_tune_epochs and config.prune is None:
        raise ValueError("compress_lightning(fine_tune_epochs=...) without config.prune: fine-tuning runs while "
                         "pruning; give CompressionConfig(prune=PruneConfig(...)) or fine_tune_epochs=0.")
    if distill is not None:
        if not isinstance(distill, DistillationConfig):
            raise TypeError(f"compress_lightning(distill={distill!r}): expected a DistillationConfig or None.")
        if not fine_tune_epochs:
            raise ValueError("compress_lightning(distill=...) without fine_tune_epochs: distillation happens while "
                             "the pruned model fine-tunes; give fine_tune_epochs >= 1 (the CLI: --prune-epochs).")
        if not module.automatic_optimization:
            raise ValueError(f"compress_lightning(distill=...): {type(module).__name__} uses manual optimization, "
                             "whose training_step runs backward itself, so no distillation term can join its loss.")
    if outputs_fn is not None and (distill is None or not callable(outputs_fn)):
        raise ValueError(f"compress_lightning(outputs_fn={outputs_fn!r}): " + (
            "it picks the logits that distillation reads; give it with distill=DistillationConfig(...)."
            if distill is None else "expected a function of the model's outputs, e.g. lambda outputs: outputs[1]."))
    check_submodule(module, submodule, "compress_lightning")
    if output_dir is not None:  # a file there failed with torch's or the OS's words ("Not a directory")
        check_output_dir(output_dir, "compress_lightning")
    datamodule = _data(datamodule, train_dataloaders, val_dataloaders, test_dataloaders, test_metric,
                       "compress_lightning")
    _check_test_metric_source(module, datamodule, test_metric, "compress_lightning")
    trainer_kwargs = dict(trainer_kwargs or {})
    _check_trainer_kwargs(trainer_kwargs)
    if fine_tune_epochs:
        _check_fine_tuning_trainer(*_fine_tuning_trainer_kwargs(trainer_kwargs, fine_tune_epochs), module)
    max_steps = trainer_kwargs.get("max_steps")
    if fine_tune_epochs and not module.automatic_optimization and isinstance(max_steps, int) and max_steps > 0:
        warnings.warn(f"compress_lightning: {type(module).__name__} uses manual optimization, so the pruning schedule "
                      f"counts training batches, while max_steps={max_steps} bounds every optimizer's steps "
                      "(trainer.global_step): with several optimizer steps per batch (a GAN's two) the fine-tuning "
                      "stops before the schedule ends, and the rest is pruned at once after it. Bound it with "
                      "limit_train_batches instead.", stacklevel=2)
    # as a Trainer does before `setup`: a DataModule's setup may read what its prepare_data downloads or writes
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("validate")  # as the stages' trainer.validate does: a DataModule may build its val set there
    if fine_tune_epochs:
        _check_validation_interval(datamodule.train_dataloader(), trainer_kwargs)
    check_validation_batches(datamodule.val_dataloader(), "compress_lightning", example_read=example_inputs is None)
    if calibration_data is None and config.quantize is not None and config.quantize.approach == "static" and \
            known_empty(first_loader(datamodule.train_dataloader())):  # (refused by compress's or quantize's name)
        raise ValueError("compress_lightning: the training dataloader is empty, and it gives static quantization's "
                         "calibration batches by default: give it batches, or calibration_data=.")
    # a bf16-true or 64-true fit's module beside the loaders' float32 batches: evaluated and compressed in a float32
    # copy (before its steps are run on a batch to find the model's inputs)
    module = float32_for_float32_batches(module, datamodule.val_dataloader(), input_fn, "compress_lightning",
                                         submodule)
    # a module that prepares its batches in its steps: the inputs its validation_step gives the model
    calibration_batches = config.quantize.num_calibration_batches if config.quantize is not None else 16
    example_inputs, calibration_data, input_fn = inputs_as_steps_give_them(
        module, datamodule.val_dataloader(), datamodule.train_dataloader(), example_inputs=example_inputs,
        calibration_data=calibration_data, input_fn=input_fn, submodule=submodule,
        calibration_batches=calibration_batches)
    # a dict batch is read by the names of forward's parameters (of the submodule's, with one)
    input_fn = input_fn or model_input_fn(module if submodule is None else module.get_submodule(submodule))
    if example_inputs is None:
        first_batch = next(iter(first_loader(datamodule.val_dataloader())), NO_BATCH)
        if first_batch is NO_BATCH:  # (a bare StopIteration) a loader without a length
            raise ValueError("compress_lightning: the first validation dataloader gives no batch, and the example "
                             "inputs (tracing, timing) are read from it: give it batches, or example_inputs=.")
        example_inputs = batch_inputs(input_fn, first_batch)
    if calibration_data is None:
        calibration_data = first_loader(datamodule.train_dataloader())
        if known_empty(calibration_data):  # not needed (static quantization's was refused above)
            calibration_data = None

    host = detached_copy(module)
    if submodule is None:
        # Tracing/export reads every property; an unattached module's `trainer` raises unless this flag (the one
        # Lightning's own to_torchscript sets) is on. Our copy only.
        host._jit_is_scripting = True
    target = host if submodule is None else host.get_submodule(submodule)
    if distill is not None:
        _check_distillable(target, example_inputs, input_fn, outputs_fn, distill)

    def fine_tune(model: nn.Module, step: Callable[[int], Any]) -> None:
        trained = model if submodule is None else host
        if submodule is not None:
            host.set_submodule(submodule, model)  # the pipeline's working copy, trained in place inside the host
        if not trained.training:
            # a module evaluated before (model.eval()): Lightning's fit keeps every module's mode, so its batch norms
            # would fine-tune on frozen statistics and its dropout stay off (digits ResNet: 40% instead of 90%)
            logger.info(f"compress_lightning: {type(trained).__name__} was given in eval mode; its fine-tuning copy "
                        "trains in train mode (put a layer in eval mode inside a training module to freeze it).")
            trained.train()
        kwargs, given = _fine_tuning_trainer_kwargs(trainer_kwargs, fine_tune_epochs)
        # (first: the user's callbacks see the layers outside the sub-module as they train, fixed)
        callbacks = [*([KeepOutsideFixed(host, submodule)] if submodule is not None else []), *given,
                     PruneAfterOptimizerSteps(step)]
        if distill is not None:  # the teacher: the input model, which `compress` leaves as it is (it prunes a copy)
            # imported here: litcompress.callbacks imports this module (CompressOnFitEnd)
            from litcompress.callbacks.distillation import KnowledgeDistillation
            callbacks.append(KnowledgeDistillation(target, temperature=distill.temperature, alpha=distill.alpha,
                                                   kind=distill.kind, submodule=submodule, outputs_fn=outputs_fn))
        fitting = L.Trainer(callbacks=callbacks, **kwargs)  # (not the `trainer` given, which lends its limits)
        attached = datamodule.trainer
        try:
            fit_interruptible(fitting, trained, datamodule=datamodule)
        finally:  # the user's DataModule stays attached to their trainer, not to this one (and its model copy)
            datamodule.trainer = attached

    # counted only to fine-tune: a loader without a length serves every other stage as it is
    steps = _fine_tune_steps(datamodule.train_dataloader(), fine_tune_epochs, trainer_kwargs) if fine_tune_epochs \
        else 0
    if fine_tune_epochs and not steps and config.prune is not None:  # (it pruned in one shot, saying to fine-tune)
        raise ValueError(f"compress_lightning(fine_tune_epochs={fine_tune_epochs}): the fine-tuning would make no "
                         "optimizer step: the training dataloader gives no batch (fewer samples than a batch with "
                         "drop_last=True?), or trainer_kwargs' limit_train_batches leaves none of its batches. Give "
                         "it batches, or fine_tune_epochs=0 to prune in one shot.")
    # (a limit of 0, a fit that skipped validation, would judge on nothing: the whole set then)
    evaluator = None if trainer is None else internal_trainer(limit_val_batches=trainer.limit_val_batches or 1.0,
                                                              limit_test_batches=trainer.limit_test_batches or 1.0)
    result = compress(
        target, config,
        eval_fn=lightning_eval_fn(module, datamodule, metric, trainer=evaluator, submodule=submodule),
        test_fn=None if test_metric is None else lightning_eval_fn(module, datamodule, test_metric, trainer=evaluator,
                                                                   submodule=submodule, stage="test"),
        example_inputs=example_inputs, calibration_data=calibration_data, input_fn=input_fn,
        fine_tune=fine_tune if fine_tune_epochs and steps else None, fine_tune_steps=steps or None,
        output_dir=output_dir, metric_name=metric, test_metric_name=test_metric,
        fine_tune_description=distill.describe() if distill is not None else None,
        higher_is_better=None if mode is None else mode == "max",
    )
    if submodule is not None:
        for path in result.state_files:
            _keyed_for_host(path, module, submodule)
    return result


def _keyed_for_host(path: Path, host: nn.Module, submodule: str) -> None:
    """Rewrite the state dict at `path`, the compressed `submodule`'s, as `host`'s: its keys under the submodule's
    path (as the host holds them: ``net._orig_mod.0.weight`` for a compiled one) beside the host's own entries
    outside it (fixed while fine-tuning: the user's, pruned ones as their effective values). An outer entry that is
    a submodule's tensor under another name (a tied weight, a layer of it registered twice) takes the compressed
    value too (found by identity), or loading it would put the user's back; the submodule, or a layer of it,
    registered twice has the file's whole state under both names. The file then loads into the module the
    user built (``Module().load_state_dict``, or ``load_shrunk_state_dict(Module(), ...)``), as a whole module's
    files do."""
    from collections import OrderedDict

    from litcompress._files import written_atomically
    from litcompress.pruning.engine import permanent_state_dict
    from litcompress.pruning.narrow import keyed_as_compiled_parts

    inside = torch.load(path, map_location="cpu", weights_only=False)  # the file this run just wrote
    prefix = f"{submodule}."
    prefixed: Any = OrderedDict((prefix + key, value) for key, value in inside.items())
    # the modules' versions, by module name (a batch norm's tells how to read its state)
    prefixed._metadata = OrderedDict(((prefix + name).rstrip("."), info)
                                     for name, info in getattr(inside, "_metadata", {}).items())
    prefixed = keyed_as_compiled_parts(host, prefixed)  # (written with a compiled part's eager keys)
    # the submodule, or a layer of it, registered under other names too (`self.alias = self.net`, `self.first =
    # self.net[0]`): its whole state under each, as the file holds it (a layer shrink replaced or gave a bias, with
    # keys the host's does not have, included)
    root = host.get_submodule(submodule)
    within_modules = {id(module) for module in root.modules()}
    names_of: dict[int, list[str]] = {}
    for name, module in host.named_modules(remove_duplicate=False):
        if id(module) in within_modules:
            names_of.setdefault(id(module), []).append(name)
    held_as = next((name for name in names_of[id(root)] if any(key.startswith(f"{name}.") for key in prefixed)), None)
    aliases: list[tuple[str, str]] = []  # (another name, the name the file holds it under)
    if held_as is not None:
        for names in names_of.values():
            source = next((name for name in names if name == held_as or name.startswith(f"{held_as}.")), None)
            aliases += [(name, source) for name in names if source is not None and name != source
                        and not (name == held_as or name.startswith(f"{held_as}."))]
        # (a name inside another alias, `alias.attn` beside `alias`, comes with that one's copy)
        aliases = [(name, source) for name, source in aliases
                   if not any(name.startswith(f"{other}.") for other, _ in aliases)]
    copies: Any = OrderedDict((alias + key[len(source):], value) for alias, source in aliases
                              for key, value in prefixed.items() if key.startswith(f"{source}."))
    copies._metadata = OrderedDict((alias + name[len(source):], info) for alias, source in aliases
                                   for name, info in prefixed._metadata.items()
                                   if name == source or name.startswith(f"{source}."))
    # the host's tensors by identity: a name that holds one of the submodule's (a compiled part's path to it, a
    # second registration, a tie) is found whatever its prefix, and a pruned one by its leaf (`weight_orig`)
    inside_by_tensor: dict[int, str] = {}
    for key in prefixed:
        tensor = _leaf_named(host, key)
        if tensor is not None:
            inside_by_tensor.setdefault(id(tensor), key)
    within = {id(tensor) for tensor in root.state_dict(keep_vars=True).values()}
    outer = permanent_state_dict(host)
    state: Any = OrderedDict()
    for key, value in outer.items():
        if key.startswith(tuple(f"{alias}." for alias, _ in aliases)):
            continue  # (copied whole above)
        tensor = _leaf_named(host, key)
        twin = inside_by_tensor.get(id(tensor)) if tensor is not None else None
        if twin is not None:
            if twin != key:
                state[key] = prefixed[twin]
        elif tensor is None or id(tensor) not in within:  # (a submodule tensor the file lacks: shrink replaced it)
            state[key] = value
    state.update(prefixed)
    state.update(copies)
    state._metadata = OrderedDict((name, info) for name, info in getattr(outer, "_metadata", {}).items()
                                  if name != submodule and not name.startswith(prefix))
    state._metadata.update(prefixed._metadata)
    state._metadata.update(copies._metadata)
    with written_atomically(path) as partial:
        torch.save(state, partial)


def _leaf_named(module: nn.Module, key: str) -> torch.Tensor | None:
    """The parameter or buffer a state-dict `key` of `module` stands for (a pruned tensor's ``<name>_orig`` leaf for
    ``<name>``), or None (extra state, a name it does not have)."""
    from litcompress.pruning.engine import trainable_tensor

    path, _, name = key.rpartition(".")
    try:
        holder = module.get_submodule(path)
    except AttributeError:
        return None
    tensor = trainable_tensor(holder, name) if hasattr(holder, name) else None
    return tensor if isinstance(tensor, torch.Tensor) else None


def _check_distillable(model: nn.Module, example_inputs: Any, input_fn: Callable[[object], tuple] | None,
                       outputs_fn: Callable[[Any], torch.Tensor] | None, distill: DistillationConfig) -> None:
    """The tensor distillation reads, found in the model's outputs for `example_inputs` before any stage: outputs
    without one, or with one logit per row under ``kind="kl"``, failed at the first fine-tuning batch, after the
    input model's evaluation. (A model that fails on them is left to the pipeline's own check, which says so.)"""
    from litcompress.distillation.loss import default_outputs, distillation_loss

    modes = [(module, module.training) for module in model.modules()]  # a layer held in eval mode stays so
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(*example_as_inputs(model, example_inputs, input_fn))
    except Exception:
        return
    finally:
        for module, training in modes:
            module.training = training
    try:
        picked = (outputs_fn or default_outputs)(outputs)
        if not isinstance(picked, torch.Tensor):
            raise TypeError(f"outputs_fn returned {type(picked).__name__} for the model's outputs, not the tensor of "
                            "logits to distill on.")
        distillation_loss(picked.float(), picked.float(), distill.temperature, distill.kind)
    except (TypeError, ValueError) as error:
        raise ValueError(f"compress_lightning(distill=...): on example_inputs, {error}") from error


class CompressOnFitEnd(MetricCheckedEarly):
    """Run the pipeline on the trained module when ``fit`` ends (shrink -> quantize -> export, with the report).

    Pair it with a pruning callback (``litcompress.ModelPruning`` with a schedule) to prune while training::

        Trainer(callbacks=[ModelPruning("ln_structured", amount=schedule, pruning_dim=0, ...),
                           CompressOnFitEnd(CompressionConfig(quantize=PTQConfig()), output_dir="out")])

    A ``config.prune`` here prunes the trained module once more, one-shot. The result is in ``self.result``; the
    report files are written to `output_dir` with the model (the plot when matplotlib is installed, unless
    ``plot=False``). The data is the fit's: its DataModule, or the dataloaders ``trainer.fit`` was given (then a
    `test_metric` needs ``test_dataloaders``, or the module's own ``test_dataloader()``). ``weights="best"``
    compresses the weights of the best file of the trainer's ``ModelCheckpoint(monitor=...)`` instead of those the
    fit ends with (``"last"``). `input_fn` maps a
    batch to the model's positional inputs, as for :func:`compress_lightning` (``lambda batch: (batch,)`` for a
    forward that takes the batch's dict itself).
    """

    def __init__(self, config: CompressionConfig, *, metric: str = "val_acc", test_metric: str | None = None,
                 output_dir: str | os.PathLike, submodule: str | None = None, plot: bool | None = None,
                 mode: Literal["max", "min"] | None = None, test_dataloaders: Any = None,
                 weights: Literal["last", "best"] = "last", input_fn: Callable[[object], tuple] | None = None) -> None:
        if not isinstance(config, CompressionConfig):
            raise TypeError(f"CompressOnFitEnd(config={config!r}): expected a CompressionConfig.")
        if config.prune is not None and not isinstance(config.prune.schedule, str):  # it failed after the whole fit
            raise ValueError(f"CompressOnFitEnd: config.prune.schedule={config.prune.schedule!r} runs along "
                             "fine-tuning steps, and CompressOnFitEnd prunes the trained module once, when the fit "
                             "ends. Use PruneConfig(schedule='oneshot'), or prune during the fit with "
                             "litcompress.ModelPruning(amount=<the schedule>) and leave prune=None here.")
        check_metric_name("metric", metric, "CompressOnFitEnd", "validation_step")
        if test_metric is not None:
            check_metric_name("test_metric", test_metric, "CompressOnFitEnd", "test_step")
        elif test_dataloaders is not None:  # compress_lightning refused it after the whole fit
            raise ValueError("CompressOnFitEnd(test_dataloaders=...) without test_metric=: name the metric its "
                             "test_step logs (e.g. test_metric='test_acc'), or leave the test loader out.")
        _refuse_a_dataset(test_dataloaders, "test_dataloaders", "CompressOnFitEnd")
        check_output_dir(output_dir, "CompressOnFitEnd")
        check_submodule_name(submodule, "CompressOnFitEnd")
        if input_fn is not None and not callable(input_fn):
            raise TypeError(f"CompressOnFitEnd(input_fn={input_fn!r}): expected a function of a batch that returns "
                            "the model's positional inputs.")
        check_fit_end_weights(weights, "CompressOnFitEnd")
        if plot is not None and not isinstance(plot, bool):  # 'False' was truthy: the plot was written
            raise TypeError(f"CompressOnFitEnd(plot={plot!r}): expected True, False or None (the plot when "
                            "matplotlib is installed).")
        self.weights = weights
        config = _with_metric_mode(config, metric, mode, "CompressOnFitEnd")  # before training, not after it
        self.config, self.metric, self.test_metric, self.mode = config, metric, test_metric, mode
        self.output_dir, self.submodule, self.plot = output_dir, submodule, plot
        self.test_dataloaders, self.input_fn = test_dataloaders, input_fn
        self.result: CompressionResult | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.result = None  # this fit's, once it ends: a fit skipped or stopped left the last one's
        check_fit_for_fit_end_work(trainer, "CompressOnFitEnd", "stage",
                                   "litcompress.compress_lightning (or `litcompress compress --checkpoint`)")
        check_best_weights_can_be_found(trainer, self.weights, "CompressOnFitEnd")
        # (rank 0 writes the files; fast_dev_run none) a folder that cannot be written failed after the whole fit
        if trainer.is_global_zero and not trainer.fast_dev_run:
            why = cannot_write(Path(os.fspath(self.output_dir)))
            if why is not None:
                raise ValueError(f"CompressOnFitEnd(output_dir={os.fspath(self.output_dir)!r}): cannot write there "
                                 f"({why}).")
            folders = folders_in_the_way(Path(os.fspath(self.output_dir)), (*OUTPUT_FILES, *report_files(self.plot)))
            if folders:
                raise ValueError(f"CompressOnFitEnd(output_dir={os.fspath(self.output_dir)!r}): "
                                 f"{folders_message(folders)}")
        if trainer.datamodule is None and self.test_metric is not None and self.test_dataloaders is None \
                and not is_overridden("test_dataloader", pl_module):
            raise ValueError(f"CompressOnFitEnd(test_metric={self.test_metric!r}) in a fit given dataloaders: "
                             "pass CompressOnFitEnd(test_dataloaders=...) too, the loader whose test_step logs it (or "
                             f"give {type(pl_module).__name__} a test_dataloader()).")
        if trainer.datamodule is not None and self.test_dataloaders is not None:  # they would be left unused
            raise ValueError("CompressOnFitEnd(test_dataloaders=...) in a fit given a DataModule: the test metric is "
                             f"logged on {type(trainer.datamodule).__name__}.test_dataloader(); drop test_dataloaders, "
                             "or fit on dataloaders.")
        _check_test_metric_source(pl_module, trainer.datamodule, self.test_metric, "CompressOnFitEnd")

    _OWNER = "CompressOnFitEnd"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        # here, not in `setup`: the module's own setup and configure_model (called after this callback's setup) may
        # build the sub-module; still before the sanity check and any training step
        check_submodule(pl_module, self.submodule, "CompressOnFitEnd")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # torch's generator as the fit left it: its calibration, evaluation and fine-tuning draws leave no trace on
        # what the script does next (a second model's initialisation, say)
        with torch.random.fork_rng(devices=[]):
            self._work_on_fit_end(trainer, pl_module)

    def _work_on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return  # Ctrl-C ends the run: no compression of a half-trained model
        if skipped_for_fast_dev_run(trainer, "CompressOnFitEnd", "compress"):
            return
        pl_module = fit_end_module(trainer, pl_module, self.weights, "CompressOnFitEnd")
        if trainer.datamodule is not None:
            data: dict[str, Any] = {"datamodule": trainer.datamodule}
        else:
            train, val = _fit_loaders(trainer)
            if val is None:
                raise ValueError("CompressOnFitEnd: found no validation dataloader of this fit, whose metric judges "
                                 "every stage: pass val_dataloaders to trainer.fit.")
            test = self.test_dataloaders
            if test is None and self.test_metric is not None:  # the module's own hook (setup checked there is one)
                pl_module.setup("test")  # as trainer.test calls it first: the hook may read what it builds
                test = pl_module.test_dataloader()
            data = {"train_dataloaders": train, "val_dataloaders": val, "test_dataloaders": test}
        self.result = compress_lightning(pl_module, self.config, **data, metric=self.metric,
                                         test_metric=self.test_metric, submodule=self.submodule,
                                         output_dir=self.output_dir, mode=self.mode, input_fn=self.input_fn,
                                         trainer=trainer)  # the fit's validation limits: the score it logged
        self.result.report.save(self.output_dir, plot=self.plot)


def _fit_loaders(trainer: L.Trainer) -> tuple[Any, Any]:
    """The training and validation dataloaders of a fit given dataloaders (or a module's ``*_dataloader`` hooks).
    ``trainer.val_dataloaders`` is filled only once the validation loop has run (not with ``num_sanity_val_steps=0``
    and no validation epoch in the fit): then they are read from where Lightning keeps their source, as its own check
    for validation data (:func:`~litcompress.quantization.lightning.has_validation_data`) does. ``is None``, never
    truthiness: that calls ``len`` on a loader, which one over an ``IterableDataset`` has not."""
    train = trainer.train_dataloader
    if train is None:
        try:
            train = trainer.fit_loop._data_source.dataloader()
        except AttributeError:  # Lightning moved its source: what the trainer holds
            pass
    return train, fit_val_dataloaders(trainer)


__all__ = ["CompressOnFitEnd", "LoadersDataModule", "PruneAfterOptimizerSteps", "compress_lightning",
           "optimizer_steps"]
