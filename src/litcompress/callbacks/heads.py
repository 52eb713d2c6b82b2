"""`HeadPruning`: prune the attention heads of a LightningModule while it trains, along a schedule.

A thin adapter over :func:`litcompress.pruning.heads.prune_heads_`: at each round of its schedule, each
``nn.MultiheadAttention`` of the module loses the weakest of its heads (query, key and value rows masked through
``torch.nn.utils.prune``), up to the schedule's fraction; training goes on with the rest. ``litcompress.shrink``
(or ``CompressOnFitEnd``) then removes the pruned heads. Use it beside :class:`litcompress.ModelPruning`, which
prunes channels or weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, Union

from lightning.pytorch.core.module import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from litcompress.callbacks.structures import StructurePruning
from litcompress.pruning import engine
from litcompress.pruning.heads import heads_multiple, heads_to_prune, prunable_attentions, prune_heads_, zero_heads
from litcompress.pruning.schedules import SparsitySchedule, check_channel_multiple


class HeadPruning(StructurePruning):
    """Prune each ``nn.MultiheadAttention``'s weakest heads while training (see the module docstring).

    Args:
        heads: a :class:`~litcompress.pruning.schedules.SparsitySchedule` giving the fraction of each attention's
            heads pruned as training goes (``unit="step"``: optimizer steps; ``"epoch"``: epochs finished), e.g.
            ``PolynomialDecay(final_sparsity=0.5, begin=0, end=600, frequency=50)``; or a fraction in (0, 1),
            pruned once, when the first optimizer step is done. At least one head of each attention stays.
        exclude: names of attentions (as in ``named_modules()``), or of modules holding them, that keep their heads;
            a name of no module of the LightningModule is refused at setup.
        keep_multiple_of: prune fewer heads where needed so that each attention's projections keep a multiple of
            this many channels (e.g. 16: an even count of heads of 8), as ``shrink(..., keep_multiple_of=16)`` keeps
            them; an attention that cannot (no count of its heads makes the multiple) keeps all its heads.
        make_pruning_permanent: at the end of ``fit``, the masks become plain zeros, and meanwhile every state dict
            of the model (checkpoints included) holds the effective weights, which load into the unpruned
            architecture. False: checkpoints hold ``<name>_orig``/``<name>_mask`` and the masks are re-created on
            load (``trainer.fit(ckpt_path=...)``, :func:`litcompress.load_pruned_state_dict`); so another pruning
            callback's ``make_pruning_permanent=True`` leaves these masks, in its checkpoints and at fit end, on a
            tensor both prune too. True refuses a ``StochasticWeightAveraging`` /
            ``EMAWeightAveraging`` listed after this callback (its averages would be written over the pruned
            weights): list it before.
        verbose: 1 logs each round's head counts.
        log_sparsity: after each round, send the fraction of the heads pruned (over all the attentions pruned) to
            the trainer's loggers as ``pruning/heads``, at the round's ``global_step``.

    The callback's state (the masks, the last step or epoch) is saved in checkpoints: a resumed run continues the
    schedule where it stopped. Under DDP the masks are broadcast from rank 0 after every round.
    """

    _ARGUMENT = "heads"
    _WHAT = "of each attention's heads"
    _LOG_KEY = "pruning/heads"

    def __init__(self, heads: Union[SparsitySchedule, float], *, exclude: tuple[str, ...] = (),
                 keep_multiple_of: Optional[int] = None, make_pruning_permanent: bool = True, verbose: int = 0,
                 log_sparsity: bool = True) -> None:
        super().__init__(heads, exclude=exclude, make_pruning_permanent=make_pruning_permanent, verbose=verbose,
                         log_sparsity=log_sparsity)
        try:
            self.keep_multiple_of = check_channel_multiple(keep_multiple_of, "HeadPruning")
        except ValueError as error:
            raise MisconfigurationException(str(error)) from None

    @property
    def heads(self) -> Union[SparsitySchedule, float]:
        """The fraction of each attention's heads pruned, or its schedule (as given)."""
        return self.amount

    def _layer_names(self, pl_module: LightningModule) -> list[str]:
        attentions = prunable_attentions(pl_module, self.exclude)
        if not attentions:
            raise MisconfigurationException(
                f"HeadPruning: {type(pl_module).__name__} has no nn.MultiheadAttention whose heads can be pruned"
                f"{f' outside exclude={list(self.exclude)}' if self.exclude else ''} (attentions with add_bias_kv, "
                "add_zero_attn or their own key/value widths keep theirs).")
        return attentions

    def _tensor_names(self, layer: nn.Module) -> list[str]:
        return [name for name in ("in_proj_weight", "in_proj_bias") if getattr(layer, name, None) is not None]

    def _find_targets(self, pl_module: LightningModule, stage: str) -> None:
        super()._find_targets(pl_module, stage)
        engine.keep_bypassed_weights_current_(pl_module)  # Transformer layers' fast path reads the weights directly

    def _prune_layers_(self, pl_module: LightningModule, fraction: float) -> dict[str, int]:
        return prune_heads_(pl_module, fraction, exclude=self.exclude, keep_multiple_of=self.keep_multiple_of)

    def _counts(self, layer: nn.Module) -> tuple[int, int]:
        return int(zero_heads(layer).sum()), layer.num_heads

    def _pruned_count(self, size: int, fraction: float) -> int:
        return heads_to_prune(size, fraction)

    def _layer_pruned_count(self, layer: nn.Module) -> Callable[[int, float], int]:
        step = heads_multiple(self.keep_multiple_of, layer.head_dim)
        return lambda size, fraction: heads_to_prune(size, fraction, step)
