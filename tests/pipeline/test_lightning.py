"""The pipeline on a LightningModule with the real Trainer: fine-tuning while pruning, stages judged by the module's
own logged metrics."""

from __future__ import annotations

import re

import lightning as L
import pytest
from lightning.pytorch.callbacks import GradientAccumulationScheduler
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from litcompress import ModelPruning
from litcompress.callbacks import CompressOnFitEnd
from litcompress.data import DigitsDataModule
from litcompress.models import MLPClassifier
from litcompress.pipeline import CompressionConfig, PruneConfig
from litcompress.pipeline.lightning import compress_lightning, optimizer_steps
from litcompress.pruning import effective_tensor, is_pruned
from litcompress.pruning.schedules import PolynomialDecay
from litcompress.quantization import PTQConfig
from tests.conftest import StepsTwoOptimizers


def _trainer(devices: int = 1, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.fixture(scope="module")
def fitted():
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    module = MLPClassifier(hidden=(64, 64), lr=1e-2)
    _trainer(max_epochs=4).fit(module, datamodule=data)
    return module, data


def test_fine_tunes_while_pruning_and_reports_the_modules_own_metrics(fitted, tmp_path):
    module, data = fitted
    before = {k: v.clone() for k, v in module.state_dict().items()}
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured", rounds=4),
                               quantize=PTQConfig(backends=("torch_ao",)), latency_repeats=2)
    result = compress_lightning(module, config, datamodule=data, metric="val_acc", test_metric="test_acc",
                                fine_tune_epochs=2, output_dir=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert not any(is_pruned(m, "weight") for m in module.modules())

    report = result.report
    assert [s.stage for s in report.stages] == ["input", "pruned", "shrunk", "quantized"]
    steps = 2 * len(data.train_dataloader())
    assert f"3 rounds during {steps} fine-tuning steps" in report["pruned"].description  # the 4th has none left
    # The input row is what trainer.validate/test logs for the untouched module.
    validated = _trainer().validate(module, datamodule=data, verbose=False)[0]["val_acc"]
    tested = _trainer().test(module, datamodule=data, verbose=False)[0]["test_acc"]
    assert report["input"].metric == pytest.approx(validated) and report["input"].test_metric == pytest.approx(tested)
    # Fine-tuning trained the surviving weights (not only masked them).
    pruned = result.stage_models["pruned"]
    first_in, first_pruned = module.net[0].weight, pruned.net[0].weight
    kept = first_pruned.abs().sum(1) != 0
    assert int(kept.sum()) == 32 and not torch.allclose(first_in[kept], first_pruned[kept])
    shrunk = result.stage_models["shrunk"]
    assert isinstance(shrunk, MLPClassifier)  # class and forward kept; narrower layers
    assert [m.out_features for m in shrunk.net if isinstance(m, nn.Linear)] == [32, 32, 10]
    assert report["quantized"].metric >= 0.99 * report["shrunk"].metric
    assert result.artifact is not None and result.artifact.exists()


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.parametrize(("batches", "epochs", "kwargs"), [
    (7, 2, {}),
    (7, 3, {"limit_train_batches": 3}),
    (7, 2, {"limit_train_batches": 0.5}),
    (7, 2, {"accumulate_grad_batches": 3}),
    (7, 5, {"max_steps": 9}),
    # counted as all the batches: the schedule was laid over 34 steps where 4 ran
    (7, 2, {"overfit_batches": 2}),
    (7, 2, {"overfit_batches": 0.5}),
    (7, 3, {"fast_dev_run": True}),
    (7, 3, {"fast_dev_run": 2}),
    # accumulation per epoch from a callback: one step per batch was counted (a schedule over 21 steps where 8 ran)
    (7, 3, {"callbacks": [GradientAccumulationScheduler({0: 4, 2: 2})]}),
    (7, 2, {"callbacks": GradientAccumulationScheduler({1: 3})}),
])
def test_optimizer_steps_match_what_the_trainer_does(batches, epochs, kwargs):
    model = MLPClassifier(in_features=4, hidden=(4,), num_classes=2)
    loader = DataLoader(TensorDataset(torch.randn(batches * 2, 4), torch.randint(0, 2, (batches * 2,))), batch_size=2)
    trainer = _trainer(max_epochs=epochs, limit_val_batches=0, **kwargs)
    trainer.fit(model, train_dataloaders=loader)
    assert optimizer_steps(batches, epochs, kwargs) == trainer.global_step


def test_several_dataloaders_the_schedule_spans_the_longest_and_the_metric_is_the_named_loaders():
    """A dict of training loaders and a list of validation loaders: fine-tuning runs as many steps per epoch as the
    longest training loader has (the schedule ends on its last step), tracing and calibration read the first
    loaders, and each stage is judged by the metric of the validation loader it names."""
    from tests.conftest import TwoValidationSetsClassifier, TwoValidationSetsData

    L.seed_everything(0)
    data = TwoValidationSetsData(two_train_loaders=True)
    module = TwoValidationSetsClassifier()
    _trainer(max_epochs=2).fit(module, datamodule=data)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.6, rounds=4),
                               quantize=PTQConfig(approach="static", backends=("torch_ao",)), latency_repeats=2)
    result = compress_lightning(module, config, datamodule=data, metric="val_acc/dataloader_idx_1",
                                fine_tune_epochs=1)
    report = result.report
    steps = max(len(loader) for loader in data.train_dataloader().values())  # 32, not the 2 loaders of the dict
    assert f"rounds during {steps} fine-tuning steps" in report["pruned"].description
    assert report["pruned"].weight_sparsity == pytest.approx(0.6, abs=1e-3)  # the schedule ended
    second = _trainer().validate(module, datamodule=data, verbose=False)[1]["val_acc/dataloader_idx_1"]
    assert report["input"].metric == pytest.approx(second)
    assert report["quantized"].description.startswith("torch_ao static")


