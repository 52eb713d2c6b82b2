"""Quantization-aware training against post-training quantization and torch.ao's (deprecated) FX QAT, on real MNIST.

A small ResNet (``litcompress.models.ResNetClassifier``: a 3x3 conv stem, two residual blocks of `width` channels,
global pooling, a Linear head; widths 8 and 16, the size a pruned and shrunk model ends at) is trained in fp32 with a
Lightning ``Trainer`` (Adam, learning rate 3e-3 cosine-annealed to 0 per step, batch 128, ``--epochs`` epochs). From
those weights, per seed, every fine-tuning row trains ``--qat-epochs`` more epochs from the same weights, in the same
data order, at 1e-4 cosine-annealed to 0:

* ``ptq``: static int8 PTQ, torch.ao (fbgemm/x86 kernels), per-channel weights, min-max ranges from 8 training
  batches: what PTQ gives without more training;
* ``fine-tune + ptq``: the same PTQ after those epochs in fp32 (the control: QAT trains that much longer, and this
  row says what the extra epochs alone are worth);
* ``litcompress qat``: those epochs with ``litcompress.callbacks.QuantizationAwareTraining`` (torchao PT2E QAT), its
  int8 model; latency timed compiled (``compile=True``'s inductor kernels) and as converted (torch's reference ops);
* ``qat weights + ptq``: the fp32 weights ``litcompress qat`` trained, quantized by the ``ptq`` row's recipe (what
  QAT's weights give a backend that calibrates them again);
* ``torch.ao fx qat``: those epochs on ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` (x86 QAT qconfig
  mapping), ``convert_fx``: the deprecated path Lightning 1.x's QAT era left users with.

Accuracy on the 10k test images (and validation), mean ± std over seeds. Latency: the first seed's int8 models and
the fp32 model, batch 64, interleaved (allocator and threads pinned, medians; ../shared/README.md).

Usage::

    python benchmarks/qat.py [--widths 8 16] [--seeds 0 1 2] [--epochs 5] [--qat-epochs 1] [--threads 1]

The last printed line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pinning import pin_allocator  # noqa: E402

pin_allocator()  # before torch allocates anything (../shared/README.md)

import torch  # noqa: E402
from lightning.pytorch import Trainer, seed_everything  # noqa: E402
from torch import nn  # noqa: E402

from litcompress.callbacks import QuantizationAwareTraining  # noqa: E402
from litcompress.data import MNISTDataModule  # noqa: E402
from litcompress.models import ResNetClassifier  # noqa: E402
from litcompress.quantization import Recipe, get_backend  # noqa: E402
from litcompress.quantization.backends.pt2e import CompiledInference  # noqa: E402
from litcompress.quantization.latency import measure_latencies  # noqa: E402

ARMS = ("ptq", "fine-tune + ptq", "litcompress qat", "qat weights + ptq", "torch.ao fx qat")


class CosineResNet(ResNetClassifier):
    """The built-in ResNet classifier with its learning rate cosine-annealed to 0 over the fit's steps."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _trainer(epochs: int, callbacks: list | None = None) -> Trainer:
    return Trainer(max_epochs=epochs, callbacks=callbacks or [], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                   num_sanity_val_steps=0, limit_val_batches=0)


def _accuracy(model: nn.Module, split) -> float:
    x, y = split.tensors
    with torch.no_grad():
        right = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(y), 1000))
    return right / len(y)


def _ptq(model: nn.Module, calibration: list[tuple]) -> nn.Module:
    recipe = Recipe("torch_ao", "static", per_channel=True, calibration="minmax")
    return get_backend("torch_ao").quantize(copy.deepcopy(model).eval(), recipe, calibration[0], calibration)


def _fine_tuned(module: CosineResNet, data: MNISTDataModule, epochs: int, seed: int,
                callbacks: list | None = None) -> CosineResNet:
    seed_everything(seed + 1000)  # the same data order and dropout draws for every arm
    module.lr = 1e-4
    module.train()  # Lightning keeps a submodule's mode: a copy of an evaluated model would train in eval mode
    _trainer(epochs, callbacks).fit(module, datamodule=data)
    return module.eval()


def run_seed(width: int, seed: int, args: argparse.Namespace, data: MNISTDataModule) -> dict:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    seed_everything(seed)
    dense = CosineResNet(image_size=28, width=width, lr=3e-3)
    started = time.perf_counter()
    _trainer(args.epochs).fit(dense, datamodule=data)
    dense.eval()
    train_x = data.splits.train.tensors[0]
    calibration = [(train_x[i:i + 128],) for i in range(0, 8 * 128, 128)]
    models = {"fp32": dense.net}
    models["ptq"] = _ptq(dense.net, calibration)
    tuned = _fine_tuned(copy.deepcopy(dense), data, args.qat_epochs, seed)
    models["fine-tune fp32"] = tuned.net
    models["fine-tune + ptq"] = _ptq(tuned.net, calibration)
    callback = QuantizationAwareTraining("net")
    qat_trained = _fine_tuned(copy.deepcopy(dense), data, args.qat_epochs, seed, [callback])
    models["litcompress qat"] = callback.result.model
    models["qat weights + ptq"] = _ptq(qat_trained.net, calibration)
    peer = copy.deepcopy(dense)
    peer.net = prepare_qat_fx(peer.net.train(), get_default_qat_qconfig_mapping("x86"), calibration[0])
    _fine_tuned(peer, data, args.qat_epochs, seed)
    models["torch.ao fx qat"] = convert_fx(peer.net.eval())
    accuracy = {name: {"test": _accuracy(m, data.splits.test), "val": _accuracy(m, data.splits.val)}
                for name, m in models.items()}
    print(f"width {width} seed {seed} ({time.perf_counter() - started:.0f} s): "
          + ", ".join(f"{k} {v['test']:.4f}" for k, v in accuracy.items()), flush=True)
    return {"accuracy": accuracy, "models": models}


