"""`QuantizationAwareTraining` under a real Lightning Trainer: digits, real checkpoints and files."""

from __future__ import annotations

import logging
import re
import warnings

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from litcompress import ModelPruning, load_quantized
from litcompress.callbacks import QuantizationAwareTraining
from litcompress.data import DigitsDataModule
from litcompress.models import MLPClassifier
from litcompress.quantization.qat import QATConfig
from tests.conftest import ConfiguredDigitsClassifier, CrashAtStep, SimulatedCrash, fit_killed_and_resumed, make_trainer


def _accuracy(model: nn.Module, data: DigitsDataModule) -> float:
    x, y = data.splits.val.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_fit_ends_with_an_int8_model_as_accurate_plain_checkpoints_and_the_models_forward(tmp_path, caplog):
    seed_everything(0)
    model, data = MLPClassifier(hidden=(32,), lr=1e-2), DigitsDataModule()
    callback = QuantizationAwareTraining("net", start_epoch=2, metric="val_acc", save_path=tmp_path / "int8.pt2")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with caplog.at_level(logging.INFO, logger="litcompress"):
        make_trainer(tmp_path, max_epochs=4, limit_train_batches=None, limit_val_batches=None,
                     enable_checkpointing=True, callbacks=[callback, checkpoints]).fit(model, datamodule=data)
    assert "Sequential trains through int8 rounding from here (pt2e static per-channel" in caplog.text
    assert "forward" not in model.net.__dict__  # the model's own forward is back
    model.eval()
    fp32, int8 = _accuracy(model, data), _accuracy(callback.result.model, data)
    assert fp32 > 0.85 and abs(int8 - fp32) <= 0.02  # trained through the rounding: int8 loses (almost) nothing
    assert callback.metric_value == pytest.approx(int8, abs=1e-6)  # evaluated by the module's own validation_step
    loaded, recipe = load_quantized(tmp_path / "int8.pt2")
    assert recipe == callback.result.recipe
    x = data.splits.val.tensors[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), callback.result.model(x))
    # a checkpoint written mid-QAT holds the plain architecture's keys, and the observers in the callback's state
    saved = torch.load(checkpoints.last_model_path, weights_only=False)
    fresh = MLPClassifier(hidden=(32,))
    fresh.load_state_dict(saved["state_dict"])  # strict
    assert any(k.endswith(".scale") for k in saved["callbacks"][callback.state_key]["fake_quant"])


class _ForwardAtFitEnd(Callback):
    def on_fit_end(self, trainer, pl_module):
        self.forward = pl_module.net.__dict__.get("forward")


def test_callbacks_listed_before_it_see_the_models_own_forward_at_fit_end(tmp_path):
    """The forward was restored in this callback's own on_fit_end only: a QuantizeOnFitEnd listed before it quantized
    the fake-quant graph (every backend failed; it returned an fp32 copy)."""
    seed_everything(0)
    before = _ForwardAtFitEnd()
    callback = QuantizationAwareTraining("net")
    make_trainer(tmp_path, max_epochs=1, callbacks=[before, callback]).fit(MLPClassifier(hidden=(16,)),
                                                                           datamodule=DigitsDataModule())
    assert before.forward is None and callback.result is not None


def test_killed_mid_qat_and_resumed_ends_as_an_uninterrupted_fit(tmp_path):
    callbacks = []

    def make_callback():
        callbacks.append(QuantizationAwareTraining("net", start_epoch=0))
        return callbacks[-1]

    reference, state, resumed = fit_killed_and_resumed(  # 17 steps an epoch: killed in epoch 1, resumed from epoch 0
        tmp_path, lambda: MLPClassifier(hidden=(24,), lr=1e-2), make_callback, DigitsDataModule, crash_step=25)
    MLPClassifier(hidden=(24,)).load_state_dict(state)  # the crash left a loadable plain checkpoint
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    uninterrupted, resumed_callback = callbacks[0], callbacks[2]
    for key, value in uninterrupted.qat.fake_quant_state().items():
        assert torch.equal(resumed_callback.qat.fake_quant_state()[key], value), key
    x = torch.rand(8, 64)
    with torch.no_grad():
        assert torch.equal(resumed_callback.result.model(x), uninterrupted.result.model(x))
    assert "forward" not in callbacks[1]._module.__dict__  # the crash restored the model's forward


class _FreezesOnEpochStart(Callback):
    """The README's former recipe for late-QAT frozen ranges: the callback's graph, from `on_train_epoch_start`."""

    def __init__(self, qat: QuantizationAwareTraining, epoch: int) -> None:
        self.qat, self.epoch, self.graph_seen = qat, epoch, []

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch >= self.epoch:
            self.graph_seen.append(self.qat.qat is not None)


def _fit_freezing_at_epoch_3(root, callbacks=(), freeze=3, ckpt_path=None):
    seed_everything(0)
    model = MLPClassifier(hidden=(16,), lr=1e-2)
    callback = QuantizationAwareTraining("net", start_epoch=1, freeze_ranges_epoch=freeze)
    probe = _FreezesOnEpochStart(callback, freeze or 3)
    trainer = make_trainer(root, max_epochs=5, enable_checkpointing=True,
                           callbacks=[probe, callback, *callbacks])  # the probe's hooks run first
    try:
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)  # 4 batches an epoch
    except SimulatedCrash:
        pass
    return model, callback, probe


@pytest.fixture(scope="module")
def fit_frozen_at_epoch_3(tmp_path_factory):
    """An uninterrupted fit whose ranges freeze at epoch 3, with a checkpoint at every epoch's end."""
    torch.set_num_threads(1)  # as the tests' own fits (the autouse fixture that sets it runs after this one)
    root = tmp_path_factory.mktemp("frozen")
    by_epoch = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
    model, callback, _ = _fit_freezing_at_epoch_3(root, [by_epoch])
    return model, callback, root / "ckpt"


def test_ranges_frozen_from_an_epoch_differ_from_ranges_observed_to_the_end(tmp_path, fit_frozen_at_epoch_3):
    _, frozen, _ = fit_frozen_at_epoch_3
    _, observing, _ = _fit_freezing_at_epoch_3(tmp_path, freeze=None)
    assert frozen.qat.ranges_frozen and not observing.qat.ranges_frozen
    assert any(not torch.equal(value, observing.qat.fake_quant_state()[key])
               for key, value in frozen.qat.fake_quant_state().items())


@pytest.mark.parametrize("limits, said", [(dict(max_epochs=2), "max_epochs=2"),
                                          (dict(max_epochs=5, max_steps=6), "max_steps=6"),  # 4 steps an epoch
                                          (dict(max_epochs=-1, max_steps=8), "max_steps=8"),
                                          (dict(max_epochs=-1, max_steps=9), None)])
