"""Lightning adapter with the real Trainer: candidates judged by the module's own validation metric."""

import copy
import logging
import os
import re
import signal
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from litcompress.pipeline import CompressionConfig
from litcompress.pipeline.lightning import compress_lightning
from litcompress.quantization import PTQConfig, load_quantized
from litcompress.quantization.lightning import QuantizeOnFitEnd, lightning_eval_fn, quantize_checkpoint, quantize_lightning
from conftest import make_sensitive_mlp
from tests.conftest import python_handles_ctrl_c


class DigitsModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        logits = self(x)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), on_epoch=True)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class DigitsData(L.LightningDataModule):
    def __init__(self, digits) -> None:
        super().__init__()
        self.digits = digits

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.digits[0], self.digits[1]), batch_size=64, shuffle=False)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.digits[2], self.digits[3]), batch_size=200)


def _trainer(max_epochs=4, **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, **kwargs)


@pytest.fixture(scope="module")
def fitted(digits):
    torch.manual_seed(0)
    module, data = DigitsModule(), DigitsData(digits)
    _trainer().fit(module, datamodule=data)
    return module, data


CONFIG = PTQConfig(approach="dynamic", backends=("torch_ao", "onnxruntime"), max_trials=4, latency_repeats=3)


def test_quantize_lightning_judges_by_validation_metric(fitted):
    module, data = fitted
    before = {k: v.clone() for k, v in module.state_dict().items()}
    result = quantize_lightning(module, CONFIG, metric="val_acc", datamodule=data)
    assert result.goal_met and result.recipe is not None
    # The reported metric is what trainer.validate logs for the chosen model.
    assert lightning_eval_fn(module, data, "val_acc")(result.model) == pytest.approx(result.metric)
    assert result.baseline_metric == pytest.approx(_trainer().validate(module, datamodule=data, verbose=False)[0]["val_acc"])
    assert all(torch.equal(before[k], module.state_dict()[k]) for k in before)


class SensitiveModule(L.LightningModule):
    """Logs the negative error to its fp32 outputs, or NaN where it is large (a loss overflowing: int8 in the first
    layer of `make_sensitive_mlp`), or NaN always."""

    def __init__(self, always_nan: bool = False) -> None:
        super().__init__()
        self.net, _, _ = make_sensitive_mlp()
        self.reference = copy.deepcopy(self.net)
        self.always_nan = always_nan

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch, _):
        error = (self(batch[0]) - self.reference(batch[0])).abs().mean()
        self.log("score", error * float("nan") if self.always_nan or error > 0.02 else -error, on_epoch=True)


def test_a_nan_metric_is_scored_as_one_in_lightning_and_named_by_the_step_that_logs_it():
    """A NaN while a layer is int8 is a trial's score, which the per-layer fallback mends; a NaN fp32 baseline
    fails, and the error names the step and metric (it named an eval_fn the Lightning user never wrote)."""
    _, x, _ = make_sensitive_mlp()
    loader = DataLoader(TensorDataset(x[:64]), batch_size=64)
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), latency_repeats=3, max_trials=6)
    result = quantize_lightning(SensitiveModule(), config, metric="score", val_dataloaders=loader,
                                example_inputs=x[:1])
    assert result.recipe is not None and "net.0" in result.recipe.fp32_layers
    assert [t.error is not None for t in result.trials][:2] == [True, True]
    with pytest.raises(ValueError, match=r"^eval_fn \(the score that SensitiveModule\.validation_step logs\) "
                                         r"returned nan for the fp32 baseline"):
        quantize_lightning(SensitiveModule(always_nan=True), config, metric="score", val_dataloaders=loader,
                           example_inputs=x[:1])
    # a float64 module, quantized from a float32 copy through an eval_fn wrapped to cast: named alike
    with pytest.raises(ValueError, match=r"^eval_fn \(the score that SensitiveModule\.validation_step logs\)"):
        quantize_lightning(SensitiveModule(always_nan=True).double(), config, metric="score",
                           val_dataloaders=DataLoader(TensorDataset(x[:64].double()), batch_size=64),
                           example_inputs=x[:1].double())


def test_a_module_fitted_compiled_and_a_compiled_wrapper_are_quantized_as_their_eager_module(digits):
    """A copy of a module Lightning compiled in place ran the original's forward, then failed in Lightning (its
    compile state deleted); a torch.compile wrapper was said never to call self(...) and to need a submodule."""
    torch.manual_seed(0)
    module, data = DigitsModule(), DigitsData(digits)
    _trainer(max_epochs=1).fit(torch.compile(module, backend="eager"), datamodule=data)  # compiles `module` in place
    baseline = _trainer().validate(module, datamodule=data, verbose=False)[0]["val_acc"]
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1, latency_repeats=1)
    for given in (module, torch.compile(module, backend="eager")):
        result = quantize_lightning(given, config, metric="val_acc", datamodule=data)
        assert result.baseline_metric == pytest.approx(baseline)
        assert lightning_eval_fn(module, data, "val_acc")(result.model) == pytest.approx(result.metric)
        assert not any(type(layer) is nn.Linear for layer in result.model.modules())  # int8, not the fp32 model
    assert module._compiler_ctx is not None  # the user's module keeps Lightning's compiled methods


class CtrlCInTheFourthValidation(DigitsModule):
    """Sends this process a real SIGINT as its fourth validation starts: after a check on one batch, the baseline's
    and trial 1's, trial 2's (the search validates copies of the module, hence the count on the class)."""

    validations = 0

    def on_validation_start(self):
        type(self).validations += 1
        if type(self).validations == 4:
            signal.raise_signal(signal.SIGINT)


def test_ctrl_c_during_the_search_keeps_what_it_found_and_leaves_ctrl_c_working(fitted):
    """Lightning's validate turned Ctrl-C into sys.exit(1): the search ended without what it found, the process with
    exit code 1, and SIGINT stayed ignored afterwards."""
    module, data = fitted
    CtrlCInTheFourthValidation.validations = 0  # counted on the class: from zero, also when the test runs again
    pressing = CtrlCInTheFourthValidation()
    pressing.load_state_dict(module.state_dict())
    with python_handles_ctrl_c():
        result = quantize_lightning(pressing, CONFIG, metric="val_acc", datamodule=data)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C still stops the process
    assert CtrlCInTheFourthValidation.validations == 4
    assert [t.error for t in result.trials] == [None, "interrupted"]
    assert result.recipe == result.trials[0].recipe and result.goal_met
    assert any("interrupted during trial 2" in m for m in result.messages)


class CtrlCInTheFirstValidation(CtrlCInTheFourthValidation):
    """The first: where the inputs the validation step gives the model are read."""

    def on_validation_start(self):
        type(self).validations += 1
        if type(self).validations == 1:
            signal.raise_signal(signal.SIGINT)


