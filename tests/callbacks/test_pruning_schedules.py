"""Scheduled pruning, rewinding and resuming under a real Lightning Trainer."""

from __future__ import annotations

import dataclasses
import functools
import re
import time
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch import Callback, LightningModule, seed_everything
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from litcompress import ModelPruning
from litcompress.pruning.schedules import ConstantSparsity, IterativeSchedule, PolynomialDecay
from tests.conftest import (CrashAtStep, FixedDataModel, RecordEpochStarts, SimulatedCrash, StepsTwoOptimizers,
                            ThreeLayerModel, make_trainer)


def weight_targets(model):
    return [(model.layer.mlp_1, "weight"), (model.layer.mlp_2, "weight"), (model.layer.mlp_3, "weight")]


def zeros_and_total(targets):
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in targets)
    return zeros, sum(getattr(m, n).numel() for m, n in targets)


@settings(max_examples=6, deadline=None)
@given(final=st.floats(0.05, 0.97), scope_global=st.booleans(), frequency=st.integers(1, 3))
def test_step_schedule_hits_final_sparsity_exactly(tmp_path_factory, final, scope_global, frequency):
    model = ThreeLayerModel()
    targets = weight_targets(model)
    schedule = PolynomialDecay(final_sparsity=final, begin=1, end=7, frequency=frequency)
    callback = ModelPruning("l1_unstructured", parameters_to_prune=targets, amount=schedule,
                            use_global_unstructured=scope_global, use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path_factory.mktemp("run"), max_epochs=3, callbacks=callback).fit(model)  # 12 steps
    if scope_global:
        zeros, total = zeros_and_total(targets)
        assert zeros == round(final * total)
    else:
        for module, name in targets:
            zeros, total = zeros_and_total([(module, name)])
            assert zeros == round(final * total), (module, final)
    steps = [h["step"] for h in callback._history]
    assert steps == [t for t in range(1, 13) if schedule.should_prune(t)]
    assert all(h["zeros_after"] >= h["zeros_before"] for h in callback._history)


def test_step_schedule_targets_follow_the_cubic_curve_and_go_to_the_loggers(tmp_path):
    """Each round's sparsity also lands in the trainer's loggers (`pruning/sparsity` in a CSVLogger's file, at the
    round's step): the curve beside the loss."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    model = ThreeLayerModel()
    targets = weight_targets(model)
    schedule = PolynomialDecay(final_sparsity=0.9, begin=2, end=10, frequency=2)
    callback = ModelPruning("random_unstructured", parameters_to_prune=targets, amount=schedule,
                            use_lottery_ticket_hypothesis=False)
    logger = CSVLogger(tmp_path, name="run")
    make_trainer(tmp_path, max_epochs=3, callbacks=callback, logger=logger, log_every_n_steps=1).fit(model)
    _, total = zeros_and_total(targets)
    for h in callback._history:
        assert h["amount"] == schedule.target(h["step"])
        assert h["zeros_after"] == round(schedule.target(h["step"]) * total)
    with open(logger.experiment.metrics_file_path) as file:
        logged = [(int(row["step"]), float(row["pruning/sparsity"])) for row in csv.DictReader(file)
                  if row.get("pruning/sparsity")]
    assert logged == [(h["step"], h["zeros_after"] / total) for h in callback._history]
    assert [step for step, _ in logged] == [2, 4, 6, 8, 10]


class TwoOptimizerModel(StepsTwoOptimizers, FixedDataModel):
    def loss(self, batch):
        return self(batch[0]).pow(2).mean()

    def optimizer_groups(self):
        layers = list(self.layer)
        return [layers[0].parameters(), [p for layer in layers[1:] for p in layer.parameters()]]


def test_a_schedule_under_two_optimizers_runs_the_rounds_whose_steps_a_batch_passes_over(tmp_path, recwarn):
    """Lightning counts each optimizer's step in `global_step`: the rounds at odd steps, the last one among them, are
    run after the batch that passed them, with their own targets, and the final sparsity is hit exactly. (Nor is the
    schedule said to outlast the fit: Lightning's estimate of the fit's steps counts batches then.)"""
    seed_everything(0)
    model = TwoOptimizerModel()
    targets = weight_targets(model)
    schedule = PolynomialDecay(final_sparsity=0.75, begin=3, end=15, frequency=3)
    record = RecordAtStep(6)
    callback = ModelPruning("l1_unstructured", parameters_to_prune=targets, amount=schedule, rewind_to_step=5,
                            use_lottery_ticket_hypothesis=lambda epoch: False, make_pruning_permanent=False)
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[record, callback])  # 12 batches, 24 steps
    trainer.fit(model)
    assert trainer.global_step == 24
    assert not _schedule_warnings(recwarn)
    assert [(h["step"], h["amount"]) for h in callback._history] == [
        (4, schedule.target(3)), (6, schedule.target(6)), (10, schedule.target(9)), (12, schedule.target(12)),
        (16, schedule.target(15))]
    zeros, total = zeros_and_total(targets)
    assert zeros == round(0.75 * total)
    callback.apply_lottery_ticket_hypothesis()  # rewind_to_step=5: the weights after the batch that passed step 5
    for (module, _), value in zip(targets, record.values):
        assert torch.equal(module.weight_orig, value)


def test_structured_schedule_prunes_whole_rows_to_target(tmp_path):
    model = ThreeLayerModel()
    targets = [(model.layer.mlp_1, "weight"), (model.layer.mlp_2, "weight")]
    callback = ModelPruning("ln_structured", pruning_dim=0, pruning_norm=2, use_global_unstructured=False,
                            parameters_to_prune=targets, amount=PolynomialDecay(final_sparsity=0.5, begin=1, end=8),
                            use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, max_epochs=3, callbacks=callback).fit(model)
    for module, _ in targets:
        zero_rows = int((module.weight.abs().sum(dim=1) == 0).sum())
        assert zero_rows == 16


@pytest.mark.parametrize("multiple", [8, np.int64(8)], ids=["int", "numpy int"])  # (numpy's was refused)
def test_structured_schedule_can_keep_a_multiple_of_rows(tmp_path, multiple):
    model = ThreeLayerModel()
    targets = [(model.layer.mlp_1, "weight"), (model.layer.mlp_2, "weight")]
    callback = ModelPruning("ln_structured", pruning_dim=0, pruning_norm=2, use_global_unstructured=False,
                            parameters_to_prune=targets, amount=PolynomialDecay(final_sparsity=0.6, begin=1, end=8),
                            use_lottery_ticket_hypothesis=False, keep_multiple_of=multiple)
    make_trainer(tmp_path, max_epochs=3, callbacks=callback).fit(model)
    for module, _ in targets:  # 60% of 32 rows is 19.2: 13 would stay, rounded up to 16
        assert int((module.weight.abs().sum(dim=1) != 0).sum()) == 16
    for bad in (dict(keep_multiple_of=0), dict(keep_multiple_of=8, pruning_fn="l1_unstructured"),
                dict(keep_multiple_of=8, amount=0.5)):
        kwargs = dict(pruning_fn="ln_structured", pruning_dim=0, pruning_norm=2, use_global_unstructured=False,
                      amount=PolynomialDecay(final_sparsity=0.6, begin=1, end=8), use_lottery_ticket_hypothesis=False)
        with pytest.raises(MisconfigurationException, match="keep_multiple_of=.* rounds the rows/channels"):
            ModelPruning(**{**kwargs, **bad})


class _GroupedConvModel(LightningModule):
    """A 1x1 conv read by a conv of 4 groups: both lose rows evenly over the 4 groups."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 64, 1), nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))),
                          batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_keep_multiple_of_rounds_what_a_grouped_layer_keeps_not_each_group(tmp_path):
    """64 channels in 4 groups at 50% keep 32, a multiple of 16, as 8 per group: each group's 8 was rounded up to 16,
    and the layers were never pruned."""
    model = _GroupedConvModel()
    callback = ModelPruning("ln_structured", parameters_to_prune=[(model.c1, "weight"), (model.c2, "weight")],
                            pruning_dim=0, pruning_norm=2, use_global_unstructured=False, keep_multiple_of=16,
                            amount=PolynomialDecay(final_sparsity=0.5, begin=0, end=2, frequency=1, unit="step"),
                            use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, max_epochs=2, callbacks=callback).fit(model)
    for layer in (model.c1, model.c2):
        kept = layer.weight.flatten(1).ne(0).any(1).view(4, 16).sum(1)  # per group
        assert kept.tolist() == [8, 8, 8, 8]


def test_epoch_schedule_runs_iterative_rounds(tmp_path):
    model = ThreeLayerModel()
    targets = weight_targets(model)
    callback = ModelPruning("l1_unstructured", parameters_to_prune=targets,
                            amount=IterativeSchedule(rate_per_round=0.2, rounds=3, unit="epoch"),
                            use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, max_epochs=5, callbacks=callback).fit(model)
    zeros, total = zeros_and_total(targets)
    assert [h["epoch"] for h in callback._history] == [0, 1, 2]
    assert zeros == round((1 - 0.8**3) * total)