def test_a_submodule_is_compressed_and_fine_tuned_inside_its_host(fitted):
    module, data = fitted
    config = CompressionConfig(prune=PruneConfig(sparsity=0.7), export=False, latency_repeats=2)
    result = compress_lightning(module, config, datamodule=data, submodule="net", fine_tune_epochs=1,
                                trainer_kwargs={"limit_train_batches": 5})
    assert type(result.model) is nn.Sequential
    assert result.report["pruned"].weight_sparsity == pytest.approx(0.7, abs=1e-4)
    assert "rounds during 5 fine-tuning steps" in result.report["pruned"].description


def test_a_single_callback_in_trainer_kwargs_is_taken_as_trainer_takes_it(fitted):
    """`Trainer(callbacks=cb)` takes one Callback; the pipeline unpacked it: TypeError after the input's evaluation."""
    module, data = fitted
    seen = []

    class CountsBatches(L.Callback):
        def on_train_batch_end(self, *args):
            seen.append(1)

    compress_lightning(module, CompressionConfig(prune=PruneConfig(sparsity=0.5)), datamodule=data,
                       fine_tune_epochs=1, trainer_kwargs={"callbacks": CountsBatches(), "limit_train_batches": 3})
    assert len(seen) == 3


class BackboneHead(L.LightningModule):
    """A sub-module to compress (`backbone`) and layers outside it, a batch norm among them, that its optimizer
    covers too."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Sequential(nn.BatchNorm1d(32), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_only_the_submodule_fine_tunes_the_layers_outside_it_stay_as_the_result_is_judged_with_them():
    """The user's optimizer trained the head outside `submodule` too, and the pipeline dropped it: the result (the
    sub-module) is judged inside the module given, with its head as it was."""
    L.seed_everything(0)
    data, module = DigitsDataModule(batch_size=64), BackboneHead()
    _trainer(max_epochs=1, limit_train_batches=5).fit(module, datamodule=data)
    head_before = {k: v.clone() for k, v in module.head.state_dict().items()}
    seen = {}

    class SeesTheHost(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("modes", []).append((pl_module.head.training, pl_module.head[0].training,
                                                 pl_module.backbone.training, pl_module.training))

        def on_train_end(self, trainer, pl_module):
            seen["head"] = {k: v.clone() for k, v in pl_module.head.state_dict().items()}
            seen["backbone"] = pl_module.backbone

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"), quantize=None, export=False,
                               latency_repeats=2)
    result = compress_lightning(module, config, datamodule=data, fine_tune_epochs=1, submodule="backbone",
                                trainer_kwargs={"callbacks": [SeesTheHost()], "limit_train_batches": 3})
    assert seen["modes"] == [(False, False, True, True)] * 3
    assert all(torch.equal(value, head_before[key]) for key, value in seen["head"].items())  # running stats too
    assert not torch.equal(effective_tensor(seen["backbone"][0], "weight"), module.backbone[0].weight)  # it trained
    assert all(p.requires_grad for p in module.parameters())
    # the reported metric is the result's inside the module given
    host = BackboneHead()
    host.load_state_dict(module.state_dict())
    host.backbone = result.stage_models["pruned"]
    validated = _trainer().validate(host, datamodule=data, verbose=False)[0]["val_acc"]
    assert result.report["pruned"].metric == pytest.approx(validated)


class WrappedMLP(MLPClassifier):
    """Its steps call `self(x)`, which calls a model two attributes down: `self.wrap.net`."""

    def __init__(self) -> None:
        super().__init__(hidden=(32,))
        wrap, wrap.net = nn.Module(), self.net
        del self.net
        self.wrap = wrap

    def forward(self, x):
        return self.wrap.net(x)


def test_a_submodule_named_by_a_dotted_path_is_fine_tuned_and_shrunk_inside_its_host():
    """'wrap.net' was refused ("has no such sub-module"), and the fine-tuning set the copy as an attribute named
    'wrap.net' (getattr/setattr), not the sub-module."""
    L.seed_everything(0)
    data, module = DigitsDataModule(batch_size=256), WrappedMLP()
    _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(module, datamodule=data)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"), latency_repeats=2,
                               export=False)
    result = compress_lightning(module, config, datamodule=data, fine_tune_epochs=1, submodule="wrap.net",
                                trainer_kwargs={"limit_train_batches": 2})
    assert [m.out_features for m in result.model if isinstance(m, nn.Linear)] == [16, 10]
    assert [m.out_features for m in module.wrap.net if isinstance(m, nn.Linear)] == [32, 10]  # the user's as it was


def test_a_module_given_in_eval_mode_fine_tunes_in_train_mode_and_is_left_as_it_was():
    """Lightning's fit keeps every module's mode: a module evaluated before (model.eval()) fine-tuned with its batch
    norms frozen on their old statistics (a digits ResNet: 40% where 90% was due), silently."""
    from litcompress.models import CNNClassifier

    L.seed_everything(0)
    module, data = CNNClassifier(channels=(8,)), DigitsDataModule(batch_size=64, flatten=False)
    module.eval()
    modes = []

    class BatchNormMode(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(all(m.training for m in pl_module.modules() if isinstance(m, nn.BatchNorm2d)))

    compress_lightning(module, CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=None), datamodule=data,
                       fine_tune_epochs=1, trainer_kwargs={"callbacks": [BatchNormMode()], "limit_train_batches": 2})
    assert modes == [True, True]
    assert not any(m.training for m in module.modules())  # the user's module: as given


def test_bad_arguments_fail_before_fine_tuning(fitted):
    module, data = fitted
    prune = CompressionConfig(prune=PruneConfig(sparsity=0.5))
    with pytest.raises(ValueError, match="without config.prune"):
        compress_lightning(module, CompressionConfig(), datamodule=data, fine_tune_epochs=1)
    with pytest.raises(ValueError, match="fine_tune_epochs=-1"):
        compress_lightning(module, prune, datamodule=data, fine_tune_epochs=-1)
    with pytest.raises(ValueError, match="submodule='body'"):
        compress_lightning(module, prune, datamodule=data, submodule="body")
    with pytest.raises(TypeError, match="expected a LightningModule"):
        compress_lightning(module.net, prune, datamodule=data)
    with pytest.raises(ValueError, match="give fine_tune_epochs instead"):
        compress_lightning(module, prune, datamodule=data, fine_tune_epochs=1, trainer_kwargs={"max_epochs": 3})
    for kwargs in ({"devices": 2}, {"strategy": "ddp"}, {"num_nodes": 2}):
        with pytest.raises(ValueError, match="fine-tunes in this process, on one device"):
            compress_lightning(module, prune, datamodule=data, fine_tune_epochs=1, trainer_kwargs=kwargs)
    # failed when the fine-tuning Trainer was built, after the input's evaluation (or never, without fine-tuning)
    for epochs in (1, 0):
        with pytest.raises(TypeError, match=r"Trainer takes no 'max_step' \('max_step': did you mean 'max_steps'\?\)"):
            compress_lightning(module, prune, datamodule=data, fine_tune_epochs=epochs,
                               trainer_kwargs={"max_step": 3})
    # failed after the input's evaluation, or (a true half precision) after the whole fine-tuning: the fit converted
    # the pipeline's copy, which every stage evaluates in float32
    for kwargs, message in [({"precision": "bogus"}, "the fine-tuning Trainer cannot be built with them: "
                                                     "ValueError: Precision 'bogus'"),
                            ({"precision": "bf16-true"}, "the fit would convert the pipeline's copy to bfloat16"),
                            ({"precision": 64}, "the fit would convert the pipeline's copy to float64")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            compress_lightning(module, prune, datamodule=data, fine_tune_epochs=1, trainer_kwargs=kwargs)
    # A metric the module does not log fails on the first evaluation: the input, before any fine-tuning.
    with pytest.raises(KeyError, match="metric='val_accuracy' was not logged by MLPClassifier.validation_step"):
        compress_lightning(module, prune, datamodule=data, metric="val_accuracy", fine_tune_epochs=50)


def test_a_checkpoint_callback_given_is_kept_and_the_datamodule_stays_attached_to_the_users_trainer(tmp_path):
    """A ModelCheckpoint (or LearningRateMonitor) in trainer_kwargs failed against the pipeline's quiet defaults
    (enable_checkpointing=False, logger=False), after the input's evaluation; after fine-tuning, the user's
    DataModule was left attached to litcompress's Trainer (and, through it, to the pipeline's model copy)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    data = DigitsDataModule(batch_size=256)
    module = MLPClassifier(hidden=(16,))
    users = _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    users.fit(module, datamodule=data)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    compress_lightning(module, CompressionConfig(prune=PruneConfig(sparsity=0.5), latency_repeats=2, export=False),
                       datamodule=data, fine_tune_epochs=1,
                       trainer_kwargs={"callbacks": [checkpoints], "limit_train_batches": 2})
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    assert data.trainer is users


