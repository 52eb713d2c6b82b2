"""Physical removal of pruned channels: the shrunk model computes what the masked one did, with fewer parameters."""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
import warnings

import hypothesis.strategies as st
import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from hypothesis import example, given, settings
from torch import nn

from litcompress import ModelPruning, shrink
from litcompress.data import DigitsDataModule
from litcompress.pruning import is_pruned, prune_, removable_channels, shrink_
from litcompress.pruning.groups import ChannelGroup, zero_group_batch_norms_
from litcompress.pruning.shrink import ShrinkResult, channel_plan, following_batch_norms
from tests.conftest import make_trainer

ACTIVATIONS = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU,
    "leaky": lambda: nn.LeakyReLU(0.1), "identity": nn.Identity,
}


def randomise_batch_norm_(bn: nn.Module, g: torch.Generator) -> None:
    """Non-trivial statistics and affine parameters, so folding through BatchNorm is really exercised."""
    with torch.no_grad():
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.3, 3.0, generator=g)
        bn.weight.normal_(generator=g)
        bn.bias.normal_(generator=g)


def zero_rows_(module: nn.Module, rows: list[int]) -> None:
    """Zero whole output channels (what structured pruning or dead units leave), keeping the bias."""
    with torch.no_grad():
        module.weight[rows] = 0


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def shrunk_alike(model: nn.Module, x: torch.Tensor) -> ShrinkResult:
    """`shrink(model, x)`, having checked that the shrunk model computes what `model` does on `x`."""
    expected = outputs(model, x)
    result = shrink(model, x)
    torch.testing.assert_close(outputs(result.model, x), expected)
    return result


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ MLPs
@st.composite
def mlps(draw: st.DrawFn) -> tuple[nn.Sequential, list[int], list[list[int]]]:
    """A random MLP with some all-zero rows in every hidden layer; (model, hidden Linear indices, dead rows)."""
    widths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    hidden: list[int] = []
    dead: list[list[int]] = []
    fan_in = 6
    for width in widths:
        linear = nn.Linear(fan_in, width, bias=draw(st.booleans()))
        hidden.append(len(layers))
        layers.append(linear)
        rows = draw(st.lists(st.integers(0, width - 1), unique=True, max_size=width))
        zero_rows_(linear, rows)
        dead.append(sorted(rows))
        if draw(st.booleans()):
            bn = nn.BatchNorm1d(width)
            randomise_batch_norm_(bn, g)
            layers.append(bn)
        layers.append(ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]())
        if draw(st.booleans()):
            layers.append(nn.Dropout(0.3))
        fan_in = width
    layers.append(nn.Linear(fan_in, 3, bias=draw(st.booleans())))
    return nn.Sequential(*layers), hidden, dead


@settings(max_examples=120, deadline=None)
@given(mlps())
def test_shrunk_mlp_computes_the_same_function_without_its_zero_rows(case) -> None:
    model, hidden, dead = case
    x = torch.randn(16, 6)
    before, expected = state_copy(model), outputs(model, x)

    result = shrink(model, x)

    assert_same_state(model, before)  # the user's model is untouched
    torch.testing.assert_close(outputs(result.model, x), expected, rtol=1e-5, atol=1e-5)
    by_name = {layer.name: layer for layer in result.report.layers}
    for index, rows in zip(hidden, dead):
        width = model[index].out_features
        # every zero row goes, except that a layer keeps one channel when all are zero
        expected_width = max(width - len(rows), 1)
        assert result.model[index].out_features == expected_width
        if rows:
            layer = by_name[str(index)]
            assert (layer.channels_before, layer.channels_after) == (width, expected_width)
        assert not (result.model[index].weight == 0).all(dim=1).any() or expected_width == 1
    assert result.model[-1].out_features == 3  # the output layer keeps its width
    assert result.report.parameters_after == count_parameters(result.model)
    assert result.report.parameters_before == count_parameters(model)
    assert result.report.kept == ()


@settings(max_examples=40, deadline=None)
@given(mlps(), st.sampled_from([torch.bfloat16, torch.float16]))
def test_half_precision_models_shrink_within_their_own_rounding(case, dtype) -> None:
    """A model trained with precision="bf16-true" has bfloat16 weights: folding a constant channel into the next
    bias rounds anew there, which the output check used to take for a width-dependent forward (0.000977 over
    rtol=1e-4) and refuse."""
    from litcompress.pruning.shrink import ROUNDING_EPS

    model, hidden, dead = case
    model = model.to(dtype)
    x = torch.randn(16, 6, dtype=dtype, generator=torch.Generator().manual_seed(0))  # (not the suite's stream)
    expected = outputs(model, x).double()
    rtol = 1e-4
    try:
        result = shrink(model, x)  # raises if the difference is beyond the check's bound
    except ValueError as error:  # the refusal of a small output moved by rounding alone, said with its remedy (1 in
        # ~500 models: the next test), which a local run's new draws meet now and then (a bfloat16 one needed 1e-2,
        # where the remedy said was 1e-3)
        remedy = re.search(r"can move by their rounding alone: if the difference is that small, pass a larger rtol "
                           r"\(rtol=([0-9.e-]+) takes this one\)", str(error))
        assert remedy is not None, str(error)
        rtol = float(remedy.group(1))
        assert rtol <= 1e-2  # rounding, not a width-dependent forward
        result = shrink(model, x, rtol=rtol)
    difference, scale = float((outputs(result.model, x).double() - expected).abs().max()), float(expected.abs().max())
    assert difference <= max(rtol * max(scale, 1.0), ROUNDING_EPS * torch.finfo(dtype).eps * scale)
    for index, rows in zip(hidden, dead):
        assert result.model[index].out_features == max(model[index].out_features - len(rows), 1)
        assert result.model[index].weight.dtype == dtype


def test_a_small_half_precision_output_moved_by_rounding_is_refused_with_the_rtol_remedy() -> None:
    """Folding the dead rows' constants moves an output entry of 0.0096 by 0.000114 (float16 rounds by the eps of its
    sums, about 0.2): the check cannot tell that from a width-dependent change (a bound from the outputs' largest let
    50% errors of a small head through), so it refuses, and says a larger rtol takes it. Seed 177 of many drawn so
    (1 in ~500)."""
    torch.manual_seed(177)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.GELU(), nn.Linear(12, 3), nn.BatchNorm1d(3),
                          nn.SiLU(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
        model[3].weight[[0, 1, 2]] = 0
        model[6].weight[1] = 0
    model = model.eval().half()
    x = torch.randn(16, 6).half()
    with pytest.raises(ValueError, match=re.escape(
            "In float16, an output smaller than the sums it comes from can move by their rounding alone: if the "
            "difference is that small, pass a larger rtol (rtol=0.001 takes this one).")):
        shrink(model, x)
    result = shrink(model, x, rtol=1e-3)  # the remedy said
    assert result.model[6].out_features == 3 and result.model[3].out_features == 1
    difference = float((outputs(result.model, x).double() - outputs(model, x).double()).abs().max())
    assert 1e-4 < difference <= 1e-3


class WidthDependentBesideALargeHead(nn.Module):
    """One head divides by its layer's width; another, untouched by the shrink, is large."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.score = nn.Linear(4, 6), nn.Linear(6, 2), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc2(self.fc1(x)) / self.fc2.in_features, self.score(x) + 20.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_width_dependent_small_head_beside_a_large_one_is_refused_in_half_precision(dtype) -> None:
    torch.manual_seed(0)
    model = WidthDependentBesideALargeHead()
    zero_rows_(model.fc1, [0, 1])
    with torch.no_grad():
        model.fc1.bias[[0, 1]] = 0
    with pytest.raises(ValueError, match="outputs differ"):
        shrink(model.to(dtype).eval(), torch.randn(8, 4, dtype=dtype))


def test_the_output_check_still_catches_a_width_dependent_half_precision_model() -> None:
    torch.manual_seed(0)
    model = WidthDependent().to(torch.bfloat16)
    zero_rows_(model.fc1, [0, 1])
    with pytest.raises(ValueError, match="outputs differ") as refused:
        shrink(model, torch.randn(3, 4, dtype=torch.bfloat16))
    assert "rounding alone" not in str(refused.value)  # (it said "rtol=1 takes this one": a wrong model let through)


@settings(max_examples=60, deadline=None)
@given(mlps(), st.sampled_from([2, 4, 8]))
def test_shrink_can_keep_a_multiple_of_channels(case, multiple) -> None:
    model, hidden, dead = case
    x = torch.randn(16, 6)
    result = shrink(model, x, keep_multiple_of=multiple)
    torch.testing.assert_close(outputs(result.model, x), outputs(model, x), rtol=1e-5, atol=1e-5)
    for index, rows in zip(hidden, dead):
        width, exact = model[index].out_features, max(model[index].out_features - len(rows), 1)
        kept = result.model[index].out_features
        # the least rounding up of the exact count that gives a multiple (or the whole layer)
        assert kept == min(width, -(-exact // multiple) * multiple) or (exact == 1 and kept == 1 and len(rows) == width)


class GroupedBlock(nn.Module):
    """1x1 conv -> grouped 3x3 conv -> 1x1 conv (a ResNeXt block's shape)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, channels, 1)
        self.g = nn.Conv2d(channels, channels, 3, padding=1, groups=groups)
        self.c2 = nn.Conv2d(channels, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.relu(self.g(F.relu(self.c1(x)))))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 4]), st.integers(4, 12), st.data(), st.sampled_from([2, 4, 8, 16]))
def test_a_multiple_of_channels_kept_through_a_grouped_conv_is_spread_over_its_groups(groups, size, data, multiple):
    """keep_multiple_of unmarked the first removable channels, all in the first group: balancing the groups then kept
    every channel (1.000x, "not spread evenly"), where an even count per group made a multiple."""
    dead_per_group = data.draw(st.integers(1, size - 1))
    torch.manual_seed(0)
    model = GroupedBlock(groups * size, groups).eval()
    with torch.no_grad():
        for g in range(groups):  # as many dead channels in each group, at drawn places
            rows = [g * size + r for r in data.draw(st.permutations(range(size)))[:dead_per_group]]
            for layer in (model.c1, model.g):
                layer.weight[rows] = 0
                layer.bias[rows] = 0
    x = torch.randn(2, 3, 6, 6)
    result = shrink(model, x, keep_multiple_of=multiple)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
    exact = size - dead_per_group  # kept per group: the least at or above it whose total is a multiple, or all
    per_group = next((c for c in range(exact, size + 1) if groups * c % multiple == 0), size)
    assert result.model.g.out_channels == result.model.c1.out_channels == groups * per_group


# ------------------------------------------------------------------------------------------------ CNNs
class ConvNet(nn.Module):
    """conv -> [BN] -> ReLU -> [pool] -> conv (padding p) -> ReLU -> flatten (one of three spellings) -> Linear."""

    def __init__(self, batch_norm: bool, pool: bool, padding: int, flatten: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if batch_norm else nn.Identity()
        self.pool = pool
        self.conv2 = nn.Conv2d(8, 6, 3, padding=padding)
        self.flatten_style = flatten
        side = (4 if pool else 8) - 2 + 2 * padding
        self.head = nn.Linear(6 * side * side, 4)
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        if self.pool:
            x = F.max_pool2d(x, 2)
        x = self.conv2(x).relu()
        if self.flatten_style == "module":
            x = self.flatten(x)
        elif self.flatten_style == "function":
            x = torch.flatten(x, 1)
        else:
            x = x.view(x.size(0), -1)
        return self.head(x)


@settings(max_examples=60, deadline=None)
@given(
    batch_norm=st.booleans(),
    pool=st.booleans(),
    padding=st.sampled_from([0, 1]),
    flatten=st.sampled_from(["module", "function", "view"]),
    dead1=st.lists(st.integers(0, 7), unique=True, max_size=8),
    dead2=st.lists(st.integers(0, 5), unique=True, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_shrunk_convnet_computes_the_same_function(batch_norm, pool, padding, flatten, dead1, dead2, seed) -> None:
    torch.manual_seed(seed)
    model = ConvNet(batch_norm, pool, padding, flatten)
    if batch_norm:
        randomise_batch_norm_(model.bn, torch.Generator().manual_seed(seed))
    zero_rows_(model.conv1, dead1)
    zero_rows_(model.conv2, dead2)
    x = torch.randn(3, 2, 8, 8)
    expected = outputs(model, x)

    result = shrink(model, x)

    torch.testing.assert_close(outputs(result.model, x), expected, rtol=1e-5, atol=1e-5)
    shrunk = result.model
    assert shrunk.conv2.in_channels == shrunk.conv1.out_channels
    assert shrunk.head.in_features % shrunk.conv2.out_channels == 0
    # conv2 -> head: a Linear, so every zero filter of conv2 goes (one stays if all were zero)
    assert shrunk.conv2.out_channels == max(6 - len(dead2), 1)
    # conv1 -> conv2: zero filters whose constant (ReLU(BN(bias))) is non-zero can only go when conv2 does not pad
    if padding == 0 or not dead1:
        assert shrunk.conv1.out_channels == max(8 - len(dead1), 1)
    else:
        assert max(8 - len(dead1), 1) <= shrunk.conv1.out_channels <= 8
        layer = next((item for item in result.report.layers if item.name == "conv1"), None)
        left = layer.left if layer else len(dead1)
        assert shrunk.conv1.out_channels == 8 - len(dead1) + left
    if batch_norm:
        assert shrunk.bn.num_features == shrunk.conv1.out_channels
        assert shrunk.bn.running_mean.shape == (shrunk.conv1.out_channels,)


# ------------------------------------------------------------------------------------------------ graphs kept
class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.out(h + self.fc2(h))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # two batches' worth of rows: not the features
        return self.out(torch.cat([self.a(x), self.b(x)], dim=0))


class SharedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.shared(torch.relu(self.shared(self.inp(x)))))


class WithLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm, self.out = nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.fc(x)))


@pytest.mark.parametrize(
    ("model_class", "zeroed", "reason"),
    [
        # one of the two writers of a sum: its group's channels are not zero there (the reason once only named the add)
        (Residual, "fc1", "leave with its group (fc1, fc2, joined by residual additions) only where the group's "
                          "channel space is exactly zero"),
        (Residual, "fc2", "leave with its group (fc1, fc2, joined by residual additions)"),
        (Concat, "a", "along dim=0 in call_function cat, not along its channels (dim=-1 for a Linear's features)"),
        (SharedLayer, "shared", "called more than once"),
        (SharedLayer, "inp", "called more than once"),
        (WithLayerNorm, "fc", "LayerNorm"),
        (WithLayerNorm, "out", "produces the model's output"),
    ],
)
def test_channels_stay_where_removing_them_would_change_the_function(model_class, zeroed, reason) -> None:
    torch.manual_seed(0)
    model = model_class()
    zero_rows_(getattr(model, zeroed), [0, 1])
    x = torch.randn(7, 4 if model_class is not Residual else 5)
    result = shrunk_alike(model, x)
    assert result.report.layers == ()
    assert result.report.parameters_after == result.report.parameters_before
    (name, why), = result.report.kept
    assert name == zeroed and reason in why
    assert name in result.report.table() and why in result.report.table()


class TwoReaders(nn.Module):
    """`a`'s output is read by `c` after an in-place op overwrote it (c sees the overwritten values). (``h += 1``
    fx records as a new tensor ``h + 1``: an alias of the old ``h`` read afterwards is not in its graph, and only
    example inputs, whose outputs shrink compares, catch that.)"""

    def __init__(self, overwrite: str) -> None:
        super().__init__()
        self.overwrite = overwrite
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 2), nn.Linear(6, 2)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x)
        if self.overwrite == "module":
            y = self.act(h)
        elif self.overwrite == "functional":
            y = F.relu(h, inplace=True)
        elif self.overwrite == "method":
            y = h.sigmoid_()
        else:
            y = torch.relu_(h)
        return self.b(y), self.c(h)


@pytest.mark.parametrize("overwrite", ["module", "functional", "method", "torch_function"])
def test_a_channel_stays_where_an_in_place_op_overwrites_what_another_branch_reads(overwrite) -> None:
    """Without example inputs (no check of the outputs), shrink folding a's constants into c as a's own would
    change c's output: c reads them after the in-place op. The layer keeps its channels, and the report says why."""
    torch.manual_seed(0)
    model = TwoReaders(overwrite).eval()
    with torch.no_grad():
        model.a.bias.fill_(-0.5)  # relu(-0.5) = 0, sigmoid(-0.5) = 0.38: both differ from -0.5
    zero_rows_(model.a, [0, 1, 2])
    x = torch.randn(5, 4)
    expected = outputs(model, x)
    result = shrink(model)
    torch.testing.assert_close(outputs(result.model, x), expected)
    (name, why), = result.report.kept
    assert name == "a" and "overwrites its output in place, which another branch reads afterwards" in why
    assert result.report.parameters_after == result.report.parameters_before


def test_an_in_place_activation_with_one_reader_still_lets_channels_go() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)).eval()
    zero_rows_(model[0], [0, 1, 2])
    result = shrunk_alike(model, torch.randn(5, 4))
    assert [layer.removed for layer in result.report.layers] == [3]


