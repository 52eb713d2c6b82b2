"""Shared test helpers: small Lightning models and a quiet CPU trainer."""

from __future__ import annotations

import contextlib
import os
import signal
import warnings
from collections import OrderedDict
from typing import Any, Iterator

import pytest
import torch
from hypothesis import settings
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning
import lightning.pytorch.callbacks as _lightning_callbacks
from packaging.version import Version

# pyproject allows lightning>=2.5: what only later releases have or fixed is skipped on older ones
LIGHTNING_VERSION = Version(lightning.__version__)
# Lightning 2.6 added it; None before
EMAWeightAveraging = getattr(_lightning_callbacks, "EMAWeightAveraging", None)


@contextlib.contextmanager
def python_handles_ctrl_c() -> Iterator[None]:
    """Python's own SIGINT handler (KeyboardInterrupt) for the duration, as in a terminal (a test run started in the
    background ignores SIGINT); the handler from before afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)



class TimesBuffer(nn.Module):
    """Multiplies its input by its buffer `mask`: a masking parametrization (as torch.ao.pruning's sparsifiers
    register), or a layer that scales by a table."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask

class PressCtrlC(Callback):
    """Sends this process a real SIGINT at the end of the `batch`-th training batch of its `fit`-th fit (1-based;
    batches counted from the fit's start, also in a fit resumed mid-epoch)."""

    def __init__(self, fit: int = 1, batch: int = 1) -> None:
        self.fit, self.batch, self.fits, self.batches = fit, batch, 0, 0

    def on_train_start(self, trainer, pl_module):
        self.fits, self.batches = self.fits + 1, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        if self.fits == self.fit and self.batches == self.batch:
            signal.raise_signal(signal.SIGINT)


def weight_averaging_callbacks() -> list:
    """The weight-averaging callbacks this Lightning has, as parameters (EMAWeightAveraging skipped before 2.6)."""
    return [_lightning_callbacks.StochasticWeightAveraging,
            pytest.param(EMAWeightAveraging, id="EMAWeightAveraging",
                         marks=pytest.mark.skipif(EMAWeightAveraging is None, reason="Lightning < 2.6"))]


def skip_lightnings_callback_before(cls: type, version: str, why: str) -> None:
    """In a test run against both callbacks: skip Lightning's own ModelPruning when it is older than `version`, which
    fixed what the test expects of it (`why`)."""
    from lightning.pytorch.callbacks import ModelPruning as LightningModelPruning

    if cls is LightningModelPruning and LIGHTNING_VERSION < Version(version):
        pytest.skip(f"Lightning {LIGHTNING_VERSION} < {version}: {why}")

os.environ.setdefault("PL_DISABLE_FORK", "1")
# CI draws the same examples on every run (a red CI is the code's, not the dice's); local runs explore new ones.
settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)  # (no timing: 2 loaded cores)
if os.environ.get("CI"):
    settings.load_profile("ci")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*litlogger.*|.*litmodels.*")


class Conv1D(nn.Module):
    """The contract of Hugging Face's ``Conv1D`` (GPT-2's layers, in ``transformers.pytorch_utils``): a Linear layer
    storing its weight as (in, out) and computing ``addmm``. litcompress knows such layers by that contract."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(x.size()[:-1] + (self.nf,))


class ThreeLayerModel(BoringModel):
    """BoringModel with three named linear layers, one without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            OrderedDict(
                [
                    ("mlp_1", nn.Linear(32, 32)),
                    ("mlp_2", nn.Linear(32, 32, bias=False)),
                    ("mlp_3", nn.Linear(32, 2)),
                ]
            )
        )

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.log("test", -batch_idx)
        return super().training_step(batch, batch_idx)


