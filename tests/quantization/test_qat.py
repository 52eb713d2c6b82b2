"""Quantization-aware training (torchao PT2E QAT): the framework-free engine, on real kernels and files."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from torch import nn
from torch.nn.utils import prune

from litcompress import make_permanent_
from litcompress.quantization import ExportError, load_quantized
from litcompress.quantization.qat import QATConfig, QATModel, prepare_qat, sparse_weight_masks
from tests.conftest import ReluMLP


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 30, lr: float = 0.05) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _data(features: int = 16, rows: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, features, generator=generator)
    return x, (x[:, 0] * 4).long().clamp(max=3)


def _agree(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> None:
    """The int8 model computes what the fake-quantized one did: equal up to a step or two of the int8 grid (torchao's
    fused fake quantizer clamps the weights' lowest code to -127, the conversion to -128). No share of equal argmaxes
    is asked for: a row whose top two logits are closer than the difference flips (hypothesis found 7 rows with one
    such, margin 0.0015 against a difference of 0.0022), and where the margin is wider the bound implies agreement."""
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= 0.03 * float(scale.abs().max())


def test_prepare_leaves_the_model_alone_and_training_moves_only_the_copy():
    model = ReluMLP(16, 32, 4)
    before = copy.deepcopy(model.state_dict())
    x, y = _data()
    qat = prepare_qat(model, (x,))
    _fit(qat, x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(qat.model.fc1.weight, model.fc1.weight)  # the copy was trained
    assert set(dict(qat.named_parameters())) == {f"graph.{k}" for k in model.state_dict()}  # each parameter once


@settings(max_examples=4, deadline=None)
@given(hidden=st.integers(4, 40), rows=st.integers(1, 9), steps=st.integers(0, 12), seed=st.integers(0, 10_000))
@example(hidden=24, rows=7, steps=10, seed=1388)  # a near tie in one row: its argmax flips
def test_converted_int8_model_computes_the_trained_fake_quantized_model(hidden, rows, steps, seed):
    torch.manual_seed(seed)
    model = ReluMLP(16, hidden, 4)
    x, y = _data(rows=64, seed=seed)
    qat = prepare_qat(model, (x[:8],))
    _fit(qat, x, y, steps=steps)
    qat.eval()
    probe = torch.rand(rows, 16)  # another batch size than the trace's
    with torch.no_grad():
        fake = qat(probe)
        result = qat.convert()
        _agree(result.model(probe), fake, fake)
        _agree(qat(probe), fake, fake)  # converting leaves the QAT model as it was


def test_copy_false_trains_the_models_own_parameters_with_an_optimizer_built_before():
    model = ReluMLP(16, 32, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built on the plain model, as a Trainer does
    x, y = _data()
    qat = prepare_qat(model, (x,), copy=False)
    assert qat.model is model
    weight = model.fc1.weight.detach().clone()
    optimizer.zero_grad()
    nn.functional.cross_entropy(qat(x), y).backward()
    optimizer.step()
    assert not torch.equal(model.fc1.weight, weight)
    assert set(model.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight", "head.bias"}


def test_evaluation_does_not_move_the_observed_ranges():
    model = ReluMLP(16, 8, 4)
    x, y = _data()
    qat = prepare_qat(model, (x,))
    qat.train()
    qat(x)
    observed = qat.fake_quant_state()
    qat.eval()
    with torch.no_grad():
        qat(x * 100)
    assert all(torch.equal(observed[k], v) for k, v in qat.fake_quant_state().items())
    qat.train()
    qat(x * 100)
    assert any(not torch.equal(observed[k], v) for k, v in qat.fake_quant_state().items())


@pytest.mark.parametrize("keep", [True, False])
def test_keep_sparsity_holds_a_pruned_models_zeros_exactly(keep):
    model = ReluMLP(16, 32, 4)
    prune.l1_unstructured(model.fc2, "weight", amount=0.75)
    make_permanent_(model)
    zeros = model.fc2.weight == 0
    x, y = _data()
    qat = prepare_qat(model, (x,), QATConfig(keep_sparsity=keep))
    assert qat.held_sparse == (("fc2.weight",) if keep else ())
    _fit(qat, x, y)
    result = qat.convert()
    trained = qat.model.fc2.weight
    if keep:
        assert torch.equal(trained == 0, zeros)  # exactly the pruned entries, none grown back, none added
        assert result.held_sparse == ("fc2.weight",)
        int8_weights = [t for n, t in result.model.program.named_buffers() if t.dtype == torch.int8]
        assert any(float((t == 0).float().mean()) >= 0.75 for t in int8_weights)
    else:
        assert float((trained == 0).float().mean()) < 0.5  # training grew most back (dead units' inputs stay 0)


def test_fake_quant_state_round_trip_reproduces_the_trained_model():
    model = ReluMLP(16, 16, 4)
    x, y = _data()
    trained = prepare_qat(model, (x,))
    _fit(trained, x, y, steps=5)
    fresh = prepare_qat(trained.model, (x,))  # same weights, observers fresh
    fresh.load_fake_quant_state(trained.fake_quant_state())
    for key, value in trained.fake_quant_state().items():  # the observers' eps too (not reset to float32's)
        assert torch.equal(fresh.fake_quant_state()[key], value), key
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
    other = prepare_qat(ReluMLP(16, 24, 4), (x,))
    with pytest.raises(ValueError, match="not this graph's"):
        other.load_fake_quant_state({"nope": torch.zeros(1)})


def test_saved_int8_model_loads_back_and_takes_other_batch_sizes(tmp_path):
    model = ReluMLP(16, 16, 4)
    x, y = _data()
    qat = prepare_qat(model, (x[:4],))
    _fit(qat, x, y, steps=5)
    result = qat.convert()
    size = result.save(tmp_path / "model.pt2")
    assert size == (tmp_path / "model.pt2").stat().st_size > 0
    loaded, recipe = load_quantized(tmp_path / "model.pt2")
    assert recipe == result.recipe and recipe.backend == "pt2e" and recipe.approach == "static"
    with torch.no_grad():
        for rows in (1, 7, 64):
            assert torch.equal(loaded(x[:rows]), result.model(x[:rows]))


def test_fp32_layers_stay_unquantized():
    model = ReluMLP(16, 16, 4)
    x, _ = _data()
    converted = prepare_qat(model, (x,), QATConfig(fp32_layers=("head",))).convert().model.program
    int8_weights = [n for n, t in converted.named_buffers() if t.dtype == torch.int8]
    assert len(int8_weights) == 2  # fc1 and fc2, not head
    # a generator: checked first, it was used up and every layer quantized
    assert QATConfig(fp32_layers=(name for name in ["head"])).fp32_layers == ("head",)
    assert any(t.shape == model.head.weight.shape and t.dtype == torch.float32
               for t in list(converted.parameters()) + list(converted.buffers()))


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_weight_and_spectral_norm_parametrizations_train_and_convert(norm):
    """torch's parametrized norms were refused as pruning masks (make_permanent_, which the message said, left
    them): they are weight computations, traced into the graph and folded at conversion."""
    from torch.ao.pruning.sparsifier.utils import FakeSparsity
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = ReluMLP(16, 16, 4)
    getattr(nn.utils.parametrizations, norm)(model.fc1)
    x, _ = _data()
    qat_model = prepare_qat(model, (x,))
    qat_model.eval()
    with torch.no_grad():
        fake_quant = qat_model(x)
        int8 = qat_model.convert().model(x)
    torch.testing.assert_close(int8, fake_quant, atol=0.05, rtol=0)
    masked = ReluMLP(16, 16, 4)  # a mask parametrization (torch.ao.pruning's) is still refused
    parametrize.register_parametrization(masked.fc1, "weight", FakeSparsity(torch.ones_like(masked.fc1.weight)))
    with pytest.raises(ValueError, match=r"\['fc1'\] compute their weights from pruning masks"):
        prepare_qat(masked, (x,))


def test_refusals_are_clear_and_early():
    model = ReluMLP(16, 16, 4)
    x, _ = _data()
    pruned = copy.deepcopy(model)
    prune.l1_unstructured(pruned.fc1, "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"\['fc1'\] compute their weights from pruning masks.*make_permanent_"):
        prepare_qat(pruned, (x,))
    with pytest.raises(ValueError, match=r"\['nope'\] name no layer of ReluMLP"):
        prepare_qat(model, (x,), QATConfig(fp32_layers=("nope",)))
    for not_a_sequence in ("head", None, 5):  # None and 5 failed in the check itself ("not iterable")
        with pytest.raises(TypeError, match="sequence of qualified layer names"):
            QATConfig(fp32_layers=not_a_sequence)
    with pytest.raises(ValueError, match=r"fp32_layers=\('',\)\): '' names the whole model"):
        QATConfig(fp32_layers=("",))  # it passed, and the "int8" model had no quantized layer
    with pytest.raises(TypeError, match="reduce_range"):
        QATConfig(reduce_range=1)
    with pytest.raises(TypeError, match="expected a QATConfig"):
        prepare_qat(model, (x,), {"keep_sparsity": True})
    with pytest.raises(TypeError, match=r"trainable parameters are torch.float64; QAT trains a float32 graph"):
        prepare_qat(nn.Linear(4, 2).double(), (torch.randn(2, 4, dtype=torch.float64),))
    with pytest.raises(TypeError, match="tuple of tensors"):
        prepare_qat(model, ([1.0, 2.0],))

    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(ExportError, match="torch.export failed on DataDependent"):
        prepare_qat(DataDependent(), (x,))


def test_a_single_example_row_still_leaves_the_batch_free():
    model = ReluMLP(16, 8, 4)
    x, _ = _data()
    qat = prepare_qat(model, (x[:1],))
    assert isinstance(qat, QATModel)
    with torch.no_grad():
        assert qat.eval()(x).shape == (64, 4)


@pytest.mark.slow
def test_compiled_conversion_computes_what_the_reference_program_does(tmp_path):
    """torch.compile (inductor, a C++ compiler): the fused int8 kernels give the reference ops' outputs, converted
    or loaded from the file."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    x = torch.rand(16, 1, 8, 8)
    qat = prepare_qat(model, (x,))
    _fit(qat, x, (x.mean((1, 2, 3)) * 8).long().clamp(max=3), steps=5)
    result = qat.convert()
    reference, compiled = result.model, qat.convert(compile=True).model
    result.save(tmp_path / "model.pt2")
    loaded, _ = load_quantized(tmp_path / "model.pt2", compile=True)
    with torch.no_grad():
        for rows in (16, 3):
            _agree(compiled(x[:rows]), reference(x[:rows]), reference(x[:rows]))
            _agree(loaded(x[:rows]), reference(x[:rows]), reference(x[:rows]))


