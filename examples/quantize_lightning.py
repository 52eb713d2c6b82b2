"""Accuracy-aware post-training int8 quantization of a trained LightningModule (the Intel Neural Compressor 2.x
workflow: calibrate, quantize, evaluate, fall back until the loss is within tolerance).

Trains a small CNN on scikit-learn's digits, then searches static int8 candidates across the installed backends,
judged by the module's own logged `val_acc`, keeps the fastest one within `--tolerance` of fp32 on this host,
writes it as one file and loads it back. No download; well under a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

from litcompress.data import DigitsDataModule
from litcompress.models import CNNClassifier
from litcompress.quantization import AccuracyCriterion, PTQConfig, load_quantized
from litcompress.quantization.lightning import QUIET_CPU_TRAINER, quantize_lightning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=0.01, help="tolerated relative loss of val_acc")
    parser.add_argument("--max-trials", type=int, default=6)
    parser.add_argument("--output", type=Path, default=Path(tempfile.gettempdir()) / "digits_cnn.int8")
    args = parser.parse_args()
    if args.output.is_dir():  # (refused by save_quantized after the training and the search)
        parser.error(f"--output {args.output} is a directory; give a file path, e.g. {args.output / 'model.int8'}")
    folder = args.output.absolute().parent
    while not folder.exists():  # the folder save_quantized will make, or the part of it that exists
        folder = folder.parent
    if not folder.is_dir():
        parser.error(f"--output {args.output}: {folder} is a file, not a folder")
    if args.epochs < 1 or args.max_trials < 1:  # --epochs 0 quantized an untrained CNN
        parser.error("--epochs and --max-trials must be >= 1")
    if not 0.0 <= args.tolerance < 1.0:
        parser.error(f"--tolerance must be in [0, 1), got {args.tolerance}")

    seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64, flatten=False)  # 1x8x8 images for the CNN
    module = CNNClassifier(lr=3e-3)
    Trainer(max_epochs=args.epochs, **QUIET_CPU_TRAINER).fit(module, datamodule=data)

    config = PTQConfig(approach="static", accuracy=AccuracyCriterion(tolerable_loss=args.tolerance),
                       max_trials=args.max_trials, num_threads=1)
    result = quantize_lightning(module, config, metric="val_acc", datamodule=data)
    print(result.table())
    for message in result.messages:
        print("-", message)
    goal = "within the tolerance" if result.goal_met else "goal NOT met (see the messages above)"
    print(f"chosen: {result.recipe.describe() if result.recipe else 'fp32 (see the messages above)'}, {goal}; "
          f"val_acc {result.metric:.4f} vs fp32 {result.baseline_metric:.4f}, "
          f"{result.speedup:.2f}x faster, weights {result.size_bytes / result.baseline_size_bytes:.2f}x the size")

    size = result.save(args.output)
    loaded, recipe = load_quantized(args.output)  # e.g. in the serving process: no re-tuning
    x, _ = next(iter(data.test_dataloader()))
    with torch.no_grad():
        same = torch.equal(loaded(x).argmax(1), result.model(x).argmax(1))
    # (the file holds the program and the recipe too: larger than the weights alone)
    print(f"wrote {args.output} ({size / 1024:.1f} KiB, the whole file); reloaded, same predictions: {same}")


if __name__ == "__main__":
    main()
