"""Gradual pruning for any training loop: a schedule, the tensors it prunes, and resumable state."""

from __future__ import annotations

import copy
import numbers
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.utils.prune as torch_prune
from torch.nn.parameter import is_lazy

from litcompress.pruning.distributed import broadcast_pruning_state_, distributed_world_size
from litcompress.pruning.engine import (Scope, Target, check_importance_scores, check_keep_multiple_of,
                                        check_targets, distinct_targets,
                                        drawing_from, emptied_message, emptied_targets, is_pruned, naming_targets,
                                        outside_inference_mode, prune_to_sparsity_, pruned_count,
                                        register_state_hooks, round_seed,
                                        set_mask_, share_tied_masks_, targets_digest, tensor_key,
                                        unique_modules)
from litcompress.pruning.methods import (check_countable_slices, check_method_kwargs, check_slices_exist,
                                         check_takes_amount, norm_refusal, resolve_method, structured_dim)
from litcompress.pruning.parametrizations import check_prunable
from litcompress.pruning.schedules import (SparsitySchedule, block_multiple, check_progress,
                                           structured_pruned_count)

_SEED_SALT = 0x6A09_E667_F3BC_C908


def _is_round(entry: object) -> bool:
    """Whether `entry` is a round as :meth:`GradualPruner.step` records it (a state's history holds only these)."""
    return isinstance(entry, Mapping) and all(
        isinstance(entry.get(key), numbers.Integral) and not isinstance(entry.get(key), bool)
        for key in ("t", "pruned_before", "pruned_after")) and isinstance(entry.get("target"), numbers.Real)


def _has_pruned(history: Sequence[Mapping[str, Any]]) -> bool:
    return bool(history) and history[-1]["pruned_after"] > 0


def _mask_zeros_of_unmasked_(targets: Sequence[Target], dim: int | None) -> dict[object, int]:
    """Give each target without a mask whose tensor holds zeros (not only zeros: a zero-initialised tensor) the mask
    of its non-zero entries, or with a structured method's `dim`, of its slices along `dim` that are not all zero
    (a zero inside a kept channel stays a weight); returns the entries masked, by tensor (tied weights once)."""
    masked: dict[object, int] = {}
    for module, name in distinct_targets(targets):
        tensor = getattr(module, name)
        if is_pruned(module, name) or tensor.is_meta:
            continue
        with torch.no_grad():
            zeros = tensor == 0
            others = [] if dim is None else [d for d in range(tensor.dim()) if d != dim % max(tensor.dim(), 1)]
            if others:
                zeros = zeros.all(dim=others, keepdim=True).expand_as(tensor).clone()
        count = int(zeros.sum())
        if 0 < count < zeros.numel():
            key = tensor_key(module, name)
            set_mask_(module, name, ~zeros)
            masked[key] = count
    # the same mask under every holder of a tied tensor masked here (else made permanent, it changed the others)
    share_tied_masks_(targets, masked)
    return masked


def _are(count: int) -> str:
    return "is" if count == 1 else "are"


def _said_kept(count: int, how: str) -> str:
    return (f"GradualPruner: {count:,} zero entries of the tensors it prunes had no mask ({how}); they are kept "
            "pruned (masked) rather than trained back, so the sparsity reached is kept. Save `model.state_dict()`, "
            "which holds the masks, to resume.")


class _LoadedZeros:
    """What a pruner shares with its load hooks: its history (whether it pruned), the structured method's dim, the
    entries the hooks masked since the pruner last said so (by tensor), and the pruner (a weak reference: a hook acts
    only for the pruner that manages its module)."""

    def __init__(self, history: list[dict[str, Any]], dim: int | None) -> None:
        self.history = history
        self.dim = dim
        self.masked: dict[object, int] = {}
        self.pruner: weakref.ReferenceType[GradualPruner] | None = None

    def __getstate__(self) -> dict[str, Any]:  # pickled: the pruner, pickled with it, sets its reference again
        return {**self.__dict__, "pruner": None}


