"""The pipeline's report: tables, JSON round trip, plot, and the ratios it derives."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from litcompress.report.compression import CompressionReport, Latency, StageMetrics
from litcompress.report.sparsity import TensorSparsity

_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_|", min_size=1, max_size=12)
_maybe_float = st.none() | st.floats(0, 1, allow_nan=False)
_maybe_count = st.none() | st.integers(0, 10**9)


@st.composite
def latencies(draw):
    values = sorted(draw(st.lists(st.floats(1e-4, 1e4, allow_nan=False), min_size=3, max_size=3)))
    return Latency(*values)


@st.composite
def reports(draw):
    stage_names = draw(st.lists(_names, min_size=1, max_size=5, unique=True))
    counts = [(parameters, None if parameters is None or draw(st.booleans()) else draw(st.integers(0, parameters)))
              for parameters in (draw(_maybe_count) for _ in stage_names)]  # (no more non-zero than parameters)
    stages = tuple(
        StageMetrics(stage=name, description=draw(st.text(max_size=30)), metric=draw(_maybe_float),
                     test_metric=draw(_maybe_float), parameters=parameters,
                     nonzero_parameters=nonzero, weight_sparsity=draw(_maybe_float),
                     size_bytes=draw(_maybe_count), gzip_bytes=draw(_maybe_count),
                     latency=draw(st.none() | latencies()), seconds=draw(st.floats(0, 1e4)))
        for name, (parameters, nonzero) in zip(stage_names, counts)
    )
    layers = tuple(TensorSparsity(draw(_names), zeros, zeros + draw(st.integers(0, 100)))
                   for zeros in draw(st.lists(st.integers(0, 100), max_size=3)))
    return CompressionReport(
        stages=stages, metric_name=draw(_names), test_metric_name=draw(st.none() | _names),
        batch_size=draw(st.none() | st.integers(1, 512)), num_threads=draw(st.none() | st.integers(1, 64)),
        layer_sparsity=layers, details=tuple((draw(_names), draw(st.text(max_size=40))) for _ in range(2)),
        messages=tuple(draw(st.lists(st.text(max_size=30), max_size=3))), artifact=draw(st.none() | _names),
    )


@settings(max_examples=60, deadline=None)
@given(report=reports())
def test_json_round_trip_gives_the_same_report(report, tmp_path_factory):
    """The same report, its artifact named from the working directory then (a relative path) and now (absolute)."""
    path = tmp_path_factory.mktemp("r") / "report.json"
    report.save_json(path)
    loaded = CompressionReport.load_json(path)
    assert replace(loaded, artifact=report.artifact) == report
    assert loaded.artifact == (None if report.artifact is None else os.path.abspath(report.artifact))


def test_a_saved_report_names_its_artifact_from_its_own_folder(tmp_path, monkeypatch):
    """report.json and report.md named the model file from the directory the pipeline ran in ("run1/model.pt2"): read
    from anywhere else, the path named nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "model.pt2").write_bytes(b"weights")
    report = CompressionReport((_stage("input", 1.0, 10),), artifact="run1/model.pt2")
    report.save("run1", plot=False)
    assert json.loads((tmp_path / "run1" / "report.json").read_text())["artifact"] == "model.pt2"
    assert "Artefact: `model.pt2`" in (tmp_path / "run1" / "report.md").read_text()
    assert report.artifact == "run1/model.pt2"  # the report in memory is left as it was
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = CompressionReport.load_json(tmp_path / "run1" / "report.json")
    assert Path(loaded.artifact).read_bytes() == b"weights"
    # a report written before names it as it was written
    older = json.loads((tmp_path / "run1" / "report.json").read_text())
    del older["artifact_relative_to"]
    older["artifact"] = "run1/model.pt2"
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert CompressionReport.load_json(tmp_path / "older.json").artifact == "run1/model.pt2"


@settings(max_examples=60, deadline=None)
@given(report=reports())
def test_from_dict_reads_what_to_dict_gives(report):
    """It wanted lists: to_dict's tuples (before any JSON) were refused ("'messages' must be a list")."""
    assert CompressionReport.from_dict(report.to_dict()) == report