class DropoutAfter(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b, self.drop = nn.Linear(4, 6), nn.Linear(6, 2), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.kind == "always":  # Monte Carlo dropout, written in the forward
            h = F.dropout(h, 0.5, training=True)
        elif self.kind == "default":  # F.dropout's default is training=True
            h = F.dropout(h, 0.5)
        elif self.kind == "as_the_model":
            h = F.dropout(h, 0.5, training=self.training)
        else:
            h = self.drop(h)
        return self.b(h)


@pytest.mark.parametrize(("kind", "module_training", "kept"), [
    ("always", False, True), ("default", False, True), ("module", True, True),
    ("as_the_model", False, False), ("module", False, False),
])
def test_a_dropout_that_stays_random_in_eval_mode_ends_the_chain(kind, module_training, kept) -> None:
    """A constant channel stays constant through dropout in eval mode only: Monte Carlo dropout (training=True in
    the forward, or a dropout module left training) would give a folded constant no noise, and change the spread of
    the outputs."""
    torch.manual_seed(0)
    model = DropoutAfter(kind).eval()
    model.drop.train(module_training)
    zero_rows_(model.a, [0, 1])
    result = shrink(model)
    if kept:
        (name, why), = result.report.kept
        assert name == "a" and "drops entries even when the model is evaluated" in why
    else:
        assert [layer.removed for layer in result.report.layers] == [2]


def test_the_reason_names_a_product_that_keeps_only_a_zero_constant() -> None:
    """A learnable scalar times the layer's output: zero stays zero, another constant does not stay constant."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
            self.t = nn.Parameter(torch.tensor(2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.sigmoid(self.a(x) * self.t))

    model = Scaled().eval()
    zero_rows_(model.a, [0, 1])
    (name, why), = shrink(model, torch.randn(3, 8)).report.kept
    assert name == "a" and why.startswith("its zero channels output non-zero constants into the product(s) or sum(s)")


@pytest.mark.parametrize(("a", "b", "expected"), [
    ([1.0, float("nan")], [1.0, 2.0], math.inf),  # NaN in one only: max() would have dropped it
    ([1.0, 2.0], [1.0, float("nan")], math.inf),
    ([1.0, float("nan")], [1.5, float("nan")], 0.5),  # NaN in both places: no difference there
    ([float("inf"), 1.0], [float("inf"), 1.0], 0.0),  # inf - inf is NaN, yet equal
    ([float("inf")], [float("-inf")], math.inf),
])
def test_output_differences_count_nan_and_infinities(a, b, expected) -> None:
    from litcompress.pruning.shrink import max_output_difference

    assert max_output_difference(torch.tensor(a), torch.tensor(b)) == expected


def test_only_layers_with_zero_channels_are_reported() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    result = shrink(model)
    assert result.report.layers == () and result.report.kept == ()
    assert result.report.parameter_ratio == 1.0


# ------------------------------------------------------------------------------------------------ pruned models
def test_models_pruned_by_torch_or_litcompress_are_shrunk_and_stay_pruned() -> None:
    torch.manual_seed(0)
    by_torch = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    by_litcompress = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    for layer in (0, 2):
        torch_prune.ln_structured(by_torch[layer], "weight", amount=0.5, n=1, dim=0)
        prune_([(by_litcompress[layer], "weight")], "ln_structured", 8, scope="local", n=2, dim=0)
    x = torch.randn(5, 10)
    for model, channels in ((by_torch, 10), (by_litcompress, 12)):
        model(torch.randn(2, 10))  # a forward in grad mode leaves non-leaf cached weights (deepcopy refuses them)
        expected = outputs(model, x)
        result = shrink(model, x)
        torch.testing.assert_close(outputs(result.model, x), expected)
        assert [m.out_features for m in result.model if isinstance(m, nn.Linear)] == [channels, channels, 3]
        assert all(not is_pruned(m, "weight") for m in result.model if isinstance(m, nn.Linear))
        assert is_pruned(model[0], "weight") and is_pruned(model[2], "weight")  # the user's model keeps its masks


def test_unstructured_pruning_leaves_dead_units_that_shrink_removes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
    prune_([(model[0], "weight")], "l1_unstructured", 0.99)
    dead = int((model[0].weight == 0).all(dim=1).sum())
    assert dead > 0
    result = shrink(model)
    assert result.model[0].out_features == 100 - dead
    assert result.report.channels_removed == dead


def test_shrink_in_place_edits_the_modules_and_keeps_the_class_and_hooks() -> None:
    torch.manual_seed(0)
    model = ConvNet(batch_norm=True, pool=True, padding=0, flatten="view")
    calls: list[int] = []
    model.head.register_forward_hook(lambda module, args, out: calls.append(out.shape[1]))
    zero_rows_(model.conv2, [0, 3])
    head = model.head
    report = shrink_(model, torch.randn(2, 2, 8, 8))
    assert model.head is head and head.in_features == 4 * 2 * 2  # 4 filters left, 2x2 positions each
    assert isinstance(model, ConvNet) and report.channels_removed == 2
    model(torch.randn(1, 2, 8, 8))
    assert calls[-1] == 4


def test_shrunk_model_survives_pickling(tmp_path) -> None:
    torch.manual_seed(0)
    model = ConvNet(batch_norm=True, pool=False, padding=1, flatten="function")
    zero_rows_(model.conv2, [1, 2, 5])
    result = shrink(model)
    path = tmp_path / "shrunk.pt"
    torch.save(result.model, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(outputs(loaded, x), outputs(model, x))
    assert loaded.conv2.out_channels == 3
    assert pickle.loads(pickle.dumps(result.report)) == result.report


# ------------------------------------------------------------------------------------------------ errors
class WidthDependent(nn.Module):
    """A forward that reads a layer's width where the graph cannot show it (a module attribute: a constant to fx):
    shrinking changes what it computes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h) / self.fc2.in_features


class FeatureCountRead(nn.Module):
    """A forward that scales by a Linear layer's feature count, read from its output's shape (as attention scales
    by ``q.shape[-1] ** -0.5``), after an element-wise op."""

    def __init__(self, read) -> None:
        super().__init__()
        self.fc1, self.fc2, self.read = nn.Linear(4, 6), nn.Linear(6, 2), read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h) * self.read(h) ** -0.5


@pytest.mark.parametrize("read, needs_rank", [
    (lambda h: h.shape[-1], False), (lambda h: h.size(-1), False), (lambda h: h.size()[-1], False),
    (lambda h: h.shape[1:].numel(), False), (lambda h: h.size(1), True), (lambda h: h.shape[1], True)])
def test_a_read_of_a_linear_layers_feature_count_keeps_its_width(read, needs_rank) -> None:
    torch.manual_seed(0)
    model = FeatureCountRead(read).eval()
    zero_rows_(model.fc1, [0, 1])
    x = torch.randn(3, 4)
    for example_inputs in ((None, x) if not needs_rank else (x,)):
        result = shrink(model, example_inputs)
        assert result.model.fc1.out_features == 6
        assert dict(result.report.kept)["fc1"].startswith("its feature count is read")
        torch.testing.assert_close(result.model(x), model(x))
    # the batch size and, on a 3-d output, the tokens are not the features: those reads leave the layer free
    batch_read = FeatureCountRead(lambda h: h.size(0)).eval()
    zero_rows_(batch_read.fc1, [0, 1])
    assert shrink(batch_read, x).model.fc1.out_features == 4
    tokens_read = FeatureCountRead(lambda h: h.shape[1]).eval()
    zero_rows_(tokens_read.fc1, [0, 1])
    tokens = torch.randn(2, 5, 4)
    result = shrink(tokens_read, tokens)
    assert result.model.fc1.out_features == 4
    torch.testing.assert_close(result.model(tokens), tokens_read(tokens))


def test_outputs_that_change_are_caught_when_example_inputs_are_given() -> None:
    torch.manual_seed(0)
    model = WidthDependent()
    zero_rows_(model.fc1, [0, 1])
    before = state_copy(model)
    with pytest.raises(ValueError, match="outputs differ"):
        shrink(model, torch.randn(3, 4))
    assert_same_state(model, before)


class WidthFromAnAttribute(nn.Module):
    """A forward that builds a tensor of a layer's width read from the module (a constant to fx): once shrunk it
    fails, with torch's error."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = torch.ones(self.fc1.out_features).view(2, 3)
        return self.fc2(torch.relu(self.fc1(x))) * table.sum()


def test_a_shrunk_model_that_fails_on_the_example_inputs_is_said_and_the_model_kept() -> None:
    torch.manual_seed(0)
    model = WidthFromAnAttribute()
    zero_rows_(model.fc1, [0, 1])
    before = state_copy(model)
    with pytest.raises(ValueError, match=r"the shrunk model fails on the example inputs \(RuntimeError: shape .*\): "
                                         r"its forward "
                                         r"depends on a layer's width in a way the traced graph does not show. "
                                         r"Shrunk: \['fc1'\]"):
        shrink(model, torch.randn(3, 4))
    assert_same_state(model, before)


class UnbatchedConv(nn.Module):
    """A conv called on one (C, H, W) image: dim 1 is its height, not its channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def test_an_unbatched_conv_output_keeps_its_channels_given_example_inputs() -> None:
    torch.manual_seed(0)
    model = UnbatchedConv().eval()
    with torch.no_grad():
        model.conv.weight[:2] = 0
        model.conv.bias[:2] = 0
    x = torch.randn(3, 4, 4)
    result = shrink(model, x)
    assert result.model.conv.out_channels == 4
    assert dict(result.report.kept)["conv"] == ("its output on the example inputs is 3-d, unbatched, where shrink "
                                                "takes dim 1 for the channels")
    torch.testing.assert_close(result.model(x), model(x))
    batched = torch.randn(2, 3, 4, 4)  # the same layers on a batch: the flatten mixes channels and positions
    assert shrink(nn.Sequential(model.conv, nn.ReLU(), nn.Conv2d(4, 2, 1)), batched).model[0].out_channels == 2


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.fc(x)
        return x


def test_untraceable_models_and_bad_arguments_get_clear_errors() -> None:
    with pytest.raises(ValueError, match="torch.fx can trace.*Untraceable"):
        shrink(Untraceable())
    for call in (shrink, shrink_):  # shrink failed in its copy with an AttributeError
        with pytest.raises(TypeError, match="shrink expects an nn.Module, got str"):
            call("not a model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rtol"):
        shrink(nn.Linear(2, 2), rtol=-1.0)


# ------------------------------------------------------------------------------------------------ Lightning
class DigitsMLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_structured_pruning_under_a_trainer_then_shrink_keeps_every_prediction(tmp_path) -> None:
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    model = DigitsMLP()
    pruning = ModelPruning("ln_structured", amount=0.25, pruning_dim=0, pruning_norm=1,
                           parameters_to_prune=[(model.fc1, "weight"), (model.fc2, "weight")],
                           use_global_unstructured=False, verbose=0)
    trainer = make_trainer(tmp_path, max_epochs=2, limit_train_batches=None, callbacks=[pruning])
    trainer.fit(model, datamodule=data)
    x, _ = next(iter(data.test_dataloader()))

    result = shrink(model, x)

    # two rounds of 25% of what remains: 64 -> 48 -> 36 rows, 32 -> 24 -> 18
    assert (result.model.fc1.out_features, result.model.fc2.out_features) == (36, 18)
    assert result.model.fc2.in_features == 36 and result.model.fc3.in_features == 18
    torch.testing.assert_close(outputs(result.model, x), outputs(model, x), rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs(result.model, x).argmax(1), outputs(model, x).argmax(1))
    assert result.report.parameter_ratio < 0.6
    assert isinstance(result.model, DigitsMLP)


class ConvVariants(nn.Module):
    """Less common chains: BatchNorm after the activation, dropout and an activation after the flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(F.leaky_relu(self.conv(x), 0.2))
        x = F.dropout(torch.flatten(x, 1), 0.5, training=self.training)
        return self.head(torch.tanh(x))


class PoolsFeatures(nn.Module):
    """MaxPool1d over a Linear's output pools across features: not per channel, so nothing may be removed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.pool, self.out = nn.Linear(4, 8), nn.MaxPool1d(2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.pool(self.fc(x)))


def test_batch_norm_after_the_activation_and_ops_after_the_flatten_are_seen_through() -> None:
    torch.manual_seed(0)
    model = ConvVariants()
    randomise_batch_norm_(model.bn, torch.Generator().manual_seed(1))
    zero_rows_(model.conv, [1, 4])
    x = torch.randn(3, 2, 6, 6)
    result = shrink(model, x)
    torch.testing.assert_close(outputs(result.model, x), outputs(model, x))
    assert (result.model.conv.out_channels, result.model.bn.num_features, result.model.head.in_features) == (4, 4, 64)
    assert result.report.layers[0].folded == 2


def test_pooling_across_a_linear_layers_features_stops_the_chain() -> None:
    torch.manual_seed(0)
    model = PoolsFeatures()
    zero_rows_(model.fc, [0, 5])
    x = torch.randn(3, 4)
    result = shrink(model, x)
    torch.testing.assert_close(outputs(result.model, x), outputs(model, x))
    assert result.report.layers == () and result.report.kept[0][0] == "fc"


