"""Iterative magnitude pruning on scikit-learn digits: plain loop and Lightning `Trainer`."""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, LambdaCallback, ModelCheckpoint
from torch import nn

from litcompress.callbacks.lottery import find_lottery_ticket
from litcompress.data import DigitsDataModule, load_digits_tensors
from litcompress.models import MLPClassifier
from litcompress.pruning.imp import IMPRound, LotteryTicket, iterative_magnitude_pruning
from tests.conftest import PressCtrlC, StepsTwoOptimizers, python_handles_ctrl_c, weight_averaging_callbacks


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def plain_train_and_evaluate(shuffled_epochs: int = 0):
    """A full-batch Adam loop (60 steps); with `shuffled_epochs`, that many epochs of mini-batches of 256 shuffled from
    the global generator instead (as a shuffling DataLoader draws)."""
    splits = load_digits_tensors(seed=0)
    x, y = splits.train.tensors
    xt, yt = splits.test.tensors

    def train(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        batches = [slice(None)] * 60 if not shuffled_epochs else \
            [b for _ in range(shuffled_epochs) for b in torch.randperm(len(x)).split(256)]
        for batch in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()

    def evaluate(model):
        with torch.no_grad():
            return float((model(xt).argmax(1) == yt).float().mean())

    return train, evaluate


class _CountsItsTraining(nn.Sequential):
    """torch's get_extra_state may be any picklable object (a dict) or a tensor: here a count training advances."""

    def __init__(self, as_tensor: bool) -> None:
        super().__init__(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.trained, self.as_tensor = 0, as_tensor

    def get_extra_state(self):
        return torch.tensor(self.trained) if self.as_tensor else {"trained": self.trained}

    def set_extra_state(self, state) -> None:
        self.trained = int(state) if self.as_tensor else state["trained"]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_module_with_an_extra_state_is_rewound_saved_and_resumed(tmp_path, as_tensor):
    """Each round's state copy called .detach() on a dict (AttributeError); a tensor extra state was copied into the
    temporary tensor get_extra_state returned, so it was never rewound (each round started where the last ended)."""
    torch.manual_seed(0)
    train_weights, evaluate = plain_train_and_evaluate()
    seen = []

    def train(model):
        seen.append(model.trained)
        model.trained += 1
        train_weights(model)

    path, model = tmp_path / "imp.pt", _CountsItsTraining(as_tensor)  # (the search works on copies of it)
    ticket = iterative_magnitude_pruning(model, train, evaluate, rounds=1, rate=0.5, checkpoint_path=path,
                                         control="none")
    again = iterative_magnitude_pruning(model, train, evaluate, rounds=2, rate=0.5, checkpoint_path=path,
                                        control="none")  # resumed after round 1
    assert seen == [0, 0, 0]  # every round from the rewound state: rounds 0, 1, then 2 after the resume
    assert [r.round for r in again.rounds] == [0, 1, 2] and again.rounds[1] == ticket.rounds[1]
    for found in (ticket, again):
        rewound = found.rewound_state["_extra_state"]
        assert (int(rewound) == 0) if as_tensor else rewound == {"trained": 0}
        assert found.model.trained == 1  # the ticket trained once from it


class _ClassifierKeepingAFormatVersion(MLPClassifier):
    def get_extra_state(self):
        return {"format": 2}

    def set_extra_state(self, state) -> None:
        self.format = state["format"]


def test_a_lightning_search_retraining_from_the_rewind_point_takes_a_module_with_an_extra_state():
    """The rewind point's checkpoint was rebuilt with .detach() on every value of the module's state."""
    kwargs = dict(max_epochs=1, limit_train_batches=4, limit_test_batches=2, accelerator="cpu", devices=1)
    ticket = find_lottery_ticket(_ClassifierKeepingAFormatVersion(hidden=(16,)), DigitsDataModule(batch_size=64),
                                 metric="test_acc", rounds=1, rate=0.5, control="none", rewind_to_step=2,
                                 retrain_from="rewind_point", trainer_kwargs=kwargs)
    assert ticket.remaining == pytest.approx(0.5, abs=0.01) and ticket.rewound_state["_extra_state"] == {"format": 2}


def test_imp_rounds_masks_rewinding_and_control():
    torch.manual_seed(0)
    model = mlp()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train, evaluate = plain_train_and_evaluate()
    ticket = iterative_magnitude_pruning(model, train, evaluate, rounds=3, rate=0.5,
                                         layer_rates={"2.weight": 0.25}, control="every")
    # the model passed in is untouched
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
    # round 0 is dense; each layer keeps exactly (1 - rate)^r
    assert [r.round for r in ticket.rounds] == [0, 1, 2, 3]
    assert ticket.rounds[0].remaining == 1.0 and ticket.rounds[0].control_metric is None
    kept0 = 64 * 64 - round(0.5 * 4096)
    kept0 -= round(0.5 * kept0)
    kept0 -= round(0.5 * kept0)
    kept2 = 640 - round(0.25 * 640)
    kept2 -= round(0.25 * kept2)
    kept2 -= round(0.25 * kept2)
    assert int(ticket.masks["0.weight"].sum()) == kept0 and int(ticket.masks["2.weight"].sum()) == kept2
    assert ticket.remaining == pytest.approx((kept0 + kept2) / (4096 + 640))
    # the ticket is the mask applied to the initial weights
    for name in ("0.weight", "2.weight"):
        assert torch.equal(ticket.rewound_state[name + "_orig"], initial[name])
        assert torch.equal(ticket.rewound_state[name + "_mask"], ticket.masks[name])
    # every round trained to a useful network, and the control ran on every pruned round
    assert all(r.metric > 0.8 for r in ticket.rounds)
    assert all(r.control_metric is not None for r in ticket.rounds[1:])
    assert "random re-init" in ticket.table()


def test_imp_rejects_bad_arguments():
    train, evaluate = plain_train_and_evaluate()
    with pytest.raises(ValueError, match="rounds"):
        iterative_magnitude_pruning(mlp(), train, evaluate, rounds=0)
    with pytest.raises(ValueError, match="rate"):
        iterative_magnitude_pruning(mlp(), train, evaluate, rounds=1, rate=1.0)
    with pytest.raises(ValueError, match="not pruned tensors"):
        iterative_magnitude_pruning(mlp(), train, evaluate, rounds=1, layer_rates={"9.weight": 0.1})
    for bad in ("2.weight", [("2.weight", 0.1)], 0.25, False):  # dict()'s own words, or (False, []) taken as none
        with pytest.raises(TypeError, match=r"`layer_rates` must be a mapping \{name: rate\}"):
            iterative_magnitude_pruning(mlp(), train, evaluate, rounds=1, layer_rates=bad)
    with pytest.raises(ValueError, match="NaN"):
        iterative_magnitude_pruning(mlp(), train, lambda m: float("nan"), rounds=1)


def test_numpy_rounds_and_rates_are_taken_as_the_numbers_they_are(tmp_path):
    """A sweep's np.int64(1) rounds and np.float32 rates were refused ("must be an int >= 1, got np.int64(1)")."""
    import numpy as np

    train, evaluate = plain_train_and_evaluate()
    torch.manual_seed(0)
    ticket = iterative_magnitude_pruning(mlp(), lambda model: None, evaluate, rounds=np.int64(1),
                                         rate=np.float32(0.2), layer_rates={"2.weight": np.float32(0.25)},
                                         checkpoint_path=tmp_path / "imp.pt")
    assert len(ticket.rounds) == 2 and int((ticket.masks["2.weight"] == 0).sum()) == 160  # 0.25 of 640
    settings = torch.load(tmp_path / "imp.pt", weights_only=False)["settings"]
    assert (settings["rate"], settings["layer_rates"]["2.weight"]) == (0.2, 0.25)  # as printed, not 0.2000000029...
    assert type(settings["rate"]) is float and type(settings["layer_rates"]["2.weight"]) is float
    torch.manual_seed(0)  # the same search given Python's numbers resumes it (it was refused: "rate=0.2000000029")
    evaluated = []
    again = iterative_magnitude_pruning(mlp(), lambda model: None, lambda model: evaluated.append(1) or 0.5,
                                        rounds=1, rate=0.2, layer_rates={"2.weight": 0.25},
                                        checkpoint_path=tmp_path / "imp.pt")
    assert not evaluated and torch.equal(again.masks["2.weight"], ticket.masks["2.weight"])


class DigitsClassifier(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_find_lottery_ticket_with_trainer_and_late_rewinding():
    seed_everything(0)
    module = DigitsClassifier()
    ticket = find_lottery_ticket(module, DigitsDataModule(batch_size=128), metric="test_acc", rounds=2, rate=0.6,
                                 trainer_kwargs=dict(max_epochs=4, accelerator="cpu"), rewind_to_step=3)
    assert [r.round for r in ticket.rounds] == [0, 1, 2]
    assert ticket.remaining == pytest.approx(((4096 - 2458) - round(0.6 * 1638) + (640 - 384) - round(0.6 * 256))
                                             / 4736)
    assert all(0.5 < r.metric <= 1.0 for r in ticket.rounds)
    # rewound to step 3, not to initialisation
    assert not torch.equal(ticket.rewound_state["net.0.weight_orig"], module.net[0].weight)
    steps = []  # a metric the step does not log fails before any training, on one batch
    with pytest.raises(KeyError, match="'val_acc' was not logged by DigitsClassifier.test_step"):
        find_lottery_ticket(DigitsClassifier(), DigitsDataModule(), metric="val_acc", rounds=1,
                            trainer_kwargs=dict(max_epochs=1, callbacks=[
                                LambdaCallback(on_train_batch_end=lambda *_: steps.append(1))]))
    assert steps == []


def test_the_users_checkpoints_and_logger_get_the_rounds_only(tmp_path):
    """The fit to the rewind step (no round) saved a file into the user's checkpoint folder (epoch=0-step=3.ckpt),
    and the one-batch metric check logged its score of an untrained copy as a first row."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    seed_everything(0)
    logger = CSVLogger(tmp_path, name="logs")
    ticket = find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=256), metric="test_acc", rounds=1,
                                 rate=0.5, control="none", rewind_to_step=3,
                                 trainer_kwargs=dict(max_epochs=1, logger=logger, callbacks=[
                                     ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)]))
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert len(files) == 2 and not any("step=3" in name for name in files), files  # one per round
    rows = [line.split(",") for line in Path(logger.log_dir, "metrics.csv").read_text().splitlines()[1:]]
    assert [float(row[-1]) for row in rows] == pytest.approx([r.metric for r in ticket.rounds])


class LogsThroughItsLogger(DigitsClassifier):
    def test_step(self, batch, batch_idx):
        self.logger.log_metrics({"batch_seen": float(batch_idx)}, step=batch_idx)
        super().test_step(batch, batch_idx)


def test_a_module_using_its_logger_in_its_steps_passes_the_metric_check(tmp_path):
    """The one-batch check ran with logger=False (to keep its score out of the user's logger): `self.logger` was
    None in the step, an AttributeError before any round."""
    from lightning.pytorch.loggers import CSVLogger

    seed_everything(0)
    ticket = find_lottery_ticket(LogsThroughItsLogger(), DigitsDataModule(batch_size=256), metric="test_acc",
                                 rounds=1, rate=0.5, control="none",
                                 trainer_kwargs=dict(max_epochs=1, logger=CSVLogger(tmp_path, name="logs")))
    assert len(ticket.rounds) == 2


class OneCycleDigitsClassifier(DigitsClassifier):
    """Sizes its learning-rate schedule from the fit, as Lightning users write it."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1,
                                                       total_steps=self.trainer.estimated_stepping_batches)
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


class WeightsAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step, self.weights = step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.weights = pl_module.net[0].weight.detach().clone()


def test_late_rewinding_takes_the_weights_of_an_ordinary_fits_kth_step():
    """`rewind_to_step=k` is the k-th step of the fit `trainer_kwargs` describe, learning-rate warm-up included (a
    Trainer of k steps would run the module's whole one-cycle schedule in them); a k the fit never reaches fails."""
    seed_everything(0)
    module = OneCycleDigitsClassifier()
    kwargs = dict(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    record = WeightsAtStep(5)
    Trainer(**kwargs, callbacks=[record]).fit(copy.deepcopy(module), datamodule=DigitsDataModule(batch_size=128))
    ticket = find_lottery_ticket(module, DigitsDataModule(batch_size=128), metric="val_acc", rounds=1, rate=0.5,
                                 trainer_kwargs={**kwargs, "min_epochs": 2}, rewind_to_step=5, evaluate_on="validate",
                                 control="none")  # (a minimum number of epochs would keep the stop from stopping)
    assert torch.equal(ticket.rewound_state["net.0.weight_orig"], record.weights)
    with pytest.raises(ValueError, match="the fit is 9 optimizer steps long, so it never reaches it"):
        find_lottery_ticket(module, DigitsDataModule(batch_size=128), metric="val_acc", rounds=1,
                            trainer_kwargs={**kwargs, "max_epochs": 1}, rewind_to_step=50, evaluate_on="validate")


class TwoOptimizerDigitsClassifier(StepsTwoOptimizers, DigitsClassifier):
    """Two optimizers stepped per batch (a GAN's way): global_step moves by two per batch."""

    def loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def optimizer_groups(self):
        return [list(self.net[0].parameters()), [p for layer in self.net[1:] for p in layer.parameters()]]


@pytest.mark.parametrize("k", [3, 4])
def test_a_rewind_step_a_batch_of_two_optimizer_steps_passes_is_said_and_taken_at_that_batch(k):
    """Step 3 is inside the second batch (steps 3 and 4): the rounds rewound to step 4 without a word."""
    seed_everything(0)
    module = TwoOptimizerDigitsClassifier()
    kwargs = dict(max_epochs=1, limit_train_batches=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    record = WeightsAtStep(4)
    Trainer(**kwargs, callbacks=[record]).fit(copy.deepcopy(module), datamodule=DigitsDataModule(batch_size=128))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ticket = find_lottery_ticket(module, DigitsDataModule(batch_size=128), metric="test_acc", rounds=1,
                                     rate=0.5, trainer_kwargs=kwargs, rewind_to_step=k, control="none")
    passed = [str(w.message) for w in said if "the batch that reached it" in str(w.message)]
    assert passed == (["`rewind_to_step=3`: the batch that reached it took the fit to optimizer step 4 (each of its "
                       "batches steps several optimizers), so every round rewinds to step 4."] if k == 3 else [])
    assert torch.equal(ticket.rewound_state["net.0.weight_orig"], record.weights)


class FitsSeen(Callback):
    """Per fit (it keeps no state, so it records across the rounds): the step it starts at, the learning rate and the
    optimizer's state entries its first step sees, the steps it trains and its final first-layer weights."""

    def __init__(self) -> None:
        self.fits: list[dict] = []
        self.learning_rates: list[float] = []  # of every step of every fit

    def on_train_start(self, trainer, pl_module):
        self.fits.append(dict(start=trainer.global_step, steps=0))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        self.learning_rates.append(optimizer.param_groups[0]["lr"])
        if self.fits[-1]["steps"] == 0:
            self.fits[-1].update(lr=self.learning_rates[-1], optimizer_state=len(optimizer.state))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.fits[-1]["steps"] += 1

    def on_fit_end(self, trainer, pl_module):
        self.fits[-1]["weights"] = pl_module.net[0].weight.detach().clone()


def test_retraining_from_the_rewind_point_resumes_every_round_at_step_k():
    """Frankle et al. (2020) and OpenLTH retrain a round for the T - k steps after k, at k's place in the
    learning-rate schedule; every round was a whole fresh fit. With the optimizer's state kept and k at the end of an
    epoch, the dense round is the uninterrupted fit, bit for bit."""
    seed_everything(0)
    module = OneCycleDigitsClassifier()  # SGD with OneCycleLR's momentum: the optimizer keeps momenta
    kwargs = dict(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    reference = FitsSeen()
    Trainer(**kwargs, callbacks=[reference]).fit(copy.deepcopy(module), datamodule=DigitsDataModule(batch_size=128))
    assert reference.fits[0]["steps"] == 27  # 9 steps per epoch
    seen = FitsSeen()
    ticket = find_lottery_ticket(module, DigitsDataModule(batch_size=128), metric="val_acc", rounds=1, rate=0.5,
                                 trainer_kwargs={**kwargs, "callbacks": [seen]}, rewind_to_step=9,
                                 evaluate_on="validate", retrain_from="rewind_point", reset_optimizer=False)
    rewind, dense, pruned, control = seen.fits
    assert (rewind["start"], rewind["steps"]) == (0, 9)
    for fit in (dense, pruned, control):
        assert (fit["start"], fit["steps"]) == (9, 18)
        assert fit["lr"] == reference.learning_rates[9] and fit["optimizer_state"] > 0
    assert torch.equal(dense["weights"], reference.fits[0]["weights"])
    assert ticket.remaining == pytest.approx(0.5) and not torch.equal(pruned["weights"], dense["weights"])
    assert (pruned["weights"][ticket.masks["net.0.weight"] == 0] == 0).all()


def test_retraining_from_a_rewind_point_inside_an_epoch_clears_the_optimizer_state(recwarn, monkeypatch, tmp_path):
    """By default (OpenLTH) the momenta at k are cleared; a k inside an epoch resumes there without Lightning's
    mid-epoch warning, which this option asks for, or its "Restoring states" lines about our temporary file, whose
    folder is gone afterwards."""
    seed_everything(0)
    # this test's own temporary folder: another xdist worker's lottery search makes and removes one in the system's
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folders_during_fits = []

    class FoldersSeen(Callback):
        def on_fit_start(self, trainer, pl_module):
            folders_during_fits.append(len(list(tmp_path.glob("litcompress-lottery-*"))))

    seen, lines = FitsSeen(), []
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    rank_zero.addHandler(handler)
    try:
        ticket = find_lottery_ticket(OneCycleDigitsClassifier(), DigitsDataModule(batch_size=128), metric="val_acc",
                                     rounds=1, rate=0.5, evaluate_on="validate", control="none",
                                     trainer_kwargs=dict(max_epochs=2, accelerator="cpu",
                                                         callbacks=[seen, FoldersSeen()]),
                                     rewind_to_step=5, retrain_from="rewind_point")
    finally:
        rank_zero.removeHandler(handler)
    assert any("max_epochs=2" in line for line in lines)  # Lightning's lines about the fits themselves stay
    assert not [line for line in lines if "Restor" in line]
    assert [(f["start"], f["steps"]) for f in seen.fits] == [(0, 5), (5, 13), (5, 13)]
    assert [f["optimizer_state"] for f in seen.fits[1:]] == [0, 0]
    assert seen.fits[1]["lr"] == seen.fits[2]["lr"] == seen.learning_rates[5] > seen.learning_rates[0]
    assert ticket.rounds[1].metric > 0.5
    assert not [w for w in recwarn if "before the epoch ended" in str(w.message)]
    assert folders_during_fits[1:] == [1, 1] and not list(tmp_path.glob("litcompress-lottery-*"))  # made, removed


@pytest.mark.parametrize("arguments, error, message", [
    (dict(retrain_from="rewind_point"), ValueError, "give rewind_to_step=k"),
    (dict(retrain_from="k", rewind_to_step=2), ValueError, "must be 'start' or 'rewind_point'"),
    (dict(reset_optimizer=False, rewind_to_step=2), ValueError, "only `retrain_from='rewind_point'` resumes"),
    (dict(reset_optimizer="no", rewind_to_step=2, retrain_from="rewind_point"), TypeError, "True or False"),
    # these two were refused after the dense fit to k had trained (17 steps: 1079 samples in batches of 64)
    (dict(rewind_to_step=1000), ValueError, "the fit is 17 optimizer steps long, so it never reaches it"),
    (dict(rewind_to_step=17, retrain_from="rewind_point"), ValueError, "every round would resume at its end"),
])
def test_retraining_options_that_cannot_apply_fail_before_any_training(arguments, error, message):
    steps = []
    with pytest.raises(error, match=re.escape(message)):
        find_lottery_ticket(DigitsClassifier(), DigitsDataModule(), metric="test_acc", rounds=1,
                            trainer_kwargs=dict(max_epochs=1, callbacks=[
                                LambdaCallback(on_train_batch_end=lambda *_: steps.append(1))]), **arguments)
    assert steps == []


class CrashAtFit(Callback):
    """Raises when its `fit`-th fit starts (1-based; no state, so it counts across the rounds): a search killed
    mid-way. With `fit=None` it only counts."""

    def __init__(self, fit: int | None = None) -> None:
        self.fit, self.fits = fit, 0

    def on_train_start(self, trainer, pl_module):
        self.fits += 1
        if self.fits == self.fit:
            raise RuntimeError("killed")


@pytest.mark.parametrize("retrain", [dict(), dict(rewind_to_step=3, retrain_from="rewind_point")])
def test_ctrl_c_in_a_rounds_fit_raises_keyboard_interrupt_and_leaves_ctrl_c_working(tmp_path, retrain):
    """Lightning turned Ctrl-C in a round's fit into sys.exit(1) (a failure, to the caller) and left SIGINT ignored
    for the rest of the process; the search saved so far resumes."""
    def search(press: PressCtrlC):
        seed_everything(0)  # the same network: a search resumes only from the one it started from
        return find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=256), metric="test_acc", rounds=1,
                                   rate=0.5, checkpoint_path=tmp_path / "search.pt", **retrain,
                                   trainer_kwargs=dict(max_epochs=1, accelerator="cpu", callbacks=[press]))

    with python_handles_ctrl_c():
        with pytest.raises(KeyboardInterrupt):
            search(PressCtrlC(fit=2))  # round 1's retraining, or round 0's after the run to the rewind point
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert [r.round for r in search(PressCtrlC(fit=0)).rounds] == [0, 1]


def same_tickets(a, b) -> bool:
    return (a.rounds == b.rounds and a.masks.keys() == b.masks.keys()
            and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
            and all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
            and all(torch.equal(getattr(m, t), getattr(b.model.get_submodule(p), t))  # as the model computes them
                    for k in a.masks for p, _, t in [k.rpartition(".")] for m in [a.model.get_submodule(p)])
            and all(torch.equal(v, b.rewound_state[k]) for k, v in a.rewound_state.items()))


@pytest.mark.parametrize("retrain, crash_at, fits_after", [
    (dict(), 3, 3),  # killed in round 2: rounds 2 and 3 and the control are left
    (dict(rewind_to_step=3, retrain_from="rewind_point"), 3, 4),  # fits: the rewind run, rounds 0, 1 (killed), ...
])
def test_a_search_killed_mid_way_resumes_from_its_checkpoint_and_ends_as_the_uninterrupted_one(
        tmp_path, retrain, crash_at, fits_after):
    def search(callback: Callback, path=None, rounds=3):
        seed_everything(0)
        return find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=256), metric="test_acc",
                                   rounds=rounds, rate=0.5, checkpoint_path=path, **retrain,
                                   trainer_kwargs=dict(max_epochs=1, accelerator="cpu", callbacks=[callback]))

    uninterrupted = search(CrashAtFit())
    path = tmp_path / "search.pt"
    with pytest.raises(RuntimeError, match="killed"):
        search(CrashAtFit(crash_at), path)
    resumed_fits = CrashAtFit()
    assert same_tickets(search(resumed_fits, path), uninterrupted)
    assert resumed_fits.fits == fits_after  # the finished rounds were not trained again
    again = CrashAtFit()
    assert same_tickets(search(again, path), uninterrupted) and again.fits == 0  # finished: returned at once
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["search.pt", "search.pt.rewind_point.ckpt"] if retrain else ["search.pt"])
    if retrain:  # going on for a fourth round needs the fit saved at k
        (tmp_path / "search.pt.rewind_point.ckpt").unlink()
        with pytest.raises(FileNotFoundError, match="search.pt.rewind_point.ckpt, which is gone"):
            search(CrashAtFit(), path, rounds=4)
    other = dict(rewind_to_step=4, retrain_from="rewind_point") if not retrain else dict(rewind_to_step=4)
    with pytest.raises(ValueError, match="holds a search with .*rewind_to_step=" + ("None, not 4" if not retrain
                                                                                   else "3, not 4")):
        seed_everything(0)
        find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=256), metric="test_acc", rounds=3,
                            rate=0.5, checkpoint_path=path, **other, trainer_kwargs=dict(max_epochs=1))


