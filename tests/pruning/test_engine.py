"""Invariants of the framework-free pruning engine, mostly as property tests."""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import pickle
import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from litcompress.models import MLPClassifier
from litcompress.pruning import (
    GradualPruner,
    apply_mask_,
    default_targets,
    is_pruned,
    load_pruned_state_dict,
    make_permanent_,
    permanent_state_dict,
    prune_,
    prune_model_,
    prune_to_sparsity_,
    rewind_,
    set_mask_,
    shrink,
    take_snapshot,
)
from litcompress.pruning.engine import (PermanentStateDictHook, deepcopy_model, keep_bypassed_weights_current_,
                                        register_state_hooks, remaining_count)
from litcompress.pruning.schedules import ConstantSparsity
from litcompress.report import sparsity_report

SETTINGS = settings(max_examples=25, deadline=None)


def mlp(widths: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


widths = st.lists(st.integers(1, 24), min_size=2, max_size=4)
fractions = st.floats(0.0, 1.0, allow_nan=False)


@SETTINGS
@given(widths=widths, amounts=st.lists(fractions, min_size=1, max_size=4), seed=st.integers(0, 99),
       method=st.sampled_from(["l1_unstructured", "random_unstructured"]))
def test_global_rounds_prune_exact_counts_of_what_remains(widths, amounts, seed, method):
    model = mlp(widths, seed)
    targets = default_targets(model, ("weight", "bias"))
    remaining = sum(getattr(m, n).numel() for m, n in targets)
    for amount in amounts:
        prune_(targets, method, amount, scope="global")
        remaining -= round(amount * remaining)
        assert sum(remaining_count(m, n) for m, n in targets) == remaining


@SETTINGS
@given(widths=widths, amount=fractions, seed=st.integers(0, 99))
def test_local_rounds_prune_each_tensor_exactly(widths, amount, seed):
    model = mlp(widths, seed)
    targets = default_targets(model)
    prune_(targets, "l1_unstructured", amount, scope="local")
    for module, name in targets:
        numel = getattr(module, name).numel()
        assert remaining_count(module, name) == numel - round(amount * numel)


@SETTINGS
@given(widths=widths, amount=fractions, seed=st.integers(0, 99), scope=st.sampled_from(["local", "global"]))
def test_masked_output_equals_permanent_output(widths, amount, seed, scope):
    model = mlp(widths, seed)
    prune_(default_targets(model), "l1_unstructured", amount, scope=scope)
    x = torch.randn(3, widths[0])
    masked = model(x)
    fresh = mlp(widths, seed + 1)
    fresh.load_state_dict(permanent_state_dict(model))  # strict: plain keys only
    assert torch.equal(fresh(x), masked)
    make_permanent_(model)
    assert not torch_prune.is_pruned(model)
    assert torch.equal(model(x), masked)


@SETTINGS
@given(widths=widths, amount=fractions, seed=st.integers(0, 99))
def test_masked_state_dict_round_trips_into_fresh_model(widths, amount, seed):
    model = mlp(widths, seed)
    prune_(default_targets(model, ("weight", "bias")), "random_unstructured", amount)
    state = model.state_dict()
    fresh = load_pruned_state_dict(mlp(widths, seed + 1), state)
    assert fresh.state_dict().keys() == state.keys()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


@SETTINGS
@given(widths=widths, amount=fractions, seed=st.integers(0, 99))
def test_parameter_order_survives_pruning_and_removal(widths, amount, seed):
    model = mlp(widths, seed)
    before = [(n, id(p)) for n, p in model.named_parameters()]
    prune_(default_targets(model, ("weight", "bias")), "l1_unstructured", amount)
    assert [(n.replace("_orig", ""), id(p)) for n, p in model.named_parameters()] == before
    make_permanent_(model)
    assert [(n, id(p)) for n, p in model.named_parameters()] == before


def test_only_real_reparametrisations_are_recognised():
    layer = nn.Linear(4, 4)
    layer.register_buffer("attn_mask", torch.ones(4))
    layer.register_buffer("attn_orig", torch.zeros(4))
    assert not is_pruned(layer, "attn")
    model = nn.Sequential(layer)
    prune_([(layer, "weight")], "l1_unstructured", 0.5)
    state = permanent_state_dict(model)
    assert {"0.attn_mask", "0.attn_orig", "0.weight", "0.bias"} == set(state)
    assert make_permanent_(model) == 1
    assert torch.equal(layer.attn_mask, torch.ones(4))


@pytest.mark.parametrize("keep", ["weight", [nn.Linear(2, 2)], [("0", "weight")], (nn.Linear(2, 2), "weight")])
def test_make_permanent_names_keep_when_it_holds_no_module_name_pairs(keep):
    """It failed with "not enough values to unpack (expected 2, got 1)", naming neither keep nor what it takes; and
    one (module, name) pair not in a list was unpacked as two targets."""
    model = nn.Sequential(nn.Linear(4, 4))
    prune_([(model[0], "weight")], "l1_unstructured", 0.5)
    with pytest.raises(TypeError, match=r"make_permanent_\(keep=...\): expected \(module, name\) pairs"):
        make_permanent_(model, keep=keep)
    assert is_pruned(model[0], "weight")  # refused before anything was removed
    assert make_permanent_(model, keep=[(model[0], "weight")]) == 0 and is_pruned(model[0], "weight")
    assert make_permanent_(model, keep=[[model[0], "weight"]]) == 0 and is_pruned(model[0], "weight")  # (JSON's)


def test_make_permanent_keeps_a_compiled_layers_mask_and_refuses_pairs_the_model_does_not_hold():
    """A compiled layer in keep matched no mask (its hook is on the eager module) and one of another model or a
    misspelt name matched none either: each mask was made permanent without a word."""
    model = nn.Sequential(torch.compile(nn.Linear(4, 4), backend="eager"), nn.Linear(4, 2))
    prune_([(model[0]._orig_mod, "weight"), (model[1], "weight")], "l1_unstructured", 0.5)
    for keep, named in (([(nn.Linear(4, 4), "weight")], "Linear.weight"), ([(model[1], "wieght")], "Linear.wieght")):
        with pytest.raises(ValueError, match=rf"keep=...\): {named} is no tensor of a module of the model given"):
            make_permanent_(model, keep=keep)
    assert make_permanent_(model, keep=[(model[0], "weight")]) == 1
    assert is_pruned(model[0]._orig_mod, "weight") and not is_pruned(model[1], "weight")


def test_state_hooks_make_any_state_dict_permanent_and_load_both_formats():
    model = mlp([6, 5, 3], 0)
    targets = default_targets(model)
    prune_(targets, "l1_unstructured", 0.4)
    masked_state = {k: v.clone() for k, v in model.state_dict().items()}
    handles = register_state_hooks(targets, permanent_state_dict=True)
    permanent = model.state_dict()
    assert not any(k.endswith(("_orig", "_mask")) for k in permanent)
    x = torch.randn(2, 6)
    expected = model(x)
    # both formats load back into the live, pruned model, which keeps its masks
    model.load_state_dict(permanent)
    assert torch.equal(model(x), expected) and torch_prune.is_pruned(model)
    model.load_state_dict(masked_state)
    assert torch.equal(model(x), expected)
    # an unpruned model with the load hook re-creates masks from a masked state dict
    fresh = mlp([6, 5, 3], 1)
    fresh_handles = register_state_hooks(default_targets(fresh), permanent_state_dict=False)
    fresh.load_state_dict(masked_state)
    assert torch_prune.is_pruned(fresh) and torch.equal(fresh(x), expected)
    for h in handles + fresh_handles:
        h.remove()
    assert any(k.endswith("_mask") for k in model.state_dict())


def test_pruned_model_with_hooks_pickles():
    model = mlp([4, 3], 0)
    prune_(default_targets(model), "l1_unstructured", 0.5)
    register_state_hooks(default_targets(model), permanent_state_dict=True)
    clone = pickle.loads(pickle.dumps(model))
    assert any(isinstance(h, PermanentStateDictHook) for h in clone[0]._state_dict_hooks.values())
    assert torch.equal(clone(torch.ones(1, 4)), model(torch.ones(1, 4)))


@SETTINGS
@given(widths=widths, seed=st.integers(0, 99), rounds=st.integers(1, 4))
def test_rewind_restores_snapshot_and_never_aliases_it(widths, seed, rounds):
    model = mlp(widths, seed)
    targets = default_targets(model)
    snapshot = take_snapshot(targets)
    initial = [getattr(m, n).detach().clone() for m, n in targets]
    for _ in range(rounds):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # "training"
        prune_(targets, "l1_unstructured", 0.3)
        rewind_(targets, snapshot)
    for (module, name), value in zip(targets, initial):
        assert torch.equal(getattr(module, name + "_orig"), value)
        assert torch.equal(getattr(module, name), value * getattr(module, name + "_mask"))
    for layer in snapshot.values():
        for p in layer["data"].parameters():
            assert all(p.data_ptr() != q.data_ptr() for q in model.parameters())


@SETTINGS
@given(widths=st.lists(st.integers(2, 24), min_size=3, max_size=4), seed=st.integers(0, 99), resample=st.booleans())
def test_rewind_after_make_permanent_rewinds_the_survivors_and_keeps_the_pruned_zeros(widths, seed, resample):
    """With its masks made permanent, a pruned target came back dense from the snapshot (the ticket's sparsity lost,
    silently); a target never pruned is rewound whole. (Half of each pruned tensor: never all of it, which would
    read as a zero-initialised tensor.)"""
    model = mlp(widths, seed)
    targets = default_targets(model)
    snapshot = take_snapshot(targets)
    initial = [getattr(m, n).detach().clone() for m, n in targets]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # "training"
    prune_(targets[:-1], "l1_unstructured", 0.5, scope="local")
    make_permanent_(model)
    zeros = [getattr(m, n) == 0 for m, n in targets]
    rewind_(targets, snapshot, resample=resample)
    for (module, name), value, zero in zip(targets[:-1], initial, zeros):
        tensor = getattr(module, name)
        assert torch.equal(tensor == 0, zero) and int(zero.sum()) == round(0.5 * zero.numel())
        if not resample:
            assert torch.equal(tensor[~zero], value[~zero])
    if not resample:
        assert torch.equal(getattr(*targets[-1]), initial[-1])  # never pruned: all of it rewound


@pytest.mark.parametrize("resample", [False, True])
def test_rewind_after_make_permanent_keeps_the_zeros_of_biases_of_a_single_entry_and_of_a_whole_tensor(resample):
    """The first rule (a tensor of 2 dims or more with at least 1% zeros, not all) rewound these back dense."""
    torch.manual_seed(0)
    few, whole = nn.Linear(20, 10), nn.Linear(4, 3)
    targets = [(few, "weight"), (few, "bias"), (whole, "weight")]
    snapshot = take_snapshot(targets)
    prune_([(few, "weight")], "l1_unstructured", 1, scope="local")
    prune_([(few, "bias")], "l1_unstructured", 0.5, scope="local")
    prune_([(whole, "weight")], "l1_unstructured", 1.0, scope="local")
    make_permanent_(few)
    make_permanent_(whole)
    rewind_(targets, snapshot, resample=resample)
    assert [int((getattr(m, n) == 0).sum()) for m, n in targets] == [1, 5, 12]


def test_snapshot_of_a_pruned_module_holds_trainable_values():
    layer = nn.Linear(5, 5)
    prune_([(layer, "weight")], "l1_unstructured", 0.6)
    snapshot = take_snapshot([(layer, "weight")])
    copy = snapshot[id(layer)]["data"]
    assert not torch_prune.is_pruned(copy)
    assert isinstance(copy.weight, nn.Parameter)
    assert torch.equal(copy.weight, layer.weight_orig)


def test_rewind_refuses_targets_other_than_the_snapshots_and_rewinds_a_copy_of_the_network_by_place():
    """A shorter list raised IndexError; another tensor at a place (another shape) torch's copy_ error."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4), nn.Linear(4, 3)]
    targets = [(layer, "weight") for layer in layers]
    snapshot = take_snapshot(targets)
    with pytest.raises(ValueError, match=r"rewind_: the snapshot holds 2 targets, and 1 were given"):
        rewind_(targets[:1], snapshot)
    with pytest.raises(ValueError, match=r"rewind_: target 0 is Linear.weight \(3, 4\), but the snapshot took its "
                                         r"weight \(4, 4\) there"):
        rewind_(targets[::-1], snapshot)
    with pytest.raises(ValueError, match=r"target 1 is Linear.bias"):
        rewind_([targets[0], (layers[1], "bias")], snapshot)
    with pytest.raises(ValueError, match=r"target 0 is ReLU.weight \(none\), but the snapshot took its weight"):
        rewind_([(nn.ReLU(), "weight"), targets[1]], snapshot)  # (AttributeError)
    copies = [nn.Linear(4, 4), nn.Linear(4, 3)]  # another network of the same architecture: rewound by place
    rewind_([(layer, "weight") for layer in copies], snapshot)
    assert all(torch.equal(copied.weight, layer.weight) for copied, layer in zip(copies, layers))


def test_prune_rejects_bad_arguments_with_clear_errors():
    layer = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="amount"):
        prune_([(layer, "weight")], "l1_unstructured", 1.5)
    with pytest.raises(TypeError, match="amount"):
        prune_([(layer, "weight")], "l1_unstructured", True)
    with pytest.raises(ValueError, match="more entries than remain"):
        prune_([(layer, "weight")], "l1_unstructured", 10)
    with pytest.raises(ValueError, match="Unknown pruning method"):
        prune_([(layer, "weight")], "l3_unstructured", 0.5)
    with pytest.raises(ValueError, match="unstructured"):
        prune_([(layer, "weight")], "ln_structured", 0.5, scope="global", n=1, dim=0)
    with pytest.raises(ValueError, match="does not fit"):
        apply_mask_(layer, "weight", torch.ones(2, 2))


@settings(max_examples=30, deadline=None)
@given(stray=st.floats(width=16, allow_nan=True, allow_infinity=True).filter(lambda v: v not in (0.0, 1.0)),
       where=st.integers(0, 11), write=st.sampled_from(["apply_mask_", "set_mask_"]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]))
def test_a_mask_of_values_other_than_0_and_1_is_refused_and_the_layer_left_as_it_was(stray, where, write, dtype):
    """A mask of 2.0 doubled the weights, one of 0.5 halved them (0% sparsity said), a NaN entry made its weight NaN:
    all without a word."""
    layer = nn.Linear(4, 3)
    before = layer.weight.detach().clone()
    mask = torch.ones(3, 4, dtype=dtype)
    mask.view(-1)[where] = stray
    with pytest.raises(ValueError, match=r"mask for `weight` holds .* \(1 entry neither 0 nor 1\)"):
        {"apply_mask_": apply_mask_, "set_mask_": set_mask_}[write](layer, "weight", mask)
    assert not is_pruned(layer, "weight") and torch.equal(layer.weight, before)
    valid = torch.ones(3, 4, dtype=dtype)
    valid.view(-1)[where] = 0
    for given_mask in (valid, valid.bool(), valid.long()):
        {"apply_mask_": apply_mask_, "set_mask_": set_mask_}[write](layer, "weight", given_mask)
        assert int((layer.weight == 0).sum()) == 1


@pytest.mark.parametrize("into", ["a fresh model", "a pruned model", "a model with the load hooks"])
def test_a_state_whose_mask_is_not_0_and_1_is_refused_naming_its_key_before_anything_loads(into):
    """Refused by the mask writer naming `weight` only, after an earlier layer had been re-parametrised; into a model
    pruned already (the buffer's own load), a mask of 2.0 doubled the weights silently."""
    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    saved = model()
    prune_model_(saved, "l1_unstructured", 0.5)
    state = {key: value.clone() for key, value in saved.state_dict().items()}
    state["2.weight_mask"][0, 0] = 2.0
    target = model()
    if into != "a fresh model":
        prune_model_(target, "l1_unstructured", 0.25)
    before = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"^the state's '2\.weight_mask' holds 2\.0 \(1 entry neither 0 nor 1\)"):
        if into == "a model with the load hooks":
            register_state_hooks(default_targets(target), permanent_state_dict=False)
            target.load_state_dict(state)
        else:
            load_pruned_state_dict(target, state)
    after = target.state_dict()
    # (torch's own load goes module by module: the layers before the refused one are loaded, as its errors leave them)
    kept = [key for key in before if into != "a model with the load hooks" or key.startswith("2.")]
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in kept)


