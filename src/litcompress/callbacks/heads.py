"""`HeadPruning`: prune the attention heads of a LightningModule while it trains, along a schedule.

A thin adapter over :func:`litcompress.pruning.heads.prune_heads_`: at each round of its schedule, each
``nn.MultiheadAttention`` of the module loses the weakest of its heads (query, key and value rows masked through
``torch.nn.utils.prune``), up to the schedule's fraction; training goes on with the rest. ``litcompress.shrink``
(or ``CompressOnFitEnd``) then removes the pruned heads. Use it beside :class:`litcompress.ModelPruning`, which
prunes channels or weights.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch.nn.utils.prune as torch_prune
from lightning.pytorch.core.module import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from litcompress.callbacks.schedule_checks import fit_too_short_message, stopped_early_message
from litcompress.callbacks.targets import TargetsFoundOnceConfigured
from litcompress.pruning import engine
from litcompress.pruning.distributed import broadcast_pruning_state_
from litcompress.pruning.heads import prunable_attentions, prune_heads_, zero_heads
from litcompress.pruning.schedules import SparsitySchedule

_STATE_VERSION = 1


class HeadPruning(TargetsFoundOnceConfigured):
    """Prune each ``nn.MultiheadAttention``'s weakest heads while training (see the module docstring).

    Args:
        heads: a :class:`~litcompress.pruning.schedules.SparsitySchedule` giving the fraction of each attention's
            heads pruned as training goes (``unit="step"``: optimizer steps; ``"epoch"``: epochs finished), e.g.
            ``PolynomialDecay(final_sparsity=0.5, begin=0, end=600, frequency=50)``; or a fraction in (0, 1),
            pruned once, when the first optimizer step is done. At least one head of each attention stays.
        exclude: names of attentions (as in ``named_modules()``) that keep their heads.
        make_pruning_permanent: at the end of ``fit``, the masks become plain zeros, and meanwhile every state dict
            of the model (checkpoints included) holds the effective weights, which load into the unpruned
            architecture. False: checkpoints hold ``<name>_orig``/``<name>_mask`` and the masks are re-created on
            load (``trainer.fit(ckpt_path=...)``, :func:`litcompress.load_pruned_state_dict`). A
            ``ModelPruning(make_pruning_permanent=True)`` in the same Trainer makes every mask of the module
            permanent at the end of ``fit``, these too.
        verbose: 1 logs each round's head counts.
        log_sparsity: after each round, send the fraction of the heads pruned (over all the attentions pruned) to
            the trainer's loggers as ``pruning/heads``, at the round's ``global_step``.

    The callback's state (the masks, the last step or epoch) is saved in checkpoints: a resumed run continues the
    schedule where it stopped. Under DDP the masks are broadcast from rank 0 after every round.
    """

    def __init__(self, heads: Union[SparsitySchedule, float], *, exclude: tuple[str, ...] = (),
                 make_pruning_permanent: bool = True, verbose: int = 0, log_sparsity: bool = True) -> None:
        if isinstance(heads, SparsitySchedule):
            if not 0.0 <= float(heads.final_sparsity) < 1.0:
                raise MisconfigurationException(f"HeadPruning(heads=...): the schedule's final fraction of heads "
                                                f"{heads.final_sparsity} is not in [0, 1).")
        elif isinstance(heads, bool) or not isinstance(heads, (int, float)) or not math.isfinite(heads) \
                or not 0.0 < heads < 1.0:
            raise MisconfigurationException(f"HeadPruning(heads={heads!r}): expected a fraction of each attention's "
                                            "heads in (0, 1), e.g. 0.5, or a SparsitySchedule of that fraction.")
        if isinstance(exclude, str) or not all(isinstance(name, str) for name in exclude):
            raise MisconfigurationException(f"HeadPruning(exclude={exclude!r}): expected a tuple of module names.")
        if not isinstance(make_pruning_permanent, bool):
            raise MisconfigurationException(f"HeadPruning(make_pruning_permanent={make_pruning_permanent!r}): "
                                            "expected True or False.")
        if verbose not in (0, 1):
            raise MisconfigurationException(f"HeadPruning(verbose={verbose!r}): expected 0 or 1.")
        if not isinstance(log_sparsity, bool):
            raise MisconfigurationException(f"HeadPruning(log_sparsity={log_sparsity!r}): expected True or False.")
        self._log_sparsity = log_sparsity
        self.heads, self.exclude = heads, tuple(exclude)
        self._make_pruning_permanent, self._verbose = make_pruning_permanent, verbose
        self._schedule = heads if isinstance(heads, SparsitySchedule) else None
        self._targets: list[tuple[nn.Module, str]] = []
        self._names: list[str] = []
        self._hook_handles: list[Any] = []
        self._last_step, self._last_epoch = -1, -1
        self._restored = False  # state loaded from a checkpoint (only then can a resumed fit have skipped a round)
        self._warned_fit_too_short = False
        self._pruned_once = False
        self._pending_state: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------------------------------ hooks
    def _find_targets(self, pl_module: LightningModule, stage: str) -> None:
        attentions = prunable_attentions(pl_module, self.exclude)
        if not attentions:
            raise MisconfigurationException(
                f"HeadPruning: {type(pl_module).__name__} has no nn.MultiheadAttention whose heads can be pruned"
                f"{f' outside exclude={list(self.exclude)}' if self.exclude else ''} (attentions with add_bias_kv, "
                "add_zero_attn or their own key/value widths keep theirs).")
        modules = dict(pl_module.named_modules())
        self._targets = [(modules[name], tensor) for name in attentions for tensor in ("in_proj_weight", "in_proj_bias")
                         if getattr(modules[name], tensor, None) is not None]
        self._names = engine.qualified_names(pl_module, self._targets)
        self._remove_hooks()
        self._hook_handles = engine.register_state_hooks(self._targets,
                                                         permanent_state_dict=self._make_pruning_permanent)
        engine.keep_bypassed_weights_current_(pl_module)  # Transformer layers' fast path reads the weights directly
        if self._pending_state is not None:
            self._restore(self._pending_state)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: several batches per optimizer step
            return
        previous, self._last_step = self._last_step, step
        if self._schedule is None:
            if not self._pruned_once:
                self._pruned_once = True
                self._prune(trainer, pl_module, float(self.heads))
        elif self._schedule.unit == "step" and step > previous:
            # manual optimization moves `global_step` by every optimizer's steps: points passed over get their round
            point = self._schedule.last_point(previous, step)
            if point is not None:
                self._prune(trainer, pl_module, float(self._schedule.target(point)))

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        finished = pl_module.current_epoch + 1
        if self._schedule is not None and self._schedule.unit == "epoch" and finished != self._last_epoch \
                and self._schedule.should_prune(finished):
            self._last_epoch = finished
            self._prune(trainer, pl_module, float(self._schedule.target(finished)))

    def on_train_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        # a fit resumed from a checkpoint saved at an epoch's last batch skips that epoch's end (Lightning's loop):
        # its round runs here, before training goes on, where the uninterrupted run made it
        finished = trainer.current_epoch
        if self._schedule is not None and self._schedule.unit == "epoch" and self._restored and finished > 0 \
                and finished != self._last_epoch and self._schedule.should_prune(finished):
            self._last_epoch = finished
            self._prune(trainer, pl_module, float(self._schedule.target(finished)))

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # finds the targets of a module built in `configure_model`
        message = None if self._schedule is None else fit_too_short_message(self._schedule, trainer,
                                                                              "of each attention's heads")
        self._warned_fit_too_short = message is not None
        if message:
            rank_zero_warn(message)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        if self._schedule is not None and not self._warned_fit_too_short:
            progress = trainer.global_step if self._schedule.unit == "step" else pl_module.current_epoch
            message = stopped_early_message(self._schedule, progress, "of each attention's heads")
            if message:
                rank_zero_warn(message)
        if self._make_pruning_permanent:  # its own masks only: another pruning callback decides about its own
            with engine.parameter_order_preserved(engine.unique_modules(self._targets)):
                for module, name in self._targets:
                    if engine.is_pruned(module, name):
                        torch_prune.remove(module, name)

    def teardown(self, trainer: "pl.Trainer", pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _prune(self, trainer: "pl.Trainer", pl_module: LightningModule, fraction: float) -> None:
        masked = prune_heads_(pl_module, fraction, exclude=self.exclude)
        broadcast_pruning_state_(self._targets)  # head norms agree across ranks; masks made identical regardless
        attentions = list({id(module): module for module, _ in self._targets}.values())
        if self._log_sparsity and attentions:
            pruned = sum(int(zero_heads(a).sum()) for a in attentions) / sum(a.num_heads for a in attentions)
            for logger in trainer.loggers:  # they write on rank zero only
                logger.log_metrics({"pruning/heads": pruned}, step=trainer.global_step)
        if self._verbose:
            modules = dict(pl_module.named_modules())
            rank_zero_info(f"`HeadPruning`: {fraction:.1%} of the heads -> " + ", ".join(
                f"{name} {int(zero_heads(modules[name]).sum())}/{modules[name].num_heads}" for name in masked))

    # ------------------------------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(heads=repr(self.heads), exclude=list(self.exclude))

    def state_dict(self) -> dict[str, Any]:
        """The masks (CPU booleans) and where the schedule is."""
        masks = {name: engine.mask_of(module, tensor).detach().to("cpu").bool()
                 for name, (module, tensor) in zip(self._names, self._targets) if engine.is_pruned(module, tensor)}
        return {"version": _STATE_VERSION, "masks": masks, "last_step": self._last_step,
                "last_epoch": self._last_epoch, "pruned_once": self._pruned_once}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; masks are re-created once the model is known (``setup``)."""
        if self._targets:
            self._restore(state_dict)
        else:
            self._pending_state = state_dict

    def _restore(self, state: dict[str, Any]) -> None:
        self._pending_state = None
        index = dict(zip(self._names, self._targets))
        unknown = sorted(set(state.get("masks", {})) - set(index))
        if unknown:
            raise MisconfigurationException(f"The checkpoint's `HeadPruning` state masks {unknown}, which this "
                                            f"callback does not target ({self._names}).")
        for name, mask in state.get("masks", {}).items():
            module, tensor = index[name]
            engine.set_mask_(module, tensor, mask)
        self._last_step = int(state.get("last_step", -1))
        self._last_epoch = int(state.get("last_epoch", -1))
        self._pruned_once = bool(state.get("pruned_once", False))
        self._restored = True
