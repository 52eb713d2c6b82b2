"""HeadPruning under the real Trainer: heads pruned along the schedule, removed by shrink, checkpoints and resumes."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from litcompress import ModelPruning, shrink
from litcompress.callbacks import HeadPruning
from litcompress.data import DigitsDataModule
from litcompress.models import MLPClassifier, TransformerClassifier
from litcompress.pruning import HeadPrunedAttention, is_pruned
from litcompress.pruning.heads import zero_heads
from litcompress.pruning.schedules import PolynomialDecay
from tests.conftest import StepsTwoOptimizers, fit_killed_and_resumed


def _trainer(tmp_path, epochs: int, callbacks: list, **kwargs) -> Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=2)
    return Trainer(max_epochs=epochs, callbacks=callbacks, **{**options, **kwargs})


def _data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, flatten=False)  # shuffled: a resumed run sees the same epoch orders


def _attentions(model: nn.Module) -> list[nn.MultiheadAttention]:
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


def test_heads_pruned_along_a_step_schedule_then_shrink_removes_them(tmp_path):
    seed_everything(0)
    model, data = TransformerClassifier(heads=4), _data()
    counts: list[list[int]] = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            counts.append([int(zero_heads(a).sum()) for a in _attentions(pl_module)])

    schedule = PolynomialDecay(final_sparsity=0.5, begin=0, end=20, frequency=5)
    pruning = HeadPruning(schedule, make_pruning_permanent=True)
    _trainer(tmp_path, 2, [pruning, Watch()]).fit(model, datamodule=data)
    # the schedule's fraction of 4 heads, rounded, after each round (Watch runs after the pruning callback)
    assert counts[4] == [round(4 * schedule.target(5))] * 2 and counts[-1] == [2, 2]
    assert all(a <= b for a, b in zip(counts, counts[1:]))  # heads pruned stay pruned
    assert not any(is_pruned(a, "in_proj_weight") for a in _attentions(model))  # permanent at the end of fit
    x = next(iter(data.test_dataloader()))[0]
    result = shrink(model.eval(), x)
    assert [m.num_heads for m in result.model.modules() if isinstance(m, HeadPrunedAttention)] == [2, 2]
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


class TwoOptimizerTransformer(StepsTwoOptimizers, TransformerClassifier):
    """One optimizer for the encoder, one for the rest."""

    def loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def optimizer_groups(self):
        rest = [p for name, p in self.named_parameters() if not name.startswith("encoder.")]
        return [self.encoder.parameters(), rest]


def test_heads_pruned_along_a_step_schedule_whose_steps_batches_pass_over(tmp_path):
    """The rounds at odd steps run after the batch that passed them, with their own targets: the last one too."""
    seed_everything(0)
    model = TwoOptimizerTransformer(heads=4)
    heads: dict[int, list[int]] = {}

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            heads[trainer.global_step] = [int(zero_heads(a).sum()) for a in _attentions(pl_module)]

    schedule = PolynomialDecay(final_sparsity=0.75, begin=1, end=9, frequency=4)  # rounds at steps 1, 5 and 9
    _trainer(tmp_path, 1, [HeadPruning(schedule), Watch()], limit_train_batches=6).fit(model, datamodule=_data())
    assert [heads[step] for step in (2, 6, 10)] == [[round(4 * schedule.target(point))] * 2 for point in (1, 5, 9)]
    assert heads[12] == [3, 3]


def test_each_rounds_head_fraction_goes_to_the_loggers(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    seed_everything(0)
    schedule = PolynomialDecay(final_sparsity=0.5, begin=0, end=12, frequency=4)  # of 4 heads: 0, 1, 2, 2
    logger = CSVLogger(tmp_path, name="run")
    _trainer(tmp_path, 1, [HeadPruning(schedule)], logger=logger, log_every_n_steps=1,
             limit_train_batches=14).fit(TransformerClassifier(heads=4), datamodule=_data())
    with open(logger.experiment.metrics_file_path) as file:
        rows = [row for row in csv.DictReader(file) if row.get("pruning/heads")]
    assert [(int(row["step"]), float(row["pruning/heads"])) for row in rows] == [(1, 0.0), (4, 0.25), (8, 0.5),
                                                                                 (12, 0.5)]
    with pytest.raises(MisconfigurationException, match="log_sparsity=1"):
        HeadPruning(0.5, log_sparsity=1)


def test_a_fit_shorter_than_the_head_schedule_says_where_it_will_stop(tmp_path):
    seed_everything(0)
    model, data = TransformerClassifier(heads=4), _data()
    schedule = PolynomialDecay(final_sparsity=0.5, begin=0, end=1000, frequency=5)
    trainer = _trainer(tmp_path, 1, [HeadPruning(schedule)])
    with pytest.warns(UserWarning, match=r"until step 1000 \(to 50\.0% of each attention's heads\)") as record:
        trainer.fit(model, datamodule=data)
    steps = trainer.global_step
    (message,) = [str(w.message) for w in record if "schedule" in str(w.message)]
    assert f"runs {steps} optimizer steps: it will stop at {schedule.reached_by(steps):.1%}" in message


def test_a_fit_that_early_stopping_ends_before_the_head_schedule_is_told_what_it_reached(tmp_path):
    """Told at its start where its schedule would stop ('or less if EarlyStopping ends the fit sooner'), a fit that
    EarlyStopping ended sooner heard nothing more: the start's figure stood for what it reached."""
    from lightning.pytorch.callbacks import EarlyStopping
    from litcompress.pruning.schedules import LinearSchedule

    class LogsAConstant(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            pl_module.log("constant", 1.0)

    seed_everything(0)
    schedule = LinearSchedule(final_sparsity=0.5, begin=0, end=6, unit="epoch")
    stop_early = EarlyStopping(monitor="constant", patience=1, mode="min", check_on_train_epoch_end=True)
    trainer = _trainer(tmp_path, 5, [LogsAConstant(), HeadPruning(schedule), stop_early], limit_train_batches=2)
    with pytest.warns(UserWarning) as record:
        trainer.fit(TransformerClassifier(heads=4), datamodule=_data())
    said = [str(w.message) for w in record if "schedule" in str(w.message)]
    assert trainer.current_epoch == 2 and len(said) == 2
    assert f"it will stop at {schedule.reached_by(5):.1%}, or less if EarlyStopping ends the fit sooner." in said[0]
    assert f"Fitting ended at epoch 2, before the schedule's end (epoch 6): the model is at " \
           f"{schedule.reached_by(2):.1%}" in said[1]


@pytest.mark.parametrize("make_pruning_permanent", [False, True])
def test_killed_mid_schedule_then_resumed_ends_with_the_same_heads_and_weights(tmp_path, make_pruning_permanent):
    reference, state, resumed = fit_killed_and_resumed(  # killed at step 25: epoch 1 of 3 (23 steps each)
        tmp_path, lambda: TransformerClassifier(heads=4),
        lambda: HeadPruning(PolynomialDecay(final_sparsity=0.75, begin=3, end=30, frequency=4),
                            make_pruning_permanent=make_pruning_permanent), _data)
    # what the crash left on disk loads into the unpruned architecture (masks re-created when not permanent)
    assert any(k.endswith("in_proj_weight_mask") for k in state) == (not make_pruning_permanent)
    assert [int(zero_heads(a).sum()) for a in _attentions(resumed)] == [3, 3]  # round(0.75 * 4)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resumed_from_a_checkpoint_of_an_epochs_last_batch_makes_the_round_that_epochs_end_skipped(tmp_path):
    """A fit resumed from a checkpoint saved at an epoch's last batch skips that epoch's end (Lightning's loop): its
    epoch-level round runs when training resumes, and the run ends like the uninterrupted one."""
    def run(callbacks, ckpt_path=None):
        model = TransformerClassifier(heads=4)
        pruning = HeadPruning(PolynomialDecay(final_sparsity=0.75, begin=1, end=3, frequency=1, unit="epoch"))
        _trainer(tmp_path, 3, [pruning, *callbacks], enable_checkpointing=True).fit(model, datamodule=_data(),
                                                                                     ckpt_path=ckpt_path)
        return model

    seed_everything(1)
    reference = run([ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=17,
                                     save_on_train_epoch_end=False)])  # 17 steps per epoch: each epoch's last batch
    resumed = run([], ckpt_path=tmp_path / "epoch=1-step=34.ckpt")  # epoch 1's end, and its round, skipped
    assert [int(zero_heads(a).sum()) for a in _attentions(resumed)] == [3, 3]
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_beside_model_pruning_the_channels_and_heads_both_leave(tmp_path):
    seed_everything(0)
    model, data = TransformerClassifier(heads=4), _data()
    feed_forward = [(m, "weight") for name, m in model.named_modules() if name.endswith("linear1")]
    callbacks = [ModelPruning("ln_structured", parameters_to_prune=feed_forward, pruning_dim=0, pruning_norm=2,
                              amount=PolynomialDecay(final_sparsity=0.5, begin=0, end=20, frequency=5),
                              use_global_unstructured=False, use_lottery_ticket_hypothesis=False, verbose=0),
                 HeadPruning(0.5)]
    _trainer(tmp_path, 1, callbacks).fit(model, datamodule=data)
    x = next(iter(data.test_dataloader()))[0]
    report = shrink(model.eval(), x).report
    assert report.heads_removed == 4 and report.channels_removed == 2 * 32  # half of each linear1's 64 rows


