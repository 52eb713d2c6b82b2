"""shrink on the ways models read recurrent layers (and features-last layers) out: a state indexed afresh for each
entry (``torch.cat((hidden[0][-2], hidden[0][-1]), dim=1)``), a time-major output pooled over dim 0, a
concatenation along the last dim spelt as its rank; the shrunk model computes what the masked one did."""

from __future__ import annotations

import re

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from litcompress import shrink
from litcompress.pruning.recurrent import prune_units_, zero_units

KINDS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}
ATOL = 1e-6


def _zero_candidate_rows_(rnn: nn.RNNBase, units: list[int]) -> None:
    """Zero the rows feeding new values into the state (LSTM g, GRU n, RNN all) of `units`: they output zero."""
    hidden, gate = rnn.hidden_size, 2 if rnn.mode in ("LSTM", "GRU") else 0
    with torch.no_grad():
        for tensor in rnn.parameters():
            for unit in units:
                tensor[gate * hidden + unit] = 0


def _assert_same_function(result, model: nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(result.model(*inputs), model(*inputs), rtol=0, atol=ATOL)


def _assert_dims_differ(reason: str) -> None:
    """A refused concatenation names another dim than the channels'."""
    found = re.search(r"along dim=(-?\d+) .*not along its channels \(dim=(-?\d+)", reason)
    assert found is not None and found[1] != found[2], reason


class StatesIndexedAfresh(nn.Module):
    """An LSTM's last states joined as tutorials write it, each entry read through its own ``hidden[i]`` (fx: one
    node per index), from h_n or c_n, or from the (output, state) pair indexed afresh too."""

    def __init__(self, layers: int, bidirectional: bool, batch_first: bool, spelling: str, activation: bool) -> None:
        super().__init__()
        self.lstm = nn.LSTM(5, 8, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.head = nn.Linear(16, 3)
        self.entries = (-2, -1) if bidirectional else (0, -1)  # last forward and backward; first and last layer
        self.spelling, self.activation = spelling, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, last = self.entries
        if self.spelling == "pair indexed afresh":
            result = self.lstm(x)
            z = torch.cat((result[1][0][first], result[1][0][last]), dim=1)
        else:
            out, hidden = self.lstm(x)
            state = 0 if self.spelling == "h_n" else 1
            z = torch.cat((hidden[state][first], hidden[state][last]), dim=1)
        return self.head(torch.sigmoid(z) if self.activation else z)


@settings(max_examples=12, deadline=None)
@given(layers=st.integers(1, 3), bidirectional=st.booleans(), batch_first=st.booleans(),
       spelling=st.sampled_from(["h_n", "c_n", "pair indexed afresh"]), activation=st.booleans(),
       dead=st.sets(st.integers(0, 7), min_size=1), seed=st.integers(0, 2**16))
def test_states_indexed_afresh_for_each_joined_entry_lose_their_zero_units(
        layers, bidirectional, batch_first, spelling, activation, dead, seed) -> None:
    torch.manual_seed(seed)
    model = StatesIndexedAfresh(layers, bidirectional, batch_first, spelling, activation).eval()
    _zero_candidate_rows_(model.lstm, sorted(dead))
    assert zero_units(model.lstm).nonzero().flatten().tolist() == sorted(dead)
    x = torch.randn((3, 6, 5) if batch_first else (6, 3, 5))
    result = shrink(model, x)
    removed = min(len(dead), 7)  # one unit always stays
    assert (result.model.lstm.hidden_size, result.model.head.in_features) == (8 - removed, 2 * (8 - removed))
    assert result.report.units_removed == removed and "lstm" not in dict(result.report.kept)
    (layer,) = [layer for layer in result.report.layers if layer.name == "lstm"]
    assert (layer.channels_before, layer.channels_after, layer.consumer) == (8, 8 - removed, "head")
    _assert_same_function(result, model, x)
    other_length = torch.randn((2, 4, 5) if batch_first else (4, 2, 5))
    _assert_same_function(result, model, other_length)


def test_the_tutorial_spelling_loses_the_units_that_prune_units_masks() -> None:
    torch.manual_seed(0)
    model = StatesIndexedAfresh(1, True, True, "h_n", False).eval()
    (masked,) = prune_units_(model, 0.5).values()
    x = torch.randn(3, 5, 5)
    result = shrink(model, x)
    assert masked == 4 and result.model.lstm.hidden_size == 4 and result.report.units_removed == 4
    _assert_same_function(result, model, x)


class TimeMajorPooling(nn.Module):
    """A time-major recurrent layer (torch's default, batch_first=False) whose output is pooled over time, dim 0."""

    def __init__(self, kind: str, layers: int, bidirectional: bool, pool: str, activation: bool) -> None:
        super().__init__()
        self.rnn = KINDS[kind](5, 8, num_layers=layers, bidirectional=bidirectional)
        self.head = nn.Linear(16 if bidirectional else 8, 3)
        self.pool, self.activation = pool, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)[0]
        out = torch.sigmoid(out) if self.activation else out
        if self.pool == "mean":
            pooled = out.mean(0)
        elif self.pool == "torch.mean":
            pooled = torch.mean(out, dim=0)
        elif self.pool == "mean keepdim":
            pooled = out.mean(dim=(0,), keepdim=True)[0]
        elif self.pool == "amax":
            pooled = out.amax(0)
        else:  # "amin, negative dim"
            pooled = torch.amin(out, -3)
        return self.head(pooled)


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), layers=st.integers(1, 2), bidirectional=st.booleans(),
       pool=st.sampled_from(["mean", "torch.mean", "mean keepdim", "amax", "amin, negative dim"]),
       activation=st.booleans(), dead=st.sets(st.integers(0, 7), min_size=1), seed=st.integers(0, 2**16))