@pytest.mark.parametrize(("schedule", "final"), [
    (IterativeSchedule(rate_per_round=0.3, rounds=3, unit="epoch"), 1 - 0.7 ** 3),  # rounds after epochs 1, 2, 3
    (ConstantSparsity(0.5, begin=1, unit="epoch"), 0.5),  # one round, after the first epoch
])
def test_an_epoch_schedule_pruning_at_validation_every_other_epoch_runs_the_rounds_between(tmp_path, schedule,
                                                                                           final):
    """Validation ends epochs 2, 4, 6 only: each runs the round of the last point since the one before (to that
    point's target), where only the points on those epochs ran (the constant one never, the iterative one once)."""
    model = FixedDataModel()
    targets = weight_targets(model)
    callback = ModelPruning("l1_unstructured", parameters_to_prune=targets, amount=schedule,
                            prune_on_train_epoch_end=False, use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, max_epochs=6, check_val_every_n_epoch=2, callbacks=callback).fit(model)
    zeros, total = zeros_and_total(targets)
    assert zeros == round(final * total)
    assert [h["epoch"] for h in callback._history] == ([1, 3] if isinstance(schedule, IterativeSchedule) else [1])


def test_a_step_schedule_whose_one_round_is_at_step_0_prunes_after_the_first_batch(tmp_path):
    """No batch ends at step 0: the round of that point runs after the first one (it never ran before)."""
    model = ThreeLayerModel()
    targets = weight_targets(model)
    callback = ModelPruning("l1_unstructured", parameters_to_prune=targets, amount=ConstantSparsity(0.6, begin=0),
                            use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, max_epochs=1, callbacks=callback).fit(model)
    assert [h["step"] for h in callback._history] == [1]
    zeros, total = zeros_and_total(targets)
    assert zeros == round(0.6 * total)


class RecordAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step, self.values = step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.values = [m.weight.detach().clone() for m in pl_module.layer]


@pytest.mark.parametrize("reset_optimizer", [False, True])
def test_rewind_to_step_k(tmp_path, reset_optimizer):
    seed_everything(0)
    model = FixedDataModel()
    targets = weight_targets(model)
    record, starts = RecordAtStep(3), RecordEpochStarts()
    callback = ModelPruning("l1_unstructured", parameters_to_prune=targets, amount=0.4, rewind_to_step=3,
                            make_pruning_permanent=False, reset_optimizer=reset_optimizer)
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[record, callback, starts])  # rounds at steps 4, 8
    trainer.fit(model)
    assert all(torch.equal(started, value) for started, value in zip(starts.weights[1], record.values))
    assert (starts.optimizer_states[1] == 0) == reset_optimizer
    # the round at the last step rewinds when training goes on, not at the end of the fit
    assert not any(torch.equal(module.weight_orig, value) for (module, _), value in zip(targets, record.values))
    callback.apply_lottery_ticket_hypothesis()
    for (module, _), value in zip(targets, record.values):
        assert torch.equal(module.weight_orig, value)


def test_rewind_to_epoch_k(tmp_path):
    seed_everything(0)
    model = FixedDataModel()
    targets = weight_targets(model)
    record, starts = RecordAtStep(4), RecordEpochStarts()  # the end of epoch 0 = the start of epoch 1
    callback = ModelPruning("l1_unstructured", parameters_to_prune=targets, amount=0.3, rewind_to_epoch=1,
                            make_pruning_permanent=False, apply_pruning=lambda epoch: epoch >= 1)
    make_trainer(tmp_path, max_epochs=3, callbacks=[record, callback, starts]).fit(model)
    assert all(torch.equal(started, value) for started, value in zip(starts.weights[2], record.values))
    callback.apply_lottery_ticket_hypothesis()
    for (module, _), value in zip(targets, record.values):
        assert torch.equal(module.weight_orig, value)


class RecordBeforeTheRound(Callback):
    """Listed before the pruning callback: the trainable weights when the last epoch ends, before its round."""

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights = [getattr(m, "weight_orig", m.weight).detach().clone() for m in pl_module.layer]


@pytest.mark.parametrize("make_pruning_permanent", [False, True])
def test_a_fit_ending_on_a_round_keeps_its_trained_weights_and_rewinds_when_training_goes_on(
        tmp_path, caplog, make_pruning_permanent):
    """With the lottery ticket on (the default), a reset right after the fit's last round would hand back the
    initial weights, untrained, as the model (a small BERT classifier, 100% accurate under Lightning's callback, came
    back at chance), and so would each epoch's checkpoint, saved after the round (a `ModelCheckpoint(monitor=...)`
    "best" one held initial weights under the score of trained ones). The reset is for the training that follows: a
    next fit applies it first."""
    seed_everything(0)
    model = FixedDataModel()
    targets = weight_targets(model)
    initial = [m.weight.detach().clone() for m, _ in targets]
    before, starts = RecordBeforeTheRound(), RecordEpochStarts()
    callback = ModelPruning("l1_unstructured", amount=0.3, parameter_names=["weight"],
                            make_pruning_permanent=make_pruning_permanent)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)  # saved at the epoch's end
    with caplog.at_level("INFO", logger="litcompress"):
        make_trainer(tmp_path, max_epochs=2, enable_checkpointing=True,
                     callbacks=[before, callback, starts, checkpoint]).fit(model)
    assert "the last round's lottery-ticket reset waits for training to go on" in caplog.text
    zeros, total = zeros_and_total(targets)
    after_one = round(0.3 * total)
    assert zeros == after_one + round(0.3 * (total - after_one))  # two global rounds of 30% of what remains
    saved = torch.load(checkpoint.last_model_path, weights_only=False)["state_dict"]
    for (module, name), trained, key in zip(targets, before.weights, ("mlp_1", "mlp_2", "mlp_3")):
        kept = getattr(module, name) != 0
        assert torch.equal(getattr(module, name)[kept], trained[kept])  # trained, pruned, not reset
        prefix = f"layer.{key}.weight"
        in_file = saved[prefix] if prefix in saved else saved[prefix + "_orig"] * saved[prefix + "_mask"]
        assert torch.equal(in_file, getattr(module, name))  # the checkpoint too
    assert callback.state_dict()["lottery_ticket_reset_pending"]
    assert all(torch.equal(w, i) for w, i in zip(starts.weights[1], initial))  # the first round's reset: in the fit

    # a second fit with the callback rewinds before its first step and keeps the zeros (masks re-made if permanent)
    make_trainer(tmp_path, max_epochs=1, callbacks=[callback, starts]).fit(model)
    assert all(torch.equal(w, i) for w, i in zip(starts.weights[0], initial))
    assert starts.zeros[0] == zeros
    after_two = zeros
    zeros = zeros_and_total(targets)[0]
    assert zeros == after_two + round(0.3 * (total - after_two))  # its round prunes on from the masks

    callback.apply_lottery_ticket_hypothesis()  # the ticket: survivors at their initial values, zeros kept
    assert zeros_and_total(targets)[0] == zeros
    for (module, name), first in zip(targets, initial):
        kept = getattr(module, name) != 0
        assert torch.equal(getattr(module, name)[kept], first[kept])


def test_rewind_after_pruning_began_is_refused(tmp_path):
    schedule = PolynomialDecay(final_sparsity=0.8, begin=10, end=100, frequency=10)
    with pytest.raises(MisconfigurationException, match="not before the first pruning round"):
        ModelPruning("l1_unstructured", amount=schedule, use_lottery_ticket_hypothesis=lambda e: True,
                     rewind_to_step=30)  # the round at step 10 prunes nothing (cubic from 0): the first is at 20
    with pytest.raises(MisconfigurationException, match="either"):
        ModelPruning("l1_unstructured", rewind_to_step=1, rewind_to_epoch=1)
    with pytest.raises(MisconfigurationException, match="int >= 0"):
        ModelPruning("l1_unstructured", rewind_to_epoch=-1)
    with pytest.raises(MisconfigurationException, match="use_lottery_ticket_hypothesis=False"):
        ModelPruning("l1_unstructured", amount=schedule)
    # Lightning-style amounts prune at the end of every epoch, from the first
    with pytest.raises(MisconfigurationException, match=r"`rewind_to_epoch=2` is not before the first pruning round "
                                                         r"\(the end of epoch 0: every epoch end prunes\)"):
        ModelPruning("l1_unstructured", amount=0.2, rewind_to_epoch=2)


