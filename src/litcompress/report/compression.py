"""The compression pipeline's report: accuracy, size, sparsity and latency of every stage.

One row per stage (the input model, then pruned, shrunk, quantized and the exported file read back), rendered as a
plain-text table, a Markdown page and a PNG plot, and stored as JSON so that it can be rendered again later
(``litcompress report out/report.json``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import re
import os
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from litcompress._files import folders_in_the_way, what_is_in_the_way, written_atomically
from litcompress.report.sparsity import TensorSparsity, percent

REPORT_FORMAT = 1


@dataclass(frozen=True)
class Latency:
    """Latency of one call on the example batch, in milliseconds, over interleaved repeats."""

    min_ms: float
    median_ms: float
    max_ms: float

    def __post_init__(self) -> None:
        # a report.json edited by hand fails when read, not in the plot's error bars after the table was printed
        values = (self.min_ms, self.median_ms, self.max_ms)
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and _finite(v) for v in values) \
                or not 0 <= self.min_ms <= self.median_ms <= self.max_ms:
            raise ValueError(f"Latency(min_ms={self.min_ms!r}, median_ms={self.median_ms!r}, max_ms={self.max_ms!r})"
                             ": expected finite numbers with 0 <= min <= median <= max.")
        for name in ("min_ms", "median_ms", "max_ms"):  # plain floats: numpy's float32 (np.median's) was refused
            object.__setattr__(self, name, float(getattr(self, name)))


@dataclass(frozen=True)
class StageMetrics:
    """What one stage of the pipeline produced, measured on the same inputs as every other stage.

    ``parameters``/``nonzero_parameters``/``weight_sparsity`` are None where nothing gave them; the pipeline's
    quantized and exported rows (ONNX Runtime, packed int8 kernels, which hold no torch parameters) count the fp32
    model they were made from (int8 rounding may add a few zeros); ``weight_sparsity`` counts zeros in the weights of
    Linear/Conv/recurrent layers, embeddings and attentions' input projections.
    """

    stage: str
    description: str
    metric: float | None = None
    test_metric: float | None = None
    parameters: int | None = None
    nonzero_parameters: int | None = None
    weight_sparsity: float | None = None
    size_bytes: int | None = None
    gzip_bytes: int | None = None
    latency: Latency | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        # a report.json edited by hand ("metric": "0.9") fails when read, not in the table after a partial print
        wrong = [f"{name}={getattr(self, name)!r}" for name in ("stage", "description")
                 if not isinstance(getattr(self, name), str)]
        wrong += [f"{name}={value!r}" for name in ("metric", "test_metric", "weight_sparsity", "seconds")
                  if (value := getattr(self, name)) is not None
                  and (isinstance(value, bool) or not isinstance(value, numbers.Real))]
        wrong += [f"{name}={value!r}" for name in ("parameters", "nonzero_parameters", "size_bytes", "gzip_bytes")
                  if (value := getattr(self, name)) is not None
                  and (isinstance(value, bool) or not isinstance(value, numbers.Integral))]
        if self.latency is not None and not isinstance(self.latency, Latency):
            wrong.append(f"latency={self.latency!r}")
        if wrong:
            raise ValueError(f"StageMetrics({', '.join(wrong)}): stage and description are text, the metrics, "
                             "sparsity and seconds numbers, the counts ints, latency a Latency (or None).")
        # as Latency's: a NaN or infinity made report.json that JSON readers refuse (and a plot without the stage)
        wrong = [f"{name}={value!r}" for name in ("metric", "test_metric", "weight_sparsity", "seconds")
                 if (value := getattr(self, name)) is not None and not _finite(value)]
        if wrong:
            raise ValueError(f"StageMetrics({', '.join(wrong)}): the metrics, sparsity and seconds must be finite "
                             "(None where there is none).")
        # (a report.json edited into values no run gives: a sparsity of 170% printed as it was)
        counted = ("parameters", "nonzero_parameters", "size_bytes", "gzip_bytes", "seconds")
        wrong = [f"{name}={value!r}" for name in counted if (value := getattr(self, name)) is not None and value < 0]
        if self.weight_sparsity is not None and not 0 <= self.weight_sparsity <= 1:
            wrong.append(f"weight_sparsity={self.weight_sparsity!r}")
        if None not in (self.parameters, self.nonzero_parameters) and self.nonzero_parameters > self.parameters:
            wrong.append(f"nonzero_parameters={self.nonzero_parameters!r} > parameters={self.parameters!r}")
        if wrong:
            raise ValueError(f"StageMetrics({', '.join(wrong)}): counts, sizes and seconds are >= 0, the weight "
                             "sparsity a fraction in [0, 1], and no more parameters non-zero than there are.")
        # plain float and int (a numpy scalar passed the checks above too, and report.json could not be written)
        for name in ("metric", "test_metric", "weight_sparsity", "seconds"):
            if (value := getattr(self, name)) is not None and type(value) is not float:
                object.__setattr__(self, name, float(value))
        for name in ("parameters", "nonzero_parameters", "size_bytes", "gzip_bytes"):
            if (value := getattr(self, name)) is not None and type(value) is not int:
                object.__setattr__(self, name, int(value))


def _finite(value: numbers.Real) -> bool:
    """A finite number that a float holds (an int beyond 1e308 raised OverflowError in math.isfinite)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _latency(value: object) -> Latency | None:
    return None if value is None else _record(Latency, "latency", value)