class TupleOutput(nn.Module):
    """Outputs a dict holding a tuple: the before/after check compares every tensor in it."""

    def __init__(self, width_dependent: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)
        self.width_dependent = width_dependent

    def forward(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        h = self.fc1(x)
        logits = self.fc2(torch.relu(h))
        scale = self.fc2.in_features if self.width_dependent else 1  # a constant to fx: only the check sees it
        return {"out": (logits, logits.sum(1) / scale)}


@dataclasses.dataclass
class LogitsAndScore:
    logits: torch.Tensor
    score: torch.Tensor


class DataclassOutput(TupleOutput):
    """The same tensors in a dataclass (whose == compares tensors, which fails on more than one value)."""

    def forward(self, x: torch.Tensor) -> LogitsAndScore:
        return LogitsAndScore(*super().forward(x)["out"])


@pytest.mark.parametrize("width_dependent", [False, True])
@pytest.mark.parametrize("model_class", [TupleOutput, DataclassOutput])
def test_nested_outputs_are_compared_leaf_by_leaf(width_dependent: bool, model_class: type) -> None:
    torch.manual_seed(0)
    model = model_class(width_dependent)
    zero_rows_(model.fc1, [2, 3])
    x = torch.randn(5, 4)
    if width_dependent:  # only the second tensor of the tuple changes
        with pytest.raises(ValueError, match="outputs differ"):
            shrink(model, x)
    else:
        assert shrink(model, x).model.fc1.out_features == 4


# ------------------------------------------------------------------------------------------------ depthwise convs
class InvertedBottleneck(nn.Module):
    """A MobileNetV2 block: expand (1x1) -> BN -> act -> depthwise 3x3 -> BN -> act -> [squeeze-and-excitation, as
    in MobileNetV3, its pooling spelt `se`] -> project, [+ x]."""

    def __init__(self, activation: str, expand_bias: bool, dw_padding: int, dw_stride: int, dw_bias: bool,
                 project_padding: int, residual: bool, se: str | None = None) -> None:
        super().__init__()
        self.se = se
        self.squeeze, self.excite, self.pool = nn.Conv2d(12, 3, 1), nn.Conv2d(3, 12, 1), nn.AdaptiveAvgPool2d(1)
        self.expand = nn.Conv2d(4, 12, 1, bias=expand_bias)
        self.bn1, self.act1 = nn.BatchNorm2d(12), ACTIVATIONS[activation]()
        self.dw = nn.Conv2d(12, 12, 3, stride=dw_stride, padding=dw_padding, groups=12, bias=dw_bias)
        self.bn2, self.act2 = nn.BatchNorm2d(12), ACTIVATIONS[activation]()
        self.project = nn.Conv2d(12, 4, 1 + 2 * project_padding, padding=project_padding)
        self.residual = residual and dw_stride == 1 and dw_padding == 1

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """What the gate multiplies (what `project` reads without one)."""
        return self.act2(self.bn2(self.dw(self.act1(self.bn1(self.expand(x))))))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """What `project` reads."""
        h = self.gated(x)
        if self.se is None:
            return h
        if self.se == "module":
            pooled = self.pool(h)
        elif self.se == "function":
            pooled = F.adaptive_avg_pool2d(h, 1)
        else:
            pooled = h.mean((2, 3), keepdim=True)
        return h * torch.sigmoid(self.excite(F.relu(self.squeeze(pooled))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.hidden(x))
        return x + y if self.residual else y


@settings(max_examples=120, deadline=None)
@given(
    activation=st.sampled_from(["silu", "gelu", "tanh", "identity"]),  # no flat region (ReLU's would make live
    expand_bias=st.booleans(), dw_bias=st.booleans(),                   # channels look constant to the oracle)
    dw_padding=st.sampled_from([0, 1]), dw_stride=st.sampled_from([1, 2]), project_padding=st.sampled_from([0, 1]),
    residual=st.booleans(), zero_batch_norm=st.booleans(), se=st.sampled_from([None, "module", "function", "mean"]),
    dead_expand=st.lists(st.integers(0, 11), unique=True, max_size=12),
    dead_dw=st.lists(st.integers(0, 11), unique=True, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_depthwise_convs_lose_the_channels_of_the_layer_before_them(
        activation, expand_bias, dw_bias, dw_padding, dw_stride, project_padding, residual, zero_batch_norm, se,
        dead_expand, dead_dw, seed) -> None:
    torch.manual_seed(seed)
    model = InvertedBottleneck(activation, expand_bias, dw_padding, dw_stride, dw_bias, project_padding, residual, se)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as after training, moderate: no activation saturates to an exact constant (below)
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1, generator=generator)
            bn.running_var.uniform_(0.5, 2, generator=generator)
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.uniform_(-0.5, 0.5, generator=generator)
    zero_rows_(model.expand, dead_expand)
    zero_rows_(model.dw, dead_dw)
    if zero_batch_norm:  # what the pipeline's zero_batch_norm does to pruned channels
        with torch.no_grad():
            for bn in (model.bn1, model.bn2):
                bn.weight[dead_expand] = 0
                bn.bias[dead_expand] = 0
    x = torch.randn(3, 4, 8, 8)
    expected = outputs(model, x)
    # Oracle, from the masked model's activations alone: a channel can go when `project` reads it as a constant
    # (and as zero if `project` pads with zeros). Through a gate only a zero is: a constant times the gate varies.
    # Only a zeroed channel can be constant for every input; on these inputs a live one could look constant if an
    # activation saturated (GELU and SiLU round far negative inputs to exactly 0).
    with torch.no_grad():  # `outputs` left the model in eval mode
        hidden = (model.gated(x) if se else model.hidden(x)).transpose(0, 1).reshape(12, -1)
    # (to a few ulps: BatchNorm's vectorised CPU kernel can round the tail of a row of equal inputs differently)
    constant = ((hidden - hidden[:, :1]).abs() <= 1e-6 * (1 + hidden[:, :1].abs())).all(1)
    if project_padding or se:
        constant &= hidden[:, 0] == 0
    constant &= torch.tensor([j in dead_expand or j in dead_dw for j in range(12)])
    expected_width = max(12 - int(constant.sum()), 1)

    result = shrink(model, x)

    torch.testing.assert_close(outputs(result.model, x), expected, rtol=1e-5, atol=1e-5)
    shrunk = result.model
    assert shrunk.expand.out_channels == expected_width
    assert (shrunk.bn1.num_features, shrunk.dw.in_channels, shrunk.dw.out_channels, shrunk.dw.groups,
            shrunk.bn2.num_features, shrunk.project.in_channels) == (expected_width,) * 6
    assert tuple(shrunk.dw.weight.shape) == (expected_width, 1, 3, 3)
    assert (shrunk.squeeze.in_channels, shrunk.excite.out_channels) == ((expected_width,) * 2 if se else (12, 12))
    removed = constant.clone()
    if bool(removed.all()):
        removed[0] = False  # one channel stays
    zero_rows = torch.tensor([j in dead_expand for j in range(12)])
    if expected_width < 12:
        (layer,) = result.report.layers
        through = ("dw", "squeeze", "excite") if se else ("dw",)
        assert (layer.name, layer.consumer, layer.through) == ("expand", "project", through)
        assert f"via {', '.join(through)}" in result.report.table()
        assert layer.left == int((zero_rows & ~removed).sum())  # zero filters that had to stay
    elif dead_expand:  # zero filters, none of which could go: said, with the reason
        assert dict(result.report.kept)["expand"].startswith("its zero channels output non-zero constants into ")


class SigmoidDepthwiseGate(nn.Module):
    """conv -> sigmoid -> depthwise -> a gate: a channel group (conv and the gate's excite) that only a zero
    depthwise filter makes zero."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(8, 4, 3, padding=1)
        self.dw = nn.Conv1d(4, 4, 3, padding=1, groups=4, bias=False)
        self.squeeze, self.excite = nn.Conv1d(4, 2, 1), nn.Conv1d(2, 4, 1)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(torch.sigmoid(self.conv(torch.relu(self.stem(x)))))
        h = h * torch.sigmoid(self.excite(torch.relu(self.squeeze(h.mean(2, keepdim=True)))))
        return self.head(h.mean(2))


def test_zero_depthwise_filters_of_a_users_masks_empty_a_group_that_structured_pruning_cannot() -> None:
    """Shrink removes the channels a user's zero depthwise filters empty (conv's and excite's); the plan does not
    call the group removable, as structured pruning never prunes a depthwise conv (it pruned conv and excite,
    and shrink removed nothing)."""
    torch.manual_seed(0)
    model, x = SigmoidDepthwiseGate().eval(), torch.randn(4, 3, 12)
    reasons = removable_channels(model, example_inputs=x)
    assert reasons["conv"] is not None and reasons["excite"] is not None
    assert "only where its filter is: structured pruning leaves depthwise convs dense" in \
        channel_plan(model, example_inputs=x).table()
    torch_prune.custom_from_mask(model.dw, "weight", (torch.arange(4) >= 2).float().view(4, 1, 1).expand(4, 1, 3))
    result = shrunk_alike(model, x)
    assert (result.model.conv.out_channels, result.model.excite.out_channels, result.model.dw.out_channels) == (2, 2, 2)


class GateThenDepthwise(nn.Module):
    """A squeeze-and-excitation gate *before* a depthwise conv: the gate's squeeze reads every channel the conv
    before it writes, whatever the depthwise filters after it do."""

    def __init__(self, dw_padding: int, dw_bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.squeeze, self.excite = nn.Conv2d(6, 3, 1), nn.Conv2d(3, 6, 1)
        self.dw = nn.Conv2d(6, 6, 3, padding=dw_padding, groups=6, bias=dw_bias)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        h = h * torch.sigmoid(self.excite(F.relu(self.squeeze(h.mean((2, 3), keepdim=True)))))
        return self.fc(self.dw(h).mean((2, 3)))


@settings(max_examples=60, deadline=None)
@given(dw_padding=st.sampled_from([0, 1]), dw_bias=st.booleans(),
       dead_conv=st.lists(st.integers(0, 5), unique=True, max_size=6),
       dead_dw=st.lists(st.integers(0, 5), unique=True, max_size=6),
       bias_signs=st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=6, max_size=6), seed=st.integers(0, 2**16))
def test_a_zero_depthwise_filter_after_a_gate_removes_only_channels_the_gate_reads_as_zeros(
        dw_padding, dw_bias, dead_conv, dead_dw, bias_signs, seed) -> None:
    """A zero depthwise filter makes its channel a constant from there on, but the gate before it read the channel's
    value: shrink removed the channel, and the squeeze's input column with it, changing every gate (0.08 on outputs of
    0.4), silently without example inputs."""
    torch.manual_seed(seed)
    model = GateThenDepthwise(dw_padding, dw_bias).eval()
    with torch.no_grad():
        model.conv.bias.copy_(torch.tensor(bias_signs) * 0.5)
        model.squeeze.weight.mul_(5)  # gates that really depend on every channel
    zero_rows_(model.conv, dead_conv)
    zero_rows_(model.dw, dead_dw)
    x = torch.randn(2, 3, 8, 8)
    expected = outputs(model, x)

    result = shrink(model)  # no example inputs: nothing checks the outputs but this test

    torch.testing.assert_close(outputs(result.model, x), expected, rtol=1e-5, atol=1e-5)
    # only a channel that reaches the gate as exact zeros can go: a zero filter of a bias that ReLU zeroes
    zero_at_gate = [j for j in dead_conv if bias_signs[j] <= 0]
    width = max(6 - len(zero_at_gate), 1)
    assert (result.model.conv.out_channels, result.model.squeeze.in_channels, result.model.excite.out_channels,
            result.model.dw.out_channels, result.model.fc.in_features) == (width,) * 5


def test_a_gate_the_chains_do_not_recognise_narrows_as_a_gated_group() -> None:
    torch.manual_seed(0)
    model = InvertedBottleneck("silu", False, 1, 1, False, 0, False, se="module")
    model.squeeze = nn.Conv2d(12, 3, 3, padding=1)  # not a 1x1 conv: no squeeze-and-excitation the chains know
    zero_rows_(model.expand, [0, 1])
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight[:2] = bn.bias[:2] = 0
    x = torch.randn(2, 4, 6, 6)
    result = shrink(model, x)
    torch.testing.assert_close(outputs(result.model, x), outputs(model, x))
    # the product's channel is zero where the expanded one is, whatever sigmoid(excite) is: expand, its BatchNorms
    # and depthwise conv, the gate's excite rows and the squeeze's and project's inputs lose channels 0 and 1
    assert {(layer.name, layer.consumer) for layer in result.report.layers} == {
        ("expand", "gated group, 2 readers"), ("excite", "gated group, 2 readers")}
    shrunk = result.model
    assert (shrunk.expand.out_channels, shrunk.bn1.num_features, shrunk.dw.groups, shrunk.bn2.num_features,
            shrunk.squeeze.in_channels, shrunk.excite.out_channels, shrunk.project.in_channels) == (10,) * 7


# ------------------------------------------------------------------------------------------------ branches
class Fork(nn.Module):
    """A stem whose output branches (Inception-style heads, multi-task models): into a conv directly, through a
    BatchNorm, sigmoid and depthwise conv into another, and pooled and flattened into a Linear."""

    def __init__(self, activation: str, pad_a: int, dw_padding: int, linear_branch: bool) -> None:
        super().__init__()
        self.linear_branch = linear_branch
        self.stem, self.bn, self.act = nn.Conv2d(3, 10, 3, padding=1), nn.BatchNorm2d(10), ACTIVATIONS[activation]()
        self.conv_a = nn.Conv2d(10, 4, 1 + 2 * pad_a, padding=pad_a)
        self.bn_b = nn.BatchNorm2d(10)
        self.dw = nn.Conv2d(10, 10, 3, padding=dw_padding, groups=10)
        self.conv_b = nn.Conv2d(10, 3, 1)
        self.fc_c = nn.Linear(40, 5)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.stem(x)))

    def into_b(self, h: torch.Tensor) -> torch.Tensor:
        return self.dw(torch.sigmoid(self.bn_b(h)))

    def into_c(self, h: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(h, 2), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.trunk(x)
        heads = (self.conv_a(h), self.conv_b(self.into_b(h)))
        return (*heads, self.fc_c(self.into_c(h))) if self.linear_branch else heads


@settings(max_examples=80, deadline=None)
@given(
    activation=st.sampled_from(["silu", "tanh", "identity"]),  # no flat region: live channels never look constant
    pad_a=st.sampled_from([0, 1]), dw_padding=st.sampled_from([0, 1]), linear_branch=st.booleans(),
    zero_batch_norm=st.booleans(),
    dead_stem=st.lists(st.integers(0, 9), unique=True, max_size=10),
    dead_dw=st.lists(st.integers(0, 9), unique=True, max_size=10),
    seed=st.integers(0, 2**16),
)
def test_a_channel_leaves_a_branching_output_when_every_branch_reads_it_as_a_constant(
        activation, pad_a, dw_padding, linear_branch, zero_batch_norm, dead_stem, dead_dw, seed) -> None:
    torch.manual_seed(seed)
    model = Fork(activation, pad_a, dw_padding, linear_branch)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # moderate statistics, as after training: no activation saturates to an exact constant
        for bn in (model.bn, model.bn_b):
            bn.running_mean.uniform_(-1, 1, generator=generator)
            bn.running_var.uniform_(0.5, 2, generator=generator)
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.uniform_(-0.5, 0.5, generator=generator)
        if zero_batch_norm:
            model.bn.weight[dead_stem] = model.bn.bias[dead_stem] = 0
    zero_rows_(model.stem, dead_stem)
    zero_rows_(model.dw, dead_dw)
    x = torch.randn(3, 3, 8, 8)
    expected = outputs(model, x)
    # Oracle, from the masked model's activations alone: a channel can go when every consumer reads it as a
    # constant, and as zero where that consumer pads with zeros (conv_a with pad_a; conv_b and fc_c do not pad).
    with torch.no_grad():
        h = model.trunk(x)
        reads = [(h, pad_a > 0), (model.into_b(h), False)] + ([(model.into_c(h).view(3, 10, 4), False)]
                                                             if linear_branch else [])
    removable = torch.tensor([j in dead_stem for j in range(10)])
    for read, zero_padded in reads:
        per_channel = read.transpose(0, 1).reshape(10, -1)
        # to a few ulps, as above: BatchNorm's CPU kernel can round the tail of a constant row differently
        removable &= ((per_channel - per_channel[:, :1]).abs() <= 1e-6 * (1 + per_channel[:, :1].abs())).all(1)
        if zero_padded:
            removable &= per_channel[:, 0] == 0
    width = max(10 - int(removable.sum()), 1)

    result = shrink(model, x)

    for got, want in zip(outputs(result.model, x), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    shrunk = result.model
    assert (shrunk.stem.out_channels, shrunk.bn.num_features, shrunk.conv_a.in_channels, shrunk.bn_b.num_features,
            shrunk.dw.in_channels, shrunk.dw.groups, shrunk.conv_b.in_channels) == (width,) * 7
    assert shrunk.fc_c.in_features == (4 * width if linear_branch else 40)
    if width < 10:
        (layer,) = result.report.layers
        consumers = "conv_a, conv_b" + (", fc_c" if linear_branch else "")
        assert (layer.name, layer.consumer, layer.through) == ("stem", consumers, ("dw",))
        assert layer.removed == 10 - width
        assert consumers in result.report.table()
    elif dead_stem:  # zero filters whose constants a padded conv reads: none could go, and the report says why
        padded = [name for name, pads in (("dw", dw_padding), ("conv_a", pad_a)) if pads]
        assert f"the zero-padded conv(s) {', '.join(padded)}" in dict(result.report.kept)["stem"]


def test_the_batch_norms_of_every_branch_are_planned_with_their_producer() -> None:
    model = Fork("tanh", 1, 0, True)
    assert removable_channels(model)["stem"] is None
    assert following_batch_norms(model) == {"stem": ["bn", "bn_b"]}
    # a zero-padded depthwise conv after the sigmoid: its pruned channels read sigmoid(0) = 0.5, padded with zeros
    # (not constant at the borders), whatever BatchNorm is held at zero: not removable (it was planned so)
    assert "reach the zero-padded depthwise conv dw as a non-zero constant (sigmoid makes them one)" in \
        removable_channels(Fork("tanh", 1, 1, True))["stem"]


# ------------------------------------------------------------------------------------------------ concatenations
class DenseBlock(nn.Module):
    """A DenseNet block: each layer reads the concatenation of the stem's and every earlier layer's output, and the
    head reads them all; every producer's output branches into several concatenations."""

    def __init__(self, activation: str, kernel: int, growth: int = 4) -> None:
        super().__init__()
        self.stem, self.bn0, self.act = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), ACTIVATIONS[activation]()
        self.bn_0, self.conv_0 = nn.BatchNorm2d(6), nn.Conv2d(6, growth, kernel, padding=kernel // 2)
        self.bn_1, self.conv_1 = nn.BatchNorm2d(6 + growth), nn.Conv2d(6 + growth, growth, kernel, padding=kernel // 2)
        self.bn_f, self.fc = nn.BatchNorm2d(6 + 2 * growth), nn.Linear(6 + 2 * growth, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.act(self.bn0(self.stem(x)))]
        for bn, conv in ((self.bn_0, self.conv_0), (self.bn_1, self.conv_1)):
            features.append(conv(self.act(bn(torch.cat(features, 1)))))
        pooled = F.adaptive_avg_pool2d(self.act(self.bn_f(torch.cat(features, 1))), 1)
        return self.fc(torch.flatten(pooled, 1))


@settings(max_examples=60, deadline=None)
@given(
    activation=st.sampled_from(["silu", "tanh", "identity"]), kernel=st.sampled_from([1, 3]),
    dead_stem=st.lists(st.integers(0, 5), unique=True, max_size=6),
    dead_0=st.lists(st.integers(0, 3), unique=True, max_size=4),
    dead_1=st.lists(st.integers(0, 3), unique=True, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_channels_leave_the_concatenations_of_a_dense_block(activation, kernel, dead_stem, dead_0, dead_1,
                                                              seed) -> None:
    torch.manual_seed(seed)
    model = DenseBlock(activation, kernel)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # moderate statistics, as after training: no activation saturates to an exact constant
        for bn in (model.bn0, model.bn_0, model.bn_1, model.bn_f):
            bn.running_mean.uniform_(-1, 1, generator=generator)
            bn.running_var.uniform_(0.5, 2, generator=generator)
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.uniform_(-0.5, 0.5, generator=generator)
    zero_rows_(model.stem, dead_stem)
    zero_rows_(model.conv_0, dead_0)
    zero_rows_(model.conv_1, dead_1)
    x = torch.randn(3, 3, 6, 6)
    expected = outputs(model, x)
    # Oracle, from the masked model's activations alone: what each consumer reads, per channel of its input
    reads: dict[str, torch.Tensor] = {}
    hooks = [getattr(model, name).register_forward_pre_hook(
        lambda module, args, name=name: reads.__setitem__(name, args[0].transpose(0, 1).reshape(args[0].shape[1], -1)))
        for name in ("conv_0", "conv_1", "fc")]
    outputs(model, x)
    for hook in hooks:
        hook.remove()
    zero_padded = {"conv_0": kernel == 3, "conv_1": kernel == 3, "fc": False}
    # (producer, its channels, its zeroed channels, where they start in each consumer's input)
    producers = [("stem", 6, dead_stem, {"conv_0": 0, "conv_1": 0, "fc": 0}),
                 ("conv_0", 4, dead_0, {"conv_1": 6, "fc": 6}), ("conv_1", 4, dead_1, {"fc": 10})]
    widths = {}
    for name, channels, dead, starts in producers:
        removable = torch.tensor([j in dead for j in range(channels)])
        for consumer, start in starts.items():
            read = reads[consumer][start:start + channels]
            # a constant channel computed by vectorised kernels can differ in its last bit where the SIMD loop's
            # scalar tail computes it (silu's exp): constant within float rounding
            removable &= ((read - read[:, :1]).abs() <= 1e-6 * (1 + read[:, :1].abs())).all(1)
            if zero_padded[consumer]:
                removable &= read[:, 0] == 0
        widths[name] = max(channels - int(removable.sum()), 1)

    result = shrink(model, x)

    torch.testing.assert_close(outputs(result.model, x), expected, rtol=1e-5, atol=1e-5)
    shrunk = result.model
    stem, first, second = widths["stem"], widths["conv_0"], widths["conv_1"]
    assert (shrunk.stem.out_channels, shrunk.bn0.num_features, shrunk.bn_0.num_features,
            shrunk.conv_0.in_channels) == (stem,) * 4
    assert (shrunk.conv_0.out_channels, shrunk.bn_1.num_features, shrunk.conv_1.in_channels) == (
        first, stem + first, stem + first)
    assert (shrunk.conv_1.out_channels, shrunk.bn_f.num_features, shrunk.fc.in_features) == (
        second, stem + first + second, stem + first + second)
    shrunk_layers = {layer.name: layer for layer in result.report.layers}
    assert {name for name, _, _, _ in producers if widths[name] < {"stem": 6}.get(name, 4)} == shrunk_layers.keys()
    if "stem" in shrunk_layers:
        assert shrunk_layers["stem"].consumer == "conv_0, conv_1, fc"


def test_the_batch_norms_after_a_concatenation_are_planned_at_the_producers_place() -> None:
    # a pruned channel j of conv_0 is channel 6 + j of bn_1 and bn_f (the stem's 6 channels come first): the
    # pipeline's zeroing of BatchNorms for pruned channels needs the place
    model = DenseBlock("tanh", 1)
    assert channel_plan(model).batch_norms == {"stem": {"bn0": 0, "bn_0": 0, "bn_1": 0, "bn_f": 0},
                                               "conv_0": {"bn_1": 6, "bn_f": 6}, "conv_1": {"bn_f": 10}}
    assert following_batch_norms(model) == {"stem": ["bn0", "bn_0", "bn_1", "bn_f"], "conv_0": ["bn_1", "bn_f"],
                                            "conv_1": ["bn_f"]}
    assert removable_channels(model) == {
        "stem": None, "conv_0": None, "conv_1": None,
        "fc": "it produces the model's output, whose width is part of the model's interface"}


def test_zeroing_the_planned_batch_norms_frees_channels_a_padded_conv_reads_after_a_concatenation() -> None:
    torch.manual_seed(0)
    model = DenseBlock("silu", kernel=3)  # conv_1 pads with zeros: a non-zero constant cannot leave its input
    randomise_batch_norm_(model.bn_1, torch.Generator().manual_seed(0))
    randomise_batch_norm_(model.bn_f, torch.Generator().manual_seed(1))
    zero_rows_(model.conv_0, [1, 2])
    x = torch.randn(2, 3, 6, 6)
    assert shrink(model, x).model.conv_0.out_channels == 4  # BN(0) is its shift: not zero, so they stay

    places = channel_plan(model).batch_norms["conv_0"]
    group = ChannelGroup(("conv_0",), tuple(places), (), 4, batch_norm_starts=tuple(places.values()))
    untouched = {name: getattr(model, name).weight.detach().clone() for name in places}
    zero_group_batch_norms_(model, [group])
    for name in places:  # channels 6 + 1 and 6 + 2 of bn_1 and bn_f, nothing else
        bn = getattr(model, name)
        zeroed = torch.zeros(bn.num_features, dtype=torch.bool)
        zeroed[[7, 8]] = True
        assert bool((bn.weight[zeroed] == 0).all() and (bn.bias[zeroed] == 0).all())
        torch.testing.assert_close(bn.weight[~zeroed], untouched[name][~zeroed])
    result = shrunk_alike(model, x)
    (layer,) = result.report.layers
    assert (layer.name, layer.removed, layer.folded) == ("conv_0", 2, 0)  # exactly zero: nothing to fold


class LinearConcat(nn.Module):
    """Features of two Linear layers, and optionally the raw input, concatenated along the last dim."""

    def __init__(self, with_input: bool, dim: int = -1) -> None:
        super().__init__()
        self.with_input, self.dim = with_input, dim
        self.a, self.b, self.out = nn.Linear(4, 5), nn.Linear(4, 3), nn.Linear(8 + 4 * with_input, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.relu(self.a(x)), torch.sigmoid(self.b(x))]
        return self.out(torch.cat([x, *parts] if self.with_input else parts, dim=self.dim))


@pytest.mark.parametrize("dim", [-1, 1])  # 1: the features of 2-d outputs, as MLPs often write it (was refused)
def test_linear_features_concatenated_along_the_last_dim_lose_their_zero_rows(dim: int) -> None:
    torch.manual_seed(0)
    model = LinearConcat(with_input=False, dim=dim)
    zero_rows_(model.a, [1, 3])
    zero_rows_(model.b, [0])
    x = torch.randn(6, 4)
    result = shrunk_alike(model, x)
    assert (result.model.a.out_features, result.model.b.out_features, result.model.out.in_features) == (3, 2, 5)
    assert [(layer.name, layer.consumer, layer.removed) for layer in result.report.layers] == [
        ("a", "out", 2), ("b", "out", 1)]


class ConcatTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(4, 5), nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.out(torch.cat([h, torch.relu(h)], -1))


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (LinearConcat(with_input=True), "the concatenation call_function cat also reads placeholder x, whose width "
                                        "shrink cannot read from the graph"),
        (ConcatTwice(), "two of its branches meet again in the concatenation cat"),
    ],
)
def test_concatenations_shrink_cannot_place_keep_their_inputs(model, reason) -> None:
    torch.manual_seed(0)
    zero_rows_(model.a, [0, 1])
    x = torch.randn(6, 4)
    result = shrunk_alike(model, x)
    assert dict(result.report.kept)["a"] == reason


class TinyInception(nn.Module):
    """Two Inception blocks: four branches concatenated, the concatenation read by the next block's four branches
    (a max-pool that pads with -inf on one of them)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"b1": nn.Conv2d(width, 4, 1), "b3": nn.Conv2d(width, 4, 3, padding=1),
                           "pool": nn.Conv2d(width, 8, 1)}) for width in (8, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = torch.cat([torch.relu(block["b1"](x)), torch.relu(block["b3"](x)),
                           torch.relu(block["pool"](F.max_pool2d(x, 3, 1, 1)))], 1)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_a_concatenation_read_by_several_branches_loses_channels_in_all_of_them() -> None:
    torch.manual_seed(0)
    model = TinyInception()
    randomise_batch_norm_(model.stem[1], torch.Generator().manual_seed(0))
    zero_rows_(model.stem[0], [0, 5])
    with torch.no_grad():  # zero BatchNorm for them: zero channels, which even block 1's padded b3 can lose
        model.stem[1].weight[[0, 5]] = model.stem[1].bias[[0, 5]] = 0
    first, second = model.blocks
    zero_rows_(first["b1"], [1])  # block 1's outputs: ReLU(bias) constants, folded into block 2's 1x1 convs and
    zero_rows_(first["pool"], [2, 3, 7])  # zero for its padded b3: only those with a bias <= 0 can go
    zero_rows_(second["b3"], [0])
    x = torch.randn(2, 3, 8, 8)
    result = shrunk_alike(model, x)
    shrunk = result.model
    assert shrunk.stem[0].out_channels == shrunk.stem[1].num_features == 6
    assert all(shrunk.blocks[0][name].in_channels == 6 for name in ("b1", "b3", "pool"))
    layers = {layer.name: layer for layer in result.report.layers}
    assert layers["stem.0"].consumer == "blocks.0.b1, blocks.0.b3, blocks.0.pool"
    dead = {"blocks.0.b1": [1], "blocks.0.pool": [2, 3, 7]}
    for name, rows in dead.items():  # b3 of block 2 pads with zeros: a positive ReLU(bias) constant stays
        goes = [row for row in rows if float(dict(model.named_modules())[name].bias[row]) <= 0]
        assert dict(shrunk.named_modules())[name].out_channels == {"blocks.0.b1": 4, "blocks.0.pool": 8}[name] - (
            len(goes))
    width = sum(shrunk.blocks[0][name].out_channels for name in ("b1", "b3", "pool"))
    assert all(shrunk.blocks[1][name].in_channels == width for name in ("b1", "b3", "pool"))
    assert (shrunk.blocks[1]["b3"].out_channels, shrunk.head.in_features) == (3, 15)


@pytest.mark.parametrize(("pool", "passes"), [
    (nn.AvgPool2d(2), True), (nn.AvgPool2d(3, 1, padding=1), False), (nn.AvgPool2d(2, divisor_override=3), False),
    (lambda x: F.avg_pool2d(x, 2), True), (lambda x: F.avg_pool2d(x, 3, 1, 1), False),
])
def test_average_pooling_passes_constants_only_without_padding_or_a_divisor(pool, passes) -> None:
    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.pool, self.out = nn.Conv2d(2, 6, 1), pool, nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.pool(self.conv(x))))

    torch.manual_seed(0)
    model = Pooled()
    zero_rows_(model.conv, [0, 3])
    x = torch.randn(2, 2, 6, 6)
    result = shrunk_alike(model, x)
    assert result.model.conv.out_channels == (4 if passes else 6)
    if not passes:
        assert "which shrink does not see through" in dict(result.report.kept)["conv"]



class TinyUNet(nn.Module):
    """A U-Net: the encoder's first features go down (max-pool, conv) and across (the skip), the deeper ones are
    upsampled and concatenated with the skip, and a conv and a 1x1 head read the concatenation's result."""

    def __init__(self, upsample: str) -> None:
        super().__init__()
        self.upsample = upsample
        self.enc1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.enc2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.up = nn.Upsample(scale_factor=2, mode=upsample) if upsample != "function" else None
        self.dec, self.bn3, self.head = nn.Conv2d(24, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.bn1(self.enc1(x)))
        deep = torch.relu(self.bn2(self.enc2(F.max_pool2d(skip, 2))))
        deep = self.up(deep) if self.up is not None else F.interpolate(deep, scale_factor=2.0, mode="bilinear")
        return self.head(torch.relu(self.bn3(self.dec(torch.cat([deep, skip], 1)))))


@pytest.mark.parametrize("upsample", ["nearest", "bilinear", "function"])
def test_a_unets_skips_and_upsampled_features_lose_their_zeroed_channels(upsample) -> None:
    torch.manual_seed(0)
    model = TinyUNet(upsample)
    dead = {"enc1": [0, 3, 5], "enc2": [1, 2, 8, 15], "dec": [4]}
    for index, (conv, rows) in enumerate(dead.items(), 1):
        bn = getattr(model, f"bn{index}")
        randomise_batch_norm_(bn, torch.Generator().manual_seed(index))
        zero_rows_(getattr(model, conv), rows)
        with torch.no_grad():  # as the pipeline's zero_batch_norm leaves them: the channels are exactly zero
            bn.weight[rows] = bn.bias[rows] = 0
    x = torch.randn(2, 3, 8, 8)
    result = shrunk_alike(model, x)
    shrunk = result.model
    assert (shrunk.enc1.out_channels, shrunk.enc2.in_channels, shrunk.enc2.out_channels) == (5, 5, 12)
    assert (shrunk.dec.in_channels, shrunk.dec.out_channels, shrunk.head.in_channels) == (12 + 5, 7, 7)
    consumers = {layer.name: layer.consumer for layer in result.report.layers}
    assert consumers == {"enc1": "enc2, dec", "enc2": "dec", "dec": "head"}


class TransposedUNet(nn.Module):
    """A U-Net whose decoder upsamples with a stride-2 transposed conv (the original U-Net's up-convolution): it
    consumes the deep features and produces the channels concatenated with the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.enc2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.up, self.bn_up = nn.ConvTranspose2d(16, 8, 2, stride=2), nn.BatchNorm2d(8)
        self.dec, self.head = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.tanh(self.bn1(self.enc1(x)))
        deep = torch.tanh(self.bn2(self.enc2(F.max_pool2d(skip, 2))))
        up = torch.tanh(self.bn_up(self.up(deep)))
        return self.head(torch.tanh(self.dec(torch.cat([up, skip], 1))))


@pytest.mark.parametrize("zero_batch_norm", [True, False])
def test_transposed_convs_lose_zero_input_channels_and_zero_output_filters(zero_batch_norm) -> None:
    torch.manual_seed(0)
    model = TransposedUNet()
    for index, bn in enumerate((model.bn1, model.bn2, model.bn_up)):
        randomise_batch_norm_(bn, torch.Generator().manual_seed(index))
    dead = {"enc1": [1, 6], "enc2": [0, 3, 4], "up": [2, 5, 7]}
    zero_rows_(model.enc1, dead["enc1"])
    zero_rows_(model.enc2, dead["enc2"])
    with torch.no_grad():
        model.up.weight[:, dead["up"]] = 0  # a transposed conv's output filters are its weight's dim 1
        if zero_batch_norm:  # the pruned channels exactly zero, as the pipeline's zero_batch_norm leaves them
            for bn, rows in ((model.bn1, dead["enc1"]), (model.bn2, dead["enc2"]), (model.bn_up, dead["up"])):
                bn.weight[rows] = bn.bias[rows] = 0
    x = torch.randn(2, 3, 8, 8)
    result = shrunk_alike(model, x)
    shrunk = result.model
    if zero_batch_norm:
        assert (shrunk.enc2.out_channels, shrunk.up.in_channels, shrunk.up.out_channels) == (13, 13, 5)
        assert tuple(shrunk.up.weight.shape) == (13, 5, 2, 2) and shrunk.bn_up.num_features == 5
        assert (shrunk.enc1.out_channels, shrunk.dec.in_channels) == (6, 5 + 6)
        assert {layer.name: layer.consumer for layer in result.report.layers} == {
            "enc1": "enc2, dec", "enc2": "up", "up": "dec"}
    else:  # tanh(BatchNorm shift) constants: a transposed conv spreads them unevenly, a padded conv at its border
        assert result.report.layers == ()
        kept = dict(result.report.kept)
        assert "the transposed conv(s) up" in kept["enc2"]
        assert "the zero-padded conv(s) dec" in kept["up"] and "the zero-padded conv(s) enc2, dec" in kept["enc1"]

class DepthMultiplier(nn.Module):
    """A grouped conv with two outputs per input channel: its channels do not map one to one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.dw, self.out = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dw(self.conv(x)))


def test_channels_spread_unevenly_over_a_grouped_convs_groups_stay() -> None:
    torch.manual_seed(0)
    model = DepthMultiplier()  # dw: 4 groups of one input channel each
    zero_rows_(model.conv, [1])
    x = torch.randn(2, 2, 6, 6)
    result = shrink(model, x)
    torch.testing.assert_close(outputs(result.model, x), outputs(model, x))
    assert result.report.layers == ()
    assert result.report.kept == (("conv", "its zero channels are not spread evenly over the groups of the grouped "
                                            "conv(s) dw, which must each lose as many"),)


class GroupedChain(nn.Module):
    """conv (groups g1) -> BatchNorm -> ReLU -> conv (groups g2) -> conv 1x1 -> pool -> Linear: a ResNeXt block."""

    def __init__(self, g1: int, g2: int, padding: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 24, 3, padding=padding, groups=g1)
        self.bn = nn.BatchNorm2d(24)
        self.b = nn.Conv2d(24, 24, 3, padding=padding, groups=g2)
        self.c = nn.Conv2d(24, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(torch.relu(self.b(torch.relu(self.bn(self.a(x))))))
        return self.head(x.mean((2, 3)))


@settings(max_examples=40, deadline=None)
@given(g1=st.sampled_from([1, 2, 4]), g2=st.sampled_from([2, 3, 4, 6, 8]), padding=st.sampled_from([0, 1]),
       dead_a=st.sets(st.integers(0, 23), max_size=20), dead_b=st.sets(st.integers(0, 23), max_size=20),
       zero_batch_norm=st.booleans(), seed=st.integers(0, 1000))
def test_grouped_convs_lose_their_zero_channels_evenly_and_compute_the_same(g1, g2, padding, dead_a, dead_b,
                                                                              zero_batch_norm, seed) -> None:
    """Grouped convs (ResNeXt, RegNet) as producers and as consumers: each group loses as many channels, the
    model computes the same function, and a layer keeps only the zero channels that would unbalance a group."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GroupedChain(g1, g2, padding).eval()
    randomise_batch_norm_(model.bn, g)
    zero_rows_(model.a, sorted(dead_a))
    zero_rows_(model.b, sorted(dead_b))
    if zero_batch_norm:  # as the pipeline holds a pruned channel's BatchNorm: the channel is then exactly zero
        with torch.no_grad():
            rows = sorted(dead_a)
            model.a.bias[rows], model.bn.weight[rows], model.bn.bias[rows] = 0, 0, 0
    x = torch.randn(2, 4, 9, 9, generator=g)
    result = shrink(model, x)
    torch.testing.assert_close(outputs(result.model, x), outputs(model, x), rtol=1e-4, atol=1e-5)
    shrunk = result.model
    for conv, groups in ((shrunk.a, g1), (shrunk.b, g2)):
        assert conv.groups == groups and conv.out_channels % groups == 0 and conv.in_channels % groups == 0
    layers = {layer.name: layer for layer in result.report.layers}
    if "b" in layers or dead_b:  # b's own zero channels: all go when they are even over its groups, none if
        per_group = [len([r for r in dead_b if r // (24 // g2) == i]) for i in range(g2)]
        assert shrunk.b.out_channels == 24 - g2 * min(per_group) or (min(per_group) == 24 // g2)
    if zero_batch_norm and dead_a:  # exactly zero channels into b: as many leave as every lcm(g1, g2) group allows
        blocks = math.lcm(g1, g2)
        per_block = [len([r for r in dead_a if r // (24 // blocks) == i]) for i in range(blocks)]
        if min(per_block) < 24 // blocks:  # (a layer never loses every channel)
            assert shrunk.a.out_channels == 24 - blocks * min(per_block)


class IntoGroupedConv(nn.Module):
    """A conv read by a zero-padded conv of `groups` groups (`out` channels), then pooled."""

    def __init__(self, groups: int, out: int = 16) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(16, out, 3, padding=1, groups=groups)
        self.head = nn.Linear(out, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(x))).mean((2, 3)))


@settings(max_examples=40, deadline=None)
@given(groups=st.sampled_from([1, 2, 4, 8]), as_many_out=st.booleans(), keep_multiple_of=st.sampled_from([None, 2, 8]),
       zero=st.lists(st.integers(0, 15), unique=True, min_size=1, max_size=16),
       biased=st.lists(st.integers(0, 15), unique=True, max_size=4))
@example(groups=8, as_many_out=True, keep_multiple_of=None, zero=[0, 1, 2, 4, 6, 8, 10, 12, 14], biased=[])
def test_the_report_says_why_each_zero_channel_left_stays(groups, as_many_out, keep_multiple_of, zero, biased) -> None:
    # Zero channels stay for their constants (a bias into the zero-padded conv) or so that the width stays a
    # multiple, the grouped conv's groups even, or one channel kept: the report's reason counts each of them.
    # (as many outputs as groups: narrowed to as many inputs, the grouped conv is a depthwise one, still named)
    torch.manual_seed(0)
    model = IntoGroupedConv(groups, groups if as_many_out else 16).eval()
    with torch.no_grad():
        model.a.weight[zero] = 0
        model.a.bias[zero] = 0
        model.a.bias[biased] = 0.5  # a constant that the padded conv reads at its border: held
    x = torch.randn(2, 3, 6, 6)
    expected = outputs(model, x)
    result = shrink(model, x, keep_multiple_of=keep_multiple_of)
    torch.testing.assert_close(outputs(result.model, x), expected, rtol=1e-5, atol=1e-5)
    if not result.report.layers:  # none removed: said as a layer kept, with its reason
        assert dict(result.report.kept)["a"]
        return
    (layer,) = result.report.layers
    held = len(set(zero) & set(biased))
    assert layer.channels_after == result.model.a.out_channels == 16 - (len(zero) - layer.left)
    counts = [int(n) for n in re.findall(r"(\d+) (?:because|removable)", layer.left_reason)]
    assert sum(counts) == layer.left and (layer.left == 0) == (layer.left_reason == "")
    assert (f"{held} because its zero channels output non-zero constants into the zero-padded conv(s) b" in
            layer.left_reason) == (held > 0)
    # a cause is named only when it kept a channel
    assert "a multiple of" not in layer.left_reason or keep_multiple_of is not None
    assert re.findall(r"grouped conv\(s\) (\S*) loses", layer.left_reason) in ([], ["b"])
    assert "each group of the grouped conv(s) b loses as many" not in layer.left_reason or groups > 1
    assert ("left: " + layer.left_reason in result.report.table()) == (layer.left > 0)


def test_the_report_names_only_the_causes_that_kept_zero_channels() -> None:
    """Channels a zero depthwise filter makes constant (their conv's filters are not zero) are not counted as left:
    keep_multiple_of keeping some of them was named a cause of the zero channels left, which the grouped conv's
    groups alone kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 1, groups=16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1, groups=2)).eval()
    with torch.no_grad():
        model[0].weight[[11, 12]] = 0
        model[2].weight[[0, 1, 2, 8, 9, 10]] = 0
    x = torch.randn(2, 3, 4, 4)
    for keep_multiple_of in (None, 4):
        result = shrink(model, x, keep_multiple_of=keep_multiple_of)
        torch.testing.assert_close(outputs(result.model, x), outputs(model, x))
        (layer,) = result.report.layers
        assert (layer.left, layer.left_reason) == (
            2, "2 removable one(s) stay so that each group of the grouped conv(s) 4 loses as many")


def test_structured_pruning_in_the_pipeline_prunes_grouped_convs_evenly_and_shrink_removes_every_channel() -> None:
    from litcompress.pipeline import PruneConfig, preview_shrink

    torch.manual_seed(0)

    def block(cin: int, mid: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                             nn.Conv2d(mid, mid, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                             nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    model = nn.Sequential(block(3, 32, 32), block(32, 64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 10)).eval()
    result, _ = preview_shrink(model, PruneConfig(sparsity=0.5, method="ln_structured"))
    widths = {layer.name: (layer.channels_before, layer.channels_after, layer.left) for layer in result.report.layers}
    # every layer, the grouped ones and those they read, loses exactly half its channels, 2 or 4 from each group
    assert widths == {"0.0": (32, 16, 0), "0.3": (32, 16, 0), "0.6": (32, 16, 0),
                      "1.0": (64, 32, 0), "1.3": (64, 32, 0), "1.6": (64, 32, 0)}
    assert result.model[0][3].groups == 8 and result.model[0][3].weight.shape == (16, 2, 3, 3)


# ------------------------------------------------------------------------------------------------ Transformer layers
class Seq2Seq(nn.Module):
    """torch's nn.Transformer (one encoder and one decoder layer) between a Linear embedding and a Linear head."""

    def __init__(self, activation: str | nn.Module, batch_first: bool, norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 16)
        with warnings.catch_warnings():  # "enable_nested_tensor is True, but ...": torch's fast path declines
            warnings.simplefilter("ignore", UserWarning)
            self.transformer = nn.Transformer(16, 2, 1, 1, dim_feedforward=32, dropout=0.1, activation=activation,
                                              batch_first=batch_first, norm_first=norm_first)
        self.head = nn.Linear(16, 4)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(self.embed(src), self.embed(tgt)))


FEED_FORWARD = ("transformer.encoder.layers.0", "transformer.decoder.layers.0")


@pytest.mark.parametrize("activation", ["relu", "gelu", nn.SiLU()])
@pytest.mark.parametrize(("batch_first", "norm_first"), [(True, False), (False, True)])
def test_transformer_feed_forward_blocks_lose_their_zero_channels(activation, batch_first, norm_first) -> None:
    torch.manual_seed(0)
    model = Seq2Seq(activation, batch_first, norm_first).eval()
    dead = {layer: torch.randperm(32)[:n].tolist() for layer, n in zip(FEED_FORWARD, (12, 31))}
    for layer, rows in dead.items():
        zero_rows_(model.get_submodule(f"{layer}.linear1"), rows)  # biases stay: the constants are folded
    src, tgt = torch.randn(2, 5, 3), torch.randn(2, 4, 3)  # batch 2; sequences of 5 and 4
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    with torch.no_grad():  # eval + no_grad: torch's fused fast path where it applies
        expected = model(src, tgt)
    expected_with_grad = model(src, tgt).detach()

    result = shrink(model, (src, tgt))

    with torch.no_grad():
        torch.testing.assert_close(result.model(src, tgt), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.model(src, tgt).detach(), expected_with_grad, rtol=1e-5, atol=1e-5)
    for layer, rows in dead.items():
        width = 32 - len(rows)
        assert result.model.get_submodule(f"{layer}.linear1").out_features == width
        assert tuple(result.model.get_submodule(f"{layer}.linear2").weight.shape) == (16, width)
    assert [(item.name, item.consumer, item.channels_after) for item in result.report.layers] == [
        (f"{layer}.linear1", f"{layer}.linear2", 32 - len(rows)) for layer, rows in dead.items()]


class WithAttention(nn.Module):
    """A leaf module fx does not trace into (MultiheadAttention) and a Linear forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.attention, self.unused, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 8), \
            nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x, need_weights=False)[0])


def test_zero_channels_that_fx_cannot_see_are_reported_with_the_reason() -> None:
    torch.manual_seed(0)
    model = WithAttention()
    zero_rows_(model.attention.out_proj, [0, 1])
    zero_rows_(model.unused, [2])
    x = torch.randn(2, 3, 8)
    result = shrink(model, x)
    torch.testing.assert_close(outputs(result.model, x), outputs(model, x))
    assert result.report.layers == ()
    assert dict(result.report.kept) == {
        "attention.out_proj": "it is inside attention (MultiheadAttention), whose output channels are the stream's: "
                              "the attention loses whole heads instead (pruned with prune_heads_ or "
                              "PruneConfig(heads=...))",
        "unused": "forward does not call it (as torch.fx traces forward)",
    }

    # an attention shrink narrowed already can lose no more heads (prune_heads_ prunes nn.MultiheadAttention's):
    # the reason points to the attention it came from, not to prune_heads_ on this one
    from litcompress.pruning.heads import HeadPrunedAttention, prune_heads_
    prune_heads_(model, 0.5)
    narrowed = shrink(model, x).model
    assert isinstance(narrowed.attention, HeadPrunedAttention) and prune_heads_(narrowed, 0.5) == {}
    zero_rows_(narrowed.attention.v_proj, [0])
    reason = dict(shrink(narrowed, x).report.kept)["attention.v_proj"]
    assert reason.startswith("it is inside attention (HeadPrunedAttention: an attention shrink already narrowed")
    assert "nn.MultiheadAttention it came from" in reason and "before shrinking" in reason

    seq2seq = Seq2Seq("relu", True, False)
    zero_rows_(seq2seq.transformer.encoder.layers[0].linear2, [0])
    (name, reason), = shrink(seq2seq, (torch.randn(2, 5, 3), torch.randn(2, 4, 3))).report.kept
    assert name == "transformer.encoder.layers.0.linear2"
    assert reason.startswith("it is inside transformer (Transformer), where only the feed-forward blocks' first")


def test_removable_channels_names_the_layers_structured_pruning_can_shrink() -> None:
    from litcompress.models import MobileNetClassifier
    from litcompress.pruning.shrink import removable_channels

    mobilenet = removable_channels(MobileNetClassifier(width=8, blocks=1))
    # the stem and project convs write into the residual stream (one group), expand reads it and feeds the
    # depthwise conv (not a producer of its own); the classifier's rows are the model's output
    assert {name for name, reason in mobilenet.items() if reason is None} == {"net.0", "net.3.expand",
                                                                               "net.3.project"}
    assert mobilenet["net.6"].startswith("it produces the model's output")

    seq2seq = removable_channels(Seq2Seq("gelu", True, False))
    assert {name for name, reason in seq2seq.items() if reason is None} == {f"{layer}.linear1"
                                                                             for layer in FEED_FORWARD}
    assert seq2seq["embed"] == "it is called more than once"  # on src and on tgt
    assert "LayerNorm'd residual stream" in seq2seq["transformer.decoder.layers.0.multihead_attn.out_proj"]


# ------------------------------------------------------------------------------------------------ global pooling
class PooledByReduction(nn.Module):
    """Convs whose activations are reduced over their spatial dims before the Linear head, written as code does it:
    ``x.mean(-1)`` on a 1-d signal, ``x.mean((2, 3))``, ``torch.amax(x, dim=[2, 3])``, ``keepdim`` then a flatten,
    a flatten of the pooled (batch, channels) that changes nothing, a view of it to the batch size of the unpooled
    activations, or a pool through a view that reads the channel count, ``x.view(x.size(0), x.size(1), -1).mean(-1)``
    (each kept every channel)."""

    def __init__(self, spatial: int, pool: str) -> None:
        super().__init__()
        conv = nn.Conv1d if spatial == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if spatial == 1 else nn.BatchNorm2d
        self.spatial, self.pool = spatial, pool
        self.conv1, self.norm1 = conv(3, 8, 3, padding=1), norm(8)
        self.conv2, self.norm2 = conv(8, 6, 3, padding=1), norm(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.norm2(self.conv2(x)))
        dims = (-1,) if self.spatial == 1 else (2, 3)
        if self.pool == "mean":
            x = x.mean(dims[0] if self.spatial == 1 else dims)
        elif self.pool == "amax":
            x = torch.amax(x, dim=list(dims))
        elif self.pool == "flattened":
            x = torch.flatten(x.mean(dims), 1)
        elif self.pool == "viewed":  # the batch size read of the unpooled x (it kept every channel)
            x = x.mean(dims).view(x.size(0), -1)
        elif self.pool == "through_view":  # the view reads the channel count (it kept every channel)
            x = x.view(x.size(0), x.size(1), -1).mean(-1)
        else:  # keepdim, then a flatten
            x = torch.flatten(x.mean(dims, keepdim=True), 1)
        return self.head(x)


@settings(max_examples=40, deadline=None)
@example(spatial=2, pool="viewed", dead1=[], dead2=[1, 3], seed=0)
@example(spatial=1, pool="viewed", dead1=[2], dead2=[0], seed=1)  # (dim -1: the example inputs give the rank)
@example(spatial=2, pool="through_view", dead1=[], dead2=[1, 3], seed=0)
@example(spatial=1, pool="through_view", dead1=[2], dead2=[0, 5], seed=1)
@given(spatial=st.sampled_from([1, 2]), pool=st.sampled_from(["mean", "amax", "keepdim", "flattened", "viewed",
                                                              "through_view"]),
       dead1=st.lists(st.integers(0, 7), unique=True, max_size=8),
       dead2=st.lists(st.integers(0, 5), unique=True, max_size=6), seed=st.integers(0, 2**16))
def test_a_global_pool_written_as_a_reduction_lets_its_convs_lose_their_zero_channels(spatial, pool, dead1, dead2,
                                                                                     seed) -> None:
    torch.manual_seed(seed)
    model = PooledByReduction(spatial, pool).eval()
    for norm, dead in ((model.norm1, dead1), (model.norm2, dead2)):
        randomise_batch_norm_(norm, torch.Generator().manual_seed(seed))
        with torch.no_grad():  # as zero_batch_norm holds them: the channel outputs exactly zero
            norm.weight[dead], norm.bias[dead] = 0.0, 0.0
    zero_rows_(model.conv1, dead1)
    zero_rows_(model.conv2, dead2)
    x = torch.randn(2, 3, 11) if spatial == 1 else torch.randn(2, 3, 6, 5)
    expected = outputs(model, x)
    result = shrink(model, x)
    torch.testing.assert_close(outputs(result.model, x), expected, rtol=1e-5, atol=1e-5)
    assert result.model.conv2.out_channels == result.model.head.in_features == max(6 - len(dead2), 1)
    assert result.model.conv1.out_channels == max(8 - len(dead1), 1)


@pytest.mark.parametrize(("pool", "features"), [
    (lambda x: x.view(x.size(0), x.size(1), -1).mean(-1) * x.size(1), 6),  # the count used for something else too
    (lambda x: x.view(x.size(0), x.size(1), -1).mean(-1, keepdim=True).squeeze(-1), 6),  # (batch, channels, 1) first
    (lambda x: x.view(x.size(0), x.size(1), -1).sum(-1), 6),  # a constant times the map's size
    (lambda x: x.view(x.size(0), x.size(1), -1).mean(1), 20),  # over the channels
], ids=["count-used-elsewhere", "keepdim", "sum", "over-channels"])
def test_a_pool_through_a_channel_reading_view_that_is_not_a_plain_global_pool_keeps_the_channels(pool,
                                                                                                  features) -> None:
    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(features, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(pool(torch.relu(self.conv(x))))

    model = Pooled().eval()
    zero_rows_(model.conv, [1, 4])
    x = torch.randn(2, 3, 5, 4)
    for result in (shrink(model, x), shrink(model)):
        assert result.model.conv.out_channels == 6 and "conv" in dict(result.report.kept)
        torch.testing.assert_close(outputs(result.model, x), outputs(model, x))


@pytest.mark.parametrize("read", ["of the view", "of the pooled features"])
def test_the_channel_count_read_after_a_global_pool_keeps_the_channels_with_or_without_example_inputs(read) -> None:
    """head(v.mean(-1)) * v.size(1): shrink with example inputs failed its own check of the outputs, and without them
    returned a model whose outputs had changed (as did x.mean((2, 3)) read by y.size(1))."""
    class CountRead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.conv(x))
            if read == "of the view":
                v = x.view(x.size(0), x.size(1), -1)
                return self.head(v.mean(-1)) * v.size(1)
            y = x.mean((2, 3))
            return self.head(y) * y.size(1)

    model = CountRead().eval()
    zero_rows_(model.conv, [1, 4])
    x = torch.randn(2, 3, 5, 4)
    for result in (shrink(model, x), shrink(model)):
        assert result.model.conv.out_channels == 6
        assert dict(result.report.kept)["conv"].endswith("count is read (call_method size) where the width would "
                                                         "change")
        torch.testing.assert_close(outputs(result.model, x), outputs(model, x))


@pytest.mark.parametrize("pool", ["mean", "view"])
def test_a_residual_stream_pooled_through_a_channel_reading_view_loses_its_groups_zero_channels(pool) -> None:
    """The view form kept every channel of the group ("its output meets another tensor in add"), and the
    pipeline's group pruning refused the model."""
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
            self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
            self.head = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn1(self.conv1(x)))
            x = x + self.bn2(self.conv2(x))
            return self.head(x.mean((2, 3)) if pool == "mean" else x.view(x.size(0), x.size(1), -1).mean(-1))

    torch.manual_seed(0)
    model = Residual().eval()
    for conv, norm in ((model.conv1, model.bn1), (model.conv2, model.bn2)):
        randomise_batch_norm_(norm, torch.Generator().manual_seed(0))
        zero_rows_(conv, [1, 4])
        with torch.no_grad():
            norm.weight[[1, 4]], norm.bias[[1, 4]] = 0.0, 0.0
    x = torch.randn(2, 3, 5, 4)
    assert removable_channels(model)["conv1"] is None and removable_channels(model)["conv2"] is None
    result = shrink(model, x)
    assert result.model.conv1.out_channels == result.model.conv2.out_channels == result.model.head.in_features == 4
    torch.testing.assert_close(outputs(result.model, x), outputs(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("swap", [lambda h: h.transpose(1, 2), lambda h: h.permute(0, 2, 1)],
                         ids=["transpose", "permute"])
def test_a_flatten_of_a_conv1d_output_moved_channels_last_keeps_the_channels_it_interleaves(swap) -> None:
    """(batch, length, channels) flattened puts channel j at columns l * C + j: shrink is not to take it as the
    flatten of pooled (batch, channels), which changes nothing (it removed the wrong columns, and failed its own
    check of the outputs)."""
    class ChannelsLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv1d(3, 8, 3, padding=1), nn.Linear(48, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(swap(torch.relu(self.conv(x))), 1))

    torch.manual_seed(0)
    model, x = ChannelsLast().eval(), torch.randn(5, 3, 6)
    zero_rows_(model.conv, [1, 4, 6])
    expected = outputs(model, x)
    result = shrink(model, x)
    torch.testing.assert_close(outputs(result.model, x), expected)
    ((name, why),) = result.report.kept
    assert name == "conv" and "flatten, which shrink does not see through" in why


@pytest.mark.parametrize("reduce", [lambda x: x.sum((2, 3)), lambda x: x.mean((1, 2)), lambda x: x.mean(2)])
def test_a_reduction_that_is_no_global_pool_keeps_the_channels(reduce) -> None:
    class Reduced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(2, 4, 1), nn.LazyLinear(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(reduce(self.conv(x)).flatten(1))

    model = Reduced().eval()
    outputs(model, torch.randn(1, 2, 4, 4))  # sizes the lazy head
    zero_rows_(model.conv, [1])
    reason = channel_plan(model).reasons["conv"]
    assert reason is not None and "does not see through" in reason


class PReLUConvNet(nn.Module):
    """conv -> BatchNorm -> PReLU with a slope per channel -> conv -> BatchNorm -> PReLU with one slope (reused) ->
    1x1 conv -> mean pool -> Linear (MobileFaceNet-style activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.PReLU(16)
        self.conv2, self.bn2, self.act = nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.PReLU()
        self.conv3, self.head = nn.Conv2d(24, 8, 1), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.head(self.act(self.conv3(x)).mean((2, 3)))


@settings(max_examples=20, deadline=None)
@given(dead1=st.sets(st.integers(0, 15), max_size=15), dead2=st.sets(st.integers(0, 23), max_size=23),
       seed=st.integers(0, 99))
def test_prelu_slopes_go_with_their_channels(dead1, dead2, seed) -> None:
    torch.manual_seed(seed)
    model = PReLUConvNet().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        model.act1.weight.uniform_(0.0, 0.5)
        for conv, bn, dead in ((model.conv1, model.bn1, dead1), (model.conv2, model.bn2, dead2)):
            rows = sorted(dead)
            conv.weight[rows] = 0
            if conv.bias is not None:
                conv.bias[rows] = 0
            bn.weight[rows], bn.bias[rows] = 0, 0  # zero through the BatchNorm: removable through a padded conv
    x = torch.randn(4, 3, 8, 8)
    result = shrink(model, x)
    assert result.model.conv1.out_channels == 16 - len(dead1) == result.model.act1.num_parameters
    assert result.model.conv2.out_channels == 24 - len(dead2)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_prelu_after_a_linear_layer_loses_its_channels_only_where_example_inputs_show_a_2d_input() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.PReLU(16), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[:3], model[0].bias[:3] = 0, 0
        model[1].weight.uniform_(0.1, 0.5)
    result = shrink(model)  # no inputs: dim 1 is the features only for a 2-d input, a rank the graph does not tell
    assert "slopes apply to dim 1, which shrink knows to be the channels only after a conv" in dict(
        result.report.kept)["0"]
    x = torch.randn(2, 8)
    result = shrink(model, x)  # (batch, features): the slopes are per feature, and go with their channels
    assert result.model[0].out_features == result.model[1].num_parameters == 13
    torch.testing.assert_close(result.model(x), model(x))
    single = nn.Sequential(nn.Linear(8, 16), nn.PReLU(), nn.Linear(16, 4)).eval()  # one slope: per element
    with torch.no_grad():
        single[0].weight[:3], single[0].bias[:3] = 0, 0
    assert shrink(single, torch.randn(2, 8)).model[0].out_features == 13


class TokenBatchNorm(nn.Module):
    """BatchNorm1d over the tokens of a (batch, tokens, features) input: dim 1 is not the Linear layer's features."""

    def __init__(self, tokens: int = 5, residual: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)
        self.norm, self.residual = nn.BatchNorm1d(tokens), residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.a(x) + self.b(x) if self.residual else self.a(x)
        return self.out(F.relu(self.norm(hidden)))


@pytest.mark.parametrize("residual", [False, True], ids=["chain", "residual group"])
def test_a_batch_norm_over_a_linear_layers_tokens_keeps_its_channels(residual) -> None:
    model = TokenBatchNorm(residual=residual).eval()
    randomise_batch_norm_(model.norm, torch.Generator().manual_seed(0))
    zero_rows_(model.a, list(range(6)))
    zero_rows_(model.b, list(range(6)))
    x = torch.randn(3, 5, 8)
    result = shrink(model, x)  # used to fail inside F.batch_norm (5 statistics for 16 channels)
    assert result.report.layers == ()
    if not residual:
        assert "normalises 5 entries of dim 1, not its 16 channels" in dict(result.report.kept)["a"]
    torch.testing.assert_close(result.model(x), model(x))
    # the same layers on 2-d inputs: BatchNorm1d normalises the features, and the zero rows leave
    flat = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    randomise_batch_norm_(flat[1], torch.Generator().manual_seed(1))
    zero_rows_(flat[0], list(range(6)))
    assert shrink(flat, torch.randn(3, 8)).model[0].out_features == 10


def test_a_batch_norm_after_a_linear_layer_is_trusted_only_where_example_inputs_show_a_2d_input() -> None:
    """As many tokens as features: without example inputs the BatchNorm1d over the tokens was narrowed, and the
    shrunk model failed at its first call (running_mean should contain 16 elements not 10)."""
    model = TokenBatchNorm(tokens=16).eval()
    randomise_batch_norm_(model.norm, torch.Generator().manual_seed(0))
    zero_rows_(model.a, list(range(6)))
    x = torch.randn(3, 16, 8)
    result = shrink(model)
    assert result.report.layers == ()
    assert "features only for a 2-d input, which shrink knows given example inputs" in dict(result.report.kept)["a"]
    torch.testing.assert_close(result.model(x), model(x))
    assert shrink(model, x).report.layers == ()  # the inputs show the tokens
    flat = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    randomise_batch_norm_(flat[1], torch.Generator().manual_seed(1))
    zero_rows_(flat[0], list(range(6)))
    assert shrink(flat).model[0].out_features == 16  # a rank shrink cannot know
    assert shrink(flat, torch.randn(3, 8)).model[0].out_features == 10
    # the planning functions take the inputs too (they lost such BatchNorms, with no way to tell them the rank)
    assert following_batch_norms(flat) == {} and following_batch_norms(flat, example_inputs=torch.randn(3, 8)) == \
        {"0": ["1"]}
    assert removable_channels(flat, example_inputs=torch.randn(3, 8))["0"] is None


class TokenPooling(nn.Module):
    """A sequence classifier: a feed-forward layer on every token, its features pooled over the tokens, a head."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        self.ff, self.head, self.pool = nn.Linear(8, 16), nn.Linear(16, 3), pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.ff(x))
        if self.pool == "mean":
            pooled = hidden.mean(1)
        elif self.pool == "mean keepdim":
            pooled = hidden.mean(dim=-2, keepdim=True).squeeze(1)
        elif self.pool == "amax":
            pooled = torch.amax(hidden, dim=1)
        elif self.pool == "class token":
            pooled = hidden[:, 0]
        elif self.pool == "class token, all features":
            pooled = hidden[:, 0, :]
        elif self.pool == "tokens as a batch":  # no pooling: every token classified
            pooled = hidden.unsqueeze(1).flatten(0, 2)
        else:  # "over the features": what the same code does to a 2-d input
            pooled = hidden.mean(1, keepdim=True).expand(-1, 16)
        return self.head(pooled)


@pytest.mark.parametrize("pool", ["mean", "mean keepdim", "amax", "class token", "class token, all features",
                                  "tokens as a batch"])
def test_a_linear_layer_whose_tokens_are_pooled_loses_its_zero_channels_given_example_inputs(pool) -> None:
    torch.manual_seed(0)
    model = TokenPooling(pool).eval()
    zero_rows_(model.ff, [1, 4, 9])
    x = torch.randn(3, 5, 8)
    assert "does not see through" in dict(shrink(model).report.kept)["ff"]  # no ranks without inputs
    result = shrink(model, x)
    assert (result.model.ff.out_features, result.model.head.in_features) == (13, 13)
    torch.testing.assert_close(result.model(x), model(x))
    other_length = torch.randn(2, 7, 8)  # another sequence length: the pooled constants do not depend on it
    torch.testing.assert_close(result.model(other_length), model(other_length))


class WeightedPooling(nn.Module):
    """A sequence classifier whose token features are pooled with weights per token: attention pooling (the weights
    scored from the features themselves, by a Linear layer), a padding mask, a plain sum; and, as a control,
    weights that vary over the features too."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        self.ff, self.score, self.head, self.pool = nn.Linear(8, 16), nn.Linear(16, 1), nn.Linear(16, 3), pool

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.ff(x))
        weights = torch.softmax(self.score(hidden).squeeze(-1).masked_fill(mask == 0, -1e9), dim=1)
        if self.pool == "attention":
            pooled = (weights.unsqueeze(-1) * hidden).sum(1)
        elif self.pool == "attention bmm":
            pooled = torch.bmm(weights.unsqueeze(1), hidden).squeeze(1)
        elif self.pool == "masked mean":
            keep = mask.unsqueeze(-1).float()
            pooled = torch.sum(hidden * keep, dim=1) / keep.sum(1)
        elif self.pool == "sum":
            pooled = hidden.sum(dim=-2)
        else:  # "per feature": weights over the features too, which can turn a zero feature's zeros into others
            pooled = (hidden * torch.softmax(hidden, dim=-1)).sum(1)
        return self.head(pooled)


@settings(max_examples=30, deadline=None)
@given(pool=st.sampled_from(["attention", "attention bmm", "masked mean", "sum"]),
       zero=st.sets(st.integers(0, 15), max_size=15), biased=st.sets(st.integers(0, 15)), seed=st.integers(0, 2**16))
def test_features_pooled_with_weights_per_token_leave_when_exactly_zero(pool, zero, biased, seed) -> None:
    torch.manual_seed(seed)
    model = WeightedPooling(pool).eval()
    zero_rows_(model.ff, sorted(zero))
    with torch.no_grad():  # a zero row whose ReLU(bias) is zero outputs zero; another outputs a constant, which a
        model.ff.bias.copy_(torch.tensor([1.0 if i in biased else -1.0 for i in range(16)]))  # weighting varies
    mask = (torch.arange(7) < torch.tensor([[7], [3], [5]])).long()
    x = torch.randn(3, 7, 8)
    result = shrink(model, (x, mask))
    removed = len(zero - biased)
    assert (result.model.ff.out_features, result.model.score.in_features, result.model.head.in_features) == (
        16 - removed,) * 3
    torch.testing.assert_close(result.model(x, mask), model(x, mask), rtol=0, atol=1e-5)
    shorter = (torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.long))  # other lengths
    torch.testing.assert_close(result.model(*shorter), model(*shorter), rtol=0, atol=1e-5)


def test_features_weighted_per_feature_keep_their_channels() -> None:
    model = WeightedPooling("per feature").eval()
    zero_rows_(model.ff, [1, 4])
    with torch.no_grad():
        model.ff.bias.fill_(-1.0)  # zero features: a softmax over the features still reads them
    result = shrink(model, (torch.randn(3, 7, 8), torch.ones(3, 7, dtype=torch.long)))
    assert "ff" in dict(result.report.kept) and result.model.ff.out_features == 16


def test_a_reduction_over_a_2d_outputs_features_keeps_its_channels() -> None:
    model = TokenPooling("over the features").eval()
    zero_rows_(model.ff, [1, 4, 9])
    result = shrink(model, torch.randn(3, 8))  # 2-d: mean(1) averages the features themselves
    assert result.report.layers == () and "does not see through" in dict(result.report.kept)["ff"]
    flattened = nn.Sequential(nn.Linear(8, 16), nn.Flatten(), nn.Linear(5 * 16, 3)).eval()  # tokens x features
    zero_rows_(flattened[0], [1, 4, 9])
    result = shrink(flattened, torch.randn(3, 5, 8))
    assert result.report.layers == () and "does not see through" in dict(result.report.kept)["0"]


def test_a_batch_norm_over_as_many_tokens_as_features_is_told_apart_by_the_example_inputs() -> None:
    model = TokenBatchNorm(tokens=16).eval()  # 16 tokens, 16 features: the widths agree
    randomise_batch_norm_(model.norm, torch.Generator().manual_seed(0))
    zero_rows_(model.a, list(range(6)))
    x = torch.randn(3, 16, 8)
    result = shrink(model, x)
    assert result.report.layers == ()
    assert "normalises dim 1 of its 3-d output (the tokens)" in dict(result.report.kept)["a"]
    torch.testing.assert_close(result.model(x), model(x))


class ClampNet(nn.Module):
    """Activations written as clamps (ReLU6 as ``torch.clamp(x, 0, 6)``, ``x.clamp(min=0)``, ``.clip(max=3)``) and
    an in-place ``F.relu_``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.fc1, self.fc2 = nn.Conv2d(16, 16, 1), nn.Linear(16, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(self.bn1(self.conv1(x)), 0, 6)
        x = self.conv2(x).clamp(min=0).mean((2, 3))
        return self.fc2(F.relu_(self.fc1(x)).clip(max=3))


def test_clamps_are_element_wise_and_constant_channels_fold_through_them() -> None:
    torch.manual_seed(0)
    model = ClampNet().eval()
    with torch.no_grad():
        model.conv1.weight[:4], model.conv1.bias[:4], model.bn1.weight[:4], model.bn1.bias[:4] = 0, 0, 0, 0
        model.conv2.weight[:3], model.conv2.bias[:3] = 0, 1.0  # constant 1 -> clamp -> mean: folded into fc1
        model.fc1.weight[:7] = 0  # constant bias -> relu_ -> clip: folded into fc2
    x = torch.randn(2, 3, 6, 6)
    result = shrink(model, x)
    assert [(layer.name, layer.channels_after, layer.folded) for layer in result.report.layers] == [
        ("conv1", 12, 0), ("conv2", 13, 3), ("fc1", 25, int((model.fc1.bias[:7] > 0).sum()))]
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


class HandWrittenSwish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class SelfGatedNet(nn.Module):
    """Swish written as ``x * torch.sigmoid(x)`` (older EfficientNet code) after a conv, and ``torch.tanh(h) * h``
    after a Linear layer; the last product multiplies two different layers' outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), HandWrittenSwish()
        self.conv2, self.fc1, self.fc2 = nn.Conv2d(16, 8, 1), nn.Linear(8, 32), nn.Linear(32, 5)
        self.side = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.act(self.bn1(self.conv1(x)))).mean((2, 3))
        h = self.fc1(x)
        return self.fc2(torch.tanh(h) * h) * self.side(x)


def test_a_product_of_a_channel_with_an_element_wise_function_of_itself_is_element_wise() -> None:
    torch.manual_seed(0)
    model = SelfGatedNet().eval()
    with torch.no_grad():
        model.conv1.weight[:4], model.conv1.bias[:4], model.bn1.weight[:4], model.bn1.bias[:4] = 0, 0, 0, 0
        model.fc1.weight[:6] = 0  # constant bias -> tanh(b) * b: folded into fc2
        model.fc2.weight[:2], model.fc2.bias[:2] = 0, 0  # fc2's output meets side's: its zero channels stay
    x = torch.randn(2, 3, 6, 6)
    result = shrink(model, x)
    assert [(layer.name, layer.channels_after) for layer in result.report.layers] == [("conv1", 12), ("fc1", 26)]
    assert "meets another tensor" in dict(result.report.kept)["fc2"]
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_compiled_model_is_shrunk_as_an_eager_copy_and_traced_only_with_a_hint() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[:5], model[0].bias[:5] = 0, 0
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(3, 8)
    result = shrink(compiled, x)
    assert result.model[0].out_features == 11 and isinstance(result.model, nn.Sequential)
    with pytest.raises(ValueError, match=r"torch.compile'd: the model; trace the eager module, `._orig_mod`"):
        channel_plan(compiled)


def test_lazy_layers_take_their_shapes_from_the_example_inputs():
    """A model with nn.LazyLinear never called: shrink runs its copy once on the example inputs, so the lazy layers
    get their weights (before: "Attempted to use an uninitialized parameter"); without inputs, it says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"0\.weight, 0\.bias belong to lazy layers never called.*example_inputs"):
        shrink(model)
    result = shrink(model, x)
    assert (result.model[0].in_features, result.model[0].out_features) == (6, 8)  # random weights: none removed
    assert torch.nn.parameter.is_lazy(model[0].weight)  # the model as given


@pytest.mark.parametrize("affine", [True, False])
def test_a_lazy_batch_norm_never_called_takes_its_shape_from_the_example_inputs(affine):
    """Its statistics are uninitialized buffers, which torch's deepcopy refuses: shrink's copy failed ("Attempted to use
    an uninitialized parameter")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LazyBatchNorm2d(affine=affine), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    with pytest.raises(ValueError, match=r"1\.(weight|running_mean).* belong to lazy layers never called"):
        shrink(model)
    result = shrink(model, torch.randn(2, 3, 8, 8))
    assert result.model[1].running_mean.shape == (8,)
    assert torch.nn.parameter.is_lazy(model[1].running_mean)  # the model as given


class _ScriptedConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 3)
        self.c2 = torch.jit.script(nn.Conv2d(8, 8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def test_a_torchscript_consumer_is_named_as_the_reason_its_producer_keeps_its_channels():
    """fx records its call as `c2._c.forward(x)`: the reason said "its output meets another tensor", and none did."""
    torch.manual_seed(0)
    model = _ScriptedConsumer().eval()
    with torch.no_grad():
        model.c1.weight[[1, 3]] = 0
        model.c1.bias[[1, 3]] = 0
    x = torch.randn(2, 3, 8, 8)
    result = shrink(model, x)
    assert result.model.c1.out_channels == 8
    assert dict(result.report.kept)["c1"] == "its consumer c2 is a TorchScript module, which shrink does not see into"
    torch.testing.assert_close(result.model(x), model(x))


class FlaggedMLP(nn.Module):
    """Flags read by Python ``if``s, as user models have them (fx cannot trace those symbolically): the features
    returned on request, an optional scale before the head, and an embedding path through a layer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 4)
        self.proj = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor, return_features: bool = False, *, scale: bool = False,
                embed: bool = False) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if embed:
            return self.proj(h)
        h = torch.relu(self.b(h))
        if return_features:
            return h
        return self.c(h * 2 if scale else h)


class DefaultPathMLP(FlaggedMLP):
    """The same layers, one flag that only rescales the output: every path takes each layer's output the same way."""

    def forward(self, x: torch.Tensor, *, log_probs: bool = False) -> torch.Tensor:
        logits = self.c(torch.relu(self.b(torch.relu(self.a(x)))) / 3)
        return logits.log_softmax(-1) if log_probs else logits


FLAG_COMBINATIONS = [dict(return_features=f, scale=s, embed=e) for f in (False, True) for s in (False, True)
                     for e in (False, True)]


@settings(max_examples=25, deadline=None)
@given(dead_a=st.sets(st.integers(0, 15), max_size=16), dead_b=st.sets(st.integers(0, 11), max_size=12),
       seed=st.integers(0, 2**16))
def test_a_forward_with_flags_keeps_every_flags_function_and_loses_channels_only_where_all_paths_agree(
        dead_a, dead_b, seed) -> None:
    torch.manual_seed(seed)
    model = DefaultPathMLP().eval()
    zero_rows_(model.a, sorted(dead_a))
    zero_rows_(model.b, sorted(dead_b))
    x = torch.randn(5, 8)
    result = shrink(model, x)
    # every path agrees: each layer's zero rows go, their constants folded through `/ 3` into the next layer
    assert (result.model.a.out_features, result.model.b.out_features) == (
        max(16 - len(dead_a), 1), max(12 - len(dead_b), 1))
    for log_probs in (False, True):
        torch.testing.assert_close(result.model(x, log_probs=log_probs), model(x, log_probs=log_probs),
                                   rtol=1e-4, atol=1e-5)

    flagged = FlaggedMLP().eval()
    flagged.load_state_dict(model.state_dict(), strict=False)
    zero_rows_(flagged.proj, [0])
    result = shrink(flagged, x)
    kept = dict(result.report.kept)
    # a: read by proj with embed=True; b: returned with return_features=True, scaled with scale=True
    assert result.model.a.out_features == 16 and result.model.b.out_features == 12
    if dead_a:
        assert kept["a"] == "with forward's embed=True, its output takes another way to proj"
    if dead_b:
        assert kept["b"].startswith("with forward's ")
    assert kept["proj"].startswith("forward calls it only with embed=True")
    for flags in FLAG_COMBINATIONS:
        torch.testing.assert_close(result.model(x, flags["return_features"], scale=flags["scale"],
                                                embed=flags["embed"]),
                                   flagged(x, flags["return_features"], scale=flags["scale"], embed=flags["embed"]))


def test_the_channel_plan_of_a_forward_with_flags_says_which_path_keeps_each_layer() -> None:
    plan = channel_plan(FlaggedMLP())
    assert plan.reasons == {
        "a": "with forward's embed=True, its output takes another way to proj",
        "b": "with forward's scale=True, its output takes other ops to c",
        "c": "it produces the model's output, whose width is part of the model's interface",
        "proj": "forward calls it only with embed=True, and shrink narrows layers along forward's default path",
    }
    assert channel_plan(DefaultPathMLP()).removable() == {
        "a": None, "b": None, "c": "it produces the model's output, whose width is part of the model's interface",
        "proj": "forward does not call it (as torch.fx traces forward)"}


class OptionalLabels(nn.Module):
    """Hugging Face's pattern: ``labels=None`` returns the logits and the features, given labels the loss. fx traces
    ``labels is None`` as False (its proxy is not None), so its one trace is the loss path, not inference's."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        features = torch.relu(self.body(x))
        logits = self.head(features)
        if labels is None:
            return logits, features
        return F.cross_entropy(logits, labels)


class OptionalMask(nn.Module):
    """An optional argument that every path takes through the layers the same way: the layers still narrow."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head(torch.relu(self.body(x)))
        if mask is not None:
            logits = logits.masked_fill(mask, 0.0)
        return logits


@pytest.mark.parametrize("with_inputs", [False, True])
def test_an_optional_argument_left_out_is_the_path_shrink_keeps(with_inputs) -> None:
    torch.manual_seed(0)
    model = OptionalLabels().eval()
    zero_rows_(model.body, [0, 3, 5])
    x, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    result = shrink(model, x if with_inputs else None)
    assert result.model.body.out_features == 8  # the default path returns its features
    assert dict(result.report.kept)["body"].endswith("part of the model's interface")
    for got, want in zip(result.model(x), model(x)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(result.model(x, labels), model(x, labels))

    masked = OptionalMask().eval()
    zero_rows_(masked.body, [0, 3, 5])
    mask = torch.rand(4, 3) > 0.5
    result = shrink(masked, x if with_inputs else None)
    assert result.model.body.out_features == 5
    torch.testing.assert_close(result.model(x), masked(x))
    torch.testing.assert_close(result.model(x, mask), masked(x, mask))


class ManyFlags(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x, f1=False, f2=False, f3=False, f4=False, f5=False):
        return self.a(x) if f1 or f2 or f3 or f4 or f5 else x


def test_a_forward_with_more_flags_than_are_traced_in_all_combinations_is_refused_with_fxs_message() -> None:
    with pytest.raises(ValueError, match="symbolically traced variables cannot be used as inputs to control flow"):
        shrink(ManyFlags(), torch.randn(2, 4))


class ScaledNet(nn.Module):
    """A layer's output scaled or shifted by numbers, as ``x * self.scale`` or ``x / math.sqrt(d)``."""

    def __init__(self, op) -> None:
        super().__init__()
        self.a, self.b, self.op = nn.Linear(6, 10), nn.Linear(10, 3), op

    def forward(self, x):
        return self.b(self.op(torch.relu(self.a(x))))


@pytest.mark.parametrize("op, passes", [
    (lambda h: h * 2.5, True), (lambda h: 2.5 * h, True), (lambda h: h / 3, True), (lambda h: h + 1, True),
    (lambda h: h - 0.5, True), (lambda h: h.mul(2), True), (lambda h: torch.add(h, 1), True),
    (lambda h: 1 - h, False), (lambda h: h ** 2, False), (lambda h: torch.add(h, 1, alpha=2), False),
])
def test_arithmetic_with_a_number_is_element_wise_and_constants_fold_through_it(op, passes) -> None:
    torch.manual_seed(0)
    model = ScaledNet(op).eval()
    zero_rows_(model.a, [0, 3, 4])
    x = torch.randn(7, 6)
    result = shrink(model, x)
    assert result.model.a.out_features == (7 if passes else 10)
    if not passes:
        assert "does not see through" in dict(result.report.kept)["a"]
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


class OptionalMaskMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h if mask is None else h * mask)


def test_example_inputs_the_traced_graph_cannot_run_on_leave_no_traceback_on_stderr(capfd) -> None:
    """fx traces the mask path (a Proxy is not None), which the example inputs (no mask) cannot run: the shapes are
    left out, silently (ShapeProp printed the failing node's traceback)."""
    model = OptionalMaskMLP().eval()
    zero_rows_(model.a, [0, 1])
    x = torch.randn(3, 8)
    result = shrink(model, x)
    torch.testing.assert_close(result.model(x), model(x))
    assert "Traceback" not in capfd.readouterr().err


POOLED_HEADS = {
    "view of the pre-pool batch size": lambda pooled, maps: pooled.view(maps.size(0), -1),
    "reshape of its shape[0]": lambda pooled, maps: pooled.reshape(maps.shape[0], -1),
    "squeezes": lambda pooled, maps: pooled.squeeze(-1).squeeze(-1),
    "squeeze of dims 3, 2": lambda pooled, maps: torch.squeeze(pooled, 3).squeeze(2),
}


class PooledHeadCNN(nn.Module):
    def __init__(self, head: str) -> None:
        super().__init__()
        self.conv, self.fc, self.flatten = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 5), POOLED_HEADS[head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = F.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(self.flatten(F.adaptive_avg_pool2d(maps, 1), maps))


@pytest.mark.parametrize("head", list(POOLED_HEADS))
def test_a_conv_flattened_after_global_pooling_by_a_batch_size_view_or_squeezes_loses_its_zero_filters(head) -> None:
    torch.manual_seed(0)
    model = PooledHeadCNN(head).eval()
    with torch.no_grad():
        model.conv.weight[:3] = 0  # constants relu(bias): folded into fc
    x = torch.randn(2, 1, 8, 8)
    result = shrink(model, x)
    assert result.model.conv.out_channels == 5
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)
    if "squeeze" in head:  # without example inputs nothing tells that the squeezed dims are the pooled 1x1
        assert "squeeze" in dict(shrink(model).report.kept)["conv"]


class SqueezedMaps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).squeeze(2))  # (N, 8, 1, 8) -> (N, 8, 8): a spatial dim stays


def test_a_squeeze_of_maps_larger_than_one_keeps_the_channels() -> None:
    model = SqueezedMaps().eval()
    zero_rows_(model.conv, [0, 1])
    result = shrink(model, torch.randn(2, 1, 1, 8))
    assert "squeeze, which shrink does not see through" in dict(result.report.kept)["conv"]
    assert "pass example_inputs" not in dict(result.report.kept)["conv"]  # the shapes were known: no hint


class PooledAudio(nn.Module):
    """A 1-d CNN on waveforms, as audio classifiers write its head: an adaptive pool to one step, then squeeze."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(1, 8, 9, stride=2, padding=4), nn.Conv1d(8, 16, 9, stride=2, padding=4)
        self.pool, self.fc = nn.AdaptiveMaxPool1d(1), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x))))).squeeze(-1))


def test_removable_channels_takes_example_inputs_for_the_chains_that_need_shapes() -> None:
    """Only the shapes tell that the pool left one step for squeeze(-1) to drop: without inputs removable_channels
    said conv2 keeps its channels (with no way to give it the inputs); now it says to pass them, and with them it
    agrees with shrink."""
    model = PooledAudio().eval()
    x = torch.randn(3, 1, 64)
    without = removable_channels(model)["conv2"]
    assert without is not None and "squeeze" in without and "pass example_inputs" in without
    assert removable_channels(model, example_inputs=x)["conv2"] is None
    zero_rows_(model.conv2, [2, 5, 11])
    result = shrink(model, x)
    assert (result.model.conv2.out_channels, result.model.fc.in_features) == (13, 13)
    torch.testing.assert_close(result.model(x), model(x))


SE_FORMS = {  # hand-written squeeze-and-excitation layers with Linear layers, as SENet implementations write them
    "view(b, c), view(b, c, 1, 1), expand_as": lambda x, fc: x * fc(F.adaptive_avg_pool2d(x, 1).view(
        x.size(0), x.size(1))).view(x.size(0), x.size(1), 1, 1).expand_as(x),
    "b, c = size(); view(b, -1); broadcast": lambda x, fc: _unpacked_se(x, fc),
    "flatten(1), unsqueeze(-1) twice": lambda x, fc: x * fc(F.adaptive_avg_pool2d(x, 1).flatten(1)).unsqueeze(
        -1).unsqueeze(-1),
}


def _unpacked_se(x: torch.Tensor, fc: nn.Module) -> torch.Tensor:
    b, c, _, _ = x.size()
    return x * fc(F.adaptive_avg_pool2d(x, 1).view(b, -1)).view(b, c, 1, 1)


class LinearSENet(nn.Module):
    def __init__(self, form: str, reduction: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Sequential(nn.Linear(16, 16 // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(16 // reduction, 16, bias=False), nn.Sigmoid())
        self.conv2, self.head = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 5)
        self.se = SE_FORMS[form]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.se(torch.relu(self.bn1(self.conv1(x))), self.fc)
        return self.head(torch.relu(self.conv2(h)).mean((2, 3)))


@pytest.mark.parametrize("form", list(SE_FORMS))
@settings(max_examples=5, deadline=None)
@given(dead=st.sets(st.integers(0, 15), min_size=1, max_size=15), seed=st.integers(0, 2**16))
def test_a_squeeze_and_excitation_of_linear_layers_loses_the_zero_channels_it_gates(form, dead, seed) -> None:
    """The classic SENet layer (pooled, reshaped with the sizes of its input, two Linear layers, a sigmoid, reshaped
    back) ended the chain: its view read the input's channel count ('another tensor')."""
    torch.manual_seed(seed)
    model = LinearSENet(form).eval()
    randomise_batch_norm_(model.bn1, torch.Generator().manual_seed(seed))
    with torch.no_grad():  # zero channels (the pipeline's zero_batch_norm holds their BatchNorm at zero)
        rows = sorted(dead)
        model.conv1.weight[rows], model.conv1.bias[rows], model.bn1.weight[rows], model.bn1.bias[rows] = 0, 0, 0, 0
    x = torch.randn(2, 3, 6, 6)
    result = shrink(model, x)
    assert (result.model.conv1.out_channels, result.model.fc[0].in_features, result.model.fc[2].out_features,
            result.model.conv2.in_channels) == (16 - len(dead),) * 4
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_squeeze_and_excitation_reshaped_with_a_written_width_keeps_its_channels() -> None:
    model = LinearSENet("flatten(1), unsqueeze(-1) twice").eval()
    model.se = lambda x, fc: x * fc(F.adaptive_avg_pool2d(x, 1).view(-1, 16)).view(-1, 16, 1, 1)
    zero_rows_(model.conv1, [0, 1])
    assert "conv1" in dict(shrink(model, torch.randn(2, 3, 6, 6)).report.kept)


SIZED_POOLS = {  # global pooling whose kernel is read from the maps' spatial sizes (DenseNet and CIFAR-ResNet code)
    "avg_pool2d(x, x.size()[2:])": lambda h: F.avg_pool2d(h, h.size()[2:]).flatten(1),
    "avg_pool2d(x, x.size(3))": lambda h: F.avg_pool2d(h, h.size(3)).view(h.size(0), -1),
    "max_pool2d(x, kernel_size=x.shape[-2:])": lambda h: F.max_pool2d(h, kernel_size=h.shape[-2:]).flatten(1),
}


class SizedPoolCNN(nn.Module):
    def __init__(self, pool) -> None:
        super().__init__()
        self.conv, self.bn, self.fc, self.pool = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 5), pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))))


