"""`KnowledgeDistillation` under a real Lightning Trainer, and the pipeline's `distill=`: digits, real checkpoints."""

from __future__ import annotations

import dataclasses
import re
from collections import UserDict
from collections.abc import MutableMapping
import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, seed_everything
from torch import nn

from litcompress import ModelPruning
from litcompress.callbacks import KnowledgeDistillation
from litcompress.data import DigitsDataModule
from litcompress.distillation import DistillationConfig, distillation_loss
from litcompress.models import MLPClassifier
from litcompress.pipeline import CompressionConfig, PruneConfig
from litcompress.pipeline.lightning import compress_lightning
from litcompress.pruning.engine import deepcopy_model
from tests.conftest import StepsTwoOptimizers, fit_killed_and_resumed, make_trainer


class RecordLoss(Callback):
    """The loss each batch backpropagates, next to what it should be, computed from the batch and the models as they
    are before that backward: ``(1 - alpha) * cross-entropy + alpha * T^2 KL(teacher || student)``."""

    def __init__(self, distillation: KnowledgeDistillation, student: str | None = None) -> None:
        self.distillation, self.student = distillation, student
        self.pairs: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch

    def on_before_backward(self, trainer, pl_module, loss):
        x, y = self.batch
        model = pl_module if self.student is None else getattr(pl_module, self.student)
        config = self.distillation.config
        with torch.no_grad():
            outputs = model(x)
            term = distillation_loss(outputs, self.distillation.teacher(x), config.temperature)
            expected = (1 - config.alpha) * F.cross_entropy(outputs, y) + config.alpha * term
        self.pairs.append((float(loss.detach()), float(expected)))


def test_the_loss_backpropagated_is_the_weighted_sum_of_the_steps_loss_and_the_distillation_term(tmp_path):
    seed_everything(0)
    model, data = MLPClassifier(hidden=(32,), lr=1e-2), DigitsDataModule()
    make_trainer(tmp_path, max_epochs=2).fit(model, datamodule=data)  # a teacher that knows something
    distillation = KnowledgeDistillation(temperature=3.0, alpha=0.4)
    record = RecordLoss(distillation)
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[distillation, record])
    trainer.fit(model, datamodule=data)
    assert len(record.pairs) == 8
    for loss, expected in record.pairs:
        assert loss == pytest.approx(expected, rel=1e-5)
    assert trainer.callback_metrics["distill_loss"] > 0  # logged by the training step
    assert "training_step" not in model.__dict__  # the module's own step is back


def test_alpha_zero_trains_exactly_as_without_the_callback(tmp_path):
    def fit(callbacks: list) -> nn.Module:
        seed_everything(3)
        model = MLPClassifier(hidden=(24,), lr=1e-2)
        make_trainer(tmp_path, callbacks=callbacks).fit(model, datamodule=DigitsDataModule())
        return model

    plain, distilled = fit([]), fit([KnowledgeDistillation(alpha=0.0)])
    for key, value in plain.state_dict().items():
        assert torch.equal(distilled.state_dict()[key], value), key


class _ScalesItsInputInPlace(MLPClassifier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x /= 16.0  # digits' pixels are 0-16: scaled in place, as some users' forwards do
        return self.net(x)


@dataclasses.dataclass
class _Images:
    pixels: torch.Tensor


class _ScalesItsDataclassInPlace(MLPClassifier):
    """Trains on a dataclass of inputs (Lightning moves those between devices too)."""

    def forward(self, x: torch.Tensor | _Images) -> torch.Tensor:
        if not isinstance(x, _Images):  # validation
            return self.net(x / 16.0)
        x.pixels /= 16.0
        return self.net(x.pixels)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(_Images(batch[0])), batch[1])


@pytest.mark.parametrize("model_class", [_ScalesItsInputInPlace, _ScalesItsDataclassInPlace])
def test_the_teacher_sees_the_inputs_the_student_got_when_the_students_forward_changes_them_in_place(
        tmp_path, model_class):
    """The teacher ran after the student's forward, on the same tensors: it saw them scaled twice (a default teacher,
    the student itself at the first step, was compared on other inputs: a non-zero term), and its own in-place
    division changed a tensor the student's graph had saved, so backward failed, even at alpha=0."""
    def fit(callbacks: list, **overrides: Any) -> tuple[nn.Module, Any]:
        seed_everything(3)
        model = model_class(hidden=(24,), lr=1e-2)
        trainer = make_trainer(tmp_path, callbacks=callbacks, **overrides)
        trainer.fit(model, datamodule=DigitsDataModule())
        return model, trainer

    plain, _ = fit([])
    distilled, _ = fit([KnowledgeDistillation(alpha=0.0)])
    for key, value in plain.state_dict().items():
        assert torch.equal(distilled.state_dict()[key], value), key
    _, trainer = fit([KnowledgeDistillation(alpha=1.0)], max_epochs=1, limit_train_batches=1)
    # one step: the teacher is the student at fit start, on the same inputs, so the two outputs are equal
    assert float(trainer.callback_metrics["distill_loss"]) == pytest.approx(0.0, abs=1e-6)