def test_a_time_major_output_pooled_over_dim_0_loses_its_zero_units(
        kind, layers, bidirectional, pool, activation, dead, seed) -> None:
    torch.manual_seed(seed)
    model = TimeMajorPooling(kind, layers, bidirectional, pool, activation).eval()
    _zero_candidate_rows_(model.rnn, sorted(dead))
    x = torch.randn(6, 3, 5)  # (time, batch, features)
    result = shrink(model, x)
    removed = min(len(dead), 7)
    directions = 2 if bidirectional else 1
    assert (result.model.rnn.hidden_size, result.model.head.in_features) == (8 - removed, directions * (8 - removed))
    assert result.report.units_removed == removed
    _assert_same_function(result, model, x)
    _assert_same_function(result, model, torch.randn(3, 2, 5))  # other lengths and batch sizes


def test_a_time_major_output_reduced_over_its_units_keeps_them() -> None:
    class OverUnits(TimeMajorPooling):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0].mean(-1).transpose(0, 1))  # (batch, time): the units averaged

    torch.manual_seed(0)
    model = OverUnits("GRU", 1, False, "mean", False).eval()
    model.head = nn.Linear(6, 3)  # reads the 6 time steps
    _zero_candidate_rows_(model.rnn, [1, 4])
    x = torch.randn(6, 3, 5)
    result = shrink(model, x)
    assert result.model.rnn.hidden_size == 8 and "does not see through" in dict(result.report.kept)["rnn"]
    _assert_same_function(result, model, x)


class BatchMean(nn.Module):
    """A Linear layer's output averaged over its batch, dim 0, of a 2-d or 3-d input."""

    def __init__(self) -> None:
        super().__init__()
        self.ff, self.head = nn.Linear(4, 10), nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.ff(x)).mean(0))