def test_a_buffer_named_like_a_mask_beside_a_parameter_named_like_an_original_loads():
    """`attn_mask` (a causal mask of -inf) beside a parameter `attn_orig`: no pruning pair (there is no `attn`), and
    load_pruned_state_dict refused the model's own state, "a damaged or hand-made state?"."""
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.attn_orig = nn.Parameter(torch.randn(3, 3))
            self.register_buffer("attn_mask", torch.triu(torch.full((3, 3), float("-inf")), 1))

    state = Attention().state_dict()
    loaded = load_pruned_state_dict(Attention(), state)
    assert torch.equal(loaded.attn_mask, state["attn_mask"]) and torch.equal(loaded.attn_orig, state["attn_orig"])


def test_the_engines_entry_points_name_what_they_expect_when_given_something_else():
    """A model where targets were expected, a misspelt tensor name, None for a model or a snapshot: each failed
    deep inside (cannot unpack a Linear; no attribute 'modules'); now the entry point says what it takes."""
    from litcompress import sparsity_report
    from litcompress.pruning import GradualPruner, prune_model_, prune_to_sparsity_
    from litcompress.pruning.schedules import PolynomialDecay

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    schedule = PolynomialDecay(final_sparsity=0.5, begin=0, end=10)
    for call, where in ((lambda t: prune_(t, "l1_unstructured", 0.5), "prune_"),
                        (lambda t: prune_to_sparsity_(t, "l1_unstructured", 0.5), "prune_to_sparsity_"),
                        (lambda t: GradualPruner(t, schedule), "GradualPruner"),
                        (take_snapshot, "take_snapshot"),
                        (lambda t: sparsity_report(model, t), "sparsity_report")):
        with pytest.raises(TypeError, match=rf"{where}: expected \(module, name\) pairs .* got a Sequential; "
                                            r"default_targets\(model\)"):
            call(model)
        with pytest.raises(ValueError, match=rf"{where}: Linear has no tensor 'wieght' \(its parameters: "
                                             r"\['weight', 'bias'\]\)"):
            call([(model[0], "wieght")])
        with pytest.raises(TypeError, match=rf"{where}: each target is a \(module, name\) pair .* got 'weight'"):
            call([(model[0], "weight"), "weight"])
    for call, where in ((prune_model_, "prune_model_"), (make_permanent_, "make_permanent_"),
                        (sparsity_report, "sparsity_report")):
        with pytest.raises(TypeError, match=f"{where}: expected a torch.nn.Module, got NoneType"):
            call(None)
    with pytest.raises(TypeError, match="rewind_: expected the snapshot take_snapshot"):
        rewind_([(model[0], "weight")], None)
    # the amount where the method goes: "HINT: pass the class, not an instance", of a number
    with pytest.raises(TypeError, match=r"^method=0\.5: expected a pruning method .* how much to prune, not how"):
        prune_model_(model, 0.5)
    with pytest.raises(TypeError, match=r"method=<.*L1Unstructured object .* pass the class, not an instance"):
        prune_([(model[0], "weight")], torch_prune.L1Unstructured(0.5), 0.5)
    with pytest.raises(TypeError, match=r"method=None: .* Choose one of \['l1_unstructured', 'ln_structured'"):
        GradualPruner([(model[0], "weight")], schedule, None)
    # what they take still works: a pruned tensor, a buffer, a weight-normed layer's computed weight (refused
    # later by its own check, which names the fix)
    prune_([(model[0], "weight")], "l1_unstructured", 0.5)
    prune_to_sparsity_([(model[0], "weight"), (model[2], "weight")], "l1_unstructured", 0.75)
    assert sparsity_report(model, [(model[0], "weight"), (model[2], "weight")]).zeros == 36  # 0.75 of 32 + 16
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="computed by a parametrization"):
        prune_([(normed, "weight")], "l1_unstructured", 0.5)


def test_plain_pytorch_loop_with_iterative_pruning_and_lottery_ticket():
    """The engine without Lightning: train, prune 50% globally, rewind, three rounds."""
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()
    model = mlp([8, 32, 2], 0)
    targets = default_targets(model)
    ticket = take_snapshot(targets)
    for _ in range(3):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(30):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        prune_(targets, "l1_unstructured", 0.5)
        rewind_(targets, ticket)
    report = sparsity_report(model)
    assert report.zeros == 320 - 40  # 8*32 + 32*2 = 320 weights, halved three times
    accuracy = (model(x).argmax(1) == y).float().mean()
    assert accuracy < 1.0  # rewound to initial values: not trained yet


@SETTINGS
@given(widths=widths, amounts=st.lists(fractions, min_size=1, max_size=3), seed=st.integers(0, 99))
def test_global_l1_matches_torch_global_unstructured(widths, amounts, seed):
    """Our global L1 rounds give torch's masks (continuous random weights: no ties)."""
    ours, theirs = mlp(widths, seed), mlp(widths, seed)
    our_targets, their_targets = default_targets(ours), default_targets(theirs)
    for amount in amounts:
        prune_(our_targets, "l1_unstructured", amount, scope="global")
        torch_prune.global_unstructured(their_targets, pruning_method=torch_prune.L1Unstructured, amount=amount)
    for (m, n), (m2, n2) in zip(our_targets, their_targets):
        assert torch.equal(getattr(m, n + "_mask"), getattr(m2, n2 + "_mask"))


class MagnitudeAbove(torch_prune.BasePruningMethod):
    """A custom unstructured method: prunes the entries kept so far whose magnitude is below a threshold."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def compute_mask(self, t, default_mask):
        return default_mask * (t.abs() >= self.threshold).to(default_mask.dtype)


@pytest.mark.parametrize("method", ["l1_unstructured", torch_prune.L1Unstructured, MagnitudeAbove],
                         ids=["l1-name", "l1-class", "custom-class"])
@pytest.mark.parametrize("scope", ["global", "local"])
def test_later_rounds_rank_the_weights_as_they_are_now(method, scope):
    """After an optimizer step, ``module.weight`` is still the tensor the pruning hook made at the last forward:
    torch's `global_unstructured` ranks that one. Every round ranks ``orig * mask`` as it is when it runs."""
    model = mlp([6, 6, 6], 0)
    targets = default_targets(model)
    prune_(targets, method, 0.3, scope=scope, threshold=0.1)  # `threshold` goes to the custom method only
    model(torch.randn(2, 6))  # the hooks cache orig * mask
    with torch.no_grad():  # an optimizer step: the trained values move, the cached ones stay
        for module, name in targets:
            orig = getattr(module, name + "_orig")
            orig.copy_(torch.randn_like(orig))
    current = {(id(m), n): (getattr(m, n + "_orig") * getattr(m, n + "_mask")).clone() for m, n in targets}
    if method is MagnitudeAbove:
        threshold = torch.cat([t.flatten() for t in current.values()]).abs().median().item()
        prune_(targets, method, 0.0, scope=scope, threshold=threshold)
        for module, name in targets:
            expected = (current[id(module), name].abs() >= threshold).float()  # pruned entries are 0 in `current`
            assert torch.equal(getattr(module, name + "_mask"), expected)
    else:
        prune_(targets, method, 0.5, scope=scope)
        reference = mlp([6, 6, 6], 0)
        reference_targets = default_targets(reference)
        for (module, name), (ref, ref_name) in zip(targets, reference_targets):
            with torch.no_grad():
                getattr(ref, ref_name).copy_(current[id(module), name])
        # the same pruned count from the current values, ranked by torch without any cached tensor
        counts = [int(getattr(m, n + "_mask").numel() - getattr(m, n + "_mask").sum()) for m, n in targets]
        if scope == "global":
            torch_prune.global_unstructured(reference_targets, pruning_method=torch_prune.L1Unstructured,
                                            amount=sum(counts))
        else:
            for (ref, ref_name), count in zip(reference_targets, counts):
                torch_prune.l1_unstructured(ref, ref_name, amount=count)
        for (module, name), (ref, ref_name) in zip(targets, reference_targets):
            assert torch.equal(getattr(module, name + "_mask"), getattr(ref, ref_name + "_mask"))
    for module, name in targets:  # and the module computes with the new values at once
        assert torch.equal(getattr(module, name), getattr(module, name + "_orig") * getattr(module, name + "_mask"))


def test_repeated_global_rounds_do_not_stack_pruning_methods():
    model = mlp([8, 8, 8], 0)
    targets = default_targets(model)
    for _ in range(20):
        prune_(targets, "l1_unstructured", 0.1)
    hooks = [h for h in model[0]._forward_pre_hooks.values() if isinstance(h, torch_prune.BasePruningMethod)]
    assert len(hooks) == 1 and not isinstance(hooks[0], torch_prune.PruningContainer)


