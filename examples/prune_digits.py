"""Train a small MLP on scikit-learn's digits with litcompress.ModelPruning and a cubic sparsity schedule, then run
its sparse layers on CSR kernels where that is faster on this machine (litcompress.pruning.sparsify).

Runs in well under a minute on a laptop CPU; no download (the data ships inside scikit-learn). The kernels pay off on
wider layers and sparser weights: try ``--hidden 1024 --target 0.95``.
"""

from __future__ import annotations

import argparse

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn

from litcompress import ModelPruning, sparsity_report
from litcompress.data import DigitsDataModule
from litcompress.pruning import sparsify
from litcompress.pruning.schedules import PolynomialDecay


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--target", type=float, default=0.9, help="final sparsity of the weights, in [0, 1)")
    parser.add_argument("--hidden", type=int, default=128, help="width of the two hidden layers")
    args = parser.parse_args()
    if not 0.0 <= args.target < 1.0:
        parser.error(f"--target must be in [0, 1), got {args.target}")
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2, got {args.epochs}")
    if args.hidden < 1:
        parser.error(f"--hidden must be >= 1, got {args.hidden}")

    seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    data.setup()
    steps = args.epochs * len(data.train_dataloader())
    # Zhu & Gupta: sparsity rises on a cubic curve over the first 60% of the steps, pruning every 10 steps;
    # the rest of training fine-tunes the sparse network. The target is hit exactly.
    schedule = PolynomialDecay(final_sparsity=args.target, begin=0, end=int(0.6 * steps), frequency=10)

    model = DigitsMLP(hidden=args.hidden)
    pruning = ModelPruning(
        "l1_unstructured", parameter_names=["weight"], amount=schedule, use_lottery_ticket_hypothesis=False
    )
    trainer = Trainer(max_epochs=args.epochs, callbacks=[pruning], logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False, accelerator="cpu")
    trainer.fit(model, datamodule=data)
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"]
    report = sparsity_report(model, [(m, "weight") for m in model.net if isinstance(m, nn.Linear)])
    print()
    print(report.table())
    print(f"\ntest accuracy {accuracy:.2%} at {report.sparsity:.2%} weight sparsity (target {args.target:.0%})")

    # Inference on sparse kernels: each layer timed dense against CSR on a batch of 256 test images, one thread
    batch = data.splits.test.tensors[0][:256]
    sparse = sparsify(model.net, batch, num_threads=1)
    print()
    print(sparse.report.table())


if __name__ == "__main__":
    main()