class _WithItsOwnSetup(TransformerClassifier):
    def setup(self, stage: str) -> None:  # each pruning callback then finds its targets in its own on_fit_start
        pass


@pytest.mark.parametrize("heads_permanent, model_pruning_first, module_type", [
    (False, False, TransformerClassifier), (True, False, TransformerClassifier), (False, True, _WithItsOwnSetup)])
def test_a_tensor_both_callbacks_prune_stays_masked_in_checkpoints_and_a_resumed_fit_ends_alike(
        tmp_path, heads_permanent, model_pruning_first, module_type):
    """The callback with make_pruning_permanent=True wrote the tensor both prune as its effective values, though the
    other keeps it masked: a resumed fit lost the values under the mask (zeros in in_proj_weight_orig)."""
    def run(callbacks, ckpt_path=None):
        model = module_type(heads=4)
        in_projections = [(a, "in_proj_weight") for a in _attentions(model)]
        pruning = [HeadPruning(PolynomialDecay(final_sparsity=0.5, begin=0, end=30, frequency=4),
                               make_pruning_permanent=heads_permanent),
                   ModelPruning("l1_unstructured", parameters_to_prune=in_projections, verbose=0,
                                amount=PolynomialDecay(final_sparsity=0.5, begin=0, end=33, frequency=6),
                                make_pruning_permanent=not heads_permanent, use_lottery_ticket_hypothesis=False)]
        pruning = pruning[::-1] if model_pruning_first else pruning
        _trainer(tmp_path, 2, [*pruning, *callbacks], enable_checkpointing=True).fit(model, datamodule=_data(),
                                                                                     ckpt_path=ckpt_path)
        return model

    seed_everything(1)
    reference = run([ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=10)])
    state = torch.load(tmp_path / "epoch=0-step=10.ckpt", weights_only=False)["state_dict"]
    assert "encoder.layers.0.self_attn.in_proj_weight_orig" in state  # the pair the masked pruner needs
    resumed = run([], ckpt_path=tmp_path / "epoch=0-step=10.ckpt")
    assert reference.state_dict().keys() == resumed.state_dict().keys()
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="failed at step 10"):  # Lightning's checkpoint of a failed fit, too
        run([_FailsAtStep(10), OnExceptionCheckpoint(dirpath=tmp_path / "failed")])
    state = torch.load(tmp_path / "failed" / "on_exception.ckpt", weights_only=False)["state_dict"]
    assert "encoder.layers.0.self_attn.in_proj_weight_orig" in state