def test_sync_ranges_outside_a_distributed_run_changes_nothing():
    qat = prepare_qat(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), (torch.randn(5, 6),))
    before = qat.fake_quant_state()
    assert qat.sync_ranges_() == 0
    after = qat.fake_quant_state()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ddp_ranks_sync_their_ranges_to_those_of_one_process_seeing_every_batch(tmp_path):
    script = Path(__file__).with_name("qat_ddp_script.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parents[2]), str(script.parents[2] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    # prepared on their own first batches, the ranks' activation ranges differed; synced, each is the widest
    prepared = first["gathered"]
    differing = {k.rsplit(".", 1)[0] for k in prepared[0] if not torch.equal(prepared[0][k], prepared[1][k])}
    assert differing and first["changed_at_prepare"] == second["changed_at_prepare"] == len(differing)
    for name in {k.rsplit(".", 1)[0] for k in first["synced"]}:
        for record in (first, second):
            synced = record["synced"]
            lows, highs = (prepared[0][f"{name}.min"], prepared[1][f"{name}.min"]), (prepared[0][f"{name}.max"],
                                                                                     prepared[1][f"{name}.max"])
            assert torch.equal(synced[f"{name}.min"], torch.minimum(*lows))
            assert torch.equal(synced[f"{name}.max"], torch.maximum(*highs))
            if name not in differing:  # the weights' quantizers: the same on every rank, their scales left bit for bit
                assert torch.equal(synced[f"{name}.scale"], prepared[record is second][f"{name}.scale"])
    # after every step the input's range is exactly what one process averaging over the union of the batches holds
    assert first["union_steps"] == second["union_steps"] == [(True, True)] * 5
    for key in ("synced", "trained", "weights"):
        assert first[key].keys() == second[key].keys()
        for name in first[key]:
            assert torch.equal(first[key][name], second[key][name]), (key, name)
    torch.testing.assert_close(first["int8_outputs"], second["int8_outputs"], rtol=0, atol=0)


def test_a_training_batch_of_one_row_through_batch_norm_is_refused_and_the_statistics_kept():
    # The eager model raises on this; the traced graph would write NaN into the model's own running variance.
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    qat = prepare_qat(model, (torch.randn(4, 8),), copy=False)
    qat(torch.randn(4, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"batch norm \['1'\] saw one value per channel.*drop_last=True"):
        qat(torch.randn(1, 8))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    qat.eval()
    assert qat(torch.randn(1, 8)).shape == (1, 2)  # evaluation uses the running statistics: one row is fine
    # a conv's batch norm has a value per position: one image trains, as in eager mode
    convs = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    qat = prepare_qat(convs, (torch.randn(4, 1, 8, 8),), copy=False)
    qat(torch.randn(1, 1, 8, 8))
    assert torch.isfinite(convs[1].running_var).all() and int(convs[1].num_batches_tracked) == 1


def test_batch_norms_count_training_batches_only_as_in_eager_mode():
    # torchao's evaluation form still adds 1 to num_batches_tracked per call, which checkpoints would carry
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    qat = prepare_qat(model, (torch.randn(4, 8),), copy=False)
    assert int(model[1].num_batches_tracked) == 0  # calibrating on the example inputs trained nothing
    for _ in range(3):
        qat(torch.randn(4, 8))
    qat.eval()
    for _ in range(2):
        qat(torch.randn(4, 8))
    assert int(model[1].num_batches_tracked) == 3


class MeanOverTime(nn.Module):
    """(N, T, F) -> (N, 3): a per-step layer, then the mean over the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)).mean(1))


def test_a_declared_sequence_dim_stays_free_in_the_graph_the_int8_model_and_its_file(tmp_path):
    """Batches of another sequence length failed with torch's 'Guard failed: x.size()[1] == 5' (QAT had no
    dynamic_dims); the undeclared case now says what to declare."""
    torch.manual_seed(0)
    model = MeanOverTime()
    qat = prepare_qat(model, (torch.randn(4, 5, 8),), QATConfig(dynamic_dims={0: 1}))
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    for length in (7, 3):
        optimizer.zero_grad()
        qat(torch.randn(4, length, 8)).pow(2).mean().backward()
        optimizer.step()
    result = qat.convert()
    result.save(tmp_path / "int8.pt2")
    loaded, _ = load_quantized(tmp_path / "int8.pt2")
    x = torch.randn(2, 11, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x))
    fixed = prepare_qat(model, (torch.randn(4, 5, 8),))
    with pytest.raises(ValueError, match=r"free only along dims \[\[0\]\].*QATConfig\(dynamic_dims=\{input_index: dim"):
        fixed(torch.randn(4, 7, 8))
    with pytest.raises(ValueError, match="dynamic_dims names dim 3 of input 0"):
        prepare_qat(model, (torch.randn(4, 5, 8),), QATConfig(dynamic_dims={0: 3}))
    # the int8 model of an undeclared length: said as the graph's were (torch's "Guard failed" AssertionError)
    converted = fixed.convert().model
    with pytest.raises(ValueError, match=re.escape(
            "inputs of shapes [(4, 7, 8)] (Guard failed: x.size()[1] == 5): the exported model fixed dim 1 of input "
            "0 to the example's size, and a batch had another; if that size varies (a sequence length), declare it: "
            "QATConfig(dynamic_dims={0: (1,)}).")):
        converted(torch.randn(4, 7, 8))


class FixedBatch(nn.Module):
    """Code that fixes the batch size (view(8, -1)): the export probes a grown batch, which fails here."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).view(8, -1))


def test_preparing_a_model_that_fixes_its_batch_size_leaves_its_batch_norm_statistics():
    """The probe ran the model in training mode on a grown batch: its statistics moved before any training step."""
    torch.manual_seed(0)
    model = FixedBatch()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    prepare_qat(model, (torch.randn(8, 1, 8, 8),), copy=False)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_observers_frozen_while_training_stay_frozen_after_an_evaluation():
    """Freezing the int8 ranges for the last epochs (late QAT) was undone by the first validation: going back to
    training turned every observer on."""
    from torchao.quantization.pt2e.fake_quantize import disable_observer

    torch.manual_seed(0)
    qat = prepare_qat(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), (torch.randn(8, 16),))
    qat.train()
    qat(torch.randn(8, 16))
    qat.graph.apply(disable_observer)
    frozen = qat.fake_quant_state()
    qat.eval()
    qat(torch.randn(8, 16))
    qat.train()
    qat(5 * torch.randn(8, 16))
    assert all(torch.equal(value, frozen[key]) for key, value in qat.fake_quant_state().items())
    fresh = prepare_qat(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), (torch.randn(8, 16),))
    fresh.train()
    fresh(torch.randn(8, 16))
    before = fresh.fake_quant_state()
    fresh.eval()
    fresh(torch.randn(8, 16))
    fresh.train()
    fresh(5 * torch.randn(8, 16))  # not frozen: its observers are on again after the evaluation
    assert any(not torch.equal(value, before[key]) for key, value in fresh.fake_quant_state().items())