def test_a_validation_step_that_never_calls_the_model_fails_before_fine_tuning():
    """Every stage would report the input's metric (the step calls `self.net`, not the stage's model): refused at the
    input's evaluation, naming `submodule`; with it, the stages' metrics are their own."""
    from tests.conftest import SubmoduleStepsClassifier

    L.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    module = SubmoduleStepsClassifier(hidden=32)
    _trainer(max_epochs=2).fit(module, datamodule=data)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.9), quantize=None, latency_repeats=2)
    with pytest.raises(ValueError, match="never called self.*pass submodule='net'"):
        compress_lightning(module, config, datamodule=data, fine_tune_epochs=50)
    result = compress_lightning(module, config, datamodule=data, submodule="net", test_metric="test_acc")
    report = result.report
    assert report["pruned"].metric != report["input"].metric  # 90% of the weights gone in one shot
    assert report["pruned"].test_metric != report["input"].test_metric


class LogsNegatedLoss(MLPClassifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_neg_loss", -nn.functional.cross_entropy(self(x), y), on_epoch=True)  # higher is better


def test_a_metric_read_as_a_loss_with_mode_max_is_judged_higher_is_better_at_fit_end(tmp_path):
    """mode='max', as the refusal without a mode advises, passed construction; compress_lightning at the fit's end
    was called without it and refused the metric after the whole training run."""
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=PTQConfig(
        approach="dynamic", backends=("onnxruntime",), max_trials=1, latency_repeats=2), latency_repeats=2,
        export=False)
    callback = CompressOnFitEnd(config, metric="val_neg_loss", mode="max", output_dir=tmp_path, plot=False)
    _trainer(max_epochs=1, limit_train_batches=4, callbacks=[callback]).fit(
        LogsNegatedLoss(hidden=(16,)), datamodule=DigitsDataModule())
    baseline = callback.result.report["pruned"].metric
    assert baseline < 0 and f"goal: metric >= {baseline * 1.01:.6g}" in " ".join(callback.result.report.messages)