def test_a_freeze_epoch_the_fit_never_reaches_is_said(tmp_path, limits, said):
    callback = QuantizationAwareTraining("net", freeze_ranges_epoch=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, callbacks=[callback], **limits).fit(MLPClassifier(hidden=(16,)),
                                                                   datamodule=DigitsDataModule())
    told = [str(w.message) for w in caught if "freeze_ranges_epoch=2" in str(w.message)]
    if said is None:
        assert not told and callback.qat.ranges_frozen
    else:
        assert told == [f"QuantizationAwareTraining(freeze_ranges_epoch=2): the fit ends at {said}, before that "
                        "epoch: the int8 ranges are observed to the end."]
        assert callback.result is not None and not callback.qat.ranges_frozen


def test_a_callback_used_again_goes_on_with_its_frozen_ranges_without_a_warning(tmp_path):
    callback, model = QuantizationAwareTraining("net", freeze_ranges_epoch=2), MLPClassifier(hidden=(16,))
    make_trainer(tmp_path, max_epochs=3, callbacks=[callback]).fit(model, datamodule=DigitsDataModule())
    frozen = callback.qat.fake_quant_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, max_epochs=-1, max_steps=2, callbacks=[callback]).fit(model,
                                                                                     datamodule=DigitsDataModule())
    assert not [w for w in caught if "freeze_ranges_epoch" in str(w.message)]
    assert callback.qat.ranges_frozen
    assert all(torch.equal(value, frozen[key]) for key, value in callback.qat.fake_quant_state().items())


class _RecordsQATForward(Callback):
    """Whether each training batch of the fit ran through the QAT graph (the module's forward is the callback's)."""

    def __init__(self, module_name: str) -> None:
        self.module_name, self.through_qat = module_name, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        module = pl_module.get_submodule(self.module_name)
        self.through_qat.append(type(module.__dict__.get("forward")).__name__ == "_QATForward")


def test_a_callback_used_again_with_a_late_start_trains_through_its_graph_from_the_first_epoch(tmp_path):
    """The second fit's epochs before start_epoch trained fp32 outside the graph, moving the weights past the ranges
    the graph's observers held from the first fit; QAT then clipped them (int8 0.28 off fp32, 0.07 with a new
    callback). A further fit of one epoch was refused ('QAT would never start')."""
    seed_everything(0)
    callback, model = QuantizationAwareTraining("net", start_epoch=1), MLPClassifier(hidden=(16,))
    first = _RecordsQATForward("net")
    make_trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[callback, first]).fit(
        model, datamodule=DigitsDataModule())
    assert first.through_qat == [False] * 3 + [True] * 3
    graph = callback.qat
    again = _RecordsQATForward("net")
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=3, callbacks=[callback, again]).fit(
        model, datamodule=DigitsDataModule())
    assert again.through_qat == [True] * 3 and callback.qat is graph and callback.result is not None


def test_a_further_fit_resumed_goes_on_through_qat_and_a_first_fit_resumed_waits_for_start_epoch(tmp_path):
    """The checkpoint says which: a further fit resumed with a new callback trained fp32 outside its graph until
    start_epoch, and the same callback resumed from its first fit's checkpoint before start_epoch traced its graph at
    once."""
    seed_everything(0)
    callback, model = QuantizationAwareTraining("net", start_epoch=2), MLPClassifier(hidden=(16,))
    first_fit = ModelCheckpoint(dirpath=tmp_path / "first", save_top_k=-1, every_n_epochs=1)
    make_trainer(tmp_path, max_epochs=3, limit_train_batches=2, enable_checkpointing=True,
                 callbacks=[callback, first_fit]).fit(model, datamodule=DigitsDataModule())
    further_fit = ModelCheckpoint(dirpath=tmp_path / "further", save_top_k=-1, every_n_epochs=1)
    make_trainer(tmp_path, max_epochs=3, limit_train_batches=2, enable_checkpointing=True,
                 callbacks=[callback, further_fit]).fit(model, datamodule=DigitsDataModule())
    resumed = _RecordsQATForward("net")
    make_trainer(tmp_path, max_epochs=3, limit_train_batches=2, callbacks=[
        QuantizationAwareTraining("net", start_epoch=2), resumed]).fit(
        model, datamodule=DigitsDataModule(), ckpt_path=tmp_path / "further" / "epoch=0-step=2.ckpt")
    assert resumed.through_qat == [True] * 4  # epochs 1 and 2, as the further fit trained them
    waits = _RecordsQATForward("net")
    make_trainer(tmp_path, max_epochs=3, limit_train_batches=2, callbacks=[callback, waits]).fit(
        model, datamodule=DigitsDataModule(), ckpt_path=tmp_path / "first" / "epoch=0-step=2.ckpt")
    assert waits.through_qat == [False] * 2 + [True] * 2
    # that resume ending before start_epoch: refused (it trained fp32, said no int8 model was built, and kept the
    # earlier fit's in `result`)
    with pytest.raises(ValueError, match=r"start_epoch=2\): the fit ends after 2 epoch\(s\), so QAT would never "):
        make_trainer(tmp_path, max_epochs=2, limit_train_batches=2, callbacks=[callback]).fit(
            model, datamodule=DigitsDataModule(), ckpt_path=tmp_path / "first" / "epoch=0-step=2.ckpt")
    # a resumed fit that would end before QAT is refused before Lightning loads the checkpoint's weights into it
    fresh = MLPClassifier(hidden=(16,))
    before = {name: value.clone() for name, value in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"start_epoch=3\): the fit ends after 3 epoch\(s\)"):
        make_trainer(tmp_path, max_epochs=3, callbacks=[QuantizationAwareTraining("net", start_epoch=3)]).fit(
            fresh, datamodule=DigitsDataModule(), ckpt_path=tmp_path / "first" / "epoch=0-step=2.ckpt")
    assert all(torch.equal(value, before[name]) for name, value in fresh.state_dict().items())
    # a fast_dev_run further fit converts nothing: no int8 model of an earlier fit is left as this one's
    make_trainer(tmp_path, fast_dev_run=True, callbacks=[callback]).fit(model, datamodule=DigitsDataModule())
    assert callback.result is None and callback.metric_value is None