def test_ctrl_c_while_the_steps_inputs_are_read_raises_keyboard_interrupt(fitted):
    """That validation ran without the Ctrl-C handling of the others: Lightning exited (SystemExit(1)), where
    KeyboardInterrupt is raised elsewhere (the CLI's exit code 130 and its "interrupted" line)."""
    module, data = fitted
    CtrlCInTheFirstValidation.validations = 0
    pressing = CtrlCInTheFirstValidation()
    pressing.load_state_dict(module.state_dict())
    with python_handles_ctrl_c():
        with pytest.raises(KeyboardInterrupt):
            quantize_lightning(pressing, CONFIG, metric="val_acc", datamodule=data)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C still stops the process
    assert CtrlCInTheFirstValidation.validations == 1


def test_a_loss_is_judged_lower_is_better_with_mode_min_and_refused_without(fitted, tmp_path):
    module, data = fitted
    with pytest.raises(ValueError, match=r"quantize_lightning\(metric='val_loss'\).*mode='min'"):
        quantize_lightning(module, CONFIG, metric="val_loss", datamodule=data)
    with pytest.raises(ValueError, match=r"QuantizeOnFitEnd\(metric='val_loss'\).*mode='min'"):
        QuantizeOnFitEnd(CONFIG, metric="val_loss")  # at construction, before any training
    result = quantize_lightning(module, CONFIG, metric="val_loss", datamodule=data, mode="min")
    assert result.baseline_metric == pytest.approx(
        _trainer().validate(module, datamodule=data, verbose=False)[0]["val_loss"])
    assert any(m.endswith(f"goal: metric <= {result.baseline_metric * 1.01:.6g}") for m in result.messages)
    assert result.goal_met and result.metric <= result.baseline_metric * 1.01
    # The chosen candidate is the fastest meeting the bound; among all that met it, none is judged by a higher loss.
    assert all(t.metric <= result.baseline_metric * 1.01 for t in result.trials if t.meets_goal)


class LogsNegatedLoss(DigitsModule):
    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_neg_loss", -nn.functional.cross_entropy(self(x), y), on_epoch=True)  # higher is better


def test_a_metric_read_as_a_loss_with_mode_max_is_judged_higher_is_better_at_fit_end(digits):
    """mode='max', as the refusal without a mode advises, passed construction; the fit end's search dropped it and
    refused the metric after the whole training run."""
    callback = QuantizeOnFitEnd(CONFIG, metric="val_neg_loss", mode="max")
    _trainer(max_epochs=1, callbacks=[callback]).fit(LogsNegatedLoss(), datamodule=DigitsData(digits))
    baseline = callback.result.baseline_metric
    assert baseline < 0 and any(m.endswith(f"goal: metric >= {baseline * 1.01:.6g}") for m in callback.result.messages)


def test_submodule_is_swapped_in(fitted):
    module, data = fitted
    result = quantize_lightning(module, CONFIG, metric="val_acc", datamodule=data, submodule="net")
    assert result.goal_met
    assert not any(isinstance(m, L.LightningModule) for m in result.model.modules())


class WrappedNet(DigitsModule):
    """Its steps call a model two attributes down: `self.wrap.net`."""

    def __init__(self) -> None:
        super().__init__()
        wrap, wrap.net = nn.Module(), self.net
        del self.net
        self.wrap = wrap

    def forward(self, x):
        return self.wrap.net(x)


def test_a_submodule_named_by_a_dotted_path_is_swapped_in(digits):
    """'wrap.net' was refused ("has no such sub-module; its sub-modules with parameters: ['wrap']"), though the
    evaluation replaces a dotted path, and 'wrap' has no forward to quantize."""
    torch.manual_seed(0)
    module, data = WrappedNet(), DigitsData(digits)
    _trainer(max_epochs=1).fit(module, datamodule=data)
    result = quantize_lightning(module, CONFIG, metric="val_acc", datamodule=data, submodule="wrap.net")
    assert result.recipe is not None and isinstance(module.wrap.net[0], nn.Linear)  # the user's stays float
    x, y = digits[2], digits[3]
    with torch.no_grad():  # in the validation loader's batches: dynamic int8 scales each batch's activations
        predictions = torch.cat([result.model(batch).argmax(1) for batch in x.split(200)])
    assert result.metric == pytest.approx(float((predictions == y).float().mean()), abs=1e-6)
    with pytest.raises(ValueError, match=r"submodule='wrap.nett'\): WrappedNet has no such sub-module"):
        quantize_lightning(module, CONFIG, metric="val_acc", datamodule=data, submodule="wrap.nett")


class NoHyperparameters(DigitsModule):
    """A module whose width is an argument it does not save."""

    def __init__(self, width: int) -> None:
        L.LightningModule.__init__(self)
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def test_a_checkpoint_of_a_module_with_unsaved_arguments_is_quantized_with_init_kwargs(digits, tmp_path):
    """There was no way to give them: the load failed ("missing 1 required positional argument: 'width'")."""
    torch.manual_seed(0)
    module, data = NoHyperparameters(8), DigitsData(digits)
    trainer = _trainer(max_epochs=1)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    result = quantize_checkpoint(NoHyperparameters, tmp_path / "m.ckpt", CONFIG, init_kwargs={"width": 8},
                                 metric="val_acc", datamodule=data)
    x, y = digits[2], digits[3]
    with torch.no_grad():
        assert result.baseline_metric == pytest.approx(float((module(x).argmax(1) == y).float().mean()), abs=1e-6)
    # without them: torch's words, and which argument of this function gives them
    with pytest.raises(TypeError, match=r"missing 1 required positional argument: 'width': the checkpoint saved no "
                                        r"value for it .* give it as init_kwargs="):
        quantize_checkpoint(NoHyperparameters, tmp_path / "m.ckpt", CONFIG, metric="val_acc", datamodule=data)