@pytest.mark.parametrize(("kwargs", "accepted"), [
    # a point in epochs is "epochs done": the round at point 2 runs at the end of epoch 1, before epoch 2 starts
    (dict(amount=IterativeSchedule(rate_per_round=0.5, rounds=2, begin=2), rewind_to_epoch=1), True),
    (dict(amount=IterativeSchedule(rate_per_round=0.5, rounds=2, begin=2), rewind_to_epoch=2), False),
    # a point in steps runs in the batch whose step reaches it, after that step's snapshot (the round at step 10
    # prunes nothing, cubic from 0: the first is at step 20)
    (dict(amount=PolynomialDecay(final_sparsity=0.8, begin=10, end=100, frequency=10), rewind_to_step=20), True),
    (dict(amount=PolynomialDecay(final_sparsity=0.8, begin=10, end=100, frequency=10), rewind_to_step=21), False),
    # point 0 is the snapshot taken when fitting starts, before any round (it was refused: "Rewind to a epoch < 0")
    (dict(amount=IterativeSchedule(rate_per_round=0.5, rounds=2, begin=0), rewind_to_epoch=0), True),
    (dict(amount=PolynomialDecay(final_sparsity=0.8, initial_sparsity=0.1, begin=0, end=100, frequency=10),
          rewind_to_step=0), True),
    (dict(amount=0.2, rewind_to_epoch=0), True),
])
def test_a_rewind_point_is_refused_exactly_when_its_snapshot_would_follow_the_first_round(kwargs, accepted):
    kwargs = dict(use_lottery_ticket_hypothesis=lambda epoch: True, **kwargs)
    if accepted:
        ModelPruning("l1_unstructured", **kwargs)
    else:
        with pytest.raises(MisconfigurationException, match="not before the first pruning round"):
            ModelPruning("l1_unstructured", **kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    # rounds at epoch ends, a rewind point in steps: at 4 steps per epoch, step 5 is past the end of epoch 0
    (dict(amount=0.2, rewind_to_step=5), r"`rewind_to_step=5` is after the first pruning round, at the end of epoch 0 "
                                         r"\(optimizer step 4 at 4 steps per epoch\)"),
    (dict(amount=IterativeSchedule(rate_per_round=0.5, rounds=2, begin=2), rewind_to_step=9),
     r"at the end of epoch 1 \(optimizer step 8"),
    # rounds at steps, a rewind point in epochs: the start of epoch 2 is step 8, past the first round, at step 6
    # (the one at step 3 prunes nothing, cubic from 0)
    (dict(amount=PolynomialDecay(final_sparsity=0.8, begin=3, end=12, frequency=3), rewind_to_epoch=2),
     r"`rewind_to_epoch=2` \(optimizer step 8 at 4 steps per epoch\) is after the first pruning round, at step 6"),
    # Lightning's callables: their first round was found at its reset, after the epochs before it had trained
    (dict(amount=lambda epoch: 0.3, rewind_to_epoch=2),
     r"`rewind_to_epoch=2` is after the first pruning round that resets, at the end of epoch 0 \(as `amount`"),
    (dict(amount=0.3, apply_pruning=lambda epoch: epoch >= 1, rewind_to_step=9),
     r"`rewind_to_step=9` is after the first pruning round that resets, at the end of epoch 1 \(as "
     r"`amount`/`apply_pruning` give it; optimizer step 8 at 4 steps per epoch\).*Rewind to step 8 or earlier"),
])
def test_a_rewind_point_in_the_other_unit_past_the_first_round_fails_before_training(tmp_path, kwargs, match):
    """Whether it precedes the first round depends on the steps per epoch: checked when training starts, not at the
    first reset after training (the fit failed there, one or more epochs in)."""
    callback = ModelPruning("l1_unstructured", use_lottery_ticket_hypothesis=lambda epoch: True, **kwargs)
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=callback)
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(ThreeLayerModel())
    assert trainer.global_step == 0


@pytest.mark.parametrize(("scheduling", "kwargs", "match"), [
    # 2 steps per epoch from the start: step 3 is past the end of epoch 0 (read as 4 steps, it was taken, and the
    # fit failed at the first reset, an epoch in)
    ({0: 2}, dict(amount=0.2, rewind_to_step=3), r"`rewind_to_step=3` is after the first pruning round, at the end "
                                                  r"of epoch 0 \(optimizer step 2 at 2 steps per epoch\)"),
    # 4 steps in epoch 0, 2 in epoch 1: the first round, at the end of epoch 1, is step 6 (read as 8)
    ({0: 1, 1: 2}, dict(amount=0.3, apply_pruning=lambda epoch: epoch >= 1, rewind_to_step=7),
     r"at the end of epoch 1 \(as `amount`/`apply_pruning` give it; optimizer step 6 at 4, 2 steps in epochs 0-1 "
     r"\(GradientAccumulationScheduler\), 2 per epoch after\).*Rewind to step 6 or earlier"),
    ({0: 1, 1: 2}, dict(amount=IterativeSchedule(rate_per_round=0.5, rounds=2, begin=2), rewind_to_step=7),
     r"at the end of epoch 1 \(optimizer step 6 at 4, 2 steps in epochs 0-1"),
])
def test_a_rewind_point_is_checked_with_the_steps_a_gradient_accumulation_scheduler_gives(tmp_path, scheduling,
                                                                                           kwargs, match):
    """The scheduler sets `trainer.accumulate_grad_batches` only as each epoch starts: read when the fit starts, the
    factor was 1, so a point past the first round was taken (and failed after training) and one before it refused."""
    callback = ModelPruning("l1_unstructured", use_lottery_ticket_hypothesis=lambda epoch: True, **kwargs)
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[callback, GradientAccumulationScheduler(scheduling)])
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(ThreeLayerModel())
    assert trainer.global_step == 0


def test_a_rewind_epoch_before_the_first_step_round_under_a_gradient_accumulation_scheduler_is_taken(tmp_path):
    """Epoch 1 starts at step 2 when every step accumulates 2 batches, before the first round at step 3: it was
    refused as "optimizer step 4 at 4 steps per epoch"."""
    schedule = PolynomialDecay(final_sparsity=0.8, initial_sparsity=0.1, begin=3, end=6, frequency=3)
    callback = ModelPruning("l1_unstructured", amount=schedule, rewind_to_epoch=1,
                            use_lottery_ticket_hypothesis=lambda epoch: epoch >= 1)
    trainer = make_trainer(tmp_path, max_epochs=4, callbacks=[callback, GradientAccumulationScheduler({0: 2})])
    trainer.fit(ThreeLayerModel())
    assert trainer.global_step == 8 and [row["step"] for row in callback._history] == [3, 6]


@pytest.mark.parametrize("rewind", [dict(rewind_to_step=8), dict(rewind_to_epoch=1)])
def test_a_rewind_point_up_to_the_first_round_callables_give_is_taken(tmp_path, rewind):
    """The boundary of the check above: the first round at the end of epoch 1 (step 8) may rewind there. The
    callables are called as Lightning calls them: `amount` only where `apply_pruning` prunes (one that knows only
    its pruning epochs failed with a KeyError), the lottery flag only where `amount` prunes."""
    amounts = {1: 0.3, 2: 0.5}
    callback = ModelPruning("l1_unstructured", amount=lambda epoch: amounts[epoch],
                            apply_pruning=lambda epoch: epoch in amounts,
                            use_lottery_ticket_hypothesis=lambda epoch: {1: True, 2: False}[epoch], **rewind)
    make_trainer(tmp_path, max_epochs=3, callbacks=callback).fit(ThreeLayerModel())


class SparsityAtValidations(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            weights = [m.weight for m in pl_module.layer]
            zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
            self.seen.append((trainer.global_step, round(zeros, 2)))


@pytest.mark.parametrize("trainer_kwargs", [dict(val_check_interval=0.5),
                                            dict(val_check_interval=6, check_val_every_n_epoch=None)])
def test_an_epoch_schedule_pruned_at_validations_inside_an_epoch_waits_for_its_epochs_to_finish(tmp_path,
                                                                                             trainer_kwargs):
    """Point t counts finished epochs: its round ran at a validation half-way through epoch t - 1."""
    seed_everything(0)
    callback = ModelPruning("l1_unstructured", amount=IterativeSchedule(rate_per_round=0.5, rounds=2),
                            prune_on_train_epoch_end=False, use_lottery_ticket_hypothesis=True, rewind_to_step=3)
    seen = SparsityAtValidations()
    trainer = make_trainer(tmp_path, max_epochs=2, num_sanity_val_steps=0, callbacks=[callback, seen],
                           **trainer_kwargs)
    trainer.fit(ThreeLayerModel())  # rewind_to_step=3 failed at the first round, at step 2
    if trainer_kwargs["val_check_interval"] == 0.5:  # validations at steps 2, 4 (end of epoch 0), 6, 8
        assert seen.seen == [(2, 0.0), (4, 0.5), (6, 0.5), (8, 0.75)]
    else:  # at step 6 only, in epoch 1: one epoch finished
        assert seen.seen == [(6, 0.5)]


@pytest.mark.parametrize("amount, first_round", [
    (0.2, "the first pruning round"),
    # a callable amount: its first round was found at its reset (the callables' check had no max_steps at first)
    (lambda epoch: 0.2, "the first pruning round that resets")])
def test_a_rewind_point_past_an_epoch_that_max_steps_cuts_short_fails_before_training(tmp_path, amount, first_round):
    """Lightning ends the cut-short epoch (its round runs at max_steps): a snapshot due after that failed at the
    round's reset, once the whole fit had trained."""
    callback = ModelPruning("l1_unstructured", amount=amount, use_lottery_ticket_hypothesis=True, rewind_to_step=3)
    trainer = make_trainer(tmp_path, max_epochs=3, max_steps=2, callbacks=callback)
    with pytest.raises(MisconfigurationException, match=rf"`rewind_to_step=3` is after {first_round}, at the end of "
                                                        r"epoch 0 .*optimizer step 2 at 4 steps per epoch, "
                                                        r"max_steps=2\).*Rewind to step 2 or earlier"):
        trainer.fit(ThreeLayerModel())
    assert trainer.global_step == 0
    callback = ModelPruning("l1_unstructured", amount=amount, use_lottery_ticket_hypothesis=True, rewind_to_step=2)
    trainer = make_trainer(tmp_path, max_epochs=3, max_steps=2, callbacks=callback)
    trainer.fit(ThreeLayerModel())
    assert trainer.global_step == 2 and callback._history[0]["lottery_ticket_reset"]


@pytest.mark.parametrize(("kwargs", "trainer_kwargs", "match"), [
    (dict(rewind_to_epoch=1), {}, r"`rewind_to_epoch=1` is after the first pruning round, at the fit's first "
                                  r"validation \(epoch 0, optimizer step 4;"),
    (dict(rewind_to_step=5), {}, r"\(epoch 0, optimizer step 4;.*Rewind to step 4 or earlier"),
    (dict(rewind_to_epoch=2), dict(check_val_every_n_epoch=2), r"\(epoch 1, optimizer step 8;"),
    (dict(rewind_to_step=3), dict(val_check_interval=2), r"\(epoch 0, optimizer step 2;"),
    # a validation inside an epoch follows the steps made so far: the accumulated batch steps at its end
    (dict(rewind_to_step=2), dict(val_check_interval=3, accumulate_grad_batches=2), r"\(epoch 0, optimizer step 1;"),
    (dict(rewind_to_step=4), {}, None),  # the last step of epoch 0: its snapshot precedes that validation's round
])
def test_with_rounds_at_validation_ends_a_rewind_point_past_the_first_fails_before_training(tmp_path, kwargs,
                                                                                             trainer_kwargs, match):
    """prune_on_train_epoch_end=False: the first round runs at the first validation, which construction cannot know;
    such a point failed at the first reset, an epoch or more of training in."""
    callback = ModelPruning("l1_unstructured", amount=0.2, prune_on_train_epoch_end=False, **kwargs)
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=callback, **trainer_kwargs)
    if match is None:
        trainer.fit(ThreeLayerModel())
        assert callback._history[0]["lottery_ticket_reset"]
        return
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(ThreeLayerModel())
    assert trainer.global_step == 0