def test_a_loss_as_the_metric_needs_its_mode_and_then_the_goal_bounds_it_from_above(fitted, tmp_path):
    module, data = fitted
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=PTQConfig(
        approach="dynamic", backends=("torch_ao", "onnxruntime"), max_trials=4, latency_repeats=2), latency_repeats=2,
        export=False)
    for refused in (lambda: compress_lightning(module, config, datamodule=data, metric="val_loss", fine_tune_epochs=50),
                    lambda: CompressOnFitEnd(config, metric="val_loss", output_dir=tmp_path)):
        with pytest.raises(ValueError, match=r"\(metric='val_loss'\): it reads as a loss.*Pass mode='min'"):
            refused()
    with pytest.raises(ValueError, match="mode='least'"):
        compress_lightning(module, CompressionConfig(), datamodule=data, metric="val_loss", mode="least")
    result = compress_lightning(module, config, datamodule=data, metric="val_loss", mode="min")
    baseline = result.report["pruned"].metric
    assert f"quantization: fp32 baseline metric {baseline:.6g}; goal: metric <= {baseline * 1.01:.6g}" in \
        result.report.messages
    assert result.quantization.goal_met and result.quantization.metric <= baseline * 1.01
    assert config.quantize.accuracy.higher_is_better  # the caller's config is left as it was
    # Without quantization the direction decides nothing: no mode needed.
    unquantized = compress_lightning(module, CompressionConfig(prune=PruneConfig(sparsity=0.5), latency_repeats=2,
                                                               export=False), datamodule=data, metric="val_loss")
    assert [s.stage for s in unquantized.report.stages] == ["input", "pruned"]


def test_mode_without_a_quantize_stage_decides_whether_one_shot_pruning_lost_the_metric(fitted):
    """mode was checked and dropped without a quantize stage: a loss that fell after pruning was said to be lost,
    with the advice to fine-tune to recover it."""
    module, data = fitted
    config = CompressionConfig(prune=PruneConfig(sparsity=0.97), latency_repeats=2, export=False)
    said, changes = {}, {}
    for mode in ("min", "max"):
        report = compress_lightning(module, config, datamodule=data, metric="val_loss", mode=mode).report
        changes[mode] = report["pruned"].metric - report["input"].metric
        said[mode] = any(m.startswith("pruned in one shot") for m in report.messages)
    assert changes["min"] == changes["max"] and abs(changes["min"]) > 0.01 * abs(report["input"].metric)
    worse = "min" if changes["min"] > 0 else "max"  # the loss rose: a loss under min, a gain under max
    assert said == {worse: True, ("max" if worse == "min" else "min"): False}


def test_compress_on_fit_end_shrinks_and_quantizes_what_model_pruning_pruned(tmp_path):
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    module = MLPClassifier(hidden=(64, 64), lr=1e-2)
    steps = 3 * 17  # 3 epochs of 17 batches
    pruning = ModelPruning("ln_structured", amount=PolynomialDecay(final_sparsity=0.5, begin=0, end=steps // 2,
                                                                   frequency=5),
                           parameters_to_prune=[(module.net[0], "weight"), (module.net[2], "weight")],
                           pruning_dim=0, pruning_norm=2, use_global_unstructured=False,
                           use_lottery_ticket_hypothesis=False)
    compressing = CompressOnFitEnd(CompressionConfig(quantize=PTQConfig(backends=("torch_ao",)), latency_repeats=2),
                                   test_metric="test_acc", output_dir=tmp_path)
    _trainer(max_epochs=3, callbacks=[pruning, compressing]).fit(module, datamodule=data)
    report = compressing.result.report
    assert [s.stage for s in report.stages] == ["input", "shrunk", "quantized"]
    assert report["input"].weight_sparsity == pytest.approx((32 * 64 + 32 * 64) / (64 * 64 + 64 * 64 + 10 * 64))
    assert [m.out_features for m in compressing.result.stage_models["shrunk"].net if isinstance(m, nn.Linear)] == \
        [32, 32, 10]
    assert {"report.json", "report.md", "report.png", "model.pt"} <= {p.name for p in tmp_path.iterdir()}
    assert report["quantized"].test_metric is not None


class TwoOptimizerMLP(StepsTwoOptimizers, MLPClassifier):
    """One optimizer for the first layer, one for the rest."""

    def loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def optimizer_groups(self):
        layers = [m for m in self.net if isinstance(m, nn.Linear)]
        return [layers[0].parameters(), [p for m in layers[1:] for p in m.parameters()]]


def test_fine_tuning_under_manual_optimization_follows_the_schedule_over_the_batches(fitted):
    """The schedule is sized in batches then (a batch makes as many optimizer steps as its training_step takes):
    the sparsity reaches its target at `end` (60%) of the fine-tuning, not at 30% as two steps per batch made it."""
    _, data = fitted
    module = TwoOptimizerMLP(hidden=(64, 64), lr=1e-2)
    module.load_state_dict(fitted[0].state_dict())
    reached: list[int] = []

    class FirstBatchAtTarget(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights = [effective_tensor(m, "weight") for m in pl_module.net if isinstance(m, nn.Linear)]
            if not reached and sum(int((w == 0).sum()) for w in weights) >= 0.5 * sum(w.numel() for w in weights) - 1:
                reached.append(batch_idx + trainer.current_epoch * len(data.train_dataloader()) + 1)

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), shrink=False, quantize=None, export=False,
                               latency_repeats=2)
    result = compress_lightning(module, config, datamodule=data, fine_tune_epochs=2,
                                trainer_kwargs={"callbacks": [FirstBatchAtTarget()]})
    batches = 2 * len(data.train_dataloader())
    assert result.report["pruned"].weight_sparsity == pytest.approx(0.5, abs=1e-3)
    assert reached and reached[0] >= 0.55 * batches, (reached, batches)


class SpoilTheLastEpoch(L.Callback):
    """Noise on the first layer before the last validation: the fit ends worse than its best checkpoint."""

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.current_epoch == trainer.max_epochs - 1:
            with torch.no_grad():
                pl_module.net[0].weight.add_(torch.randn_like(pl_module.net[0].weight))


