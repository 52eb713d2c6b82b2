"""Benchmark one global L1 pruning round of Lightning's `ModelPruning` against litcompress's, on a 50M-weight MLP.

Variants, each in its own fresh subprocess, interleaved (A, B, A, B, ...):

* ``lightning``: ``lightning.pytorch.callbacks.ModelPruning.apply_pruning(0.5)``, which calls
  ``torch.nn.utils.prune.global_unstructured`` (it concatenates every score and runs ``topk``);
* ``litcompress``: ``litcompress.ModelPruning.apply_pruning(0.5)``, which ranks magnitudes tensor by tensor
  (``litcompress.pruning.threshold.smallest_k_masks``) and updates the mask buffers in place.

Both callbacks get the same seeded model, ``parameters_to_prune`` (the six weights), ``amount=0.5``,
``use_global_unstructured=True`` and no lottery ticket. Each process runs ``--rounds`` rounds (0.5 of the weights
still kept) and reports seconds per round (the first separately: it includes one-off warm-up) and peak RSS above
the RSS after building the model. That peak includes the pruning state torch.prune keeps in both variants (a float
``weight_mask`` and the cached masked ``weight``, 2x the pruned weights); the table also shows the peak *beyond*
that state, which is what the algorithm itself costs.

Times come from processes whose allocator is pinned (../shared/README.md); memory from processes of their own with
glibc's default allocator, whose large blocks are mmap'd and returned when freed, so that peak RSS is the peak of
what the code holds. With the allocator pinned (no mmap, no trim) peak RSS also counts heap fragmentation: seven
identical litcompress processes gave 136 to 413 MiB beyond the state that way, ten gave 122 to 186 MiB with the
default allocator (``--worker litcompress --allocator pinned|default`` runs one).

Usage::

    python benchmarks/prune_step.py [--repeats 3] [--rounds 3] [--threads 2] [--device cpu|cuda]

With ``--device cuda`` the model and the masks live on the GPU, each round ends with ``torch.cuda.synchronize()``
and the peaks are of the memory the CUDA allocator handed out (``torch.cuda.max_memory_allocated``).

The last printed line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pinning import pin_allocator  # noqa: E402  (torch is imported in the worker, after pinning)

AMOUNT = 0.5
# 2048 -> 4096 -> 2048 -> ... : six weights of 4096x2048 / 2048x4096 (8.4M each, 50.3M total).
WIDTHS = (2048, 4096, 2048, 4096, 2048, 4096, 2048)
VARIANTS = ("lightning", "litcompress")


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


def make_callback(variant: str, model):
    """The callback under test, set up on a LightningModule that holds `model` (no Trainer needed for setup)."""
    from lightning.pytorch import LightningModule

    if variant == "lightning":
        from lightning.pytorch.callbacks import ModelPruning
    else:
        from litcompress import ModelPruning

    holder = LightningModule()
    holder.net = model
    callback = ModelPruning(
        "l1_unstructured", parameters_to_prune=pruned_weights(model), amount=AMOUNT, use_global_unstructured=True,
        use_lottery_ticket_hypothesis=False, make_pruning_permanent=False,
    )
    callback.setup(None, holder, "fit")
    return callback


def run_worker(variant: str, rounds: int, threads: int, save_masks: str | None, pinned: bool = True,
               device: str = "cpu") -> dict:
    if pinned:  # for the times; memory is measured with the default allocator (see the module docstring)
        pin_allocator()
    import torch

    torch.set_num_threads(threads)
    on_gpu = device == "cuda"
    model = build_model().to(device)
    targets = pruned_weights(model)
    n_params = sum(m.weight.numel() for m, _ in targets)
    model_bytes = sum(m.weight.numel() * m.weight.element_size() for m, _ in targets)
    callback = make_callback(variant, model)

    def finished() -> None:  # CUDA kernels run asynchronously: a round is done when the device is
        if on_gpu:
            torch.cuda.synchronize()

    def peak_bytes() -> int:  # on a GPU, the memory the CUDA allocator handed out (the host's RSS is not it)
        return torch.cuda.max_memory_allocated() if on_gpu else peak_rss_bytes()

    finished()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    base_rss = torch.cuda.memory_allocated() if on_gpu else current_rss_bytes()
    seconds: list[float] = []
    peak_after_first = 0
    for _ in range(rounds):
        start = time.perf_counter()
        callback.apply_pruning(AMOUNT)
        finished()
        seconds.append(time.perf_counter() - start)
        if not peak_after_first:
            peak_after_first = peak_bytes()
    peak_all = peak_bytes()
    masks = [module.weight_mask for module, _ in targets]
    state_bytes = sum(m.weight_mask.nbytes + m.weight.nbytes for m, _ in targets)  # kept by torch.prune in both
    zeros = [int((mask == 0).sum()) for mask in masks]
    if save_masks:
        torch.save([mask.bool().cpu() for mask in masks], save_masks)
    mib = 2**20
    return {
        "variant": variant,
        "n_params": n_params,
        "model_mib": model_bytes / mib,
        "pruning_state_mib": state_bytes / mib,
        "seconds": seconds,
        "peak_extra_first_round_mib": max(0, peak_after_first - base_rss) / mib,
        "peak_extra_all_rounds_mib": max(0, peak_all - base_rss) / mib,
        "peak_beyond_state_mib": max(0, peak_all - base_rss - state_bytes) / mib,
        "zeros_per_tensor": zeros,
        "sparsity": sum(zeros) / n_params,
    }


# ----------------------------------------------------------------------------- parent side
def spawn(variant: str, args: argparse.Namespace, save_masks: str | None, allocator: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--rounds", str(args.rounds)]
    command += ["--threads", str(args.threads), "--allocator", allocator, "--device", args.device]
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
    parser.add_argument("--rounds", type=int, default=3,
                        help="pruning rounds per process (>= 2: the first round is timed apart from the later ones)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model lives (cuda: times synchronized, peaks of GPU memory allocated)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--save-masks", help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=("pinned", "default"), default="pinned", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.rounds, args.threads, args.save_masks,
                                    pinned=args.allocator == "pinned", device=args.device)))
        return
    if args.rounds < 2:  # (before the >= 1 checks: 0 was told ">= 1")  # the table's "later rounds" need a second round (else NaN, and bad JSON)
        parser.error("--rounds must be >= 2: the first round is timed apart from the later ones")
    for name in ("repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.device == "cuda":
        import torch  # the parent only spawns and compares: importing torch here times nothing

        if not torch.cuda.is_available():
            parser.error("--device cuda: this torch sees no CUDA device (a CPU build, or no GPU here)")

    results: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}  # pinned allocator: the times
    memory: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}  # default allocator: the peaks
    with tempfile.TemporaryDirectory() as scratch:
        mask_files = {variant: os.path.join(scratch, f"{variant}.pt") for variant in VARIANTS}
        for repeat in range(args.repeats):
            for allocator, runs in (("pinned", results), ("default", memory)):
                for variant in VARIANTS:  # interleaved: A, B, A, B, ...
                    save = mask_files[variant] if repeat == 0 and allocator == "pinned" else None
                    run = spawn(variant, args, save, allocator)
                    runs[variant].append(run)
                    print(f"  repeat {repeat} {variant} ({allocator} allocator): {json.dumps(run)}", file=sys.stderr)
        differing = compare_masks(*(mask_files[v] for v in VARIANTS))

    keys = ("first_round_s", "later_round_s", "peak_extra_first_round_mib", "peak_extra_all_rounds_mib",
            "peak_beyond_state_mib")
    figures: dict[str, dict] = {}
    for variant, runs in results.items():
        figures[variant] = {
            "first_round_s": summary([run["seconds"][0] for run in runs]),
            "later_round_s": summary([s for run in runs for s in run["seconds"][1:]] or [float("nan")]),
            **{key: summary([run[key] for run in memory[variant]]) for key in keys[2:]},
            "final_sparsity": runs[0]["sparsity"],
            "zeros_per_tensor": runs[0]["zeros_per_tensor"],
        }
    theirs, ours = (figures[v] for v in VARIANTS)
    ratios = {key: ours[key]["median"] / theirs[key]["median"] for key in keys}
    model_mib = results["litcompress"][0]["model_mib"]
    state_mib = results["litcompress"][0]["pruning_state_mib"]

    print(
        f"global L1 pruning round, amount {AMOUNT} of kept weights, {args.rounds} rounds/process, "
        f"{args.repeats} processes/variant (interleaved), {results['litcompress'][0]['n_params']:,} weights "
        f"({model_mib:.0f} MiB) on {args.device}, torch threads {args.threads}; pruning state kept by both: "
        f"{state_mib:.0f} MiB; times with the allocator pinned, peaks with the default one (separate processes)"
    )
    memory_name = "GPU memory" if args.device == "cuda" else "RSS"
    header = f"{'metric':36} {'Lightning min/med/max':>26} {'litcompress min/med/max':>26} {'ours/Lightning':>15}"
    print(header)
    print("-" * len(header))
    for key, label in zip(keys, ("first round [s]", "later rounds [s]", f"peak extra {memory_name}, round 1 [MiB]",
                                 f"peak extra {memory_name}, all rounds [MiB]", "peak beyond pruning state [MiB]")):
        cells = ["/".join(f"{figures[v][key][stat]:.2f}" for stat in ("min", "median", "max")) for v in VARIANTS]
        print(f"{label:36} {cells[0]:>26} {cells[1]:>26} {ratios[key]:>15.3f}")
    print(f"{'peak beyond state / model size':36} {theirs['peak_beyond_state_mib']['median'] / model_mib:>26.2f}"
          f" {ours['peak_beyond_state_mib']['median'] / model_mib:>26.2f}")
    print(f"{'final sparsity':36} {theirs['final_sparsity']:>26.6f} {ours['final_sparsity']:>26.6f}")
    print(f"mask entries differing after the last round: {differing} (only ties in |w| at the threshold could differ)")
    print(json.dumps({
        "amount": AMOUNT, "device": args.device, "rounds": args.rounds, "repeats": args.repeats,
        "threads": args.threads,
        "n_params": results["litcompress"][0]["n_params"], "model_mib": model_mib, "pruning_state_mib": state_mib,
        "variants": figures, "ratios_litcompress_over_lightning": ratios, "differing_mask_entries": differing,
    }))


if __name__ == "__main__":
    main()
