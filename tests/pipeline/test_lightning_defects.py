"""compress_lightning and CompressOnFitEnd on fits Lightning itself handles: loaders without a length, a fit whose
validation loop never ran, a DataModule that prepares its data; and arguments refused before any training step."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import GradientAccumulationScheduler
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from litcompress.callbacks import CompressOnFitEnd
from litcompress.pipeline import CompressionConfig, PruneConfig
from litcompress.pipeline.lightning import compress_lightning

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*IterableDataset",
                                        "ignore:The number of training batches")

CONFIG = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=None, export=False, latency_repeats=2)


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyWithTest(Tiny):
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())


class Stream(IterableDataset):
    """Map-style data served as a stream: a DataLoader over it has no length."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return (self.data[i] for i in range(len(self.data)))


class Batches(L.Callback):
    def __init__(self) -> None:
        self.trained = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.trained += 1


def _data(n: int = 96, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _loader(dataset: Any) -> DataLoader:
    return DataLoader(dataset, batch_size=16)


def _trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


def _unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[name], value) for name, value in module.state_dict().items())


class LoadersData(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return _loader(_data(96, 0))

    def val_dataloader(self) -> DataLoader:
        return _loader(_data(48, 1))


class LoadersDataWithTest(LoadersData):
    def test_dataloader(self) -> DataLoader:
        return _loader(_data(48, 2))


def test_loaders_without_a_length_are_counted_only_to_fine_tune(tmp_path: Path) -> None:
    """DataLoaders over an IterableDataset, which Lightning fits and validates: compress_lightning failed on
    ``len(loader)`` even with nothing to schedule, CompressOnFitEnd after the whole fit (``not val_dataloaders``)."""
    L.seed_everything(0)
    train, val = _loader(Stream(_data(96, 0))), _loader(Stream(_data(48, 1)))
    module = Tiny()
    compressing = CompressOnFitEnd(CONFIG, output_dir=tmp_path / "fit_end", plot=False)
    _trainer(max_epochs=1, callbacks=[compressing]).fit(module, train, val)
    validated = _trainer().validate(module, val, verbose=False)[0]["val_acc"]
    assert compressing.result is not None and compressing.result.report["input"].metric == pytest.approx(validated)

    one_shot = compress_lightning(module, CONFIG, train_dataloaders=train, val_dataloaders=val)
    assert one_shot.report["pruned"].weight_sparsity == pytest.approx(0.5, abs=1e-3)
    # Fine-tuning needs the schedule's length: refused, saying what sizes it, before any training step.
    counted = Batches()
    with pytest.raises(ValueError, match="training dataloader has no length.*max_steps.*limit_train_batches"):
        compress_lightning(module, CONFIG, train_dataloaders=train, val_dataloaders=val, fine_tune_epochs=1,
                           trainer_kwargs={"callbacks": [counted]})
    assert counted.trained == 0
    bounded = compress_lightning(module, CONFIG, train_dataloaders=train, val_dataloaders=val, fine_tune_epochs=2,
                                 trainer_kwargs={"limit_train_batches": 3, "callbacks": [counted]})
    assert counted.trained == 6 and "during 6 fine-tuning steps" in bounded.report["pruned"].description
    assert bounded.report["pruned"].weight_sparsity == pytest.approx(0.5, abs=1e-3)
    by_steps = compress_lightning(module, CONFIG, train_dataloaders=train, val_dataloaders=val, fine_tune_epochs=5,
                                  trainer_kwargs={"max_steps": 4})
    assert "during 4 fine-tuning steps" in by_steps.report["pruned"].description
    # overfit_batches and fast_dev_run bound the run too (they were refused as unbounded)
    overfit = compress_lightning(module, CONFIG, train_dataloaders=train, val_dataloaders=val, fine_tune_epochs=2,
                                 trainer_kwargs={"overfit_batches": 2})
    assert "during 4 fine-tuning steps" in overfit.report["pruned"].description


def test_compress_on_fit_end_reads_the_fits_loaders_when_validation_never_ran(tmp_path: Path) -> None:
    """No sanity check and no validation epoch in the fit: ``trainer.val_dataloaders`` stays None, and the callback
    told the user to pass the val_dataloaders they had passed."""
    L.seed_everything(0)
    train, val = _loader(_data(96, 0)), _loader(_data(48, 1))
    module = Tiny()
    compressing = CompressOnFitEnd(CONFIG, output_dir=tmp_path, plot=False)
    trainer = _trainer(max_epochs=2, limit_train_batches=3, num_sanity_val_steps=0, check_val_every_n_epoch=3,
                       callbacks=[compressing])
    trainer.fit(module, train, val)
    assert trainer.val_dataloaders is None  # what the callback read before
    validated = _trainer().validate(module, val, verbose=False)[0]["val_acc"]
    assert compressing.result is not None and compressing.result.report["input"].metric == pytest.approx(validated)


def test_compress_on_fit_end_refuses_a_misspelt_submodule_before_training(tmp_path: Path) -> None:
    module = Tiny()
    before = _weights(module)
    compressing = CompressOnFitEnd(CONFIG, submodule="nett", output_dir=tmp_path, plot=False)
    trainer = _trainer(max_epochs=1, callbacks=[compressing])
    with pytest.raises(ValueError, match=r"CompressOnFitEnd\(submodule='nett'\): Tiny has no such sub-module; "
                                         r"its sub-modules with parameters: \['net'\]"):
        trainer.fit(module, datamodule=LoadersData())
    assert trainer.global_step == 0 and _unchanged(module, before) and compressing.result is None
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_compress_on_fit_end_takes_a_submodule_built_in_configure_model(tmp_path: Path) -> None:
    """The sub-module is checked once the module's setup and configure_model have run, not in the callback's setup
    (called before them), where a module that builds its layers there has none yet."""

    class Built(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.net = None

        def configure_model(self) -> None:
            if self.net is None:
                self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    L.seed_everything(0)
    compressing = CompressOnFitEnd(CONFIG, submodule="net", output_dir=tmp_path, plot=False)
    _trainer(max_epochs=1, limit_train_batches=2, callbacks=[compressing]).fit(Built(), datamodule=LoadersData())
    assert compressing.result is not None and type(compressing.result.model) is nn.Sequential


def test_compress_lightning_prepares_a_datamodules_data_before_its_setup(tmp_path: Path) -> None:
    """As a Trainer does: prepare_data (a download, files written) once, then setup, which may read those files."""
    calls: list[str] = []

    class Prepared(L.LightningDataModule):
        def prepare_data(self) -> None:
            calls.append("prepare_data")
            if not (tmp_path / "data.pt").exists():
                torch.save((_data(96, 0).tensors, _data(48, 1).tensors), tmp_path / "data.pt")

        def setup(self, stage: str) -> None:
            calls.append("setup")
            self.train, self.val = (TensorDataset(*t) for t in torch.load(tmp_path / "data.pt"))

        def train_dataloader(self) -> DataLoader:
            return _loader(self.train)

        def val_dataloader(self) -> DataLoader:
            return _loader(self.val)

    L.seed_everything(0)
    result = compress_lightning(Tiny(), CONFIG, datamodule=Prepared())
    assert calls[:2] == ["prepare_data", "setup"]
    assert result.report["pruned"].weight_sparsity == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize(("module", "data", "missing"), [
    (Tiny, LoadersDataWithTest, "Tiny has no test_step to log it"),
    (TinyWithTest, LoadersData, "LoadersData has no test_dataloader to compute it on"),
])
def test_compress_on_fit_end_refuses_a_test_metric_nothing_logs_before_training(tmp_path: Path, module: type,
                                                                                data: type, missing: str) -> None:
    L.seed_everything(0)
    model = module()
    before = _weights(model)
    compressing = CompressOnFitEnd(CONFIG, test_metric="test_acc", output_dir=tmp_path, plot=False)
    trainer = _trainer(max_epochs=1, callbacks=[compressing])
    with pytest.raises(ValueError, match=rf"CompressOnFitEnd\(test_metric='test_acc'\): {missing}"):
        trainer.fit(model, datamodule=data())
    assert trainer.global_step == 0 and _unchanged(model, before) and compressing.result is None
    # compress_lightning refuses alike, before its first evaluation
    with pytest.raises(ValueError, match=rf"compress_lightning\(test_metric='test_acc'\): {missing}"):
        compress_lightning(model, CONFIG, datamodule=data(), test_metric="test_acc")


class CallsItsNet(Tiny):
    """No forward of its own: its steps call self.net(...)."""

    forward = L.LightningModule.forward

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", (self.net(batch[0]).argmax(1) == batch[1]).float().mean())


def test_a_module_without_forward_is_told_to_name_its_submodule(tmp_path: Path) -> None:
    # it failed with "missing the required forward" and advice to pass input_fn=
    with pytest.raises(ValueError, match=r"CallsItsNet defines no forward.*submodule='net'"):
        compress_lightning(CallsItsNet(), CONFIG, train_dataloaders=_loader(_data()),
                           val_dataloaders=_loader(_data(seed=1)))
    result = compress_lightning(CallsItsNet(), CONFIG, train_dataloaders=_loader(_data()),
                                val_dataloaders=_loader(_data(seed=1)), submodule="net")
    assert "pruned" in result.stage_models


def test_compress_on_fit_end_refuses_test_dataloaders_a_datamodule_fit_would_leave_unused(tmp_path: Path) -> None:
    module = TinyWithTest()
    before = _weights(module)
    data = L.LightningDataModule.from_datasets(train_dataset=_data(), val_dataset=_data(seed=1),
                                               test_dataset=_data(seed=2), batch_size=16)
    callback = CompressOnFitEnd(CONFIG, metric="val_acc", test_metric="test_acc", output_dir=tmp_path,
                                test_dataloaders=_loader(_data(seed=3)))
    with pytest.raises(ValueError, match=r"test_dataloaders=\.\.\.\) in a fit given a DataModule"):
        _trainer(callbacks=[callback]).fit(module, datamodule=data)
    assert _unchanged(module, before)


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("16-true", torch.float16)])
def test_the_fit_end_callbacks_work_after_a_fit_in_bfloat16_or_float16(tmp_path: Path, precision: str,
                                                                      dtype: torch.dtype, caplog) -> None:
    """Lightning's fit cast the batches to the module's dtype; the callbacks' own trainers fed its bfloat16 weights
    the loaders' float32 batches, and failed once the whole fit was done ("mat1 and mat2 must have the same dtype")."""
    from litcompress.callbacks import QuantizeOnFitEnd
    from litcompress.quantization import PTQConfig

    caplog.set_level("INFO", logger="litcompress")
    for callback in (QuantizeOnFitEnd(PTQConfig(approach="dynamic", backends=("torch_ao",), latency_repeats=2),
                                      metric="val_acc"),
                     CompressOnFitEnd(CONFIG, output_dir=tmp_path, plot=False)):
        L.seed_everything(0)
        module = Tiny()
        _trainer(max_epochs=1, precision=precision, callbacks=[callback]).fit(module, _loader(_data()),
                                                                              _loader(_data(48, 1)))
        assert module.net[0].weight.dtype == dtype  # the user's module as the fit left it
        assert callback.result is not None
    float32_input = torch.randn(4, 8)
    assert torch.isfinite(callback.result.model(float32_input)).all()
    assert caplog.text.count("weights are evaluated and compressed in a float32 copy") == 2