class ModelWithAttnMask(ThreeLayerModel):
    """Adds an ordinary buffer whose name ends in `_mask`, as attention models have."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("attn_mask", torch.ones(4, 4))


class FixedDataModel(ThreeLayerModel):
    """Deterministic data and Adam (which has per-parameter state), so two runs can be compared bit for bit."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.data = torch.randn(64, 32, generator=g)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.data), batch_size=16)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.data[:16]), batch_size=16)

    def training_step(self, batch, batch_idx):
        loss = self(batch[0]).pow(2).mean()
        self.log("test", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val", self(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01, weight_decay=0.01)


class StepsTwoOptimizers:
    """Mixin for a LightningModule: manual optimization, each of two optimizers (over `optimizer_groups()`) stepped
    once per batch on `loss(batch)`, as a GAN steps its generator and its discriminator: `trainer.global_step` moves
    by two per batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        for optimizer in self.optimizers():
            optimizer.zero_grad()
            self.manual_backward(self.loss(batch))
            optimizer.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(group, lr=1e-2) for group in self.optimizer_groups()]


class ConfiguredDigitsClassifier(LightningModule):
    """A digits classifier that builds its layers in `configure_model` (Lightning's way for large models): a Trainer
    calls it after `setup`; before that the module has no layers."""

    def __init__(self, hidden: int = 48) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:  # idempotent, as Lightning asks
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, self.hparams.hidden), nn.ReLU(),
                                     nn.Linear(self.hparams.hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class SubmoduleStepsClassifier(LightningModule):
    """A digits MLP whose steps call its `net` directly instead of `self(...)` (common in user code): a model that
    replaces `forward` is never called by them, so only ``submodule="net"`` compresses what they measure."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", (self.net(batch[0]).argmax(1) == batch[1]).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_acc", (self.net(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class TwoValidationSetsData(LightningDataModule):
    """Digits with two validation dataloaders (a list, as Lightning allows) and, with `two_train_loaders`, two
    training dataloaders (a dict); Lightning names a metric of each validation loader `<name>/dataloader_idx_<i>`."""

    def __init__(self, batch_size: int = 32, two_train_loaders: bool = False) -> None:
        super().__init__()
        self.batch_size, self.two_train_loaders = batch_size, two_train_loaders

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
        self.splits = [TensorDataset(x[a:b], y[a:b]) for a, b in ((0, 1000), (1000, 1400), (1400, 1797))]

    def _loader(self, split: int, shuffle: bool = False) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> Any:
        if self.two_train_loaders:  # Lightning's default mode for several: as many batches as the longest has
            return {"digits": self._loader(0, shuffle=True), "few": self._loader(1)}
        return self._loader(0, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(1), self._loader(2)]

    def test_dataloader(self) -> DataLoader:
        return self._loader(2)


class TwoValidationSetsClassifier(LightningModule):
    """A digits MLP whose steps take the `dataloader_idx` of several dataloaders (and a dict of training batches)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        pairs = batch.values() if isinstance(batch, dict) else [batch]
        return sum(nn.functional.cross_entropy(self(x), y) for x, y in pairs)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class RecordEpochStarts(Callback):
    """At each epoch's first batch (listed after the pruning callback: what training starts from), the trainable
    weights (``weight_orig`` once pruned), the zeros of the effective ones and how many parameters have optimizer
    state."""

    def __init__(self) -> None:
        self.weights, self.optimizer_states, self.zeros = {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.zeros[trainer.current_epoch] = sum(int((m.weight == 0).sum()) for m in pl_module.layer)
            self.weights[trainer.current_epoch] = [
                getattr(m, "weight_orig", m.weight).detach().clone() for m in pl_module.layer]
            self.optimizer_states[trainer.current_epoch] = len(trainer.optimizers[0].state)


class SimulatedCrash(RuntimeError):
    """What `CrashAtStep` raises: a run killed mid-training."""


class CrashAtStep(Callback):
    """Kills the run (raises `SimulatedCrash`) once the trainer's ``global_step`` reaches `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"killed at step {self.step}")


def fit_killed_and_resumed(tmp_path: Any, make_model: Any, make_callback: Any, make_data: Any, *, crash_step: int = 25,
                           epochs: int = 3, seed: int = 1) -> tuple[Any, dict, Any]:
    """One fit three ways, seeded alike, each with a fresh model, callback and data: uninterrupted; killed at
    `crash_step` with a checkpoint after every epoch; resumed from that checkpoint (`make_callback` may return a list
    of callbacks). Returns the uninterrupted model,
    the state dict the crash left on disk and the resumed model."""
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(callbacks: list, ckpt_path: Any = None) -> Any:
        model = make_model()
        made = make_callback()  # a callback, or a list of them
        trainer = Trainer(max_epochs=epochs, callbacks=[*(made if isinstance(made, list) else [made]), *callbacks],
                          accelerator="cpu", devices=1,
                          logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
                          default_root_dir=tmp_path)
        trainer.fit(model, datamodule=make_data(), ckpt_path=ckpt_path)
        return model

    seed_everything(seed)
    reference = run([ModelCheckpoint(dirpath=tmp_path / "reference")])
    seed_everything(seed)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "killed", save_last=True, every_n_epochs=1)
    with pytest.raises(SimulatedCrash, match=f"killed at step {crash_step}"):
        run([checkpoint, CrashAtStep(crash_step)])
    state = torch.load(checkpoint.last_model_path, weights_only=False)["state_dict"]
    return reference, state, run([], ckpt_path=checkpoint.last_model_path)


class ReluMLP(nn.Module):
    """``fc1 -> ReLU -> fc2 -> ReLU -> head``, seeded: the sparse-kernel tests' model at the widths they need."""

    def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(inputs, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CountsItsCalls(nn.Module):
    """``hidden -> ReLU -> out`` whose forward writes state of its own: a call counter in a buffer, as a cache or an
    online statistic does."""

    def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(inputs, hidden), nn.Linear(hidden, outputs)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.out(torch.relu(self.hidden(x)))


def agreeing_with(reference: nn.Module, batches: list[tuple]) -> Any:
    """An eval_fn: how often a model's classes agree with `reference`'s on `batches` (tuples of inputs)."""
    with torch.no_grad():
        expected = [reference(*batch).argmax(1) for batch in batches]

    def agreement(model: nn.Module) -> float:
        with torch.no_grad():
            return float(torch.cat([model(*b).argmax(1) == e for b, e in zip(batches, expected)]).float().mean())

    return agreement


def sgd_fine_tune(batches: list[tuple], lr: float, steps: int, after_step: Any = None, each_step: Any = None) -> Any:
    """A fine_tune for the pipeline (``fine_tune(model, step)``): `steps` SGD steps of cross-entropy over `batches`
    ((x, y) pairs, cycled from the second), calling the pipeline's ``step(t)`` and then ``after_step(model)`` and
    ``each_step(model, t)``."""

    def fine_tune(model: nn.Module, step: Any) -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for t in range(1, steps + 1):
            x, y = batches[t % len(batches)]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            step(t)
            if after_step is not None:
                after_step(model)
            if each_step is not None:
                each_step(model, t)

    return fine_tune


def make_trainer(tmp_path: Any, **overrides: Any) -> Trainer:
    kwargs: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        limit_train_batches=4,
        limit_val_batches=1,
        max_epochs=3,
        accelerator="cpu",
        devices=1,
    )
    kwargs.update(overrides)
    return Trainer(**kwargs)


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    """One intra-op thread: the test models are tiny, and on a 2-core host thread hand-offs made them ~10x slower."""
    torch.set_num_threads(1)


@pytest.fixture
def unwritable_folder(tmp_path: Any) -> Iterator[Any]:
    """A folder this process cannot create files in: one with its write permission taken away, or, where that does
    not stop this process (root), /sys/kernel (sysfs, read-only to everyone); the test is skipped without either."""
    from pathlib import Path

    from litcompress._files import cannot_write

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if cannot_write(locked) is not None:
            yield locked
        elif Path("/sys/kernel").is_dir() and cannot_write(Path("/sys/kernel")) is not None:
            yield Path("/sys/kernel")
        else:
            pytest.skip("no folder this process cannot write to")
    finally:
        locked.chmod(0o700)
