"""Framework-free pruning engine over `torch.nn.utils.prune`.

A *target* is a ``(module, tensor_name)`` pair. Pruning re-parametrises ``module.<name>`` the way torch does:
the trainable values move to ``<name>_orig``, a ``<name>_mask`` buffer holds the mask, and a forward pre-hook
recomputes ``<name> = <name>_orig * <name>_mask``. Everything here works on that standard state, so models
pruned by plain torch code, by Lightning's callback or by litcompress are interchangeable.

Two deliberate differences from calling torch directly:

* the order of ``module._parameters`` is preserved (``<name>_orig`` takes the slot of ``<name>``), so an
  optimizer built on a pruned model and one built on the unpruned model index their state alike, and
  checkpoints resume exactly;
* only real re-parametrisations are recognised (a forward pre-hook that is a pruning method), never
  buffers that merely end in ``_mask`` such as ``attn_mask``.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import difflib
import itertools
import math
import numbers
import os
import sys
import warnings
import weakref
import zlib
from contextvars import ContextVar
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.utils.prune as torch_prune
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from litcompress._numbers import as_python_number, is_bool
from litcompress.pruning.methods import (PRUNING_METHODS, accepted_kwargs, check_countable_slices, check_method_kwargs,
                                         check_near_misses, check_slices_exist, check_takes_amount, norm_refusal,
                                         resolve_method, structured_dim)
from litcompress.pruning.parametrizations import (check_prunable, is_computed, parametrized_tensors,
                                                  scripted_targets_message)
from litcompress.pruning.schedules import block_multiple, count_to_prune, structured_pruned_count
from litcompress.pruning.threshold import (CONVERTED_FOR_MAGNITUDES, common_dtype, exact_magnitudes, holds_nan,
                                          smallest_k_masks)

Target = tuple[nn.Module, str]
Scope = Literal["local", "global"]


# --------------------------------------------------------------------------------------------- inspection
def pruning_hook(module: nn.Module, name: str) -> torch_prune.BasePruningMethod | None:
    """The pruning forward pre-hook that re-parametrises ``module.<name>``, or None."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name == name:
            return hook
    return None


def is_excluded(name: str, exclude: Iterable[str]) -> bool:
    """Whether the module called `name` is in `exclude` or inside a module named there (``"encoder"`` leaves every
    layer of the encoder)."""
    return any(name == excluded or name.startswith(f"{excluded}.") for excluded in exclude)


def close_names(unknown: Iterable[str], names: Iterable[str]) -> str:
    """A hint for module names not found among `names`: ``" ('encodr': did you mean 'encoder'?)"``, or ``""``."""
    names = [known for known in names if known]
    hints = []
    for name in unknown:
        close = [known for known in names if known.lower() == name.lower() or name.endswith(f".{known}")
                 or known.endswith(f".{name}")]
        close += difflib.get_close_matches(name, names, n=3)
        if close:
            hints.append(f"{name!r}: did you mean {' or '.join(map(repr, dict.fromkeys(close)))}?")
    return f" ({'; '.join(hints)})" if hints else ""


def check_fraction(value: object, owner: str, argument: str, what: str) -> float:
    """`value` as a float in [0, 1) (numpy's and Python's real numbers), else ValueError naming ``owner(argument=
    ...)`` and `what` it is a fraction of."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:  # NaN too
        raise ValueError(f"{owner}({argument}={value!r}): expected a fraction of {what} in [0, 1).")
    return float(value)


def check_module_names(model: nn.Module, names: object, owner: str, argument: str) -> tuple[str, ...]:
    """`names` (module paths of `model`, as ``named_modules()`` gives them) as a tuple; ValueError for one that
    names no module (it would be ignored) or a lone string (iterated by character, it named nothing)."""
    if not isinstance(names, str) and isinstance(names, Iterable):
        names = tuple(names)  # once: a generator checked first would be used up
    if isinstance(names, str) or not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{owner}({argument}={names!r}): expected module names (a tuple of str, e.g. "
                        "('encoder',)).")
    known = {path for path, _ in model.named_modules() if path}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{owner}({argument}={names!r}): {unknown} name(s) no module of the model"
                         f"{close_names(unknown, known)}.")
    return names


def is_pruned(module: nn.Module, name: str) -> bool:
    """True when ``module.<name>`` is currently re-parametrised by a pruning method."""
    return pruning_hook(module, name) is not None


def pruned_targets(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every re-parametrised tensor of `model` as ``(module_path, module, tensor_name)``."""
    found = []
    for path, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                found.append((path, module, hook._tensor_name))
    return found


def trainable_tensor(module: nn.Module, name: str) -> Tensor:
    """The tensor that holds the trainable values: ``<name>_orig`` when pruned, else ``<name>``."""
    return getattr(module, name + "_orig") if is_pruned(module, name) else getattr(module, name)


def effective_tensor(module: nn.Module, name: str) -> Tensor:
    """The values the module computes with, ``orig * mask`` when pruned, without autograd history.

    Computed from ``orig`` and ``mask`` rather than read from ``module.<name>``, which torch refreshes only at
    the next forward and is therefore stale after an in-place reset of ``<name>_orig``.
    """
    with torch.no_grad():
        if is_pruned(module, name):
            orig = getattr(module, name + "_orig")
            return orig.detach() * getattr(module, name + "_mask").to(dtype=orig.dtype)
        return getattr(module, name).detach()


def mask_of(module: nn.Module, name: str) -> Tensor | None:
    """The current mask of ``module.<name>``, or None when it is not pruned."""
    return getattr(module, name + "_mask") if is_pruned(module, name) else None


def unique_modules(targets: Iterable[Target]) -> list[nn.Module]:
    """The distinct modules of `targets`, in first-seen order."""
    seen: dict[int, nn.Module] = {}
    for module, _ in targets:
        seen.setdefault(id(module), module)
    return list(seen.values())


def lazy_parameter_names(model: nn.Module) -> list[str]:
    """The qualified names of `model`'s parameters and buffers that lazy layers (``nn.LazyLinear``,
    ``nn.LazyBatchNorm2d(affine=False)``'s statistics) have not created yet: those layers were never called."""
    return [name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
            if is_lazy(tensor)]


def check_lazy_layers_called(model: nn.Module, where: str) -> None:
    """ValueError if `model` has lazy layers never called: each copy made of it would create weights of its own at
    its first call (random ones), so the stages or candidates compared would be different networks."""
    lazy = lazy_parameter_names(model)
    if lazy:
        raise ValueError(f"{where}: {', '.join(lazy[:3])}{', ...' if len(lazy) > 3 else ''} belong to lazy layers "
                         "never called, whose weights do not exist yet (each copy would draw its own): call the model "
                         "once first (model(*example_inputs)), then pass it.")