def test_a_bfloat16_module_fed_bfloat16_batches_is_compressed_and_quantized_as_it_is(tmp_path: Path,
                                                                                    caplog) -> None:
    """A bfloat16 module whose own data is bfloat16 was evaluated in a float32 copy fed those bfloat16 batches, and
    every entry point failed at once ("mat1 and mat2 must have the same dtype"); the plain `quantize` took it."""
    from litcompress.callbacks import QuantizeOnFitEnd
    from litcompress.quantization import PTQConfig
    from litcompress.quantization.lightning import quantize_lightning

    caplog.set_level("INFO", logger="litcompress")
    x, y = _data().tensors
    halves = _loader(TensorDataset(x.bfloat16(), y))
    x_val, y_val = _data(48, 1).tensors
    val_halves = _loader(TensorDataset(x_val.bfloat16(), y_val))
    ptq = PTQConfig(approach="dynamic", backends=("torch_ao",), latency_repeats=2)
    module = Tiny().bfloat16()
    result = quantize_lightning(module, ptq, metric="val_acc", val_dataloaders=val_halves, calibration_data=halves)
    assert result.recipe is not None and result.baseline_metric is not None
    assert result.model(x_val[:4].bfloat16()).shape == (4, 2)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=ptq, export=False, latency_repeats=2)
    compressed = compress_lightning(module, config, train_dataloaders=halves, val_dataloaders=val_halves,
                                    fine_tune_epochs=1)
    assert [stage.stage for stage in compressed.report.stages][-1] == "quantized"
    assert all(stage.metric is not None for stage in compressed.report.stages)
    assert module.net[0].weight.dtype == torch.bfloat16  # the user's module as it was
    for callback in (QuantizeOnFitEnd(ptq, metric="val_acc"), CompressOnFitEnd(CONFIG, output_dir=tmp_path,
                                                                                plot=False)):
        L.seed_everything(0)
        _trainer(max_epochs=1, precision="bf16-true", callbacks=[callback]).fit(Tiny(), halves, val_halves)
        assert callback.result is not None
    assert "evaluated and compressed in a float32 copy" not in caplog.text