# checkpoints at epoch ends: the fit resumes into epoch 2 (QAT observing), 3 (the freeze's) or 4 (frozen); one at
# the last batch of epoch 2 (step 12), after which Lightning skips the resumed epoch's on_train_epoch_start
@pytest.mark.parametrize("checkpoint", ["epoch=1-step=8", "epoch=2-step=12", "epoch=3-step=16", "step=12"])
def test_ranges_frozen_from_an_epoch_stay_frozen_across_a_resume_before_the_freeze(tmp_path, fit_frozen_at_epoch_3,
                                                                                   checkpoint):
    """Resumed from a checkpoint written before the freeze, the fit traces its graph only at its first step, so a
    freeze from `on_train_epoch_start` found no graph (`qat` None): unguarded, an AttributeError; guarded, the
    resumed fit observed on and built another int8 model. `freeze_ranges_epoch` freezes the graph when it is
    traced; the resumed fit ends as the uninterrupted one."""
    reference, uninterrupted, by_epoch = fit_frozen_at_epoch_3
    if checkpoint == "step=12":
        by_step = ModelCheckpoint(dirpath=tmp_path / "steps", save_top_k=-1, every_n_train_steps=4)
        _fit_freezing_at_epoch_3(tmp_path, [by_step, CrashAtStep(14)])
        path = tmp_path / "steps" / "epoch=2-step=12.ckpt"
    else:
        path = by_epoch / f"{checkpoint}.ckpt"
    resumed, callback, probe = _fit_freezing_at_epoch_3(tmp_path, ckpt_path=path)
    if checkpoint == "epoch=2-step=12":
        assert probe.graph_seen[0] is False  # why a hand-written freeze cannot do it
    assert callback.qat.ranges_frozen
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for key, value in uninterrupted.qat.fake_quant_state().items():
        assert torch.equal(callback.qat.fake_quant_state()[key], value), key
    x = torch.rand(8, 64)
    with torch.no_grad():
        assert torch.equal(callback.result.model(x), uninterrupted.result.model(x))


@pytest.mark.parametrize("resume_at_step", [4, 8])  # the end of epoch 0 (fp32) and of epoch 1 (QAT)
def test_a_fit_resumed_from_an_epochs_last_batch_trains_the_next_epoch_through_qat(tmp_path, resume_at_step):
    """Lightning skips `on_train_epoch_start` of the epoch a checkpoint saved at the previous epoch's last batch
    resumes into, where the QAT graph was installed: that epoch trained in fp32 and, resumed into the last epoch, the
    fit ended without an int8 model and with a warning that QAT never started."""
    data = DigitsDataModule(batch_size=32)

    def fit(callbacks, ckpt_path=None):
        seed_everything(0)
        model, callback = MLPClassifier(hidden=(16,), lr=1e-2), QuantizationAwareTraining("net", start_epoch=1)
        trainer = make_trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[callback, *callbacks])
        try:
            trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        except SimulatedCrash:
            pass
        return model, callback

    reference, uninterrupted = fit([])
    saved = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=4)  # 4 batches an epoch
    fit([saved, CrashAtStep(resume_at_step + 2)])
    epoch = resume_at_step // 4 - 1
    resumed, callback = fit([], ckpt_path=tmp_path / "ckpt" / f"epoch={epoch}-step={resume_at_step}.ckpt")
    assert callback.result is not None
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    x = torch.rand(8, 64)
    with torch.no_grad():
        assert torch.equal(callback.result.model(x), uninterrupted.result.model(x))


def test_the_lightning_modules_own_forward_and_layers_built_in_configure_model(tmp_path):
    seed_everything(0)
    model, callback = ConfiguredDigitsClassifier(hidden=16), QuantizationAwareTraining(start_epoch=1)
    make_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(model, datamodule=DigitsDataModule())
    assert "forward" not in model.__dict__ and callback.result is not None
    assert set(model.state_dict()) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}
    x = torch.rand(5, 64)
    with torch.no_grad():
        assert callback.result.model(x).shape == (5, 10)


def test_a_model_pruned_in_a_first_fit_keeps_its_zeros_through_qat(tmp_path):
    seed_everything(0)
    model, data = MLPClassifier(hidden=(32,), lr=1e-2), DigitsDataModule()
    pruning = ModelPruning("l1_unstructured", amount=0.6, make_pruning_permanent=True, verbose=0,
                           apply_pruning=lambda epoch: epoch == 0)
    make_trainer(tmp_path, max_epochs=1, callbacks=[pruning]).fit(model, datamodule=data)
    zeros = {n: p == 0 for n, p in model.named_parameters()}  # the biases too: ModelPruning's default targets
    weights = [z for n, z in zeros.items() if n.endswith("weight")]
    assert sum(int(z.sum()) for z in weights) == round(0.6 * sum(z.numel() for z in weights))
    assert all(int(z.sum()) > 0 for n, z in zeros.items() if n.endswith("bias"))
    # the README's recipe: an fp32 epoch first (its steps grew the zeros back before the QAT graph took its masks)
    callback = QuantizationAwareTraining("net", start_epoch=1)
    make_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(model, datamodule=data)
    assert callback.result.held_sparse == ("0.weight", "0.bias", "2.weight", "2.bias")  # (the biases grew back)
    for name, parameter in model.named_parameters():
        if name in zeros:
            assert torch.equal(parameter == 0, zeros[name]), name


@pytest.mark.parametrize("make_callbacks, error, message", [
    (lambda: [QuantizationAwareTraining("body")], ValueError,
     r"submodule='body'\): MLPClassifier has no such module; its modules are \['net'\]"),
    (lambda: [QuantizationAwareTraining("net", start_epoch=2)], ValueError,
     r"the fit ends after 2 epoch\(s\), so QAT would never start"),
    (lambda: [QuantizationAwareTraining("net"), ModelPruning("l1_unstructured", amount=0.5)], ValueError,
     r"\['ModelPruning'\] prune\(s\) in the same fit.*make_pruning_permanent=True"),
    # these failed after training: at the first QAT step (an epoch in, with start_epoch=1), or at conversion
    (lambda: [QuantizationAwareTraining("net", start_epoch=1, config=QATConfig(fp32_layers=("classifier",)))],
     ValueError, r"\['classifier'\] name no layer of Sequential"),
    (lambda: [QuantizationAwareTraining("net")], ValueError, r"precision='bf16-mixed'; QAT trains a float32 graph.*"
                                                             r"this precision breaks \(autocast computes"),
    # (said to be "mixed or half precision", which float64 is not)
    (lambda: [QuantizationAwareTraining("net")], ValueError, r"precision='64-true'; QAT trains a float32 graph.*"
                                                             r"this precision breaks \(the graph would be cast"),
    # a KeyError naming the metric, as if the step did not log it, after all the training
    (lambda: [QuantizationAwareTraining("net", metric="val_acc")], ValueError,
     r"evaluates the int8 model on the fit's validation data at fit end, which limit_val_batches=0 leaves out"),
    # nested: the inner callback's forward was traced into the outer graph, which failed at the first QAT step with
    # an export error blaming the model's control flow
    (lambda: [QuantizationAwareTraining(), QuantizationAwareTraining("net", start_epoch=1)], ValueError,
     r"two callbacks quantize None and 'net', one inside the other"),
    (lambda: [QuantizationAwareTraining("net.0", start_epoch=1), QuantizationAwareTraining("net")], ValueError,
     r"two callbacks quantize 'net.0' and 'net', one inside the other"),
])
def test_a_fit_that_cannot_work_stops_before_training(tmp_path, make_callbacks, error, message):
    model = MLPClassifier(hidden=(16,))
    weights = model.net[0].weight.detach().clone()
    precision = re.search(r"precision='([\w-]+)'", message)[1] if "precision=" in message else "32-true"
    limits = dict(limit_val_batches=0) if "limit_val_batches" in message else {}
    with pytest.raises(error, match=message):
        make_trainer(tmp_path, max_epochs=2, callbacks=make_callbacks(), precision=precision, **limits).fit(
            model, datamodule=DigitsDataModule())
    assert torch.equal(model.net[0].weight, weights) and "forward" not in model.net.__dict__