@pytest.mark.parametrize("when", ["after-train", "before-train"])
def test_observers_frozen_after_an_evaluation_stay_frozen_in_training(when):
    """A freeze made between an evaluation and the next training step (``train(); apply(disable_observer)``, or
    before ``train()``, as a callback's ``on_train_epoch_start`` does) acted on the evaluation form, whose observers
    were all off, and the switch back to training turned them on again."""
    from torchao.quantization.pt2e.fake_quantize import disable_observer

    torch.manual_seed(0)
    qat = prepare_qat(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), (torch.randn(8, 16),))
    qat.train()
    qat(torch.randn(8, 16))
    qat.eval()
    qat(torch.randn(8, 16))
    if when == "before-train":
        qat.graph.apply(disable_observer)
        qat.train()
    else:
        qat.train()
        qat.graph.apply(disable_observer)
    frozen = qat.fake_quant_state()
    qat(5 * torch.randn(8, 16))
    assert all(torch.equal(value, frozen[key]) for key, value in qat.fake_quant_state().items())
    qat.eval()
    qat(5 * torch.randn(8, 16))  # an evaluation moves no range, and leaves the freeze as it was
    qat.train()
    qat(5 * torch.randn(8, 16))
    assert all(torch.equal(value, frozen[key]) for key, value in qat.fake_quant_state().items())