_lines = st.lists(st.sampled_from(["# a heading", "```", "````x", "- item", "text", "", "  indented"]), max_size=4)


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(_lines.map("\n".join), min_size=1, max_size=3), detail=_lines.map("\n".join))
def test_markdown_keeps_each_message_one_item_and_each_detail_inside_its_block(messages, detail):
    """An error's lines in a message left its list item (a '# ...' line became a heading), and a detail holding
    a ``` line closed its code block early."""
    report = CompressionReport((_stage("input", 1.0, 10),), details=(("Trials", detail),), messages=tuple(messages))
    text = report.markdown()
    block = text[text.index("## Trials"):text.index("## Messages")].strip().splitlines()
    fence = block[2]
    assert set(fence) == {"`"} and block[-1] == fence and "\n".join(block[3:-1]) == detail
    assert not any(line.startswith(fence) for line in block[3:-1])  # nothing inside ends the block
    listed = text[text.index("## Messages"):].splitlines()[2:]
    assert [line.replace("\\", "") for line in listed] == [f"- {' '.join(m.split())}" for m in messages]
    # and no line of a message starts a heading, a quote or a list inside its item ('# a heading', '- item')
    assert not any(re.match(r"- ([#>*+-]|\d+[.)])", line) for line in listed)


def test_latencies_and_metrics_that_no_run_gives_are_refused():
    """An infinite latency passed (the table printed '1.0000-inf', the plot dropped its error bar) and a metric
    given as text loaded, to fail in the table's format."""
    with pytest.raises(ValueError, match="expected finite numbers"):
        Latency(1.0, 2.0, float("inf"))
    with pytest.raises(ValueError, match=re.escape("StageMetrics(metric='0.9', parameters=1.5)")):
        StageMetrics("input", "dense", metric="0.9", parameters=1.5)
    data = CompressionReport((_stage("input", 1.0, 10),)).to_dict()
    data["stages"][0]["size_bytes"] = "10"
    with pytest.raises(ValueError, match=re.escape("StageMetrics(size_bytes='10')")):
        CompressionReport.from_dict(data)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_metric_that_is_no_finite_number_is_refused_so_report_json_stays_json(value: float, tmp_path) -> None:
    """NaN and infinities passed: report.json held bare `NaN`/`Infinity` (JSON readers refuse them) and the plot
    dropped the stage."""
    for name in ("metric", "test_metric", "weight_sparsity", "seconds"):
        with pytest.raises(ValueError, match=re.escape(f"StageMetrics({name}={value!r}): ") + ".*must be finite"):
            StageMetrics("input", "dense", **{name: value})
    data = CompressionReport((_stage("input", 1.0, 10),)).to_dict()
    data["stages"][0]["metric"] = value
    (tmp_path / "report.json").write_text(json.dumps(data))  # (Python's json writes and reads NaN and Infinity)
    with pytest.raises(ValueError, match="must be finite"):
        CompressionReport.load_json(tmp_path / "report.json")


def test_a_zero_baseline_latency_gives_no_speedup_ratio() -> None:
    """It gave 0.00 (and '0.00x' on the plot): no ratio of a zero latency exists, as of a zero stage latency."""
    report = CompressionReport((replace(_stage("input", 1.0, 10), latency=Latency(0.0, 0.0, 0.0)),
                                replace(_stage("pruned", 1.0, 5), latency=Latency(0.1, 0.2, 0.3))))
    assert report.speedup("pruned") is None
    assert "0.00" not in report.table().splitlines()[3]


@pytest.mark.parametrize("writer", ["save_json", "save_markdown"])
def test_a_report_file_in_a_missing_folder_is_refused_naming_that_file(writer: str, tmp_path) -> None:
    """The error named a '.partial' file the user never asked for."""
    path = tmp_path / "no such folder" / "report.out"
    with pytest.raises(FileNotFoundError, match=re.escape(f"cannot write {path}: its folder")):
        getattr(CompressionReport((_stage("input", 1.0, 10),)), writer)(path)
    assert not path.parent.exists()