@pytest.mark.parametrize("kwargs, message", [
    (dict(submodule=""), "give the attribute name"),
    (dict(start_epoch=-1), "an int >= 0"),
    (dict(start_epoch=True), "an int >= 0"),
    (dict(config={"reduce_range": True}), "expected a litcompress.quantization.qat.QATConfig"),
    (dict(metric=""), "name a metric the validation step logs"),
    (dict(freeze_ranges_epoch=0), "an int > start_epoch=0"),  # the ranges of no QAT batch but the first
    (dict(start_epoch=2, freeze_ranges_epoch=2), "an int > start_epoch=2"),
    (dict(freeze_ranges_epoch=True), "an int > start_epoch"),
    (dict(freeze_ranges_epoch="3"), "an int > start_epoch"),
    (dict(compile="yes"), "use True or False"),
    # these were found only after the whole fit, when the file was written
    (dict(save_path=123), "give the path of the file to write"),
    (dict(save_path=""), "not a folder"),
    (dict(save_path="."), "not a folder"),
    (dict(save_path="models/"), "not a folder"),
    (dict(save_path=f"{__file__}/model.pt2"), r"test_qat.py is a file, not a folder"),  # mkdir's words at setup
])
def test_constructor_refuses_bad_arguments(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        QuantizationAwareTraining(**kwargs)


def test_a_save_path_in_a_folder_that_cannot_be_written_is_refused_at_setup(tmp_path, unwritable_folder):
    """It failed after the whole fit, in torch's words naming no file."""
    save_path = unwritable_folder / "model.pt2"
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2,
                           callbacks=[QuantizationAwareTraining("net", save_path=save_path)])
    said = f"QuantizationAwareTraining(save_path='{save_path}'): cannot write "
    with pytest.raises(ValueError, match=re.escape(said)):
        trainer.fit(MLPClassifier(hidden=(16,)), datamodule=DigitsDataModule())
    assert trainer.global_step == 0


def test_a_numpy_start_epoch_is_taken_as_the_int_it_is():
    import numpy as np

    callback = QuantizationAwareTraining(start_epoch=np.int64(1))  # (refused: "give the first QAT epoch, an int")
    assert callback.start_epoch == 1 and type(callback.start_epoch) is int


def test_a_crash_mid_qat_leaves_the_model_and_its_checkpoint_usable(tmp_path):
    seed_everything(0)
    model = MLPClassifier(hidden=(16,))
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(tmp_path, max_epochs=3, enable_checkpointing=True,
                           callbacks=[QuantizationAwareTraining("net", config=QATConfig(reduce_range=True)),
                                      checkpoints, CrashAtStep(6)])
    with pytest.raises(SimulatedCrash):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert "forward" not in model.net.__dict__
    MLPClassifier(hidden=(16,)).load_state_dict(torch.load(checkpoints.last_model_path, weights_only=False)[
        "state_dict"])


def test_fast_dev_run_trains_through_the_rounding_but_converts_nothing(tmp_path, caplog):
    callback = QuantizationAwareTraining("net", save_path=tmp_path / "int8" / "model.pt2")
    with caplog.at_level(logging.INFO, logger="litcompress"):
        Trainer(fast_dev_run=True, callbacks=[callback], logger=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path).fit(MLPClassifier(hidden=(8,)),
                                                                           datamodule=DigitsDataModule())
    assert callback.qat is not None and callback.result is None
    assert "conversion skipped under fast_dev_run" in caplog.text
    assert not (tmp_path / "int8").exists()  # no file, and no folder for it (it was made empty)


@pytest.mark.parametrize("start_epoch", [0, 2])
def test_a_model_still_pruned_with_masks_is_refused_before_training(tmp_path, start_epoch):
    """With fp32 epochs first, it was refused only when QAT started, after them."""
    from torch.nn.utils import prune

    model = MLPClassifier(hidden=(16,))
    prune.l1_unstructured(model.net[0], "weight", amount=0.5)  # masks loaded or applied before this fit
    steps = []
    with pytest.raises(ValueError, match=r"QuantizationAwareTraining: \['0'\] compute their weights from pruning "
                                         r"masks.*make_permanent_"):
        make_trainer(tmp_path, max_epochs=3, callbacks=[QuantizationAwareTraining("net", start_epoch=start_epoch),
                                                        LambdaCounter(steps)]).fit(
            model, datamodule=DigitsDataModule())
    assert "forward" not in model.net.__dict__ and steps == []


@pytest.mark.parametrize(
    ("strategy", "save_path", "message"),
    [
        ("model_parallel", None, r"runs on one device or under DDP.*ModelParallelStrategy shards or wraps"),
        ("ddp_spawn", None, r"worker processes.*Give save_path"),
        ("ddp_spawn", "int8.pt2", None),  # the workers' rank 0 writes it
        ("ddp", None, None),  # every process holds the int8 model
    ],
)
def test_multi_process_strategies_are_checked_at_setup(tmp_path, strategy, save_path, message):
    # The hook is called on the Trainer as built: a fit would launch the processes (the DDP runs are in
    # tests/callbacks/test_pruning_ddp.py).
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = Trainer(accelerator="cpu", devices=2, logger=False,
                      strategy=ModelParallelStrategy() if strategy == "model_parallel" else strategy)
    callback = QuantizationAwareTraining("net", save_path=save_path and tmp_path / save_path)
    if message is None:
        callback.setup(trainer, MLPClassifier(hidden=(8,)), "fit")
    else:
        with pytest.raises(ValueError, match=message):
            callback.setup(trainer, MLPClassifier(hidden=(8,)), "fit")


def test_a_module_left_in_eval_mode_while_training_is_said(tmp_path):
    model = MLPClassifier(hidden=(8,))
    model.net.eval()  # e.g. a model evaluated before this fit: Lightning keeps the submodule's mode
    callback = QuantizationAwareTraining("net")
    with pytest.warns(UserWarning, match=r"Sequential is in eval mode while training.*Call \.train\(\) on it"):
        make_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(model, datamodule=DigitsDataModule())
    assert not callback.qat.training  # trained as the user left it, and said