def _record(cls: type, where: str, data: object, **read: Any) -> Any:
    """``cls(**data)`` of a report.json entry, with `read` converting some of its fields; a ValueError naming `where`
    for an entry that is not an object or has fields `cls` does not."""
    if not isinstance(data, dict):
        raise ValueError(f"report {where}: a JSON object expected, got {type(data).__name__}.")
    names = {f.name for f in fields(cls)}
    unknown, missing = sorted(set(data) - names), sorted(f.name for f in fields(cls) if f.name not in data
                                                         and f.default is MISSING)
    if unknown or missing:
        raise ValueError(f"report {where}: " + "; ".join(
            part for part in (unknown and f"unknown field(s) {unknown} (written by another version?)",
                              missing and f"missing field(s) {missing}") if part) + ".")
    return cls(**{name: read[name](value) if name in read else value for name, value in data.items()})


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return " ".join(text.replace("|", "\\|").split()) or " "


def _plain_line(text: str) -> str:
    """`text` on one line that Markdown reads as text: a leading '#', '>', list marker or '1.' escaped (it made a
    heading or a nested list inside the list item)."""
    line = re.sub(r"^([#>*+-])", r"\\\1", " ".join(text.split()))
    return re.sub(r"^(\d+)([.)])", r"\1\\\2", line)  # "1\." is no list item


def _compact(value: float | int | None) -> str:
    """A short label: 85002 -> '85k', 1234567 -> '1.23M', 75.2 -> '75.2'."""
    if value is None:
        return ""
    # the scale of the value as rounded to 3 digits: 999,600 is '1M', not '1e+03k'
    rounded = float(f"{value:.3g}")
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(rounded) >= scale:
            scaled = rounded / scale
            return f"{scaled:.3g}{suffix}" if abs(scaled) < 1000 else f"{scaled:.0f}{suffix}"  # (no '1e+03T')
    return f"{rounded:.3g}"


