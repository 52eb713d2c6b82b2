"""find_lottery_ticket under Lightning DDP (2 CPU processes), retraining from the rewind point and saving the search
to OUT/search.pt: writes each rank's ticket (state and computed weights) to OUT/rank<r>.pt. Run by
tests/pruning/test_imp.py, twice: the second run resumes the finished search."""

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import seed_everything

from litcompress.callbacks.lottery import find_lottery_ticket
from litcompress.data import DigitsDataModule
from litcompress.models import MLPClassifier

if __name__ == "__main__":
    out = Path(sys.argv[1])
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # (rank 0 starts the others, which Lightning gives LOCAL_RANK)
    if sys.argv[2:] == ["seeded-per-rank"]:  # each rank builds other initial weights; rewinding to them
        seed_everything(100 + rank, verbose=False)
        given = MLPClassifier(hidden=(32,), lr=3e-3)
        given_state = {key: value.clone() for key, value in given.state_dict().items()}
        ticket = find_lottery_ticket(
            given, DigitsDataModule(batch_size=64), metric="test_acc", rounds=1, rate=0.5, control="none",
            trainer_kwargs=dict(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp"))
        torch.save({"rewound": ticket.rewound_state, "given": given_state,
                    "given_after": given.state_dict()}, out / f"seeded{rank}.pt")
        sys.exit(0)
    seed_everything(0, verbose=False)
    ticket = find_lottery_ticket(
        MLPClassifier(hidden=(32,), lr=3e-3), DigitsDataModule(batch_size=64), metric="test_acc", rounds=2, rate=0.5,
        rewind_to_step=3, retrain_from="rewind_point", checkpoint_path=out / "search.pt", control="none",
        trainer_kwargs=dict(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp"))
    torch.save({"state": ticket.model.state_dict(), "weight": ticket.model.net[0].weight.detach(),
                "remaining": ticket.remaining, "metrics": [r.metric for r in ticket.rounds]}, out / f"rank{rank}.pt")