@pytest.mark.parametrize("shape", [(7, 4), (7, 5, 4)])
def test_a_linear_output_averaged_over_the_batch_loses_its_constant_features(shape) -> None:
    torch.manual_seed(0)
    model = BatchMean().eval()
    with torch.no_grad():
        model.ff.weight[[1, 4, 6]] = 0
        model.ff.bias[1] = 0.7  # a constant ReLU(0.7): its mean over the batch is 0.7, folded into the head's bias
    x = torch.randn(shape)
    result = shrink(model, x)
    assert (result.model.ff.out_features, result.model.head.in_features) == (7, 7)
    _assert_same_function(result, model, x)


class StateAndSide(nn.Module):
    """A recurrent layer's last state joined with another layer's features along the units, ``dim=1`` of the 2-d
    state (its last dim, spelt as its rank), or along the batch (dim=0), which shrink does not follow."""

    def __init__(self, kind: str, dim: int) -> None:
        super().__init__()
        self.rnn, self.side = KINDS[kind](5, 8, batch_first=True), nn.Linear(5, 4)
        self.head = nn.Linear(12 if dim == 1 else 8, 3)
        self.kind, self.dim = kind, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, hidden = self.rnn(x)
        h_n = hidden[0] if self.kind == "LSTM" else hidden
        if self.dim == 1:
            return self.head(torch.cat((h_n[-1], self.side(x[:, 0])), dim=1))
        return self.head(torch.cat((h_n[-1], h_n[0]), dim=0))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_state_joined_with_other_features_along_its_last_dim_loses_its_zero_units(kind) -> None:
    torch.manual_seed(0)
    model = StateAndSide(kind, dim=1).eval()
    _zero_candidate_rows_(model.rnn, [0, 3, 5])
    x = torch.randn(3, 6, 5)
    result = shrink(model, x)
    assert (result.model.rnn.hidden_size, result.model.head.in_features) == (5, 9)
    assert result.report.units_removed == 3
    _assert_same_function(result, model, x)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_state_joined_along_the_batch_keeps_its_units_and_names_two_different_dims(kind) -> None:
    torch.manual_seed(0)
    model = StateAndSide(kind, dim=0).eval()
    _zero_candidate_rows_(model.rnn, [0, 3, 5])
    x = torch.randn(3, 6, 5)
    result = shrink(model, x)
    reason = dict(result.report.kept)["rnn"]
    assert result.model.rnn.hidden_size == 8 and "recurrent layer's hidden units" in reason
    _assert_dims_differ(reason)
    _assert_same_function(result, model, x)


class EmbeddingAndSide(nn.Module):
    """Token embeddings joined with other per-token features: along the dims (``dim=2``, the last of 3) or along
    the tokens (``dim=1``), which shrink does not follow."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed, self.side = nn.Embedding(10, 6), nn.Linear(4, 5 if dim == 2 else 6)
        self.head = nn.Linear(11 if dim == 2 else 6, 3)
        self.dim = dim

    def forward(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat((self.embed(ids), self.side(features)), dim=self.dim))


def test_embeddings_joined_along_their_last_dim_lose_their_zero_dims() -> None:
    torch.manual_seed(0)
    model = EmbeddingAndSide(dim=2).eval()
    with torch.no_grad():
        model.embed.weight[:, [1, 4]] = 0
    inputs = (torch.randint(0, 10, (3, 7)), torch.randn(3, 7, 4))
    result = shrink(model, inputs)
    assert (result.model.embed.embedding_dim, result.model.head.in_features) == (4, 9)
    _assert_same_function(result, model, *inputs)


def test_embeddings_joined_along_the_tokens_keep_their_dims_and_name_two_different_dims() -> None:
    torch.manual_seed(0)
    model = EmbeddingAndSide(dim=1).eval()
    with torch.no_grad():
        model.embed.weight[:, [1, 4]] = 0
    inputs = (torch.randint(0, 10, (3, 7)), torch.randn(3, 2, 4))
    result = shrink(model, inputs)
    reason = dict(result.report.kept)["embed"]
    assert result.model.embed.embedding_dim == 6 and "an embedding's dims" in reason
    _assert_dims_differ(reason)
    _assert_same_function(result, model, *inputs)
