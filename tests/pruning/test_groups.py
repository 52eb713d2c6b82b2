"""Residual channel groups: found in the graph, pruned as one, removed by shrink with the function unchanged."""

from __future__ import annotations

import copy
import functools
import re
import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
import torch.nn.functional as F
from torch import nn

from litcompress import shrink
from litcompress.models import GatedFeedForward, ResidualBlock
from litcompress.pruning import removable_channels
from litcompress.pruning.shrink import channel_plan
from litcompress.pruning.groups import (BatchNormZeroer, ChannelGroup, prune_groups_, remove_zero_group_channels_,
                                        residual_groups, zero_group_batch_norms_)


class ResNet(nn.Module):
    """A stem, two residual blocks on one stream of `channels`, global pooling and a classifier."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU())
        self.blocks = nn.Sequential(ResidualBlock(channels), ResidualBlock(channels))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (eval mode), as after training."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1, generator=generator)
            module.running_var.uniform_(0.5, 2, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.uniform_(-0.5, 0.5, generator=generator)
    return model.eval()


class LinearResidual(nn.Module):
    """A residual stream of Linear features with a BatchNorm1d on its branch."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc, self.bn, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + self.bn(self.fc(h)))


def test_a_linear_residual_stream_through_a_batch_norm_is_a_group_given_inputs_of_rank_two():
    """Without inputs the BatchNorm1d may normalise tokens (dim 1 of a 3-d input): the stream is not a group; the
    inputs tell, which residual_groups could not be given."""
    model = LinearResidual().eval()
    assert residual_groups(model) == []
    groups = residual_groups(model, example_inputs=torch.randn(3, 8))
    assert [(g.producers, g.batch_norms) for g in groups] == [(("inp", "fc"), ("bn",))]


def test_the_residual_stream_is_one_group_with_its_readers():
    groups = residual_groups(ResNet())
    assert groups == [ChannelGroup(
        producers=("stem.0", "blocks.0.conv2", "blocks.1.conv2"),
        batch_norms=("stem.1", "blocks.0.bn2", "blocks.1.bn2"),
        consumers=("blocks.0.conv1", "blocks.1.conv1", "head.2"),
        channels=16,
        # a channel leaves when it is zero in every term of the sums the readers read
        zero_when=("all", *(("batch_norm", bn, ("producer", conv))
                            for conv, bn in (("stem.0", "stem.1"), ("blocks.0.conv2", "blocks.0.bn2"),
                                             ("blocks.1.conv2", "blocks.1.bn2")))),
        joined_by=("addition",),
    )]


@settings(max_examples=12, deadline=None)
@given(sparsity=st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.95]), seed=st.integers(0, 10_000))
def test_pruned_groups_shrink_with_the_same_outputs(sparsity, seed):
    torch.manual_seed(seed)
    model = randomised(ResNet(), seed)
    groups = residual_groups(model)
    prune_groups_(model, groups, sparsity)
    zero_group_batch_norms_(model, groups)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    result = shrink(model, x)
    removed = round(sparsity * 16)
    left = max(16 - removed, 1)  # shrink keeps one channel of a layer that lost them all
    shrunk = result.model
    assert [m.out_channels for m in (shrunk.stem[0], shrunk.blocks[0].conv2, shrunk.blocks[1].conv2)] == [left] * 3
    assert [shrunk.blocks[0].conv1.in_channels, shrunk.blocks[1].conv1.in_channels,
            shrunk.head[2].in_features] == [left] * 3
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), expected, rtol=1e-5, atol=1e-5)


def test_constant_channels_are_not_removed_from_a_group():
    # Zero filters whose BatchNorm shift is not zero output a constant, which a zero-padded conv does not absorb.
    model = randomised(ResNet(), 0)
    groups = residual_groups(model)
    prune_groups_(model, groups, 0.5)  # no zero_group_batch_norms_
    assert remove_zero_group_channels_(model, groups) == []