def test_a_rewind_point_in_steps_at_the_end_of_the_first_pruned_epoch_is_taken_before_its_round(tmp_path):
    """Step 4 is the last step of epoch 0 (4 per epoch): its snapshot precedes the round at that epoch's end, so the
    reset after the round puts the surviving weights back to their values at step 4."""
    model = ThreeLayerModel()

    class AtStep4(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                self.weights = pl_module.layer.mlp_1.weight.detach().clone()

    seen = AtStep4()
    callback = ModelPruning("l1_unstructured", amount=0.5, rewind_to_step=4, make_pruning_permanent=False,
                            parameter_names=["weight"])
    make_trainer(tmp_path, max_epochs=1, callbacks=[seen, callback]).fit(model)
    callback.apply_lottery_ticket_hypothesis()  # the reset of the fit's last round waits for training to go on
    kept = model.layer.mlp_1.weight_mask.bool()
    assert 0 < int(kept.sum()) < kept.numel()
    assert torch.equal(model.layer.mlp_1.weight_orig[kept], seen.weights[kept])


def uninterrupted_and_resumed(run: Callable[..., nn.Module], tmp_path: Path, seed: int, crash_at_step: int,
                              resume_seed: Optional[int] = None) -> tuple[nn.Module, nn.Module]:
    """`run(callbacks, ckpt_path=None)` (a fit returning its model) uninterrupted, then crashed at `crash_at_step`
    and resumed from its last epoch checkpoint (seeded with `resume_seed` first, when given): the two models."""
    seed_everything(seed)
    reference = run([ModelCheckpoint(dirpath=tmp_path / "reference")])
    seed_everything(seed)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "killed", save_last=True, every_n_epochs=1)
    with pytest.raises(SimulatedCrash):
        run([checkpoint, CrashAtStep(crash_at_step)])
    if resume_seed is not None:
        seed_everything(resume_seed)
    return reference, run([], ckpt_path=checkpoint.last_model_path)


def test_resumed_on_a_shuffling_bundled_datamodule_ends_like_the_uninterrupted_run(tmp_path):
    """With litcompress's own DataModules, whose epochs are shuffled: the resumed run sees each epoch's order again."""
    from litcompress.data import DigitsDataModule
    from litcompress.models import MLPClassifier

    def run(callbacks, ckpt_path=None):
        model = MLPClassifier(hidden=(64, 64))
        targets = [(m, "weight") for m in model.modules() if isinstance(m, torch.nn.Linear)]
        pruning = ModelPruning("l1_unstructured", parameters_to_prune=targets, use_lottery_ticket_hypothesis=False,
                               amount=PolynomialDecay(final_sparsity=0.8, begin=0, end=60, frequency=5))
        trainer = make_trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[pruning, *callbacks],
                               limit_train_batches=1.0)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
        return model

    reference, resumed = uninterrupted_and_resumed(run, tmp_path, seed=2, crash_at_step=30)  # in epoch 1, mid-schedule
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(("method", "make_pruning_permanent"), [
    ("l1_unstructured", False), ("l1_unstructured", True), ("random_unstructured", False)])
def test_killed_mid_schedule_then_resumed_ends_with_same_masks(tmp_path, method, make_pruning_permanent):
    """A run interrupted mid-schedule and resumed from its last checkpoint ends exactly like an uninterrupted one;
    with a random method too, in a process whose random streams differ (they drew each round's masks: the resumed
    fit drew others)."""
    def run(model, callbacks, ckpt_path=None):
        callback = ModelPruning(method, parameters_to_prune=weight_targets(model),
                                amount=PolynomialDecay(final_sparsity=0.85, begin=2, end=14, frequency=3),
                                use_lottery_ticket_hypothesis=False, make_pruning_permanent=make_pruning_permanent)
        trainer = make_trainer(tmp_path, max_epochs=5, enable_checkpointing=True, callbacks=[callback, *callbacks])
        trainer.fit(model, ckpt_path=ckpt_path)
        return model, trainer

    seed_everything(1)
    reference, _ = run(FixedDataModel(), [ModelCheckpoint(dirpath=tmp_path / "ref")])

    seed_everything(1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "killed", save_last=True, every_n_epochs=1)
    with pytest.raises(SimulatedCrash):
        run(FixedDataModel(), [ckpt, CrashAtStep(10)])  # mid-epoch 2, mid-schedule
    # what the crash left on disk loads into a fresh model as it is
    FixedDataModel.load_from_checkpoint(ckpt.last_model_path, strict=False)

    seed_everything(5)  # another process's streams
    resumed, _ = run(FixedDataModel(), [], ckpt_path=ckpt.last_model_path)
    for a, b in zip(weight_targets(reference), weight_targets(resumed)):
        assert torch.equal(getattr(*a), getattr(*b))
    zeros, total = zeros_and_total(weight_targets(resumed))
    assert zeros == round(0.85 * total)


@pytest.mark.parametrize("amount", [0.3, lambda epoch: 0.3 if epoch % 2 else 0.1], ids=["fraction", "callable"])
@pytest.mark.parametrize("validation", [False, True], ids=["prune-at-epoch-end", "prune-at-validation-end"])
def test_a_random_method_with_a_fixed_amount_resumes_drawing_the_masks_the_uninterrupted_fit_drew(tmp_path, amount,
                                                                                                 validation):
    """Its rounds drew on torch's global random state, which Lightning's checkpoints do not hold: the resumed fit
    drew other masks (a schedule's rounds had a stream of their own already)."""
    def run(callbacks, ckpt_path=None):
        model = FixedDataModel()
        callback = ModelPruning("random_unstructured", parameters_to_prune=weight_targets(model), amount=amount,
                                use_lottery_ticket_hypothesis=False, make_pruning_permanent=False,
                                prune_on_train_epoch_end=not validation)
        trainer = make_trainer(tmp_path, max_epochs=4, enable_checkpointing=True, callbacks=[callback, *callbacks])
        trainer.fit(model, ckpt_path=ckpt_path)
        return model

    # crashed in epoch 2, after two rounds; resumed in another process's streams
    reference, resumed = uninterrupted_and_resumed(run, tmp_path, seed=1, crash_at_step=10, resume_seed=5)
    expected, actual = reference.state_dict(), resumed.state_dict()
    assert any(key.endswith("_mask") for key in expected)
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


@pytest.mark.parametrize("validation", [False, True], ids=["prune-at-epoch-end", "prune-at-validation-end"])
@pytest.mark.parametrize("lottery", [None, "rewind-to-epoch-2"])
def test_resumed_from_a_checkpoint_of_an_epochs_last_batch_ends_like_the_uninterrupted_run(tmp_path, validation,
                                                                                          lottery):
    """`ModelCheckpoint(every_n_train_steps=...)` saves at an epoch's last batch, before the epoch's end hooks; a fit
    resumed from it starts the next epoch without them (Lightning's loop), so that epoch's pruning round (and the
    next epoch's start, where `rewind_to_epoch` takes its snapshot) never ran: one round short, without a word."""
    def callback():
        kw = dict(use_lottery_ticket_hypothesis=lambda epoch: epoch >= 2, rewind_to_epoch=2) if lottery else \
            dict(use_lottery_ticket_hypothesis=False)
        return ModelPruning("l1_unstructured", amount=lambda epoch: 0.3 if epoch >= 1 else 0.0,
                            make_pruning_permanent=False, prune_on_train_epoch_end=not validation, **kw)

    seed_everything(3)
    model, uninterrupted = FixedDataModel(), callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=4, save_on_train_epoch_end=False)
    make_trainer(tmp_path, max_epochs=4, enable_checkpointing=True, callbacks=[uninterrupted, ckpt]).fit(model)
    resumed_model, resumed = FixedDataModel(), callback()
    make_trainer(tmp_path, max_epochs=4, callbacks=[resumed]).fit(resumed_model,
                                                                  ckpt_path=tmp_path / "epoch=1-step=8.ckpt")
    assert [h["epoch"] for h in resumed._history] == [h["epoch"] for h in uninterrupted._history] == [1, 2, 3]
    expected, actual = model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    # from the fit's last batch: only the caught-up round runs, and no validation; it said "nothing was pruned"
    last, again = FixedDataModel(), callback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, max_epochs=4, callbacks=[again]).fit(last, ckpt_path=tmp_path / "epoch=3-step=16.ckpt")
    assert [h["epoch"] for h in again._history] == [1, 2, 3]  # the checkpoint's rounds, then epoch 3's here
    assert not any("nothing was pruned" in str(w.message) for w in caught)
    assert all(torch.equal(last.state_dict()[key], expected[key]) for key in expected)
    if validation:  # a caught-up round, then epochs without validation: their rounds never run, which is said
        with pytest.warns(UserWarning, match="this fit runs none"):
            make_trainer(tmp_path, max_epochs=4, limit_val_batches=0, callbacks=[callback()]).fit(
                FixedDataModel(), ckpt_path=tmp_path / "epoch=1-step=8.ckpt")


