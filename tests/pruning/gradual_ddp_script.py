"""A Fabric DDP loop (2 CPU processes) pruning with GradualPruner and a random method, each rank seeded otherwise:
writes each rank's model state to OUT/rank<r>.pt. Run by tests/pruning/test_gradual.py."""

import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch import nn

from litcompress.pruning import GradualPruner, default_targets
from litcompress.pruning.schedules import PolynomialDecay

if __name__ == "__main__":
    out = Path(sys.argv[1])
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    torch.manual_seed(fabric.global_rank)  # ranks that draw otherwise: the random masks must still agree
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = GradualPruner(default_targets(model), PolynomialDecay(final_sparsity=0.6, begin=1, end=6, frequency=2),
                           "random_unstructured")
    model, optimizer = fabric.setup(model, optimizer)  # DDP broadcasts rank 0's initial weights
    for step in range(1, 9):
        x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
        optimizer.zero_grad()
        fabric.backward(nn.functional.cross_entropy(model(x), y))
        optimizer.step()
        pruner.step(step)
    torch.save(model.module.state_dict(), out / f"rank{fabric.global_rank}.pt")
    # torn down before exit: gloo's threads left to the interpreter's exit once aborted the process (SIGABRT,
    # "terminate called without an active exception") on a loaded machine
    fabric.barrier()
    torch.distributed.destroy_process_group()
