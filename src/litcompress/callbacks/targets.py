"""When a pruning callback finds its targets: in ``setup``; for a LightningModule that builds its layers in
``configure_model`` (which the Trainer calls after every ``setup`` hook), once the stage starts; for one with lazy
layers (``nn.LazyLinear``, whose weights exist only after their first call), after the first forward pass."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.core.module import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
import torch
from torch import Tensor, nn

from litcompress.pruning import engine


def masks_to_save(names: list[str], targets: list[tuple[Any, str]], *, made_permanent: bool) -> dict[str, Tensor]:
    """A pruning callback's masks for its state, by qualified name (CPU booleans). With `made_permanent` (the fit
    made its masks permanent when it ended), a target without a mask gets its zeros as one: a checkpoint saved then
    holds them, or a fit resumed from it would train them back."""
    masks = {name: engine.mask_of(module, tensor).detach().to("cpu", torch.bool)
             for name, (module, tensor) in zip(names, targets) if engine.is_pruned(module, tensor)}
    if made_permanent:
        for name, (module, tensor) in zip(names, targets):
            if name not in masks and getattr(module, tensor) is not None:
                kept = (getattr(module, tensor) != 0).detach().to("cpu")
                if not bool(kept.all()):  # (a target no round pruned: no mask, as in the uninterrupted run)
                    masks[name] = kept
    return masks


class TargetsFoundOnceConfigured(Callback):
    """Base of the pruning callbacks: calls :meth:`_find_targets` in ``setup``, or at the start of the stage
    (``on_fit_start``, ``on_validation_start``, ...) when the module overrides ``configure_model`` or ``setup``
    (which Lightning calls after the callbacks' ``setup``: layers built or replaced there), or after the
    first forward pass (before the first backward) while it has lazy layers. Meanwhile a checkpoint whose state dict
    holds ``<name>_orig``/``<name>_mask`` pairs still loads into the module (the Trainer restores it between the
    two)."""

    _deferred_stage: Optional[str] = None
    _hook_handles: list[Any]
    _left_masked: set[tuple[int, str]]
    _fitting = False  # between the setup of a fit and the next stage's
    _masks_restored_outside_fit = False  # by an evaluation's ckpt_path: made permanent when it ends

    def _find_targets(self, pl_module: LightningModule, stage: str) -> None:
        raise NotImplementedError

    def _make_restored_masks_permanent(self, pl_module: LightningModule) -> None:
        raise NotImplementedError

    def _note_restored_masks(self, state: dict[str, Any], make_pruning_permanent: bool) -> None:
        """Called as a checkpoint's state puts masks back on the model: outside a fit (``validate``/``test``/
        ``predict`` with ``ckpt_path``), with ``make_pruning_permanent=True``, they are made permanent when the stage
        ends, so that the model leaves it as the fit left it, its state dict loading into the unpruned model."""
        self._masks_restored_outside_fit = make_pruning_permanent and not self._fitting and bool(state.get("masks"))

    def teardown(self, trainer: "pl.Trainer", pl_module: LightningModule, stage: str) -> None:
        if self._masks_restored_outside_fit:
            self._masks_restored_outside_fit = False
            self._make_restored_masks_permanent(pl_module)

    def setup(self, trainer: "pl.Trainer", pl_module: LightningModule, stage: str) -> None:
        self._fitting = stage == "fit"
        self._left_masked.clear()  # an earlier stage's (its modules' ids); this one's is taken as it goes on
        lazy = bool(engine.lazy_parameter_names(pl_module))
        # the module's own `setup` runs after the callbacks': it may build or replace layers, as `configure_model`
        if trainer is not None and (is_overridden("configure_model", pl_module)
                                    or is_overridden("setup", pl_module) or lazy):
            self._deferred_stage = stage
            self._remove_hooks()
            self._hook_handles = [pl_module.register_load_state_dict_pre_hook(engine.MaskedStateLoadHook()),
                                  pl_module.register_load_state_dict_post_hook(engine.RefreshAfterLoadHook())]
            return
        self._find_targets(pl_module, stage)

    def _find_targets_if_deferred(self, pl_module: LightningModule, *, forward_done: bool = False) -> bool:
        """Find the targets now if they were put off and the module's layers all exist, or, once a whole forward
        pass is done (`forward_done`), with those lazy layers it never called left out; whether they were found."""
        if self._deferred_stage is None or (engine.lazy_parameter_names(pl_module) and not forward_done):
            return False
        stage, self._deferred_stage = self._deferred_stage, None
        self._remove_hooks()
        # evaluation hooks run in inference mode: masks a checkpoint's state puts back must be ordinary tensors, or
        # making them permanent when the stage ends fails ("Inference tensors cannot be saved for backward")
        with torch.inference_mode(False):
            self._find_targets(pl_module, stage)
        return True

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def _masked_targets(self) -> list[tuple[nn.Module, str]]:
        """The tensors this callback prunes (none before its targets are found)."""
        raise NotImplementedError

    def _keeps_masks(self) -> bool:
        """Whether checkpoints hold this callback's masks (``make_pruning_permanent=False``)."""
        raise NotImplementedError

    def _masks_others_keep(self, trainer: Optional["pl.Trainer"]) -> list[tuple[nn.Module, str]]:
        """The tensors the other pruning callbacks of `trainer` keep masked (``make_pruning_permanent=False``):
        making this callback's masks permanent leaves theirs, even on a tensor both prune."""
        if trainer is None:
            return []
        return [(m, n) for callback in trainer.callbacks if callback is not self
                and isinstance(callback, TargetsFoundOnceConfigured) and callback._keeps_masks()
                for m, n in callback._masked_targets()]

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """A weight-averaging callback listed before this one (``EMAWeightAveraging``) wrote its averaged copy in
        the checkpoint's ``state_dict`` (the live state under ``current_model_state``): that copy was made before any
        mask and averages the dense values, so the file would load as an unpruned model. The masks go into it.
        (Tensors pruned outside the pruning callbacks keep their masked pairs: a model that prunes itself in
        ``__init__`` loads them back.)"""
        if "current_model_state" not in checkpoint or not isinstance(checkpoint.get("state_dict"), dict):
            return
        state = checkpoint["state_dict"]
        for path, module, name in engine.pruned_targets(pl_module):
            key = f"{path}.{name}" if path else name
            value, mask = state.get(key), engine.mask_of(module, name)
            if isinstance(value, Tensor) and value.shape == mask.shape:
                state[key] = value * mask.to(device=value.device, dtype=value.dtype)

    def _leave_masked_what_others_keep(self, trainer: Optional["pl.Trainer"]) -> None:
        """This stage's other pruners that keep masks: a tensor both prune stays masked in this callback's permanent
        checkpoints (another stage's or a failed fit's pruners count not). Taken again as the stage goes on: each
        callback finds a module's targets in its own hook when `setup`/`configure_model` or lazy layers put it off."""
        if self._keeps_masks():
            return
        self._left_masked.clear()
        self._left_masked.update((id(module), name) for module, name in self._masks_others_keep(trainer))

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._find_targets_if_deferred(pl_module)
        self._leave_masked_what_others_keep(trainer)
        if self._deferred_stage is None:  # (lazy layers: their targets come with the first forward)
            _refuse_averaging_that_pairs_masks(self, trainer, pl_module)

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._find_targets_if_deferred(pl_module)
        self._leave_masked_what_others_keep(trainer)

    def on_test_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._find_targets_if_deferred(pl_module)
        self._leave_masked_what_others_keep(trainer)

    def on_predict_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._find_targets_if_deferred(pl_module)

    # lazy layers exist after their first call: the first forward of a stage, before anything is trained
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: LightningModule, loss: Tensor) -> None:
        self._find_targets_if_deferred(pl_module, forward_done=True)  # a layer still lazy is one forward never calls

    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: LightningModule, *args: Any,
                                **kwargs: Any) -> None:
        self._find_targets_if_deferred(pl_module)

    def on_test_batch_end(self, trainer: "pl.Trainer", pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        self._find_targets_if_deferred(pl_module)

    def on_predict_batch_end(self, trainer: "pl.Trainer", pl_module: LightningModule, *args: Any,
                             **kwargs: Any) -> None:
        self._find_targets_if_deferred(pl_module)


def _refuse_averaging_that_pairs_masks(pruning: TargetsFoundOnceConfigured, trainer: "pl.Trainer",
                                       pl_module: LightningModule) -> None:
    """Lightning's ``WeightAveraging`` callbacks (``EMAWeightAveraging``) pair their averaged copy's parameters and
    buffers with the model's by position (torch's ``AveragedModel``); the copy is made at their ``setup``, and the
    masks a pruning round adds are buffers of the model. Refused before training, where that pairing goes wrong:
    with ``use_buffers=False`` (buffers copied one for one: it fails at the first step after a round adds a mask the
    copy lacks); with ``use_buffers=True``, a copy holding masks (a second fit of a masked model: they would be
    averaged into fractions and copied back) or a buffer after the first pruned layer (a BatchNorm's running mean,
    then paired with a mask: "The size of tensor a ..."). (``StochasticWeightAveraging`` averages parameters only,
    whose order pruning keeps.)"""
    from lightning.pytorch import callbacks as lightning_callbacks

    kind = getattr(lightning_callbacks, "WeightAveraging", None)
    averaging = [c for c in trainer.callbacks if kind is not None and isinstance(c, kind)]
    targets = pruning._masked_targets()
    if not averaging or not targets:
        return
    named = list(pl_module.named_modules())
    order = {id(module): i for i, (_, module) in enumerate(named)}
    first = min((order[id(module)] for module, _ in targets if id(module) in order), default=None)
    if first is None:
        return
    first_name = named[first][0] or "the model"
    all_masked = all(engine.is_pruned(module, name) for module, name in targets)
    owner = type(pruning).__name__
    for callback in averaging:
        use_buffers = getattr(callback, "_use_buffers", True)
        average = getattr(callback, "_average_model", None)
        copy = getattr(average, "module", average)  # the model as it was at the averaging callback's setup
        copy = copy if isinstance(copy, nn.Module) else pl_module
        copy_order = {name: i for i, (name, _) in enumerate(copy.named_modules())}
        copy_masks = {f"{path + '.' if path else ''}{name}_mask" for path, _, name in engine.pruned_targets(copy)}
        copy_buffers = [name for name, _ in copy.named_buffers()]
        if not use_buffers:
            if all_masked and copy_buffers == [name for name, _ in pl_module.named_buffers()]:
                continue  # every target masked in both already: the buffers stay paired one for one
            why = ("copies the model's buffers into its copy one for one, and the masks this fit adds are buffers "
                   "the copy lacks")
        elif copy_masks:
            why = (f"averages buffers too, and its copy holds the masks ({sorted(copy_masks)[0]}, ...): they would "
                   "be averaged into fractions and copied back over the model's")
        else:
            later = [f"{path + '.' if path else ''}{name}" for path, module in copy.named_modules()
                     if copy_order[path] > first for name, buffer in module._buffers.items() if buffer is not None]
            if not later:
                continue  # the masks come after every buffer of the copy: they are left out of the pairing
            why = (f"averages buffers too, and the mask of {first_name} comes before {', '.join(later[:3])}"
                   f"{' ...' if len(later) > 3 else ''}, which would be paired with masks")
        raise MisconfigurationException(
            f"{owner} beside {type(callback).__name__}(use_buffers={use_buffers}): the averaging callback pairs its "
            "averaged copy's parameters and buffers with the model's by position, its copy made at setup; it "
            f"{why}, so the fit would fail or come back wrong. StochasticWeightAveraging (parameters only) works "
            "beside it; or average the pruned model in a fit of its own, after this one.")