class Concatenating(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.a(x)
        s = h + self.b(h)
        return self.c(torch.cat([s, h], dim=1))


class OutputIsTheStream(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        return h + self.b(h)


class LinearOnConvOutput(nn.Module):
    """A Linear applied to a conv's last (spatial) dimension, which happens to equal the channel count."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # x: [N, 4, 4, 4]
        h = self.a(x)
        return self.head(h + self.b(h)).sum()


@pytest.mark.parametrize("model", [Concatenating(), OutputIsTheStream(), LinearOnConvOutput()],
                         ids=["concatenation", "model output", "linear on a spatial dim"])
def test_a_stream_that_meets_something_else_is_no_group(model):
    assert residual_groups(model) == []


def test_prune_groups_counts_only_newly_pruned_channels_and_keeps_earlier_ones():
    model = randomised(ResNet(), 1)
    groups = residual_groups(model)
    assert prune_groups_(model, groups, 0.5) == 8
    first = (model.stem[0].weight.flatten(1).abs().sum(1) == 0).clone()
    assert prune_groups_(model, groups, 0.5) == 0  # the same target again: nothing new
    assert prune_groups_(model, groups, 0.75) == 4
    now = model.stem[0].weight.flatten(1).abs().sum(1) == 0
    assert bool(now[first].all()) and int(now.sum()) == 12  # channels pruned before stay pruned


class SharedReluBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU module, called after the first conv and after the addition."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def test_a_reused_activation_module_neither_ends_a_chain_nor_blocks_a_group():
    torch.manual_seed(0)
    model = ResNet(8)
    model.blocks = nn.Sequential(SharedReluBlock(8), SharedReluBlock(8))
    randomised(model, 0)
    (group,) = residual_groups(model)
    assert set(group.producers) == {"stem.0", "blocks.0.conv2", "blocks.1.conv2"}
    assert removable_channels(model)["blocks.0.conv1"] is None
    with torch.no_grad():  # what structured pruning with zero_batch_norm leaves: 3 filters and their BN at zero
        model.blocks[0].conv1.weight[:3] = 0
        model.blocks[0].bn1.weight[:3] = model.blocks[0].bn1.bias[:3] = 0
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)

    result = shrink(model, x)

    torch.testing.assert_close(result.model.eval()(x), expected)
    assert (result.model.blocks[0].conv1.out_channels, result.model.blocks[0].conv2.in_channels) == (5, 5)


# ------------------------------------------------------------------ gating products (SwiGLU / GeGLU feed-forwards)
class GatedBlock(nn.Module):
    """A residual stream around a LLaMA-style gated feed-forward block, as in a Transformer layer."""

    def __init__(self, activation: str = "silu", d_model: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d_model)
        self.feed_forward = GatedFeedForward(d_model, hidden, activation)
        self.head = nn.Linear(d_model, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head(h + self.feed_forward(h))


def dead_rows(layer: nn.Linear) -> torch.Tensor:
    return (layer.weight == 0).all(dim=1)


def test_a_gated_feed_forward_is_one_group_joined_by_a_product():
    model = GatedBlock()
    groups = residual_groups(model)
    gated = [g for g in groups if g.gated]
    assert [(g.producers, g.consumers, g.channels, g.joined_by) for g in gated] == [
        (("feed_forward.w1", "feed_forward.w3"), ("feed_forward.w2",), 16, ("multiplication",))]
    # the stream around it joins inp and w2 by an addition, and is read by the block and the head
    (stream,) = [g for g in groups if not g.gated]
    assert (stream.producers, stream.consumers) == (("inp", "feed_forward.w2"),
                                                    ("feed_forward.w1", "feed_forward.w3", "head"))
    assert "gating product" in gated[0].describe() and stream.describe() == "residual additions"
    plan = removable_channels(model)
    assert plan["feed_forward.w1"] is None and plan["feed_forward.w3"] is None
    # on its own neither factor could lose a channel: its output meets the other's in the product
    assert removable_channels(model, residual_groups=False)["feed_forward.w1"].startswith(
        "its output meets another tensor")


@settings(max_examples=20, deadline=None)
@given(activation=st.sampled_from(["silu", "gelu", "relu"]), gate=st.sets(st.integers(0, 15)),
       value=st.sets(st.integers(0, 15)), seed=st.integers(0, 10_000))
def test_a_channel_zero_in_either_factor_leaves_the_whole_gated_block(activation, gate, value, seed):
    # Layer-by-layer structured pruning (Lightning's ModelPruning) picks w1's and w3's channels independently: a
    # product's channel is zero when either factor's is, so all of their union can go.
    torch.manual_seed(seed)
    model = GatedBlock(activation).eval()
    with torch.no_grad():
        model.feed_forward.w1.weight[sorted(gate)] = 0
        model.feed_forward.w3.weight[sorted(value)] = 0
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = model(x)
    shrunk = shrink(model, x).model
    width = max(16 - len(gate | value), 1)
    ff = shrunk.feed_forward
    assert (ff.w1.out_features, ff.w3.out_features, ff.w2.in_features) == (width, width, width)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), expected, rtol=1e-5, atol=1e-5)


class FactorReadTwice(nn.Module):
    """w3's output also feeds another layer directly: only its own zero channels may leave there."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(4, 8, bias=False), nn.Linear(4, 8, bias=False), nn.Linear(8, 3)
        self.side = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self.w3(x)
        return self.w2(torch.relu(self.w1(x)) * value) + self.side(value)


@pytest.mark.parametrize("zeroed, width", [("w1", 8), ("w3", 5)])
def test_a_factor_read_elsewhere_keeps_what_is_read_there(zeroed, width):
    torch.manual_seed(0)
    model = FactorReadTwice().eval()
    with torch.no_grad():
        getattr(model, zeroed).weight[:3] = 0
    x = torch.randn(4, 4)
    with torch.no_grad():
        expected = model(x)
    shrunk = shrink(model, x).model
    assert (shrunk.w1.out_features, shrunk.w3.out_features, shrunk.w2.in_features, shrunk.side.in_features) == \
        (width,) * 4
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), expected)


class SigmoidGate(nn.Module):
    """The original GLU, a * sigmoid(b), of two layers: sigmoid(0) = 1/2, so a zero channel of b is no zero channel
    of the product, but one of a is."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.a(x) * torch.sigmoid(self.b(x)))


class LearnedScale(nn.Module):
    """A product with a learned per-channel scale (LayerScale): not a second layer's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.a(x) * self.scale)


def test_a_product_with_something_else_is_no_group():
    model = LearnedScale().eval()
    assert residual_groups(model) == []
    with torch.no_grad():
        model.scale[:2] = 0
    x = torch.randn(3, 4)
    result = shrink(model, x)
    assert result.report.layers == ()
    torch.testing.assert_close(result.model(x), model(x))


def test_a_sigmoid_gate_of_two_layers_loses_the_channels_zero_in_its_value_layer_only():
    model = SigmoidGate().eval()
    (group,) = residual_groups(model)
    assert (group.producers, group.consumers) == (("a", "b"), ("out",))
    assert group.zero_when == ("any", ("producer", "a"), ("never", 8))
    x = torch.randn(3, 4)
    with torch.no_grad():  # b's zero channels gate by sigmoid(0) = 1/2: a's channels still pass
        model.b.weight[:2], model.b.bias[:2] = 0, 0
    result = shrink(model, x)
    assert result.report.layers == ()
    torch.testing.assert_close(result.model(x), model(x))
    with torch.no_grad():  # a's zero channels are zero in the product: both layers lose them
        model.a.weight[5:], model.a.bias[5:] = 0, 0
        expected = model(x)
    shrunk = shrink(model, x).model
    assert (shrunk.a.out_features, shrunk.b.out_features, shrunk.out.in_features) == (5, 5, 5)
    torch.testing.assert_close(shrunk(x), expected)


def test_gated_groups_prune_the_same_channels_in_both_factors():
    torch.manual_seed(0)
    model = GatedBlock()
    (gated,) = [g for g in residual_groups(model) if g.gated]
    assert prune_groups_(model, [gated], 0.5) == 8
    ff = model.feed_forward
    assert torch.equal(dead_rows(ff.w1), dead_rows(ff.w3)) and int(dead_rows(ff.w1).sum()) == 8
    x = torch.randn(4, 4)
    with torch.no_grad():
        expected = model(x)
    shrunk = shrink(model, x).model
    assert shrunk.feed_forward.w2.in_features == 8
    torch.testing.assert_close(shrunk(x), expected)


