"""Hidden units of LSTM/GRU/RNN layers: pruned by norm, removed exactly by shrink, loaded back, through the pipeline."""

from __future__ import annotations

import copy
import re

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from litcompress import CompressionConfig, PruneConfig, compress, shrink
from litcompress.models import LSTMClassifier
from litcompress.pruning.engine import pruned_targets
from litcompress.pruning.heads import prune_heads_
from litcompress.pruning.narrow import load_shrunk_state_dict
from litcompress.pruning.recurrent import (gate_count, keep_units_, prune_units_, unit_norms, units_why_not,
                                           zero_units)
from litcompress.pruning.shrink import channel_plan
from tests.conftest import sgd_fine_tune

KINDS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}


def _zero_candidate_rows_(rnn: nn.RNNBase, units: list[int]) -> None:
    """Zero only the rows feeding new values into the state (LSTM g, GRU n, RNN all) of `units`, everywhere."""
    hidden = rnn.hidden_size
    gate = 2 if rnn.mode in ("LSTM", "GRU") else 0
    with torch.no_grad():
        for name, tensor in rnn.named_parameters():
            for unit in units:
                tensor[gate * hidden + unit] = 0


class Sequence(nn.Module):
    """Linear -> recurrent layer -> (its output sequence, last hidden state or LSTM cell state) -> Linear."""

    def __init__(self, kind: str, layers: int, bidirectional: bool, bias: bool, batch_first: bool, read: str,
                 activation: bool, hidden: int = 8) -> None:
        super().__init__()
        self.kind, self.read, self.batch_first, self.activation = kind, read, batch_first, activation
        self.embed = nn.Linear(5, 6)
        self.rnn = KINDS[kind](6, hidden, num_layers=layers, bidirectional=bidirectional, bias=bias,
                               batch_first=batch_first)
        directions = 2 if bidirectional else 1
        self.head = nn.Linear(hidden * directions if read == "output" else 2 * hidden if read.startswith("joined")
                              else hidden, 3)

    def forward(self, x):
        out, state = self.rnn(self.embed(x))
        h = state[0] if self.kind == "LSTM" else state
        if self.read == "output":
            z = out[:, -1] if self.batch_first else out[-1]
        elif self.read == "cell" and self.kind == "LSTM":
            z = state[1][-1]
        elif self.read == "joined":  # a bidirectional layer's last forward and backward states, as tutorials write it
            z = torch.cat((h[0], h[-1]), dim=1)
        elif self.read == "joined slices":  # the same, as another tutorial writes it
            z = torch.cat((h[0, :, :], h[-1, ...]), dim=1)
        else:
            z = h[-1]
        return self.head(torch.sigmoid(z) if self.activation else z)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), layers=st.integers(1, 3), bidirectional=st.booleans(),
       bias=st.booleans(), batch_first=st.booleans(),
       read=st.sampled_from(["output", "hidden", "cell", "joined", "joined slices"]),
       activation=st.booleans(), dead=st.sets(st.integers(0, 7)), seed=st.integers(0, 2**16))
def test_shrink_removes_exactly_the_units_that_output_zero_and_keeps_every_output(
        kind, layers, bidirectional, bias, batch_first, read, activation, dead, seed):
    torch.manual_seed(seed)
    model = Sequence(kind, layers, bidirectional, bias, batch_first, read, activation).eval()
    _zero_candidate_rows_(model.rnn, sorted(dead))
    assert zero_units(model.rnn).nonzero().flatten().tolist() == sorted(dead)
    x = torch.randn((4, 7, 5) if batch_first else (7, 4, 5))
    result = shrink(model, x)
    removed = min(len(dead), 7)  # one unit always stays
    assert result.model.rnn.hidden_size == 8 - removed
    torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=1e-5)  # the same function, fewer units
    if removed:
        (layer,) = [layer for layer in result.report.layers if layer.name == "rnn"]
        assert (layer.channels_before, layer.channels_after, layer.consumer) == (8, 8 - removed, "head")
        assert layer.folded == (removed if activation else 0)  # sigmoid(0) = 0.5 went into the head's bias
        assert layer.units and result.report.units_removed == removed and "hidden units" in result.report.table()
        assert result.report.channels_removed == 0  # the embedding Linear lost nothing
        assert result.report.parameters_after < result.report.parameters_before
    assert model.rnn.hidden_size == 8  # the model given is untouched


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), layers=st.integers(1, 2), bidirectional=st.booleans(),
       bias=st.booleans(), fraction=st.floats(0, 0.99), seed=st.integers(0, 2**16))
def test_prune_units_masks_the_weakest_units_in_every_gate_layer_and_direction(kind, layers, bidirectional, bias,
                                                                                fraction, seed):
    torch.manual_seed(seed)
    holder = nn.Sequential(KINDS[kind](4, 10, num_layers=layers, bidirectional=bidirectional, bias=bias))
    rnn = holder[0]
    norms = unit_norms(rnn)
    (count,) = prune_units_(holder, fraction).values()
    assert count == min(round(fraction * 10), 9)
    dead = zero_units(rnn)
    assert int(dead.sum()) == count
    assert set(dead.nonzero().flatten().tolist()) == set(torch.argsort(norms, stable=True)[:count].tolist())
    gates = gate_count(rnn)
    for _, module, name in pruned_targets(holder):  # every row of a pruned unit, in every gate block, is masked
        rows = getattr(module, name + "_mask").reshape(gates, 10, -1)
        assert bool((rows[:, dead] == 0).all()) and bool((rows[:, ~dead] == 1).all())
    x = torch.randn(6, 3, 4)
    out = holder(x)[0]
    assert bool((out.view(6, 3, -1, 10)[..., dead] == 0).all())  # pruned units output zero