def test_freeze_ranges_turns_off_what_torchaos_disable_observer_does_and_keeps_the_ranges():
    from torchao.quantization.pt2e.fake_quantize import disable_observer

    torch.manual_seed(0)
    x = torch.randn(8, 16)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    by_us, by_torchao = (prepare_qat(model, (x,)) for _ in range(2))  # (copies: the model is left as it is)
    for qat in (by_us, by_torchao):
        qat.train()
        qat(x)
    assert not by_us.ranges_frozen
    by_us.freeze_ranges_()
    by_torchao.graph.apply(disable_observer)
    assert by_us.ranges_frozen and by_torchao.ranges_frozen
    frozen = by_us.fake_quant_state()
    assert frozen.keys() == by_torchao.fake_quant_state().keys()
    assert all(torch.equal(value, by_torchao.fake_quant_state()[key]) for key, value in frozen.items())
    by_us(5 * x)  # training on a wider batch moves no range
    assert all(torch.equal(value, frozen[key]) for key, value in by_us.fake_quant_state().items())


def test_a_freeze_of_the_observers_is_part_of_the_state_a_resumed_graph_loads():
    """A resumed fit builds a fresh graph, its observers on: the freeze of the run it resumes was lost (the flags
    were left out of the state as following the mode), and its ranges moved on where the uninterrupted run's did not.
    A state saved without the flags still loads."""
    from torchao.quantization.pt2e.fake_quantize import disable_observer

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), torch.randn(8, 16)
    qat = prepare_qat(model, (x,))
    qat(x)
    qat.graph.apply(disable_observer)
    state = qat.fake_quant_state()
    resumed = prepare_qat(model, (x,))
    resumed.load_fake_quant_state(state)
    resumed(5 * x)
    assert all(torch.equal(value, state[key]) for key, value in resumed.fake_quant_state().items())
    older = {key: value for key, value in state.items() if not key.endswith(("observer_enabled", "fake_quant_enabled"))}
    fresh = prepare_qat(model, (x,))
    fresh.load_fake_quant_state(older)
    assert all(torch.equal(value, older[key]) for key, value in fresh.fake_quant_state().items() if key in older)