@pytest.mark.parametrize(("trainer_kwargs", "saved_at"), [
    (dict(val_check_interval=0.5), 2),  # a validation half-way through epoch 0
    (dict(val_check_interval=0.5), 6),  # and through epoch 1
    (dict(val_check_interval=4, check_val_every_n_epoch=None), 4),  # every 4 batches of the fit: an epoch's last
])
def test_resumed_from_a_checkpoint_of_a_batch_a_validation_followed_ends_like_the_uninterrupted_run(
        tmp_path, trainer_kwargs, saved_at):
    """Rounds at validation ends: a checkpoint saved at the batch a validation follows (before it runs) resumes
    without it (Lightning's loop skips it), and its round never ran: one round short."""
    class SameBatches(FixedDataModel):  # Lightning's mid-epoch resume starts the loader over: any order alike
        def __init__(self) -> None:
            super().__init__()
            self.data = self.data[:16].repeat(4, 1)

    def callback():
        return ModelPruning("l1_unstructured", amount=0.2, make_pruning_permanent=False,
                            prune_on_train_epoch_end=False, use_lottery_ticket_hypothesis=False)

    seed_everything(3)
    model, uninterrupted = SameBatches(), callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=2, save_on_train_epoch_end=False)
    make_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, num_sanity_val_steps=0,
                 callbacks=[uninterrupted, ckpt], **trainer_kwargs).fit(model)
    resumed_model, resumed = SameBatches(), callback()
    make_trainer(tmp_path, max_epochs=2, num_sanity_val_steps=0, callbacks=[resumed], **trainer_kwargs).fit(
        resumed_model, ckpt_path=tmp_path / f"epoch={(saved_at - 1) // 4}-step={saved_at}.ckpt")
    assert len(resumed._history) == len(uninterrupted._history) == (4 if trainer_kwargs["val_check_interval"] == 0.5
                                                                     else 2)
    expected, actual = model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


def test_resampled_parameters_resume_as_the_uninterrupted_run_drew_them(tmp_path):
    """resample_parameters drew on torch's global RNG, which Lightning does not checkpoint: a resumed fit drew other
    values (max difference 1.0) and ended with other weights and masks."""
    def callback():
        return ModelPruning("l1_unstructured", amount=0.3, make_pruning_permanent=False, resample_parameters=True)

    seed_everything(3)
    model, uninterrupted = FixedDataModel(), callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    make_trainer(tmp_path, max_epochs=4, enable_checkpointing=True, callbacks=[uninterrupted, ckpt]).fit(model)
    seed_everything(3)
    torch.rand(100)  # another global RNG state, as a new process resuming has
    resumed_model, resumed = FixedDataModel(), callback()
    make_trainer(tmp_path, max_epochs=4, callbacks=[resumed]).fit(resumed_model,
                                                                  ckpt_path=tmp_path / "epoch=1-step=8.ckpt")
    expected, actual = model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


def test_a_new_callback_on_a_fit_resumed_from_a_dense_checkpoint_catches_up_nothing(tmp_path):
    """Fine-tuning with pruning from a checkpoint written without the callback: its rounds start with this fit."""
    seed_everything(3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    make_trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[ckpt]).fit(FixedDataModel())
    pruning = ModelPruning("l1_unstructured", amount=0.3, use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, max_epochs=5, callbacks=[pruning]).fit(FixedDataModel(), ckpt_path=ckpt.best_model_path)
    assert [h["epoch"] for h in pruning._history] == [3, 4]


@pytest.mark.parametrize("rewind", [dict(rewind_to_step=3), dict(rewind_to_epoch=1)])
def test_a_new_callback_on_a_fit_resumed_past_its_rewind_point_says_the_weights_to_rewind_to_are_unknown(tmp_path,
                                                                                                      rewind):
    """Nor does it take the resumed weights for those of step 3 (the steps of the fit's first batch are past it)."""
    seed_everything(3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    make_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[ckpt]).fit(FixedDataModel())
    pruning = ModelPruning("l1_unstructured", amount=IterativeSchedule(rate_per_round=0.3, rounds=2, begin=3),
                           **rewind)  # the round at point 3 (the end of epoch 2) asks for the first reset
    with pytest.raises(MisconfigurationException, match="this fit started past its rewind point"):
        make_trainer(tmp_path, max_epochs=4, callbacks=[pruning]).fit(FixedDataModel(), ckpt_path=ckpt.best_model_path)
    assert pruning._original_layers is None


class StopAtStep(Callback):
    """Stops the fit after `step` optimizer steps, as EarlyStopping or a time limit would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _schedule_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "schedule" in str(w.message)]


@pytest.mark.parametrize(("schedule", "trainer_kwargs", "stop_at"), [
    (PolynomialDecay(final_sparsity=0.9, begin=0, end=40, frequency=2), dict(max_epochs=3), None),  # 12 steps
    (PolynomialDecay(final_sparsity=0.9, begin=0, end=40, frequency=3), dict(max_steps=7, max_epochs=-1), None),
    (PolynomialDecay(final_sparsity=0.9, begin=0, end=10, frequency=1),
     dict(max_epochs=4, accumulate_grad_batches=2), None),  # 8 optimizer steps
    (IterativeSchedule(rate_per_round=0.3, rounds=5, unit="epoch"), dict(max_epochs=2), None),
    (PolynomialDecay(final_sparsity=0.9, begin=0, end=10, frequency=2), dict(max_epochs=3), 5),  # stopped early
    # an epoch schedule in a fit that max_steps ends in its 2nd epoch (4 steps an epoch): it was said only at the end
    (PolynomialDecay(final_sparsity=0.9, begin=0, end=3, frequency=1, unit="epoch"), dict(max_steps=6, max_epochs=9),
     None),
    (PolynomialDecay(final_sparsity=0.9, begin=0, end=8, frequency=1, unit="epoch"),
     dict(max_steps=12, max_epochs=9, accumulate_grad_batches=2), None),  # 2 steps an epoch: 6 epochs
    (PolynomialDecay(final_sparsity=0.9, begin=0, end=3, frequency=1, unit="epoch"), dict(max_steps=6), None),
    (PolynomialDecay(final_sparsity=0.9, begin=0, end=3, frequency=1, unit="epoch"),
     dict(max_steps=6, callbacks_too=[GradientAccumulationScheduler({0: 2, 1: 1})]), None),  # 2 + 4 steps
    # a step schedule: 4 + 2 + 2 steps, where Lightning's estimate counted 12 (and the sparsity said was too high)
    (PolynomialDecay(final_sparsity=0.8, begin=0, end=20, frequency=2),
     dict(max_epochs=3, callbacks_too=[GradientAccumulationScheduler({1: 2})]), None),
])
def test_a_fit_shorter_than_its_schedule_says_where_sparsity_will_stop(tmp_path, schedule, trainer_kwargs, stop_at):
    """Before, a 90% schedule longer than the fit ended at, say, 24% without a word."""
    model = ThreeLayerModel()
    targets = weight_targets(model)
    callback = ModelPruning("l1_unstructured", parameters_to_prune=targets, amount=schedule,
                            use_lottery_ticket_hypothesis=False)
    trainer_kwargs = dict(trainer_kwargs)
    callbacks = [callback] + ([StopAtStep(stop_at)] if stop_at else []) + trainer_kwargs.pop("callbacks_too", [])
    with pytest.warns(UserWarning) as record:
        trainer = make_trainer(tmp_path, callbacks=callbacks, **trainer_kwargs)
        trainer.fit(model)
    (message,) = _schedule_warnings(record)  # said once: when fitting starts, or, unforeseen, when it ends
    if schedule.unit == "epoch" and "max_steps" in trainer_kwargs and not stop_at:  # the limit to raise is named
        assert "train longer (max_steps)" in message
    zeros, total = zeros_and_total(targets)
    reached = zeros / total
    assert reached < schedule.final_sparsity
    stated = float(re.search(r"(?:stop at|model is at) (\d+\.\d)%", message).group(1)) / 100
    assert abs(stated - reached) <= 0.001  # the sparsity said is the one reached (to rounding)
    assert f"{schedule.final_sparsity:.1%}" in message
    assert ("Fitting ended" in message) == (stop_at is not None)
    assert ("Resume the fit from its checkpoint" in message) == (stop_at is not None)  # a resume goes on there only


def test_an_epoch_schedule_that_max_steps_lets_end_warns_nothing_with_accumulation_scheduled(tmp_path, recwarn):
    """The accumulation a GradientAccumulationScheduler sets as each epoch starts was read as 1 when fitting started:
    the fit's epochs were under-counted and a schedule that ends within it was said to stop short."""
    model = ThreeLayerModel()
    callback = ModelPruning("l1_unstructured", parameters_to_prune=weight_targets(model),
                            amount=PolynomialDecay(final_sparsity=0.8, begin=0, end=2, frequency=1, unit="epoch"),
                            use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, callbacks=[callback, GradientAccumulationScheduler({0: 2})], max_steps=4,
                 max_epochs=5).fit(model)  # 2 steps an epoch: the round at the end of epoch 2 runs
    assert _schedule_warnings(recwarn) == []


