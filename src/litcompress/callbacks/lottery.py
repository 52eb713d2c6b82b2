"""Lottery tickets with a Lightning `Trainer`: a thin adapter over :func:`litcompress.pruning.imp.iterative_magnitude_pruning`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden

from litcompress.pruning.imp import LotteryTicket, iterative_magnitude_pruning
from litcompress.quantization.lightning import detached_copy, logged_metrics, missing_metric_message

_QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


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
    ``evaluate_on="validate"``). ``rewind_to_step=k`` first trains k optimizer steps and rewinds there instead of
    to initialisation. A fresh `Trainer` (and so a fresh optimizer) is built for every round. `module` itself is not
    modified; see :func:`~litcompress.pruning.imp.iterative_magnitude_pruning` for the other arguments.
    """
    if evaluate_on not in ("test", "validate"):
        raise ValueError(f"`evaluate_on` must be 'test' or 'validate', got {evaluate_on!r}.")
    if rewind_to_step is not None and (isinstance(rewind_to_step, bool) or rewind_to_step < 1):
        raise ValueError(f"`rewind_to_step` must be an int >= 1 (0 is initialisation: pass None), got {rewind_to_step!r}.")
    kwargs = {**_QUIET, **dict(trainer_kwargs or {})}
    if is_overridden("configure_model", module):
        # the Trainer would build the layers after `setup`; the rounds' masks and snapshot need them first (on a
        # copy, with them built: `module` stays as given)
        module = detached_copy(module)

    def train(model: LightningModule) -> None:
        Trainer(**kwargs).fit(model, datamodule=datamodule)

    step = f"{type(module).__name__}.{'test_step' if evaluate_on == 'test' else 'validation_step'}"

    def evaluate(model: LightningModule, **limits: Any) -> float:
        trainer = Trainer(**{**kwargs, "max_epochs": None, "max_steps": -1, **limits})
        run = trainer.test if evaluate_on == "test" else trainer.validate
        results = logged_metrics(run(model, datamodule=datamodule, verbose=False))
        message = missing_metric_message(metric, results, step)
        if message:
            raise KeyError(f"metric={message}")
        return float(results[metric])

    # one batch on a copy first: a metric the step does not log fails now, not after the first round's training
    evaluate(detached_copy(module), limit_test_batches=1, limit_val_batches=1)

    def train_to_rewind_point(model: LightningModule) -> None:
        Trainer(**{**kwargs, "max_epochs": -1, "max_steps": rewind_to_step}).fit(model, datamodule=datamodule)

    return iterative_magnitude_pruning(
        module, train, evaluate, rounds=rounds, rate=rate, layer_rates=layer_rates, parameter_names=parameter_names,
        scope=scope, train_to_rewind_point=train_to_rewind_point if rewind_to_step else None, control=control,
    )
