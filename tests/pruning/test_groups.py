"""Residual channel groups: found in the graph, pruned as one, removed by shrink with the function unchanged."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from litcompress import shrink
from litcompress.models import ResidualBlock
from litcompress.pruning import removable_channels
from litcompress.pruning.groups import (ChannelGroup, prune_groups_, remove_zero_group_channels_, residual_groups,
                                        zero_group_batch_norms_)


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


def test_the_residual_stream_is_one_group_with_its_readers():
    groups = residual_groups(ResNet())
    assert groups == [ChannelGroup(
        producers=("stem.0", "blocks.0.conv2", "blocks.1.conv2"),
        batch_norms=("stem.1", "blocks.0.bn2", "blocks.1.bn2"),
        consumers=("blocks.0.conv1", "blocks.1.conv1", "head.2"),
        channels=16,
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
