"""Small classifiers for the command line's built-in runs and for examples: LightningModules that log
``train_loss``, ``val_acc``, ``val_loss`` and ``test_acc``, and whose steps call ``self(x)`` (so that the pipeline can
judge any stage's model with them).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn


def _not_python_number(value: object) -> str:
    """A hint for a numpy number (numpy's float64 is even a float): the model keeps its arguments as
    hyperparameters, and a checkpoint holding numpy's numbers does not load (torch's ``weights_only`` refuses them)."""
    if isinstance(value, numbers.Real) and type(value) not in (bool, int, float):
        cast = "int" if isinstance(value, numbers.Integral) else "float"
        return f" ({type(value).__module__}.{type(value).__name__}: pass {cast}(...), which checkpoints can hold)"
    return ""


def _check_widths(name: str, widths: Sequence[int]) -> tuple[int, ...]:
    given = widths
    widths = tuple(widths) if isinstance(widths, Sequence) and not isinstance(widths, str) else ()
    if not widths or not all(type(w) is int and w > 0 for w in widths):
        hint = next((_not_python_number(w) for w in widths if _not_python_number(w)), "")
        raise ValueError(f"{name}={given!r}: expected one or more positive ints, e.g. (256, 256){hint}.")
    return widths


_SIZE_EXAMPLES = {"num_classes": "10", "in_channels": "1", "image_size": "8", "blocks": "2", "layers": "2",
                  "heads": "4", "groups": "8", "expansion": "4", "stem_stride": "2"}


def _check_sizes(**sizes: object) -> None:
    """Each of `sizes` a positive int (``num_classes`` at least 2): 0 or a negative size built a model that failed
    inside its first training step, in torch's words."""
    for name, value in sizes.items():
        least = 2 if name == "num_classes" else 1
        if type(value) is not int or value < least:
            raise ValueError(f"{name}={value!r}: expected an int >= {least}, e.g. {name}="
                             f"{_SIZE_EXAMPLES.get(name, '64')}{_not_python_number(value)}.")


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):  # "no" is truthy
        raise TypeError(f"{name}={value!r}: expected True or False.")


class Classifier(L.LightningModule):
    """Cross-entropy classification of ``self.net``'s logits, trained with Adam."""

    net: nn.Module

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        # "1e-3" failed in `>`; inf trained NaNs
        if type(lr) not in (int, float) or not 0 < lr < math.inf:
            raise ValueError(f"lr={lr!r}: expected a finite learning rate > 0, e.g. 1e-3{_not_python_number(lr)}.")
        if type(weight_decay) not in (int, float) or not 0 <= weight_decay < math.inf:
            raise ValueError(f"weight_decay={weight_decay!r}: expected a finite number >= 0"
                             f"{_not_python_number(weight_decay)}.")
        self.lr, self.weight_decay = lr, weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def _evaluate(self, batch: Any, prefix: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=prefix == "val")
        self.log(f"{prefix}_loss", nn.functional.cross_entropy(logits, y))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The logits of a batch's inputs: ``(x, y)`` batches (the DataModules' loaders) or ``x`` alone."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class MLPClassifier(Classifier):
    """Linear -> ReLU blocks of widths `hidden`, then a Linear to `num_classes` logits."""

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (256, 256), num_classes: int = 10,
                 lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        _check_sizes(in_features=in_features, num_classes=num_classes)
        hidden = _check_widths("hidden", hidden)
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, num_classes))


