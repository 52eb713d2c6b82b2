"""GradualPruner in a plain PyTorch loop: exact targets on the schedule's grid, resumable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from litcompress.pruning import GradualPruner, default_targets, shrink_
from litcompress.pruning.engine import pruned_count
from litcompress.pruning.schedules import ConstantSparsity, PolynomialDecay, SparsitySchedule


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(128, 16), torch.randint(0, 4, (128,))
    return model, x, y


def train(model, x, y, pruner, steps, start=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(start, start + steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step(step)


def uninterrupted_and_stopped(schedule, method, stop: int):
    """The same seeded loop run for 40 steps, and stopped after `stop` (as a run killed there): each model and its
    pruner, and the data."""
    model, x, y = model_and_data()
    reference = GradualPruner(default_targets(model), schedule, method)
    train(model, x, y, reference, steps=40)
    stopped, x, y = model_and_data()
    first = GradualPruner(default_targets(stopped), schedule, method)
    train(stopped, x, y, first, steps=stop)
    return (model, reference), (stopped, first), (x, y)


@settings(max_examples=15, deadline=None)
@given(final=st.floats(0.0, 0.99), frequency=st.integers(1, 5), scope=st.sampled_from(["global", "local"]))
def test_plain_loop_reaches_each_target_exactly(final, frequency, scope):
    model, x, y = model_and_data()
    targets = default_targets(model)
    schedule = PolynomialDecay(final_sparsity=final, begin=2, end=20, frequency=frequency)
    pruner = GradualPruner(targets, schedule, scope=scope)
    train(model, x, y, pruner, steps=25)
    assert [h["t"] for h in pruner.history] == [t for t in range(1, 26) if schedule.should_prune(t)]
    if scope == "global":  # every round lands on its target (never un-pruning)
        assert all(h["pruned_after"] == max(h["pruned_before"], round(h["target"] * 640)) for h in pruner.history)
    sizes = [m.weight.numel() for m, _ in targets]
    if scope == "global":
        assert pruner.pruned() == round(final * sum(sizes))
    else:
        assert [pruned_count(m, n) for m, n in targets] == [round(final * s) for s in sizes]


@pytest.mark.filterwarnings("ignore:GradualPruner")  # near 99% a global round can empty a layer
@settings(max_examples=15, deadline=None)
@given(final=st.floats(0.0, 0.99), frequency=st.integers(1, 5), stride=st.integers(2, 4))
def test_points_passed_over_get_their_round_with_their_target(final, frequency, stride):
    """A loop whose step counter moves by several per call (one step per optimizer of a GAN) still runs a round for
    every stride that passed a pruning point, to that point's target, and ends on the final sparsity."""
    model, x, y = model_and_data()
    targets = default_targets(model)
    schedule = PolynomialDecay(final_sparsity=final, begin=3, end=19, frequency=frequency)
    pruner = GradualPruner(targets, schedule)
    for t in range(stride, 25, stride):
        pruner.step(t)
    passed = {t: [u for u in range(t - stride + 1, t + 1) if schedule.should_prune(u)]
              for t in range(stride, 25, stride)}
    expected = [(t, schedule.target(points[-1])) for t, points in passed.items() if points]
    assert [(h["t"], h["target"]) for h in pruner.history] == expected
    assert pruner.pruned() == round(final * sum(m.weight.numel() for m, _ in targets))


@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured"])
def test_resumed_pruner_continues_like_an_uninterrupted_one(method):
    """With a random method, the resumed process's global generator (seed 1) drew other masks: each round draws from
    a stream of the pruner's own, its seed in the state."""
    schedule = PolynomialDecay(final_sparsity=0.8, begin=0, end=30, frequency=4)
    (model, _), (model2, first), (x, y) = uninterrupted_and_stopped(schedule, method, stop=17)
    state = {k: v.clone() for k, v in model2.state_dict().items()}, first.state_dict()
    # a new process: fresh model and pruner, restored from the saved state
    from litcompress.pruning import load_pruned_state_dict

    model3, _, _ = model_and_data(seed=1)  # other initial weights: all must come from the saved state
    load_pruned_state_dict(model3, state[0])
    resumed = GradualPruner(default_targets(model3), schedule, method)
    resumed.load_state_dict(state[1])
    train(model3, x, y, resumed, steps=23, start=18)
    # optimizer state is not part of this plain loop (plain SGD), so weights match exactly
    for key, value in model.state_dict().items():
        assert torch.equal(value, model3.state_dict()[key]), key