def test_a_validation_step_that_never_calls_the_model_is_refused_before_any_candidate(digits):
    """Its metric would be the original's for every candidate (each replaces ``forward``, which the step skips): the
    baseline evaluation refuses it and names the sub-module the step calls, with which the search then runs."""
    from tests.conftest import SubmoduleStepsClassifier

    torch.manual_seed(0)
    module, data = SubmoduleStepsClassifier(), DigitsData(digits)
    _trainer(max_epochs=2).fit(module, datamodule=data)
    with pytest.raises(ValueError, match=r"SubmoduleStepsClassifier.validation_step never called self\(\.\.\.\).*"
                                         r"pass submodule='net'"):
        quantize_lightning(module, CONFIG, metric="val_acc", datamodule=data)
    result = quantize_lightning(module, CONFIG, metric="val_acc", datamodule=data, submodule="net")
    assert result.recipe is not None and result.trials
    # Each candidate was judged on its own outputs: its metric is that of its own predictions, made on the
    # validation loader's batches (dynamic int8 scales each batch's activations by that batch's range).
    x, y = digits[2], digits[3]
    predictions = torch.cat([result.model(batch).argmax(1) for batch in x.split(200)])
    assert result.metric == pytest.approx((predictions == y).float().mean().item())


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_quantize_on_fit_end_refuses_before_training_what_would_fail_after_it(digits, tmp_path):
    """No validation data (its metric judges the candidates), or a multi-process fit (every rank would search and
    write `save_path` at once; two real gloo processes): refused at setup, before the first step."""
    loader = DataLoader(TensorDataset(digits[0][:64], digits[1][:64]), batch_size=32)
    callback = QuantizeOnFitEnd(CONFIG, metric="val_acc", save_path=tmp_path / "int8.pt")
    trainer = _trainer(max_epochs=1, callbacks=[callback])
    with pytest.raises(ValueError, match="QuantizeOnFitEnd needs validation data"):
        trainer.fit(DigitsModule(), train_dataloaders=loader)
    assert trainer.global_step == 0 and callback.result is None
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[callback])
    with pytest.raises(Exception, match="QuantizeOnFitEnd runs in a single process.*quantize_checkpoint"):
        trainer.fit(DigitsModule(), datamodule=DigitsData(digits))
    assert not any(tmp_path.iterdir())


def test_a_save_path_in_a_folder_that_cannot_be_written_is_refused_at_setup(digits, unwritable_folder):
    """Only a file in the way was checked: the fit and the whole search ran, then torch's writer failed naming no
    file ("open file failed with strerror: Permission denied")."""
    save_path = unwritable_folder / "sub" / "int8.pt"
    callback = QuantizeOnFitEnd(CONFIG, metric="val_acc", save_path=save_path)
    trainer = _trainer(max_epochs=1, limit_train_batches=2, callbacks=[callback])
    with pytest.raises(ValueError, match=re.escape(f"QuantizeOnFitEnd(save_path='{save_path}'): cannot write there (")):
        trainer.fit(DigitsModule(), datamodule=DigitsData(digits))
    assert trainer.global_step == 0 and callback.result is None


