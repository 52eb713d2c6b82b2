"""Lottery tickets with a Lightning `Trainer`: a thin adapter over :func:`litcompress.pruning.imp.iterative_magnitude_pruning`."""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities.model_helpers import is_overridden

from litcompress._numbers import as_python_number
from litcompress.callbacks.pruning import _in_spawned_worker, _weight_averaging_callbacks
from litcompress.pruning.imp import (LotteryTicket, check_checkpoint_path, checked_search_arguments,
                                     iterative_magnitude_pruning)
from litcompress.quantization.lightning import (check_metric_name, ctrl_c_raises, detached_copy, logged_metrics,
                                                missing_metric_message, quiet_unless_asked, trainer_built_quietly)

# a callback given that Lightning refuses beside a quiet default turns that default off (quiet_unless_asked)
_QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


class _StopAtStep(Callback):
    """Ends the fit once `step` optimizer steps are done; with `checkpoint`, saves the fit there first (a mid-epoch
    checkpoint that Lightning resumes at that very step, as ``ModelCheckpoint(every_n_train_steps=...)``'s)."""

    def __init__(self, step: int, checkpoint: Optional[Path] = None, retrain_from_it: bool = False) -> None:
        self.step, self.checkpoint, self.retrain_from_it = step, checkpoint, retrain_from_it

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the fit's length is known now: a step it never reaches is refused before its training, not after
        total = trainer.estimated_stepping_batches
        if not isinstance(total, (int, float)) or not math.isfinite(total):
            return
        if not pl_module.automatic_optimization and len(trainer.optimizers) > 1:
            return  # its steps are its optimizers' (several per batch, or not): the fit's length in them is unknown
        if total < self.step:
            raise ValueError(_unreached_step_message(self.step, int(total)))
        if self.retrain_from_it and self.step >= total:
            raise ValueError(_step_at_the_end_message(self.step, int(total)))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            if self.checkpoint is not None:
                # under DDP only rank 0 writes: every rank reads rank 0's file (each made its own temporary folder)
                self.checkpoint = trainer.strategy.broadcast(self.checkpoint)
                trainer.save_checkpoint(self.checkpoint)
            trainer.should_stop = True


def _unreached_step_message(step: int, steps: int) -> str:
    return (f"`rewind_to_step={step}`: the fit is {steps} optimizer steps long, so it never reaches it. Rewind to "
            "an earlier step, or train longer (`trainer_kwargs`' max_epochs / max_steps).")


def _step_at_the_end_message(step: int, steps: int) -> str:
    return (f"`rewind_to_step={step}` with retrain_from='rewind_point': the fit is {steps} optimizer steps long, so "
            "every round would resume at its end and train nothing (the table would score untrained rewound "
            "networks). Rewind to an earlier step, or train longer.")


def _resumed_at_rewind_point(rewind_point: Path, model: LightningModule, reset_optimizer: bool, rank: int) -> Path:
    """A copy of the rewind point's checkpoint that resumes the fit there with `model`'s weights and masks (the
    rewound ones), the optimizer's state cleared with `reset_optimizer` (its learning rates kept), and no callback
    state (the callbacks start every round as they were before the first). One file per DDP rank, which each
    removes when its fit is done."""
    if not rewind_point.exists():  # a search resumed from its checkpoint_path, without the file kept beside it
        raise FileNotFoundError(f"retrain_from='rewind_point' resumes every round from the fit saved at step k, "
                                f"{rewind_point}, which is gone. Pass another checkpoint_path to start afresh.")
    checkpoint = torch.load(rewind_point, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v  # (extra state)
                                for k, v in model.state_dict().items()}
    if reset_optimizer:
        for state in checkpoint.get("optimizer_states", []):
            state["state"] = {}
    checkpoint.pop("callbacks", None)
    path = rewind_point.with_name(f"{rewind_point.name}.round{rank}")
    torch.save(checkpoint, path)
    return path