def test_growing_fractions_keep_the_units_pruned_before_and_at_least_one_unit_stays():
    torch.manual_seed(0)
    holder = nn.Sequential(nn.LSTM(4, 6))
    prune_units_(holder, 0.34)
    first = zero_units(holder[0])
    with torch.no_grad():  # the pruned units' trainable weights grow large: masked units stay masked
        holder[0].weight_ih_l0_orig.mul_(100)
    prune_units_(holder, 0.5)
    second = zero_units(holder[0])
    assert bool((second & first).eq(first).all()) and int(second.sum()) == 3
    prune_units_(holder, 0.1)  # a smaller fraction brings none back
    assert torch.equal(zero_units(holder[0]), second)
    prune_units_(holder, 0.99)
    assert int(zero_units(holder[0]).sum()) == 5
    with pytest.raises(ValueError, match=r"expected a fraction .* in \[0, 1\)"):
        prune_units_(holder, 1.0)


def test_units_that_cannot_be_removed_are_left_and_said_why():
    assert "single hidden unit" in units_why_not(nn.GRU(4, 1))
    assert "not one of" in units_why_not(nn.LSTMCell(4, 8))

    class Custom(nn.LSTM):  # a subclass may compute otherwise
        pass

    assert "not one of" in units_why_not(Custom(4, 8))
    assert prune_units_(nn.Sequential(nn.GRU(4, 1), nn.LSTMCell(4, 8), Custom(4, 8)), 0.5) == {}


class _Projected(nn.Module):
    """An LSTM with proj_size (LSTMP, as in speech models): its output and h_n are P projected features; only c_n
    shows its units."""

    def __init__(self, layers: int, bidirectional: bool, read: str) -> None:
        super().__init__()
        self.read = read
        self.rnn = nn.LSTM(5, 8, num_layers=layers, bidirectional=bidirectional, proj_size=3, batch_first=True)
        directions = 2 if bidirectional else 1
        self.head = nn.Linear({"output": 3 * directions, "hidden": 3, "cell": 8, "none": 3}[read], 2)

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        if self.read == "none":  # the LSTM's output is the model's: its width is P, which no unit changes
            return out
        if self.read == "output":
            return self.head(out[:, -1])
        return self.head(h[-1] if self.read == "hidden" else c[-1])


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 2), bidirectional=st.booleans(),
       read=st.sampled_from(["output", "hidden", "cell", "none"]), fraction=st.sampled_from([0.25, 0.5, 0.75]),
       seed=st.integers(0, 2**16))
def test_a_projected_lstm_loses_its_pruned_units_inside_its_projection(layers, bidirectional, read, fraction, seed):
    torch.manual_seed(seed)
    model = _Projected(layers, bidirectional, read).eval()
    prune_units_(model, fraction)
    x = torch.randn(3, 6, 5)
    result = shrink(model, x)
    kept = max(8 - round(fraction * 8), 4)  # torch's LSTM needs more units than proj_size: zero ones make up 4
    assert result.model.rnn.hidden_size == kept and result.model.rnn.proj_size == 3
    assert result.model.rnn.weight_hr_l0.shape == (3, kept)
    if read == "cell":  # c_n's units are read: the head loses their columns
        assert result.model.head.in_features == kept
    torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=1e-5)
    fresh = load_shrunk_state_dict(_Projected(layers, bidirectional, read), result.model.state_dict()).eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-5)


class _ProjectedReadout(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(4, hidden, proj_size=3, batch_first=True), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("keep_multiple_of", [None, 4])
def test_a_projected_lstm_keeps_more_units_than_its_projection(keep_multiple_of):
    """At hidden_size == proj_size torch takes the LSTM for one without a projection and fails in forward (and its
    constructor refuses hidden_size <= proj_size): shrink keeps zero units to stay above it, or says why it keeps
    all."""
    torch.manual_seed(0)
    model = _ProjectedReadout(6).eval()
    prune_units_(model, 0.5)
    x = torch.randn(2, 5, 4)
    result = shrink(model, x, keep_multiple_of=keep_multiple_of)
    assert result.model.rnn.hidden_size == 4 and result.model.rnn.proj_size == 3
    torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=1e-5)
    nn.LSTM(4, 4, proj_size=3, batch_first=True).load_state_dict(result.model.rnn.state_dict())  # torch's own
    tight = _ProjectedReadout(4).eval()
    prune_units_(tight, 0.5)
    result = shrink(tight, x, keep_multiple_of=keep_multiple_of)
    assert result.model.rnn.hidden_size == 4
    assert dict(result.report.kept)["rnn"] == (
        "an LSTM needs more hidden units than its proj_size (3), which leaves none of its zero units to remove"
        if keep_multiple_of is None else "keeping a multiple of 4 units leaves none of its zero units to remove")
    with pytest.raises(ValueError, match="proj_size=3 needs more hidden units than that; 3 were to be kept"):
        keep_units_(nn.LSTM(4, 6, proj_size=3), torch.arange(3))


class _WithState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x, h0):
        return self.head(self.rnn(x, h0)[0][:, -1])


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.rnn(self.rnn(x)[0][:, :, :4])[0][:, -1])


class _Returned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


class _IntoBiaslessRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.GRU(4, 8, batch_first=True)
        self.second = nn.RNN(8, 6, batch_first=True, bias=False)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.second(torch.sigmoid(self.first(x)[0]))[0][:, -1])


@pytest.mark.parametrize(("model", "inputs", "reason"), [
    (_WithState(), (torch.randn(2, 5, 4), torch.randn(1, 2, 8)), "initial state"),
    (_Twice(), (torch.randn(2, 5, 4),), "called more than once"),
    (_Returned(), (torch.randn(2, 5, 4),), "model's output"),
    # (it said "bias-less recurrent layer(s)" for any consumer, a zero-padded conv too; now the op and the place)
    (_IntoBiaslessRNN(), (torch.randn(2, 5, 4),), "its zero hidden units reach second as a non-zero constant "
                                                 "(sigmoid makes them one), where only exact zeros can go"),
])
def test_shrink_keeps_units_where_removing_them_would_change_the_outputs_and_says_why(model, inputs, reason):
    rnn = model.first if isinstance(model, _IntoBiaslessRNN) else model.rnn
    _zero_candidate_rows_(rnn, [1, 4])
    result = shrink(model.eval(), inputs)
    kept = dict(result.report.kept)
    name = "first" if isinstance(model, _IntoBiaslessRNN) else "rnn"
    assert reason in kept[name]
    assert getattr(result.model, name).hidden_size == 8
    torch.testing.assert_close(result.model(*inputs), model(*inputs))


