"""The base of the callbacks that prune whole structures of a LightningModule while it trains, along a schedule:
attention heads (:class:`~litcompress.callbacks.HeadPruning`) and recurrent layers' hidden units
(:class:`~litcompress.callbacks.UnitPruning`). Each round masks, through ``torch.nn.utils.prune``, the weakest
structures of each layer up to the schedule's fraction; training goes on with the rest, and ``litcompress.shrink``
(or ``CompressOnFitEnd``) then removes them. The masks and the schedule's position are the callback's state, saved in
checkpoints; under DDP the masks are broadcast from rank 0 after every round.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch.nn.utils.prune as torch_prune
from lightning.pytorch.core.module import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from litcompress.callbacks.pruning import (_describe, _in_spawned_worker, _is_bool, _refuse_weight_averaging_after,
                                           _STATE_KEY_MEMO, canonical_numbers, memoized_state_key,
                                           restore_state_under_moved_key)
from litcompress.callbacks.schedule_checks import fit_too_short_message, limit_reached, stopped_early_message
from litcompress.callbacks.targets import TargetsFoundOnceConfigured, masks_to_save
from litcompress.pruning import engine
from litcompress.pruning.distributed import broadcast_pruning_state_
from litcompress.pruning.heads import none_pruned_message
from litcompress.pruning.schedules import SparsitySchedule

_STATE_VERSION = 1


class StructurePruning(TargetsFoundOnceConfigured):
    """Prune the weakest structures (heads, units) of each layer of some kind while training. Subclasses say which
    layers (:meth:`_layer_names`), which of their tensors the masks are on (:meth:`_tensor_names`), how a round
    prunes (:meth:`_prune_layers_`) and how many structures a layer has and has pruned (:meth:`_counts`); the
    schedule, the hooks, the state and the checks are shared."""

    #: the constructor's argument giving the fraction (its name in messages and in the state key)
    _ARGUMENT = "amount"
    #: what the fraction is of, in messages: "of each attention's heads"
    _WHAT = "of each layer's structures"
    #: the key the pruned fraction is logged under
    _LOG_KEY = "pruning/structures"

    def __init__(self, amount: Union[SparsitySchedule, float], *, exclude: Optional[tuple[str, ...]] = (),
                 make_pruning_permanent: bool = True, verbose: int = 0, log_sparsity: bool = True) -> None:
        call = f"{type(self).__name__}({self._ARGUMENT}"
        if isinstance(amount, SparsitySchedule):
            if not 0.0 <= float(amount.final_sparsity) < 1.0:
                raise MisconfigurationException(f"{call}=...): the schedule's final fraction {self._WHAT} "
                                                f"{amount.final_sparsity} is not in [0, 1).")
        elif isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not math.isfinite(amount) \
                or not 0.0 < amount < 1.0:  # (numpy's numbers too)
            raise MisconfigurationException(f"{call}={amount!r}): expected a fraction {self._WHAT} in (0, 1), "
                                            "e.g. 0.5, or a SparsitySchedule of that fraction.")
        given, exclude = exclude, () if exclude is None else exclude  # None: nothing excluded, as elsewhere
        if isinstance(exclude, Iterable) and not isinstance(exclude, (str, bytes)):
            exclude = tuple(exclude)  # once: a generator checked here was empty when kept (nothing excluded)
        if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable) or not all(
                isinstance(name, str) for name in exclude):
            raise MisconfigurationException(f"{type(self).__name__}(exclude={given!r}): expected a tuple of module "
                                            "names.")
        if not _is_bool(make_pruning_permanent):  # numpy's too, as ModelPruning takes them
            raise MisconfigurationException(f"{type(self).__name__}(make_pruning_permanent="
                                            f"{make_pruning_permanent!r}): expected True or False.")
        if verbose not in (0, 1):
            raise MisconfigurationException(f"{type(self).__name__}(verbose={verbose!r}): expected 0 or 1.")
        if not _is_bool(log_sparsity):
            raise MisconfigurationException(f"{type(self).__name__}(log_sparsity={log_sparsity!r}): expected True "
                                            "or False.")
        make_pruning_permanent, log_sparsity = bool(make_pruning_permanent), bool(log_sparsity)
        self._log_sparsity = log_sparsity
        self.amount = amount if isinstance(amount, SparsitySchedule) else float(amount)
        self.exclude = tuple(exclude)
        self._make_pruning_permanent, self._verbose = make_pruning_permanent, verbose
        self._schedule = amount if isinstance(amount, SparsitySchedule) else None
        self._targets: list[tuple[nn.Module, str]] = []
        self._names: list[str] = []
        self._hook_handles: list[Any] = []
        self._left_masked: set[tuple[int, str]] = set()  # the tensors other pruners keep masked
        self._last_step, self._last_epoch = -1, -1
        self._restored = False  # state loaded from a checkpoint (only then can a resumed fit have skipped a round)
        self._warned_fit_too_short = False
        self._pruned_once = False
        self._made_permanent = False  # this fit's masks, by `make_pruning_permanent` (their zeros go in the state)
        self._pending_state: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------------------------------ what to prune
    def _layer_names(self, pl_module: LightningModule) -> list[str]:
        """The names of the layers whose structures are pruned (outside `exclude`); raise if there are none."""
        raise NotImplementedError

    def _tensor_names(self, layer: nn.Module) -> list[str]:
        """The tensors of `layer` that the masks are on."""
        raise NotImplementedError

    def _prune_layers_(self, pl_module: LightningModule, fraction: float) -> dict[str, int]:
        """Mask `fraction` of each layer's structures; the masked count per layer."""
        raise NotImplementedError

    def _counts(self, layer: nn.Module) -> tuple[int, int]:
        """(structures pruned, structures) of `layer`."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ hooks
    def _masked_targets(self) -> list[tuple[nn.Module, str]]:
        return list(self._targets)

    def _keeps_masks(self) -> bool:
        return not self._make_pruning_permanent

    def _find_targets(self, pl_module: LightningModule, stage: str) -> None:
        modules = dict(pl_module.named_modules())
        self._refuse_unknown_exclusions(pl_module, list(modules))
        self._targets = [(modules[name], tensor) for name in self._layer_names(pl_module)
                         for tensor in self._tensor_names(modules[name])]
        self._names = engine.qualified_names(pl_module, self._targets)
        self._remove_hooks()
        self._hook_handles = engine.register_state_hooks(self._targets,
                                                         permanent_state_dict=self._make_pruning_permanent,
                                                         left_masked=self._left_masked)
        if self._pending_state is not None:
            self._restore(self._pending_state)

    def _refuse_unknown_exclusions(self, pl_module: LightningModule, names: list[str]) -> None:
        """`exclude` is matched by exact module name: a misspelt one would leave the layer it meant to be pruned."""
        unknown = [name for name in self.exclude if not name or name not in names]  # ("": the root, no layer)
        if not unknown:
            return
        raise MisconfigurationException(
            f"{type(self).__name__}(exclude=...) names no module of {type(pl_module).__name__}: {unknown}"
            f"{engine.close_names(unknown, names)}. Names are those of the LightningModule's named_modules().")

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._leave_masked_what_others_keep(trainer)  # (targets found late: at a first backward) before a checkpoint
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: several batches per optimizer step
            return
        previous, self._last_step = self._last_step, step
        if self._schedule is None:
            # once the first optimizer step is done: with gradient accumulation, the first batches make none
            if not self._pruned_once and step > 0:
                self._pruned_once = True
                self._prune(trainer, pl_module, float(self.amount))
        elif self._schedule.unit == "step" and step > previous:
            # manual optimization moves `global_step` by every optimizer's steps: points passed over get their round
            point = self._schedule.last_point(previous, step)
            if point is not None:
                self._prune(trainer, pl_module, float(self._schedule.target(point)))

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._prune_epochs_done(trainer, pl_module, pl_module.current_epoch + 1)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._leave_masked_what_others_keep(trainer)  # every callback's targets are found by now (on_fit_start)
        # here, not in on_fit_start: the fit's length needs its training data, which set up before Lightning restores
        # the loops would be a resumed fit's without its restored state (built as for epoch 0, from its start)
        message = None if self._schedule is None else fit_too_short_message(self._schedule, trainer, self._WHAT)
        self._warned_fit_too_short = message is not None
        if message:
            rank_zero_warn(message)
        # a fit resumed from a checkpoint saved at an epoch's last batch skips that epoch's end (Lightning's loop):
        # its round runs here, before training goes on, where the uninterrupted run made it
        if self._restored and trainer.current_epoch > 0:
            self._prune_epochs_done(trainer, pl_module, trainer.current_epoch)

    def _prune_epochs_done(self, trainer: "pl.Trainer", pl_module: LightningModule, finished: int) -> None:
        """The round of an epoch schedule's last point passed since the last look, `finished` epochs done: the
        point at 0 (a schedule from the start) too, at the end of the first epoch, as ModelPruning runs it."""
        if self._schedule is None or self._schedule.unit != "epoch" or finished <= self._last_epoch:
            return
        point = self._schedule.last_point(self._last_epoch, finished)
        self._last_epoch = finished
        if point is not None:
            self._prune(trainer, pl_module, float(self._schedule.target(point)))

    def setup(self, trainer: "pl.Trainer", pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and trainer is not None and self._make_pruning_permanent:
            # its averages, written over the weights after `on_train_end` made the masks permanent, would be dense
            _refuse_weight_averaging_after(self, trainer.callbacks)
        if stage == "fit":  # a fit starts the schedule over (a sweep's next model), unless a checkpoint restores it
            self._last_step, self._last_epoch, self._pruned_once, self._restored = -1, -1, False, False
            self._made_permanent = False
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # finds the targets of a module built in `configure_model`
        self._check_final_counts(pl_module)
        self._warned_fit_too_short = False  # (said in on_train_start, if so)

    def _check_final_counts(self, pl_module: LightningModule) -> None:
        """A fraction that prunes none of a layer's structures (0.2 of 2 heads rounds to 0; a layer keeps one, and
        a multiple of `keep_multiple_of`) pruned nothing without a word: refused when so in every layer, said when
        in some."""
        final = float(self._schedule.final_sparsity if self._schedule is not None else self.amount)
        if final <= 0:
            return
        modules = dict(pl_module.named_modules())
        sizes = {name: self._counts(modules[name])[1] for name in dict.fromkeys(self._layer_names(pl_module))}
        counts = {name or type(pl_module).__name__: self._layer_pruned_count(modules[name]) for name in sizes}
        none = {name or type(pl_module).__name__: size for name, size in sizes.items()
                if counts[name or type(pl_module).__name__](size, final) == 0}
        if not none:
            return
        message = none_pruned_message(f"{type(self).__name__}({self._ARGUMENT}={final:g}"
                                      f"{' at its end' if self._schedule else ''})", final, self._WHAT, none,
                                      counts, getattr(self, "keep_multiple_of", None))
        if len(none) == len(sizes):
            raise MisconfigurationException(message + " Nothing would be pruned.")
        rank_zero_warn(message + " Those keep all theirs.")

    def _pruned_count(self, size: int, fraction: float) -> int:
        """How many of a layer's `size` structures a round at `fraction` prunes."""
        raise NotImplementedError

    def _layer_pruned_count(self, layer: nn.Module) -> Callable[[int, float], int]:
        """:meth:`_pruned_count` for `layer` (whose structures' width may decide the multiple they keep)."""
        return self._pruned_count

    def on_train_end(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        if self._schedule is not None:
            progress = trainer.global_step if self._schedule.unit == "step" else pl_module.current_epoch
            limit = limit_reached(trainer)
            message = stopped_early_message(self._schedule, progress, self._WHAT, limit)
            # said when fitting started, unless something else than its limits stopped it (EarlyStopping)
            if message and (not self._warned_fit_too_short or limit is None):
                rank_zero_warn(message)
        if self._make_pruning_permanent:
            self._make_own_masks_permanent(trainer)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        # a fit resumed from a checkpoint of a finished one trains nothing, and Lightning skips `on_train_end`
        if self._make_pruning_permanent:
            self._make_own_masks_permanent(trainer)

    def _make_restored_masks_permanent(self, pl_module: LightningModule) -> None:
        self._make_own_masks_permanent(pl_module._trainer)

    def _make_own_masks_permanent(self, trainer: Optional["pl.Trainer"] = None) -> None:
        """Its own masks only: another pruning callback decides about its own (a tensor both prune holds one
        combined mask, which stays where the other keeps its masks)."""
        kept = {(id(m), n) for m, n in self._masks_others_keep(trainer)}
        with engine.parameter_order_preserved(engine.unique_modules(self._targets)):
            for module, name in self._targets:
                if engine.is_pruned(module, name) and (id(module), name) not in kept:
                    torch_prune.remove(module, name)
                    self._made_permanent = True

    def teardown(self, trainer: "pl.Trainer", pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)  # masks an evaluation's ckpt_path restored: made permanent
        self._remove_hooks()
        if _in_spawned_worker(trainer) and self._targets:
            # `ddp_spawn` hands rank 0's weights to the parent process as a state dict loaded with strict=False into
            # the parent's unpruned model, where `<name>_orig`/`<name>_mask` keys would be dropped silently: hand over
            # the effective weights instead. (The worker's model is discarded right after.)
            self._hook_handles = engine.register_state_hooks(self._targets, permanent_state_dict=True)

    def _prune(self, trainer: "pl.Trainer", pl_module: LightningModule, fraction: float) -> None:
        masked = self._prune_layers_(pl_module, fraction)
        # norms agree across ranks; masks made identical regardless (the fit's ranks only: not a process group
        # another fit left behind)
        broadcast_pruning_state_(self._targets, world_size=trainer.world_size)
        layers = list({id(module): module for module, _ in self._targets}.values())
        if self._log_sparsity and layers:
            counts = [self._counts(layer) for layer in layers]
            pruned = sum(done for done, _ in counts) / sum(total for _, total in counts)
            for logger in trainer.loggers:  # they write on rank zero only
                logger.log_metrics({self._LOG_KEY: pruned}, step=trainer.global_step)
        if self._verbose:
            modules = dict(pl_module.named_modules())
            rank_zero_info(f"`{type(self).__name__}`: {fraction:.1%} {self._WHAT} -> " + ", ".join(
                f"{name} {'/'.join(map(str, self._counts(modules[name])))}" for name in masked))

    # ------------------------------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return memoized_state_key(self, lambda: canonical_numbers(
            self._generate_state_key(**{self._ARGUMENT: _describe_amount(self.amount)}, exclude=list(self.exclude))))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("amount", "exclude"):  # what the state key is made of: made again (see `memoized_state_key`)
            self.__dict__.pop(_STATE_KEY_MEMO, None)
        super().__setattr__(name, value)

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """A lambda or local function in the schedule is keyed by where it is written: moved to another line of the
        script, the resumed callback's key differs from the checkpoint's in that place only. The state saved under
        such a key is restored when it is the only one and no other callback claims it; with several, none is, and
        that is said (as ModelPruning does). Lightning calls this before it hands callbacks their states."""
        restore_state_under_moved_key(self, trainer, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        """The masks (CPU booleans) and where the schedule is; a state loaded before the model's layers were found,
        as it was loaded."""
        if self._pending_state is not None:  # (not applied yet: the callback's own fields are still empty)
            return dict(self._pending_state)
        masks = masks_to_save(self._names, self._targets, made_permanent=self._made_permanent)
        return {"version": _STATE_VERSION, "masks": masks, "last_step": self._last_step,
                "last_epoch": self._last_epoch, "pruned_once": self._pruned_once}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; masks are re-created once the model is known (``setup``)."""
        if self._targets and self._deferred_stage is None:  # (put off: the targets are a previous model's)
            self._restore(state_dict)
        else:
            self._pending_state = state_dict

    def _restore(self, state: dict[str, Any]) -> None:
        self._pending_state = None
        self._note_restored_masks(state, self._make_pruning_permanent)
        index = dict(zip(self._names, self._targets))
        unknown = sorted(set(state.get("masks", {})) - set(index))
        if unknown:
            raise MisconfigurationException(f"The checkpoint's `{type(self).__name__}` state masks {unknown}, which "
                                            f"this callback does not target ({self._names}).")
        for name, mask in state.get("masks", {}).items():
            module, tensor = index[name]
            engine.set_mask_(module, tensor, mask)
        self._last_step = int(state.get("last_step", -1))
        self._last_epoch = int(state.get("last_epoch", -1))
        self._pruned_once = bool(state.get("pruned_once", False))
        self._restored = True


def _describe_amount(amount: Union[SparsitySchedule, float]) -> str:
    """The amount in the state key: its repr (as keys were before, so that older checkpoints still restore), with each
    function a schedule holds (`CallableSchedule(fn=...)`) described without its memory address, which changes from
    one process to the next."""
    if dataclasses.is_dataclass(amount) and not isinstance(amount, type) and " at 0x" in repr(amount):
        values = ((field.name, getattr(amount, field.name)) for field in dataclasses.fields(amount) if field.repr)
        return f"{type(amount).__qualname__}(" + ", ".join(
            f"{name}={_describe(value) if callable(value) else repr(value)}" for name, value in values) + ")"
    return _describe(amount)