class _ZerosStayPrunedHook:
    """Load-state-dict post-hook of a target's module: once its pruner has pruned, a target loaded without a mask
    (weights saved permanent: `permanent_state_dict`) keeps its zeros masked, before any training step moves them;
    the pruner says so at its next step. A copy of the model (deepcopy, pickle) made without its pruner gets a hook
    that does nothing: no pruner manages that copy."""

    def __init__(self, names: Sequence[str], shared: _LoadedZeros | None) -> None:
        self.names = tuple(names)
        self.shared = shared

    def __call__(self, module: torch.nn.Module, incompatible_keys: Any) -> None:
        shared = self.shared
        pruner = shared.pruner() if shared is not None and shared.pruner is not None else None
        if pruner is None or pruner._loaded_zeros is not shared or not any(m is module for m, _ in pruner.targets):
            return
        if _has_pruned(shared.history):
            shared.masked.update(_mask_zeros_of_unmasked_([(module, name) for name in self.names], shared.dim))


class GradualPruner:
    """Prunes `targets` to ``schedule.target(t)`` at every pruning point of `schedule`.

    Call :meth:`step` with the progress in the schedule's unit (optimizer steps done, or epochs finished) after
    each optimizer step or epoch; it prunes when due and is a no-op otherwise (also when called twice for the same
    `t`). A pruning point passed over between two calls gets its round, with its target, at the second.

    To resume, save ``model.state_dict()`` (it holds the masks) and :meth:`state_dict`; in the new process, build
    the model and its pruner, then load both as usual (``model.load_state_dict``, ``fabric.load``), in either order:
    the pruner lets its unpruned targets take the saved masks. Weights saved without masks (``permanent_state_dict``)
    keep their zeros masked once the pruner's state says it pruned, as do targets whose masks
    :func:`~litcompress.pruning.make_permanent_` removed when the next round comes (entries that training moved off
    zero in between are weights again: a warning says how many)::

        pruner = GradualPruner(targets, PolynomialDecay(final_sparsity=0.9, begin=0, end=1000, frequency=50))
        for step, batch in enumerate(loader, start=1):
            train_step(batch)
            pruner.step(step)

    With ``nn.MultiheadAttention`` or torch's Transformer layers among the pruned modules' parents, call
    :func:`litcompress.pruning.keep_bypassed_weights_current_` on the model once (before training): they read
    their sub-modules' weights without calling them (an attention's ``out_proj``). With tied weights (an output
    layer holding its input embedding's matrix), pass ``with_tied_targets(model, targets)``, so that every module
    holding a pruned tensor computes with its mask.

    Under data parallelism (DDP, Fabric) each round's masks are rank 0's on every rank. ``world_size``: how many
    processes prune together; None takes the default process group's size, 1 prunes alone (a process left with
    another run's group whose other ranks are not pruning: a broadcast to them would wait for ever). The targets keep
    their shapes from round to round (a round after ``shrink_`` narrowed one is refused): shrink once the schedule
    ends.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        schedule: SparsitySchedule,
        method: str | type[torch_prune.BasePruningMethod] = "l1_unstructured",
        *,
        scope: Scope = "global",
        keep_multiple_of: int | None = None,
        target_names: Sequence[str] | None = None,
        world_size: int | None = None,
        **method_kwargs: Any,
    ) -> None:
        if not isinstance(schedule, SparsitySchedule):
            raise TypeError(f"`schedule` must be a SparsitySchedule, got {schedule!r}.")
        if scope not in ("global", "local"):
            raise ValueError(f"`scope` must be 'global' or 'local', got {scope!r}.")
        self.method = resolve_method(method)
        if scope == "global" and getattr(self.method, "PRUNING_TYPE", None) != "unstructured":
            raise ValueError(f"Global pruning needs an unstructured method, got {self.method.__name__}.")
        self.targets = check_targets(targets, "GradualPruner")
        if not self.targets:  # it would step through its schedule, saying it reached it, with nothing pruned
            raise ValueError("GradualPruner: no targets to prune. default_targets(model) lists the tensors named "
                             "'weight' (parameter_names=...): a recurrent layer's are weight_ih_l0, weight_hh_l0, "
                             "..., an attention's in_proj_weight; give those as (module, name) pairs.")
        # what messages call each target: its path in the model (engine.qualified_names) when the caller knows it
        if target_names is not None and (isinstance(target_names, str) or len(target_names) != len(self.targets)):
            raise ValueError(f"GradualPruner(target_names=...): give one name per target ({len(self.targets)}), "
                             "e.g. litcompress.pruning.engine.qualified_names(model, targets).")
        self._names = {(id(m), n): name for (m, n), name in zip(self.targets, target_names or ())}
        check_prunable(self.targets)
        check_takes_amount(self.method, "GradualPruner")
        check_slices_exist(self.method, [(target_names[i] if target_names else f"{type(m).__name__}.{n}",
                                          getattr(m, n).dim()) for i, (m, n) in enumerate(self.targets)],
                           "GradualPruner")
        self.schedule = schedule
        self.scope = scope
        # a misspelt or missing argument would fail (or be dropped) at the first round, maybe hours into training
        check_method_kwargs(self.method, method_kwargs, "GradualPruner",
                            ndims={getattr(m, n).dim() for m, n in self.targets},
                            also=("scope", "keep_multiple_of", "target_names", "world_size"))
        if scope == "local":
            check_countable_slices(self.method, method_kwargs, "GradualPruner")
        if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int)
                                       or world_size < 1):
            raise ValueError(f"GradualPruner(world_size={world_size!r}): give how many processes prune together (an "
                             "int >= 1: 1 prunes alone), or None for the default process group's size.")
        self.world_size = world_size
        self._check_world_size()
        self._check_norm_fits(method_kwargs, target_names)
        if "slice_groups" in method_kwargs:
            groups = self._slice_groups(method_kwargs["slice_groups"], target_names,
                                        structured_dim(self.method, method_kwargs))
            method_kwargs = {**method_kwargs, "slice_groups": groups}
        structured = getattr(self.method, "PRUNING_TYPE", None) == "structured"
        check_importance_scores(self.targets, self.method, method_kwargs, scope, "GradualPruner",
                                slice_groups=method_kwargs.get("slice_groups") if structured else None)
        self.method_kwargs = method_kwargs
        self.keep_multiple_of = check_keep_multiple_of(keep_multiple_of, self.method)  # built, not at the first round
        self._warn_of_targets_never_pruned()
        # a fresh model then loads a pruned state dict (`<name>_orig`/`<name>_mask` keys) as it is: a resumed loop's
        # own `model.load_state_dict(...)` (or `fabric.load`) works unchanged
        self._hook_handles = register_state_hooks(self.targets, permanent_state_dict=False)
        self.history: list[dict[str, Any]] = []  # (one list for the pruner's life: the hooks below read it)
        # ... and a permanent state dict (no masks) loaded after this pruner's state keeps its zeros pruned
        self._loaded_zeros = _LoadedZeros(self.history, structured_dim(self.method, method_kwargs) if structured
                                          else None)
        self._loaded_zeros.pruner = weakref.ref(self)
        for module in unique_modules(self.targets):
            names = [name for m, name in self.targets if m is module]
            self._hook_handles.append(
                module.register_load_state_dict_post_hook(_ZerosStayPrunedHook(names, self._loaded_zeros)))
        self.last_t = -1
        # a random method's rounds draw from a stream of their own (round_seed): saved, a resumed loop draws the masks
        # the uninterrupted one did; seeded by the run's seed, not with it
        self._target_names = tuple(target_names or ())
        # (put off to the first round when a target has no values yet: a model built on the meta device)
        self.seed: int | None = None if any(getattr(m, n).is_meta for m, n in self.targets) else self._new_seed()
        self._warned: set[tuple[int, str]] = set()  # emptied tensors already warned of

    def __deepcopy__(self, memo: dict) -> GradualPruner:
        """A copy (of the model and its pruner together: the copies' hooks act for the copied pruner, and its handles
        remove the copies' hooks). torch refuses to deep-copy a model whose masked weights a round or a forward has
        computed (no graph leaves): pickle the two together instead (``torch.save``), as a checkpoint does."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        new._renew_references(dict(zip((id(m) for m, _ in self.targets), (id(m) for m, _ in new.targets))))
        return new

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_loaded_zeros" not in state:  # pickled by an earlier version: no load hooks to serve
            self._loaded_zeros = _LoadedZeros(self.history, None)
        self._renew_references({})

    def _renew_references(self, new_ids: dict[int, int]) -> None:
        """After a copy: the shared state's reference to this pruner, and what is keyed by module id (the targets'
        names; the emptied tensors already said, carried over by `new_ids`: old id -> new)."""
        self._loaded_zeros.pruner = weakref.ref(self)
        self._names = {(id(m), n): name for (m, n), name in zip(self.targets, self._target_names)}
        self._warned = {(new_ids[key], n) for key, n in self._warned if key in new_ids}

    def _warn_of_targets_never_pruned(self) -> None:
        """A structured method prunes whole slices: a target with too few for the final sparsity (a one-row layer;
        no smaller multiple of keep_multiple_of) is never pruned, which the rounds would not say."""
        if getattr(self.method, "PRUNING_TYPE", None) != "structured":
            return
        final = float(self.schedule.final_sparsity)
        dim = structured_dim(self.method, self.method_kwargs)
        groups = self.method_kwargs.get("slice_groups") or {}
        never = []
        for module, name in distinct_targets(self.targets):
            total = getattr(module, name).shape[dim]
            blocks = groups.get((module, name), 1)  # slices are pruned evenly over blocks of total // blocks
            if total and final > 0 and structured_pruned_count(
                    total // blocks, final, block_multiple(self.keep_multiple_of, blocks)) == 0:
                label = self._names.get((id(module), name), f"{type(module).__name__}.{name}")
                never.append(f"{label} ({total} slice{'s' if total > 1 else ''})")
        if never:
            multiple = f", and slices in multiples of {self.keep_multiple_of}" if self.keep_multiple_of else ""
            warnings.warn(f"GradualPruner: at the final sparsity {final:.1%}, {self.method.__name__} prunes no slice "
                          f"along dim {dim} of {', '.join(never[:6])}{' ...' if len(never) > 6 else ''}: a layer "
                          f"keeps at least one slice{multiple}, so they stay dense. Leave them out of the targets, or "
                          "raise the final sparsity" + (" or lower keep_multiple_of." if multiple else "."),
                          stacklevel=3)

    def _new_seed(self) -> int:
        return torch.initial_seed() ^ _SEED_SALT ^ targets_digest(self.targets, self._target_names)

    def _check_world_size(self) -> None:
        """ValueError when the processes said to prune together are not the default process group's (the broadcast
        failed in torch's words at the first round without one, and would wait for ranks that never prune)."""
        if self.world_size is None or self.world_size == 1:
            return
        ranks = distributed_world_size() if dist.is_available() and dist.is_initialized() else None
        if ranks != self.world_size:
            found = "no process group is initialised" if ranks is None else f"the process group has {ranks} ranks"
            raise ValueError(f"GradualPruner(world_size={self.world_size}): {found}; the masks are broadcast over "
                             "the default process group, so give its size (None reads it), or 1 to prune alone.")

    def _check_norm_fits(self, method_kwargs: dict[str, Any], target_names: Sequence[str] | None) -> None:
        """ValueError when torch cannot take the norm ``n`` over a target's dimensions besides ``dim`` ('fro' and
        'nuc' need two of them): it would fail at the first round, into training."""
        norm, dim = method_kwargs.get("n"), method_kwargs.get("dim")
        if norm is None or not isinstance(dim, int) or isinstance(dim, bool):
            return
        for i, (module, name) in enumerate(self.targets):
            tensor = getattr(module, name)
            if not -tensor.dim() <= dim < tensor.dim():
                continue  # check_method_kwargs refused a dim no target has; others are for torch to refuse
            refusal = norm_refusal(tensor, norm, dim)
            if refusal is not None:
                label = target_names[i] if target_names else f"{type(module).__name__}.{name}"
                raise ValueError(f"GradualPruner(n={norm!r}): torch takes the norm over the {tensor.dim() - 1} "
                                 f"dimension(s) of {label} {tuple(tensor.shape)} besides dim={dim}, and says: "
                                 f"{refusal}. Use a number (1, 2, float('inf'), ...).")

    def _slice_groups(self, given: Any, target_names: Sequence[str] | None, dim: Any) -> dict[Target, int]:
        """`slice_groups` keyed by target: keys given as layer names (``channel_plan(model).slice_groups``) are the
        targets of that module, found through `target_names`; a key that is neither is refused (it was ignored, and
        the grouped layers pruned unevenly), and so is a count that does not divide a target's slices along `dim`."""
        if not isinstance(given, Mapping):
            raise TypeError(f"GradualPruner(slice_groups={given!r}): expected a dict {{target or layer name: groups}}.")
        paths = [name.rpartition(".")[0] for name in target_names or ()]  # the modules' paths, with target_names
        keyed: dict[Target, int] = {}
        for key, groups in given.items():
            if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
                raise ValueError(f"GradualPruner(slice_groups={{{key!r}: {groups!r}}}): expected an int >= 1.")
            if isinstance(key, str):
                matched = [t for t, path in zip(self.targets, paths) if path == key]
                if not matched:
                    how = ("no target is a tensor of it" if paths else
                           "layer names need target_names=qualified_names(model, targets), or key it by target")
                    raise ValueError(f"GradualPruner(slice_groups=...): {key!r}: {how}.")
                keyed.update({t: groups for t in matched})
            elif isinstance(key, tuple) and any(key[0] is m and key[1] == n for m, n in self.targets):
                keyed[key] = groups
            else:
                raise ValueError(f"GradualPruner(slice_groups=...): {key!r} is not one of the targets; key it by "
                                 "target ((module, 'weight')) or, with target_names, by layer name.")
        for (module, name), groups in keyed.items():
            shape = getattr(module, name).shape
            if isinstance(dim, int) and -len(shape) <= dim < len(shape) and shape[dim] % groups:
                # equal blocks leave the last slices out of every one (or, with more groups than slices, prune none)
                raise ValueError(f"GradualPruner(slice_groups=...): {groups} groups do not divide the "
                                 f"{shape[dim]} slices of {type(module).__name__}.{name} along dim={dim}; give a "
                                 "divisor (channel_plan(model).slice_groups has the model's).")
        return keyed

    def due(self, t: int) -> bool:
        """Whether :meth:`step` would prune at `t`."""
        return self._point_due(t) is not None

    def _point_due(self, t: int) -> int | None:
        """The pruning point whose round :meth:`step` runs at `t`: the last one since the previous call (progress may
        move by more than one between calls), or `t` itself when counting restarted below it."""
        check_progress(t)  # a float `t` failed inside range() with Python's words
        t = int(t)  # numpy's int64 too: `last_t` and `history` go into checkpoints
        if t > self.last_t:
            return self.schedule.last_point(self.last_t, t)
        return t if t != self.last_t and self.schedule.should_prune(t) else None

    def step(self, t: int) -> bool:
        """Prune to the schedule's target if a pruning point was reached since the last call (`t` itself, or one
        passed over); returns whether it pruned."""
        point = self._point_due(t)
        t = int(t)
        self._say_loaded_zeros(stacklevel=3)
        if point is None:
            self.last_t = t
            return False
        self._prune_to(self.schedule.target(point), t, stacklevel=3)
        return True

    def prune_to(self, target: float, t: int) -> None:
        """One round: bring the targets to `target` sparsity (each of them with ``scope="local"``)."""
        check_progress(t)  # as step checks it: a float `t` failed at the next step, inside range()
        self._prune_to(target, int(t), stacklevel=3)

    def _prune_to(self, target: float, t: int, stacklevel: int) -> None:
        """`prune_to`; `stacklevel`: where the user's call is, counted from this frame (1), for the warnings."""
        with outside_inference_mode():  # a round called in a loop's evaluation made inference-tensor masks, and
            self._prune_to_in_normal_mode(target, t, stacklevel + 1)  # the next training forward failed on them

    def _prune_to_in_normal_mode(self, target: float, t: int, stacklevel: int) -> None:
        self._check_shapes_kept()
        # what it pruned before and lost its masks since (make_permanent_) stays pruned: counted as kept, a random
        # method would draw those zeros again and prune past the target
        self._keep_zeros_of_unmasked_targets_("made permanent", stacklevel=stacklevel + 1, at_round=True)
        before = self.pruned()
        if self.seed is None:
            self.seed = self._new_seed()
        names = [self._names.get((id(m), n)) for m, n in self.targets] if self._names else None
        with drawing_from(round_seed(self.seed, t), self.targets), naming_targets(self.targets, names):
            newly = prune_to_sparsity_(self.targets, self.method, target, scope=self.scope,
                                       keep_multiple_of=self.keep_multiple_of, **self.method_kwargs)
        # data-parallel ranks (DDP, Fabric) train one sub-network: a random method draws on each rank's generator
        self._check_world_size()  # (the group may have changed since)
        broadcast_pruning_state_(self.targets, world_size=self.world_size)
        self.last_t = t
        # Python numbers (numpy's are not): the state goes into checkpoints, which torch.load reads weights_only
        self.history.append({"t": int(t), "target": float(target), "pruned_before": int(before),
                             "pruned_after": int(before + newly)})
        emptied = [(m, n) for m, n in emptied_targets(self.targets) if (id(m), n) not in self._warned]
        if emptied:
            self._warned.update((id(m), n) for m, n in emptied)
            names = [self._names.get((id(m), n), f"{type(m).__name__}.{n}") for m, n in emptied]
            warnings.warn(emptied_message(f"GradualPruner (target {target:.1%})", names, self.scope),
                          stacklevel=stacklevel)

    def _check_shapes_kept(self) -> None:
        """The targets' shapes are those of the first round (recorded then: a lazy layer has none before): a layer
        narrowed since (``shrink_``) would be pruned to the target as if it were whole, its rows removed counted as
        none (75% of the original rows gone for a 50% target)."""
        shapes = [None if is_lazy(getattr(m, n)) else tuple(getattr(m, n).shape) for m, n in self.targets]
        first = getattr(self, "_target_shapes", None)  # (absent from pickles of earlier versions)
        if first is None or not self.history:
            self._target_shapes = shapes
            return
        changed = [f"{self._names.get((id(m), n), f'{type(m).__name__}.{n}')} {list(was)} -> {list(now)}"
                   for (m, n), was, now in zip(self.targets, first, shapes) if was is not None and was != now]
        if changed:
            raise ValueError(f"GradualPruner: targets changed shape since its first round ({'; '.join(changed[:3])}"
                             f"{'; ...' if len(changed) > 3 else ''}), e.g. narrowed by shrink_: their sparsity no "
                             "longer counts what was removed. Shrink after the schedule ends, or prune the narrowed "
                             "model with a new GradualPruner.")
        self._target_shapes = [was if was is not None else now for was, now in zip(first, shapes)]

    def _say_loaded_zeros(self, stacklevel: int) -> None:
        """Say what the load hooks masked when the model's weights loaded after this pruner's state (once, for the
        whole load), and share tied weights' masks again (each holder's hook masked its own)."""
        loaded = self._loaded_zeros
        if loaded.masked:
            masked, loaded.masked = sum(loaded.masked.values()), {}
            share_tied_masks_(self.targets)
            warnings.warn(_said_kept(masked, "weights loaded from a state dict without masks"), stacklevel=stacklevel)

    def _keep_zeros_of_unmasked_targets_(self, how: str, stacklevel: int, at_round: bool = False) -> None:
        """Mask the zeros of targets that lost their masks, and say what was masked (by the load hooks too); at a
        round, also how many pruned entries are no longer zero."""
        self._say_loaded_zeros(stacklevel + 1)
        if _has_pruned(self.history):
            masked = sum(_mask_zeros_of_unmasked_(self.targets, self._loaded_zeros.dim).values())
            if masked:
                share_tied_masks_(self.targets)
            # at a round (after a load, the model's weights may not be loaded yet): entries it pruned that are not
            # masked again train as weights: moved off zero (make_permanent_, then optimizer steps), or zeros not
            # masked again (in a slice not all zero, or a tensor all zeros, taken for a zero-initialised one); which
            # ones were pruned is not known any more (the masks are gone), only how many
            pruned_before = self.history[-1]["pruned_after"]
            lost = pruned_before - self.pruned() if at_round else 0
            if lost > 0:
                moved = min(lost, max(0, pruned_before - self._zeros()))
                how_lost = [f"{moved:,} {_are(moved)} no longer zero (training or a load changed them)"] * bool(moved)
                if lost > moved:
                    why = ["with a structured method only whole zero slices are masked"] \
                        if self._loaded_zeros.dim is not None else []
                    why.append("a tensor all zeros is not: it may be a zero-initialised one")
                    how_lost.append(f"{lost - moved:,} {_are(lost - moved)} zero but not masked again "
                                    f"({'; '.join(why)})")
                warnings.warn(f"GradualPruner: its last round left {pruned_before:,} entries pruned, and {lost:,} of "
                              f"them are no longer masked since their masks were removed ({how}): "
                              f"{'; '.join(how_lost)}. They train as weights; the next rounds prune to the "
                              "schedule's targets from the weights as they are (other entries than an uninterrupted "
                              "run's). Keep the masks until the schedule ends: make_permanent_ after its last round, "
                              "or save a copy with permanent_state_dict(model).", stacklevel=stacklevel)
            elif masked:
                warnings.warn(_said_kept(masked, how), stacklevel=stacklevel)

    def remove_hooks(self) -> None:
        """Take this pruner's load-state-dict hooks off the model's modules (when handing the model on: it then loads
        state dicts as a plain model does)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def pruned(self) -> int:
        """Entries masked out across the targets."""
        return sum(pruned_count(m, n) for m, n in distinct_targets(self.targets))

    def _zeros(self) -> int:
        """Entries that are zero across the targets, masked or not."""
        with torch.no_grad():
            return sum(int((getattr(m, n) == 0).sum()) for m, n in distinct_targets(self.targets))

    def state_dict(self) -> dict[str, Any]:
        shapes = getattr(self, "_target_shapes", None)  # the first round's (a pruner restored after shrink_ checks)
        return {"last_t": self.last_t, "history": list(self.history), "seed": self.seed,
                "target_shapes": None if shapes is None else [None if s is None else list(s) for s in shapes],
                "settings": self._settings()}

    def _settings(self) -> dict[str, str]:
        """What decides the masks a round makes, described in plain strings (a checkpoint loads with
        ``weights_only=True``) that do not depend on how a value was written (3 or 3.0, numpy's numbers, a dim
        counted from the end, the module a method class was imported from): the method, its scope and arguments,
        the multiple kept, and the schedule by what it does (its unit, span and final sparsity, and which of 17
        points across its span are rounds, with their targets: a function it holds changes its address from one
        process to the next, a schedule of one's own need not be a dataclass)."""
        def plain(value: object) -> str:
            if isinstance(value, (bool, str)) or value is None:
                return repr(value)
            if isinstance(value, numbers.Real):
                return repr(round(float(value), 6))  # (a float32 0.8 is 0.8 here)
            return type(value).__qualname__  # (a tensor, a function: by kind)

        ndims = {getattr(m, n).dim() for m, n in self.targets}
        arguments = {k: v for k, v in self.method_kwargs.items() if k not in ("importance_scores", "slice_groups")}
        if isinstance(arguments.get("dim"), numbers.Integral) and len(ndims) == 1 and min(ndims) > 0:
            arguments["dim"] = int(arguments["dim"]) % min(ndims)  # (dim=-1 of 2-d weights is dim=1)
        schedule = self.schedule
        begin, end = int(schedule.begin), int(schedule.end)
        points = sorted({begin + (end - begin) * i // 16 for i in range(17)})

        def at(t: int) -> str:  # the target where a round runs (a table of them may know no other), "-" elsewhere
            try:
                return plain(schedule.target(t)) if schedule.should_prune(t) else "-"
            except Exception as error:  # noqa: BLE001 - described, not raised: saving a state must not fail here
                return type(error).__name__
        return {"method": self.method.__qualname__, "scope": str(self.scope),
                "method_kwargs": ", ".join(f"{k}={plain(v)}" for k, v in sorted(arguments.items())) or "none",
                "keep_multiple_of": plain(self.keep_multiple_of),
                "schedule": f"{schedule.unit} {begin}..{end} to {plain(schedule.final_sparsity)}; "
                            + ", ".join(f"{t}: {at(t)}" for t in points)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # every value checked before any change (a KeyError or a bad value left the pruner half-loaded)
        missing = [key for key in ("last_t", "history") if not isinstance(state, Mapping) or key not in state]
        seed = state.get("seed", self.seed) if isinstance(state, Mapping) else None  # (an older state: this run's)
        shapes = state.get("target_shapes") if isinstance(state, Mapping) else None  # (an older state: none)
        settings = state.get("settings") if isinstance(state, Mapping) else None  # (an older state: none)
        bad = missing or not isinstance(state["last_t"], numbers.Integral) or isinstance(state["last_t"], bool) \
            or not isinstance(state["history"], list) or not all(_is_round(entry) for entry in state["history"]) \
            or not (seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool))) \
            or not (shapes is None or (isinstance(shapes, list) and all(
                s is None or (isinstance(s, (list, tuple)) and all(isinstance(d, int) for d in s)) for s in shapes))) \
            or not (settings is None or (isinstance(settings, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in settings.items())))
        if bad:
            raise ValueError("GradualPruner.load_state_dict: "
                             + (f"the state has no {' or '.join(missing)}" if missing else
                                "expected an int 'last_t', a list 'history' of rounds (dicts of 't', 'target', "
                                "'pruned_before' and 'pruned_after'), an int (or None) 'seed' and a list of shapes "
                                "(or None) in 'target_shapes', and a dict of strings (or None) in 'settings'")
                             + "; give the dict GradualPruner.state_dict() returned.")
        self._check_state_of_these_targets(shapes)
        self._check_state_of_these_settings(settings)
        self.last_t = int(state["last_t"])
        self.history[:] = state["history"]  # in place: the load hooks hold this list
        # weights loaded before this state, saved without masks (`permanent_state_dict`): their zeros stay pruned
        self._keep_zeros_of_unmasked_targets_("weights loaded from a state dict without masks", stacklevel=3)
        self.seed = None if seed is None else int(seed)
        if shapes is not None:
            self._target_shapes = [None if s is None else tuple(s) for s in shapes]

    def _check_state_of_these_settings(self, settings: Mapping[str, str] | None) -> None:
        """A state saved by a pruner of another method, scope, arguments, multiple or schedule is refused before
        anything is loaded: its rounds' targets and masks are that pruner's (a resumed run of a lower final sparsity
        stayed at the state's, one of a structured method went past its own)."""
        if settings is None:  # (an older state)
            return
        mine = self._settings()
        differ = [f"{key} {settings[key]} -> {mine[key]}" for key in mine
                  if key in settings and settings[key] != mine[key]]
        if differ:
            raise ValueError(f"GradualPruner.load_state_dict: the state is of a pruner built otherwise ("
                             f"{'; '.join(differ)}). Load it into a pruner built as that one was; to go on with "
                             "these settings from the masks the model holds, start a new GradualPruner (it keeps "
                             "them and prunes on from there).")

    def _check_state_of_these_targets(self, shapes: list | None) -> None:
        """A state's first-round shapes (None: an older state, or lazy targets) against these targets': another
        pruner's state, or one of targets narrowed since (``shrink_``), is refused before anything is loaded (it was
        taken, and the next round failed blaming a shrink)."""
        if shapes is None:
            return
        if len(shapes) != len(self.targets):
            raise ValueError(f"GradualPruner.load_state_dict: the state is of a pruner over {len(shapes)} targets, and "
                             f"this one has {len(self.targets)}: load the state a pruner over these targets saved.")
        now = [None if is_lazy(getattr(m, n)) else list(getattr(m, n).shape) for m, n in self.targets]
        differ = [f"{self._names.get((id(m), n), f'{type(m).__name__}.{n}')} {list(was)} -> {got}"
                  for (m, n), was, got in zip(self.targets, shapes, now)
                  if was is not None and got is not None and list(was) != got]
        if differ:
            raise ValueError(f"GradualPruner.load_state_dict: the state's targets had other shapes at its first round "
                             f"({'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''}): it is another pruner's, "
                             "or these targets were narrowed since (shrink_). Load the state of a pruner over these "
                             "targets, or prune a narrowed model with a new GradualPruner.")