def test_a_batch_norm_of_zero_scale_and_shift_zeroes_its_channel_whatever_comes_in():
    # A biased conv's pruned filter outputs its bias; a BatchNorm held at zero still makes the channel zero
    torch.manual_seed(0)
    model = ResNet(8)
    model.stem[0] = nn.Conv2d(1, 8, 3, padding=1, bias=True)
    for block in model.blocks:
        block.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=True)
    randomised(model, 0)
    (group,) = residual_groups(model)
    prune_groups_(model, [group], 0.5)
    x = torch.randn(2, 1, 8, 8)
    assert remove_zero_group_channels_(copy.deepcopy(model), [group]) == []  # shifts not zero: constants stay
    zeroer = BatchNormZeroer(model, [group], biases=[False]).refresh()
    zeroer.apply_()
    assert model.stem[0].bias.ne(0).all()  # biases=[False] leaves them
    with torch.no_grad():
        expected = model(x)
    shrunk = shrink(model, x).model
    assert shrunk.stem[0].out_channels == shrunk.head[2].in_features == 4
    torch.testing.assert_close(shrunk(x), expected)
    with pytest.raises(ValueError, match="2 biases flags for 1 groups"):
        BatchNormZeroer(model, [group], biases=[True, False])


# ------------------------------------------------------------------ a fused layer chunked into the factors
class FusedGate(nn.Module):
    """``a, b = w13(x).chunk(2)``, then ``w2(act(a) * b)`` (one layer computes both factors), as a Linear block on a
    residual stream or as a gated conv."""

    def __init__(self, conv: bool, bias: bool) -> None:
        super().__init__()
        self.conv = conv
        if conv:
            self.inp, self.w13, self.w2 = nn.Conv2d(2, 6, 1), nn.Conv2d(6, 16, 3, padding=1, bias=bias), \
                nn.Conv2d(8, 3, 3, padding=1)
        else:
            self.inp, self.w13, self.w2 = nn.Linear(4, 6), nn.Linear(6, 16, bias=bias), nn.Linear(8, 6)
            self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.conv:
            a, b = torch.chunk(self.w13(h), 2, dim=1)
            return self.w2(torch.relu(a) * b)
        a, b = self.w13(h).chunk(2, dim=-1)
        return self.head(h + self.w2(F.silu(a) * b))


@settings(max_examples=20, deadline=None)
@given(conv=st.booleans(), bias=st.booleans(), gate=st.sets(st.integers(0, 7)), value=st.sets(st.integers(0, 7)),
       seed=st.integers(0, 10_000))
def test_a_fused_layer_chunked_into_both_factors_loses_both_rows_of_a_channel(conv, bias, gate, value, seed):
    torch.manual_seed(seed)
    model = FusedGate(conv, bias).eval()
    (group,) = [g for g in residual_groups(model) if g.gated]
    assert (group.producer_slices(), group.consumers, group.channels) == ({"w13": [0, 8]}, ("w2",), 8)
    rows = sorted(gate) + [8 + j for j in sorted(value)]  # zero rows in the gate's half and the value's half
    with torch.no_grad():
        model.w13.weight[rows] = 0
        if bias:
            model.w13.bias[rows] = 0
    x = torch.randn(3, 2, 5, 5) if conv else torch.randn(3, 4)
    with torch.no_grad():
        expected = model(x)
    shrunk = shrink(model, x).model
    width = max(8 - len(gate | value), 1)
    channels = (shrunk.w13.out_channels, shrunk.w2.in_channels) if conv else \
        (shrunk.w13.out_features, shrunk.w2.in_features)
    assert channels == (2 * width, width)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), expected, rtol=1e-5, atol=1e-5)


class ChunksApart(nn.Module):
    """The two parts of a chunk go to different layers: no one channel space holds both."""

    def __init__(self) -> None:
        super().__init__()
        self.w13, self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 3), nn.Linear(4, 3)
        self.c = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.a(a) * self.b(b) + self.c(a)


class SplitBySize(nn.Module):
    """split(4) writes the part's width into the code: a narrower layer would be split wrongly."""

    def __init__(self) -> None:
        super().__init__()
        self.w13, self.w2 = nn.Linear(4, 8), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w13(x).split(4, dim=-1)
        return self.w2(torch.relu(a) * b)


@pytest.mark.parametrize("model", [ChunksApart(), SplitBySize()], ids=["parts apart", "split by size"])
def test_chunks_that_cannot_narrow_together_are_no_group(model):
    assert [g for g in residual_groups(model) if "w13" in g.producers] == []
    with torch.no_grad():
        model.w13.weight[[0, 4]] = 0
        model.w13.bias[[0, 4]] = 0
    x = torch.randn(3, 4)
    result = shrink(model, x)
    assert "w13" not in {layer.name for layer in result.report.layers}
    torch.testing.assert_close(result.model(x), model(x))


def test_prune_groups_prunes_a_channel_in_every_part_of_a_chunked_layer():
    torch.manual_seed(0)
    model = FusedGate(conv=False, bias=True)
    (group,) = [g for g in residual_groups(model) if g.gated]
    assert prune_groups_(model, [group], 0.5) == 4
    dead = (model.w13.weight == 0).all(1)
    assert torch.equal(dead[:8], dead[8:]) and int(dead.sum()) == 8
    BatchNormZeroer(model, [group]).refresh().apply_()  # no BatchNorm: the biases of both parts
    assert not model.w13.bias[dead].any() and model.w13.bias[~dead].ne(0).all()
    x = torch.randn(4, 4)
    with torch.no_grad():
        expected = model(x)
    shrunk = shrink(model, x).model
    assert (shrunk.w13.out_features, shrunk.w2.in_features) == (8, 4)
    torch.testing.assert_close(shrunk(x), expected)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # as older EfficientNet code writes it