@pytest.mark.parametrize("pool", list(SIZED_POOLS))
def test_a_global_pool_whose_kernel_is_read_from_the_spatial_sizes_passes_constant_channels(pool) -> None:
    torch.manual_seed(0)
    model = SizedPoolCNN(SIZED_POOLS[pool]).eval()
    randomise_batch_norm_(model.bn, torch.Generator().manual_seed(0))
    zero_rows_(model.conv, [1, 4, 6])  # constants through BatchNorm and ReLU: folded into fc
    x = torch.randn(2, 1, 8, 8)
    result = shrink(model, x)
    assert result.model.conv.out_channels == 5
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_pool_whose_kernel_reads_the_channel_count_keeps_the_channels() -> None:
    model = SizedPoolCNN(lambda h: F.avg_pool2d(h, h.size(1) // 2).flatten(1)).eval()  # 8 channels: a 4x4 kernel
    model.fc = nn.Linear(8 * 4, 5)
    zero_rows_(model.conv, [1, 4, 6])
    assert "channel count is read" in dict(shrink(model, torch.randn(2, 1, 8, 8)).report.kept)["conv"]


class ExpandedScaleNet(nn.Module):
    """A learned per-channel scale expanded to the maps (``gamma.expand_as(x)``): it has the conv's width, so the
    conv keeps its channels (only a gate's own expand_as passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 5)
        self.gamma = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc((h * self.gamma.expand_as(h)).mean((2, 3)))


class ViewedAsNet(ExpandedScaleNet):
    """A parameter reshaped to the maps' shape (``w.view_as(h)``) and read on its own: it holds the conv's width."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2 * 8 * 6 * 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.mean((2, 3))) + self.w.view_as(h).mean()


@pytest.mark.parametrize("cls", [ExpandedScaleNet, ViewedAsNet])
def test_a_tensor_expanded_or_viewed_as_the_maps_outside_a_gate_keeps_the_channels(cls) -> None:
    model = cls().eval()
    zero_rows_(model.conv, [0, 1])
    x = torch.randn(2, 1, 6, 6)
    result = shrink(model, x)
    assert result.model.conv.out_channels == 8 and "conv" in dict(result.report.kept)
    torch.testing.assert_close(result.model(x), model(x))


@pytest.mark.parametrize("op", [lambda h: h.contiguous(), lambda h: h.float(), lambda h: h.to(torch.float32),
                                lambda h: h.clone(), lambda h: h.detach()],
                         ids=["contiguous", "float", "to(float32)", "clone", "detach"])
def test_copies_and_casts_keep_every_value_and_pass_constant_channels(op) -> None:
    torch.manual_seed(0)
    model = ScaledNet(op).eval()
    zero_rows_(model.a, [0, 3, 4])
    x = torch.randn(7, 6)
    result = shrink(model, x)
    assert result.model.a.out_features == 7
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


class SizedUpsamplingUNet(nn.Module):
    """A U-Net level whose decoder upsamples to its skip's size, ``F.interpolate(b, size=a.shape[2:])`` (odd input
    sizes): the size read of the skip `a`, which `b` derives from, counted as another tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.e1, self.e2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.d1, self.out = nn.Conv2d(16 + 8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.e1(x))
        b = torch.relu(self.e2(F.max_pool2d(a, 2)))
        up = F.interpolate(b, size=a.shape[2:], mode="nearest")
        return self.out(torch.relu(self.d1(torch.cat([up, a], 1))))


def test_a_decoder_upsampled_to_its_skips_size_loses_its_zero_channels() -> None:
    torch.manual_seed(0)
    model = SizedUpsamplingUNet().eval()
    with torch.no_grad():
        model.e2.weight[:5], model.e2.bias[:5], model.e1.weight[:2], model.e1.bias[:2] = 0, 0, 0, 0
    x = torch.randn(2, 1, 9, 9)  # odd: the upsampled maps are cut to the skip's size
    result = shrink(model, x)
    assert (result.model.e1.out_channels, result.model.e2.out_channels, result.model.d1.in_channels) == (6, 11, 17)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


class FlagAndDataDependentBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:  # data-dependent: no flag value makes this traceable
            h = h * 2
        return h if return_features else h + 1


def test_a_forward_untraceable_with_its_flags_held_too_is_refused_once_with_fxs_message() -> None:
    with pytest.raises(ValueError) as error:
        shrink(FlagAndDataDependentBranch(), torch.randn(2, 4))
    message = str(error.value)
    assert message.count("symbolically traced variables cannot be used as inputs to control flow") == 1
    assert "(also with forward's flags held at return_features=False)" in message


class ChannelCountOffTheChain(nn.Module):
    """The maps' channel count read for a tensor that never meets them again (a second output): narrowing the conv
    would change it, though no op on the conv's way to its consumer reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 5)
        self.codes = nn.Parameter(torch.randn(8, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.conv(x))
        b, c, _, _ = h.size()
        return self.fc(h.mean((2, 3))), self.codes[:c].sum(0).expand(b, 3)


def test_a_channel_count_read_off_the_chain_keeps_the_channels() -> None:
    model = ChannelCountOffTheChain().eval()
    zero_rows_(model.conv, [0, 1])
    x = torch.randn(2, 1, 6, 6)
    result = shrink(model, x)
    assert result.model.conv.out_channels == 8
    assert dict(result.report.kept)["conv"].startswith("its channel count is read")
    for shrunk, original in zip(result.model(x), model(x)):
        torch.testing.assert_close(shrunk, original)


class UnpackedSizesNet(nn.Module):
    """``b, c, _, _ = h.size()`` with only the batch size used (``view(b, -1)`` after pooling): no channel read."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        b, c, _, _ = h.size()
        return self.fc(F.adaptive_avg_pool2d(h, 1).view(b, -1))


def test_sizes_unpacked_whose_channel_count_is_never_used_let_the_channels_go() -> None:
    model = UnpackedSizesNet().eval()
    zero_rows_(model.conv, [0, 1, 2])
    x = torch.randn(2, 1, 6, 6)
    result = shrink(model, x)
    assert result.model.conv.out_channels == 5
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


SKIP_OPS = {  # what lies on a U-Net's skip connection before the concatenation
    "PReLU per channel": lambda: nn.PReLU(6),
    "GroupNorm": lambda: nn.GroupNorm(2, 6),
    "InstanceNorm": lambda: nn.InstanceNorm2d(6, affine=True),
    "crop": lambda: nn.Identity(),
}


class SkipUNet(nn.Module):
    """An encoder conv, its output through `skip` into the concatenation with the upsampled decoder (cropped on
    both sides for "crop"). The concatenation's width was unreadable through these ops, so `up` kept its channels."""

    def __init__(self, skip: str) -> None:
        super().__init__()
        self.crop = skip == "crop"
        self.enc, self.skip = nn.Conv2d(2, 6, 3, padding=1), SKIP_OPS[skip]()
        self.down, self.up = nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ConvTranspose2d(8, 5, 2, stride=2)
        self.dec = nn.Conv2d(11, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.enc(x)
        u, s = self.up(torch.relu(self.down(a))), self.skip(a)
        if self.crop:
            u, s = u[:, :, 1:-1, 1:-1], s[..., 1:-1, 1:-1]
        return self.dec(torch.cat([u, s], dim=1))


@pytest.mark.parametrize("skip", list(SKIP_OPS))
def test_a_concatenation_reads_the_width_of_a_skip_through_per_channel_ops_and_crops(skip) -> None:
    torch.manual_seed(0)
    model = SkipUNet(skip).eval()
    assert removable_channels(model)["up"] is None
    with torch.no_grad():
        model.up.weight[:, [1, 3]] = 0   # a transposed conv's output channels are dim 1
        model.up.bias[[1, 3]] = 0
    x = torch.randn(2, 2, 8, 8)
    result = shrink(model, x)
    assert (result.model.up.out_channels, result.model.dec.in_channels) == (3, 9)
    torch.testing.assert_close(outputs(result.model, x), outputs(model, x), rtol=1e-5, atol=1e-5)


class Embedded(nn.Module):
    """Token ids -> an embedding -> (an activation, dropout) -> a Linear layer on every token, an LSTM, or a mean
    over the tokens into a Linear head."""

    def __init__(self, reader: str, activation: bool) -> None:
        super().__init__()
        self.reader, self.activation = reader, activation
        self.embed = nn.Embedding(30, 12, padding_idx=0)
        self.dropout = nn.Dropout(0.2)
        self.lstm = nn.LSTM(12, 6, batch_first=True) if reader == "lstm" else None
        self.head = nn.Linear(6 if reader == "lstm" else 12, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.embed(tokens))
        if self.activation:
            x = torch.tanh(x) + 1  # a zero dim becomes the constant 1, folded into the reader's bias
        if self.reader == "lstm":
            return self.head(self.lstm(x)[0][:, -1])
        return self.head(x.mean(1) if self.reader == "mean" else x)


@settings(max_examples=30, deadline=None)
@given(reader=st.sampled_from(["linear", "lstm", "mean"]), activation=st.booleans(),
       zero=st.sets(st.integers(0, 11), max_size=11), seed=st.integers(0, 2**16))
def test_an_embeddings_zero_dims_leave_it_and_its_reader(reader, activation, zero, seed) -> None:
    from litcompress import load_shrunk_state_dict

    torch.manual_seed(seed)
    model = Embedded(reader, activation).eval()
    with torch.no_grad():
        model.embed.weight[:, sorted(zero)] = 0
    tokens = torch.randint(0, 30, (4, 9))
    result = shrink(model, tokens)
    shrunk = result.model
    assert shrunk.embed.weight.shape == (30, 12 - len(zero)) and shrunk.embed.embedding_dim == 12 - len(zero)
    read = shrunk.lstm.weight_ih_l0.shape[1] if reader == "lstm" else shrunk.head.in_features
    assert read == 12 - len(zero) and result.report.channels_removed == len(zero)
    torch.testing.assert_close(shrunk(tokens), model(tokens), rtol=0, atol=1e-5)
    fresh = load_shrunk_state_dict(Embedded(reader, activation), shrunk.state_dict()).eval()
    torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=1e-5)


class EmbeddingKept(nn.Module):
    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.embed, self.position = nn.Embedding(30, 8), nn.Embedding(9, 8)
        self.head = nn.Linear(8, 30, bias=False)
        if case == "tied":
            self.head.weight = self.embed.weight  # a language model's output layer tied to its input embedding

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.case == "positions":
            x = x + self.position(torch.arange(tokens.size(1)))
        return x if self.case == "output" else self.head(x)


@pytest.mark.parametrize(("case", "reason"), [("positions", "meets another tensor"), ("tied", "tied to head.weight"),
                                              ("output", "model's output")])
def test_an_embedding_whose_dims_cannot_go_keeps_them_and_says_why(case, reason) -> None:
    model = EmbeddingKept(case).eval()
    with torch.no_grad():
        model.embed.weight[:, [1, 5]] = 0
    tokens = torch.randint(0, 30, (2, 9))
    result = shrink(model, tokens)
    assert reason in dict(result.report.kept)["embed"] and result.model.embed.embedding_dim == 8
    torch.testing.assert_close(result.model(tokens), model(tokens))


class BagOfTokens(nn.Module):
    """The text classifier of torch's text classification tutorial: a bag of token embeddings (flat token ids and
    the offsets of each text) into a Linear head."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.embedding, self.fc = nn.EmbeddingBag(40, 16, mode=mode), nn.Linear(16, 4)

    def forward(self, text: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(text, offsets))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_a_bag_of_embeddings_loses_its_zero_dims(mode) -> None:
    from litcompress import load_shrunk_state_dict

    torch.manual_seed(0)
    model = BagOfTokens(mode).eval()
    with torch.no_grad():
        model.embedding.weight[:, [0, 3, 7, 8]] = 0
    inputs = (torch.randint(0, 40, (20,)), torch.tensor([0, 4, 4, 11]))  # four texts, one empty
    result = shrink(model, inputs)
    assert (result.model.embedding.embedding_dim, result.model.fc.in_features) == (12, 12)
    torch.testing.assert_close(result.model(*inputs), model(*inputs), rtol=0, atol=1e-6)
    fresh = load_shrunk_state_dict(BagOfTokens(mode), result.model.state_dict()).eval()
    torch.testing.assert_close(fresh(*inputs), model(*inputs), rtol=0, atol=1e-6)


class TokensAsChannels(nn.Module):
    """A text CNN: token embeddings, and a Linear layer's features (with a BatchNorm1d over them), moved to dim 1 by
    a transpose for Conv1d layers, max-pooled over time into a Linear head."""

    def __init__(self, padding: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.conv = nn.Conv1d(16, 8, 3, padding=padding)
        self.proj, self.bn = nn.Linear(16, 12), nn.BatchNorm1d(12)
        self.conv2 = nn.Conv1d(12, 8, 3, padding=padding)
        self.head, self.head2 = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens)
        a = torch.relu(self.conv(F.dropout(e.permute(0, 2, 1), 0.1, self.training))).amax(-1)
        b = torch.relu(self.conv2(torch.tanh(self.bn(self.proj(e).transpose(1, 2))))).amax(-1)
        return self.head(a) + self.head2(b)


class ConvThenLSTM(nn.Module):
    """A CRNN: a Conv1d front end, its channels moved last by a transpose, read by an LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(5, 12, 3, padding=1), nn.BatchNorm1d(12)
        self.lstm, self.head = nn.LSTM(12, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(torch.relu(self.bn(self.conv(x))).transpose(1, 2))[0][:, -1])


class ChannelsLastConv2d(nn.Module):
    """A ConvNeXt-style channels-last head: the permute is not followed, whatever the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).permute(0, 2, 3, 1))


def test_a_conv2d_swapped_channels_last_is_not_told_that_example_inputs_would_help() -> None:
    """The hint for a Conv1d's swap was given a Conv2d's too, which example inputs leave kept."""
    model = ChannelsLastConv2d().eval()
    zero_rows_(model.conv, [0, 1, 2])
    for inputs in ((), (torch.randn(2, 3, 5, 5),)):
        reason = dict(shrink(model, *inputs).report.kept)["conv"]
        assert "call_method permute, which shrink does not see through" in reason and "example_inputs" not in reason


class PermutedConvThenLSTM(ConvThenLSTM):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(torch.relu(self.bn(self.conv(x))).permute(0, 2, 1))[0][:, -1])


@pytest.mark.parametrize("swap", ["transpose", "permute"])
def test_a_conv1d_whose_channels_are_swapped_last_is_told_to_give_example_inputs_without_them(swap) -> None:
    """Without example inputs the swap's dims are unknown, so the conv is kept, as for a Linear layer's; its reason
    said "does not see through" without the hint that example inputs let it through (they do)."""
    torch.manual_seed(0)
    model = (ConvThenLSTM() if swap == "transpose" else PermutedConvThenLSTM()).eval()
    zero_rows_(model.conv, [0, 1, 2])
    reason = dict(shrink(model).report.kept)["conv"]
    assert f"call_method {swap}, which shrink does not see through (without example inputs the dims it touches are " \
           "unknown: pass example_inputs, which may let it through)" in reason
    x = torch.randn(2, 5, 9)
    given = shrink(model, x)
    assert given.model.conv.out_channels == 9 and "conv" not in dict(given.report.kept)
    torch.testing.assert_close(given.model(x), model(x))


@settings(max_examples=30, deadline=None)
@given(padding=st.sampled_from([0, 1]), dims=st.sets(st.integers(0, 15), max_size=15),
       rows=st.sets(st.integers(0, 11), max_size=11), held=st.booleans(), seed=st.integers(0, 2**16))
def test_features_transposed_for_a_conv1d_leave_it_and_their_producer(padding, dims, rows, held, seed) -> None:
    torch.manual_seed(seed)
    model = TokensAsChannels(padding).eval()
    randomise_batch_norm_(model.bn, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.embed.weight[:, sorted(dims)] = 0
        model.proj.weight[sorted(rows)] = 0
        if held:  # zero_batch_norm's doing: a pruned row's BatchNorm shift and scale at zero make it zero
            model.bn.weight[sorted(rows)] = 0
            model.bn.bias[sorted(rows)] = 0
    tokens = torch.randint(0, 50, (3, 9))
    result = shrink(model, tokens)
    shrunk = result.model
    assert (shrunk.embed.embedding_dim, shrunk.conv.in_channels, shrunk.proj.in_features) == (16 - len(dims),) * 3
    # an unpadded conv takes a constant channel's constant into its bias; a padded one only a zero channel
    removed = len(rows) if padding == 0 or held else 0
    assert (shrunk.proj.out_features, shrunk.bn.num_features, shrunk.conv2.in_channels) == (12 - removed,) * 3
    torch.testing.assert_close(shrunk(tokens), model(tokens), rtol=0, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(zero=st.sets(st.integers(0, 11), max_size=11), seed=st.integers(0, 2**16))
def test_a_conv1ds_channels_moved_last_leave_the_lstm_that_reads_them(zero, seed) -> None:
    torch.manual_seed(seed)
    model = ConvThenLSTM().eval()
    randomise_batch_norm_(model.bn, torch.Generator().manual_seed(seed))
    zero_rows_(model.conv, sorted(zero))
    x = torch.randn(3, 5, 10)
    result = shrink(model, x)
    assert (result.model.conv.out_channels, result.model.lstm.input_size) == (12 - len(zero),) * 2
    torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=1e-5)


class _BiasedGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


def test_a_gated_group_whose_pruned_rows_keep_their_biases_says_why_it_loses_nothing() -> None:
    # the reason read "its output meets another tensor in call_function mul" (true of every gated block, shrunk or not)
    torch.manual_seed(0)
    model = _BiasedGate().eval()
    with torch.no_grad():  # pruned rows, biases left: each channel a non-zero constant in both factors
        model.w1.weight[:4] = 0
        model.w3.weight[:4] = 0
    result = shrunk_alike(model, torch.randn(5, 8))
    assert result.report.layers == ()
    for name, why in result.report.kept:
        assert name in ("w1", "w3") and "non-zero bias outputs a constant" in why and "gating product" in why
    with torch.no_grad():
        model.w1.bias[:4] = 0  # zero in one factor: the product's channels leave from both and from w2
    assert {layer.name: layer.removed for layer in shrunk_alike(model, torch.randn(5, 8)).report.layers} == {
        "w1": 4, "w3": 4}


# ------------------------------------------------------------------------------- defects found by a hunt (2026-12-05)
class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.ff, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.ff(self.emb(tokens))))


@pytest.mark.parametrize("with_inputs", [True, False])
def test_a_mask_that_a_tied_holder_does_not_apply_is_refused(with_inputs):
    """torch's pruning masked the embedding's matrix for the embedding only; making the mask permanent masked the
    head too, and the check, whose reference was taken after that, passed: outputs changed by 2.8 of 4."""
    torch.manual_seed(0)
    model = _TiedLM().eval()
    torch_prune.ln_structured(model.emb, "weight", amount=0.5, n=2, dim=1)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    tokens = torch.randint(0, 20, (2, 5))
    with pytest.raises(ValueError, match=r"emb.weight is pruned .* the same tensor is head.weight, which computes "
                                         r"with it unmasked \(tied weights\)"):
        shrink(model, tokens if with_inputs else None)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())  # shrink copies
    torch_prune.ln_structured(model.head, "weight", amount=0.5, n=2, dim=1)  # each holder masked: shrinks
    shrink(model, tokens)


class _ReadsItsWeight(nn.Module):
    """Returns an L1 term of its first layer beside the logits, and may scale by a hooked layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))
        return logits, self.fc1.weight.abs().mean() + self.head.bias.sum()


def test_layers_whose_tensors_the_forward_reads_or_that_have_hooks_keep_their_channels():
    """fx records `self.fc1.weight` as a get_attr node and calls a hooked layer without its hooks: narrowed, the
    penalty doubled and the hook's offset vanished from the removed channels, silently without example inputs."""
    torch.manual_seed(0)
    model = _ReadsItsWeight().eval()
    model.fc2.register_forward_hook(lambda module, inputs, output: output + 0.5)
    for layer in (model.fc1, model.fc2):
        torch_prune.ln_structured(layer, "weight", amount=0.5, n=2, dim=0)
    result = shrink(model)
    kept = dict(result.report.kept)
    assert "the forward reads its tensor fc1.weight itself" in kept["fc1"]
    assert "it has forward hooks" in kept["fc2"]
    assert result.report.parameters_after == result.report.parameters_before
    x = torch.randn(4, 8)
    with torch.no_grad():
        for got, expected in zip(result.model(x), model(x)):
            torch.testing.assert_close(got, expected)


class _MaskedLogits(nn.Module):
    """Scales by its width read as an attribute (which the check must catch) and masks a class with `fill`."""

    def __init__(self, fill: float) -> None:
        super().__init__()
        self.fc1, self.head, self.fill = nn.Linear(8, 32), nn.Linear(32, 5), fill
        self.register_buffer("allowed", torch.tensor([True, True, True, True, False]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x)) * self.fc1.out_features ** -0.5
        return self.head(h).masked_fill(~self.allowed, self.fill)


@pytest.mark.parametrize("fill", [float("-inf"), -1e9, float("nan")])
def test_the_output_check_is_not_disarmed_by_infinite_nan_or_sentinel_outputs(fill):
    """The tolerance was relative to the largest output: -inf or -1e9 masking a class made it infinite or huge (a
    width-dependent forward passed), and a NaN made it NaN (every shrink was refused)."""
    torch.manual_seed(0)
    model = _MaskedLogits(fill).eval()
    torch_prune.ln_structured(model.fc1, "weight", amount=0.5, n=2, dim=0)
    with pytest.raises(ValueError, match="outputs differ from the original's"):
        shrink(model, torch.randn(4, 8))

    class Padded(nn.Module):  # the same fill, and nothing that depends on the width
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.head = nn.Linear(8, 32), nn.Linear(32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.head(F.relu(self.fc1(x)))
            return torch.cat([out, torch.full_like(out[:, :1], fill)], 1)

    padded = Padded().eval()
    torch_prune.ln_structured(padded.fc1, "weight", amount=0.5, n=2, dim=0)
    assert shrink(padded, torch.randn(4, 8)).report.parameters_after < shrink(padded).report.parameters_before


def test_monte_carlo_dropout_passes_the_output_check():
    """The two checked calls drew different dropout masks: every shrink of such a model was refused."""
    class MCDropout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.fc1(x))
            return self.head(F.dropout(F.relu(self.fc2(h)), 0.2, training=True))

    torch.manual_seed(0)
    model = MCDropout().eval()
    for layer in (model.fc1, model.fc2):
        torch_prune.ln_structured(layer, "weight", amount=0.5, n=2, dim=0)
    result = shrink(model, torch.randn(4, 8))
    assert [layer.name for layer in result.report.layers] == ["fc1"] and "dropout" in dict(result.report.kept)["fc2"]


def test_a_shrunk_state_reloads_into_a_fresh_model_with_a_shared_attention_or_lazy_layers():
    """load_shrunk_state_dict replaced a shared attention under its first name only (missing and unexpected keys),
    and read the shape of a lazy layer's uninitialized weight."""
    from litcompress import load_shrunk_state_dict
    from litcompress.pruning import prune_heads_

    class SharedBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            attention = nn.MultiheadAttention(16, 4, batch_first=True)
            self.blocks, self.head = nn.ModuleList([attention, attention]), nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for attention in self.blocks:
                x = x + attention(x, x, x, need_weights=False)[0]
            return self.head(x.mean(1))

    class Lazy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.head = nn.LazyLinear(8), nn.LazyLinear(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.relu(self.fc1(x)))

    torch.manual_seed(0)
    shared, x = SharedBlocks().eval(), torch.randn(2, 5, 16)
    prune_heads_(shared, 0.5)
    lazy, y = Lazy(), torch.randn(2, 3)
    lazy(y)
    torch_prune.ln_structured(lazy.fc1, "weight", amount=0.5, n=2, dim=0)
    for model, built, inputs in ((shared, SharedBlocks, x), (lazy.eval(), Lazy, y)):
        shrunk = shrink(model, inputs).model
        fresh = load_shrunk_state_dict(built(), shrunk.state_dict()).eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh(inputs), shrunk(inputs))
    assert fresh.fc1.weight.shape == (4, 3)


