"""UnitPruning under the real Trainer: LSTM units pruned along the schedule, removed by shrink, checkpoints, resumes."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from litcompress import load_shrunk_state_dict, shrink
from litcompress.callbacks import HeadPruning, UnitPruning
from litcompress.data import DigitsDataModule
from litcompress.models import LSTMClassifier, MLPClassifier
from litcompress.pruning import is_pruned
from litcompress.pruning.recurrent import zero_units
from litcompress.pruning.schedules import ConstantSparsity, PolynomialDecay
from tests.conftest import fit_killed_and_resumed


def _trainer(tmp_path, epochs: int, callbacks: list, **kwargs) -> Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=2)
    return Trainer(max_epochs=epochs, callbacks=callbacks, **{**options, **kwargs})


def _data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, flatten=False)  # shuffled: a resumed run sees the same epoch orders


def test_units_pruned_along_a_step_schedule_then_shrink_removes_them(tmp_path):
    seed_everything(0)
    model, data = LSTMClassifier(hidden=32, layers=2), _data()
    counts: list[int] = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            counts.append(int(zero_units(pl_module.lstm).sum()))

    schedule = PolynomialDecay(final_sparsity=0.5, begin=0, end=20, frequency=5)
    _trainer(tmp_path, 2, [UnitPruning(schedule), Watch()]).fit(model, datamodule=data)
    # the schedule's fraction of 32 units, rounded, after each round (Watch runs after the pruning callback)
    assert counts[4] == round(32 * schedule.target(5)) and counts[-1] == 16
    assert all(a <= b for a, b in zip(counts, counts[1:]))  # units pruned stay pruned
    assert not any(is_pruned(model.lstm, name) for name in model.lstm._flat_weights_names)  # permanent at fit end
    x = next(iter(data.test_dataloader()))[0]
    result = shrink(model.eval(), x)
    assert result.model.lstm.hidden_size == 16 and result.model.head.in_features == 16
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=1e-5)
    fresh = load_shrunk_state_dict(LSTMClassifier(hidden=32, layers=2), result.model.state_dict()).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-5)


def test_each_rounds_unit_fraction_goes_to_the_loggers(tmp_path):
    seed_everything(0)
    schedule = PolynomialDecay(final_sparsity=0.5, begin=0, end=12, frequency=4)  # of 8 units: 0, 3, 4, 4
    logger = CSVLogger(tmp_path, name="run")
    _trainer(tmp_path, 1, [UnitPruning(schedule)], logger=logger, log_every_n_steps=1,
             limit_train_batches=14).fit(LSTMClassifier(hidden=8), datamodule=_data())
    with open(logger.experiment.metrics_file_path) as file:
        rows = [row for row in csv.DictReader(file) if row.get("pruning/units")]
    assert [(int(row["step"]), float(row["pruning/units"])) for row in rows] == [(1, 0.0), (4, 0.375), (8, 0.5),
                                                                                 (12, 0.5)]


@pytest.mark.parametrize("make_pruning_permanent", [False, True])
def test_killed_mid_schedule_then_resumed_ends_with_the_same_units_and_weights(tmp_path, make_pruning_permanent):
    reference, state, resumed = fit_killed_and_resumed(  # killed at step 25: epoch 1 of 3 (23 steps each)
        tmp_path, lambda: LSTMClassifier(hidden=16),
        lambda: UnitPruning(PolynomialDecay(final_sparsity=0.75, begin=3, end=30, frequency=4),
                            make_pruning_permanent=make_pruning_permanent), _data)
    # what the crash left on disk loads into the unpruned architecture (masks re-created when not permanent)
    assert any(k.endswith("weight_hh_l0_mask") for k in state) == (not make_pruning_permanent)
    assert int(zero_units(resumed.lstm).sum()) == 12  # round(0.75 * 16)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_fit_resumed_from_a_checkpoint_saved_when_the_fit_ended_goes_on_as_an_uninterrupted_one(tmp_path):
    """make_pruning_permanent=True (the default) removed the masks when the fit ended: a checkpoint saved then held
    none in the callback's state, and a fit resumed from it trained the pruned units back before pruning again."""
    def run(epochs, ckpt_path=None):
        seed_everything(0)
        model = LSTMClassifier(hidden=16)
        trainer = _trainer(tmp_path, epochs, [UnitPruning(PolynomialDecay(final_sparsity=0.75, begin=3, end=40,
                                                                          frequency=4))])
        trainer.fit(model, datamodule=_data(), ckpt_path=ckpt_path)
        return model, trainer

    _, first = run(1)  # 23 steps: mid-schedule
    first.save_checkpoint(tmp_path / "first.ckpt")
    resumed, _ = run(2, ckpt_path=tmp_path / "first.ckpt")
    uninterrupted, _ = run(2)
    assert int(zero_units(resumed.lstm).sum()) == 12  # round(0.75 * 16)
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_input_is_refused_before_training(tmp_path):
    for bad in (1.0, 0.0, -0.5, True, "half", float("nan")):
        with pytest.raises(MisconfigurationException, match="UnitPruning\\(units="):
            UnitPruning(bad)
    for bad in ("lstm", 3, [None]):  # a bare TypeError from `all(...)` for 3
        with pytest.raises(MisconfigurationException, match="exclude"):
            UnitPruning(0.5, exclude=bad)
    assert UnitPruning(0.5, exclude=None).exclude == ()  # nothing excluded, as None says elsewhere
    for bad in (0, 1.5, True):
        with pytest.raises(MisconfigurationException, match="keep_multiple_of"):
            UnitPruning(0.5, keep_multiple_of=bad)
    taken = UnitPruning(0.5, keep_multiple_of=np.int64(8)).keep_multiple_of  # (refused: numpy's ints are no int)
    assert taken == 8 and type(taken) is int
    with pytest.raises(MisconfigurationException, match="MLPClassifier has no nn.LSTM, nn.GRU or nn.RNN"):
        _trainer(tmp_path, 1, [UnitPruning(0.5)]).fit(MLPClassifier(), datamodule=DigitsDataModule(batch_size=64))
    class MyLSTM(nn.LSTM):  # a subclass may have another forward: its units stay, and the refusal says so
        pass

    subclassed = LSTMClassifier()
    subclassed.lstm = MyLSTM(subclassed.lstm.input_size, subclassed.lstm.hidden_size, batch_first=True)
    with pytest.raises(MisconfigurationException, match="; lstm: MyLSTM is not one of nn.LSTM, nn.GRU, nn.RNN.$"):
        _trainer(tmp_path, 1, [UnitPruning(0.5)]).fit(subclassed, datamodule=_data())
    with pytest.raises(MisconfigurationException, match="outside exclude=\\['lstm'\\]"):
        _trainer(tmp_path, 1, [UnitPruning(0.5, exclude=("lstm",))]).fit(LSTMClassifier(), datamodule=_data())
    # a fraction that prunes no unit: it pruned nothing, without a word (8 of 16 units with keep_multiple_of=8)
    with pytest.raises(MisconfigurationException, match=r"UnitPruning\(units=0.3\): 0.3 of each recurrent layer's "
                                                        r"hidden units prunes none in lstm \(16\); 0.469 or more "
                                                        r"prunes one in each. Nothing would be pruned."):
        _trainer(tmp_path, 1, [UnitPruning(0.3, keep_multiple_of=8)]).fit(LSTMClassifier(hidden=16),
                                                                          datamodule=_data())
    with pytest.raises(MisconfigurationException, match=r"no fraction below 1 prunes any in lstm \(each keeps at "
                                                        r"least one, a multiple of keep_multiple_of=16: `exclude` "
                                                        r"them\)"):
        _trainer(tmp_path, 1, [UnitPruning(0.45, keep_multiple_of=16)]).fit(LSTMClassifier(hidden=16),
                                                                            datamodule=_data())