@pytest.mark.parametrize("pruner_loaded", ["before the model", "after the model"])
@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured"])
def test_a_pruner_resumed_from_weights_saved_without_masks_keeps_their_zeros_pruned(method, pruner_loaded):
    """Weights saved permanent (`permanent_state_dict`: no masks) loaded unmasked: the zeros trained back between
    rounds, and the resumed run ended at 0% sparsity where the uninterrupted one was at 70%."""
    from litcompress.pruning import permanent_state_dict

    schedule = PolynomialDecay(final_sparsity=0.8, begin=0, end=30, frequency=6)
    # the last round was at step 12: steps follow before the next one (18)
    (model, reference), (model2, first), (x, y) = uninterrupted_and_stopped(schedule, method, stop=13)
    weights, state = permanent_state_dict(model2), first.state_dict()
    assert not any(key.endswith("_mask") for key in weights)

    model3, _, _ = model_and_data(seed=1)
    resumed = GradualPruner(default_targets(model3), schedule, method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if pruner_loaded == "before the model":
            resumed.load_state_dict(state)
            model3.load_state_dict(weights)  # masked by the load hooks, said at the next step (once for the load)
        else:
            model3.load_state_dict(weights)
            resumed.load_state_dict(state)
        assert resumed.pruned() == first.pruned() > 0
        train(model3, x, y, resumed, steps=1, start=14)
    said = [str(w.message) for w in caught if "GradualPruner" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(f"GradualPruner: {first.pruned():,} zero entries of the tensors it "
                                                 "prunes had no mask (weights loaded from a state dict without "
                                                 "masks); they are kept pruned"), said
    assert all(w.filename == __file__ for w in caught if "GradualPruner" in str(w.message))  # the user's call
    train(model3, x, y, resumed, steps=26, start=15)
    # the model computes with the same weights and masks as the uninterrupted one (only `orig` differs: zeros where
    # the saved file had no values)
    expected, got = permanent_state_dict(model), permanent_state_dict(model3)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert resumed.pruned() == reference.pruned() == round(0.8 * 640)


@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured"])
def test_rounds_after_make_permanent_count_the_zeros_it_left_as_pruned(method):
    """A random method drew its new mask over the whole tensor, the zeros of earlier rounds too: 88% sparsity for a
    target of 80%, and the history started again from 0 pruned."""
    from litcompress import make_permanent_

    model, x, y = model_and_data()
    pruner = GradualPruner(default_targets(model), PolynomialDecay(final_sparsity=0.8, begin=0, end=8), method,
                           scope="local")
    for t in range(5):
        pruner.step(t)
    before = pruner.pruned()
    make_permanent_(model)
    with pytest.warns(UserWarning, match=r"had no mask \(made permanent\); they are kept pruned") as caught:
        pruner.step(5)
    assert [w.filename for w in caught] == [__file__]
    assert pruner.history[-1]["pruned_before"] == before
    for t in range(6, 9):
        pruner.step(t)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in default_targets(model))
    assert zeros == pruner.pruned() == round(0.8 * 640)


@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured"])
def test_entries_trained_off_zero_after_make_permanent_are_said_lost_not_kept(method):
    """Trained between make_permanent_ and the next round, pruned entries moved off zero and were weights again: the
    warning said of the few still zero "the sparsity reached is kept" (random), or nothing was said (L1)."""
    from litcompress import make_permanent_

    model, x, y = model_and_data()
    pruner = GradualPruner(default_targets(model), PolynomialDecay(final_sparsity=0.8, begin=0, end=6, frequency=3),
                           method, scope="local")
    for t in range(4):
        pruner.step(t)
    pruned = pruner.pruned()
    assert pruned > 0
    make_permanent_(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    still_zero = sum(int((m.weight == 0).sum()) for m, _ in default_targets(model))
    assert still_zero < pruned
    with pytest.warns(UserWarning, match=rf"its last round left {pruned:,} entries pruned, and "
                                         rf"{pruned - still_zero:,} of them are no longer masked since their masks "
                                         rf"were removed \(made permanent\): {pruned - still_zero:,} are no longer "
                                         r"zero \(training or a load changed them\)\. They train as weights"):
        pruner.step(6)
    assert sum(int((m.weight == 0).sum()) for m, _ in default_targets(model)) == pruner.pruned() == round(0.8 * 640)


def test_entries_left_unmasked_after_make_permanent_are_counted_as_zero_or_moved():
    """A structured pruner counted every entry of a channel with one moved entry as moved, and a tensor pruned to
    all zeros (left unmasked: it may be a zero-initialised one) as changed by training, though nothing had moved."""
    from litcompress import make_permanent_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    schedule = PolynomialDecay(final_sparsity=0.8, begin=1, end=3, frequency=1, power=1)
    pruner = GradualPruner([(model[0], "weight")], schedule, "ln_structured", scope="local", n=2, dim=0)
    pruner.step(1), pruner.step(2)
    assert pruner.pruned() == 24  # 3 of 8 rows
    make_permanent_(model)
    row = int((model[0].weight == 0).all(1).nonzero()[0])
    with torch.no_grad():
        model[0].weight[row, 0] = 0.5
    with pytest.warns(UserWarning, match=r"left 24 entries pruned, and 8 of them are no longer masked since their "
                                         r"masks were removed \(made permanent\): 1 is no longer zero \(training or "
                                         r"a load changed them\); 7 are zero but not masked again \(with a structured "
                                         r"method only whole zero slices are masked; a tensor all zeros"):
        pruner.step(3)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight.mul_(1e-4)  # pruned first, all of it
    pruner = GradualPruner(default_targets(model), schedule, "l1_unstructured")
    pruner.step(1), pruner.step(2)
    assert int((model[2].weight == 0).sum()) == 32
    make_permanent_(model)
    with pytest.warns(UserWarning, match=r"and 32 of them are no longer masked .*: 32 are zero but not masked again "
                                         r"\(a tensor all zeros is not: it may be a zero-initialised one\)\.") as said:
        pruner.step(3)
    assert not any("no longer zero" in str(w.message) for w in said)


@pytest.mark.parametrize("method", ["ln_structured", "random_structured"])
def test_a_structured_pruner_after_make_permanent_masks_whole_zero_channels_only(method):
    """Every zero was masked one by one: the zeros inside kept channels too, which left holes in the structured masks
    and pruned past the target."""
    from litcompress import make_permanent_
    from litcompress.pruning.engine import mask_of

    def run(permanent_between: bool) -> tuple[list[torch.Tensor], int]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        with torch.no_grad():
            model[2].weight[:, :, 0, 0] = 0  # zeros of its own in every channel
        kwargs = {"n": 2} if method == "ln_structured" else {}
        pruner = GradualPruner(default_targets(model), PolynomialDecay(final_sparsity=0.75, begin=0, end=2,
                                                                        frequency=1), method, scope="local", dim=0,
                               **kwargs)
        pruner.step(0)
        pruner.step(1)
        if permanent_between:
            make_permanent_(model)
            with pytest.warns(UserWarning, match="made permanent"):
                pruner.step(2)
        else:
            pruner.step(2)
        return [mask_of(m, "weight") for m, _ in default_targets(model)], pruner.pruned()

    (masks, pruned), (reference, reference_pruned) = run(True), run(False)
    assert pruned == reference_pruned == 6 * 27 + 6 * 72  # 6 of 8 channels of each
    assert all(torch.equal(a, b) for a, b in zip(masks, reference))


@pytest.mark.parametrize(("multiple", "named"), [(None, ["2.weight (1 slice)"]),
                                                 (16, ["0.weight (16 slices)", "2.weight (1 slice)"])])
def test_a_structured_pruner_says_when_made_which_targets_it_never_prunes(multiple, named):
    """A one-row output layer, or a layer no smaller multiple of keep_multiple_of fits, kept every row in every round
    without a word (head and unit pruning say it; this did not)."""
    from litcompress.pruning.engine import qualified_names

    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    targets = default_targets(model)
    with pytest.warns(UserWarning, match=r"at the final sparsity 50\.0%, LnStructured prunes no slice along dim 0 of "
                                         + re.escape(", ".join(named)) + r": a layer keeps at least one slice"):
        pruner = GradualPruner(targets, PolynomialDecay(final_sparsity=0.5, begin=0, end=2), "ln_structured",
                               scope="local", n=2, dim=0, keep_multiple_of=multiple,
                               target_names=qualified_names(model, targets))
    for t in range(3):
        pruner.step(t)
    assert pruned_count(model[2], "weight") == 0  # as said
    assert pruned_count(model[0], "weight") == (0 if multiple else 8 * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer prunes: nothing to say
        GradualPruner(targets, PolynomialDecay(final_sparsity=0.5, begin=0, end=2), "ln_structured", scope="local",
                      n=2, dim=1)
    # pruned evenly over its groups: 4 blocks of 1 output channel each prune none at 50% (grouped targets went unsaid)
    depthwise = nn.Conv2d(4, 4, 3, groups=4)
    with pytest.warns(UserWarning, match=r"prunes no slice along dim 0 of Conv2d.weight \(4 slices\)"):
        GradualPruner([(depthwise, "weight")], PolynomialDecay(final_sparsity=0.5, begin=0, end=2), "ln_structured",
                      scope="local", n=2, dim=0, slice_groups={(depthwise, "weight"): 4})


def test_a_copy_of_a_pruned_model_loads_weights_as_a_plain_model():
    """The load hook travelled with a deep copy or a pickled model: a state dict loaded into the copy had its zeros
    masked, by a pruner that does not manage the copy (removed, or gone)."""
    import io

    from litcompress.pruning.engine import deepcopy_model

    model, x, y = model_and_data()
    pruner = GradualPruner(default_targets(model), PolynomialDecay(final_sparsity=0.5, begin=0, end=4, frequency=1))
    train(model, x, y, pruner, steps=5)
    dense = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        dense[0].weight[0, :8] = 0
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [deepcopy_model(model), torch.load(buffer, weights_only=False)]
    for copied in copies:
        from litcompress import make_permanent_

        make_permanent_(copied)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            copied.load_state_dict(dense.state_dict())
            pruner.step(6)  # (nothing for the pruner to say of the copies)
        assert set(copied.state_dict()) == set(dense.state_dict())  # no masks


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_model_copied_with_its_pruner_keeps_the_zeros_of_weights_it_loads(how):
    """Copied together, the copy's hooks act for the copied pruner (they had been made inert with every copy)."""
    import copy
    import io

    from litcompress import make_permanent_
    from litcompress.pruning import permanent_state_dict

    model, x, y = model_and_data()
    pruner = GradualPruner(default_targets(model), PolynomialDecay(final_sparsity=0.5, begin=0, end=4, frequency=1),
                           "random_unstructured")
    train(model, x, y, pruner, steps=2)
    weights = permanent_state_dict(model)
    make_permanent_(model)
    if how == "deepcopy":
        pair = copy.deepcopy({"model": model, "pruner": pruner})
    else:
        buffer = io.BytesIO()
        torch.save({"model": model, "pruner": pruner}, buffer)
        buffer.seek(0)
        pair = torch.load(buffer, weights_only=False)
    pair["model"].load_state_dict(weights)
    assert pair["pruner"].pruned() == pruner.history[-1]["pruned_after"] > 0  # masked at the load, before training
    with pytest.warns(UserWarning, match="weights loaded from a state dict without masks"):
        train(pair["model"], x, y, pair["pruner"], steps=1, start=3)
    assert pruner.pruned() == 0  # the original, made permanent, was left alone
    # the copy's pruner names its targets as the original does, and takes its own hooks off its own model
    assert pair["pruner"]._names == {(id(m), n): name for (m, n), name in
                                     zip(pair["pruner"].targets, pruner._target_names)}
    pair["pruner"].remove_hooks()
    assert not any(m._load_state_dict_post_hooks for m in pair["model"].modules())
    assert all(m._load_state_dict_post_hooks for m, _ in pruner.targets)


def test_tied_weights_loaded_after_the_pruners_state_are_counted_once_and_share_their_mask():
    from litcompress.pruning import permanent_state_dict, with_tied_targets
    from litcompress.pruning.engine import mask_of

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding, self.mid, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False)
            self.head.weight = self.embedding.weight

    def build() -> tuple[Tied, GradualPruner]:
        torch.manual_seed(0)
        model = Tied()
        targets = with_tied_targets(model, [(model.embedding, "weight"), (model.mid, "weight")])
        return model, GradualPruner(targets, PolynomialDecay(final_sparsity=0.8, begin=0, end=4, frequency=1),
                                    scope="local")

    model, pruner = build()
    for t in range(3):
        pruner.step(t)
    weights, state = permanent_state_dict(model), pruner.state_dict()
    model2, pruner2 = build()
    pruner2.load_state_dict(state)
    model2.load_state_dict(weights)
    assert pruner2.pruned() == pruner.pruned()
    with pytest.warns(UserWarning, match=rf"GradualPruner: {pruner.pruned():,} zero entries") as caught:
        pruner2.step(3)
    assert len([w for w in caught if "GradualPruner" in str(w.message)]) == 1  # one load, one warning
    assert mask_of(model2.embedding, "weight") is mask_of(model2.head, "weight")
    pruner.step(3)
    assert torch.equal(mask_of(model2.embedding, "weight"), mask_of(model.embedding, "weight"))


def test_a_fabric_loop_resumes_with_its_own_save_and_load(tmp_path):
    """`fabric.save`/`fabric.load` of model, optimizer and pruner, as a Fabric user writes them: the fresh model
    takes the saved masks, and the resumed run ends bit-identical to the uninterrupted one (Adam's state too)."""
    from lightning.fabric import Fabric

    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(31, 32, 16, generator=g), torch.randint(0, 4, (31, 32), generator=g)
    schedule = PolynomialDecay(final_sparsity=0.8, begin=0, end=24, frequency=5)

    def run(last_step, resume_from=None, save_to=None):
        model, _, _ = model_and_data()
        fabric = Fabric(accelerator="cpu", devices=1)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        pruner = GradualPruner(default_targets(model), schedule)
        model, optimizer = fabric.setup(model, optimizer)
        state = {"model": model, "optimizer": optimizer, "pruner": pruner, "step": 0}
        if resume_from is not None:
            fabric.load(resume_from, state)
        for step in range(state["step"] + 1, last_step + 1):
            optimizer.zero_grad()
            fabric.backward(nn.functional.cross_entropy(model(xs[step]), ys[step]))
            optimizer.step()
            pruner.step(step)
            state["step"] = step
        if save_to is not None:
            fabric.save(save_to, state)
        return model.module.state_dict(), pruner

    expected, _ = run(30)
    run(13, save_to=tmp_path / "step13.ckpt")
    resumed, pruner = run(30, resume_from=tmp_path / "step13.ckpt")
    assert [h["t"] for h in pruner.history] == [1, 5, 10, 15, 20, 24]  # step 1 runs the round of step 0
    assert resumed.keys() == expected.keys() and any(k.endswith("_mask") for k in resumed)
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key


def test_fabric_ddp_ranks_drawing_otherwise_prune_one_sub_network(tmp_path):
    """Two Fabric DDP processes seeded otherwise, pruning with a random method: each round's masks are rank 0's on
    every rank (else each rank trains its own sub-network while DDP averages their gradients)."""
    script = Path(__file__).with_name("gradual_ddp_script.py")
    src = str(script.parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert first.keys() == second.keys() and any(key.endswith("_mask") for key in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    pruned = sum(int((first[f"{layer}.weight_mask"] == 0).sum()) for layer in (0, 2))
    assert pruned == round(0.6 * (16 * 32 + 32 * 4))  # the global target, over both layers


def test_bad_arguments():
    model, _, _ = model_and_data()
    with pytest.raises(TypeError, match="SparsitySchedule"):
        GradualPruner(default_targets(model), 0.5)
    with pytest.raises(ValueError, match="unstructured"):
        GradualPruner(default_targets(model), PolynomialDecay(final_sparsity=0.5, begin=0, end=5), "ln_structured",
                      n=1, dim=0)
    for world_size in (0, 1.0, True, "1"):  # how many processes prune together (1: alone beside a process group)
        with pytest.raises(ValueError, match=re.escape(f"GradualPruner(world_size={world_size!r}): give how many")):
            GradualPruner(default_targets(model), PolynomialDecay(final_sparsity=0.5, begin=0, end=5),
                          world_size=world_size)
    with pytest.raises(ValueError, match=r"world_size=2\): no process group is initialised; the masks are broadcast"):
        GradualPruner(default_targets(model), PolynomialDecay(final_sparsity=0.5, begin=0, end=5), world_size=2)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 70), final=st.floats(0.05, 0.95), multiple=st.sampled_from([4, 8, 16]),
       numpy_int=st.booleans())
def test_structured_rounds_keep_channel_counts_that_are_multiples(rows, final, multiple, numpy_int):
    torch.manual_seed(0)
    layer = nn.Linear(6, rows)
    schedule = PolynomialDecay(final_sparsity=final, begin=0, end=40, frequency=10)
    pruner = GradualPruner([(layer, "weight")], schedule, "ln_structured", scope="local", dim=0, n=2,
                           keep_multiple_of=np.int64(multiple) if numpy_int else multiple)  # (numpy's was refused)
    kept_along = []
    for t in range(0, 41):
        pruner.step(t)
        zero_rows = int((layer.weight.detach().abs().sum(1) == 0).sum())
        kept_along.append(rows - zero_rows)
        assert kept_along[-1] % multiple == 0 or kept_along[-1] == rows
    assert kept_along == sorted(kept_along, reverse=True)  # never un-pruned
    unrounded_kept = max(rows - round(final * rows), 1)  # at least one channel stays (a multiple: 4 of 4 rows)
    assert unrounded_kept <= kept_along[-1] < unrounded_kept + multiple
    with pytest.raises(ValueError, match="for structured methods only"):
        GradualPruner([(layer, "weight")], schedule, "l1_unstructured", keep_multiple_of=8)


@pytest.mark.parametrize(("method", "kwargs", "error", "message"), [
    ("ln_structured", dict(n=2), TypeError, "LnStructured needs 'dim': pass dim=0 (output channels)"),
    ("ln_structured", dict(), TypeError, "needs 'dim', 'n': pass dim=0 (output channels), n=2 (the L2 norm)"),
    ("ln_structured", dict(dim=5, n=2), ValueError, "dim=5 is not a dimension of every tensor pruned (some have 2)"),
    ("ln_structured", dict(dim=True, n=2), TypeError, "dim=True: expected an int"),
    ("ln_structured", dict(dim=0, n="foo"), ValueError, "n='foo': expected a number"),
    ("ln_structured", dict(dim=0, n=2, scop="global"), TypeError, "takes no 'scop' ('scop': did you mean 'scope'?)"),
    ("l1_unstructured", dict(dim=0), TypeError, "L1Unstructured takes no 'dim'"),
    ("ln_structured", dict(dim=0, n=2, keep_multiple_of=0), ValueError, "keep_multiple_of`=0: expected an int >= 1"),
    ("ln_structured", dict(dim=0, n=2, slice_groups={"net.0": 2}), ValueError, "layer names need target_names="),
    ("ln_structured", dict(dim=0, n=2, slice_groups={(nn.Linear(2, 2), "weight"): 2}), ValueError,
     "is not one of the targets"),
    ("ln_structured", dict(dim=0, n=2, slice_groups={"x": 0}), ValueError, "expected an int >= 1"),
    # equal blocks of 8 // 3 rows left the last rows out of every block: 3 of 8 rows pruned for 50%
    ("ln_structured", dict(dim=0, n=2, slice_groups={"layer": 3}), ValueError,
     "3 groups do not divide the 8 slices of Linear.weight along dim=0"),
])
def test_arguments_the_first_round_would_fail_on_or_drop_are_refused_when_built(method, kwargs, error, message):
    """They were kept as they came: the round failed at its first pruning point (hours in, with begin=500), or a
    misspelt `scope` or a `dim` for an unstructured method was dropped (global pruning ran instead of local)."""
    layer = nn.Linear(6, 8)
    scope = "local" if method == "ln_structured" else "global"
    schedule = PolynomialDecay(final_sparsity=0.5, begin=500, end=1000, frequency=100)
    if kwargs.get("slice_groups") == {"layer": 3}:
        kwargs = {**kwargs, "slice_groups": {(layer, "weight"): 3}}
    with pytest.raises(error, match=re.escape(message)):
        GradualPruner([(layer, "weight")], schedule, method, **{"scope": scope, **kwargs})


class FixedThreshold(torch.nn.utils.prune.BasePruningMethod):
    """Prunes what lies below a threshold: told no amount."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, threshold: float = 0.1) -> None:
        self.threshold = threshold

    def compute_mask(self, t, default_mask):
        return default_mask * (t.abs() >= self.threshold)


def _batch_norm_buffer():
    return [(nn.BatchNorm1d(4), "running_mean")]


def _lazy_weight():
    return [(nn.LazyLinear(3), "weight")]


@pytest.mark.parametrize(("targets", "method", "kwargs", "error", "message"), [
    # each failed at the first round (torch's error), or ran it without reaching the target
    (lambda: default_targets(nn.Linear(4, 6), ("weight", "bias")), "ln_structured", dict(n=2, dim=0), ValueError,
     "LnStructured prunes whole slices (rows, channels) of multidimensional tensors, but Linear.bias has one"),
    (lambda: default_targets(nn.Linear(4, 6)), FixedThreshold, {}, TypeError,
     "FixedThreshold takes no `amount`, so it cannot be brought to a target sparsity"),  # reached 42% of 90%
    (_batch_norm_buffer, "l1_unstructured", {}, ValueError,
     "cannot prune BatchNorm1d.running_mean (a buffer): torch.nn.utils.prune masks parameters only"),
    (_lazy_weight, "l1_unstructured", {}, ValueError,
     "cannot prune LazyLinear.weight: lazy layers' weights, which do not exist until their first call"),
])
def test_targets_and_methods_a_schedule_cannot_prune_are_refused_when_built(targets, method, kwargs, error, message):
    schedule = PolynomialDecay(final_sparsity=0.9, begin=0, end=100, frequency=10)
    scope = "local" if method == "ln_structured" else "global"
    with pytest.raises(error, match=re.escape(message)):
        GradualPruner(targets(), schedule, method, scope=scope, **kwargs)


def test_slice_groups_keyed_by_layer_name_as_channel_plan_gives_them_prune_each_group_alike():
    """A name key was ignored silently: the grouped conv's channels were pruned unevenly, and shrink removed less."""
    from litcompress.pruning import channel_plan
    from litcompress.pruning.engine import qualified_names

    model = nn.Sequential(nn.Conv2d(4, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4), nn.ReLU(),
                          nn.Conv2d(16, 4, 1))
    plan = channel_plan(model, example_inputs=torch.rand(1, 4, 6, 6))
    assert plan.slice_groups == {"0": 4, "2": 4}
    targets = [(model[0], "weight"), (model[2], "weight")]
    pruner = GradualPruner(targets, PolynomialDecay(final_sparsity=0.5, begin=0, end=1), "ln_structured",
                           scope="local", dim=0, n=2, target_names=qualified_names(model, targets),
                           slice_groups=plan.slice_groups)
    pruner.step(1)
    for module in (model[0], model[2]):
        zero_rows = (module.weight.detach().flatten(1).abs().sum(1) == 0).view(4, 4)  # (groups, channels per group)
        assert zero_rows.sum(1).tolist() == [2, 2, 2, 2]


def test_a_round_that_empties_a_weight_warns_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.mul_(1e-4)  # all below the first layer's: global magnitude pruning takes them first
    pruner = GradualPruner(default_targets(model), PolynomialDecay(final_sparsity=0.5, begin=0, end=4, frequency=1))
    with pytest.warns(UserWarning, match=r"GradualPruner \(target .*\): every entry of Linear\.weight is pruned.*"
                                         r"prune each tensor on its own"):
        for t in range(5):
            pruner.step(t)
    assert not model[2].weight.any() and model[0].weight.any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.step(5)  # past the schedule: no round, no second warning
        pruner.prune_to(0.5, 6)  # a round that changes nothing: said already


def test_target_names_name_the_emptied_weight_by_its_path_and_the_pipeline_gives_them():
    """Two Linear layers were both "Linear.weight" in the warning; the pipeline's pruner now names their paths."""
    from litcompress.pruning.engine import qualified_names

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.mul_(1e-4)
    targets = default_targets(model)
    pruner = GradualPruner(targets, PolynomialDecay(final_sparsity=0.5, begin=0, end=4, frequency=1),
                           target_names=qualified_names(model, targets))
    with pytest.warns(UserWarning, match=r"every entry of 2\.weight is pruned"):
        for t in range(5):
            pruner.step(t)
    with pytest.raises(ValueError, match="one name per target"):
        GradualPruner(targets, PolynomialDecay(final_sparsity=0.5, begin=0, end=4), target_names=["0.weight"])


@pytest.mark.parametrize("norm", ["fro", "nuc"])
def test_a_matrix_norm_over_a_convs_three_other_dimensions_is_refused_when_built(norm):
    """It was accepted, and the first round failed inside torch ("linalg.matrix_norm: dim must be a 2-tuple"), into
    training; ModelPruning refused it at setup."""
    schedule = PolynomialDecay(final_sparsity=0.5, begin=0, end=4)
    with pytest.raises(ValueError, match=re.escape(f"GradualPruner(n={norm!r}): torch takes the norm over the 3 "
                                                   "dimension(s) of Conv2d.weight (8, 2, 3, 3) besides dim=0")):
        GradualPruner([(nn.Conv2d(2, 8, 3), "weight")], schedule, "ln_structured", scope="local", dim=0, n=norm)
    layer = nn.Conv1d(2, 8, 3)  # two dimensions besides dim=0: the norm applies, and the rounds run
    pruner = GradualPruner([(layer, "weight")], schedule, "ln_structured", scope="local", dim=0, n=norm)
    for t in range(5):
        pruner.step(t)
    assert int((layer.weight_mask.sum(dim=(1, 2)) == 0).sum()) == 4  # half the output channels


def test_progress_must_be_a_whole_count_and_numpy_integers_are_kept_as_ints():
    """`step(1.0)` failed inside `range()` ("'float' object cannot be interpreted as an integer")."""
    import numpy as np

    layer = nn.Linear(6, 8)
    pruner = GradualPruner([(layer, "weight")], PolynomialDecay(final_sparsity=0.5, begin=0, end=4), "l1_unstructured")
    with pytest.raises(ValueError, match=re.escape("t=1.0 must be an int step or epoch count (got float)")):
        pruner.step(1.0)
    with pytest.raises(ValueError, match=re.escape("t=1.0 must be an int step or epoch count")):
        pruner.due(1.0)
    for t in np.arange(5):
        pruner.step(t)
    assert pruned_count(layer, "weight") == 24
    state = pruner.state_dict()
    assert type(state["last_t"]) is int and all(type(row["t"]) is int for row in state["history"])


@pytest.mark.parametrize("call", ["step", "due", "prune_to", "target", "should_prune"])
def test_a_negative_progress_is_refused_before_anything_is_pruned(call):
    """`step(-5)` was taken as a point before `begin` (the initial sparsity) and kept as `last_t`."""
    layer = nn.Linear(6, 8)
    schedule = PolynomialDecay(initial_sparsity=0.25, final_sparsity=0.5, begin=0, end=4)
    pruner = GradualPruner([(layer, "weight")], schedule, "l1_unstructured")
    calls = {"step": lambda: pruner.step(-5), "due": lambda: pruner.due(-5),
             "prune_to": lambda: pruner.prune_to(0.5, -5), "target": lambda: schedule.target(-5),
             "should_prune": lambda: schedule.should_prune(-5)}
    with pytest.raises(ValueError, match=re.escape("t=-5 must be a step or epoch count >= 0")):
        calls[call]()
    assert pruner.last_t == -1 and not pruner.history and not hasattr(layer, "weight_mask")


def test_two_pruners_with_a_random_method_draw_other_masks_for_same_shaped_layers():
    """Each round's stream was seeded by the run's seed and the schedule point only: two pruners (a schedule per group
    of layers) drew the very same mask for two layers of one shape."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    schedule = ConstantSparsity(sparsity=0.5, begin=0, end=10, frequency=1)
    for layer in (model[0], model[2]):
        GradualPruner([(layer, "weight")], schedule, "random_unstructured", scope="local").step(0)
    assert not torch.equal(model[0].weight_mask, model[2].weight_mask)
    assert int(model[0].weight_mask.sum()) == int(model[2].weight_mask.sum()) == 512


def test_a_pruner_built_on_a_meta_device_model_prunes_once_its_weights_are_loaded():
    """Building it read the targets' first values for its random stream's seed: 'Tensor.item() cannot be called on
    meta tensors' (a model built on the meta device, loaded later, as large models are)."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    pruner = GradualPruner([(model[0], "weight"), (model[2], "weight")],
                           PolynomialDecay(final_sparsity=0.5, begin=0, end=10, frequency=2))
    model.to_empty(device="cpu")
    model.load_state_dict(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict())
    pruner.step(10)
    assert pruner.pruned() == 10  # half of 12 + 8
    # two pruners with a random method built there: their streams are seeded from the loaded values, apart
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    pruners = [GradualPruner([(layer, "weight")], ConstantSparsity(sparsity=0.5, begin=0, end=10, frequency=1),
                             "random_unstructured", scope="local") for layer in (model[0], model[2])]
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.load_state_dict(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)).state_dict())
    for each in pruners:
        each.step(0)
    assert not torch.equal(model[0].weight_mask, model[2].weight_mask)