@pytest.mark.parametrize("owner", ["QuantizeOnFitEnd", "CompressOnFitEnd"])
def test_the_fit_end_callbacks_leave_torchs_generator_as_the_fit_left_it(tmp_path: Path, owner: str) -> None:
    """Their calibration, evaluations and fine-tuning drew from torch's generator: what a script drew after the fit
    (a second model's initial weights) changed with the callback there or not."""
    from litcompress.callbacks import QuantizeOnFitEnd
    from litcompress.quantization import PTQConfig

    def draw_after_fit(callbacks: list) -> torch.Tensor:
        L.seed_everything(0)
        _trainer(max_epochs=1, callbacks=callbacks).fit(Tiny(), _loader(_data()), _loader(_data(48, 1)))
        return torch.rand(4)

    callback = (QuantizeOnFitEnd(PTQConfig(approach="dynamic", backends=("torch_ao",), latency_repeats=2),
                                 metric="val_acc") if owner == "QuantizeOnFitEnd" else
                CompressOnFitEnd(CONFIG, output_dir=tmp_path, plot=False))
    assert torch.equal(draw_after_fit([callback]), draw_after_fit([]))
    assert callback.result is not None


class FlattensInItsSteps(Tiny):
    """Its steps give the model ``x.flatten(1)`` of (N, 2, 4) batches."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0].flatten(1)), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", (self(batch[0].flatten(1)).argmax(1) == batch[1]).float().mean())


class Regressor(Tiny):
    """Logs the mean squared error of its first output against the targets (float64 from numpy, say)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.mse_loss(self(batch[0])[:, 0], batch[1].to(self.net[0].weight.dtype))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.mse_loss(self(batch[0])[:, 0].double(), batch[1].double()))


def _pairs(n: int, seed: int = 0) -> TensorDataset:
    x, y = _data(n, seed).tensors
    return TensorDataset(x.reshape(n, 2, 4), y)