def test_a_fit_that_ran_to_its_own_limit_is_not_told_to_resume(tmp_path):
    """Under manual optimization the steps are unknown when fitting starts, so the short schedule is said at the end;
    it advised a resume from the checkpoint, which, the fit having run to its max_epochs, trains nothing."""
    model = TwoOptimizerModel()  # two optimizer steps a batch: 8 an epoch
    callback = ModelPruning("l1_unstructured", parameters_to_prune=weight_targets(model),
                            amount=PolynomialDecay(final_sparsity=0.9, begin=0, end=40, frequency=2),
                            use_lottery_ticket_hypothesis=False)
    with pytest.warns(UserWarning) as record:
        make_trainer(tmp_path, callbacks=callback, max_epochs=2).fit(model)
    (message,) = _schedule_warnings(record)
    assert "Fitting ended at step 16, before the schedule's end (step 40)" in message
    assert "The fit ran to its max_epochs=2, so a resume trains no further: raise it, or give the schedule an " \
           "`end` within the fit." in message and "Resume" not in message


@pytest.mark.parametrize("stop_at", [None, 7])
def test_a_fit_that_ends_before_a_schedule_reached_its_final_sparsity_holds_warns_nothing(tmp_path, recwarn, stop_at):
    """A constant schedule prunes to its sparsity at its first round and holds it until its end: a fit shorter than
    that end (12 steps, or stopped at step 7) was told it "will stop at 50.0%" of the 50.0% asked, to train longer."""
    from litcompress.callbacks.schedule_checks import stopped_early_message

    model = ThreeLayerModel()
    targets = weight_targets(model)
    schedule = ConstantSparsity(0.5, begin=0, end=20, frequency=5)
    callbacks = [ModelPruning("l1_unstructured", parameters_to_prune=targets, amount=schedule,
                              use_lottery_ticket_hypothesis=False)] + ([StopAtStep(stop_at)] if stop_at else [])
    make_trainer(tmp_path, callbacks=callbacks, max_epochs=3).fit(model)
    assert _schedule_warnings(recwarn) == []
    zeros, total = zeros_and_total(targets)
    assert zeros == round(0.5 * total)
    assert stopped_early_message(schedule, 0, "sparsity") is None  # reached at its first round
    short = PolynomialDecay(final_sparsity=0.5, begin=0, end=20, frequency=5)
    assert "the model is at 28.9% of the 50.0% sparsity asked for" in stopped_early_message(short, 7, "sparsity")


def test_a_schedule_within_the_fit_warns_nothing(tmp_path, recwarn):
    model = ThreeLayerModel()
    callback = ModelPruning("l1_unstructured", parameters_to_prune=weight_targets(model),
                            amount=PolynomialDecay(final_sparsity=0.9, begin=0, end=12, frequency=2),
                            use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, callbacks=callback, max_epochs=3).fit(model)  # 12 steps: the last round runs
    assert _schedule_warnings(recwarn) == []


@pytest.mark.parametrize(("allowed", "reached_at"), [(lambda epoch: epoch % 2 == 0, 4), (lambda epoch: epoch > 0, 8)])
def test_schedule_rounds_apply_pruning_refuses_are_caught_up_and_the_last_ones_warned_of(tmp_path, recwarn, allowed,
                                                                                         reached_at):
    """A step schedule to 80% by step 8 (4 steps per epoch): rounds refused in epoch 0 are caught up by the next
    round allowed (the schedule gives the total sparsity); rounds refused in epoch 1, the schedule's last, are not,
    which was silent."""
    model = ThreeLayerModel()
    targets = weight_targets(model)
    schedule = PolynomialDecay(final_sparsity=0.8, begin=0, end=8, frequency=2)
    callback = ModelPruning("l1_unstructured", parameters_to_prune=targets, amount=schedule, apply_pruning=allowed,
                            use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, callbacks=callback, max_epochs=4).fit(model)
    zeros, total = zeros_and_total(targets)
    assert zeros == round(schedule.target(reached_at) * total)  # global: exactly the last allowed round's target
    skipped = [str(w.message) for w in recwarn if "apply_pruning" in str(w.message)]
    if reached_at == 8:
        assert skipped == []
    else:
        assert skipped == [
            "ModelPruning: `apply_pruning` returned False for the schedule's last rounds (epoch 1), so the fit ends at "
            "the 70.0% target of its last round, short of 80.0%. Let `apply_pruning` allow the epochs of the "
            "schedule's last rounds, or end the schedule earlier."]


def test_structured_schedules_prune_grouped_convs_and_their_inputs_evenly_over_the_groups(tmp_path):
    """A ResNeXt block: the grouped conv and the 1x1 conv it reads lose channels evenly over its 4 groups (Lightning's
    callback prunes each layer's weakest channels wherever they are), so shrink removes all of the grouped conv's."""
    from litcompress import shrink
    from litcompress.data import DigitsDataModule
    from litcompress.models import ResNeXtClassifier

    seed_everything(0)
    model = ResNeXtClassifier(image_size=8, channels=16, width=32, groups=4, blocks=1)
    block = model.net[3]
    targets = [(block.reduce, "weight"), (block.grouped, "weight")]
    callback = ModelPruning("ln_structured", amount=PolynomialDecay(final_sparsity=0.5, begin=0, end=20, frequency=5),
                            pruning_dim=0, pruning_norm=2, use_global_unstructured=False,
                            parameters_to_prune=targets, use_lottery_ticket_hypothesis=False)
    data = DigitsDataModule(batch_size=64, flatten=False)
    make_trainer(tmp_path, callbacks=callback, max_epochs=2, limit_train_batches=None).fit(model, datamodule=data)
    for module in (block.reduce, block.grouped):
        zero_rows = (module.weight.flatten(1) == 0).all(dim=1)
        assert zero_rows.view(4, 8).sum(dim=1).tolist() == [4, 4, 4, 4]  # half of each group's 8 channels
    x = next(iter(data.val_dataloader()))[0]
    report = shrink(model.eval(), x).report
    (grouped,) = [layer for layer in report.layers if layer.name == "net.3.grouped"]
    assert (grouped.channels_before, grouped.channels_after, grouped.left) == (32, 16, 0)


def _amount_per_epoch(epoch: int, rate: float) -> float:
    return rate if epoch < 2 else 0.0


class _AmountObject:
    def __call__(self, epoch: int) -> float:
        return 0.3


@pytest.mark.parametrize("amount", [
    functools.partial(_amount_per_epoch, rate=0.3),
    _AmountObject(),
    lambda epoch: 0.3,
])
def test_the_state_key_of_a_callable_amount_names_no_memory_address(amount):
    """The checkpoint holds the callback's state under its `state_key`; a key with an address in it would not be
    found by the resumed run in a new process, which would then lose its rounds and lottery-ticket snapshot."""
    key = ModelPruning("l1_unstructured", amount=amount).state_key
    assert "0x" not in key and key == ModelPruning("l1_unstructured", amount=amount).state_key
    if isinstance(amount, functools.partial):
        assert "_amount_per_epoch, rate=0.3" in key


@pytest.mark.parametrize("save_on_train_epoch_end", [None, False])
def test_a_monitored_checkpoint_saved_after_the_round_is_said_and_the_fix_holds_the_scored_weights(
        tmp_path, caplog, save_on_train_epoch_end):
    """ModelCheckpoint(monitor=...) saves when the training epoch ends, after the round: its best file held weights
    pruned once more than those scored (digits: score 0.816, its weights 0.805). Saved when validation ends, it
    holds the weights scored."""
    seed_everything(0)
    model = FixedDataModel()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val", mode="min", save_top_k=-1,
                                 save_on_train_epoch_end=save_on_train_epoch_end)
    scored = RecordScoredWeights()
    with caplog.at_level("INFO", logger="litcompress"):
        make_trainer(tmp_path, max_epochs=2, limit_val_batches=1, enable_checkpointing=True,
                     callbacks=[scored, ModelPruning("l1_unstructured", amount=0.5, parameter_names=["weight"],
                                                     use_lottery_ticket_hypothesis=False), checkpoint]).fit(model)
    said = "ModelCheckpoint(monitor='val') saves at the end of each training epoch, after that epoch's pruning round"
    assert (said in caplog.text) == (save_on_train_epoch_end is None)
    saved = torch.load(tmp_path / "checkpoints" / "epoch=0-step=4.ckpt", weights_only=False)["state_dict"]
    as_scored = torch.equal(saved["layer.mlp_1.weight"], scored.weights[0])
    assert as_scored == (save_on_train_epoch_end is False)


class RecordScoredWeights(Callback):
    """The first layer's effective weight when each validation ends (what the monitored score measured)."""

    def __init__(self) -> None:
        self.weights = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.weights[trainer.current_epoch] = pl_module.layer.mlp_1.weight.detach().clone()


def test_a_round_that_prunes_nothing_does_not_rewind(tmp_path):
    """A cubic schedule from 0 has a round at its begin with target 0: it rewound the weights (undoing the training
    before it) and, before a later rewind point, failed the fit. Now the first reset follows the first round that
    prunes, to the snapshot at the start of epoch 1 (step 4)."""
    model = FixedDataModel()
    starts = RecordEpochStarts()
    schedule = PolynomialDecay(final_sparsity=0.8, begin=3, end=12, frequency=3)  # rounds at 3 (target 0), 6, 9, 12
    callback = ModelPruning("l1_unstructured", amount=schedule, rewind_to_epoch=1, make_pruning_permanent=False,
                            use_lottery_ticket_hypothesis=lambda epoch: True, parameter_names=["weight"])
    make_trainer(tmp_path, max_epochs=2, callbacks=[callback, starts]).fit(model)  # 8 steps: rounds at 3 and 6
    assert [h["step"] for h in callback._history] == [3, 6]
    callback.apply_lottery_ticket_hypothesis()  # the reset after the round at step 6
    kept = model.layer.mlp_1.weight_mask.bool()
    assert 0 < int(kept.sum()) < kept.numel()
    assert torch.equal(model.layer.mlp_1.weight_orig[kept], starts.weights[1][0][kept])


