"""Tensors computed by `torch.nn.utils.parametrize` (``weight_norm``, ``spectral_norm``, ``orthogonal``, ...) or by
the older hooks of ``torch.nn.utils.weight_norm`` and ``spectral_norm``.

`torch.nn.utils.prune` can mask only a tensor that is a parameter of its module. A parametrized weight is a
property recomputed from the parametrization's originals at every access, so pruning has to see it folded into a
plain parameter first, as inference does anyway (``remove_weight_norm`` before shipping a vocoder).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.utils.parametrize as parametrize
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

FOLD_HINT = ("fold it into a plain weight first with litcompress.pruning.fold_parametrizations_(model) (or torch's "
             "remove_parametrizations / remove_weight_norm / remove_spectral_norm), as inference does")


def _norm_hook(module: nn.Module, name: str) -> WeightNorm | SpectralNorm | None:
    """The forward pre-hook of the older ``torch.nn.utils.weight_norm``/``spectral_norm`` computing
    ``module.<name>`` (still common in vocoder code), or None."""
    return next((hook for hook in module._forward_pre_hooks.values()
                 if isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name == name), None)


def has_computed_tensors(module: nn.Module) -> bool:
    """Whether any tensor of `module` is computed by a parametrization or a weight/spectral norm hook."""
    return parametrize.is_parametrized(module) or any(isinstance(hook, (WeightNorm, SpectralNorm))
                                                      for hook in module._forward_pre_hooks.values())


def is_computed(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is computed by a parametrization or a weight/spectral norm hook."""
    return parametrize.is_parametrized(module, name) or _norm_hook(module, name) is not None


def describe_parametrization(module: nn.Module, name: str) -> str:
    """The classes computing ``module.<name>``, e.g. ``"_WeightNorm"`` (``"WeightNorm"`` for the hook)."""
    hook = _norm_hook(module, name)
    if hook is not None:
        return type(hook).__name__
    return " -> ".join(type(p).__name__ for p in module.parametrizations[name])