def test_save_names_a_file_given_as_its_folder_and_a_folder_in_the_way_before_writing_anything(tmp_path) -> None:
    """A file as the folder: mkdir's bare "File exists". A folder named report.png: report.json and report.md were
    written, then the plot failed naming a '.partial' file."""
    report = CompressionReport((_stage("input", 1.0, 10),))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"afile is a file, not a folder"):
        report.save(tmp_path / "afile", plot=False)
    with pytest.raises(NotADirectoryError, match=r"afile is a file, not a folder"):
        report.save(tmp_path / "afile" / "reports", plot=False)
    (tmp_path / "link").symlink_to(tmp_path / "gone")  # mkdir's bare "File exists" too
    with pytest.raises(NotADirectoryError, match=r"link is a broken link \(to '.*gone'\), not a folder; give a"):
        report.save(tmp_path / "link", plot=False)
    out = tmp_path / "out"
    (out / "report.md").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match=r"report\.md in it is a folder"):
        report.save(out, plot=False)
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]  # nothing written


@settings(max_examples=60, deadline=None)
@given(report=reports())
def test_tables_have_one_line_per_stage_and_every_column(report):
    table = report.table().splitlines()
    header = table[0].split()
    assert header[0] == "stage" and header[1] == report.metric_name
    assert (report.test_metric_name in header) == (report.test_metric_name is not None)
    rows = table[2:2 + len(report.stages)]
    assert [r.split()[0] for r in rows] == [s.stage for s in report.stages]
    markdown = report.markdown()
    # (not the separator lines: a description holding '|---' is a stage row still)
    stage_lines = [line for line in markdown.splitlines() if line.startswith("| ") and set(line) - set("|-: ")]
    # header + one per stage (+ the per-tensor sparsity table's header and rows)
    assert len(stage_lines) == 1 + len(report.stages) + (1 + len(report.layer_sparsity) if report.layer_sparsity else 0)
    # A '|' inside a cell is escaped, so every stage row has as many cells as the header.
    widths = {len(line.replace("\\|", "").split("|")) for line in stage_lines[: 1 + len(report.stages)]}
    assert len(widths) == 1


@settings(max_examples=60, deadline=None)
@given(report=reports())
def test_the_markdown_size_legend_names_no_row_the_table_lacks(report):
    # it once said "the file on disk for `exported`", a row the pipeline adds only when no stage changed the model
    legend = [line for line in report.markdown().splitlines() if "size: serialized weights" in line]
    assert len(legend) == (1 if report._conditions() else 0)
    for line in legend:
        assert "`exported`" not in line
        assert ("the last row: the file on disk" in line) == (report.artifact is not None)


def _stage(name: str, median: float | None, size: int | None) -> StageMetrics:
    latency = None if median is None else Latency(median / 2, median, median * 2)
    return StageMetrics(stage=name, description=name, metric=0.9, size_bytes=size, latency=latency)


@settings(max_examples=30, deadline=None)
@given(names=st.lists(_lines.map("\n".join), min_size=1, max_size=3, unique=True),
       messages=st.lists(_lines.map("\n".join), max_size=3))
def test_a_stage_name_or_message_of_several_lines_keeps_one_line_in_the_table_and_the_cli(names, messages):
    """A line break in a stage name split its row in table(), and one in a message its item in the CLI's list."""
    from litcompress.cli import _print_report

    report = CompressionReport(tuple(_stage(name, 1.0, 10) for name in names), messages=tuple(messages))
    rows = report.table().splitlines()[2:]
    assert len(rows) == len(names) and all(" ".join(n.split()) in row for n, row in zip(names, rows))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        _print_report(report)
    printed = out.getvalue().splitlines()
    assert printed[len(report.table().splitlines()):] == [f"- {' '.join(m.split())}" for m in messages]


