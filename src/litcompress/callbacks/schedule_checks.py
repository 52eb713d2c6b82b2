"""Warnings for a schedule that a fit does not run to its end: it stops short of what was asked, silently else."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

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
        length = trainer.estimated_stepping_batches
    else:
        length = trainer.max_epochs if trainer.max_steps == -1 else None
    if length is None or not math.isfinite(length) or length < 0:
        return None
    return int(length)


def fit_too_short_message(schedule: SparsitySchedule, trainer: "pl.Trainer", what: str) -> str | None:
    """What to say when fitting starts, if the fit ends before `schedule` does; else None."""
    length = fit_length(trainer, schedule.unit)
    if length is None or length >= schedule.end:
        return None
    step = schedule.unit == "step"
    unit, setting = ("optimizer steps", "max_steps / max_epochs") if step else ("epochs", "max_epochs")
    return (f"The schedule prunes until {schedule.unit} {schedule.end} (to {schedule.final_sparsity:.1%} {what}), but "
            f"this fit runs {length} {unit}: it will stop at {schedule.reached_by(length):.1%}. Give the schedule an "
            f"`end` within the fit, or train longer ({setting}).")


def stopped_early_message(schedule: SparsitySchedule, progress: int, what: str) -> str | None:
    """What to say when fitting ended at `progress`, before `schedule` did (EarlyStopping, a time limit); else
    None."""
    if progress >= schedule.end:
        return None
    return (f"Fitting ended at {schedule.unit} {progress}, before the schedule's end ({schedule.unit} "
            f"{schedule.end}): the model is at {schedule.reached_by(progress):.1%} of the "
            f"{schedule.final_sparsity:.1%} {what} asked for. Resume the fit from its checkpoint to go on with it.")
