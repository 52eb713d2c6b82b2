"""Unstructured pruning made faster: sparse CSR kernels (``litcompress.pruning.sparsify``) against the dense kernels
that run what Lightning's ``ModelPruning`` leaves (its zeros stored and multiplied like any weight).

For each model, target sparsity and batch size, one interleaved run (allocator and threads pinned; variants taken in
turns; ``--repeats`` blocks of ~2 ms of calls each, medians, min-max in the JSON):

* ``dense``: the unpruned model;
* ``lightning``: the model pruned by ``torch.nn.utils.prune.l1_unstructured`` (every layer to the target, magnitude),
  masks made permanent, as ``lightning.pytorch.callbacks.ModelPruning(make_pruning_permanent=True)`` leaves it
  (while training its masks are also re-applied every call, which is slower still);
* ``litcompress``: ``sparsify(that model, batch)``: each Linear layer at or above 70% sparsity timed on its input,
  dense against CSR, and converted where CSR was at least 1.1x faster (what a user gets; the layers converted are
  listed).

Models: LeNet-300-100 (784-300-100-10, the MNIST sparsity benchmark's), an MLP 784-1024-1024-10 (the pipeline
benchmark's), and a Transformer feed-forward block (512 -> 2048 -> 512 on 128 tokens per sequence). Weights are
PyTorch's initialisation; the kernels' speed depends on the sparsity and the shapes, not on what was learnt.

Usage::

    python benchmarks/sparse.py [--threads 1] [--repeats 15] [--targets 0.9 0.95 0.98] [--batches 1 64]

The last printed line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pinning import pin_allocator  # noqa: E402

pin_allocator()  # before torch allocates anything (../shared/README.md)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import prune  # noqa: E402

from litcompress.pruning import sparsify  # noqa: E402
from litcompress.quantization.latency import measure_latencies  # noqa: E402


class FeedForward(nn.Module):
    """A Transformer block's feed-forward network: Linear, GELU, Linear, on (batch, tokens, features)."""

    def __init__(self, width: int = 512, hidden: int = 2048) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.gelu(self.w1(x)))


def mlp(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


MODELS = {
    "lenet-300-100": (lambda: mlp((784, 300, 100, 10)), lambda batch: torch.randn(batch, 784)),
    "mlp-1024": (lambda: mlp((784, 1024, 1024, 10)), lambda batch: torch.randn(batch, 784)),
    "ffn-512-2048": (FeedForward, lambda batch: torch.randn(batch, 128, 512)),
}


def pruned(model: nn.Module, target: float) -> nn.Module:
    """Every Linear layer pruned to `target` by magnitude, the masks made permanent (Lightning's result)."""
    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            prune.l1_unstructured(layer, "weight", amount=target)
            prune.remove(layer, "weight")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1 or any(b < 1 for b in args.batches):
        parser.error("--threads, --repeats and --batches must be >= 1")
    if any(not 0.0 < t < 1.0 for t in args.targets):
        parser.error(f"--targets must be in (0, 1), got {args.targets}")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    rows = []
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} interleaved blocks per variant; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print()
    print("| model | sparsity | batch | dense ms | Lightning (zeros, dense kernels) ms | litcompress (CSR) ms | "
          "speed-up vs Lightning | layers on CSR |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in args.models:
        build, make_inputs = MODELS[name]
        dense = build().eval()
        for target in args.targets:
            masked = pruned(dense, target)
            for batch in args.batches:
                x = make_inputs(batch)
                result = sparsify(masked, x, num_threads=args.threads, repeats=args.repeats)
                sparse = result.model
                with torch.no_grad():
                    diff = float((sparse(x) - masked(x)).abs().max())
                times = measure_latencies([dense, masked, sparse], (x,), repeats=args.repeats,
                                          num_threads=args.threads)
                ms = [1e3 * t["median"] for t in times]
                converted = list(result.report.converted)
                rows.append({"model": name, "sparsity": target, "batch": batch, "dense_ms": ms[0],
                             "lightning_ms": ms[1], "litcompress_ms": ms[2], "speedup": ms[1] / ms[2],
                             "converted": converted, "max_abs_diff": diff,
                             "min_max_ms": [[1e3 * t["min"], 1e3 * t["max"]] for t in times]})
                print(f"| {name} | {target:.0%} | {batch} | {ms[0]:.4f} | {ms[1]:.4f} | {ms[2]:.4f} | "
                      f"**{ms[1] / ms[2]:.2f}x** | {', '.join(converted) or 'none'} |", flush=True)
    minutes = (time.monotonic() - started) / 60
    print(f"\nmax |litcompress - Lightning| over all outputs: {max(r['max_abs_diff'] for r in rows):.2g}; "
          f"{minutes:.1f} min")
    print(json.dumps({"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__, "rows": rows,
                      "minutes": round(minutes, 2)}))


if __name__ == "__main__":
    main()