class BatchNormMLP(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(hidden=(16,))
        self.net = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def test_a_last_training_batch_of_one_row_stops_the_fit_with_the_statistics_intact(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    seed_everything(0)
    model = BatchNormMLP()
    x, y = torch.randn(9, 64), torch.randint(0, 10, (9,))
    train = DataLoader(TensorDataset(x, y), batch_size=4)  # 4, 4, then 1
    with pytest.raises(ValueError, match=r"batch norm \['1'\] saw one value per channel"):
        make_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[QuantizationAwareTraining("net")]).fit(
            model, train_dataloaders=train)
    assert torch.isfinite(model.net[1].running_var).all() and int(model.net[1].num_batches_tracked) == 2
    assert "forward" not in model.net.__dict__  # the model is left as it was built


def test_a_callback_used_for_a_second_fit_of_another_module_quantizes_that_one(tmp_path):
    """Its QAT graph was the first module's: the second module's forward ran it, so that module never trained, and
    `result` and `metric_value` were the first model's. A save_path in a folder not there yet is made at setup (it
    failed after the fit)."""
    callback = QuantizationAwareTraining("net", metric="val_acc", save_path=tmp_path / "new" / "int8.pt2")
    data = DigitsDataModule()
    seed_everything(0)
    first = MLPClassifier(hidden=(16,))
    make_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(first, datamodule=data)
    seed_everything(1)
    second = MLPClassifier(hidden=(16,))
    before = second.net[0].weight.detach().clone()
    # all of the validation data: the int8 model is judged on what the fit validates on
    make_trainer(tmp_path, max_epochs=1, callbacks=[callback], limit_val_batches=1.0).fit(second, datamodule=data)
    assert not torch.equal(second.net[0].weight, before)  # it trained
    assert callback.qat.model is second.net
    loaded, _ = load_quantized(tmp_path / "new" / "int8.pt2")
    assert callback.metric_value == pytest.approx(_accuracy(loaded, data), abs=1e-9)
    assert _accuracy(callback.result.model, data) == pytest.approx(callback.metric_value, abs=1e-9)


class _StopsAfterTheFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


@pytest.mark.parametrize("first_pruned", [True, False], ids=["pruned-then-dense", "dense-then-pruned"])
def test_a_fit_that_ended_before_qat_leaves_no_zeros_to_the_next_fit_of_another_module(tmp_path, first_pruned):
    """keep_sparsity's zeros were taken when the first fit started and kept when it ended before its QAT graph: the
    next fit's module got the first one's zeros (a dense model lost half its weights), or kept a stale empty set
    (a pruned model's zeros grew back)."""
    callback = QuantizationAwareTraining("net", start_epoch=1)
    seed_everything(0)
    first = _pruned_mlp() if first_pruned else MLPClassifier(hidden=(24,), lr=1e-2)
    with pytest.warns(UserWarning, match="the fit ended before QAT started"):
        make_trainer(tmp_path, max_epochs=2, callbacks=[callback, _StopsAfterTheFirstEpoch()]).fit(
            first, datamodule=DigitsDataModule())
    seed_everything(1)
    second = MLPClassifier(hidden=(24,), lr=1e-2) if first_pruned else _pruned_mlp()
    zeros = {name: p.detach() == 0 for name, p in second.named_parameters()}
    make_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[callback]).fit(
        second, datamodule=DigitsDataModule())
    assert callback.result is not None
    for name, p in second.named_parameters():
        if first_pruned:  # trained dense: no zero forced on it
            assert int((p == 0).sum()) == 0, name
        elif zeros[name].float().mean() >= 0.01:  # its own zeros held (the tensors keep_sparsity holds)
            assert bool((p.detach()[zeros[name]] == 0).all()), name