def test_compress_on_fit_end_can_take_the_best_checkpoints_weights(tmp_path):
    """`weights="best"`: the input row is the monitored ModelCheckpoint's best score, not the last epoch's."""
    L.seed_everything(0)
    module = MLPClassifier(hidden=(32,), lr=1e-2)

    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max")
    compressing = CompressOnFitEnd(CompressionConfig(quantize=None, latency_repeats=2), output_dir=tmp_path / "out",
                                   weights="best")
    L.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[SpoilTheLastEpoch(), checkpoint, compressing],
              ).fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert compressing.result.report["input"].metric == pytest.approx(float(checkpoint.best_model_score))
    assert float(module.trainer.callback_metrics["val_acc"]) < float(checkpoint.best_model_score) - 0.05


def test_weights_best_passes_over_a_model_checkpoint_that_keeps_no_file(tmp_path):
    """A monitoring ModelCheckpoint(save_top_k=0) listed first was chosen: it saved nothing, so the last weights
    were compressed beside another's best file; alone, it was accepted at setup and fell back after the fit."""
    L.seed_everything(0)
    module = MLPClassifier(hidden=(32,), lr=1e-2)

    keeps_none = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "none", monitor="val_loss", save_top_k=0)
    best = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_acc", mode="max")
    compressing = CompressOnFitEnd(CompressionConfig(quantize=None, latency_repeats=2), output_dir=tmp_path / "out",
                                   weights="best")
    L.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[SpoilTheLastEpoch(), keeps_none, best, compressing],
              ).fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert compressing.result.report["input"].metric == pytest.approx(float(best.best_model_score))
    alone = CompressOnFitEnd(CompressionConfig(quantize=None), output_dir=tmp_path / "out", weights="best")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(monitor="val_acc", save_top_k=0), alone])
    with pytest.raises(ValueError, match=r"monitors a metric and keeps a file \(with save_top_k=0 it keeps none\)"):
        trainer.fit(MLPClassifier(hidden=(8,)), datamodule=DigitsDataModule(batch_size=64))
    assert trainer.global_step == 0


@pytest.mark.parametrize("input_fn", [lambda batch: batch[0], lambda batch: (t for t in batch[:1])],
                         ids=["tensor", "generator"])
def test_an_input_fn_that_returns_the_tensor_itself_or_an_iterable_gives_those_inputs(tmp_path, input_fn):
    """tuple() split a tensor along its batch dim: 64 inputs, refused after the whole fit in words that did not
    name input_fn; a generator (which quantize and compress take) was refused as the example's inputs."""
    L.seed_everything(0)
    given = []  # what input_fn returned, as the model got it (calibration, example inputs)

    def recorded(batch):
        inputs = input_fn(batch)
        inputs = inputs if isinstance(inputs, torch.Tensor) else tuple(inputs)
        given.append(inputs)
        return inputs

    compressing = CompressOnFitEnd(CompressionConfig(quantize=PTQConfig(approach="static", backends=("torch_ao",),
                                                                        latency_repeats=2), latency_repeats=2),
                                   output_dir=tmp_path, input_fn=recorded)
    _trainer(max_epochs=3, callbacks=[compressing]).fit(MLPClassifier(hidden=(16,), lr=1e-2),
                                                        datamodule=DigitsDataModule(batch_size=64))
    assert given and all(torch.is_tensor(x) or (len(x) == 1 and x[0].shape[1:] == (64,)) for x in given)
    report = compressing.result.report
    # calibrated on those inputs (the images), int8 keeps the accuracy: on anything else (zeros) its ranges fail
    assert report["input"].metric > 0.5 and report["quantized"].metric >= report["input"].metric - 0.05


def test_a_dataset_given_for_a_dataloader_is_refused_when_given(tmp_path):
    """Its items are single samples: the first evaluation failed inside test_step with an IndexError, for
    CompressOnFitEnd after the whole fit."""
    dataset = TensorDataset(torch.randn(8, 64), torch.randint(0, 10, (8,)))
    loader = DataLoader(dataset, batch_size=4)
    with pytest.raises(TypeError, match=r"CompressOnFitEnd\(test_dataloaders=TensorDataset\): a Dataset gives "
                                        r"single samples, .*DataLoader\(dataset, batch_size=32\)"):
        CompressOnFitEnd(CompressionConfig(quantize=None), output_dir=tmp_path, test_metric="test_acc",
                         test_dataloaders=dataset)
    for argument in ("train_dataloaders", "val_dataloaders"):
        given = {"train_dataloaders": loader, "val_dataloaders": loader, argument: dataset}
        with pytest.raises(TypeError, match=rf"compress_lightning\({argument}=TensorDataset\): a Dataset gives"):
            compress_lightning(MLPClassifier(hidden=(8,)), CompressionConfig(quantize=None), **given)

    from litcompress.pipeline.lightning import _refuse_a_dataset

    class Batches(torch.utils.data.IterableDataset):  # Lightning takes one that gives whole batches
        def __iter__(self):
            return iter(loader)

    _refuse_a_dataset(Batches(), "val_dataloaders", "compress_lightning")


