"""Lottery tickets with a Lightning `Trainer`: a thin adapter over :func:`litcompress.pruning.imp.iterative_magnitude_pruning`."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden

from litcompress.pruning.imp import LotteryTicket, iterative_magnitude_pruning
from litcompress.quantization.lightning import (detached_copy, logged_metrics, missing_metric_message,
                                                trainer_built_quietly)

_QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


class _StopAtStep(Callback):
    """Ends the fit once `step` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _copied_state(callback: Callback) -> dict[str, Any]:
    """A copy of `callback`'s state, or {} (left as it is across rounds) when that state cannot be copied."""
    try:
        return copy.deepcopy(callback.state_dict())
    except Exception:  # noqa: BLE001 - a user's callback holding something deepcopy refuses (a lock, a file)
        return {}


def find_lottery_ticket(
    module: LightningModule,
    datamodule: LightningDataModule,
    *,
    metric: str,
    rounds: int,
    rate: float = 0.2,
    layer_rates: Optional[Mapping[str, float]] = None,
    trainer_kwargs: Optional[Mapping[str, Any]] = None,
    rewind_to_step: Optional[int] = None,
    evaluate_on: Literal["test", "validate"] = "test",
    parameter_names: Sequence[str] = ("weight",),
    scope: Literal["local", "global"] = "local",
    control: str = "final",
) -> LotteryTicket:
    """Iterative magnitude pruning where every round is ``Trainer(**trainer_kwargs).fit(module, datamodule)``.

    `metric` names a value the module logs in ``test_step`` (or ``validation_step`` with
    ``evaluate_on="validate"``). ``rewind_to_step=k`` first trains the first k optimizer steps of such a fit (its
    learning-rate schedule sized for the whole fit) and rewinds there instead of to initialisation. A fresh
    `Trainer` (and so a fresh optimizer) is built for every round, and the callbacks of `trainer_kwargs` start every
    round from the state they had before the first (an ``EarlyStopping``'s best score and patience count). `module`
    itself is not modified; see :func:`~litcompress.pruning.imp.iterative_magnitude_pruning` for the other
    arguments.
    """
    if evaluate_on not in ("test", "validate"):
        raise ValueError(f"`evaluate_on` must be 'test' or 'validate', got {evaluate_on!r}.")
    if rewind_to_step is not None and (isinstance(rewind_to_step, bool) or rewind_to_step < 1):
        raise ValueError(f"`rewind_to_step` must be an int >= 1 (0 is initialisation: pass None), got {rewind_to_step!r}.")
    kwargs = {**_QUIET, **dict(trainer_kwargs or {})}
    callbacks = kwargs.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    # Every round is a fresh fit: the callbacks given (one set of instances for every Trainer) start each one from
    # the state they had before the first, or an EarlyStopping would carry its best score and patience count into
    # the next round and stop it after an epoch or two. Callbacks that keep no state (recorders) are left alone.
    initial_states = [_copied_state(callback) for callback in callbacks]

    def fresh_callbacks() -> None:
        for callback, state in zip(callbacks, initial_states):
            if state:
                state = copy.deepcopy(state)
                if "dirpath" in state:  # a ModelCheckpoint keeps its scores only for its own folder, which the
                    state["dirpath"] = callback.dirpath  # first fit resolved (None before it)
                callback.load_state_dict(state)

    if is_overridden("configure_model", module):
        # the Trainer would build the layers after `setup`; the rounds' masks and snapshot need them first (on a
        # copy, with them built: `module` stays as given)
        module = detached_copy(module)

    def train(model: LightningModule) -> None:
        fresh_callbacks()
        trainer_built_quietly(**kwargs).fit(model, datamodule=datamodule)

    step = f"{type(module).__name__}.{'test_step' if evaluate_on == 'test' else 'validation_step'}"

    def evaluate(model: LightningModule, **limits: Any) -> float:
        trainer = trainer_built_quietly(**{**kwargs, "max_epochs": None, "max_steps": -1, **limits})
        run = trainer.test if evaluate_on == "test" else trainer.validate
        results = logged_metrics(run(model, datamodule=datamodule, verbose=False))
        message = missing_metric_message(metric, results, step)
        if message:
            raise KeyError(f"metric={message}")
        return float(results[metric])

    # one batch on a copy first: a metric the step does not log fails now, not after the first round's training
    evaluate(detached_copy(module), limit_test_batches=1, limit_val_batches=1)

    def train_to_rewind_point(model: LightningModule) -> None:
        # the first k steps of an ordinary fit, stopped there: with `max_steps=k` the Trainer would tell the module
        # its fit is k steps long, and a schedule sized from it (`OneCycleLR(total_steps=
        # self.trainer.estimated_stepping_batches)`) would run a whole cycle in those k steps
        fresh_callbacks()
        stop = _StopAtStep(rewind_to_step)
        # (without the fit's minimum epochs or steps, which would keep it from stopping at k)
        trainer = trainer_built_quietly(**{**kwargs, "callbacks": [*callbacks, stop], "min_epochs": None,
                                           "min_steps": None})
        trainer.fit(model, datamodule=datamodule)
        if trainer.global_step < rewind_to_step:
            raise ValueError(f"`rewind_to_step={rewind_to_step}`: the training stopped after {trainer.global_step} "
                             "optimizer steps, before reaching it. Rewind to an earlier step, or train longer "
                             "(`trainer_kwargs`' max_epochs / max_steps).")

    return iterative_magnitude_pruning(
        module, train, evaluate, rounds=rounds, rate=rate, layer_rates=layer_rates, parameter_names=parameter_names,
        scope=scope, train_to_rewind_point=train_to_rewind_point if rewind_to_step else None, control=control,
    )