class _IntoPaddedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.conv = nn.Conv1d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(torch.sigmoid(self.rnn(x)[0]).transpose(1, 2))).mean(-1))


@pytest.mark.parametrize(("model", "name", "place"), [(_IntoBiaslessRNN(), "first", "second"),
                                                       (_IntoPaddedConv(), "rnn", "conv")])
def test_units_shrink_cannot_remove_are_said_not_removable_and_the_pipeline_leaves_them_unpruned(model, name, place):
    """The plan said "units" for a layer whose zero units a sigmoid makes 0.5 before a place that needs exact zeros
    (a bias-less recurrent layer, a zero-padded conv): the pipeline masked half its units, which shrink then kept
    (the outputs changed by 0.13, nothing saved)."""
    torch.manual_seed(0)
    model = copy.deepcopy(model).eval()
    x = torch.randn(3, 5, 4)
    reason = channel_plan(model, example_inputs=(x,)).units[name]
    assert reason.startswith(f"its zero hidden units reach {place} as a non-zero constant (sigmoid makes them one)")
    result = compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured",
                                                                 schedule="oneshot"), quantize=None, export=False,
                                               num_threads=1),
                      eval_fn=lambda m: float(m(x).abs().mean()), example_inputs=(x,))
    assert int(zero_units(getattr(result.stage_models["pruned"], name)).sum()) == 0  # left unpruned
    _zero_candidate_rows_(getattr(model, name), [1, 4])
    assert dict(shrink(model, (x,)).report.kept)[name] == reason  # shrink says what the plan said


@pytest.mark.parametrize("call", ["input=x", "x, None", "x, hx=None"])
def test_a_layer_called_with_its_input_by_keyword_or_no_state_loses_its_zero_units(call):
    """Any keyword, or a second argument even None, was said to be "an initial state (hx)": the units stayed."""

    class Called(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(4, 8, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            out = {"input=x": lambda: self.rnn(input=x), "x, None": lambda: self.rnn(x, None),
                   "x, hx=None": lambda: self.rnn(x, hx=None)}[call]()
            return self.head(out[1][0][-1])

    torch.manual_seed(0)
    model = Called().eval()
    prune_units_(model, 0.5)
    x = torch.randn(3, 5, 4)
    assert channel_plan(model, example_inputs=(x,)).units == {"rnn": None}
    result = shrink(model, (x,))
    assert result.model.rnn.hidden_size == 4 and not result.report.kept
    torch.testing.assert_close(result.model(x), model(x))


def test_a_linear_layer_whose_output_a_recurrent_layer_takes_by_keyword_is_planned_and_shrunk():
    """`rnn(input=fc(x))` failed channel_plan, shrink and compress with an IndexError."""

    class ByKeyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 10)
            self.rnn = nn.GRU(10, 6, batch_first=True)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.rnn(input=torch.relu(self.fc(x)))[0][:, -1])

    torch.manual_seed(0)
    model = ByKeyword().eval()
    x = torch.randn(3, 5, 4)
    plan = channel_plan(model, example_inputs=(x,))
    assert plan.reasons["fc"] is None and plan.units == {"rnn": None}
    with torch.no_grad():
        model.fc.weight[[2, 7]] = 0
    result = shrink(model, (x,))
    assert result.model.fc.out_features == result.model.rnn.input_size == 8
    torch.testing.assert_close(result.model(x), model(x))


class _ThroughBatchNorm(nn.Module):
    """GRU -> sigmoid -> BatchNorm -> bias-less LSTM: the BatchNorm's shift makes the zero units constants that no
    bias takes (the pipeline holds BatchNorms at zero for a conv's or Linear layer's channels, not for units)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.GRU(4, 8, batch_first=True)
        self.norm = nn.BatchNorm1d(8)
        self.second = nn.LSTM(8, 6, batch_first=True, bias=False)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.second(self.norm(torch.sigmoid(self.first(x)[0]).transpose(1, 2)).transpose(1, 2))[0]
                         [:, -1])


def test_units_a_batch_norm_shifts_before_a_bias_less_recurrent_layer_are_planned_as_shrink_keeps_them():
    """The plan took the BatchNorm as held at zero and said "units": the pipeline masked half of them, shrink kept
    them all."""
    torch.manual_seed(0)
    model = _ThroughBatchNorm().eval()
    x = torch.randn(3, 5, 4)
    reason = channel_plan(model, example_inputs=(x,)).units["first"]
    assert reason is not None and "a BatchNorm's shift makes them one" in reason
    result = compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured",
                                                                 schedule="oneshot"), quantize=None, export=False,
                                               num_threads=1),
                      eval_fn=lambda m: float(m(x).abs().mean()), example_inputs=(x,))
    assert int(zero_units(result.stage_models["pruned"].first).sum()) == 0  # left unpruned


def test_a_linear_layer_before_a_recurrent_layer_without_biases_is_kept_for_that_reason():
    """Its zero rows output their biases into a recurrent layer with none to fold them into: the reason said "the
    zero-padded conv(s) rnn"."""

    class IntoBiasless(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 10)
            self.rnn = nn.LSTM(10, 6, batch_first=True, bias=False)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.rnn(self.fc(x))[0][:, -1])

    model = IntoBiasless().eval()
    with torch.no_grad():
        model.fc.weight[:5] = 0
    kept = dict(shrink(model, (torch.randn(3, 5, 4),)).report.kept)
    assert kept["fc"] == ("its zero channels output non-zero constants into the recurrent layer(s) without biases "
                          "rnn, which have no bias to fold them into")  # (no BatchNorm to hold at zero here)