def test_compress_on_fit_end_scores_the_input_as_the_fit_logged_it_with_its_validation_limits(tmp_path):
    """The fit validated on 2 batches, the input row on every batch: the two scores printed together disagreed
    (QuantizeOnFitEnd lent the fit's limits already)."""
    torch.manual_seed(0)
    logged = {}

    class Logged(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                logged["val_acc"] = float(trainer.callback_metrics["val_acc"])

    compressing = CompressOnFitEnd(CompressionConfig(quantize=None, latency_repeats=2), output_dir=tmp_path)
    fit = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=2,
                    logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    callbacks=[Logged(), compressing])
    fit.fit(MLPClassifier(hidden=(16,)), datamodule=DigitsDataModule(batch_size=64))
    assert compressing.result.report["input"].metric == pytest.approx(logged["val_acc"])
    assert fit.limit_val_batches == 2  # lent, left as it was


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_compress_on_fit_end_needs_validation_data_and_says_so_before_training(tmp_path):
    module = MLPClassifier(in_features=4, hidden=(4,), num_classes=2)
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    callback = CompressOnFitEnd(CompressionConfig(), output_dir=tmp_path)
    trainer = _trainer(max_epochs=1, callbacks=[callback])
    with pytest.raises(ValueError, match="needs validation data.*trainer.fit\\(model, train_loader, val_loader\\)"):
        trainer.fit(module, train_dataloaders=loader)
    assert callback.result is None and not any(tmp_path.iterdir()) and trainer.global_step == 0

    class TrainingOnly(L.LightningDataModule):  # a DataModule without val_dataloader: refused alike, not after fit
        def train_dataloader(self):
            return loader

    trainer = _trainer(max_epochs=1, callbacks=[callback])
    with pytest.raises(ValueError, match="needs validation data.*trainer.fit\\(model, datamodule=...\\) with a "
                                         "val_dataloader"):
        trainer.fit(module, datamodule=TrainingOnly())
    assert trainer.global_step == 0
    tested = CompressOnFitEnd(CompressionConfig(), test_metric="test_acc", output_dir=tmp_path)
    trainer = _trainer(max_epochs=1, callbacks=[tested])
    with pytest.raises(ValueError, match="test_metric='test_acc'.*pass CompressOnFitEnd\\(test_dataloaders=...\\)"):
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert trainer.global_step == 0
    with pytest.raises(TypeError, match="expected a CompressionConfig"):
        CompressOnFitEnd(PTQConfig(), output_dir=tmp_path)
    # a test loader without its metric: compress_lightning refused it after the whole fit
    with pytest.raises(ValueError, match=r"test_dataloaders=...\) without test_metric=: name the metric"):
        CompressOnFitEnd(CompressionConfig(), output_dir=tmp_path, test_dataloaders=loader)


def test_compress_on_fit_end_reads_the_test_metric_on_the_modules_own_test_dataloader(tmp_path):
    """A module with its own *_dataloader hooks, fitted alone: its test_metric was refused ('pass
    test_dataloaders=...') though its test_dataloader() logs it."""
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")

    class WithItsData(MLPClassifier):
        def setup(self, stage):  # the test loader is built for the test stage only, as Lightning calls it
            if stage == "test":
                self.test_loader = data.test_dataloader()

        def train_dataloader(self):
            return data.train_dataloader()

        def val_dataloader(self):
            return data.val_dataloader()

        def test_dataloader(self):
            return self.test_loader

    L.seed_everything(0)
    module = WithItsData(hidden=(16,), lr=1e-2)
    compressing = CompressOnFitEnd(CompressionConfig(quantize=None, export=False, latency_repeats=2),
                                   test_metric="test_acc", output_dir=tmp_path, plot=False)
    _trainer(max_epochs=1, callbacks=[compressing]).fit(module)
    tested = _trainer().test(module, verbose=False)[0]["test_acc"]
    assert compressing.result.report["input"].test_metric == pytest.approx(tested)


def test_dataloaders_given_to_fit_or_to_compress_lightning_serve_as_a_datamodule(tmp_path):
    """`trainer.fit(model, train_loader, val_loader)`, the way Lightning's own examples fit, with no DataModule:
    CompressOnFitEnd compresses with the fit's loaders, and compress_lightning takes loaders too."""
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    train, val, test = data.train_dataloader(), data.val_dataloader(), data.test_dataloader()
    module = MLPClassifier(hidden=(32,), lr=1e-2)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"), latency_repeats=2,
                               quantize=PTQConfig(approach="static", backends=("torch_ao",)), export=False)
    compressing = CompressOnFitEnd(config, test_metric="test_acc", test_dataloaders=test, output_dir=tmp_path)
    _trainer(max_epochs=2, callbacks=[compressing]).fit(module, train, val)
    report = compressing.result.report
    assert [s.stage for s in report.stages] == ["input", "pruned", "shrunk", "quantized"]
    validated = _trainer().validate(module, val, verbose=False)[0]["val_acc"]
    assert report["input"].metric == pytest.approx(validated) and report["input"].test_metric is not None
    again = compress_lightning(module, config, train_dataloaders=train, val_dataloaders=val, fine_tune_epochs=1)
    assert again.report["input"].metric == pytest.approx(validated)
    assert f"during {len(train)} fine-tuning steps" in again.report["pruned"].description
    with pytest.raises(ValueError, match="give a DataModule or dataloaders, not both"):
        compress_lightning(module, config, datamodule=data, val_dataloaders=val)
    with pytest.raises(ValueError, match="give datamodule=, or train_dataloaders="):
        compress_lightning(module, config, val_dataloaders=val)
    (tmp_path / "a_file").write_text("")  # an output folder under a file: said as such (it was 'Not a directory')
    with pytest.raises(ValueError, match=r"compress_lightning\(output_dir=.*a_file is a file, not a folder"):
        compress_lightning(module, config, train_dataloaders=train, val_dataloaders=val,
                           output_dir=tmp_path / "a_file" / "out")
    with pytest.raises(ValueError, match="test_metric='test_acc'. without test_dataloaders="):
        compress_lightning(module, config, train_dataloaders=train, val_dataloaders=val, test_metric="test_acc")
    # a test loader without its metric: the report had no test column, without a word
    with pytest.raises(ValueError, match=r"test_dataloaders=...\) without test_metric=: name the metric its test_step"):
        compress_lightning(module, config, train_dataloaders=train, val_dataloaders=val, test_dataloaders=test)


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_compress_on_fit_end_refuses_a_multi_process_fit_before_training(tmp_path):
    # Two real gloo processes: each rank's setup must refuse, before any file is written.
    module = MLPClassifier(hidden=(8,))
    callback = CompressOnFitEnd(CompressionConfig(), output_dir=tmp_path)
    trainer = _trainer(max_epochs=1, callbacks=[callback], strategy="ddp_spawn", devices=2)
    with pytest.raises(Exception, match="CompressOnFitEnd runs in a single process") as raised:
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert "compress_lightning" in str(raised.value)
    assert not any(tmp_path.iterdir())