@given(base=st.floats(1e-3, 1e3), other=st.floats(1e-3, 1e3), size=st.integers(1, 10**9),
       smaller=st.integers(0, 10**9))
def test_ratios_are_against_the_first_stage(base, other, size, smaller):
    report = CompressionReport((_stage("input", base, size), _stage("quantized", other, smaller)))
    assert report.speedup("input") == 1.0 and report.size_ratio("input") == 1.0
    assert report.speedup("quantized") == pytest.approx(base / other)
    assert report.size_ratio("quantized") == pytest.approx(smaller / size)
    assert report.baseline.stage == "input" and report.final.stage == "quantized"


def test_unknown_values_show_as_dashes_and_have_no_ratio():
    report = CompressionReport((_stage("input", None, None), _stage("quantized", 1.0, 10)))
    assert report.speedup("quantized") is None and report.size_ratio("quantized") is None
    row = report.table().splitlines()[2]
    assert row.split()[:3] == ["input", "0.9000", "-"]
    with pytest.raises(KeyError, match="stages: \\['input', 'quantized'\\]"):
        report["shrunk"]


def test_bad_reports_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one stage"):
        CompressionReport(())
    with pytest.raises(ValueError, match="unique"):
        CompressionReport((_stage("a", 1, 1), _stage("a", 1, 1)))
    (tmp_path / "x.json").write_text('{"format": 99}')
    with pytest.raises(ValueError, match="not a litcompress compression report"):
        CompressionReport.load_json(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        CompressionReport.load_json(tmp_path / "y.json")
    (tmp_path / "z.json").write_bytes(b"\xff\xfe\x00")  # not UTF-8: it failed in the decoding, before json
    with pytest.raises(ValueError, match="z.json is not a JSON file"):
        CompressionReport.load_json(tmp_path / "z.json")


def test_save_writes_json_markdown_and_a_png_plot(tmp_path):
    stages = (_stage("input", 2.0, 4000), _stage("pruned", 1.5, 4000), _stage("quantized", 0.5, 1000))
    report = CompressionReport(stages, metric_name="val_acc", batch_size=32, num_threads=1,
                               layer_sparsity=(TensorSparsity("0.weight", 3, 4),), details=(("Shrink", "table"),),
                               messages=("a note",))
    written = report.save(tmp_path / "out")
    assert set(written) == {"json", "markdown", "plot"}
    assert CompressionReport.load_json(written["json"]) == report
    markdown = written["markdown"].read_text()
    assert "| 0.weight | 3 | 4 | 75.00% |" in markdown and "## Shrink" in markdown and "- a note" in markdown
    assert "batch 32, 1 thread" in markdown
    png = written["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1100, 750)
    with pytest.raises(TypeError, match=r"save\(plot='False'\): expected True, False or None"):
        report.save(tmp_path / "again", plot="False")  # truthy: the plot was written
    assert not (tmp_path / "again").exists()



@pytest.mark.parametrize("metric_name", ["_private", ""])
def test_a_plot_draws_stage_and_metric_names_letter_for_letter(tmp_path, recwarn, metric_name):
    """A `$` in a stage name is maths to matplotlib: an unpaired `\\frac` failed to parse, with report.json and
    report.md written and no plot; a metric name empty or starting with `_` was left out of the legend (a warning
    said so).
    Latency figures from numpy (np.median of float32 timings) were refused as not finite."""
    import numpy as np

    timings = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    latency = Latency(timings.min(), np.median(timings), timings.max())
    assert latency == Latency(float(timings.min()), float(np.median(timings)), float(timings.max()))
    assert all(type(v) is float for v in (latency.min_ms, latency.median_ms, latency.max_ms))
    stages = (replace(_stage("input", 2.0, 4000), latency=latency), _stage(r"$\frac", 1.5, 4000),
              _stage("pruned $x$", 0.5, 1000))
    written = CompressionReport(stages, metric_name=metric_name).save(tmp_path)
    assert written["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [w for w in recwarn if "legend" in str(w.message)]
    from matplotlib.text import Text

    from litcompress.report.compression import _literal

    for name in (r"$\frac", "pruned $x$", metric_name):  # drawn as the letters given, no maths
        label = Text(text=_literal(name))
        assert label._preprocess_math(label.get_text()) == (_literal(name).replace(r"\$", "$"), False)
    assert CompressionReport.load_json(written["json"]).stages[0].latency == latency  # (float32's values, as floats)


@pytest.mark.parametrize("file", ["report.json", "report.md", "report.png"])
def test_a_save_interrupted_while_writing_keeps_the_report_that_was_there(tmp_path, file):
    """Each file was opened (emptied) in place: Ctrl-C while it was written left a cut-short report where the CLI
    says the files already in the folder are whole. The interrupt comes as a real Ctrl-C would: a SIGINT, here when
    the file (or the temporary file beside it) is open and its first bytes are about to be written."""
    import signal
    import sys
    from pathlib import Path

    before = CompressionReport((_stage("input", 2.0, 4000),), metric_name="val_acc")
    after = CompressionReport((_stage("input", 1.0, 2000), _stage("pruned", 0.5, 1000)), metric_name="val_acc")
    before.save(tmp_path)
    kept = (tmp_path / file).read_bytes()
    stem, suffix = file.split(".")
    sent = []

    def ctrl_c_at_first_write(frame, event, function):
        if event == "c_call" and getattr(function, "__name__", "") == "write" and not sent:
            name = Path(str(getattr(getattr(function, "__self__", None), "name", ""))).name
            if name == file or (name.startswith(f"{stem}.") and name.endswith(f".partial.{suffix}")):
                sent.append(name)
                signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.setprofile(ctrl_c_at_first_write)
    try:
        with pytest.raises(KeyboardInterrupt):
            after.save(tmp_path, plot=suffix == "png")
    finally:
        sys.setprofile(None)
        signal.signal(signal.SIGINT, previous)
    assert sent  # the interrupt came while the file was being written
    assert (tmp_path / file).read_bytes() == kept
    assert not list(tmp_path.glob("*.partial*"))


def _valid_report_dict() -> dict:
    report = CompressionReport((replace(_stage("input", 2.0, 4000), parameters=4000, nonzero_parameters=4000),
                                _stage("pruned", 1.5, 4000)), metric_name="val_acc",
                               batch_size=8, num_threads=1, layer_sparsity=(TensorSparsity("0.weight", 3, 4),),
                               details=(("Shrink", "table"),), messages=("a note",), artifact="model.pt")
    return json.loads(json.dumps(report.to_dict()))


def _set(data: dict, path: tuple, value: object) -> dict:
    *parents, last = path
    target = data
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return data


_DELETE = object()


@pytest.mark.parametrize(("path", "value", "named"), [
    ((), None, "a JSON object expected, got NoneType"),
    ((), [1, 2], "a JSON object expected, got list"),
    (("num_threads",), _DELETE, "no 'num_threads'"),
    (("stages", 0, "new_field"), 1, r"stages\[0\]: unknown field\(s\) \['new_field'\]"),
    (("stages", 0, "stage"), _DELETE, r"stages\[0\]: missing field\(s\) \['stage'\]"),
    (("stages", 1), "input", r"stages\[1\]: a JSON object expected, got str"),
    (("stages", 0, "latency"), [1, 2, 3], r"latency: a JSON object expected, got list"),
    (("layer_sparsity", 0, "zeros"), "3", r"layer_sparsity\[0\]="),
    (("layer_sparsity", 0, "zeros"), 5, r"layer_sparsity\[0\]="),  # more zeros than entries
    (("details", 0), "ab", r"details\[0\]='ab'"),
    (("batch_size",), "8", "batch_size='8'"),
    (("metric_name",), None, "metric_name=None"),
    (("artifact",), 5, "artifact=5"),
    (("stages", 0, "metric"), 10**400, r"must be finite"),  # no float holds it: it raised OverflowError
    # values no run gives, printed as they were (a sparsity of 170.0%, a size of -5)
    (("stages", 1, "weight_sparsity"), 1.7, r"StageMetrics\(weight_sparsity=1.7\): .*a fraction in \[0, 1\]"),
    (("stages", 1, "size_bytes"), -5, r"StageMetrics\(size_bytes=-5\): counts, sizes and seconds are >= 0"),
    (("stages", 1, "seconds"), -3.0, r"StageMetrics\(seconds=-3.0\)"),
    (("stages", 0, "nonzero_parameters"), 10**6, r"nonzero_parameters=1000000 > parameters=4000"),
    (("batch_size",), 0, r"batch_size=0 \(< 1\)"),
    (("num_threads",), -1, r"num_threads=-1 \(< 1\)"),
])
def test_a_file_that_is_not_a_report_of_this_version_is_refused_naming_what_is_wrong(path, value, named, tmp_path):
    """Each of these loaded as an AttributeError, KeyError or TypeError of the reader's, or loaded and failed later
    (in the table, on the artifact's path)."""
    data = value if path == () else _set(_valid_report_dict(), path, value)
    (tmp_path / "report.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=named):
        CompressionReport.load_json(tmp_path / "report.json")


def test_numpy_numbers_are_kept_as_python_numbers_so_the_report_writes_as_json(tmp_path):
    np = pytest.importorskip("numpy")
    stage = StageMetrics("input", "the model", metric=np.float32(0.5), parameters=np.int64(5),
                         size_bytes=np.int32(7), seconds=np.float64(1.5))
    assert (type(stage.metric), type(stage.parameters), type(stage.size_bytes), type(stage.seconds)) == (
        float, int, int, float)
    report = CompressionReport((stage,))
    assert CompressionReport.load_json(report.save_json(tmp_path / "report.json")) == report


def test_a_plot_required_without_matplotlib_is_refused_before_any_file_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    report = CompressionReport((_stage("input", 2.0, 4000),))
    with pytest.raises(ImportError, match="matplotlib"):
        report.save(tmp_path / "out", plot=True)
    assert not (tmp_path / "out").exists()
    assert set(report.save(tmp_path / "out")) == {"json", "markdown"}  # plot=None: skipped


def test_the_report_files_are_utf8_whatever_the_locale(tmp_path):
    """Under a C locale without Python's UTF-8 mode, report.md was written in ASCII: a message with a non-ASCII
    character failed after report.json was written."""
    # (escapes: under that locale a non-ASCII command line arrives as surrogates)
    script = ("import sys; from litcompress.report.compression import CompressionReport, StageMetrics; "
              "r = CompressionReport((StageMetrics('input', 'mod\\u00e8le \\u2713'),), messages=('\\u2018q\\u2019',)); "
              "r.save(sys.argv[1], plot=False); print(CompressionReport.load_json(sys.argv[1] + '/report.json') == r)")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "ascii:backslashreplace"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert "modèle ✓" in (tmp_path / "report.md").read_text(encoding="utf-8")


@settings(max_examples=200, deadline=None)
@given(value=st.one_of(st.integers(-10**16, 10**16),
                       st.floats(-1e16, 1e16, allow_nan=False).filter(lambda v: v == 0 or abs(v) >= 1e-3),
                       st.sampled_from([999.6, 999_600, 999_999, 999_500_000, 999.5e9, 85002, 1_234_567])))
def test_plot_labels_are_short_numbers_within_half_a_percent_of_the_value(value) -> None:
    """999,600 was labelled '1e+03k' (the scale chosen before the rounding to 3 digits). (Below 0.001, '1e-05' is
    the short form.)"""
    from litcompress.report.compression import _compact

    label = _compact(value)
    assert "e" not in label and len(label) <= 8, label
    number, suffix = re.fullmatch(r"(-?[\d.]+)([kMGT]?)", label).groups()
    scale = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[suffix]
    assert abs(float(number) * scale - value) <= 0.005 * abs(value) + 1e-12
    assert suffix == "" or 1 <= abs(float(number)) < 1000 or suffix == "T"