def test_zeros_of_biases_are_held_only_in_layers_whose_weights_were_pruned():
    """Any 1-d zeros were held: a bias partly zero at initialisation (an LSTM's beside its forget gate's ones) stayed
    zero through QAT in a model never pruned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].bias[:8] = 0  # a partly zero initialisation, never pruned
        model[2].weight[:, :8] = 0  # pruned: its weight and its bias
        model[2].bias[:2] = 0
    assert set(sparse_weight_masks(model)) == {"2.weight", "2.bias"}
    lstm = nn.LSTM(4, 8)
    with torch.no_grad():
        lstm.bias_ih_l0.zero_()
        lstm.bias_ih_l0[8:16] = 1.0
    assert sparse_weight_masks(lstm) == {}

    class TiedHead(nn.Module):  # the head's weight is the embedding's, counted under the embedding's name
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(20, 8), nn.Linear(8, 20)
            self.head.weight = self.emb.weight

    tied = TiedHead()
    with torch.no_grad():
        tied.emb.weight[:, :4] = 0
        tied.head.bias[:5] = 0
    assert set(sparse_weight_masks(tied)) == {"emb.weight", "head.bias"}


def test_a_frozen_half_precision_parameter_the_model_casts_is_not_refused():
    class CastsItsTable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 4)
            self.scale = nn.Parameter(torch.ones(16, dtype=torch.float16), requires_grad=False)

        def forward(self, x):
            return self.fc(x * self.scale.float())

    x = torch.randn(8, 16)
    qat = prepare_qat(CastsItsTable(), (x,))
    assert qat(x).shape == (8, 4)


def _graph_arguments(qat: QATModel, name: str) -> list:
    """The values of the argument `name` of the QAT graph's dropout or batch-norm nodes, in order."""
    values = []
    for node in qat.graph.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        names = [a.name for a in schema.arguments] if schema is not None else []
        if name in names:
            index = names.index(name)
            values.append(node.args[index] if index < len(node.args) else node.kwargs.get(name))
    return values


@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_dropout_trains_at_the_models_rate_through_every_switch(rate):
    """torchao's train/eval switch writes its pattern's p=0.5 into every dropout (prepare_qat makes one): a model
    trained with 0.0 or 0.1 dropped half its activations, and a run resumed from a checkpoint drew otherwise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.Dropout(rate), nn.Linear(512, 4))
    x = torch.randn(32, 64)
    qat = prepare_qat(model, (x,))
    for mode in (True, False, True):  # train, evaluate, train again: each a switch of the graph's form
        qat.train(mode)
        qat(x)
        assert _graph_arguments(qat, "p") == [rate]
    if rate == 0.0:  # no activation dropped: training outputs are the evaluation outputs
        qat.train()
        with torch.no_grad():
            trained = qat(x)
        qat.eval()
        with torch.no_grad():
            torch.testing.assert_close(trained, qat(x))


def test_batch_norm_keeps_the_models_statistics_momentum_and_epsilon_in_training_and_in_the_int8_model():
    """The conv-bn fusion and the train/eval switch wrote torch's defaults (momentum 0.1, eps 1e-5): one step moved
    the running mean ten times as far as eager, and the int8 model of a batch norm with eps=0.1 was off by 1.2 of 3.5
    (convert folds conv-bn pairs with 1e-5). The running statistics are the model's own, updated by training only,
    and the int8 model converted after training computes the trained fake-quantized one. (One model and one convert
    for all of it: each convert of a model with a batch norm takes ~15 s in torchao.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, eps=0.1, momentum=0.01), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        model[1].running_var.fill_(0.05)  # small variances: where eps matters
    x = torch.randn(16, 2, 8, 8) * 2 + 3
    eager = copy.deepcopy(model)
    qat = prepare_qat(model, (x,), copy=False)
    assert _graph_arguments(qat, "momentum") == [0.01] and _graph_arguments(qat, "eps") == [0.1]
    start = model[1].running_mean.clone()
    eager.train()
    qat.train()
    with torch.no_grad():
        eager(x)
        qat(x)
    # the training graph updated the model's own statistics, as far as eager's momentum moves them
    assert not torch.equal(model[1].running_mean, start)
    torch.testing.assert_close(model[1].running_mean - start, eager[1].running_mean - start, rtol=0.02, atol=1e-4)
    eager.eval()
    qat.eval()
    with torch.no_grad():
        mean = model[1].running_mean.clone()
        reference = eager(x)
        qat(x * 5)
        assert torch.equal(model[1].running_mean, mean)  # evaluation form: running statistics, no update
        fake = qat(x)
        int8 = qat.convert().model(x)  # after training: the statistics trained, eps still where it matters
    assert float((int8 - reference).abs().max()) < 0.03 * float(reference.abs().max())
    _agree(int8, fake, fake)
    assert _graph_arguments(qat, "eps") == [0.1]  # the int8 copy's eps moved into its own running variance only