def test_a_module_built_in_configure_model_is_compressed_from_a_built_copy(tmp_path):
    """compress_lightning (and the quantization search's evaluation) works on a copy whose layers are built, as a
    Trainer would build them; before, a module not yet fitted had nothing to prune ("nothing to prune: no Linear")."""
    from tests.conftest import ConfiguredDigitsClassifier

    L.seed_everything(0)
    module = ConfiguredDigitsClassifier()
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=PTQConfig(backends=("torch_ao",)),
                               latency_repeats=2, export=False)
    result = compress_lightning(module, config, datamodule=DigitsDataModule(batch_size=64), fine_tune_epochs=1)
    assert module.net is None  # the module given is untouched
    assert result.sparsity.sparsity == pytest.approx(0.5, abs=1e-3)
    assert [s.stage for s in result.report.stages][:2] == ["input", "pruned"]


def test_a_configure_model_hook_that_needs_the_trainer_is_let_pass_once_the_layers_exist(fitted, tmp_path):
    """A tensor-parallel module's configure_model reads the Trainer's device mesh, which a copy outside a Trainer has
    not: a fitted module (its layers built) is compressed all the same; one with no layers cannot be."""
    module, data = fitted

    class NeedsTrainer(MLPClassifier):
        def configure_model(self) -> None:
            if self._trainer is None:  # stands for reading self.device_mesh
                raise RuntimeError("no device mesh outside a Trainer")

    fitted_copy = NeedsTrainer(hidden=(64, 64), lr=1e-2)
    fitted_copy.load_state_dict(module.state_dict())
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), latency_repeats=2, export=False)
    result = compress_lightning(fitted_copy, config, datamodule=data)
    assert result.report["pruned"].metric > 0.8

    class EmptyNeedsTrainer(L.LightningModule):
        def configure_model(self) -> None:
            raise RuntimeError("no device mesh outside a Trainer")

    with pytest.raises(RuntimeError, match="no device mesh"):
        compress_lightning(EmptyNeedsTrainer(), config, datamodule=data)


def test_a_test_step_that_never_calls_the_model_fails_before_fine_tuning(fitted):
    """The test metric is report-only, taken for the stages kept at the end; the input's is taken first, so a test
    step that cannot judge a stage's model fails before the fine-tuning rather than after all of it."""

    class TestStepSkipsTheModel(MLPClassifier):
        def test_step(self, batch, batch_idx):
            self.log("test_acc", (self.net(batch[0]).argmax(1) == batch[1]).float().mean())

    module, data = fitted
    skipping = TestStepSkipsTheModel(hidden=(64, 64), lr=1e-2)
    skipping.load_state_dict(module.state_dict())
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=None, latency_repeats=2)
    epochs = []
    with pytest.raises(ValueError, match="TestStepSkipsTheModel.test_step never called self"):
        compress_lightning(skipping, config, datamodule=data, test_metric="test_acc", fine_tune_epochs=50,
                           trainer_kwargs={"callbacks": [L.pytorch.callbacks.LambdaCallback(
                               on_train_epoch_start=lambda *_: epochs.append(1))]})
    assert epochs == []


def test_compress_on_fit_end_warns_at_the_sanity_check_of_a_metric_it_did_not_log(tmp_path):
    callback = CompressOnFitEnd(CompressionConfig(quantize=None), metric="val_accuracy", output_dir=tmp_path)
    trainer = _trainer(max_epochs=1, limit_train_batches=2, callbacks=[callback])
    with pytest.warns(UserWarning, match=r"CompressOnFitEnd\(metric='val_accuracy'\) reads it when fit ends"):
        with pytest.raises(KeyError, match="val_accuracy"):
            trainer.fit(MLPClassifier(hidden=(8,)), datamodule=DigitsDataModule(batch_size=64))


