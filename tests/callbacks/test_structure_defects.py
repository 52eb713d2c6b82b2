"""Defects of the structure-pruning callbacks (UnitPruning, HeadPruning and their base) that were fixed: each test
failed before its fix."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from litcompress.callbacks import HeadPruning, UnitPruning
from litcompress.models import LSTMClassifier, TransformerClassifier
from litcompress.pruning import engine
from tests.callbacks.ddp_pruning_script import DestroyProcessGroup
from tests.conftest import EMAWeightAveraging, weight_averaging_callbacks
from litcompress.pruning.heads import zero_heads
from litcompress.pruning.recurrent import prune_units_, zero_units
from litcompress.pruning.schedules import CallableSchedule


def _trainer(root: Path, epochs: int, callbacks: list, **kwargs) -> Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=0)
    return Trainer(max_epochs=epochs, callbacks=callbacks, **{**options, **kwargs})


def _data(samples: int = 64) -> DataLoader:
    """8x8 one-channel images and 10 classes, in a fixed order (a resumed run sees the batches the first one saw)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(samples, 1, 8, 8, generator=generator)
    return DataLoader(TensorDataset(images, torch.randint(0, 10, (samples,), generator=generator)), batch_size=16)


def _model(callback: type) -> LightningModule:
    """An LSTM of 8 units (UnitPruning) or an attention of 4 heads (HeadPruning)."""
    if callback is UnitPruning:
        return LSTMClassifier(hidden=8, lr=0.01)
    return TransformerClassifier(d_model=16, heads=4, layers=1, feed_forward=16, lr=0.01)


def _pruned(model: LightningModule) -> int:
    """The structures of `model`'s pruned layer that are zero."""
    if isinstance(model, LSTMClassifier):
        return int(zero_units(model.lstm).sum())
    return int(zero_heads(model.encoder.layers[0].self_attn).sum())


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("callback", [HeadPruning, UnitPruning, "ModelPruning"])
def test_a_state_loaded_before_the_fit_is_the_state_the_callback_gives(tmp_path, callback):
    """load_state_dict keeps a state until the model's layers are known; state_dict meanwhile gave the empty state of
    a fresh callback (no masks, the schedule at its start), which a checkpoint written then would have saved."""
    from litcompress import ModelPruning

    def build():
        if callback == "ModelPruning":
            return ModelPruning("l1_unstructured", amount=0.5, make_pruning_permanent=False)
        return callback(0.5, make_pruning_permanent=False)

    seed_everything(0)
    model, trained = _model(UnitPruning if callback is UnitPruning else HeadPruning), build()
    _trainer(tmp_path, 2, [trained]).fit(model, _data())
    state = trained.state_dict()
    assert state["masks"]  # (a real state: the fit pruned)
    fresh = build()
    fresh.load_state_dict(copy.deepcopy(state))
    given = fresh.state_dict()
    assert given.keys() == state.keys()
    for key, value in state.items():
        if key == "masks":
            assert given[key].keys() == value.keys()
            assert all(torch.equal(given[key][name], mask) for name, mask in value.items())
        elif key != "lottery_ticket_snapshot":
            assert given[key] == value, key


# ---------------------------------------------------------------------------------------------------------- 1
@pytest.mark.parametrize("averaging", weight_averaging_callbacks())
@pytest.mark.parametrize("callback", [UnitPruning, HeadPruning])
def test_weight_averaging_listed_after_permanent_structure_pruning_is_refused_before_training(tmp_path, callback,
                                                                                             averaging):
    """Before, the averaging callback wrote its averages over the weights after `on_train_end` had made the masks
    permanent: the model came back with none of its structures pruned, silently."""
    seed_everything(0)
    model = _model(callback)
    before = _weights(model)
    average = averaging(swa_lrs=0.01, swa_epoch_start=1) if averaging is StochasticWeightAveraging else averaging()
    message = f"{callback.__name__}\\(make_pruning_permanent=True\\) is listed before {averaging.__name__}"
    with pytest.raises(MisconfigurationException, match=message):
        _trainer(tmp_path, 3, [callback(0.5), average], limit_train_batches=2).fit(model, _data())
    assert all(torch.equal(value, before[name]) for name, value in _weights(model).items())  # nothing trained


