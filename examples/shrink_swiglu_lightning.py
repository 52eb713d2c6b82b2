"""Prune a LLaMA-style Transformer's SwiGLU feed-forward blocks with litcompress.ModelPruning, then shrink them.

The Lightning way: ``ModelPruning("ln_structured")`` on each block's ``w1`` and ``w3`` (each layer picks its own rows,
on a cubic schedule), made permanent at the end of fit. Lightning stops there, zeros inside; ``litcompress.shrink``
then removes them: a channel of ``silu(w1(x)) * w3(x)`` is zero when either factor's is, so the union of both
layers' zero rows leaves ``w1``, ``w3`` and ``w2``, and the outputs stay the same. With ``--save PATH`` the shrunk
weights are saved and loaded back into a freshly built model (``litcompress.load_shrunk_state_dict``). Runs in under
a minute on a laptop CPU on scikit-learn's digits (no download).
"""

from __future__ import annotations

import argparse
import os

import torch
from lightning.pytorch import Trainer, seed_everything

from litcompress import ModelPruning, load_shrunk_state_dict, shrink
from litcompress.data import DigitsDataModule
from litcompress.models import GatedTransformerClassifier
from litcompress.pruning.schedules import PolynomialDecay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--amount", type=float, default=0.5, help="fraction of w1's and of w3's rows pruned")
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
    if not 0.0 < args.amount < 1.0:
        parser.error(f"--amount must be in (0, 1), got {args.amount}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")

    seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64, flatten=False)  # 1x8x8 images: 8 rows of 8 pixels as tokens
    data.setup()
    steps = args.epochs * len(data.train_dataloader())
    model = GatedTransformerClassifier(d_model=32, heads=2, layers=2, feed_forward=64, lr=3e-3)
    gates = [(m, "weight") for name, m in model.named_modules() if name.endswith((".w1", ".w3"))]
    pruning = ModelPruning(
        "ln_structured", parameters_to_prune=gates, pruning_dim=0, pruning_norm=2,
        amount=PolynomialDecay(final_sparsity=args.amount, begin=0, end=int(0.6 * steps), frequency=10),
        use_global_unstructured=False, use_lottery_ticket_hypothesis=False, verbose=0,
    )
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
    for name, m in model.named_modules():
        if name.endswith(".feed_forward"):
            zero_w1, zero_w3 = ((layer.weight == 0).all(1) for layer in (m.w1, m.w3))
            # removed as the shrunk model has it: shrink keeps one channel of a block whose every channel is zero
            removed = m.w1.out_features - result.model.get_submodule(name).w1.out_features
            print(f"{name}: {int(zero_w1.sum())} zero rows in w1, {int(zero_w3.sum())} in w3, "
                  f"{removed} channels removed")
    print(f"test accuracy {accuracy:.2%}; largest output difference after shrinking {difference:.2e}")

    # Shipping the narrow weights: their state dict no longer fits the constructor's widths, so a fresh model is
    # narrowed to it when loading (a Lightning checkpoint of the shrunk module: litcompress.load_module_from_checkpoint).
    path = args.save
    if path:
        torch.save(result.model.state_dict(), path)
        reloaded = load_shrunk_state_dict(GatedTransformerClassifier(**model.hparams), torch.load(path)).eval()
        with torch.no_grad():
            same = torch.equal(reloaded(x), result.model(x))
        print(f"saved {path}; reloaded into a fresh GatedTransformerClassifier: "
              f"{sum(p.numel() for p in reloaded.parameters()):,} parameters, same outputs: {same}")


if __name__ == "__main__":
    main()