class Attention(nn.Module):
    """nn.MultiheadAttention alone (it reads out_proj.weight without calling out_proj) or inside a Transformer
    layer, whose inference fast path reads every weight without calling the modules."""

    def __init__(self, layer: bool) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True) if layer else \
            nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.block, nn.MultiheadAttention):
            return self.block(x, x, x, need_weights=False)[0]
        return self.block(x)


@pytest.mark.parametrize("layer", [False, True], ids=["MultiheadAttention", "TransformerEncoderLayer"])
def test_weights_read_without_a_call_stay_current_while_training(layer):
    torch.manual_seed(0)
    model = Attention(layer)
    targets = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]
    prune_(targets, "l1_unstructured", 0.5, scope="global")
    # the layer and its attention; or the attention and the model's own (its child's in_proj_weight is a tensor a
    # forward could read without calling the attention)
    assert keep_bypassed_weights_current_(model) == 2
    assert keep_bypassed_weights_current_(model) == 0  # once
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 4, 8)
    for _ in range(3):  # without the hooks, the second backward fails on the out_proj tensor cached at pruning
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    model.eval()
    permanent = deepcopy_model(model)
    make_permanent_(permanent)
    assert keep_bypassed_weights_current_(permanent) == 2  # make_permanent_ removed them
    make_permanent_(permanent)
    with torch.no_grad():  # eval, no grad: the Transformer layer's fast path, with the weights after the last step
        torch.testing.assert_close(model(x), permanent(x))


class _ReadsItsChildren(nn.Module):
    """Reads `proj`'s weight and a ParameterDict's tensor without calling them; calls `head` (only with `use_head`,
    as a branch taken on some batches only)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(6, 8), nn.Linear(8, 8)
        self.scales = nn.ParameterDict({"weight": nn.Parameter(torch.randn(8, 8))})

    def forward(self, x: torch.Tensor, use_head: bool = True) -> torch.Tensor:
        h = nn.functional.linear(x, self.proj.weight, self.proj.bias) @ self.scales["weight"]
        return self.head(h) if use_head else h


def _computed_from_orig_and_mask(model: _ReadsItsChildren, x: torch.Tensor, use_head: bool) -> torch.Tensor:
    def weight(module: nn.Module) -> torch.Tensor:
        return module.weight_orig * module.weight_mask

    h = nn.functional.linear(x, weight(model.proj), model.proj.bias) @ weight(model.scales)
    return nn.functional.linear(h, weight(model.head), model.head.bias) if use_head else h


@pytest.mark.parametrize("copied", ["as_pruned", "deepcopy", "pickle"])
def test_tensors_read_without_calling_their_module_stay_current_in_a_plain_loop(copied):
    """torch recomputes orig * mask in the pruned module's own forward only: a tensor read without that call was the
    one of the last recompute (the second backward failed: "Trying to backward through the graph a second time")."""
    torch.manual_seed(0)
    model = _ReadsItsChildren()
    prune_model_(model, "l1_unstructured", 0.5)  # (calls keep_bypassed_weights_current_)
    if copied == "deepcopy":
        model = deepcopy_model(model)
    elif copied == "pickle":
        model = pickle.loads(pickle.dumps(deepcopy_model(model)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 6)
    for step in range(6):  # the head's branch on some steps only
        optimizer.zero_grad()
        out = model(x, use_head=step % 3 != 1)
        torch.testing.assert_close(out, _computed_from_orig_and_mask(model, x, step % 3 != 1), rtol=0, atol=0)
        out.pow(2).mean().backward()
        for module in (model.proj, model.scales):  # (a copy's cached tensor has no graph: no gradient reached them)
            assert module.weight_orig.grad is not None and module.weight_orig.grad.abs().sum() > 0
        optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _computed_from_orig_and_mask(model, x, True), rtol=0, atol=0)
    make_permanent_(model)
    assert not any(module._forward_pre_hooks for module in model.modules())


class _CallsInTrainingReadsInEval(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) if self.training else nn.functional.linear(x, self.proj.weight, self.proj.bias)


class _ReadBy(nn.Module):
    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(nn.functional.linear(x, self.layer.weight, self.layer.bias))


class _TwoReadersOfOneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(8, 8)
        self.first, self.second, self.out = _ReadBy(shared), _ReadBy(shared), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.second(self.first(x)))


def _pruned_and_trained(model: nn.Module, x: torch.Tensor, steps: int, **prune_kwargs: Any) -> nn.Module:
    """`model` pruned to half its weights (`prune_model_`), then `steps` SGD steps on ``model(x).pow(2).sum()``."""
    prune_model_(model, "l1_unstructured", 0.5, **prune_kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()
    return model


def test_a_layer_called_in_training_and_read_in_eval_computes_with_its_trained_weights():
    """The tensor of the last training call was taken for current at the eval forward: the weights before the last
    optimizer step, silently."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    model = _pruned_and_trained(_CallsInTrainingReadsInEval(), x, steps=3)
    model.eval()
    with torch.no_grad():
        expected = nn.functional.linear(x, model.proj.weight_orig * model.proj.weight_mask, model.proj.bias)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_a_layer_two_modules_read_without_calling_it_trains():
    """Each reader kept what it had seen: the second's recompute looked like a call to the first, which then read the
    second's tensor of the step before (the second backward failed)."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    model = _pruned_and_trained(_TwoReadersOfOneLayer(), x, steps=4, parameter_names=["weight", "bias"])
    shared = model.first.layer
    assert shared.weight_orig.grad.abs().sum() > 0
    with torch.no_grad():
        model(x)  # (the cached tensor is the last forward's until the next one)
        torch.testing.assert_close(shared.weight, shared.weight_orig * shared.weight_mask, rtol=0, atol=0)


def test_a_freshly_masked_model_traces_with_torch_jit():
    """The hooks recomputed the children at their first call, not at the trace's check: 'Graphs differed across
    invocations'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    prune_model_(model, "l1_unstructured", 0.5)
    x = torch.randn(2, 8)
    traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x))


def test_a_model_reading_a_layer_without_calling_it_traces_and_compiles_with_its_current_weights():
    """Skipped while tracing, the hooks left the trace the tensor of the last training step as a constant ('Cannot
    insert a Tensor that requires grad as a constant'; after a load, the weights before it); torch.compile's
    training failed at its second backward."""
    x = torch.randn(4, 6)

    def trained(compiled: bool) -> _ReadsItsChildren:
        torch.manual_seed(0)
        model = _ReadsItsChildren()
        prune_model_(model, "l1_unstructured", 0.5)
        run = torch.compile(model, backend="eager") if compiled else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            run(x).pow(2).mean().backward()
            optimizer.step()
        return model.eval()

    model = trained(compiled=False)
    torch.testing.assert_close(torch.jit.trace(model, x)(x), _computed_from_orig_and_mask(model, x, True),
                               rtol=0, atol=0)
    other = trained(compiled=False)
    with torch.no_grad():
        other.proj.weight_orig.add_(1.0)
        model(x)
        model.load_state_dict(other.state_dict())  # (torch's refresh hook is the pruned layers' own)
        torch.testing.assert_close(torch.jit.trace(model, x)(x), _computed_from_orig_and_mask(other, x, True),
                                   rtol=0, atol=0)
    compiled = trained(compiled=True)
    with torch.no_grad():  # the eager model's first call after compiled steps: its tensors were set by the graph
        torch.testing.assert_close(compiled(x), _computed_from_orig_and_mask(compiled, x, True), rtol=0, atol=0)
        torch.jit.trace(compiled, x, check_trace=False)  # (no check call after it)
        compiled.proj.weight_orig.mul_(2.0)  # an optimizer step, an in-place load
        torch.testing.assert_close(compiled(x), _computed_from_orig_and_mask(compiled, x, True), rtol=0, atol=0)


def test_a_compiled_masked_model_keeps_its_graph_while_other_pruned_models_come_and_go():
    """The hooks read their record of the tensors seen while dynamo traced: it guarded on that record's keys, so a
    pruned model freed between two calls crashed the guard (IndexError) and each other model used made a new graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(4, 6)

    def pruned() -> _ReadsItsChildren:
        model = _ReadsItsChildren().eval()
        prune_model_(model, "l1_unstructured", 0.5)
        return model

    model = pruned()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        for _ in range(4):
            pruned()(x)  # used, then freed
            torch.testing.assert_close(compiled(x), _computed_from_orig_and_mask(model, x, True), rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("layer", [False, True], ids=["MultiheadAttention", "TransformerEncoderLayer"])
def test_a_masked_state_dict_loads_into_a_fresh_attention_model_that_computes_and_trains(layer):
    torch.manual_seed(0)
    model = Attention(layer)
    prune_([(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)], "l1_unstructured", 0.5,
           scope="global")
    keep_bypassed_weights_current_(model)
    x = torch.randn(3, 4, 8)
    torch.manual_seed(1)
    fresh = load_pruned_state_dict(Attention(layer), model.state_dict())  # other initial weights, loaded over
    model.eval(), fresh.eval()
    with torch.no_grad():  # out_proj's cached orig * mask was the fresh model's initial one until refreshed
        torch.testing.assert_close(fresh(x), model(x))
    fresh.train()
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        fresh(x).pow(2).mean().backward()
        optimizer.step()
    out_proj = (fresh.block.self_attn if layer else fresh.block).out_proj
    fresh(x)  # torch recomputes a cached orig * mask at the next call, here the attention's
    torch.testing.assert_close(out_proj.weight, out_proj.weight_orig * out_proj.weight_mask)


@settings(max_examples=40, deadline=None)
@given(groups=st.sampled_from([2, 3, 4, 6]), per_group=st.integers(1, 6),
       targets=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4), random=st.booleans(),
       seed=st.integers(0, 1000), multiple=st.sampled_from([None, 2, 4, 8, 16]))
def test_structured_pruning_with_slice_groups_prunes_every_group_alike(groups, per_group, targets, random, seed,
                                                                       multiple):
    """A grouped conv (or a layer grouped convs read) can only lose channels evenly over its groups: each block of
    rows loses round(target * rows per block), the rows pruned before stay pruned, the smallest norms go first; every
    block keeps one (a layer with every row pruned outputs a constant). With keep_multiple_of, the layer keeps the
    fewest rows, as many per block, that are a multiple of it (each block's count was rounded up to the multiple:
    64 rows in 4 groups kept all 64 at 50%, where 32 is a multiple of 16)."""
    from litcompress.pruning.engine import mask_of, prune_to_sparsity_

    torch.manual_seed(seed)
    conv = nn.Conv2d(4, groups * per_group, 3, groups=groups if 4 % groups == 0 else 1)
    target = (conv, "weight")
    method = "random_structured" if random else "ln_structured"
    pruned_before = torch.zeros(groups * per_group, dtype=torch.bool)
    for sparsity in sorted(targets):
        prune_to_sparsity_([target], method, sparsity, scope="local", dim=0, n=2, slice_groups={target: groups},
                           keep_multiple_of=multiple)
        mask = mask_of(conv, "weight")
        rows_pruned = (mask.flatten(1) == 0).all(dim=1) if mask is not None else torch.zeros_like(pruned_before)
        per_block = rows_pruned.view(groups, per_group).sum(dim=1)
        needed = max(1, per_group - round(sparsity * per_group))  # rows each block keeps, at least one
        fits = [kept for kept in range(needed, per_group + 1) if multiple is None or groups * kept % multiple == 0]
        assert per_block.tolist() == [per_group - (fits[0] if fits else per_group)] * groups
        assert per_block.max() < per_group
        assert (rows_pruned | ~pruned_before).all()  # rows pruned before stay pruned
        pruned_before = rows_pruned
    if not random and mask is not None:  # within each block, the pruned rows have the smallest norms
        norms = conv.weight_orig.detach().flatten(1).norm(dim=1).view(groups, per_group)
        for block, pruned in zip(norms, rows_pruned.view(groups, per_group)):
            if pruned.any() and (~pruned).any() and len(targets) == 1:
                assert block[pruned].max() <= block[~pruned].min()


def test_eager_copy_unwraps_compiled_modules_at_any_depth_and_leaves_the_model_as_given():
    from litcompress.pruning.engine import compiled_module_names, eager_copy

    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model = torch.compile(nn.Sequential(torch.compile(inner, backend="eager"), nn.Linear(4, 2)), backend="eager")
    assert compiled_module_names(model) == ["", "_orig_mod.0"]
    copy = eager_copy(model)
    assert compiled_module_names(copy) == [] and isinstance(copy, nn.Sequential) and isinstance(copy[0], nn.Sequential)
    assert copy[0][0] is not inner[0]  # a copy
    x = torch.randn(3, 4)
    torch.testing.assert_close(copy(x), model(x))
    assert compiled_module_names(model) == ["", "_orig_mod.0"]


class _ForwardSetOnTheInstance(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(hidden=(8,))
        self.forward = self.forward_doubled  # a variant chosen at construction

    def forward_doubled(self, x):
        return 2 * self.net(x)


class _ForwardIsAPartial(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(hidden=(8,))
        self.forward = functools.partial(self.scaled, 3.0)

    def scaled(self, factor, x):
        return factor * self.net(x)


class _ForwardIsAnotherModules(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(hidden=(8,))
        self.forward = self.net.forward  # the network's, as a wrapper that only holds it would


@pytest.mark.parametrize("module_type", [MLPClassifier, _ForwardSetOnTheInstance, _ForwardIsAPartial,
                                         _ForwardIsAnotherModules])
@pytest.mark.parametrize("fits", [1, 2])  # each fit, validate or test of torch.compile(module) compiles it again
def test_a_copy_of_a_module_lightning_compiled_in_place_runs_its_own_weights_and_the_original_stays_compiled(
        module_type, fits):
    from lightning.pytorch.utilities.compile import from_compiled

    from litcompress.pruning.engine import eager_copy

    torch.manual_seed(0)
    module = module_type(hidden=(8,)) if module_type is MLPClassifier else module_type()
    x = torch.randn(3, 64)
    expected = module(x)
    for _ in range(fits):
        from_compiled(torch.compile(module, backend="eager"))  # what Trainer.fit(torch.compile(module)) does
    for copied in (deepcopy_model(module), eager_copy(module)):
        torch.testing.assert_close(copied(x), expected, rtol=0, atol=0)  # its own forward (the class's fell back)
        with torch.no_grad():
            for parameter in copied.parameters():
                parameter.zero_()
        assert torch.equal(copied(x), torch.zeros(3, 10))  # was the original's forward: its weights
        assert copied._compiler_ctx is None  # as a fresh LightningModule's: Lightning reads it
        assert ("forward" in vars(copied)) == (module_type is not MLPClassifier)
    assert "forward" in vars(module) and module._compiler_ctx["compiler"] == "dynamo"


def test_prune_to_sparsity_refuses_a_misspelt_scope_and_a_method_told_no_amount():
    """A misspelt scope pruned each layer on its own (not globally); a method without `amount` stopped where it
    liked (42% for 90%), both without a word."""
    from litcompress.pruning.engine import prune_to_sparsity_
    from tests.pruning.test_gradual import FixedThreshold

    layers = [nn.Linear(4, 6), nn.Linear(6, 2)]
    targets = [(layer, "weight") for layer in layers]
    with pytest.raises(ValueError, match="`scope` must be 'local' or 'global', got 'globl'"):
        prune_to_sparsity_(targets, "l1_unstructured", 0.5, scope="globl")
    with pytest.raises(TypeError, match="FixedThreshold takes no `amount`"):
        prune_to_sparsity_(targets, FixedThreshold, 0.9)
    assert not any(hasattr(layer, "weight_mask") for layer in layers)  # refused before any round


@SETTINGS
@given(rows=st.integers(1, 8), extra=st.integers(1, 4))
def test_a_structured_count_beyond_the_slices_left_is_refused_in_the_engines_words(rows, extra):
    """It got past the entry count (rows x columns) and failed in torch ("should be smaller than the number of
    parameters to prune"); the count is of slices."""
    layer = nn.Linear(5, rows)
    with pytest.raises(ValueError, match=rf"`amount={rows + extra}` asks to prune more slices along dim=0 than "
                                         rf"remain \({rows} in the smallest target\)"):
        prune_([(layer, "weight")], "ln_structured", rows + extra, scope="local", n=2, dim=0)
    prune_([(layer, "weight")], "ln_structured", rows, scope="local", n=2, dim=0)  # every row: allowed
    assert int((layer.weight.detach().abs().sum(1) == 0).sum()) == rows


def test_a_round_on_meta_weights_is_refused_in_words():
    """Local pruning wrote meta masks without a word; global failed in Tensor.item()."""
    with torch.device("meta"):
        layer = nn.Linear(4, 6)
    for scope in ("local", "global"):
        with pytest.raises(ValueError, match=r"cannot prune Linear.weight: on the meta device, with no values to "
                                             r"rank; give the model its weights first"):
            prune_([(layer, "weight")], "l1_unstructured", 0.5, scope=scope)
    assert not hasattr(layer, "weight_mask")


def _channels_last_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)).to(memory_format=torch.channels_last)