@pytest.mark.parametrize("averaging", weight_averaging_callbacks())
@pytest.mark.parametrize("callback", [UnitPruning, HeadPruning])
@pytest.mark.parametrize(("pruning_first", "permanent"), [(False, True), (True, False)])
def test_the_orders_of_weight_averaging_and_structure_pruning_that_are_allowed_end_pruned(tmp_path, callback,
                                                                                          averaging, pruning_first,
                                                                                          permanent):
    """The refusal's remedies: the averaging callback listed first, or masks kept (the averages land in
    `<name>_orig`, still masked)."""
    seed_everything(0)
    model = _model(callback)
    average = averaging(swa_lrs=0.01, swa_epoch_start=1) if averaging is StochasticWeightAveraging else averaging()
    pruning = callback(0.5, make_pruning_permanent=permanent)
    callbacks = [pruning, average] if pruning_first else [average, pruning]
    _trainer(tmp_path, 3, callbacks, limit_train_batches=2).fit(model, _data())
    assert _pruned(model) == (4 if callback is UnitPruning else 2)


@pytest.mark.skipif(EMAWeightAveraging is None, reason="Lightning < 2.6")
@pytest.mark.parametrize("callback", [UnitPruning, HeadPruning, "ModelPruning"])
@pytest.mark.parametrize("permanent", [True, False])
def test_checkpoints_of_a_fit_with_ema_listed_first_load_pruned(tmp_path, callback, permanent):
    """EMAWeightAveraging writes its averaged copy, made before any mask, in every checkpoint's state_dict: the file
    loaded as an unpruned model (0 of 4 units zero), though the callback's state in it held the masks."""
    from litcompress import ModelPruning

    seed_everything(0)
    model = _model(UnitPruning if callback == "ModelPruning" else callback)
    pruning = (ModelPruning("l1_unstructured", amount=0.5, make_pruning_permanent=permanent, verbose=0)
               if callback == "ModelPruning" else callback(0.5, make_pruning_permanent=permanent))
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    _trainer(tmp_path, 2, [EMAWeightAveraging(), pruning, checkpoints], enable_checkpointing=True,
             limit_train_batches=4).fit(model, _data())
    masked = 0
    for path in sorted(tmp_path.glob("*.ckpt")):
        checkpoint = torch.load(path, weights_only=True)
        state = checkpoint["state_dict"]
        plain = _model(UnitPruning if callback == "ModelPruning" else callback)
        plain.load_state_dict(state)  # strict: plain keys
        if callback == "ModelPruning":  # zero wherever the callback's state in the same file masks
            (saved,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelPruning")]
            assert all(bool((state[key][~mask] == 0).all()) for key, mask in saved["masks"].items())
            masked += bool(saved["masks"])
        else:
            assert _pruned(plain) == (4 if callback is UnitPruning else 2)
            masked += 1
    assert masked  # a checkpoint written after a round


@pytest.mark.parametrize("callback", [UnitPruning, HeadPruning])
@pytest.mark.parametrize("amount", [0.5, CallableSchedule(fn=lambda epoch: 0.5 if epoch >= 1 else 0.0, end=1,
                                                             unit="epoch")])
def test_one_callback_prunes_each_model_of_a_sweep(tmp_path, callback, amount):
    """A k-fold or sweep loop with a Trainer per model and one callback: the second model came back unpruned, the
    first fit's progress (pruned once, the last epoch seen) taken for its own."""
    pruning = callback(amount)
    for fold in range(2):
        seed_everything(fold)
        model = _model(callback)
        _trainer(tmp_path / str(fold), 2, [pruning], limit_train_batches=2).fit(model, _data())
        assert _pruned(model) == (4 if callback is UnitPruning else 2), fold


@pytest.mark.parametrize("callback", [UnitPruning, HeadPruning, "ModelPruning"])
def test_resuming_a_finished_fit_still_makes_the_masks_permanent(tmp_path, callback):
    """`fit(ckpt_path="last.ckpt")` once the saved fit reached max_epochs trains nothing, and Lightning skips
    `on_train_end`: the model kept the masks (make_pruning_permanent=True), and its state dict did not load into the
    plain architecture."""
    from litcompress import ModelPruning

    def pruning():
        return ModelPruning("l1_unstructured", amount=0.3, verbose=0) if callback == "ModelPruning" \
            else callback(0.5)

    kind = UnitPruning if callback == "ModelPruning" else callback
    seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(tmp_path, 2, [pruning(), checkpoints], enable_checkpointing=True, limit_train_batches=2).fit(
        _model(kind), _data())
    model = _model(kind)
    _trainer(tmp_path, 2, [pruning()], limit_train_batches=2).fit(model, _data(), ckpt_path=tmp_path / "last.ckpt")
    assert not [name for name, _ in model.named_buffers() if name.endswith("_mask")]
    _model(kind).load_state_dict(model.state_dict())  # strict: the plain architecture


class _ReplacedInSetup(LSTMClassifier):
    """Swaps its LSTM for another in its own `setup`, which Lightning calls after the callbacks' (Lightning's docs:
    the hook to build models dynamically)."""

    def setup(self, stage: str) -> None:
        self.lstm = copy.deepcopy(self.lstm)


class _BuiltInSetup(LSTMClassifier):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._built, self.lstm = [self.lstm], None  # a list: not a submodule until setup puts it in place

    def setup(self, stage: str) -> None:
        if self.lstm is None:
            self.lstm = self._built[0]


@pytest.mark.parametrize("model_class", [_ReplacedInSetup, _BuiltInSetup])
def test_layers_built_or_replaced_in_the_modules_setup_are_the_ones_pruned(tmp_path, model_class):
    """Targets were found in the callbacks' `setup`: the replaced LSTM was pruned by name, its masks never made
    permanent (the state dict no longer loaded into the plain model), and one built there was 'no nn.LSTM'. (The
    mechanism is the base class's, ModelPruning's too.)"""
    seed_everything(0)
    model = model_class(hidden=8, lr=0.01)
    _trainer(tmp_path, 1, [UnitPruning(0.5)], limit_train_batches=2).fit(model, _data())
    assert not [name for name, _ in model.named_buffers() if name.endswith("_mask")]
    assert _pruned(model) == 4
    plain = LSTMClassifier(hidden=8, lr=0.01)
    plain.load_state_dict(model.state_dict())  # strict: the plain architecture


# ---------------------------------------------------------------------------------------------------------- 2
class _SaveRankZeroWeights(Callback):
    """Saves rank 0's effective weights (masks multiplied in) at the end of training."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank == 0:
            torch.save({k: v.detach().clone() for k, v in engine.permanent_state_dict(pl_module).items()}, self.path)


@pytest.mark.parametrize("callback", [UnitPruning, pytest.param(HeadPruning, marks=pytest.mark.slow)])  # (12 s each)
def test_ddp_spawn_with_masks_kept_hands_the_pruned_weights_to_the_calling_process(tmp_path, callback):
    """Lightning loads rank 0's state dict into the parent's (unpruned) model with strict=False: its
    `<name>_orig`/`<name>_mask` keys were dropped, and the pruned layer kept its initial weights, silently."""
    seed_everything(0)
    model = _model(callback)
    saved = tmp_path / "rank0.pt"
    # DestroyProcessGroup: gloo torn down on both ranks together (a rank left to exit with it aborted, SIGABRT)
    _trainer(tmp_path, 1, [callback(0.5, make_pruning_permanent=False), _SaveRankZeroWeights(str(saved)),
                           DestroyProcessGroup()], strategy="ddp_spawn", devices=2, limit_train_batches=2).fit(
        model, _data())
    rank_zero, parent = torch.load(saved), model.state_dict()
    assert parent.keys() == rank_zero.keys()
    for name, value in rank_zero.items():
        assert torch.equal(parent[name], value), name
    assert _pruned(model) == (4 if callback is UnitPruning else 2)


# ---------------------------------------------------------------------------------------------------------- 3
def _fraction(epoch: int) -> float:
    return 0.25 if epoch <= 1 else 0.5


def _elsewhere(function: types.FunctionType) -> types.FunctionType:
    """The same function at another address, as a new process has it (same module, same qualified name)."""
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__qualname__, copy.__module__ = function.__qualname__, function.__module__
    return copy


# two lambdas written on two lines: the script edited between the run and its resumption
_BEFORE = lambda epoch: 0.25 if epoch <= 1 else 0.5  # noqa: E731
_AFTER = lambda epoch: 0.25 if epoch <= 1 else 0.5  # noqa: E731


@pytest.mark.parametrize(("written", "resumed"), [(_fraction, _elsewhere(_fraction)), (_BEFORE, _AFTER)],
                         ids=["function in a new process", "lambda moved to another line"])
def test_a_callable_schedule_resumed_in_a_new_process_ends_as_the_uninterrupted_run(tmp_path, written, resumed):
    """The state key held the function's repr, with its memory address: a run resumed in a new process found no
    state under its key and restarted the schedule, silently (the pruned units trained unmasked until the next
    round)."""
    def fit(fn, root: Path, checkpoint: str | None = None) -> LightningModule:
        seed_everything(0)
        model = LSTMClassifier(hidden=8, lr=0.01)
        callbacks: list = [UnitPruning(CallableSchedule(fn=fn, begin=1, end=2, unit="epoch"))]
        if checkpoint is None:
            callbacks.append(ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, filename="{epoch}"))
        _trainer(root, 4, callbacks, enable_checkpointing=checkpoint is None).fit(model, _data(), ckpt_path=checkpoint)
        return model

    uninterrupted = fit(written, tmp_path / "once")
    if written.__name__ == "<lambda>":
        with pytest.warns(UserWarning, match="only in where a function is written; it is restored"):
            resumed_model = fit(resumed, tmp_path / "twice", str(tmp_path / "once" / "epoch=0.ckpt"))
    else:
        resumed_model = fit(resumed, tmp_path / "twice", str(tmp_path / "once" / "epoch=0.ckpt"))
    assert _pruned(uninterrupted) == 4
    expected = uninterrupted.state_dict()
    for name, value in resumed_model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_a_schedule_without_functions_keeps_its_state_key():
    """Keys are unchanged where the amount's repr held no address: older checkpoints still restore."""
    assert UnitPruning(0.5).state_key == "UnitPruning{'units': '0.5', 'exclude': []}"
    schedule = CallableSchedule(fn=_fraction, begin=1, end=2, unit="epoch")
    assert " at 0x" not in UnitPruning(schedule).state_key
    assert f"fn={__name__}._fraction, end=2" in UnitPruning(schedule).state_key


# ---------------------------------------------------------------------------------------------------------- 4
@pytest.mark.parametrize(("callback", "exclude", "meant"), [
    (UnitPruning, "model.lstm", "lstm"),
    (UnitPruning, "LSTM", "lstm"),
    (HeadPruning, "encoder.layers.0.attn", "encoder.layers.0.self_attn"),
    (UnitPruning, "", None),  # the root's name: it passed setup, then the first round failed mid-fit
    (HeadPruning, "", None),
])
def test_exclude_naming_no_module_is_refused_before_training(tmp_path, callback, exclude, meant):
    """Before, such a name was ignored and the layer meant to be kept was pruned."""
    seed_everything(0)
    model = _model(callback)
    before = _weights(model)
    with pytest.raises(MisconfigurationException) as refusal:
        _trainer(tmp_path, 1, [callback(0.5, exclude=(exclude,))], limit_train_batches=2).fit(model, _data())
    message = str(refusal.value)
    assert f"names no module of {type(model).__name__}: [{exclude!r}]" in message
    assert meant is None or f"did you mean {meant!r}" in message
    assert all(torch.equal(value, before[name]) for name, value in _weights(model).items())


# ---------------------------------------------------------------------------------------------------------- 5
@pytest.mark.parametrize("callback", [UnitPruning, HeadPruning])
def test_a_fixed_fraction_is_pruned_once_the_first_optimizer_step_is_done_with_gradient_accumulation(tmp_path,
                                                                                                    callback):
    """With accumulate_grad_batches=3 it was pruned after the first batch, before any step: ranked on the initial
    weights, and the first step accumulated unmasked and masked batches."""
    seed_everything(0)
    model = _model(callback)
    seen: list[tuple[int, int, int]] = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch_idx, trainer.global_step, _pruned(pl_module)))

    _trainer(tmp_path, 1, [callback(0.5), Watch()], accumulate_grad_batches=3).fit(model, _data(96))
    half = 4 if callback is UnitPruning else 2
    assert seen == [(0, 0, 0), (1, 0, 0), (2, 1, half), (3, 1, half), (4, 1, half), (5, 2, half)]