@pytest.mark.parametrize("kwargs, message", [
    (dict(reset_optimizer="no"), r"`reset_optimizer='no'`: pass True or False"),  # truthy: it cleared Adam's state
    (dict(reset_optimizer=None), r"`reset_optimizer=None`: pass True or False"),
    (dict(use_lottery_ticket_hypothesis=False, rewind_to_step=5), r"`rewind_to_step=5` rewind\(s\) the lottery"),
    (dict(use_lottery_ticket_hypothesis=False, reset_optimizer=True), r"`reset_optimizer=True` rewind\(s\)"),
    # a point 0 was refused, then left out of the message: "`` rewind(s) ..."
    (dict(use_lottery_ticket_hypothesis=False, rewind_to_step=0), r"`rewind_to_step=0` rewind\(s\)"),
    (dict(use_lottery_ticket_hypothesis=False, rewind_to_epoch=0, reset_optimizer=True),
     r"`rewind_to_epoch=0, reset_optimizer=True` rewind\(s\)"),
    # truthy: every reset drew fresh weights, the run quietly the random re-initialisation control
    (dict(resample_parameters="no"), r"`resample_parameters='no'`: pass True or False"),
    # truthy too: global pruning, masks made permanent, rounds at epoch ends, whatever was meant
    (dict(use_global_unstructured="False"), r"`use_global_unstructured='False'`: pass True or False"),
    (dict(make_pruning_permanent="False"), r"`make_pruning_permanent='False'`: pass True or False"),
    (dict(prune_on_train_epoch_end="no"), r"`prune_on_train_epoch_end='no'`: pass True or False"),
    # walked letter by letter: "The provided `parameter_names` name: w isn't in ..."
    (dict(parameter_names="weight"), r"`parameter_names='weight'`: pass a list of names, e.g. \['weight'\]"),
    # "'bool' object is not iterable", naming no argument
    (dict(parameter_names=True), r"`parameter_names=True`: pass a list of names, e.g. \['weight'\]"),
])
def test_rewinding_arguments_that_would_be_ignored_or_misread_are_refused_at_construction(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        ModelPruning("l1_unstructured", amount=0.5, **kwargs)


def test_parameter_names_given_as_a_generator_are_read_once(tmp_path):
    """Checked name by name at construction, a generator was empty when the targets were found: nothing pruned."""
    model = FixedDataModel()
    callback = ModelPruning("l1_unstructured", amount=0.5, parameter_names=(name for name in ["weight"]),
                            use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, max_epochs=1, callbacks=callback).fit(model)
    zeros, total = zeros_and_total(weight_targets(model))
    assert zeros == round(0.5 * total)


def test_parameter_names_from_numpy_or_a_set_name_the_state_as_a_list_does():
    """numpy's str_ names (an array) and a set's order (its hash seed's) went into the checkpoint's state key, which
    a resume given a list, or run in another process, did not find: the callback's state was dropped."""
    import numpy as np

    listed = ModelPruning("l1_unstructured", amount=0.5, parameter_names=["bias", "weight"]).state_key
    for names in (np.array(["bias", "weight"]), {"weight", "bias"}, frozenset({"bias", "weight"})):
        assert ModelPruning("l1_unstructured", amount=0.5, parameter_names=names).state_key == listed


class _PermanentInOneLayer(ModelPruning):
    """An override (as Lightning's docs allow) that makes permanent only the part of the model it names."""

    def make_pruning_permanent(self, module):
        super().make_pruning_permanent(module.layer.mlp_1)


def test_a_subclass_making_one_part_permanent_beside_a_callback_keeping_its_masks(tmp_path):
    """The other callback's masks outside that part were passed on as kept, and make_permanent_ refused them as
    tensors of no module of the part given, at the fit's end (feba627)."""
    model = FixedDataModel()
    first, third = model.layer.mlp_1, model.layer.mlp_3
    callbacks = [_PermanentInOneLayer("l1_unstructured", amount=0.5, parameters_to_prune=[(first, "weight")],
                                      use_lottery_ticket_hypothesis=False),
                 ModelPruning("l1_unstructured", amount=0.3, parameters_to_prune=[(third, "weight")],
                              make_pruning_permanent=False, use_lottery_ticket_hypothesis=False)]
    make_trainer(tmp_path, max_epochs=1, callbacks=callbacks).fit(model)
    assert not hasattr(first, "weight_mask") and hasattr(third, "weight_mask")


def test_flags_read_as_numpy_bools_are_taken():
    import numpy as np

    callback = ModelPruning("l1_unstructured", amount=0.5, use_global_unstructured=np.False_,
                            make_pruning_permanent=np.True_, prune_on_train_epoch_end=np.True_)
    assert (callback._use_global_unstructured, callback._make_pruning_permanent,
            callback._prune_on_train_epoch_end) == (False, True, True)
    for amount, taken in ((np.float32(0.5), 0.5), (np.int64(3), 3), (np.float32(0.3), 0.3)):  # (refused: "should
        got = ModelPruning("l1_unstructured", amount=amount).amount  # be ... an int, a float"), as the number printed
        assert got == taken and type(got) is type(taken)
    # numpy's float64, a float, is kept as given (Lightning's key of its state names it: older checkpoints hold it)
    assert "'amount': 'np.float64(0.5)'" in ModelPruning("l1_unstructured", amount=np.float64(0.5)).state_key


@pytest.mark.parametrize("numpy_amount", ["callable_float32", "float64"])
def test_a_numpy_amount_writes_checkpoints_that_load_weights_only(numpy_amount, tmp_path):
    """The round's amount, saved in the state's history as the callable returned it (or as a float64 was given), was a
    numpy scalar: the checkpoint refused torch.load(weights_only=True), so a resumed fit with Lightning's defaults
    failed to load it."""
    import numpy as np

    amount = (lambda epoch: np.float32(0.3)) if numpy_amount == "callable_float32" else np.float64(0.3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callback = ModelPruning("l1_unstructured", amount=amount, make_pruning_permanent=False)
    make_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[callback, checkpoint]).fit(
        FixedDataModel())
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][callback.state_key]
    used = float(np.float32(0.3)) if numpy_amount == "callable_float32" else 0.3  # (a float32 counts as Lightning's)
    assert [round_["amount"] for round_ in state["history"]] == [used, used]
    assert all(type(round_["amount"]) is float for round_ in state["history"])
    resumed = ModelPruning("l1_unstructured", amount=amount, make_pruning_permanent=False)
    make_trainer(tmp_path, max_epochs=3, callbacks=[resumed]).fit(FixedDataModel(), ckpt_path=tmp_path / "last.ckpt")
    assert len(resumed._history) == 3  # the state found again, one round more

    callback = ModelPruning("l1_unstructured", amount=0.5, resample_parameters=np.True_, reset_optimizer=np.False_)
    assert callback._resample_parameters is True and callback._reset_optimizer is False
    # as Lightning's callback takes them (they were refused: "must be a bool or a callable")
    callback = ModelPruning("l1_unstructured", amount=0.5, apply_pruning=np.True_,
                            use_lottery_ticket_hypothesis=np.False_)
    assert callback._apply_pruning is True and callback._use_lottery_ticket_hypothesis is False
    plain = ModelPruning("l1_unstructured", amount=0.5, use_lottery_ticket_hypothesis=False)
    assert callback.state_key == plain.state_key
    # and checked as the bools are (the `is False` tests skipped them: a rewind that did nothing passed)
    with pytest.raises(MisconfigurationException, match=r"`reset_optimizer=True` rewind\(s\)"):
        ModelPruning("l1_unstructured", amount=0.5, use_lottery_ticket_hypothesis=np.False_, reset_optimizer=True)


def test_resampling_without_the_lottery_ticket_is_said_to_do_nothing():
    """Lightning accepts it (kept, for drop-in use), silently."""
    with pytest.warns(UserWarning, match=r"resample_parameters=True\) re-draws the weights of the lottery ticket's "
                                         r"resets, which use_lottery_ticket_hypothesis=False turns off"):
        ModelPruning("l1_unstructured", amount=0.5, resample_parameters=True, use_lottery_ticket_hypothesis=False)


def test_a_schedule_written_with_float_numbers_resumes_from_one_written_with_ints(tmp_path):
    """LightningCLI hands `power` (typed float) 3.0 where Python code writes 3: the two keys differed, and a run
    resumed in Python from a CLI checkpoint lost the callback's state without a word (other weights at the end)."""
    from litcompress.data import DigitsDataModule
    from litcompress.models import MLPClassifier
    from tests.conftest import fit_killed_and_resumed

    powers = iter([3, 3.0, 3])  # uninterrupted, killed (as the CLI writes it), resumed (as Python writes it)

    def callback():
        return ModelPruning("l1_unstructured", parameter_names=["weight"], use_lottery_ticket_hypothesis=True,
                            amount=PolynomialDecay(final_sparsity=0.8, begin=0, end=3, power=next(powers),
                                                   unit="epoch"))

    reference, _, resumed = fit_killed_and_resumed(tmp_path, lambda: MLPClassifier(hidden=(16,)), callback,
                                                   lambda: DigitsDataModule(batch_size=128), crash_step=12)
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_a_state_saved_under_a_key_with_whole_floats_is_restored_without_a_warning(recwarn):
    """Keys written before whole floats were written as ints ('initial_sparsity=0.0', PolynomialDecay's default)."""
    from lightning.pytorch import Trainer

    callback = ModelPruning("l1_unstructured", use_lottery_ticket_hypothesis=False,
                            amount=PolynomialDecay(final_sparsity=0.5, begin=0, end=10))
    legacy = callback.state_key.replace("initial_sparsity=0,", "initial_sparsity=0.0,")
    assert legacy != callback.state_key
    state = {**callback.state_dict(), "rounds": 7, "last_step": 40}
    callback.on_load_checkpoint(Trainer(callbacks=[callback], logger=False), None, {"callbacks": {legacy: state}})
    assert callback._pending_state == state  # restored once the model is known (setup)
    assert not [w for w in recwarn if "ModelPruning" in str(w.message)]


