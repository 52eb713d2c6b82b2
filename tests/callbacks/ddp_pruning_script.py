"""Run by test_pruning_ddp.py: two-process DDP on CPU with random pruning; each rank saves its masks.

Usage: python ddp_pruning_script.py {litcompress,lightning} OUT_DIR
Lightning's `ddp` launcher re-runs this script for rank 1.
"""

import os
import sys

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelPruning as LightningModelPruning
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

from litcompress import ModelPruning


class Model(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 2))

    def on_train_epoch_start(self) -> None:
        # Ranks not seeded alike, as in a user script without `seed_everything`.
        torch.manual_seed(1000 + self.global_rank + 10 * self.current_epoch)


def main(impl: str, out: str) -> None:
    cls = ModelPruning if impl == "litcompress" else LightningModelPruning
    model = Model()
    callback = cls(
        "random_unstructured",
        amount=0.3,
        make_pruning_permanent=False,
        use_lottery_ticket_hypothesis=True,
        resample_parameters=True,
    )
    trainer = Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=3, limit_train_batches=3, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(model)
    state = {k: v for k, v in model.state_dict().items() if k.endswith(("_mask", "_orig"))}
    torch.save(state, os.path.join(out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