# ---------------------------------------------------------------------------------------------------------- 6
@pytest.mark.parametrize(("hidden", "fraction", "multiple", "kept"), [
    (8, 0.95, 4, 4),  # every unit by the fraction: k stay, not 1
    (32, 0.99, 16, 16),
    (8, 0.95, 16, 8),  # k above the layer's size: the whole layer
    (8, 0.95, None, 1),  # no k: one stays, as before
    (32, 0.6, 16, 16),  # a fraction that leaves some: unchanged
])
def test_keep_multiple_of_keeps_a_positive_multiple_when_the_fraction_rounds_to_every_unit(hidden, fraction,
                                                                                         multiple, kept):
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(4, hidden))
    prune_units_(model, fraction, keep_multiple_of=multiple)
    assert hidden - int(zero_units(model[0]).sum()) == kept


def test_unit_pruning_with_keep_multiple_of_keeps_a_multiple_while_training(tmp_path):
    seed_everything(0)
    model = LSTMClassifier(hidden=8, lr=0.01)
    _trainer(tmp_path, 1, [UnitPruning(0.95, keep_multiple_of=4)], limit_train_batches=2).fit(model, _data())
    assert _pruned(model) == 4


@pytest.mark.parametrize("evaluate", ["validate", "test"])
@pytest.mark.parametrize("callback", [UnitPruning, HeadPruning])
def test_evaluating_a_checkpoint_leaves_the_model_with_plain_weights_as_the_fit_did(tmp_path, callback, evaluate):
    """With make_pruning_permanent=True, trainer.test(ckpt_path=...) after the fit put the checkpoint's masks back on
    the model and left them there: its state dict held `<name>_orig`/`<name>_mask` keys that a freshly built model
    refuses (as ModelPruning did)."""
    seed_everything(0)
    model = _model(callback)
    checkpoint = ModelCheckpoint(tmp_path, save_last=True)
    trainer = _trainer(tmp_path, 1, [callback(0.5), checkpoint], enable_checkpointing=True)
    trainer.fit(model, _data())
    fitted = _weights(model)
    getattr(trainer, evaluate)(model, _data(), ckpt_path=checkpoint.last_model_path, verbose=False)
    assert model.state_dict().keys() == fitted.keys()  # plain names, as after the fit
    type(model)(**model.hparams).load_state_dict(model.state_dict())  # into a freshly built model
    assert _pruned(model) > 0  # the checkpoint's pruned weights, zeros kept


