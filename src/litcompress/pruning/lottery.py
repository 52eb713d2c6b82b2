"""Lottery-ticket snapshots: remember weights at one point of training, rewind surviving weights to them."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TypedDict

import torch
from torch import Tensor, nn
from torch.nn.utils.prune import BasePruningMethod

from litcompress.pruning.engine import (
    Target,
    check_targets,
    is_pruned,
    parameter_order_preserved,
    refresh_cached_tensor,
    trainable_tensor,
)


class LayerSnapshot(TypedDict):
    """A CPU copy of one module (without pruning state) and the targets ``(index, name)`` it serves."""

    data: nn.Module
    names: list[tuple[int, str]]


Snapshot = dict[int, LayerSnapshot]


def _cpu_copy_without_pruning(module: nn.Module) -> nn.Module:
    """A deep copy of `module` on the CPU, with trainable values in place of any pruning re-parametrisation.

    Every tensor is pre-seeded in the deepcopy memo with a detached CPU clone: this never copies on the
    accelerator, and it works on pruned modules, whose cached ``<name>`` is a non-leaf tensor that
    ``copy.deepcopy`` refuses.
    """
    memo: dict[int, object] = {}
    for sub in module.modules():
        for p in sub._parameters.values():
            if p is not None:
                memo[id(p)] = nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
        for b in sub._buffers.values():
            if b is not None:
                memo[id(b)] = b.detach().to("cpu", copy=True)
        for value in vars(sub).values():
            if isinstance(value, Tensor) and id(value) not in memo:
                memo[id(value)] = value.detach().to("cpu", copy=True)
    clone = copy.deepcopy(module, memo)
    for sub in clone.modules():
        for key in [k for k, h in sub._forward_pre_hooks.items() if isinstance(h, BasePruningMethod)]:
            name = sub._forward_pre_hooks.pop(key)._tensor_name
            with parameter_order_preserved([sub]):
                orig = sub._parameters.pop(name + "_orig")
                sub._buffers.pop(name + "_mask", None)
                vars(sub).pop(name, None)
                sub.register_parameter(name, orig)
    return clone


def take_snapshot(targets: Sequence[Target]) -> Snapshot:
    """Copy the current trainable values of `targets` to the CPU, one module copy per distinct module."""
    targets = check_targets(targets, "take_snapshot")
    snapshot: Snapshot = {}
    for i, (module, name) in enumerate(targets):
        if id(module) not in snapshot:
            snapshot[id(module)] = LayerSnapshot(data=_cpu_copy_without_pruning(module), names=[])
        snapshot[id(module)]["names"].append((i, name))
    return snapshot


def snapshot_tensor(snapshot: Snapshot, index: int) -> Tensor:
    """The snapshot values of target `index`."""
    for layer in snapshot.values():
        for i, name in layer["names"]:
            if i == index:
                return getattr(layer["data"], name)
    raise KeyError(f"target {index} is not in the snapshot")


def shuffled(values: Tensor) -> Tensor:
    """A random permutation of `values`' entries (torch's global RNG): fresh values from the distribution they were
    drawn from, where that drew them independently, for a parameter without ``reset_parameters``."""
    flat = values.detach().flatten()
    return flat[torch.randperm(flat.numel(), device=flat.device)].view_as(values)


def redraw_parameters_(module: nn.Module) -> list[str]:
    """Fresh values for every parameter of `module` (the random re-initialisation control of the lottery-ticket
    experiments), in place: ``reset_parameters()`` of each submodule that has one; a parameter no such method covers
    (a hand-written layer's, one a LightningModule holds itself) is :func:`shuffled`. Returns those parameters'
    names. Draws on torch's global RNG, as ``reset_parameters`` does. A tensor several modules hold (an output layer
    tied to the embedding) is drawn by the first of them in module order: a later one's ``reset_parameters`` wrote its
    own initialiser's values over it (a Linear's, about 7x smaller than an embedding's N(0, 1))."""
    covered: set[int] = set()
    for sub in module.modules():
        if callable(getattr(sub, "reset_parameters", None)):
            own = [p for p in sub._parameters.values() if p is not None]
            drawn = [(p, p.detach().clone()) for p in own if id(p) in covered]
            _reset_parameters_of_pruned(sub)
            with torch.no_grad():
                for param, value in drawn:
                    param.copy_(value)
            covered.update(id(p) for p in own)
    names = []
    for name, param in module.named_parameters():  # tied parameters once
        if id(param) not in covered:
            with torch.no_grad():
                param.copy_(shuffled(param))
            names.append(name)
    return names


