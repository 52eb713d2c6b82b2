"""Benchmark one global L1 pruning round on a ~50M-parameter MLP.

Variants (each runs in its own fresh subprocess, interleaved A, B, A, B, ...):

* ``reference``: ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=0.5)``,
  which is what Lightning's ``ModelPruning`` callback does;
* ``ours``: ``litcompress.pruning.threshold.smallest_k_masks`` over ``|w|`` with
  ``k = round(0.5 * kept)``, applied with ``prune.custom_from_mask`` so both variants end in
  the same module state;
* ``callback`` (placeholder, ``--with-callback``): ``litcompress.ModelPruning`` once it exists.

Each process builds the same seeded model, runs ``--rounds`` rounds at amount 0.5 (of the
weights still kept), and reports seconds per round (the first one separately: it includes
one-off kernel/allocator warm-up) and the peak extra RSS over the RSS after building the model.

Usage::

    PYTHONPATH=src python benchmarks/prune_step.py [--repeats 3] [--rounds 3] [--threads 2]

The last printed line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AMOUNT = 0.5
# 2048 -> 4096 -> 2048 -> ... : six weights of 4096x2048 / 2048x4096 (8.4M each, 50.3M total).
WIDTHS = (2048, 4096, 2048, 4096, 2048, 4096, 2048)
VARIANTS = ("reference", "ours")
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def pin_allocator() -> None:
    """Keep glibc from returning/mmapping big blocks per call: otherwise timings on this
    machine vary ~3x with page-fault cost rather than with the algorithm."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ----------------------------------------------------------------------------- worker side
def build_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def pruned_weights(model) -> list[tuple[object, str]]:
    from torch import nn

    return [(module, "weight") for module in model if isinstance(module, nn.Linear)]


def reference_round(model) -> None:
    from torch.nn.utils import prune

    prune.global_unstructured(pruned_weights(model), pruning_method=prune.L1Unstructured, amount=AMOUNT)


def ours_round(model) -> None:
    import torch
    from torch.nn.utils import prune

    from litcompress.pruning.threshold import smallest_k_masks

    params = pruned_weights(model)
    with torch.no_grad():
        # Before the first round there is no mask; afterwards score the unmasked original.
        start = time.perf_counter()
        scores = [getattr(m, "weight_orig", m.weight).detach().abs() for m, _ in params]
        # Bool masks in, bool masks out (1 byte per weight instead of the float32 weight_mask).
        masks = [
            m.weight_mask != 0 if hasattr(m, "weight_mask") else torch.ones_like(m.weight, dtype=torch.bool)
            for m, _ in params
        ]
        kept = sum(int(torch.count_nonzero(mask)) for mask in masks)
        new_masks = smallest_k_masks(scores, masks, round(AMOUNT * kept))
        SELECTION_SECONDS.append(time.perf_counter() - start)
        SELECTION_PEAKS.append(peak_rss_bytes())
        del scores, masks
        for module, name in params:
            # Drop each new mask once applied: torch.prune keeps its own float copy as weight_mask.
            prune.custom_from_mask(module, name, new_masks.pop(0))


def callback_round(model) -> None:
    """Placeholder: drive ``litcompress.ModelPruning`` for one round once the callback exists."""
    from litcompress import ModelPruning  # noqa: F401  (raises ImportError until it is merged)

    raise NotImplementedError("benchmark hook for litcompress.ModelPruning is not written yet")


# ru_maxrss right after ``smallest_k_masks`` returns, per round (ours only).
SELECTION_PEAKS: list[int] = []
# Seconds from scoring to the new masks (without applying them), per round (ours only).
SELECTION_SECONDS: list[float] = []

ROUND_FUNCTIONS = {"reference": reference_round, "ours": ours_round, "callback": callback_round}


def run_worker(variant: str, rounds: int, threads: int, save_masks: str | None) -> dict:
    pin_allocator()
    import torch

    torch.set_num_threads(threads)
    model = build_model()
    n_params = sum(m.weight.numel() for m, _ in pruned_weights(model))
    model_bytes = sum(m.weight.numel() * m.weight.element_size() for m, _ in pruned_weights(model))
    base_rss = current_rss_bytes()
    round_function = ROUND_FUNCTIONS[variant]
    seconds: list[float] = []
    peak_after_first = 0
    for _ in range(rounds):
        start = time.perf_counter()
        try:
            round_function(model)
        except (ImportError, NotImplementedError) as error:
            return {"variant": variant, "skipped": f"{type(error).__name__}: {error}"}
        seconds.append(time.perf_counter() - start)
        if not peak_after_first:
            peak_after_first = peak_rss_bytes()
    peak_all = peak_rss_bytes()
    masks = [module.weight_mask for module, _ in pruned_weights(model)]
    zeros = [int((mask == 0).sum()) for mask in masks]
    if save_masks:
        torch.save([mask.bool() for mask in masks], save_masks)
    selection_peak = (max(0, SELECTION_PEAKS[0] - base_rss) / 2**20) if SELECTION_PEAKS else None
    return {
        "variant": variant,
        "peak_extra_selection_round_1_mib": selection_peak,
        "selection_seconds": SELECTION_SECONDS,
        "n_params": n_params,
        "model_mib": model_bytes / 2**20,
        "seconds": seconds,
        "peak_extra_first_round_mib": max(0, peak_after_first - base_rss) / 2**20,
        "peak_extra_all_rounds_mib": max(0, peak_all - base_rss) / 2**20,
        "zeros_per_tensor": zeros,
        "sparsity": sum(zeros) / n_params,
    }


