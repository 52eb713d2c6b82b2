"""Where one later global L1 pruning round of each callback spends its time (torch.profiler), on the 50M-weight MLP of
``prune_step.py``: a diagnostic, not a benchmark (the profiler adds overhead; prune_step.py gives the times).

Usage::

    python benchmarks/profile_prune_round.py [--device cpu|cuda] [--rows 15]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prune_step import AMOUNT, VARIANTS, build_model, make_callback  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device (a CPU build, or no GPU here)")
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort_by = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    for variant in VARIANTS:
        callback = make_callback(variant, build_model().to(args.device))
        callback.apply_pruning(AMOUNT)  # the first round (warm-up, lazy kernel loading) is not profiled
        if args.device == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            callback.apply_pruning(AMOUNT)
            if args.device == "cuda":
                torch.cuda.synchronize()
        print(f"== {variant}: one later round on {args.device}")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