def test_the_default_teacher_is_the_model_at_fit_start_and_stays_dense_while_a_pruning_callback_prunes(tmp_path):
    seed_everything(0)
    model = MLPClassifier(hidden=(32,), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    distillation = KnowledgeDistillation()
    pruning = ModelPruning("l1_unstructured", amount=0.5, use_lottery_ticket_hypothesis=False, verbose=0)
    make_trainer(tmp_path, callbacks=[distillation, pruning]).fit(model, datamodule=DigitsDataModule())
    teacher = distillation.teacher.state_dict()
    assert set(teacher) == set(before)  # plain keys: its pruning masks (none here) are folded
    for key, value in before.items():
        assert torch.equal(teacher[key], value), key  # frozen: no step reached it
    assert float((model.net[0].weight == 0).float().mean()) > 0.5  # the student was pruned (and trained)
    assert not any("teacher" in key for key in model.state_dict())  # nothing registered in the module
    assert set(distillation.state_dict()["teacher"]) == set(before)  # the teacher travels in the checkpoint


def test_the_default_teacher_of_a_module_compiled_as_lightning_documents_is_the_model_at_fit_start(tmp_path):
    # trainer.fit(torch.compile(module)): Lightning sets module.forward = compiled(module.forward), a closure over the
    # module's own bound forward, which a deep copy keeps: the teacher was the student (distillation term 0)
    seed_everything(0)
    model = MLPClassifier(hidden=(32,), lr=1e-1)
    at_fit_start = deepcopy_model(model)
    distillation = KnowledgeDistillation()
    make_trainer(tmp_path, max_epochs=2, callbacks=[distillation]).fit(torch.compile(model, backend="eager"),
                                                                        datamodule=DigitsDataModule())
    x = torch.randn(16, 64)
    with torch.no_grad():
        torch.testing.assert_close(distillation.teacher(x), at_fit_start(x), rtol=0, atol=0)
        assert (distillation.teacher(x) - model(x)).abs().max() > 1e-2  # the student trained away from it


class _ForwardReadsTheTrainer(MLPClassifier):
    def forward(self, x):
        return super().forward(x) * (1.0 if self.trainer.training else 1.0)


class _HoldsALock(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(hidden=(8,))
        self.lock = threading.Lock()


@pytest.mark.parametrize("model, error, message", [
    (_ForwardReadsTheTrainer(hidden=(8,)), RuntimeError,
     r"the teacher's forward failed \(RuntimeError: .* is not attached to a `Trainer`.*\)\. The teacher is a frozen "
     r"copy .* not attached to the Trainer .* Pass teacher="),
    (_HoldsALock(), TypeError,
     r"the default teacher is a deep copy of _HoldsALock .* copying it failed \(TypeError: cannot pickle "
     r"'_thread.lock' object\)\. Make the model copyable, or pass teacher="),
])
def test_a_model_the_default_teacher_cannot_copy_or_run_is_a_clear_error(tmp_path, model, error, message):
    """Lightning's words on the copy (naming a module that looks attached) or deepcopy's, without the teacher."""
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                           callbacks=[KnowledgeDistillation()])
    with pytest.raises(error, match=message):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert "training_step" not in vars(model)  # the module's own step is back


def test_killed_mid_fit_and_resumed_ends_as_an_uninterrupted_fit(tmp_path):
    callbacks: list[KnowledgeDistillation] = []

    def make_callback() -> KnowledgeDistillation:
        callbacks.append(KnowledgeDistillation(temperature=2.0, alpha=0.7))
        return callbacks[-1]

    reference, state, resumed = fit_killed_and_resumed(  # 17 steps an epoch: killed in epoch 1, resumed from epoch 0
        tmp_path, lambda: MLPClassifier(hidden=(24,), lr=1e-2), make_callback, DigitsDataModule, crash_step=25)
    MLPClassifier(hidden=(24,)).load_state_dict(state)  # the crash left a checkpoint of the plain architecture
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    uninterrupted, resumed_callback = callbacks[0], callbacks[2]
    for key, value in uninterrupted.teacher.state_dict().items():  # the teacher came back from the checkpoint
        assert torch.equal(resumed_callback.teacher.state_dict()[key], value), key
    assert not torch.equal(resumed_callback.teacher.net[0].weight, resumed.net[0].weight)
    assert "training_step" not in reference.__dict__ and "training_step" not in resumed.__dict__


def test_pruned_and_distilled_in_one_fit_killed_and_resumed_ends_as_an_uninterrupted_fit(tmp_path):
    made: list[list] = []

    def make_callbacks() -> list:
        made.append([KnowledgeDistillation(alpha=0.5),
                     ModelPruning("l1_unstructured", amount=0.3, use_lottery_ticket_hypothesis=False, verbose=0)])
        return made[-1]

    reference, state, resumed = fit_killed_and_resumed(
        tmp_path, lambda: MLPClassifier(hidden=(24,), lr=1e-2), make_callbacks, DigitsDataModule, crash_step=25)
    MLPClassifier(hidden=(24,)).load_state_dict(state)  # killed mid-schedule: the plain architecture's keys,
    assert float((state["net.0.weight"] == 0).float().mean()) > 0.2  # pruned (the masks are the callback's state)
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    teacher = made[0][0].teacher.state_dict()
    assert set(teacher) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}  # dense, plain keys
    for key, value in teacher.items():
        assert torch.equal(made[2][0].teacher.state_dict()[key], value), key


class _ManualDigits(StepsTwoOptimizers, MLPClassifier):
    def optimizer_groups(self) -> list[list[nn.Parameter]]:
        return [list(self.net[0].parameters()), list(self.net[2].parameters())]

    def loss(self, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])