@pytest.mark.parametrize("load", ["load_pruned_checkpoint", "load_module_from_checkpoint"])
@pytest.mark.parametrize("callback", [UnitPruning, HeadPruning, "ModelPruning"])
def test_a_checkpoint_of_effective_weights_loads_with_live_masks_when_asked(tmp_path, callback, load):
    """keep_masks=True promises live masks; with make_pruning_permanent=True (the default) the masks are in the
    callbacks' states, which only ModelPruning's were read from, and load_module_from_checkpoint read none: the
    pruned units, heads and weights grew back in a fit that went on."""
    from litcompress import ModelPruning
    from litcompress.callbacks import load_module_from_checkpoint, load_pruned_checkpoint

    seed_everything(0)
    kind = UnitPruning if callback is UnitPruning else HeadPruning
    model = _model(kind)
    pruning = ModelPruning("l1_unstructured", amount=0.5) if callback == "ModelPruning" else callback(0.5)
    checkpoint = ModelCheckpoint(tmp_path, save_last=True)
    _trainer(tmp_path, 1, [pruning, checkpoint], enable_checkpointing=True).fit(model, _data())
    saved = torch.load(checkpoint.last_model_path, weights_only=False)
    assert not any(key.endswith("_mask") for key in saved["state_dict"])  # effective weights
    if load == "load_pruned_checkpoint":
        loaded = load_pruned_checkpoint(type(model)(**model.hparams), checkpoint.last_model_path, keep_masks=True)
    else:
        loaded = load_module_from_checkpoint(type(model), checkpoint.last_model_path, keep_masks=True)
    masked = {f"{path}.{name}": engine.mask_of(module, name) for path, module, name in engine.pruned_targets(loaded)}
    expected = {name: mask for state in saved["callbacks"].values() for name, mask in state.get("masks", {}).items()}
    assert masked.keys() == expected.keys() and expected
    assert all(torch.equal(masked[name].bool(), expected[name]) for name in expected)
    effective = engine.permanent_state_dict(loaded)
    assert all(torch.equal(v, effective[k]) for k, v in model.state_dict().items())  # the same weights