@pytest.mark.slow  # two processes, ~17 s (make test-slow); ranks' masks under DDP: tests/callbacks/test_pruning_ddp.py
def test_under_ddp_the_ranks_share_the_rewind_point_and_one_writes_the_search(tmp_path):
    """Each DDP rank runs the search: the fit saved at k was rank 0's file in rank 0's temporary folder, which the
    other rank could not find, and every rank wrote the search file at once (one moved the other's away). Each rank's
    table held the metric of its own half of the test set."""
    script = Path(__file__).with_name("imp_ddp_script.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parents[2] / "src"), os.environ.get("PYTHONPATH",
                                                                                                      "")])}
    runs = []
    for _ in range(2):  # the second resumes the finished search
        done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append([torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.pt", "rank1.pt", "search.pt",
                                                          "search.pt.rewind_point.ckpt"]
    first = runs[0][0]
    assert first["remaining"] == pytest.approx(0.25) and any(k.endswith("_mask") for k in first["state"])
    for seen in (runs[0][1], *runs[1]):
        assert seen["state"].keys() == first["state"].keys() and seen["remaining"] == first["remaining"]
        assert all(torch.equal(seen["state"][k], v) for k, v in first["state"].items())
        assert torch.equal(seen["weight"], first["weight"])
        assert seen["metrics"] == first["metrics"]  # the mean over the ranks' shards (the step logs no sync_dist)


@pytest.mark.slow  # two processes (make test-slow)
def test_under_ddp_ranks_seeded_apart_rewind_to_rank_0s_initial_weights_and_keep_their_own_module(tmp_path):
    """Every round trains from rank 0's weights (DDP broadcasts them as a fit starts), but each rank's ticket rewound
    to its own initial weights: rank 1's `rewound_state` was a network no round trained."""
    script = Path(__file__).with_name("imp_ddp_script.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parents[2] / "src"), os.environ.get("PYTHONPATH",
                                                                                                      "")])}
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "seeded-per-rank"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"seeded{rank}.pt") for rank in (0, 1)]
    assert not torch.equal(ranks[0]["given"]["net.0.weight"], ranks[1]["given"]["net.0.weight"])  # seeded apart
    for key, value in ranks[0]["rewound"].items():
        assert torch.equal(ranks[1]["rewound"][key], value), key
    mask = ranks[0]["rewound"]["net.0.weight_mask"].bool()
    assert torch.equal(ranks[0]["rewound"]["net.0.weight_orig"][mask], ranks[0]["given"]["net.0.weight"][mask])
    for seen in ranks:  # each rank's own module is left as it was given
        assert all(torch.equal(seen["given_after"][key], value) for key, value in seen["given"].items())