class HandWrittenMBConv(nn.Module):
    """An EfficientNet block as older code writes it: Swish as ``x * sigmoid(x)``, inside the squeeze-and-excitation
    gate too, and a residual addition."""

    def __init__(self, channels: int, expansion: int = 4) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand, self.bn1 = nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.se_reduce, self.se_expand = nn.Conv2d(hidden, hidden // 4, 1), nn.Conv2d(hidden // 4, hidden, 1)
        self.project, self.bn3 = nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _swish(self.bn2(self.dw(_swish(self.bn1(self.expand(x))))))
        h = h * torch.sigmoid(self.se_expand(_swish(self.se_reduce(F.adaptive_avg_pool2d(h, 1)))))
        return x + self.bn3(self.project(h))


class HandWrittenEfficientNet(nn.Module):
    """A Swish stem, two blocks and global pooling written as ``x.mean((2, 3))``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.blocks = nn.Sequential(HandWrittenMBConv(16), HandWrittenMBConv(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(_swish(self.stem(x))).mean((2, 3)))


def test_residual_stream_and_blocks_written_with_hand_made_swish_and_mean_pooling_shrink():
    """Before, x * sigmoid(x) ended every chain and blocked the residual group, the squeeze-and-excitation path broke
    at its own Swish, and a residual group read through x.mean((2, 3)) was blocked: nothing of this net could go."""
    from litcompress.pipeline import CompressionConfig, PruneConfig, compress

    torch.manual_seed(0)
    model = HandWrittenEfficientNet()
    x = torch.randn(16, 1, 8, 8)
    model.train()
    model(x)  # running statistics
    model.eval()
    groups = residual_groups(model)
    assert [sorted(g.producers) for g in groups] == [["blocks.0.project", "blocks.1.project", "stem"]]
    plan = removable_channels(model)
    assert plan["blocks.0.expand"] is None and plan["blocks.1.expand"] is None
    # one-shot structured pruning, then shrink, whose outputs are checked against the pruned model's
    result = compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"),
                                               latency_repeats=2, export=False),
                      eval_fn=lambda m: 1.0, example_inputs=x[:4])
    widths = {layer.name: layer.channels_after for layer in result.shrink.layers}
    assert widths["blocks.0.expand"] == widths["blocks.1.expand"] == 32
    assert widths["stem"] == widths["blocks.0.project"] == widths["blocks.1.project"] == 8
    assert result.shrink.parameters_after < 0.35 * result.shrink.parameters_before


@pytest.mark.parametrize("readout", [lambda h: h.mean((2, 3)), lambda h: torch.flatten(h.mean((2, 3)), 1),
                                     lambda h: h.mean((2, 3)).flatten(1)], ids=["mean", "flatten", "method"])
def test_a_residual_stream_pooled_then_flattened_is_grouped_as_one_pooled(readout):
    """A flatten of the pooled (batch, channels), which changes nothing, blocked the group: the stream stayed full
    width, said to meet another tensor at its addition."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.conv, self.bn_conv = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn(self.stem(x)))
            return self.fc(readout(torch.relu(x + self.bn_conv(self.conv(x)))))

    (group,) = residual_groups(Net())
    assert sorted(group.producers) == ["conv", "stem"] and sorted(group.consumers) == ["conv", "fc"]


class TokenResidualMLP(nn.Module):
    """A residual stream of Linear features on every token, pooled over the tokens before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.ff1 = nn.Linear(8, 16), nn.Linear(16, 32)
        self.ff2, self.head = nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.ff2(F.gelu(self.ff1(h)))
        return self.head(h.mean(1))


def test_a_token_stream_pooled_before_its_reader_is_a_group_given_example_inputs():
    from litcompress.pipeline import CompressionConfig, PruneConfig, compress
    from litcompress.pruning.shrink import channel_plan

    torch.manual_seed(0)
    model, x = TokenResidualMLP().eval(), torch.randn(4, 6, 8)
    assert residual_groups(model) == []  # without ranks, the mean(1) blocks the stream
    (group,) = channel_plan(model, example_inputs=x).groups
    assert (group.producers, group.consumers, group.channels) == (("embed", "ff2"), ("ff1", "head"), 16)
    with torch.no_grad():
        for layer in (model.embed, model.ff2):
            layer.weight[:5], layer.bias[:5] = 0, 0
    result = shrink(model, x)
    assert (result.model.embed.out_features, result.model.ff2.out_features, result.model.head.in_features) == (11,) * 3
    torch.testing.assert_close(result.model(x), model(x))
    # the pipeline prunes the group as one with the example inputs, and shrink removes its channels
    compressed = compress(TokenResidualMLP().eval(), CompressionConfig(
        prune=PruneConfig(sparsity=0.5, method="ln_structured", exclude=("head",)), quantize=None),
        eval_fn=lambda m: 1.0, example_inputs=x)
    shrunk = compressed.stage_models["shrunk"]
    assert shrunk.embed.out_features == shrunk.ff2.out_features == shrunk.head.in_features == 8


HEADS = {  # how user code flattens the pooled stream before the classifier
    "flatten": lambda pooled, stream: pooled.flatten(1),
    "view of its own batch size": lambda pooled, stream: pooled.view(pooled.size(0), -1),
    "view of the stream's batch size": lambda pooled, stream: pooled.view(stream.size(0), -1),
    "reshape of shape[0]": lambda pooled, stream: pooled.reshape(stream.shape[0], -1),
    "squeezes": lambda pooled, stream: pooled.squeeze(-1).squeeze(-1),
    "squeeze of dims 3, 2": lambda pooled, stream: torch.squeeze(pooled, 3).squeeze(2),
    "pooled again with the kernel of its sizes": lambda pooled, stream: F.avg_pool2d(
        pooled, pooled.size()[2:]).view(stream.size(0), -1),
    "view of the batch size unpacked with the others": lambda pooled, stream: _view_unpacked(pooled, stream),
}


def _view_unpacked(pooled: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    b, c, h, w = stream.size()  # only b used: c, h and w are taken and never read
    return pooled.view(b, -1)


class FlattenedHeadResNet(ResNet):
    """ResNet whose head pools and flattens as `head` says (kuangliu's CIFAR ResNets: ``out.view(out.size(0), -1)``)."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.flatten = HEADS[head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stream = self.blocks(self.stem(x))
        return self.head[2](self.flatten(F.adaptive_avg_pool2d(stream, 1), stream))


@pytest.mark.parametrize("head", list(HEADS))
def test_a_stream_flattened_by_a_view_of_the_batch_size_or_squeezed_after_pooling_stays_a_group(head):
    """A size read of the batch blocked the group (a shape read), and a view reading the size of a tensor before the
    pooling was 'another tensor'; a squeeze passes where the example inputs show the pooled 1x1 maps."""
    torch.manual_seed(0)
    model = randomised(FlattenedHeadResNet(head), 0)
    x = torch.randn(3, 1, 8, 8)
    if "squeeze" not in head:  # without example inputs, nothing tells the squeezed dims are the pooled 1x1
        assert [group.consumers for group in residual_groups(model)] == [
            ("blocks.0.conv1", "blocks.1.conv1", "head.2")]
    groups = residual_groups(model) or residual_groups(ResNet())  # same layer names
    prune_groups_(model, groups, 0.5)
    zero_group_batch_norms_(model, groups)
    with torch.no_grad():
        expected = model(x)
    shrunk = shrink(model, x).model
    assert (shrunk.stem[0].out_channels, shrunk.head[2].in_features) == (8, 8)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), expected, rtol=1e-5, atol=1e-5)