def test_manual_optimization_is_refused_before_training(tmp_path):
    model = _ManualDigits(hidden=(16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="uses manual optimization, whose training_step runs backward itself"):
        make_trainer(tmp_path, callbacks=[KnowledgeDistillation()]).fit(model, datamodule=DigitsDataModule())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


class _CallsForward(MLPClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.forward(batch[0]), batch[1])  # bypasses __call__ and its hooks


def test_a_step_that_bypasses_the_models_call_is_a_clear_error_and_the_step_is_restored(tmp_path):
    model = _CallsForward(hidden=(16,))
    with pytest.raises(RuntimeError, match=r"never called self\(\.\.\.\) with gradients on.*or pass submodule="):
        make_trainer(tmp_path, callbacks=[KnowledgeDistillation()]).fit(model, datamodule=DigitsDataModule())
    assert "training_step" not in model.__dict__


class _DictStepOnNet(LightningModule):
    """Calls ``self.net`` itself, takes no batch_idx, and returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def training_step(self, batch: Any) -> dict[str, torch.Tensor]:
        logits = self.net(batch[0])
        with torch.no_grad():
            self.net(batch[0])  # a call without gradients is not distilled
        return {"loss": F.cross_entropy(logits, batch[1]), "logits": logits.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_submodule_a_step_without_batch_idx_and_a_dict_result_and_a_given_teacher(tmp_path):
    seed_everything(0)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).train()
    model = _DictStepOnNet()
    distillation = KnowledgeDistillation(teacher, submodule="net", temperature=2.0, alpha=0.5)
    record = RecordLoss(distillation, student="net")
    make_trainer(tmp_path, max_epochs=1, limit_val_batches=0,
                 callbacks=[distillation, record]).fit(model, datamodule=DigitsDataModule())
    assert len(record.pairs) == 4
    for loss, expected in record.pairs:
        assert loss == pytest.approx(expected, rel=1e-5)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # the caller's teacher untouched
    assert distillation.state_dict() == {}  # a given teacher is given again on resume, not saved


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match=r"alpha=2\): expected the distillation term's weight in \[0, 1\]"):
        KnowledgeDistillation(alpha=2)
    with pytest.raises(TypeError, match="teacher='dense.ckpt'\\): expected an nn.Module"):
        KnowledgeDistillation("dense.ckpt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="submodule=''"):
        KnowledgeDistillation(submodule="")


def test_an_unknown_submodule_fails_before_the_first_step(tmp_path):
    model = MLPClassifier(hidden=(16,))
    before = model.net[0].weight.clone()
    with pytest.raises(ValueError, match="submodule='body'\\): MLPClassifier has no such sub-module"):
        make_trainer(tmp_path, callbacks=[KnowledgeDistillation(submodule="body")]).fit(
            model, datamodule=DigitsDataModule())
    assert torch.equal(model.net[0].weight, before)


# ------------------------------------------------------------------------------------------------ the pipeline
def _pipeline(module: MLPClassifier, distill: DistillationConfig | None):
    seed_everything(0)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"), export=False,
                               latency_repeats=1)
    return compress_lightning(module, config, datamodule=DigitsDataModule(), fine_tune_epochs=2, distill=distill,
                              trainer_kwargs={"limit_train_batches": 5})


def test_the_pipeline_distils_from_the_input_model_and_alpha_zero_changes_nothing(tmp_path):
    seed_everything(0)
    module = MLPClassifier(hidden=(32, 32), lr=1e-2)
    make_trainer(tmp_path, max_epochs=3, limit_train_batches=None).fit(module, datamodule=DigitsDataModule())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    plain = _pipeline(module, None)
    off = _pipeline(module, DistillationConfig(alpha=0.0))
    on = _pipeline(module, DistillationConfig(temperature=2.0, alpha=0.9))
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())  # the input is never modified
    assert off.report["pruned"].metric == plain.report["pruned"].metric
    for key, value in plain.stage_models["pruned"].state_dict().items():
        assert torch.equal(off.stage_models["pruned"].state_dict()[key], value), key
    assert on.report["pruned"].description.endswith(", distilled (T=2, alpha=0.9)")
    assert not plain.report["pruned"].description.endswith(")")
    assert not torch.equal(on.stage_models["pruned"].state_dict()["net.0.weight"],
                           plain.stage_models["pruned"].state_dict()["net.0.weight"])


def test_the_pipeline_refuses_distillation_without_fine_tuning():
    with pytest.raises(ValueError, match="distill=...\\) without fine_tune_epochs"):
        compress_lightning(MLPClassifier(hidden=(8,)), CompressionConfig(prune=PruneConfig(sparsity=0.5)),
                           datamodule=DigitsDataModule(), distill=DistillationConfig())


class FeaturesThenLogits(MLPClassifier):
    """Returns (features, logits): a tuple's first tensor is not what distillation should read."""

    def forward(self, x):
        features = self.net[:-1](x)
        return features, self.net[-1](features)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x)[1], y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x)[1].argmax(1) == y).float().mean())


class DictOfOutputs(FeaturesThenLogits):
    def forward(self, x):
        return {"out": self.net(x)}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x)["out"], y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x)["out"].argmax(1) == y).float().mean())