def test_a_metric_the_sanity_check_did_not_log_is_warned_of_before_training(digits):
    """The metric is read when fit ends; a misspelt one is said at the sanity check (a warning: a module may log its
    metrics only outside it, and then nothing is said)."""
    steps_when_warned = []

    class Watch(L.Callback):
        def on_sanity_check_end(self, trainer, pl_module):
            steps_when_warned.append(trainer.global_step)

    callback = QuantizeOnFitEnd(CONFIG, metric="val_accuracy")
    trainer = _trainer(max_epochs=1, limit_train_batches=2, callbacks=[callback, Watch()])
    with pytest.warns(UserWarning, match=r"QuantizeOnFitEnd\(metric='val_accuracy'\) reads it when fit ends, but the "
                                         r"sanity-check batches did not log it: .*logged: \['val_acc', 'val_loss'\]"):
        with pytest.raises(KeyError, match="val_accuracy"):
            trainer.fit(DigitsModule(), datamodule=DigitsData(digits))
    assert steps_when_warned == [0]

    class LogsOutsideTheSanityCheck(DigitsModule):
        def validation_step(self, batch, _):
            if not self.trainer.sanity_checking:
                super().validation_step(batch, _)

    trainer = _trainer(max_epochs=1, limit_train_batches=2, callbacks=[QuantizeOnFitEnd(CONFIG, metric="val_acc")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(LogsOutsideTheSanityCheck(), datamodule=DigitsData(digits))
    assert not [w for w in caught if "sanity-check" in str(w.message)]


def test_a_metric_not_logged_is_warned_of_at_the_first_validation_where_no_sanity_check_ran(digits):
    """With num_sanity_val_steps=0 nothing was said until the KeyError at fit end, after the whole fit."""
    warned_at: list[int] = []

    class Watch(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            warned_at.append(len([w for w in caught if "reads it when fit ends" in str(w.message)]))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(max_epochs=2, limit_train_batches=2, num_sanity_val_steps=0,
                           callbacks=[QuantizeOnFitEnd(CONFIG, metric="val_accuracy"), Watch()])
        with pytest.raises(KeyError, match="val_accuracy"):
            trainer.fit(DigitsModule(), datamodule=DigitsData(digits))
    said = [str(w.message) for w in caught if "reads it when fit ends" in str(w.message)]
    assert warned_at == [1, 1] and len(said) == 1  # at the first validation, once
    assert said[0].startswith("QuantizeOnFitEnd(metric='val_accuracy') reads it when fit ends, but the fit's first "
                              "validation did not log it: ")


class LogsThroughItsLogger(DigitsModule):
    """A validation step that writes to its logger (as self.logger.experiment.add_image(...) does)."""

    def validation_step(self, batch, batch_idx):
        self.logger.log_hyperparams({"seen": batch_idx})
        super().validation_step(batch, batch_idx)


def test_a_step_writing_to_its_logger_is_judged_on_the_internal_trainer(digits, tmp_path):
    """litcompress's own trainers had no logger: `self.logger` was None and the fit-end quantization failed in an
    AttributeError after the whole fit."""
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    callback = QuantizeOnFitEnd(CONFIG, metric="val_acc")
    L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=CSVLogger(tmp_path),
              enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
              callbacks=[callback]).fit(LogsThroughItsLogger(), datamodule=DigitsData(digits))
    assert callback.result is not None and callback.result.baseline_metric > 0


class WritesIntoItsLogDir(DigitsModule):
    """Saves its hyperparameters (as a DataModule with another value of one does) and writes files into log_dir."""

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()

    def on_validation_epoch_end(self):
        os.makedirs(os.path.join(self.trainer.log_dir, "samples"), exist_ok=True)
        if self.logger is not None:  # (a fit with a CSV or TensorBoard logger: its folder)
            os.makedirs(os.path.join(self.logger.log_dir, "logged"), exist_ok=True)
            os.makedirs(os.path.join(self.logger.root_dir, "rooted"), exist_ok=True)


class SavesABatchSize(DigitsData):
    def __init__(self, digits, batch_size: int = 16) -> None:
        super().__init__(digits)
        self.save_hyperparameters(ignore=["digits"])


def test_the_internal_logger_changes_nothing_a_fit_without_one_does(digits, tmp_path, monkeypatch):
    """With a logger, trainer.log_dir was its save_dir (None: a step writing files there failed) and Lightning merged
    the module's and the DataModule's saved hyperparameters, refusing a key with two values: the user's fit without a
    logger did neither."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    module, data = WritesIntoItsLogDir(), SavesABatchSize(digits)
    expected = _trainer().validate(module, datamodule=data, verbose=False)[0]["val_acc"]
    result = quantize_lightning(module, CONFIG, metric="val_acc", datamodule=SavesABatchSize(digits))
    assert result.baseline_metric == pytest.approx(expected) and (tmp_path / "samples").is_dir()
    assert (tmp_path / "logged").is_dir() and (tmp_path / "rooted").is_dir()


def test_a_metric_only_training_logs_is_not_taken_for_the_validations(digits):
    """At the first validation the callback metrics hold the training step's too: a metric only it logs passed the
    check, and the fit failed at its end."""

    class LogsAccInTraining(DigitsModule):
        def training_step(self, batch, batch_idx):
            self.log("acc", 0.5)
            return super().training_step(batch, batch_idx)

    trainer = _trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0,
                       callbacks=[QuantizeOnFitEnd(CONFIG, metric="acc")])
    with pytest.warns(UserWarning, match=r"QuantizeOnFitEnd\(metric='acc'\) reads it when fit ends, but the fit's "
                                         r"first validation did not log it: .*logged: \['val_acc', 'val_loss'\]"):
        with pytest.raises(KeyError, match="'acc' was not logged"):
            trainer.fit(LogsAccInTraining(), datamodule=DigitsData(digits))


class ValidationBuiltForValidate(DigitsData):
    """Validation data built by setup('validate') only; 'fit' sets the fit's own validation slice."""

    def __init__(self, digits, fit_validates: bool = True) -> None:
        super().__init__(digits)
        self.fit_validates = fit_validates

    def setup(self, stage):
        if stage == "fit" and self.fit_validates:
            self.val = (self.digits[2][:64], self.digits[3][:64])
        elif stage == "validate":
            self.val = (self.digits[2][64:], self.digits[3][64:])

    def val_dataloader(self):
        return DataLoader(TensorDataset(*self.val), batch_size=64)


def test_a_datamodule_building_its_validation_set_for_validate_works_and_the_fit_end_judges_on_the_fits(digits):
    """quantize_lightning read val_dataloader() after setup('fit') only (an AttributeError for a DataModule that
    builds it in setup('validate')); QuantizeOnFitEnd judged each candidate on setup('validate')'s set, not on the
    one whose score the fit logged (README: "its baseline is the score the fit logged")."""
    torch.manual_seed(0)
    module = DigitsModule()
    data = DigitsData(digits)
    _trainer(max_epochs=1, limit_train_batches=2).fit(module, datamodule=data)
    only_for_validate = ValidationBuiltForValidate(digits, fit_validates=False)
    result = quantize_lightning(module, CONFIG, metric="val_acc", datamodule=only_for_validate)
    expected = _trainer().validate(module, datamodule=only_for_validate, verbose=False)[0]["val_acc"]
    assert result.baseline_metric == pytest.approx(expected)
    compressed = compress_lightning(module, CompressionConfig(shrink=False, export=False, latency_repeats=2),
                                    datamodule=ValidationBuiltForValidate(digits, fit_validates=False))
    assert compressed.report.stages[0].metric == pytest.approx(expected)

    logged = {}

    class Logged(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                logged["val_acc"] = float(trainer.callback_metrics["val_acc"])

    callback = QuantizeOnFitEnd(CONFIG, metric="val_acc")
    _trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, callbacks=[callback, Logged()]).fit(
        DigitsModule(), datamodule=ValidationBuiltForValidate(digits))
    assert callback.result.baseline_metric == pytest.approx(logged["val_acc"])


def test_unknown_metric_names_the_logged_ones(fitted):
    module, data = fitted
    with pytest.raises(KeyError, match="val_acc"):
        quantize_lightning(module, CONFIG, metric="val_accuracy", datamodule=data)


@pytest.mark.parametrize("backend", ["torch_ao", "onnxruntime"])
def test_callback_quantizes_at_fit_end_and_saves(digits, tmp_path, backend):
    torch.manual_seed(0)
    path = tmp_path / "model.bin"
    config = PTQConfig(approach="dynamic", backends=(backend,), max_trials=4, latency_repeats=3)
    callback = QuantizeOnFitEnd(config, metric="val_acc", save_path=path)
    module = DigitsModule()
    _trainer(callbacks=[callback]).fit(module, datamodule=DigitsData(digits))
    assert callback.result is not None and callback.result.model is not None
    loaded, recipe = load_quantized(path)
    assert recipe == callback.result.recipe and recipe.backend == backend
    x = digits[2][:20]
    assert torch.allclose(loaded(x), callback.result.model(x), atol=1e-5)


class SpoilTheLastEpoch(L.Callback):
    """Before the last validation, noise the weights: that epoch scores worst, and the fit ends on it."""

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.current_epoch == trainer.max_epochs - 1:
            with torch.no_grad():
                for parameter in pl_module.net[0].parameters():
                    parameter.add_(torch.randn_like(parameter))


@pytest.mark.parametrize("masks", [False, True], ids=["plain", "pruned-with-masks"])
def test_quantizing_at_fit_end_the_best_checkpoints_weights(digits, tmp_path, caplog, masks):
    """`weights="best"` quantizes the weights the monitored ModelCheckpoint kept (its score is the fp32 baseline),
    from a file written while pruning with masks too (and says that file is less sparse than the fit's end);
    `"last"` (the default) quantizes those the fit ended with and says where the best are."""
    from litcompress import ModelPruning

    def fit(weights):
        torch.manual_seed(0)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / weights, monitor="val_acc", mode="max",
                                     save_on_train_epoch_end=False)
        quantizing = QuantizeOnFitEnd(CONFIG, metric="val_acc", weights=weights)
        pruning = [ModelPruning("l1_unstructured", amount=0.3, make_pruning_permanent=False,
                                use_lottery_ticket_hypothesis=False)] if masks else []
        L.Trainer(accelerator="cpu", devices=1, max_epochs=4, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[*pruning, SpoilTheLastEpoch(), checkpoint, quantizing],
                  ).fit(DigitsModule(), datamodule=DigitsData(digits))
        return checkpoint, quantizing.result

    with caplog.at_level(logging.INFO, logger="litcompress"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint, best = fit("best")
    # pruning went on after the best epoch (a round per epoch): the file is less sparse than the fit's end, and said
    assert any("saved while pruning still went on" in str(w.message) for w in caught) == masks
    if masks:
        saved = torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"]
        assert any(k.endswith("_mask") for k in saved)
    assert best.baseline_metric == pytest.approx(float(checkpoint.best_model_score))
    assert f"works on the weights of {checkpoint.best_model_path}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="litcompress"):
        checkpoint, last = fit("last")
    assert last.baseline_metric < float(checkpoint.best_model_score) - 0.05
    assert "works on the weights the fit ended with" in caplog.text and "weights='best'" in caplog.text


def test_the_last_weights_line_names_the_best_file_after_an_epoch_without_validation(digits, tmp_path, caplog):
    """The last epoch trains without validating: the last logged score is the best file's, of earlier weights. The
    line comparing them was missing (the scores were equal), or named that score as the fit's end's."""
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_acc", mode="max")
    quantizing = QuantizeOnFitEnd(CONFIG, metric="val_acc")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=3, check_val_every_n_epoch=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint, quantizing])
    with caplog.at_level(logging.INFO, logger="litcompress"):
        trainer.fit(DigitsModule(), datamodule=DigitsData(digits))
    # the second epoch's, the one validation's
    assert float(trainer.callback_metrics["val_acc"]) == float(checkpoint.best_model_score)
    line = next(r.getMessage() for r in caplog.records if "works on the weights the fit ended with" in r.getMessage())
    assert f"(val_acc={float(checkpoint.best_model_score):.6g}) is in {checkpoint.best_model_path}" in line
    assert line.count("val_acc=") == 1  # no score claimed for the weights the fit ended with