class _SparseAdjacency(nn.Module):
    """A graph network keeping its adjacency as a sparse buffer."""

    def __init__(self) -> None:
        super().__init__()
        edges = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
        self.register_buffer("adjacency", torch.sparse_coo_tensor(edges, torch.ones(4), (4, 4)).coalesce())
        self.fc = nn.Linear(5, 8)
        self.register_buffer("scale", torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8))


def test_the_network_a_search_starts_from_is_told_by_its_values_in_any_layout():
    """The digest that a resumed search compares failed on a sparse buffer ("unsupported memory format")."""
    from litcompress.pruning.imp import _fingerprint

    torch.manual_seed(0)
    model = _SparseAdjacency()
    assert _fingerprint(model) == _fingerprint(copy.deepcopy(model))
    changed = copy.deepcopy(model)
    changed.adjacency = torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.ones(1) * 2, (4, 4)).coalesce()
    assert _fingerprint(changed) != _fingerprint(model)
    with torch.no_grad():
        changed = copy.deepcopy(model)
        changed.fc.weight[0, 0] += 1e-6
    assert _fingerprint(changed) != _fingerprint(model)
    changed = copy.deepcopy(model)  # the same integers, another scale
    changed.scale = torch.quantize_per_tensor(torch.ones(3) * 5, 0.5, 0, torch.quint8)
    assert torch.equal(changed.scale.int_repr(), model.scale.int_repr())
    assert _fingerprint(changed) != _fingerprint(model)


