"""A Fabric DDP loop (2 CPU processes) training a `prepare_qat` model, each rank on other batches and calling
`sync_ranges_` after every step: writes what each rank saw to OUT/rank<r>.pt. Run by tests/quantization/test_qat.py."""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from torch import nn

from litcompress.quantization.qat import _observed_range, prepare_qat


def batch(step: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s inputs at `step`; each rank's spread differs, so are its ranges."""
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(1000 * step + rank)) * (1 + rank)


def ranges(qat) -> dict[str, torch.Tensor]:
    found = {}
    for name, module in qat.graph.named_modules():
        if _observed_range(module) is not None:
            low, high = _observed_range(module)
            found.update({f"{name}.min": low.clone(), f"{name}.max": high.clone(), f"{name}.scale": module.scale.clone(),
                          f"{name}.zero_point": module.zero_point.clone()})
    return found


def input_quantizer(qat) -> nn.Module:
    """The fake quantizer the graph's input goes through: it sees the raw batches, whatever the weights."""
    for node in qat.graph.graph.nodes:
        if node.op == "call_module" and node.args[0].op == "placeholder":
            return qat.graph.get_submodule(node.target)
    raise AssertionError("no quantizer on the input")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    torch.manual_seed(0)  # the same model on every rank
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    qat = prepare_qat(model, (batch(0, rank),))  # each rank calibrates on its own first batch
    record = {"prepared": ranges(qat)}
    gathered = [None] * world
    dist.all_gather_object(gathered, record["prepared"])
    record["gathered"] = gathered
    record["changed_at_prepare"] = qat.sync_ranges_()
    record["synced"] = ranges(qat)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    trained, optimizer = fabric.setup(qat, optimizer)
    union_steps = []
    for step in range(1, 6):
        reference = copy.deepcopy(input_quantizer(qat))  # one process that saw every rank's batch
        reference(torch.cat([batch(step, r) for r in range(world)]))
        optimizer.zero_grad()
        fabric.backward(trained(batch(step, rank)).square().mean())
        optimizer.step()
        qat.sync_ranges_()
        low, high = _observed_range(input_quantizer(qat))
        union_steps.append((torch.equal(low, reference.activation_post_process.min_val),
                            torch.equal(high, reference.activation_post_process.max_val)))
    record["union_steps"] = union_steps
    record["trained"] = ranges(qat)
    record["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        record["int8_outputs"] = qat.convert().model(torch.linspace(-3, 3, 4 * 16).view(4, 16))
    torch.save(record, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