def test_a_view_whose_sizes_depend_on_the_width_keeps_the_stream() -> None:
    model = randomised(FlattenedHeadResNet("flatten"), 0)
    model.flatten = lambda pooled, stream: pooled.view(stream.size(0), stream.size(1))  # the width, read
    assert residual_groups(model) == []


class FeaturesResNet(ResNet):
    """Returns the residual stream itself (pooled or not) with return_features=True: only the default path has it
    read by the classifier."""

    def forward(self, x: torch.Tensor, return_features: bool = False, pool: bool = True) -> torch.Tensor:
        stream = self.blocks(self.stem(x))
        if return_features:
            return stream.mean((2, 3)) if pool else stream
        return self.head(stream)


def test_a_stream_a_flag_returns_keeps_its_width_and_every_path_its_outputs():
    model = randomised(FeaturesResNet(), 0)
    groups = residual_groups(ResNet())  # the default path's group
    prune_groups_(model, groups, 0.5)
    zero_group_batch_norms_(model, groups)
    assert residual_groups(model) == []
    x = torch.randn(2, 1, 8, 8)
    result = shrink(model, x)
    kept = dict(result.report.kept)
    assert all(kept[name].startswith("with forward's return_features=True, its residual group cannot lose channels")
               for name in groups[0].producers)
    assert result.model.stem[0].out_channels == 16
    with torch.no_grad():
        for return_features in (False, True):
            for pool in (False, True):
                torch.testing.assert_close(result.model(x, return_features, pool), model(x, return_features, pool))