def test_a_saved_search_resumes_only_with_its_own_arguments_and_may_go_on_for_more_rounds(tmp_path, caplog):
    """The plain-loop driver, whose training draws from torch's generator (a shuffled order per call): the generators'
    states are part of the file, so the resumed search matches the uninterrupted one."""
    splits = load_digits_tensors(seed=0)
    x, y = splits.train.tensors
    calls, kill_at = [], []

    def train(model):
        calls.append(1)
        if len(calls) in kill_at:
            raise RuntimeError("killed")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for batch in torch.randperm(len(x)).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()

    _, evaluate = plain_train_and_evaluate()

    def search(rounds=2, path=None, rate=0.5, seed=0, control_seed=12345):
        torch.manual_seed(seed)
        return iterative_magnitude_pruning(mlp(), train, evaluate, rounds=rounds, rate=rate, control="every",
                                           checkpoint_path=path, control_seed=control_seed)

    uninterrupted = search(rounds=3)
    path = tmp_path / "imp.pt"
    calls.clear()
    kill_at.append(3)  # round 0, round 1, then round 1's control: killed before round 1 is saved
    with pytest.raises(RuntimeError, match="killed"):
        search(path=path)
    kill_at.clear()
    with pytest.raises(ValueError, match=r"holds a search with rate=0.5, not 0.25: pass the arguments it was started "
                                         r"with to resume it, or another path to start afresh"):
        search(path=path, rate=0.25)
    # another network: its rounds went on from the first one's masks and weights, without a word
    with pytest.raises(ValueError, match=r"holds a search that started from another network \(other initial "):
        search(path=path, seed=1)
    # refused after every round's training (the control's seed is read last), and saved with the search
    calls.clear()
    with pytest.raises(TypeError, match=r"`control_seed` must be an int, got 'a'"):
        search(path=tmp_path / "never.pt", control_seed="a")
    assert not (tmp_path / "never.pt").exists() and not calls
    with caplog.at_level(logging.INFO, logger="litcompress"):
        assert same_tickets(search(path=path), search(rounds=2))
    assert f"IMP: resumed from {path} after round 0 of 2\n" in caplog.text  # the progress, round by round:
    assert re.search(r"IMP round 1/2: 50\.00% of the weights left, metric 0\.\d{4}, random re-init 0\.\d{4}",
                     caplog.text)
    assert same_tickets(search(rounds=3, path=path), uninterrupted)  # two rounds saved, a third one more
    with pytest.raises(ValueError, match=r"finished round 3, past rounds=2"):
        search(rounds=2, path=path)
    with pytest.raises(IsADirectoryError, match="is a directory; name a file in it"):
        search(path=tmp_path)
    with pytest.raises(NotADirectoryError, match=r"imp.pt/sub/imp.pt': .*imp.pt is a file, not a folder"):
        search(path=path / "sub" / "imp.pt")  # mkdir's "Not a directory"
    calls.clear()
    search(path=tmp_path / "new" / "folder" / "imp.pt")  # made, before the first round
    assert (tmp_path / "new" / "folder" / "imp.pt").is_file()
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a file iterative_magnitude_pruning wrote"):
        search(path=tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("not a torch file")  # torch.load's bare UnpicklingError
    with pytest.raises(ValueError, match=r"is not a file iterative_magnitude_pruning wrote \(torch.load: "):
        search(path=tmp_path / "text.pt")
    # a file edited or cut short: a bare KeyError or TypeError, or (rows lost) rounds pruned again on the last one
    finished = torch.load(path, weights_only=False)
    for damaged, said in [({**finished, "table": finished["table"][:2]}, r"its table holds 2 row\(s\) for rounds 0 "
                                                                         r"to 3"),
                          ({k: v for k, v in finished.items() if k != "network"}, "no 'network'"),
                          ({**finished, "done": "2"}, "its 'done' is of type str, not int")]:
        torch.save(damaged, tmp_path / "damaged.pt")
        calls.clear()
        with pytest.raises(ValueError, match=rf"is not a file iterative_magnitude_pruning wrote as it is \({said}\)"):
            search(rounds=3, path=tmp_path / "damaged.pt")
        assert not calls


def test_a_checkpoint_path_in_a_folder_that_cannot_be_written_is_refused_before_the_first_training(
        unwritable_folder):
    """Only a folder or a file in the way was checked: round 0 trained, then torch's writer failed naming no file."""
    trained = []
    path = unwritable_folder / "imp.pt"
    with pytest.raises(PermissionError, match=re.escape(f"checkpoint_path='{path}': cannot write there (")):
        iterative_magnitude_pruning(mlp(), trained.append, lambda model: 1.0, rounds=2, checkpoint_path=path)
    assert trained == [] and not path.exists()


class CallbackStateAtFitStart(Callback):
    """Listed after the others: their state when each fit starts (keeps no state of its own, so it records across
    the rounds)."""

    def __init__(self, early_stopping: EarlyStopping, checkpoint: ModelCheckpoint) -> None:
        self.early_stopping, self.checkpoint, self.seen = early_stopping, checkpoint, []

    def on_fit_start(self, trainer, pl_module):
        self.seen.append((float(self.early_stopping.best_score), self.early_stopping.wait_count,
                          self.checkpoint.best_model_score))


def test_every_round_starts_the_callbacks_given_from_their_state_before_the_first(tmp_path, recwarn):
    """One EarlyStopping instance serves every round's Trainer: carried over, its best score (the dense network's)
    and patience count stopped the pruned rounds after one or two epochs of ten. A ModelCheckpoint in its default
    folder (resolved by the first fit) starts every round without a best score too, and without Lightning's warning
    that its folder changed; the control's fit leaves it out."""
    seed_everything(0)
    early_stopping = EarlyStopping("val_acc", mode="max", patience=2)
    checkpoint = ModelCheckpoint(monitor="val_acc", mode="max")
    seen = CallbackStateAtFitStart(early_stopping, checkpoint)
    find_lottery_ticket(OneCycleDigitsClassifier(), DigitsDataModule(batch_size=128), metric="val_acc", rounds=2,
                        rate=0.5, evaluate_on="validate", control="final",
                        trainer_kwargs=dict(max_epochs=3, accelerator="cpu", enable_checkpointing=True,
                                            default_root_dir=tmp_path, callbacks=[early_stopping, checkpoint, seen]))
    assert seen.seen[:3] == [(-math.inf, 0, None)] * 3  # rounds 0-2
    # the random re-initialisation control: trained without the ModelCheckpoint, which keeps round 2's best
    assert seen.seen[3][:2] == (-math.inf, 0) and seen.seen[3][2] is not None
    assert checkpoint.best_model_score == seen.seen[3][2]
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]


class HoldsALock(Callback):
    """A callback whose state deepcopy refuses: kept as it is across the rounds, not an error."""

    def __init__(self) -> None:
        import threading

        self.lock, self.fits = threading.Lock(), 0

    def on_fit_start(self, trainer, pl_module):
        self.fits += 1

    def state_dict(self):
        return {"lock": self.lock, "fits": self.fits}


def test_a_callback_whose_state_cannot_be_copied_is_left_as_it_is():
    seed_everything(0)
    holder = HoldsALock()
    ticket = find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=256), metric="test_acc", rounds=1,
                                 control="none", trainer_kwargs=dict(max_epochs=1, accelerator="cpu",
                                                                     callbacks=[holder]))
    assert len(ticket.rounds) == 2 and holder.fits == 2


def test_the_rounds_trainers_keep_lightnings_set_up_lines_out_of_the_log():
    """Each round, its evaluation and the control build a Trainer: "GPU available" and the like, once per round."""
    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    rank_zero, records = logging.getLogger("lightning.pytorch.utilities.rank_zero"), Records()
    rank_zero.addHandler(records)
    try:
        seed_everything(0)
        find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=256), metric="test_acc", rounds=1,
                            trainer_kwargs=dict(max_epochs=1, accelerator="cpu"), rewind_to_step=2)
    finally:
        rank_zero.removeHandler(records)
    assert not [m for m in records.messages if "available" in m or "was configured" in m]


def test_find_lottery_ticket_builds_a_configure_model_module_on_a_copy():
    from tests.conftest import ConfiguredDigitsClassifier  # builds its layers in `configure_model`

    seed_everything(0)
    module = ConfiguredDigitsClassifier()
    ticket = find_lottery_ticket(module, DigitsDataModule(batch_size=128), metric="val_acc", rounds=1, rate=0.5,
                                 trainer_kwargs=dict(max_epochs=2, accelerator="cpu"), evaluate_on="validate",
                                 control="none")
    assert module.net is None  # the module given is untouched
    assert ticket.remaining == pytest.approx(0.5) and ticket.rounds[1].metric > 0.5
    train, evaluate = plain_train_and_evaluate()
    with pytest.raises(ValueError, match="nothing to prune: ConfiguredDigitsClassifier has no"):
        iterative_magnitude_pruning(ConfiguredDigitsClassifier(), train, evaluate, rounds=1)


class RowAttention(nn.Module):
    """The digits' 8 rows as tokens through nn.MultiheadAttention, which reads its out_proj's weight without calling
    out_proj (pruned, its cached orig * mask must be recomputed at every call)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.view(-1, 8, 8)
        return self.head(self.attention(rows, rows, rows, need_weights=False)[0].flatten(1))


def test_imp_and_its_control_train_an_attention():
    torch.manual_seed(0)
    train, evaluate = plain_train_and_evaluate()
    ticket = iterative_magnitude_pruning(RowAttention(), train, evaluate, rounds=2, rate=0.5, control="every")
    assert "attention.out_proj.weight" in ticket.masks  # every Linear's weight, the attention's output too
    assert all(r.metric > 0.5 for r in ticket.rounds) and all(r.control_metric is not None
                                                              for r in ticket.rounds[1:])


def test_the_ticket_is_the_whole_network_rewound_with_the_final_mask(tmp_path):
    """Frankle & Carbin (and OpenLTH) rewind every parameter, biases and normalisation layers too, and prune Linear and
    conv weights only: the rewound state equals the initial one but for the mask (biases and batch-norm statistics
    kept their trained values, and the batch norm's scale was pruned). A search file of the earlier format, whose
    rounds rewound the pruned weights only, is refused rather than resumed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 37), nn.BatchNorm1d(37), nn.ReLU(), nn.Linear(37, 5))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(200, 20), torch.randint(0, 5, (200,))

    def train(network: nn.Module) -> None:
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
        network.train()
        for _ in range(5):
            optimizer.zero_grad()
            nn.functional.cross_entropy(network(x), y).backward()
            optimizer.step()

    ticket = iterative_magnitude_pruning(model, train, lambda network: 0.0, rounds=2, rate=0.2, control="none",
                                         checkpoint_path=tmp_path / "imp.pt")
    assert sorted(ticket.masks) == ["0.weight", "3.weight"]
    for key, value in ticket.rewound_state.items():
        if not key.endswith("_mask"):
            assert torch.equal(value, initial[key.removesuffix("_orig")]), key
    saved = torch.load(tmp_path / "imp.pt", weights_only=False)
    saved["format"] = 1
    torch.save(saved, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="rewound the pruned weights only"):
        iterative_magnitude_pruning(model, train, lambda network: 0.0, rounds=3, rate=0.2, control="none",
                                    checkpoint_path=tmp_path / "old.pt")


def test_a_misspelt_scope_or_parameter_name_is_refused_not_run_as_local_pruning():
    train, evaluate = plain_train_and_evaluate()
    for scope in ("Global", "globl", None):
        with pytest.raises(ValueError, match=r"`scope` must be 'local' or 'global'"):
            iterative_magnitude_pruning(mlp(), train, evaluate, rounds=1, scope=scope)
        with pytest.raises(ValueError, match=r"`scope` must be 'local' or 'global'"):
            find_lottery_ticket(DigitsClassifier(), DigitsDataModule(), metric="test_acc", rounds=1, scope=scope)
    with pytest.raises(TypeError, match=r"`parameter_names` must be a sequence of names"):
        iterative_magnitude_pruning(mlp(), train, evaluate, rounds=1, parameter_names="weight")
    with pytest.raises(ValueError, match=r"`parameter_names` \['bais'\]: no pruned module of Sequential has such"):
        iterative_magnitude_pruning(mlp(), train, evaluate, rounds=1, parameter_names=("weight", "bais"))