def check_module(model: object, where: str) -> None:
    """TypeError unless `model` is an ``nn.Module``, naming the entry point `where` it was given to."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: expected a torch.nn.Module, got {type(model).__name__}.")


def _holds_tensor(module: nn.Module, name: str) -> bool:
    """Whether `module` has a tensor `name`, without computing a parametrized one."""
    return (isinstance(module._parameters.get(name), Tensor) or isinstance(module._buffers.get(name), Tensor)
            or is_pruned(module, name) or parametrize.is_parametrized(module, name)
            or isinstance(module.__dict__.get(name), Tensor))


def check_targets(targets: object, where: str) -> list[Target]:
    """`targets` as a list of ``(module, name)`` pairs, each naming a tensor its module holds; else an error that
    says what was given and what is expected."""
    if isinstance(targets, nn.Module):
        raise TypeError(f"{where}: expected (module, name) pairs such as [(model.fc, 'weight')], got a "
                        f"{type(targets).__name__}; default_targets(model) lists a model's weights (prune_model_ "
                        "prunes them).")
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Iterable):
        raise TypeError(f"{where}: expected a list of (module, name) pairs, got {type(targets).__name__}.")
    pairs = list(targets)
    for item in pairs:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], nn.Module)
                and isinstance(item[1], str)):
            raise TypeError(f"{where}: each target is a (module, name) pair such as (model.fc, 'weight'), got "
                            f"{item!r}.")
        module, name = item
        scripted = scripted_targets_message([(module, name)])
        if scripted:  # its parameter dict cannot even be read as a module's
            raise ValueError(f"{where}: {scripted}")
        if not _holds_tensor(module, name):
            names = [n for n, _ in module.named_parameters(recurse=False)]
            raise ValueError(f"{where}: {type(module).__name__} has no tensor {name!r} (its parameters: {names}).")
    return [(module, name) for module, name in pairs]


def tensor_key(module: nn.Module, name: str) -> object:
    """What identifies the tensor of a target: its Parameter (which tied modules share), or a TorchScript module's
    tensor (stored, never computed; a loaded one's parameters are plain tensors), else the target itself (a
    parametrized weight is computed afresh at every access, and a freed temporary's id can come back)."""
    if is_computed(module, name):  # (not computed here: a training spectral norm would run a power iteration)
        return (id(module), name)
    tensor = trainable_tensor(module, name)
    stored = isinstance(tensor, nn.Parameter) or isinstance(module, torch.jit.ScriptModule)
    return id(tensor) if stored else (id(module), name)


def _holder_of_each_tensor(targets: Iterable[Target]) -> dict[object, Target]:
    """By :func:`tensor_key`, in order of first appearance, the target each tensor is pruned under: the first one
    that carries a mask (torch's own pruning of one holder of a tied weight leaves the others unmasked), else the
    first one."""
    holders: dict[object, Target] = {}
    for module, name in targets:
        key = tensor_key(module, name)
        if key not in holders or (not is_pruned(*holders[key]) and is_pruned(module, name)):
            holders[key] = (module, name)
    return holders


def distinct_targets(targets: Iterable[Target]) -> list[Target]:
    """`targets` with each tensor once, under its first target (its first masked one, when another holder was
    pruned on its own). Tied weights (one Parameter held by several modules, as a language model's output layer holds
    its input embedding's matrix) are one tensor: counting them once keeps the sparsity exact and the global ranking
    fair, and a round goes on from the mask a holder already has."""
    return list(_holder_of_each_tensor(targets).values())


def _tied_holders(named_modules: Iterable[tuple[str, nn.Module]]) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """By id of each parameter that several of `named_modules` hold, its holders ``(module path, module, tensor
    name)``; the name of a pruned tensor, not of its ``<name>_orig``."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, module in named_modules:
        for key, param in module._parameters.items():
            if param is not None:
                base = key[: -len("_orig")]
                name = base if key.endswith("_orig") and is_pruned(module, base) else key
                holders.setdefault(id(param), []).append((path, module, name))
    return {key: group for key, group in holders.items() if len(group) > 1}


def tied_parameters(named_modules: Iterable[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module, str]]]:
    """Each parameter that several of `named_modules` hold (tied weights: a language model's output layer holding
    its input embedding's matrix), as its holders ``(module path, module, tensor name)``."""
    return list(_tied_holders(named_modules).values())


def with_tied_targets(model: nn.Module, targets: Sequence[Target]) -> list[Target]:
    """`targets`, then every other ``(module, name)`` of `model` that holds one of their tensors (tied weights).

    A tied tensor pruned under one module only would reach the others unmasked: they would train with, and be
    judged on, values that the permanent model no longer has.
    """
    holders = _tied_holders(model.named_modules())  # keyed like tensor_key: by the Parameter's id
    result = list(targets)
    seen = {(id(m), n) for m, n in result}
    for module, name in targets:
        for _, holder, holder_name in holders.get(tensor_key(module, name), ()):
            if (id(holder), holder_name) not in seen:
                seen.add((id(holder), holder_name))
                result.append((holder, holder_name))
    return result


# -------------------------------------------------------------------------------------- re-parametrisation
@contextmanager
def parameter_order_preserved(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Keep each module's parameter order across (un)pruning: ``x_orig`` takes the slot of ``x`` and back."""
    modules = list(modules)
    before = [list(m._parameters) for m in modules]
    try:
        yield
    finally:  # torch undoing a failed re-parametrisation appends the parameter last
        _restore_parameter_order(modules, before)


def _restore_parameter_order(modules: Sequence[nn.Module], before: Sequence[Sequence[str]]) -> None:
    for module, order in zip(modules, before):
        params = module._parameters
        slot = {key: i for i, key in enumerate(order)}
        for key in params:
            if key not in slot:
                base = key[: -len("_orig")] if key.endswith("_orig") else key + "_orig"
                if base in slot:
                    slot[key] = slot[base]
        ranked = sorted(params.items(), key=lambda kv: slot.get(kv[0], len(order)))
        params.clear()
        params.update(ranked)  # in place: the module keeps the same dict object


def _reparametrise_(module: nn.Module, name: str) -> Tensor:
    """Give ``module.<name>`` the standard pruning state with an all-ones mask; returns the mask buffer.

    Uses torch's `Identity` method, whose hook holds no tensor: `custom_from_mask` would keep a second copy of
    the mask alive inside its hook for as long as the model lives.
    """
    check_prunable([(module, name)])
    with parameter_order_preserved([module]):
        torch_prune.identity(module, name)
    return getattr(module, name + "_mask")


_MASK_VALUES = ("a mask keeps an entry with 1 and prunes it with 0 (a bool tensor will do); other values would scale "
                "the weights, not prune them.")


def stray_mask_values(mask: object) -> str | None:
    """None when `mask` holds only 0 and 1 (or is no tensor, or has no values yet: meta); else what it holds
    instead, in words."""
    if not isinstance(mask, Tensor) or mask.dtype == torch.bool or mask.is_meta:
        return None
    stray = (mask != 0) & (mask != 1)  # (NaN too)
    if not bool(stray.any()):
        return None
    count = int(stray.sum())
    return f"{mask[stray].flatten()[0].item()} ({count} {'entry' if count == 1 else 'entries'} neither 0 nor 1)"


def check_state_masks(state_dict: Mapping[str, Any], prefix: str = "", model: nn.Module | None = None) -> None:
    """Refuse a state whose pruning masks (``<name>_mask`` beside ``<name>_orig``) hold other values than 0 and 1,
    naming the key, before any of it is loaded (a module already pruned took such a mask through its buffer). With
    `model` (the module at `prefix`), only the pairs of its tensors that are or can be pruned: a buffer of its own
    named ``attn_mask`` beside a parameter ``attn_orig`` is no pruning mask."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and key.endswith("_mask") and key[:-len("_mask")] + "_orig" in state_dict:
            if model is not None and not _a_pruning_pair(model, key[len(prefix):-len("_mask")]):
                continue
            stray = stray_mask_values(value)
            if stray is not None:
                raise ValueError(f"the state's {key!r} holds {stray} (a damaged or hand-made state?): "
                                 f"{_MASK_VALUES}")


def _a_pruning_pair(model: nn.Module, base: str) -> bool:
    """Whether `base` (``path.name``) names a tensor of `model` that is pruned, or a parameter that can be."""
    path, _, name = base.rpartition(".")
    try:
        owner = model.get_submodule(path)
    except AttributeError:
        return True  # not this model's: checked all the same (strict loading reports the key)
    return is_pruned(owner, name) or isinstance(getattr(owner, name, None), nn.Parameter)


def _write_mask_(module: nn.Module, name: str, mask: Tensor, *, combine: bool) -> None:
    param = trainable_tensor(module, name)
    if is_lazy(param):  # a lazy layer never called, loading a masked checkpoint: the mask gives the shape, the
        param.materialize(mask.shape)  # checkpoint the values (as torch's own load hook of lazy layers does)
    if mask.shape != param.shape:
        raise ValueError(f"Mask of shape {tuple(mask.shape)} does not fit `{name}` of shape {tuple(param.shape)}.")
    stray = stray_mask_values(mask)  # else 2.0 scaled the weights and NaN made them NaN, silently
    if stray is not None:
        raise ValueError(f"The mask for `{name}` holds {stray}: {_MASK_VALUES}")
    buffer = getattr(module, name + "_mask") if is_pruned(module, name) else _reparametrise_(module, name)
    with torch.no_grad():
        if combine:
            buffer.mul_(mask.to(device=buffer.device, dtype=buffer.dtype))
        else:
            buffer.copy_(mask.to(device=buffer.device))
    refresh_cached_tensor(module, name)


def share_tied_masks_(targets: Sequence[Target], tensors: Collection[object] | None = None) -> None:
    """Give each other target of a tensor the mask buffer of the target it is pruned under (:func:`distinct_targets`):
    tied weights are masked alike under every module that holds them, and a later round's in-place update reaches
    all. `tensors`: only those tensors (by :func:`tensor_key`), e.g. the ones a caller has just masked."""
    if tensors is not None:
        targets = [target for target in targets if tensor_key(*target) in tensors]
    first = _holder_of_each_tensor(targets)
    for module, name in targets:
        key = tensor_key(module, name)
        if first[key] == (module, name):
            continue
        mask = mask_of(*first[key])
        if mask is None:
            continue
        if not is_pruned(module, name):
            _reparametrise_(module, name)
        module._buffers[name + "_mask"] = mask
        refresh_cached_tensor(module, name)  # also when the buffer was shared already and updated in place


def merge_tied_masks_(targets: Sequence[Target]) -> Callable[[], None]:
    """Holders of one tensor pruned apart (torch's pruning of each on its own: two mask buffers) are masked by both
    masks, under one buffer: a round goes on from every entry either pruned, never bringing one back. Returns what
    undoes it (a round refused after it leaves the model as it was)."""
    holders = _holder_of_each_tensor(targets)
    changed: dict[int, tuple[Tensor, Tensor]] = {}  # the merged buffers, with their values before
    replaced: list[tuple[nn.Module, str, Tensor]] = []  # the holders whose own buffer the merge replaces
    with torch.no_grad():
        for module, name in targets:
            first = holders[tensor_key(module, name)]
            mask, kept = mask_of(module, name), mask_of(*first)
            if mask is not None and kept is not None and mask is not kept:
                changed.setdefault(id(kept), (kept, kept.clone()))
                kept.mul_(mask.to(kept.dtype))
                replaced.append((module, name, mask))
    if not changed:
        return lambda: None
    share_tied_masks_(targets)

    def undo() -> None:
        with torch.no_grad():
            for kept, before in changed.values():
                kept.copy_(before)
        for module, name, mask in replaced:
            module._buffers[name + "_mask"] = mask
        for module, name in targets:
            if is_pruned(module, name):
                refresh_cached_tensor(module, name)
    return undo


def apply_mask_(module: nn.Module, name: str, mask: Tensor) -> None:
    """Prune ``module.<name>`` with an explicit mask (1 keeps, 0 prunes), combined with any existing mask."""
    _write_mask_(module, name, mask, combine=True)


def set_mask_(module: nn.Module, name: str, mask: Tensor) -> None:
    """Make ``module.<name>``'s mask exactly `mask`, pruning it first if needed."""
    _write_mask_(module, name, mask, combine=False)


# torch modules whose forward reads their sub-modules' weights without calling those sub-modules (so torch's pruning
# hooks, which recompute ``orig * mask`` in the pruned module's own forward, never run): nn.MultiheadAttention passes
# ``out_proj.weight`` to its functional form; the Transformer layers' inference fast path passes every weight.
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _recompute_(module: nn.Module) -> None:
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, torch_prune.BasePruningMethod):
            setattr(module, hook._tensor_name, hook.apply_mask(module))


def _recompute_attention_output(attention: nn.Module, args: object) -> None:
    """Forward pre-hook of nn.MultiheadAttention: recompute its ``out_proj``'s pruned tensors."""
    _recompute_(attention.out_proj)


def _recompute_for_fast_path(layer: nn.Module, args: object) -> None:
    """Forward pre-hook of a Transformer layer: recompute every pruned tensor inside it when its inference fast path
    may run (not while training with gradients, when its modules are called and recompute their own)."""
    if layer.training and torch.is_grad_enabled():
        return
    for module in layer.modules():
        if module is not layer:
            _recompute_(module)


_BYPASS_HOOKS = (_recompute_attention_output, _recompute_for_fast_path)


# Per pruning hook (torch's, one per pruned tensor), its module's tensor when a `_ChildrenReadWithoutACall` last looked:
# while it is still the module's, the module was not called since (weak references: a copy of the model, or a tensor
# replaced, is neither held alive nor mistaken for another at the same address).
_LAST_SEEN: "weakref.WeakKeyDictionary[torch_prune.BasePruningMethod, weakref.ref]" = weakref.WeakKeyDictionary()


class _ChildrenReadWithoutACall:
    """Forward pre-hook of a module whose forward may read a child's pruned tensor without calling the child
    (``F.linear(x, self.proj.weight, self.proj.bias)``, ``self.params["weight"]`` of an ``nn.ParameterDict``):
    torch recomputes ``orig * mask`` in the child's own forward only, so such a read got the tensor of the child's
    last recompute, whose graph the last backward freed (the next one failed: "Trying to backward through the graph
    a second time") and whose values predate the optimizer's steps.

    Recomputed here: a child's tensor that nothing replaced since such a hook (this one, or another module's for a
    child two modules read) last looked at it, or that none has looked at yet; and every child's when the module
    switched between training and eval mode since its last call (a forward that calls a layer in training and reads
    its weight in eval). A child that is called recomputes its own, and costs a comparison. Not seen: a tensor read
    before its module is called in the same forward (it is the previous call's); a child called on some calls and
    read without a call on others of the same mode; a grandchild's tensor (only children are looked at)."""

    def __init__(self) -> None:
        self._training: bool | None = None  # the module's mode at its last call
        self._compiled_since = False  # a compiled graph ran the module since its last eager call

    def __reduce__(self) -> tuple:  # (a copy starts afresh)
        return type(self), ()

    def __call__(self, module: nn.Module, args: object) -> None:
        # A trace holds the graph of the ops it sees, not the decisions taken here: in one every child's tensor is
        # recomputed (a child that is called makes its own again, and the first is dead code), or it held a tensor
        # of the last training step as a constant.
        if torch.compiler.is_compiling():
            # (nothing read from _LAST_SEEN: dynamo guarded on its keys, and any pruned model freed, or used, between
            # two calls failed the guards: a crash, or a graph per call)
            for child, hook in _pruned_children(module):
                setattr(child, hook._tensor_name, hook.apply_mask(child))
            self._compiled_since = True  # (the tensors it left are not the ones last seen: recomputed eagerly next)
            return
        # (torch.jit's trace runs this as Python, and its check runs it again: the tensors it leaves are recorded)
        recompute_all = torch.jit.is_tracing() or self._compiled_since or (
            self._training is not None and self._training != module.training)
        self._training, self._compiled_since = module.training, False
        for child, hook in _pruned_children(module):
            seen, tensor = _LAST_SEEN.get(hook), getattr(child, hook._tensor_name, None)
            if recompute_all or seen is None or seen() is tensor:
                tensor = hook.apply_mask(child)
                setattr(child, hook._tensor_name, tensor)
            _LAST_SEEN[hook] = weakref.ref(tensor)


def _pruned_children(module: nn.Module) -> Iterator[tuple[nn.Module, torch_prune.BasePruningMethod]]:
    """(child, pruning hook) for each pruned tensor of `module`'s children."""
    for child in module._modules.values():
        if child is not None and child._forward_pre_hooks:
            for hook in child._forward_pre_hooks.values():
                if isinstance(hook, torch_prune.BasePruningMethod):
                    yield child, hook


def is_bypass_hook(hook: object) -> bool:
    """Whether `hook` is one of :func:`keep_bypassed_weights_current_`'s (they compute nothing of the model's own:
    shrink, QAT and the distillation teacher's copy keep or drop them as the pruning masks)."""
    return isinstance(hook, _ChildrenReadWithoutACall) or any(hook is known for known in _BYPASS_HOOKS)


def keep_bypassed_weights_current_(model: nn.Module) -> int:
    """Make the modules of `model` that read their sub-modules' weights without calling them (``nn.MultiheadAttention``
    's ``out_proj``; the fast path of ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer``; a forward of
    yours computing ``F.linear(x, self.proj.weight)``, or reading an ``nn.ParameterDict``) recompute those
    sub-modules' pruned weights at every call (what a forward of yours is not seen to read:
    :class:`_ChildrenReadWithoutACall`); returns how many hooks were added. Without it a pruned ``out_proj``
    computes with the tensor cached when it was pruned: the second backward fails ("Trying to backward through the
    graph a second time") and the optimizer's updates never reach the attention. Modules that are called recompute
    their own: the hooks of other modules than torch's attention and Transformer layers only compare, per call, each
    pruned child's tensor with the one seen at the last look (about 6 us per call of a module holding pruned
    children, half of it torch's for calling any hook). Idempotent (copies of the model keep the hooks);
    :func:`make_permanent_` removes them. Pruning through the pipeline, :class:`litcompress.ModelPruning` or the IMP
    driver calls this; call it yourself after pruning a model with :func:`prune_` or :class:`GradualPruner` in your
    own loop.
    """
    added = 0
    for module in model.modules():
        hook = _recompute_attention_output if isinstance(module, nn.MultiheadAttention) else \
            _recompute_for_fast_path if isinstance(module, _TRANSFORMER_LAYERS) else None
        if isinstance(module, torch.jit.ScriptModule):  # (no Python hooks; nothing in it is pruned)
            continue
        if hook is None and any(next(child.parameters(recurse=False), None) is not None
                                for child in module.children()):
            if not any(isinstance(h, _ChildrenReadWithoutACall) for h in module._forward_pre_hooks.values()):
                module.register_forward_pre_hook(_ChildrenReadWithoutACall())
                added += 1
        elif hook is not None and hook not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(hook)
            added += 1
    return added


def refresh_cached_tensor(module: nn.Module, name: str) -> None:
    """Recompute the cached ``module.<name>`` after its orig or mask changed in place."""
    hook = pruning_hook(module, name)
    if hook is not None:
        setattr(module, name, hook.apply_mask(module))


@contextmanager
def outside_inference_mode() -> Iterator[None]:
    """Within the block, tensors made are normal ones, without gradients, where the caller runs in
    ``torch.inference_mode`` (masks made there are inference tensors, which the next training forward cannot save
    for backward); elsewhere the block runs as it is (grad mode untouched)."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


def _tensors_held(values: Iterable[object], depth: int = 8, seen: dict[int, int] | None = None) -> Iterator[Tensor]:
    """The tensors among `values` and inside their lists, tuples, deques, sets, dicts and dataclasses (`depth` levels
    down), each container read again only where more levels are left below it than when it was read (a graph of
    nodes referring to each other was walked once per path)."""
    seen = {} if seen is None else seen  # container id -> the levels left below it when it was read
    for value in values:
        if isinstance(value, Tensor):
            yield value
            continue
        if not depth or seen.get(id(value), -1) >= depth:
            continue
        if isinstance(value, (list, tuple, collections.deque, set, frozenset)):
            seen[id(value)] = depth
            yield from _tensors_held(value, depth - 1, seen)
        elif isinstance(value, Mapping):
            seen[id(value)] = depth
            yield from _tensors_held(value.values(), depth - 1, seen)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            seen[id(value)] = depth
            yield from _tensors_held((getattr(value, f.name, None) for f in dataclasses.fields(value)), depth - 1,
                                     seen)


def deepcopy_model(model: nn.Module, memo: dict[int, object] | None = None) -> nn.Module:
    """``copy.deepcopy(model)`` that also works on pruned modules after a forward pass.

    Their cached ``<name>`` (``orig * mask``) is a non-leaf tensor, which ``copy.deepcopy`` refuses; it is seeded
    in the memo as a detached clone (the pruning hook recomputes it at the copy's next forward anyway). `memo`:
    objects to map as given (e.g. ``{id(trainer): None}`` leaves an attached Trainer behind). A LightningModule
    that Lightning compiled in place (a fit of ``torch.compile(module)``) is copied as its eager module.
    """
    memo = dict(memo or {})
    for buffer in model.buffers():  # (torch copies a lazy layer's uninitialized parameters, not its buffers)
        if isinstance(buffer, nn.parameter.UninitializedBuffer) and id(buffer) not in memo:
            memo[id(buffer)] = nn.parameter.UninitializedBuffer(requires_grad=buffer.requires_grad,
                                                                device=buffer.device, dtype=buffer.dtype)
    for module in model.modules():
        # (a recurrent layer keeps its parametrized weights, computed with grad on, in its `_flat_weights` list; a
        # LightningModule its steps' outputs, in lists of tuples or dicts)
        for item in _tensors_held(vars(module).values()):
            if not item.is_leaf:
                memo[id(item)] = item.detach().clone()
    copied = copy.deepcopy(model, memo)
    drop_shadowing_attributes_(model, memo)
    for module in copied.modules():
        _drop_lightning_compile_(module, memo)
    return copied


def drop_shadowing_attributes_(model: nn.Module, memo: dict[int, object]) -> None:
    """Remove from each copy (found through the `memo` of ``copy.deepcopy(model, memo)``) an attribute its original
    does not have that hides a submodule, parameter or buffer of the same name.

    torch's ``__setstate__`` of some modules adds one: ``nn.TransformerDecoderLayer`` looks for ``activation`` in the
    instance dict, where a module activation (``activation=nn.GELU()``) is not, and sets ``F.relu`` there, which then
    shadows the module: every deep copy (and unpickled model) of such a layer computes a ReLU.
    """
    # every module copied, those outside the module tree too (a frozen backbone kept out of `parameters()` with
    # `object.__setattr__`, a list of modules): deepcopy keeps each original it copied in the memo, under its own id
    kept_alive = memo.get(id(memo), [])
    for original in {id(module): module for module in [*model.modules(), *kept_alive]
                     if isinstance(module, nn.Module)}.values():
        copied = memo.get(id(original))
        if not isinstance(copied, nn.Module) or copied is original:
            continue
        had = vars(original)
        held = (copied._modules, copied._parameters, copied._buffers)
        for name in [name for name in vars(copied) if name not in had and any(name in names for names in held)]:
            del copied.__dict__[name]


# What Lightning's fit of a ``torch.compile``'d LightningModule (``from_compiled``) replaces on the module itself
_LIGHTNING_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


def _dynamo_wrapped(function: object) -> object | None:
    """What a ``torch.compile`` wrapper of a callable wraps (its own inner wrapper's, for a partial or another
    object's method), or None for anything else (a user's own decorated function keeps its decorator)."""
    inner = getattr(function, "_torchdynamo_orig_callable", None)
    if callable(inner):
        return inner
    code = getattr(function, "__code__", None)  # (functools.wraps gave it the wrapped one's __module__)
    if code is not None and os.path.join("torch", "_dynamo", "") in code.co_filename and callable(
            getattr(function, "__wrapped__", None)):
        return function.__wrapped__
    return None


def _drop_lightning_compile_(copied: nn.Module, memo: dict[int, object]) -> None:
    """Make a copy of a LightningModule that Lightning compiled in place run its own (eager) methods.

    Lightning's fit of ``torch.compile(module)`` sets instance attributes
    (``module.forward = compiled(module.forward)``) that wrap the module's bound methods: a deep copy keeps those
    functions, so the copy's forward would run the original module (its weights, its masks), and a teacher copied
    from it would be the student itself. The copy runs its class's methods, or those the module set on itself.
    """
    context = vars(copied).get("_compiler_ctx")
    if isinstance(context, dict):
        for name in _LIGHTNING_COMPILED_METHODS:
            # what the module's method was before Lightning wrapped it (the copy bound to the copy): the class's,
            # or one the module set on itself (self.forward = self.forward_doubled), which the copy keeps
            # (the context was deep-copied with the module: a bound method, a partial are the copy's own)
            original = context.get(f"original_{name}")
            if _dynamo_wrapped(original) is not None:
                # compiled by two fits: the first one's wrapper, a closure over the original module's callable
                while _dynamo_wrapped(original) is not None:
                    original = _dynamo_wrapped(original)
                original = copy.deepcopy(original, memo)  # through the copy's memo: the copy's own
            class_method = getattr(original, "__self__", None) is copied and \
                getattr(original, "__func__", None) is getattr(type(copied), name, None)
            if original is None or class_method:
                vars(copied).pop(name, None)
            else:
                vars(copied)[name] = original
        copied._compiler_ctx = None  # as a LightningModule starts: Lightning reads it at every fit and validate


def eager_module(module: nn.Module) -> nn.Module:
    """`module`, or the eager module a ``torch.compile``'d one wraps (where its parameters and hooks live)."""
    while is_compiled(module):
        module = module._orig_mod
    return module


def is_compiled(module: nn.Module) -> bool:
    """Whether `module` is a ``torch.compile``'d wrapper (an ``OptimizedModule``). torch.compile imports
    torch._dynamo; until something has, nothing is compiled, and importing it here (1.5 s) is spared."""
    dynamo = sys.modules.get("torch._dynamo")
    optimized = getattr(dynamo, "OptimizedModule", None) if dynamo is not None else None
    return optimized is not None and isinstance(module, optimized)


def eager_name(name: str) -> str:
    """`name` (as ``model.named_modules()`` gives it) without the ``_orig_mod`` parts of ``torch.compile``'d modules:
    the name of the module in :func:`eager_copy`'s copy."""
    return ".".join(part for part in name.split(".") if part and part != "_orig_mod")


def compiled_module_names(model: nn.Module) -> list[str]:
    """The names of `model`'s ``torch.compile``'d modules (``""`` for `model` itself), outermost first."""
    return [name for name, module in model.named_modules() if is_compiled(module)]


def eager_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in which every ``torch.compile``'d module, `model` itself included, is the eager
    module it compiles: what tracing, exporting and quantizing need (compile the result again if you like)."""
    copied = deepcopy_model(model)
    while is_compiled(copied):
        copied = copied._orig_mod
    for parent in list(copied.modules()):
        for child_name, child in list(parent._modules.items()):  # (named_children yields a shared child once)
            if is_compiled(child):
                while is_compiled(child):
                    child = child._orig_mod
                setattr(parent, child_name, child)
    return copied


def make_permanent_(model: nn.Module, keep: Iterable[Target] = (), *, owner: str = "make_permanent_") -> int:
    """Remove every pruning re-parametrisation in `model` but those of `keep`, keeping the zeros; returns how many
    were removed. A mask that another holder of a tied tensor does not apply, and whose permanence would change that
    holder's outputs, is refused, naming `owner` (the function the caller called), and nothing is removed.

    Parameter objects are kept (their values become ``orig * mask``), so optimizers stay valid.
    """
    check_module(model, owner)
    given = keep
    keep = list(keep) if isinstance(keep, Iterable) and not isinstance(keep, (str, bytes)) else [keep]
    if not all(isinstance(pair, Sequence) and not isinstance(pair, (str, bytes)) and len(pair) == 2
               and isinstance(pair[0], nn.Module) and isinstance(pair[1], str)  # (a JSON list pair too)
               for pair in keep):  # (else: "not enough values to unpack")
        raise TypeError(f"{owner}(keep=...): expected (module, name) pairs, e.g. [(model.fc, 'weight')], got "
                        f"{given!r}.")
    keep = [(eager_module(module), name) for module, name in keep]  # (a compiled layer's mask is its eager one's)
    held = {id(module) for module in model.modules()}
    foreign = [f"{type(module).__name__}.{name}" for module, name in keep
               if id(module) not in held or not isinstance(getattr(module, name, None), Tensor)]
    if foreign:  # (else its mask was made permanent without a word)
        raise ValueError(f"{owner}(keep=...): {', '.join(foreign)} is no tensor of a module of the model given; "
                         "name (module, name) pairs of its own, e.g. [(model.fc, 'weight')].")
    kept = {(id(module), name) for module, name in keep}
    refuse_tied_holders_computing_otherwise(model, owner, skip=kept)
    removed = 0
    for module in model.modules():
        for key in [k for k, h in module._forward_pre_hooks.items() if is_bypass_hook(h)]:
            del module._forward_pre_hooks[key]  # nothing left to recompute
        keys = [k for k, h in module._forward_pre_hooks.items() if isinstance(h, torch_prune.BasePruningMethod)
                and (id(module), h._tensor_name) not in kept]
        if not keys:
            continue
        with parameter_order_preserved([module]):
            for key in keys:
                module._forward_pre_hooks.pop(key).remove(module)
                removed += 1
    if kept and pruned_targets(model):  # an attention's kept out_proj mask: still read without a call
        keep_bypassed_weights_current_(model)
    return removed


def refuse_tied_holders_computing_otherwise(model: nn.Module, owner: str, skip: Collection[tuple[int, str]] = (),
                                            hint: str = "") -> None:
    """Refuse a mask on a tensor that another module holds and computes with otherwise: as its plain parameter (tied
    weights pruned through one holder, as ``torch.nn.utils.prune`` and ``prune_`` given one holder do), or under
    another mask (each holder pruned on its own), where the mask zeroes an entry that is not zero and that the other
    holder reads. Making the mask permanent writes ``orig * mask`` into the one tensor they share, which would change
    the other module's outputs without a word (a mask of entries already zero changes nothing: let be). Masks in
    `skip` (``(id(module), name)``) stay and are not checked; `hint` ends the message."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, parameter in module._parameters.items():
            if parameter is not None:
                holders.setdefault(id(parameter), []).append((path, module, name))
    for path, module, name in pruned_targets(model):
        orig = module._parameters.get(f"{name}_orig")
        if orig is None or (id(module), name) in skip or len(holders.get(id(orig), ())) < 2 or orig.is_meta:
            continue  # (a meta tensor holds no values a mask could change)
        mask = getattr(module, f"{name}_mask", None)
        for other_path, other, other_name in holders[id(orig)]:
            other_tensor = other_name.removesuffix("_orig")
            masked_there = other_name.endswith("_orig") and is_pruned(other, other_tensor)
            other_mask = getattr(other, f"{other_tensor}_mask", None) if masked_there else None
            if other_mask is mask or not isinstance(mask, Tensor):
                continue
            with torch.no_grad():  # entries this mask zeroes that hold a value the other holder reads
                changed = (mask == 0) & (orig != 0)
                if isinstance(other_mask, Tensor):
                    changed &= other_mask != 0
                if not bool(changed.any()):
                    continue
            pruned = f"{path}.{name}" if path else name
            holder = f"{other_path}.{other_tensor if masked_there else other_name}" if other_path else other_name
            how = "under another mask" if masked_there else "unmasked"
            raise ValueError(f"{owner}: {pruned} is pruned (it has a mask), but the same tensor is {holder}, which "
                             f"computes with it {how} (tied weights): making the mask permanent would change "
                             f"{other_path or 'the model'}'s outputs. Prune every holder of a tied tensor with the "
                             "same mask (litcompress.pruning.with_tied_targets(model, targets) lists them for prune_; "
                             f"ModelPruning does it), or none.{hint}")


# ------------------------------------------------------------------------------------------------- pruning
def validate_amount(amount: Any, *, argument: str = "amount") -> float | int:
    """Check a pruning amount: a float fraction in [0, 1] or an int count >= 0 (bools and NaN refused). A fraction is
    returned as a float, or as given where it is another real number (numpy's float32 counts in float32, as torch's
    own pruning functions count it: one weight more or less than float64 at a .5 boundary)."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(
            f"`{argument}` must be a float in [0, 1] (a fraction) or an int >= 0 (a count), "
            f"got {amount!r} of type {type(amount).__name__}."
        )
    if isinstance(amount, numbers.Integral):
        if amount < 0:
            raise ValueError(f"`{argument}` as a count must be >= 0, got {amount}.")
        return int(amount)
    fraction = float(amount)
    if math.isnan(fraction) or not 0.0 <= fraction <= 1.0:
        raise ValueError(
            f"`{argument}` as a fraction must be in [0, 1], got {fraction}. "
            "Pass an int for a number of weights to prune."
        )
    return fraction if isinstance(amount, float) else amount


def remaining_count(module: nn.Module, name: str) -> int:
    """How many entries of ``module.<name>`` are still kept (all of them when it is not pruned)."""
    mask = mask_of(module, name)
    return getattr(module, name).numel() if mask is None else int(torch.count_nonzero(mask))


def prune_(
    targets: Sequence[Target],
    method: str | type[torch_prune.BasePruningMethod],
    amount: float | int,
    *,
    scope: Scope = "global",
    **method_kwargs: Any,
) -> None:
    """Prune `targets` in place by `amount` of their *remaining* entries, as torch does.

    ``scope="global"`` ranks all targets together (unstructured methods only); ``"local"`` prunes each target
    by `amount` on its own. `method_kwargs` (``dim``, ``n``, ...) go to methods that accept them (one call can serve
    several methods); a near miss of one the method takes (``importance_score``) is refused. A tensor held by
    several targets (tied weights) is pruned once and masked alike under each.
    """
    targets = check_targets(targets, "prune_")
    check_prunable(targets)  # before any tensor is read: a training spectral norm's read runs a power iteration
    method_cls = resolve_method(method)
    amount = validate_amount(amount)
    check_near_misses(method_cls, method_kwargs, "prune_")
    if not targets:
        return
    # a missing `n`/`dim`, or a `dim` no tensor has, failed inside torch with its words
    check_method_kwargs(method_cls, method_kwargs, "prune_", ndims={trainable_tensor(m, n).dim() for m, n in targets},
                        others_ok=True)
    undo_merge = merge_tied_masks_(targets)
    try:
        _prune_distinct_(distinct_targets(targets), method_cls, amount, scope, **method_kwargs)
    except BaseException:  # a refused round (a Ctrl-C too) leaves the masks as they were
        undo_merge()
        raise
    share_tied_masks_(targets)


def check_norms_apply(targets: Sequence[Target], method_cls: type[torch_prune.BasePruningMethod],
                      method_kwargs: Mapping[str, Any], owner: str) -> None:
    """Refuse, naming the tensor, a structured method's norm ``n`` that torch cannot take over a target's dimensions
    besides ``dim`` ('fro' and 'nuc' need two of them): torch's error came mid-call, with earlier targets pruned."""
    norm, dim = method_kwargs.get("n"), method_kwargs.get("dim")
    if not isinstance(norm, str) or not isinstance(dim, int):  # (a number applies over any dimensions)
        return
    for module, name in targets:
        tensor = trainable_tensor(module, name)
        refusal = None if tensor.is_meta or not -tensor.dim() <= dim < tensor.dim() else norm_refusal(tensor, norm, dim)
        if refusal is not None:
            raise ValueError(f"{owner}: n={norm!r} does not apply to {target_label(module, name)} of shape "
                             f"{tuple(tensor.shape)}: torch takes it over the {tensor.dim() - 1} dimension(s) besides "
                             f"dim={dim}, and says: {refusal}. Use a number (1, 2, float('inf'), ...).")


#: the qualified names of the targets being pruned, by (id(module), tensor name), where the caller knows the model
_TARGET_NAMES: ContextVar[Mapping[tuple[int, str], str] | None] = ContextVar("litcompress_target_names", default=None)


def target_label(module: nn.Module, name: str) -> str:
    """How messages name a target: its path in the model where the caller gave it (``2.weight``: ``prune_model_``,
    ``ModelPruning``, ``GradualPruner`` with target names), else its class (``Linear.weight``)."""
    names = _TARGET_NAMES.get()
    return (names or {}).get((id(module), name)) or f"{type(module).__name__}.{name}"


@contextmanager
def naming_targets(targets: Sequence[Target], names: Sequence[str] | None) -> Iterator[None]:
    """Inside the block, messages about `targets` name them by `names` (qualified names, one per target)."""
    if not names:
        yield
        return
    token = _TARGET_NAMES.set({(id(m), n): name for (m, n), name in zip(targets, names) if name})
    try:
        yield
    finally:
        _TARGET_NAMES.reset(token)


def _prune_distinct_(targets: Sequence[Target], method_cls: type[torch_prune.BasePruningMethod], amount: float | int,
                     scope: Scope, **method_kwargs: Any) -> None:
    check_prunable(targets, need_values=True)
    # what the arguments decide, before any target is touched (a channels_last one is re-parametrised below)
    if scope not in ("global", "local"):
        raise ValueError(f"`scope` must be 'local' or 'global', got {scope!r}.")
    if scope == "global" and getattr(method_cls, "PRUNING_TYPE", None) != "unstructured":
        raise ValueError(f"Global pruning needs an unstructured method, got {method_cls.__name__}.")
    if scope == "local" and isinstance(method_kwargs.get("importance_scores"), Mapping):
        raise _local_dict_scores_error("prune_", method_cls)
    check_importance_scores(targets, method_cls, method_kwargs, scope, "prune_")
    fast_path = (scope == "global" and method_cls is torch_prune.L1Unstructured
                 and "importance_scores" not in method_kwargs)
    if not fast_path:
        _check_rankable(targets, method_cls, method_kwargs)  # (the fast path refuses NaN as it ranks)
        # torch's methods rank `module.<name>`, which the pruning hook computed at the module's last forward: after
        # an optimizer step it still holds the weights from before that step. Rank orig * mask as it is now (the
        # fast path reads `<name>_orig` and the mask itself).
        for module, name in targets:
            refresh_cached_tensor(module, name)
    structured = getattr(method_cls, "PRUNING_TYPE", None) == "structured"
    if structured and scope == "local":
        check_slices_exist(method_cls, [(target_label(m, n), getattr(m, n).dim()) for m, n in targets],
                           "prune_")
    if structured and scope == "local":
        check_norms_apply(targets, method_cls, method_kwargs, "prune_")
    dim = structured_dim(method_cls, method_kwargs) if structured else None
    if structured and scope == "local" and dim is None and any(is_pruned(m, n) for m, n in targets):
        check_countable_slices(method_cls, method_kwargs, "prune_")  # (torch's second round fails in its words)
    if structured and scope == "local" and isinstance(amount, int) and isinstance(dim, int) \
            and all(-t.dim() <= dim < t.dim() for t in (trainable_tensor(m, n) for m, n in targets)):
        slices = [total - pruned for pruned, total in (_pruned_slices(m, n, dim) for m, n in targets)]
        check_count_fits(amount, slices, scope, what=f"slices along dim={dim}")  # torch's says "parameters"
    remaining = [remaining_count(m, n) for m, n in targets] if isinstance(amount, int) or fast_path else []
    if isinstance(amount, int) and not structured:
        check_count_fits(amount, remaining, scope)
    modules = unique_modules(targets)
    with parameter_order_preserved(modules):
        if not fast_path:
            _flattenable_masks_(targets)
        if scope == "global":
            if fast_path:
                count = amount if isinstance(amount, int) else round(amount * sum(remaining))
                _global_magnitude_prune_(targets, count)
                return
            # the method's own (not the scores, which global_unstructured takes itself: a constructor with **kwargs
            # had them twice)
            kwargs = accepted_kwargs(method_cls, {"amount": amount, **{k: v for k, v in method_kwargs.items()
                                                                        if k != "importance_scores"}})
            scores = _flattenable_scores(targets, method_kwargs)
            if method_cls is torch_prune.L1Unstructured:  # torch ranks abs() of them: an int8 -128 stays -128
                scores = {target: exact_magnitudes(score) if score.dtype in CONVERTED_FOR_MAGNITUDES else score
                          for target, score in scores.items()}
            if len({score.dtype for score in scores.values()}) > 1:  # torch concatenates them in the promoted dtype:
                # an int64 score with float32 ones in float32 (2**24 + 1 tied with 2**24), with float16 ones in
                # float16 (above 65504, inf): ranked in one that holds them all
                common = common_dtype(list(scores.values()))
                scores = {target: score.to(common) for target, score in scores.items()}
            torch_prune.global_unstructured(list(targets), pruning_method=method_cls, importance_scores=scores,
                                            **kwargs)
        else:
            kwargs = accepted_kwargs(method_cls, {"amount": amount, **method_kwargs}, via_apply=True)
            if isinstance(kwargs.get("importance_scores"), Tensor):  # flattened with .view(-1) too
                kwargs["importance_scores"] = kwargs["importance_scores"].contiguous()
            for module, name in targets:
                earlier = getattr(module, name + "_mask", None)
                dtype = earlier.dtype if isinstance(earlier, Tensor) else trainable_tensor(module, name).dtype
                method_cls.apply(module, name, **_magnitudes_widened(method_cls, module, name, kwargs))
                mask = module._buffers[name + "_mask"]
                if mask.dtype != dtype:  # torch makes a masked tensor's next mask in the scores' dtype
                    module._buffers[name + "_mask"] = mask.to(dtype)


def _magnitudes_widened(method_cls: type[torch_prune.BasePruningMethod], module: nn.Module, name: str,
                        kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs`, where torch's L1 method would rank integer or bool scores (the caller's, else the tensor's own
    values), with their exact magnitudes instead: it ranks ``abs`` of them, and ``abs`` of an int8 -128 is -128 (the
    largest magnitude was pruned first); torch has no ``abs`` for bool or uint16/32/64 (it failed in its words).
    LnStructured's integer or bool scores in float64, whose norms torch takes."""
    scores = kwargs.get("importance_scores")
    if method_cls is torch_prune.LnStructured and isinstance(scores, Tensor) and not scores.is_floating_point() \
            and not scores.is_complex():  # torch's vector_norm takes no integers (it failed in its words)
        return {**kwargs, "importance_scores": scores.double()}
    if method_cls is not torch_prune.L1Unstructured:
        return kwargs
    scores = trainable_tensor(module, name).detach() if scores is None else scores
    if not isinstance(scores, Tensor) or scores.dtype not in CONVERTED_FOR_MAGNITUDES:
        return kwargs
    return {**kwargs, "importance_scores": exact_magnitudes(scores)}


def _check_rankable(targets: Sequence[Target], method_cls: type[torch_prune.BasePruningMethod],
                    method_kwargs: Mapping[str, Any]) -> None:
    """ValueError naming the targets holding NaN where torch's magnitude methods would rank it (as the largest value:
    kept). torch's own methods only (a subclass may handle it); unstructured, the entries still kept only (a NaN
    pruned earlier stays pruned); structured, any (a slice's norm over orig * mask is NaN for a NaN under a zero)."""
    if method_kwargs.get("importance_scores") is not None \
            or method_cls not in (torch_prune.L1Unstructured, torch_prune.LnStructured):
        return
    structured = method_cls is torch_prune.LnStructured
    with torch.no_grad():
        diverged = [target_label(m, n) for m, n in targets
                    if (holds_nan(trainable_tensor(m, n).detach()) if structured else _kept_values_hold_nan(m, n))]
    if diverged:
        raise ValueError(f"prune_: {', '.join(diverged)} hold{'s' if len(diverged) == 1 else ''} NaN (training "
                         "diverged?), which magnitude pruning cannot rank; nothing was pruned.")


def _kept_values_hold_nan(module: nn.Module, name: str) -> bool:
    """Whether an entry of ``module.<name>`` that no mask prunes holds NaN."""
    values, mask = trainable_tensor(module, name).detach(), mask_of(module, name)
    if not holds_nan(values):
        return False
    return mask is None or bool((torch.isnan(values) & (mask != 0)).any())


def _flattenable_masks_(targets: Sequence[Target]) -> None:
    """Give each channels_last or transposed target a contiguous mask. torch's methods flatten the tensor they
    rank with ``.view(-1)``, which fails on such a layout the first time; once masked, they rank the kept entries
    (``t[mask == 1]``) instead. ``global_unstructured`` flattens the masks too."""
    for module, name in targets:
        if not is_pruned(module, name):
            if trainable_tensor(module, name).is_contiguous():
                continue
            _reparametrise_(module, name)
        mask = getattr(module, name + "_mask")
        if not mask.is_contiguous():  # the Identity hook holds no mask: the buffer is the only one
            module._buffers[name + "_mask"] = mask.contiguous()


def _local_dict_scores_error(owner: str, method: type[torch_prune.BasePruningMethod]) -> TypeError:
    structured = getattr(method, "PRUNING_TYPE", None) == "structured"
    return TypeError(f"{owner}(scope='local', importance_scores=...): a local round takes one tensor of scores, of the "
                     "targets' shape (each target is ranked on its own); the dict {(module, name): tensor} is for "
                     "scope='global'" + (f", which takes unstructured methods only: prune each target with "
                                         f"{method.__name__} in a round of its own, with its tensor of scores."
                                         if structured else "."))


def check_importance_scores(targets: Sequence[Target], method: type[torch_prune.BasePruningMethod],
                            method_kwargs: Mapping[str, Any], scope: Scope, owner: str, *,
                            slice_groups: Mapping[Target, int] | None = None) -> None:
    """Refuse, before any target changes, ``importance_scores`` that do not fit the targets: a local round's one
    tensor of another target's shape (torch's assert came after the first target was masked), a global round's of
    another shape than its tensor (ranked in another tensor's places, or torch's IndexError), and any given to a
    method that draws its mask at random, or, for a target not in grouped rounds (`slice_groups`: those rank the
    slices themselves), to a method whose own ``apply`` cannot take them (they were ignored)."""
    scores = method_kwargs.get("importance_scores")
    if scores is None:
        return
    random_draw = {torch_prune.RandomUnstructured.compute_mask: "random_unstructured",
                   torch_prune.RandomStructured.compute_mask: "random_structured"}.get(method.compute_mask)
    if random_draw is not None:  # (torch's random_* functions refuse the argument; its apply passes them unread)
        ranked_by = "ln_structured" if random_draw == "random_structured" else "l1_unstructured"
        raise TypeError(f"{owner}(importance_scores=...): {method.__name__} draws its mask at random and reads no "
                        f"scores, so they would be ignored (torch's {random_draw} refuses the argument). Drop "
                        f"importance_scores, or rank by them with {ranked_by!r}.")
    applied = [target for target in targets if (slice_groups or {}).get(target, 1) <= 1]
    if scope == "local" and applied \
            and "importance_scores" not in accepted_kwargs(method, {"importance_scores": scores}, via_apply=True):
        # (a grouped round ranks the slices itself; a global one hands the scores to torch's global_unstructured)
        raise TypeError(f"{owner}(importance_scores=...): {method.__name__}'s own `apply` takes no importance_scores, "
                        "so a local round cannot pass them on (they were dropped, and the tensor itself ranked). Give "
                        "its apply an `importance_scores=None` parameter passed to BasePruningMethod.apply.")
    if scope == "global":
        _flattenable_scores(targets, method_kwargs)  # (its keys and shapes)
        return
    if not isinstance(scores, Tensor):
        raise TypeError(f"{owner}(importance_scores=...): a local round takes one tensor of scores, of the targets' "
                        f"shape; got {type(scores).__name__}.")
    wrong = [f"{target_label(m, n)} {tuple(trainable_tensor(m, n).shape)}" for m, n in targets
             if trainable_tensor(m, n).shape != scores.shape]
    if wrong:
        raise ValueError(f"{owner}(importance_scores=...): a local round ranks every target by its one tensor of "
                         f"scores, of shape {tuple(scores.shape)}, and {', '.join(wrong[:3])} "
                         f"{'has' if len(wrong) == 1 else 'have'} another shape; prune targets of another shape in a "
                         "round of their own.")


def _flattenable_scores(targets: Sequence[Target], method_kwargs: Mapping[str, Any]) -> dict[Target, Tensor]:
    """What ``global_unstructured`` ranks, keyed by target: the caller's ``importance_scores`` (no method's
    constructor takes them: passed as the method's, they were dropped), else the masked tensor; contiguous, as torch
    flattens each with ``.view(-1)``. A score keyed by any holder of a tied tensor is that tensor's (the round keeps
    its first holder only); a key naming no target's tensor is refused (it was ignored)."""
    scores = method_kwargs.get("importance_scores")
    scores = {} if scores is None else scores
    if not isinstance(scores, Mapping):
        raise TypeError("prune_(scope='global', importance_scores=...): expected a dict {(module, name): tensor} "
                        f"as torch's global_unstructured takes, got {type(scores).__name__}.")
    holders = {tensor_key(m, n): (m, n) for m, n in targets}
    by_target: dict[Target, Tensor] = {}
    for key, value in scores.items():
        module, name = key if isinstance(key, tuple) and len(key) == 2 else (None, None)
        target = None
        if isinstance(module, nn.Module) and isinstance(name, str) and _holds_tensor(module, name):
            target = holders.get(tensor_key(module, name))
        if target is None:
            described = f"({type(module).__name__}, {name!r})" if isinstance(module, nn.Module) else repr(key)
            raise ValueError(f"prune_(importance_scores=...): the key {described} names no target of this round; "
                             "key each tensor of scores by a (module, name) pair among the targets.")
        shape = tuple(trainable_tensor(*target).shape)
        if not isinstance(value, Tensor):  # (a TypeError, as a local round's)
            raise TypeError(f"prune_(importance_scores=...): the scores of {target_label(*target)} "
                            f"are a {type(value).__name__}; give a tensor of its shape {shape}.")
        if tuple(value.shape) != shape:  # ranked in another tensor's places, or torch's IndexError naming neither
            raise ValueError(f"prune_(importance_scores=...): the scores of {target_label(*target)} "
                             f"have shape {tuple(value.shape)}; give a tensor of its shape {shape}.")
        by_target[target] = value
    return {(module, name): by_target.get((module, name), getattr(module, name)).contiguous()
            for module, name in targets}


def check_count_fits(count: int, remaining: Sequence[int], scope: Scope, *, what: str = "entries") -> None:
    """Raise ValueError when pruning `count` entries (or slices, `what`) asks for more than `remaining` (per target)
    still holds."""
    available = sum(remaining) if scope == "global" else min(remaining, default=0)
    if count > available:
        raise ValueError(
            f"`amount={count}` asks to prune more {what} than remain "
            f"({available} {'in total' if scope == 'global' else 'in the smallest target'})."
        )


def _global_magnitude_prune_(targets: Sequence[Target], count: int) -> None:
    """Prune the `count` smallest magnitudes among the entries still kept, over all targets together.

    What ``global_unstructured`` does (torch's count is ``round(amount * remaining)``), without concatenating the
    model: ties broken by (target order, flat index); existing mask buffers updated in place, so repeated rounds
    do not stack pruning methods on the module.
    """
    previous = [mask_of(m, n) for m, n in targets]
    with torch.no_grad():
        scores = [trainable_tensor(m, n).detach() for m, n in targets]
        # before any mask is made: the model is left as it was (NaN cannot be ranked; smallest_k_masks refuses it too,
        # by index)
        diverged = [target_label(m, n) for (m, n), score in zip(targets, scores)
                    if holds_nan(score)]
        if diverged:
            raise ValueError(f"prune_: {', '.join(diverged)} hold{'s' if len(diverged) == 1 else ''} NaN (training "
                             "diverged?), which magnitude pruning cannot rank; nothing was pruned.")
    # Every target gets its mask buffer first (all ones where new), and the new masks are written straight into
    # the buffers: no second set of masks is ever held.
    buffers = [mask if mask is not None else _reparametrise_(m, n) for mask, (m, n) in zip(previous, targets)]
    try:
        with torch.no_grad():  # (the scores above: the trainable tensors, which masking leaves where they are)
            smallest_k_masks(scores, previous, count, magnitude=True, out=buffers)
    except BaseException:  # (a Ctrl-C too) the masks this call added come off again, their weights as they were;
        # masks the targets had before may hold part of the round (pruned more, never less: no second copy is kept)
        for mask, buffer, (module, name) in zip(previous, buffers, targets):
            if mask is None and is_pruned(module, name):
                with torch.no_grad():
                    buffer.fill_(1)  # what may be written into it already must not be multiplied in by `remove`
                torch_prune.remove(module, name)
        raise
    for module, name in targets:
        refresh_cached_tensor(module, name)


def holds_pruning_zeros(module: nn.Module, name: str, *, vectors: bool = False) -> bool:
    """Whether ``module.<name>`` (2-d or more; with `vectors` 1-d too: a bias, a norm's scale and shift) holds exact
    zeros as pruning leaves them: at least 1% of its entries, not all of them (a zero-initialised tensor), an
    embedding's ``padding_idx`` row (zeros by design) left out."""
    tensor = getattr(module, name, None)
    if not isinstance(tensor, Tensor) or tensor.dim() < (1 if vectors else 2) or not tensor.numel() \
            or not tensor.is_floating_point():
        return False
    with torch.no_grad():
        zeros = int(tensor.numel() - torch.count_nonzero(tensor))
        if zeros == tensor.numel():
            return False
        padding = getattr(module, "padding_idx", None) if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) \
            else None
        if name == "weight" and isinstance(padding, int):
            zeros -= int(tensor.shape[1] - torch.count_nonzero(tensor[padding]))
    return zeros >= 0.01 * tensor.numel()


def emptied_targets(targets: Iterable[Target]) -> list[Target]:
    """The targets, biases aside, whose masks prune every entry: nothing flows through their modules any more."""
    return [(module, name) for module, name in distinct_targets(targets)
            if not name.endswith("bias") and is_pruned(module, name) and remaining_count(module, name) == 0]


def emptied_message(who: str, names: Sequence[str], scope: Scope, *,
                    per_layer: str = "prune each tensor on its own (per layer)", targets: str = "the targets") -> str:
    """Why a round that left `names` without a single entry wrecks the model, and what to do (`per_layer` and
    `targets` say it in the caller's arguments)."""
    them = "it" if len(names) == 1 else "them"
    hint = ("Global pruning ranks every tensor's magnitudes together, so a layer whose magnitudes are all below the "
            f"others' goes first: {per_layer}, lower the sparsity, or leave {them} out of {targets}."
            if scope == "global" else f"Lower the sparsity, or leave {them} out of {targets}.")
    return (f"{who}: every entry of {', '.join(names)} is pruned, so nothing flows through {them} any more (the "
            "output no longer depends on the input along that path; a plain stack of layers gives the same output for "
            f"every input). {hint}")


def pruned_count(module: nn.Module, name: str) -> int:
    """How many entries of ``module.<name>`` its mask prunes (0 when it is not pruned)."""
    return getattr(module, name).numel() - remaining_count(module, name)


def remaining_slices(module: nn.Module, name: str, dim: int) -> int:
    """How many slices of ``module.<name>`` along `dim` still hold a kept entry."""
    pruned, total = _pruned_slices(module, name, dim)
    return total - pruned


def _pruned_slices(module: nn.Module, name: str, dim: int) -> tuple[int, int]:
    """``(pruned, total)`` slices of ``module.<name>`` along `dim` (a slice is pruned when all of it is masked)."""
    tensor = trainable_tensor(module, name)
    total = tensor.shape[dim]
    mask = mask_of(module, name)
    if mask is None:
        return 0, total
    kept_per_slice = mask.transpose(0, dim).reshape(total, -1).count_nonzero(dim=1)
    return int((kept_per_slice == 0).sum()), total


def _slices_to_drop(module: nn.Module, name: str, method: type[torch_prune.BasePruningMethod], sparsity: float,
                    groups: int, keep_multiple_of: int | None, *, dim: int = -1, n: float | str = 2,
                    importance_scores: Tensor | None = None, **_: Any) -> Tensor | None:
    """The slices of ``module.<name>`` along `dim` that structured pruning to `sparsity` in each of `groups` equal
    blocks of slices prunes, so that every block loses as many (a grouped conv's groups, or the input groups of
    grouped convs reading the channels: only an even loss can be removed): the kept ones of smallest L`n` norm per
    block (of `importance_scores` where given, as torch's ranks them), or random ones for a random method; slices
    pruned before stay pruned. None when there is none; nothing is changed (a NaN among the slices ranked is refused
    here)."""
    tensor = (trainable_tensor(module, name) if importance_scores is None else importance_scores).detach()
    total = tensor.shape[dim]
    size = total // groups
    mask = mask_of(module, name)
    kept = torch.ones(total, dtype=torch.bool, device=tensor.device) if mask is None else \
        mask.transpose(0, dim).reshape(total, -1).count_nonzero(dim=1) > 0
    random = issubclass(method, torch_prune.RandomStructured)
    # ranked as ln_structured ranks them: the norm over every other dimension (so 'fro' and 'nuc' too)
    others = [d for d in range(tensor.dim()) if d != dim % tensor.dim()]
    scores = torch.rand(total, device=tensor.device) if random else torch.norm(
        (tensor if mask is None else tensor * mask).float(), p=n, dim=others)
    target = structured_pruned_count(size, sparsity, block_multiple(keep_multiple_of, groups))  # (the layer's multiple)
    drop = torch.zeros(total, dtype=torch.bool, device=tensor.device)
    for block in range(groups):
        rows = torch.arange(block * size, (block + 1) * size, device=tensor.device)
        candidates = rows[kept[rows]]
        count = max(0, target - (size - int(candidates.numel())))
        if count and not random and bool(torch.isnan(scores[candidates]).any()):  # (argsort ranks NaN largest)
            held = target_label(module, name) + ("'s importance_scores" if importance_scores is not None else "")
            raise ValueError(f"prune_: {held} holds NaN (training diverged?), which magnitude pruning cannot rank; "
                             "nothing was pruned.")
        if count:
            drop[candidates[scores[candidates].argsort(stable=True)[:count]]] = True
    return drop if bool(drop.any()) else None


def _drop_slices_(module: nn.Module, name: str, drop: Tensor, dim: int = -1) -> None:
    """Prune the slices of ``module.<name>`` along `dim` that `drop` marks (:func:`_slices_to_drop`)."""
    tensor = trainable_tensor(module, name)
    shape = [1] * tensor.dim()
    shape[dim] = tensor.shape[dim]
    apply_mask_(module, name, (~drop).to(tensor.dtype).view(shape).expand_as(tensor))


def check_keep_multiple_of(keep_multiple_of: object, method: type[torch_prune.BasePruningMethod]) -> int | None:
    """`keep_multiple_of` as Python's int (numpy's ``int64(8)`` too), or None; ValueError unless it is None, or an
    int >= 1 with a structured `method`."""
    if keep_multiple_of is None:
        return None
    keep_multiple_of = as_python_number(keep_multiple_of)
    if getattr(method, "PRUNING_TYPE", None) != "structured":
        raise ValueError(f"`keep_multiple_of`={keep_multiple_of!r} rounds the rows/channels structured pruning keeps: "
                         f"for structured methods only, got method {method.__name__}.")
    if isinstance(keep_multiple_of, bool) or not isinstance(keep_multiple_of, int) or keep_multiple_of < 1:
        raise ValueError(f"`keep_multiple_of`={keep_multiple_of!r}: expected an int >= 1 (e.g. 8 or 16), or None.")
    return keep_multiple_of


_ROUND_SEED_SALT = 0x9E37_79B9_7F4A_7C15


def round_seed(base: int, point: int) -> int:
    """The seed of a scheduled round's random draws: from the run's `base` seed and the round's schedule point, so
    that a resumed run (its base restored) draws every later round's masks as the uninterrupted run did."""
    return (int(base) ^ (int(point) * _ROUND_SEED_SALT)) % (1 << 63)


def targets_digest(targets: Sequence[Target], names: Sequence[str] = ()) -> int:
    """A number that tells apart pruners of different targets in one run (mixed into their round seeds, so that two
    pruners with a random method do not draw the same masks on same-shaped layers): their names, shapes and first
    values, which a run with the same seed reproduces."""
    def first_values(tensor: Tensor) -> float:  # none yet on the meta device (a model built there, loaded later)
        return 0.0 if tensor.is_meta else float(tensor.detach().flatten()[:16].double().abs().sum())

    with torch.no_grad():
        described = [(str(name), tuple(getattr(m, n).shape), first_values(trainable_tensor(m, n)))
                     for (m, n), name in itertools.zip_longest(targets, names, fillvalue="")]
    return zlib.crc32(repr(described).encode())


@contextmanager
def drawing_from(seed: int, targets: Sequence[Target]) -> Iterator[None]:
    """Random draws inside the block (a random pruning method's: ``random_unstructured``) come from generators seeded
    with `seed`, on the CPU and on each CUDA device of `targets`; the global ones are left as they were (the run's
    own randomness, e.g. dropout, draws as if no round had run)."""
    cuda = sorted({tensor.device.index or 0 for tensor in (getattr(m, n) for m, n in targets)
                   if tensor.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def prune_to_sparsity_(
    targets: Sequence[Target],
    method: str | type[torch_prune.BasePruningMethod],
    sparsity: float,
    *,
    scope: Scope = "global",
    keep_multiple_of: int | None = None,
    **method_kwargs: Any,
) -> int:
    """Prune `targets` until their sparsity is exactly ``round(sparsity * n)`` entries; returns entries newly pruned.

    Never un-prunes: a target already sparser stays as it is. ``scope="global"`` counts all targets together;
    ``"local"`` brings each target to `sparsity` on its own. Structured methods (local only) count slices along
    ``dim``: the fraction of pruned rows/channels reaches `sparsity`, or with `keep_multiple_of` the slices kept are
    rounded up to a multiple of it, and one (a multiple) always stays
    (:func:`~litcompress.pruning.schedules.structured_pruned_count`). A tensor held by
    several targets (tied weights) counts once and is masked alike under each.
    """
    given = check_targets(targets, "prune_to_sparsity_")
    check_prunable(given)  # before any tensor is read: a training spectral norm's read runs a power iteration
    targets = distinct_targets(given)
    method_cls = resolve_method(method)
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"`sparsity` must be a number in [0, 1], got {sparsity!r}.")
    if scope not in ("global", "local"):  # a misspelt one pruned per layer
        raise ValueError(f"`scope` must be 'local' or 'global', got {scope!r}.")
    check_takes_amount(method_cls, "prune_to_sparsity_")
    check_near_misses(method_cls, method_kwargs, "prune_to_sparsity_")
    check_method_kwargs(method_cls, method_kwargs, "prune_to_sparsity_",
                        ndims={getattr(m, n).dim() for m, n in targets}, others_ok=True)
    check_slices_exist(method_cls, [(target_label(m, n), getattr(m, n).dim()) for m, n in targets],
                       "prune_to_sparsity_")
    structured = getattr(method_cls, "PRUNING_TYPE", None) == "structured"
    if scope == "local":
        check_countable_slices(method_cls, method_kwargs, "prune_to_sparsity_")
        if structured:
            check_norms_apply(targets, method_cls, method_kwargs, "prune_to_sparsity_")
    if scope == "local" and isinstance(method_kwargs.get("importance_scores"), Mapping):
        raise _local_dict_scores_error("prune_to_sparsity_", method_cls)  # (a grouped round took it for a tensor)
    check_importance_scores(targets, method_cls, method_kwargs, scope, "prune_to_sparsity_",
                            slice_groups=method_kwargs.get("slice_groups") if structured else None)
    keep_multiple_of = check_keep_multiple_of(keep_multiple_of, method_cls)
    if method_cls in (torch_prune.RandomUnstructured, torch_prune.RandomStructured):
        _warn_of_unmasked_zeros(targets, method_cls)
    undo_merge = merge_tied_masks_(given)  # (before counting: holders of one tensor pruned apart count their union)
    # what each round should leave, checked after it for a method of one's own: one that prunes another number than
    # its `amount` (a threshold, a fixed pattern) missed the target, which the caller recorded as reached
    expected: list[tuple[str, Callable[[], int], int, str]] = []
    try:
        before = sum(pruned_count(m, n) for m, n in targets)
        # every round planned, and what it ranks checked (NaN), before any target changes
        rounds: list[Callable[[], None]] = []
        if scope == "global":
            count = count_to_prune(sum(getattr(m, n).numel() for m, n in targets), before, sparsity)
            expected.append(("the targets together", lambda: sum(pruned_count(m, n) for m, n in targets),
                             before + count, "entries"))
            if count:  # one call, refused before it changes anything: here, where a refusal undoes the merge
                prune_(targets, method_cls, count, scope="global", **method_kwargs)
        else:
            # the dim the method prunes along (its own default where none is given), as its slices are counted
            dim = structured_dim(method_cls, method_kwargs) if structured else method_kwargs.get("dim", -1)
            slice_groups = (method_kwargs.pop("slice_groups", None) or {}) if structured else {}
            for target in targets:
                groups = slice_groups.get(target, 1)
                if groups > 1:
                    drop = _slices_to_drop(*target, method_cls, sparsity, groups, keep_multiple_of,
                                           **{**method_kwargs, "dim": dim})  # (ranked along the dim it masks)
                    if drop is not None:
                        rounds.append(lambda target=target, drop=drop: _drop_slices_(*target, drop, dim))
                    continue
                label = target_label(*target)
                if structured:
                    pruned, total = _pruned_slices(*target, dim)
                    count = max(0, structured_pruned_count(total, sparsity, keep_multiple_of) - pruned)
                    expected.append((label, lambda target=target: _pruned_slices(*target, dim)[0], pruned + count,
                                     f"slices along dim={dim}"))
                else:
                    pruned = pruned_count(*target)
                    count = count_to_prune(getattr(*target).numel(), pruned, sparsity)
                    expected.append((label, lambda target=target: pruned_count(*target), pruned + count, "entries"))
                if count:
                    _check_rankable([target], method_cls, method_kwargs)
                    rounds.append(lambda target=target, count=count: prune_([target], method_cls, count,
                                                                            scope="local", **method_kwargs))
    except BaseException:  # refused before any change: the masks as they were
        undo_merge()
        raise
    try:
        for prune_round in rounds:
            prune_round()
    finally:  # (after a failure mid-way too: every holder of a tied tensor masked alike)
        share_tied_masks_(given)
    if method_cls not in PRUNING_METHODS.values():  # (torch's own prune exactly what they are asked)
        missed = [f"{label}: {got} {unit} pruned, {want} asked" for label, count_now, want, unit in expected
                  for got in [count_now()] if got != want]
        if missed:
            warnings.warn(f"prune_to_sparsity_: {method_cls.__name__} did not prune the `amount` it was given, so the "
                          f"target sparsity {float(sparsity):.2%} was not reached exactly ({'; '.join(missed[:4])}"
                          f"{'; ...' if len(missed) > 4 else ''}): its compute_mask must prune `amount` entries (or "
                          "slices) of those still kept.", UserWarning, stacklevel=2)
    return sum(pruned_count(m, n) for m, n in targets) - before


def _warn_of_unmasked_zeros(targets: Sequence[Target], method_cls: type[torch_prune.BasePruningMethod]) -> None:
    """Zeros of targets without a mask count as weights kept (a zero-initialised entry is one): a random method may
    draw them again, and the targets end sparser than asked (81.5% for 60% after `make_permanent_` at 50%). Which
    zeros were pruned is not known here: said, with the remedy (GradualPruner keeps those it pruned itself)."""
    zeros = 0
    for module, name in targets:
        if is_pruned(module, name):
            continue
        tensor = getattr(module, name)
        if tensor.is_meta:
            continue
        with torch.no_grad():
            zero = tensor == 0
            if bool(zero.all()):  # a tensor of zeros only: initialised so, not pruned
                continue
            padding = getattr(module, "padding_idx", None) if isinstance(module, nn.Embedding) else None
            if padding is not None and name == "weight":  # a padding row is zero by design, not pruned
                zero[padding] = False
        zeros += int(zero.sum())
    if zeros:
        warnings.warn(f"prune_to_sparsity_: {zeros:,} entries of targets without a pruning mask are exactly zero "
                      f"(pruned, then made permanent?); {method_cls.__name__} counts them as kept and may draw them "
                      "again, so the targets can end sparser than asked. To keep them pruned, mask them first: "
                      "apply_mask_(module, name, getattr(module, name) != 0).", UserWarning,
                      stacklevel=_stacklevel_outside_litcompress())


def _stacklevel_outside_litcompress() -> int:
    """The `stacklevel` that makes a warning point at the first frame outside this package, for the caller of the
    function that warns (the user's call, through GradualPruner, ModelPruning or compress)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1  # the function that warns, where warnings.warn's stacklevel=1 points
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def prune_model_(
    model: nn.Module,
    method: str | type[torch_prune.BasePruningMethod] = "l1_unstructured",
    amount: float | int = 0.5,
    *,
    parameter_names: Sequence[str] = ("weight",),
    scope: Scope = "global",
    **method_kwargs: Any,
) -> list[Target]:
    """Prune every `parameter_names` tensor of the leaf modules of `model`; returns the targets pruned.

    A name no module has is refused (a misspelt one pruned nothing); tensors computed by a parametrization
    (``weight_norm``), which torch's pruning cannot mask, are left out with a warning."""
    check_module(model, "prune_model_")
    if isinstance(parameter_names, str) or not all(isinstance(name, str) for name in parameter_names):
        raise TypeError(f"prune_model_(parameter_names={parameter_names!r}): expected a list of tensor names, e.g. "
                        "['weight'].")
    targets = default_targets(model, parameter_names)
    computed = [f"{path}.{name}" if path else name for path, _, name in parametrized_tensors(model)
                if name in parameter_names]
    missing = [name for name in parameter_names if name not in {n for _, n in targets}]
    if missing:
        found = sorted({name for module in model.modules() for name, p in module._parameters.items() if p is not None})
        only = f" (only parametrized ones: {', '.join(computed)})" if computed else ""
        raise ValueError(f"prune_model_(parameter_names=...): no module of {type(model).__name__} has a {missing} "
                         f"tensor it can prune{only}; its tensors are named {found}.")
    left_out = matrices_left_out(model, targets) if "weight" in parameter_names else {}
    if left_out:
        missing = list(dict.fromkeys(name for names in left_out.values() for name in names))
        warnings.warn(left_out_message(
            "prune_model_", model, left_out, f"name them in parameter_names to prune them too: parameter_names="
            f"{[*parameter_names, *missing]!r}."), UserWarning, stacklevel=2)
    if computed:
        warnings.warn(f"prune_model_ leaves out {len(computed)} parametrized tensor(s), which torch.nn.utils.prune "
                      f"cannot mask: {', '.join(computed)}; they stay dense. litcompress.pruning.fold_parametrizations_"
                      "(model) first makes each a plain tensor holding its current value.", UserWarning, stacklevel=2)
    with naming_targets(targets, qualified_names(model, targets)):  # (an error names 2.weight, not Linear.weight)
        prune_(targets, method, amount, scope=scope, **method_kwargs)
    keep_bypassed_weights_current_(model)
    return targets


#: Recurrent layers and cells, whose weight matrices are ``weight_ih_l0``, ``weight_hh_l0``, ... (a cell's
#: ``weight_ih``, ``weight_hh``): none is named "weight".
RECURRENT_WEIGHTED = (nn.RNNBase, nn.RNNCellBase)


def recurrent_weight_names(module: nn.Module, kind: str = "weight") -> list[str]:
    """The weight matrices (`kind` ``"bias"``: the bias vectors) of a recurrent layer or cell, by name, in torch's
    order."""
    names = getattr(module, "_flat_weights_names", None) or [f"{kind}_ih", f"{kind}_hh"]
    return [n for n in names if n.startswith(kind) and isinstance(getattr(module, n, None), Tensor)]


#: An attention's input projections: one packed matrix, or three where query, key and value widths differ.
ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def matrices_left_out(model: nn.Module, targets: Sequence[Target]) -> dict[str, list[str]]:
    """`model`'s recurrent layers and cells, and ``nn.MultiheadAttention`` layers, with weight matrices not among
    `targets` (none of them is named "weight", which default targets take): ``{name: those matrices}``."""
    targeted = {(id(module), name) for module, name in targets}
    left_out = {}
    for path, module in model.named_modules():
        if isinstance(module, RECURRENT_WEIGHTED):
            matrices = recurrent_weight_names(module)
        elif isinstance(module, nn.MultiheadAttention):
            matrices = [n for n in ATTENTION_PROJECTIONS if isinstance(getattr(module, n, None), Tensor)]
        else:
            continue
        missing = [n for n in matrices if (id(module), n) not in targeted]
        if missing:
            left_out[path or type(model).__name__] = missing
    return left_out


def left_out_message(who: str, model: nn.Module, left_out: Mapping[str, Sequence[str]], remedy: str) -> str:
    """Why the layers `left_out` (:func:`matrices_left_out`) keep weight matrices dense under `who`'s targets, and
    `remedy`."""
    names = list(left_out)
    first = names[0]
    modules = dict(model.named_modules())
    kinds = [kind for kind, types in (("recurrent", RECURRENT_WEIGHTED), ("attention", nn.MultiheadAttention))
             if any(isinstance(modules.get(name, model), types) for name in names)]
    return (f"{who}: {len(names)} {' and '.join(kinds)} layer(s) keep weight matrices dense ({', '.join(names[:5])}"
            f"{' ...' if len(names) > 5 else ''}): those are not named 'weight' ({first}: "
            f"{', '.join(left_out[first])}); {remedy}")


def default_targets(model: nn.Module, parameter_names: Sequence[str] = ("weight",)) -> list[Target]:
    """Every ``(module, name)`` of `model` whose `name` is a parameter or an existing re-parametrisation."""
    return [
        (module, name)
        for name in parameter_names
        for module in model.modules()
        # its own parameter: a wrapper (Fabric's, torch.compile's) hands its inner module's attributes through
        if _holds_parameter(module, name) or is_pruned(module, name)
    ]


def _holds_parameter(module: nn.Module, name: str) -> bool:
    """Whether `name` is a parameter registered on `module` itself (a TorchScript module's too)."""
    return name in module._parameters and isinstance(module._parameters[name], nn.Parameter)


# --------------------------------------------------------------------------------------------- state dicts
def _make_entry_permanent(state_dict: dict[str, Any], key: str, products: dict[tuple, Tensor] | None = None) -> None:
    """Replace ``<key>_orig`` and ``<key>_mask`` in `state_dict` by ``<key>`` = ``orig * mask`` (no autograd).
    `products`: those made so far, by their sources' storage: tied weights (one tensor under several keys) get one
    product, so that a saved file holds it once, as it held the tensor."""
    orig_key, mask_key = key + "_orig", key + "_mask"
    if orig_key in state_dict and mask_key in state_dict:
        orig, mask = state_dict.pop(orig_key), state_dict.pop(mask_key)
        source = tuple((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
                       for t in (orig, mask))
        if products is not None and source in products:
            state_dict[key] = products[source]
            return
        with torch.no_grad():
            state_dict[key] = orig.detach() * mask.to(dtype=orig.dtype)
        if products is not None:
            products[source] = state_dict[key]


class PermanentStateDictHook:
    """State-dict post-hook: report ``<name>`` = ``orig * mask`` instead of ``<name>_orig``/``<name>_mask``.

    Registered on a pruned module, it makes every state dict of the model (full or ``weights_only``
    checkpoints, ``model.state_dict()``) load into an unpruned model, while the live module keeps its mask.
    A plain class rather than a closure so that models stay picklable (``ddp_spawn``).
    """

    def __init__(self, names: Sequence[str], products: dict[tuple, Tensor] | None = None, *,
                 left_masked: set[tuple[int, str]] | None = None) -> None:
        self.names = tuple(names)
        self.products = products  # shared by the hooks of one `permanent_state_dict` call (tied weights)
        # a callback's: (id(module), name) of the tensors another pruner of its stage keeps masked, which stay
        # _orig/_mask pairs (a resumed fit needs the values under the mask); the callback keeps it current
        self.left_masked = left_masked

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        left = getattr(self, "left_masked", None) or ()
        for name in self.names:
            if is_pruned(module, name) and (id(module), name) not in left:
                _make_entry_permanent(state_dict, prefix + name, self.products)


class PrunedStateLoadHook:
    """Load-state-dict pre-hook that makes either checkpoint format load into either model state.

    * ``<name>_orig`` + ``<name>_mask`` into an unpruned module: the mask is re-created first;
    * a permanent ``<name>`` into a pruned module: the values go to ``<name>_orig``, the live mask stays.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        check_state_masks({key: state_dict[key] for name in self.names
                           for key in (prefix + name + "_orig", prefix + name + "_mask") if key in state_dict})
        for name in self.names:
            key = prefix + name
            orig_key, mask_key = key + "_orig", key + "_mask"
            pruned = is_pruned(module, name)
            if not pruned and orig_key in state_dict and mask_key in state_dict:
                apply_mask_(module, name, state_dict[mask_key])
            elif pruned and key in state_dict and orig_key not in state_dict:
                state_dict[orig_key] = state_dict.pop(key)
                state_dict[mask_key] = getattr(module, name + "_mask").detach().clone()


class RefreshAfterLoadHook:
    """Load-state-dict post-hook: each pruned tensor's cached ``<name>`` (``orig * mask``) recomputed from the values
    just loaded; it read the ones before the load until the next forward (a regulariser, a functional call, a copy
    of ``.weight`` saw the fresh initialisation under the loaded mask). `names`: the module's own tensors; None:
    every pruned tensor under it (for a whole model's hook)."""

    def __init__(self, names: Sequence[str] | None = None) -> None:
        self.names = None if names is None else tuple(names)

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        pairs = ([(module, name) for name in self.names] if self.names is not None
                 else [(owner, name) for _, owner, name in pruned_targets(module)])
        for owner, name in pairs:
            refresh_cached_tensor(owner, name)


class MaskedStateLoadHook:
    """Load-state-dict pre-hook for a whole model whose pruning targets are not known yet (a LightningModule that
    builds its layers in ``configure_model``): each ``<path>.<name>_orig`` + ``<path>.<name>_mask`` pair of the
    incoming state dict re-creates its mask on the unpruned module first, so the pair loads; and a permanent
    ``<name>`` for a tensor pruned now (outside any callback's targets: Lightning's callback saves every tensor
    permanent) goes to its ``<name>_orig``, the live mask kept."""

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        check_state_masks(state_dict, prefix, module)  # before any of it is written
        for path, owner, name in pruned_targets(module):
            key = prefix + (f"{path}.{name}" if path else name)
            if key in state_dict and key + "_orig" not in state_dict:
                state_dict[key + "_orig"] = state_dict.pop(key)
                state_dict[key + "_mask"] = getattr(owner, name + "_mask").detach().clone()
        for key in [k for k in state_dict if k.startswith(prefix) and k.endswith("_mask")]:
            base = key[len(prefix): -len("_mask")]
            if prefix + base + "_orig" not in state_dict:
                continue  # an ordinary buffer that happens to end in `_mask`
            path, _, name = base.rpartition(".")
            try:
                owner = module.get_submodule(path)
            except AttributeError:
                continue  # not this model's: strict loading reports it
            if isinstance(getattr(owner, name, None), nn.Parameter) and not is_pruned(owner, name):
                held, mask = getattr(owner, name), state_dict[key]
                if isinstance(mask, Tensor) and not is_lazy(held) and tuple(mask.shape) != tuple(held.shape):
                    # (_write_mask_ named the tensor only: `weight`, of which layer?)
                    raise ValueError(f"the state's {key!r} has shape {tuple(mask.shape)}, and {prefix + base!r} of "
                                     f"{type(module).__name__} has shape {tuple(held.shape)}: load into the "
                                     "architecture that was pruned (a state of a model shrink narrowed: "
                                     "litcompress.load_shrunk_state_dict).")
                apply_mask_(owner, name, state_dict[key])


def register_state_hooks(
    targets: Sequence[Target], *, permanent_state_dict: bool, left_masked: set[tuple[int, str]] | None = None
) -> list[torch.utils.hooks.RemovableHandle]:
    """Register the load hook (and, if asked, the permanent-state-dict hook) on each module of `targets`.
    `left_masked`: ``(id(module), name)`` of tensors the permanent hook leaves masked (the caller keeps it current)."""
    names_by_module: dict[int, list[str]] = {}
    for module, name in targets:
        names_by_module.setdefault(id(module), []).append(name)
    handles = []
    for module in unique_modules(targets):
        names = names_by_module[id(module)]
        handles.append(module.register_load_state_dict_pre_hook(PrunedStateLoadHook(names)))
        handles.append(module.register_load_state_dict_post_hook(RefreshAfterLoadHook(names)))
        if permanent_state_dict:
            handles.append(module.register_state_dict_post_hook(PermanentStateDictHook(names,
                                                                                       left_masked=left_masked)))
    return handles


def permanent_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every pruned tensor as its effective values (loads into an unpruned model); tied
    weights stay one tensor."""
    # Each pruned module converts its own entries as state_dict writes them, under the prefix state_dict gives it: a
    # wrapper's state dict (Fabric's, torch.compile's) drops its own module path, and a module registered under
    # several names is written under each.
    products: dict[tuple, Tensor] = {}
    handles = []
    try:
        names_by_module: dict[nn.Module, list[str]] = {}
        for _, module, name in pruned_targets(model):
            names_by_module.setdefault(module, []).append(name)
        for module, names in names_by_module.items():
            handles.append(module.register_state_dict_post_hook(PermanentStateDictHook(names, products)))
        return model.state_dict()
    finally:
        for handle in handles:
            handle.remove()


def restore_masks_(model: nn.Module, masks: Mapping[str, Tensor], *, strict: bool = True) -> list[Target]:
    """Re-create masks on `model` from ``{"path.to.module.tensor": mask}``; returns the targets touched. A mask for a
    tensor `model` lacks (or holds in another shape) raises a ValueError naming it, or with ``strict=False`` is
    skipped, as a non-strict state-dict load skips its weights (a pruned backbone under a new head)."""
    fitting = []  # every mask checked before any is set: a refusal leaves the model as it was
    for qualified_name, mask in masks.items():
        path, _, name = qualified_name.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        tensor = getattr(module, name, None) if module is not None else None
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != tuple(mask.shape):
            if not strict:
                continue
            held = "no such tensor" if not isinstance(tensor, Tensor) else f"one of shape {tuple(tensor.shape)}"
            raise ValueError(f"a saved pruning mask is for {qualified_name!r} of shape {tuple(mask.shape)}, and "
                             f"{type(model).__name__} has {held}: load into the architecture that was pruned, or "
                             "with strict=False to skip the masks of tensors it lacks.")
        fitting.append((module, name, mask))
    touched = []
    for module, name, mask in fitting:
        set_mask_(module, name, mask)
        touched.append((module, name))
    keep_bypassed_weights_current_(model)
    return touched


def strided_state_dict(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """`state_dict` with its sparse-layout tensors (a sparsified model's CSR weights) dense where `model` holds a
    dense tensor (or none: a pruned weight's ``_orig``): torch's loading into a plain layer failed on them in words
    that name no layout ("expected sparse compressed tensor layout"). A sparse tensor `model` holds sparse too (a
    graph's adjacency buffer) stays sparse."""
    held = {key: value.layout for key, value in model.state_dict().items() if isinstance(value, Tensor)}
    return {key: value.to_dense() if isinstance(value, Tensor) and value.layout != torch.strided
            and held.get(key, torch.strided) == torch.strided else value
            for key, value in state_dict.items()}


def load_pruned_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any], *, strict: bool = True, keep_masks: bool = True
) -> nn.Module:
    """Load a state dict that holds ``<name>_orig``/``<name>_mask`` pairs into a fresh, unpruned `model`.

    Masks are re-created for every such pair before loading, so ``strict`` loading works. With
    ``keep_masks=False`` the result is made permanent (plain parameters with zeros), ready for inference. Sparse
    (CSR) weights, a :func:`~litcompress.pruning.sparsify`'d model's, are loaded as the dense tensors they stand for.
    """
    check_loading_arguments(model, state_dict, "load_pruned_state_dict", strict=strict, keep_masks=keep_masks)
    # Under inference mode (a model loaded for evaluation), the masks and products made there were inference
    # tensors: a later training forward failed ("Inference tensors cannot be saved for backward"). (A model built
    # under inference mode holds inference tensors itself, which only inference mode may write.)
    built_for_inference = any(p.is_inference() for p in model.parameters())
    with contextlib.nullcontext() if built_for_inference else torch.inference_mode(False):
        return _load_pruned_state_dict(model, strided_state_dict(state_dict, model), strict, keep_masks)


def check_loading_arguments(model: object, state_dict: object, owner: str, **flags: object) -> None:
    """A loader's `model` is a module, its `state_dict` a mapping (a path is named: the README's
    ``torch.load(path)`` is the state dict) and its flags True or False ("no" masked on: a non-empty str is
    truthy)."""
    if not isinstance(model, nn.Module):
        given = model.__name__ if isinstance(model, type) else type(model).__name__
        raise TypeError(f"{owner}(model={given}): expected the model to load into, an nn.Module instance.")
    if isinstance(state_dict, (str, bytes, os.PathLike)):
        raise TypeError(f"{owner}(state_dict={state_dict!r}): expected the state dict itself, not its path: "
                        f"{owner}(model, torch.load(path)).")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{owner}(state_dict={type(state_dict).__name__}): expected a state dict (a mapping of names "
                        "to tensors), e.g. torch.load(path).")
    for name, value in flags.items():
        if not is_bool(value):  # (numpy's too)
            raise TypeError(f"{owner}({name}={value!r}): expected True or False.")


def _load_pruned_state_dict(model: nn.Module, state: dict[str, Any], strict: bool, keep_masks: bool) -> nn.Module:
    MaskedStateLoadHook()(model, state, "")
    model.load_state_dict(state, strict=strict)
    # tied weights masked alike: one mask buffer under every holder, as the engine leaves them (a later round
    # updates them all); holders that torch's own pruning masked apart keep their own masks
    holders: dict[object, list[list[Target]]] = {}  # per tensor, its holders in sets of equal masks
    for _, module, name in pruned_targets(model):
        sets = holders.setdefault(tensor_key(module, name), [])
        alike = next((held for held in sets if torch.equal(mask_of(*held[0]), mask_of(module, name))), None)
        if alike is None:
            sets.append([(module, name)])
        else:
            alike.append((module, name))
    for sets in holders.values():
        for held in sets:
            if len(held) > 1:
                share_tied_masks_(held)
    for _, module, name in pruned_targets(model):  # the cached orig * mask was computed before the load
        refresh_cached_tensor(module, name)
    if keep_masks:
        keep_bypassed_weights_current_(model)
    else:
        refuse_tied_holders_computing_otherwise(model, "load_pruned_state_dict(keep_masks=False)", hint=(
            " Load with keep_masks=True: the model then holds the saved masks and computes what was saved."))
        make_permanent_(model)
    return model


def qualified_names(model: nn.Module, targets: Sequence[Target]) -> list[str]:
    """``"path.to.module.tensor"`` for each target, relative to `model`; a module registered under several names
    goes by its first, as in ``model.named_parameters()``."""
    paths: dict[int, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), path)
    names = []
    for module, name in targets:
        if id(module) not in paths:
            raise ValueError(f"{module!r} is not a submodule of the model.")
        path = paths[id(module)]
        names.append(f"{path}.{name}" if path else name)
    return names

