"""Keep pruning state identical across data-parallel ranks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from litcompress.pruning.engine import Target, refresh_cached_tensor, is_pruned, trainable_tensor


def distributed_world_size() -> int:
    """The number of ranks of the default process group, 1 when none is initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_pruning_state_(targets: Sequence[Target], *, src: int = 0, values: bool = False,
                             world_size: int | None = None) -> None:
    """Make every rank's masks (and, with ``values=True``, trainable values) equal to rank `src`'s.

    Random pruning methods and ``reset_parameters`` draw from each process's own generator: without this,
    ranks that were not seeded alike would train different sub-networks. A no-op without a process group.

    `world_size`: how many processes prune together, when the caller knows (a Lightning fit's
    ``trainer.world_size``); 1 skips the broadcast even where a process group is initialised (one another fit left
    behind, whose other ranks are not pruning and would never answer). None: the default process group's size.
    """
    if (distributed_world_size() if world_size is None else world_size) == 1:
        return
    for module, name in targets:
        if is_pruned(module, name):
            dist.broadcast(getattr(module, name + "_mask"), src=src)
        if values:
            with torch.no_grad():
                dist.broadcast(trainable_tensor(module, name).data, src=src)
        if is_pruned(module, name):
            refresh_cached_tensor(module, name)