def test_the_random_reinit_control_after_every_round_leaves_the_tickets_rounds_as_they_are():
    """The control's training drew on the global random streams (a shuffling loader does), so control='every'
    changed the ticket's own later rounds: other masks, other metrics."""
    train, evaluate = plain_train_and_evaluate(shuffled_epochs=3)
    tickets = {}
    for control in ("none", "every"):
        torch.manual_seed(0)
        model = mlp()
        tickets[control] = iterative_magnitude_pruning(model, train, evaluate, rounds=2, rate=0.5, control=control)
    assert [r.metric for r in tickets["none"].rounds] == [r.metric for r in tickets["every"].rounds]
    assert all(r.control_metric is not None for r in tickets["every"].rounds[1:])
    for key, value in tickets["none"].model.state_dict().items():
        assert torch.equal(tickets["every"].model.state_dict()[key], value), key


def test_a_search_resumed_with_other_trainer_arguments_or_module_is_refused(tmp_path):
    path = tmp_path / "search.pt"

    def search(rounds, module=None, batch_size=256, **trainer_kwargs):
        seed_everything(0)
        return find_lottery_ticket(module or DigitsClassifier(), DigitsDataModule(batch_size=batch_size),
                                   metric="test_acc", rounds=rounds, rate=0.5, checkpoint_path=path,
                                   trainer_kwargs=dict(max_epochs=1, **trainer_kwargs))

    search(1)
    with pytest.raises(ValueError, match=r"holds a search with trainer_kwargs=\{'max_epochs': 1\}, not "
                                         r"\{'max_epochs': 1, 'max_steps': 3\}"):
        search(2, max_steps=3)  # round 2 would train otherwise than round 1, in one table
    with pytest.raises(ValueError, match=r"holds a search with datamodule=.*'batch_size': 256.*not .*'batch_size': 16"):
        search(2, batch_size=16)  # likewise on other data (it went on silently)
    assert len(search(2).rounds) == 3  # the same arguments go on


class _StartedAt(Callback):
    """A public attribute that is no setting: another value in every process."""

    def __init__(self) -> None:
        self.started = time.time()


def test_a_search_resumed_with_its_callbacks_configured_otherwise_is_refused(tmp_path):
    """Callbacks were compared by their class names: an EarlyStopping of patience 1 for rounds 0-1 and of patience
    100 for round 2 made one table of two searches. What a fit or the process sets (a ModelCheckpoint's folder and
    best path, a time) is no setting: the same callbacks, used by the first call, resume (other callbacks are
    compared by their class, as a test's crash point or a progress bar's rate changes no round)."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    checkpoints = ModelCheckpoint(monitor="test_acc", mode="max", save_top_k=1)

    def search(rounds, patience):
        seed_everything(0)
        return find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=256), metric="test_acc",
                                   rounds=rounds, rate=0.5, checkpoint_path=tmp_path / "search.pt",
                                   trainer_kwargs=dict(max_epochs=1, default_root_dir=tmp_path, callbacks=[
                                       EarlyStopping("val_acc", mode="max", patience=patience, strict=False),
                                       checkpoints, _StartedAt()]))

    search(1, patience=1)
    with pytest.raises(ValueError, match=r"holds a search with trainer_kwargs=.*'class': 'EarlyStopping'.*"
                                         r"'patience': 1.*not .*'patience': 100"):
        search(2, patience=100)
    assert checkpoints.dirpath is not None  # resolved by the first call's fits
    assert len(search(2, patience=1).rounds) == 3


def test_trainer_arguments_that_cannot_work_fail_before_training_and_a_model_checkpoint_is_taken(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    with pytest.raises(ValueError, match=r"trainer_kwargs\['limit_val_batches'\]=0 leaves no batch to evaluate"):
        find_lottery_ticket(DigitsClassifier(), DigitsDataModule(), metric="val_acc", rounds=1,
                            evaluate_on="validate", trainer_kwargs=dict(max_epochs=1, limit_val_batches=0))
    with pytest.raises(ValueError, match=r"the fit is 4 optimizer steps long, so every round would resume at its end"):
        find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=256), metric="test_acc", rounds=1,
                            rewind_to_step=4, retrain_from="rewind_point",
                            trainer_kwargs=dict(max_epochs=1, max_steps=4))
    with pytest.raises(ValueError, match=r"`rewind_to_step` must be an int >= 1"):
        find_lottery_ticket(DigitsClassifier(), DigitsDataModule(), metric="test_acc", rounds=1, rewind_to_step=2.5)
    # "Trainer was configured with `enable_checkpointing=False` but found `ModelCheckpoint`": the quiet default's
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    seed_everything(0)
    ticket = find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=256), metric="test_acc", rounds=1,
                                 trainer_kwargs=dict(max_epochs=1, callbacks=[checkpoints]))
    assert len(ticket.rounds) == 2 and list((tmp_path / "ckpt").glob("*.ckpt"))


class _DataSetUpCounted(DigitsDataModule):
    setups = 0

    def setup(self, stage: str) -> None:
        type(self).setups += 1
        super().setup(stage)


@pytest.mark.parametrize(("arguments", "message"), [
    (dict(rounds=0), r"`rounds` must be an int >= 1, got 0"),
    (dict(rate=1.0), r"`rate` must be a fraction in \(0, 1\)"),
    (dict(layer_rates={"net.0.weight": 1.5}), r"`layer_rates\['net.0.weight'\]` must be a fraction"),
    (dict(layer_rates=[0.1]), r"`layer_rates` must be a mapping"),
    (dict(control="sometimes"), r"`control` must be 'none', 'final' or 'every'"),
    (dict(parameter_names="weight"), r"`parameter_names` must be a sequence of names"),
    (dict(exclude="net.0"), r"`exclude` must be a sequence of names"),
    (dict(exclude=None), r"`exclude` must be a sequence of names"),  # "'NoneType' object is not iterable"
    (dict(parameter_names=None), r"`parameter_names` must be a sequence of names"),
    # a KeyError ("not logged") after the data's set-up and a test batch
    (dict(metric=None), r"find_lottery_ticket\(metric=None\): name the metric test_step logs"),
    (dict(metric=5, evaluate_on="validate"), r"metric=5\): name the metric validation_step logs"),
    (dict(trainer_kwargs="fast"), r"`trainer_kwargs` must be a mapping of Trainer arguments"),  # dict()'s words
    # os.fspath's words, after the data's set-up and a batch
    (dict(checkpoint_path=3, rewind_to_step=1, retrain_from="rewind_point"), r"`checkpoint_path` must name a file"),
    (dict(checkpoint_path=""), r"`checkpoint_path` is '': name a file"),
])
def test_find_lottery_ticket_refuses_bad_search_arguments_before_setting_up_the_data(arguments, message):
    """They were checked by the search itself, after a Trainer was built, the data set up and one test batch run
    (the metric check), which with DDP also launched the processes."""
    _DataSetUpCounted.setups = 0
    with pytest.raises((ValueError, TypeError), match=message):
        find_lottery_ticket(DigitsClassifier(), _DataSetUpCounted(),
                            **{"rounds": 1, "metric": "test_acc", "trainer_kwargs": dict(max_epochs=1), **arguments})
    assert _DataSetUpCounted.setups == 0


def test_find_lottery_ticket_takes_a_numpy_rewind_step():
    """np.int64(1) was refused ("must be an int >= 1, got np.int64(1)") where numpy rounds were taken."""
    import numpy as np

    torch.manual_seed(0)
    ticket = find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=256),
                                 metric="test_acc", rounds=np.int64(1), rewind_to_step=np.int64(1), control="none",
                                 trainer_kwargs=dict(max_epochs=1, limit_test_batches=1))
    assert len(ticket.rounds) == 2


@pytest.mark.parametrize("arguments, error, message", [
    # failed after the whole search (the ticket's trainings), or after the first training
    (dict(train_control=5), TypeError, r"`train_control` must be a function of the model in place, .*, or None, "
                                       r"got 5"),
    (dict(evaluate=None), TypeError, r"`evaluate` must be a function of the model, e.g. `def evaluate\(model\)"),
    (dict(train=5), TypeError, r"`train` must be a function of the model in place"),
    (dict(train_to_rewind_point="x"), TypeError, r"`train_to_rewind_point` must be a function"),
    (dict(model=None), TypeError, r"`model` must be an nn.Module \(the network at initialisation\), got NoneType"),
    (dict(checkpoint_settings="x"), TypeError, r"`checkpoint_settings` must be a mapping"),  # dict()'s own words
    (dict(checkpoint_path=""), ValueError, r"`checkpoint_path` is '': name a file"),  # "'.' is a directory"
    (dict(checkpoint_path=3), TypeError, r"`checkpoint_path` must name a file to write"),
    # used up by the check: the search pruned the layer it was told to leave dense
    (dict(exclude=(name for name in ["2"])), TypeError, r"`exclude` must be a sequence of names"),
])
def test_imp_refuses_what_it_cannot_call_or_write_before_any_training(arguments, error, message):
    trainings = []
    _, evaluate = plain_train_and_evaluate()
    given = {"model": mlp(), "train": lambda model: trainings.append(1), "evaluate": evaluate, **arguments}
    with pytest.raises(error, match=message):
        iterative_magnitude_pruning(given.pop("model"), given.pop("train"), given.pop("evaluate"), rounds=1, **given)
    assert not trainings


class HandWrittenLinear(nn.Module):
    """A layer that draws its weights in __init__ and has no reset_parameters."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in) / fan_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() + self.bias