def test_best_weights_without_a_model_checkpoint_are_refused_before_training(digits):
    with pytest.raises(ValueError, match=r"weights='bestest'.*use 'last'"):
        QuantizeOnFitEnd(CONFIG, metric="val_acc", weights="bestest")
    trainer = _trainer(callbacks=[QuantizeOnFitEnd(CONFIG, metric="val_acc", weights="best")])
    with pytest.raises(ValueError, match=r"weights='best'\) reads the best file .* this trainer has none"):
        trainer.fit(DigitsModule(), datamodule=DigitsData(digits))
    assert trainer.global_step == 0


def test_best_weights_are_the_monitored_checkpoints_even_written_through_fsspec_and_never_an_unmonitored_ones(
        digits, tmp_path, caplog):
    """The first ModelCheckpoint was read whatever it monitored: a periodic one listed first (or the Trainer's
    default) gave its latest file as "best", silently; a best file under an fsspec URL (memory://, s3://) failed
    in torch.load after the whole fit, though Lightning's own ckpt_path='best' reads it."""
    default = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[QuantizeOnFitEnd(CONFIG, metric="val_acc", weights="best")])
    with pytest.raises(ValueError, match=r"this trainer has none that monitors a metric \(without a monitor it saves "
                                         r"the latest weights"):
        default.fit(DigitsModule(), datamodule=DigitsData(digits))
    assert default.global_step == 0
    torch.manual_seed(0)
    periodic = ModelCheckpoint(dirpath=tmp_path / "periodic")
    monitored = ModelCheckpoint(dirpath=f"memory://{tmp_path.name}/best", monitor="val_acc", mode="max",
                                save_on_train_epoch_end=False)
    quantizing = QuantizeOnFitEnd(CONFIG, metric="val_acc", weights="best")
    with caplog.at_level(logging.INFO, logger="litcompress"):
        L.Trainer(accelerator="cpu", devices=1, max_epochs=4, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[SpoilTheLastEpoch(), periodic, monitored, quantizing],
                  ).fit(DigitsModule(), datamodule=DigitsData(digits))
    assert monitored.best_model_path.startswith("memory://")
    assert f"works on the weights of {monitored.best_model_path}" in caplog.text
    assert quantizing.result.baseline_metric == pytest.approx(float(monitored.best_model_score))


def test_quantize_from_checkpoint(fitted, tmp_path):
    module, data = fitted
    trainer = _trainer(max_epochs=0)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    result = quantize_checkpoint(DigitsModule, path, CONFIG, metric="val_acc", datamodule=data)
    assert result.goal_met and os.path.exists(path)


def test_quantize_from_a_checkpoint_written_while_pruning_with_masks(digits, tmp_path):
    from litcompress import ModelPruning

    torch.manual_seed(0)
    module, data = DigitsModule(), DigitsData(digits)
    trainer = _trainer(max_epochs=2, callbacks=[ModelPruning("l1_unstructured", amount=0.5,
                                                             make_pruning_permanent=False)])
    trainer.fit(module, datamodule=data)
    path = tmp_path / "masked.ckpt"
    trainer.save_checkpoint(path)  # <name>_orig/<name>_mask keys, which DigitsModule.load_from_checkpoint refuses
    result = quantize_checkpoint(DigitsModule, path, CONFIG, metric="val_acc", datamodule=data)
    x, y = digits[2], digits[3]
    with torch.no_grad():  # the baseline is the pruned model of the checkpoint
        assert result.baseline_metric == pytest.approx(float((module(x).argmax(1) == y).float().mean()), abs=1e-6)
    assert result.goal_met and result.recipe is not None


@pytest.mark.parametrize("backend", ["torch_ao", "onnxruntime"])
def test_quantizing_at_fit_end_a_model_pruned_with_masks_kept(digits, backend):
    # ModelPruning(make_pruning_permanent=False) leaves orig * mask tensors that copy.deepcopy refuses after a forward
    from litcompress import ModelPruning
    from litcompress.pruning import is_pruned

    torch.manual_seed(0)
    module = DigitsModule()
    pruning = ModelPruning("l1_unstructured", amount=0.5, make_pruning_permanent=False)
    config = PTQConfig(approach="dynamic", backends=(backend,), max_trials=2, latency_repeats=3)
    quantizing = QuantizeOnFitEnd(config, metric="val_acc")
    _trainer(max_epochs=2, callbacks=[pruning, quantizing]).fit(module, datamodule=DigitsData(digits))
    result = quantizing.result
    assert is_pruned(module.net[0], "weight")  # the user's model keeps its masks
    assert any(m.startswith("the model's pruning masks were made permanent") for m in result.messages)
    x, y = digits[2], digits[3]
    with torch.no_grad():  # the baseline is the masked model as trained, and int8 agrees with it
        assert result.baseline_metric == pytest.approx(float((module(x).argmax(1) == y).float().mean()), abs=1e-6)
        assert (result.model(x).argmax(1) == module(x).argmax(1)).float().mean() > 0.95
    assert result.goal_met and result.recipe is not None and result.recipe.backend == backend


def test_candidates_are_judged_through_a_validation_step_that_calls_the_model_by_keyword():
    """self(input_ids=..., attention_mask=...) with dict batches: ONNX and TorchScript candidates take positional
    inputs only, so before every one of them failed in validation_step."""
    from tests.text_task import TextClassifier, TextData

    L.seed_everything(0)
    module, data = TextClassifier(), TextData()
    L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=data)
    result = quantize_lightning(module, PTQConfig(approach="dynamic", backends=("torch_ao", "onnxruntime", "pt2e"),
                                                  latency_repeats=2, max_trials=3),
                                metric="val_acc", datamodule=data)
    assert {t.recipe.backend for t in result.trials} == {"torch_ao", "onnxruntime", "pt2e"}
    assert all(t.error is None and t.metric > 0.7 for t in result.trials)