# ----------------------------------------------------------------------------- parent side
def spawn(variant: str, args: argparse.Namespace, save_masks: str | None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--rounds", str(args.rounds)]
    command += ["--threads", str(args.threads)]
    if save_masks:
        command += ["--save-masks", save_masks]
    env = dict(os.environ)
    source_root = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} worker failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def compare_masks(path_a: str, path_b: str) -> int:
    import torch

    masks_a, masks_b = torch.load(path_a), torch.load(path_b)
    return sum(int((a != b).sum()) for a, b in zip(masks_a, masks_b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="processes per variant")
    parser.add_argument("--rounds", type=int, default=3, help="pruning rounds per process")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    parser.add_argument("--with-callback", action="store_true", help="also run the ModelPruning placeholder")
    parser.add_argument("--worker", choices=sorted(ROUND_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--save-masks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.rounds, args.threads, args.save_masks)))
        return

    variants = VARIANTS + (("callback",) if args.with_callback else ())
    results: dict[str, list[dict]] = {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory() as scratch:
        mask_files = {variant: os.path.join(scratch, f"{variant}.pt") for variant in variants}
        for repeat in range(args.repeats):
            for variant in variants:  # interleaved: A, B, A, B, ...
                run = spawn(variant, args, mask_files[variant] if repeat == 0 else None)
                results[variant].append(run)
                print(f"  repeat {repeat} {variant}: {json.dumps(run)}", file=sys.stderr)
        differing = compare_masks(mask_files["reference"], mask_files["ours"])

    figures: dict[str, dict] = {}
    for variant, runs in results.items():
        runs = [run for run in runs if "skipped" not in run]
        if not runs:
            figures[variant] = {"skipped": results[variant][0]["skipped"]}
            continue
        figures[variant] = {
            "first_round_s": summary([run["seconds"][0] for run in runs]),
            "later_round_s": summary([s for run in runs for s in run["seconds"][1:]] or [float("nan")]),
            "peak_extra_first_round_mib": summary([run["peak_extra_first_round_mib"] for run in runs]),
            "peak_extra_all_rounds_mib": summary([run["peak_extra_all_rounds_mib"] for run in runs]),
            "final_sparsity": runs[0]["sparsity"],
            "zeros_per_tensor": runs[0]["zeros_per_tensor"],
        }
    reference, ours = figures["reference"], figures["ours"]
    ratios = {
        key: ours[key]["median"] / reference[key]["median"]
        for key in ("first_round_s", "later_round_s", "peak_extra_first_round_mib", "peak_extra_all_rounds_mib")
    }
    model_mib = results["ours"][0]["model_mib"]

    print(
        f"global L1 pruning, amount {AMOUNT} of kept weights per round, {args.rounds} rounds/process, "
        f"{args.repeats} processes/variant (interleaved), {results['ours'][0]['n_params']:,} weights "
        f"({model_mib:.0f} MiB), torch threads {args.threads}"
    )
    header = f"{'metric':34} {'reference min/med/max':>28} {'ours min/med/max':>28} {'ours/ref (median)':>18}"
    print(header)
    print("-" * len(header))
    for key, label in (
        ("first_round_s", "first round [s]"),
        ("later_round_s", "later rounds [s]"),
        ("peak_extra_first_round_mib", "peak extra RSS, round 1 [MiB]"),
        ("peak_extra_all_rounds_mib", "peak extra RSS, all rounds [MiB]"),
    ):
        cells = ["/".join(f"{figures[v][key][stat]:.2f}" for stat in ("min", "median", "max")) for v in VARIANTS]
        print(f"{label:34} {cells[0]:>28} {cells[1]:>28} {ratios[key]:>18.3f}")
    selection = [run["peak_extra_selection_round_1_mib"] for run in results["ours"]]
    figures["ours"]["peak_extra_selection_round_1_mib"] = summary(selection)
    print(
        f"{'ours, selection only, round 1 [MiB]':34} {'-':>28} "
        f"{'/'.join(f'{v:.2f}' for v in summary(selection).values()):>28}"
        "   (|w| scores + bool masks + search temporaries)"
    )
    selection_first = summary([run["selection_seconds"][0] for run in results["ours"]])
    selection_later = summary([s for run in results["ours"] for s in run["selection_seconds"][1:]] or [float("nan")])
    figures["ours"]["selection_first_round_s"] = selection_first
    figures["ours"]["selection_later_round_s"] = selection_later
    for label, stats in (
        ("ours, selection only, round 1 [s]", selection_first),
        ("ours, selection only, later [s]", selection_later),
    ):
        print(f"{label:34} {'-':>28} {'/'.join(f'{v:.2f}' for v in stats.values()):>28}   (|w| + smallest_k_masks)")
    print(f"{'final sparsity':34} {reference['final_sparsity']:>28.6f} {ours['final_sparsity']:>28.6f}")
    print(
        f"mask entries differing between variants after the last round: {differing} "
        "(can only come from equal |w| at a threshold, which torch.topk orders arbitrarily)"
    )
    if "callback" in figures:
        print(f"callback: {figures['callback']}")
    print(
        json.dumps(
            {
                "amount": AMOUNT,
                "rounds": args.rounds,
                "repeats": args.repeats,
                "threads": args.threads,
                "n_params": results["ours"][0]["n_params"],
                "model_mib": model_mib,
                "variants": figures,
                "ratios_ours_over_reference": ratios,
                "differing_mask_entries": differing,
            }
        )
    )


if __name__ == "__main__":
    main()