class _FailsAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"failed at step {self.step}")


class _FailsAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        raise RuntimeError("failed at train start")


def test_after_a_failed_fit_of_a_pruner_keeping_masks_a_permanent_pruners_checkpoints_load_into_the_plain_model(
        tmp_path):
    """A failed fit has no teardown: its pruner's hooks stayed, still saying the tensors are kept masked, and the
    next fit's ModelPruning(make_pruning_permanent=True) wrote _orig/_mask pairs (a notebook's second run)."""
    seed_everything(0)
    model = MLPClassifier(hidden=(16,))
    with pytest.raises(RuntimeError, match="failed at train start"):
        _trainer(tmp_path, 1, [ModelPruning("l1_unstructured", amount=0.5, verbose=0, make_pruning_permanent=False),
                               _FailsAtTrainStart()]).fit(model, datamodule=DigitsDataModule(batch_size=64))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "second", every_n_train_steps=2, save_top_k=-1)
    _trainer(tmp_path, 2, [ModelPruning("l1_unstructured", amount=0.5, verbose=0), checkpoints],
             enable_checkpointing=True, limit_train_batches=2).fit(model, datamodule=DigitsDataModule(batch_size=64))
    state = torch.load(tmp_path / "second" / "epoch=1-step=4.ckpt", weights_only=False)["state_dict"]  # pruned once
    assert not any(key.endswith(("_orig", "_mask")) for key in state)
    MLPClassifier(hidden=(16,)).load_state_dict(state)  # strictly, into the unpruned architecture