def test_keywords_are_passed_by_position_in_the_order_of_forward():
    import inspect

    from litcompress.quantization.lightning import KeywordsAsPositional

    def forward(input_ids, attention_mask=None, *, scale=1.0):
        raise AssertionError("only its signature is used")

    calls = []
    wrapped = KeywordsAsPositional(lambda *args: calls.append(args), inspect.signature(forward))
    wrapped(attention_mask=2, input_ids=1)
    wrapped(1, attention_mask=2)
    wrapped(input_ids=1)
    assert calls == [(1, 2), (1, 2), (1,)]
    wrapped(1, 2, scale=1.0)  # a flag at its default: held by the compressed model, not passed
    wrapped(1, None)  # an optional input left out, trailing: not passed
    assert calls[3:] == [(1, 2), (1,)]
    with pytest.raises(TypeError, match=r"scale=2.0: a compressed model computes forward with its flags at their "
                                        r"defaults \(scale=1.0\)"):
        wrapped(1, scale=2.0)
    with pytest.raises(TypeError, match="keyword-only input `scale`"):
        wrapped(1, scale=torch.ones(1))  # an input given by keyword only

    def gapped(a, b=None, c=None):
        raise AssertionError("only its signature is used")

    with pytest.raises(TypeError, match=r"called with \['c'\] but without `b`"):
        KeywordsAsPositional(lambda *args: None, inspect.signature(gapped))(1, c=3)


class FlagsModule(DigitsModule):
    """forward(x, return_features=False, *, log_probs=False), its validation step calling it as `call` says."""

    def __init__(self, call: str = "plain") -> None:
        super().__init__()
        self.call = call

    def forward(self, x, return_features: bool = False, *, log_probs: bool = False):
        features = self.net[1](self.net[0](x))
        out = features if return_features else self.net[2](features)
        return out.log_softmax(1) if log_probs else out

    def validation_step(self, batch, _):
        x, y = batch
        logits = {"plain": lambda: self(x), "positional flag": lambda: self(x, False),
                  "keyword flag": lambda: self(x, return_features=False),
                  "keyword-only flag": lambda: self(x, log_probs=False),
                  "flag off its default": lambda: self(x, log_probs=True)}[self.call]()
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), on_epoch=True)


@pytest.mark.parametrize("call", ["positional flag", "keyword flag", "keyword-only flag"])
def test_a_validation_step_passing_flags_at_their_defaults_judges_every_backends_candidates(digits, call):
    """The flags went on to the candidates: pt2e's file took no second input, and a keyword-only flag was refused."""
    torch.manual_seed(0)
    module, data = FlagsModule(), DigitsData(digits)
    _trainer(max_epochs=1).fit(module, datamodule=data)
    module.call = call
    config = PTQConfig(approach="dynamic", backends=("torch_ao", "onnxruntime", "pt2e"), max_trials=3,
                       latency_repeats=3)
    result = quantize_lightning(module, config, metric="val_acc", datamodule=data)
    assert [(trial.recipe.backend, trial.error) for trial in result.trials] == [
        ("torch_ao", None), ("onnxruntime", None), ("pt2e", None)]
    x, y = digits[2], digits[3]
    predictions = torch.cat([result.model(batch).argmax(1) for batch in x.split(200)])
    assert result.metric == pytest.approx((predictions == y).float().mean().item())


def test_a_validation_step_passing_a_flag_off_its_default_is_refused_at_the_baseline(digits):
    torch.manual_seed(0)
    module, data = FlagsModule("flag off its default"), DigitsData(digits)
    with pytest.raises(TypeError, match=r"log_probs=True: a compressed model computes forward with its flags at "
                                        r"their defaults \(log_probs=False\)"):
        quantize_lightning(module, CONFIG, metric="val_acc", datamodule=data)


class RawPixelsModule(L.LightningModule):
    """A CNN whose steps prepare its batches (raw 0..16 pixels, flat) before calling ``self(...)``, as many modules
    do: the model itself sees images scaled to [-0.5, 0.5]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

    @staticmethod
    def prepare(x):
        return x.view(-1, 1, 8, 8) * 0.0625 - 0.5

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(self.prepare(x)), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_acc", (self(self.prepare(x)).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@pytest.fixture(scope="module")
def raw_pixels(digits):
    torch.manual_seed(0)
    raw = [t * 16 if t.is_floating_point() else t for t in digits]  # the pixels as load_digits gives them, 0..16
    module, data = RawPixelsModule(), DigitsData(raw)
    _trainer(max_epochs=8).fit(module, datamodule=data)
    return module, data, raw


def test_a_module_preparing_its_batches_is_calibrated_on_what_its_model_sees(raw_pixels):
    """Static int8 was calibrated on the raw batches (0..16 where the model sees [-0.5, 0.5]): every candidate of
    every backend scored 0.14-0.28 against fp32's 0.93 here, and the goal was missed."""
    module, data, raw = raw_pixels
    config = PTQConfig(approach="static", backends=("torch_ao",), max_trials=2, latency_repeats=3)
    result = quantize_lightning(module, config, metric="val_acc", datamodule=data)
    assert result.goal_met, result.table()
    assert result.metric >= result.baseline_metric - 0.01


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_trainers_it_builds_itself_keep_lightnings_set_up_lines_out_of_the_users_log(raw_pixels):
    """Evaluating candidates and reading what the steps give the model are trainers of ours: Lightning's lines when
    one is built ("GPU available", "`Trainer(limit_val_batches=1)` was configured") would repeat at every stage. A
    trainer the user builds afterwards logs them as before."""
    module, data, _ = raw_pixels
    records = _Records()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(records)
    try:
        config = PTQConfig(approach="static", backends=("torch_ao",), max_trials=1, latency_repeats=3)
        quantize_lightning(module, config, metric="val_acc", datamodule=data)
        assert records.messages == []
        _trainer(limit_val_batches=1)
        assert any("GPU available" in m for m in records.messages)
        assert any("was configured" in m for m in records.messages)
    finally:
        rank_zero.removeHandler(records)


class ScaledByTheDataModule(RawPixelsModule):
    """Its validation step reads the scale from the fit's DataModule, which a step run on its own has not."""

    def validation_step(self, batch, _):
        x, y = batch
        x = x.view(-1, 1, 8, 8) / self.trainer.datamodule.max_value - 0.5
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())