class ScaledResidualNet(nn.Module):
    """A residual stream whose blocks are scaled by numbers before they join it (ReZero-style residual scaling,
    ``x + 0.1 * f(x)``, ``f(x) / 2``), and a stream halved before the head."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.a1, self.a2 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 1, bias=False)
        self.b1, self.b2 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 1, bias=False)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + 0.1 * self.a2(torch.relu(self.a1(x)))
        x = x + self.b2(torch.relu(self.b1(x))) / 2
        return self.head((x * 0.5).mean((2, 3)))


def test_a_residual_stream_scaled_by_numbers_is_one_group_and_shrinks():
    torch.manual_seed(0)
    model = ScaledResidualNet().eval()
    (group,) = residual_groups(model)
    assert set(group.producers) == {"stem", "a2", "b2"} and set(group.consumers) == {"a1", "b1", "head"}
    prune_groups_(model, [group], 0.5)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    shrunk = shrink(model, x).model
    assert (shrunk.stem.out_channels, shrunk.a1.in_channels, shrunk.head.in_features) == (8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), expected, rtol=1e-5, atol=1e-5)


class ShiftedResidualNet(ScaledResidualNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + (self.a2(torch.relu(self.a1(x))) + 1.0)  # a shift: a zero channel becomes 1
        return self.head(x.mean((2, 3)))


def test_a_residual_stream_shifted_by_a_number_is_no_group():
    assert residual_groups(ShiftedResidualNet()) == []


class ClampedResidualNet(nn.Module):
    """A residual stream read through a hardtanh: inside its bounds 0 stays 0, outside them a zero channel becomes a
    constant the head reads."""

    def __init__(self, clamp: nn.Module | None, bounds: tuple[float, float]) -> None:
        super().__init__()
        self.stem, self.f1, self.f2 = nn.Linear(8, 16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)
        self.clamp, self.bounds = clamp, bounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.f2(torch.relu(self.f1(h)))
        return self.head(self.clamp(h) if self.clamp is not None else F.hardtanh(h, *self.bounds))


@pytest.mark.parametrize("as_module", [True, False])
@pytest.mark.parametrize(("bounds", "grouped"), [((-1.0, 1.0), True), ((0.0, 6.0), True), ((0.1, 2.0), False),
                                                 ((-2.0, -0.1), False)])
def test_a_hardtanh_whose_bounds_leave_out_zero_ends_the_group(as_module, bounds, grouped):
    """`Hardtanh(0.1, 2.0)` was taken to keep zeros: the group was pruned and shrunk, and the head lost the constant
    0.1 its removed inputs gave (outputs 0.05 off, silently without example inputs)."""
    torch.manual_seed(0)
    model = ClampedResidualNet(nn.Hardtanh(*bounds) if as_module else None, bounds).eval()
    groups = residual_groups(model)
    assert bool(groups) == grouped
    prune_groups_(model, groups, 0.5)
    zero_group_batch_norms_(model, groups)
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(shrink(model).model(x), expected)
    assert (shrink(model).model.head.in_features < 16) == grouped


class ContiguousResidualNet(ScaledResidualNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).contiguous()
        x = x + self.a2(torch.relu(self.a1(x))).float()
        return self.head(x.mean((2, 3)))


def test_a_residual_stream_through_copies_and_casts_is_one_group():
    (group,) = residual_groups(ContiguousResidualNet())
    assert set(group.producers) == {"stem", "a2"} and set(group.consumers) == {"a1", "head"}


class SEBlock(nn.Module):
    """A residual block with a squeeze-and-excitation gate on its output before the addition (SE-ResNet, RegNetY),
    written with 1x1 convs or, as SENet implementations do, Linear layers and reshapes read from the maps."""

    def __init__(self, channels: int, linear: bool) -> None:
        super().__init__()
        self.linear = linear
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        layer = nn.Linear if linear else functools.partial(nn.Conv2d, kernel_size=1)
        self.squeeze, self.excite = layer(channels, channels // 4), layer(channels // 4, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.linear:
            b, c, _, _ = out.size()
            gate = torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(out, 1).view(b, c)))))
            out = out * gate.view(b, c, 1, 1).expand_as(out)
        else:
            out = out * torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(out, 1)))))
        return F.relu(out + x)


class SEResNet(nn.Module):
    def __init__(self, linear: bool, channels: int = 16) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(SEBlock(channels, linear), SEBlock(channels, linear))
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stream = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(stream, 1).flatten(1))


@pytest.mark.parametrize("linear", [False, True], ids=["1x1 convs", "Linear layers"])
@settings(max_examples=6, deadline=None)
@given(sparsity=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 10_000))
def test_a_squeeze_and_excitation_gate_on_a_residual_stream_narrows_with_it(linear, sparsity, seed):
    """x * gate(x) before each block's addition ended the stream's group (a product with another tensor): an
    SE-ResNet kept its stream at full width. The gate's channel is zero where x's is: its squeeze layer reads the
    group, its excite layer loses the rows of the channels that go."""
    torch.manual_seed(seed)
    model = randomised(SEResNet(linear), seed)
    (group,) = residual_groups(model)
    assert set(group.gate_excites) == {"blocks.0.excite", "blocks.1.excite"}
    assert {"blocks.0.squeeze", "blocks.1.squeeze"} <= set(group.consumers)
    prune_groups_(model, [group], sparsity)
    zero_group_batch_norms_(model, [group])
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    shrunk = shrink(model, x).model
    left = 16 - round(sparsity * 16)
    assert (shrunk.stem.out_channels, shrunk.blocks[1].excite.weight.shape[0], shrunk.head.in_features) == (left,) * 3
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- spatial indexing: a TCN's chomp, a crop, a last step
TCN_READOUTS = {  # how a temporal conv net reads its residual stream out
    "last step": lambda h: h[:, :, -1],
    "last step after an ellipsis": lambda h: h[..., -1],
    "cropped, then pooled": lambda h: h[:, :, 2:].mean(-1),
}


class TemporalConvNet(nn.Module):
    """Bai et al.'s TCN block as its reference code writes it: dilated causal convs padded on both sides, the extra
    steps cut off (``Chomp1d``: ``x[:, :, :-padding].contiguous()``), a residual stream, and the classifier reading
    the last step. Indexing spatial dims ended every chain before."""

    def __init__(self, readout: str, channels: int = 12) -> None:
        super().__init__()
        self.readout = TCN_READOUTS[readout]
        self.inp = nn.Conv1d(3, channels, 1)
        self.c1 = nn.Conv1d(channels, channels, 3, padding=2, dilation=1)
        self.c2 = nn.Conv1d(channels, channels, 3, padding=4, dilation=2)
        self.fc = nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        y = torch.relu(self.c1(h)[:, :, :-2].contiguous())
        y = torch.relu(self.c2(y)[..., :-4])
        return self.fc(self.readout(torch.relu(h + y)))


@settings(max_examples=20, deadline=None)
@given(readout=st.sampled_from(list(TCN_READOUTS)), stream=st.sets(st.integers(0, 11), max_size=11),
       inner=st.sets(st.integers(0, 11), max_size=11), seed=st.integers(0, 10_000))
def test_a_temporal_conv_net_chomped_and_read_at_its_last_step_shrinks_with_the_same_outputs(readout, stream, inner,
                                                                                             seed):
    torch.manual_seed(seed)
    model = TemporalConvNet(readout).eval()
    assert {name: reason for name, reason in removable_channels(model).items() if reason} == {
        "fc": "it produces the model's output, whose width is part of the model's interface"}
    (group,) = residual_groups(model)
    assert (set(group.producers), set(group.consumers)) == ({"inp", "c2"}, {"c1", "fc"})
    with torch.no_grad():
        for layer, rows in ((model.inp, stream), (model.c2, stream), (model.c1, inner)):
            layer.weight[sorted(rows)] = 0
            layer.bias[sorted(rows)] = 0
    x = torch.randn(5, 3, 20)
    with torch.no_grad():
        expected = model(x)
    shrunk = shrink(model, x).model
    assert (shrunk.inp.out_channels, shrunk.c2.out_channels, shrunk.fc.in_features) == (12 - len(stream),) * 3
    assert shrunk.c1.out_channels == 12 - len(inner)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), expected, rtol=1e-5, atol=1e-5)


class IndexesChannelsOrOneOfTwoDims(nn.Module):
    def __init__(self, index: str) -> None:
        super().__init__()
        self.index = index
        self.conv, self.head = nn.Conv2d(2, 8, 3, padding=1), nn.Conv1d(8 if index == "one row" else 4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.head(h[:, :, 0] if self.index == "one row" else h[:, :4].flatten(2))


@pytest.mark.parametrize("index", ["one row", "some channels"])
def test_indexing_channels_or_one_of_two_spatial_dims_ends_the_chain(index):
    model = IndexesChannelsOrOneOfTwoDims(index).eval()
    assert removable_channels(model)["conv"] == ("its output goes to call_function getitem, which shrink does not "
                                                 "see through")


# ------------------------------------------------------------------ GLU: a * sigmoid(b) over a layer's two halves
GLUS = {  # how user code writes a gated linear unit over the channels
    "F.glu": lambda h, dim, module: F.glu(h, dim),
    "nn.GLU": lambda h, dim, module: module.glu(h),
    "chunk, a * sigmoid(b)": lambda h, dim, module: _halves(h, dim, lambda a, b: a * torch.sigmoid(b)),
    "torch.chunk, b.sigmoid() * a": lambda h, dim, module: _halves(h, dim, lambda a, b: b.sigmoid() * a),
}


def _halves(h: torch.Tensor, dim: int, gate) -> torch.Tensor:
    a, b = torch.chunk(h, 2, dim)
    return gate(a, b)


class GatedLinearUnit(nn.Module):
    """Dauphin et al.'s gated conv (and a Conformer's pointwise conv + GLU), as a conv or as a Linear block: the
    value half keeps zeros, the gate half (through a sigmoid) does not, so a channel goes when its value row is
    zero. Before, the sigmoid blocked the space and F.glu / nn.GLU ended the chain."""

    def __init__(self, conv: bool, glu: str) -> None:
        super().__init__()
        self.conv, self.gate, self.glu = conv, GLUS[glu], nn.GLU(1 if conv else -1)
        layer = nn.Conv1d if conv else nn.Linear
        self.inp, self.both, self.out = layer(3, 6, 1) if conv else layer(3, 6), \
            layer(6, 16, 3, padding=1) if conv else layer(6, 16), layer(8, 4, 1) if conv else layer(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gate(self.both(self.inp(x)), 1 if self.conv else -1, self))


@settings(max_examples=30, deadline=None)
@given(conv=st.booleans(), glu=st.sampled_from(list(GLUS)), value=st.sets(st.integers(0, 7)),
       gate=st.sets(st.integers(0, 7)), seed=st.integers(0, 10_000))
def test_a_gated_linear_unit_loses_the_channels_whose_value_half_is_zero(conv, glu, value, gate, seed):
    torch.manual_seed(seed)
    model = GatedLinearUnit(conv, glu).eval()
    (group,) = residual_groups(model)
    assert (group.producer_slices(), group.consumers, group.channels) == ({"both": [0, 8]}, ("out",), 8)
    rows = sorted(value) + [8 + j for j in sorted(gate)]
    with torch.no_grad():
        model.both.weight[rows] = 0
        model.both.bias[rows] = 0
    x = torch.randn(3, 3, 5) if conv else torch.randn(3, 3)
    with torch.no_grad():
        expected = model(x)
    shrunk = shrink(model, x).model
    width = max(8 - len(value), 1)   # sigmoid(0) = 0.5: a zero gate row alone keeps its channel
    channels = (shrunk.both.out_channels, shrunk.out.in_channels) if conv else \
        (shrunk.both.out_features, shrunk.out.in_features)
    assert channels == (2 * width, width)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), expected, rtol=1e-5, atol=1e-5)


class ReadThroughASigmoid(nn.Module):
    """A residual stream its reader sees through a sigmoid only: no weights make a channel zero there."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.block, self.head = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head(torch.sigmoid(h + self.block(h)))