def test_the_pipeline_takes_an_outputs_fn_and_checks_the_outputs_before_any_stage():
    """A model returning a dict failed at the first fine-tuning batch, after the input's evaluation, saying to pass an
    outputs_fn that compress_lightning did not take; a (features, logits) model distilled its features silently."""
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=None, export=False, latency_repeats=1)
    with pytest.raises(ValueError, match=r"compress_lightning\(distill=...\): on example_inputs, the model returned "
                                         r"dict, which holds no tensor to distill on.*pass outputs_fn="):
        compress_lightning(DictOfOutputs(hidden=(8,)), config, datamodule=DigitsDataModule(), fine_tune_epochs=1,
                           distill=DistillationConfig())
    with pytest.raises(ValueError, match=r"outputs_fn returned int for the model's outputs"):
        compress_lightning(DictOfOutputs(hidden=(8,)), config, datamodule=DigitsDataModule(), fine_tune_epochs=1,
                           distill=DistillationConfig(), outputs_fn=lambda outputs: 3)
    with pytest.raises(ValueError, match=r"outputs_fn=.*it picks the logits that distillation reads"):
        compress_lightning(DictOfOutputs(hidden=(8,)), config, datamodule=DigitsDataModule(), fine_tune_epochs=1,
                           outputs_fn=lambda outputs: outputs["out"])
    seed_everything(0)
    result = compress_lightning(FeaturesThenLogits(hidden=(16,)), config, datamodule=DigitsDataModule(),
                                fine_tune_epochs=1, distill=DistillationConfig(), outputs_fn=lambda outputs: outputs[1],
                                trainer_kwargs={"limit_train_batches": 3})
    assert result.report["pruned"].description.endswith(", distilled (T=1, alpha=0.5)")


def test_the_pipelines_check_of_the_outputs_keeps_a_layer_held_in_eval_mode_so():
    """The check put the model back with model.train(), every layer in train mode: a batch norm the user held in eval
    mode (to freeze its statistics) fine-tuned them under distillation only."""
    class HeldNorm(FeaturesThenLogits):
        def __init__(self) -> None:
            super().__init__(hidden=(16,))
            self.net[0] = nn.Sequential(self.net[0], nn.BatchNorm1d(16))

    modes = []

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(pl_module.net[0][1].training)

    module = HeldNorm()
    module.net[0][1].eval()
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=None, export=False, latency_repeats=1)
    compress_lightning(module, config, datamodule=DigitsDataModule(), fine_tune_epochs=1, distill=DistillationConfig(),
                       outputs_fn=lambda outputs: outputs[1],
                       trainer_kwargs={"callbacks": [Watch()], "limit_train_batches": 2})
    assert modes == [False, False]


@pytest.mark.parametrize(("quantized", "distilled_on"),
                         [("net", None), pytest.param("net", "net", marks=pytest.mark.slow), (None, None)])
def test_distillation_composes_with_quantization_aware_training_in_one_fit(tmp_path, quantized, distilled_on):
    # The student trains through int8 rounding (QAT's graph as the module's forward); the teacher is the fp32 model
    # copied at fit start, before QAT's forward is installed, so it never rounds. On one module (both on `net`, or
    # both on the LightningModule), QAT traced distillation's forward hook into its graph, which fixed the batch size
    # and failed when QAT started.
    from litcompress.callbacks import QuantizationAwareTraining

    def fit(alpha: float | None) -> tuple[MLPClassifier, QuantizationAwareTraining, KnowledgeDistillation | None]:
        seed_everything(5)
        model = MLPClassifier(hidden=(24,), lr=1e-2)
        qat = QuantizationAwareTraining(quantized)
        distillation = None if alpha is None else KnowledgeDistillation(alpha=alpha, temperature=2.0,
                                                                         submodule=distilled_on)
        callbacks = [qat] if distillation is None else [distillation, qat]
        trainer = make_trainer(tmp_path, max_epochs=2, callbacks=callbacks)
        trainer.fit(model, datamodule=DigitsDataModule())
        if distillation is not None:
            assert float(trainer.callback_metrics["distill_loss"]) > 0
        return model, qat, distillation

    seed_everything(5)
    initial = MLPClassifier(hidden=(24,), lr=1e-2).state_dict()
    alone, alone_qat, _ = fit(None)
    silent, silent_qat, _ = fit(0.0)
    distilled, distilled_qat, distillation = fit(0.7)
    # alpha 0: the very same QAT run (weights and int8 ranges), so the two callbacks do not disturb each other
    for key, value in alone.state_dict().items():
        assert torch.equal(silent.state_dict()[key], value), key
    silent_ranges = silent_qat.qat.fake_quant_state()
    assert all(torch.equal(silent_ranges[k], v) for k, v in alone_qat.qat.fake_quant_state().items())
    # alpha 0.7: the term reached the QAT graph's gradients; the teacher is the fp32 model from fit start
    assert not torch.equal(distilled.net[0].weight, alone.net[0].weight)
    teacher = distillation.teacher  # a copy of the distilled module: the LightningModule, or its `net`
    assert all("forward" not in module.__dict__ for module in teacher.modules())
    if distilled_on is not None:
        initial = {k.removeprefix(f"{distilled_on}."): v for k, v in initial.items() if k.startswith(distilled_on)}
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in initial.items())
    assert distilled_qat.result is not None and "forward" not in distilled.net.__dict__
    assert "forward" not in distilled.__dict__


