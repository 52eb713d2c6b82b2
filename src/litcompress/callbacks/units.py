"""`UnitPruning`: prune the hidden units of a LightningModule's LSTM/GRU/RNN layers while it trains, along a schedule.

A thin adapter over :func:`litcompress.pruning.recurrent.prune_units_`: at each round of its schedule, each
``nn.LSTM``/``nn.GRU``/``nn.RNN`` of the module loses the weakest of its hidden units (their rows in every gate,
layer and direction masked through ``torch.nn.utils.prune``), up to the schedule's fraction; training goes on with the
rest. ``litcompress.shrink`` (or ``CompressOnFitEnd``) then removes the pruned units. Use it beside
:class:`litcompress.ModelPruning`, which prunes channels or weights: Lightning's ``ln_structured`` on a recurrent
layer's weight matrices masks single gate rows, which no shrink can remove.
"""

from __future__ import annotations

from typing import Optional, Union

from lightning.pytorch.core.module import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from litcompress.callbacks.structures import StructurePruning
from litcompress.pruning.recurrent import (RECURRENT_LAYERS, prunable_recurrent_layers, prune_units_, units_to_prune,
                                           units_why_not, zero_units)
from litcompress.pruning.schedules import SparsitySchedule, check_channel_multiple


class UnitPruning(StructurePruning):
    """Prune each recurrent layer's weakest hidden units while training (see the module docstring).

    Args:
        units: a :class:`~litcompress.pruning.schedules.SparsitySchedule` giving the fraction of each recurrent
            layer's hidden units pruned as training goes (``unit="step"``: optimizer steps; ``"epoch"``: epochs
            finished), e.g. ``PolynomialDecay(final_sparsity=0.5, begin=0, end=600, frequency=50)``; or a fraction
            in (0, 1), pruned once, when the first optimizer step is done. At least one unit of each layer stays.
            Units are ranked by the L2 norm of their rows in every gate, layer and direction.
        exclude: names of recurrent layers (as in ``named_modules()``), or of modules holding them, that keep their
            units; a name of no module of the LightningModule is refused at setup.
        keep_multiple_of: prune fewer units where needed so that each layer keeps a multiple of this many (e.g. 8 or
            16), at least this many (a layer of no more keeps all its units): CPU kernels run faster on such widths,
            and ``shrink`` then removes every pruned unit.
        make_pruning_permanent: at the end of ``fit``, the masks become plain zeros, and meanwhile every state dict
            of the model (checkpoints included) holds the effective weights, which load into the unpruned
            architecture. False: checkpoints hold ``<name>_orig``/``<name>_mask`` and the masks are re-created on
            load. True refuses a ``StochasticWeightAveraging``/``EMAWeightAveraging`` listed after this callback
            (its averages would be written over the pruned weights): list it before.
        verbose: 1 logs each round's unit counts.
        log_sparsity: after each round, send the fraction of the units pruned (over all the layers pruned) to the
            trainer's loggers as ``pruning/units``, at the round's ``global_step``.

    The callback's state (the masks, the last step or epoch) is saved in checkpoints: a resumed run continues the
    schedule where it stopped. Under DDP the masks are broadcast from rank 0 after every round. Layers of one unit
    keep theirs; so do the cells (``nn.LSTMCell``, ...).
    """

    _ARGUMENT = "units"
    _WHAT = "of each recurrent layer's hidden units"
    _LOG_KEY = "pruning/units"

    def __init__(self, units: Union[SparsitySchedule, float], *, exclude: tuple[str, ...] = (),
                 keep_multiple_of: Optional[int] = None, make_pruning_permanent: bool = True, verbose: int = 0,
                 log_sparsity: bool = True) -> None:
        super().__init__(units, exclude=exclude, make_pruning_permanent=make_pruning_permanent, verbose=verbose,
                         log_sparsity=log_sparsity)
        try:  # (numpy's int64(8) taken)
            self.keep_multiple_of = check_channel_multiple(keep_multiple_of, "UnitPruning")
        except ValueError as error:
            raise MisconfigurationException(str(error)) from None

    @property
    def units(self) -> Union[SparsitySchedule, float]:
        """The fraction of each recurrent layer's units pruned, or its schedule (as given)."""
        return self.amount

    def _layer_names(self, pl_module: LightningModule) -> list[str]:
        layers = prunable_recurrent_layers(pl_module, self.exclude)
        if not layers:
            # recurrent layers that are there but cannot be pruned: say why (a subclass, a single unit)
            why = [f"{name}: {units_why_not(module)}" for name, module in pl_module.named_modules()
                   if isinstance(module, nn.RNNBase) and name not in self.exclude and units_why_not(module)]
            raise MisconfigurationException(
                f"UnitPruning: {type(pl_module).__name__} has no nn.LSTM, nn.GRU or nn.RNN whose hidden units can be "
                f"pruned{f' outside exclude={list(self.exclude)}' if self.exclude else ''} (layers of a single unit, "
                "and the cells, keep theirs)" + (f"; {'; '.join(why)}." if why else "."))
        return layers

    def _tensor_names(self, layer: nn.Module) -> list[str]:
        return [name for name in layer._flat_weights_names if getattr(layer, name, None) is not None]

    def _prune_layers_(self, pl_module: LightningModule, fraction: float) -> dict[str, int]:
        return prune_units_(pl_module, fraction, exclude=self.exclude, keep_multiple_of=self.keep_multiple_of)

    def _counts(self, layer: nn.Module) -> tuple[int, int]:
        assert isinstance(layer, RECURRENT_LAYERS)
        return int(zero_units(layer).sum()), layer.hidden_size

    def _pruned_count(self, size: int, fraction: float) -> int:
        return units_to_prune(size, fraction, self.keep_multiple_of)