class CNNClassifier(Classifier):
    """3x3 Conv -> BatchNorm -> ReLU blocks of widths `channels` (unpadded, so that pruned filters can be removed
    exactly), a 2x2 max-pool, then a Linear to `num_classes` logits."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, channels: Sequence[int] = (32, 64),
                 num_classes: int = 10, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        _check_sizes(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        channels = _check_widths("channels", channels)
        side = image_size - 2 * len(channels)
        if side < 2:
            raise ValueError(f"image_size={image_size} is too small for {len(channels)} unpadded 3x3 convolutions "
                             "and a 2x2 pooling; use fewer channels entries.")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = in_channels
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            width = c
        layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(width * (side // 2) ** 2, num_classes)]
        self.net = nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """``relu(x + bn2(conv2(relu(bn1(conv1(x))))))`` with zero-padded 3x3 convs of one width (a ResNet basic block
    without downsampling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class ResNetClassifier(Classifier):
    """A small ResNet: a 3x3 conv stem (BatchNorm, ReLU), `blocks` residual blocks of `width` channels on one
    stream, global average pooling and a Linear to `num_classes` logits. Structured pruning shrinks both the
    blocks' inner channels and the residual stream (see :mod:`litcompress.pruning.groups`)."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, width: int = 16, blocks: int = 2,
                 num_classes: int = 10, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        _check_sizes(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        _check_sizes(width=width, blocks=blocks)
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            *[ResidualBlock(width) for _ in range(blocks)],
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
        )


class ResNeXtBlock(nn.Module):
    """ResNeXt's bottleneck without downsampling: ``relu(x + bn3(expand(h)))`` with
    ``h = relu(bn2(grouped(relu(bn1(reduce(x))))))``; 1x1 convs from `channels` to `width` and back around a
    zero-padded 3x3 conv of `groups` groups (its cardinality)."""

    def __init__(self, channels: int, width: int, groups: int) -> None:
        super().__init__()
        if width % groups:
            raise ValueError(f"width={width} is not a multiple of groups={groups}: a grouped conv splits its "
                             "channels evenly.")
        self.reduce, self.bn1 = nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.grouped = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.expand, self.bn3 = nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.reduce(x)))
        h = torch.relu(self.bn2(self.grouped(h)))
        return torch.relu(x + self.bn3(self.expand(h)))


class ResNeXtClassifier(Classifier):
    """A small ResNeXt: a 3x3 conv stem (stride 2 for images of 16 pixels or more, BatchNorm, ReLU), `blocks`
    bottleneck blocks on a stream of `channels`, each with a grouped 3x3 conv of `width` channels in `groups`
    groups, global average pooling and a Linear to `num_classes` logits. Structured pruning prunes the grouped
    convs' channels and those they read evenly over their groups, and the residual stream as one group; shrink
    removes them all."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, channels: int = 32, width: int = 64,
                 groups: int = 8, blocks: int = 2, num_classes: int = 10, lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        _check_sizes(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        _check_sizes(channels=channels, width=width, groups=groups, blocks=blocks)
        self.save_hyperparameters()
        stride = 2 if image_size >= 16 else 1
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(), *[ResNeXtBlock(channels, width, groups) for _ in range(blocks)],
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes),
        )