def _transposed_linear() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 6))
    for layer in model:
        layer.weight = nn.Parameter(layer.weight.detach().t().contiguous().t())  # same values, strides swapped
    return model


@pytest.mark.parametrize("build", [_channels_last_conv, _transposed_linear])
@pytest.mark.parametrize(("method", "scope", "kwargs"), [
    ("l1_unstructured", "global", {}), ("l1_unstructured", "local", {}), ("random_unstructured", "global", {}),
    ("random_unstructured", "local", {}), ("ln_structured", "local", dict(n=2, dim=0)),
])
def test_channels_last_and_transposed_weights_get_the_masks_of_their_contiguous_copies(build, method, scope, kwargs):
    """Every path but global L1 failed at the first round ("view size is not compatible with input tensor's size
    and stride"), leaving the parameters reordered; the layout is the user's and stays."""
    model, reference = build(), build()
    for layer in reference:
        layer.weight = nn.Parameter(layer.weight.detach().contiguous())
    for _ in range(2):  # a first round on the layout, then one on its masks
        for pruned in (model, reference):
            torch.manual_seed(1)  # the random methods draw alike
            prune_(default_targets(pruned), method, 0.4, scope=scope, **kwargs)
    for layer, contiguous in zip(model, reference):
        assert not layer.weight_orig.is_contiguous()  # not moved to another layout
        assert torch.equal(layer.weight_mask, contiguous.weight_mask)
        assert torch.equal(layer.weight, contiguous.weight)
        assert [name for name, _ in layer.named_parameters()] == ["weight_orig", "bias"]


class FailingMethod(torch_prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: float) -> None:
        self.amount = amount

    def compute_mask(self, t, default_mask):
        raise RuntimeError("no mask today")


def test_a_round_that_fails_keeps_the_parameter_order():
    """torch undoing a failed re-parametrisation registers the weight again, after the bias: the order the README
    promises was lost (an optimizer built from `parameters()` afterwards took them in another order)."""
    layer = nn.Linear(4, 3)
    with pytest.raises(RuntimeError, match="no mask today"):
        prune_([(layer, "weight")], FailingMethod, 0.5, scope="local")
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"] and not is_pruned(layer, "weight")


def test_global_importance_scores_rank_the_entries():
    """They were passed as the method's own arguments, which no constructor takes, and dropped: the weights' own
    magnitudes were ranked."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    reference = copy.deepcopy(model)
    scores = {id(layer): torch.randn(layer.weight.shape).t().contiguous().t() for layer in model}  # non-contiguous
    prune_(default_targets(model), "l1_unstructured", 0.5,
           importance_scores={(layer, "weight"): scores[id(layer)] for layer in model})
    torch_prune.global_unstructured(
        default_targets(reference), torch_prune.L1Unstructured, amount=0.5,
        importance_scores={(ref, "weight"): scores[id(layer)].contiguous() for layer, ref in zip(model, reference)})
    for layer, ref in zip(model, reference):
        assert torch.equal(layer.weight_mask, ref.weight_mask)
    with pytest.raises(TypeError, match=re.escape("expected a dict {(module, name): tensor}")):
        prune_(default_targets(model), "l1_unstructured", 0.5, importance_scores=torch.ones(3))
    fresh = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"the scores of Linear.weight are a list; give a tensor of its shape \(3, 4\)"):
        prune_(default_targets(fresh), "l1_unstructured", 0.5,
               importance_scores={(fresh[0], "weight"): [[1.0] * 4] * 3})
    assert not any(torch_prune.is_pruned(layer) for layer in fresh)  # a TypeError, as a local round's is


@pytest.mark.parametrize("scope, scores, message", [
    # ranked in another tensor's places, silently (same count), or torch's IndexError naming neither
    ("global", lambda a: {(a, "weight"): torch.rand(8, 16)},
     r"the scores of Linear.weight have shape \(8, 16\); give a tensor of its shape \(16, 8\)"),
    ("global", lambda a: {(a, "weight"): torch.rand(3, 3)}, r"have shape \(3, 3\); give a tensor of its shape"),
    # torch's assert, after the first target was masked
    ("local", lambda a: torch.rand(16, 8), r"of shape \(16, 8\), and Linear.weight \(4, 16\), Conv2d.weight "
                                           r"\(4, 2, 3, 3\) have another shape"),
])
def test_importance_scores_of_another_shape_are_refused_before_any_target_is_masked(scope, scores, message):
    from litcompress.pruning.engine import prune_to_sparsity_

    for prune in (prune_, prune_to_sparsity_):  # (the latter prunes a local round target by target)
        a, b = nn.Linear(8, 16), nn.Linear(16, 4)
        conv = nn.Conv2d(2, 4, 3).to(memory_format=torch.channels_last)  # re-parametrised to prune it: not yet
        with pytest.raises(ValueError, match=message):
            prune([(a, "weight"), (b, "weight"), (conv, "weight")], "l1_unstructured", 0.5, scope=scope,
                  importance_scores=scores(a))
        assert not any(torch_prune.is_pruned(m) for m in (a, b, conv))


@pytest.mark.parametrize("how", [dict(), dict(scope="local"), dict(importance_scores=None),
                                 dict(method="ln_structured", scope="local", n=2, dim=0)],
                         ids=["global", "local", "scores None", "ln_structured"])
def test_a_magnitude_round_on_a_diverged_model_names_the_nan_tensor_and_leaves_the_model_as_it_was(how):
    """Every target got its mask (all ones) before the NaN was found, by index ("scores[1] contains NaN"): the
    model's state dict no longer loaded into its architecture, and which layer had diverged went unsaid. Off the
    global L1 path (per layer, structured, importance_scores=None) torch ranked NaN as the largest value: kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    parameters = [id(p) for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # named by its path in the model: "Linear.weight" did not say which of three Linear layers had diverged
    with pytest.raises(ValueError, match=r"prune_: 2\.weight holds NaN \(training diverged\?\), which magnitude "
                                         r"pruning cannot rank; nothing was pruned"):
        prune_model_(model, amount=0.5, **how)
    with pytest.raises(ValueError, match=r"prune_: Linear\.weight holds NaN"):  # targets alone: their class
        prune_([(m, "weight") for m in model if isinstance(m, nn.Linear)], "l1_unstructured", 0.5, scope="local")
    assert list(model.state_dict()) == list(state) and [id(p) for p in model.parameters()] == parameters
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items() if k != "2.weight")  # (NaN != NaN)
    assert torch.equal(model[2].weight.nan_to_num(), state["2.weight"].nan_to_num())


def test_a_gradual_pruner_and_the_callback_name_a_diverged_tensor_by_its_path(tmp_path):
    """Their rounds said "Linear.weight" of a model with three Linear layers."""
    import lightning as L

    from litcompress import ModelPruning
    from litcompress.pruning.gradual import GradualPruner

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    targets = [(m, "weight") for m in model if isinstance(m, nn.Linear)]
    pruner = GradualPruner(targets, ConstantSparsity(0.5, begin=0, end=10, frequency=1), "l1_unstructured",
                           scope="local", target_names=["0.weight", "2.weight", "4.weight"])
    with pytest.raises(ValueError, match=r"prune_: 2\.weight holds NaN"):
        pruner.step(0)

    class Diverged(MLPClassifier):
        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 1:  # the last: after its step, before the callback's round at the epoch's end
                with torch.no_grad():
                    self.net[2].weight[0, 0] = float("nan")

    module = Diverged(in_features=64, hidden=[16, 16])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 64),
                                                                      torch.randint(0, 10, (16,))), batch_size=8)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[ModelPruning("l1_unstructured", amount=0.5)])
    with pytest.raises(ValueError, match=r"prune_: net\.2\.weight holds NaN"):
        trainer.fit(module, data)