class _DepthwiseFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, groups=4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.dw(x)))


class _GroupedUpsampling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)
        self.c2 = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.c2(F.relu(self.up(F.relu(self.c1(x)))))


@pytest.mark.parametrize(("build", "name", "dim", "shape", "reason"), [
    (_DepthwiseFirst, "dw", 0, (2, 4, 6, 6), "a depthwise conv (its channel j reads input channel j only)"),
    (_GroupedUpsampling, "up", 1, (2, 3, 4, 4), "a grouped transposed conv: shrink removes no channels of it"),
])
def test_zero_channels_of_a_conv_no_chain_reaches_are_said_to_stay(build, name, dim, shape, reason) -> None:
    """ln_structured prunes every conv (Lightning's ModelPruning does), depthwise and transposed ones included: a
    depthwise conv with no layer before it, or a grouped transposed one, kept its zero channels and the report named
    neither (nothing in `layers`, nothing in `kept`)."""
    torch.manual_seed(0)
    model = build().eval()
    torch_prune.ln_structured(getattr(model, name), "weight", amount=0.5, n=2, dim=dim)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = model(x)
    result = shrink(model, (x,))
    assert [(kept, why.split(":")[0] in reason) for kept, why in result.report.kept] == [(name, True)]
    assert reason in dict(result.report.kept)[name]
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), expected)


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * 2.0


