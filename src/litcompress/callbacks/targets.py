"""When a pruning callback finds its targets: in ``setup``, or, for a LightningModule that builds its layers in
``configure_model`` (which the Trainer calls after every ``setup`` hook), once the stage starts."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.core.module import LightningModule
from lightning.pytorch.utilities.model_helpers import is_overridden

from litcompress.pruning import engine


class TargetsFoundOnceConfigured(Callback):
    """Base of the pruning callbacks: calls :meth:`_find_targets` in ``setup``, or at the start of the stage
    (``on_fit_start``, ``on_validation_start``, ...) when the module overrides ``configure_model``. Meanwhile a
    checkpoint whose state dict holds ``<name>_orig``/``<name>_mask`` pairs still loads into the module (the Trainer
    restores it between the two)."""

    _deferred_stage: Optional[str] = None
    _hook_handles: list[Any]

    def _find_targets(self, pl_module: LightningModule, stage: str) -> None:
        raise NotImplementedError

    def setup(self, trainer: "pl.Trainer", pl_module: LightningModule, stage: str) -> None:
        if trainer is not None and is_overridden("configure_model", pl_module):
            self._deferred_stage = stage
            self._remove_hooks()
            self._hook_handles = [pl_module.register_load_state_dict_pre_hook(engine.MaskedStateLoadHook())]
            return
        self._find_targets(pl_module, stage)

    def _find_targets_if_deferred(self, pl_module: LightningModule) -> None:
        if self._deferred_stage is not None:
            stage, self._deferred_stage = self._deferred_stage, None
            self._remove_hooks()
            self._find_targets(pl_module, stage)

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._find_targets_if_deferred(pl_module)

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._find_targets_if_deferred(pl_module)

    def on_test_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._find_targets_if_deferred(pl_module)

    def on_predict_start(self, trainer: "pl.Trainer", pl_module: LightningModule) -> None:
        self._find_targets_if_deferred(pl_module)