def _quiet_restore(record: logging.LogRecord) -> bool:
    """Leaves out Lightning's "Restoring states from the checkpoint path at ..." lines: every round resumes from a
    temporary file of ours, which would be named twice per round."""
    return not record.getMessage().startswith(("Restoring states from the checkpoint", "Restored all states from"))


def _copied_state(callback: Callback) -> dict[str, Any]:
    """A copy of `callback`'s state, or {} (left as it is across rounds) when that state cannot be copied."""
    try:
        return copy.deepcopy(callback.state_dict())
    except Exception:  # noqa: BLE001 - a user's callback holding something deepcopy refuses (a lock, a file)
        return {}


def _described(value: Any) -> Any:
    """`value` as plain data that compares equal across processes: numbers, strings and containers as they are,
    anything else (a callback, a logger, a profiler) by its class name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _described(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [_described(v) for v in value]
    return type(value).__name__


def _described_settings(value: Any) -> Any:
    """:func:`_described`, with the callbacks whose settings change what a round trains (an EarlyStopping's
    patience ends it elsewhere, a GradientAccumulationScheduler's schedule steps otherwise) also by those: the
    public attributes named like their constructor's arguments. Any other callback is its class, as before (a
    progress bar's refresh rate, a checkpoint's folder, a callback that stops a test's run change no round)."""
    if isinstance(value, (EarlyStopping, GradientAccumulationScheduler)):
        arguments = set(inspect.signature(type(value).__init__).parameters) - {"self"}
        return {"class": type(value).__qualname__,
                **{name: _described(setting) for name, setting in sorted(vars(value).items()) if name in arguments
                   and (setting is None or isinstance(setting, (bool, int, float, str, Mapping)))}}
    if isinstance(value, Mapping):
        return {str(k): _described_settings(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [_described_settings(v) for v in value]
    return _described(value)


def _pruning_callbacks(callbacks: list[Callback]) -> list[str]:
    """The callbacks that prune the module themselves (litcompress's and Lightning's)."""
    from lightning.pytorch.callbacks import ModelPruning as LightningModelPruning

    from litcompress.callbacks.heads import HeadPruning
    from litcompress.callbacks.pruning import ModelPruning
    from litcompress.callbacks.units import UnitPruning

    return [type(callback).__name__ for callback in callbacks
            if isinstance(callback, (ModelPruning, LightningModelPruning, HeadPruning, UnitPruning))]


def _check_fraction_leaves_a_batch(trainer: Trainer, limit: object, option: str, evaluate_on: str) -> None:
    """A fraction of the evaluation loader that Lightning rounds down to no batch (``int(len * limit)``): refused
    now, not by Lightning at the first round's evaluation, after its training (the check ran on one batch)."""
    if not isinstance(limit, float) or not 0 < limit < 1:
        return
    loaders = trainer.test_dataloaders if evaluate_on == "test" else trainer.val_dataloaders
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        try:
            length = len(loader)
        except TypeError:  # an iterable dataset: no length to take a fraction of
            continue
        if int(length * limit) == 0:
            raise ValueError(f"trainer_kwargs[{option!r}]={limit} of the {length} batches of the {evaluate_on} "
                             f"dataloader is no batch (Lightning takes int({length} * {limit}) = 0) to evaluate the "
                             "rounds on: give a larger fraction, or a number of batches (an int).")


def _a(value: Any) -> str:
    return f"the class {value.__qualname__}" if isinstance(value, type) else f"a {type(value).__qualname__}"


def _described_module(module: LightningModule | LightningDataModule) -> Any:
    hparams = dict(getattr(module, "hparams", {}) or {})
    return {"class": type(module).__qualname__, "hparams": _described(hparams)}


def find_lottery_ticket(
    module: LightningModule,
    datamodule: Optional[LightningDataModule],
    *,
    metric: str,
    rounds: int,
    rate: float = 0.2,
    layer_rates: Optional[Mapping[str, float]] = None,
    trainer_kwargs: Optional[Mapping[str, Any]] = None,
    rewind_to_step: Optional[int] = None,
    evaluate_on: Literal["test", "validate"] = "test",
    parameter_names: Sequence[str] = ("weight",),
    exclude: Sequence[str] = (),
    scope: Literal["local", "global"] = "local",
    control: str = "final",
    retrain_from: Literal["start", "rewind_point"] = "start",
    reset_optimizer: bool = True,
    checkpoint_path: Optional[str | os.PathLike[str]] = None,
) -> LotteryTicket:
    """Iterative magnitude pruning where every round is ``Trainer(**trainer_kwargs).fit(module, datamodule)``.

    `metric` names a value the module logs in ``test_step`` (or ``validation_step`` with
    ``evaluate_on="validate"``). ``rewind_to_step=k`` first trains the first k optimizer steps of such a fit (its
    learning-rate schedule sized for the whole fit) and rewinds there instead of to initialisation. A fresh
    `Trainer` (and so a fresh optimizer) is built for every round, and the callbacks of `trainer_kwargs` start every
    round from the state they had before the first (an ``EarlyStopping``'s best score and patience count); a
    weight-averaging callback is refused (it copies the module at every fit's start, which a pruned one cannot be).
    `module` itself is not modified; see :func:`~litcompress.pruning.imp.iterative_magnitude_pruning` for the other
    arguments.

    ``retrain_from="start"`` trains every round (and the random re-initialisation control) as a whole fresh fit.
    ``retrain_from="rewind_point"`` (with `rewind_to_step`) resumes every round's fit (the control's too, from its
    fresh weights) at step k instead, as Frankle et al. (2020) and OpenLTH retrain: the remaining steps only, the
    learning-rate schedule, epoch and step counters where they were at k, the optimizer's learning rates too, and
    its state (momenta) cleared unless ``reset_optimizer=False``. A k inside an epoch resumes as Lightning resumes a
    mid-epoch checkpoint: the rest of that epoch's steps, drawn from the start of the loader (a loader without
    ``state_dict`` cannot skip ahead; ``litcompress.data``'s DataModules go on at the batch k reached).

    With `checkpoint_path`, the search is written there after every round and a second call with the same arguments
    resumes it after its last finished round (see ``iterative_magnitude_pruning``); with ``retrain_from=
    "rewind_point"`` the fit saved at step k is kept beside it, as ``<checkpoint_path>.rewind_point.ckpt``.

    The random re-initialisation control is trained without the ``ModelCheckpoint`` callbacks of `trainer_kwargs`:
    their files, and their ``best_model_path``, are the ticket's rounds'.
    """
    if evaluate_on not in ("test", "validate"):
        raise ValueError(f"`evaluate_on` must be 'test' or 'validate', got {evaluate_on!r}.")
    # (a KeyError "not logged" after one evaluation)
    check_metric_name("metric", metric, "find_lottery_ticket", f"{evaluate_on}_step" if evaluate_on == "test" else
                      "validation_step")
    rewind_to_step = as_python_number(rewind_to_step)  # numpy's int64 too, as `rounds`
    if rewind_to_step is not None and (isinstance(rewind_to_step, bool) or not isinstance(rewind_to_step, int)
                                       or rewind_to_step < 1):
        raise ValueError(f"`rewind_to_step` must be an int >= 1 (0 is initialisation: pass None), got "
                         f"{rewind_to_step!r}.")
    if retrain_from not in ("start", "rewind_point"):
        raise ValueError(f"`retrain_from` must be 'start' or 'rewind_point', got {retrain_from!r}.")
    if retrain_from == "rewind_point" and rewind_to_step is None:
        raise ValueError("`retrain_from='rewind_point'` resumes every round at the step `rewind_to_step` names: give "
                         "rewind_to_step=k (k >= 1), or leave retrain_from='start' to rewind to initialisation.")
    if not isinstance(reset_optimizer, bool):
        raise TypeError(f"`reset_optimizer` must be True or False, got {reset_optimizer!r}.")
    if not reset_optimizer and retrain_from != "rewind_point":
        raise ValueError("`reset_optimizer=False` keeps the optimizer's state at the rewind point, which only "
                         "`retrain_from='rewind_point'` resumes; with 'start' every round has a fresh optimizer.")
    # before the metric check's evaluation below (a Trainer built, the data set up, one batch run)
    checked_search_arguments(rounds, rate, layer_rates, control, scope, parameter_names, exclude)
    if trainer_kwargs is not None and not isinstance(trainer_kwargs, Mapping):  # (dict()'s own words)
        raise TypeError(f"`trainer_kwargs` must be a mapping of Trainer arguments, e.g. {{'max_epochs': 5}}, or None; "
                        f"got {trainer_kwargs!r}.")
    check_checkpoint_path(checkpoint_path)  # (os.fspath's words, after the data's set-up and a batch)
    if not isinstance(module, LightningModule):
        raise TypeError(f"`module` must be a LightningModule (an instance), got {_a(module)}; wrap a plain nn.Module "
                        "in one, or search it with litcompress.pruning.imp.iterative_magnitude_pruning.")
    if datamodule is not None and not isinstance(datamodule, LightningDataModule):
        raise TypeError(f"`datamodule` must be a LightningDataModule (an instance) or None (the module's own "
                        f"*_dataloader methods), got {_a(datamodule)}.")
    given = dict(trainer_kwargs or {})
    callbacks = given.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    # the user's ModelCheckpoint, progress bar or LearningRateMonitor, not our quiet defaults, decide
    kwargs = {**quiet_unless_asked(_QUIET, callbacks), **given}
    settings = _described_settings(given)  # (before any fit changes the callbacks' attributes)
    stage_limit = "limit_test_batches" if evaluate_on == "test" else "limit_val_batches"
    if given.get("barebones"):  # (the metric check said "not logged ... an empty dataloader?")
        raise ValueError("find_lottery_ticket: trainer_kwargs barebones=True makes self.log a no-op, so no round's "
                         "metric can be read; drop it.")
    if given.get(stage_limit) in (0, 0.0):
        raise ValueError(f"trainer_kwargs[{stage_limit!r}]=0 leaves no batch to evaluate the rounds on "
                         f"(evaluate_on={evaluate_on!r}): drop it, or evaluate_on the other stage.")
    if _in_spawned_worker(trainer_built_quietly(**kwargs)):
        # the rounds' fits would run in worker processes: the parent's module never learns what they trained
        # (global_step stays 0), and the pruned module (its weight a product, no leaf) cannot be sent to them
        raise ValueError(f"find_lottery_ticket: trainer_kwargs {_described(given)} run each fit in spawned or forked "
                         "worker processes (ddp_spawn, ddp_fork, ddp_notebook), whose rounds this process cannot "
                         "follow; use strategy='ddp' (every rank runs the search, rank 0 writes its files).")
    pruning = _pruning_callbacks(callbacks)
    if pruning:  # it pruned again and made the masks permanent at each fit's end: a table of 100% left, no masks
        raise ValueError(f"find_lottery_ticket: {', '.join(pruning)} in trainer_kwargs' callbacks prunes the module "
                         "itself, beside the search's own rounds (each fit's end made its masks permanent, and the "
                         "ticket came back without masks); drop it: the search prunes (rate, layer_rates, scope).")
    averaging = _weight_averaging_callbacks(callbacks)
    if averaging:
        # their setup copies the module each fit, which from round 1 on is pruned (a weight computed from weight_orig
        # and weight_mask: no leaf, so deepcopy refuses it), after a whole dense round; SWA failed before any fit
        raise ValueError(f"find_lottery_ticket: {', '.join(averaging)} in trainer_kwargs' callbacks copies the module "
                         "at every fit's start, which from the first pruning round on holds masked weights that "
                         "torch cannot copy; drop it from the search, and average the ticket's weights by fitting "
                         "the returned ticket with it.")
    # Every round is a fresh fit: the callbacks given (one set of instances for every Trainer) start each one from
    # the state they had before the first, or an EarlyStopping would carry its best score and patience count into
    # the next round and stop it after an epoch or two. Callbacks that keep no state (recorders) are left alone.
    initial_states = [_copied_state(callback) for callback in callbacks]

    def fresh_callbacks(but_checkpoints: bool = False) -> None:
        for callback, state in zip(callbacks, initial_states):
            if but_checkpoints and isinstance(callback, ModelCheckpoint):
                continue
            if state:
                state = copy.deepcopy(state)
                if "dirpath" in state:  # a ModelCheckpoint keeps its scores only for its own folder, which the
                    state["dirpath"] = callback.dirpath  # first fit resolved (None before it)
                callback.load_state_dict(state)
            if isinstance(callback, ModelCheckpoint):
                # not in its state: the step it last saved at, which every round reaches again (it would skip
                # saving there: with one epoch per round, every round after the first went unsaved)
                for attribute, initial in (("_last_global_step_saved", 0), ("_last_checkpoint_saved", "")):
                    if hasattr(callback, attribute):
                        setattr(callback, attribute, initial)

    if is_overridden("configure_model", module):
        # the Trainer would build the layers after `setup`; the rounds' masks and snapshot need them first (on a
        # copy, with them built: `module` stays as given)
        module = detached_copy(module)

    rewind_point: Optional[Path] = None  # with retrain_from="rewind_point": the fit saved at k (a temporary file)

    def train(model: LightningModule, control: bool = False) -> None:
        fresh_callbacks(but_checkpoints=control)
        fit_kwargs = kwargs
        if control:  # the user's checkpoints are the ticket's rounds' (best_model_path the last round's best)
            fit_kwargs = {**kwargs, "enable_checkpointing": False,
                          "callbacks": [c for c in callbacks if not isinstance(c, ModelCheckpoint)]}
        trainer = trainer_built_quietly(**fit_kwargs)
        if rewind_point is None:
            with ctrl_c_raises(trainer):
                trainer.fit(model, datamodule=datamodule)
            if trainer.global_step == 0:
                raise ValueError(f"trainer_kwargs {_described(given)} trained no optimizer step (max_epochs=0, "
                                 "max_steps=0 or limit_train_batches=0?): the rounds would prune and score untrained "
                                 "networks. Let the fit train.")
            return
        rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        rank_zero.addFilter(_quiet_restore)
        resumed = _resumed_at_rewind_point(rewind_point, model, reset_optimizer, trainer.global_rank)
        try:
            with warnings.catch_warnings(), ctrl_c_raises(trainer):
                # resuming inside an epoch is what this option asks for (the docstring says how the epoch goes on)
                warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch")
                trainer.fit(model, datamodule=datamodule, ckpt_path=resumed)
        finally:
            rank_zero.removeFilter(_quiet_restore)
            resumed.unlink(missing_ok=True)

    step = f"{type(module).__name__}.{'test_step' if evaluate_on == 'test' else 'validation_step'}"

    evaluated_by: list[Trainer] = []  # the last evaluation's trainer

    def evaluate(model: LightningModule, **limits: Any) -> float:
        trainer = trainer_built_quietly(**{**kwargs, "max_epochs": None, "max_steps": -1, **limits})
        evaluated_by[:] = [trainer]
        run = trainer.test if evaluate_on == "test" else trainer.validate
        with ctrl_c_raises(trainer):
            results = logged_metrics(run(model, datamodule=datamodule, verbose=False))
        message = missing_metric_message(metric, results, step)
        if message:
            raise KeyError(f"metric={message}")
        value = float(results[metric])
        if trainer.world_size > 1:
            # each DDP rank evaluated its shard: a step that logs without sync_dist=True reports its own, and rank
            # 0's table would show half the data (the mean over ranks is what sync_dist=True gives; a no-op then)
            value = float(trainer.strategy.reduce(torch.tensor(value, device=trainer.strategy.root_device),
                                                  reduce_op="mean"))
        return value

    # one batch on a copy first: a metric the step does not log fails now, not after the first round's training
    # (a logger that keeps nothing: the one-batch score of an untrained copy went into the user's as a row at step
    # 0; none at all failed a step that uses `self.logger`)
    evaluate(detached_copy(module), limit_test_batches=1, limit_val_batches=1,
             logger=DummyLogger() if kwargs.get("logger", True) not in (False, None) else kwargs.get("logger"))
    _check_fraction_leaves_a_batch(evaluated_by[0], given.get(stage_limit), stage_limit, evaluate_on)
    if evaluated_by[0].world_size > 1:
        # each DDP rank built its own initial weights (ranks seeded alike or not), and every round trains from rank
        # 0's (DDP broadcasts them as each fit starts): the weights the ticket rewinds to are rank 0's on every rank,
        # on a copy (the module each rank was given stays as it was)
        module = detached_copy(module)
        module.load_state_dict(evaluated_by[0].strategy.broadcast(
            {key: value.detach().cpu() if isinstance(value, torch.Tensor) else value
             for key, value in module.state_dict().items()}))

    def train_to_rewind_point(model: LightningModule) -> None:
        nonlocal rewind_point
        # the first k steps of an ordinary fit, stopped there: with `max_steps=k` the Trainer would tell the module
        # its fit is k steps long, and a schedule sized from it (`OneCycleLR(total_steps=
        # self.trainer.estimated_stepping_batches)`) would run a whole cycle in those k steps
        fresh_callbacks()
        stop = _StopAtStep(rewind_to_step, rewind_point, retrain_from_it=retrain_from == "rewind_point")
        # (without the fit's minimum epochs or steps, which would keep it from stopping at k)
        # without the user's checkpoints, as the control: a file of this k-step fit, which is no round, went into
        # their folder (and with save_top_k=1 stayed there)
        trainer = trainer_built_quietly(**{**kwargs, "enable_checkpointing": False, "min_epochs": None,
                                           "min_steps": None,
                                           "callbacks": [*(c for c in callbacks if not isinstance(c, ModelCheckpoint)),
                                                         stop]})
        with ctrl_c_raises(trainer):
            trainer.fit(model, datamodule=datamodule)
        rewind_point = stop.checkpoint  # rank 0's, under DDP
        if trainer.global_step < rewind_to_step:  # stopped early (an EarlyStopping, a fit without a known length)
            raise ValueError(f"`rewind_to_step={rewind_to_step}`: the training stopped after {trainer.global_step} "
                             "optimizer steps, before reaching it. Rewind to an earlier step, or train longer "
                             "(`trainer_kwargs`' max_epochs / max_steps).")
        if trainer.global_step > rewind_to_step and trainer.is_global_zero:
            # a batch that steps two optimizers (a GAN's, manual optimization) passes an odd k: the snapshot is
            # the first batch end at or after it (it rewound to step k + 1 without a word)
            warnings.warn(f"`rewind_to_step={rewind_to_step}`: the batch that reached it took the fit to optimizer "
                          f"step {trainer.global_step} (each of its batches steps several optimizers), so every "
                          f"round rewinds to step {trainer.global_step}.", UserWarning, stacklevel=2)

    temporary = None
    if retrain_from == "rewind_point":
        if checkpoint_path is None:
            temporary = Path(tempfile.mkdtemp(prefix="litcompress-lottery-"))
            rewind_point = temporary / "rewind_point.ckpt"
        else:  # resuming the search needs it too
            rewind_point = Path(f"{os.fspath(checkpoint_path)}.rewind_point.ckpt")
    try:
        return iterative_magnitude_pruning(
            module, train, evaluate, rounds=rounds, rate=rate, layer_rates=layer_rates,
            parameter_names=parameter_names, exclude=exclude, scope=scope,
            train_to_rewind_point=train_to_rewind_point if rewind_to_step else None, control=control,
            train_control=lambda model: train(model, control=True),
            checkpoint_path=checkpoint_path,
            checkpoint_settings=dict(metric=metric, evaluate_on=evaluate_on, rewind_to_step=rewind_to_step,
                                     retrain_from=retrain_from, reset_optimizer=reset_optimizer,
                                     # a resumed search trained otherwise would mix two searches in one table
                                     trainer_kwargs=settings, module=_described_module(module),
                                     datamodule=_described_module(datamodule)),
        )
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
