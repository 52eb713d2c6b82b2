"""Framework-free pruning: prune, make permanent, snapshot and rewind, save and load, over `torch.nn.utils.prune`."""

from litcompress.pruning.distributed import broadcast_pruning_state_
from litcompress.pruning.engine import (
    apply_mask_,
    default_targets,
    distinct_targets,
    effective_tensor,
    is_pruned,
    keep_bypassed_weights_current_,
    load_pruned_state_dict,
    make_permanent_,
    permanent_state_dict,
    prune_,
    prune_model_,
    prune_to_sparsity_,
    pruned_targets,
    restore_masks_,
    set_mask_,
    with_tied_targets,
)
from litcompress.pruning.gradual import GradualPruner
from litcompress.pruning.groups import ChannelGroup, prune_groups_, residual_groups
from litcompress.pruning.heads import HeadPrunedAttention, HeadShrink, prune_heads_, remove_zero_heads_
from litcompress.pruning.imp import iterative_magnitude_pruning
from litcompress.pruning.lottery import rewind_, take_snapshot
from litcompress.pruning.methods import PRUNING_METHODS, resolve_method
from litcompress.pruning.narrow import load_shrunk_state_dict, narrow_to_state_dict_
from litcompress.pruning.parametrizations import fold_parametrizations_
from litcompress.pruning.recurrent import prune_units_, zero_units
from litcompress.pruning.shrink import (LayerShrink, ShrinkReport, ShrinkResult, channel_plan, removable_channels,
                                        shrink, shrink_)
from litcompress.pruning.sparse import SparseLinear, SparsifyReport, SparsifyResult, dense_state_dict, sparsify

__all__ = [
    "ChannelGroup",
    "GradualPruner",
    "HeadPrunedAttention",
    "HeadShrink",
    "LayerShrink",
    "PRUNING_METHODS",
    "ShrinkReport",
    "ShrinkResult",
    "SparseLinear",
    "SparsifyReport",
    "SparsifyResult",
    "apply_mask_",
    "broadcast_pruning_state_",
    "channel_plan",
    "default_targets",
    "dense_state_dict",
    "distinct_targets",
    "effective_tensor",
    "fold_parametrizations_",
    "is_pruned",
    "iterative_magnitude_pruning",
    "keep_bypassed_weights_current_",
    "load_pruned_state_dict",
    "load_shrunk_state_dict",
    "make_permanent_",
    "narrow_to_state_dict_",
    "permanent_state_dict",
    "prune_",
    "prune_groups_",
    "prune_heads_",
    "prune_model_",
    "prune_to_sparsity_",
    "prune_units_",
    "pruned_targets",
    "remove_zero_heads_",
    "removable_channels",
    "residual_groups",
    "resolve_method",
    "restore_masks_",
    "rewind_",
    "set_mask_",
    "shrink",
    "shrink_",
    "sparsify",
    "take_snapshot",
    "with_tied_targets",
    "zero_units",
]