def test_a_nan_already_pruned_or_a_method_of_ones_own_is_let_be_in_a_round_per_layer():
    """The refusal of NaN scanned the pruned entries too, and took a subclass of torch's method (which may rank NaN
    itself) for torch's: rounds that ran before were refused."""
    class NanLast(torch_prune.L1Unstructured):
        def compute_mask(self, t, default_mask):
            return super().compute_mask(torch.nan_to_num(t, nan=0.0), default_mask)

    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    torch_prune.l1_unstructured(layer, "weight", amount=0.5)
    with torch.no_grad():
        row, column = (layer.weight_mask == 0).nonzero()[0]
        layer.weight_orig[row, column] = float("nan")
    prune_([(layer, "weight")], "l1_unstructured", 0.5, scope="local")
    assert int((layer.weight_mask == 0).sum()) == 48 and layer.weight_mask[row, column] == 0
    fresh = nn.Linear(8, 8)
    with torch.no_grad():
        fresh.weight[0, 0] = float("nan")
    prune_([(fresh, "weight")], NanLast, 0.5, scope="local")
    assert int((fresh.weight_mask == 0).sum()) == 32 and fresh.weight_mask[0, 0] == 0
    # structured, a row's norm over orig * mask is NaN for a NaN under a zero too: the row would rank largest
    with pytest.raises(ValueError, match="holds NaN"):
        prune_([(layer, "weight")], "ln_structured", 4, scope="local", n=1, dim=0)
    # and on the path that prunes a grouped conv's slices evenly, which ranks norms itself
    from litcompress.pruning import prune_to_sparsity_

    conv = nn.Conv2d(4, 8, 1)
    with torch.no_grad():
        conv.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="holds NaN"):
        prune_to_sparsity_([(conv, "weight")], "ln_structured", 0.5, scope="local", n=2, dim=0,
                           slice_groups={(conv, "weight"): 2})
    assert not is_pruned(conv, "weight")
    # a layer done already, with a NaN in a row it pruned, does not stop the round of the others (it is not ranked)
    done, other = nn.Linear(4, 8), nn.Linear(8, 8)
    prune_to_sparsity_([(done, "weight")], "ln_structured", 0.25, scope="local", n=2, dim=0)
    with torch.no_grad():
        done.weight_orig[int((done.weight_mask.sum(1) == 0).nonzero()[0]), 0] = float("nan")
    assert prune_to_sparsity_([(done, "weight"), (other, "weight")], "ln_structured", 0.25, scope="local", n=2,
                              dim=0) == 16
    # a NaN in a later target is refused before the earlier ones are pruned ("nothing was pruned" was said of a
    # call that had pruned the first target)
    first, diverged = nn.Linear(4, 4), nn.Linear(4, 4)
    with torch.no_grad():
        diverged.weight[0, 0] = float("nan")
    for method in ("l1_unstructured", "ln_structured"):
        with pytest.raises(ValueError, match="nothing was pruned"):
            prune_to_sparsity_([(first, "weight"), (diverged, "weight")], method, 0.5, scope="local", n=2, dim=0)
        assert not is_pruned(first, "weight") and not is_pruned(diverged, "weight")


def test_a_refused_scope_or_method_leaves_a_channels_last_target_as_it_was():
    """The arguments were checked after channels_last targets were re-parametrised (an identity mask): a refused call
    changed the model's state dict keys."""
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    for method, kwargs, error in (("ln_structured", dict(scope="global", n=2, dim=0), ValueError),
                                  ("l1_unstructured", dict(scope="Global"), ValueError),
                                  ("l1_unstructured", dict(scope="local", importance_scores={}), TypeError)):
        with pytest.raises(error):
            prune_([(conv, "weight")], method, 0.5, **kwargs)
        assert sorted(conv.state_dict()) == ["bias", "weight"] and not is_pruned(conv, "weight")