@pytest.mark.parametrize(("quantized", "distilled_on"), [(None, "net"), ("net", "net.0")])
def test_distilling_a_layer_inside_the_quantized_module_is_refused_before_training(tmp_path, quantized, distilled_on):
    """The distillation's hook, on a layer inside the module QAT traces, was traced into the QAT graph: after all the
    fp32 epochs the first QAT step failed on a batch size 'fixed by the model's code (an RNN ...)'."""
    from litcompress.callbacks import QuantizationAwareTraining

    model = MLPClassifier(hidden=(16,))
    callbacks = [QuantizationAwareTraining(quantized, start_epoch=1), KnowledgeDistillation(submodule=distilled_on)]
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=callbacks)
    with pytest.raises(ValueError, match=rf"KnowledgeDistillation\(submodule='{re.escape(distilled_on)}'\) distils a "
                                         r"layer inside .*, which this callback quantizes as one traced graph"):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert trainer.global_step == 0


def test_a_users_hook_on_a_layer_inside_the_quantized_module_is_warned_of(tmp_path):
    """It is traced into the QAT graph and fired once, at the trace, never at a QAT step: silently."""
    from litcompress.callbacks import QuantizationAwareTraining

    model = MLPClassifier(hidden=(16,))
    calls = []
    model.net[0].register_forward_hook(lambda module, inputs, output: calls.append(1))
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=0,
                           callbacks=[QuantizationAwareTraining("net")])
    with pytest.warns(UserWarning, match=r"forward hooks on 0 inside Sequential are traced into its QAT graph: they "
                                         r"run once, at the trace, not at every step"):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert len(calls) == 1  # what the warning says


def test_the_teacher_copy_carries_no_hook_of_the_user_or_of_another_callback(tmp_path):
    """The copy kept the model's forward hooks: a feature-capturing hook fired on every teacher call too (after the
    student's, so it held the teacher's activations), as did a pruning callback's check."""
    seed_everything(0)
    model = MLPClassifier(hidden=(16,))
    captured = []
    model.net[0].register_forward_hook(lambda module, inputs, output: captured.append(output.shape))
    callback = KnowledgeDistillation()
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=0,
                 callbacks=[callback]).fit(model, datamodule=DigitsDataModule())
    assert len(captured) == 3  # the student's three training forwards, no teacher call
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in callback.teacher.modules())


class TiedPrunedOnOneHolder(MLPClassifier):
    """Two layers sharing one weight, pruned through one of them only (as torch's prune given one holder does)."""

    def __init__(self) -> None:
        super().__init__(hidden=(16,), lr=1e-2)
        self.a, self.b = nn.Linear(10, 10), nn.Linear(10, 10)
        self.b.weight = self.a.weight
        torch.nn.utils.prune.l1_unstructured(self.a, "weight", 0.5)

    def forward(self, x):
        return self.b(torch.relu(self.a(self.net(x))))


def test_the_default_teacher_of_tied_weights_masked_on_one_holder_computes_as_the_model_and_resumes(tmp_path):
    """Its copy's masks cannot be made permanent (b reads the tensor unmasked): the callback failed at fit start with
    make_permanent_'s refusal, a function the user never called; a teacher given as teacher= trained."""
    callbacks: list[KnowledgeDistillation] = []

    def make_callback() -> KnowledgeDistillation:
        callbacks.append(KnowledgeDistillation(temperature=2.0, alpha=0.5))
        return callbacks[-1]

    seed_everything(1)
    at_start = TiedPrunedOnOneHolder()
    reference, _, resumed = fit_killed_and_resumed(tmp_path, TiedPrunedOnOneHolder, make_callback, DigitsDataModule,
                                                   crash_step=25)
    x = torch.rand(8, 64)
    with torch.no_grad():
        torch.testing.assert_close(callbacks[0].teacher(x), at_start.eval()(x))
    for key, value in callbacks[0].teacher.state_dict().items():  # the teacher came back from the checkpoint
        assert torch.equal(callbacks[2].teacher.state_dict()[key], value), key
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_a_teacher_given_to_the_constructor_stays_the_teacher_on_resume(tmp_path):
    """The docstring says a given teacher is given again on resume; the checkpoint's (the student's copy at the
    first fit's start) replaced it."""
    seed_everything(0)
    data = DigitsDataModule()
    model = MLPClassifier(hidden=(16,))
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                           enable_checkpointing=True, callbacks=[KnowledgeDistillation()])
    trainer.fit(model, datamodule=data)
    better = MLPClassifier(hidden=(16,))
    callback = KnowledgeDistillation(better)
    make_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[callback]).fit(
        MLPClassifier(hidden=(16,)), datamodule=data, ckpt_path=trainer.checkpoint_callback.best_model_path)
    for key, value in better.state_dict().items():
        assert torch.equal(callback.teacher.state_dict()[key], value), key


class TwoHeads(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(hidden=(16,))
        self.head = nn.Linear(10, 10)

    def forward(self, x):
        return self.head(self.net(x))


def test_two_distillation_callbacks_in_one_fit_a_dotted_submodule_and_outputs_fn_that_returns_no_tensor(tmp_path):
    """Two callbacks shared one state key (Lightning refused the fit); submodule='net.2' was 'no such sub-module';
    an outputs_fn returning None failed with "'NoneType' object has no attribute 'requires_grad'"."""
    seed_everything(0)
    first = KnowledgeDistillation(submodule="net", log_name="distill_net")
    second = KnowledgeDistillation(submodule="net.2", log_name="distill_last", kind="mse")
    assert first.state_key != second.state_key != KnowledgeDistillation().state_key
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                           callbacks=[first, second])
    trainer.fit(TwoHeads(), datamodule=DigitsDataModule())
    assert {"distill_net", "distill_last"} <= set(trainer.callback_metrics)
    with pytest.raises(TypeError, match=r"outputs_fn returned NoneType for the model's Tensor outputs"):
        make_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[
            KnowledgeDistillation(outputs_fn=lambda outputs: None)]).fit(MLPClassifier(hidden=(8,)),
                                                                           datamodule=DigitsDataModule())