def _conv_bn_net(**batch_norm: object) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, **batch_norm), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


@pytest.mark.parametrize(("fp32_layers", "batch_norm", "message"), [
    (("0",), {}, r"keeps the convolutions \['0'\] in fp32, which torchao's QAT cannot do for a convolution a batch "
                 r"norm follows .* fold their batch norms into them first"),
    ((), {"affine": False}, r"\['1'\] are batch norms without an affine weight or running statistics \(affine=False"),
    ((), {"track_running_stats": False}, r"\['1'\] are batch norms without .*track_running_stats=False"),
])
def test_what_torchaos_conv_batch_norm_fusion_cannot_take_is_refused_naming_the_layers(fp32_layers, batch_norm,
                                                                                       message):
    """torchao's own errors named no layer: an IndexError for a PTQ recipe's fp32 convolution (which PTQ keeps
    fine), a missing tensor for a batch norm without an affine weight or running statistics."""
    model = _conv_bn_net(**batch_norm)
    x = torch.randn(8, 2, 8, 8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ExportError, match=message):
        prepare_qat(model, (x,), QATConfig(fp32_layers=fp32_layers))
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert isinstance(prepare_qat(_conv_bn_net(), (x,), QATConfig(fp32_layers=("4",))), QATModel)  # no conv kept