def test_the_fit_end_callbacks_work_after_a_fit_in_float64_and_leave_float64_data_in_float64(tmp_path: Path,
                                                                                            caplog) -> None:
    """A 64-true fit cast the loaders' float32 batches; the callbacks' trainers fed them as they came to the float64
    weights and failed once the whole fit was done ("Float and Double", blamed on input_fn). A float64 module fed
    float64 batches (its data's own dtype) is compressed as it is."""
    from litcompress.callbacks import QuantizeOnFitEnd
    from litcompress.quantization import PTQConfig
    from litcompress.quantization.lightning import quantize_lightning

    caplog.set_level("INFO", logger="litcompress")
    for callback in (QuantizeOnFitEnd(PTQConfig(approach="dynamic", backends=("torch_ao",), latency_repeats=2),
                                      metric="val_acc"),
                     CompressOnFitEnd(CONFIG, output_dir=tmp_path, plot=False)):
        for module_class in (Tiny, FlattensInItsSteps):  # (one whose steps give the model its inputs: run on a copy)
            L.seed_everything(0)
            module = module_class()
            _trainer(max_epochs=1, precision="64-true", callbacks=[callback]).fit(
                module, _loader(_data(n=96) if module_class is Tiny else _pairs(96)),
                _loader(_data(48, 1) if module_class is Tiny else _pairs(48, 1)))
            assert module.net[0].weight.dtype == torch.float64  # the user's module as the fit left it
            assert callback.result is not None
    assert caplog.text.count("float64 weights are evaluated and compressed in a float32 copy") == 4
    assert "could not be run on its own" not in caplog.text
    # decided on the model's inputs: float64 targets beside float32 inputs (a regression's, from numpy) too
    L.seed_everything(0)
    module, (x, y) = Regressor(), _data(96).tensors
    targets = _loader(TensorDataset(x, y.double()))
    _trainer(max_epochs=1, precision="64-true").fit(module, targets, targets)
    result = compress_lightning(module, CONFIG, metric="val_loss", mode="min", train_dataloaders=targets,
                                val_dataloaders=targets)
    assert result.report.stages[0].metric > 0 and module.net[0].weight.dtype == torch.float64
    caplog.clear()
    x, y = _data(48, 1).tensors
    doubles = _loader(TensorDataset(x.double(), y))
    result = quantize_lightning(Tiny().double(), PTQConfig(approach="dynamic", backends=("torch_ao",),
                                                           latency_repeats=2), val_dataloaders=doubles,
                                metric="val_acc", calibration_data=[x[:8].double()])
    assert result.baseline_metric is not None and "evaluated and compressed in a float32 copy" not in caplog.text