class _RootWeight(nn.Module):
    """A model holding a parameter at its root, as a low-rank or a tied head does."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(x @ self.weight)


def test_a_fabric_wrapped_model_is_pruned_and_saved_as_the_model_it_wraps():
    """Fabric's wrapper hands its module's attributes through: default_targets took `_FabricModule.weight` for a
    tensor of its own (prune_model_ then failed: "has no tensor 'weight'"), and permanent_state_dict, matching keys
    by module path (`_forward_module.0`), returned the masked pairs, which no unpruned model loads."""
    from lightning.fabric import Fabric

    from litcompress.report.size import model_size_bytes

    torch.manual_seed(0)
    fabric = Fabric(accelerator="cpu", devices=1)
    wrapped = fabric.setup(_RootWeight())
    prune_model_(wrapped, amount=0.5)
    assert is_pruned(wrapped.module, "weight") and is_pruned(wrapped.module.head, "weight")
    plain = permanent_state_dict(wrapped)
    assert sorted(plain) == ["head.bias", "head.weight", "weight"]
    fresh = _RootWeight()
    fresh.load_state_dict(plain)  # strict
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), wrapped(x))
    assert model_size_bytes(wrapped) == model_size_bytes(wrapped.module)


def test_prune_model_refuses_names_that_prune_nothing_and_says_what_it_leaves_dense():
    """parameter_names='weight' was iterated by character and a misspelt name pruned nothing, both without a word;
    a weight_norm layer (torch's pruning cannot mask it) was left dense silently."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(TypeError, match=r"parameter_names='weight'\): expected a list of tensor names"):
        prune_model_(model, parameter_names="weight")
    with pytest.raises(ValueError, match=r"no module of Sequential has a \['wieght'\] tensor it can prune; its "
                                         r"tensors are named \['bias', 'weight'\]"):
        prune_model_(model, parameter_names=("wieght",))
    assert not is_pruned(model[0], "weight")
    model[0] = nn.utils.weight_norm(model[0])
    with pytest.warns(UserWarning, match=r"prune_model_ leaves out 1 parametrized tensor\(s\), which "
                                         r"torch.nn.utils.prune cannot mask: 0.weight"):
        targets = prune_model_(model, amount=0.5)
    assert [(type(m).__name__, n) for m, n in targets] == [("Linear", "weight")] and is_pruned(model[2], "weight")


@pytest.mark.parametrize(("method", "kwargs", "message"), [
    ("l1_unstructured", {"importance_score": None}, r"L1Unstructured takes no 'importance_score': did you mean "
                                                     r"'importance_scores'\?"),
    ("ln_structured", {"n": 2, "dimm": 0}, r"LnStructured takes no 'dimm': did you mean 'dim'\?"),
])
def test_prune_refuses_a_misspelt_method_argument(method, kwargs, message):
    """It was dropped without a word (plain magnitude pruning ran instead of the importance scores given), or
    failed inside torch ("apply() missing 1 required positional argument: 'dim'"). Arguments of other methods
    still pass (one call serves several: see test_later_rounds_rank_the_weights_as_they_are_now)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(TypeError, match=message):
        prune_([(model[0], "weight")], method, 0.5, scope="local", **kwargs)
    assert not is_pruned(model[0], "weight")


@pytest.mark.parametrize("prune", ["prune_", "prune_to_sparsity_"])
@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({}, TypeError, r"LnStructured needs 'dim', 'n': pass dim=0"),
    ({"n": 2, "dim": 5}, ValueError, r"dim=5 is not a dimension of every tensor pruned \(some have 2\)"),
])
def test_the_engines_functions_refuse_missing_or_impossible_structured_arguments_before_pruning(prune, kwargs, error,
                                                                                                message):
    """They failed inside torch, with its words ("apply() missing 2 required positional arguments", "tuple index out
    of range"), where GradualPruner and the callbacks said what to pass."""
    from litcompress.pruning import prune_to_sparsity_

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    targets = [(model[0], "weight"), (model[2], "weight")]
    function = prune_ if prune == "prune_" else prune_to_sparsity_
    with pytest.raises(error, match=f"{prune}: {message}"):
        function(targets, "ln_structured", 0.5, scope="local", **kwargs)
    assert not is_pruned(model[0], "weight") and not is_pruned(model[2], "weight")
    # another method's arguments still pass (one call serves several), its `dim` unchecked for this method
    prune_(targets, "l1_unstructured", 0.25, dim=5, n=2)
    with pytest.raises(ValueError, match=r"`sparsity` must be a number in \[0, 1\], got '0.5'"):
        prune_to_sparsity_(targets, "l1_unstructured", "0.5")  # type: ignore[arg-type]


def test_restore_masks_names_a_mask_the_model_has_no_place_for_or_skips_it_when_not_strict():
    from litcompress.pruning import restore_masks_

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    masks = {"0.weight": torch.ones(3, 4), "2.weight": torch.zeros(2, 3), "4.weight": torch.ones(2, 3)}
    with pytest.raises(ValueError, match=r"a saved pruning mask is for '4.weight' of shape \(2, 3\), and Sequential "
                                         r"has no such tensor.*strict=False"):
        restore_masks_(model, masks)
    assert not is_pruned(model[0], "weight")  # checked before any mask was set
    with pytest.raises(ValueError, match=r"for '2.weight' of shape \(2, 5\), and Sequential has one of shape \(2, 3\)"):
        restore_masks_(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), {"2.weight": torch.ones(2, 5)})
    touched = restore_masks_(model, masks, strict=False)
    assert [(type(m).__name__, n) for m, n in touched] == [("Linear", "weight")] * 2
    assert is_pruned(model[2], "weight") and int(model[2].weight.count_nonzero()) == 0


class _SmallestScores(torch_prune.BasePruningMethod):
    """A custom unstructured method on torch's own `apply` (which takes `importance_scores`)."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount, **options):  # extra options, as **kwargs
        self.amount, self.options = amount, options

    def compute_mask(self, t, default_mask):
        k = torch_prune._compute_nparams_toprune(self.amount, t.numel())
        mask = default_mask.clone()
        if k:
            mask.view(-1)[torch.topk(t.reshape(-1), k, largest=False).indices] = 0
        return mask


def test_importance_scores_reach_a_custom_method_locally_and_globally():
    """Locally they were dropped (the constructor does not take them, torch's apply does): ranked by the weights,
    silently; globally a constructor taking **kwargs got them twice ("multiple values for keyword argument")."""
    scores = torch.arange(30.0).reshape(5, 6)  # the first 15 entries least important
    torch.manual_seed(0)
    local = nn.Linear(6, 5)
    prune_([(local, "weight")], _SmallestScores, 0.5, scope="local", importance_scores=scores)
    assert local.weight_mask.reshape(-1).tolist() == [0.0] * 15 + [1.0] * 15
    pair = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    prune_([(pair[0], "weight"), (pair[1], "weight")], _SmallestScores, 10,
           importance_scores={(pair[0], "weight"): scores, (pair[1], "weight"): torch.full((4, 5), 1e3)})
    assert pair[0].weight_mask.reshape(-1).tolist() == [0.0] * 10 + [1.0] * 20 and bool(pair[1].weight_mask.all())


def test_global_importance_scores_keyed_by_a_tied_holder_count_and_a_key_naming_no_target_is_refused():
    """Scores keyed by a tied matrix's second holder (the round keeps its first) were ignored, as was a misspelt
    key; the dict given to a local round failed with "'dict' object has no attribute 'shape'"."""
    emb, mid = nn.Embedding(6, 4), nn.Linear(4, 4)
    head = nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    targets = [(emb, "weight"), (mid, "weight"), (head, "weight")]
    prune_(targets, "l1_unstructured", 10, importance_scores={(head, "weight"): torch.full((6, 4), 100.0)})
    assert bool(emb.weight_mask.all()) and int((mid.weight_mask == 0).sum()) == 10
    with pytest.raises(ValueError, match=r"the key \(Linear, 'weights'\) names no target of this round"):
        prune_([(nn.Linear(4, 4), "weight")], "l1_unstructured", 3, importance_scores={(mid, "weights"): None})
    with pytest.raises(TypeError, match=r"scope='local'.*one tensor of scores.*is for scope='global'"):
        prune_([(mid, "weight")], "l1_unstructured", 0.5, scope="local",
               importance_scores={(mid, "weight"): torch.ones(4, 4)})


def test_a_global_round_interrupted_while_writing_masks_leaves_the_weights_it_masked_anew_as_they_were(monkeypatch):
    """The undo removed the new masks with torch's `remove`, which multiplies the mask in: the part of the round
    already written into a new mask became permanent zeros."""
    from litcompress.pruning import threshold

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(0.1)  # all below the other layer's: the round empties it first
        model[1].weight.fill_(0.5)
    before = [layer.weight.detach().clone() for layer in model]

    def interrupted(*args, **kwargs):  # a Ctrl-C while the ties of the second tensor are written
        raise KeyboardInterrupt

    monkeypatch.setattr(threshold, "_prune_first_ties", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune_([(model[0], "weight"), (model[1], "weight")], "l1_unstructured", 20)
    assert not any(is_pruned(layer, "weight") for layer in model)
    assert all(torch.equal(layer.weight, weight) for layer, weight in zip(model, before))


def test_prune_model_says_which_recurrent_layers_its_weight_name_leaves_dense():
    """An LSTM's matrices are weight_ih_l0, ...: prune_model_ pruned the Linear layers only, without a word; the names
    it suggests prune them all (a cell's are weight_ih, weight_hh; a second layer's weight_ih_l1, ...)."""
    model = nn.ModuleDict({"lstm": nn.LSTM(4, 8, num_layers=2), "cell": nn.GRUCell(4, 8), "head": nn.Linear(8, 3)})
    with pytest.warns(UserWarning, match=r"prune_model_: 2 recurrent layer\(s\) keep weight matrices dense \(lstm, "
                                         r"cell\): those are not named 'weight' \(lstm: weight_ih_l0, weight_hh_l0, "
                                         r"weight_ih_l1, weight_hh_l1\)") as said:
        targets = prune_model_(model, amount=0.5)
    assert targets == [(model["head"], "weight")]
    suggested = re.search(r"parameter_names=(\[.*\])\.", str(said[0].message)).group(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        named = prune_model_(model, amount=0.5, parameter_names=eval(suggested))  # the names it said
    assert {(type(m).__name__, n) for m, n in named} >= {("LSTM", "weight_hh_l1"), ("GRUCell", "weight_ih")}
    partly = nn.ModuleDict({"lstm": nn.LSTM(4, 8, num_layers=2), "head": nn.Linear(8, 3)})
    with pytest.warns(UserWarning, match=r"\(lstm: weight_ih_l1, weight_hh_l1\)"):  # layer 1 left: said too
        prune_model_(partly, amount=0.5, parameter_names=["weight", "weight_ih_l0", "weight_hh_l0"])


@pytest.mark.parametrize("kdim", [None, 6])
def test_prune_model_says_which_attention_projections_its_weight_name_leaves_dense(kdim):
    """An attention's input projections are in_proj_weight (or q/k/v_proj_weight): left dense without a word, the
    largest matrices of a transformer layer."""
    layer = nn.TransformerEncoderLayer(16, 2, 32) if kdim is None else nn.ModuleDict(
        {"attn": nn.MultiheadAttention(16, 2, kdim=kdim, vdim=kdim), "head": nn.Linear(16, 2)})
    path = "self_attn" if kdim is None else "attn"
    matrices = ["in_proj_weight"] if kdim is None else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    with pytest.warns(UserWarning, match=rf"prune_model_: 1 attention layer\(s\) keep weight matrices dense "
                                         rf"\({path}\): those are not named 'weight' \({path}: "
                                         rf"{', '.join(matrices)}\)") as said:
        prune_model_(layer, amount=0.5)
    suggested = re.search(r"parameter_names=(\[.*\])\.", str(said[0].message)).group(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        named = prune_model_(layer, amount=0.5, parameter_names=eval(suggested))
    assert {n for _, n in named} >= set(matrices)


def test_a_pruned_state_loaded_under_inference_mode_trains_afterwards():
    """The masks load_pruned_state_dict made under inference mode (a model loaded for evaluation) were inference
    tensors: the next training forward failed ("Inference tensors cannot be saved for backward")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    prune_model_(model, amount=0.5)
    fresh = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with torch.inference_mode():
        load_pruned_state_dict(fresh, model.state_dict())
        torch.testing.assert_close(fresh(x), model(x))
    assert not fresh[0].weight_mask.is_inference()
    fresh(x).sum().backward()
    assert fresh[0].weight_orig.grad is not None
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.inference_mode():  # made permanent there: the weights were inference tensors
        load_pruned_state_dict(plain, model.state_dict(), keep_masks=False)
    assert not plain[0].weight.is_inference()
    plain(x).sum().backward()
    with torch.inference_mode():  # a model built under inference mode loads there as before
        built_there = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        torch.testing.assert_close(load_pruned_state_dict(built_there, model.state_dict())(x), model(x))


@given(rows=st.integers(1, 12), sparsity=st.floats(0.0, 0.999), multiple=st.sampled_from([None, 2, 4]))
@settings(max_examples=40, deadline=None)
def test_structured_rounds_never_prune_every_row_of_a_layer(rows, sparsity, multiple):
    """0.75 of 2 units rounded to both and 0.96 of 10 rows to all ten: the layer's output was a constant (the model
    lost its input there), and shrink removed nothing. One row (a multiple of keep_multiple_of) stays."""
    from litcompress.pruning.engine import prune_to_sparsity_

    layer = nn.Linear(3, rows)
    prune_to_sparsity_([(layer, "weight")], "ln_structured", sparsity, scope="local", dim=0, n=1,
                       keep_multiple_of=multiple)
    kept = int((layer.weight != 0).any(dim=1).sum())
    assert kept >= (1 if multiple is None else min(rows, multiple))
    assert kept == rows - min(round(sparsity * rows), rows - 1) or multiple is not None


class _RowsOnly(torch_prune.BasePruningMethod):
    """Structured, always along rows, and no `dim` to say so."""

    PRUNING_TYPE = "structured"

    def __init__(self, amount: float | int) -> None:
        self.amount = amount

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        kept = default_mask.flatten(1).any(1)
        count = self.amount if isinstance(self.amount, int) else round(self.amount * int(kept.sum()))
        norms = (t * default_mask).abs().flatten(1).sum(1).masked_fill(~kept, float("inf"))
        mask = default_mask.clone()
        mask[torch.argsort(norms, stable=True)[:count]] = 0
        return mask


class _RowsAlongItsDim(_RowsOnly):
    """The same, with a `dim` whose default says which slices it prunes."""

    def __init__(self, amount: float | int, dim: int = 0) -> None:
        super().__init__(amount)
        self.dim = dim


class _AtMostATenth(torch_prune.BasePruningMethod):
    """Unstructured, but masks |w| <= 0.1 whatever `amount` asks."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: float | int) -> None:
        self.amount = amount

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return default_mask * (t.abs() > 0.1)


def test_a_structured_method_of_ones_own_is_counted_along_its_own_dim_or_refused_without_one():
    """Its slices were counted along the last dim whichever it pruned: 25% of a 16-column weight read as 4 rows,
    of 8 (of 4: the layer emptied), silently; one without `dim` cannot be counted, and is refused when built."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from litcompress import ModelPruning, PruneConfig
    from litcompress.pruning import GradualPruner
    from litcompress.pruning.engine import prune_to_sparsity_
    from litcompress.pruning.schedules import PolynomialDecay

    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    for sparsity, rows in ((0.25, 2), (0.5, 4)):
        prune_to_sparsity_([(layer, "weight")], _RowsAlongItsDim, sparsity, scope="local")
        assert int((layer.weight_mask.sum(1) == 0).sum()) == rows and int((layer.weight_mask == 0).sum()) == rows * 16
    schedule = PolynomialDecay(final_sparsity=0.5, begin=0, end=4, frequency=2)
    message = "_RowsOnly is structured .* has no `dim`: the slices it prunes cannot be counted"
    with pytest.raises(TypeError, match=message):
        prune_to_sparsity_([(nn.Linear(16, 8), "weight")], _RowsOnly, 0.25, scope="local")
    with pytest.raises(TypeError, match=message):
        GradualPruner([(nn.Linear(16, 8), "weight")], schedule, method=_RowsOnly, scope="local")
    with pytest.raises(MisconfigurationException, match=message):
        ModelPruning(_RowsOnly, amount=schedule, use_global_unstructured=False)
    ModelPruning(_RowsOnly, amount=0.5, use_global_unstructured=False)  # a fixed amount: one round per tensor works
    once = nn.Linear(16, 8)
    prune_([(once, "weight")], _RowsOnly, 0.25, scope="local")  # one round: torch needs no dim
    before = once.weight_mask.clone()
    with pytest.raises(TypeError, match=message):  # torch's AttributeError, on a second round
        prune_([(once, "weight")], _RowsOnly, 0.25, scope="local")
    assert torch.equal(once.weight_mask, before)
    with pytest.raises(TypeError, match=message):
        PruneConfig(method=_RowsOnly, sparsity=0.5)

    class ForwardsItsDim(torch_prune.RandomStructured):  # a `dim` through **kwargs, -1 by torch's default
        def __init__(self, amount: float, **kwargs: Any) -> None:
            super().__init__(amount, **kwargs)

    columns = nn.Linear(8, 4)
    prune_to_sparsity_([(columns, "weight")], ForwardsItsDim, 0.5, scope="local")
    assert int((columns.weight_mask.sum(0) == 0).sum()) == 4


def test_a_grouped_structured_round_ranks_the_slices_its_method_masks():
    """With slice_groups, the slices were ranked along the last dim while the method's own dim (0) was masked: the
    rows at the places of the weakest columns went."""
    from litcompress.pruning.engine import prune_to_sparsity_

    layer = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 9.0).view(8, 1).expand(8, 8).clone())  # row r has norm 8 * (r + 1)
        layer.weight[:, [2, 3, 6, 7]] *= 0.01  # the weakest columns elsewhere
    prune_to_sparsity_([(layer, "weight")], _RowsAlongItsDim, 0.5, scope="local",
                       slice_groups={(layer, "weight"): 2})
    assert (layer.weight_mask.sum(1) == 0).nonzero().flatten().tolist() == [0, 1, 4, 5]  # the weakest 2 of each half


def test_a_method_that_prunes_another_number_than_its_amount_is_said_to_miss_the_target():
    """A threshold method of one's own ignores `amount`: the exact target was missed, silently (and recorded as
    reached by the schedules)."""
    from litcompress.pruning.engine import prune_to_sparsity_

    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    with pytest.warns(UserWarning, match=r"_AtMostATenth did not prune the `amount` it was given, so the target "
                                         r"sparsity 80.00% was not reached exactly \(Linear.weight: \d+ entries "
                                         r"pruned, 102 asked\)"):
        prune_to_sparsity_([(layer, "weight")], _AtMostATenth, 0.8, scope="local")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune_to_sparsity_([(nn.Linear(16, 8), "weight")], "l1_unstructured", 0.8, scope="local")
        prune_to_sparsity_([(nn.Linear(16, 8), "weight")], _RowsAlongItsDim, 0.5, scope="local")


@pytest.mark.parametrize("call", ["prune_", "prune_to_sparsity_"])
def test_a_norm_that_does_not_apply_to_a_later_target_is_refused_before_the_first_is_pruned(call):
    """'nuc' needs two dims besides `dim`: torch failed on the Linear after the Conv1d was pruned (half a round)."""
    from litcompress.pruning.engine import prune_to_sparsity_

    conv, linear = nn.Conv1d(4, 6, 3), nn.Linear(8, 6)
    function = prune_ if call == "prune_" else prune_to_sparsity_
    with pytest.raises(ValueError, match=r"n='nuc' does not apply to Linear.weight of shape \(6, 8\): torch takes it "
                                         r"over the 1 dimension\(s\) besides dim=0"):
        function([(conv, "weight"), (linear, "weight")], "ln_structured", 0.5, scope="local", n="nuc", dim=0)
    assert not is_pruned(conv, "weight") and not is_pruned(linear, "weight")
    function([(conv, "weight")], "ln_structured", 0.5, scope="local", n="nuc", dim=0)  # two dims besides dim 0
    assert int((conv.weight_mask.flatten(1).sum(1) == 0).sum()) == 3


