"""`exclude` names a module and everything inside it, wherever structures are selected for pruning."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from litcompress.pipeline import PruneConfig, prune_targets
from litcompress.pruning.engine import is_excluded
from litcompress.pruning.heads import prunable_attentions
from litcompress.pruning.recurrent import prunable_recurrent_layers

_parts = st.sampled_from(["a", "b", "ab", "0", "1", "10"])
_names = st.lists(_parts, min_size=1, max_size=3).map(".".join)


@settings(max_examples=200, deadline=None)
@given(name=_names, excluded=_names)
def test_a_name_is_excluded_by_itself_and_its_parents_only(name, excluded):
    parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    assert is_excluded(name, [excluded]) == (excluded in parents)  # "a.1" does not take "a.10" nor "a.1x"


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True), "rnn": nn.LSTM(8, 8),
                           "ff": nn.Linear(8, 8)}) for _ in range(2))
        self.head = nn.Linear(8, 3)


def test_a_blocks_name_leaves_every_layer_inside_it():
    # exact names only, before: exclude=("blocks.0",) matched no layer, and every layer of the block was pruned
    model = _Blocks()
    assert prunable_attentions(model, ("blocks.0",)) == ["blocks.1.attn"]
    assert prunable_recurrent_layers(model, ("blocks.0",)) == ["blocks.1.rnn"]
    names = {id(m): n for n, m in model.named_modules()}

    def targets(**options) -> set[str]:
        config = PruneConfig(sparsity=0.5, layer_types=(nn.Linear,), removable_only=False, **options)
        return {names[id(module)] for module, _ in prune_targets(model, config)}

    for method in ("l1_unstructured", "ln_structured"):
        everything = targets(method=method, exclude=())
        assert {"blocks.0.ff", "blocks.0.attn.out_proj", "blocks.1.ff"} <= everything
        assert targets(method=method, exclude=("blocks.0", "head")) == {
            n for n in everything if not n.startswith("blocks.0.") and n != "head"}
        assert targets(method=method, exclude=("blocks.0.ff",)) == everything - {"blocks.0.ff"}  # a leaf: as before
