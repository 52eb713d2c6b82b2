"""Tied weights (one Parameter held by several modules, as a language model's output layer holds its input
embedding's matrix): pruned once, masked alike under every holder, counted once, never untied."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from litcompress.pruning import (
    GradualPruner,
    default_targets,
    distinct_targets,
    effective_tensor,
    is_pruned,
    load_pruned_state_dict,
    make_permanent_,
    permanent_state_dict,
    prune_,
    prune_model_,
    prune_to_sparsity_,
    shrink_,
    with_tied_targets,
)
from litcompress.pruning.engine import mask_of, pruned_count
from litcompress.pruning.schedules import PolynomialDecay
from litcompress.pruning.shrink import channel_plan
from litcompress.report import sparsity_report

SETTINGS = settings(max_examples=25, deadline=None)
VOCAB, WIDTH, LENGTH = 30, 12, 6


class TiedLM(nn.Module):
    """Embedding -> feed-forward -> output layer tied to the embedding (GPT-2's wte / lm_head)."""

    def __init__(self, seed: int = 0, hidden: int = 24) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.ff = nn.Sequential(nn.Linear(WIDTH, hidden), nn.ReLU(), nn.Linear(hidden, WIDTH))
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ff(self.embedding(ids).mean(1)))


def ids(seed: int = 0, batch: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, LENGTH), generator=torch.Generator().manual_seed(seed))


def unique_weights(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name.endswith("weight")
               or name.endswith("weight_orig"))


def zeros_of_unique_weights(model: nn.Module) -> int:
    seen, zeros = set(), 0
    for module in model.modules():
        for name in ("weight",):
            if isinstance(getattr(module, name, None), torch.Tensor):
                tensor = effective_tensor(module, name)
                key = id(module.weight_orig if is_pruned(module, name) else module.weight)
                if key not in seen:
                    seen.add(key)
                    zeros += int((tensor == 0).sum())
    return zeros


def test_the_defaults_name_both_holders_but_the_tensor_is_one():
    model = TiedLM()
    targets = default_targets(model)
    assert [m for m, _ in targets].count(model.head) == 1 and [m for m, _ in targets].count(model.embedding) == 1
    assert len(distinct_targets(targets)) == len(targets) - 1


@SETTINGS
@given(sparsity=st.floats(0.0, 1.0), seed=st.integers(0, 50))
def test_global_pruning_counts_a_tied_tensor_once_and_masks_it_alike(sparsity, seed):
    model = TiedLM(seed)
    targets = default_targets(model)
    prune_to_sparsity_(targets, "l1_unstructured", sparsity)
    assert zeros_of_unique_weights(model) == round(sparsity * unique_weights(model))  # exact, on distinct tensors
    assert mask_of(model.head, "weight") is mask_of(model.embedding, "weight")
    assert torch.equal(effective_tensor(model.head, "weight"), effective_tensor(model.embedding, "weight"))
    report = sparsity_report(model, targets)
    assert report.numel == unique_weights(model) and report.zeros == zeros_of_unique_weights(model)
    make_permanent_(model)
    assert model.head.weight is model.embedding.weight  # still tied


@SETTINGS
@given(amounts=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3), seed=st.integers(0, 50),
       scope=st.sampled_from(["local", "global"]))
def test_rounds_of_prune_keep_the_holders_masks_one(amounts, seed, scope):
    model = TiedLM(seed)
    targets = default_targets(model)
    remaining = unique_weights(model)
    for amount in amounts:
        before = pruned_count(model.head, "weight")
        prune_(targets, "l1_unstructured", amount, scope=scope)
        assert mask_of(model.head, "weight") is mask_of(model.embedding, "weight")
        if scope == "local":  # the tied tensor pruned once by `amount` of what it kept, not twice
            kept = VOCAB * WIDTH - before
            assert pruned_count(model.head, "weight") - before == round(amount * kept)
        remaining = unique_weights(model) - zeros_of_unique_weights(model)
    x = ids(seed)
    assert torch.equal(model.head.weight, model.embedding.weight)  # after a forward both recompute alike
    model(x)
    assert torch.equal(model.head.weight, model.embedding.weight)
    assert remaining == sum(int(torch.count_nonzero(mask_of(m, n))) for m, n in distinct_targets(targets))