@pytest.mark.parametrize("method", ["random_unstructured", "random_structured"])
def test_a_random_method_on_zeros_made_permanent_is_said_to_overshoot_and_masking_them_first_hits_the_target(method):
    """After make_permanent_ at 50%, a random round to 60% drew the zeros again: 212 of 260 entries zero (81.5%),
    without a word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    kwargs = {"dim": 0} if method == "random_structured" else {}
    targets = [(model[0], "weight"), (model[2], "weight")]
    prune_to_sparsity_(targets, "l1_unstructured" if not kwargs else "ln_structured", 0.5, scope="local",
                       **({"n": 1, **kwargs} if kwargs else {}))
    make_permanent_(model)
    with pytest.warns(UserWarning, match=re.escape(
            "prune_to_sparsity_: 130 entries of targets without a pruning mask are exactly zero (pruned, then made "
            "permanent?); ") if not kwargs else "entries of targets without a pruning mask are exactly zero") as said:
        prune_to_sparsity_(targets, method, 0.6, scope="local", **kwargs)
    assert [w.filename for w in said if "exactly zero" in str(w.message)] == [__file__]  # the user's call
    make_permanent_(model)
    pruner = GradualPruner(targets, ConstantSparsity(0.8), method, scope="local", **kwargs)
    with pytest.warns(UserWarning, match="entries of targets without a pruning mask are exactly zero") as said:
        pruner.step(0)  # through the pruner: said at this call, not inside litcompress
    assert {w.filename for w in said if "exactly zero" in str(w.message)} == {__file__}
    embedding, zeros = nn.Embedding(10, 4, padding_idx=0), nn.Embedding(10, 4, padding_idx=0)
    nn.init.zeros_(zeros.weight)  # its padding row is zero by design, and a tensor of zeros only initialised so
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for table in (embedding, zeros):
            prune_to_sparsity_([(table, "weight")], method, 0.5, **({"dim": 0} if kwargs else {}), scope="local")
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    targets = [(model[0], "weight"), (model[2], "weight")]
    with torch.no_grad():
        model[0].weight[:10] = 0.0  # half the rows: as a structured round at 50% leaves them
        model[2].weight[:, :10] = 0.0
    for module, name in targets:  # the remedy the warning gives
        apply_mask_(module, name, getattr(module, name) != 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune_to_sparsity_(targets, method, 0.6, scope="local", **kwargs)
    if kwargs:
        assert int((model[0].weight == 0).all(dim=1).sum()) == 12  # 60% of 20 rows
    else:
        assert [int((m.weight == 0).sum()) for m, _ in targets] == [120, 36]  # round(0.6 * 200), round(0.6 * 60)


def test_deepcopy_model_copies_a_module_holding_step_outputs_with_their_graphs():
    """A module keeping its steps' outputs (a LightningModule's `self.outputs.append({"loss": loss})`, a deque of
    recent losses, a dataclass) after a forward with grad on: torch's deepcopy refused their non-leaf tensors."""

    @dataclasses.dataclass
    class StepOutput:
        loss: torch.Tensor

    model = nn.Sequential(nn.Linear(4, 3))
    prune_([(model[0], "weight")], "l1_unstructured", 0.5)
    holders = {"outputs": lambda loss: [{"loss": loss}, (loss,)], "recent": lambda loss: collections.deque([loss]),
               "last": StepOutput, "deep": lambda loss: [[[[[[loss]]]]]]}
    for name, hold in holders.items():  # each its own tensor: one reached through another holder is copied anyway
        setattr(model, name, hold(model(torch.randn(2, 4)).sum()))
    shared = model(torch.randn(2, 4)).sum()
    model.twice = [shared, {"again": shared}]
    copied = deepcopy_model(model)
    assert not copied.outputs[0]["loss"].requires_grad and torch.equal(copied.outputs[0]["loss"],
                                                                       model.outputs[0]["loss"].detach())
    assert torch.equal(copied.recent[0], model.recent[0].detach()) and copied.last.loss.shape == ()
    assert copied.twice[0] is copied.twice[1]["again"]  # one tensor, one copy
    assert torch.equal(copied[0].weight_mask, model[0].weight_mask)


def test_deepcopy_model_reads_each_container_once():
    """A graph of dataclass nodes referring to each other was walked once per path (30 nodes: 1.8 s, n^4)."""
    from litcompress.pruning.engine import _tensors_held

    class CountedList(list):
        reads = 0

        def __iter__(self):
            CountedList.reads += 1
            return super().__iter__()

    @dataclasses.dataclass(eq=False)
    class Node:
        edges: CountedList

    nodes = CountedList(Node(CountedList()) for _ in range(30))
    for node in nodes:
        node.edges.extend(nodes)
    CountedList.reads = 0  # (building the graph read them too)
    held = list(_tensors_held([nodes, torch.ones(1)]))
    # the 30 nodes' edges and the list of nodes: each read again only from nearer the top (8 levels at most), where
    # a walk per path read them 30^k times
    assert len(held) == 1 and CountedList.reads <= 8 * 31
    model = nn.Linear(2, 2)
    model.graph = nodes
    assert deepcopy_model(model).graph[0].edges[1] is not nodes[1]
    # a container first met deep, where the levels ran out above its tensor, is read again from nearer the top
    loss = model(torch.randn(1, 2)).sum()
    inner = [[loss]]
    deep = [[[[[[[inner]]]]]]]  # inner at level 8: its tensor out of reach from here
    assert list(_tensors_held([deep, inner])) == [loss]


class _DecoderWithModuleActivation(nn.Module):
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, activation=activation, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x, x))


@pytest.mark.parametrize("activation", [nn.GELU(), nn.Sigmoid(), nn.SiLU()], ids=lambda a: type(a).__name__)
def test_copies_of_a_decoder_layer_with_a_module_activation_compute_what_it_computes(activation):
    """torch's `TransformerDecoderLayer.__setstate__` (run by deepcopy) sets `F.relu` in the copy's own dict over a
    module activation: shrink's copy, a distillation teacher and every quantization candidate computed a ReLU
    (outputs 0.04-0.23 off)."""
    from litcompress.distillation import Distiller

    torch.manual_seed(0)
    model = _DecoderWithModuleActivation(activation).eval()
    x = torch.randn(4, 5, 16)
    with torch.no_grad():
        expected = model(x)
        copied = deepcopy_model(model)
        assert copied.layer.activation is not model.layer.activation and "activation" not in vars(copied.layer)
        torch.testing.assert_close(copied(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(shrink(model, (x,)).model(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(Distiller(model).teacher(x), expected, rtol=0, atol=0)
    assert type(model.layer.activation) is type(activation) and "activation" not in vars(model.layer)


def test_a_copy_of_a_decoder_layer_kept_outside_the_module_tree_computes_what_it_computes():
    """A frozen backbone kept out of `parameters()` (set with `object.__setattr__`) and one in a plain list are
    copied too: they were left with torch's `F.relu` over their activation."""

    class FrozenBackbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            object.__setattr__(self, "backbone", _DecoderWithModuleActivation(nn.GELU()))
            self.also = [_DecoderWithModuleActivation(nn.Sigmoid())]
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x) + self.also[0](x))

    torch.manual_seed(0)
    model = FrozenBackbone().eval()
    x = torch.randn(4, 5, 16)
    with torch.no_grad():
        copied = deepcopy_model(model)
        assert copied.backbone is not model.backbone and copied.also[0] is not model.also[0]
        torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)


def test_a_copy_keeps_what_its_original_computes_when_the_original_itself_was_read_back_with_the_shadow():
    """A layer unpickled (torch.load of a whole model) already holds torch's `F.relu` over its activation: the copy
    computes what the original does, not what it was first built to."""
    torch.manual_seed(0)
    model = pickle.loads(pickle.dumps(_DecoderWithModuleActivation(nn.GELU()).eval()))
    assert "activation" in vars(model.layer)  # (torch's __setstate__)
    x = torch.randn(4, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(deepcopy_model(model)(x), model(x), rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from([0.1, 0.3, 0.55, 0.7, 0.9]),
       st.sampled_from(["local", "global"]))
def test_a_numpy_float32_fraction_prunes_the_count_torchs_own_pruning_does(rows, columns, fraction, scope):
    """Taken as a float64, a float32 fraction counted one weight more or less than torch's functions (and so than
    Lightning's callback) at a .5 boundary: 15 weights x float32(0.3) pruned 5, torch 4 (60 of 1210 such layers)."""
    import numpy as np

    torch.manual_seed(rows * 100 + columns)
    theirs = nn.Linear(columns, rows)
    ours = copy.deepcopy(theirs)
    amount = np.float32(fraction)
    if scope == "local":
        torch_prune.l1_unstructured(theirs, "weight", amount=amount)
    else:
        torch_prune.global_unstructured([(theirs, "weight")], torch_prune.L1Unstructured, amount=amount)
    prune_([(ours, "weight")], "l1_unstructured", amount, scope=scope)
    assert int((ours.weight == 0).sum()) == int((theirs.weight == 0).sum())


def test_the_structured_refusal_of_a_norm_scale_names_targets_that_would_be_taken():
    """default_targets names every 'weight', a BatchNorm's scale too: the refusal's hint pointed at it, and following
    it was refused again. The hint names the layers with slices; taking them is accepted."""
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="BatchNorm1d.weight has one dimension") as refusal:
        prune_(default_targets(model), "ln_structured", 0.5, scope="local", n=2, dim=0)
    assert "default_targets" not in str(refusal.value)
    assert "Linear and Conv layers" in str(refusal.value)
    taken = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]
    prune_(taken, "ln_structured", 0.5, scope="local", n=2, dim=0)
    assert [int((m.weight.abs().sum(1) == 0).sum()) for m, _ in taken] == [8, 2]


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_l1_pruning_of_signed_integer_weights_ranks_their_minimum_as_the_largest_magnitude(dtype, scope):
    """abs() of an int8 -128 is -128 (torch's L1 method and the global ranking took it for the smallest magnitude);
    two rounds prune the two smallest magnitudes, and the mask keeps the tensor's dtype."""
    low = -(2**53) if dtype == torch.int64 else torch.iinfo(dtype).min
    module = nn.Module()
    module.weight = nn.Parameter(torch.tensor([[low, 100, -5, 7]], dtype=dtype), requires_grad=False)
    prune_([(module, "weight")], "l1_unstructured", 1, scope=scope)
    assert module.weight_mask.tolist() == [[1, 1, 0, 1]]
    prune_([(module, "weight")], "l1_unstructured", 1, scope=scope)
    assert module.weight_mask.tolist() == [[1, 1, 0, 0]]
    assert module.weight_mask.dtype == dtype and module.weight.dtype == dtype
    assert module.weight.tolist() == [[low, 100, 0, 0]]


@pytest.mark.parametrize("scope", ["local", "global"])
def test_l1_pruning_ranks_signed_integer_importance_scores_by_their_magnitudes(scope):
    module = nn.Module()
    module.weight = nn.Parameter(torch.randn(1, 4))
    scores = torch.tensor([[-128, 100, -5, 7]], dtype=torch.int8)
    given = scores if scope == "local" else {(module, "weight"): scores}
    prune_([(module, "weight")], "l1_unstructured", 1, scope=scope, importance_scores=given)
    assert module.weight_mask.tolist() == [[1, 1, 0, 1]] and module.weight_mask.dtype == torch.float32
    assert scores.tolist() == [[-128, 100, -5, 7]]
    big = nn.Module()
    big.weight = nn.Parameter(torch.tensor([[2**60 + 1, 2**60, -(2**60) - 3, 2**60 + 2]]), requires_grad=False)
    prune_([(big, "weight")], "l1_unstructured", 1, scope=scope)  # exact, not ranked in float64's roundings
    assert big.weight_mask.tolist() == [[1, 0, 1, 1]]
    for dtype in (torch.bool, torch.uint16, torch.uint64):  # torch has no abs of these (it failed in its words)
        module = nn.Module()
        module.weight = nn.Parameter(torch.randn(1, 4))
        scores = torch.tensor([[3, 1, 0, 2]]).to(dtype)
        prune_([(module, "weight")], "l1_unstructured", 1, scope=scope,
               importance_scores=scores if scope == "local" else {(module, "weight"): scores})
        assert module.weight_mask.tolist() == [[1, 1, 0, 1]], dtype
    masked = nn.Linear(4, 1, bias=False)  # a second round: torch made its mask in the scores' dtype
    prune_([(masked, "weight")], "l1_unstructured", 1, scope=scope)
    prune_([(masked, "weight")], "l1_unstructured", 1, scope=scope,
           importance_scores=(lambda s: s if scope == "local" else {(masked, "weight"): s})(torch.ones(1, 4).double()))
    assert masked.weight_mask.dtype == torch.float32 and int(masked.weight_mask.sum()) == 2


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8])
def test_ln_structured_takes_integer_importance_scores(dtype):
    """torch's vector_norm takes no integers: ln_structured with integer scores failed in its words."""
    layer = nn.Linear(4, 6)
    scores = (torch.arange(24).view(6, 4) % 7).to(dtype)  # row L1 norms 6, 15, 10, 12, 14, 9
    prune_([(layer, "weight")], "ln_structured", 0.5, scope="local", n=1, dim=0, importance_scores=scores)
    assert layer.weight_mask.sum(1).tolist() == [0, 4, 0, 4, 4, 0]
    prune_([(layer, "weight")], "ln_structured", 1, scope="local", n=1, dim=0, importance_scores=scores)
    assert layer.weight_mask.sum(1).tolist() == [0, 4, 0, 0, 4, 0] and layer.weight_mask.dtype == torch.float32


