"""Benchmark structured pruning as Lightning leaves it (zeros in place) against litcompress's `shrink` (zeros removed).

For each model, Lightning's own ``ModelPruning("ln_structured", pruning_dim=0, pruning_norm=1)`` prunes
``--amount`` of the output channels of every hidden layer (L1 norm of the filters/rows; the output layer is left
alone), and makes the pruning permanent, which is what a Lightning user ships: same shapes, zeros inside. Then
``litcompress.shrink`` removes those channels from a copy. Both models are compared in eval mode:

* parameters and the size of the saved ``state_dict``;
* latency of a forward pass (``torch.no_grad``), at batch 1 and a larger batch: the two variants are interleaved
  (masked, shrunk, masked, ...), ``--repeats`` timed blocks each, the median block time per forward is reported
  (min and max too) with the ratio masked / shrunk;
* the largest difference between their outputs (they compute the same function).

Models: ``cnn``, a VGG-style net for 3x32x32 inputs (six 3x3 convs 64-64-128-128-256-256 with BatchNorm + ReLU and
max-pooling, then 4096-512-10 Linear layers); ``mlp``, 1024-4096-4096-1024 Linear + ReLU; ``mobilenet``, a
MobileNetV3-style net for 3x64x64 inputs (``litcompress.models.MobileNetClassifier``: 4 inverted residual blocks of
32 channels expanded 6x around depthwise convs, with squeeze-and-excitation gates); ``transformer``, torch's
``nn.TransformerEncoder`` (4 layers, d_model 256, 4 heads, feed-forward 1024) on 64 tokens, then a Linear head;
``swiglu``, the same size with LLaMA-style blocks (``litcompress.models.GatedTransformerBlock``: RMSNorm, attention,
a SwiGLU feed-forward ``w2(silu(w1(x)) * w3(x))`` of 688 channels); ``transformer+heads`` and ``swiglu+heads``,
the same with ``--amount`` of each attention's heads masked too (``litcompress.pruning.prune_heads_``, the weakest by
norm; Lightning's callback has no head pruning, so both variants carry the same masks, made permanent) and removed
by ``shrink``;
``densenet``, a DenseNet-BC for 3x32x32 inputs (two dense blocks of 6 layers, growth 32, a halving transition);
``inception``, a GoogLeNet-style net for 3x32x32 inputs (three blocks of four concatenated branches, 320 channels);
``unet``, a U-Net for 3x64x64 inputs (three levels of 32-64-128 channels, bilinear upsampling, skip concatenations);
``signal``, a 1-d conv net for 8x1024 signals (four Conv1d-BN-ReLU layers of 64-128-128-256 channels, then
``x.mean(-1)`` and a Linear head); ``tcn``, Bai et al.'s temporal conv net for 8x1024 sequences (four residual blocks
of two dilated causal convs, 128 channels, chomped with ``x[:, :, :-p]``, the last step read); ``conformer``, four
attention-free Conformer blocks (width 144) on 256x80 frames: feed-forward halves and a convolution module
(pointwise conv, GLU, depthwise conv, BatchNorm, SiLU, pointwise conv); ``lstm``, a 2-layer ``nn.LSTM`` of 512 units
over 100 frames of 80 features, its last output read by a Linear head (Lightning's callback has no unit pruning:
``--amount`` of the LSTM's hidden units are masked by ``litcompress.pruning.recurrent.prune_units_``, the weakest by
norm, in both variants, made permanent, and removed by ``shrink``); ``lstm-text``, a text classifier of 64 tokens
(20,000-word embedding of 128 dims, sequences packed by their lengths, from 16 to 64, with ``pack_padded_sequence``, a
2-layer bidirectional LSTM of 256 units, attention pooling over its padded outputs, a Linear head), its units masked
and removed the same way; ``lstm-text+embeddings``, the same with ``--amount`` of the embedding's dims masked too
(``torch.nn.utils.prune.ln_structured`` along its weight's columns, L1) and removed; ``textcnn``, Kim's CNN for
sentence classification (the same embedding moved to the channels by ``permute(0, 2, 1)``, three Conv1d of 100
filters, widths 3-5, max over time, a Linear head), ``--amount`` of the embedding's dims masked the same way and
removed from it and the three convs' inputs.
Lightning's callback prunes the layers whose channels ``shrink`` can remove
(``litcompress.pruning.removable_channels``): every hidden layer of the first two; the expand convs and the gates'
squeeze convs of the MobileNet; the feed-forward blocks' first layers of the Transformer; ``w1`` and ``w3`` of the
SwiGLU blocks, each on its own (shrink removes the channels zero in either); every conv of the DenseNet,
the Inception net and the U-Net but its head, whose outputs branch into several concatenations or consumers; every
conv of the signal net; the first conv of each TCN block (the second writes into the residual stream); the
Conformer's feed-forward first layers and its GLU convs (under Lightning's masks these keep their channels: the
depthwise conv's bias makes a pruned channel constant, not zero, after the GLU; the pipeline, which holds those biases
at zero, removes them).
Weights are random (seeded): latency and size do not depend on training.

Benchmarking rules from ../shared/README.md: glibc's allocator thresholds pinned, ``torch.set_num_threads`` pinned,
variants interleaved, medians. Usage::

    python benchmarks/shrink.py [--amount 0.5] [--threads 1] [--repeats 15]

The last printed line is one JSON object with all figures; ``--write`` puts the table into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pinning import pin_allocator  # noqa: E402

pin_allocator()

import torch  # noqa: E402  (after pinning the allocator)
from lightning.pytorch import LightningModule  # noqa: E402
from lightning.pytorch.callbacks import ModelPruning as LightningModelPruning  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import torch.nn.utils.prune as torch_prune  # noqa: E402

from litcompress import make_permanent_, shrink  # noqa: E402
from litcompress.models import GatedTransformerBlock  # noqa: E402
from litcompress.pruning import prune_heads_, removable_channels, residual_groups  # noqa: E402
from litcompress.pruning.recurrent import prune_units_  # noqa: E402
from mnist_sparsity import replace_section  # noqa: E402


class VGGish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width, pool in ((64, False), (64, True), (128, False), (128, True), (256, False), (256, True)):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(256 * 4 * 4, 512), nn.ReLU(), nn.Linear(512, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SignalNet(nn.Module):
    """A 1-d conv net for signals of 8 channels (audio features, sensors): four Conv1d-BatchNorm-ReLU layers of
    64-128-128-256 channels (three of stride 2), global average pooling written as ``x.mean(-1)``, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 8
        for width, kernel, stride in ((64, 7, 1), (128, 5, 2), (128, 5, 2), (256, 3, 2)):
            layers += [nn.Conv1d(channels, width, kernel, stride=stride, padding=kernel // 2), nn.BatchNorm1d(width),
                       nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(-1))


class TokenTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(256, 4, dim_feedforward=1024, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


class GatedTokenTransformer(nn.Module):
    """LLaMA-style blocks (RMSNorm, attention, SwiGLU feed-forward of 688 = 8/3 * 256 rounded up to 16) on tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(GatedTransformerBlock(256, 4, 688) for _ in range(4)))
        self.norm = nn.RMSNorm(256)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(x)).mean(1))


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """torchvision's BasicConv2d: a conv without bias, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class DenseLayer(nn.Module):
    """DenseNet-BC's layer: BN-ReLU-conv1x1 to 4x growth, BN-ReLU-conv3x3 to growth, on the concatenation of every
    earlier output of its block."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, 4 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(torch.relu(self.norm1(torch.cat(features, 1))))
        return self.conv2(torch.relu(self.norm2(x)))


class DenseNet(nn.Module):
    """A DenseNet-BC for 3x32x32 inputs: a 3x3 stem of 64, two dense blocks of 6 layers (growth 32) with a halving
    transition (BN-ReLU-conv1x1, average pooling) between them, then BN-ReLU, global pooling and a Linear."""

    def __init__(self, growth: int = 32, layers: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        channels = 64
        self.block1 = nn.ModuleList(DenseLayer(channels + i * growth, growth) for i in range(layers))
        channels += layers * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels // 2, 1,
                                                                                        bias=False), nn.AvgPool2d(2))
        channels //= 2
        self.block2 = nn.ModuleList(DenseLayer(channels + i * growth, growth) for i in range(layers))
        channels += layers * growth
        self.norm, self.head = nn.BatchNorm2d(channels), nn.Linear(channels, 10)

    @staticmethod
    def dense_block(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in layers:
            features.append(layer(features))
        return torch.cat(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transition(self.dense_block(self.block1, self.stem(x)))
        x = torch.relu(self.norm(self.dense_block(self.block2, x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InceptionBlock(nn.Module):
    """GoogLeNet's block: 1x1; 1x1 then 3x3; 1x1 then two 3x3 (Inception-v3's 5x5); 3x3 max-pool then 1x1;
    concatenated."""

    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.branch1 = conv_bn_relu(cin, width, 1)
        self.branch3 = nn.Sequential(conv_bn_relu(cin, width, 1), conv_bn_relu(width, 2 * width, 3))
        self.branch5 = nn.Sequential(conv_bn_relu(cin, width // 2, 1), conv_bn_relu(width // 2, width, 3),
                                     conv_bn_relu(width, width, 3))
        self.pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_bn_relu(cin, width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.pool(x)], 1)


class Inception(nn.Module):
    """A GoogLeNet-style net for 3x32x32 inputs: a 3x3 stem of 64, three Inception blocks (5x64 = 320 channels
    out each, a max-pool after the first), global pooling and a Linear."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 64, 3)
        self.block1, self.block2 = InceptionBlock(64, width), InceptionBlock(5 * width, width)
        self.block3, self.head = InceptionBlock(5 * width, width), nn.Linear(5 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(F.max_pool2d(self.block1(self.stem(x)), 2)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class UNet(nn.Module):
    """A U-Net for 3x64x64 inputs: three encoder levels of two conv-BN-ReLU (32, 64, 128 channels, max-pooling
    between), a decoder that upsamples (bilinear), concatenates the skip and applies two conv-BN-ReLU per level, and a
    1x1 conv to 2 classes per pixel."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        cin, self.down = 3, nn.ModuleList()
        for width in widths:
            self.down.append(nn.Sequential(conv_bn_relu(cin, width, 3), conv_bn_relu(width, width, 3)))
            cin = width
        self.up = nn.ModuleList(nn.Sequential(conv_bn_relu(deep + skip, skip, 3), conv_bn_relu(skip, skip, 3))
                                for deep, skip in zip(widths[:0:-1], widths[-2::-1]))
        self.head = nn.Conv2d(widths[0], 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index, level in enumerate(self.down):
            x = level(F.max_pool2d(x, 2) if index else x)
            skips.append(x)
        for level, skip in zip(self.up, skips[-2::-1]):
            x = level(torch.cat([F.interpolate(x, scale_factor=2.0, mode="bilinear"), skip], 1))
        return self.head(x)


def randomise_batch_norms_(model: nn.Module) -> None:
    """BatchNorm statistics as after training, so the folded constants are not trivial."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.normal_(0, 0.1)


def build(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    """(model, one input's shape, the larger batch size)."""
    torch.manual_seed(0)
    if name == "mobilenet":
        from litcompress.models import MobileNetClassifier

        model = MobileNetClassifier(in_channels=3, image_size=64, width=32, blocks=4, expansion=6,
                                    squeeze_excitation=True).net
        randomise_batch_norms_(model)
        return model.eval(), (3, 64, 64), 32
    if name == "transformer":
        return TokenTransformer().eval(), (64, 256), 16
    if name == "swiglu":
        return GatedTokenTransformer().eval(), (64, 256), 16
    if name in ("densenet", "inception"):
        model = DenseNet() if name == "densenet" else Inception()
        randomise_batch_norms_(model)
        return model.eval(), (3, 32, 32), 32
    if name == "unet":
        model = UNet()
        randomise_batch_norms_(model)
        return model.eval(), (3, 64, 64), 8
    if name == "cnn":
        model = VGGish()
        randomise_batch_norms_(model)
        return model.eval(), (3, 32, 32), 32
    if name == "signal":
        model = SignalNet()
        randomise_batch_norms_(model)
        return model.eval(), (8, 1024), 32
    if name == "tcn":
        return TCN().eval(), (8, 1024), 32
    if name == "lstm":
        return FrameLSTM().eval(), (100, 80), 16
    if name == "lstm-text":
        return TextLSTM().eval(), (TextLSTM.LENGTH,), 32
    if name == "textcnn":
        return TextCNN().eval(), (TextLSTM.LENGTH,), 32
    if name == "conformer":
        model = Conformer()
        randomise_batch_norms_(model)
        return model.eval(), (256, 80), 16
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1024))
    return model.eval(), (1024,), 64


def prune_like_lightning(model: nn.Module, amount: float) -> nn.Module:
    """Lightning's ModelPruning, ln_structured on dim 0, made permanent (what gets shipped), on the layers whose
    channels shrink can remove (the output layer is not one of them)."""
    modules = dict(model.named_modules())
    # residual streams only shrink when pruned as one group, which Lightning's callback does not do; a gated
    # feed-forward's w1 and w3 shrink by the union of their zero channels, so each is pruned on its own as usual
    names = [name for name, reason in removable_channels(model, residual_groups=False).items() if reason is None]
    names += [name for group in residual_groups(model) if group.joined_by == ("multiplication",)
              for name in group.producers]
    hidden = [modules[name] for name in names]
    holder = LightningModule()
    holder.net = model
    callback = LightningModelPruning(
        "ln_structured", parameters_to_prune=[(m, "weight") for m in hidden], amount=amount, pruning_dim=0,
        pruning_norm=1, use_global_unstructured=False, use_lottery_ticket_hypothesis=False, verbose=0,
    )
    callback.setup(None, holder, "fit")
    callback.apply_pruning(amount)
    callback.make_pruning_permanent(holder)
    return model


def state_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def block_seconds(model: nn.Module, x: torch.Tensor | tuple, forwards: int) -> float:
    args = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(forwards):
            model(*args)
        return (time.perf_counter() - start) / forwards


def interleaved(variants: dict[str, nn.Module], x: torch.Tensor | tuple, repeats: int) -> dict[str, list[float]]:
    """Per-forward seconds of `repeats` blocks per variant (on input `x`, or the inputs in the tuple `x`), the
    variants alternating block by block."""
    with torch.no_grad():
        for model in variants.values():  # warm-up (first-call allocations, oneDNN primitive creation)
            for _ in range(3):
                model(*(x if isinstance(x, tuple) else (x,)))
        first = block_seconds(next(iter(variants.values())), x, 1)
    forwards = max(3, min(200, int(0.2 / max(first, 1e-6))))  # ~0.2 s of the first variant's calls, every block alike
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, model in variants.items():
            times[name].append(block_seconds(model, x, forwards))
    return times


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class TemporalBlock(nn.Module):
    """Bai et al.'s TCN block: two dilated causal convs (padded on both sides, the extra steps chomped off,
    ``x[:, :, :-padding]``) with ReLU, and a residual (a 1x1 conv where the width changes)."""

    def __init__(self, cin: int, cout: int, dilation: int, kernel: int = 3) -> None:
        super().__init__()
        self.chomp = (kernel - 1) * dilation
        self.conv1 = nn.Conv1d(cin, cout, kernel, padding=self.chomp, dilation=dilation)
        self.conv2 = nn.Conv1d(cout, cout, kernel, padding=self.chomp, dilation=dilation)
        self.down = nn.Conv1d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x)[:, :, :-self.chomp].contiguous())
        h = torch.relu(self.conv2(h)[:, :, :-self.chomp].contiguous())
        return torch.relu(h + (x if self.down is None else self.down(x)))