def test_a_target_naming_one_holder_gets_the_others_from_the_model():
    model = TiedLM()
    targets = with_tied_targets(model, [(model.head, "weight"), (model.ff[0], "weight")])
    assert targets[:2] == [(model.head, "weight"), (model.ff[0], "weight")]
    assert targets[2:] == [(model.embedding, "weight")]  # found, appended once
    assert with_tied_targets(model, targets) == targets
    prune_(targets, "l1_unstructured", 0.5)
    # the embedding computes with the mask: training sees what the permanent model keeps
    emb = model.embedding(torch.arange(VOCAB))
    assert torch.equal(emb, effective_tensor(model.head, "weight"))
    assert (emb == 0).any()


def test_a_gradual_pruner_over_tied_targets_reaches_its_target_on_distinct_tensors():
    model = TiedLM()
    targets = with_tied_targets(model, [(model.head, "weight"), (model.ff[2], "weight")])
    pruner = GradualPruner(targets, PolynomialDecay(final_sparsity=0.8, begin=0, end=10, frequency=2))
    for step in range(1, 11):
        pruner.step(step)
    distinct = distinct_targets(targets)
    assert pruner.pruned() == round(0.8 * sum(m.weight_orig.numel() for m, _ in distinct))
    assert mask_of(model.head, "weight") is mask_of(model.embedding, "weight")


def test_shrink_keeps_a_consumer_whose_weight_is_tied_and_says_why():
    model = TiedLM().eval()
    with torch.no_grad():  # zero channels in both hidden layers: the first can go, the second feeds the tied head
        model.ff[0].weight[:5] = 0
        model.ff[0].bias[:5] = 0
        model.ff[2].weight[:4] = 0
        model.ff[2].bias[:4] = 0
    x = ids()
    expected = model(x)
    report = shrink_(model, (x,))
    assert model.head.weight is model.embedding.weight and model.head.weight.shape == (VOCAB, WIDTH)
    assert [layer.name for layer in report.layers] == ["ff.0"] and model.ff[0].out_features == 24 - 5
    reason = dict(report.kept)["ff.2"]
    assert "tied to embedding.weight" in reason
    assert torch.allclose(model(x), expected, atol=1e-6)
    assert "tied to embedding.weight" in (channel_plan(TiedLM()).reasons["ff.2"] or "")


def test_untied_twin_still_shrinks_through_the_head():
    """The control: the same model without the tie removes the second layer's channels (the head is a consumer)."""
    model = TiedLM().eval()
    model.head.weight = nn.Parameter(model.embedding.weight.detach().clone())
    with torch.no_grad():
        model.ff[2].weight[:4] = 0
        model.ff[2].bias[:4] = 0
    report = shrink_(model, (ids(),))
    assert "ff.2" in [layer.name for layer in report.layers] and model.head.in_features == WIDTH - 4


def test_an_fp32_onnx_file_stores_a_tied_matrix_once():
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from litcompress.quantization.backends.onnxruntime import OnnxRuntimeModule, export_onnx

    model = TiedLM().eval()
    x = ids()
    data = export_onnx(model, (x,))
    initializers = [tuple(i.dims) for i in onnx.load_from_string(data).graph.initializer]
    assert initializers.count((VOCAB, WIDTH)) + initializers.count((WIDTH, VOCAB)) == 1
    assert torch.allclose(OnnxRuntimeModule(data)(x), model(x), atol=1e-5)