def test_the_control_draws_fresh_weights_for_a_layer_without_reset_parameters():
    """The control of a layer reset_parameters cannot redraw started from the ticket's own initial weights, so the
    'random re-initialisation' column was partly the ticket itself."""
    torch.manual_seed(0)
    model = nn.Sequential(HandWrittenLinear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    train, evaluate = plain_train_and_evaluate()
    starts = []

    def recording_train(network):
        starts.append({k: v.detach().clone() for k, v in network.state_dict().items()})
        train(network)

    iterative_magnitude_pruning(model, recording_train, evaluate, rounds=1, rate=0.5, control="final")
    ticket_start, control_start = starts[1], starts[2]  # dense fit, round 1 (the ticket), the control
    for name in ("0.weight", "2.weight"):
        ticket = ticket_start[f"{name}_orig"][ticket_start[f"{name}_mask"].bool()]
        control = control_start[f"{name}_orig"][control_start[f"{name}_mask"].bool()]
        assert not torch.equal(ticket, control)
    # the hand-written layer's fresh weights come from its own initial values' distribution: a permutation of them
    torch.testing.assert_close(control_start["0.weight_orig"].flatten().sort().values,
                               ticket_start["0.weight_orig"].flatten().sort().values)


def test_redraw_parameters_resets_layers_that_can_and_shuffles_the_rest():
    from litcompress.pruning.lottery import redraw_parameters_

    torch.manual_seed(0)
    model = nn.Sequential(HandWrittenLinear(8, 6), nn.Linear(6, 4))
    model.scale = nn.Parameter(torch.arange(5.0))  # a parameter the container holds itself
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert redraw_parameters_(model) == ["scale", "0.weight", "0.bias"]
    after = dict(model.named_parameters())
    for name, value in before.items():
        if name != "0.bias":  # zeros, shuffled, are zeros
            assert not torch.equal(after[name], value), name
    for name in ("scale", "0.weight", "0.bias"):
        torch.testing.assert_close(after[name].detach().flatten().sort().values, before[name].flatten().sort().values)


def test_a_resampling_rewind_of_a_layer_without_reset_parameters_never_gives_back_its_snapshot():
    """ModelPruning(resample_parameters=True) rewinds through rewind_(resample=True): such a layer got its initial
    values back (as Lightning's callback does), which is the lottery ticket, not the control."""
    from torch.nn.utils import prune

    from litcompress.pruning.lottery import rewind_, take_snapshot

    torch.manual_seed(0)
    layer = HandWrittenLinear(16, 8)
    targets = [(layer, "weight")]
    snapshot = take_snapshot(targets)
    initial = layer.weight.detach().clone()
    prune.l1_unstructured(layer, "weight", amount=0.5)
    rewind_(targets, snapshot, resample=True)
    assert not torch.equal(layer.weight_orig, initial)
    torch.testing.assert_close(layer.weight_orig.detach().flatten().sort().values, initial.flatten().sort().values)


class EmbeddingPReLUNet(nn.Module):
    """An embedding, a frozen layer and a PReLU besides the Linear layers IMP is for."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(17, 4)
        self.frozen = nn.Linear(64, 64).requires_grad_(False)
        self.fc = nn.Linear(64 + 4, 32)
        self.act = nn.PReLU(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        token = self.emb((x.sum(1) % 17).long())
        return self.head(self.act(self.fc(torch.cat([self.frozen(x), token], 1))))


def test_exclude_leaves_layers_dense_prelu_slopes_are_never_pruned_and_frozen_layers_are_warned_of():
    torch.manual_seed(0)
    train, evaluate = plain_train_and_evaluate()
    with pytest.warns(UserWarning, match=r"\['frozen.weight'\] do not train"):
        ticket = iterative_magnitude_pruning(EmbeddingPReLUNet(), train, evaluate, rounds=1, rate=0.5,
                                             control="none", exclude=["emb"])
    assert sorted(ticket.masks) == ["fc.weight", "frozen.weight", "head.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ticket = iterative_magnitude_pruning(EmbeddingPReLUNet(), train, evaluate, rounds=1, rate=0.5,
                                             control="none", exclude=["emb.weight", "frozen"])
    assert sorted(ticket.masks) == ["fc.weight", "head.weight"]
    assert torch.count_nonzero(ticket.model.act.weight) == 32


def test_the_searchs_warnings_are_said_by_the_first_rank_only(monkeypatch):
    """Each rank of a DDP run runs the same search: its progress lines and files were the first rank's only, but
    its warnings (here, a frozen layer's) came once per rank. (Another rank, as the environment names it.)"""
    torch.manual_seed(0)
    train, evaluate = plain_train_and_evaluate()
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*do not train")
        iterative_magnitude_pruning(EmbeddingPReLUNet(), train, evaluate, rounds=1, rate=0.5, control="none",
                                    exclude=["emb"])
    monkeypatch.setenv("RANK", "0")
    with pytest.warns(UserWarning, match=r"\['frozen.weight'\] do not train") as said:
        iterative_magnitude_pruning(EmbeddingPReLUNet(), train, evaluate, rounds=1, rate=0.5, control="none",
                                    exclude=["emb"])
    assert said[0].filename == __file__  # pointing at the caller's line, as before


class TiedLM(nn.Module):
    """A language model whose output layer holds its input embedding's matrix (GPT-2's tie)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.emb(x))))


@pytest.mark.parametrize("scope", ["local", "global"])
def test_tied_weights_get_one_mask_in_every_scope(scope):
    """The tied matrix is pruned once, under both its holders (per layer, each holder was pruned on its own: two
    masks on one Parameter, alike only while their rates were; see the refusals below)."""
    torch.manual_seed(0)
    ticket = iterative_magnitude_pruning(TiedLM(), lambda network: None, lambda network: 0.0, rounds=2, rate=0.5,
                                         control="none", scope=scope)
    model = ticket.model
    assert torch.equal(model.emb.weight, model.head.weight)
    if scope == "local":  # 50% of what remains, twice, of the one matrix
        assert int((model.emb.weight == 0).sum()) == 80 + 40


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(layer_rates={"head.weight": 0.1}, scope="local"),
     "`layer_rates`: emb.weight and head.weight are the same tensor (tied weights), pruned with one mask"),
    (dict(exclude=["head"]), "`exclude` leaves head.weight dense, but it is the same tensor as emb.weight (tied"),
])
def test_arguments_that_would_split_a_tied_tensor_are_refused_before_any_training(kwargs, message):
    def train(network):
        raise AssertionError("trained")

    with pytest.raises(ValueError, match=re.escape(message)):
        iterative_magnitude_pruning(TiedLM(), train, lambda network: 0.0, rounds=1, control="none", **kwargs)


def test_lazy_layers_never_called_are_refused_in_words_before_any_training():
    """torch's 'Attempted to use an uninitialized parameter in <method 'detach'>' came from the snapshot."""
    def train(network):
        raise AssertionError("trained")

    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(ValueError, match=r"0.weight: lazy layers never called, whose weights do not exist yet"):
        iterative_magnitude_pruning(model, train, lambda network: 0.0, rounds=1, control="none")
    model(torch.rand(3, 5))  # called once: searched
    ticket = iterative_magnitude_pruning(model, lambda network: None, lambda network: 0.0, rounds=1, control="none")
    assert sorted(ticket.masks) == ["0.weight", "2.weight"]


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm, nn.BatchNorm1d, lambda d: nn.GroupNorm(2, d)])
def test_normalisation_scales_are_never_pruned(norm):
    """RMSNorm (LLaMA-style models) was missing from the list: its scales, all 1 at the start, were ranked with the
    weights and 75% of them zeroed, silencing their channels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), norm(16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))

    def train(network: nn.Module) -> None:
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(network(x), y).backward()
            optimizer.step()

    ticket = iterative_magnitude_pruning(model, train, lambda network: 0.0, rounds=2, rate=0.5, control="none",
                                         scope="local")
    assert sorted(ticket.masks) == ["0.weight", "3.weight"]
    assert torch.count_nonzero(ticket.model[1].weight) == 16


@pytest.mark.parametrize("exclude, error, message", [
    (["haed"], ValueError, r"`exclude` names \['haed'\].*did you mean 'head'"),
    ("head", TypeError, "`exclude` must be a sequence of names"),
    (["emb", "frozen", "fc", "head"], ValueError, "leaves nothing to prune"),
])
def test_a_bad_exclude_is_refused_before_any_training(exclude, error, message):
    def train(network):
        raise AssertionError("trained")

    with pytest.raises(error, match=message):
        iterative_magnitude_pruning(EmbeddingPReLUNet(), train, lambda network: 0.0, rounds=1, exclude=exclude)


@pytest.mark.parametrize("norm", [nn.utils.parametrizations.weight_norm, nn.utils.weight_norm,
                                  nn.utils.parametrizations.spectral_norm])
def test_parametrized_weights_left_dense_are_warned_of_and_can_be_excluded_in_silence(norm):
    """A weight-normed layer's weight is computed at every access: the search left it dense without a word while its
    table's sparsity counted the other layers only (ModelPruning warns of the same)."""
    torch.manual_seed(0)
    model = nn.Sequential(norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 4))
    with pytest.warns(UserWarning, match=r"leaves out 1 parametrized tensor\(s\).*: 0.weight; they stay dense"):
        ticket = iterative_magnitude_pruning(model, lambda network: None, lambda network: 0.0, rounds=1,
                                             rate=0.5, control="none")
    assert sorted(ticket.masks) == ["2.weight"]
    assert torch.count_nonzero(ticket.model[0].weight) == 8 * 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for excluded in ("0", "0.weight"):
            iterative_magnitude_pruning(model, lambda network: None, lambda network: 0.0, rounds=1, control="none",
                                        exclude=[excluded])


