"""`QuantizationAwareTraining`: fine-tune a LightningModule through int8 rounding, and get the int8 model at fit end.

Lightning 1.x had a callback of this name (eager ``torch.ao.quantization``, removed in Lightning 2.0); this one is a
thin adapter over :mod:`litcompress.quantization.qat` (torchao's PT2E QAT, the flow torch maintains).

How it plugs in: from epoch ``start_epoch`` on, the model's ``forward`` (the LightningModule's, or `submodule`'s) runs
its fake-quantized graph, traced on the first inputs the training step gives it. The graph trains the model's own
parameters, so the optimizer the Trainer built goes on updating them, and the module's ``state_dict`` keeps its
architecture's keys: every checkpoint loads into the plain model. The graph's own state (the observers' ranges) is
the callback's, in the checkpoint's callback state, so ``trainer.fit(ckpt_path=...)`` resumes QAT where it stopped.
At fit end the original ``forward`` is back (the weights are the QAT-trained ones) and ``result`` holds the int8
model.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.core.module import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

from litcompress._numbers import as_python_number
from litcompress.callbacks.pruning import _in_spawned_worker, _info_on_rank_zero
from litcompress.callbacks.schedule_checks import steps_in_epoch
from litcompress.pruning.engine import compiled_module_names
from litcompress.quantization.backends.pt2e import check_cpp_compiler
from litcompress.quantization.lightning import check_save_path, make_save_path_folder
from litcompress.quantization.qat import (
    QATConfig,
    QATModel,
    QATResult,
    check_float32_parameters,
    check_layer_names,
    compile_converted,
    frozen_inside,
    frozen_inside_message,
    masks_refused_message,
    modules_pruned_with_masks,
    prepare_qat,
    sparse_weight_masks,
)

log = logging.getLogger(__name__)


_OWNER = "QuantizationAwareTraining"


class _QATForward:
    """The instance ``forward`` of the quantized module while QAT runs: prepares the graph on its first call (on the
    inputs the step gives it), then runs it in the module's train/eval mode."""

    def __init__(self, callback: "QuantizationAwareTraining", module: nn.Module) -> None:
        self.callback, self.module = callback, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError(f"{_OWNER}: the model was called with keyword arguments {sorted(kwargs)}; the QAT graph "
                            "is traced on positional tensors: call it with them (self.net(x), not self.net(x=x)).")
        if not all(isinstance(arg, torch.Tensor) for arg in args):
            raise TypeError(f"{_OWNER}: {type(self.module).__name__} was called with "
                            f"({', '.join(type(arg).__name__ for arg in args)}); the QAT graph is traced on "
                            "positional tensors: give the model the tensors (self.net(batch['x']), not "
                            "self.net(batch)), or quantize it after training (QuantizeOnFitEnd, which takes "
                            "containers).")
        qat = self.callback._prepared(self.module, args)
        qat.train(self.module.training)
        if not self.module.training:
            self.callback._validated_through_qat = True
        return qat(*args)