def test_a_layer_subclass_with_its_own_forward_is_said_to_be_traced_into_not_uncalled() -> None:
    """Its channels stayed with "forward does not call it", though forward calls it: fx traces into its forward."""
    torch.manual_seed(0)
    model = nn.Sequential(_ScaledLinear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    torch_prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    reason = dict(shrink(model, (torch.randn(3, 6),)).report.kept)["0"]
    assert reason.startswith("_ScaledLinear subclasses Linear with a forward of its own, which torch.fx traces into")
    assert "pass a tracer that keeps _ScaledLinear as a leaf module" in reason


class _VersionedLinear(nn.Linear):
    """Linear's forward, and a format version in its checkpoints."""

    def get_extra_state(self):
        return {"version": 2}

    def set_extra_state(self, state) -> None:
        self.version = state["version"]


def test_a_layer_subclass_with_the_layers_forward_is_said_to_be_traced_into_and_a_leaf_tracer_shrinks_it() -> None:
    """Said "forward does not call it": fx traces into any layer outside torch.nn, whatever its forward."""

    class KeepsVersionedLinear(torch.fx.Tracer):
        def is_leaf_module(self, module, qualified_name):
            return isinstance(module, _VersionedLinear) or super().is_leaf_module(module, qualified_name)

    torch.manual_seed(0)
    model = nn.Sequential(_VersionedLinear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    torch_prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    x = torch.randn(3, 6)
    reason = dict(shrink(model, (x,)).report.kept)["0"]
    assert reason == ("_VersionedLinear subclasses Linear (with its forward), which torch.fx traces into (it keeps "
                      "only torch's own layers whole): pass a tracer that keeps _VersionedLinear as a leaf module")
    result = shrink(model, (x,), tracer=KeepsVersionedLinear)  # what the reason advises
    assert result.model[0].out_features == 4 and result.model[0].get_extra_state() == {"version": 2}
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x))