def parametrized_tensors(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every computed tensor of `model` (parametrizations, weight/spectral norm hooks) as ``(module_path, module,
    tensor_name)``, in module order."""
    found = []
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            found += [(path, module, name) for name in module.parametrizations]
        found += [(path, module, hook.name) for hook in module._forward_pre_hooks.values()
                  if isinstance(hook, (WeightNorm, SpectralNorm))]
    return found


def parametrized_targets(targets: Iterable[tuple[nn.Module, str]]) -> list[tuple[nn.Module, str]]:
    """The targets whose tensor is computed by a parametrization (`torch.nn.utils.prune` cannot mask them)."""
    return [(m, n) for m, n in targets if is_computed(m, n)]


SCRIPTED_HINT = ("prune the nn.Module before torch.jit.script / torch.jit.trace (and script the pruned model after "
                 "litcompress.make_permanent_)")


def is_scripted(module: nn.Module) -> bool:
    """Whether `module` is TorchScript (``torch.jit.script``/``trace``): its attributes are fixed at compilation, so
    `torch.nn.utils.prune` cannot replace a parameter by ``<name>_orig`` and a mask."""
    return isinstance(module, torch.jit.ScriptModule)


def scripted_targets_message(targets: Iterable[tuple[nn.Module, str]]) -> str | None:
    """Why the TorchScript targets among `targets` cannot be pruned, with the fix; None when there is none."""
    scripted = [(m, n) for m, n in targets if is_scripted(m)]
    if not scripted:
        return None
    names = ", ".join(f"{m.original_name}.{n}" for m, n in scripted[:3]) + (", ..." if len(scripted) > 3 else "")
    return (f"cannot prune {names} of a TorchScript module: its parameters are fixed when it is compiled, so "
            f"torch.nn.utils.prune cannot re-parametrise them; {SCRIPTED_HINT}.")


def _distinct(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def check_prunable(targets: Iterable[tuple[nn.Module, str]], *, need_values: bool = False) -> None:
    """Raise a `ValueError` naming the targets torch's pruning cannot mask, with the fix: parametrized or TorchScript
    tensors, buffers and plain tensor attributes (it re-registers a parameter), a lazy layer's weights not created
    yet; with `need_values` (a round about to rank them), tensors on the meta device too."""
    targets = list(targets)
    message = scripted_targets_message(targets)
    if message:
        raise ValueError(message)
    found = parametrized_targets(targets)
    if found:
        names = ", ".join(f"{type(m).__name__}.{n} ({describe_parametrization(m, n)})" for m, n in found)
        raise ValueError(f"cannot prune {names}: the tensor is computed by a parametrization, which "
                         f"torch.nn.utils.prune cannot mask; {FOLD_HINT}.")
    unpruned = [(m, n, m._parameters.get(n)) for m, n in targets if not hasattr(m, n + "_orig")]
    lazy = _distinct(f"{type(m).__name__}.{n}" for m, n, p in unpruned if isinstance(p, UninitializedParameter))
    if lazy:
        raise ValueError(f"cannot prune {', '.join(lazy)}: lazy layers' weights, which do not exist until their first "
                         "call; run the model once on an example batch before pruning it.")
    not_parameters = _distinct(f"{type(m).__name__}.{n} ({'a buffer' if n in m._buffers else 'a tensor attribute'})"
                               for m, n, p in unpruned if not isinstance(p, nn.Parameter))
    if not_parameters:
        raise ValueError(f"cannot prune {', '.join(not_parameters)}: torch.nn.utils.prune masks parameters only "
                         "(it re-registers the tensor as `<name>_orig`); leave it out of the targets.")
    if need_values:
        meta = _distinct(f"{type(m).__name__}.{n}" for m, n in targets
                         if getattr(m, n + "_orig", m._parameters.get(n)).is_meta)
        if meta:
            raise ValueError(f"cannot prune {', '.join(meta)}: on the meta device, with no values to rank; give the "
                             "model its weights first (model.to_empty(device=...) then load_state_dict).")


def _drop_spectral_norm_load_hooks_(module: nn.Module, name: str) -> None:
    """torch's ``remove_spectral_norm`` leaves its state-dict load hook behind (registered wrapped, so its own
    ``isinstance`` check misses it): a plain state would then be read as a spectral norm's, and fail for the keys it
    lacks (``weight_orig``, ``weight_u``)."""
    from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook

    hooks = module._load_state_dict_pre_hooks
    for key in [k for k, h in hooks.items()
                if isinstance(getattr(h, "hook", h), SpectralNormLoadStateDictPreHook)
                and getattr(getattr(h, "hook", h), "fn", None) is not None
                and getattr(getattr(h, "hook", h).fn, "name", name) == name]:
        del hooks[key]


def fold_parametrizations_(model: nn.Module) -> list[str]:
    """Replace every parametrized tensor of `model` by a plain parameter holding its current value, in place.

    The value is read in eval mode (``spectral_norm`` would run a power iteration in training mode); it stays a
    parameter when it required grad. A one-tensor parametrization (``orthogonal``, ``spectral_norm``, a mask) is
    folded into its original, as torch folds it: the same Parameter, which an optimizer built before goes on
    training (weight norm's two become a new one). A parametrized holder of a weight tied to another module of
    `model` gets a tensor of its own instead, so the other computes as before: fold the whole model, not a
    submodule, when the tie crosses it. Modules deep-copied from one another can be folded independently. Returns
    the folded tensors' qualified names with their parametrizations, e.g.
    ``["net.2.weight (_WeightNorm)"]``; an empty list when there was none.
    """
    # (under the caller's inference mode, the tensors made would be inference tensors: unloadable, untrainable)
    with torch.inference_mode(False):
        return _fold_parametrizations_(model)


def _fold_parametrizations_(model: nn.Module) -> list[str]:
    folded = []
    holders = _holder_counts(model)
    for path, module, name in parametrized_tensors(model):
        described = describe_parametrization(module, name)
        hook = _norm_hook(module, name)
        originals = _original_tensors(module, name, hook)
        trainable = any(t.requires_grad for t in originals)
        with _in_eval_mode(module):
            if hook is not None:  # torch's removal computes the weight and makes it a parameter
                with torch.no_grad():
                    remove = torch.nn.utils.remove_weight_norm if isinstance(hook, WeightNorm) else \
                        torch.nn.utils.remove_spectral_norm
                    remove(module, name)
                _drop_spectral_norm_load_hooks_(module, name)
            else:
                # torch deletes the tensor's property from the module's class, which a deep copy shares with the
                # module it was copied from: folding a copy would break the original. Give it a class of its own.
                cls = type(module)
                module.__class__ = type(cls.__name__, cls.__bases__,
                                        {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
                if len(originals) == 1 and holders[id(originals[0])] > 1:
                    # The value in a tensor of its own: torch's fold writes it into the original, which another
                    # module holds too (an output layer tied to its embedding), and that one would then compute
                    # with it as well. (Untied, torch's fold keeps the Parameter: an optimizer built on it trains on.)
                    with torch.no_grad():
                        value = getattr(module, name).detach().clone()
                    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                    if isinstance(originals[0], nn.Parameter):
                        module.register_parameter(name, nn.Parameter(value, requires_grad=trainable))
                    else:  # a buffer stays a buffer
                        module._buffers[name] = value
                else:
                    # Not under no_grad: torch keeps a tensor that requires grad as a parameter
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        # A frozen layer stays a frozen parameter: torch makes a parametrization's frozen originals a buffer (which
        # torch.nn.utils.prune refuses) and the older norms' a parameter that requires grad (trained by fine-tuning)
        if originals and all(isinstance(t, nn.Parameter) for t in originals):
            value = module._buffers.pop(name) if name in module._buffers else module._parameters[name]
            if not isinstance(value, nn.Parameter) or value.requires_grad != trainable:
                module.register_parameter(name, nn.Parameter(value.detach(), requires_grad=trainable))
        folded.append(f"{path + '.' if path else ''}{name} ({described})")
    return folded


def computed_value(module: nn.Module, name: str) -> Tensor:
    """The value a computed ``module.<name>`` has now, without autograd history; read in eval mode (``spectral_norm``
    would run a power iteration in training mode) and, for the older norm hooks, computed from their originals (the
    attribute holds the last forward's value)."""
    hook = _norm_hook(module, name)
    with torch.no_grad(), _in_eval_mode(module):
        if hook is None:
            return getattr(module, name).detach()
        if isinstance(hook, WeightNorm):
            return hook.compute_weight(module).detach()
        return hook.compute_weight(module, do_power_iteration=False).detach()


def computed_weights(module: nn.Module) -> tuple[list[str], set[str]]:
    """`module`'s own tensors computed from parameters (a parametrization's, whose ``original`` is a parameter, or an
    older norm hook's; a parametrized buffer is no weight), and the names of its own parameters the older hooks
    compute them from (``weight_g``/``weight_v``, ``weight_orig``): stored values, not those it computes with. A
    parametrization's originals are held by its ``ParametrizationList``, not by `module`."""
    computed: list[str] = []
    sources: set[str] = set()
    if parametrize.is_parametrized(module):
        computed += [name for name in module.parametrizations
                     if all(isinstance(t, nn.Parameter) for t in _original_tensors(module, name, None))]
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)):
            computed.append(hook.name)
            sources.update([f"{hook.name}_g", f"{hook.name}_v"] if isinstance(hook, WeightNorm)
                           else [f"{hook.name}_orig"])
    return computed, sources