def test_a_batch_norm_or_dropout_frozen_inside_a_training_model_is_warned_of_from_the_plain_api():
    """The QAT graph trains them with the rest (its statistics moved after one training call); the Lightning
    callback said so, prepare_qat said nothing."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Linear(8, 3))
    model[1].eval()
    model[2].eval()
    with pytest.warns(UserWarning, match=r"prepare_qat: 1, 2 in eval mode inside Sequential, which trains: .* as a "
                                         r"whole, so they train as the rest does"):
        prepare_qat(model, (torch.randn(4, 6),))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*in eval mode inside")
        prepare_qat(model.eval(), (torch.randn(4, 6),))  # nothing is frozen apart from the rest
        prepare_qat(model.train(), (torch.randn(4, 6),))


def test_a_failure_to_trace_is_not_blamed_on_a_batch_norm_and_a_cumulative_one_is_named_where_it_is_the_cause():
    """The batch-norm causes are for torchao's QAT graph of a model that traced: a wrong input width was said to be
    a batch norm without affine weight (torch.export's own error cut short); momentum=None is what torch.export
    cannot trace (a data-dependent count), which it said as a control-flow problem."""
    plain = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, affine=False), nn.Linear(8, 3))
    with pytest.raises(ExportError, match=r"Sequential fails on the example inputs themselves, of shapes \[\(4, 7\)\] "
                                          r"\(RuntimeError: mat1 and mat2 shapes cannot be multiplied") as refused:
        prepare_qat(plain, (torch.randn(4, 7),))
    assert "batch norms without" not in str(refused.value)
    assert isinstance(prepare_qat(plain, (torch.randn(4, 6),)), QATModel)  # it takes a BN without affine there
    with pytest.raises(ExportError, match=r"Batch norms with momentum=None \(\['1'\]\) average over a count "
                                          r"torch.export cannot trace; give them a momentum"):
        prepare_qat(_conv_bn_net(momentum=None), (torch.randn(8, 2, 8, 8),))
    convolution = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    assert isinstance(prepare_qat(convolution, (torch.randn(8, 2, 8, 8),), QATConfig(fp32_layers=("0",))), QATModel)


def test_a_model_fabric_set_up_is_refused_naming_the_module_to_prepare():
    """torch.export failed on Fabric's wrapper with a dynamic-shapes mismatch, and the advice was about data-dependent
    control flow; the module it wraps prepares."""
    from lightning.fabric import Fabric

    model = ReluMLP(16, 8, 3)
    wrapped = Fabric(accelerator="cpu", devices=1).setup_module(model)
    with pytest.raises(TypeError, match=r"_FabricModule wraps ReluMLP \(Lightning Fabric's fabric.setup\): prepare "
                                        r"the module it wraps \(`.module`\)"):
        prepare_qat(wrapped, (torch.randn(4, 16),))
    assert isinstance(prepare_qat(wrapped.module, (torch.randn(4, 16),)), QATModel)


@pytest.mark.parametrize("how", ["autocast", "bf16 weights", "bf16 inputs"])
def test_a_qat_graph_run_in_another_precision_says_which_and_what_to_do(how):
    """Under autocast (Fabric's bf16-mixed) or after a half-precision cast (bf16-true), torchao's fake quantizer
    failed with "expected scalar type Float but found BFloat16", naming neither the cause nor the remedy."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    qat = prepare_qat(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), (x,))
    if how == "bf16 weights":
        qat.to(torch.bfloat16)
    cause = {"autocast": "its forward runs under autocast to bfloat16 (a mixed precision)",
             "bf16 weights": "its weights are bfloat16", "bf16 inputs": "its inputs are bfloat16"}[how]
    with pytest.raises(TypeError, match=re.escape(f"QAT: {cause}") + ".*" + re.escape(
            "Train the QAT model in float32: without autocast (Fabric/Trainer precision='32-true')")):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
            qat(x.bfloat16() if how != "autocast" else x)
    if how != "bf16 weights":
        assert qat(x).shape == (4, 3)  # the same graph in float32: unchanged


@pytest.mark.parametrize("path", ["eval", "one-row batch norm"])
def test_a_qat_graph_given_half_inputs_says_so_in_eval_and_on_one_row(path):
    """The eval form's matmul said "mat1 and mat2 must have the same dtype", and a training batch of one row, which
    takes its own path around the batch norms, torchao's raw dtype error."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    qat = prepare_qat(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)), (x,))
    qat.train(path != "eval")
    rows = x[:1] if path == "one-row batch norm" else x
    with pytest.raises(TypeError, match=re.escape("QAT: its inputs are bfloat16; the graph's fake quantizers compute "
                                                  "in float32")):
        qat(rows.bfloat16())


class _Tempered(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.a = nn.Linear(16, features)

    def forward(self, x, temperature):
        return self.a(x) / temperature


@pytest.mark.parametrize("features", [16, 3])
def test_prepare_qat_takes_a_one_element_input_beside_a_batch(features):
    """The one-element temperature beside a batch of 4 was doubled for the export as a batch of 1 would be: the
    export failed, the error blaming the model's tracing."""
    temperature = torch.tensor([2.0])
    qat = prepare_qat(_Tempered(features), (torch.randn(4, 16), temperature))
    with torch.no_grad():
        for rows in (4, 7):
            assert qat.eval()(torch.randn(rows, 16), temperature).shape == (rows, features)


class _SharedReLU(nn.Module):
    """One nn.ReLU object after two conv-batch-norm pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        self.relu, self.fc = nn.ReLU(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        return self.fc(self.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def test_a_layer_called_at_two_places_is_named_with_the_fix():
    """torchao's QAT annotation failed with "Input partition has more than one output node", naming no layer."""
    torch.manual_seed(0)
    model = _SharedReLU()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ExportError, match=r"^prepare_qat: \['relu'\] is called at several places in forward .* "
                                          r"give each call its own instance"):
        prepare_qat(model, (torch.randn(4, 1, 8, 8),))
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())  # statistics too


def test_layers_torchao_takes_at_several_places_are_not_blamed():
    """A Linear in a loop (tied weights, which torchao's QAT takes) was named beside, or instead of, the shared
    activation, with advice that would untie it."""
    from litcompress.quantization.qat import _reused_modules_cause

    loop = nn.Sequential(nn.Linear(4, 4))
    looped = type("Looped", (nn.Module,), {"forward": lambda self, x: loop(loop(x))})()
    looped.add_module("loop", loop)
    assert _reused_modules_cause(looped, (torch.randn(2, 4),)) is None
    assert _reused_modules_cause(_SharedReLU(), (torch.randn(4, 1, 8, 8),)).startswith("['relu'] is called")


@pytest.mark.parametrize("model, config, left", [
    (nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), QATConfig(fp32_layers=("0", "2")),
     r" \(fp32_layers=\['0', '2'\] keeps in fp32 those it would take\)"),
    (nn.Sequential(nn.LayerNorm(8), nn.GELU()), None, ""),
], ids=["every layer fp32", "none it takes"])
def test_a_model_with_no_layer_to_quantize_is_refused_as_it_is_prepared(model, config, left):
    """It trained and 'converted' to the fp32 model itself, saved under an int8 recipe, without a word (where
    fp32_layers=('',) was refused for that)."""
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"prepare_qat: no layer of Sequential is quantized{left}: torchao's x86 "
                                         r"quantizer takes Linear and Conv2d layers"):
        prepare_qat(model, (torch.randn(8, 8),), config)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())