def test_a_space_read_only_through_an_op_that_does_not_keep_zeros_is_no_group():
    model = ReadThroughASigmoid().eval()
    assert residual_groups(model) == []
    with torch.no_grad():
        for layer in (model.inp, model.block):
            layer.weight[:3], layer.bias[:3] = 0, 0
    x = torch.randn(4, 3)
    result = shrink(model, x)
    assert result.model.inp.out_features == 8
    torch.testing.assert_close(result.model(x), model(x))


class ConformerConvModule(nn.Module):
    """A Conformer's convolution module on a (batch, time, features) stream: pointwise conv to twice the width, GLU,
    depthwise conv, BatchNorm (or none), SiLU, pointwise conv back, residual. The depthwise conv after the GLU
    blocked its group before."""

    def __init__(self, batch_norm: bool, width: int = 8, kernel: int = 5) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(3, width), nn.Linear(width, 2)
        self.norm = nn.LayerNorm(width)
        self.pw1, self.glu = nn.Conv1d(width, 2 * width, 1), nn.GLU(dim=1)
        self.dw = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)
        self.bn = nn.BatchNorm1d(width) if batch_norm else nn.Identity()
        self.pw2 = nn.Conv1d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        y = self.glu(self.pw1(self.norm(h).transpose(1, 2)))
        y = self.pw2(F.silu(self.bn(self.dw(y))))
        return self.head((h + y.transpose(1, 2)).mean(1))


@settings(max_examples=20, deadline=None)
@given(batch_norm=st.booleans(), pruned=st.sets(st.integers(0, 7), max_size=7), seed=st.integers(0, 10_000))
def test_a_depthwise_conv_inside_a_glu_group_loses_the_groups_channels(batch_norm, pruned, seed):
    torch.manual_seed(seed)
    model = ConformerConvModule(batch_norm).eval()
    if batch_norm:
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2)
    (group,) = residual_groups(model)
    assert (group.producer_slices(), group.depthwise, group.consumers) == ({"pw1": [0, 8]}, ("dw",), ("pw2",))
    assert group.batch_norms == (("bn",) if batch_norm else ())
    assert "written by pw1 (2 chunks); read by pw2; through the depthwise dw" in channel_plan(model).table()
    x = torch.randn(4, 6, 3)
    with torch.no_grad():
        rows = sorted(pruned) + [8 + j for j in sorted(pruned)]  # as prune_groups_ does: both halves of a channel
        model.pw1.weight[rows], model.pw1.bias[rows] = 0, 0
        unchanged = model(x)
    zero_group_batch_norms_(model, [group])   # the depthwise bias (and the BatchNorm) of those channels held at zero
    assert bool((model.dw.bias[sorted(pruned)] == 0).all())
    with torch.no_grad():
        expected = model(x)
    if not batch_norm:   # the channels were zero before the depthwise conv: only its bias reached pw2
        assert not pruned or not torch.allclose(unchanged, expected)
    shrunk = shrink(model, x).model
    width = max(8 - len(pruned), 1)
    assert (shrunk.pw1.out_channels, shrunk.dw.out_channels, shrunk.dw.groups, shrunk.pw2.in_channels) == \
        (2 * width, width, width, width)
    if batch_norm:
        assert shrunk.bn.num_features == width
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), expected, rtol=1e-5, atol=1e-5)