def is_sparsifier_mask(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is masked by a ``torch.ao.pruning`` sparsifier (its ``FakeSparsity``
    parametrization): pruned, as ``torch.nn.utils.prune``'s masks are."""
    return parametrize.is_parametrized(module, name) and any(
        type(p).__module__.startswith("torch.ao.pruning") for p in module.parametrizations[name])


def _original_tensors(module: nn.Module, name: str, hook: WeightNorm | SpectralNorm | None) -> list[Tensor]:
    """The tensors ``module.<name>`` is computed from (weight norm's g and v, spectral norm's ``<name>_orig``)."""
    if hook is not None:
        names = [f"{name}_g", f"{name}_v"] if isinstance(hook, WeightNorm) else [f"{name}_orig"]
        return [getattr(module, n) for n in names]
    originals = module.parametrizations[name]
    if hasattr(originals, "original"):
        return [originals.original]
    return [getattr(originals, f"original{i}") for i in range(originals.ntensors)]


@contextlib.contextmanager
def _in_eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode within the block (``spectral_norm`` runs a power iteration in training mode), each of its
    modules given back its own mode after it (``train(mode)`` set every child to the parent's: a batch norm frozen
    in eval mode inside a training model came back training)."""
    modes = [(each, each.training) for each in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for each, training in modes:
            each.training = training


def unfold_state_dict(reference: nn.Module, state: Mapping[str, Tensor],
                      folded: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """`state` (of a copy of `reference` after :func:`fold_parametrizations_`) in `reference`'s own layout.

    Each folded tensor is assigned to a deep copy of `reference` through its parametrization's ``right_inverse``
    (weight norm's ``g`` and ``v`` are computed here: its own inverse turns a zero channel into ``0 / 0``). Returns
    the state dict and the folded tensors whose parametrization does not give its value back (``spectral_norm``:
    ``v / sigma(v)`` for ``v``): when there is one, `state` is returned unchanged, since a loaded model would not
    compute the pruned weights.
    """
    if not folded:
        return dict(state), []
    from litcompress.pruning.engine import deepcopy_model, make_permanent_

    target = deepcopy_model(reference).eval()
    make_permanent_(target)  # a reference with pruning masks: its keys are those of the unpruned model
    # a module registered under several names (the TCN reference code's conv1, also net.0) has a key under each
    aliases: dict[int, list[str]] = {}
    for alias, module in target.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(alias)
    plain = dict(state)
    failed = []
    folded_modules = set()
    # a parametrization on one holder of a tied weight cannot give its pruned value back through the shared original
    # (the other holder's own key overwrites it at the load), so it is kept folded
    tied = set(tied_folded_tensors(target, folded))
    with torch.no_grad():
        for entry in folded:
            qualified = entry.split(" ", 1)[0]
            path, _, name = qualified.rpartition(".")
            module = target.get_submodule(path)
            if entry in tied:
                failed.append(entry)
                continue
            value = plain.pop(qualified).detach()
            for alias in aliases[id(module)]:
                plain.pop(f"{alias + '.' if alias else ''}{name}", None)
                folded_modules.add(alias)
            hook = _norm_hook(module, name)
            chain = None if hook is not None else module.parametrizations[name]
            try:
                if isinstance(hook, WeightNorm):
                    g, v = _weight_norm_parts(value, hook.dim)
                    getattr(module, name + "_g").copy_(g)
                    getattr(module, name + "_v").copy_(v)
                    back = hook.compute_weight(module)
                elif hook is not None:  # a spectral norm hook has no inverse
                    back = None
                elif len(chain) == 1 and isinstance(chain[0], _WeightNorm):
                    g, v = _weight_norm_parts(value, chain[0].dim)
                    chain.original0.copy_(g)
                    chain.original1.copy_(v)
                    back = getattr(module, name)
                else:
                    setattr(module, name, value.clone())  # the originals take the storage of what is assigned
                    back = getattr(module, name)
            except Exception:  # noqa: BLE001 - a parametrization without right_inverse, or one that rejects the value
                back = None
            # zeros exactly, the rest to the rounding of the weights' own dtype (half precision's is ~1e-3)
            rtol = max(1e-5, 4 * torch.finfo(value.dtype).eps) if value.is_floating_point() else 0.0
            exact = back is not None and torch.equal(back == 0, value == 0) and torch.allclose(
                back, value, rtol=rtol, atol=1e-7)
            if not exact:
                failed.append(entry)
    if failed:
        return dict(state), failed
    missing, unexpected = target.load_state_dict(plain, strict=False)
    originals = {k for k in target.state_dict() if ".parametrizations." in k
                 or k.rpartition(".")[0] in folded_modules and k.endswith(("_g", "_v"))}
    if unexpected or set(missing) - originals:
        raise RuntimeError(f"unfolding the pruned state dict: unexpected keys {unexpected}, missing "
                           f"{sorted(set(missing) - originals)}")
    return target.state_dict(), []


def _holder_counts(model: nn.Module) -> collections.Counter[int]:
    """How many of `model`'s modules hold each parameter or buffer, by id (tied weights, a shared table: more than
    one)."""
    return collections.Counter(id(t) for m in model.modules() for t in [*m._parameters.values(), *m._buffers.values()]
                               if t is not None)


def tied_folded_tensors(model: nn.Module, folded: Sequence[str]) -> list[str]:
    """The entries of `folded` (:func:`fold_parametrizations_`'s names, of a copy of `model`) whose original is a
    weight another module of `model` holds too: the fold gives them a tensor of their own."""
    holders = _holder_counts(model)
    tied = []
    for entry in folded:
        path, _, name = entry.split(" ", 1)[0].rpartition(".")
        module = model.get_submodule(path)
        if any(holders[id(t)] > 1 for t in _original_tensors(module, name, _norm_hook(module, name))):
            tied.append(entry)
    return tied


def _weight_norm_parts(value: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``g`` and ``v`` of weight norm along `dim` that compute `value`. A zero row (a pruned channel) would be
    ``g = 0, v = 0``, which computes ``0 / 0``: it gets ``v = 1``, which computes ``0 * v / |v| = 0``."""
    g = torch.norm_except_dim(value, 2, dim)
    v = value.clone()
    v.masked_fill_((g == 0).expand_as(v), 1.0)
    return g, v


__all__ = ["check_prunable", "fold_parametrizations_", "is_computed", "parametrized_targets", "parametrized_tensors",
           "unfold_state_dict"]