def test_a_batch_norm_frozen_inside_the_quantized_module_is_said_and_left_frozen_after_the_fit(tmp_path):
    """The QAT graph switches between training and evaluation form as a whole: a batch norm the user keeps in eval
    mode inside a training module trains with it, which is said; after the fit each module is as the fit left it."""
    model = BatchNormMLP()
    model.net[1].eval()  # frozen, as fine-tuning recipes do, though Lightning sets the module to train before fit
    callback = QuantizationAwareTraining("net")

    class Freeze(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            pl_module.net[1].eval()

    # (fast_dev_run: the trace is what is checked; converting a batch norm's graph takes torchao ~20 s)
    with pytest.warns(UserWarning, match=r"1 in eval mode inside Sequential, which trains: .* as a whole"):
        make_trainer(tmp_path, fast_dev_run=True, callbacks=[Freeze(), callback]).fit(
            model, datamodule=DigitsDataModule())
    assert not model.net[1].training and model.net[0].training  # tracing did not unfreeze it



class ReadsX(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: dict) -> torch.Tensor:
        return self.inner(batch["x"])


class TakesTheBatch(MLPClassifier):
    """Its `net` is called with a dict."""

    def __init__(self) -> None:
        super().__init__(hidden=(8,))
        self.net = ReadsX(self.net)

    def forward(self, x):
        return self.net({"x": x})


def test_a_module_called_with_a_container_is_told_what_qat_takes(tmp_path):
    with pytest.raises(TypeError, match=r"QuantizationAwareTraining: ReadsX was called with \(dict\); the QAT graph "
                                        r"is traced on positional tensors"):
        make_trainer(tmp_path, max_epochs=1, callbacks=[QuantizationAwareTraining("net")]).fit(
            TakesTheBatch(), datamodule=DigitsDataModule())


def _pruned_mlp() -> MLPClassifier:
    from torch.nn.utils import prune

    from litcompress import make_permanent_

    model = MLPClassifier(hidden=(24,), lr=1e-2)
    for layer in (model.net[0], model.net[2]):
        prune.l1_unstructured(layer, "weight", amount=0.6)
    make_permanent_(model)
    return model


class HeldZerosSeen(Callback):
    """Records, at every validation and checkpoint, how many of the zeros the fit started with are non-zero."""

    def __init__(self) -> None:
        self.zeros: dict[str, torch.Tensor] | None = None
        self.regrown: list[int] = []

    def on_fit_start(self, trainer, pl_module):
        self.zeros = self.zeros or {n: p == 0 for n, p in pl_module.named_parameters() if p.dim() == 2}

    def _count(self, state):
        return sum(int((state[n][z] != 0).sum()) for n, z in self.zeros.items())

    def on_validation_start(self, trainer, pl_module):
        self.regrown.append(self._count(dict(pl_module.named_parameters())))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.regrown.append(self._count(checkpoint["state_dict"]))


@pytest.mark.parametrize("start_epoch", [0, 1], ids=["killed-in-qat", "killed-in-the-fp32-epoch"])
def test_held_zeros_stay_zero_in_validation_checkpoints_and_a_resumed_fit(tmp_path, start_epoch):
    """They were reset only before a training forward: each optimizer step grew them back in what validation ran and
    checkpoints held, and a fit resumed from such a checkpoint held far fewer zeros (its masks recomputed from the
    regrown weights), converting to another, denser int8 model. Epochs before `start_epoch` hold them too."""
    spies, callbacks = [], []

    def make_callbacks():
        spies.append(HeldZerosSeen())
        callbacks.append(QuantizationAwareTraining("net", start_epoch=start_epoch))
        return [callbacks[-1], spies[-1]]

    reference, state, resumed = fit_killed_and_resumed(tmp_path, _pruned_mlp, make_callbacks, DigitsDataModule,
                                                       crash_step=25)
    zeros = spies[0].zeros
    assert spies[0].regrown and not any(spies[0].regrown) and not any(spies[1].regrown)
    assert all(int((state[n][z] != 0).sum()) == 0 for n, z in zeros.items())  # the crash left them held
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert callbacks[2].result.held_sparse == callbacks[0].result.held_sparse == ("0.weight", "2.weight")
    x = torch.rand(8, 64)
    with torch.no_grad():
        assert torch.equal(callbacks[2].result.model(x), callbacks[0].result.model(x))


def test_an_all_zero_weight_is_an_initialisation_and_trains():
    from litcompress.quantization.qat import prepare_qat

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    nn.init.zeros_(model[2].weight)  # a zero-initialised head, as some fine-tuning recipes start
    qat = prepare_qat(model, (torch.rand(4, 64),))
    assert qat.held_sparse == ()
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(qat(torch.rand(16, 64)), torch.randint(0, 10, (16,))).backward()
        optimizer.step()
    assert qat.model[2].weight.abs().sum() > 0  # prepare_qat trains a copy (copy=True)


@pytest.mark.parametrize("metric", ["val_accuracy", "train_loss"])
def test_a_metric_the_validation_step_does_not_log_stops_the_fit_at_its_first_validation(tmp_path, metric):
    """A metric training_step logs (train_loss) passed the check, which read every metric of the fit: the fit then
    failed at its end, after all its training; a misspelt one's message listed train_loss as the validation's."""
    callback = QuantizationAwareTraining("net", metric=metric)
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[callback], log_every_n_steps=1)
    with pytest.raises(KeyError, match=rf"'{metric}' was not logged by MLPClassifier.validation_step; logged: "
                                       r"\['val_acc', 'val_loss'\]"):
        trainer.fit(MLPClassifier(hidden=(8,)), datamodule=DigitsDataModule())
    assert trainer.current_epoch == 0  # not after all three epochs


class _LogsAtEvenEpochs(MLPClassifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.current_epoch % 2 == 0:
            self.log("val_loss", loss)


class _LogsPerStepOnly(MLPClassifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), on_step=True, on_epoch=False)


class _LogsATorchMetric(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(hidden=(8,))
        import torchmetrics

        self.accuracy = torchmetrics.Accuracy("multiclass", num_classes=10)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.accuracy(self(x), y)
        self.log("val_acc", self.accuracy)


def test_the_metric_check_is_made_once_and_says_why_nothing_reached_the_validations_metrics(tmp_path):
    """Checked at every validation: a metric logged at some validations only (the fit-end evaluation logs it) was
    refused at epoch 1; one logged with on_epoch=False was said "not logged, nor was anything else: did it run on no
    batch?", where a batch had run."""
    callback = QuantizationAwareTraining("net", metric="val_loss")
    make_trainer(tmp_path, max_epochs=3, callbacks=[callback]).fit(_LogsAtEvenEpochs(hidden=(8,)),
                                                                   datamodule=DigitsDataModule())
    assert callback.metric_value is not None
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[QuantizationAwareTraining("net", metric="val_loss")])
    with pytest.raises(KeyError, match=r"nothing _LogsPerStepOnly\.validation_step logged reached the validation's "
                                       r"metrics: a value logged with on_epoch=False does not"):
        trainer.fit(_LogsPerStepOnly(hidden=(8,)), datamodule=DigitsDataModule())
    assert trainer.current_epoch == 0


def test_a_torchmetrics_metric_scores_the_int8_model(tmp_path):
    """The evaluation's copy kept Lightning's cache of the metric's attribute by the original's id(): the fit failed
    at its end, after all its training, "Could not find the LightningModule attribute for the torchmetrics.Metric"."""
    callback = QuantizationAwareTraining("net", metric="val_acc")
    make_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(_LogsATorchMetric(), datamodule=DigitsDataModule())
    assert 0.0 <= callback.metric_value <= 1.0


class _StopsAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        raise RuntimeError("stopped before the first training step")


def test_a_misspelt_metric_is_said_after_the_sanity_check_when_no_validation_comes_before_fit_end(tmp_path):
    """Validating every 5 epochs in a 2-epoch fit, the misspelt name was met only after all the training."""
    callback = QuantizationAwareTraining("net", metric="val_accuracy")
    trainer = make_trainer(tmp_path, max_epochs=2, check_val_every_n_epoch=5,
                           callbacks=[callback, _StopsAtTrainStart()])
    with pytest.warns(UserWarning, match=r"QuantizationAwareTraining\(metric='val_accuracy'\) reads it when fit ends, "
                      r"but the sanity-check batches did not log it: 'val_accuracy' was not logged"), \
            pytest.raises(RuntimeError, match="stopped before the first training step"):
        trainer.fit(MLPClassifier(hidden=(8,)), datamodule=DigitsDataModule())


def test_a_float64_model_is_refused_when_fitting_starts_not_after_the_fp32_epochs(tmp_path):
    model = MLPClassifier(hidden=(8,))
    model.net.double()
    callback = QuantizationAwareTraining("net", start_epoch=1)
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[callback])
    with pytest.raises(TypeError, match=r"QuantizationAwareTraining: the model's trainable parameters are "
                                        r"torch.float64; QAT trains a float32 graph"):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert trainer.global_step == 0