def latencies(models: dict[str, nn.Module], threads: int, repeats: int) -> dict[str, float]:
    x = torch.rand(64, 1, 28, 28)
    timed = dict(models)
    timed["litcompress qat"] = CompiledInference(models["litcompress qat"].program)  # compile=True's kernels
    timed["litcompress qat, reference ops"] = models["litcompress qat"]  # as converted (compile=False) or loaded
    names = ["fp32", "ptq", "litcompress qat", "litcompress qat, reference ops", "torch.ao fx qat"]
    for name in names:
        with torch.no_grad():
            timed[name](x)  # compile / warm up outside the timed blocks
    stats = measure_latencies([timed[n] for n in names], (x,), repeats=repeats, num_threads=threads)
    return {name: s["median"] * 1e3 for name, s in zip(names, stats)}


def untrained_int8_models(width: int, calibration: list[tuple]) -> dict[str, nn.Module]:
    """The latency rows' models with initial weights (speed does not depend on what was learnt), one training step of
    each QAT so that its ranges are set, for ``--latency-only``."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    from litcompress.quantization.qat import prepare_qat

    torch.manual_seed(0)
    net = CosineResNet(image_size=28, width=width).net
    qat = prepare_qat(net, calibration[0])
    qat.train()(*calibration[1])
    peer = prepare_qat_fx(copy.deepcopy(net).train(), get_default_qat_qconfig_mapping("x86"), calibration[0])
    peer(*calibration[1])
    return {"fp32": net.eval(), "ptq": _ptq(net, calibration), "litcompress qat": qat.convert().model,
            "torch.ao fx qat": convert_fx(peer.eval())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--train-limit", type=int, default=None, help="train on this many images (a quick check)")
    which = parser.add_mutually_exclusive_group()  # both: it ran latency only, without a word
    which.add_argument("--skip-latency", action="store_true", help="accuracy only (e.g. widths run in parallel)")
    which.add_argument("--latency-only", action="store_true",
                       help="latency only, of untrained models (no training; run on a quiet machine)")
    args = parser.parse_args()
    for name in ("epochs", "qat_epochs", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_limit is not None and args.train_limit < 1:
        parser.error(f"--train-limit must be >= 1, got {args.train_limit}")
    if not args.seeds or any(w < 1 for w in args.widths):
        parser.error("--seeds needs one seed at least, and --widths positive widths")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("litcompress").setLevel(logging.WARNING)
    data = MNISTDataModule(batch_size=128, flatten=False, train_limit=args.train_limit)
    data.setup()
    started, report = time.perf_counter(), {}
    if args.latency_only:
        train_x = data.splits.train.tensors[0]
        calibration = [(train_x[i:i + 128],) for i in range(0, 8 * 128, 128)]
        for width in args.widths:
            figures = latencies(untrained_int8_models(width, calibration), args.threads, args.repeats)
            print(f"width {width}, batch 64, {args.threads} thread(s), median ms: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
                  + "; speed-up vs fp32: " + ", ".join(f"{k} {figures['fp32'] / v:.2f}x" for k, v in figures.items()
                                                        if k != "fp32"))
            report[width] = figures
        print(json.dumps({"latency_ms": report, "threads": args.threads, "repeats": args.repeats}))
        return
    for width in args.widths:
        runs = [run_seed(width, seed, args, data) for seed in args.seeds]
        report[width] = {"accuracy": [r["accuracy"] for r in runs],
                         "latency_ms": {} if args.skip_latency else latencies(runs[0]["models"], args.threads,
                                                                              args.repeats)}
    print(f"\nMNIST test accuracy (%), mean ± std over seeds {args.seeds}; {args.epochs} fp32 epochs, "
          f"{args.qat_epochs} more for the fine-tuned and QAT rows; latency: batch 64, {args.threads} thread(s)\n")
    print(f"| width | model | test acc. | Δ vs fp32 (pt) | val acc. | latency ms (seed {args.seeds[0]}) |")
    print("|---:|---|---:|---:|---:|---:|")
    for width, figures in report.items():
        fp32 = [a["fp32"]["test"] * 100 for a in figures["accuracy"]]
        for name in ("fp32", "fine-tune fp32", *ARMS):
            test = [a[name]["test"] * 100 for a in figures["accuracy"]]
            val = [a[name]["val"] * 100 for a in figures["accuracy"]]
            std = statistics.stdev(test) if len(test) > 1 else 0.0
            delta = statistics.mean(t - f for t, f in zip(test, fp32))
            latency = figures["latency_ms"].get(name)
            print(f"| {width} | {name} | {statistics.mean(test):.2f} ± {std:.2f} | "
                  f"{'' if name == 'fp32' else f'{delta:+.2f}'} | {statistics.mean(val):.2f} | "
                  f"{'' if latency is None else f'{latency:.2f}'} |")
        reference_ops = figures["latency_ms"].get("litcompress qat, reference ops")
        if reference_ops is not None:  # the QAT row's model as converted (compile=False): its latency only
            print(f"| {width} | litcompress qat, reference ops | | | | {reference_ops:.2f} |")
    print(f"\nWall time {(time.perf_counter() - started) / 60:.1f} min; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.")
    print(json.dumps({"widths": {str(w): {"accuracy": f["accuracy"], "latency_ms": f["latency_ms"]}
                                 for w, f in report.items()}, "seeds": args.seeds, "epochs": args.epochs,
                      "qat_epochs": args.qat_epochs, "threads": args.threads}))


if __name__ == "__main__":
    main()