def test_without_example_inputs_an_indexed_output_is_kept_and_the_reason_says_to_pass_them():
    model = LSTMClassifier(hidden=16).eval()
    plan = channel_plan(model)
    assert "pass example_inputs" in plan.units["lstm"]
    assert channel_plan(model, example_inputs=torch.randn(2, 1, 8, 8)).units == {"lstm": None}
    assert "lstm" in channel_plan(model, example_inputs=torch.randn(2, 1, 8, 8)).table()


class _Stacked(nn.Module):
    """Linear -> ReLU -> LSTM -> LSTM (separate modules) -> Linear: units leave the next LSTM's inputs, and a
    Linear's zero rows (a constant ReLU(bias)) leave the first LSTM's inputs, folded into its input bias."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 12)
        self.first = nn.LSTM(12, 10, batch_first=True, bidirectional=True)
        self.second = nn.GRU(20, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.second(self.first(torch.relu(self.proj(x)))[0])[0][:, -1])


def test_recurrent_layers_read_narrowed_inputs_and_fold_the_constants_of_removed_ones():
    torch.manual_seed(0)
    model = _Stacked().eval()
    with torch.no_grad():
        model.proj.weight[[0, 3, 7]] = 0
        model.proj.bias[[0, 3, 7]] = torch.tensor([0.5, -1.0, 2.0])  # ReLU: 0.5, 0, 2 as constants
    _zero_candidate_rows_(model.first, [2, 5, 9])
    _zero_candidate_rows_(model.second, [0])
    x = torch.randn(3, 9, 5)
    result = shrink(model, x)
    shrunk = result.model
    assert (shrunk.proj.out_features, shrunk.first.input_size) == (9, 9)
    assert (shrunk.first.hidden_size, shrunk.second.input_size, shrunk.second.hidden_size) == (7, 14, 5)
    layers = {layer.name: layer for layer in result.report.layers}
    assert layers["proj"].folded == 2 and layers["proj"].consumer == "first"
    torch.testing.assert_close(shrunk(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_a_shrunk_state_dict_loads_into_the_model_built_at_its_original_widths(layers):
    torch.manual_seed(0)
    model = LSTMClassifier(hidden=16, layers=layers).eval()
    prune_units_(model, 0.5)
    x = torch.randn(4, 1, 8, 8)
    result = shrink(model, x)
    assert result.model.lstm.hidden_size == 8
    fresh = load_shrunk_state_dict(LSTMClassifier(hidden=16, layers=layers), result.model.state_dict()).eval()
    assert fresh.lstm.hidden_size == 8 and fresh.head.in_features == 8
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="shrink only removes"):
        load_shrunk_state_dict(LSTMClassifier(hidden=4, layers=layers), result.model.state_dict())


def test_keep_multiple_of_keeps_a_multiple_of_units():
    torch.manual_seed(0)
    model = LSTMClassifier(hidden=16).eval()
    _zero_candidate_rows_(model.lstm, list(range(7)))
    result = shrink(model, torch.randn(2, 1, 8, 8), keep_multiple_of=4)
    assert result.model.lstm.hidden_size == 12  # 9 live units, rounded up to a multiple of 4
    (layer,) = result.report.layers
    assert (layer.left, layer.left_reason) == (3, "3 removable one(s) stay so that a multiple of 4 units is kept")
    # every unit zero: the one kept was no multiple of 4
    _zero_candidate_rows_(model.lstm, list(range(16)))
    result = shrink(model, torch.randn(2, 1, 8, 8), keep_multiple_of=4)
    assert result.model.lstm.hidden_size == 4
    assert result.report.layers[0].left_reason == ("4 removable one(s) stay so that one unit is kept (a zero-width "
                                                   "layer breaks exporters and kernels), as a multiple of 4")
    # narrower than the multiple: nothing to remove, said as such (it kept all 3 and listed the layer as shrunk)
    narrow = LSTMClassifier(hidden=3).eval()
    _zero_candidate_rows_(narrow.lstm, list(range(3)))
    result = shrink(narrow, torch.randn(2, 1, 8, 8), keep_multiple_of=4)
    assert result.model.lstm.hidden_size == 3 and not result.report.layers
    assert dict(result.report.kept)["lstm"] == "keeping a multiple of 4 units leaves none of its zero units to remove"


def test_keep_units_keeps_the_function_of_the_kept_units_in_every_layer_and_direction():
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 6, num_layers=2, bidirectional=True)
    _zero_candidate_rows_(rnn, [1, 2])
    x = torch.randn(5, 2, 3)
    out, (h, c) = rnn(x)
    keep = torch.tensor([0, 3, 4, 5])
    keep_units_(rnn, keep)
    small_out, (small_h, small_c) = rnn(x)
    torch.testing.assert_close(small_out, out[..., torch.cat([keep, keep + 6])])
    torch.testing.assert_close(small_h, h[..., keep])
    torch.testing.assert_close(small_c, c[..., keep])


def test_keep_units_takes_zero_units_bool_mask_as_the_units_to_keep_and_refuses_what_it_cannot_keep():
    """``keep_units_(rnn, ~zero_units(rnn))`` took True/False as the indices 1 and 0: a layer of the same size built
    from two repeated units, silently; a layer still under its pruning masks was edited under them and failed at its
    next forward, in torch's words."""
    from litcompress import make_permanent_
    from litcompress.pruning.recurrent import keep_inputs_

    torch.manual_seed(0)
    rnn = nn.GRU(5, 8, num_layers=2, bidirectional=True)
    masked = copy.deepcopy(rnn)
    prune_units_(rnn, 0.5)
    prune_units_(masked, 0.5)
    make_permanent_(rnn)
    x = torch.randn(4, 2, 5)
    out, h = rnn(x)
    kept = ~zero_units(rnn)
    assert int(kept.sum()) == 4
    keep_units_(rnn, kept)
    index = kept.nonzero().flatten()
    small_out, small_h = rnn(x)
    assert rnn.hidden_size == 4
    torch.testing.assert_close(small_out, out[..., torch.cat([index, index + 8])])
    torch.testing.assert_close(small_h, h[..., index])
    with pytest.raises(ValueError, match="from pruning masks; make them permanent first"):
        keep_units_(masked, kept)
    assert masked.hidden_size == 8 and masked(x)[0].shape == out.shape  # refused before any change
    normed = torch.nn.utils.weight_norm(nn.LSTM(5, 6), "weight_hh_l0")  # torch's hook form, and a parametrization
    parametrized = torch.nn.utils.parametrizations.weight_norm(nn.GRU(5, 6), "weight_hh_l0")
    for layer in (normed, parametrized):
        with pytest.raises(ValueError, match="fold them into plain weights first .*fold_parametrizations_"):
            keep_units_(layer, torch.tensor([0, 1]))
        assert layer.hidden_size == 6 and layer(x)[0].shape == (4, 2, 6)
    with pytest.raises(ValueError, match=r"a bool mask must have one entry per hidden unit \(4\), got 8"):
        keep_units_(rnn, kept)
    for bad in (torch.tensor([0, 0]), torch.tensor([4]), torch.tensor([-1]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match=r"expected distinct hidden unit indices in \[0, 4\)"):
            keep_units_(rnn, bad)
    with pytest.raises(TypeError, match="expected integer indices or a bool mask, got torch.float32"):
        keep_units_(rnn, torch.tensor([0.0, 1.0]))
    assert rnn.hidden_size == 4 and rnn(x)[0].shape == small_out.shape
    inputs = torch.tensor([True, False, True, True, False])
    silent = x.clone()
    silent[..., ~inputs] = 0  # the dropped features carry nothing: the narrowed layer computes the same
    wide_out = rnn(silent)[0]
    keep_inputs_(rnn, inputs)
    assert rnn.input_size == 3
    torch.testing.assert_close(rnn(silent[..., inputs])[0], wide_out)


def test_structured_pruning_in_the_pipeline_prunes_lstm_units_along_its_schedule_and_shrink_removes_them():
    torch.manual_seed(0)
    model = LSTMClassifier(hidden=32).eval()
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(3)]

    masked_units = []
    fine_tune = sgd_fine_tune(batches, lr=0.05, steps=12,
                              after_step=lambda m: masked_units.append(int(zero_units(m.lstm).sum())))

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return (m(batches[0][0]).argmax(1) == batches[0][1]).float().mean().item()

    result = compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured", rounds=4,
                                                                 schedule="linear"),
                                               export=False, latency_repeats=2),
                      eval_fn=accuracy, example_inputs=batches[0][0], fine_tune=fine_tune, fine_tune_steps=12)
    # gradually along the schedule (linear to 50% at step 7 of 12, a round every 2 steps: 50% x 2/7, 4/7, 6/7, 1 of
    # the 32 units, rounded), each round on top of the last
    assert masked_units == [0, 5, 5, 9, 9, 14, 16, 16, 16, 16, 16, 16]
    pruned = result.stage_models["pruned"]
    assert int(zero_units(pruned.lstm).sum()) == 16  # half of the units, exactly
    assert result.sparsity.sparsity == pytest.approx(0.5, abs=1e-6)  # of the LSTM's weight matrices (head excluded)
    assert result.report["pruned"].description.startswith("ln_structured local to 50.0%")
    assert "4 rounds during 12 fine-tuning steps" in result.report["pruned"].description
    shrunk = result.stage_models["shrunk"]
    assert shrunk.lstm.hidden_size == 16 and shrunk.head.in_features == 16
    assert result.report["shrunk"].description.startswith("16 hidden units removed, parameters x")
    x = batches[1][0]
    torch.testing.assert_close(shrunk(x), pruned(x), rtol=0, atol=1e-5)
    assert model.lstm.hidden_size == 32 and pruned_targets(model) == []  # the caller's model is untouched