def test_inputs_and_frozen_layers_prepare_qat_cannot_take_are_named():
    """A frozen float64 or bfloat16 layer (not cast by the model) and float64 inputs failed in torchao's words
    ("expected scalar type Float but found Double"); inputs of a shape the model does not take were said to need a
    model without data-dependent control flow."""
    frozen = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    frozen[0].to(torch.bfloat16).requires_grad_(False)
    with pytest.raises(TypeError, match=r"prepare_qat: its parameters 0.weight \(bfloat16\), 0.bias \(bfloat16\) are "
                                        r"not float32, and the graph's fake quantizers compute in float32"):
        prepare_qat(frozen, (torch.randn(4, 8),))
    doubled = nn.Sequential(nn.Linear(8, 2)).double().requires_grad_(False)
    with pytest.raises(TypeError, match=r"are not float32; its inputs are float64, and the graph's fake quantizers"):
        prepare_qat(doubled, (torch.randn(4, 8, dtype=torch.float64),))
    with pytest.raises(ExportError, match=r"prepare_qat: Sequential fails on the example inputs themselves, of shapes "
                                          r"\[\(4, 9\)\] \(RuntimeError: mat1 and mat2 shapes cannot be multiplied"):
        prepare_qat(nn.Sequential(nn.Linear(8, 2)), (torch.randn(4, 9),))
    with pytest.raises(TypeError, match=r"or, for layers its forward runs in their own precision, keep them out of "
                                        r"int8: QATConfig\(fp32_layers=\('0',\)\)"):
        prepare_qat(frozen, (torch.randn(4, 8),))

    class Branches(nn.Module):
        """Data-dependent control flow in training (export's problem, not the inputs'), an eval branch that needs a
        buffer filled later, and a forward that counts its calls."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 2)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))
            self.register_buffer("prototypes", torch.empty(0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            y = self.fc(x)
            if not self.training:
                return y @ self.prototypes.t()
            return y if y.sum() > 0 else -y

    model = Branches()
    with pytest.raises(ExportError, match=r"(?s)torch.export failed on Branches: .* QAT needs a model torch.export "
                                          r"can trace"):
        prepare_qat(model, (torch.randn(4, 8),), copy=False)
    assert int(model.calls) == 0  # the eager try ran on a copy, in training mode, as the export did


class _SomeLayersTorchaoSkips(nn.Module):
    """A Conv3d and a ConvTranspose2d, which torchao's x86 quantizer does not annotate, beside layers it takes."""

    def __init__(self) -> None:
        super().__init__()
        self.volume = nn.Conv3d(2, 4, 3)
        self.up = nn.ConvTranspose2d(4, 5, 2)
        self.mix = nn.Conv2d(5, 6, 1)
        self.norm = nn.BatchNorm2d(6)  # (QAT's conv-bn fusion scales mix's weight before its fake quantizer)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.volume(x).mean(2))
        return self.head(self.norm(self.mix(y)).mean((2, 3)))


@pytest.mark.parametrize("fp32_layers, named", [
    ((), "volume \\(Conv3d\\), up \\(ConvTranspose2d\\) stay"),
    (("volume",), "up \\(ConvTranspose2d\\) stays"),
    (("volume", "up"), None),
])
def test_layers_the_quantizer_leaves_in_fp32_are_named_and_are_those_the_int8_model_runs_in_fp32(fp32_layers, named):
    """A Conv3d beside a Linear: the Linear was quantized, the Conv3d ran in fp32 in the "int8" model, and nothing
    said so."""
    model = _SomeLayersTorchaoSkips()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat = prepare_qat(model, (torch.randn(2, 2, 4, 6, 6),), QATConfig(fp32_layers=fp32_layers))
    said = [str(w.message) for w in caught if str(w.message).startswith("prepare_qat: torchao's x86 quantizer")]
    if named is None:
        assert said == []
    else:
        assert len(said) == 1 and re.search(named + " float32 in the int8 model", said[0]), said
        listed = fp32_layers + tuple(name for name in ("volume", "up") if name not in fp32_layers)
        assert said[0].endswith(f"list them in QATConfig(fp32_layers={listed!r}).")  # (those given kept: copied, the
        # suggestion silences the warning and keeps them fp32)
    if fp32_layers:
        return  # (converting a conv-bn QAT graph takes torchao ~15 s here: once is enough)
    program = qat.convert().model.program
    int8_shapes = {tuple(t.shape) for t in program.buffers() if t.dtype == torch.int8}
    assert int8_shapes == {tuple(model.mix.weight.shape), tuple(model.head.weight.shape)}  # the rest ran in fp32


class _Conv1dThenRelu(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.conv, self.functional, self.relu = nn.Conv1d(4, 6, 3), functional, nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)) if self.functional else self.relu(self.conv(x))


def test_a_conv1d_is_taken_only_where_an_relu_module_follows_it_as_the_readme_says():
    """README and prepare_qat's refusal named Linear and Conv2d only, while the x86 quantizer also takes a Conv1d
    followed by an nn.ReLU module (not torch.relu)."""
    x = torch.randn(2, 4, 10)
    taken = prepare_qat(_Conv1dThenRelu(functional=False), (x,))
    assert taken._fake_quantizers
    with pytest.raises(ValueError, match=r"takes Linear and Conv2d layers, and a Conv1d an nn.ReLU module follows"):
        prepare_qat(_Conv1dThenRelu(functional=True), (x,))
