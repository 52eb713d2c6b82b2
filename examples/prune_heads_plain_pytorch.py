"""Prune half the attention heads of a Transformer in a plain PyTorch loop, then remove them with shrink.

No Lightning: the engine's functions in your own loop. A cubic schedule (``PolynomialDecay``) gives the fraction of
each attention's heads pruned after every optimizer step; ``prune_heads_`` masks the weakest heads (by the norm of
their query, key, value and output weights) and keeps the ones masked before. After training, ``shrink`` replaces
each ``nn.MultiheadAttention`` with a ``HeadPrunedAttention`` of the kept heads: the same outputs, fewer parameters,
less work. Runs in well under a minute on a laptop CPU on scikit-learn's digits (no download).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from litcompress import make_permanent_, shrink
from litcompress.data import load_digits_tensors
from litcompress.models import TransformerClassifier
from litcompress.pruning import HeadPrunedAttention, keep_bypassed_weights_current_, prune_heads_
from litcompress.pruning.schedules import PolynomialDecay, structured_pruned_count
from litcompress.quantization import measure_latencies

HEADS = 8  # of each attention


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--heads", type=float, default=0.5, help="fraction of each attention's heads pruned")
    args = parser.parse_args()
    if not 0.0 < args.heads < 1.0:
        parser.error(f"--heads must be in (0, 1), got {args.heads}")
    if structured_pruned_count(HEADS, args.heads) == 0:  # (it trained, then shrank nothing)
        parser.error(f"--heads {args.heads} prunes none of each attention's {HEADS} heads (whole heads, rounded): "
                     f"give a larger fraction (one head is {1 / HEADS})")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")

    torch.manual_seed(0)
    train, _, test = (split.tensors for split in load_digits_tensors(seed=0, flatten=False))
    model = TransformerClassifier(d_model=64, heads=HEADS, layers=2, feed_forward=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = [(train[0][i:i + 64], train[1][i:i + 64]) for i in range(0, len(train[0]), 64)]
    steps = args.epochs * len(batches)
    schedule = PolynomialDecay(final_sparsity=args.heads, begin=0, end=int(0.6 * steps), frequency=10)
    keep_bypassed_weights_current_(model)  # torch's Transformer layers read pruned weights without calling them

    step = 0
    for _ in range(args.epochs):
        model.train()
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            step += 1
            if schedule.should_prune(step):
                prune_heads_(model, schedule.target(step))
    make_permanent_(model)

    result = shrink(model.eval(), test[0][:64])  # checks the outputs stay the same
    narrowed = result.model
    print(result.report.table())
    heads = [(name, m.num_heads) for name, m in narrowed.named_modules()
             if isinstance(m, (HeadPrunedAttention, nn.MultiheadAttention))]
    print("heads kept:", ", ".join(f"{name} {count}" for name, count in heads))
    before, after = (row["median"] for row in measure_latencies([model, narrowed], (test[0][:64],), repeats=10,
                                                                  num_threads=1))
    print(f"test accuracy {accuracy(model, *test):.2%} (pruned) and {accuracy(narrowed, *test):.2%} (shrunk); "
          f"latency at batch 64, 1 thread: {before * 1e3:.3f} -> {after * 1e3:.3f} ms ({before / after:.2f}x)")


if __name__ == "__main__":
    main()