def test_a_step_that_cannot_run_on_its_own_is_said_when_its_inputs_are_read(raw_pixels, caplog):
    """The batches are then taken as they are (what else), and the line names the error and what to pass."""
    from litcompress.quantization.lightning import inputs_as_steps_give_them

    module, data, _ = raw_pixels
    scaled = ScaledByTheDataModule()
    scaled.load_state_dict(module.state_dict())
    with caplog.at_level(logging.INFO, logger="litcompress"):
        assert inputs_as_steps_give_them(scaled, data.val_dataloader(), data.train_dataloader(), example_inputs=None,
                                         calibration_data=None, input_fn=None, submodule=None,
                                         calibration_batches=2) == (None, None, None)
    assert "ScaledByTheDataModule.validation_step could not be run on its own" in caplog.text
    assert "AttributeError" in caplog.text and "pass input_fn=" in caplog.text


def test_inputs_are_read_through_validation_step_only_when_it_prepares_them(raw_pixels, fitted):
    from litcompress.quantization.lightning import StepInputReader, inputs_as_steps_give_them

    module, data, raw = raw_pixels
    reader = StepInputReader(module)  # one copy of the module, read on several loaders
    seen = reader.read(data.train_dataloader(), 3)
    assert len(seen) == 3 and all(len(call) == 1 for call in seen)
    for i, (inputs,) in enumerate(seen):  # exactly what validation_step gave self(...), batch by batch
        assert torch.equal(inputs, RawPixelsModule.prepare(raw[0][64 * i:64 * (i + 1)]))
    (first,), = reader.read(data.val_dataloader(), 1)
    assert torch.equal(first, RawPixelsModule.prepare(raw[2][:200]))
    example, calibration, input_fn = inputs_as_steps_give_them(
        module, data.val_dataloader(), data.train_dataloader(), example_inputs=None, calibration_data=None,
        input_fn=None, submodule=None, calibration_batches=5)
    assert torch.equal(example[0], RawPixelsModule.prepare(raw[2][:200]))
    assert len(calibration) == 5 and input_fn(calibration[4]) == calibration[4]
    assert torch.equal(calibration[4][0], RawPixelsModule.prepare(raw[0][256:320]))
    # a module whose steps pass the batch on as it is, or an input_fn of the user's: nothing read, nothing changed
    plain, plain_data = fitted
    loader = plain_data.train_dataloader()
    assert inputs_as_steps_give_them(plain, plain_data.val_dataloader(), loader, example_inputs=None,
                                     calibration_data=None, input_fn=None, submodule=None,
                                     calibration_batches=5) == (None, None, None)
    mine = lambda batch: (batch[0],)  # noqa: E731
    assert inputs_as_steps_give_them(module, data.val_dataloader(), loader, example_inputs=None,
                                     calibration_data=None, input_fn=mine, submodule=None,
                                     calibration_batches=5) == (None, None, mine)
    state = torch.random.get_rng_state()  # reading the loaders leaves the run's random numbers as they were
    inputs_as_steps_give_them(module, data.val_dataloader(), data.train_dataloader(), example_inputs=None,
                              calibration_data=None, input_fn=None, submodule=None, calibration_batches=2)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_datamodule_without_training_data_quantizes_with_calibration_data_given(raw_pixels):
    module, data, raw = raw_pixels

    class ValidationOnly(L.LightningDataModule):
        def val_dataloader(self):
            return data.val_dataloader()

    calibration = [(RawPixelsModule.prepare(raw[0][i:i + 64]),) for i in range(0, 256, 64)]
    config = PTQConfig(approach="static", backends=("torch_ao",), max_trials=1, latency_repeats=3)
    result = quantize_lightning(module, config, metric="val_acc", datamodule=ValidationOnly(),
                                calibration_data=calibration)
    assert result.goal_met, result.table()


def test_quantize_on_fit_end_with_the_fits_loaders_calibrates_on_what_the_steps_give_the_model(raw_pixels):
    """A fit given loaders (no DataModule): QuantizeOnFitEnd calibrated on the training loader's raw batches."""
    module, data, _ = raw_pixels
    torch.manual_seed(0)
    fresh = RawPixelsModule()
    fresh.load_state_dict(module.state_dict())
    config = PTQConfig(approach="static", backends=("torch_ao",), max_trials=2, latency_repeats=3)
    callback = QuantizeOnFitEnd(config, metric="val_acc")
    _trainer(max_epochs=1, limit_train_batches=1, callbacks=[callback]).fit(
        fresh, train_dataloaders=data.train_dataloader(), val_dataloaders=data.val_dataloader())
    assert callback.result.goal_met, callback.result.table()


def test_the_users_trainer_and_datamodule_are_left_as_they_were(digits, tmp_path):
    # Candidates ran on the trainer given: it stayed attached to a copy whose forward was the last int8 candidate (a
    # later trainer.validate() scored that), its loggers got every candidate's metrics, and the DataModule was left
    # attached to litcompress's own trainer.
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    module, data = DigitsModule(), DigitsData(digits)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=4, limit_val_batches=1,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        logger=CSVLogger(tmp_path))
    trainer.fit(module, datamodule=data)
    before = trainer.validate(datamodule=data, verbose=False)
    metrics_file = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    rows = metrics_file.read_text().splitlines()
    result = quantize_lightning(module, CONFIG, metric="val_acc", datamodule=data, trainer=trainer)
    assert trainer.lightning_module is module and "forward" not in module.__dict__
    assert data.trainer is trainer
    assert metrics_file.read_text().splitlines() == rows  # no candidate's metrics in the user's log
    assert trainer.validate(datamodule=data, verbose=False) == before
    # its validation limits were lent: one batch of 200, as the user's trainer validates
    assert result.baseline_metric == pytest.approx(before[0]["val_acc"])


class LoggedOnStepAndEpoch(DigitsModule):
    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), on_step=True, on_epoch=True)


def test_a_metric_logged_on_step_and_epoch_is_read_by_its_name_as_modelcheckpoint_reads_it(digits, tmp_path):
    # Lightning returns it as val_acc_epoch: QuantizeOnFitEnd(metric="val_acc") failed after the whole fit, saying
    # val_acc was not logged (ModelCheckpoint(monitor="val_acc") takes it, and the sanity check saw it)
    torch.manual_seed(0)
    module, data = LoggedOnStepAndEpoch(), DigitsData(digits)
    callback = QuantizeOnFitEnd(CONFIG, metric="val_acc")
    _trainer(1, limit_train_batches=4, callbacks=[callback]).fit(module, datamodule=data)
    epoch_value = _trainer().validate(module, datamodule=data, verbose=False)[0]["val_acc_epoch"]
    assert callback.result is not None and callback.result.baseline_metric == pytest.approx(epoch_value)


