"""The compression pipeline without Lightning: a plain training loop, scikit-learn's digits, no download.

Trains an MLP, then `litcompress.compress` fine-tunes it in the same loop while removing half the rows of its hidden
layers (structured L2 pruning along a cubic schedule), shrinks it, quantizes it to int8 (the fastest backend within
1% of the pruned model's validation accuracy) and exports it. Prints the report; writes the files to --output-dir.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from litcompress import CompressionConfig, PruneConfig, compress
from litcompress.data import load_digits_tensors
from litcompress.pipeline.compress import OUTPUT_FILES, REPORT_FILES  # the names a run writes
from litcompress.quantization import PTQConfig


def accuracy_on(dataset) -> Callable[[nn.Module], float]:
    x, y = dataset.tensors

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    return accuracy


def train(model: nn.Module, loader: DataLoader, epochs: int, after_step: Callable[[int], None] | None = None) -> None:
    """Adam on cross-entropy; `after_step(t)` after the t-th optimizer step (where the pipeline prunes)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    step = 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            step += 1
            if after_step is not None:
                after_step(step)
    model.eval()


def check_output_dir(parser: argparse.ArgumentParser, output_dir: str) -> None:
    """At parse: compress refuses these only after the dense training, the report's save after the whole run."""
    if not output_dir:
        parser.error("--output-dir: name a folder to write to")
    existing = os.path.abspath(output_dir)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "a broken link" if os.path.islink(existing) else "a file"
        parser.error(f"--output-dir {output_dir}: {existing} is {what}; give a directory")
    paths = {name: os.path.join(output_dir, name) for name in (*OUTPUT_FILES, *REPORT_FILES)}
    # (a link to a folder is replaced by the file: not in the way)
    in_the_way = [name for name, path in paths.items() if os.path.isdir(path) and not os.path.islink(path)]
    if in_the_way:
        parser.error(f"--output-dir {output_dir}: {', '.join(in_the_way)} in it "
                     f"{'is a folder' if len(in_the_way) == 1 else 'are folders'}, where this run writes files")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10, help="dense training epochs")
    parser.add_argument("--fine-tune-epochs", type=int, default=5, help="fine-tuning epochs while pruning")
    parser.add_argument("--output-dir", default="out/plain_pytorch")
    args = parser.parse_args()
    check_output_dir(parser, args.output_dir)
    if args.epochs < 1 or args.fine_tune_epochs < 1:
        parser.error("--epochs and --fine-tune-epochs must be >= 1")

    torch.manual_seed(0)
    splits = load_digits_tensors(seed=0)
    loader = DataLoader(splits.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    train(model, loader, args.epochs)

    config = CompressionConfig(
        prune=PruneConfig(sparsity=0.5, method="ln_structured"),  # the classifier (last layer) stays whole
        quantize=PTQConfig(approach="dynamic"),
        num_threads=1,
    )
    result = compress(
        model, config,
        eval_fn=accuracy_on(splits.val), test_fn=accuracy_on(splits.test),
        example_inputs=splits.val.tensors[0][:64], calibration_data=loader,
        fine_tune=lambda m, step: train(m, loader, args.fine_tune_epochs, after_step=step),
        fine_tune_steps=args.fine_tune_epochs * len(loader),
        output_dir=args.output_dir, metric_name="val_acc", test_metric_name="test_acc",
    )
    written = result.report.save(args.output_dir)
    print(result.report.table())
    print(f"model: {result.artifact}\nreport: {', '.join(str(p) for p in written.values())}")


if __name__ == "__main__":
    main()