@pytest.mark.parametrize("callback", ["quantize", "compress"])
def test_the_fit_end_callbacks_step_aside_under_fast_dev_run(tmp_path, caplog, callback):
    """fast_dev_run runs a batch of each loop to find bugs and writes no checkpoint; the callbacks ran their whole
    search (every candidate judged on the whole validation set) and wrote a model. They now say they are skipped."""
    import logging

    from litcompress.quantization.lightning import QuantizeOnFitEnd

    fit_end = (QuantizeOnFitEnd(PTQConfig(approach="dynamic"), metric="val_acc", save_path=tmp_path / "model.int8")
               if callback == "quantize" else
               CompressOnFitEnd(CompressionConfig(prune=None), metric="val_acc", output_dir=tmp_path / "out"))
    trainer = L.Trainer(fast_dev_run=True, callbacks=[fit_end], logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    fit_end.result = object()  # as a fit before with this callback leaves it: "its `result` stays None" kept it
    with caplog.at_level(logging.INFO, logger="litcompress"):
        trainer.fit(MLPClassifier(hidden=(16,)), datamodule=DigitsDataModule(batch_size=64))
    assert fit_end.result is None and list(tmp_path.iterdir()) == []
    assert f"{type(fit_end).__name__}: skipped under fast_dev_run" in caplog.text
    assert f"Fit without fast_dev_run to {callback} the model" in caplog.text


def test_compress_on_fit_end_refuses_a_sparsity_schedule_at_construction():
    """It trained the whole fit, then failed at its end with advice (fine_tune=...) this callback cannot take."""
    schedule = PolynomialDecay(final_sparsity=0.5, begin=0, end=4)
    with pytest.raises(ValueError, match=r"runs along fine-tuning steps.*PruneConfig\(schedule='oneshot'\).*"
                                         r"ModelPruning\(amount=<the schedule>\)"):
        CompressOnFitEnd(CompressionConfig(prune=PruneConfig(sparsity=0.5, schedule=schedule)), output_dir="out")


class _NetInsideAHost(L.LightningModule):
    """Steps that call `net` and then a batch norm outside it: the host's own state beside the sub-module's."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.norm = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(x))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.norm(self.net(batch[0])), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self.norm(self.net(batch[0])).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _CompiledNetInsideAHost(_NetInsideAHost):
    """Its `net` compiled: the host's keys are ``net._orig_mod.0.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.compile(self.net, backend="eager")


class _NetTwiceInsideAHost(_NetInsideAHost):
    """`net` also registered as `alias`, and its first weight tied into a layer outside it: three names, one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.alias = self.net
        self.tied = nn.Linear(64, 32, bias=False)  # (a bias of its own could not follow the shrunk outputs)
        self.tied.weight = self.net[0].weight


class _Affine(nn.Module):
    """Two parameters named as a pruning pair would be, `weight` and `weight_orig`, that are not one."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.weight_orig = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.weight_orig


class _AffineTwiceInsideAHost(_NetInsideAHost):
    """`net` ends in an _Affine, registered again as `alias`, and its `weight` tied into an _Affine outside `net`."""

    def __init__(self) -> None:
        super().__init__()
        self.net.append(_Affine(10))
        self.alias = self.net
        self.outer = _Affine(10)
        self.outer.weight = self.net[3].weight


class _Attending(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(64, 64)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).view(x.shape[0], 4, 16)
        tokens = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return self.head((tokens + self.ff(tokens)).mean(1))


class _AttentionTwiceInsideAHost(_NetInsideAHost):
    """`net` attends (shrink replaces its attention, new keys) and is registered again as `alias`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _Attending()
        self.alias = self.net


class _AttentionLayerTwiceInsideAHost(_NetInsideAHost):
    """A layer inside `net`, its attention (which shrink replaces), registered again outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _Attending()
        self.attention = self.net.attn


class _BiaslessLayerTwiceInsideAHost(_NetInsideAHost):
    """`net`'s last layer has no bias (shrink gives it one) and is registered again outside `net`."""

    def __init__(self) -> None:
        super().__init__()
        self.net[2] = nn.Linear(32, 10, bias=False)
        self.last = self.net[2]


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class _CompiledAboveTheSubmodule(_NetInsideAHost):
    """`backbone` compiled and its `encoder` compressed (held as backbone._orig_mod.encoder), also registered as
    `net`."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.compile(_Backbone(), backend="eager")
        self.net = self.backbone.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.backbone(x))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())


@pytest.mark.parametrize(("host", "submodule", "tie_masked"), [
    (_NetInsideAHost, "net", False), (_CompiledNetInsideAHost, "net", False), (_NetTwiceInsideAHost, "net", False),
    (_NetTwiceInsideAHost, "net", True), (_CompiledAboveTheSubmodule, "backbone.encoder", False),
    (_AffineTwiceInsideAHost, "net", False), (_AttentionTwiceInsideAHost, "net", False),
    (_AttentionLayerTwiceInsideAHost, "net", False), (_BiaslessLayerTwiceInsideAHost, "net", False)])
def test_a_submodules_state_files_load_into_the_module_the_user_built(tmp_path, host, submodule, tie_masked):
    """With `submodule`, pruned_state_dict.pt and shrunk_state_dict.pt were the sub-module's state (keys "0.weight"):
    the module the user built refused them (README: "loads into your unchanged architecture"). They are the host's
    now, its own entries (fixed while fine-tuning) beside the compressed sub-module's under its path, as the host
    names them (a compiled one's), and the sub-module's tensors under the host's other names hold its values (the
    user's, loaded after them, undid the pruning)."""
    from litcompress.pipeline.compress import PRUNED_STATE_FILE, SHRUNK_STATE_FILE
    from litcompress.pruning import load_shrunk_state_dict

    L.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    module = host()
    _trainer(max_epochs=1, limit_train_batches=5).fit(module, datamodule=data)
    if tie_masked:  # the tied layer outside `net` under a live mask: the host's state names the tensor weight_orig
        torch.nn.utils.prune.l1_unstructured(module.tied, "weight", 0.3)
    heads = 0.5 if host in (_AttentionTwiceInsideAHost, _AttentionLayerTwiceInsideAHost) else 0.0
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured", rounds=2, heads=heads),
                               export=False, latency_repeats=2)
    result = compress_lightning(module, config, datamodule=data, submodule=submodule, fine_tune_epochs=1,
                                trainer_kwargs={"limit_train_batches": 4}, output_dir=tmp_path)
    assert result.state_files == (tmp_path / PRUNED_STATE_FILE, tmp_path / SHRUNK_STATE_FILE)
    x = next(iter(data.val_dataloader()))[0]
    module.eval()
    for name, stage, load in [(PRUNED_STATE_FILE, "pruned", lambda m, s: m.load_state_dict(s)),
                              (SHRUNK_STATE_FILE, "shrunk", load_shrunk_state_dict)]:
        built = host()
        load(built, torch.load(tmp_path / name))  # strict: every key of the host, none other
        built.eval()
        with torch.no_grad():
            torch.testing.assert_close(built.net(x), result.stage_models[stage](x))
            torch.testing.assert_close(built(x), module.norm(result.stage_models[stage](x)))
        for key, value in module.norm.state_dict().items():  # the host's own entries, the user's
            assert torch.equal(built.norm.state_dict()[key], value), key
    # the shrunk file narrowed the fresh module's net
    assert sum(p.numel() for p in built.net.parameters()) == sum(
        p.numel() for p in result.stage_models["shrunk"].parameters()) < sum(p.numel() for p in module.net.parameters())