class InvertedResidualBlock(nn.Module):
    """MobileNetV2's block without downsampling: ``x + bn3(project(h))`` with
    ``h = relu6(bn2(depthwise(relu6(bn1(expand(x))))))``; 1x1 expand and project convs around a zero-padded
    depthwise 3x3 conv of ``channels * expansion`` channels. With `squeeze_excitation` (MobileNetV3), ``h`` is
    multiplied by its channel gate ``hardsigmoid(excite(relu(squeeze(mean of h))))`` (1x1 convs, a quarter of the
    channels in between) before the projection."""

    def __init__(self, channels: int, expansion: int = 4, squeeze_excitation: bool = False) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand, self.bn1 = nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.squeeze_excitation = squeeze_excitation
        if squeeze_excitation:
            self.squeeze = nn.Conv2d(hidden, max(1, hidden // 4), 1)
            self.excite = nn.Conv2d(max(1, hidden // 4), hidden, 1)
        self.project, self.bn3 = nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu6(self.bn1(self.expand(x)))
        h = nn.functional.relu6(self.bn2(self.depthwise(h)))
        if self.squeeze_excitation:
            gate = self.excite(nn.functional.relu(self.squeeze(h.mean((2, 3), keepdim=True))))
            h = h * nn.functional.hardsigmoid(gate)
        return x + self.bn3(self.project(h))


class MobileNetClassifier(Classifier):
    """A small MobileNetV2: a 3x3 conv stem (stride `stem_stride`, BatchNorm, ReLU6), `blocks` inverted residual
    blocks of `width` channels expanded `expansion` times around depthwise convs (with `squeeze_excitation`, gated
    as in MobileNetV3), global average pooling and a Linear to `num_classes` logits. The stem's stride defaults to 2
    for images of 16 pixels or more, else 1. Structured pruning shrinks the expanded channels (depthwise convs and
    gates included) and the residual stream."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, width: int = 16, blocks: int = 2,
                 expansion: int = 4, stem_stride: int | None = None, squeeze_excitation: bool = False,
                 num_classes: int = 10, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        _check_sizes(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        if stem_stride is None:
            stem_stride = 2 if image_size >= 16 else 1
        _check_sizes(width=width, blocks=blocks, expansion=expansion, stem_stride=stem_stride)
        _check_flag("squeeze_excitation", squeeze_excitation)
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU6(), *[InvertedResidualBlock(width, expansion, squeeze_excitation) for _ in range(blocks)],
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
        )


class TransformerClassifier(Classifier):
    """An image read as a sequence of its rows: a Linear embedding of each row (channels x width values) plus a
    learned position embedding, torch's ``nn.TransformerEncoder`` (`layers` layers of width `d_model`, `heads`
    heads, feed-forward `feed_forward`), the mean over rows and a Linear to `num_classes` logits. Structured pruning
    shrinks the feed-forward blocks (see :func:`litcompress.pruning.removable_channels`)."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, d_model: int = 32, heads: int = 2, layers: int = 2,
                 feed_forward: int = 64, num_classes: int = 10, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        _check_sizes(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        _check_sizes(d_model=d_model, heads=heads, layers=layers, feed_forward=feed_forward)
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}.")
        self.save_hyperparameters()
        self.embed = nn.Linear(in_channels * image_size, d_model)
        self.position = nn.Parameter(torch.zeros(1, image_size, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, feed_forward, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.permute(0, 2, 1, 3).flatten(2)  # (N, C, H, W) -> (N, H, C * W)
        return self.head(self.encoder(self.embed(rows) + self.position).mean(1))


class LSTMClassifier(Classifier):
    """An image read as a sequence of its rows (channels x width values per step) by an ``nn.LSTM`` of `layers`
    layers of `hidden` units; its last output goes to a Linear to `num_classes` logits (sequential MNIST).
    Unstructured pruning prunes the LSTM's weight matrices, structured pruning its hidden units (which shrink
    removes), and dynamic int8 quantizes the LSTM itself."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, hidden: int = 64, layers: int = 1,
                 num_classes: int = 10, lr: float = 3e-3, weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        _check_sizes(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        _check_sizes(hidden=hidden, layers=layers)
        self.save_hyperparameters()
        self.lstm = nn.LSTM(in_channels * image_size, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.permute(0, 2, 1, 3).flatten(2)  # (N, C, H, W) -> (N, H, C * W)
        return self.head(self.lstm(rows)[0][:, -1])


_GATE_ACTIVATIONS = {"silu": nn.functional.silu, "gelu": nn.functional.gelu, "relu": nn.functional.relu}


class GatedFeedForward(nn.Module):
    """The feed-forward block of LLaMA-style Transformers, ``w2(act(w1(x)) * w3(x))`` without biases: SwiGLU with
    ``activation="silu"``, GeGLU with ``"gelu"``, ReGLU with ``"relu"``. Structured pruning removes its hidden
    channels from ``w1``, ``w3`` and ``w2`` together (see :mod:`litcompress.pruning.groups`)."""

    def __init__(self, d_model: int, hidden: int, activation: str = "silu") -> None:
        super().__init__()
        _check_sizes(d_model=d_model, hidden=hidden)
        if not isinstance(activation, str) or activation not in _GATE_ACTIVATIONS:  # a list was unhashable
            raise ValueError(f"activation={activation!r}: expected one of {sorted(_GATE_ACTIVATIONS)}.")
        self.activation = activation
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # the gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # the value it gates
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(_GATE_ACTIVATIONS[self.activation](self.w1(x)) * self.w3(x))


class GatedTransformerBlock(nn.Module):
    """A pre-norm Transformer block as in LLaMA: ``x + attention(norm(x))``, then ``x + feed_forward(norm(x))``, with
    RMSNorm and a :class:`GatedFeedForward`."""

    def __init__(self, d_model: int, heads: int, hidden: int, activation: str = "silu") -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}.")
        self.attention_norm = nn.RMSNorm(d_model)
        self.attention = nn.MultiheadAttention(d_model, heads, bias=False, batch_first=True)
        self.feed_forward_norm = nn.RMSNorm(d_model)
        self.feed_forward = GatedFeedForward(d_model, hidden, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attention_norm(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.feed_forward(self.feed_forward_norm(x))


class GatedTransformerClassifier(Classifier):
    """:class:`TransformerClassifier` with LLaMA-style blocks (:class:`GatedTransformerBlock`: RMSNorm, SwiGLU
    feed-forward of width `feed_forward`) and a final RMSNorm. Structured pruning shrinks every block's
    feed-forward hidden channels (``w1``, ``w3`` and ``w2`` together)."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, d_model: int = 32, heads: int = 2, layers: int = 2,
                 feed_forward: int = 64, activation: str = "silu", num_classes: int = 10, lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        _check_sizes(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        _check_sizes(d_model=d_model, heads=heads, layers=layers, feed_forward=feed_forward)
        self.save_hyperparameters()
        self.embed = nn.Linear(in_channels * image_size, d_model)
        self.position = nn.Parameter(torch.zeros(1, image_size, d_model))
        self.blocks = nn.Sequential(*(GatedTransformerBlock(d_model, heads, feed_forward, activation)
                                      for _ in range(layers)))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.permute(0, 2, 1, 3).flatten(2)  # (N, C, H, W) -> (N, H, C * W)
        return self.head(self.norm(self.blocks(self.embed(rows) + self.position)).mean(1))


class DenseLayer(nn.Module):
    """DenseNet-BC's layer: it reads the concatenation of its block's earlier outputs through BatchNorm, ReLU and a
    1x1 conv to ``bottleneck * growth`` channels, then BatchNorm, ReLU and a zero-padded 3x3 conv to `growth`."""

    def __init__(self, channels: int, growth: int, bottleneck: int = 4) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, bottleneck * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck * growth)
        self.conv2 = nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        h = self.conv1(torch.relu(self.norm1(torch.cat(features, 1))))
        return self.conv2(torch.relu(self.norm2(h)))


class DenseNet(nn.Module):
    """DenseNet-BC's body and head: a 3x3 stem conv, `blocks` dense blocks of `layers` layers (each adds `growth`
    channels to the block's concatenation), a transition between blocks (BatchNorm, ReLU, a 1x1 conv halving the
    channels, 2x2 average pooling), then BatchNorm, ReLU, global average pooling and a Linear."""

    def __init__(self, in_channels: int, stem: int, growth: int, layers: int, blocks: int, num_classes: int,
                 stem_stride: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, stem, 3, stride=stem_stride, padding=1, bias=False)
        channels = stem
        self.blocks, self.transitions = nn.ModuleList(), nn.ModuleList()
        for index in range(blocks):
            self.blocks.append(nn.ModuleList(DenseLayer(channels + i * growth, growth) for i in range(layers)))
            channels += layers * growth
            if index < blocks - 1:
                self.transitions.append(nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(),
                                                      nn.Conv2d(channels, channels // 2, 1, bias=False),
                                                      nn.AvgPool2d(2)))
                channels //= 2
        self.norm, self.head = nn.BatchNorm2d(channels), nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for index, block in enumerate(self.blocks):
            features = [x]
            for layer in block:
                features.append(layer(features))
            x = torch.cat(features, 1)
            if index < len(self.transitions):
                x = self.transitions[index](x)
        pooled = nn.functional.adaptive_avg_pool2d(torch.relu(self.norm(x)), 1)
        return self.head(torch.flatten(pooled, 1))


class DenseNetClassifier(Classifier):
    """A small DenseNet-BC (:class:`DenseNet`): a stem of `stem` channels (stride `stem_stride`: 2 for images of 16
    pixels or more, else 1, unless given), `blocks` dense blocks of `layers` layers with growth rate `growth`, halving
    transitions between them. Structured pruning shrinks every conv: the pruned channels leave the concatenations
    that read them, and the BatchNorms after them (see :func:`litcompress.shrink`)."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, stem: int = 16, growth: int = 8, layers: int = 3,
                 blocks: int = 2, stem_stride: int | None = None, num_classes: int = 10, lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        _check_sizes(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        if stem_stride is None:
            stem_stride = 2 if image_size >= 16 else 1
        _check_sizes(stem=stem, growth=growth, layers=layers, blocks=blocks, stem_stride=stem_stride)
        side = -(-image_size // stem_stride)  # the stem's output side
        if side < 2 ** (blocks - 1):
            raise ValueError(f"image_size={image_size} is too small for {blocks} blocks after a stride-{stem_stride} "
                             f"stem: each transition halves it (need a side of {2 ** (blocks - 1)} after the stem).")
        self.save_hyperparameters()
        self.net = DenseNet(in_channels, stem, growth, layers, blocks, num_classes, stem_stride)


__all__ = ["CNNClassifier", "Classifier", "DenseLayer", "DenseNet", "DenseNetClassifier", "GatedFeedForward",
           "GatedTransformerBlock", "GatedTransformerClassifier", "InvertedResidualBlock", "LSTMClassifier",
           "MLPClassifier", "MobileNetClassifier", "ResNeXtBlock", "ResNeXtClassifier", "ResNetClassifier",
           "ResidualBlock", "TransformerClassifier"]
