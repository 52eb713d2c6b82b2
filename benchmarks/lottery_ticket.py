"""Lottery tickets on LeNet-300-100 / real MNIST: iterative magnitude pruning with litcompress's Lightning driver.

Frankle & Carbin (2019): train, prune 20% of each hidden layer's remaining weights (10% of the output layer's), rewind
the survivors to their initial values, retrain; after 15 rounds 3.57% of the weights remain. The claim checked here:
the ticket's test accuracy is at least the dense network's (round 0, same per-round budget), and a random
re-initialisation of the same sparse architecture (the control) is clearly below it.

Every round trains with the same recipe (``LOTTERY_RECIPE``: the first recipe chosen on validation data for the
sparsity benchmark, SGD + Nesterov, peak LR 0.2 cosine-annealed to 0, L2 5e-4, batch 128; the rewinding step was
chosen for it) for ``--epochs`` epochs through ``litcompress.callbacks.lottery.find_lottery_ticket`` (a fresh
``Trainer`` per round). Test accuracy is only reported, never used for a choice: choices are made with ``--split val``.

Usage::

    python benchmarks/lottery_ticket.py [--seeds 0 1 2] [--epochs 5] [--rounds 15] [--quick]
    python benchmarks/lottery_ticket.py --scope global --rewind-to-step 98     # the configuration in BENCHMARKS.md
    python benchmarks/lottery_ticket.py --split val --seeds 100 101 ...        # choose a configuration

With ``--split val`` every round is evaluated on the 10k validation images instead of the test set.

Prints a per-round table per seed, a summary, and as its last line one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pinning import pin_allocator  # noqa: E402

pin_allocator()  # before torch allocates anything, as every benchmark here

import torch  # noqa: E402
from lightning.pytorch import LightningDataModule, seed_everything  # noqa: E402

from _mnist_common import LeNet300100, Recipe, _batches, accuracy, load_mnist  # noqa: E402

from litcompress.callbacks.lottery import find_lottery_ticket  # noqa: E402


# Kept when the sparsity benchmark moved to batch 32 / lr 0.1 / L2 2.5e-4: --rewind-to-step 98 (a quarter epoch at
# batch 128) and every lottery figure in BENCHMARKS.md were chosen and measured with this recipe.
LOTTERY_RECIPE = Recipe(batch_size=128, optimizer="sgd", lr=0.2, weight_decay=5e-4)


class InMemoryMNIST(LightningDataModule):
    """MNIST from the cached tensors of the benchmark harness (no per-sample collate: fast on 2 cores)."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe

    def train_dataloader(self):
        train, _, _ = load_mnist()
        if self.recipe.train_subset:
            train = (train[0][: self.recipe.train_subset], train[1][: self.recipe.train_subset])
        return _batches(train, self.recipe.batch_size, shuffle=True)

    def val_dataloader(self):
        return _batches(load_mnist()[1], 10_000, shuffle=False)

    def test_dataloader(self):
        return _batches(load_mnist()[2], 10_000, shuffle=False)