def test_computed_weights_are_never_taken_for_one_tensor():
    """A parametrized weight is computed afresh at every access: two of them must not pass for one tensor because a
    freed temporary's id came back."""
    layers = [torch.nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)) for _ in range(3)]
    targets = [(layer, "weight") for layer in layers]
    assert distinct_targets(targets) == targets
    assert len(sparsity_report(nn.Sequential(*layers), targets).tensors) == 3


class ReusedLayer(nn.Module):
    """One Linear registered under two names (``self.last = self.first``): state_dict writes it at both."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.first = nn.Linear(WIDTH, WIDTH)
        self.middle = nn.Linear(WIDTH, WIDTH)
        self.last = self.first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.middle(self.first(x))))


def test_permanent_state_dict_converts_a_layer_under_every_name():
    model = ReusedLayer(0)
    prune_(default_targets(model), "l1_unstructured", 0.5)
    state = permanent_state_dict(model)
    assert not [key for key in state if key.endswith(("_orig", "_mask"))]
    fresh = ReusedLayer(1)
    fresh.load_state_dict(state)  # strict
    x = torch.randn(3, WIDTH)
    assert torch.equal(fresh(x), model(x))


def test_tied_weights_stay_one_tensor_in_the_permanent_state_and_one_mask_after_a_reload():
    """permanent_state_dict multiplied orig * mask per key: a file saved from it held the tied matrix twice (and
    model_size_bytes counted it twice); load_pruned_state_dict gave each holder its own mask, so a later round
    naming the embedding no longer reached the head (in one measurement 300 zeros against 200)."""
    from litcompress.report.size import model_size_bytes

    model = TiedLM()
    dense_bytes = model_size_bytes(model)
    prune_model_(model, amount=0.5)
    plain = permanent_state_dict(model)
    assert plain["embedding.weight"] is plain["head.weight"]
    assert model_size_bytes(model) <= dense_bytes
    reloaded = load_pruned_state_dict(TiedLM(), model.state_dict())
    assert reloaded.embedding.weight_mask is reloaded.head.weight_mask
    prune_([(reloaded.embedding, "weight")], "l1_unstructured", 0.5)
    reloaded(ids())
    zeros = int((reloaded.embedding.weight == 0).sum())
    assert torch.equal(reloaded.head.weight, reloaded.embedding.weight)
    assert int((reloaded.head.weight == 0).sum()) == zeros
    # holders torch's own pruning masked apart keep their own masks (sharing the first's changed the outputs)
    apart = TiedLM()
    torch_prune.random_unstructured(apart.embedding, "weight", 0.5)
    torch_prune.l1_unstructured(apart.head, "weight", 0.2)
    loaded = load_pruned_state_dict(TiedLM(), apart.state_dict())
    for holder in ("embedding", "head"):
        assert torch.equal(getattr(loaded, holder).weight_mask, getattr(apart, holder).weight_mask), holder
    torch.testing.assert_close(loaded(ids()), apart(ids()))
    # three holders, two masked alike (the engine's) and one apart: the two still share one mask after a load
    three = TiedLM()
    three.extra = nn.Linear(WIDTH, VOCAB, bias=False)
    three.extra.weight = three.embedding.weight
    prune_(with_tied_targets(three, [(three.embedding, "weight")])[:2], "l1_unstructured", 0.5)
    torch_prune.random_unstructured(three.extra, "weight", 0.3)
    fresh = TiedLM()
    fresh.extra = nn.Linear(WIDTH, VOCAB, bias=False)
    fresh.extra.weight = fresh.embedding.weight
    loaded = load_pruned_state_dict(fresh, three.state_dict())
    shared = [getattr(loaded, holder).weight_mask for holder in ("embedding", "head", "extra")]
    assert shared[0] is shared[1] and shared[2] is not shared[0]
    assert torch.equal(shared[2], three.extra.weight_mask)


@SETTINGS
@given(first=st.floats(0.05, 0.9), then=st.floats(0.05, 0.9), to_sparsity=st.booleans(), method=st.sampled_from(
    ["l1_unstructured", "random_unstructured"]), scope=st.sampled_from(["global", "local"]), both=st.booleans())
def test_a_round_over_both_holders_goes_on_from_the_mask_one_of_them_got_alone(first, then, to_sparsity, method,
                                                                               scope, both):
    """torch's pruning of the embedding alone left the output layer (listed first by the next round) unmasked: the
    round ranked as if nothing was pruned, then gave the embedding the output layer's new mask (pruned entries came
    back; a prune_ round by a fraction of the remaining ended below the sparsity it had). With both holders pruned
    apart (two masks), the first one's replaced the other's."""
    torch.manual_seed(0)
    embedding, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    torch_prune.l1_unstructured(embedding, "weight", amount=first)
    before = mask_of(embedding, "weight").clone()
    if both:
        torch_prune.random_unstructured(head, "weight", amount=0.3)
        before = before * mask_of(head, "weight")
    pruned_before = int((before == 0).sum())
    targets = [(head, "weight"), (embedding, "weight")]
    if to_sparsity:
        total = max(pruned_before, round(then * 40))
        prune_to_sparsity_(targets, method, then, scope=scope)
    else:
        total = pruned_before + round(then * (40 - pruned_before))
        prune_(targets, method, then, scope=scope)
    after = mask_of(embedding, "weight")
    assert after is mask_of(head, "weight")  # one mask under both holders
    assert int((after == 0).sum()) == total
    assert not bool(((before == 0) & (after != 0)).any())  # nothing pruned before came back


@pytest.mark.parametrize("use_global_unstructured", [True, False])
def test_model_pruning_logs_the_zeros_a_tied_tensor_had_before_the_round(caplog, use_global_unstructured):
    """The output layer (listed first) was unmasked before the round, the embedding after it: the line read
    'Pruned: 0/40 (0.00%)' for the 12 zeros torch's pruning of the embedding had left."""
    import logging

    from litcompress import ModelPruning

    torch.manual_seed(0)
    embedding, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    torch_prune.l1_unstructured(embedding, "weight", amount=0.3)
    callback = ModelPruning("l1_unstructured", parameters_to_prune=[(head, "weight"), (embedding, "weight")],
                            use_global_unstructured=use_global_unstructured, amount=0.5, verbose=1)
    callback._parameters_to_prune = [(head, "weight"), (embedding, "weight")]  # as setup finds them
    with caplog.at_level(logging.INFO):
        callback.apply_pruning(0.5)
    assert "Pruned: 12/40 (30.00%) -> 26/40 (65.00%)" in caplog.text


