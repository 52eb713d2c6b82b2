"""Check torch.ao's own int8 kernels against fp32, with torch's own default x86 qconfig mapping.

This is why litcompress's `torch_ao` backend keeps transposed convs, PReLU and averaging or max-pooling embedding bags
in fp32: on the project's x86 hosts (torch 2.13) some of torch's int8 kernels return wrong values. No litcompress code
runs here: each static case is ``conv -> ReLU -> op`` (or ``conv -> op``), prepared with
``get_default_qconfig_mapping("x86")``, calibrated on random inputs, converted, and compared with the fp32 module;
each EmbeddingBag case is ``quantize_dynamic`` with ``float_qparams_weight_only_qconfig`` (torch's int8 rows), on
bags of 2D ids, flat ids with offsets, and (summing) per-sample weights:

* relative error: max |int8 - fp32| / max |fp32| on one batch (int8 rounding stays near 0.01-0.05);
* steady: whether two calls on the same batch give the same values.

Usage::

    python benchmarks/torch_ao_kernels.py [--engine x86]

The last printed line is one JSON object with every case.
"""

from __future__ import annotations

import argparse
import itertools
import json
import warnings

import torch
from torch import nn

BAD_ERROR = 0.1  # int8 rounding of these small nets stays well below this


def check(model: nn.Module, shape: tuple[int, ...], engine: str) -> dict:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model.eval()
    inputs = [torch.randn(*shape) for _ in range(3)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, get_default_qconfig_mapping(engine), (inputs[0],))
        for x in inputs:
            prepared(x)
        int8 = convert_fx(prepared)
        reference, first, second = model(inputs[0]), int8(inputs[0]), int8(inputs[0])
    error = float((first - reference).abs().max() / reference.abs().max())
    steady = bool(torch.equal(first, second))
    return {"relative_error": round(error, 4), "steady": steady, "bad": error > BAD_ERROR or not steady}


def check_bag(mode: str, inputs: tuple, kwargs: dict) -> dict:
    """An int8 bag of `mode` against fp32, and whether it returns what an int8 summing bag of the same table does."""
    from torch.ao.quantization import float_qparams_weight_only_qconfig, quantize_dynamic

    table = torch.randn(200, 16)
    model, summing = (nn.Sequential(nn.EmbeddingBag.from_pretrained(table, freeze=False, mode=m)).eval()
                      for m in (mode, "sum"))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        int8, int8_sum = (quantize_dynamic(m, {"0": float_qparams_weight_only_qconfig}, dtype=torch.qint8)
                          for m in (model, summing))
        reference, first, second = model[0](*inputs, **kwargs), int8[0](*inputs, **kwargs), int8[0](*inputs, **kwargs)
        sums = torch.equal(first, int8_sum[0](*inputs, **kwargs))
    error = float((first - reference).abs().max() / reference.abs().max())
    steady = bool(torch.equal(first, second))
    return {"relative_error": round(error, 4), "steady": steady, "returns_the_sum": sums,
            "bad": error > BAD_ERROR or not steady}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="x86", choices=[e for e in torch.backends.quantized.supported_engines
                                                            if e != "none"],
                        help="torch.backends.quantized.engine (x86, fbgemm, onednn: those this torch supports)")
    args = parser.parse_args(argv)
    torch.backends.quantized.engine = args.engine
    torch.manual_seed(0)
    cases = []
    for dim, cin, cout, kernel, stride in itertools.product((1, 2), (4, 8, 16, 32), (1, 8, 16), (2, 3, 4), (1, 2)):
        conv, transposed = (nn.Conv1d, nn.ConvTranspose1d) if dim == 1 else (nn.Conv2d, nn.ConvTranspose2d)
        model = nn.Sequential(conv(1, cin, 3, padding=1), nn.ReLU(), transposed(cin, cout, kernel, stride))
        shape = (8, 1, 8) if dim == 1 else (8, 1, 8, 8)
        cases.append({"op": f"ConvTranspose{dim}d({cin}, {cout}, {kernel}, stride={stride})",
                      **check(model, shape, args.engine)})
    for slopes in (1, 8):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(slopes), nn.Conv2d(8, 4, 1))
        cases.append({"op": f"PReLU({slopes}) between convs", **check(model, (4, 3, 10, 10), args.engine)})
    ids = torch.randint(0, 200, (8, 6))
    for mode in ("sum", "mean", "max"):
        forms = [("ids (8, 6)", (ids,), {}), ("flat ids, offsets", (ids.flatten(), torch.arange(0, 48, 6)), {})]
        if mode == "sum":
            forms.append(("ids, per_sample_weights", (ids,), {"per_sample_weights": torch.rand(8, 6)}))
        for form, inputs, kwargs in forms:
            cases.append({"op": f"EmbeddingBag(mode={mode!r}) on {form}", **check_bag(mode, inputs, kwargs)})
    for case in cases:
        if case["bad"]:
            print(f"BAD  {case['op']:<40} relative error {case['relative_error']:.2f}  steady {case['steady']}")
    by_kind: dict[str, list[dict]] = {}
    for case in cases:
        kind = case["op"].split(" on ")[0] if case["op"].startswith("EmbeddingBag") else case["op"].split("(")[0]
        by_kind.setdefault(kind, []).append(case)
    for kind, found in by_kind.items():
        sums = "" if "returns_the_sum" not in found[0] else \
            f"; {sum(c['returns_the_sum'] for c in found)} of {len(found)} return what int8 mode='sum' does"
        print(f"{kind}: {sum(c['bad'] for c in found)} of {len(found)} cases wrong{sums}")
    print(json.dumps({"torch": torch.__version__, "engine": args.engine, "cases": cases}))


if __name__ == "__main__":
    main()