def test_the_fits_val_loader_is_used_when_validation_never_ran(digits):
    # trainer.val_dataloaders is filled only once the validation loop runs: the callback said "give datamodule or
    # val_dataloaders" after the fit, to a user who had given them to trainer.fit
    torch.manual_seed(0)
    module, data = DigitsModule(), DigitsData(digits)
    callback = QuantizeOnFitEnd(CONFIG, metric="val_acc")
    _trainer(1, limit_train_batches=4, num_sanity_val_steps=0, check_val_every_n_epoch=5,
             callbacks=[callback]).fit(module, data.train_dataloader(), data.val_dataloader())
    expected = _trainer().validate(module, data.val_dataloader(), verbose=False)[0]["val_acc"]
    assert callback.result is not None and callback.result.baseline_metric == pytest.approx(expected)


class CallsItsModel(L.LightningModule):
    """No forward of its own: its steps call self.model(...)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self.model(batch[0]), batch[1])

    def validation_step(self, batch, _):
        self.log("val_acc", (self.model(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_submodule_that_is_not_there_or_needed_is_said_before_any_work(digits):
    # a misspelt submodule failed after the whole fit (a bare AttributeError); a module without forward got
    # "missing the required forward" and advice to pass input_fn=
    torch.manual_seed(0)
    data = DigitsData(digits)
    for module, submodule, message in ((DigitsModule(), "nett", r"submodule='nett'\): DigitsModule has no such "
                                        r"sub-module; its sub-modules with parameters: \['net'\]"),
                                       (CallsItsModel(), None, r"CallsItsModel defines no forward.*submodule='model'")):
        before = {k: v.clone() for k, v in module.state_dict().items()}
        with pytest.raises(ValueError, match=f"QuantizeOnFitEnd.*{message}"):
            _trainer(1, limit_train_batches=4, callbacks=[QuantizeOnFitEnd(CONFIG, metric="val_acc",
                                                                           submodule=submodule)]).fit(module, data)
        assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # not one step trained
        with pytest.raises(ValueError, match=f"quantize_lightning.*{message}"):
            quantize_lightning(module, CONFIG, metric="val_acc", datamodule=data, submodule=submodule)
    result = quantize_lightning(CallsItsModel(), CONFIG, metric="val_acc", datamodule=data, submodule="model")
    assert result.recipe is not None


class WrittenByPrepareData(DigitsData):
    """Its setup reads a file that prepare_data writes (a download, in real DataModules)."""

    def __init__(self, digits, folder) -> None:
        super().__init__(digits)
        self.folder, self.ready = folder, False

    def prepare_data(self):
        torch.save(self.digits, self.folder / "digits.pt")

    def setup(self, stage):
        self.digits, self.ready = torch.load(self.folder / "digits.pt"), True


def test_quantize_lightning_prepares_a_datamodule_and_validates_on_val_dataloaders_given_beside_it(digits, tmp_path):
    # setup ran without prepare_data (FileNotFoundError); val_dataloaders beside a DataModule failed in
    # trainer.validate("You cannot pass both ...")
    torch.manual_seed(0)
    module, data = DigitsModule(), WrittenByPrepareData(digits, tmp_path)
    result = quantize_lightning(module, CONFIG, metric="val_acc", datamodule=data)
    assert data.ready and result.recipe is not None
    few = DataLoader(TensorDataset(digits[2][:100], digits[3][:100]), batch_size=50)
    beside = quantize_lightning(module, CONFIG, metric="val_acc", datamodule=data, val_dataloaders=few)
    assert beside.baseline_metric == pytest.approx(_trainer().validate(module, few, verbose=False)[0]["val_acc"])


def test_quantize_lightning_on_validation_loaders_alone_takes_its_example_from_their_first_batch(fitted):
    """Without a DataModule there is no training data: the search stopped with quantize()'s "give example_inputs",
    a function the caller never called, though the first validation batch shows what the model takes. Static int8
    still needs calibration data, which the validation data (what the candidates are judged on) must not be."""
    module, data = fitted
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1, latency_repeats=2)
    result = quantize_lightning(module, config, metric="val_acc", val_dataloaders=data.val_dataloader())
    assert result.recipe is not None and result.recipe.backend == "torch_ao"
    static = PTQConfig(approach="static", backends=("torch_ao",), max_trials=1, latency_repeats=2)
    with pytest.raises(ValueError, match=r"^quantize_lightning\(approach='static'\): val_dataloaders alone give no "
                                         r"calibration data"):
        quantize_lightning(module, static, metric="val_acc", val_dataloaders=data.val_dataloader())

    class ValidationOnly(L.LightningDataModule):  # its train_dataloader is Lightning's, which raises
        def val_dataloader(self):
            return data.val_dataloader()

    result = quantize_lightning(module, config, metric="val_acc", datamodule=ValidationOnly())
    assert result.recipe is not None
    # static: named in this function's words (quantize's named its calibration_data argument, not given here)
    with pytest.raises(ValueError, match=r"^quantize_lightning\(approach='static'\): the DataModule's "
                                         r"train_dataloader is missing; .* give calibration_data="):
        quantize_lightning(module, static, metric="val_acc", datamodule=ValidationOnly())

    class Loaders:  # an object with loaders, no LightningDataModule (is_overridden failed on it); validated on
        # the loaders given beside it
        def setup(self, stage):
            pass

        def train_dataloader(self):
            return data.train_dataloader()

        def val_dataloader(self):
            return data.val_dataloader()

    result = quantize_lightning(module, static, metric="val_acc", datamodule=Loaders(),
                                val_dataloaders=data.val_dataloader())
    assert result.recipe is not None and result.recipe.approach == "static"


def test_quantize_on_fit_end_judges_on_the_fits_validation_limits(digits):
    """The candidates were judged on the whole validation set where the fit validated on limit_val_batches: the
    baseline did not match the score the fit logged for the same weights (and the search ran longer than asked)."""
    torch.manual_seed(0)
    callback = QuantizeOnFitEnd(CONFIG, metric="val_acc")
    trainer = _trainer(max_epochs=1, limit_val_batches=1, num_sanity_val_steps=0, callbacks=[callback])
    trainer.fit(DigitsModule(), datamodule=DigitsData(digits))
    assert callback.result.baseline_metric == pytest.approx(float(trainer.callback_metrics["val_acc"]))
    whole = _trainer().validate(trainer.lightning_module, datamodule=DigitsData(digits), verbose=False)[0]["val_acc"]
    assert whole != pytest.approx(callback.result.baseline_metric)  # (else the test tells nothing)
    # a fit that skipped validation (limit 0) lends no limit: the whole set judges, as before (it judged on nothing)
    skipped = QuantizeOnFitEnd(CONFIG, metric="val_acc")
    _trainer(max_epochs=1, limit_val_batches=0, callbacks=[skipped]).fit(DigitsModule(), datamodule=DigitsData(digits))
    assert skipped.result is not None and skipped.result.baseline_metric > 0