def test_removable_only_leaves_out_a_recurrent_layer_whose_units_shrink_cannot_remove():
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 8)
            self.rnn = nn.GRU(8, 8, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            out = self.rnn(self.proj(x))[0]
            return self.head(out[:, -1]), out  # the sequence is an output too

    notes = []
    from litcompress.pipeline.compress import _Pruning

    inputs = (torch.randn(2, 5, 4),)
    pruning = _Pruning.plan(Encoder(), PruneConfig(sparsity=0.5, method="ln_structured"), None, notes.append, inputs)
    assert pruning.units == []
    assert any("rnn: it produces the model's output" in note for note in notes)


class _WithSideFeatures(nn.Module):
    """The last output of a GRU concatenated after a Linear's features, then a BatchNorm1d and a head: units leave
    their place in the concatenation, the BatchNorm and the head's inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Linear(3, 4)
        self.rnn = nn.GRU(5, 8, batch_first=True)
        self.norm = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 2)

    def forward(self, x, extra):
        features = torch.cat([self.side(extra), self.rnn(x)[0][:, -1]], dim=-1)
        return self.head(torch.tanh(self.norm(features)))


def test_units_leave_their_place_in_a_concatenation_and_the_batch_norm_after_it():
    torch.manual_seed(0)
    model = _WithSideFeatures().eval()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
        model.norm.bias.uniform_(-1, 1)  # a dead unit becomes tanh(BN(0)): a non-zero constant, folded
    _zero_candidate_rows_(model.rnn, [0, 6])
    inputs = (torch.randn(4, 7, 5), torch.randn(4, 3))
    result = shrink(model, inputs)
    shrunk = result.model
    assert (shrunk.rnn.hidden_size, shrunk.norm.num_features, shrunk.head.in_features) == (6, 10, 10)
    (layer,) = [layer for layer in result.report.layers if layer.name == "rnn"]
    assert layer.folded == 2
    torch.testing.assert_close(shrunk(*inputs), model(*inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, float("inf")])
def test_unit_norms_take_every_row_of_a_unit_in_every_gate_layer_and_direction(n):
    rnn = nn.GRU(3, 4, num_layers=2, bidirectional=True)
    with torch.no_grad():
        for tensor in rnn.parameters():
            tensor.zero_()
        rnn.weight_hh_l1_reverse[2 * 4 + 1, 3] = -5.0  # unit 1: its new gate, in the last layer's backward direction
        rnn.weight_ih_l0[0 * 4 + 2, 0] = 3.0  # unit 2: its reset gate, first layer, forward
        rnn.weight_ih_l0[1 * 4 + 2, 1] = 4.0  # and its update gate
    expected = {1: [0, 5, 7, 0], 2: [0, 5, 5, 0], float("inf"): [0, 5, 4, 0]}[n]
    torch.testing.assert_close(unit_norms(rnn, n), torch.tensor(expected, dtype=torch.float32))


def test_prune_units_takes_fro_as_the_l2_norm_of_the_rows_and_refuses_other_norms_by_name():
    torch.manual_seed(0)
    model = nn.LSTM(5, 12, num_layers=2, bidirectional=True)
    by_fro, by_l2 = copy.deepcopy(model), copy.deepcopy(model)
    assert prune_units_(by_fro, 0.5, n="fro") == prune_units_(by_l2, 0.5, n=2) == {"": 6}
    for (name, mask), (_, expected) in zip(by_fro.named_buffers(), by_l2.named_buffers()):
        assert torch.equal(mask, expected), name
    for norm in ("nuc", None, True, float("nan")):  # torch's TypeError about `ord`, or NaN norms, before
        with pytest.raises(ValueError, match=r"prune_units_: n=.*: expected a number .* or 'fro'"):
            prune_units_(copy.deepcopy(model), 0.5, n=norm)


def test_with_keep_multiple_of_the_pipeline_prunes_units_so_that_a_multiple_stays_and_shrink_removes_all_of_them():
    torch.manual_seed(0)
    model = LSTMClassifier(hidden=32).eval()
    x = torch.randn(8, 1, 8, 8)
    result = compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.6, method="ln_structured"),
                                               keep_multiple_of=8, export=False, latency_repeats=2),
                      eval_fn=lambda m: float(m(x).sum() * 0 + 1), example_inputs=x)
    # round(0.6 * 32) = 19 would keep 13; 16 pruned keeps 16, a multiple of 8, and every masked unit goes
    assert int(zero_units(result.stage_models["pruned"].lstm).sum()) == 16
    assert result.stage_models["shrunk"].lstm.hidden_size == 16
    holder = nn.Sequential(nn.GRU(4, 10))
    assert prune_units_(holder, 0.5, keep_multiple_of=4) == {"0": 2}  # 8 kept, not 5


def test_a_bfloat16_recurrent_model_with_a_batch_norm_after_its_layer_is_shrunk():
    """The constants of removed units go through the BatchNorm in the model's dtype (before: float32 zeros met a
    bfloat16 BatchNorm, and shrink raised "mixed dtype")."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.norm, self.head = nn.GRU(4, 8, batch_first=True), nn.BatchNorm1d(8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(torch.sigmoid(self.norm(self.rnn(x)[0][:, -1])))

    torch.manual_seed(0)
    model = Model().eval()
    prune_units_(model, 0.5)
    model = model.to(torch.bfloat16)
    x = torch.randn(3, 5, 4, dtype=torch.bfloat16)
    result = shrink(model, x)  # checks the outputs within bfloat16's rounding
    assert (result.model.rnn.hidden_size, result.model.norm.num_features) == (4, 4)
    assert result.model.head.bias.dtype == torch.bfloat16


