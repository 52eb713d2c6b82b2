"""Benchmark what a pruning callback costs on the training steps where it prunes nothing, against Lightning's.

Lightning calls a callback's hooks around every training step (and reads its ``state_key`` for each, to name the
hook for its profiler). A callback that does work there slows every step of a long fit, pruning or not. Variants,
each a real ``lightning.Trainer`` fit of the same seeded MLP on the same synthetic data, in one process, interleaved
(bare, Lightning, litcompress, ..., then again):

* ``bare``: no callback;
* ``lightning``: ``lightning.pytorch.callbacks.ModelPruning("l1_unstructured", amount=0.5)`` (its defaults: a
  round at each training epoch's end, lottery ticket on, masks made permanent at the fit's end);
* ``litcompress``: ``litcompress.ModelPruning`` with the same arguments;
* ``litcompress-step``: ``litcompress.ModelPruning("l1_unstructured", amount=PolynomialDecay(initial_sparsity=0.5,
  final_sparsity=0.9, begin=0, end=100000, frequency=1000, unit="step"), use_lottery_ticket_hypothesis=False)``: a
  round every 1000 optimizer steps, so one at step 0 (to 50%, as the others' first round) and none in the steps
  measured (at most 2 x 1000): what a step-level schedule costs between its rounds.

Each fit runs two epochs of ``--steps`` batches; the time of a step is the time between two consecutive
``on_train_batch_start`` calls (a callback listed last), taken over the second epoch (the weights masked by the
first epoch's round) without its first 10 steps and its last step (the one followed by a round). The table gives
each variant's median step time over ``--repeats`` fits (min and max of the per-fit medians beside it) and the ratio
to the bare fit; the two callbacks' ratio is litcompress's median over Lightning's.

Usage::

    python benchmarks/callback_overhead.py [--steps 400] [--repeats 5] [--width 64] [--depth 3] [--threads 1]
    python benchmarks/callback_overhead.py --profile litcompress   # one fit under cProfile: where the time goes

``--profile VARIANT`` times nothing: it runs one fit of that variant under cProfile and prints the functions of
litcompress and of torch's pruning by their own time, per training step.

The last printed line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _pinning import pin_allocator  # noqa: E402

pin_allocator()  # before torch allocates anything (../shared/README.md)

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelPruning as LightningModelPruning  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from litcompress import ModelPruning  # noqa: E402
from litcompress.pruning.schedules import PolynomialDecay  # noqa: E402

VARIANTS = ("bare", "lightning", "litcompress", "litcompress-step")
WARM_UP_STEPS = 10


class MLP(L.LightningModule):
    def __init__(self, width: int, depth: int, steps: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(steps * 32, width, generator=generator)
        self.targets = torch.randint(0, 10, (steps * 32,), generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.inputs, self.targets), batch_size=32)


class StepTimes(L.Callback):
    """The time between consecutive training batch starts, per epoch."""

    def __init__(self) -> None:
        self.starts: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.setdefault(trainer.current_epoch, []).append(time.perf_counter())

    def step_times(self, epoch: int) -> list[float]:
        starts = self.starts[epoch]
        return [b - a for a, b in zip(starts[WARM_UP_STEPS:-1], starts[WARM_UP_STEPS + 1:])]


def make_callbacks(variant: str) -> list[L.Callback]:
    if variant == "bare":
        return []
    if variant == "lightning":
        return [LightningModelPruning("l1_unstructured", amount=0.5, verbose=0)]
    if variant == "litcompress":
        return [ModelPruning("l1_unstructured", amount=0.5, verbose=0)]
    schedule = PolynomialDecay(initial_sparsity=0.5, final_sparsity=0.9, begin=0, end=100_000, frequency=1000,
                               unit="step")
    return [ModelPruning("l1_unstructured", amount=schedule, use_lottery_ticket_hypothesis=False, verbose=0)]


def median_step_seconds(variant: str, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    model = MLP(args.width, args.depth, args.steps)
    timer = StepTimes()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[*make_callbacks(variant), timer])
    trainer.fit(model)
    return statistics.median(timer.step_times(1))


def profile(variant: str, args: argparse.Namespace) -> None:
    """One fit of `variant` under cProfile: litcompress's and torch.nn.utils.prune's functions by their own time, in
    microseconds per training step (both epochs)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(median_step_seconds, variant, args)
    steps = 2 * args.steps
    rows = [(own, calls, function) for function, (_, calls, own, _, _) in pstats.Stats(profiler).stats.items()
            if "litcompress" in function[0] or function[0].endswith("nn/utils/prune.py")]
    print(f"{variant}: own time per training step ({steps} steps), litcompress and torch.nn.utils.prune")
    for own, calls, (path, line, name) in sorted(rows, reverse=True)[:15]:
        print(f"{own / steps * 1e6:>8.2f} us  {calls / steps:>6.2f} calls/step  "
              f"{os.path.relpath(path) if 'litcompress' in path else 'torch/nn/utils/prune.py'}:{line}({name})")
    total = sum(own for own, _, _ in rows)
    print(f"{total / steps * 1e6:>8.2f} us per step in all (cProfile's own overhead included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="batches per epoch (default 400)")
    parser.add_argument("--repeats", type=int, default=5, help="fits per variant, interleaved (default 5)")
    parser.add_argument("--width", type=int, default=64, help="hidden width of the MLP (default 64)")
    parser.add_argument("--depth", type=int, default=3, help="hidden layers of the MLP (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--profile", choices=VARIANTS, help="profile one fit of this variant instead of timing")
    args = parser.parse_args()
    if not WARM_UP_STEPS + 2 < args.steps < 1000 or args.repeats < 1 or args.width < 1 or args.depth < 1 \
            or args.threads < 1:  # (1000: the step schedule's second round would fall in the steps timed)
        parser.error(f"--steps must be > {WARM_UP_STEPS + 2} and < 1000; --repeats, --width, --depth and --threads "
                     ">= 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # (Lightning's notes on workers and logging: the same for every variant)
    import logging

    for name in ("lightning.pytorch", "litcompress"):
        logging.getLogger(name).setLevel(logging.ERROR)

    if args.profile is not None:
        profile(args.profile, args)
        return
    runs: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS:  # interleaved: a drift of the machine touches every variant alike
            runs[variant].append(median_step_seconds(variant, args))
        print(f"  repeat {repeat}: " + ", ".join(f"{v} {runs[v][-1] * 1e6:.1f} us" for v in VARIANTS),
              file=sys.stderr)

    bare = statistics.median(runs["bare"])
    print(f"MLP {args.width}x{args.depth} (+ a 10-way head), batch 32, {args.steps} steps per epoch, second epoch, "
          f"{args.threads} thread(s), {args.repeats} fits per variant")
    print(f"{'variant':<18} {'median us/step':>15} {'min-max':>17} {'vs bare':>8}")
    figures = {}
    for variant in VARIANTS:
        median = statistics.median(runs[variant])
        figures[variant] = {"median_us": median * 1e6, "min_us": min(runs[variant]) * 1e6,
                            "max_us": max(runs[variant]) * 1e6, "vs_bare": median / bare}
        print(f"{variant:<18} {median * 1e6:>15.1f} "
              f"{f'{min(runs[variant]) * 1e6:.1f}-{max(runs[variant]) * 1e6:.1f}':>17} {median / bare:>7.3f}x")
    ratio = statistics.median(runs["litcompress"]) / statistics.median(runs["lightning"])
    print(f"litcompress / Lightning per step (same arguments): {ratio:.3f}x")
    print(json.dumps({"settings": vars(args), "variants": figures, "litcompress_over_lightning": ratio}))


if __name__ == "__main__":
    main()