class _WithSetup(LSTMClassifier):
    """Overrides `setup` (building nothing): the callbacks put off finding their targets until the stage starts."""

    def setup(self, stage: str) -> None:
        self.set_up = stage


class _TransformerWithSetup(TransformerClassifier):
    def setup(self, stage: str) -> None:
        self.set_up = stage


@pytest.mark.parametrize("callback", [UnitPruning, HeadPruning, "ModelPruning"])
def test_a_callback_reused_to_resume_another_model_with_deferred_targets_restores_onto_that_model(tmp_path, callback):
    """The checkpoint's state was restored onto the previous model's layers (still the callback's targets while the
    new module's were put off): the resumed model was never pruned, and the finished one got masks again."""
    from litcompress import ModelPruning

    def pruning():
        return ModelPruning("l1_unstructured", amount=0.5, verbose=0) if callback == "ModelPruning" \
            else callback(0.5)

    def model():
        return (_TransformerWithSetup(d_model=16, heads=4, layers=1, feed_forward=16, lr=0.01)
                if callback is HeadPruning else _WithSetup(hidden=8, lr=0.01))

    reused = pruning()
    seed_everything(0)
    first = model()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    _trainer(tmp_path, 2, [reused, checkpoints], enable_checkpointing=True, limit_train_batches=2).fit(first, _data())
    first_state = _weights(first)
    resumed = {}
    for name, instance in (("fresh", pruning()), ("reused", reused)):
        seed_everything(1)
        resumed[name] = model()
        _trainer(tmp_path / name, 2, [instance], limit_train_batches=2).fit(
            resumed[name], _data(), ckpt_path=tmp_path / "epoch=1-step=3.ckpt")
    assert _pruned(resumed["fresh"]) > 0 or callback == "ModelPruning"
    fresh, reused_weights = _weights(resumed["fresh"]), _weights(resumed["reused"])
    assert fresh.keys() == reused_weights.keys()
    assert all(torch.equal(fresh[key], reused_weights[key]) for key in fresh)
    assert first.state_dict().keys() == first_state.keys()  # no masks put back on the finished model