def test_bad_input_is_refused_before_training(tmp_path):
    for bad in (1.0, 0.0, -0.5, True, "half", float("nan")):
        with pytest.raises(MisconfigurationException, match="HeadPruning\\(heads="):
            HeadPruning(bad)
    with pytest.raises(MisconfigurationException, match="exclude"):
        HeadPruning(0.5, exclude="encoder")
    # a generator was used up by the check, and kept empty: nothing excluded
    assert HeadPruning(0.5, exclude=(name for name in ["encoder.layers.0"])).exclude == ("encoder.layers.0",)
    model = MLPClassifier()
    with pytest.raises(MisconfigurationException, match="MLPClassifier has no nn.MultiheadAttention"):
        _trainer(tmp_path, 1, [HeadPruning(0.5)]).fit(model, datamodule=DigitsDataModule(batch_size=64))


class WithAWideAttention(TransformerClassifier):
    def __init__(self) -> None:
        super().__init__(heads=2, layers=1)
        self.wide = nn.MultiheadAttention(32, 8, batch_first=True)  # (not called: its heads are pruned all the same)


def test_a_fraction_that_rounds_to_no_head_is_refused_or_said(tmp_path):
    """0.2 of 2 heads rounds to 0: nothing was pruned, without a word (the report claimed 20% of the heads)."""
    import numpy as np

    with pytest.raises(MisconfigurationException, match=r"HeadPruning\(heads=0.2\): 0.2 of each attention's heads "
                                                        r"prunes none in encoder.layers.0.self_attn \(2\), "
                                                        r"encoder.layers.1.self_attn \(2\); 0.251 or more prunes "
                                                        r"one in each. Nothing would be pruned."):
        _trainer(tmp_path, 1, [HeadPruning(0.2)]).fit(TransformerClassifier(heads=2), datamodule=_data())
    schedule = PolynomialDecay(final_sparsity=0.2, begin=0, end=2, unit="epoch")
    with pytest.raises(MisconfigurationException, match=r"HeadPruning\(heads=0.2 at its end\)"):
        _trainer(tmp_path, 2, [HeadPruning(schedule)]).fit(TransformerClassifier(heads=2), datamodule=_data())
    model, callback = WithAWideAttention(), HeadPruning(np.float32(0.2))  # numpy's numbers are taken
    with pytest.warns(UserWarning, match=r"prunes none in encoder.layers.0.self_attn \(2\); .* Those keep all "
                                         r"theirs."):
        _trainer(tmp_path, 1, [callback], limit_train_batches=2).fit(model, datamodule=_data())
    assert int(zero_heads(model.wide).sum()) == 2 and int(zero_heads(_attentions(model.encoder)[0]).sum()) == 0
    # a 1-head attention beside a 2-head one: what prunes the other, and what to exclude
    from litcompress.pruning.heads import heads_to_prune, none_pruned_message

    assert none_pruned_message("HeadPruning(heads=0.2)", 0.2, "of each attention's heads",
                               {"attn.0": 1, "attn.1": 2}, heads_to_prune) == (
        "HeadPruning(heads=0.2): 0.2 of each attention's heads prunes none in attn.0 (1), attn.1 (2); 0.251 or more "
        "prunes one in each of the others; no fraction below 1 prunes any in attn.0 (each keeps at least one: "
        "`exclude` them).")
    # one head: always kept, at any fraction (0.6 passed, pruning nothing)
    with pytest.raises(MisconfigurationException, match=r"prunes none in encoder.layers.0.self_attn \(1\), "
                                                        r"encoder.layers.1.self_attn \(1\); no fraction below 1 "
                                                        r"prunes any in .* \(each keeps at least one: `exclude` "
                                                        r"them\)"):
        _trainer(tmp_path, 1, [HeadPruning(0.6)]).fit(TransformerClassifier(heads=1), datamodule=_data())