class _LazyFirstLayer(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(hidden=(16,))
        self.net[0] = nn.LazyLinear(16)


class _WeightsBeforeTheFirstStep(Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_a_student_with_lazy_layers_is_copied_once_its_first_forward_gave_them_weights(tmp_path):
    """The teacher copy at fit start failed in torch (an uninitialized parameter): it is taken in the first step."""
    seed_everything(0)
    model, callback, before = _LazyFirstLayer(), KnowledgeDistillation(), _WeightsBeforeTheFirstStep()
    make_trainer(tmp_path, max_epochs=1, callbacks=[callback, before]).fit(model, datamodule=DigitsDataModule())
    teacher = callback.teacher.state_dict()
    assert teacher.keys() == before.weights.keys()
    assert all(torch.equal(teacher[k], before.weights[k]) for k in teacher)  # the model as distillation started
    assert not torch.equal(model.net[0].weight, teacher["net.0.weight"])  # and the student trained on


def test_a_checkpoints_teacher_of_another_module_is_a_clear_error_on_resume(tmp_path):
    """Resumed with another submodule, the whole module's teacher was loaded into the submodule's: torch's 'Missing
    key(s) in state_dict' at fit start."""
    seed_everything(0)
    data = DigitsDataModule()
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                           enable_checkpointing=True, callbacks=[KnowledgeDistillation()])
    trainer.fit(MLPClassifier(hidden=(16,)), datamodule=data)
    resumed = make_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0,
                           callbacks=[KnowledgeDistillation(submodule="net")])
    with pytest.raises(ValueError, match=r"submodule='net'\): the checkpoint's teacher is of another module"):
        resumed.fit(MLPClassifier(hidden=(16,)), datamodule=data, ckpt_path=trainer.checkpoint_callback.best_model_path)


def test_a_training_step_set_on_the_instance_is_the_modules_again_after_the_fit(tmp_path):
    import types

    seed_everything(0)
    model = MLPClassifier(hidden=(16,))
    calls = []

    def own_step(self, batch, batch_idx):
        calls.append(batch_idx)
        return MLPClassifier.training_step(self, batch, batch_idx)

    model.training_step = types.MethodType(own_step, model)
    own = model.training_step
    first, second = KnowledgeDistillation(), KnowledgeDistillation(log_name="again")
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                 callbacks=[first, second]).fit(model, datamodule=DigitsDataModule())
    assert calls == [0, 1] and model.__dict__["training_step"] == own
    plain = MLPClassifier(hidden=(16,))
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                 callbacks=[KnowledgeDistillation(), KnowledgeDistillation(log_name="again")]).fit(
        plain, datamodule=DigitsDataModule())
    assert "training_step" not in plain.__dict__


class _Registered:
    """A batch class registered with torch's pytree (as libraries register theirs)."""

    def __init__(self, pixels: torch.Tensor) -> None:
        self.pixels = pixels


torch.utils._pytree.register_pytree_node(_Registered, lambda batch: ([batch.pixels], None),
                                         lambda children, _: _Registered(children[0]))


class _Tagged(tuple):
    """A tuple subclass carrying state its constructor sets: rebuilt from a list, it would lose it."""

    def __new__(cls, items: Any, tag: str = "default") -> "_Tagged":
        made = super().__new__(cls, items)
        made.tag = tag
        return made


def test_the_teachers_copy_of_the_inputs_reaches_tensors_in_pytree_classes_and_dataclasses_and_keeps_other_objects():
    """Lightning's apply_to_collection alone left classes registered with torch's pytree uncopied (the teacher saw
    them changed in place) and rebuilt a tuple subclass without its state; torch's pytree alone left dataclasses."""
    from litcompress.callbacks.distillation import _tensors_copied

    x = torch.randn(3, 4)
    given = (_Registered(x), _Images(x), _Tagged((x,), tag="mine"), [x], _Pixels(pixels=x), UserDict(pixels=x),
             _Rows([x]))
    (registered, images, tagged, plain, pixels, user_dict, rows), keywords = _tensors_copied((given, {"mask": x}))
    for copied in (registered.pixels, images.pixels, tagged[0], plain[0], pixels["pixels"], user_dict["pixels"],
                   rows[0], keywords["mask"]):
        assert torch.equal(copied, x) and copied.data_ptr() != x.data_ptr()
    assert [type(value) for value in (registered, images, tagged, plain, pixels, user_dict, rows)] == [
        type(value) for value in given]
    assert tagged.tag == "mine"  # state its constructor set, kept
    frozen = _tensors_copied((_FrozenImages(x),))[0]
    assert isinstance(frozen, _FrozenImages) and torch.equal(frozen.pixels, x)
    assert frozen.pixels.data_ptr() != x.data_ptr()
    opaque = _Opaque(x)
    assert _tensors_copied((opaque,))[0] is opaque  # an object of no container kind: given as it is
    # rebuilt through __init__ (dataclasses.replace), these were scaled twice, or lost a field set after it
    scaled, masked, nested = _tensors_copied((_Scaled(x.clone()), _Masked(x), _Pixels(inner=_FrozenImages(x))))
    assert torch.equal(scaled.pixels, x / 255) and torch.equal(masked.mask, x > 0)
    assert torch.equal(nested["inner"].pixels, x) and nested["inner"].pixels.data_ptr() != x.data_ptr()
    # a container of one's own whose copy.copy shares its inner dict: the copies were written into the student's
    # batch (a detached clone in place of a tensor of the graph, silently cutting its gradients)
    activation = torch.randn(3, requires_grad=True) * 2
    store = _Store({"h": activation})
    copied = _tensors_copied((store,))[0]
    assert store["h"] is activation and copied is not store and copied["h"] is not activation
    for own in (_SelfCopyDict(h=activation), _SelfCopyList([activation])):  # a __copy__ returning itself
        copied = _tensors_copied((own,))[0]
        key = "h" if isinstance(own, dict) else 0
        assert own[key] is activation and type(copied) is type(own) and copied[key] is not activation
        assert torch.equal(copied[key], activation.detach())