class TCN(nn.Module):
    """A TCN for 8x1024 sequences: four temporal blocks of 128 channels (dilations 1, 2, 4, 8), the last step read by
    a Linear head."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(TemporalBlock(8 if i == 0 else width, width, 2 ** i) for i in range(4)))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x)[:, :, -1])


class ConformerBlock(nn.Module):
    """A Conformer block without attention: half-step feed-forward, convolution module (pointwise conv to twice the
    width, GLU, depthwise conv, BatchNorm, SiLU, pointwise conv), half-step feed-forward, LayerNorm."""

    def __init__(self, width: int, kernel: int = 15) -> None:
        super().__init__()
        self.ff1, self.ff2 = (nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.SiLU(),
                                            nn.Linear(4 * width, width)) for _ in range(2))
        self.conv_norm = nn.LayerNorm(width)
        self.pointwise1, self.glu = nn.Conv1d(width, 2 * width, 1), nn.GLU(dim=1)
        self.depthwise = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)
        self.bn, self.pointwise2 = nn.BatchNorm1d(width), nn.Conv1d(width, width, 1)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        y = self.glu(self.pointwise1(self.conv_norm(x).transpose(1, 2)))
        x = x + self.pointwise2(F.silu(self.bn(self.depthwise(y)))).transpose(1, 2)
        return self.norm(x + 0.5 * self.ff2(x))


class Conformer(nn.Module):
    """Four Conformer blocks (width 144, as Conformer-S) on 256 frames of 80 features, mean-pooled into a Linear."""

    def __init__(self, width: int = 144) -> None:
        super().__init__()
        self.inp = nn.Linear(80, width)
        self.blocks = nn.Sequential(*(ConformerBlock(width) for _ in range(4)))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.inp(x)).mean(1))


class FrameLSTM(nn.Module):
    """A 2-layer LSTM of 512 units over frames of 80 features (a keyword spotter's shape); its last output goes to
    a Linear head."""

    def __init__(self, hidden: int = 512) -> None:
        super().__init__()
        self.lstm = nn.LSTM(80, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


class TextLSTM(nn.Module):
    """A text classifier: token ids (a vocabulary of 20,000) embedded in 128 dims, packed by their lengths
    (``pack_padded_sequence``), a 2-layer bidirectional LSTM of 256 units, its padded outputs pooled by attention
    (scores from a Linear layer, padding masked) into a Linear head."""

    LENGTH = 64

    def __init__(self, vocabulary: int = 20_000, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, 128)
        self.lstm = nn.LSTM(128, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.score, self.head = nn.Linear(2 * hidden, 1), nn.Linear(2 * hidden, 4)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)
        steps = torch.arange(out.size(1)).unsqueeze(0)
        scores = self.score(out).squeeze(-1).masked_fill(steps >= lengths.unsqueeze(1), float("-inf"))
        return self.head((torch.softmax(scores, dim=1).unsqueeze(-1) * out).sum(1))


class TextCNN(nn.Module):
    """Kim's CNN for sentence classification: token ids embedded in 128 dims (a vocabulary of 20,000), moved to the
    channels by ``permute(0, 2, 1)``, three Conv1d of 100 filters (widths 3, 4, 5), ReLU, max over time, joined, a
    Linear head."""

    def __init__(self, vocabulary: int = 20_000, dims: int = 128, filters: int = 100) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, dims)
        self.convs = nn.ModuleList(nn.Conv1d(dims, filters, width) for width in (3, 4, 5))
        self.head = nn.Linear(3 * filters, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).permute(0, 2, 1)
        return self.head(torch.cat([torch.relu(conv(x)).amax(-1) for conv in self.convs], dim=1))


def inputs(name: str, batch: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """A model's inputs at `batch`: random features; for the text models token ids, and for the LSTM their lengths
    (the longest one the full length, the others from a quarter of it up)."""
    if name == "textcnn":
        return (torch.randint(0, 20_000, (batch, shape[0]), generator=torch.Generator().manual_seed(batch)),)
    if name != "lstm-text":
        return (torch.randn(batch, *shape),)
    generator = torch.Generator().manual_seed(batch)
    lengths = torch.randint(shape[0] // 4, shape[0] + 1, (batch,), generator=generator)
    lengths[0] = shape[0]
    return torch.randint(0, 20_000, (batch, shape[0]), generator=generator), lengths


def run(name: str, amount: float, repeats: int, log: Callable[[str], None],
        keep_multiple_of: int | None = None) -> dict:
    base, _, extra = name.partition("+")
    model, shape, big_batch = build(base)
    if base == "textcnn":
        # the embedding's dims, along its weight's columns (Lightning's callback prunes dim 0: the vocabulary)
        masked = model
        torch_prune.ln_structured(masked.embed, "weight", amount=amount, n=1, dim=1)
        make_permanent_(masked)
    elif base in ("lstm", "lstm-text"):
        # Lightning has no unit pruning: the same units masked in place, what a mask ships
        masked = model
        prune_units_(masked, amount)
        make_permanent_(masked)
    else:
        masked = prune_like_lightning(model, amount)
    if extra == "heads":  # Lightning has no head pruning: the same heads masked in place, what a mask ships
        prune_heads_(masked, amount)
        make_permanent_(masked)
    if extra == "embeddings":  # the embedding's dims too: torch's ln_structured along its weight's columns
        torch_prune.ln_structured(masked.embed, "weight", amount=amount, n=1, dim=1)
        make_permanent_(masked)
    probe = inputs(base, 8, shape)
    result = shrink(masked, probe, keep_multiple_of=keep_multiple_of)
    shrunk = result.model.eval()
    with torch.no_grad():
        difference = float((masked(*probe) - shrunk(*probe)).abs().max())
    log(result.report.table())
    out: dict = {
        "model": name,
        "parameters": {"masked": sum(p.numel() for p in masked.parameters()),
                       "shrunk": sum(p.numel() for p in shrunk.parameters())},
        "state_dict_bytes": {"masked": state_bytes(masked), "shrunk": state_bytes(shrunk)},
        "max_abs_output_difference": difference,
        "report": result.report.table(),
        "latency": {},
    }
    for batch in (1, big_batch):
        x = inputs(base, batch, shape)
        times = interleaved({"masked": masked, "shrunk": shrunk}, x, repeats)
        out["latency"][batch] = {
            "masked_s": stats(times["masked"]), "shrunk_s": stats(times["shrunk"]),
            "speedup_median": statistics.median(times["masked"]) / statistics.median(times["shrunk"]),
        }
    return out


def table(results: list[dict]) -> str:
    lines = ["| model | parameters (masked -> shrunk) | state_dict | batch | latency masked (median, min-max) "
             "| latency shrunk | speed-up | max output diff. |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        p, s = r["parameters"], r["state_dict_bytes"]
        for batch, lat in r["latency"].items():
            m, k = lat["masked_s"], lat["shrunk_s"]
            lines.append(
                f"| {r['model']} | {p['masked']:,} -> {p['shrunk']:,} ({p['shrunk'] / p['masked']:.2f}x) "
                f"| {s['masked'] / 2**20:.1f} -> {s['shrunk'] / 2**20:.1f} MiB | {batch} "
                f"| {m['median'] * 1e3:.2f} ms ({m['min'] * 1e3:.2f}-{m['max'] * 1e3:.2f}) "
                f"| {k['median'] * 1e3:.2f} ms ({k['min'] * 1e3:.2f}-{k['max'] * 1e3:.2f}) "
                f"| **{lat['speedup_median']:.2f}x** | {r['max_abs_output_difference']:.1e} |"
            )
    return "\n".join(lines)


MODELS = ("cnn", "mlp", "mobilenet", "transformer", "transformer+heads", "swiglu", "swiglu+heads", "densenet",
          "inception", "unet", "signal", "tcn", "conformer", "lstm", "lstm-text", "lstm-text+embeddings", "textcnn")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amount", type=float, default=0.5, help="fraction of each hidden layer's channels pruned")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per variant and batch size")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--keep-multiple-of", type=int, help="shrink keeps a multiple of this many channels per layer")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    if not 0.0 < args.amount < 1.0:
        parser.error("--amount must be in (0, 1)")
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    if args.keep_multiple_of is not None and args.keep_multiple_of < 1:
        parser.error(f"--keep-multiple-of must be >= 1, got {args.keep_multiple_of}")
    results = [run(name, args.amount, args.repeats, print, args.keep_multiple_of) for name in args.models]
    text = table(results)
    print(text)
    command = "python benchmarks/shrink.py" + "".join(
        f" --{k} {v}" for k, v in (("amount", args.amount), ("threads", args.threads), ("repeats", args.repeats),
                                   ("models", " ".join(args.models)), ("keep-multiple-of", args.keep_multiple_of))
        if v is not None)
    reports = "\n\n".join(f"{r['model']}:\n{r['report']}" for r in results)
    if args.write:
        replace_section(REPO / "BENCHMARKS.md", "shrink", f"""## Structured pruning: masked (Lightning) vs shrunk (litcompress) (`benchmarks/shrink.py`)

Command: `{command}` ({datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}, torch {torch.__version__},
{args.threads} thread(s), allocator pinned, variants interleaved, {args.repeats} blocks of equal call counts: ~0.2 s of
the first variant's calls, at most 200).
Lightning's `ModelPruning("ln_structured", pruning_dim=0, pruning_norm=1, amount={args.amount})` prunes, once, the
layers whose channels `shrink` can remove (`litcompress.pruning.removable_channels`: every hidden layer of the CNN
and the MLP, the expand and squeeze convs of the MobileNet, the Transformer's feed-forward `linear1`s, the SwiGLU
blocks' `w1` and `w3` (each on its own: shrink removes the channels zero in either), every conv of
the DenseNet, the Inception net and the U-Net but its head, every conv of the signal net) and makes it permanent
(the `+heads` rows: `--amount` of each attention's heads masked too, by `litcompress.pruning.prune_heads_`, as
Lightning cannot; both variants carry those zeros); `litcompress.shrink` then removes the zero channels and heads
(from the depthwise convs, gates, concatenations and BatchNorms on the way too, and folds their constant outputs
into the next layers' biases). Same inputs, eval mode,
`torch.no_grad()`.

{text}

What `shrink` did (its report; "left": zero filters that had to stay because their constant output, ReLU(BN(bias)),
feeds a zero-padded conv, where it is not constant at the border: removing them would change the outputs):

```
{reports}
```
""")
    print(json.dumps({"command": command, "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