class Masked(Tiny):
    """forward(x, mask): a float32 mask beside inputs of the module's own dtype."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(x * mask.to(x.dtype))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", (self(batch[0], batch[1]).argmax(1) == batch[2]).float().mean())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("features_in_its_dtype", [True, False])
def test_the_first_float_input_decides_whether_a_module_is_copied_to_float32(dtype: torch.dtype,
                                                                             features_in_its_dtype: bool,
                                                                             caplog) -> None:
    """Features in the module's dtype beside a float32 mask: the module stays as it is (a float64 one was cast to
    float32 by the first version of the bfloat16 change, which kept a module only when every float input had its
    dtype, then failed on "Double and Float"); float32 features beside a mask in its dtype: a float32 copy (its second
    version, keeping a module fed any input of its dtype, fed the float32 features to bfloat16 weights)."""
    from litcompress.quantization import PTQConfig
    from litcompress.quantization.lightning import quantize_lightning

    caplog.set_level("INFO", logger="litcompress")
    x, y = _data(48, 1).tensors
    features, mask = (x.to(dtype), torch.ones(48, 8)) if features_in_its_dtype else (x, torch.ones(48, 8, dtype=dtype))
    data = _loader(TensorDataset(features, mask, y))
    result = quantize_lightning(Masked().to(dtype), PTQConfig(approach="dynamic", backends=("torch_ao",),
                                                              latency_repeats=2),
                                metric="val_acc", val_dataloaders=data, calibration_data=data)
    assert result.baseline_metric is not None and result.recipe is not None
    assert ("evaluated and compressed in a float32 copy" in caplog.text) == (not features_in_its_dtype)


class DictBatches(torch.utils.data.Dataset):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"features": x, "label": y}


class TakesTheDict(Tiny):
    """forward(batch) reads batch["features"] (Hugging Face style)."""

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch["features"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch), batch["label"])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", (self(batch).argmax(1) == batch["label"]).float().mean())


def test_compress_on_fit_end_takes_an_input_fn_for_a_forward_that_takes_the_batch_dict(tmp_path: Path) -> None:
    """The error after the fit said to pass input_fn=, which CompressOnFitEnd did not take."""
    L.seed_everything(0)
    module = TakesTheDict()
    compressing = CompressOnFitEnd(CONFIG, output_dir=tmp_path, plot=False, input_fn=lambda batch: (batch,))
    _trainer(max_epochs=1, callbacks=[compressing]).fit(module, _loader(DictBatches(_data())),
                                                        _loader(DictBatches(_data(48, 1))))
    batch = {"features": torch.randn(4, 8)}
    assert compressing.result is not None
    assert compressing.result.model(batch).shape == (4, 2)


@pytest.mark.parametrize("make, error, message", [
    (lambda: CompressOnFitEnd(CONFIG, output_dir=None), TypeError, r"output_dir=None\): expected a path"),
    (lambda: CompressOnFitEnd(CONFIG, output_dir=""), ValueError, r"output_dir=''\): name a folder"),
    # a file there or above: refused after the whole fit
    (lambda: CompressOnFitEnd(CONFIG, output_dir=__file__), ValueError, r"is a file, not a folder"),
    (lambda: CompressOnFitEnd(CONFIG, output_dir=Path(__file__) / "out"), ValueError, r"is a file, not a folder"),
    ("QuantizeOnFitEnd input_fn", TypeError, r"input_fn=\(1,\)\): expected a function of a batch"),
    ("QuantizeOnFitEnd calibration int", TypeError, r"calibration_data=16\): expected batches"),
    (lambda: CompressOnFitEnd(CONFIG, output_dir="out", test_metric=""), ValueError, r"test_metric=''\): name"),
    (lambda: CompressOnFitEnd(CONFIG, output_dir="out", metric=None), TypeError, "a str such as 'val_acc'"),
    (lambda: CompressOnFitEnd(CONFIG, output_dir="out", input_fn="x"), TypeError, "expected a function of a batch"),
    # 'False' was truthy: the plot was written
    (lambda: CompressOnFitEnd(CONFIG, output_dir="out", plot="False"), TypeError, r"plot='False'\): expected True"),
    ("QuantizeOnFitEnd", ValueError, r"save_path=''\): give the path of a file to write .* not a folder"),
    ("QuantizeOnFitEnd calibration", ValueError, r"calibration_data=\[\]\): no batch to calibrate on"),
    ("QuantizeOnFitEnd metric", TypeError, r"metric=5\): name the metric validation_step logs"),
    # were refused only when fitting started
    (lambda: CompressOnFitEnd(CONFIG, output_dir="out", submodule=3), TypeError, r"submodule=3\): expected the name"),
    (lambda: CompressOnFitEnd(CONFIG, output_dir="out", submodule=""), TypeError, r"submodule=''\): expected the"),
    ("QuantizeOnFitEnd submodule", TypeError, r"QuantizeOnFitEnd\(submodule=\['net'\]\): expected the name"),
])
def test_fit_end_arguments_that_would_fail_after_the_fit_are_refused_at_construction(make, error, message) -> None:
    from litcompress.callbacks import QuantizeOnFitEnd
    from litcompress.quantization import PTQConfig

    quantize = {"QuantizeOnFitEnd": lambda: QuantizeOnFitEnd(PTQConfig(), "val_acc", save_path=""),
                "QuantizeOnFitEnd submodule": lambda: QuantizeOnFitEnd(PTQConfig(), "val_acc", submodule=["net"]),
                "QuantizeOnFitEnd input_fn": lambda: QuantizeOnFitEnd(PTQConfig(), "val_acc", input_fn=(1,)),
                "QuantizeOnFitEnd calibration int": lambda: QuantizeOnFitEnd(PTQConfig(), "val_acc",
                                                                             calibration_data=16),
                "QuantizeOnFitEnd calibration": lambda: QuantizeOnFitEnd(PTQConfig(approach="static"), "val_acc",
                                                                         calibration_data=[]),
                "QuantizeOnFitEnd metric": lambda: QuantizeOnFitEnd(PTQConfig(), 5)}
    with pytest.raises(error, match=message):
        (quantize[make] if isinstance(make, str) else make)()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="a folder that cannot be written to, even by root")
def test_a_fit_end_output_dir_that_cannot_be_written_is_refused_before_training(tmp_path) -> None:
    """The fit ran, then the report's write failed at fit end (FileNotFoundError naming a '.partial.json')."""
    trainer = _trainer(max_epochs=1, callbacks=[CompressOnFitEnd(CONFIG, output_dir="/proc/self")])
    with pytest.raises(ValueError, match=r"CompressOnFitEnd\(output_dir='/proc/self'\): cannot write there"):
        trainer.fit(Tiny(), _loader(_data(48, 0)), _loader(_data(16, 1)))
    assert trainer.global_step == 0


def test_a_fit_end_output_dir_holding_a_folder_named_as_a_report_file_is_refused_before_training(tmp_path) -> None:
    (tmp_path / "report.png").mkdir()
    trainer = _trainer(max_epochs=1, callbacks=[CompressOnFitEnd(CONFIG, output_dir=tmp_path)])
    with pytest.raises(ValueError, match=r"report.png in it is a folder, where this run writes a file of that name"):
        trainer.fit(Tiny(), _loader(_data(48, 0)), _loader(_data(16, 1)))
    assert trainer.global_step == 0


def test_fine_tuning_that_would_make_no_step_is_refused_before_any_stage() -> None:
    """A limit_train_batches fraction that leaves no batch (Lightning refuses it too), or a loader that gives none
    (drop_last with fewer samples than a batch): fine_tune_epochs was dropped silently, and the one-shot pruning's
    note said to pass fine-tuning."""
    counted = Batches()
    train, val = _loader(_data(96, 0)), _loader(_data(48, 1))
    empty = DataLoader(_data(8, 0), batch_size=16, drop_last=True)
    for loader, kwargs in ((train, {"limit_train_batches": 0.01}), (empty, {})):
        with pytest.raises(ValueError, match=r"fine_tune_epochs=2\): the fine-tuning would make no optimizer step"):
            compress_lightning(Tiny(), CONFIG, train_dataloaders=loader, val_dataloaders=val, fine_tune_epochs=2,
                               trainer_kwargs={"callbacks": [counted], **kwargs})
    assert counted.trained == 0


class LogsWithoutLogger(Tiny):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean(), logger=False, prog_bar=True)


