"""Configuration dataclasses for post-training quantization (validated on construction)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from collections.abc import Iterable, KeysView, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Literal

from litcompress._numbers import python_numbers_

from .shapes import DynamicDims, normalize_dynamic_dims

Approach = Literal["dynamic", "static", "weight_only"]
CalibrationMethod = Literal["minmax", "histogram", "percentile"]

APPROACHES: tuple[str, ...] = ("dynamic", "static", "weight_only")
CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "histogram", "percentile")
DEFAULT_BACKENDS: tuple[str, ...] = ("torch_ao", "onnxruntime", "pt2e", "torchao")


@dataclass(frozen=True)
class AccuracyCriterion:
    """How much metric loss is tolerated against the fp32 baseline.

    ``tolerable_loss`` is a fraction of the baseline when ``relative`` is True
    (0.01 = 1 %), otherwise an absolute amount in the metric's own unit.
    ``higher_is_better`` is False for losses/errors.
    """

    tolerable_loss: float = 0.01
    relative: bool = True
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        python_numbers_(self)
        for flag in ("relative", "higher_is_better"):  # 'False' from a YAML file or the environment is truthy
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"AccuracyCriterion({flag}={getattr(self, flag)!r}): expected True or False.")
        if isinstance(self.tolerable_loss, bool) or not isinstance(self.tolerable_loss, (int, float)) \
                or not math.isfinite(self.tolerable_loss) or self.tolerable_loss < 0:
            raise ValueError(
                f"AccuracyCriterion(tolerable_loss={self.tolerable_loss!r}): expected a finite number >= 0, "
                "e.g. tolerable_loss=0.01 (1 % relative) or relative=False for an absolute amount."
            )

    def threshold(self, baseline: float) -> float:
        """The worst metric value that still meets the goal."""
        margin = self.tolerable_loss * abs(baseline) if self.relative else self.tolerable_loss
        return baseline - margin if self.higher_is_better else baseline + margin

    def is_met(self, metric: float, baseline: float) -> bool:
        limit = self.threshold(baseline)
        # A tiny epsilon so that a metric equal to the limit (e.g. identical accuracy) passes.
        eps = 1e-12 * max(1.0, abs(limit))
        return metric >= limit - eps if self.higher_is_better else metric <= limit + eps

    def is_better(self, a: float, b: float) -> bool:
        """True when metric ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b


# Name parts of metrics where lower is better (Lightning users log `val_loss`, `val_mse`, `val_wer`, ...; torchmetrics'
# MetricCollection logs class names: `val_MeanSquaredError`, `val_KLDivergence`, `val_HammingDistance`).
_LOWER_IS_BETTER_WORDS = frozenset({
    "loss", "error", "err", "mse", "mae", "rmse", "msle", "mape", "smape", "nll", "bce", "ce", "crossentropy", "kl",
    "kld", "divergence", "distance", "perplexity", "ppl", "wer", "cer", "eer", "fid", "lpips"})
METRIC_MODES: tuple[str, ...] = ("max", "min")


