"""Warnings for a schedule that a fit does not run to its end: it stops short of what was asked, silently else."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

from litcompress.pruning.schedules import SparsitySchedule

if TYPE_CHECKING:
    import lightning.pytorch as pl


def fit_length(trainer: "pl.Trainer", unit: str) -> int | None:
    """How far the whole fit goes in `unit`: optimizer steps (``max_steps`` or ``max_epochs`` with gradient
    accumulation, as Lightning estimates them), or epochs (``max_epochs`` when no ``max_steps``); None if unbounded or
    unknown: with manual optimization a batch makes as many steps as its `training_step` takes (a GAN's two), and
    Lightning's estimate counts batches."""
    if unit == "step":
        if not trainer.lightning_module.automatic_optimization:
            return None
        length = _steps_with_scheduled_accumulation(trainer)
        if length is None:
            length = trainer.estimated_stepping_batches
    elif trainer.max_steps in (-1, None):
        length = trainer.max_epochs
    elif not trainer.lightning_module.automatic_optimization:
        return None
    else:
        length = _epochs_max_steps_starts(trainer)
    if length is None or not math.isfinite(length) or length < 0:
        return None
    return int(length)


def steps_in_epoch(trainer: "pl.Trainer") -> tuple[Callable[[int], int], int] | None:
    """The optimizer steps of each epoch (automatic optimization) and the last epoch their number changes at, a
    GradientAccumulationScheduler's factors counted: it sets ``trainer.accumulate_grad_batches`` only as each epoch
    starts, so read when the fit starts the factor is 1. None where an epoch's batches are unknown (read it in
    ``on_train_start``: the training data are set up then)."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches < 1:
        return None
    scheduler = next((c for c in trainer.callbacks if isinstance(c, GradientAccumulationScheduler)), None)
    if scheduler is None:
        return (lambda epoch: math.ceil(int(batches) / trainer.accumulate_grad_batches)), 0
    return ((lambda epoch: math.ceil(int(batches) / scheduler.get_accumulate_grad_batches(epoch))),
            max(scheduler.scheduling, default=0))


class EpochSteps:
    """Optimizer steps counted by epoch, from :func:`steps_in_epoch`: those of an epoch, those before one, and the
    epochs that start before a step (a GradientAccumulationScheduler's factors change them until it settles)."""

    def __init__(self, trainer: "pl.Trainer") -> None:
        from lightning.pytorch.callbacks import GradientAccumulationScheduler

        counted = steps_in_epoch(trainer)
        if counted is None:
            raise ValueError("EpochSteps: the batches of an epoch are unknown")  # (callers check steps_in_epoch)
        self.of, self._settled = counted  # steps of epoch e; the epoch from which every epoch has the same
        self.varies = self._settled > 0
        scheduler = next((c for c in trainer.callbacks if isinstance(c, GradientAccumulationScheduler)), None)
        fixed = trainer.accumulate_grad_batches
        self.factor: Callable[[int], int] = (  # the batches each optimizer step of epoch e accumulates
            scheduler.get_accumulate_grad_batches if scheduler is not None else lambda epoch: fixed)

    def before(self, epoch: int) -> int:
        """The optimizer steps of the epochs before `epoch` (at the end of epoch ``epoch - 1``)."""
        head = min(epoch, self._settled)
        return sum(self.of(e) for e in range(head)) + max(0, epoch - head) * self.of(self._settled)

    def epochs_starting_before(self, step: int) -> int:
        """How many epochs start before optimizer step `step` (those whose first step is below it)."""
        epoch = 0
        while epoch < self._settled and self.before(epoch) < step:
            epoch += 1
        if self.before(epoch) >= step:
            return epoch
        return epoch + math.ceil((step - self.before(epoch)) / self.of(self._settled))

    def said(self) -> str:
        """The steps per epoch, as a message gives them."""
        if not self.varies:
            return f"{self.of(0)} steps per epoch"
        return (f"{', '.join(str(self.of(e)) for e in range(self._settled + 1))} steps in epochs 0-{self._settled} "
                f"(GradientAccumulationScheduler), {self.of(self._settled)} per epoch after")


def _steps_with_scheduled_accumulation(trainer: "pl.Trainer") -> int | None:
    """The optimizer steps of a fit with a GradientAccumulationScheduler (Lightning's estimate counts every epoch at
    the factor of the fit's start); None without one, or where the fit is unbounded in epochs or its batches
    unknown."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    counted = steps_in_epoch(trainer)
    if counted is None or trainer.max_epochs in (-1, None) \
            or not any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks):
        return None
    steps = sum(counted[0](epoch) for epoch in range(trainer.max_epochs))
    return steps if trainer.max_steps in (-1, None) else min(steps, trainer.max_steps)


def _epochs_max_steps_starts(trainer: "pl.Trainer") -> int | None:
    """The epochs a fit bounded by ``max_steps`` starts (a last one cut short ends too, and its round runs), at most
    ``max_epochs``; None where the batches of an epoch are unknown."""
    counted = steps_in_epoch(trainer)
    if counted is None:
        return None
    steps_of, last_change = counted
    epochs_cap = trainer.max_epochs if trainer.max_epochs not in (-1, None) else math.inf
    steps, epoch = 0, 0
    while steps < trainer.max_steps and epoch < epochs_cap and epoch <= last_change:
        steps += steps_of(epoch)
        epoch += 1
    if steps < trainer.max_steps and epoch < epochs_cap:  # the same steps in every epoch from here
        epoch += math.ceil((trainer.max_steps - steps) / steps_of(epoch))
    return int(min(epoch, epochs_cap))


def limit_reached(trainer: "pl.Trainer") -> str | None:
    """The trainer's own limit this fit ran to (``max_steps``, ``max_epochs``, a ``Timer``'s ``max_time``, which a
    resume keeps counting from where it was), None when something else stopped it (EarlyStopping)."""
    from lightning.pytorch.callbacks import Timer

    if trainer.max_steps not in (-1, None) and trainer.global_step >= trainer.max_steps:
        return f"max_steps={trainer.max_steps}"
    if trainer.max_epochs not in (-1, None) and trainer.current_epoch >= trainer.max_epochs:
        return f"max_epochs={trainer.max_epochs}"
    for callback in trainer.callbacks:
        if isinstance(callback, Timer):
            remaining = callback.time_remaining()
            if remaining is not None and remaining <= 0:
                return "max_time"
    return None


def fit_too_short_message(schedule: SparsitySchedule, trainer: "pl.Trainer", what: str,
                          at_validation: bool = False) -> str | None:
    """What to say when fitting starts, if the fit ends before `schedule` does, short of its final sparsity; else
    None (a constant schedule's later rounds hold the sparsity reached: ending before them loses nothing).
    `at_validation`: an epoch schedule's rounds run when a validation ends, so the sparsity stopped at is the
    schedule's at the fit's last validation (or, where ``max_steps`` makes that unknown, at most its length's)."""
    length = fit_length(trainer, schedule.unit)
    if length is None or length >= schedule.end or schedule.reached_by(length) >= schedule.final_sparsity:
        return None
    stop, note = length, ""
    if at_validation:
        last = epochs_finished_at_the_last_validation(trainer)
        if last == NO_VALIDATION_IN_FIT:  # nothing is pruned: said as such (ModelPruning's no-validation warning)
            return None
        if last is not None and last < length:
            stop, note = last, f" (its rounds run when a validation ends, and the last one comes after epoch {last})"
        elif last is None and max_steps_ends_it_early(trainer) is not False:
            note = (" at most (its rounds run when a validation ends, and max_steps may end this fit inside an epoch, "
                    "after its last validation)")
    if has_early_stopping(trainer):
        note += ", or less if EarlyStopping ends the fit sooner"  # (what it reached is said when the fit ends)
    step = schedule.unit == "step"
    if step:
        unit, setting = "optimizer steps", "max_steps / max_epochs"
    elif trainer.max_steps in (-1, None):
        unit, setting = "epochs", "max_epochs"
    else:  # max_steps ends it, or both do
        unit = "epochs"
        setting = "max_steps / max_epochs" if trainer.max_epochs not in (-1, None) and length == trainer.max_epochs \
            else "max_steps"
    return (f"The schedule prunes until {schedule.unit} {schedule.end} (to {schedule.final_sparsity:.1%} {what}), but "
            f"this fit runs {length} {unit}: it will stop at {schedule.reached_by(stop):.1%}{note}. Give the schedule "
            f"an `end` within the fit, or train longer ({setting}).")


def has_early_stopping(trainer: "pl.Trainer") -> bool:
    """Whether an EarlyStopping callback may end the fit before its limits: a figure foretold then is a bound."""
    from lightning.pytorch.callbacks import EarlyStopping

    return any(isinstance(callback, EarlyStopping) for callback in trainer.callbacks)


def stopped_early_message(schedule: SparsitySchedule, progress: int, what: str,
                          limit: str | None = None) -> str | None:
    """What to say when fitting ended at `progress`, before `schedule` did; else None. `limit`: the trainer's own
    limit the fit ran to (:func:`limit_reached`), which a resume does not go past; None: something else stopped it
    (EarlyStopping, a time limit), and a resume goes on. None too where the final sparsity was reached."""
    if progress >= schedule.end or schedule.reached_by(progress) >= schedule.final_sparsity:
        return None
    advice = (f"The fit ran to its {limit}, so a resume trains no further: raise it, or give the schedule an `end` "
              "within the fit." if limit else "Resume the fit from its checkpoint to go on with it.")
    return (f"Fitting ended at {schedule.unit} {progress}, before the schedule's end ({schedule.unit} "
            f"{schedule.end}): the model is at {schedule.reached_by(progress):.1%} of the "
            f"{schedule.final_sparsity:.1%} {what} asked for. {advice}")


def max_steps_ends_it_early(trainer: "pl.Trainer") -> bool | None:
    """Whether ``max_steps`` ends the fit before ``max_epochs`` does; None where that is unknown (manual
    optimization, unbounded epochs, an epoch's batches unknown)."""
    if trainer.max_steps in (-1, None):
        return False
    counted = steps_in_epoch(trainer)
    if counted is None or not trainer.lightning_module.automatic_optimization \
            or trainer.max_epochs in (-1, None):
        return None
    steps_of, _ = counted
    return trainer.max_steps < sum(steps_of(epoch) for epoch in range(trainer.max_epochs))


#: :func:`epochs_finished_at_the_last_validation` of a fit whose validation cadence runs no validation in its epochs
NO_VALIDATION_IN_FIT = -1


def epochs_finished_at_the_last_validation(trainer: "pl.Trainer") -> int | None:
    """How many epochs have finished when this fit's last validation ends, from ``max_epochs`` and the validation
    cadence (``check_val_every_n_epoch``, ``val_check_interval``), once the training batches are known;
    ``NO_VALIDATION_IN_FIT`` where the cadence runs none in the fit's epochs; None where that is unknown
    (``max_steps`` that may end the fit first, no validation, batches unknown)."""
    batches, interval = trainer.num_training_batches, trainer.val_check_batch
    every, epochs = trainer.check_val_every_n_epoch, trainer.max_epochs
    if epochs is None or epochs < 0 or trainer.limit_val_batches == 0 \
            or not isinstance(interval, int) or interval < 1 or not math.isfinite(batches) or batches < 1:
        return None
    if (epochs * int(batches) < interval) if every is None else epochs < every:
        return NO_VALIDATION_IN_FIT  # (a max_steps only shortens the fit)
    if max_steps_ends_it_early(trainer) is not False:
        return None
    if every is None:  # every `interval` batches of the fit, across epochs
        return (epochs * int(batches) // interval * interval) // int(batches)
    validating = epochs // every * every  # the last epoch that validates, counted from 1
    # its last batch validates only where `interval` divides the epoch's batches: else the last one comes inside it
    return validating if int(batches) % interval == 0 else validating - 1


def validations_end_before_message(schedule: SparsitySchedule, progress: int, ended: bool,
                                   early_stopping: bool = False) -> str | None:
    """What to say when rounds run at validation ends and the last validation (`progress` epochs finished; `ended`:
    it ran, else it will, unless an `early_stopping` callback ends the fit sooner) comes before the epoch schedule's
    end; else None."""
    if progress >= schedule.end or schedule.reached_by(progress) >= schedule.final_sparsity:
        return None
    last, stop = (("the last one of this fit came", "the model is at") if ended else
                  ("this fit's last one comes", "the model will stop at"))
    sooner = ", or less if EarlyStopping ends the fit sooner," if early_stopping and not ended else ""
    return (f"ModelPruning(prune_on_train_epoch_end=False) prunes when a validation ends, and {last} after epoch "
            f"{progress}, before the schedule's end (epoch {schedule.end}): {stop} "
            f"{schedule.reached_by(progress):.1%}{sooner} of the {schedule.final_sparsity:.1%} sparsity asked for. "
            "Validate after the last epoch (check_val_every_n_epoch, val_check_interval), or pass "
            "prune_on_train_epoch_end=True.")