def test_a_recurrent_layer_inside_a_module_the_tracer_keeps_whole_keeps_its_units_and_says_where_it_is():
    from torch import fx

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(4, 8, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0][:, -1]

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.head = Encoder(), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.encoder(x))

    class KeepsEncoders(fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, Encoder) or super().is_leaf_module(module, name)

    model = Model().eval()
    _zero_candidate_rows_(model.encoder.rnn, [3])
    x = torch.randn(2, 5, 4)
    assert "it is inside encoder (Encoder)" in channel_plan(model, tracer=KeepsEncoders, example_inputs=x).units[
        "encoder.rnn"]
    result = shrink(model, x, tracer=KeepsEncoders)
    assert "it is inside encoder (Encoder)" in dict(result.report.kept)["encoder.rnn"]
    assert shrink(model, x).model.encoder.rnn.hidden_size == 7  # traced into, it loses the unit


def test_prune_units_keeps_the_zeros_another_pruner_put_in_the_same_matrices():
    """Before, a round replaced each matrix's mask with the units' own: a ModelPruning round on weight_hh_l0 before
    it was undone (its weights came back)."""
    from litcompress.pruning import prune_

    torch.manual_seed(0)
    holder = nn.Sequential(nn.LSTM(4, 8))
    prune_([(holder[0], "weight_hh_l0")], "l1_unstructured", 0.5)
    before = holder[0].weight_hh_l0_mask.clone()
    prune_units_(holder, 0.25)
    after = holder[0].weight_hh_l0_mask
    rows = after.reshape(4, 8, 8)
    dead = zero_units(holder[0])
    assert int(dead.sum()) == 2 and bool((rows[:, dead] == 0).all())
    assert torch.equal(after, before * (~dead).repeat(4).float().view(-1, 1))  # both pruners' zeros, nothing back


