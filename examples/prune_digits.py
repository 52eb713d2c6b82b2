"""Train a small MLP on scikit-learn's digits with litcompress.ModelPruning, then report accuracy and sparsity.

Runs in well under a minute on a laptop CPU; no download (the data ships inside scikit-learn).
"""

from __future__ import annotations

import argparse

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from litcompress import ModelPruning, sparsity_report


class DigitsMLP(LightningModule):
    def __init__(self, hidden: int = 128, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def digits_loaders(seed: int = 0, batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[: int(0.8 * len(x))], order[int(0.8 * len(x)) :]
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(x[test], y[test]), batch_size=256))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--target", type=float, default=0.9, help="final sparsity of the weights")
    args = parser.parse_args()
    if not 0.0 <= args.target < 1.0:
        parser.error(f"--target must be in [0, 1), got {args.target}")

    seed_everything(0)
    train, test = digits_loaders()
    pruning_epochs = max(1, args.epochs // 2)
    # Lightning semantics: each round prunes `amount` of what remains, so a constant per-round fraction over
    # `pruning_epochs` rounds reaches the target.
    per_round = 1.0 - (1.0 - args.target) ** (1.0 / pruning_epochs)

    model = DigitsMLP()
    pruning = ModelPruning(
        "l1_unstructured",
        parameter_names=["weight"],
        amount=lambda epoch: per_round if epoch < pruning_epochs else 0.0,
        use_lottery_ticket_hypothesis=False,
        verbose=1,
    )
    trainer = Trainer(max_epochs=args.epochs, callbacks=[pruning], logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False, accelerator="cpu")
    trainer.fit(model, train, test)
    accuracy = trainer.test(model, test, verbose=False)[0]["test_acc"]
    report = sparsity_report(model, [(m, "weight") for m in model.net if isinstance(m, nn.Linear)])
    print()
    print(report.table())
    print(f"\ntest accuracy {accuracy:.2%} at {report.sparsity:.2%} weight sparsity (target {args.target:.0%})")


if __name__ == "__main__":
    main()