def test_a_metric_logged_without_the_logger_is_read_as_model_checkpoint_reads_it() -> None:
    """self.log(..., logger=False) is left out of what validate returns, but in callback_metrics: it was refused as
    "not logged by validation_step; logged: []"."""
    L.seed_everything(0)
    module = LogsWithoutLogger()
    val = _loader(_data(48, 1))
    result = compress_lightning(module, CONFIG, train_dataloaders=_loader(_data(96, 0)), val_dataloaders=val)
    trainer = _trainer()
    trainer.validate(module, val, verbose=False)
    assert result.report["input"].metric == pytest.approx(float(trainer.callback_metrics["val_acc"]))


class TwoOptimizerSteps(Tiny):
    """Manual optimization stepping two optimizers per batch (a GAN's generator and discriminator)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        for optimizer in self.optimizers():
            optimizer.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(batch[0]), batch[1]))
            optimizer.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"accumulate_grad_batches": 0}, r"\{'accumulate_grad_batches': 0\}\): give an int >= 1"),  # ZeroDivisionError
    ({"accumulate_grad_batches": -1}, r"\{'accumulate_grad_batches': -1\}\): give an int >= 1"),  # fine_tune_steps
    ({"accumulate_grad_batches": 2.5}, r"\{'accumulate_grad_batches': 2\.5\}\): give an int >= 1"),  # sized as 2
    ({"callbacks": "x"}, r"\{'callbacks': 'x'\}\): give a Callback or a list of them"),  # AttributeError in the fit
    ({"val_check_interval": 100}, r"\{'val_check_interval': 100\}\): a fine-tuning epoch has 12 training batches"),
    ({"val_check_interval": np.int64(13)}, r"\{'val_check_interval': 13\}\): a fine-tuning epoch has 12 training"),
    ({"limit_train_batches": np.int64(2), "val_check_interval": 4}, r"\{'val_check_interval': 4\}\): a fine-tuning "
                                                                    r"epoch has 2 training batches"),
])
def test_trainer_kwargs_the_fine_tuning_would_fail_on_are_refused_before_the_input_stage(kwargs, message) -> None:
    """Refused in Lightning's words when the fine-tuning fit started (after the input stage's evaluation), or in
    words naming no argument the user gave (fine_tune_steps=-17, a ZeroDivisionError), or taken (2.5)."""
    module = Tiny()
    module.validation_step = lambda batch, batch_idx: pytest.fail("the input stage ran")  # type: ignore[method-assign]
    with pytest.raises((ValueError, TypeError), match=rf"^compress_lightning\(trainer_kwargs={message}"):
        compress_lightning(module, CONFIG, train_dataloaders=_loader(_data(192, 0)),
                           val_dataloaders=_loader(_data(48, 1)), fine_tune_epochs=1, trainer_kwargs=kwargs)


@pytest.mark.parametrize("kwargs", [{"accumulate_grad_batches": np.int64(2)}, {"fast_dev_run": True,
                                                                              "val_check_interval": 4}])
def test_trainer_kwargs_lightning_takes_are_taken(kwargs) -> None:
    """Refused by the checks before the input stage: numpy's int (Lightning's 2), and an interval that fast_dev_run
    overrides."""
    result = compress_lightning(Tiny(), CONFIG, train_dataloaders=_loader(_data(192, 0)),
                                val_dataloaders=_loader(_data(48, 1)), fine_tune_epochs=1, trainer_kwargs=kwargs)
    assert [row.stage for row in result.report.stages] == ["input", "pruned"]


@pytest.mark.parametrize("kwargs", [{"accumulate_grad_batches": 2}, {"gradient_clip_val": 1.0},
                                    {"callbacks": [GradientAccumulationScheduler({0: 2})]}])
def test_options_lightning_refuses_under_manual_optimization_are_refused_before_any_stage(kwargs) -> None:
    """Lightning refuses them when the fine-tuning fit starts, after the input stage's evaluation. (A clipping
    value it does not act on, 0 or below, is taken, as it takes it.)"""
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=None, export=False, latency_repeats=2)
    module = TwoOptimizerSteps()
    module.validation_step = lambda batch, batch_idx: pytest.fail("the input stage ran")  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=rf"^compress_lightning\(trainer_kwargs={{'{next(iter(kwargs))}': .* "
                                         r"TwoOptimizerSteps uses manual optimization"):
        compress_lightning(module, config, train_dataloaders=_loader(_data(192, 0)),
                           val_dataloaders=_loader(_data(48, 1)), fine_tune_epochs=1, trainer_kwargs=kwargs)
    compress_lightning(TwoOptimizerSteps(), config, train_dataloaders=_loader(_data(192, 0)),
                       val_dataloaders=_loader(_data(48, 1)), fine_tune_epochs=1,
                       trainer_kwargs={"gradient_clip_val": -1.0, "accumulate_grad_batches": 1})


def test_max_steps_bounding_a_manually_optimized_fine_tune_is_warned_of() -> None:
    """max_steps counts both optimizers' steps, the schedule batches: the fit stopped at half the batches the schedule
    was laid over, and the rest was pruned at once after it, said only in the report."""
    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, rounds=4), quantize=None, export=False,
                               latency_repeats=2)
    with pytest.warns(UserWarning, match=r"manual optimization, so the pruning schedule counts training batches, "
                                         r"while max_steps=10 bounds every optimizer's steps"):
        result = compress_lightning(TwoOptimizerSteps(), config, train_dataloaders=_loader(_data(192, 0)),
                                    val_dataloaders=_loader(_data(48, 1)), fine_tune_epochs=1,
                                    trainer_kwargs={"max_steps": 10})
    assert "during 5 fine-tuning steps" in result.report["pruned"].description  # half the 10 batches laid over


class CountsValidation(Tiny):
    validated = 0  # on the class: the stages evaluate copies of the module

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        type(self).validated += 1
        super().validation_step(batch, batch_idx)


_EMPTY = DataLoader(_data(0, 0), batch_size=16)


@pytest.mark.parametrize("kwargs, error, message", [
    # AttributeError: 'str' object has no attribute 'limit_val_batches', after the input model's evaluation
    ({"trainer": "x"}, TypeError, r"compress_lightning\(trainer='x'\): expected a lightning Trainer"),
    ({"trainer_kwargs": "x"}, TypeError, r"trainer_kwargs='x'\): expected a dict"),  # dict('x'): "length 1"
    ({"trainer_kwargs": []}, TypeError, r"trainer_kwargs=\[\]\): expected a dict"),  # taken for None
    # compress(metric_name=None) named, after the input model's evaluation
    ({"metric": None}, TypeError, r"compress_lightning\(metric=None\): name the metric validation_step logs"),
    ({"test_metric": 5, "test_dataloaders": _loader(_data(16, 2))}, TypeError,
     r"compress_lightning\(test_metric=5\): name the metric test_step logs, a str such as 'test_acc'"),
    # AttributeError: 'DataLoader' object has no attribute 'prepare_data'
    ({"datamodule": _loader(_data(16, 2)), "train_dataloaders": None, "val_dataloaders": None}, TypeError,
     r"compress_lightning\(datamodule=DataLoader\): expected a LightningDataModule"),
    # a bare StopIteration
    ({"val_dataloaders": _EMPTY}, ValueError, "the validation dataloader gives no batch"),
    ({"val_dataloaders": []}, ValueError, "the validation dataloader gives no batch"),
    # named compress(calibration_data=[]), or quantize's after the pruning
    ({"train_dataloaders": _EMPTY, "config": "static"}, ValueError,
     "the training dataloader is empty, and it gives static quantization's calibration batches by default"),
])
def test_compress_lightning_names_bad_arguments_before_any_evaluation(kwargs, error, message) -> None:
    from litcompress.quantization import PTQConfig

    config = CONFIG if kwargs.pop("config", None) is None else dataclasses.replace(
        CONFIG, quantize=PTQConfig(approach="static"))
    CountsValidation.validated = 0
    arguments = {"train_dataloaders": _loader(_data(96, 0)), "val_dataloaders": _loader(_data(48, 1)), **kwargs}
    with pytest.raises(error, match=message):
        compress_lightning(CountsValidation(), config, **arguments)
    assert CountsValidation.validated == 0


@pytest.mark.parametrize("train", [[], _EMPTY])
def test_compress_lightning_needs_no_training_batch_where_nothing_fine_tunes_or_calibrates(train) -> None:
    """Without fine-tuning or static quantization the training loader is not read: an empty one was refused as
    compress(calibration_data=[])."""
    from litcompress.quantization import PTQConfig

    for quantize in (None, PTQConfig(approach="dynamic")):
        result = compress_lightning(Tiny(), dataclasses.replace(CONFIG, quantize=quantize), train_dataloaders=train,
                                    val_dataloaders=_loader(_data(48, 1)))
        assert result.report.stages[-1].weight_sparsity > 0


def test_compress_lightning_takes_numpy_epochs_and_warns_of_trainer_kwargs_nothing_uses() -> None:
    import numpy as np

    counted = Batches()
    train, val = _loader(_data(96, 0)), _loader(_data(48, 1))
    compress_lightning(Tiny(), CONFIG, train_dataloaders=train, val_dataloaders=val, fine_tune_epochs=np.int64(1),
                       trainer_kwargs={"callbacks": [counted]})
    assert counted.trained == len(train)
    with pytest.warns(UserWarning, match=r"trainer_kwargs=\{'limit_val_batches': 1\}\) without fine_tune_epochs: "
                                         "they are the fine-tuning Trainer's arguments"):
        compress_lightning(Tiny(), CONFIG, train_dataloaders=train, val_dataloaders=val,
                           trainer_kwargs={"limit_val_batches": 1})


class TwoValidationSets(Tiny):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())


def test_an_empty_first_validation_loader_is_refused_only_where_it_is_read() -> None:
    """With example_inputs given and the metric of another loader, the empty first one is read by nothing: it was
    refused, saying every stage was judged on it."""
    val = [_EMPTY, _loader(_data(48, 1))]
    result = compress_lightning(TwoValidationSets(), CONFIG, train_dataloaders=_loader(_data(96, 0)),
                                val_dataloaders=val,
                                metric="val_acc/dataloader_idx_1", example_inputs=torch.randn(4, 8))
    assert result.report.stages[0].metric is not None
    with pytest.raises(ValueError, match="the first validation dataloader gives no batch, and the example inputs "
                                         r"\(tracing, timing\) are read from it: give it batches, or example_inputs="):
        compress_lightning(TwoValidationSets(), CONFIG, train_dataloaders=_loader(_data(96, 0)),
                           val_dataloaders=val, metric="val_acc/dataloader_idx_1")


@pytest.mark.parametrize("kwargs, error, message", [
    ({"trainer": "gpu"}, TypeError, r"quantize_lightning\(trainer='gpu'\): expected a lightning Trainer"),
    ({"datamodule": _loader(_data(16, 2)), "val_dataloaders": None}, TypeError,
     r"quantize_lightning\(datamodule=DataLoader\): expected a LightningDataModule"),
    ({"metric": 3}, TypeError, r"quantize_lightning\(metric=3\): name the metric validation_step logs"),
    ({"val_dataloaders": _EMPTY}, ValueError, "quantize_lightning: the validation dataloader gives no batch"),
])
def test_quantize_lightning_names_bad_arguments_before_any_evaluation(kwargs, error, message) -> None:
    """They failed with 'no attribute limit_val_batches' (after the fp32 model's evaluation), 'no attribute
    val_dataloader', re's 'expected string or bytes-like object', a bare StopIteration."""
    from litcompress.quantization import PTQConfig
    from litcompress.quantization.lightning import quantize_lightning

    CountsValidation.validated = 0
    arguments = {"metric": "val_acc", "val_dataloaders": _loader(_data(48, 1)),
                 "calibration_data": _loader(_data(32, 0)), **kwargs}
    with pytest.raises(error, match=message):
        quantize_lightning(CountsValidation(), PTQConfig(approach="dynamic"), **arguments)
    assert CountsValidation.validated == 0


class _NoBatches(IterableDataset):
    def __iter__(self) -> Iterator[Any]:
        return iter(())


class _TrainAndVal(L.LightningDataModule):
    def __init__(self, train: DataLoader, val: DataLoader) -> None:
        super().__init__()
        self.train, self.val = train, val

    def train_dataloader(self) -> DataLoader:
        return self.train

    def val_dataloader(self) -> DataLoader:
        return self.val


def test_quantize_lightning_says_a_validation_loader_without_length_gave_no_batch() -> None:
    """A bare StopIteration; with example_inputs given, "'val_acc' was not logged by validation_step; logged: []",
    blaming the name."""
    from litcompress.quantization import PTQConfig
    from litcompress.quantization.lightning import quantize_lightning

    nothing = DataLoader(_NoBatches(), batch_size=None)
    with pytest.raises(ValueError, match="quantize_lightning: the first validation dataloader gives no batch"):
        quantize_lightning(Tiny(), PTQConfig(approach="dynamic"), metric="val_acc", val_dataloaders=nothing)
    with pytest.raises(KeyError, match=r"'val_acc' was not logged by .*validation_step, nor was anything else: did "
                                       r"it run on no batch \(an empty dataloader"):
        quantize_lightning(Tiny(), PTQConfig(approach="dynamic"), metric="val_acc", val_dataloaders=nothing,
                           example_inputs=torch.randn(4, 8))


def test_quantize_lightning_takes_an_empty_training_loader_as_no_calibration_data() -> None:
    """Dynamic int8 calibrates nothing: it was refused as quantize(example_inputs=None) (another function's
    argument); static is refused in quantize_lightning's own words."""
    from litcompress.quantization import PTQConfig
    from litcompress.quantization.lightning import quantize_lightning

    data = _TrainAndVal(_EMPTY, _loader(_data(48, 1)))
    result = quantize_lightning(Tiny(), PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1),
                                metric="val_acc", datamodule=data)
    assert result.recipe is not None
    with pytest.raises(ValueError, match=r"quantize_lightning\(approach='static'\): the DataModule's "
                                         r"train_dataloader is empty"):
        quantize_lightning(Tiny(), PTQConfig(approach="static"), metric="val_acc", datamodule=data)