def test_recurrent_and_attention_matrices_left_dense_are_warned_of_and_prune_when_named():
    """An LSTM's weight_ih_l0, ... and an attention's in_proj_weight are not named 'weight': the search left them
    dense without a word, and its table said 12.5% remained of a network almost wholly dense."""

    class Sequence(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.attn = nn.LSTM(4, 8, batch_first=True), nn.MultiheadAttention(8, 2)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lstm(x)[0]
            return self.head(self.attn(h, h, h, need_weights=False)[0][:, -1])

    torch.manual_seed(0)
    model = Sequence()
    with pytest.warns(UserWarning, match=r"iterative_magnitude_pruning: 2 recurrent and attention layer\(s\) keep "
                                         r"weight matrices dense \(lstm, attn\).*the table's sparsity leaves them "
                                         r"out") as said:
        iterative_magnitude_pruning(model, lambda network: None, lambda network: 0.0, rounds=1, rate=0.5,
                                    control="none")
    suggested = eval(re.search(r"parameter_names=(\[.*\])\.", str(said[0].message)).group(1))
    assert suggested == ["weight", "weight_ih_l0", "weight_hh_l0", "in_proj_weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ticket = iterative_magnitude_pruning(model, lambda network: None, lambda network: 0.0, rounds=1, rate=0.5,
                                             control="none", parameter_names=suggested)
    assert {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "attn.in_proj_weight"} <= set(ticket.masks)
    assert ticket.rounds[-1].remaining == pytest.approx(0.5, abs=0.01)
    with warnings.catch_warnings():  # left dense as `exclude` asks: nothing to say (it said to name them again)
        warnings.simplefilter("error")
        iterative_magnitude_pruning(model, lambda network: None, lambda network: 0.0, rounds=1, rate=0.5,
                                    control="none", parameter_names=suggested, exclude=["lstm", "attn.in_proj_weight"])


def _remaining_in(checkpoint: Path) -> float:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    masks = [value for key, value in state.items() if key.endswith("weight_mask")]
    return round(float(sum(m.sum() for m in masks) / sum(m.numel() for m in masks)), 3) if masks else 1.0


def test_a_model_checkpoint_given_saves_every_round_and_not_the_control(tmp_path):
    """Every round reaches the step the one before last saved at, which ModelCheckpoint remembers outside its state:
    with one epoch per round only round 0 was saved. The control, trained with the user's callbacks, put its own file
    under best_model_path."""
    from litcompress.callbacks.pruning import load_module_from_checkpoint

    seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    ticket = find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=256), metric="test_acc", rounds=2,
                                 rate=0.5, control="final", trainer_kwargs=dict(max_epochs=1, callbacks=[checkpoints]))
    assert ticket.rounds[-1].control_metric is not None
    assert sorted(_remaining_in(path) for path in tmp_path.glob("*.ckpt")) == [0.25, 0.5, 1.0]
    best = load_module_from_checkpoint(DigitsClassifier, checkpoints.best_model_path)
    for layer in (0, 2):
        assert torch.equal(best.net[layer].weight, ticket.model.net[layer].weight)


def test_callbacks_that_a_quiet_default_would_refuse_turn_it_off(tmp_path):
    """Lightning refuses a progress bar beside enable_progress_bar=False and a LearningRateMonitor without a logger:
    the search's quiet defaults, not set by the user, failed with those."""
    from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar

    seed_everything(0)
    monitor = LearningRateMonitor()
    ticket = find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=256), metric="test_acc", rounds=1,
                                 control="none", trainer_kwargs=dict(max_epochs=1, default_root_dir=tmp_path,
                                                                     callbacks=[TQDMProgressBar(), monitor]))
    assert len(ticket.rounds) == 2 and monitor.lrs["lr-Adam"]


@pytest.mark.parametrize("trainer_kwargs", [dict(max_epochs=0), dict(max_steps=0),
                                            dict(max_epochs=2, limit_train_batches=0)])
def test_a_search_whose_fits_train_nothing_is_refused_after_the_first_empty_fit(trainer_kwargs):
    seed_everything(0)
    with pytest.raises(ValueError, match="trained no optimizer step .*the rounds would prune and score untrained"):
        find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=256), metric="test_acc", rounds=2,
                            trainer_kwargs=trainer_kwargs)


@pytest.mark.parametrize("module, datamodule, message", [
    (mlp(), DigitsDataModule(), r"`module` must be a LightningModule \(an instance\), got a Sequential"),
    (DigitsClassifier, DigitsDataModule(), "got the class DigitsClassifier"),
    (DigitsClassifier(), DigitsDataModule, r"`datamodule` must be .* got the class DigitsDataModule"),
    (DigitsClassifier(), [torch.zeros(2, 64)], r"`datamodule` must be .* got a list"),
])
def test_a_module_or_datamodule_of_the_wrong_kind_is_named_in_the_error(module, datamodule, message):
    """Lightning's 'Expected a parent' or 'on_exception() missing 1 required positional argument' came instead."""
    with pytest.raises(TypeError, match=message):
        find_lottery_ticket(module, datamodule, metric="test_acc", rounds=1)


class TwoOptimizers(DigitsClassifier):
    """Manual optimization stepping two optimizers per batch: two global steps per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        first, second = self.optimizers()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        first.step()
        second.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


def test_a_rewind_step_past_the_batches_of_a_two_optimizer_fit_is_not_refused():
    """Its fit makes 2 steps per batch (8 batches: 16 steps); k=12 was refused as beyond 'the fit's 8 steps'."""
    seed_everything(0)
    module = TwoOptimizers()
    kwargs = dict(max_epochs=2, limit_train_batches=4, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    record = WeightsAtStep(12)
    Trainer(**kwargs, callbacks=[record]).fit(copy.deepcopy(module), datamodule=DigitsDataModule(batch_size=256))
    ticket = find_lottery_ticket(module, DigitsDataModule(batch_size=256), metric="test_acc", rounds=1,
                                 rewind_to_step=12, control="none", trainer_kwargs=kwargs)
    assert torch.equal(ticket.rewound_state["net.0.weight_orig"], record.weights)


def test_a_global_search_that_empties_a_layer_says_so_once():
    """scope='global' pruned every weight of a layer whose magnitudes were all below the others' without a word (as
    ModelPruning and GradualPruner warn): the ticket no longer depended on its input along that path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    with torch.no_grad():
        model[2].weight.mul_(0.01)
    with pytest.warns(UserWarning, match=r"iterative_magnitude_pruning \(round \d\): every entry of 2.weight is "
                                         r"pruned.*scope='local'") as caught:
        ticket = iterative_magnitude_pruning(model, lambda net: None, lambda net: 0.0, rounds=3, rate=0.5,
                                             scope="global", control="none")
    assert int(ticket.masks["2.weight"].sum()) == 0
    assert sum("every entry of" in str(w.message) for w in caught) == 1  # once, not at every later round


def test_the_control_redraws_layers_pruned_before_the_search_and_keeps_frozen_ones():
    """A layer the model already had a mask on kept its initial values in the control (Linear.reset_parameters()
    wrote the masked copy, not weight_orig): the control was partly the ticket itself. A frozen layer
    (requires_grad=False: a pretrained backbone, excluded) was redrawn, random features that never train, where
    every round of the ticket keeps it as given."""
    from torch.nn.utils import prune

    from litcompress.pruning.lottery import redraw_parameters_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    prune.l1_unstructured(model[2], "weight", amount=0.3)  # pruned before the search (a one-shot start)
    model[0].requires_grad_(False)  # pretrained and frozen
    given = {k: v.detach().clone() for k, v in model.named_parameters()}
    started = {}

    def train_control(control):
        started.update({k: v.detach().clone() for k, v in control.named_parameters()})

    ticket = iterative_magnitude_pruning(model, lambda net: None, lambda net: 0.0, rounds=1, rate=0.5,
                                         exclude=["0"], train_control=train_control)
    assert not torch.equal(started["2.weight_orig"], given["2.weight_orig"])  # redrawn, pre-pruned as it is
    assert not torch.equal(started["4.weight_orig"], given["4.weight"])
    for name in ("0.weight", "0.bias"):
        assert torch.equal(started[name], given[name]), name  # frozen: as given
    assert torch.equal(ticket.model[0].weight, given["0.weight"])

    layer = nn.Linear(8, 8)  # the helper on its own: the trainable values redrawn, the masked copy recomputed
    prune.l1_unstructured(layer, "weight", amount=0.5)
    before, mask = layer.weight_orig.detach().clone(), layer.weight_mask.clone()
    assert redraw_parameters_(layer) == []
    assert not torch.equal(layer.weight_orig, before)
    assert torch.equal(layer.weight, layer.weight_orig * mask) and torch.equal(layer.weight_mask, mask)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_each_round_is_said_by_rank_zero_only(monkeypatch, caplog, rank):
    """Under DDP every rank runs the same search: each progress line was printed once per rank."""
    monkeypatch.setenv("RANK", rank)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="litcompress"):
        iterative_magnitude_pruning(mlp(), lambda net: None, lambda net: 0.5, rounds=2, control="none")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("IMP round")]
    assert len(said) == (3 if rank == "0" else 0)


def test_find_lottery_ticket_refuses_spawned_launchers_before_any_fit(tmp_path):
    """Each round's fit ran in worker processes: the search failed after the first with a wrong explanation ("trained
    no optimizer step": the parent's trainer never steps), and the pruned module could not be sent to them."""
    with pytest.raises(ValueError, match=r"run each fit in spawned or forked worker processes \(ddp_spawn, ddp_fork, "
                                         r"ddp_notebook\), whose rounds this process cannot follow; use "
                                         r"strategy='ddp'"):
        find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=64), rounds=1, metric="val_acc",
                            trainer_kwargs=dict(accelerator="cpu", devices=1, strategy="ddp_spawn", max_epochs=1,
                                                default_root_dir=tmp_path))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("callback", ["litcompress", "lightning", "barebones", "a fraction of no batch"])