@pytest.mark.parametrize("callback", [UnitPruning, HeadPruning])
def test_structures_kept_masked_beside_a_permanent_model_pruning_survive_its_fit_end_and_resume(tmp_path, callback):
    """ModelPruning (make_pruning_permanent=True) made every mask of the module permanent when the fit ended, the
    structure callback's kept ones too: its checkpoint then held no masks, and a fit resumed from it trained the
    pruned units (heads) back (4 zero units uninterrupted, 0 resumed)."""
    from litcompress import ModelPruning
    from litcompress.pruning.schedules import PolynomialDecay

    def fit(epochs: int, ckpt_path: str | None = None, save: Path | None = None) -> LightningModule:
        seed_everything(0)
        model = _model(callback)
        structures = callback(PolynomialDecay(final_sparsity=0.5, begin=0, end=8, frequency=4),
                              make_pruning_permanent=False)
        weights = ModelPruning("l1_unstructured", amount=0.3, parameters_to_prune=[(model.head, "weight")],
                               use_lottery_ticket_hypothesis=False, verbose=0)
        trainer = _trainer(tmp_path, epochs, [weights, structures])
        trainer.fit(model, _data(), ckpt_path=ckpt_path)
        assert engine.pruned_targets(model)  # the structures' masks, kept
        if save is not None:
            trainer.save_checkpoint(save)
        return model

    fit(2, save=tmp_path / "end.ckpt")
    resumed, uninterrupted = fit(3, ckpt_path=str(tmp_path / "end.ckpt")), fit(3)
    assert _pruned(resumed) == _pruned(uninterrupted) == (4 if callback is UnitPruning else 2)
    expected = uninterrupted.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_a_structure_callback_making_its_masks_permanent_leaves_a_tensor_model_pruning_keeps_masked(tmp_path):
    """A tensor both prune holds one combined mask: UnitPruning (make_pruning_permanent=True) removed it, the mask
    ModelPruning(make_pruning_permanent=False) keeps with it."""
    from litcompress import ModelPruning

    seed_everything(0)
    model = LSTMClassifier(hidden=8, lr=0.01)
    weights = ModelPruning("l1_unstructured", amount=0.3, use_lottery_ticket_hypothesis=False, verbose=0,
                           parameters_to_prune=[(model.lstm, "weight_hh_l0"), (model.head, "weight")],
                           use_global_unstructured=False, make_pruning_permanent=False)
    _trainer(tmp_path, 2, [weights, UnitPruning(0.25)]).fit(model, _data())
    assert engine.is_pruned(model.lstm, "weight_hh_l0") and engine.is_pruned(model.head, "weight")
    assert "lstm.weight_hh_l0_mask" in model.state_dict()