def test_a_refused_round_leaves_the_masks_of_holders_pruned_apart_as_they_were():
    """Their masks were merged before the round's checks: a refused call ('nothing was pruned') left them merged."""
    torch.manual_seed(0)
    embedding, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    torch_prune.l1_unstructured(embedding, "weight", amount=0.3)
    torch_prune.random_unstructured(head, "weight", amount=0.3)
    masks = {"embedding": embedding.weight_mask.clone(), "head": head.weight_mask.clone()}
    x = torch.randn(3, 4)
    out = head(x)
    targets = [(head, "weight"), (embedding, "weight")]
    for call in (lambda: prune_(targets, "l1_unstructured", 0.5, scope="bogus"),
                 lambda: prune_(targets, "l1_unstructured", 1000, scope="global")):
        with pytest.raises(ValueError):
            call()
        assert torch.equal(embedding.weight_mask, masks["embedding"]) and torch.equal(head.weight_mask, masks["head"])
        assert torch.equal(head(x), out)
    with torch.no_grad():  # a NaN in an entry both keep: refused inside the round, after the merge
        kept = ((masks["embedding"] * masks["head"]) != 0).nonzero()[0]
        embedding.weight_orig[kept[0], kept[1]] = float("nan")
    for scope in ("local", "global"):
        with pytest.raises(ValueError, match="holds NaN"):
            prune_to_sparsity_(targets, "l1_unstructured", 0.6, scope=scope)
        assert torch.equal(embedding.weight_mask, masks["embedding"]) and torch.equal(head.weight_mask, masks["head"])