class QuantizationAwareTraining(Callback):
    """Quantization-aware training from epoch `start_epoch` to the end of the fit, then conversion to int8.

    Args:
        submodule: the attribute of the LightningModule that is quantized (``"net"``); None: the LightningModule's
            own ``forward`` (its steps must call ``self(...)``).
        start_epoch: the first epoch trained through int8 rounding (0: all of them). QAT is a fine-tuning stage: a
            few epochs from a trained model are the usual recipe.
        config: :class:`~litcompress.quantization.qat.QATConfig` (layers kept fp32, ``reduce_range``,
            ``keep_sparsity``).
        metric: a metric the validation step logs (``"val_acc"``): the int8 model is evaluated on the validation data
            at fit end and the value kept in ``metric_value`` (and logged).
        freeze_ranges_epoch: from this epoch on the observers are off in training too, so the int8 ranges stay as
            they are (:meth:`~litcompress.quantization.qat.QATModel.freeze_ranges_`; None: they observe every QAT
            step). Also right in a fit resumed from a checkpoint written before the freeze, whose graph is traced
            only at its first step (a hand-written freeze in ``on_train_epoch_start`` finds ``qat`` None there).
            The callback used again for a further fit of the same module goes on with its graph, frozen ranges
            included, from that fit's first epoch: `start_epoch` counts in the first fit only (fp32 epochs there
            would move the weights away from the graph's int8 ranges, which QAT then clipped them to).
        save_path: where to write the int8 model (a ``.pt2`` program, :func:`litcompress.load_quantized` reads it).
        compile: convert with ``torch.compile`` (see :meth:`~litcompress.quantization.qat.QATModel.convert`): the
            int8 model in ``result`` then runs on fused int8 kernels instead of torch's slower reference ops.

    After ``trainer.fit``: ``result`` (a :class:`~litcompress.quantization.qat.QATResult`: ``result.model`` is the
    int8 model, ``result.save(path)`` writes it). Under DDP the observers' ranges are synced after every step and
    every process converts the same model (rank 0 writes ``save_path``; a spawned launcher, ``ddp_spawn``, needs it,
    since ``result`` stays in the workers). A model pruned in the same fit is refused (its masks are computed in
    forward): prune in one fit (``make_pruning_permanent=True``), then run QAT in a second; ``keep_sparsity`` keeps
    the zeros.
    """

    def __init__(self, submodule: str | None = None, *, start_epoch: int = 0, config: QATConfig | None = None,
                 metric: str | None = None, save_path: str | os.PathLike | None = None, compile: bool = False,
                 freeze_ranges_epoch: int | None = None) -> None:
        if submodule is not None and (not isinstance(submodule, str) or not submodule):
            raise TypeError(f"{_OWNER}(submodule={submodule!r}): give the attribute name of the module to quantize "
                            "(e.g. 'net'), or None for the LightningModule's own forward.")
        start_epoch = as_python_number(start_epoch)  # (numpy's int64(1) was refused)
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"{_OWNER}(start_epoch={start_epoch!r}): give the first QAT epoch, an int >= 0.")
        if freeze_ranges_epoch is not None:
            freeze_ranges_epoch = as_python_number(freeze_ranges_epoch)
            if isinstance(freeze_ranges_epoch, bool) or not isinstance(freeze_ranges_epoch, int) \
                    or freeze_ranges_epoch <= start_epoch:
                # at start_epoch the ranges would be those of QAT's first batch alone
                raise ValueError(f"{_OWNER}(freeze_ranges_epoch={freeze_ranges_epoch!r}): give the first epoch "
                                 f"whose training keeps the int8 ranges fixed, an int > start_epoch={start_epoch} "
                                 "(the observers need QAT epochs to find them), or None.")
        config = QATConfig() if config is None else config
        if not isinstance(config, QATConfig):
            raise TypeError(f"{_OWNER}(config={config!r}): expected a litcompress.quantization.qat.QATConfig.")
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise ValueError(f"{_OWNER}(metric={metric!r}): name a metric the validation step logs, e.g. 'val_acc'.")
        if not isinstance(compile, bool):
            raise TypeError(f"{_OWNER}(compile={compile!r}): use True or False.")
        if save_path is not None:
            check_save_path(save_path, _OWNER)
        self.submodule, self.start_epoch, self.config = submodule, start_epoch, config
        self.metric, self.save_path, self.compile = metric, save_path, compile
        self.freeze_ranges_epoch = freeze_ranges_epoch
        self._freeze_due = False  # the current epoch is freeze_ranges_epoch or later: freeze a graph traced now
        self.qat: QATModel | None = None
        self.result: QATResult | None = None
        self.metric_value: float | None = None
        self._validated_through_qat = False  # in the current validation, the QAT graph ran
        self._module: nn.Module | None = None
        self._pending_state: dict[str, torch.Tensor] | None = None  # from a checkpoint, loaded once prepared
        self._pending_masks: dict[str, torch.Tensor] | None = None  # likewise: the held zeros' masks
        # keep_sparsity with a later start_epoch: the zeros the fit started with, held through the fp32 epochs (they
        # would grow back before the QAT graph could take its masks), by the module's parameter names
        self._early_masks: dict[str, torch.Tensor] | None = None
        self._early_pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (parameter, its mask) in this fit
        self._distributed = False
        self._continuing = False  # this fit goes on with an earlier fit's graph (set in setup)

    # ---- set-up: what would fail later fails here -------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # what an earlier fit took or loaded and left unused (it ended before its graph was traced): this fit's is
        # taken at its start, or loaded from its checkpoint after this hook. Kept, another module got the first
        # one's zeros, or its own zeros were not held.
        self._pending_state = self._pending_masks = self._early_masks = self._early_pairs = None
        if trainer.world_size > 1 and not _data_parallel(trainer.strategy):
            raise ValueError(f"{_OWNER} runs on one device or under DDP (strategy='ddp', 'ddp_spawn', ...); "
                             f"{type(trainer.strategy).__name__} shards or wraps the parameters, which the QAT graph, "
                             "traced on the module itself, would not train. Fine-tune with QAT under DDP or on one "
                             "device (it is a short stage).")
        if trainer.world_size > 1 and self.save_path is None and _in_spawned_worker(trainer):
            raise ValueError(f"{_OWNER}: under strategy={type(trainer.strategy).__name__} with a spawned or forked "
                             "launcher the fit runs in worker processes, which build the int8 model; this process's "
                             "callback never sees it (`result` would stay None). Give save_path=... (rank 0 writes "
                             "the model there; litcompress.load_quantized reads it), or use strategy='ddp'.")
        # (a resumed fit's checkpoint, restored after this hook, says whether it went on with an earlier graph; the
        # refusal is here all the same, before Lightning loads the checkpoint's weights into the module, and again in
        # on_fit_start: a new callback resuming a further fit is refused here, start_epoch=0 being the same)
        self._continuing = self._continues_graph(pl_module)
        self._refuse_a_fit_that_ends_before_qat(trainer)
        if str(trainer.precision) not in ("32-true", "32"):
            how = ("autocast computes the graph's ops in a lower precision" if "mixed" in str(trainer.precision)
                   else "the graph would be cast to another dtype")
            raise ValueError(f"{_OWNER}: precision={trainer.precision!r}; QAT trains a float32 graph of fake-quantized "
                             f"ops and converts it to int8 from float32, which this precision breaks ({how}). "
                             "Fine-tune with QAT under precision='32-true' (it is a short stage).")
        if self.compile:
            check_cpp_compiler(f"{_OWNER}(compile=True)")  # compile=True converts with inductor: else after the fit
        # a folder that cannot be written fails here, not after the fit (fast_dev_run skips the conversion and the
        # file: no folder for it either)
        if self.save_path is not None and trainer.is_global_zero and not trainer.fast_dev_run:
            make_save_path_folder(self.save_path, _OWNER)
        if self.metric is not None and trainer.limit_val_batches == 0:  # the int8 model is judged on the fit's limit
            raise ValueError(f"{_OWNER}(metric={self.metric!r}) evaluates the int8 model on the fit's validation data "
                             "at fit end, which limit_val_batches=0 leaves out: drop that limit, or metric=None.")
        if self.metric is not None:
            from litcompress.quantization.lightning import has_validation_data

            if not has_validation_data(trainer):  # the int8 model is judged on it after all the training
                raise ValueError(f"{_OWNER}(metric={self.metric!r}) evaluates the int8 model on the validation data "
                                 "at fit end, and this fit has none: trainer.fit(model, datamodule=...) with a "
                                 "val_dataloader, or trainer.fit(model, train_loader, val_loader); or metric=None.")
        from litcompress.callbacks.distillation import KnowledgeDistillation

        inner = [cb.submodule for cb in trainer.callbacks if isinstance(cb, KnowledgeDistillation) and cb.submodule
                 is not None and (self.submodule is None or cb.submodule.startswith(self.submodule + "."))]
        if inner:  # its hook would be traced into the QAT graph: the teacher called once, the batch size fixed
            quantized = "the LightningModule" if self.submodule is None else repr(self.submodule)
            raise ValueError(f"{_OWNER}: KnowledgeDistillation(submodule={inner[0]!r}) distils a layer inside "
                             f"{quantized}, which this callback quantizes as one traced graph: the distillation's "
                             "hook would be traced into it (the teacher called once, at the trace). Distil "
                             f"{quantized} itself or a module outside it, or quantize {inner[0]!r} instead "
                             f"({_OWNER}({inner[0]!r})).")
        nested = [cb.submodule for cb in trainer.callbacks if isinstance(cb, QuantizationAwareTraining)
                  and cb is not self and _nested(cb.submodule, self.submodule)]
        if nested:  # the inner one's forward would be traced into the outer graph, which then fails to export
            raise ValueError(f"{_OWNER}: two callbacks quantize {self.submodule!r} and {nested[0]!r}, one inside "
                             "the other (None: the LightningModule); each traces its module into one graph. Quantize "
                             "the outer module once (QATConfig(fp32_layers=...) keeps layers in fp32), or modules "
                             "side by side.")
        pruning = [type(cb).__name__ for cb in trainer.callbacks if _prunes_in_fit(cb)]
        if pruning:
            raise ValueError(f"{_OWNER}: {pruning} prune(s) in the same fit, with masks computed in forward that the "
                             "int8 conversion cannot fold. Prune in one fit (ModelPruning(make_pruning_permanent="
                             "True)), then fine-tune with QAT in a second: QATConfig(keep_sparsity=True) keeps the "
                             "zeros.")

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        # again, with a resumed fit's state restored: the callback used again, resumed from a checkpoint of a fit
        # that had not reached QAT, is no further fit of its graph (setup could not know)
        self._refuse_a_fit_that_ends_before_qat(trainer)
        self._early_pairs = None  # this fit's parameters (a resumed fit's module is another object)
        # the fit's, not torch.distributed's: a process group another fit left initialised is no reason to sync
        self._distributed = trainer.world_size > 1
        # here, not in setup: a module that builds its layers in configure_model has them only now
        self._module = self._quantized_module(pl_module)
        _check_not_compiled(pl_module, self._module, self.submodule)
        check_layer_names(self._module, self.config.fp32_layers)  # before any training, not at the first QAT step
        check_float32_parameters(self._module, _OWNER)
        masked = modules_pruned_with_masks(self._module)
        if masked:  # here, not after the fp32 epochs (pruning callbacks, which would remove masks, are refused)
            raise ValueError(masks_refused_message(_OWNER, masked))
        if self.qat is not None and self.qat.model is not self._module:
            # the callback reused for the fit of another module: its graph trains the first one's parameters
            self.qat, self.result, self.metric_value, self._pending_state = None, None, None, None
            self._early_masks = None
        if (self.config.keep_sparsity and self.qat is None and self._pending_masks is None
                and self._early_masks is None and trainer.current_epoch < self.start_epoch):
            self._early_masks = sparse_weight_masks(self._module)

    def _refuse_a_fit_that_ends_before_qat(self, trainer: "pl.Trainer") -> None:
        # fast_dev_run forces max_epochs=1: a later start_epoch is its run skipping QAT, said at fit end
        if not trainer.fast_dev_run and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self.start_epoch \
                and not self._continuing:
            raise ValueError(f"{_OWNER}(start_epoch={self.start_epoch}): the fit ends after {trainer.max_epochs} "
                             f"epoch(s), so QAT would never start; use start_epoch < max_epochs (to resume a further "
                             "fit, which goes on through QAT from its first epoch, start_epoch=0 is the same).")

    def _continues_graph(self, pl_module: LightningModule) -> bool:
        """Whether this fit goes on with the QAT graph an earlier fit of the same module traced (the callback used
        again): it then trains through that graph from its first epoch."""
        if self.qat is None:
            return False
        try:
            return self.qat.model is self._quantized_module(pl_module)
        except ValueError:  # (said by on_fit_start)
            return False

    def _quantized_module(self, pl_module: LightningModule) -> nn.Module:
        if self.submodule is None:
            return pl_module
        try:
            module = pl_module.get_submodule(self.submodule)
        except AttributeError:
            children = [name for name, _ in pl_module.named_children()]
            raise ValueError(f"{_OWNER}(submodule={self.submodule!r}): {type(pl_module).__name__} has no such module; "
                             f"its modules are {children}.") from None
        return module

    # ---- the fit ---------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        # a fit resumed from a checkpoint saved at an epoch's last batch (`every_n_train_steps`) starts the next epoch
        # without its `on_train_epoch_start`: that epoch would train without the QAT graph
        self._install_if_due(trainer, pl_module)
        if trainer.fast_dev_run:
            return
        steps_before = self._steps_before(trainer, pl_module)
        if self.freeze_ranges_epoch is not None and not (self.qat is not None and self.qat.ranges_frozen):
            # (frozen: a callback used again for a further fit of the same module goes on with its graph)
            by_epochs = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self.freeze_ranges_epoch
            by_steps = steps_before is not None and steps_before(self.freeze_ranges_epoch)[0] >= trainer.max_steps
            if by_epochs or by_steps:
                limit = f"max_epochs={trainer.max_epochs}" if by_epochs else f"max_steps={trainer.max_steps}"
                rank_zero_warn(f"{_OWNER}(freeze_ranges_epoch={self.freeze_ranges_epoch}): the fit ends at {limit}, "
                               "before that epoch: the int8 ranges are observed to the end.")
        if steps_before is None or not self.start_epoch or self._continuing:
            return
        total, per_epoch = steps_before(self.start_epoch)
        if total >= trainer.max_steps:
            each = (f"{per_epoch[0]} optimizer step(s) per epoch" if len(set(per_epoch)) == 1
                    else f"{total} optimizer steps in the epochs before")
            raise ValueError(f"{_OWNER}(start_epoch={self.start_epoch}): the fit stops at max_steps="
                             f"{trainer.max_steps}, {each}, before epoch "
                             f"{self.start_epoch} starts: QAT would never run. Lower start_epoch or raise max_steps.")

    @staticmethod
    def _steps_before(trainer: "pl.Trainer", pl_module: LightningModule) -> Any:
        """``epoch -> (optimizer steps in the epochs before it, per epoch)`` where a fit stops at a `max_steps`; None
        where that is not known or not counted (no max_steps; manual optimization, whose batch makes as many steps
        as it takes; an iterable without a length)."""
        if trainer.max_steps is None or trainer.max_steps < 0 or not pl_module.automatic_optimization:
            return None
        counted = steps_in_epoch(trainer)  # (a GradientAccumulationScheduler's factors counted)
        if counted is None:
            return None

        def steps_before(epoch: int) -> tuple[int, list[int]]:
            per_epoch = [counted[0](e) for e in range(epoch)]
            return sum(per_epoch), per_epoch

        return steps_before

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._install_if_due(trainer, pl_module)

    def _install_if_due(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        """From `start_epoch` on, the quantized module's forward is the QAT graph's (traced at its first call); from
        `freeze_ranges_epoch` on, its observers are off (the graph's now, or the one the next step traces)."""
        self._freeze_due = self.freeze_ranges_epoch is not None and trainer.current_epoch >= self.freeze_ranges_epoch
        if self._freeze_due and self.qat is not None:
            self.qat.freeze_ranges_()
        if (trainer.current_epoch >= self.start_epoch or self._continuing) and not self._installed():
            module = self._module or self._quantized_module(pl_module)
            masked = modules_pruned_with_masks(module)
            if masked:  # said before the first QAT step, not by its trace
                raise ValueError(masks_refused_message(_OWNER, masked))
            self._module = module
            module.forward = _QATForward(self, module)  # an instance attribute: shadows the class's forward

    def _installed(self) -> bool:
        return self._module is not None and isinstance(self._module.__dict__.get("forward"), _QATForward)

    def _prepared(self, module: nn.Module, args: tuple) -> QATModel:
        if self.qat is None:
            del module.forward  # trace the module's own forward
            # without the hooks around it (KnowledgeDistillation's reads the outputs): `module.__call__` still runs
            # them around the graph, which would otherwise hold them a second time (and their shapes, fixed)
            hooks = _hooks_of(module)
            traced_hooks = _hooked_descendants(module)
            if traced_hooks:
                rank_zero_warn(f"{_OWNER}: forward hooks on {', '.join(traced_hooks[:4])}"
                               f"{' ...' if len(traced_hooks) > 4 else ''} inside {type(module).__name__} are traced "
                               "into its QAT graph: they run once, at the trace, not at every step (a hook that "
                               "records activations or adds a loss sees no QAT step). Register them on "
                               f"{type(module).__name__} itself, whose hooks stay outside the graph, or outside it.")
            frozen = frozen_inside(module)
            try:
                with warnings.catch_warnings():  # said below, once (on rank 0) and in the callback's words
                    warnings.filterwarnings("ignore", message=r"prepare_qat: .* in eval mode inside ")
                    self.qat = prepare_qat(module, args, self.config, copy=False)
            finally:
                _restore_hooks(module, hooks)
                module.forward = _QATForward(self, module)
            if self._pending_state is not None:
                self.qat.load_fake_quant_state(self._pending_state)
                self._pending_state = None
            if self._freeze_due:  # a fit resumed into a frozen epoch from a checkpoint written before the freeze
                self.qat.freeze_ranges_()
            if self._pending_masks is not None:  # the zeros the interrupted fit held, not those its weights have
                self.qat.load_held_masks(self._pending_masks)
                self._pending_masks = None
            elif self._early_masks is not None:  # the fit's starting zeros, held so far: the graph's parameters are
                by_id = {id(p): self._early_masks[name] for name, p in module.named_parameters()  # the module's
                         if name in self._early_masks}
                self.qat.load_held_masks({name: by_id[id(p)] for name, p in self.qat.graph.named_parameters()
                                          if id(p) in by_id})
            self._early_masks = None
            if self._distributed:  # each process observed its own first batch: every step starts from one range
                self.qat.sync_ranges_()
            if module.training and frozen:  # (as they were before the trace, which may set modes)
                rank_zero_warn(frozen_inside_message(_OWNER, module, frozen).replace("quantized model",
                                                                                        "quantized submodule"))
            if not module.training:  # the first call is a training step's
                rank_zero_warn(f"{_OWNER}: {type(module).__name__} is in eval mode while training (Lightning keeps "
                               "a submodule's mode, e.g. of a model evaluated before fit), so its QAT graph trains in "
                               "evaluation form: batch norm on running statistics and the observers off, the int8 "
                               "ranges those of the first batch. Call .train() on it before fit unless you froze it "
                               "on purpose.")
            held = f"; zeros of {len(self.qat.held_sparse)} weight(s) held" if self.qat.held_sparse else ""
            _info_on_rank_zero(f"{_OWNER}: {type(module).__name__} trains through int8 rounding from here "
                               f"({self.qat.recipe.describe()}{held}).", log)
        return self.qat

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # a QAT batch trained without the QAT graph (a step that returned None skipped its batch, which Lightning
        # hands on as {} or None: it may have run nothing)
        skipped = outputs is None or (isinstance(outputs, dict) and not outputs)
        if self._installed() and self.qat is None and not skipped:
            children = [name for name, _ in pl_module.named_children()]
            where = "the LightningModule's own forward (submodule=None)" if self.submodule is None else \
                f"the forward of {self.submodule!r}"
            raise ValueError(f"{_OWNER}: the training step did not call {where}: it computes its outputs another way "
                             "(e.g. self.net(x) instead of self(x)), so nothing would train through int8 rounding. "
                             f"Pass submodule=<the module the steps call> (the modules of {type(pl_module).__name__}:"
                             f" {children}).")
        if self.qat is not None:
            # after the optimizer step: checkpoints and validation see the held zeros, not the step's regrowth
            self.qat.apply_masks_()
        elif self._early_masks:
            if self._early_pairs is None:  # once per fit, not at every step
                module = self._module or self._quantized_module(pl_module)
                self._early_pairs = [(param, self._early_masks[name].to(param.device))
                                     for name, param in module.named_parameters() if name in self._early_masks]
            with torch.no_grad():
                for param, mask in self._early_pairs:
                    param.mul_(mask)
        if self.qat is not None and self._distributed:
            self.qat.sync_ranges_()  # DDP syncs the weights; the observers' ranges are the graph's, synced here

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._validated_through_qat = False
        # the metrics training logged: a name only training_step logs is not the validation's
        self._metrics_before = dict(trainer.callback_metrics)  # (the objects: a value logged anew is another)

    def on_sanity_check_end(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        # a misspelt metric is otherwise met at the first validation, which may come only after the fit's last epoch
        if self.metric is not None:
            from litcompress.quantization.lightning import warn_if_sanity_check_missed

            warn_if_sanity_check_missed(trainer, pl_module, self.metric, _OWNER)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        if self.metric is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        from litcompress.quantization.lightning import logged_metrics, missing_metric_message

        if self._installed() and not self._validated_through_qat:
            # its metric is then the fp32 model's during QAT, and the int8 model would score alike at fit end
            where = "the LightningModule's own forward (self(x))" if self.submodule is None else \
                f"the forward of {self.submodule!r}"
            raise ValueError(f"{_OWNER}(metric={self.metric!r}): {type(pl_module).__name__}.validation_step did "
                             f"not call {where}, which QAT replaced, so the {self.metric!r} it logs is not the "
                             "fake-quantized model's, and the int8 model could not be judged by it at fit end. Let "
                             "the validation step call the module the training step trains through, or pass "
                             "submodule=<the module both call>.")

        # at the fit's first validation, not after its last epoch (the int8 model is judged by it then)
        if getattr(self, "_metric_checked_in_fit", None) is trainer:  # (a metric logged at some validations only)
            return
        self._metric_checked_in_fit = trainer
        # (not what training logged: a training_step's `train_loss` passed, and the fit failed at its end)
        before = getattr(self, "_metrics_before", {})
        logged = {name: value for name, value in trainer.callback_metrics.items() if before.get(name) is not value}
        step = f"{type(pl_module).__name__}.validation_step"
        if not logged:  # a batch ran (this is a validation's end), and nothing it logged reached the epoch's metrics
            raise KeyError(f"{_OWNER}(metric={self.metric!r}): nothing {step} logged reached the validation's "
                           "metrics: a value logged with on_epoch=False does not (log it with on_epoch=True, the "
                           "default there), nor does any when no batch ran (an empty dataloader, limit_val_batches "
                           "of 0).")
        message = missing_metric_message(self.metric, logged_metrics([logged]), step)
        if message is not None:
            raise KeyError(f"{_OWNER}(metric={self.metric!r}): {message}")

    def on_train_end(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        if self.qat is not None and self._distributed:
            # DDP gives every process rank 0's buffers before each forward; after the last one, each process's batch
            # norm statistics are its own batches'. Every process converts rank 0's model, the one checkpoints hold.
            # Here, not at fit end: the strategy's teardown then has moved the module to the CPU, where an NCCL group
            # cannot broadcast.
            for buffer in self._module.buffers():
                torch.distributed.broadcast(buffer, src=0)
        # training is over: every callback's on_fit_end (a QuantizeOnFitEnd listed first, an export) sees the model's
        # own forward, whatever the order of the callbacks
        self._restore_forward()

    def _restore_forward(self) -> None:
        if self._installed():
            del self._module.forward

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._restore_forward()
        if self.qat is None:
            self.result, self.metric_value = None, None  # (an earlier fit's: this one built none)
            if trainer.fast_dev_run:
                _info_on_rank_zero(f"{_OWNER}: QAT starts at epoch {self.start_epoch}, which fast_dev_run does not "
                                   "reach.", log)
                return
            if self._pending_state is not None:  # QAT ranges from the checkpoint, and no step to trace a graph on
                by_steps = trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step
                limit = (f"step {trainer.global_step} of max_steps={trainer.max_steps}" if by_steps
                         else f"epoch {trainer.current_epoch} of max_epochs={trainer.max_epochs}")
                rank_zero_warn(f"{_OWNER}: the fit was resumed from a checkpoint written at its end ({limit}): "
                               "nothing was left to train, so no QAT graph was traced and no int8 model built. Raise "
                               f"{'max_steps' if by_steps else 'max_epochs'} to train on, or resume from an earlier "
                               "checkpoint.")
                return
            rank_zero_warn(f"{_OWNER}: the fit ended before QAT started (start_epoch={self.start_epoch}, "
                           f"{trainer.current_epoch} epoch(s) run): no int8 model was built.")
            return
        if trainer.fast_dev_run:
            self.result, self.metric_value = None, None  # (an earlier fit's: not this one's training)
            _info_on_rank_zero(f"{_OWNER}: conversion skipped under fast_dev_run; `result` stays None.", log)
            return
        self.result = self.qat.convert()  # resets the held zeros in the module's weights too
        # the file first: what follows (compiling, evaluating) can fail without losing the trained int8 model
        if self.save_path is not None and trainer.is_global_zero:
            size = self.result.save(self.save_path)
            _info_on_rank_zero(f"{_OWNER}: int8 model written to {os.fspath(self.save_path)} "
                               f"({size / 1024:.1f} KiB).", log)
        if self.compile:  # the same program, on fused int8 kernels (saved files are the same either way)
            self.result.model = compile_converted(self.result.model.program, self.result.example_inputs)
        if self.metric is not None:
            self.metric_value = self._evaluate(trainer, pl_module, self.result.model)
            _info_on_rank_zero(f"{_OWNER}: the int8 model's {self.metric} is {self.metric_value:.6g}.", log)

    def _evaluate(self, trainer: "pl.Trainer", pl_module: LightningModule, model: nn.Module) -> float:
        from litcompress.quantization.lightning import fit_val_dataloaders, internal_trainer, lightning_eval_fn

        datamodule = trainer.datamodule
        # the loaders even when no validation ran in this fit (Lightning fills val_dataloaders only then)
        loaders = None if datamodule is not None else fit_val_dataloaders(trainer)
        evaluator = internal_trainer(limit_val_batches=trainer.limit_val_batches)  # the fit's validation limit
        with warnings.catch_warnings():
            if trainer.world_size > 1:  # one process beside the fit's process group: Lightning advises each of the
                # step's logs to pass sync_dist=True, which this trainer ignores (the mean over ranks is taken below)
                warnings.filterwarnings("ignore", r"It is recommended to use `self\.log\(", PossibleUserWarning)
            value = lightning_eval_fn(pl_module, datamodule, self.metric, trainer=evaluator, dataloaders=loaders,
                                      submodule=self.submodule)(model)
        if trainer.world_size > 1:  # the fit's loaders give each process its shard: the mean, as sync_dist logs it
            # on the process's own device: the module is on the CPU by now, and NCCL reduces CUDA tensors only
            value = float(trainer.strategy.reduce(
                torch.tensor(value, dtype=torch.float64, device=trainer.strategy.root_device), reduce_op="mean"))
        return value

    def on_exception(self, trainer: "pl.Trainer", pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_forward()  # the user's module is left as it was built

    def teardown(self, trainer: "pl.Trainer", pl_module: LightningModule, stage: str) -> None:
        self._restore_forward()
        self._loading_for = None  # (set by an evaluation's checkpoint: a later load_state_dict is for a fit)

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # one callback per quantized submodule may join a fit; the default's key stays the class name it always was
        if self.submodule is None:
            return super().state_key
        return self._generate_state_key(submodule=self.submodule)

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        from litcompress.callbacks.pruning import restore_state_under_class_key

        # validate/test/predict(ckpt_path=...) load the weights only: the QAT state is a fit's (taken, it dropped the
        # graph a finished fit left in `qat`); Lightning calls load_state_dict only when the checkpoint holds the key
        self._loading_for = trainer.state.fn
        restore_state_under_class_key(self, trainer, checkpoint)  # written before the key named the submodule

    def state_dict(self) -> dict[str, Any]:
        fake_quant = self.qat.fake_quant_state() if self.qat is not None else self._pending_state
        held = self.qat.held_masks() if self.qat is not None else self._pending_masks
        return {"start_epoch": self.start_epoch, "fake_quant": fake_quant, "held_masks": held,
                "early_masks": self._early_masks if self.qat is None else None,
                "continues_graph": self._continuing}  # a further fit: QAT from its first epoch, resumed alike

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if getattr(self, "_loading_for", None) not in (None, "fit"):  # an evaluation's checkpoint: the weights only
            return
        self._pending_state = state_dict.get("fake_quant")
        self._pending_masks = state_dict.get("held_masks")  # absent in checkpoints of earlier versions: recomputed
        self._early_masks = state_dict.get("early_masks")
        # the checkpoint's fit, not this object's past: a further fit's goes on through QAT from its first epoch
        self._continuing = bool(state_dict.get("continues_graph", False))
        self.qat = None  # prepared again, on the resumed fit's first QAT step, then given this state


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs")


def _hooks_of(module: nn.Module) -> dict[str, dict]:
    """Take `module`'s own forward (pre-)hooks off it, returned to be put back with `_restore_hooks`."""
    taken = {}
    for name in _HOOK_DICTS:
        hooks = getattr(module, name, None)
        if hooks is not None:
            taken[name] = dict(hooks)
            hooks.clear()
    return taken


def _hooked_descendants(module: nn.Module) -> list[str]:
    """The layers inside `module` with forward (pre-)hooks of their own, torch's weight computations aside
    (``weight_norm``, ``spectral_norm``: traced as they should be), and the pruning engine's, which recompute pruned
    weights (none is left once the masks are made permanent, as QAT asks)."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    from litcompress.pruning.engine import is_bypass_hook

    found = []
    for name, sub in module.named_modules():
        hooks = [hook for dict_name in _HOOK_DICTS if dict_name != "_forward_hooks_always_called"
                 for hook in getattr(sub, dict_name, {}).values()]
        if name and any(not isinstance(hook, (WeightNorm, SpectralNorm)) and not is_bypass_hook(hook)
                        for hook in hooks):
            found.append(name)
    return found


def _restore_hooks(module: nn.Module, taken: dict[str, dict]) -> None:
    for name, hooks in taken.items():
        getattr(module, name).update(hooks)


def _data_parallel(strategy: Any) -> bool:
    """DDP in any of its launchers, where every process holds the whole module (not FSDP, not DeepSpeed's engine)."""
    from lightning.pytorch.strategies import DDPStrategy

    return isinstance(strategy, DDPStrategy) and "DeepSpeed" not in type(strategy).__name__


def _check_not_compiled(pl_module: LightningModule, module: nn.Module, submodule: str | None) -> None:
    """ValueError for a ``torch.compile``'d fit or module: QAT exports the module's eager forward and runs the graph
    of fake-quantized ops in its place, which dynamo cannot trace around (a fit of ``torch.compile(module)`` runs
    the training step compiled) and an ``OptimizedModule`` has no eager forward to replace."""
    if isinstance(vars(pl_module).get("_compiler_ctx"), dict):
        raise ValueError(f"{_OWNER}: this fit is of torch.compile({type(pl_module).__name__}), whose compiled "
                         "training step cannot run the QAT graph that replaces the quantized module's forward (it "
                         "is exported and swapped in during the fit). Fit the module itself; compile the int8 model "
                         f"afterwards ({_OWNER}(compile=True) does).")
    compiled = compiled_module_names(module)
    if compiled:
        prefix = "" if submodule is None else submodule + "."
        names = ", ".join(repr((prefix + name).rstrip(".")) if prefix + name else "the LightningModule"
                          for name in compiled)
        raise ValueError(f"{_OWNER}: {names} {'is' if len(compiled) == 1 else 'are'} torch.compile'd; QAT exports "
                         "the eager forward and replaces it with a graph of fake-quantized ops. Fit with the eager "
                         "module (its ._orig_mod), and compile the int8 model afterwards "
                         f"({_OWNER}(compile=True) does).")


def _nested(first: str | None, second: str | None) -> bool:
    """Whether one of two submodule names (None: the LightningModule) is the other or inside it."""
    if first is None or second is None:
        return True
    return first == second or first.startswith(second + ".") or second.startswith(first + ".")


def _prunes_in_fit(callback: Callback) -> bool:
    """A pruning callback that keeps masks in forward while the fit runs (Lightning's or litcompress's)."""
    from lightning.pytorch.callbacks import ModelPruning as LightningModelPruning

    from litcompress.callbacks.pruning import ModelPruning
    from litcompress.callbacks.structures import StructurePruning

    return isinstance(callback, (LightningModelPruning, ModelPruning, StructurePruning))