def test_compress_on_fit_end_shrinks_a_fit_resumed_from_its_finished_checkpoint(tmp_path: Path) -> None:
    """ModelPruning watched for the output layer with forward hooks from fit start to the first batch's end: a fit
    resumed from a finished one trains no batch, so the hooks were still on at fit end, and CompressOnFitEnd's shrink
    refused every layer ("it has forward hooks"): 484 parameters kept instead of 124 (found by a resume hunt)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from litcompress import ModelPruning
    from litcompress.pruning.schedules import PolynomialDecay

    class Deeper(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))

    def callbacks(out: Path) -> list:
        return [ModelPruning("ln_structured", amount=PolynomialDecay(final_sparsity=0.6, begin=1, end=3, unit="epoch"),
                             pruning_dim=0, pruning_norm=2, parameter_names=["weight"], use_global_unstructured=False,
                             use_lottery_ticket_hypothesis=False),
                CompressOnFitEnd(CONFIG, output_dir=out, plot=False)]

    train, val = _loader(_data(32, 0)), _loader(_data(16, 1))
    L.seed_everything(0)
    first = callbacks(tmp_path / "a")
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              max_epochs=3, callbacks=[*first, ModelCheckpoint(tmp_path / "ck", filename="last")]).fit(
        Deeper(), train, val)
    L.seed_everything(0)
    again = callbacks(tmp_path / "b")
    _trainer(max_epochs=3, callbacks=again).fit(Deeper(), train, val, ckpt_path=tmp_path / "ck" / "last.ckpt")
    sizes = [sum(p.numel() for p in run[1].result.model.parameters()) for run in (first, again)]
    assert sizes[0] == sizes[1] < sum(p.numel() for p in Deeper().parameters())