@pytest.mark.parametrize("masked", ["head only, by prune_", "each holder apart, by torch"])
def test_making_permanent_a_mask_a_tied_holder_computes_otherwise_is_refused_and_changes_nothing(masked):
    """make_permanent_ writes orig * mask into the one tensor both holders share: with the embedding unmasked (prune_
    given the head alone) or masked apart (torch's pruning of each holder), the outputs changed, silently, through
    make_permanent_, load_pruned_state_dict(keep_masks=False) and shrink (which refused the unmasked holder only)."""
    model = TiedLM().eval()
    if masked.startswith("head only"):
        prune_([(model.head, "weight")], "l1_unstructured", 0.5)
        how = "unmasked"
    else:
        torch_prune.l1_unstructured(model.embedding, "weight", amount=0.5)
        torch_prune.random_unstructured(model.head, "weight", amount=0.3)
        how = "under another mask"
    with torch.no_grad():
        expected = model(ids())
    state = {name: value.clone() for name, value in model.state_dict().items()}
    for call in (lambda: make_permanent_(model), lambda: shrink_(model, (ids(),))):
        with pytest.raises(ValueError, match=rf"the same tensor is (head|embedding)\.weight, which computes with it "
                                             rf"{how} \(tied weights\)"):
            call()
        assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
        with torch.no_grad():
            assert torch.equal(model(ids()), expected)
    fresh = TiedLM(seed=1)
    with pytest.raises(ValueError, match=r"load_pruned_state_dict\(keep_masks=False\): .* Load with keep_masks=True"):
        load_pruned_state_dict(fresh, state, keep_masks=False)
    with torch.no_grad():
        assert torch.equal(load_pruned_state_dict(TiedLM(seed=1), state).eval()(ids()), expected)
    # the same mask under both holders (what the engine and ModelPruning leave): made permanent, outputs kept
    alike = TiedLM().eval()
    prune_(with_tied_targets(alike, [(alike.head, "weight")]), "l1_unstructured", 0.5)
    with torch.no_grad():
        expected = alike(ids())
    make_permanent_(alike)
    with torch.no_grad():
        assert torch.equal(alike(ids()), expected) and alike.head.weight is alike.embedding.weight


def test_a_mask_of_entries_already_zero_under_one_holder_changes_nothing_and_is_made_permanent():
    """The zeros of permanent pruning masked again under one holder (as the weights-only resume advises): making that
    mask permanent changes no value, and was refused all the same, in quantize's words "make_permanent_"."""
    from litcompress.quantization import PTQConfig, quantize
    from litcompress.pruning import set_mask_

    model = TiedLM().eval()
    prune_(with_tied_targets(model, [(model.head, "weight")]), "l1_unstructured", 0.5)
    make_permanent_(model)
    set_mask_(model.embedding, "weight", model.embedding.weight != 0)
    with torch.no_grad():
        expected = model(ids())
    result = quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1),
                      eval_fn=lambda m: 1.0, example_inputs=(ids(),))
    assert result.recipe is not None and is_pruned(model.embedding, "weight")  # quantize worked on its copy
    make_permanent_(model)
    with torch.no_grad():
        assert torch.equal(model(ids()), expected) and model.head.weight is model.embedding.weight
    # a mask that zeroes values the other holder reads: refused in the words of the function called
    torch_prune.l1_unstructured(model.head, "weight", amount=0.8)
    with pytest.raises(ValueError, match=r"^quantize: head.weight is pruned .* computes with it unmasked"):
        quantize(model, PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1), eval_fn=lambda m: 1.0,
                 example_inputs=(ids(),))