def test_rounds_of_a_held_target_that_prune_nothing_do_not_rewind(tmp_path):
    """A constant target's later rounds prune nothing; they rewound all the same (the schedule's target, not what was
    pruned, was tested): every epoch started again from the initial weights, and training never got past one."""
    seed_everything(0)
    model = FixedDataModel()
    initial = model.layer.mlp_1.weight.detach().clone()
    callback = ModelPruning("l1_unstructured", amount=ConstantSparsity(0.5, begin=1, end=3, unit="epoch"),
                            parameter_names=["weight"], make_pruning_permanent=False)
    seen = RecordEpochStarts()
    make_trainer(tmp_path, max_epochs=3, callbacks=[callback, seen]).fit(model)
    assert [h["lottery_ticket_reset"] for h in callback._history] == [True, False, False]
    assert [h["zeros_after"] > h["zeros_before"] for h in callback._history] == [True, False, False]
    kept = model.layer.mlp_1.weight_mask.bool()
    assert torch.equal(seen.weights[1][0][kept], initial[kept])  # the round that pruned rewound
    assert not torch.equal(seen.weights[2][0][kept], initial[kept])  # the next trained on from there


def test_with_gradient_accumulation_a_step_schedules_first_round_follows_the_first_optimizer_step(tmp_path):
    """The first batch ends at global_step 0 without an optimizer step; the round at point 0 ran there, before the
    snapshot of rewind_to_step=1, which construction had accepted (as without accumulation the round follows step 1):
    the fit failed at once."""
    callback = ModelPruning("l1_unstructured", amount=IterativeSchedule(0.2, 3, begin=0, frequency=2, unit="step"),
                            use_lottery_ticket_hypothesis=lambda epoch: True, rewind_to_step=1,
                            parameter_names=["weight"])
    make_trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2, callbacks=callback).fit(ThreeLayerModel())
    assert [(h["step"], h["lottery_ticket_reset"]) for h in callback._history] == [(1, True), (2, True)]


def test_a_reset_inside_an_accumulation_window_drops_the_gradients_of_the_weights_it_undid(tmp_path):
    """A round at a validation inside an accumulation window: the gradient of the window's earlier batches, computed
    on the trained weights, went into the first optimizer step of the rewound network."""
    class GradientsAtResetBatch(Callback):  # listed after the pruning callback: what the batch starts from
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 3:
                self.grad = pl_module.layer.mlp_1.weight_orig.grad

    seen = GradientsAtResetBatch()
    callback = ModelPruning("l1_unstructured", amount=0.5, prune_on_train_epoch_end=False, make_pruning_permanent=False)
    make_trainer(tmp_path, max_epochs=1, val_check_interval=3, accumulate_grad_batches=2,
                 callbacks=[callback, seen]).fit(ThreeLayerModel())
    assert callback._history[0]["lottery_ticket_reset"] and callback._history[0]["step"] == 1
    assert seen.grad is None


def test_a_reset_before_any_optimizer_step_keeps_the_gradients_of_its_accumulation_window(tmp_path):
    """No step since the snapshot: the reset changes no value, and the window's gradients are those of the weights
    training goes on from; they were dropped all the same (the one step then differed from the fit without the
    lottery ticket)."""
    def update(lottery_ticket: bool) -> torch.Tensor:
        seed_everything(0)
        model = ThreeLayerModel()
        before = model.layer.mlp_1.weight.detach().clone()
        callback = ModelPruning("l1_unstructured", amount=0.3, prune_on_train_epoch_end=False,
                                make_pruning_permanent=False, use_lottery_ticket_hypothesis=lottery_ticket)
        make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, val_check_interval=1, accumulate_grad_batches=2,
                     num_sanity_val_steps=0, callbacks=[callback]).fit(model)
        assert callback._history[0]["step"] == 0
        return model.layer.mlp_1.weight_orig.detach() - before

    with_reset, without = update(True), update(False)
    assert with_reset.abs().sum() > 0 and torch.equal(with_reset, without)


def test_a_fit_its_max_time_ended_is_not_told_to_resume(tmp_path):
    """A resumed fit keeps counting the Timer's time from where it was (Lightning checkpoints it): it trains no
    further with the same max_time."""
    model = ThreeLayerModel()
    callback = ModelPruning("l1_unstructured", parameters_to_prune=weight_targets(model),
                            amount=PolynomialDecay(final_sparsity=0.9, begin=0, end=40, frequency=2),
                            use_lottery_ticket_hypothesis=False)
    class SlowFirstBatch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:
                time.sleep(1.1)  # past max_time: the Timer stops the fit at its next check

    with pytest.warns(UserWarning) as record:
        make_trainer(tmp_path, callbacks=[callback, SlowFirstBatch()], max_epochs=20, max_time={"seconds": 1}).fit(
            model)
    (message,) = _schedule_warnings(record)
    assert "before the schedule's end (step 40)" in message
    assert "The fit ran to its max_time, so a resume trains no further" in message


class RecordsItsLoaders(FixedDataModel):
    """Records the epoch each of its training dataloaders was built for (a curriculum chooses its data by it)."""

    def __init__(self) -> None:
        super().__init__()
        self.built_for: list[int] = []

    def train_dataloader(self):
        self.built_for.append(self.trainer.current_epoch)
        return super().train_dataloader()


@pytest.mark.parametrize("schedule", [PolynomialDecay(final_sparsity=0.8, begin=0, end=3, frequency=1, unit="epoch"),
                                      PolynomialDecay(final_sparsity=0.8, begin=0, end=12, frequency=2)])
def test_a_resumed_fit_builds_its_training_data_for_the_epoch_it_resumes_at(tmp_path, schedule):
    """The fit's length was read when fitting started, which set the training data up before Lightning restored the
    loops: the resumed fit's dataloader was built as for epoch 0, and a saved dataloader state was dropped."""
    model = RecordsItsLoaders()
    make_trainer(tmp_path, max_epochs=2, enable_checkpointing=True,
                 callbacks=[ModelPruning("l1_unstructured", amount=schedule, use_lottery_ticket_hypothesis=False),
                            ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(model)
    resumed, without = RecordsItsLoaders(), RecordsItsLoaders()
    make_trainer(tmp_path, max_epochs=4, max_steps=14,
                 callbacks=[ModelPruning("l1_unstructured", amount=schedule, use_lottery_ticket_hypothesis=False)]).fit(
        resumed, ckpt_path=tmp_path / "last.ckpt")
    make_trainer(tmp_path, max_epochs=4, max_steps=14).fit(without, ckpt_path=tmp_path / "last.ckpt")
    assert model.built_for == [0] and without.built_for == resumed.built_for != [0]  # as without the callback


class _NinetyFiveWeights(FixedDataModel):
    """A layer of 95 weights: round(0.3 * 95) is 28 in float64 and 29 in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.small = torch.nn.Linear(19, 5)

    def forward(self, x):
        return self.small(x[:, :19]).sum(1, keepdim=True)


def test_a_callable_amounts_numpy_float32_prunes_what_lightnings_callback_prunes(tmp_path):
    """Taken as the number it prints as (0.3), a callable's float32(0.3) pruned 28 of 95 weights where Lightning's
    callback, counting in float32, pruned 29: the rounds' counts differ at rounding boundaries."""
    import numpy as np
    from lightning.pytorch.callbacks import ModelPruning as LightningModelPruning

    zeros = []
    for cls in (LightningModelPruning, ModelPruning):
        seed_everything(0)
        model = _NinetyFiveWeights()
        callback = cls("l1_unstructured", parameters_to_prune=[(model.small, "weight")],
                       amount=lambda epoch: np.float32(0.3), use_global_unstructured=False,
                       make_pruning_permanent=False, use_lottery_ticket_hypothesis=False)
        make_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(model)
        zeros.append(int((model.small.weight == 0).sum()))
    assert zeros == [29, 29]


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class _CountsItsDescriptions(PolynomialDecay):
    descriptions: typing.ClassVar[list[int]] = []

    def __repr__(self) -> str:
        type(self).descriptions.append(1)
        return super().__repr__()


def test_the_state_key_is_made_once_not_at_every_hook(tmp_path):
    """Lightning reads `state_key` at every hook it calls (six a training step): describing the schedule each time
    made the steps of a small model a sixth slower. It is made again when an attribute it names is reassigned."""
    schedule = _CountsItsDescriptions(final_sparsity=0.5, begin=0, end=8, frequency=2, unit="step")
    callback = ModelPruning("l1_unstructured", amount=schedule, make_pruning_permanent=False,
                            use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, max_epochs=3, callbacks=[callback]).fit(FixedDataModel())  # 12 steps, rounds at 0, 2, ..., 8
    assert len(callback._history) == 5
    assert len(_CountsItsDescriptions.descriptions) <= 2
    callback.amount = PolynomialDecay(final_sparsity=0.7, begin=0, end=8, frequency=2, unit="step")
    assert callback.state_key == ModelPruning("l1_unstructured", amount=callback.amount, make_pruning_permanent=False,
                                              use_lottery_ticket_hypothesis=False).state_key