@pytest.mark.parametrize("compiled, submodule, message", [
    ("module", None, r"this fit is of torch.compile\(MLPClassifier\), whose compiled training step cannot run"),
    ("module", "net", r"this fit is of torch.compile\(MLPClassifier\)"),
    ("net", "net", r"'net' is torch.compile'd; QAT exports the eager forward .* Fit with the eager module"),
    ("net", None, r"'net' is torch.compile'd"),
])
def test_a_compiled_fit_or_module_is_refused_before_training_and_left_as_given(tmp_path, compiled, submodule, message):
    """The whole module compiled: dynamo's assertion at the first QAT step; a compiled `net`: torch.export's error
    on the OptimizedModule, whose own forward QAT then deleted (the module unusable after the fit)."""
    model = MLPClassifier(hidden=(8,))
    if compiled == "net":
        model.net = torch.compile(model.net, backend="eager")
    x = torch.randn(4, 64)
    expected = model(x)
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[QuantizationAwareTraining(submodule, start_epoch=0)])
    with pytest.raises(ValueError, match=message):
        trainer.fit(torch.compile(model, backend="eager") if compiled == "module" else model,
                    datamodule=DigitsDataModule())
    assert trainer.global_step == 0
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # its forward (and the compiled net's) still run


def test_compile_without_a_cpp_compiler_is_refused_at_setup(tmp_path):
    import torch._inductor.config as inductor_config

    steps = []
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}), \
            pytest.raises(ValueError, match=r"compile=True\): torch.compile's inductor needs a working C\+\+ compiler"):
        make_trainer(tmp_path, max_epochs=1, callbacks=[
            QuantizationAwareTraining("net", compile=True, save_path=tmp_path / "int8.pt2"),
            LambdaCounter(steps)]).fit(MLPClassifier(hidden=(8,)), datamodule=DigitsDataModule())
    assert steps == []


class LambdaCounter(Callback):
    def __init__(self, steps: list) -> None:
        self.steps = steps

    def on_train_batch_end(self, *args):
        self.steps.append(1)


def test_fast_dev_run_before_the_qat_epoch_is_a_quick_check_not_an_error(tmp_path, caplog):
    callback = QuantizationAwareTraining("net", start_epoch=1)
    with caplog.at_level(logging.INFO, logger="litcompress"):
        Trainer(fast_dev_run=True, max_epochs=2, callbacks=[callback], logger=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path).fit(MLPClassifier(hidden=(8,)),
                                                                           datamodule=DigitsDataModule())
    assert callback.qat is None and "QAT starts at epoch 1, which fast_dev_run does not reach" in caplog.text


def test_a_max_steps_that_ends_before_the_qat_epoch_is_refused_before_training(tmp_path):
    steps = []
    with pytest.raises(ValueError, match=r"start_epoch=1\): the fit stops at max_steps=10, 17 optimizer step\(s\)"):
        make_trainer(tmp_path, max_epochs=3, max_steps=10, limit_train_batches=None, callbacks=[
            QuantizationAwareTraining("net", start_epoch=1), LambdaCounter(steps)]).fit(
                MLPClassifier(hidden=(8,)), datamodule=DigitsDataModule())
    assert steps == []