def test_find_lottery_ticket_refuses_what_cannot_give_a_table_before_any_fit(tmp_path, callback):
    """A pruning callback pruned again and made every mask permanent at each fit's end: a table of 100% of the
    weights left in every round and a ticket without masks. barebones=True (self.log a no-op) failed the metric
    check with "did it run on no batch?". A limit_test_batches fraction of no batch failed in Lightning's words
    after the first round's training."""
    from lightning.pytorch.callbacks import ModelPruning as LightningModelPruning

    from litcompress import ModelPruning

    fits = LambdaCallback(on_fit_start=lambda *_: pytest.fail("a fit started"))
    kwargs = dict(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, callbacks=[fits])
    message = {"litcompress": r"ModelPruning in trainer_kwargs' callbacks prunes the module itself, beside the "
                              r"search's own rounds",
               "barebones": r"barebones=True makes self\.log a no-op",
               "a fraction of no batch": r"trainer_kwargs\['limit_test_batches'\]=0\.001 of the \d+ batches of the "
                                         r"test dataloader is no batch"}
    message["lightning"] = message["litcompress"]
    if callback == "litcompress":
        kwargs["callbacks"].append(ModelPruning("l1_unstructured", amount=0.3))
    elif callback == "lightning":
        kwargs["callbacks"].append(LightningModelPruning("l1_unstructured", amount=0.3))
    elif callback == "barebones":
        kwargs.update(barebones=True, callbacks=[])
    else:
        kwargs["limit_test_batches"] = 0.001
    with pytest.raises(ValueError, match=message[callback]):
        find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=64), rounds=1, metric="test_acc",
                            trainer_kwargs=kwargs)


@pytest.mark.parametrize("averaging", weight_averaging_callbacks())
def test_find_lottery_ticket_refuses_weight_averaging_before_any_fit(tmp_path, averaging):
    """EMAWeightAveraging copies the module at each fit's setup: round 1's, pruned (no leaf weight), failed in
    torch's deepcopy message after a whole dense round; StochasticWeightAveraging failed before any fit, with "Expected
    state_dict to be dict-like" (its state restored after the first evaluation had set it up)."""
    callback = averaging(swa_lrs=0.05) if averaging.__name__ == "StochasticWeightAveraging" else averaging()
    fits = LambdaCallback(on_fit_start=lambda *_: pytest.fail("a fit started"))
    with pytest.raises(ValueError, match=rf"find_lottery_ticket: {averaging.__name__} in trainer_kwargs' callbacks "
                                         r"copies the module at every fit's start.*fitting the returned ticket"):
        find_lottery_ticket(DigitsClassifier(), DigitsDataModule(batch_size=64), rounds=1, metric="val_acc",
                            trainer_kwargs=dict(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path,
                                                callbacks=[fits, callback]))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("affine", [True, False])
def test_the_control_keeps_a_frozen_batch_norms_running_statistics(affine):
    """Its frozen parameters were kept, but BatchNorm.reset_parameters() also resets the running statistics, which
    nothing restored: a frozen backbone in eval mode gave the control other features than every round of the
    ticket (a BatchNorm without parameters too)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, affine=affine))
    with torch.no_grad():
        backbone[1].running_mean.fill_(5.0)
        backbone[1].running_var.fill_(9.0)
        if affine:
            backbone[1].weight.fill_(2.0)
    backbone.requires_grad_(False)
    model = nn.Sequential(backbone, nn.ReLU(), nn.Linear(16, 4))
    seen = []

    def evaluate(net):
        norm = net[0][1]
        seen.append((float(norm.running_mean[0]), float(norm.running_var[0]),
                     float(norm.weight[0]) if affine else None))
        return 0.0

    iterative_magnitude_pruning(model, lambda net: None, evaluate, rounds=1, exclude=["0.0"], control="final")
    assert seen == [(5.0, 9.0, 2.0 if affine else None)] * 3  # round 0, round 1, the control


def test_the_table_never_says_none_left_of_a_ticket_that_has_weights():
    """A ticket with 4 of 100,000 weights left read "0.00%" remaining (every weight gone)."""
    ticket = LotteryTicket(model=nn.Linear(2, 2), masks={}, rewound_state={},
                           rounds=[IMPRound(0, 1.0, 0.9), IMPRound(12, 0.00004, 0.1, 0.1), IMPRound(13, 0.0, 0.1)])
    rows = ticket.table().splitlines()[1:]
    assert [row.split()[1] for row in rows] == ["100.00%", "<0.01%", "0.00%"]


class _KeepsAnAverage(nn.Module):
    """A non-persistent buffer that training moves (not in the state dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)
        self.register_buffer("average", torch.zeros(8), persistent=False)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        if self.training:
            with torch.no_grad():
                self.average.mul_(0.5).add_(h.mean(0))
        return self.out(h + self.average)


def test_every_round_starts_its_non_persistent_buffers_from_the_rewind_point_as_the_control_does():
    """A round rewound what the state dict holds: a non-persistent buffer went on from the last round's trained
    values, while the control started it from the values given."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    starts = []

    def train(model):
        starts.append(model.average.clone())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    iterative_magnitude_pruning(_KeepsAnAverage(), train, lambda model: 0.5, rounds=2, rate=0.2, control="final")
    assert len(starts) == 4  # rounds 0, 1, 2 and the control
    assert all(torch.equal(start, torch.zeros(8)) for start in starts)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_round_r_leaves_the_rounded_share_of_the_weights_r_rounds_leave_also_in_small_layers(scope):
    """Each round pruned `rate` of what was left, rounded on its own: an 8-weight layer kept 2 after 8 rounds of 0.2
    (1.34 asked), a 4-weight one stopped losing weights after round 4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 17))
    sizes = [8, 4, 34]
    ticket = iterative_magnitude_pruning(model, lambda m: None, lambda m: 0.5, rounds=8, rate=0.2, control="none",
                                         layer_rates={"4.weight": 0.1} if scope == "local" else None, scope=scope)
    kept = [int(ticket.masks[f"{i}.weight"].sum()) for i in (0, 2, 4)]

    def left(n: int, rate: float, r: int) -> int:  # the sparsity r rounds reach, rounded to whole weights
        return n - round((1 - (1 - rate) ** r) * n)

    if scope == "local":
        assert kept == [left(8, 0.2, 8), left(4, 0.2, 8), left(34, 0.1, 8)]
    else:
        assert sum(kept) == left(sum(sizes), 0.2, 8)
        assert [row.remaining for row in ticket.rounds] == [left(46, 0.2, r) / 46 for r in range(9)]


def test_a_control_metric_that_is_nan_or_no_number_is_refused_in_words():
    calls = []

    def nan_for_the_control(model):
        calls.append(1)
        return float("nan") if len(calls) == 3 else 0.5  # rounds 0 and 1, then the control

    with pytest.raises(ValueError, match=r"`evaluate` returned NaN for the random re-initialisation control of round "
                                         r"1; it must return a number"):
        iterative_magnitude_pruning(mlp(), lambda m: None, nan_for_the_control, rounds=1, control="final")
    with pytest.raises(TypeError, match=r"`evaluate` returned NoneType in round 0; it must return a number"):
        iterative_magnitude_pruning(mlp(), lambda m: None, lambda m: None, rounds=1, control="none")
    assert iterative_magnitude_pruning(mlp(), lambda m: None, lambda m: torch.tensor(0.25), rounds=1,
                                       control="final").rounds[1].control_metric == 0.25


def test_the_control_draws_a_tied_tensor_as_its_first_holder_does():
    """An output layer tied to the embedding redrew the shared tensor with the Linear's initialiser (std ~0.14)
    after the embedding's N(0, 1): the control started ~7x smaller than the network it is compared with."""
    from litcompress.pruning.lottery import redraw_parameters_

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(400, 16), nn.Linear(16, 400)
            self.head.weight = self.emb.weight

    torch.manual_seed(0)
    model = Tied()
    bias = model.head.bias.detach().clone()
    torch.manual_seed(1)
    redraw_parameters_(model)
    assert model.head.weight is model.emb.weight
    torch.manual_seed(1)
    alone = nn.Embedding(400, 16)  # the same draw, by the embedding's own reset_parameters
    torch.manual_seed(1)
    alone.reset_parameters()
    assert torch.equal(model.emb.weight, alone.weight)
    assert not torch.equal(model.head.bias, bias)  # the head's own tensors are drawn all the same


def test_a_resampling_rewind_draws_a_tied_tensor_as_its_first_holder_does():
    """ModelPruning(resample_parameters=True) rewinds through rewind_(resample=True), which reset each holder's copy
    in turn: the tied head's Linear initialiser (bound 1/sqrt(16)) wrote over the embedding's N(0, 1) draw."""
    from torch.nn.utils import prune

    from litcompress.pruning.lottery import rewind_, take_snapshot

    torch.manual_seed(0)
    emb, head = nn.Embedding(50, 16), nn.Linear(16, 50, bias=False)
    head.weight = emb.weight
    targets = [(emb, "weight"), (head, "weight")]
    snapshot = take_snapshot(targets)
    prune.l1_unstructured(emb, "weight", amount=0.5)
    torch.manual_seed(1)
    rewind_(targets, snapshot, resample=True)
    torch.manual_seed(1)
    alone = nn.Embedding(50, 16)
    torch.manual_seed(1)
    alone.reset_parameters()  # the same draw, by the embedding's own reset_parameters
    assert torch.equal(emb.weight_orig.detach(), alone.weight.detach())


class _GrowsItsCache(nn.Module):
    """A non-persistent cache (rotary-style) that forward registers anew, larger, for a longer input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)
        self.register_buffer("cache", torch.arange(2.0), persistent=False)

    def forward(self, x):
        if self.cache.numel() < x.shape[0]:
            self.register_buffer("cache", torch.arange(float(x.shape[0])), persistent=False)
        return self.out(torch.relu(self.fc(x))) + self.cache[: x.shape[0], None] * 0


def test_a_non_persistent_cache_forward_regrew_is_rewound_as_it_was_and_old_files_are_refused(tmp_path):
    """Rewinding it copied the rewind point's 2 values into the 16 of the regrown cache (a shape error in round 1);
    and a file of the format before non-persistent buffers were rewound resumed under mixed rules."""
    x, sizes = torch.randn(16, 4), []

    def train(model):
        sizes.append(model.cache.numel())
        model(x).sum().backward()

    iterative_magnitude_pruning(_GrowsItsCache(), train, lambda model: 0.5, rounds=2, control="none")
    assert sizes == [2, 2, 2]  # every round from the rewind point's cache
    old = tmp_path / "imp.pt"
    torch.save({"format": 2, "settings": {}, "done": 0}, old)
    with pytest.raises(ValueError, match=r"holds a search of an earlier litcompress, whose rounds did not rewind "
                                         r"non-persistent buffers"):
        iterative_magnitude_pruning(mlp(), lambda m: None, lambda m: 0.5, rounds=1, checkpoint_path=old)
