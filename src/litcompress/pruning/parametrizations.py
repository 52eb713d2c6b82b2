"""Tensors computed by `torch.nn.utils.parametrize` (``weight_norm``, ``spectral_norm``, ``orthogonal``, ...).

`torch.nn.utils.prune` can mask only a tensor that is a parameter of its module. A parametrized weight is a
property recomputed from the parametrization's originals at every access, so pruning has to see it folded into a
plain parameter first, as inference does anyway (``remove_weight_norm`` before shipping a vocoder).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.utils.parametrize as parametrize
from torch import Tensor, nn
from torch.nn.utils.parametrizations import _WeightNorm

FOLD_HINT = ("fold it into a plain weight first with litcompress.pruning.fold_parametrizations_(model) (or "
             "torch.nn.utils.parametrize.remove_parametrizations(module, name)), as inference does")


def describe_parametrization(module: nn.Module, name: str) -> str:
    """The classes computing ``module.<name>``, e.g. ``"_WeightNorm"``."""
    return " -> ".join(type(p).__name__ for p in module.parametrizations[name])


def parametrized_tensors(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every parametrized tensor of `model` as ``(module_path, module, tensor_name)``, in module order."""
    return [(path, module, name) for path, module in model.named_modules()
            if parametrize.is_parametrized(module) for name in module.parametrizations]


def parametrized_targets(targets: Iterable[tuple[nn.Module, str]]) -> list[tuple[nn.Module, str]]:
    """The targets whose tensor is computed by a parametrization (`torch.nn.utils.prune` cannot mask them)."""
    return [(m, n) for m, n in targets if parametrize.is_parametrized(m, n)]


def check_prunable(targets: Iterable[tuple[nn.Module, str]]) -> None:
    """Raise a `ValueError` naming the targets that are parametrized, with the fix."""
    found = parametrized_targets(targets)
    if found:
        names = ", ".join(f"{type(m).__name__}.{n} ({describe_parametrization(m, n)})" for m, n in found)
        raise ValueError(f"cannot prune {names}: the tensor is computed by a parametrization, which "
                         f"torch.nn.utils.prune cannot mask; {FOLD_HINT}.")


def fold_parametrizations_(model: nn.Module) -> list[str]:
    """Replace every parametrized tensor of `model` by a plain parameter holding its current value, in place.

    The value is read in eval mode (``spectral_norm`` would run a power iteration in training mode); it stays a
    parameter when it required grad. Modules deep-copied from one another can be folded independently. Returns
    the folded tensors' qualified names with their parametrizations, e.g.
    ``["net.2.weight (_WeightNorm)"]``; an empty list when there was none.
    """
    folded = []
    for path, module, name in parametrized_tensors(model):
        described = describe_parametrization(module, name)
        # torch deletes the tensor's property from the module's class, which a deep copy shares with the module
        # it was copied from: folding a copy would break the original. Give the module a class of its own first.
        cls = type(module)
        module.__class__ = type(cls.__name__, cls.__bases__,
                                {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
        training = module.training
        module.eval()
        # Not under no_grad: torch keeps a tensor that requires no grad as a buffer rather than a parameter.
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        module.train(training)
        folded.append(f"{path + '.' if path else ''}{name} ({described})")
    return folded


def unfold_state_dict(reference: nn.Module, state: Mapping[str, Tensor],
                      folded: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """`state` (of a copy of `reference` after :func:`fold_parametrizations_`) in `reference`'s own layout.

    Each folded tensor is assigned to a deep copy of `reference` through its parametrization's ``right_inverse``
    (weight norm's gives back ``g`` and ``v`` exactly, zeros included). Returns the state dict and the folded
    tensors whose parametrization does not give its value back (``spectral_norm``: ``v / sigma(v)`` for ``v``):
    when there is one, `state` is returned unchanged, since a loaded model would not compute the pruned weights.
    """
    if not folded:
        return dict(state), []
    from litcompress.pruning.engine import deepcopy_model, make_permanent_

    target = deepcopy_model(reference).eval()
    make_permanent_(target)  # a reference with pruning masks: its keys are those of the unpruned model
    plain = dict(state)
    failed = []
    with torch.no_grad():
        for entry in folded:
            qualified = entry.split(" ", 1)[0]
            path, _, name = qualified.rpartition(".")
            module = target.get_submodule(path)
            value = plain.pop(qualified).detach()
            try:
                setattr(module, name, value.clone())  # the originals take the storage of what is assigned
                _zero_rows_of_weight_norm_(module, name)
                back = getattr(module, name)
                exact = torch.equal(back == 0, value == 0) and torch.allclose(back, value, rtol=1e-5, atol=1e-7)
            except Exception:  # noqa: BLE001 - a parametrization without right_inverse, or one that rejects the value
                exact = False
            if not exact:
                failed.append(entry)
    if failed:
        return dict(state), failed
    missing, unexpected = target.load_state_dict(plain, strict=False)
    originals = {k for k in target.state_dict() if ".parametrizations." in k}
    if unexpected or set(missing) - originals:
        raise RuntimeError(f"unfolding the pruned state dict: unexpected keys {unexpected}, missing "
                           f"{sorted(set(missing) - originals)}")
    return target.state_dict(), []


def _zero_rows_of_weight_norm_(module: nn.Module, name: str) -> None:
    """Weight norm's inverse of a zero row (a pruned channel) is ``g = 0`` and ``v = 0``, which computes
    ``0 / 0``: give such rows ``v = 1``, so that they compute ``0 * v / |v| = 0``."""
    chain = module.parametrizations[name]
    if len(chain) != 1 or not isinstance(chain[0], _WeightNorm) or not hasattr(chain, "original1"):
        return
    g, v = chain.original0, chain.original1
    zero = (g == 0).expand_as(v)
    with torch.no_grad():
        v.masked_fill_(zero, 1.0)


__all__ = ["check_prunable", "fold_parametrizations_", "parametrized_targets", "parametrized_tensors",
           "unfold_state_dict"]