class _ConcatIntoGroupedConv(nn.Module):
    """Two branches concatenated and read by a grouped conv (ShuffleNet/CSP-like)."""

    def __init__(self, widths: tuple[int, int], groups: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, widths[0], 1), nn.Conv2d(3, widths[1], 1)
        self.g = nn.Conv2d(sum(widths), 6, 1, groups=groups)
        self.o = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        return self.o(F.relu(self.g(joined)))


@pytest.mark.parametrize(("widths", "groups", "removable", "shrinks"), [
    ((6, 6), 2, (False, False), (False, False)), ((4, 8), 2, (False, False), (False, True)),
    ((6, 6), 3, (False, False), (False, False)), ((8, 8), 2, (False, False), (False, False)),
    ((6, 6), 1, (True, True), (True, True))])
def test_a_branch_reaching_only_some_groups_of_a_grouped_conv_behind_a_concatenation_is_not_removable(widths, groups,
                                                                                                    removable, shrinks):
    """The plan called both branches removable: the pipeline (removable_only) pruned them, and shrink, which takes as
    many channels from each of the conv's groups, removed none (accuracy lost, nothing saved). A branch spread
    unevenly over the groups (b of (4, 8): 2 and 6) is not removable either: pruning its channels aims at no equal
    count per group, though shrink removes those of masks that happen to be balanced (as here: 2 and 2)."""
    from litcompress.pruning.engine import set_mask_

    torch.manual_seed(0)
    model, x = _ConcatIntoGroupedConv(widths, groups).eval(), torch.randn(4, 3, 5, 5)
    reasons = removable_channels(model, example_inputs=x)
    assert tuple(reasons[name] is None for name in "ab") == removable
    for name, can in zip("ab", removable):
        if not can:
            assert re.search(rf"grouped conv g, in \d of its {groups} groups: shrink removes as many channels from "
                             r"each group, and the others lose none|grouped conv g unevenly \(2, 6 in its 2 groups\): "
                             "shrink removes as many channels from each group", reasons[name])
    # what the plan says is what shrink does: half of each branch's channels zeroed, those it calls removable go
    for name, width in zip("ab", widths):
        kept = (torch.arange(width) >= width // 2).float()
        set_mask_(getattr(model, name), "weight", kept.view(-1, 1, 1, 1).expand(width, 3, 1, 1).clone())
        set_mask_(getattr(model, name), "bias", kept)
    expected = model(x)
    result = shrink(model, example_inputs=x)
    torch.testing.assert_close(result.model(x), expected)
    assert tuple(getattr(result.model, name).out_channels < width for name, width in zip("ab", widths)) == shrinks


@pytest.mark.parametrize(("multiplier", "producer_groups"), [(1, 1), (2, 1), (1, 8)])
def test_channels_that_go_one_to_a_group_are_not_removable(multiplier, producer_groups):
    """A layer read by a depthwise conv with a channel multiplier (Conv2d(8, 16, 3, groups=8): one input channel per
    group) was called removable: the pipeline's plan chose it, its per-group count left it every channel at any
    sparsity, and nothing said so. A grouped layer with one output channel per group is the same. A depthwise conv
    without a multiplier passes the channels on, and they go."""
    class IntoDepthwise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(8 * producer_groups, 8, 1, groups=producer_groups)
            self.dw = nn.Conv2d(8, 8 * multiplier, 3, padding=1, groups=8)
            self.c = nn.Conv2d(8 * multiplier, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(F.relu(self.dw(F.relu(self.a(x)))))

    model, x = IntoDepthwise().eval(), torch.randn(2, 8 * producer_groups, 5, 5)
    reason = removable_channels(model, example_inputs=x)["a"]
    if multiplier == 1 and producer_groups == 1:
        assert reason is None
        return
    by = "its own 8 groups" if producer_groups > 1 else "the 8 groups of the grouped conv dw"
    assert reason == (f"its 8 channels go one to a group ({by}): shrink removes as many channels from each group and "
                      "keeps one in each, so none of them can go")


def test_evenly_zeroed_groups_held_back_by_constants_are_said_to_be_so():
    """Filters zeroed two per group, some of them outputting non-zero constants into a zero-padded conv: the reason
    said only "not spread evenly over the groups", which they were; what to mend is the constants."""

    class GroupedThenPadded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g, self.c = nn.Conv2d(12, 12, 1, groups=3), nn.Conv2d(12, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(F.relu(self.g(x)))

    torch.manual_seed(0)
    model = GroupedThenPadded().eval()
    with torch.no_grad():
        model.g.weight[[0, 1, 4, 5, 8, 9]] = 0  # two per group
        model.g.bias[[0, 1, 5]] = 1.0  # ReLU keeps these constants: group 0 has no zero channel left
        model.g.bias[[4, 8, 9]] = -1.0
    x = torch.randn(2, 12, 5, 5)
    expected = model(x)
    result = shrink(model, x)
    torch.testing.assert_close(result.model(x), expected)
    assert dict(result.report.kept)["g"] == (
        "its zero channels output non-zero constants into the zero-padded conv(s) c, where they are not constant (a "
        "BatchNorm held at zero for them, as the pipeline's zero_batch_norm does, makes them zero); those left are not "
        "spread evenly over the groups of the grouped conv(s) g, which must each lose as many")
    with torch.no_grad():
        model.g.bias[[0, 1, 5]] = -1.0  # all six zero: two per group go
    assert shrink(model, x).model.g.out_channels == 6


def test_a_numpy_keep_multiple_of_is_taken_as_the_int_it_is():
    """np.int64(8), read from a sweep's array, was refused: "keep_multiple_of must be an int >= 1 or None"."""
    import numpy as np

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].weight[:10] = 0
        model[0].bias[:10] = 0
    x = torch.randn(5, 4)
    assert shrink(model, (x,), keep_multiple_of=np.int64(4)).model[0].out_features == 8  # 6 kept, rounded up
    # and rtol: np.float32 was refused ("rtol must be a number >= 0, got np.float32(1e-04)"), True taken as 1
    assert shrink(model, (x,), rtol=np.float32(1e-4)).model[0].out_features == 6
    with pytest.raises(ValueError, match="rtol must be a number >= 0, got True"):
        shrink(model, (x,), rtol=True)