@pytest.mark.parametrize("how", ["pruner", "load_pruned_state_dict"])
def test_a_loaded_masked_state_is_what_the_pruned_tensor_reads_before_any_forward(how):
    """The masks were re-created before the values were copied, and ``.weight`` (``orig * mask``) stayed the fresh
    initialisation under the loaded mask until the next forward: a regulariser or a functional call read it."""
    from litcompress.pruning.engine import load_pruned_state_dict

    def build() -> tuple[nn.Sequential, GradualPruner]:
        net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        return net, GradualPruner(default_targets(net), ConstantSparsity(0.5))

    torch.manual_seed(0)
    net, pruner = build()
    pruner.step(0)
    state = net.state_dict()
    torch.manual_seed(1)
    if how == "pruner":
        fresh, fresh_pruner = build()
        fresh.load_state_dict(state)
        fresh_pruner.load_state_dict(pruner.state_dict())
    else:
        fresh = load_pruned_state_dict(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), state)
    for index in (0, 2):
        torch.testing.assert_close(fresh[index].weight, state[f"{index}.weight_orig"] * state[f"{index}.weight_mask"],
                                   rtol=0, atol=0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(nn.functional.linear(x, fresh[0].weight, fresh[0].bias), fresh[0](x))
    if how != "pruner":
        return
    # loaded again over trained values (the pruner's load hooks): the cached tensor follows them too
    trained = {k: (v + 1 if k.endswith("_orig") else v) for k, v in state.items()}
    fresh.load_state_dict(trained)
    torch.testing.assert_close(fresh[0].weight, trained["0.weight_orig"] * trained["0.weight_mask"], rtol=0, atol=0)


def test_a_pruner_without_targets_is_refused_when_made():
    """default_targets of an LSTM is empty: the pruner stepped through its schedule, its history saying 90%, and
    pruned nothing."""
    with pytest.raises(ValueError, match=r"GradualPruner: no targets to prune.*weight_ih_l0"):
        GradualPruner(default_targets(nn.LSTM(4, 8)), PolynomialDecay(final_sparsity=0.9, begin=0, end=5))


def test_prune_to_takes_t_as_step_does_and_its_state_loads_weights_only():
    """A float `t` was kept and failed at the next step inside range(); numpy's t and target went into the state,
    which torch.load (weights_only, its default) then refused to read."""
    import io

    import numpy as np

    model, _, _ = model_and_data()
    pruner = GradualPruner(default_targets(model), PolynomialDecay(final_sparsity=0.5, begin=0, end=4, frequency=1))
    with pytest.raises(ValueError, match=r"t=4.0 must be an int step or epoch count"):
        pruner.prune_to(0.5, 4.0)
    assert pruner.history == []
    pruner.prune_to(np.float64(0.25), np.int64(3))
    assert pruner.step(4) and pruner.last_t == 4
    buffer = io.BytesIO()
    torch.save(pruner.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)  # weights_only
    assert [(type(r["t"]), type(r["target"])) for r in state["history"]] == [(int, float)] * 2
    assert state["history"][0]["t"] == 3 and state["history"][0]["target"] == 0.25


def test_a_state_without_its_keys_is_refused_before_the_pruner_changes():
    """`load_state_dict({"last_t": 7})` set last_t, then raised KeyError 'history': a half-loaded pruner."""
    model = nn.Sequential(nn.Linear(4, 4))
    pruner = GradualPruner(default_targets(model), PolynomialDecay(final_sparsity=0.5, begin=0, end=4,
                                                                  frequency=2))
    pruner.step(2)
    state = pruner.state_dict()
    with pytest.raises(ValueError, match="the state has no history; give the dict GradualPruner.state_dict"):
        pruner.load_state_dict({"last_t": 7})
    # (a history of malformed rounds was taken, and every later step failed with a KeyError 'pruned_after')
    for bad in ({"last_t": 7, "history": None}, {"last_t": 7, "history": [], "seed": "x"},
                {"last_t": 7, "history": [{"t": 1, "target": 0.2}]}, {"last_t": 7, "history": [1, 2]},
                {"last_t": 7, "history": [{**state["history"][0], "pruned_after": "3"}]}):
        with pytest.raises(ValueError, match="expected an int 'last_t', a list 'history' of rounds .*, an int"):
            pruner.load_state_dict(bad)
    assert pruner.state_dict() == state
    pruner.load_state_dict(state)  # its own state: taken
    pruner.step(4)
    assert pruner.history[-1]["t"] == 4


def test_a_target_narrowed_between_rounds_is_refused_rather_than_pruned_as_if_whole():
    """After shrink_ removed half the rows, the next round pruned the narrower layer to the target: 75% of the
    original rows gone for 50%, without a word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    schedule = PolynomialDecay(final_sparsity=0.5, begin=0, end=4, frequency=2)
    pruner = GradualPruner([(model[0], "weight")], schedule, "ln_structured", scope="local", dim=0, n=1,
                           target_names=["0.weight"])
    pruner.step(0), pruner.step(2)
    assert int((model[0].weight == 0).all(dim=1).sum()) > 0
    shrink_(model, torch.randn(2, 6))
    narrowed = model[0].out_features
    said = re.escape(f"GradualPruner: targets changed shape since its first round (0.weight [8, 6] -> [{narrowed}, 6])")
    with pytest.raises(ValueError, match=said):
        pruner.step(4)
    assert model[0].out_features == narrowed and int((model[0].weight == 0).all(dim=1).sum()) == 0
    # a pruner built over the narrowed model refuses the state saved before the shrink, before loading anything
    restored = GradualPruner([(model[0], "weight")], schedule, "ln_structured", scope="local", dim=0, n=1,
                             target_names=["0.weight"])
    with pytest.raises(ValueError, match=re.escape(f"the state's targets had other shapes at its first round "
                                                   f"(0.weight [8, 6] -> [{narrowed}, 6]): it is another pruner's, or "
                                                   "these targets were narrowed since (shrink_)")):
        restored.load_state_dict(pruner.state_dict())
    assert restored.last_t == -1 and not restored.history
    with pytest.raises(ValueError, match="a list of shapes \\(or None\\) in 'target_shapes'"):
        restored.load_state_dict({**pruner.state_dict(), "target_shapes": [[8.5, 6]]})
    with pytest.raises(ValueError, match=re.escape("the state is of a pruner over 2 targets, and this one has 1")):
        restored.load_state_dict({**pruner.state_dict(), "target_shapes": [[8, 6], [3, 8]]})
    older = {key: value for key, value in pruner.state_dict().items() if key != "target_shapes"}
    restored.load_state_dict(older)  # a state saved before the shapes were: loaded as it was
    assert restored.last_t == pruner.last_t


def test_a_round_called_in_inference_mode_makes_masks_training_can_use():
    """Masks made under torch.inference_mode are inference tensors: the next training forward failed ("Inference
    tensors cannot be saved for backward")."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 8)
    pruner = GradualPruner([(layer, "weight")], PolynomialDecay(final_sparsity=0.5, begin=0, end=2), "l1_unstructured")
    with torch.inference_mode():
        pruner.step(1)
    layer(torch.randn(3, 6)).sum().backward()
    assert pruned_count(layer, "weight") > 0 and layer.weight_orig.grad is not None


@pytest.mark.parametrize("other", [
    dict(method="ln_structured", scope="local", n=2, dim=0),
    dict(schedule=PolynomialDecay(final_sparsity=0.5, begin=0, end=12, frequency=3)),
    dict(method="l1_unstructured", scope="local"),
])
def test_a_state_of_a_pruner_built_otherwise_is_refused_before_anything_is_loaded(other, tmp_path):
    """Only the targets' shapes were compared: another method's or schedule's state loaded, and the resumed run ended
    at neither pruner's sparsity (0.92 for a structured 0.8; 0.7 for a final 0.5, its targets going backwards)."""
    from litcompress.pruning.schedules import CallableSchedule

    def build(method="l1_unstructured", schedule=None, **kwargs):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        schedule = schedule or PolynomialDecay(final_sparsity=0.8, begin=0, end=12, frequency=3)
        return net, GradualPruner(default_targets(net[:1]), schedule, method, **kwargs)

    net, pruner = build()
    for t in range(1, 8):
        pruner.step(t)
    torch.save(pruner.state_dict(), tmp_path / "pruner.pt")
    state = torch.load(tmp_path / "pruner.pt", weights_only=True)  # (plain strings: a weights-only load takes them)
    _, same = build()
    same.load_state_dict(state)
    assert same.last_t == pruner.last_t
    _, changed = build(**other)
    with pytest.raises(ValueError, match=r"GradualPruner.load_state_dict: the state is of a pruner built otherwise "
                                         r"\(.* -> .*\)\. Load it into a pruner built as that one was"):
        changed.load_state_dict(state)
    assert changed.last_t == -1 and not changed.history
    older = {key: value for key, value in state.items() if key != "settings"}
    changed.load_state_dict(older)  # a state saved before the settings were: loaded as it was
    # a schedule's function is not compared (its address changes from one process to the next)
    fraction = CallableSchedule(fn=lambda t: min(t / 10, 0.5), end=10)
    _, first = build(schedule=fraction)
    _, again = build(schedule=CallableSchedule(fn=lambda t: min(t / 10, 0.5), end=10))
    again.load_state_dict(first.state_dict())


class _EveryOtherStep(SparsitySchedule):  # (one's own, not a dataclass)
    unit, begin, end = "step", 0, 8

    def __init__(self, final_sparsity: float) -> None:
        self.final_sparsity = final_sparsity

    def target(self, t: int) -> float:
        return self.final_sparsity * min(t, self.end) / self.end

    def should_prune(self, t: int) -> bool:
        return t % 2 == 0 and self.begin <= t <= self.end


def test_a_state_loads_into_a_pruner_built_with_the_same_values_written_otherwise_and_a_custom_schedule_is_compared():
    """3 and 3.0, numpy's numbers, dim=-1 of 2-d weights and a float32 0.8 were refused as another pruner's; a
    schedule of one's own (not a dataclass) with another final sparsity was taken."""
    def build(schedule, method="ln_structured", **kwargs):
        net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        return GradualPruner(default_targets(net[:1]), schedule, method, scope="local", **kwargs)

    saved = build(PolynomialDecay(final_sparsity=0.8, begin=0, end=12, frequency=3, power=3), n=2, dim=1)
    for t in range(1, 5):
        saved.step(t)
    state = saved.state_dict()
    rebuilt = build(PolynomialDecay(final_sparsity=float(torch.tensor(0.8, dtype=torch.float32)), begin=np.int64(0),
                                    end=12, frequency=3, power=3.0), n=np.int64(2), dim=-1)
    rebuilt.load_state_dict(state)
    assert rebuilt.last_t == saved.last_t
    custom = build(_EveryOtherStep(0.8), method="l1_unstructured")
    custom.step(2)
    with pytest.raises(ValueError, match=r"the state is of a pruner built otherwise \(schedule step 0\.\.8 to 0\.8;"):
        build(_EveryOtherStep(0.5), method="l1_unstructured").load_state_dict(custom.state_dict())
    build(_EveryOtherStep(0.8), method="l1_unstructured").load_state_dict(custom.state_dict())


def test_the_state_of_a_schedule_known_at_its_rounds_only_is_saved_and_loads():
    """The settings read the schedule's targets at points that are no rounds: a table of the rounds' targets raised
    (KeyError) in state_dict, so saving a checkpoint failed where every round ran."""
    from litcompress.pruning.schedules import CallableSchedule

    table = {0: 0.0, 100: 0.5, 200: 0.8}

    def build():
        layer = nn.Linear(8, 8)
        return GradualPruner([(layer, "weight")], CallableSchedule(fn=lambda t: table[t], end=200, frequency=100))

    pruner = build()
    pruner.step(100)
    resumed = build()
    resumed.load_state_dict(pruner.state_dict())
    assert resumed.last_t == 100