class _Packed(nn.Module):
    """Linear -> ReLU -> pack_padded_sequence -> recurrent layer -> (its padded output per step, or its last hidden
    state) -> Linear: a tagger or a classifier of sequences of several lengths, as text models write them."""

    def __init__(self, kind: str, layers: int, bidirectional: bool, batch_first: bool, read: str,
                 enforce_sorted: bool) -> None:
        super().__init__()
        self.kind, self.read, self.batch_first, self.enforce_sorted = kind, read, batch_first, enforce_sorted
        self.embed = nn.Linear(5, 6)
        self.rnn = KINDS[kind](6, 8, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.head = nn.Linear(16 if bidirectional and read == "output" else 8, 3)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(torch.relu(self.embed(x)), lengths, batch_first=self.batch_first,
                                      enforce_sorted=self.enforce_sorted)
        out, state = self.rnn(packed)
        if self.read == "output":
            padded, _ = pad_packed_sequence(out, batch_first=self.batch_first)
            return self.head(padded)
        return self.head((state[0] if self.kind == "LSTM" else state)[-1])


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), layers=st.integers(1, 2), bidirectional=st.booleans(),
       batch_first=st.booleans(), read=st.sampled_from(["output", "hidden"]), enforce_sorted=st.booleans(),
       dead=st.sets(st.integers(0, 7), max_size=7), dead_inputs=st.sets(st.integers(0, 5), max_size=5),
       lengths=st.lists(st.integers(1, 7), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_shrink_removes_units_and_features_of_a_packed_recurrent_layer_and_keeps_every_output(
        kind, layers, bidirectional, batch_first, read, enforce_sorted, dead, dead_inputs, lengths, seed):
    torch.manual_seed(seed)
    model = _Packed(kind, layers, bidirectional, batch_first, read, enforce_sorted).eval()
    _zero_candidate_rows_(model.rnn, sorted(dead))
    with torch.no_grad():
        model.embed.weight[sorted(dead_inputs)] = 0  # constant ReLU(bias) features: folded into the input bias
    lengths = torch.tensor(sorted(lengths, reverse=True) if enforce_sorted else lengths)
    x = torch.randn((len(lengths), 7, 5) if batch_first else (7, len(lengths), 5))
    result = shrink(model, (x, lengths))
    shrunk = result.model
    assert (shrunk.rnn.hidden_size, shrunk.rnn.input_size) == (8 - len(dead), 6 - len(dead_inputs))
    assert result.report.units_removed == len(dead) and result.report.channels_removed == len(dead_inputs)
    for size in (len(lengths), 2):  # and a batch of other lengths
        other = lengths[:size]
        inputs = (x[:size] if batch_first else x[:, :size], other)
        torch.testing.assert_close(shrunk(*inputs), model(*inputs), rtol=0, atol=1e-5)


class _PaddedWith(nn.Module):
    def __init__(self, padding_value: float) -> None:
        super().__init__()
        self.padding_value = padding_value
        self.rnn, self.head = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x, lengths):
        out, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return self.head(pad_packed_sequence(out, batch_first=True, padding_value=self.padding_value)[0])


class _PackedData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x, lengths):
        return self.head(self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))[0].data)


@pytest.mark.parametrize(("model", "reason"), [
    (_PaddedWith(-1.0), "pads its output with -1.0, not with the zeros a removed unit outputs"),
    (_PackedData(), "which shrink does not see through"),
])
def test_a_packed_output_read_in_ways_that_would_change_it_keeps_its_units_and_says_why(model, reason):
    _zero_candidate_rows_(model.rnn, [1, 4])
    inputs = (torch.randn(3, 5, 4), torch.tensor([5, 2, 4]))
    result = shrink(model.eval(), inputs)
    assert reason in dict(result.report.kept)["rnn"]
    assert result.model.rnn.hidden_size == 8
    torch.testing.assert_close(result.model(*inputs), model(*inputs))


class _PackedByModulePath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 8)

    def forward(self, x, lengths):
        return self.rnn(nn.utils.rnn.pack_padded_sequence(x, lengths))[1][-1]


def test_tracing_packed_models_leaves_fx_able_to_trace_and_the_module_path_call_gets_a_hint():
    from torch import fx

    model = _PaddedWith(0.0).eval()
    _zero_candidate_rows_(model.rnn, [3])
    inputs = (torch.randn(3, 5, 4), torch.tensor([5, 2, 4]))
    for _ in range(2):  # a GraphModule of a packed model's graph once broke every later trace in the process
        assert shrink(model, inputs).model.rnn.hidden_size == 7
    fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(ValueError, match=r"_PackedByModulePath.forward calls pack_padded_sequence by its module "
                                         r"path, which fx traces into: import it by name, `from torch.nn.utils.rnn "
                                         r"import pack_padded_sequence`"):
        channel_plan(_PackedByModulePath(), example_inputs=(torch.randn(5, 3, 4), torch.tensor([5, 2, 1])))


