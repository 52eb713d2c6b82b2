"""How a layer's channel count, not only its size, sets its CPU latency: why ``keep_multiple_of`` exists.

Structured pruning leaves whatever channel count the sparsity gives (half of 312 is 156). oneDNN's kernels work on
blocks of channels (16 fp32 lanes with AVX-512, 8 with AVX2); a count that is not a multiple pays for the partial
block, and more than that where the kernel falls back to a slower layout. Measured here, each case at a few widths
around a multiple of 16, in eval mode under ``torch.no_grad()``:

* ``mobilenet``: a MobileNetV2 block at 32x32, batch 32 (1x1 expand 32 -> c, BatchNorm, ReLU6, depthwise 3x3 of c
  channels, BatchNorm, ReLU6, 1x1 project c -> 32);
* ``conv``: two zero-padded 3x3 convs 64 -> c -> 64 at 32x32, batch 8;
* ``linear``: Linear 512 -> c -> 512, batch 64.

Benchmarking rules from ../shared/README.md: glibc's allocator thresholds pinned, ``torch.set_num_threads`` pinned,
the widths of a case interleaved (order reversed every other repeat), ``--repeats`` blocks of as many calls as
~0.2 s of the case's first width takes (at most 500), medians.
The ratio column is each width's median latency over the case's first (widest, a multiple of 16) width's, against
its share of the channels: a ratio above the channel share means the width costs more than its size.

Usage::

    python benchmarks/channel_multiples.py [--threads 1] [--repeats 15] [--write]

The last printed line is one JSON object with all figures; ``--write`` puts the table into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pinning import pin_allocator  # noqa: E402

pin_allocator()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from litcompress.quantization.backends import cpu_has_vnni  # noqa: E402
from mnist_sparsity import replace_section  # noqa: E402


def mobilenet_block(c: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(32, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6(),
                         nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU6(),
                         nn.Conv2d(c, 32, 1, bias=False))


def conv_pair(c: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(64, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 64, 3, padding=1))


def linear_pair(c: int) -> nn.Module:
    return nn.Sequential(nn.Linear(512, c), nn.ReLU(), nn.Linear(c, 512))


# name: (builder, input shape, widths; the first is the reference, a multiple of 16)
CASES: dict[str, tuple[Callable[[int], nn.Module], tuple[int, ...], tuple[int, ...]]] = {
    "mobilenet": (mobilenet_block, (32, 32, 32, 32), (160, 159, 156, 152, 144)),
    "conv": (conv_pair, (8, 64, 32, 32), (128, 127, 124, 120, 112)),
    "linear": (linear_pair, (64, 512), (1024, 1023, 1020, 1016, 1008)),
}


def per_call_ms(model: nn.Module, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        model(x)
    return (time.perf_counter() - start) / calls * 1e3


def measure(name: str, repeats: int) -> dict:
    build, shape, widths = CASES[name]
    torch.manual_seed(0)
    models = {c: build(c).eval() for c in widths}
    x = torch.randn(*shape)
    with torch.no_grad():
        for model in models.values():  # warm-up: first-call allocations, oneDNN primitive creation
            for _ in range(3):
                model(x)
        calls = max(3, min(500, int(200 / max(per_call_ms(models[widths[0]], x, 2), 1e-3))))
        times: dict[int, list[float]] = {c: [] for c in widths}
        for repeat in range(repeats):
            for c in (widths if repeat % 2 == 0 else widths[::-1]):
                times[c].append(per_call_ms(models[c], x, calls))
    medians = {c: statistics.median(v) for c, v in times.items()}
    reference = widths[0]
    return {"case": name, "widths": {c: {"median_ms": medians[c], "min_ms": min(times[c]), "max_ms": max(times[c]),
                                         "ratio": medians[c] / medians[reference], "share": c / reference}
                                     for c in widths}}


def table(results: list[dict]) -> str:
    lines = ["| case | channels | multiple of 16 | latency (median, min-max) | latency / widest | channels / widest |",
             "|---|---:|---|---|---:|---:|"]
    for r in results:
        for c, w in r["widths"].items():
            lines.append(f"| {r['case']} | {c} | {'yes' if c % 16 == 0 else 'no'} | {w['median_ms']:.2f} ms "
                         f"({w['min_ms']:.2f}-{w['max_ms']:.2f}) | {w['ratio']:.2f} | {w['share']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per width")
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = [measure(name, args.repeats) for name in args.cases]
    text = table(results)
    print(text)
    command = f"python benchmarks/channel_multiples.py --threads {args.threads} --repeats {args.repeats}"
    if list(args.cases) != list(CASES):  # the command must run what the table shows
        command += " --cases " + " ".join(args.cases)
    if args.write:
        replace_section(REPO / "BENCHMARKS.md", "channel_multiples", f"""\
## Channel counts that fill SIMD blocks (`benchmarks/channel_multiples.py`)

```bash
.venv/bin/{command} --write
```

{datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}, torch {torch.__version__}, {args.threads} thread(s),
{'with' if cpu_has_vnni() else 'without'} AVX-VNNI/AVX512-VNNI, {(time.perf_counter() - started) / 60:.1f} min; the
widths of a case interleaved, {args.repeats} blocks of equal call counts (~0.2 s of the first width's calls, at most
500), medians. Each case's first width is the reference
(a multiple of 16); "latency / widest" above "channels / widest" means a width costs more than its size.

{text}
""")
    print(json.dumps({"command": command, "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