def test_model_prunings_make_pruning_permanent_called_by_hand_after_a_fit_removes_every_mask(tmp_path):
    """As Lightning's: an export step after the fit. Sparing the masks other callbacks keep is for its own hooks in the
    fit (by hand, the finished fit's trainer, still on the module, spared UnitPruning's: the state dict did not load
    into the plain model)."""
    from litcompress import ModelPruning

    seed_everything(0)
    model = LSTMClassifier(hidden=8, lr=0.01)
    weights = ModelPruning("l1_unstructured", amount=0.3, use_lottery_ticket_hypothesis=False, verbose=0,
                           parameters_to_prune=[(model.head, "weight")], make_pruning_permanent=False)
    _trainer(tmp_path, 2, [weights, UnitPruning(0.5, make_pruning_permanent=False)]).fit(model, _data())
    assert engine.is_pruned(model.lstm, "weight_ih_l0")
    weights.make_pruning_permanent(model)
    assert engine.pruned_targets(model) == []
    LSTMClassifier(hidden=8).load_state_dict(model.state_dict())


@pytest.mark.parametrize("callback", [UnitPruning, HeadPruning])
def test_flags_read_as_numpy_bools_are_taken_as_model_pruning_takes_them(callback):
    import numpy as np

    made = callback(0.5, make_pruning_permanent=np.False_, log_sparsity=np.True_)
    assert made._make_pruning_permanent is False and made._log_sparsity is True
    assert made.state_key == callback(0.5, make_pruning_permanent=False).state_key