class LeNetWithTest(LeNet300100):
    """Logs ``test_acc`` / ``val_acc``: the metrics ``find_lottery_ticket`` reads after each round."""

    def _log_accuracy(self, name: str, batch) -> None:
        x, y = batch
        self.log(name, (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        self._log_accuracy("test_acc", batch)

    def validation_step(self, batch, batch_idx):
        self._log_accuracy("val_acc", batch)


def run_seed(seed: int, recipe: Recipe, rounds: int, scope: str, rate: float, rewind_to_step: int | None,
             split: str = "test", retrain_from: str = "start") -> dict:
    """IMP from seed `seed`; every round is evaluated on `split` ("test", or "val" to choose configurations)."""
    seed_everything(seed, verbose=False)
    module = LeNetWithTest(recipe)
    start = time.perf_counter()
    # Validation only where asked for, and then only by `Trainer.validate` after each round (never during `fit`).
    validation = dict(limit_val_batches=1.0, check_val_every_n_epoch=recipe.epochs + 1) if split == "val" else \
        dict(limit_val_batches=0)
    ticket = find_lottery_ticket(
        module, InMemoryMNIST(recipe), metric=f"{split}_acc", rounds=rounds, rate=rate, scope=scope,
        evaluate_on="validate" if split == "val" else "test",
        layer_rates={"fc3.weight": rate / 2} if scope == "local" else None,
        trainer_kwargs=dict(max_epochs=recipe.epochs, accelerator="cpu", devices=1, num_sanity_val_steps=0,
                            deterministic=True, **validation),
        rewind_to_step=rewind_to_step, control="final", retrain_from=retrain_from,
    )
    seconds = time.perf_counter() - start
    print(f"\nseed {seed} ({seconds:.0f} s)\n{ticket.table()}", flush=True)
    evaluated = load_mnist()[1 if split == "val" else 2]
    assert abs(accuracy(ticket.model, evaluated) - ticket.rounds[-1].metric) < 1e-6
    return {
        "seed": seed,
        "seconds": seconds,
        "rounds": [
            {"round": r.round, "remaining": r.remaining, f"{split}_acc": r.metric,
             f"control_{split}_acc": r.control_metric}
            for r in ticket.rounds
        ],
    }


def mean_std(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.2f} ± {100 * (statistics.stdev(values) if len(values) > 1 else 0):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5, help="training epochs per round")
    parser.add_argument("--rounds", type=int, default=15, help="pruning rounds (15 -> 3.57%% remaining)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scope", choices=["local", "global"], default="local",
                        help="local: each layer loses `rate` per round (the output layer rate/2), as Frankle & Carbin;"
                             " global: one magnitude ranking over all layers")
    parser.add_argument("--rate", type=float, default=0.2, help="fraction of the remaining weights pruned per round")
    parser.add_argument("--rewind-to-step", type=int, default=None,
                        help="late rewinding: train this many steps first and rewind there (dense round 0 too); "
                             "0 rewinds to initialisation, as without it")
    parser.add_argument("--retrain-from", choices=["start", "rewind_point"], default="start",
                        help="start: every round trains --epochs epochs afresh (its LR schedule restarted); "
                             "rewind_point (with --rewind-to-step k): every round resumes the fit at step k and "
                             "trains the rest of the --epochs epochs, as Frankle et al. 2020 / OpenLTH")
    defaults = LOTTERY_RECIPE
    parser.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default=defaults.optimizer)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak LR, cosine-annealed to 0 in every round")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="what every round is evaluated on: 'val' (the 10k validation images) to choose a "
                             "configuration, 'test' to report the chosen one")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch, 3 rounds, 5k images")
    args = parser.parse_args()
    if min(args.epochs, args.rounds, args.threads, args.batch_size) < 1:
        parser.error("--epochs, --rounds, --threads and --batch-size must be >= 1")
    if not 0 < args.lr < float("inf"):  # a negative one failed in torch after the data loaded; 0 trained nothing
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.rewind_to_step is not None and args.rewind_to_step < 0:
        parser.error(f"--rewind-to-step must be >= 0 (0: initialisation), got {args.rewind_to_step}")
    args.rewind_to_step = args.rewind_to_step or None  # 0: initialisation, which the library names None
    if args.quick:
        args.seeds, args.epochs, args.rounds = args.seeds[:1], 1, 3
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*|.*LeafSpec.*|.*val_dataloader.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    recipe = Recipe(epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                    batch_size=args.batch_size, train_subset=5000 if args.quick else None)

    if not 0 < args.rate < 1:
        parser.error("--rate must be in (0, 1)")
    split = args.split
    if args.retrain_from == "rewind_point" and args.rewind_to_step is None:
        parser.error("--retrain-from rewind_point needs --rewind-to-step k")
    runs = [run_seed(seed, recipe, args.rounds, args.scope, args.rate, args.rewind_to_step, split, args.retrain_from)
            for seed in args.seeds]
    dense = [run["rounds"][0][f"{split}_acc"] for run in runs]
    ticket = [run["rounds"][-1][f"{split}_acc"] for run in runs]
    control = [run["rounds"][-1][f"control_{split}_acc"] for run in runs]
    remaining = runs[0]["rounds"][-1]["remaining"]
    round_means = [statistics.mean(run["rounds"][r][f"{split}_acc"] for run in runs) for r in range(args.rounds + 1)]
    best_round = max(range(args.rounds + 1), key=round_means.__getitem__)
    print(f"\nLeNet-300-100, MNIST, {args.scope} IMP at {args.rate:.0%} per round, {args.epochs} epochs per round,"
          f" {len(runs)} seed(s); {split} accuracy, mean ± std")
    print(f"{'network':42} {'weights left':>12} {f'{split} acc [%]':>14}")
    print(f"{'dense (round 0)':42} {'100.00%':>12} {mean_std(dense):>14}")
    print(f"{f'ticket (round {args.rounds})':42} {remaining:>12.2%} {mean_std(ticket):>14}")
    print(f"{'random re-init, same mask (control)':42} {remaining:>12.2%} {mean_std(control):>14}")
    print(f"ticket - dense: {100 * (statistics.mean(ticket) - statistics.mean(dense)):+.2f} pt; "
          f"ticket - control: {100 * (statistics.mean(ticket) - statistics.mean(control)):+.2f} pt; "
          f"best mean round: {best_round}")
    print("mean per round (weights left: acc, pt vs dense): " + "; ".join(
        f"{r} ({runs[0]['rounds'][r]['remaining']:.2%}): {100 * m:.2f}, {100 * (m - round_means[0]):+.2f}"
        for r, m in enumerate(round_means)))
    print(json.dumps({
        "recipe": dataclasses.asdict(recipe), "rewind_to_step": args.rewind_to_step,
        "retrain_from": args.retrain_from, "scope": args.scope,
        "rate": args.rate, "epochs_per_round": args.epochs, "rounds": args.rounds, "seeds": args.seeds,
        "remaining": remaining,
        "split": split, f"dense_{split}_acc": dense, f"ticket_{split}_acc": ticket, f"control_{split}_acc": control,
        "runs": runs,
    }))


if __name__ == "__main__":
    main()