@dataclass(frozen=True)
class CompressionReport:
    """Every stage's metrics, plus the details of the stages that have them (tables as text)."""

    stages: tuple[StageMetrics, ...]
    metric_name: str = "metric"
    test_metric_name: str | None = None
    batch_size: int | None = None
    num_threads: int | None = None
    layer_sparsity: tuple[TensorSparsity, ...] = ()
    details: tuple[tuple[str, str], ...] = ()  # (section title, preformatted text)
    messages: tuple[str, ...] = ()
    artifact: str | None = None

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("CompressionReport needs at least one stage (the input model).")
        wrong = [f"stages[{i}]={stage!r}" for i, stage in enumerate(self.stages) if not isinstance(stage, StageMetrics)]
        wrong += [f"{name}={value!r}" for name, value, allowed in (
            ("metric_name", self.metric_name, (str,)), ("test_metric_name", self.test_metric_name, (str, type(None))),
            ("artifact", self.artifact, (str, type(None))),
            ("batch_size", self.batch_size, (int, type(None))), ("num_threads", self.num_threads, (int, type(None))))
            if isinstance(value, bool) or not isinstance(value, allowed)]
        wrong += [f"layer_sparsity[{i}]={t!r}" for i, t in enumerate(self.layer_sparsity)
                  if not (isinstance(t, TensorSparsity) and isinstance(t.name, str)
                          and all(type(n) is int and n >= 0 for n in (t.zeros, t.numel)) and t.zeros <= t.numel)]
        wrong += [f"details[{i}]={d!r}" for i, d in enumerate(self.details)
                  if not (isinstance(d, tuple) and len(d) == 2 and all(isinstance(part, str) for part in d))]
        wrong += [f"messages[{i}]={m!r}" for i, m in enumerate(self.messages) if not isinstance(m, str)]
        wrong += [f"{name}={value!r} (< 1)" for name, value in (("batch_size", self.batch_size),
                                                              ("num_threads", self.num_threads))
                  if type(value) is int and value < 1]
        if wrong:
            raise ValueError(f"CompressionReport({', '.join(wrong)}): stages are StageMetrics, metric_name text "
                             "(test_metric_name and artifact text or None), batch_size and num_threads ints >= 1 "
                             "(or None), layer_sparsity TensorSparsity(name, zeros <= numel), details (title, text) "
                             "pairs, messages text.")
        names = [s.stage for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")

    # ------------------------------------------------------------------------------------------- lookups
    def __getitem__(self, stage: str) -> StageMetrics:
        for s in self.stages:
            if s.stage == stage:
                return s
        raise KeyError(f"no stage {stage!r}; stages: {[s.stage for s in self.stages]}")

    @property
    def baseline(self) -> StageMetrics:
        return self.stages[0]

    @property
    def final(self) -> StageMetrics:
        return self.stages[-1]

    def speedup(self, stage: str) -> float | None:
        """Baseline median latency / this stage's (both measured interleaved in one run)."""
        base, this = self.baseline.latency, self[stage].latency
        if base is None or this is None or this.median_ms <= 0 or base.median_ms <= 0:  # no ratio of a 0
            return None
        return base.median_ms / this.median_ms

    def size_ratio(self, stage: str) -> float | None:
        """This stage's serialized size / the baseline's."""
        base, this = self.baseline.size_bytes, self[stage].size_bytes
        return None if not base or this is None else this / base

    # ------------------------------------------------------------------------------------------- tables
    def _columns(self) -> list[tuple[str, list[str]]]:
        stages = self.stages
        columns = [("stage", [" ".join(s.stage.split()) for s in stages]),  # one line, as "what"
                   (self.metric_name, [_fmt(s.metric, ".4f") for s in stages])]
        if self.test_metric_name is not None:
            columns.append((self.test_metric_name, [_fmt(s.test_metric, ".4f") for s in stages]))
        columns += [
            ("params", [_fmt(s.parameters, ",d") for s in stages]),
            ("nonzero", [_fmt(s.nonzero_parameters, ",d") for s in stages]),
            ("sparsity", ["-" if s.weight_sparsity is None else percent(s.weight_sparsity, 1) for s in stages]),
            ("size KiB", [_fmt(None if s.size_bytes is None else s.size_bytes / 1024, ".1f") for s in stages]),
            ("gzip KiB", [_fmt(None if s.gzip_bytes is None else s.gzip_bytes / 1024, ".1f") for s in stages]),
            ("size x", [_fmt(self.size_ratio(s.stage), ".3f") for s in stages]),
            ("latency ms", [_fmt(None if s.latency is None else s.latency.median_ms, ".4f") for s in stages]),
            ("min-max ms", ["-" if s.latency is None else f"{s.latency.min_ms:.4f}-{s.latency.max_ms:.4f}"
                            for s in stages]),
            ("speed-up", [_fmt(self.speedup(s.stage), ".2f") for s in stages]),
            ("what", [" ".join(s.description.split()) for s in stages]),  # one line, whatever it holds
        ]
        return columns

    def _conditions(self) -> str:
        parts = []
        if self.batch_size is not None:
            parts.append(f"batch {self.batch_size}")
        if self.num_threads is not None:
            parts.append(f"{self.num_threads} thread{'s' if self.num_threads != 1 else ''}")
        return ("latency: median of interleaved runs, " + ", ".join(parts)) if parts else ""

    def table(self) -> str:
        """The stage table as aligned plain text."""
        columns = self._columns()
        widths = [max(len(title), *(len(c) for c in cells)) for title, cells in columns]
        last = len(columns) - 1

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c if i == last else (c.ljust(w) if i == 0 else c.rjust(w))
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        lines = [line([title for title, _ in columns]), line(["-" * w for w in widths])]
        lines += [line([cells[row] for _, cells in columns]) for row in range(len(self.stages))]
        if self._conditions():
            lines.append(self._conditions())
        return "\n".join(lines)

    def markdown(self) -> str:
        """A Markdown page: the stage table, then per-layer sparsity, each stage's details and the messages."""
        columns = self._columns()
        out = ["# Compression report", ""]
        out.append("| " + " | ".join(_cell(title) for title, _ in columns) + " |")
        out.append("|" + "|".join("---" if i in (0, len(columns) - 1) else "---:" for i in range(len(columns))) + "|")
        for row in range(len(self.stages)):
            out.append("| " + " | ".join(_cell(cells[row]) for _, cells in columns) + " |")
        if self._conditions():
            # the last row is the exported file read back (an `exported` row only when no stage changed the model)
            size = "serialized weights" + (" (the last row: the file on disk)" if self.artifact else "")
            out += ["", f"{self._conditions()}; size: {size}."]
        if self.artifact:
            out += ["", f"Artefact: `{self.artifact}`"]
        if self.layer_sparsity:
            out += ["", "## Sparsity per tensor after pruning", "", "| tensor | zeros | numel | sparsity |",
                    "|---|---:|---:|---:|"]
            out += [f"| {_cell(t.name)} | {t.zeros:,} | {t.numel:,} | {percent(t.sparsity, 2)} |"
                    for t in self.layer_sparsity]
        for title, text in self.details:
            fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))  # outlasts text's
            out += ["", f"## {_cell(title)}", "", fence, text, fence]
        if self.messages:  # one line each: a message holding an error's lines stays one list item
            out += ["", "## Messages", ""] + [f"- {_plain_line(m)}" for m in self.messages]
        return "\n".join(out) + "\n"

    # ------------------------------------------------------------------------------------------- storage
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = REPORT_FORMAT
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        """The report :meth:`to_dict` gave; a ValueError that names what is wrong for anything else."""
        if not isinstance(data, dict):
            raise ValueError(f"not a litcompress compression report: a JSON object expected, got "
                             f"{type(data).__name__}.")
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a litcompress compression report (format {data.get('format')!r}, "
                             f"expected {REPORT_FORMAT}).")
        for field_name in ("messages", "details", "stages", "layer_sparsity"):  # a string would iterate by character
            if not isinstance(data.get(field_name), (list, tuple)):  # tuples: to_dict's own, before any JSON
                raise ValueError(f"'{field_name}' must be a list, got {type(data.get(field_name)).__name__}.")
        if not all(isinstance(m, str) for m in data["messages"]):
            raise ValueError("'messages' must be a list of strings.")
        missing = [name for name in ("metric_name", "test_metric_name", "batch_size", "num_threads", "artifact")
                   if name not in data]
        if missing:
            raise ValueError(f"not a complete litcompress compression report: no {', '.join(map(repr, missing))}.")
        stages = tuple(_record(StageMetrics, f"stages[{i}]", s, latency=_latency) for i, s in enumerate(data["stages"]))
        return cls(
            stages=stages,
            metric_name=data["metric_name"],
            test_metric_name=data["test_metric_name"],
            batch_size=data["batch_size"],
            num_threads=data["num_threads"],
            layer_sparsity=tuple(_record(TensorSparsity, f"layer_sparsity[{i}]", t)
                                 for i, t in enumerate(data["layer_sparsity"])),
            details=tuple(tuple(d) if isinstance(d, list) else d for d in data["details"]),
            messages=tuple(data["messages"]),
            artifact=data["artifact"],
        )

    def _naming_the_artifact_from(self, directory: Path) -> CompressionReport:
        """This report with its artifact's path relative to `directory`, where the report's files go (beside the
        artifact, as the pipeline writes them): a path relative to the run's working directory named no file once
        the report was read from anywhere else."""
        if self.artifact is None:
            return self
        return replace(self, artifact=os.path.relpath(os.path.abspath(self.artifact), os.path.abspath(directory)))

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON to `path`; its artifact is named relative to the file's folder
        (:meth:`load_json` resolves it from there)."""
        path = Path(path)
        data = self._naming_the_artifact_from(path.parent).to_dict()
        if data["artifact"] is not None:
            data["artifact_relative_to"] = "report"
        with written_atomically(path) as partial:  # an interrupted write keeps the report that was there
            partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path

    def save_markdown(self, path: str | os.PathLike) -> Path:
        """Write :meth:`markdown` to `path`, naming the artifact relative to the file's folder."""
        path = Path(path)
        with written_atomically(path) as partial:  # a Ctrl-C while writing keeps the file that was there
            partial.write_text(self._naming_the_artifact_from(path.parent).markdown(), encoding="utf-8")
        return path

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> CompressionReport:
        """Read a report :meth:`save_json` wrote; its artifact's path is resolved from the file's folder (absolute)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:  # a binary file fails in the decoding, not in json
            raise ValueError(f"{path} is not a JSON file ({error}).") from error
        report = cls.from_dict(data)
        if isinstance(data, dict) and data.get("artifact_relative_to") == "report" and report.artifact is not None:
            report = replace(report, artifact=os.path.abspath(path.parent / report.artifact))  # older: as written
        return report

    def save(self, directory: str | os.PathLike, *, plot: bool | None = None) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and ``report.png`` into `directory`; returns what was written.

        ``plot=None`` plots when matplotlib is installed, ``True`` requires it, ``False`` skips the plot.
        """
        if plot is not None and not isinstance(plot, bool):  # 'False' was truthy: the plot was written
            raise TypeError(f"CompressionReport.save(plot={plot!r}): expected True, False or None.")
        directory = Path(directory)
        has_matplotlib = importlib.util.find_spec("matplotlib") is not None
        if plot and not has_matplotlib:  # before anything is written: the files of one save go together
            raise ImportError("plotting the report needs matplotlib: pip install 'litcompress[report]' (or "
                              "plot=False)")
        blocking = what_is_in_the_way(directory)
        if blocking is not None:  # mkdir said only "File exists"
            raise NotADirectoryError(f"CompressionReport.save({str(directory)!r}): {blocking}; give a folder to "
                                     "write report.json, report.md and report.png into.")
        names = ["report.json", "report.md", *(["report.png"] if plot or (plot is None and has_matplotlib) else [])]
        in_the_way = folders_in_the_way(directory, names)
        if in_the_way:  # before any file is written: the files of one save go together
            raise IsADirectoryError(f"CompressionReport.save({str(directory)!r}): {', '.join(in_the_way)} in it "
                                    f"{'is a folder' if len(in_the_way) == 1 else 'are folders'}, where the report "
                                    "writes files of those names; move them, or give another folder.")
        directory.mkdir(parents=True, exist_ok=True)
        written = {"json": self.save_json(directory / "report.json"),
                   "markdown": self.save_markdown(directory / "report.md")}
        if plot is None:
            plot = has_matplotlib
        if plot:
            written["plot"] = self.plot(directory / "report.png")
        return written

    # ------------------------------------------------------------------------------------------- plot
    def plot(self, path: str | os.PathLike) -> Path:
        """A figure with four panels per stage: metric, latency (median, min-max bars), size, parameters; returns the
        path written. Its format is the suffix's (any matplotlib writes); without one, PNG at ``<path>.png``.

        Needs matplotlib (``pip install 'litcompress[report]'``).
        """
        try:
            from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
        except ImportError as error:
            raise ImportError("plotting the report needs matplotlib: pip install 'litcompress[report]'") from error
        names = [_literal(s.stage) for s in self.stages]
        x = list(range(len(names)))
        figure = Figure(figsize=(11, 7.5), layout="constrained")
        axes = figure.subplots(2, 2)

        def bars(ax: Any, series: list[tuple[str, list[float | None]]], ylabel: str, title: str) -> None:
            width = 0.8 / len(series)
            for k, (label, values) in enumerate(series):
                offsets = [i - 0.4 + width * (k + 0.5) for i in x]
                drawn = ax.bar(offsets, [math.nan if v is None else v for v in values], width, label=_literal(label))
                ax.bar_label(drawn, labels=[_compact(v) for v in values], fontsize=8, padding=2)
            ax.set_xticks(x, names)
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            if len(series) > 1:
                ax.legend(fontsize=8)
            ax.margins(y=0.15)

        # Metrics as points: bars on a zoomed axis would exaggerate small differences.
        ax = axes[0][0]
        metrics = [(self.metric_name, [s.metric for s in self.stages])]
        if self.test_metric_name is not None:
            metrics.append((self.test_metric_name, [s.test_metric for s in self.stages]))
        for label, values in metrics:
            ax.plot(x, [math.nan if v is None else v for v in values], marker="o", label=_literal(label))
            for i, v in zip(x, values):
                if v is not None:
                    ax.annotate(f"{v:.4g}", (i, v), textcoords="offset points", xytext=(0, 6), ha="center",
                                fontsize=8)
        ax.set_xticks(x, names)
        ax.set_ylabel("metric")
        ax.set_title("Metric per stage")
        ax.legend(fontsize=8)
        ax.margins(x=0.1, y=0.25)
        ax.grid(axis="y", alpha=0.3)

        ax = axes[0][1]
        medians = [math.nan if s.latency is None else s.latency.median_ms for s in self.stages]
        low_err = [0.0 if s.latency is None else s.latency.median_ms - s.latency.min_ms for s in self.stages]
        high_err = [0.0 if s.latency is None else s.latency.max_ms - s.latency.median_ms for s in self.stages]
        drawn = ax.bar(x, medians, 0.6, yerr=[low_err, high_err], capsize=4, color="tab:orange")
        speedups = [self.speedup(s.stage) for s in self.stages]
        ax.bar_label(drawn, labels=[("" if up is None else f"{up:.2f}x") for up in speedups],
                     fontsize=8, padding=2, label_type="center")
        ax.set_xticks(x, names)
        ax.set_ylabel("ms per call (median, min-max)")
        ax.set_title(f"Latency ({self._conditions().removeprefix('latency: ') or 'this host'})", fontsize=9)

        kib = lambda values: [None if v is None else v / 1024 for v in values]  # noqa: E731
        bars(axes[1][0], [("serialized", kib([s.size_bytes for s in self.stages])),
                          ("gzip", kib([s.gzip_bytes for s in self.stages]))], "KiB", "Size")
        bars(axes[1][1], [("all", [s.parameters for s in self.stages]),
                          ("nonzero", [s.nonzero_parameters for s in self.stages])], "count", "Parameters")
        path = plot_path(path)
        with written_atomically(path) as partial:  # (same suffix: the same format)
            figure.savefig(partial, dpi=100)
        return path

    def __str__(self) -> str:
        return self.table()


def _literal(text: str) -> str:
    """`text` as matplotlib draws it letter for letter: a `$` pair is maths to it (an unpaired `\\frac` failed to
    parse, after report.json and report.md were written), and a legend leaves out a label that is empty or starts
    with `_`."""
    text = text.replace("$", r"\$")
    return "\u200b" + text if not text or text.startswith("_") else text


def plot_path(path: str | os.PathLike) -> Path:
    """The file :meth:`CompressionReport.plot` writes for `path`: a path without a suffix gets ``.png`` (matplotlib
    appends it anyway, and the path returned must be the file's)."""
    path = Path(path)
    return path if path.suffix else path.with_name(path.name + ".png")


__all__ = ["CompressionReport", "Latency", "StageMetrics"]