def metric_reads_lower_is_better(name: str) -> bool:
    """Whether a metric's name says lower is better: a part of it (split at non-letters and at camelCase words:
    ``valLoss``, ``MeanSquaredError``, ``MSELoss``) is a loss, an error or a distance."""
    parts = [part.lower() for part in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+", name)]
    joined = {a + b for a, b in zip(parts, parts[1:])}  # "Cross" "Entropy"
    return any(part in _LOWER_IS_BETTER_WORDS for part in (*parts, *joined))


def check_metric_mode(mode: str | None, where: str) -> str | None:
    if mode is not None and mode not in METRIC_MODES:
        raise ValueError(f"{where}(mode={mode!r}): expected 'max' (higher is better) or 'min' (lower is better).")
    return mode


def criterion_for_metric(criterion: AccuracyCriterion, metric: str, mode: str | None, where: str, *,
                         command_line: bool = False) -> AccuracyCriterion:
    """`criterion` judging `metric`: ``mode`` "max"/"min" (as Lightning's ``ModelCheckpoint(mode=...)``) sets which
    way is better; without it, a metric whose name reads as a loss or an error (``val_loss``) under the default
    higher-is-better criterion is refused, since the search would keep the candidates that raise the loss. With
    `command_line`, `where` is the option (``--metric``) and the error names ``--mode``.
    """
    if check_metric_mode(mode, where) is not None:
        return replace(criterion, higher_is_better=mode == "max")
    if criterion.higher_is_better and metric_reads_lower_is_better(metric):
        if command_line:
            subject, low, high = f"{where} {metric}", "--mode min", "--mode max"
        else:
            subject, low, high = f"{where}(metric={metric!r})", "mode='min'", "mode='max'"
            low += " (or AccuracyCriterion(higher_is_better=False))"
        raise ValueError(f"{subject}: it reads as a loss or an error (lower is better), but the accuracy goal treats "
                         "higher values as better: the search would keep the candidates that raise it. Pass "
                         f"{low}, or {high} if higher is better after all.")
    return criterion


@dataclass(frozen=True)
class Recipe:
    """One quantization candidate: everything needed to rebuild it without tuning."""

    backend: str
    approach: Approach
    per_channel: bool = True
    calibration: CalibrationMethod = "minmax"
    fp32_layers: tuple[str, ...] = ()
    reduce_range: bool = False

    def __post_init__(self) -> None:
        from .backends import BACKEND_APPROACHES, BACKEND_REGISTRY  # cheap: backends import lazily

        # any name (a file a backend of the user's wrote loads without it registered); the search and get_backend
        # refuse one they do not know
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"Recipe(backend={self.backend!r}): expected a backend's name, one of "
                             f"{tuple(BACKEND_REGISTRY)} or one registered in BACKEND_REGISTRY.")
        if self.approach not in APPROACHES:
            raise ValueError(f"Recipe(approach={self.approach!r}): unknown approach; use one of {APPROACHES}.")
        approaches = BACKEND_APPROACHES.get(self.backend)  # None: a backend registered elsewhere
        if approaches is not None and self.approach not in approaches:
            raise ValueError(f"Recipe(backend={self.backend!r}, approach={self.approach!r}): {self.backend} does "
                             f"{', '.join(approaches)} quantization.")
        if self.calibration not in CALIBRATION_METHODS:
            raise ValueError(
                f"Recipe(calibration={self.calibration!r}): unknown calibration method; use one of "
                f"{CALIBRATION_METHODS}."
            )
        for flag in ("per_channel", "reduce_range"):  # 'False' from a file is truthy
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"Recipe({flag}={getattr(self, flag)!r}): expected True or False.")
        # one name alone is one layer (tuple('fc1') was the layers 'f', 'c' and '1', and fc1 was quantized)
        layers = (self.fp32_layers,) if isinstance(self.fp32_layers, str) else self.fp32_layers
        if not isinstance(layers, Iterable):
            raise TypeError(f"Recipe(fp32_layers={self.fp32_layers!r}): expected module names (str), as in "
                            "model.named_modules().")
        layers = tuple(layers)  # once: a generator checked first would be used up
        if not all(isinstance(name, str) for name in layers):
            raise TypeError(f"Recipe(fp32_layers={layers!r}): expected module names (str), as in "
                            "model.named_modules().")
        object.__setattr__(self, "fp32_layers", layers)

    def with_fp32_layers(self, layers: tuple[str, ...]) -> "Recipe":
        return replace(self, fp32_layers=tuple(layers))

    def describe(self) -> str:
        parts = [self.backend, self.approach, "per-channel" if self.per_channel else "per-tensor"]
        if self.approach == "static":
            parts.append(self.calibration)
        if self.reduce_range:
            parts.append("reduce_range")
        if self.fp32_layers:
            parts.append(f"fp32={list(self.fp32_layers)}")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return {
            "backend": self.backend, "approach": self.approach, "per_channel": self.per_channel,
            "calibration": self.calibration, "fp32_layers": list(self.fp32_layers),
            "reduce_range": self.reduce_range,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        return cls(
            backend=data["backend"], approach=data["approach"], per_channel=data["per_channel"],
            calibration=data["calibration"], fp32_layers=tuple(data["fp32_layers"]),
            reduce_range=data["reduce_range"],
        )


@dataclass(frozen=True)
class PTQConfig:
    """What to tune: approach, accuracy goal, budget and the backends to consider.

    Args:
        approach: ``"dynamic"`` (int8 weights, activations quantized on the fly),
            ``"static"`` (int8 weights and activations, needs calibration data) or
            ``"weight_only"`` (int8 weights, float compute).
        accuracy: the accuracy goal against the fp32 baseline.
        backends: names in ``litcompress.quantization.BACKEND_REGISTRY`` (torch_ao, onnxruntime, pt2e, torchao),
            tried in this order.
        max_trials: evaluated candidates at most (the fp32 baseline is not counted).
        timeout_s: wall-clock budget for the search; the best model so far is returned.
        num_calibration_batches: batches of calibration data used for static quantization.
        latency_repeats: timed runs per candidate (median is kept).
        num_threads: threads pinned while measuring latency (None: keep torch's setting); an onnxruntime
            candidate's session is built with them, and the result's keeps them (``load_quantized`` builds one with
            torch's setting).
        compile: compile PT2E candidates with ``torch.compile`` (slow first call, fast kernels).
        min_speedup: keep an int8 model only if it runs at least this many times as fast as the fp32 one on this
            host (measured interleaved, at ``example_inputs``' batch size); otherwise the fp32 model is returned
            (``recipe`` None) and the result says why. 1.0: never slower. None: speed only ranks candidates, and a
            slower int8 model is kept for its 4x smaller weights (the result says it is slower).
        dynamic_dims: input dims that vary at inference time besides the batch dim, which exported files then leave
            free: ``{input_index: dims}``, e.g. ``{0: (1,)}`` for a sequence length of input 0. Dims whose size
            differs between calibration batches are found without it; declare those that calibration data fixed
            (padded to one length). A backend whose export cannot leave a dim free (``torch.export`` unrolls an
            RNN over its sequence) is skipped, and the trial says why.
    """

    approach: Approach = "dynamic"
    accuracy: AccuracyCriterion = field(default_factory=AccuracyCriterion)
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    max_trials: int = 10
    timeout_s: float | None = None
    num_calibration_batches: int = 16
    latency_repeats: int = 20
    num_threads: int | None = None
    compile: bool = False
    min_speedup: float | None = None
    dynamic_dims: DynamicDims | Mapping[int, int | Sequence[int]] | None = None

    def __post_init__(self) -> None:
        from .backends import BACKEND_APPROACHES, BACKEND_REGISTRY, backends_doing  # cheap: backends import lazily

        python_numbers_(self)
        if self.approach not in APPROACHES:
            raise ValueError(
                f"PTQConfig(approach={self.approach!r}): unknown approach; use one of {APPROACHES}."
            )
        if isinstance(self.backends, str):
            object.__setattr__(self, "backends", (self.backends,))
        if self.backends is None or not isinstance(self.backends, Iterable):
            raise TypeError(f"PTQConfig(backends={self.backends!r}): give backend names, e.g. "
                            f"{tuple(BACKEND_REGISTRY)}.")
        if isinstance(self.backends, AbstractSet) and not isinstance(self.backends, KeysView):
            # tried in order: a set's changes from run to run (a dict's keys keep theirs)
            raise TypeError(f"PTQConfig(backends={self.backends!r}): give the names in the order to try them, as a "
                            f"tuple or list, e.g. {tuple(BACKEND_REGISTRY)}.")
        object.__setattr__(self, "backends", tuple(self.backends))
        if not self.backends:
            raise ValueError(f"PTQConfig(backends=()): give at least one of {tuple(BACKEND_REGISTRY)}.")
        for name in self.backends:
            if not isinstance(name, str):
                raise TypeError(f"PTQConfig(backends={self.backends!r}): each backend is a name (str), got "
                                f"{type(name).__name__} {name!r}.")
            if name not in BACKEND_REGISTRY:
                raise ValueError(
                    f"PTQConfig(backends=...): unknown backend {name!r}; use names from "
                    f"{tuple(BACKEND_REGISTRY)}."
                )
        repeated = sorted({name for name in self.backends if self.backends.count(name) > 1})
        if repeated:  # each would search the same recipes again and spend max_trials on them
            raise ValueError(f"PTQConfig(backends={self.backends!r}): {', '.join(map(repr, repeated))} given more "
                             "than once; name each backend once.")
        known = [BACKEND_APPROACHES.get(name) for name in self.backends]  # a backend registered elsewhere: unknown
        if None not in known and not any(self.approach in approaches for approaches in known):
            raise ValueError(
                f"PTQConfig(approach={self.approach!r}, backends={self.backends!r}): none of these backends does "
                f"{self.approach} quantization ("
                + "; ".join(f"{name}: {', '.join(BACKEND_APPROACHES[name])}" for name in self.backends)
                + f"); add one that does: {', '.join(backends_doing(self.approach))}."
            )
        if not isinstance(self.accuracy, AccuracyCriterion):
            raise TypeError(
                f"PTQConfig(accuracy={self.accuracy!r}): expected an AccuracyCriterion, "
                "e.g. AccuracyCriterion(tolerable_loss=0.01)."
            )
        if not isinstance(self.compile, bool):
            raise TypeError(f"PTQConfig(compile={self.compile!r}): expected True or False.")

        def whole(value: object) -> bool:  # an int, not a bool (True is 1 to Python, and a mistake here)
            return isinstance(value, int) and not isinstance(value, bool)

        if not whole(self.max_trials) or self.max_trials < 1:
            raise ValueError(f"PTQConfig(max_trials={self.max_trials!r}): expected an int >= 1.")
        if self.timeout_s is not None and (isinstance(self.timeout_s, bool) or not isinstance(
                self.timeout_s, (int, float)) or not self.timeout_s > 0):
            raise ValueError(f"PTQConfig(timeout_s={self.timeout_s!r}): expected a positive number of seconds or "
                             "None.")
        if not whole(self.num_calibration_batches) or self.num_calibration_batches < 1:
            raise ValueError(
                f"PTQConfig(num_calibration_batches={self.num_calibration_batches!r}): expected an int >= 1."
            )
        if not whole(self.latency_repeats) or self.latency_repeats < 1:
            raise ValueError(f"PTQConfig(latency_repeats={self.latency_repeats!r}): expected an int >= 1.")
        if self.num_threads is not None and (not whole(self.num_threads) or self.num_threads < 1):
            raise ValueError(f"PTQConfig(num_threads={self.num_threads!r}): expected an int >= 1 or None.")
        if self.min_speedup is not None and (isinstance(self.min_speedup, bool) or not isinstance(
                self.min_speedup, (int, float)) or not 0 < self.min_speedup < float("inf")):
            raise ValueError(f"PTQConfig(min_speedup={self.min_speedup!r}): expected a number > 0 (e.g. 1.0: int8 "
                             "only where it is not slower than fp32) or None.")
        object.__setattr__(self, "dynamic_dims", normalize_dynamic_dims(self.dynamic_dims))