class _SelfCopyDict(dict):
    def __copy__(self) -> "_SelfCopyDict":
        return self


class _SelfCopyList(list):
    def __copy__(self) -> "_SelfCopyList":
        return self


class _Store(MutableMapping):
    def __init__(self, items: dict) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._items[key] = value

    def __delitem__(self, key: str) -> None:
        del self._items[key]

    def __iter__(self) -> Any:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __copy__(self) -> "_Store":  # shares its storage, as a shallow copy of a wrapper may
        new = _Store.__new__(_Store)
        new._items = self._items
        return new


@dataclasses.dataclass
class _Scaled:
    pixels: torch.Tensor

    def __post_init__(self) -> None:
        self.pixels = self.pixels / 255


@dataclasses.dataclass
class _Masked:
    pixels: torch.Tensor
    mask: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.mask = self.pixels > 0


class _Opaque:
    def __init__(self, pixels: torch.Tensor) -> None:
        self.pixels = pixels


class _Pixels(dict):
    pass


class _Rows(list):
    pass


@dataclasses.dataclass(frozen=True)
class _FrozenImages:
    pixels: torch.Tensor


def test_the_spawned_launcher_line_is_said_for_a_teacher_copied_in_the_workers_only(caplog):
    """A resumed fit's teacher is the checkpoint's (restored into the callback the workers get), which the line said
    was a copy of the model as the fit starts. The trainer is a real one whose strategy spawns workers; its hook is
    called here, as a worker calls it."""
    import logging

    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", devices=1, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False)
    said = "KnowledgeDistillation: under a spawned launcher (DDPStrategy) the fit runs in worker processes"
    saved = KnowledgeDistillation()
    saved.on_fit_start(trainer, MLPClassifier(hidden=(8,)))
    resumed = KnowledgeDistillation()
    resumed.load_state_dict(saved.state_dict())
    given = KnowledgeDistillation(MLPClassifier(hidden=(8,)))
    for callback, expected in ((KnowledgeDistillation(), 1), (resumed, 0), (given, 0)):
        caplog.clear()
        module = MLPClassifier(hidden=(8,))
        with caplog.at_level(logging.INFO, logger="litcompress"):
            callback.on_fit_start(trainer, module)
        callback.teardown(trainer, module, "fit")
        assert caplog.text.count(said) == expected
        assert "training_step" not in vars(module)  # (the step it shadowed is the module's own again)


def test_a_callback_reused_for_another_model_copies_that_model_and_a_second_fit_of_one_model_keeps_its_teacher(
        tmp_path, caplog):
    """The next model of a k-fold loop distilled from the first model's copy, silently (and a model of other widths
    failed in the teacher's forward, said to be a copy "made when the fit started")."""
    import logging
    import pickle

    distillation = KnowledgeDistillation()
    seed_everything(0)
    first = MLPClassifier(hidden=(24,), lr=1e-2)
    first_at_start = {k: v.clone() for k, v in first.state_dict().items()}
    make_trainer(tmp_path, callbacks=[distillation], max_steps=2).fit(first, datamodule=DigitsDataModule())
    make_trainer(tmp_path, callbacks=[distillation], max_steps=4).fit(first, datamodule=DigitsDataModule())
    assert all(torch.equal(distillation.teacher.state_dict()[k], v) for k, v in first_at_start.items())  # kept
    for hidden in ((24,), (16,)):  # the same architecture, and another
        other = MLPClassifier(hidden=hidden, lr=1e-2)
        other_at_start = {k: v.clone() for k, v in other.state_dict().items()}
        with caplog.at_level(logging.INFO, logger="litcompress"):
            make_trainer(tmp_path, callbacks=[distillation], max_steps=2).fit(other, datamodule=DigitsDataModule())
        assert "KnowledgeDistillation: reused for another model: the default teacher is now a copy of MLPClassifier" \
            in caplog.text
        caplog.clear()
        assert all(torch.equal(distillation.teacher.state_dict()[k], v) for k, v in other_at_start.items())
    pickle.loads(pickle.dumps(distillation))  # (a spawned launcher pickles it: the weak reference stays behind)