class ConfiguredTransformer(TransformerClassifier):
    """Its encoder is built in `configure_model`, which the Trainer calls after every callback's `setup`."""

    def __init__(self) -> None:
        super().__init__(heads=4)
        self.encoder = None

    def configure_model(self) -> None:
        if self.encoder is None:
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def test_heads_of_a_module_built_in_configure_model_are_pruned(tmp_path):
    seed_everything(0)
    model = ConfiguredTransformer()
    pruning = HeadPruning(0.5, make_pruning_permanent=False)
    _trainer(tmp_path, 1, [pruning], limit_train_batches=2).fit(model, datamodule=_data())
    assert [int(zero_heads(a).sum()) for a in _attentions(model)] == [2, 2]


def test_keep_multiple_of_prunes_fewer_heads_so_that_shrink_keeps_a_multiple_of_channels(tmp_path):
    """HeadPruning had no keep_multiple_of (UnitPruning has): 0.4 of 8 heads of 4 channels pruned 3, and
    shrink(keep_multiple_of=8) then kept a zero head of each attention."""
    seed_everything(0)
    model, data = TransformerClassifier(heads=8), _data()
    _trainer(tmp_path, 1, [HeadPruning(0.4, keep_multiple_of=8)], limit_train_batches=2).fit(model, datamodule=data)
    assert [int(zero_heads(a).sum()) for a in _attentions(model)] == [2, 2]  # round(3.2) = 3, rounded to an even 2
    x = next(iter(data.test_dataloader()))[0]
    result = shrink(model.eval(), x, keep_multiple_of=8)
    assert [m.q_proj.out_features for m in result.model.modules() if isinstance(m, HeadPrunedAttention)] == [24, 24]
    assert not [why for _, why in result.report.kept if "zero heads stay" in why]  # none kept zero for the multiple
    with pytest.raises(MisconfigurationException, match=r"HeadPruning\(heads=0.1\): .* prunes none in "
                                                        r"encoder.layers.0.self_attn \(8\), encoder.layers.1.self_attn "
                                                        r"\(8\); 0.188 or more prunes one in each. Nothing would be "
                                                        r"pruned."):
        _trainer(tmp_path, 1, [HeadPruning(0.1, keep_multiple_of=8)]).fit(TransformerClassifier(heads=8),
                                                                           datamodule=_data())
    for bad in (0, -8, True, 8.5, "8"):
        with pytest.raises(MisconfigurationException, match=r"HeadPruning\(keep_multiple_of=.*\): expected an int"):
            HeadPruning(0.5, keep_multiple_of=bad)


def test_the_advice_on_a_fraction_that_prunes_none_counts_each_attentions_own_multiple_of_heads(tmp_path):
    """Heads of 16 and of 4 channels with keep_multiple_of=16: the advice counted as the first attention does
    (0.251, which then pruned none of the other's 8 heads of 4: they keep a multiple of 4 heads)."""
    with pytest.raises(MisconfigurationException, match=r"HeadPruning\(heads=0.1\): 0.1 of each attention's heads "
                                                        r"prunes none in encoder.layers.0.self_attn \(2\), wide \(8\)"
                                                        r"; 0.438 or more prunes one in each. Nothing would be "
                                                        r"pruned."):
        _trainer(tmp_path, 1, [HeadPruning(0.1, keep_multiple_of=16)]).fit(WithAWideAttention(), datamodule=_data())