def test_a_grouped_structured_round_ranks_the_slices_by_the_importance_scores_given():
    """With slice_groups, the scores were dropped without a word and the weights' norms ranked instead."""
    from litcompress.pruning.engine import prune_to_sparsity_

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, groups=4)
    order = torch.tensor([3, 1, 2, 0, 7, 5, 6, 4, 11, 9, 10, 8, 15, 13, 14, 12], dtype=torch.float)
    scores = torch.ones_like(conv.weight) * order.view(16, 1, 1, 1)
    weight = conv.weight.detach().clone()
    prune_to_sparsity_([(conv, "weight")], "ln_structured", 0.25, scope="local", n=1, dim=0, importance_scores=scores,
                       slice_groups={(conv, "weight"): 4})
    pruned_rows = (conv.weight_mask.flatten(1) == 0).all(1).nonzero().flatten().tolist()
    assert pruned_rows == [3, 7, 11, 15]  # each block's least
    assert torch.equal(conv.weight_orig, weight)
    with pytest.raises(ValueError, match=r"Conv2d.weight's importance_scores holds NaN"):
        prune_to_sparsity_([(conv, "weight")], "ln_structured", 0.5, scope="local", n=1, dim=0,
                           importance_scores=scores.index_fill(0, torch.tensor([0]), float("nan")),
                           slice_groups={(conv, "weight"): 4})
    with pytest.raises(TypeError, match=r"prune_to_sparsity_\(scope='local'.*the dict .* is for scope='global', "
                                        r"which takes unstructured methods only: prune each target with LnStructured "
                                        r"in a round of its own"):
        prune_to_sparsity_([(conv, "weight")], "ln_structured", 0.5, scope="local", n=1, dim=0,  # (an AttributeError)
                           importance_scores={(conv, "weight"): scores}, slice_groups={(conv, "weight"): 4})
    assert int((conv.weight_mask.flatten(1) == 0).all(1).sum()) == 4  # as the first round left it


def test_global_importance_scores_of_mixed_dtypes_are_ranked_in_one_that_holds_them_all():
    """torch concatenates the scores in the promoted dtype: int64 scores beside float32 ones were ranked in float32
    (2**24 + 1 tied with 2**24), integer scores in an fp16 model in float16 (above 65504, inf): the wrong entries
    went, in the right number."""
    from litcompress.pruning.engine import mask_of

    a, b = nn.Linear(2, 1, bias=False), nn.Linear(4, 1, bias=False)
    scores = {(a, "weight"): torch.tensor([[1e9, 1e9]]),
              (b, "weight"): torch.tensor([[2**24 + 1, 2**24 + 1, 2**24 + 1, 2**24]])}
    prune_([(a, "weight"), (b, "weight")], "l1_unstructured", 1, scope="global", importance_scores=scores)
    assert mask_of(b, "weight").tolist() == [[1.0, 1.0, 1.0, 0.0]] and bool(mask_of(a, "weight").all())
    for values in ([70000, 100000], [65600, 131072, 196608, 262144]):
        a, b = nn.Linear(2, 1, bias=False).half(), nn.Linear(len(values), 1, bias=False).half()
        with torch.no_grad():
            a.weight.fill_(0.5)  # ranked by its own weights
        prune_([(a, "weight"), (b, "weight")], "l1_unstructured", 3, scope="global",
               importance_scores={(b, "weight"): torch.tensor([values], dtype=torch.int32)})
        assert mask_of(b, "weight")[0, 0] == 0 and bool(mask_of(b, "weight")[0, 1:].all())  # the smallest score
        assert mask_of(a, "weight").dtype == mask_of(b, "weight").dtype == torch.float16


class _RandomRowsSubclass(torch_prune.RandomStructured):
    """A random method of one's own that keeps the base class's draw."""


@pytest.mark.parametrize("call", ["prune_", "prune_to_sparsity_"])
@pytest.mark.parametrize("method, kwargs, ranked_by", [
    ("random_unstructured", dict(scope="local"), "l1_unstructured"),
    ("random_unstructured", dict(scope="global"), "l1_unstructured"),
    ("random_structured", dict(scope="local", dim=0), "ln_structured"),
    (_RandomRowsSubclass, dict(scope="local", dim=0), "ln_structured"),
])
def test_importance_scores_given_to_a_random_method_are_refused_before_any_target_is_masked(call, method, kwargs,
                                                                                          ranked_by):
    """A random draw reads no scores: they were dropped without a word (torch's random_* functions refuse them)."""
    layer = nn.Linear(5, 4)
    scores = torch.rand(4, 5)
    given = scores if kwargs["scope"] == "local" else {(layer, "weight"): scores}
    function = prune_ if call == "prune_" else prune_to_sparsity_
    with pytest.raises(TypeError, match=rf"{call}\(importance_scores=\.\.\.\): \w+ draws its mask at random.*"
                                        rf"rank by them with '{ranked_by}'"):
        function([(layer, "weight")], method, 0.5, importance_scores=given, **kwargs)
    assert not is_pruned(layer, "weight")
    function([(layer, "weight")], method, 0.5, **kwargs)  # (without scores the round runs)
    assert is_pruned(layer, "weight")


class _LowestScoresDrawn(torch_prune.RandomUnstructured):
    """Keeps RandomUnstructured's `apply` (no importance_scores) and ranks what it is given."""

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        count = torch_prune._compute_nparams_toprune(self.amount, t.numel())  # (a fraction or a count)
        mask.view(-1)[torch.topk(t.reshape(-1), count, largest=False).indices] = 0
        return mask


class _OwnApplyTakingScores(_LowestScoresDrawn):
    @classmethod
    def apply(cls, module, name, amount, importance_scores=None):
        return torch_prune.BasePruningMethod.apply.__func__(cls, module, name, amount=amount,
                                                            importance_scores=importance_scores)


@pytest.mark.parametrize("call", ["prune_", "prune_to_sparsity_"])
def test_importance_scores_a_methods_own_apply_cannot_take_are_refused_in_a_local_round(call):
    """A method whose own `apply` takes no importance_scores: the engine passes a method only what it takes, so the
    scores were dropped and the weights ranked instead (torch's functions refuse the argument)."""
    function = prune_ if call == "prune_" else prune_to_sparsity_
    scores = torch.arange(16.0).view(4, 4)
    layer = nn.Linear(4, 4)
    with pytest.raises(TypeError, match=rf"{call}\(importance_scores=\.\.\.\): _LowestScoresDrawn's own `apply` takes "
                                        r"no importance_scores"):
        function([(layer, "weight")], _LowestScoresDrawn, 0.5, scope="local", importance_scores=scores)
    assert not is_pruned(layer, "weight")
    function([(layer, "weight")], _OwnApplyTakingScores, 0.5, scope="local", importance_scores=scores)
    assert torch.equal(layer.weight_mask, (scores >= 8).float())  # the lowest-scored half went
    pair = (nn.Linear(4, 4), nn.Linear(4, 4))  # a global round hands the scores to torch's global_unstructured
    function([(m, "weight") for m in pair], _LowestScoresDrawn, 0.5, scope="global",
             importance_scores={(pair[0], "weight"): scores, (pair[1], "weight"): scores + 16})
    assert torch.equal(pair[0].weight_mask, torch.zeros(4, 4)) and torch.equal(pair[1].weight_mask, torch.ones(4, 4))


class _ApplyForwardingKwargs(torch_prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"
    compute_mask = _LowestScoresDrawn.compute_mask

    def __init__(self, amount):
        self.amount = amount

    @classmethod
    def apply(cls, module, name, amount, **kwargs):
        return super().apply(module, name, amount=amount, **kwargs)


class _RandomForwardingKwargs(torch_prune.RandomUnstructured):
    @classmethod
    def apply(cls, module, name, amount, **kwargs):
        return super().apply(module, name, amount=amount, **kwargs)


class _RowsByTheirOwnApply(torch_prune.LnStructured):
    @classmethod
    def apply(cls, module, name, amount, n, dim):
        return super().apply(module, name, amount=amount, n=n, dim=dim)


def test_scores_reach_an_apply_that_forwards_kwargs_and_are_refused_before_a_grouped_round_masks_anything():
    """An apply taking **kwargs hands the scores on to torch's (they were dropped, then refused); beside a grouped
    target (slice_groups), a target the method's apply would take no scores for was refused after the grouped one
    was masked; GradualPruner said so at its first round, not as it was built."""
    scores = torch.arange(16.0).view(4, 4)
    for function in (prune_, prune_to_sparsity_):
        layer = nn.Linear(4, 4)
        function([(layer, "weight")], _ApplyForwardingKwargs, 0.5, scope="local", importance_scores=scores)
        assert torch.equal(layer.weight_mask, (scores >= 8).float())  # as torch's own call ranks them
    grouped, plain = nn.Linear(4, 8), nn.Linear(4, 8)
    with pytest.raises(TypeError, match=r"prune_to_sparsity_\(importance_scores=\.\.\.\): _RowsByTheirOwnApply's own "
                                        r"`apply` takes no importance_scores"):
        prune_to_sparsity_([(grouped, "weight"), (plain, "weight")], _RowsByTheirOwnApply, 0.5, scope="local",
                           n=2, dim=0, importance_scores=torch.arange(32.0).view(8, 4),
                           slice_groups={(grouped, "weight"): 2})
    assert not is_pruned(grouped, "weight") and not is_pruned(plain, "weight")
    prune_to_sparsity_([(grouped, "weight")], _RowsByTheirOwnApply, 0.5, scope="local", n=2, dim=0,  # grouped only:
                       importance_scores=torch.arange(32.0).view(8, 4), slice_groups={(grouped, "weight"): 2})
    assert grouped.weight_mask[:, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]  # the lowest-scored rows of each group
    with pytest.raises(TypeError, match=r"GradualPruner\(importance_scores=\.\.\.\): _RandomForwardingKwargs draws"):
        GradualPruner([(nn.Linear(4, 4), "weight")], ConstantSparsity(0.5), _RandomForwardingKwargs, scope="local",
                      importance_scores=scores)  # (refused as it is built, not at its first round)


class _ThreeLayers(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, width), nn.Linear(width, width), nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("loader", ["load_pruned_state_dict", "load_shrunk_state_dict"])
def test_the_state_dict_loaders_name_what_they_were_given_instead(loader, tmp_path):
    """A path (the README passes torch.load(path)), None or a list failed with "'str' object has no attribute
    'items'"; a class for the model with "no attribute 'parameters'"; keep_masks="no" was taken for True."""
    import litcompress

    load = getattr(litcompress, loader)
    pruned = _ThreeLayers()
    prune_model_(pruned, "l1_unstructured", 0.5)
    torch.save(pruned.state_dict(), tmp_path / "state.pt")
    for state, message in ((tmp_path / "state.pt", r"expected the state dict itself, not its path: "
                            rf"{loader}\(model, torch\.load\(path\)\)"),
                           (str(tmp_path / "state.pt"), "not its path"),
                           (None, r"state_dict=NoneType\): expected a state dict"),
                           ([], r"state_dict=list\): expected a state dict")):
        with pytest.raises(TypeError, match=message):
            load(_ThreeLayers(), state)
    with pytest.raises(TypeError, match=rf"{loader}\(model=_ThreeLayers\): expected the model to load into, an "
                                        r"nn\.Module instance"):
        load(_ThreeLayers, pruned.state_dict())
    with pytest.raises(TypeError, match=rf"{loader}\(strict='no'\): expected True or False"):
        load(_ThreeLayers(), pruned.state_dict(), strict="no")
    if loader == "load_pruned_state_dict":
        with pytest.raises(TypeError, match=r"keep_masks='False'\): expected True or False"):
            load(_ThreeLayers(), pruned.state_dict(), keep_masks="False")
    import numpy as np

    assert load(_ThreeLayers(), pruned.state_dict(), strict=np.True_) is not None  # numpy's bools, as before
    loaded = load(_ThreeLayers(), torch.load(tmp_path / "state.pt"))  # as the error says
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), pruned(x))


def test_a_mask_that_does_not_fit_is_named_by_its_layer():
    """`Mask of shape (32, 16) does not fit `weight` of shape (48, 16).`: the weight of which of a, b, c?"""
    pruned = _ThreeLayers()
    prune_model_(pruned, "l1_unstructured", 0.5)
    with pytest.raises(ValueError, match=r"the state's 'a\.weight_mask' has shape \(32, 16\), and 'a\.weight' of "
                                         r"_ThreeLayers has shape \(48, 16\): load into the architecture that was "
                                         r"pruned \(.*load_shrunk_state_dict\)"):
        load_pruned_state_dict(_ThreeLayers(48), pruned.state_dict())
