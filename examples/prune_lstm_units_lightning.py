"""Prune half the hidden units of an LSTM with litcompress.callbacks.UnitPruning, then remove them with shrink.

The Lightning way: ``UnitPruning`` beside the Trainer masks the weakest hidden units (all their rows: every gate,
layer and direction) along a cubic schedule and makes the masks permanent at the end of fit. ``litcompress.shrink``
then removes those units from the LSTM and from the head that reads its last output: the same outputs, about a
quarter of the LSTM's weights (a unit's recurrent weights are 4H x H), less time per step. Lightning's own
``ModelPruning("ln_structured")`` on the LSTM's weight matrices would mask single gates, which nothing can remove.
With ``--save PATH`` the shrunk weights are saved and loaded back into a freshly built model. Runs in under a minute
on a laptop CPU on scikit-learn's digits (an 8x8 image read row by row; no download).
"""

from __future__ import annotations

import argparse
import os

import torch
from lightning.pytorch import Trainer, seed_everything

from litcompress import load_shrunk_state_dict, shrink
from litcompress.callbacks import UnitPruning
from litcompress.data import DigitsDataModule
from litcompress.models import LSTMClassifier
from litcompress.pruning.schedules import PolynomialDecay
from litcompress.quantization import measure_latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--units", type=float, default=0.5, help="fraction of the LSTM's hidden units pruned")
    parser.add_argument("--save", default="", help="save the shrunk weights here, then reload them into a fresh model")
    args = parser.parse_args()
    if args.save and os.path.isdir(args.save):  # (torch.save failed there after all the training)
        parser.error(f"--save {args.save} is a directory; give a file path, e.g. {os.path.join(args.save, 'model.pt')}")
    existing = os.path.dirname(os.path.abspath(args.save))
    while not os.path.lexists(existing):  # (a file in the way: "its folder does not exist" was said)
        existing = os.path.dirname(existing)
    if args.save and not os.path.isdir(existing):
        parser.error(f"--save {args.save}: {existing} is {'a broken link' if os.path.islink(existing) else 'a file'}, "
                     "not a folder")
    if args.save and not os.path.isdir(os.path.dirname(os.path.abspath(args.save))):
        parser.error(f"--save {args.save}: its folder does not exist")
    if not 0.0 < args.units < 1.0:
        parser.error(f"--units must be in (0, 1), got {args.units}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")

    seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64, flatten=False)
    data.setup()
    steps = args.epochs * len(data.train_dataloader())
    model = LSTMClassifier(hidden=128, layers=2, lr=3e-3)
    pruning = UnitPruning(PolynomialDecay(final_sparsity=args.units, begin=0, end=int(0.6 * steps), frequency=10))
    trainer = Trainer(max_epochs=args.epochs, callbacks=[pruning], logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False, accelerator="cpu")
    trainer.fit(model, datamodule=data)
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"]

    x, _ = next(iter(data.test_dataloader()))
    model.eval()
    result = shrink(model, x)  # a shrunk copy; `model` keeps its zeros
    with torch.no_grad():
        difference = float((result.model(x) - model(x)).abs().max())
    print(result.report.table())
    before, after = (row["median"] for row in measure_latencies([model, result.model], (x,), repeats=10,
                                                                  num_threads=1))
    print(f"test accuracy {accuracy:.2%}; largest output difference after shrinking {difference:.2e}; latency at "
          f"batch {len(x)}, 1 thread: {before * 1e3:.3f} -> {after * 1e3:.3f} ms ({before / after:.2f}x)")

    path = args.save
    if path:  # the narrow state dict no longer fits the constructor's widths: a fresh model is narrowed to it
        torch.save(result.model.state_dict(), path)
        reloaded = load_shrunk_state_dict(LSTMClassifier(**model.hparams), torch.load(path)).eval()
        with torch.no_grad():
            same = torch.equal(reloaded(x), result.model(x))
        print(f"saved {path}; reloaded into a fresh LSTMClassifier with {reloaded.lstm.hidden_size} units: "
              f"{sum(p.numel() for p in reloaded.parameters()):,} parameters, same outputs: {same}")


if __name__ == "__main__":
    main()