def test_unit_and_head_pruning_keep_their_own_state_keys():
    """Both callbacks share their base; a Trainer with both saves two states, each under its own key."""
    units, heads = UnitPruning(0.5), HeadPruning(0.5)
    assert units.state_key != heads.state_key
    assert units.state_key.startswith("UnitPruning") and "units" in units.state_key
    assert heads.state_key == "HeadPruning{'heads': '0.5', 'exclude': []}"  # as before: old checkpoints still load


def test_model_pruning_says_that_structured_pruning_of_gate_rows_removes_nothing_and_points_to_unit_pruning(tmp_path):
    import warnings

    from litcompress import ModelPruning

    def fit(method: str, **kwargs) -> list[str]:
        model = LSTMClassifier(hidden=8)
        callback = ModelPruning(method, parameters_to_prune=[(model.lstm, "weight_hh_l0")], amount=0.5,
                                use_global_unstructured=False, verbose=0, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _trainer(tmp_path, 1, [callback], limit_train_batches=2).fit(model, datamodule=_data())
        return [str(w.message) for w in caught if "gate" in str(w.message)]

    (message,) = fit("ln_structured", pruning_dim=0, pruning_norm=2)
    assert "lstm.weight_hh_l0" in message and "UnitPruning prunes whole hidden units" in message
    assert fit("l1_unstructured") == []  # unstructured pruning of the same matrix is what it says


def test_beside_model_pruning_on_the_same_matrix_both_pruners_zeros_stay(tmp_path):
    """ModelPruning prunes weight_hh_l0 at the end of epoch 0; UnitPruning's round comes after. Before, that round
    replaced the matrix's mask with the units' own: ModelPruning's zeros came back to life."""
    from litcompress import ModelPruning

    seed_everything(0)
    model = LSTMClassifier(hidden=16)
    masks = []

    class AfterFirstEpoch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                masks.append(pl_module.lstm.weight_hh_l0_mask.clone())

    model_pruning = ModelPruning("l1_unstructured", parameters_to_prune=[(model.lstm, "weight_hh_l0")], amount=0.5,
                                 use_global_unstructured=False, use_lottery_ticket_hypothesis=False, verbose=0)
    unit_pruning = UnitPruning(PolynomialDecay(final_sparsity=0.25, initial_sparsity=0.25, begin=4, end=5))
    _trainer(tmp_path, 2, [model_pruning, unit_pruning, AfterFirstEpoch()], limit_train_batches=3).fit(
        model, datamodule=_data())
    (first_round,) = masks
    final = model.lstm.weight_hh_l0 != 0  # both made permanent at the end of fit
    assert not bool((final & (first_round == 0)).any())  # every zero of ModelPruning's first round is still zero
    assert int(zero_units(model.lstm).sum()) == 4


def test_keep_multiple_of_prunes_fewer_units_so_that_a_multiple_stays(tmp_path):
    seed_everything(0)
    model = LSTMClassifier(hidden=20)
    # 60% of 20 would keep 8; a multiple of 6 keeps 12 (8 pruned)
    _trainer(tmp_path, 1, [UnitPruning(0.6, keep_multiple_of=6)], limit_train_batches=2).fit(model, datamodule=_data())
    assert int(zero_units(model.lstm).sum()) == 8
    for bad in (0, -4, 2.5, True):
        with pytest.raises(MisconfigurationException, match="keep_multiple_of"):
            UnitPruning(0.5, keep_multiple_of=bad)


def test_an_lstm_fed_packed_sequences_is_pruned_while_fitting_then_shrunk_and_reloaded(tmp_path):
    from tests.text_task import PackedLSTMClassifier, TextData

    seed_everything(0)
    model, data = PackedLSTMClassifier(hidden=16), TextData()
    _trainer(tmp_path, 2, [UnitPruning(PolynomialDecay(final_sparsity=0.5, begin=0, end=40, frequency=10))]
             ).fit(model, datamodule=data)
    assert int(zero_units(model.lstm).sum()) == 8
    batch = next(iter(data.test_dataloader()))
    inputs = (batch["input_ids"], batch["attention_mask"])  # lengths 4 to 12
    result = shrink(model.eval(), inputs)
    assert result.model.lstm.hidden_size == 8 and result.model.head.in_features == 16
    with torch.no_grad():
        torch.testing.assert_close(result.model(*inputs), model(*inputs), rtol=0, atol=1e-5)
        fresh = load_shrunk_state_dict(PackedLSTMClassifier(hidden=16), result.model.state_dict()).eval()
        torch.testing.assert_close(fresh(*inputs), model(*inputs), rtol=0, atol=1e-5)
        accuracy = (fresh(*inputs).argmax(1) == batch["labels"]).float().mean()
    assert accuracy > 0.7  # it learned the task with half its units


@pytest.mark.parametrize("unit", ["epoch", "step"])
@pytest.mark.parametrize("callback", [UnitPruning, HeadPruning])
def test_a_round_at_the_schedules_start_runs_in_epochs_as_in_steps(tmp_path, unit, callback):
    """ConstantSparsity(0.5) from point 0: its one round ran with unit="step" and never with unit="epoch" (the end of
    epoch 0 is point 1, and 0 was never caught up), so the fit ended dense without a word. It runs at the end of the
    first epoch, as in ModelPruning."""
    seed_everything(0)
    if callback is UnitPruning:
        model, data = LSTMClassifier(hidden=16), _data()
    else:
        from litcompress.models import TransformerClassifier

        model, data = TransformerClassifier(d_model=16, heads=4, layers=1), _data()
    pruning = callback(ConstantSparsity(0.5, unit=unit))
    _trainer(tmp_path, 2, [pruning], limit_train_batches=3).fit(model, datamodule=data)
    if callback is UnitPruning:
        assert int(zero_units(model.lstm).sum()) == 8
    else:
        from litcompress.pruning.heads import zero_heads

        attention = next(m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention))
        assert int(zero_heads(attention).sum()) == 2