def test_the_pipeline_prunes_and_shrinks_a_conformer_convolution_module():
    from litcompress.pipeline import CompressionConfig, PruneConfig, compress

    torch.manual_seed(0)
    model = ConformerConvModule(batch_norm=True).eval()
    x = torch.randn(4, 6, 3)
    result = compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured"),
                                               quantize=None), eval_fn=lambda m: float(m(x).sum()), example_inputs=x)
    pruned, shrunk = result.stage_models["pruned"], result.stage_models["shrunk"]
    assert (shrunk.pw1.out_channels, shrunk.dw.groups, shrunk.bn.num_features, shrunk.pw2.in_channels) == (8, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), pruned(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_norm", ["torch.nn.utils.weight_norm (hook)", "parametrizations.weight_norm"])
def test_a_weight_normed_layer_keeps_its_group_whole_until_folded(weight_norm):
    """Bai et al.'s TCN wraps its convs in weight_norm: the hook (or parametrization) computes the weight again at
    full width on every call, so the group it writes into cannot narrow. The hook's layer was grouped anyway, and
    shrink failed narrowing it ('cannot assign torch.FloatTensor as parameter weight')."""
    from litcompress.pruning import fold_parametrizations_

    torch.manual_seed(0)
    model = TemporalConvNet("last step").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # the hook is deprecated, and still common
        if weight_norm.endswith("(hook)"):
            model.c2 = torch.nn.utils.weight_norm(model.c2)
        else:
            model.c2 = torch.nn.utils.parametrizations.weight_norm(model.c2)
    with torch.no_grad():
        magnitudes = model.c2.weight_g if weight_norm.endswith("(hook)") else \
            model.c2.parametrizations.weight.original0
        magnitudes[:4] = 0   # a zero norm: a zero filter
        for layer in (model.c2, model.inp):
            layer.bias[:4] = 0
        model.inp.weight[:4] = 0
    assert residual_groups(model) == []
    assert removable_channels(model)["c2"] == "it is parametrized (litcompress.pruning.fold_parametrizations_ first)"
    x = torch.randn(3, 3, 20)
    result = shrink(model, x)
    assert (result.model.c2.out_channels, result.model.inp.out_channels) == (12, 12)
    torch.testing.assert_close(result.model(x), model(x))
    fold_parametrizations_(model)   # as for inference: now the group narrows
    shrunk = shrink(model, x).model
    assert (shrunk.c2.out_channels, shrunk.inp.out_channels, shrunk.fc.in_features) == (8, 8, 8)
    torch.testing.assert_close(shrunk(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparsity", [1.0, 1.5, -0.5, float("nan")])
def test_channel_groups_refuse_a_sparsity_outside_zero_one(sparsity):
    """1.5 returned 24 channels 'newly pruned' of 16, 1.0 zeroed the whole residual stream, -0.5 pruned nothing and
    NaN failed inside round()."""
    from litcompress.models import ResNetClassifier
    from litcompress.pruning.engine import pruned_targets

    model = ResNetClassifier(width=16, blocks=1)
    groups = list(channel_plan(model).groups)
    assert groups
    with pytest.raises(ValueError, match=re.escape(f"prune_groups_(sparsity={sparsity!r}): expected a fraction")):
        prune_groups_(model, groups, sparsity)
    assert not pruned_targets(model)


class _ResidualMLP(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, width), nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, x):
        h = self.a(x)
        return self.c(h + self.b(F.relu(h)))


@pytest.mark.parametrize("zero, multiple, width", [(16, 8, 8), (16, None, 1), (12, 8, 8), (3, None, 13), (3, 8, 16)])
def test_a_residual_group_keeps_a_multiple_of_its_channels_and_says_when_that_kept_its_zeros(zero, multiple, width):
    """A group whose channels were all zero kept one (not 8) with keep_multiple_of=8: the one kept was unmarked after
    the multiple was rounded. Where the multiple left nothing to remove, the report sent the user to zero biases
    that were zero."""
    torch.manual_seed(0)
    model = _ResidualMLP()
    with torch.no_grad():
        for layer in (model.a, model.b):
            layer.weight[:zero] = 0
            layer.bias[:zero] = 0
    x = torch.randn(5, 4)
    result = shrink(model, (x,), keep_multiple_of=multiple)
    assert (result.model.a.out_features, result.model.b.out_features, result.model.c.in_features) == (width,) * 3
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-6, atol=1e-6)
    kept = dict(result.report.kept)
    if width == 16:
        assert kept["a"].startswith(f"keeping a multiple of {multiple} channels leaves none of its group's {zero} zero")


class _ChunkedSum(nn.Module):
    def __init__(self, glu: bool = False) -> None:
        super().__init__()
        self.a, self.c, self.glu = nn.Linear(4, 32), nn.Linear(16, 3), glu

    def forward(self, x):
        if self.glu:
            return self.c(F.glu(self.a(x), -1))
        u, v = self.a(x).chunk(2, -1)
        return self.c(u + v)


@pytest.mark.parametrize("glu", [False, True], ids=["chunk", "glu"])
@pytest.mark.parametrize("multiple", [None, 1, 8])
def test_the_reason_a_group_kept_its_zero_channels_is_the_one_that_kept_them(multiple, glu):
    """A chunked producer (or a GLU's) whose zeros keep_multiple_of kept was said not to be seen through (it is, when
    the multiple allows); a one-channel group that is zero was said to hold no zero channel, or kept by a multiple of
    1."""
    torch.manual_seed(0)
    chunked, one = _ChunkedSum(glu), _ResidualMLP(width=1)
    with torch.no_grad():
        chunked.a.weight[[0, 1, 2, 16, 17, 18]] = 0
        chunked.a.bias[[0, 1, 2, 16, 17, 18]] = 0
        for layer in (one.a, one.b):
            layer.weight.zero_(), layer.bias.zero_()
    x = torch.randn(5, 4)
    result = shrink(chunked, (x,), keep_multiple_of=multiple)
    torch.testing.assert_close(result.model(x), chunked(x), rtol=1e-6, atol=1e-6)
    if multiple == 8:
        assert result.model.a.out_features == 32 and dict(result.report.kept)["a"].startswith(
            "keeping a multiple of 8 channels leaves none of its group's 3 zero channels to remove (a, joined by ")
    else:
        assert result.model.a.out_features == 26 and "a" not in dict(result.report.kept)
    result = shrink(one, (x,), keep_multiple_of=multiple)
    assert result.model.a.out_features == 1
    assert dict(result.report.kept)["a"].startswith("its one channel is zero, and a layer keeps one channel at least")