class _SentimentTutorial(nn.Module):
    """The forward of a well-known sentiment tutorial (packing functions imported by name): the padded output is
    unpacked and never read, the last forward and backward states are joined."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(100, 32, padding_idx=0)
        self.lstm = nn.LSTM(32, 16, 2, bidirectional=True, dropout=0.5, batch_first=True)
        self.fc = nn.Linear(32, 2)
        self.dropout = nn.Dropout(0.5)

    def forward(self, ids, length):
        embedded = self.dropout(self.embedding(ids))
        packed_embedded = pack_padded_sequence(embedded, length, batch_first=True, enforce_sorted=False)
        packed_output, (hidden, cell) = self.lstm(packed_embedded)
        output, output_length = pad_packed_sequence(packed_output)
        hidden = self.dropout(torch.cat([hidden[-1], hidden[-2]], dim=-1))
        return self.fc(hidden)


def test_an_unpacked_output_nobody_reads_does_not_keep_the_units():
    torch.manual_seed(0)
    model = _SentimentTutorial().eval()
    assert prune_units_(model, 0.5) == {"lstm": 8}
    inputs = (torch.randint(1, 100, (4, 10)), torch.tensor([10, 3, 7, 5]))
    result = shrink(model, inputs)
    assert (result.model.lstm.hidden_size, result.model.fc.in_features) == (8, 16)
    torch.testing.assert_close(result.model(*inputs), model(*inputs), rtol=0, atol=1e-5)


class _AttentionPooled(nn.Module):
    """A bidirectional LSTM's outputs pooled by attention over the time steps (scores from a Linear layer, padding
    masked), or by a masked mean: the classifier of many text tutorials."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.lstm = nn.LSTM(5, 16, batch_first=True, bidirectional=True)
        self.attn, self.fc = nn.Linear(32, 1), nn.Linear(32, 3)

    def forward(self, x, mask):
        out, _ = self.lstm(x)
        weights = torch.softmax(self.attn(out).squeeze(-1).masked_fill(mask == 0, -1e9), dim=1)
        if self.pool == "sum":
            return self.fc((weights.unsqueeze(-1) * out).sum(1))
        if self.pool == "bmm":
            return self.fc(torch.bmm(weights.unsqueeze(1), out).squeeze(1))
        keep = mask.unsqueeze(-1).float()
        return self.fc((out * keep).sum(1) / keep.sum(1))


@pytest.mark.parametrize("pool", ["sum", "bmm", "masked mean"])
def test_units_of_an_lstm_pooled_by_attention_leave_it_and_both_readers(pool):
    torch.manual_seed(0)
    model = _AttentionPooled(pool).eval()
    assert prune_units_(model, 0.5) == {"lstm": 8}
    inputs = (torch.randn(4, 9, 5), (torch.arange(9) < torch.tensor([[9], [4], [6], [2]])).long())
    result = shrink(model, inputs)
    shrunk = result.model
    assert (shrunk.lstm.hidden_size, shrunk.attn.in_features, shrunk.fc.in_features) == (8, 16, 16)
    assert result.report.units_removed == 8
    torch.testing.assert_close(shrunk(*inputs), model(*inputs), rtol=0, atol=1e-5)


class _TwoEncodersAndAnAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.LSTM(4, 16, batch_first=True)
        self.encoder2 = nn.GRU(16, 16, batch_first=True)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 2)


@pytest.mark.parametrize(("call", "error", "message"), [
    # a string was iterated by character: it excluded nothing, or matched substrings ('encoder' in 'encoder2')
    (lambda m: prune_units_(m, 0.5, exclude="encoder"), TypeError, "prune_units_(exclude='encoder'): expected module "
                                                                    "names (a tuple of str"),
    (lambda m: prune_units_(m, 0.5, names="encoder2"), TypeError, "prune_units_(names='encoder2'): expected module"),
    (lambda m: prune_heads_(m, 0.5, exclude="attn"), TypeError, "prune_heads_(exclude='attn'): expected module"),
    # an unknown name pruned nothing, or excluded nothing, without a word
    (lambda m: prune_units_(m, 0.5, names=("lstm",)), ValueError, "['lstm'] name(s) no module of the model"),
    (lambda m: prune_heads_(m, 0.5, exclude=("atn",)), ValueError, "('atn': did you mean 'attn'?)"),
    (lambda m: prune_units_(m, 0.5, names=("head",)), ValueError, "['head'] are no nn.LSTM/GRU/RNN"),
    # failed inside slicing, or were taken
    (lambda m: prune_units_(m, 0.5, keep_multiple_of=2.5), ValueError, "`keep_multiple_of`=2.5: expected an int >= 1"),
    (lambda m: prune_units_(m, 0.5, keep_multiple_of=-4), ValueError, "`keep_multiple_of`=-4: expected an int >= 1"),
    (lambda m: prune_units_(m, 1.0), ValueError, "prune_units_(fraction=1.0): expected a fraction of each recurrent"),
])
def test_structured_engine_arguments_are_refused_in_words(call, error, message):
    model = _TwoEncodersAndAnAttention()
    with pytest.raises(error, match=re.escape(message)):
        call(model)
    assert not pruned_targets(model)  # refused before any mask


def test_numpy_fractions_are_fractions():
    """np.float32(0.5) was "expected a fraction ... in [0, 1)"."""
    import numpy as np

    model = _TwoEncodersAndAnAttention()
    assert prune_units_(model, np.float32(0.5)) == {"encoder": 8, "encoder2": 8}
    assert prune_heads_(model, np.float64(0.5)) == {"attn": 2}
    assert prune_units_(model, 0.5, names=("encoder2",)) == {"encoder2": 8}  # its own name only, not 'encoder'
    fresh = _TwoEncodersAndAnAttention()  # a generator is read once (checked first, it was used up: nothing excluded)
    assert prune_units_(fresh, 0.5, exclude=(name for name in ["encoder"])) == {"encoder2": 8}



@pytest.mark.parametrize("layer", ["lstm", "attention"])
def test_a_model_that_is_itself_a_recurrent_layer_or_an_attention_is_refused_with_advice_that_fits(layer):
    """It said "Shrink the traceable sub-module that holds the layers instead", of a model that is the layer."""
    if layer == "lstm":
        model, inputs, what = nn.LSTM(4, 8), (torch.randn(3, 2, 4),), "units"
        prune_units_(model, 0.5)
    else:
        model, inputs, what = nn.MultiheadAttention(8, 2), (torch.randn(3, 2, 8),) * 3, "heads"
        prune_heads_(model, 0.5)
    with pytest.raises(ValueError, match=rf"^shrink: the model is itself an nn\.\w+, whose forward torch\.fx cannot "
                                         rf"trace .*; shrink removes a layer's {what} inside a model whose forward "
                                         r"calls it: shrink that model") as refused:
        shrink(model, inputs)
    assert "sub-module that holds" not in str(refused.value)