def _reset_parameters_of_pruned(module: nn.Module) -> None:
    """``module.reset_parameters()``, which on a pruned module writes ``module.<name>``: the masked copy that pruning
    recomputes, not the ``<name>_orig`` that trains. Each pruned ``<name>`` is the trainable tensor while it runs."""
    pruned = [hook._tensor_name for hook in module._forward_pre_hooks.values() if isinstance(hook, BasePruningMethod)]
    cached = {name: vars(module).pop(name, None) for name in pruned}
    try:
        for name in pruned:  # (set in the instance's dict: Module.__setattr__ would register a parameter)
            vars(module)[name] = module._parameters[name + "_orig"]
        module.reset_parameters()
    finally:
        for name in pruned:
            vars(module).pop(name, None)
            if cached[name] is not None:
                vars(module)[name] = cached[name]
            refresh_cached_tensor(module, name)


def _snapshot_target(targets: Sequence[Target], snapshot: Snapshot, index: int, name: str, value: object,
                     owner: str) -> Target:
    """The target the snapshot's entry `index` was taken from: the one at that place in `targets`, which must be the
    list given to :func:`take_snapshot` (or one of the same architecture: another copy of the network), in its order."""
    count = sum(len(layer["names"]) for layer in snapshot.values())
    if len(targets) != count:
        raise ValueError(f"{owner}: the snapshot holds {count} targets, and {len(targets)} were given: pass the "
                         "targets given to take_snapshot, in their order.")
    module, target_name = targets[index]
    try:
        tensor = trainable_tensor(module, target_name) if target_name == name else None
    except AttributeError:  # a module without that tensor
        tensor = None
    if not isinstance(tensor, Tensor) or (isinstance(value, Tensor) and value.shape != tensor.shape):
        def shape(of: object) -> str:
            return str(tuple(of.shape)) if isinstance(of, Tensor) else "(none)"

        held = getattr(module, target_name, None)
        raise ValueError(f"{owner}: target {index} is {type(module).__name__}.{target_name} {shape(held)}, but the "
                         f"snapshot took its {name} {shape(value)} there: pass the targets given to take_snapshot, in "
                         "their order.")
    return module, target_name


def at_snapshot(targets: Sequence[Target], snapshot: Snapshot) -> bool:
    """Whether the trainable tensors of `targets` hold their snapshot values (no step since it was taken): rewinding
    them would change nothing."""
    for layer in snapshot.values():
        for i, name in layer["names"]:
            value = getattr(layer["data"], name, None)
            module, target_name = _snapshot_target(targets, snapshot, i, name, value, "at_snapshot")
            dst = trainable_tensor(module, target_name)
            if isinstance(value, Tensor) and not torch.equal(dst.detach(), value.to(dst.device, dst.dtype)):
                return False
    return True


def rewind_(targets: Sequence[Target], snapshot: Snapshot, *, resample: bool = False) -> None:
    """Copy snapshot values into the trainable tensors of `targets` (``<name>_orig`` when pruned): the targets given
    to :func:`take_snapshot`, in their order (entries are matched by place; a list of another length, or whose names
    or shapes differ there, is refused).

    Values are copied, never aliased, so the snapshot stays what it was however long training goes on. A target
    without a mask keeps its exact zeros (a mask made permanent by ``make_permanent_`` leaves its pruned entries so):
    only its other entries are rewound.
    With ``resample=True`` each module copy draws fresh values with its ``reset_parameters()`` instead, or, for a
    module without one, takes a :func:`shuffled` copy of its snapshot values (the random re-initialisation control of
    the lottery-ticket experiments: never the snapshot's own values). A tensor several targets hold (an output layer
    tied to its embedding) is drawn once, by the first of them in `targets`' order.
    """
    if not isinstance(snapshot, Mapping):
        raise TypeError(f"rewind_: expected the snapshot take_snapshot(targets) returned before pruning, got "
                        f"{type(snapshot).__name__}.")
    drawn: set[int] = set()  # tensors resampled already: a tied one is drawn by its first holder among `targets`
    for layer in snapshot.values():
        source = layer["data"]
        can_reset = callable(getattr(source, "reset_parameters", None))
        if resample and can_reset:
            source = copy.deepcopy(source)  # keep the snapshot itself
            source.reset_parameters()
        for i, name in layer["names"]:
            value = getattr(source, name, None)
            module, target_name = _snapshot_target(targets, snapshot, i, name, value, "rewind_")
            if not isinstance(value, Tensor):
                continue
            if resample and not can_reset:
                value = shuffled(value)
            dst = trainable_tensor(module, target_name)
            if resample:
                # a later holder's initialiser would overwrite the first's draw (a Linear's, about 7x smaller than
                # the N(0, 1) of the embedding it is tied to), as redraw_parameters_ avoids too
                if id(dst) in drawn:
                    continue
                drawn.add(id(dst))
            # a target pruned, then made permanent (its mask gone, its zeros left): survivors back, the zeros kept
            # (they came back dense, the ticket's sparsity lost, silently), as ModelPruning's reset keeps them; a
            # trained weight holds no exact zero it did not get from pruning
            zeros = None if is_pruned(module, target_name) else dst.detach() == 0
            with torch.no_grad():
                dst.copy_(value)
                if zeros is not None:
                    dst.masked_fill_(zeros, 0)
            refresh_cached_tensor(module, target_name)