def test_a_gradient_accumulation_schedule_sizes_the_epochs_before_qat(tmp_path):
    """Its factor is set as each epoch starts: the check read 1 and refused a fit that reaches QAT (4 batches an
    epoch, 2 optimizer steps each at factor 2: epoch 1 starts at step 2 of max_steps=3)."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    callback = QuantizationAwareTraining("net", start_epoch=1)
    make_trainer(tmp_path, max_epochs=3, max_steps=3, callbacks=[
        callback, GradientAccumulationScheduler({0: 2})]).fit(MLPClassifier(hidden=(8,)), datamodule=DigitsDataModule())
    assert callback.result is not None
    with pytest.raises(ValueError, match=r"the fit stops at max_steps=2, 2 optimizer step\(s\) per epoch"):
        make_trainer(tmp_path, max_epochs=3, max_steps=2, callbacks=[
            QuantizationAwareTraining("net", start_epoch=1), GradientAccumulationScheduler({0: 2})]).fit(
                MLPClassifier(hidden=(8,)), datamodule=DigitsDataModule())


class StepsEverySecondBatch(MLPClassifier):
    """Manual optimization that accumulates two batches per optimizer step."""

    def __init__(self) -> None:
        super().__init__(hidden=(8,))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        if batch_idx % 2:
            optimizer.step()
            optimizer.zero_grad()


def test_a_manually_optimized_fit_is_not_sized_by_its_batches_before_qat(tmp_path):
    """A batch made one optimizer step in the check: a fit of 2 steps per epoch (4 batches, each second one
    stepping) was refused at max_steps=3, though epoch 1 starts at step 2 and trains with QAT."""
    callback = QuantizationAwareTraining("net", start_epoch=1)
    trainer = make_trainer(tmp_path, max_epochs=3, max_steps=3, callbacks=[callback])
    trainer.fit(StepsEverySecondBatch(), datamodule=DigitsDataModule())
    assert trainer.global_step == 3 and callback.result is not None


def test_a_fit_resumed_from_its_final_checkpoint_says_so(tmp_path):
    """An auto-resuming job run again after its fit ended: the warning said QAT never started."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(ckpt_path=None, max_steps=-1):
        callback = QuantizationAwareTraining("net", start_epoch=1)
        make_trainer(tmp_path, max_epochs=2, max_steps=max_steps, enable_checkpointing=True, callbacks=[
            callback, ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(
                MLPClassifier(hidden=(8,)), datamodule=DigitsDataModule(), ckpt_path=ckpt_path)
        return callback

    assert fit().result is not None
    with pytest.warns(UserWarning, match=r"resumed from a checkpoint written at its end \(epoch 2 of max_epochs=2\)"
                                         r".*Raise max_epochs"):
        assert fit(tmp_path / "last.ckpt").result is None
    (tmp_path / "last.ckpt").unlink()
    assert fit(max_steps=6).result is not None  # 4 batches an epoch: max_steps ends the fit in epoch 1
    with pytest.warns(UserWarning, match=r"written at its end \(step 6 of max_steps=6\).*Raise max_steps"):
        assert fit(tmp_path / "last.ckpt", max_steps=6).result is None


def test_a_training_step_that_bypasses_the_quantized_forward_is_stopped_at_its_first_batch(tmp_path):
    """`training_step` calls `self.net(x)`, so with submodule=None the QAT graph was first built at validation, from
    one batch without training, and converted as if trained, with a warning about eval mode."""
    from tests.conftest import SubmoduleStepsClassifier

    steps = []
    with pytest.raises(ValueError, match=r"did not call the LightningModule's own forward \(submodule=None\).*"
                                         r"modules of SubmoduleStepsClassifier: \['net'\]"):
        make_trainer(tmp_path, max_epochs=1, callbacks=[QuantizationAwareTraining(), LambdaCounter(steps)]).fit(
            SubmoduleStepsClassifier(), datamodule=DigitsDataModule())
    assert len(steps) == 0  # the first batch's end: QAT's check runs before the counter's


class TwoParts(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(hidden=(16,))
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.net = nn.Linear(32, 10)

    def forward(self, x):
        return self.net(self.encoder(x))


def test_two_callbacks_quantize_two_submodules_in_one_fit_and_resume_each_its_own(tmp_path):
    first, second = QuantizationAwareTraining("encoder"), QuantizationAwareTraining("net")
    assert first.state_key != second.state_key  # Lightning refused two stateful callbacks under one key
    trainer = make_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[first, second])
    trainer.fit(TwoParts(), datamodule=DigitsDataModule())
    assert first.result is not None and second.result is not None
    saved = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert first.state_key in saved["callbacks"] and second.state_key in saved["callbacks"]


def test_a_metric_without_validation_data_is_refused_at_setup(tmp_path):
    """It failed after the whole fit, in Lightning's words, when the int8 model was to be evaluated."""
    data = DigitsDataModule()
    data.setup()
    loader = torch.utils.data.DataLoader(data.splits.train, batch_size=64)
    with pytest.raises(ValueError, match=r"metric='val_acc'\) evaluates the int8 model on the validation data"):
        make_trainer(tmp_path, max_epochs=1, callbacks=[QuantizationAwareTraining("net", metric="val_acc")]).fit(
            MLPClassifier(hidden=(16,)), loader)


class Nested(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(hidden=(16,))
        self.net = nn.ModuleDict({"body": self.net})

    def forward(self, x):
        return self.net["body"](x)


def test_the_metric_of_a_dotted_submodule_in_a_fit_whose_validation_never_ran_on_its_limit(tmp_path):
    """Three ways the int8 evaluation at fit end failed or measured otherwise than the fit: a dotted submodule (an
    AttributeError after the file was written), validation loaders given to fit but never run
    (check_val_every_n_epoch beyond the fit: Lightning's 'val_dataloader must be implemented'), and the fit's
    limit_val_batches, which the evaluation ignored."""
    data = DigitsDataModule(batch_size=64)
    data.setup()
    train = torch.utils.data.DataLoader(data.splits.train, batch_size=64)
    val = torch.utils.data.DataLoader(data.splits.val, batch_size=64)

    class CountsValidationBatches(Nested):
        def validation_step(self, batch, batch_idx):
            self.batches_seen = getattr(self, "batches_seen", 0) + 1
            super().validation_step(batch, batch_idx)

    callback = QuantizationAwareTraining("net.body", metric="val_acc", save_path=tmp_path / "int8.pt2")
    model = CountsValidationBatches()
    make_trainer(tmp_path, max_epochs=1, callbacks=[callback], check_val_every_n_epoch=5, limit_val_batches=2,
                 num_sanity_val_steps=0).fit(model, train, val)
    assert getattr(model, "batches_seen", 0) == 0 and 0 < callback.metric_value <= 1
    x, y = data.splits.val.tensors[0][:128], data.splits.val.tensors[1][:128]  # the first 2 batches of 64
    with torch.no_grad():
        expected = float((callback.result.model(x).argmax(1) == y).float().mean())
    assert callback.metric_value == pytest.approx(expected, abs=1e-6)


class SkipsItsFirstBatch(MLPClassifier):
    def training_step(self, batch, batch_idx):
        if batch_idx == 0:  # a batch filtered out: Lightning skips it
            return None
        return super().training_step(batch, batch_idx)


def test_a_first_qat_batch_that_the_step_skips_is_not_taken_for_a_forward_never_called(tmp_path):
    """The step returned None for the first QAT batch (the model not called): the fit failed, saying the step
    computed its outputs another way and to pass the submodule it had passed."""
    seed_everything(0)
    callback = QuantizationAwareTraining("net")
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=3, callbacks=[callback]).fit(
        SkipsItsFirstBatch(hidden=(16,)), datamodule=DigitsDataModule())
    assert callback.result is not None


class ValidatesItsNetDirectly(MLPClassifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())


def test_a_validation_that_bypasses_the_quantized_forward_is_refused_at_its_first_qat_validation(tmp_path):
    """Its val_acc was the fp32 model's all through QAT (the README says validation measures the fake-quantized
    model), and the fit failed only at its end, in the tuner's words."""
    seed_everything(0)
    trainer = make_trainer(tmp_path, max_epochs=3, limit_train_batches=2,
                           callbacks=[QuantizationAwareTraining(metric="val_acc")])
    with pytest.raises(ValueError, match=r"validation_step did not call the LightningModule's own forward \(self\(x\)\)"
                                         r", which QAT replaced"):
        trainer.fit(ValidatesItsNetDirectly(hidden=(16,)), datamodule=DigitsDataModule())
    assert trainer.current_epoch == 0
    seed_everything(0)  # the steps calling the module QAT replaced: validated through it
    callback = QuantizationAwareTraining("net", metric="val_acc")
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[callback]).fit(
        ValidatesItsNetDirectly(hidden=(16,)), datamodule=DigitsDataModule())
    assert callback.metric_value is not None


def test_validating_from_a_checkpoint_after_the_fit_keeps_the_fits_qat_graph(tmp_path):
    """validate(ckpt_path=...) restored the callback's state as for a resumed fit, which dropped `qat` (the trained
    graph) to None; it loads the weights only."""
    seed_everything(0)
    callback, data = QuantizationAwareTraining("net"), DigitsDataModule()
    trainer = make_trainer(tmp_path, max_epochs=1, enable_checkpointing=True,
                           callbacks=[callback, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    model = MLPClassifier(hidden=(16,))
    trainer.fit(model, datamodule=data)
    graph = callback.qat
    assert graph is not None
    trainer.validate(model, datamodule=data, ckpt_path="last")
    assert callback.qat is graph and callback.result is not None


def test_a_state_loaded_after_validating_a_checkpoint_without_one_is_taken(tmp_path):
    """Lightning calls load_state_dict only when the checkpoint holds the callback's key: the flag an evaluation's
    checkpoint set stayed, and swallowed the next load_state_dict."""
    seed_everything(0)
    trainer = make_trainer(tmp_path, max_epochs=1, enable_checkpointing=True,
                           callbacks=[ModelCheckpoint(dirpath=tmp_path / "plain", save_last=True)])
    model, data = MLPClassifier(hidden=(16,)), DigitsDataModule()
    trainer.fit(model, datamodule=data)  # no QAT: its checkpoint holds no such state
    callback = QuantizationAwareTraining("net")
    make_trainer(tmp_path, callbacks=[callback]).validate(model, datamodule=data,
                                                           ckpt_path=tmp_path / "plain" / "last.ckpt")
    state = {"start_epoch": 0, "fake_quant": {"x": torch.ones(1)}, "held_masks": None, "early_masks": None}
    callback.load_state_dict(state)
    assert callback.state_dict()["fake_quant"] == {"x": torch.ones(1)}
