"""Accuracy of LeNet-300-100 on MNIST at 90-98% weight sparsity: dense vs Lightning's ModelPruning vs litcompress.

Every row uses the same recipe (see ``_mnist_common.Recipe``), the same seeds and the same epoch budget; the model
evaluated is the one at the end of training (no epoch selection; the test set is used for nothing else).

    python benchmarks/mnist_sparsity.py                  # full table, refreshes its section of BENCHMARKS.md
    .venv/bin/python benchmarks/mnist_sparsity.py --quick          # smoke test (1 seed, 2 epochs, 5k images)

The last printed line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelPruning as LightningModelPruning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mnist_common import Recipe, RunResult, train_and_evaluate  # noqa: E402

from litcompress import ModelPruning  # noqa: E402
from litcompress.pruning.schedules import PolynomialDecay  # noqa: E402

ROWS = ("dense", "lightning", "litcompress")
ROW_LABELS = {"dense": "dense", "lightning": "Lightning ModelPruning", "litcompress": "litcompress (cubic)"}
REPO = Path(__file__).resolve().parent.parent


# How the recipe and the schedule were chosen (validation accuracy only; kept in the Markdown section).
SELECTION_NOTES = """\
How the recipe and the schedule were chosen (choices made on validation accuracy only, seed 0 then seeds
100/101/102, which the table does not use): with the litcompress row at 98%, Adam lr 1e-3 (the first recipe tried)
gave 96.7%; Adam 2e-3/3e-3/5e-3/1e-2, AdamW (wd 0.1), batch 64 and SGD-Nesterov 0.05/0.1/0.2/0.3 gave 97.2-97.9%;
SGD-Nesterov 0.2 with L2 5e-4 gave 98.1/98.0% (wd 1e-3: 97.9/97.9%). With that recipe, schedule variants (begin at
10% of training, end at 70%, at 95/97/98%; end at 50%, a round every 50 steps, at 95/97%; and on three seeds at
95/97%: end at 40%, begin 20% / end 70%, a round every 20 steps) were all within 0.1 pt of begin 0 / end 60% / a
round every 100 steps on validation, which was best at 98% and is kept for every target. A second search on six
seeds (`--seeds 100 101 102 103 104 105 --targets 0.95 0.97 --rows litcompress --no-write` plus the flags named;
validation; `--rows dense`: 98.28%) at 95/97%: begin 0 / end 60% / every 100 steps 98.19/98.07%; `--end 0.4
--frequency 50` 98.11/98.01%; `--begin 0.05 --end 0.5 --frequency 50` 98.17/98.09%; `--weight-decay 2.5e-4` (this
row only) 98.23/98.09%; `--lr 0.3` 98.03/98.00%: nothing separates from the kept configuration by more than the
noise, which puts it at -0.09/-0.21 pt from dense on validation, at the issue's bars. A third search, on the shared
recipe (every row; six seeds 100-105; validation; dense / 95% / 97%; batch sizes with `--batch-size N --lr X
--weight-decay Y --rows dense litcompress`, label smoothing and standardised inputs in throwaway copies): label
smoothing 0.1 98.41/98.27/98.10%; inputs standardised 98.20/98.08/97.98%; batch 64 at lr 0.1 98.33/98.22/98.10% and
at lr 0.2 98.27/98.23/98.17%; batch 32 at lr 0.05 98.36/98.21/98.08%, lr 0.1 98.32/98.25/98.18% (90%: 98.28, 98%:
98.03), lr 0.15 -/98.12/98.11%; batch 32, lr 0.1, L2 2.5e-4: 98.36/98.30/98.17% (90%: 98.31, 98%: 98.06; batch 128:
98.22 and 97.92). That last recipe was at least as good as batch 128 on every row, dense included, and is the recipe
of the table. Smaller batches help the sparse rows more than dense (more optimizer steps in the same 10 epochs).
Also tried on the litcompress row only, as throwaway prototypes, no gain: a cosine restart at the end of pruning
(peak 0.1 or 0.05), keeping the output layer denser (its magnitudes scaled by 3), powerpropagation (w = v|v|,
97.62/97.60% on two seeds). With the new recipe, at 95/97% (validation, seeds 100-105; kept schedule 98.30/98.17%):
`--end 0.5` 98.28/98.20%, `--end 0.7` 98.27/98.15%, `--begin 0.1` 98.24/98.07%, `--frequency 400` 98.28/98.21%;
batch 16 at lr 0.05 (every row) 98.34/98.25/98.23%: no change beyond the noise, so the schedule stays as it was.
A fifth search (same seeds and split, kept configuration 98.30/98.17%): L2 1e-4 98.24/98.12% and 5e-5 98.13/98.06%
(litcompress row only; less regularisation does not help the sparse nets); `--power 2`/`5` (through ScheduleConfig in
a throwaway copy) 98.27/98.18% and 98.27/98.23%; and, as a throwaway prototype on seeds 100/101 at 95% only (kept
configuration 98.30%), second-order pruning (oBERT-style: block-diagonal empirical Fisher from the last 64
mini-batch gradients, blocks of 50, OBS scores w^2 / 2[F^-1]_ii with the OBS weight update): 98.06% (damping 1e-2),
98.19% (1e-1), 98.24% (1), 98.07% (scores without the update), at 2.5x the training time. A sixth search (seeds
100-105, validation, 95%; a throwaway prototype of the kept schedule scored 98.30%, as litcompress does): global
magnitude scaled by sqrt(fan-in) per layer 98.23%; the magnitude of an exponential average of the weights (decay
0.99) as the score 98.30%. Also checked: no first-layer weight on the 67 pixels that are zero in every training
image survives at 95% (they keep their initial magnitude, but trained weights are larger), so no budget is lost
to them. A seventh search (same seeds, validation, 95%, throwaway prototypes): pruning that lets weights come back,
dynamic pruning with feedback (Lin et al. 2020: the mask recomputed from the dense weights on the cubic schedule,
gradients of the masked model applied to the dense weights): mask every 16 steps to the end of training 98.25%,
schedule ending at 40% of training 98.13%, every 16 steps to 80% then fixed 98.24%, every 100 steps to 60% then
fixed 97.96%. Nothing beat the kept configuration.
An eighth search (same seeds, validation, 95%, throwaway prototypes; kept configuration 98.30%, dense 98.365%):
orphan-aware magnitude pruning (kept weights into units without inputs, folded into the next bias, or out of units
without outputs do not count against the budget; only 10-19 of 13,310 kept weights are such orphans at the end of
pruning) 98.31%; Wanda-style scores (|w| times the input's RMS on 2,048 training images) 98.15%; the mean
contribution of each pruned weight added to its unit's bias 98.24%; an average of the weights after the last round
(EMA 0.999 98.30%, SWA over the last 20% 98.31%, on dense 98.365% and 98.36%): the cosine schedule already ends at lr
0. Nothing beat the kept configuration by more than the noise."""

# The issue's bars for the litcompress row: (target, kind, value); "delta" is test accuracy minus dense, in points.
ISSUE_BARS = ((0.95, "delta", -0.1), (0.97, "delta", -0.2), (0.98, "acc", 97.8))


# ----------------------------------------------------------------------------- the litcompress schedule
@dataclass(frozen=True)
class ScheduleConfig:
    """The one gradual-pruning configuration used for every target, as fractions of the run so it scales with
    ``--epochs``: rounds every `frequency` optimizer steps from `begin` to `end`."""

    begin: float = 0.0  # fraction of all optimizer steps
    end: float = 0.6  # fraction of all optimizer steps
    frequency: int = 100  # optimizer steps between rounds
    power: float = 3.0  # Zhu & Gupta cubic

    def in_steps(self, total_steps: int) -> tuple[int, int, int]:
        """(begin, end, frequency) in optimizer steps; `frequency` is capped so a short run still has ~10 rounds."""
        begin, end = round(self.begin * total_steps), max(1, round(self.end * total_steps))
        frequency = max(1, min(self.frequency, (end - begin) // 10))
        return begin, end, frequency


SCHEDULE = ScheduleConfig()
IMPLEMENTATION = "litcompress.ModelPruning"


def litcompress_pruning_callback(target: float, steps_per_epoch: int, epochs: int) -> Callback:
    """The litcompress row: ``litcompress.ModelPruning`` with a Zhu & Gupta cubic schedule of the total sparsity
    (``SCHEDULE``), global L1 over all weights, lottery ticket off.

    """
    begin, end, frequency = SCHEDULE.in_steps(steps_per_epoch * epochs)
    schedule = PolynomialDecay(final_sparsity=target, begin=begin, end=end, frequency=frequency,
                               power=SCHEDULE.power, unit="step")
    return ModelPruning("l1_unstructured", amount=schedule, parameter_names=["weight"],
                        use_global_unstructured=True, use_lottery_ticket_hypothesis=False)


# ----------------------------------------------------------------------------- Lightning's callback, per its docs
def lightning_pruning_callback(target: float, epochs: int) -> Callback:
    """Lightning's ``ModelPruning`` as its docs suggest: a callable amount over the first half of training whose
    compound per-epoch amounts reach `target` (each round prunes a fraction of what remains), global L1 on the
    weights, lottery ticket off."""
    rounds = max(1, epochs // 2)
    per_round = 1.0 - (1.0 - target) ** (1.0 / rounds)
    return LightningModelPruning(
        "l1_unstructured",
        amount=lambda epoch: per_round if epoch < rounds else 0.0,
        use_global_unstructured=True,
        parameter_names=["weight"],
        use_lottery_ticket_hypothesis=False,
        verbose=0,
    )


def make_callbacks(row: str, target: float, recipe: Recipe) -> list[Callback]:
    """The only thing that differs between rows."""
    if row == "dense":
        return []
    if row == "lightning":
        return [lightning_pruning_callback(target, recipe.epochs)]
    if row == "litcompress":
        return [litcompress_pruning_callback(target, recipe.steps_per_epoch(), recipe.epochs)]
    raise ValueError(f"unknown row {row!r}; expected one of {ROWS}")


def _run(job: tuple[str, float, int, Recipe, ScheduleConfig, int | None]) -> RunResult:
    """One training run (top level so a worker process can run it)."""
    global SCHEDULE
    row, target, seed, recipe, schedule, threads = job
    SCHEDULE = schedule
    result = train_and_evaluate(row, target, seed, recipe, lambda: make_callbacks(row, target, recipe), threads)
    impl = {"dense": "-", "lightning": "lightning.pytorch.callbacks.ModelPruning"}.get(row, IMPLEMENTATION)
    return dataclasses.replace(result, implementation=impl)


# ----------------------------------------------------------------------------- aggregation and output
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: Sequence[RunResult]) -> list[dict]:
    """One entry per (row, target): mean and sample std over seeds of sparsity, validation and test accuracy."""
    groups: dict[tuple[str, float], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.row, r.target), []).append(r)
    summary = []
    for (row, target), runs in sorted(groups.items(), key=lambda kv: (ROWS.index(kv[0][0]), kv[0][1])):
        entry: dict = {"row": row, "target": target, "seeds": sorted(r.seed for r in runs),
                       "implementation": ", ".join(sorted({r.implementation for r in runs}))}
        for key in ("sparsity", "val_acc", "test_acc"):
            mean, std = _mean_std([getattr(r, key) for r in runs])
            entry[key] = {"mean": mean, "std": std}
        summary.append(entry)
    return summary


def table(summary: Sequence[dict], markdown: bool) -> str:
    """Plain-text or Markdown table; Δ is the test-accuracy gap to the dense row, in points."""
    dense = next((e["test_acc"]["mean"] for e in summary if e["row"] == "dense"), None)
    header = ("method", "target", "sparsity reached", "test acc. (%)", "Δ vs dense (pt)", "val acc. (%)")
    rows = []
    for e in summary:
        pct = lambda s: f"{100 * e[s]['mean']:.2f} ± {100 * e[s]['std']:.2f}"  # noqa: E731
        delta = "" if dense is None or e["row"] == "dense" else f"{100 * (e['test_acc']['mean'] - dense):+.2f}"
        target = "-" if e["row"] == "dense" else f"{e['target']:.0%}"
        label = ROW_LABELS[e["row"]]
        rows.append((label, target, pct("sparsity"), pct("test_acc"), delta, pct("val_acc")))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def bars(summary: Sequence[dict]) -> list[str]:
    """The litcompress rows against the issue's bars, one phrase each (only for targets that were run)."""
    dense = next((e["test_acc"]["mean"] for e in summary if e["row"] == "dense"), None)
    phrases = []
    for target, kind, bar in ISSUE_BARS:
        e = next((e for e in summary if e["row"] == "litcompress" and abs(e["target"] - target) < 1e-9), None)
        if e is None or (kind == "delta" and dense is None):
            continue
        acc = 100 * e["test_acc"]["mean"]
        value = acc - 100 * dense if kind == "delta" else acc
        met = value >= bar - 1e-9
        # two decimals, or three where two would round a missed bar to one that reads as met (or the reverse)
        digits = 2 if (round(value, 2) >= bar - 1e-9) == met else 3
        shown = (f"{value:+.{digits}f} pt vs dense (bar >= {bar:+.1f})" if kind == "delta"
                 else f"{value:.{digits}f}% (bar >= {bar}%)")
        phrases.append(f"{target:.0%}: {shown} {'met' if met else '**missed**'}")
    return phrases


def replace_section(path: Path, name: str, text: str) -> None:
    """Put `text` between the ``<!-- name:begin -->``/``<!-- name:end -->`` markers of `path` (appended if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    current = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        replaced, tail = rest.split(end, 1)
        # a section written by hand between the markers (a heading of its own) would be lost without a word
        headings = [line for line in replaced.splitlines() if line.startswith("## ")]
        if len(headings) > 1:
            raise SystemExit(f"{path}: the {name} markers enclose other sections too ({headings[1:]}): move "
                             f"'{begin}' down to the section's own heading first.")
        updated = head + block + tail
    else:
        updated = current.rstrip() + ("\n\n" if current.strip() else "") + block + "\n"
    path.write_text(updated)


def write_markdown(path: Path, summary: Sequence[dict], command: str, recipe: Recipe, schedule: ScheduleConfig,
                   seeds: Sequence[int], wall: float, jobs: int) -> None:
    """(Re)write the results section with the table and the exact command."""
    total = recipe.epochs * recipe.steps_per_epoch()
    begin, end, frequency = schedule.in_steps(total)
    optimizer = {"sgd": "SGD with Nesterov momentum 0.9", "adam": "Adam", "adamw": "AdamW"}[recipe.optimizer]
    impl = ", ".join(sorted({e["implementation"] for e in summary if e["row"] == "litcompress"})) or "-"
    text = f"""## MNIST: LeNet-300-100 at 90-98% weight sparsity

Produced by (from the repository root):

```bash
{command}
```

LeNet-300-100 (784-300-100-10, 266,200 weights) on real MNIST (50k train / 10k validation / 10k test), seeds
{", ".join(map(str, seeds))}, mean ± sample std over seeds. Every row: {optimizer} (peak lr {recipe.lr:g},
cosine-annealed to 0 per step, L2 weight decay {recipe.weight_decay:g}), batch {recipe.batch_size}, {recipe.epochs}
epochs ({total} steps), same initial weights and data order per seed; the final model is evaluated (no epoch
selection, the test set is used for nothing else). Sparsity is measured on the weights of the three Linear layers
(biases are not pruned).

- **Lightning ModelPruning**: `lightning.pytorch.callbacks.ModelPruning("l1_unstructured",
  amount=lambda e: 1 - (1 - target) ** (1 / {max(1, recipe.epochs // 2)}) if e < {max(1, recipe.epochs // 2)} else 0,
  use_global_unstructured=True, parameter_names=["weight"], use_lottery_ticket_hypothesis=False)`,
  i.e. one round at the end of each epoch over the first half of training.
- **litcompress (cubic)**: `litcompress.ModelPruning("l1_unstructured", amount=PolynomialDecay(final_sparsity=target,
  begin={begin}, end={end}, frequency={frequency}, power={schedule.power:g}, unit="step"), parameter_names=["weight"],
  use_lottery_ticket_hypothesis=False)` (ran: {impl}): Zhu & Gupta cubic schedule of the total sparsity, global
  magnitude (L1) over all weights, a round every {frequency} steps from step {begin} to step {end}
  ({schedule.begin:.0%}-{schedule.end:.0%} of training), then fine-tuning with the mask fixed. One configuration
  for every target.

{table(summary, markdown=True)}

litcompress against the issue's bars: {"; ".join(bars(summary)) or "-"}.

{SELECTION_NOTES}

Wall time {wall / 60:.1f} min ({jobs} process(es), 1 thread each, on 2 shared CPU cores);
{datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}.
"""
    replace_section(path, "mnist_sparsity", text)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.90, 0.95, 0.97, 0.98])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 2 epochs, 5k training images")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with 1 torch thread)")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md", help="its mnist_sparsity section")
    parser.add_argument("--no-write", action="store_true", help="do not write --output (implied by --quick)")
    parser.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default=Recipe.optimizer)
    parser.add_argument("--lr", type=float, default=Recipe.lr, help="peak LR (cosine-annealed per step)")
    parser.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    parser.add_argument("--weight-decay", type=float, default=Recipe.weight_decay)
    parser.add_argument("--begin", type=float, default=SCHEDULE.begin,
                        help="litcompress: first round, fraction of steps")
    parser.add_argument("--end", type=float, default=SCHEDULE.end, help="litcompress: last round, fraction of steps")
    parser.add_argument("--frequency", type=int, default=SCHEDULE.frequency, help="litcompress: steps between rounds")
    args = parser.parse_args(argv)
    if any(not 0.0 < t < 1.0 for t in args.targets):
        parser.error(f"--targets must be in (0, 1), got {args.targets}")
    for name in ("epochs", "jobs", "batch_size", "frequency"):  # each failed inside a worker, after the data loaded
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.lr < float("inf"):  # a negative one failed in torch after the data loaded; 0 trained nothing
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0.0 <= args.begin < args.end <= 1.0:
        parser.error(f"--begin and --end are fractions of the training steps with 0 <= begin < end <= 1, got "
                     f"{args.begin} and {args.end}")
    knobs = dict(optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay)
    seeds, recipe = args.seeds, Recipe(epochs=args.epochs, **knobs)
    if args.quick:
        seeds, recipe = seeds[:1], Recipe(epochs=2, train_subset=5_000, **knobs)
    schedule = ScheduleConfig(begin=args.begin, end=args.end, frequency=args.frequency)

    jobs = [(row, 0.0 if row == "dense" else t, seed, recipe, schedule, 1)
            for seed in seeds for row in args.rows for t in ([0.0] if row == "dense" else args.targets)]
    start = time.perf_counter()
    results: list[RunResult] = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for r in pool.map(_run, jobs):
            results.append(r)
            print(f"[{time.perf_counter() - start:7.1f}s] {r.row:<11} target {r.target:.2f} seed {r.seed}: "
                  f"sparsity {r.sparsity:.4f}  val {r.val_acc:.4f}  test {r.test_acc:.4f}  ({r.seconds:.0f}s)",
                  flush=True)
    wall = time.perf_counter() - start
    summary = summarise(results)
    print()
    print(table(summary, markdown=False))
    for e in summary:  # ours against the peer at each target, side by side
        peer = next((p for p in summary if p["row"] == "lightning" and abs(p["target"] - e["target"]) < 1e-9), None)
        if e["row"] == "litcompress" and peer is not None:
            print(f"litcompress vs Lightning at {e['target']:.0%}: "
                  f"{100 * (e['test_acc']['mean'] - peer['test_acc']['mean']):+.2f} pt test accuracy")
    print(f"\nwall time {wall:.0f}s for {len(jobs)} runs")

    command = ".venv/bin/python benchmarks/mnist_sparsity.py " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
    if not (args.quick or args.no_write):
        write_markdown(args.output, summary, command.rstrip(), recipe, schedule, seeds, wall, args.jobs)
        print(f"wrote {os.path.relpath(args.output)}")
    print(json.dumps({
        "command": command.rstrip(),
        "recipe": {**dataclasses.asdict(recipe), "lr_schedule": "cosine to 0, per step"},
        "schedule": {"begin": schedule.begin, "end": schedule.end, "frequency": schedule.frequency,
                     "power": schedule.power},
        "seeds": list(seeds),
        "wall_seconds": round(wall, 1),
        "summary": summary,
        "runs": [r.to_dict() for r in results],
    }))


if __name__ == "__main__":
    main()