def test_a_callback_resumed_for_another_model_takes_the_checkpoints_teacher_and_is_reset_by_the_next_model(tmp_path):
    """Resumed into the callback of a fit of a model of other widths, the checkpoint's teacher was loaded into that
    model's copy (torch's size mismatch); restored, its teacher was never reset for the next model."""
    distillation = KnowledgeDistillation()
    make_trainer(tmp_path, callbacks=[distillation], max_steps=2).fit(MLPClassifier(hidden=(24,), lr=1e-2),
                                                                      datamodule=DigitsDataModule())
    seed_everything(1)
    narrow = MLPClassifier(hidden=(16,), lr=1e-2)
    narrow_at_start = {k: v.clone() for k, v in narrow.state_dict().items()}
    writer = make_trainer(tmp_path, callbacks=[KnowledgeDistillation()], max_steps=2)
    writer.fit(narrow, datamodule=DigitsDataModule())
    writer.save_checkpoint(tmp_path / "narrow.ckpt")
    make_trainer(tmp_path, callbacks=[distillation], max_steps=4).fit(
        MLPClassifier(hidden=(16,), lr=1e-2), datamodule=DigitsDataModule(), ckpt_path=tmp_path / "narrow.ckpt")
    assert all(torch.equal(distillation.teacher.state_dict()[k], v) for k, v in narrow_at_start.items())
    following = MLPClassifier(hidden=(16,), lr=1e-2)
    following_at_start = {k: v.clone() for k, v in following.state_dict().items()}
    make_trainer(tmp_path, callbacks=[distillation], max_steps=2).fit(following, datamodule=DigitsDataModule())
    assert all(torch.equal(distillation.teacher.state_dict()[k], v) for k, v in following_at_start.items())


def test_a_test_run_from_a_checkpoint_between_folds_leaves_the_next_fold_its_own_teacher(tmp_path):
    """Lightning restores callbacks for trainer.test(ckpt_path=...) too: the teacher it restored was taken by the
    next fold's fit (another model's, or a size mismatch for other widths), and `teacher` read None meanwhile."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    distillation = KnowledgeDistillation()
    for fold, width in enumerate((24, 16)):
        model = MLPClassifier(hidden=(width,), lr=1e-2)
        at_start = {k: v.clone() for k, v in model.state_dict().items()}
        checkpoints = ModelCheckpoint(dirpath=tmp_path / f"fold{fold}", save_last=True)
        trainer = make_trainer(tmp_path, callbacks=[distillation, checkpoints], max_steps=3,
                               enable_checkpointing=True)
        trainer.fit(model, datamodule=DigitsDataModule())
        assert all(torch.equal(distillation.teacher.state_dict()[k], v) for k, v in at_start.items())
        trainer.test(model, datamodule=DigitsDataModule(), ckpt_path="last", verbose=False)
        assert all(torch.equal(distillation.teacher.state_dict()[k], v) for k, v in at_start.items())


def test_a_validation_from_another_runs_checkpoint_leaves_the_teacher_and_a_resume_without_one_copies_the_model(
        tmp_path):
    """validate(ckpt_path=another run's) replaced the callback's teacher for its next plain fit; a fit resumed from a
    checkpoint holding no teacher took the one a test had restored before."""
    distillation = KnowledgeDistillation()
    model = MLPClassifier(hidden=(24,), lr=1e-2)
    at_start = {k: v.clone() for k, v in model.state_dict().items()}
    make_trainer(tmp_path, callbacks=[distillation], max_steps=2).fit(model, datamodule=DigitsDataModule())
    other = make_trainer(tmp_path, callbacks=[KnowledgeDistillation()], max_steps=2)
    other.fit(MLPClassifier(hidden=(24,), lr=1e-2), datamodule=DigitsDataModule())
    other.save_checkpoint(tmp_path / "other.ckpt")
    make_trainer(tmp_path, callbacks=[distillation]).validate(model, datamodule=DigitsDataModule(),
                                                             ckpt_path=tmp_path / "other.ckpt", verbose=False)
    make_trainer(tmp_path, callbacks=[distillation], max_steps=4).fit(model, datamodule=DigitsDataModule())
    assert all(torch.equal(distillation.teacher.state_dict()[k], v) for k, v in at_start.items())  # its own
    plain = make_trainer(tmp_path, max_steps=2)  # a checkpoint written without the callback
    plain.fit(MLPClassifier(hidden=(24,), lr=1e-2), datamodule=DigitsDataModule())
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    fresh = KnowledgeDistillation()
    trainer = make_trainer(tmp_path, callbacks=[fresh], max_steps=4)
    resumed = MLPClassifier(hidden=(24,), lr=1e-2)
    trainer.test(resumed, datamodule=DigitsDataModule(), ckpt_path=tmp_path / "other.ckpt", verbose=False)
    resumed_at_start = {k: v.clone() for k, v in resumed.state_dict().items()}
    plain_weights = torch.load(tmp_path / "plain.ckpt", weights_only=False)["state_dict"]
    trainer.fit(resumed, datamodule=DigitsDataModule(), ckpt_path=tmp_path / "plain.ckpt")
    assert all(torch.equal(fresh.teacher.state_dict()[k], v) for k, v in plain_weights.items())  # the model as it
    assert not all(torch.equal(fresh.teacher.state_dict()[k], v) for k, v in resumed_at_start.items())  # resumed
