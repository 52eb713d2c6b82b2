"""The `litcompress` command end to end: real training, real files, errors at parse time."""

from __future__ import annotations

import json
import logging
import re
import shlex
import os
import subprocess
import time
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from hypothesis import given, strategies as st

from litcompress.cli import _datamodule, build_parser, in_cli_terms, main
from litcompress.data import DigitsDataModule
from litcompress.models import CNNClassifier, MLPClassifier
from litcompress.pipeline.compress import PRUNED_STATE_FILE, SHRUNK_STATE_FILE
from litcompress.quantization import load_quantized
from litcompress.report.compression import CompressionReport

@pytest.fixture(autouse=True, scope="module")  # module: set up before the module fixtures that run main()
def _restore_framework_log_levels():
    """main() quiets Lightning's loggers for the process it owns; here that process runs the other tests too
    (Lightning's INFO lines are what the parity tests compare)."""
    names = ("lightning.pytorch", "lightning.fabric", "torchao", "torch.utils._pytree")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


QUICK = ["--train-epochs", "2", "--prune-epochs", "1", "--backends", "torch_ao", "--latency-repeats", "2",
         "--max-trials", "2"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["compress", *QUICK, "--model-args", '{"hidden": [48, 48]}', "--sparsity", "0.7",
                 "--output-dir", str(out)])
    return code, out


def test_compress_trains_compresses_and_writes_every_file(first_run, capsys):
    code, out = first_run
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"dense.ckpt", PRUNED_STATE_FILE, "model.pt", "report.json", "report.md", "report.png"} <= names
    report = CompressionReport.load_json(out / "report.json")
    stages = [s.stage for s in report.stages]
    # Unstructured pruning may or may not leave a unit without inputs; the report says which.
    assert stages in (["input", "pruned", "shrunk", "quantized"], ["input", "pruned", "quantized"])
    assert ("shrunk" in stages) != any(m.startswith("shrink: no all-zero channel") for m in report.messages)
    assert report.metric_name == "val_acc" and report.test_metric_name == "test_acc"
    assert report["pruned"].weight_sparsity == pytest.approx(0.7, abs=1e-4)
    assert report["quantized"].size_bytes == (out / "model.pt").stat().st_size
    # The dense checkpoint and the pruned state dict both load into the original architecture.
    dense = MLPClassifier.load_from_checkpoint(out / "dense.ckpt", map_location="cpu")
    dense.load_state_dict(torch.load(out / PRUNED_STATE_FILE))  # strict: same architecture, plain keys
    weights = [m.weight for m in dense.net if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(report["pruned"].weight_sparsity, abs=1e-12)
    model, recipe = load_quantized(out / "model.pt")
    assert recipe.backend == "torch_ao" and recipe.approach == "dynamic"
    assert model(torch.rand(3, 64)).shape == (3, 10)


def test_a_ctrl_c_while_report_writes_its_markdown_keeps_the_file_that_was_there(first_run, tmp_path):
    """--markdown FILE was opened (emptied) in place: a Ctrl-C while it was written left it cut short. The SIGINT
    comes as a real one would, when the file (or the temporary file beside it) is about to get its first bytes."""
    import signal

    _, out = first_run
    markdown = tmp_path / "notes.md"
    markdown.write_text("the user's notes\n")
    sent = []

    def ctrl_c_at_first_write(frame, event, function):
        if event == "c_call" and getattr(function, "__name__", "") == "write" and not sent:
            name = Path(str(getattr(getattr(function, "__self__", None), "name", ""))).name
            if name.startswith("notes."):
                sent.append(name)
                signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.setprofile(ctrl_c_at_first_write)
    try:
        code = main(["report", str(out), "--markdown", str(markdown)])
    finally:
        sys.setprofile(None)
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and sent and markdown.read_text() == "the user's notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md"]


def test_report_prints_a_saved_report_and_writes_its_plot_again(first_run, capsys, tmp_path):
    _, out = first_run
    assert main(["report", str(out), "--plot", str(tmp_path / "again.png"),
                 "--markdown", str(tmp_path / "again.md")]) == 0
    printed = capsys.readouterr().out
    report = CompressionReport.load_json(out / "report.json")
    assert report.table() in printed
    assert any(m.startswith("exported ") for m in report.messages)
    assert all(f"- {m}" in printed for m in report.messages if not m.startswith("quantization: "))
    assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"
    again, first = (tmp_path / "again.md").read_text(), (out / "report.md").read_text()
    named = re.search(r"Artefact: `(.*)`", again).group(1)  # from the folder of the file that names it
    assert (tmp_path / named).resolve() == (out / "model.pt").resolve()
    assert again.replace(named, "model.pt") == first


def test_a_search_ended_by_ctrl_c_is_said_in_the_summary(first_run, capsys, tmp_path):
    """Its best model so far is kept and exported, as a timeout's is: the terminal says so for both, not only
    report.md."""
    import dataclasses

    _, out = first_run
    report = CompressionReport.load_json(out / "report.json")
    said = ("quantization: interrupted during trial 2; keeping the best model so far.",
            "quantization: trial 1 (torch_ao dynamic per-channel) failed: RuntimeError: x")
    dataclasses.replace(report, messages=report.messages + said).save_json(tmp_path / "report.json")
    assert main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"- {said[0]}" in printed and said[1] not in printed


def test_an_output_directory_whose_path_cannot_be_looked_at_is_refused_in_words(tmp_path):
    """Looking for a file in the way raised the OSError of a path it cannot stat (a parent the user may not read, a
    name too long): a traceback after the model and data were loaded, instead of "cannot write there"."""
    from litcompress.cli import _check_writable

    with pytest.raises(ValueError, match=r"--output-dir .*: cannot write there \(File name too long\)"):
        _check_writable(tmp_path / ("d" * 300) / "out")


def test_report_refuses_a_plot_format_or_a_place_it_cannot_write_before_printing(first_run, capsys, tmp_path):
    """--plot r.txt and --plot/--markdown in an unwritable place were tracebacks from matplotlib and pathlib, after
    the report was printed and the markdown written."""
    _, out = first_run
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for extra, message in ((["--plot", str(tmp_path / "r.txt")], r"--plot .*r\.txt: matplotlib cannot write \.txt"),
                           (["--markdown", str(tmp_path / "r.md"), "--plot", str(blocker / "r.png")],
                            r"--plot .*a-file/r\.png: .*a-file is a file, not a directory"),  # was "File exists"
                           (["--markdown", str(blocker / "r.md")],
                            r"--markdown .*a-file/r\.md: .*a-file is a file, not a directory"),
                           # a traceback from matplotlib after the table
                           (["--plot", str(tmp_path)], r"--plot .* is a directory; give a file")):
        with pytest.raises(SystemExit):
            main(["report", str(out), *extra])
        captured = capsys.readouterr()
        assert re.search(message, captured.err) and captured.out == ""
    assert not (tmp_path / "r.md").exists()  # refused before writing anything
    assert main(["report", str(out), "--plot", str(tmp_path / "new" / "r.svg")]) == 0  # any format it writes
    assert (tmp_path / "new" / "r.svg").read_text().lstrip().startswith("<?xml")
    capsys.readouterr()
    assert main(["report", str(out), "--plot", str(tmp_path / "bare")]) == 0  # printed "plot: .../bare"
    assert f"plot: {tmp_path / 'bare.png'}" in capsys.readouterr().out and (tmp_path / "bare.png").is_file()


def test_report_refuses_a_file_that_is_no_report_before_printing(first_run, capsys, tmp_path):
    """A JSON list, a report edited by hand, a --markdown that is a directory: one error line each, nothing printed
    (they were tracebacks, the last after the table)."""
    _, out = first_run
    (tmp_path / "list.json").write_text("[]")
    edited = json.loads((out / "report.json").read_text())
    edited["stages"][0]["metric"] = "high"
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    as_text = json.loads((out / "report.json").read_text())  # printed one message line per character
    as_text["messages"] = "oops"
    (tmp_path / "as_text.json").write_text(json.dumps(as_text))
    slower_fastest = json.loads((out / "report.json").read_text())  # its plot's error bars failed after the table
    slower_fastest["stages"][0]["latency"]["min_ms"] = 2 * slower_fastest["stages"][0]["latency"]["max_ms"]
    (tmp_path / "latency.json").write_text(json.dumps(slower_fastest))
    for extra, message in (([str(tmp_path / "list.json")], r"cannot read .*list\.json as a litcompress report"),
                           ([str(tmp_path / "edited.json")], r"cannot read .*edited\.json as a litcompress report"),
                           ([str(tmp_path / "latency.json"), "--plot", str(tmp_path / "p.png")],
                            r"latency\.json as a litcompress report \(ValueError: Latency\(.*0 <= min <= median"),
                           ([str(out), "--markdown", str(tmp_path)], r"--markdown .* is a directory; give a file"),
                           # it wrote the Markdown over the report, which no later `report` could read
                           ([str(out), "--markdown", str(out / "report.json")],
                            r"--markdown .*report\.json is the report being read; give another file"),
                           ([str(tmp_path / "as_text.json")], r"'messages' must be a list, got str")):
        with pytest.raises(SystemExit) as exit_info:
            main(["report", *extra])
        captured = capsys.readouterr()
        assert exit_info.value.code == 2 and re.search(message, captured.err) and captured.out == ""


def test_report_refuses_a_markdown_path_that_would_replace_a_model_or_checkpoint(first_run, capsys, tmp_path):
    """`report --markdown out/model.pt` (a slip of the shell's completion) replaced the run's model file with Markdown,
    which load_quantized then refused; so with the pruned state dict, the dense checkpoint and any binary file."""
    import hashlib

    _, out = first_run
    weights = tmp_path / "my_weights.bin"
    torch.save({"w": torch.arange(10)}, weights)
    for target, said in ((out / "model.pt", "the model file this report describes"),
                         (out / PRUNED_STATE_FILE, "a file of the run this report describes"),
                         (out / "dense.ckpt", "a file of the run this report describes"),
                         (weights, "a file that is not UTF-8 text (a model, a checkpoint or an image?)")):
        before = hashlib.sha256(target.read_bytes()).hexdigest()
        with pytest.raises(SystemExit) as exit_info:
            main(["report", str(out), "--markdown", str(target)])
        captured = capsys.readouterr()
        assert exit_info.value.code == 2 and captured.out == ""
        assert f"--markdown {target} is {said}, which the Markdown would replace" in captured.err
        assert hashlib.sha256(target.read_bytes()).hexdigest() == before
    # a text file is the user's to replace: the run's own report.md, or notes
    notes = tmp_path / "notes.md"
    notes.write_text("the user's notes, ünïcode\n" * 5000, encoding="utf-8")  # longer than the part read
    for target in (out / "report.md", notes):
        assert main(["report", str(out), "--markdown", str(target)]) == 0
        assert target.read_text(encoding="utf-8").startswith("# Compression report")


def test_a_markdown_path_that_cannot_be_read_is_not_taken_for_text(first_run, tmp_path):
    """A file this process cannot read was let be replaced (the write renames a new file over it, which the file's own
    permissions never stop): a copy of a model, mode 000, became Markdown."""
    from litcompress.cli import _file_markdown_must_not_replace

    _, out = first_run
    unreadable = tmp_path / "model_copy.pt"
    unreadable.write_bytes((out / "model.pt").read_bytes())
    unreadable.chmod(0o000)
    def readable(path: Path) -> bool:
        try:
            with open(path, "rb"):
                return True
        except OSError:
            return False

    try:
        if readable(unreadable):  # root reads it all the same: a write-only sysfs attribute then
            candidates = sorted(Path("/sys/bus").glob("*/drivers_probe")) if Path("/sys/bus").is_dir() else []
            unreadable = next((path for path in candidates if path.is_file() and not readable(path)), None)
            if unreadable is None:
                pytest.skip("no file this process cannot read")
        said = _file_markdown_must_not_replace(unreadable, out / "report.json", None)
        assert said is not None and said.startswith("a file this process cannot read (")
        assert said.endswith(") to see that it is text")
    finally:
        (tmp_path / "model_copy.pt").chmod(0o600)


def test_report_refuses_the_same_file_for_markdown_and_plot(first_run, capsys, tmp_path):
    """The plot, written second, replaced the Markdown without a word."""
    _, out = first_run
    for markdown, plot in ((tmp_path / "r.svg", tmp_path / "r.svg"), (tmp_path / "r.png", tmp_path / "r")):
        with pytest.raises(SystemExit) as exit_info:
            main(["report", str(out), "--markdown", str(markdown), "--plot", str(plot)])
        captured = capsys.readouterr()
        assert exit_info.value.code == 2 and captured.out == ""
        assert f"--markdown {markdown} and --plot {plot} name the same file; give two." in captured.err
    assert list(tmp_path.iterdir()) == []


def test_report_names_outputs_a_later_unfinished_run_left_beside_it(first_run, capsys, tmp_path):
    """A run interrupted after pruning left its pruned_state_dict.pt beside the earlier run's report.json, which
    `report` printed without a word (its sparsity was the earlier run's)."""
    import shutil

    _, out = first_run
    folder = tmp_path / "out"
    shutil.copytree(out, folder)
    assert main(["report", str(folder)]) == 0
    assert "newer than report.json" not in capsys.readouterr().err  # a finished run: the report is written last
    written = (folder / "report.json").stat().st_mtime
    os.utime(folder / PRUNED_STATE_FILE, (written + 60, written + 60))
    for named in (folder, folder / "report.json"):  # the file named: the note was left out
        assert main(["report", str(named)]) == 0
        assert (f"note: {PRUNED_STATE_FILE} in {folder} is newer than report.json, which does not describe it"
                in capsys.readouterr().err)


def test_report_names_an_earlier_runs_plot_and_markdown_beside_a_newer_report(first_run, capsys, tmp_path,
                                                                             monkeypatch):
    """A run stopped after writing report.json (its Markdown and plot come next) left the earlier run's report.png,
    a plot of other figures, beside it without a word; writing them again as the note says makes it go."""
    import shutil

    _, out = first_run
    folder = tmp_path / "the out"  # (a space: the command the note gives is quoted for a shell)
    shutil.copytree(out, folder)
    written = (folder / "report.json").stat().st_mtime
    os.utime(folder / "report.png", (written - 60, written - 60))
    assert main(["report", str(folder)]) == 0
    assert (f"note: report.png in {folder} is older than report.json: an earlier run's, not this report's"
            in capsys.readouterr().err)
    os.utime(folder / "report.md", (written - 60, written - 60))
    assert main(["report", str(folder)]) == 0
    err = capsys.readouterr().err
    assert f"report.md and report.png in {folder} are older than report.json" in err
    again = f"--markdown '{folder / 'report.md'}' --plot '{folder / 'report.png'}'"
    assert f"`litcompress report '{folder}' {again}` writes this report's" in err
    command = re.search(r"`litcompress (report .*)` writes", err).group(1)
    assert main(shlex.split(command)) == 0  # as pasted into a shell
    assert "older than" not in capsys.readouterr().err
    assert main(["report", str(folder)]) == 0
    assert "older than" not in capsys.readouterr().err
    # a relative folder named like an option: ./-named in the command, or it was taken for one
    dashed = tmp_path / "-named"
    shutil.copytree(out, dashed)
    os.utime(dashed / "report.png", (written - 60, written - 60))
    monkeypatch.chdir(tmp_path)
    assert main(["report", "./-named"]) == 0
    assert "`litcompress report ./-named --plot ./-named/report.png` writes" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "args", "said"), [
    ("dense.ckpt", ["--train-epochs", "1"], "is the file this run writes its trained dense model to ({given}), after "
                                            "--train-epochs 1: the checkpoint given would be lost"),
    *((name, ["--prune-epochs", "0"], "is {given}, a file this run writes into --output-dir: the checkpoint given "
                                      "would be lost") for name in (PRUNED_STATE_FILE, "model.pt", "report.json")),
])
def test_a_checkpoint_the_run_would_overwrite_is_refused_before_anything_is_written(first_run, capsys, tmp_path,
                                                                                   name, args, said):
    """--checkpoint out/dense.ckpt --output-dir out --train-epochs N (a re-run from a finished run's folder) wrote the
    newly trained model over the checkpoint given, without a word; so did the exported model (model.pt), the state
    dict or the report over a checkpoint of their names, where only dense.ckpt was guarded."""
    _, out = first_run
    given = tmp_path / name
    given.write_bytes((out / "dense.ckpt").read_bytes())
    before = given.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--checkpoint", str(given), *args, "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"--checkpoint {given} {said.format(given=given)}" in capsys.readouterr().err
    assert given.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("name", ["dense.ckpt", "report.json", "model.onnx"])
def test_a_folder_named_as_a_file_the_run_writes_is_refused_before_training(first_run, capsys, tmp_path, name):
    """Renaming the written file over the folder failed after the training and the compression (a raw OSError
    naming a '.partial' file, or a note that no model was written)."""
    _, out = first_run
    (tmp_path / name / "kept").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--checkpoint", str(out / "dense.ckpt"), "--train-epochs", "1", "--prune-epochs", "0",
              "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert (f"--output-dir {tmp_path}: {name} in it is a folder, where this run writes a file of that name"
            in capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name] and (tmp_path / name / "kept").is_dir()


def test_folders_named_as_files_this_run_does_not_write_are_left_alone(first_run, capsys, tmp_path):
    """dense.ckpt is written only by a run that trains, report.png only by one that plots: their folders were refused
    by a run that writes neither."""
    _, out = first_run
    for name in ("dense.ckpt", "report.png"):
        (tmp_path / name / "kept").mkdir(parents=True)
    assert main(["compress", "--checkpoint", str(out / "dense.ckpt"), "--train-epochs", "0", "--prune", "none",
                 "--quantize", "none", "--no-plot", "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "dense.ckpt" / "kept").is_dir() and (tmp_path / "report.png" / "kept").is_dir()
    assert (tmp_path / "report.json").is_file()


def test_a_search_that_ends_without_int8_says_why_and_options_that_do_nothing_are_named(first_run, capsys, tmp_path):
    """The search's log stays in report.md, but how it ended, when that is fp32, is printed; pruning options given
    with --prune none are named as ignored (and the run goes on)."""
    _, out = first_run
    assert main(["compress", "--checkpoint", str(out / "dense.ckpt"), "--prune", "none", "--sparsity", "0.3",
                 "--schedule", "linear", "--backends", "torch_ao", "--timeout", "1e-9", "--latency-repeats", "2",
                 "--output-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "note: --sparsity, --schedule ignored: options of pruning, which --prune none turns off." in captured.err
    # no trial ran, so none failed: it said "No quantized candidate could be built"
    # said as the option that set it (it named the Python API's timeout_s), the file keeping the API's words
    assert "- quantization: --timeout 1e-09 reached before the first trial." in captured.out
    assert ("- quantization: No quantized candidate was tried (--timeout reached before the first trial): returning "
            "an fp32 copy of the model.") in captured.out
    assert "timeout_s" not in captured.out and "timeout_s=1e-09 reached" in (tmp_path / "report.md").read_text()
    assert "quantized" not in [s.stage for s in CompressionReport.load_json(tmp_path / "report.json").stages]


@pytest.mark.parametrize(("args", "said"), [
    (["--prune-epochs", "0", "--schedule", "linear"], "note: --schedule ignored: --prune-epochs 0 prunes at once"),
    (["--quantize", "none", "--max-trials", "3"], "note: --max-trials ignored: options of the quantization search"),
])
def test_more_options_that_do_nothing_are_named(args, said, capsys):
    from litcompress.cli import _note_ignored, build_parser

    _note_ignored(build_parser().parse_args(["compress", *args]))
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(("args", "ignored"), [
    (["--prune-epochs", "0"], False),  # one-shot pruning: the note on what it cost reads the direction
    ([], True),  # pruning while fine-tuning (5 epochs by default): no such note
    (["--prune", "none"], True),
])
def test_mode_without_quantization_is_said_to_be_ignored_only_where_it_does_nothing(args, ignored, capsys):
    """--mode also tells the note on what one-shot pruning cost which way the metric improves (a loss that fell is
    no loss): it was said to be ignored with --quantize none, and was."""
    from litcompress.cli import _note_ignored, build_parser

    _note_ignored(build_parser().parse_args(["compress", "--quantize", "none", "--mode", "min", *args]))
    assert ("note: --mode ignored" in capsys.readouterr().err) == ignored


@pytest.mark.parametrize(("args", "mode"), [([], "max"), (["--mode", "min"], "min"), (["--mode", "max"], "max"),
                                            (["--metric", "val_loss"], None), (["--metric", "val_wer"], None),
                                            (["--metric", "val_loss", "--mode", "max"], "max")])
def test_the_metric_direction_the_pipeline_is_given_is_the_default_help_names_unless_the_metric_reads_as_a_loss(
        args, mode):
    """Without --mode the pipeline was told no direction (None), so with --quantize none an accuracy that rose after
    one-shot pruning was noted as lost; --help names max the default."""
    from litcompress.cli import _metric_mode, build_parser

    assert _metric_mode(build_parser().parse_args(["compress", *args])) == mode


def test_prune_embeddings_on_a_model_without_one_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--prune", "ln_structured", "--prune-embeddings", "--output-dir", str(tmp_path / "out")])
    assert ("--prune-embeddings: MLPClassifier has no nn.Embedding (or EmbeddingBag) to prune; drop it."
            in capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_another_models_checkpoint_sharing_a_hyperparameter_name_is_not_blamed_on_model_args(tmp_path, capsys):
    """An LSTMClassifier(hidden=12) checkpoint given for the MLP with --model-args hidden: the refusal said the
    --model-args were the cause ("Drop those --model-args"), which dropped would not load it either."""
    from litcompress.models import LSTMClassifier

    path = tmp_path / "lstm.ckpt"
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(LSTMClassifier(hidden=12), datamodule=DigitsDataModule(batch_size=64, flatten=False))
    trainer.save_checkpoint(path)
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--checkpoint", str(path), "--model-args", '{"hidden": [16]}',
              "--output-dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--model-args gives other values" not in err
    assert f"--checkpoint {path}: cannot be loaded as a checkpoint of MLPClassifier" in err


@pytest.mark.parametrize("hidden", ["[32, 32]", "[64, 64]"], ids=["narrower", "wider"])
def test_model_args_that_contradict_the_checkpoint_are_named_as_the_cause(first_run, tmp_path, capsys, hidden):
    """The refusal spoke of shrunk states ("not a shrunk state of this model"), not of the --model-args given; wider
    layers than the checkpoint's were taken for a shrunk checkpoint and narrowed back to its widths without a word."""
    _, out = first_run  # saved with hidden [48, 48]
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--checkpoint", str(out / "dense.ckpt"), "--model-args", f'{{"hidden": {hidden}}}',
              "--output-dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {out / 'dense.ckpt'} was saved with hidden=(48, 48); --model-args gives other values" in err
    assert "net.0.weight would be built with another shape" in err and not (tmp_path / "o").exists()
    assert "Drop those --model-args (the checkpoint's are used)" in err
    # the same values, as JSON gives them, are no conflict
    assert main(["compress", "--checkpoint", str(out / "dense.ckpt"), "--model-args", '{"hidden": [48, 48]}',
                 "--prune", "none", "--quantize", "none", "--no-shrink", "--no-export", "--latency-repeats", "2",
                 "--output-dir", str(tmp_path / "same")]) == 0


def test_a_file_format_with_no_export_is_named_as_ignored(first_run, tmp_path, capsys):
    _, out = first_run
    assert main(["compress", "--checkpoint", str(out / "dense.ckpt"), "--prune", "none", "--quantize", "none",
                 "--no-shrink", "--latency-repeats", "2", "--no-export", "--fp32-format", "onnx",
                 "--output-dir", str(tmp_path)]) == 0
    assert ("note: --fp32-format onnx ignored: it names the exported file's format, and --no-export writes none."
            in capsys.readouterr().err)
    assert not list(tmp_path.glob("model.*"))


def test_a_checkpoint_is_compressed_without_training_again(first_run, tmp_path, capsys):
    _, out = first_run
    assert main(["compress", "--checkpoint", str(out / "dense.ckpt"), "--prune", "none", "--quantize", "none",
                 "--no-shrink", "--keep-multiple-of", "8", "--latency-repeats", "2",
                 "--output-dir", str(tmp_path)]) == 0
    assert "note: --keep-multiple-of ignored" in capsys.readouterr().err  # nothing to round: no structured pruning
    first = CompressionReport.load_json(out / "report.json")
    second = CompressionReport.load_json(tmp_path / "report.json")
    assert second["input"].metric == first["input"].metric  # the same trained model, not a new one
    assert not (tmp_path / "dense.ckpt").exists()
    assert [s.stage for s in second.stages] == ["input", "exported"]


def test_a_checkpoint_is_scored_on_the_split_it_was_trained_on_whatever_the_seed(first_run, tmp_path, capsys):
    """--seed also chose the digits split: another one would put the checkpoint's training data in val and test."""
    _, out = first_run
    capsys.readouterr()
    assert main(["compress", "--checkpoint", str(out / "dense.ckpt"), "--seed", "2", "--prune", "none",
                 "--quantize", "none", "--no-export", "--latency-repeats", "2", "--output-dir", str(tmp_path)]) == 0
    assert "note: the digits split is the one --checkpoint was trained on (seed 0)" in capsys.readouterr().err
    first = CompressionReport.load_json(out / "report.json")["input"]
    again = CompressionReport.load_json(tmp_path / "report.json")["input"]
    assert (again.metric, again.test_metric) == (first.metric, first.test_metric)
    # --seed orders the training data still (the split's seed set the order too: fine-tuning ignored --seed)
    datamodule = _datamodule(build_parser().parse_args(["compress", "--checkpoint", str(out / "dense.ckpt"),
                                                        "--seed", "2"]))
    assert (datamodule.seed, datamodule.shuffle_seed) == (0, 2)
    with pytest.raises(SystemExit):
        main(["compress", "--checkpoint", str(out / "dense.ckpt"), "--data-args", '{"seed": 3, "batch_size": 16}',
              "--output-dir", str(tmp_path / "refused")])
    assert ('--data-args {"seed": 3}: --checkpoint ' in capsys.readouterr().err)
    assert not (tmp_path / "refused").exists()


def test_a_checkpoint_written_while_pruning_with_masks_is_compressed(tmp_path):
    import lightning as L

    from litcompress import ModelPruning
    from litcompress.data import DigitsDataModule
    from litcompress.models import MLPClassifier

    L.seed_everything(0, verbose=False)
    model, data = MLPClassifier(in_features=64, hidden=(32,)), DigitsDataModule(flatten=True)
    trainer = L.Trainer(max_epochs=1, callbacks=[ModelPruning("l1_unstructured", amount=0.5,
                                                              make_pruning_permanent=False)],
                        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    path = tmp_path / "masked.ckpt"
    trainer.save_checkpoint(path)
    assert main(["compress", "--checkpoint", str(path), "--prune", "none",
                 "--quantize", "none", "--latency-repeats", "2", "--output-dir", str(tmp_path / "out")]) == 0
    given = CompressionReport.load_json(tmp_path / "out" / "report.json")["input"]
    # the model as it would ship: its parameters, half of them zero (weights and biases, one global round)
    assert given.parameters == 64 * 32 + 32 + 32 * 10 + 10
    assert given.nonzero_parameters == given.parameters - round(0.5 * given.parameters)


def test_a_submodule_exported_to_onnx_without_quantization(first_run, tmp_path):
    _, out = first_run
    assert main(["compress", "--checkpoint", str(out / "dense.ckpt"), "--submodule", "net", "--prune",
                 "ln_structured", "--sparsity", "0.25", "--prune-epochs", "1", "--quantize", "none",
                 "--fp32-format", "onnx", "--latency-repeats", "2", "--output-dir", str(tmp_path)]) == 0
    report = CompressionReport.load_json(tmp_path / "report.json")
    assert [s.stage for s in report.stages] == ["input", "pruned", "shrunk"]
    model, recipe = load_quantized(tmp_path / "model.onnx")
    assert recipe is None and model(torch.rand(5, 64)).shape == (5, 10)
    # 48 hidden units lose 12 each: 64*36+36 + 36*36+36 + 36*10+10
    assert report["shrunk"].parameters == 64 * 36 + 36 + 36 * 36 + 36 + 36 * 10 + 10
    # the state files load into the class the checkpoint names (its `net.*` keys), not only into its `net`
    from litcompress.pruning import load_shrunk_state_dict

    MLPClassifier.load_from_checkpoint(out / "dense.ckpt").load_state_dict(torch.load(tmp_path / PRUNED_STATE_FILE))
    shrunk = load_shrunk_state_dict(MLPClassifier.load_from_checkpoint(out / "dense.ckpt"),
                                    torch.load(tmp_path / SHRUNK_STATE_FILE)).eval()
    inputs = torch.rand(5, 64)
    torch.testing.assert_close(shrunk(inputs), model(inputs), atol=1e-5, rtol=1e-5)


def test_structured_cnn_gets_static_quantization_by_default(tmp_path, capsys):
    assert main(["compress", "--model", "cnn", "--model-args", '{"channels": [8, 16]}', "--prune", "ln_structured",
                 "--sparsity", "0.5", "--tolerance", "0.5", *QUICK, "--output-dir", str(tmp_path)]) == 0
    assert "--quantize auto: static int8 (the model has convolutions)" in capsys.readouterr().err
    report = CompressionReport.load_json(tmp_path / "report.json")
    assert [s.stage for s in report.stages] == ["input", "pruned", "shrunk", "quantized"]
    assert report["quantized"].description.startswith("torch_ao static")
    # conv(1->8, no bias) BN(8) conv(8->16, no bias) BN(16) Linear(16*2*2 -> 10): 72+16+1152+32+650 parameters.
    assert report["input"].parameters == 1922
    # Half the filters of both convs go (the classifier stays whole): 36+8+288+16+330. The BatchNorm shift of the
    # pruned channels was held at zero while fine-tuning (PruneConfig.zero_batch_norm), so they output exactly zero
    # and conv2 gains no bias for them.
    assert report["shrunk"].parameters == 678
    assert report["shrunk"].description.startswith("12 channels removed")
    # The narrow fp32 weights load into a freshly built CNN (narrowed to them), as the pruned ones do at full width:
    # the same function.
    from litcompress import load_shrunk_state_dict

    pruned = CNNClassifier(channels=[8, 16])
    pruned.load_state_dict(torch.load(tmp_path / PRUNED_STATE_FILE))
    shrunk = load_shrunk_state_dict(CNNClassifier(channels=[8, 16]), torch.load(tmp_path / SHRUNK_STATE_FILE))
    assert sum(p.numel() for p in shrunk.parameters()) == 678
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(shrunk.eval()(x), pruned.eval()(x), rtol=1e-5, atol=1e-5)


def test_structured_resnet_narrows_its_residual_stream(tmp_path):
    assert main(["compress", "--model", "resnet", "--model-args", '{"width": 8, "blocks": 2}', "--prune",
                 "ln_structured", "--sparsity", "0.5", "--quantize", "none", *QUICK,
                 "--output-dir", str(tmp_path)]) == 0
    report = CompressionReport.load_json(tmp_path / "report.json")
    assert [s.stage for s in report.stages] == ["input", "pruned", "shrunk"]
    # stem, 2 blocks of two 3x3 convs (8 -> 4 channels everywhere: the stream and the blocks' insides), BatchNorms
    # and the 4 -> 10 classifier
    assert report["shrunk"].parameters == 4 * 9 + 8 + 2 * (2 * (4 * 4 * 9) + 2 * 8) + 4 * 10 + 10
    assert any(m.startswith("group_residuals: 1 channel group(s)") for m in report.messages)


def test_distill_fine_tunes_the_pruned_model_against_the_input_model(tmp_path):
    assert main(["compress", "--model", "resnet", "--model-args", '{"width": 8, "blocks": 2}', "--prune",
                 "ln_structured", "--sparsity", "0.5", "--quantize", "none", *QUICK, "--distill",
                 "--distill-temperature", "2", "--distill-alpha", "0.7", "--output-dir", str(tmp_path)]) == 0
    report = CompressionReport.load_json(tmp_path / "report.json")
    assert report["pruned"].description.endswith("fine-tuning steps, distilled (T=2, alpha=0.7)")
    assert report["shrunk"].parameters < report["input"].parameters


@pytest.mark.parametrize("squeeze_excitation", [False, True])
def test_structured_mobilenet_narrows_its_depthwise_blocks_and_stream(tmp_path, squeeze_excitation):
    model_args = f'{{"width": 8, "blocks": 2, "squeeze_excitation": {str(squeeze_excitation).lower()}}}'
    assert main(["compress", "--model", "mobilenet", "--model-args", model_args, "--prune", "ln_structured",
                 "--sparsity", "0.5", "--quantize", "none", *QUICK, "--output-dir", str(tmp_path)]) == 0
    report = CompressionReport.load_json(tmp_path / "report.json")
    # Zeros after pruning: half the stem's filters and its BatchNorm's scale and shift; per block, half the rows of
    # expand (16 x 8 inputs) and project (4 x 32), the matching BatchNorm entries (bn1, bn2: 16 x 2; bn3: 4 x 2), and
    # with the gate half of squeeze's 8 filters (4 x 32 inputs; excite's rows go with expand's, below). None in the
    # depthwise convs: they are no pruning targets of their own.
    zeros = 4 * 9 + 4 * 2 + 2 * (16 * 8 + 16 * 2 + 16 * 2 + 4 * 32 + 4 * 2 + squeeze_excitation * 4 * 32)
    assert report["pruned"].nonzero_parameters == report["input"].parameters - zeros
    # stem 3x3 (8 -> 4 channels) and BN; per block: expand 4 -> 16 (32 -> 16), BN, depthwise 16 x 3x3, BN,
    # [squeeze 16 -> 4 and excite 4 -> 16, with biases], project 16 -> 4, BN; the 4 -> 10 classifier
    block = 4 * 16 + 32 + 16 * 9 + 32 + squeeze_excitation * (16 * 4 + 4 + 4 * 16 + 16) + 16 * 4 + 8
    assert report["shrunk"].parameters == 4 * 9 + 8 + 2 * block + 4 * 10 + 10
    assert any(m.startswith("group_residuals: 1 channel group(s)") for m in report.messages)


def test_structured_transformer_narrows_its_feed_forward_blocks_only(tmp_path):
    assert main(["compress", "--model", "transformer", "--prune", "ln_structured", "--sparsity", "0.5", "--quantize",
                 "none", *QUICK, "--output-dir", str(tmp_path)]) == 0
    report = CompressionReport.load_json(tmp_path / "report.json")
    # 2 layers (d_model 32, feed-forward 64): half of linear1's rows (32 weights and a bias each) and the matching
    # columns of linear2 go; the attention, the stream and the embedding stay (their channels could not go)
    assert report["shrunk"].parameters == report["input"].parameters - 2 * (32 * 33 + 32 * 32)
    (said,) = [m for m in report.messages if m.startswith("removable_only:")]
    assert said.startswith("removable_only: 5 layer(s) left unpruned") and "encoder.layers.1.linear2" in said
    assert said.endswith("(masks only; no CLI option: it prunes only what shrink removes, or unstructured, --prune "
                         "l1_unstructured).")  # the advice named the Python API only


def test_structured_swiglu_transformer_narrows_its_gated_feed_forward_blocks(tmp_path):
    assert main(["compress", "--model", "swiglu", "--prune", "ln_structured", "--sparsity", "0.5", "--quantize",
                 "none", *QUICK, "--output-dir", str(tmp_path)]) == 0
    report = CompressionReport.load_json(tmp_path / "report.json")
    # 2 blocks (d_model 32, feed-forward 64, no biases): half of the hidden channels go from w1, w3 (rows of 32) and
    # w2 (columns of 32), pruned as one group per block; the attention, the stream and the embedding stay
    assert report["shrunk"].parameters == report["input"].parameters - 2 * 3 * 32 * 32
    assert any(m.startswith("group_residuals: 2 channel group(s) joined by a gating product") for m in report.messages)


def test_prune_heads_narrows_each_attention_to_its_kept_heads(tmp_path):
    assert main(["compress", "--model", "swiglu", "--prune", "ln_structured", "--sparsity", "0.5", "--prune-heads",
                 "0.5", "--quantize", "none", *QUICK, "--output-dir", str(tmp_path)]) == 0
    report = CompressionReport.load_json(tmp_path / "report.json")
    # as above, and one of the two heads (16 channels) of each block's attention: its query, key and value rows
    # (3 x 16 x 32) and its out_proj columns (32 x 16), no biases
    assert report["shrunk"].parameters == report["input"].parameters - 2 * 3 * 32 * 32 - 2 * 4 * 16 * 32
    assert "2 attention heads removed" in report["shrunk"].description
    # the heads' zeros count in the sparsity column and the per-tensor table (they were left out of both)
    projections = [t for t in report.layer_sparsity if t.name.endswith("in_proj_weight")]
    assert len(projections) == 2 and all(t.zeros == t.numel // 2 for t in projections)


def test_structured_densenet_narrows_every_concatenation(tmp_path):
    model_args = '{"stem": 8, "growth": 4, "layers": 2, "blocks": 2}'
    assert main(["compress", "--model", "densenet", "--model-args", model_args, "--prune", "ln_structured",
                 "--sparsity", "0.5", "--quantize", "none", *QUICK, "--output-dir", str(tmp_path)]) == 0
    report = CompressionReport.load_json(tmp_path / "report.json")
    # Every conv keeps half its channels: stem 8 -> 4, the 1x1 bottlenecks 16 -> 8, the 3x3 convs 4 -> 2 (growth),
    # the transition 8 -> 4; the concatenations and their BatchNorms narrow to match, and no bias is folded in (the
    # pruned channels' BatchNorms, after the concatenations too, were held at zero). Per block of 4 input channels:
    # layer 0: BN(4) 1x1 4->8 BN(8) 3x3 8->2; layer 1: BN(6) 1x1 6->8 BN(8) 3x3 8->2.
    block = (8 + 4 * 8 + 16 + 8 * 2 * 9) + (12 + 6 * 8 + 16 + 8 * 2 * 9)
    transition = 2 * 8 + 8 * 4
    assert report["shrunk"].parameters == 1 * 4 * 9 + block + transition + block + 2 * 8 + 8 * 10 + 10
    (said,) = [m for m in report.messages if m.startswith("zero_batch_norm:")]
    assert "in 10 BatchNorm layer(s)" in said  # all of them: 2 in each of the 4 layers, the transition's, the last


def verdicts(table: str) -> dict[str, str]:
    """layer -> its 'shrinks' column, from ChannelPlan.table()'s rows."""
    rows = [line.split() for line in table.splitlines()[1:] if not line.startswith(("group ", "BatchNorms "))][:-1]
    return {row[0]: " ".join(row[5:7]) if row[5] == "group" else row[5] for row in rows}  # kind: "Linear 8 -> 10"


def test_min_speedup_out_of_reach_keeps_and_exports_the_fp32_model(tmp_path):
    assert main(["compress", "--min-speedup", "1000", *QUICK, "--output-dir", str(tmp_path)]) == 0
    report = CompressionReport.load_json(tmp_path / "report.json")
    assert [s.stage for s in report.stages][-1] != "quantized"
    assert any(m.startswith("quantization: min_speedup=1000: no int8 model") for m in report.messages)
    assert not any(p.suffix == ".pt" and p.stem == "model" for p in tmp_path.iterdir())  # no int8 TorchScript


def test_channels_lists_what_structured_pruning_can_narrow_and_why_not(capsys):
    assert main(["channels", "--model", "resnet", "--model-args", '{"width": 8, "blocks": 2}']) == 0
    out = capsys.readouterr().out
    # the stream's writers shrink as one group; the blocks' first convs on their own; the classifier not at all
    assert verdicts(out) == {"net.0": "group 1", "net.3.conv1": "yes", "net.3.conv2": "group 1",
                             "net.4.conv1": "yes", "net.4.conv2": "group 1", "net.7": "no"}
    assert "Linear 8 -> 10" in out and "it produces the model's output" in out
    assert ("group 1: 8 channels joined by residual additions, written by net.0, net.3.conv2, net.4.conv2; read by "
            "net.3.conv1, net.4.conv1, net.7") in out
    assert ("5 of 6 layers can lose channels; litcompress compress --prune ln_structured (or random_structured) "
            "prunes only those.") in out  # was PruneConfig(removable_only=True), an option of the Python API


_CRNN = '''
import torch
from torch import nn
from litcompress.models import Classifier


class CRNN(Classifier):
    """digits' 8 rows read by a conv and a bidirectional LSTM: its units show only on a batch (the output's rank)."""

    def __init__(self, lr=1e-3):
        super().__init__(lr)
        self.conv, self.bn = nn.Conv1d(8, 28, 3, padding=1), nn.BatchNorm1d(28)
        self.lstm, self.head = nn.LSTM(28, 33, batch_first=True, bidirectional=True), nn.Linear(66, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x.reshape(x.shape[0], 8, 8)))).transpose(1, 2)
        return self.head(self.lstm(h)[0][:, -1])


class Tokens(CRNN):
    """Takes token ids, not digits' images."""

    def __init__(self, lr=1e-3):
        super().__init__(lr)
        self.embedding = nn.Embedding(20, 8)

    def forward(self, ids):
        return super().forward(self.embedding(ids))
'''


def test_channels_plans_a_user_model_on_the_first_batch_of_the_data_as_compress_does(tmp_path, monkeypatch, capsys):
    """It planned a user's model (or a --checkpoint) without inputs: the LSTM's units stayed ('its output goes to
    getitem') and --sparsity was refused, where compress, which traces on a batch, shrank them."""
    (tmp_path / "cli_crnn.py").write_text(_CRNN)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["channels", "--model", "cli_crnn:CRNN", "--sparsity", "0.5"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^lstm +LSTM .* units", out, re.M) and re.search(r"^lstm +head +33 -> 17 ", out, re.M)
    assert "parameters 18,058 -> 5,216" in out  # what compress --prune ln_structured --sparsity 0.5 shrinks to
    # a model the data does not fit is planned from its graph, as before, and the plan says so
    assert main(["channels", "--model", "cli_crnn:Tokens"]) == 0
    assert "- planned without inputs, from the graph alone: the model does not take the batches of --data digits" in \
        capsys.readouterr().out


def test_channels_previews_exclude_as_compress_prunes_it(capsys):
    assert main(["channels", "--model", "mlp", "--exclude", "net.0", "--sparsity", "0.5"]) == 0
    assert "parameters 85,002 -> 50,826" in capsys.readouterr().out  # compress --exclude net.0 shrinks to that
    with pytest.raises(SystemExit):
        main(["channels", "--model", "mlp", "--exclude", "net.0"])
    assert "--exclude previews with --sparsity: give --sparsity too." in capsys.readouterr().err


def test_channels_says_why_a_transformers_attention_stays(capsys):
    assert main(["channels", "--model", "transformer"]) == 0
    found = verdicts(capsys.readouterr().out)
    assert found["encoder.layers.0.linear1"] == found["encoder.layers.1.linear1"] == "yes"
    assert found["encoder.layers.0.linear2"] == found["encoder.layers.0.self_attn.out_proj"] == found["head"] == "no"


class Untraceable(MLPClassifier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) if x.sum() > 0 else -self.net(x)  # control flow on values: fx cannot trace it


class ExportsNowhere(MLPClassifier):
    """Runs eagerly, but its forward leaves torch for numpy: no file format can hold it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net[:2](x.flatten(1))
        h = torch.from_numpy(np.maximum(h.detach().numpy(), 0)) + 0 * h
        return self.net[2:](h)


def test_a_run_whose_every_export_failed_exits_with_an_error(tmp_path, capsys):
    """No model file, and exit code 0: make and CI scripts took the run for a success."""
    code = main(["compress", "--model", "tests.test_cli:ExportsNowhere", "--model-args", '{"hidden": [16]}', *QUICK,
                 "--prune", "none", "--quantize", "none", "--output-dir", str(tmp_path)])
    assert code == 1
    assert "error: no model file was written: every export format failed" in capsys.readouterr().err
    assert (tmp_path / "report.json").exists() and not list(tmp_path.glob("model.*"))


class CenteredPixelsCNN(CNNClassifier):
    """A CNN whose steps prepare its batches (pixels in [0, 1] centred and stretched to [-2, 2]) before calling
    ``self(...)``, as many modules do; the model itself sees the prepared pixels."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step(((x - 0.5) * 4, y), batch_idx)

    def _evaluate(self, batch, prefix):
        x, y = batch
        super()._evaluate(((x - 0.5) * 4, y), prefix)


def test_a_module_that_prepares_its_batches_is_compressed_on_what_its_model_takes(tmp_path, capsys, caplog):
    """compress calibrated static int8 on the batches as they are ([0, 1] where the model sees [-2, 2]) and timed and
    traced the model on them: the int8 model missed its goal. It now reads the inputs through validation_step."""
    with caplog.at_level(logging.INFO, logger="litcompress"):
        assert main(["compress", "--model", "tests.test_cli:CenteredPixelsCNN", "--model-args",
                     '{"channels": [8, 16]}', *QUICK, "--train-epochs", "4", "--prune", "none", "--tolerance", "0.02",
                     "--output-dir", str(tmp_path)]) == 0
    assert "CenteredPixelsCNN.validation_step gives the model other inputs than its batches hold" in caplog.text
    report = CompressionReport.load_json(tmp_path / "report.json")
    assert report["quantized"].description.startswith("torch_ao static"), report["quantized"].description
    assert "goal missed" not in report["quantized"].description
    assert report["quantized"].metric >= report["input"].metric - 0.02
    assert main(["channels", "--model", "tests.test_cli:CenteredPixelsCNN", "--model-args", '{"channels": [8, 16]}',
                 "--sparsity", "0.5", "--latency", "--latency-batch-size", "300"]) == 0
    assert "latency at batch 300" in capsys.readouterr().out


class CenteredByTheDataModuleCNN(CNNClassifier):
    """Its steps centre the pixels on a value the fit's DataModule holds, which a step run on a loader alone lacks."""

    def _evaluate(self, batch, prefix):
        x, y = batch
        super()._evaluate(((x - self.trainer.datamodule.pixel_centre) * 4, y), prefix)


class StepsCallItsNet(MLPClassifier):
    """No forward of its own (LightningModule's): its steps call self.net(...)."""

    forward = L.LightningModule.forward


class CentredDigits(DigitsDataModule):
    pixel_centre = 0.5


def test_channels_latency_says_when_the_step_cannot_run_on_a_loader_alone(capsys, caplog):
    """The model was timed on the raw batches without a word; the line names the error and what to do."""
    with caplog.at_level(logging.INFO, logger="litcompress"):
        assert main(["channels", "--model", "tests.test_cli:CenteredByTheDataModuleCNN", "--model-args",
                     '{"channels": [8, 16]}', "--data", "tests.test_cli:CentredDigits", "--data-args",
                     '{"flatten": false}', "--sparsity", "0.5", "--latency"]) == 0
    assert "CenteredByTheDataModuleCNN.validation_step could not be run on its own" in caplog.text
    assert "pixel_centre" in caplog.text and "prepare the batches in the DataModule" in caplog.text
    assert "latency at batch" in capsys.readouterr().out


def test_channels_on_inputs_the_model_cannot_take_is_a_clear_error(capsys):
    """A CNN given flattened digits failed with a traceback from inside shrink; compress already said this."""
    with pytest.raises(SystemExit):
        main(["channels", "--model", "tests.test_cli:CenteredPixelsCNN", "--model-args", '{"channels": [8, 16]}',
              "--data-args", '{"flatten": true}', "--sparsity", "0.5", "--latency"])
    err = capsys.readouterr().err
    assert "could not be called as model(*inputs) on the first validation batch's inputs" in err
    assert "conv2d" in err


def test_channels_refuses_a_seed_lightning_cannot_take_when_parsing(capsys):
    """It failed with a traceback from seed_everything ("numpy accepts from 0 to 4294967295")."""
    with pytest.raises(SystemExit) as exit_info:
        main(["channels", "--seed", "5000000000"])
    assert exit_info.value.code == 2
    assert "argument --seed: expected an integer in [0, 4294967295], got 5000000000" in capsys.readouterr().err


class WeightNormedMLP(MLPClassifier):
    """An MLP whose hidden layers are weight-normed (torch.nn.utils.parametrizations.weight_norm)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for index in (0, 2):
            self.net[index] = torch.nn.utils.parametrizations.weight_norm(self.net[index])


@pytest.mark.parametrize("sparsity", [None, "0.5"])
def test_channels_plans_on_a_folded_copy_as_compress_prunes(capsys, sparsity):
    """The table said 'it is parametrized' for every weight-normed layer, while compress folds them and narrows
    them (the preview below it did)."""
    extra = [] if sparsity is None else ["--sparsity", sparsity]
    assert main(["channels", "--model", "tests.test_cli:WeightNormedMLP", "--model-args", '{"hidden": [16, 16]}',
                 *extra]) == 0
    out = capsys.readouterr().out
    found = verdicts(out.split("\nAfter ")[0])
    assert found["net.0"] == found["net.2"] == "yes"
    if sparsity is None:
        assert ("- the layers of a copy with 2 parametrized weight(s) folded into plain ones, as compress folds them: "
                "net.0.weight (_WeightNorm), net.2.weight (_WeightNorm).") in out
    else:   # the preview's notes say it
        assert re.search(r"net\.0 +net\.2 +16 -> 8", out) and "- folded 2 parametrized weight(s)" in out


def test_channels_shows_a_gated_feed_forward_as_one_group(capsys):
    assert main(["channels", "--model", "swiglu"]) == 0
    out = capsys.readouterr().out
    found = verdicts(out)
    assert found["blocks.0.feed_forward.w1"] == found["blocks.0.feed_forward.w3"] == "group 1"
    assert found["blocks.0.feed_forward.w2"] == found["blocks.0.attention.out_proj"] == "no"
    assert ("group 2: 64 channels joined by a gating product (element-wise multiplication), written by "
            "blocks.1.feed_forward.w1, blocks.1.feed_forward.w3; read by blocks.1.feed_forward.w2") in out


def test_channels_with_a_sparsity_shows_the_widths_and_parameters_compress_reaches(capsys):
    from litcompress.models import ResNetClassifier
    from litcompress.pipeline import PruneConfig, preview_shrink

    assert main(["channels", "--model", "resnet", "--sparsity", "0.5"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if "->" in line and not line.startswith(("parameters", "net.7"))]
    assert {row[0]: row[-5:-2] for row in rows if row[0].startswith("net.")} == {
        name: ["16", "->", "8"] for name in ("net.0", "net.3.conv1", "net.3.conv2", "net.4.conv1", "net.4.conv2")}
    expected, _ = preview_shrink(ResNetClassifier(in_channels=1, image_size=8),
                                 PruneConfig(sparsity=0.5, method="ln_structured"))
    report = expected.report
    assert f"parameters {report.parameters_before:,} -> {report.parameters_after:,}" in out
    assert "- group_residuals: 1 channel group(s) joined by residual additions" in out


def test_channels_previews_pruned_heads_too(capsys):
    assert main(["channels", "--model", "swiglu", "--sparsity", "0", "--prune-heads", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "After ln_structured pruning of 0% of the channels and 50% of the attention heads" in out
    assert "blocks.0.attention               (attention heads)                         2 -> 1" in out
    assert "parameters 21,514 -> 17,418 (0.810x)" in out  # 2 x (3 x 16 x 32 + 32 x 16): one head per block
    with pytest.raises(SystemExit):
        main(["channels", "--model", "swiglu", "--prune-heads", "0.5"])
    assert "--prune-heads previews with --sparsity" in capsys.readouterr().err


def test_channels_with_latency_times_the_model_and_its_shrunk_copy(capsys):
    assert main(["channels", "--model", "mlp", "--model-args", '{"hidden": [256, 256]}', "--sparsity", "0.5",
                 "--latency", "--latency-batch-size", "32"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("latency"))
    match = re.fullmatch(r"latency at batch 32, 1 thread\(s\), median of interleaved runs: ([\d.]+) ms -> "
                         r"([\d.]+) ms \(([\d.]+)x as fast\)", line)
    assert match, line
    before, after, ratio = map(float, match.groups())
    assert before > 0 and after > 0 and ratio == pytest.approx(before / after, rel=0.02)  # the figures agree
    with pytest.raises(SystemExit):
        main(["channels", "--model", "mlp", "--latency"])
    assert "--latency previews with --sparsity: give --sparsity too." in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--keep-multiple-of", "16"], "--keep-multiple-of previews with --sparsity: give --sparsity too."),  # ignored
    (["--latency-batch-size", "500"], "--latency-batch-size is the batch --latency times"),  # failed on 359 inputs
    (["--threads", "2"], "--threads are the threads --latency times with: give --latency too"),  # was ignored
])
def test_channels_options_of_another_option_are_refused_without_it(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["channels", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--exclude", "net.0"], ["--prune-embeddings"], ["--prune-heads", "0.5"],
                                    ["--latency"]])
def test_channels_options_of_sparsity_are_refused_before_the_data_is_built(option, capsys):
    """They were refused after the data and model were built (here: data arguments that fail)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["channels", *option, "--data-args", '{"batch_size": 0}'])
    assert exit_info.value.code == 2
    assert f"{option[0]} previews with --sparsity: give --sparsity too" in capsys.readouterr().err


def test_channels_refusals_name_its_options_and_compress_for_the_others(capsys):
    """An error of the preview named '--prune ln_structured' and advised '--prune l1_unstructured', options channels
    does not have."""
    with pytest.raises(SystemExit) as exit_info:
        main(["channels", "--sparsity", "0.5", "--exclude", "net.0,net.2"])
    error = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2
    assert "error: --sparsity 0.5 (as compress --prune ln_structured): shrink can remove the channels of none" in error
    assert re.findall(r"\S+ --prune \w+", error) == ["compress --prune ln_structured",
                                                       "compress --prune l1_unstructured"]
    assert main(["channels", "--sparsity", "0.99", "--exclude", "net.0"]) == 0  # its notes too
    out = capsys.readouterr().out
    assert "removable_only: 1 layer(s) left unpruned" in out
    assert {re.sub(r"^\S+/", "", m) for m in re.findall(r"\S+ --prune", out)} == {"compress --prune"}


def test_channels_prints_the_same_preview_on_every_run(capsys):
    # the preview's weights were not seeded: its `folded` column changed from run to run
    outputs = []
    for _ in range(2):
        assert main(["channels", "--sparsity", "0.5"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_channels_times_a_model_that_takes_its_whole_batch_with_inputs_star(capsys):
    """channels had no --inputs: a model reading its dict batch could not be timed ("pass input_fn=", "--inputs x"
    in the error, an option channels refused)."""
    assert main(["channels", "--model", "tests.text_task:BatchClassifier", "--data", "tests.text_task:TextData",
                 "--inputs", "*", "--sparsity", "0.5", "--latency", "--latency-batch-size", "48"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"ff\.0 +ff\.2 +64 -> 32", out) and "latency at batch 48" in out


@pytest.mark.parametrize("batch_size", [[], ["--latency-batch-size", "48"]])
def test_a_submodule_of_a_model_with_dict_batches_gets_the_inputs_its_step_gives_it(capsys, batch_size):
    """--submodule ff of a model whose steps read dict batches: the batch was read by the names of ff's forward
    parameters first ("pass input_fn=, ... --inputs x"), and refused before the step could say what ff takes (the
    Python API read it through the step)."""
    assert main(["channels", "--model", "tests.text_task:TextClassifier", "--data", "tests.text_task:TextData",
                 "--submodule", "ff", "--sparsity", "0.5", "--latency", *batch_size]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^0 +2 +64 -> 32 ", out, re.M)
    assert f"latency at batch {48 if batch_size else 32}," in out  # (N, 12, 32) embeddings: a batch's rows are N


def test_channels_of_an_untraceable_model_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["channels", "--model", "tests.test_cli:Untraceable", "--model-args", '{"in_features": 4}'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: litcompress channels")
    assert "tracing Untraceable with torch.fx failed" in err
    assert "--submodule NAME plans one attribute of the model instead, if that one traces." in err


def test_a_broken_link_as_the_output_dir_is_named_before_training(tmp_path, capsys, monkeypatch) -> None:
    """It was "cannot write there (File exists)": a link to nothing does not exist, so it was not found in the way."""
    monkeypatch.chdir(tmp_path)
    Path("out").symlink_to("gone")
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--output-dir", "out"])
    assert exit_info.value.code == 2
    assert "--output-dir out: out is a broken link (to 'gone'), not a directory." in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(("args", "message"), [
    (["--sparsity", "1.0"], "expected a fraction in [0, 1), got 1.0"),
    (["--sparsity", "most"], "expected a number in [0, 1), got 'most'"),
    (["--backends", "torch_ao,tensorrt"], "unknown backend(s) ['tensorrt']"),
    # torch's traceback at the end of the first epoch, the output folder left behind
    (["--model", "mobilenet", "--model-args", '{"width": 4, "blocks": 1, "stem_stride": 8}', "--data-args",
      '{"batch_size": 98}'], "--data-args batch_size 98 leaves a last training batch of 1 of the 1079 training "
                             "samples, and MobileNetClassifier's batch norm cannot train on one row"),
    # the empty name was dropped without a word
    (["--backends", "torch_ao,,onnxruntime"], "an empty name in 'torch_ao,,onnxruntime': two commas in a row"),
    (["--exclude", "net.0,"], "an empty name in 'net.0,'"),
    (["--checkpoint", "missing.ckpt"], "no file at 'missing.ckpt'"),
    (["--model", "vgg"], "expected one of mlp, cnn, resnet, resnext, mobilenet, transformer, swiglu, densenet, lstm or "
                         "'package.module:Class'"),
    (["--model", "os.path:join"], "'os.path:join' is not a LightningModule subclass"),
    # a misspelt class was said to be no LightningModule subclass
    (["--model", "litcompress.models:MLPClassifer"], "'litcompress.models' has no 'MLPClassifer'; did you mean "
                                                     "'MLPClassifier'"),
    (["--data", "no_such_module:Data"], "cannot import 'no_such_module'"),
    (["--model-args", "{hidden: 3}"], "expected a JSON object"),
    (["--prune", "l3_unstructured"], "'l3_unstructured' is not a method: choose one of l1_unstructured, "
                                     "ln_structured, random_structured, random_unstructured or none"),
    # a class path: the advice was to pass a BasePruningMethod subclass, which the command line cannot
    (["--prune", "mypkg.methods:HalfRows"], "a BasePruningMethod subclass of your own is for the Python API"),
    (["--keep-multiple-of", "0"], "argument --keep-multiple-of: expected an integer >= 1, got 0"),
    # pruned nothing, without a word, beside a report row saying ln_structured to 80%
    (["--prune", "ln_structured", "--keep-multiple-of", "512"], "--keep-multiple-of 512 keeps every channel of every "
     "layer to prune at sparsity 80% (channels per layer: net.0.weight (256), net.2.weight (256))"),
    (["--prune", "ln_structured", "--exclude", "net.9"], "--exclude names no module of the model: ['net.9'] ('net.9': "
                                                         "did you mean 'net.4'"),
    (["--model", "cnn", "--data-args", '{"flatten": true}'], "--model cnn takes square images"),
    (["--metric", "val_accuracy"], "--metric 'val_accuracy' was not logged by MLPClassifier.validation_step"),
    (["--latency-batch-size", "100000"], "more than the 359 validation inputs"),
    (["--tolerance", "-0.1"], "expected a finite number >= 0"),
    (["--min-speedup", "0"], "argument --min-speedup: expected a finite number > 0, got 0"),
    (["--timeout", "-1"], "argument --timeout: expected a finite number > 0, got -1"),  # was ">= 0", 0 refused too
    (["--seed", "-1"], "argument --seed: expected an integer in [0, 4294967295], got -1"),  # was a traceback
    # the advice was to flatten the data (or an input_fn=), for a model that takes images
    (["--model", "transformer", "--model-args", '{"image_size": 6, "d_model": 8, "heads": 2, "layers": 1}'],
     "--model transformer was built for images (1, 6, 6) (in_channels, image_size), and --data digits gives (1, 8, 8): "
     "give the data it was built for, or --model-args '{\"in_channels\": 1, \"image_size\": 8}'."),
    # the advice was the Python API's input_fn=, which no option sets
    (["--model-args", '{"in_features": 32}'], "--model mlp was built for 32 input features (in_features), and --data "
     "digits gives (64,): give the data it was built for, or --model-args '{\"in_features\": 64}'."),
    (["--seed", "5000000000"], "argument --seed: expected an integer in [0, 4294967295], got 5000000000"),
    (["--output-dir", "file.txt"], "--output-dir file.txt is a file"),
    (["--output-dir", "file.txt/out"], "--output-dir file.txt/out: file.txt is a file, not a directory"),  # found
    # before training
    (["--model-args", '{"hidden": 3}'], "hidden=3: expected one or more positive ints"),
    (["--model-args", '{"hidden": [8], "widht": 3}'],
     '--model-args: MLPClassifier(**{"num_classes": 10, "in_features": 64, "hidden": [8], "widht": 3}) failed: '
     "MLPClassifier.__init__() got an unexpected keyword argument 'widht'"),
    (["--data-args", '{"batch_size": 0}'],
     '--data-args: DigitsDataModule(**{"seed": 0, "batch_size": 0, "flatten": true}) failed: batch_size=0 must be a '
     'positive int'),
    (["--submodule", "body"], "--submodule body: MLPClassifier has no such sub-module"),
    (["--fp32-format", "tflite"], "invalid choice: 'tflite'"),
    (["--metric", "val_loss"], "--metric val_loss: it reads as a loss or an error (lower is better), but the "
                               "accuracy goal treats higher values as better"),
    (["--mode", "minimum"], "argument --mode: invalid choice: 'minimum'"),
    (["--test-metric", ""], "argument --test-metric: expected the name of a metric the model logs"),  # was test_acc
    (["--metric", " "], "argument --metric: expected the name of a metric the model logs"),
    (["--prune-heads", "0.5"], "--prune-heads 0.5: the model has no nn.MultiheadAttention whose heads can be "
                               "pruned"),
    (["--prune", "none", "--prune-heads", "0.5"], "--prune-heads prunes along with --prune"),
    (["--prune-heads", "1"], "argument --prune-heads: expected a fraction in [0, 1), got 1"),
    (["--model", "transformer", "--model-args", '{"heads": 8}', "--prune", "l1_unstructured", "--prune-heads", "0.1",
      "--keep-multiple-of", "8"],  # (unstructured: it was refused after training)
     "--prune-heads 0.1: 0.1 of each attention's heads prunes none in encoder.layers.0.self_attn (8), "
     "encoder.layers.1.self_attn (8); 0.188 or more prunes one in each. No head would be pruned."),
    (["--distill-alpha", "0.9"], "--distill-alpha: option(s) of --distill, which is not given"),
    (["--distill", "--prune", "none"], "--distill trains the pruned model against the input model while it "
                                       "fine-tunes: it needs a --prune method and --prune-epochs >= 1"),
    (["--distill", "--prune-epochs", "0"], "it needs a --prune method and --prune-epochs >= 1"),
    (["--distill", "--distill-alpha", "1.5"], "argument --distill-alpha: expected a number in [0, 1], got 1.5"),
    (["--distill", "--distill-temperature", "0"], "argument --distill-temperature: expected a finite number > 0, "
                                                  "got 0"),
    (["--backends", "torchao"], "--quantize auto with --backends torchao: none of these backends does dynamic int8 "
                                "quantization; add one that does (torch_ao, onnxruntime, pt2e), or use --quantize "
                                "weight_only"),
    (["--quantize", "weight_only", "--backends", "torch_ao"], "none of these backends does weight_only int8 "
                                                              "quantization; add one that does (torchao)"),
    (["--checkpoint", "file.txt"], "--checkpoint file.txt: cannot be loaded as a checkpoint of MLPClassifier "
                                   "(UnpicklingError"),
    (["--model-args", '{"num_classes": 5}'], "MLPClassifier.validation_step fails on the first batch of --data "
                                             "(IndexError: Target"),
    (["--model", "tests.test_cli:StepsCallItsNet"],
     "--model tests.test_cli:StepsCallItsNet: StepsCallItsNet defines no forward, so its steps call a sub-module "
     "(self.model(...)): pass --submodule NAME, "
     "the one they call (one of ['net'])"),
    (["--model", "litcompress.models:MLPClassifier", "--model-args", '{"in_features": 64}'],
     "--data digits gives images (1, 8, 8) to any model but the built-in mlp; a model that takes flat vectors needs "
     "--data-args '{\"flatten\": true}'"),
])
def test_bad_arguments_fail_before_training(args, message, tmp_path, capsys, monkeypatch, caplog):
    """Each is said as the options that were given (messages of the engine named its configuration's fields)."""
    monkeypatch.chdir(tmp_path)
    Path("file.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info, caplog.at_level(logging.INFO, logger="litcompress"):
        main(["compress", "--output-dir", "out", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("usage: litcompress compress")
    # a step failing on the data was first said as "could not be run on its own ... traced on the batches as they
    # are", advice for a run that does not happen
    assert "could not be run on its own" not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing was trained or written
    assert Path("file.txt").read_text() == "mine"


class ShapelessDigits(DigitsDataModule):
    """Data of one's own without an input_shape: a built-in model takes its sizes from --model-args."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        del self.input_shape


class FlatInputsOnly(L.LightningModule):
    """A model of one's own that takes flat vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())


class FlatDigits(DigitsDataModule):
    """Data of one's own that gives flat vectors (its input_shape says so)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "flatten": True})


@pytest.mark.parametrize(("args", "message"), [
    (["--data-args", '{"flatten": false}'],
     "--model mlp takes flat inputs (32 features), and --data digits gives images (1, 8, 8): drop '\"flatten\": "
     "false' from --data-args."),
    (["--data", "tests.test_cli:FlatDigits"],
     "--model mlp was built for 32 input features (the checkpoint's), and --data tests.test_cli:FlatDigits gives "
     "(64,): give the data it was built for, or train a new model (no --checkpoint) for this data."),
])
def test_a_built_in_mlp_checkpoint_given_other_data_is_told_so_in_command_line_terms(args, message, tmp_path, capsys):
    """The Python API's advice (input_fn=, which no option sets) was given: for data of one's own, and for images."""
    model = MLPClassifier(in_features=32, hidden=(8,))
    trainer = L.Trainer(max_epochs=0, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "mlp32.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--checkpoint", str(tmp_path / "mlp32.ckpt"), "--output-dir", str(tmp_path / "out"),
              *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_module_that_builds_its_layers_in_configure_model(tmp_path, capsys):
    """Its layers exist once `configure_model` runs (a Trainer calls it when fitting); the parse-time checks (what to
    prune, a forward on the first batch) used to fail with "nothing to prune"."""
    code = main(["compress", *QUICK, "--model", "tests.conftest:ConfiguredDigitsClassifier", "--model-args",
                 '{"hidden": 32}', "--metric", "val_acc", "--output-dir", str(tmp_path)])
    assert code == 0
    report = CompressionReport.load_json(tmp_path / "report.json")
    assert [s.stage for s in report.stages][:2] == ["input", "pruned"]
    assert report["input"].parameters == 64 * 32 + 32 + 32 * 10 + 10


def test_a_validation_step_that_never_calls_the_model_fails_before_training(tmp_path, capsys):
    """Its metric would judge the original model at every stage; the parse-time check names --submodule."""
    common = ["compress", *QUICK, "--model", "tests.conftest:SubmoduleStepsClassifier", "--output-dir",
              str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main(common)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: litcompress compress")
    assert ("--metric val_acc: SubmoduleStepsClassifier.validation_step never called self(...)" in err
            and "(CLI: --submodule net)" in err)
    assert not (tmp_path / "out").exists()  # nothing trained or written
    assert main([*common, "--test-metric", "test_acc", "--submodule", "net", "--sparsity", "0.97"]) == 0
    report = CompressionReport.load_json(tmp_path / "out" / "report.json")
    # the stages' own metrics: 97% of the weights gone after 17 fine-tuning steps costs accuracy
    assert report["pruned"].metric < report["input"].metric - 0.2
    assert report["pruned"].test_metric < report["input"].test_metric - 0.2


def test_several_validation_dataloaders_name_their_metric_and_feed_the_first(tmp_path, capsys):
    """`val_dataloader` returning a list: the inputs for tracing and timing come from the first loader (they were read
    as a DataLoader), and a metric logged per loader is named as Lightning names it, before any training."""
    common = ["compress", *QUICK, "--model", "tests.conftest:TwoValidationSetsClassifier",
              "--data", "tests.conftest:TwoValidationSetsData", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        main(common)
    err = capsys.readouterr().err
    assert "--metric 'val_acc' is logged by TwoValidationSetsClassifier.validation_step once per dataloader" in err
    assert "['val_acc/dataloader_idx_0', 'val_acc/dataloader_idx_1']" in err
    assert not (tmp_path / "out").exists()
    assert main([*common, "--metric", "val_acc/dataloader_idx_0", "--latency-batch-size", "48"]) == 0
    report = CompressionReport.load_json(tmp_path / "out" / "report.json")
    assert [s.stage for s in report.stages] == ["input", "pruned", "shrunk", "quantized"]
    assert report.batch_size == 48  # rows of the first validation loader's batches
    assert all(0.5 < s.metric <= 1 for s in report.stages)


def test_the_console_script_is_installed_and_answers():
    script = Path(sys.executable).parent / "litcompress"
    done = subprocess.run([str(script), "compress", "--sparsity", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "expected a fraction in [0, 1), got 2" in done.stderr
    done = subprocess.run([str(script), "report", "/nonexistent"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "cannot read" in done.stderr


def test_python_dash_m_litcompress_is_the_command():
    """Where the script is not on PATH (a venv not activated), ``python -m litcompress`` runs it (it had no
    __main__)."""
    done = subprocess.run([sys.executable, "-m", "litcompress", "compress", "--sparsity", "2"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "usage: litcompress compress" in done.stderr
    assert "expected a fraction in [0, 1), got 2" in done.stderr


@pytest.mark.parametrize("argv,message", [
    (["--dynamic-dims", "0:x"], "expected INPUT:DIM pairs such as '0:1'"),
    (["--dynamic-dims", "1:1"], "error: --dynamic-dims names input 1, but the model takes 1 input"),
    (["--dynamic-dims", "0:1", "--quantize", "none", "--no-export"], "--no-export writes none: drop one of them"),
    (["--dynamic-dims", "0:1,0:0"], "0:0: dim 0 is the batch, which is always left free"),
    # the MLP's 64 features: torch.export failed after the training, an ONNX file declared them free and failed
    (["--dynamic-dims", "0:1", "--quantize", "none"], "--dynamic-dims declares dim 1 of input 0 (size 64) free, but "
                                                      "the model fails on the inputs one shorter there and half as "
                                                      "long (RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
])
def test_dynamic_dims_that_cannot_apply_fail_before_training(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", *QUICK, "--output-dir", str(tmp_path / "out"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_an_empty_output_dir_is_refused_rather_than_taken_for_this_folder(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--output-dir", ""])
    assert "--output-dir: an empty path; give a directory" in capsys.readouterr().err


def test_a_sequence_model_fed_several_lengths_is_pruned_quantized_and_its_file_takes_any_length(tmp_path):
    import torch

    from litcompress.quantization import load_quantized
    from tests.sequence_task import VOCAB, TokenClassifier

    out = tmp_path / "seq"
    assert main(["compress", "--model", "tests.sequence_task:TokenClassifier",
                 "--data", "tests.sequence_task:TokenData",
                 "--train-epochs", "1", "--prune", "l1_unstructured", "--sparsity", "0.6", "--prune-epochs", "1",
                 "--backends", "torch_ao,onnxruntime", "--max-trials", "2", "--latency-repeats", "2",
                 "--latency-batch-size", "64", "--no-plot", "--output-dir", str(out)]) == 0
    report = CompressionReport.load_json(out / "report.json")
    assert report["pruned"].weight_sparsity == pytest.approx(0.6, abs=1e-3)  # the LSTM's matrices included
    # The LSTM is int8 too: it holds 82% of the weights, so with it in fp32 any file is larger than the input's
    # weights. Which recipe wins goes by latency: TorchScript files (torch_ao) carry ~50 KiB of code, ONNX ones little
    # (the bound was 0.4, which only the onnxruntime file met, and a loaded host sometimes chose torch_ao).
    assert report["quantized"].size_bytes < 0.8 * report["input"].size_bytes
    assert report.batch_size == 64  # two batches of the first's length
    (artifact,) = [p for p in out.glob("model.*")]
    model, recipe = load_quantized(artifact)
    assert recipe is not None
    pruned = TokenClassifier()  # the fp32 pruned model, from the state dict written beside the file
    pruned.load_state_dict(torch.load(out / "pruned_state_dict.pt"))
    for length in (5, 24, 40):  # 5 and 40: lengths no batch had
        tokens = torch.randint(0, VOCAB, (64, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            int8, fp32 = model(tokens), pruned.eval()(tokens)
        assert int8.shape == fp32.shape == (64, 2)
        assert (int8 - fp32).abs().max() < 0.1 * fp32.abs().max()  # int8 rounding, not another model


def test_channels_says_that_a_recurrent_layer_loses_hidden_units_and_previews_it(capsys):
    # the DataModule's batch tells shrink which dim of the LSTM's output [:, -1] takes (before, --data was unused
    # for models of the user's, and the LSTM was said to keep its units)
    assert main(["channels", "--model", "tests.sequence_task:TokenClassifier",
                 "--data", "tests.sequence_task:TokenData", "--sparsity", "0.5"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^rnn +LSTM 16 -> 64 +units$", out, re.M)
    assert re.search(r"^embed +Embedding 20 x 16 +dims$", out, re.M)
    assert "3 of 4 layers can lose channels" in out and "(an embedding's dims: with --prune-embeddings)" in out
    assert not re.search(r"^embed +\S+ +16 -> ", out, re.M)  # the preview, as compress prunes: not the embedding
    assert re.search(r"^rnn +fc +64 -> 32 .* hidden units$", out, re.M)  # the preview: half of its units gone
    assert "50% of the channels (and of recurrent layers' hidden units), as compress prunes" in out


def test_the_built_in_lstm_is_pruned_in_its_lstm_and_quantized_with_it(tmp_path):
    out = tmp_path / "lstm"
    assert main(["compress", "--model", "lstm", "--train-epochs", "1", "--prune", "l1_unstructured", "--sparsity",
                 "0.5", "--prune-epochs", "1", "--backends", "torch_ao,onnxruntime", "--max-trials", "2",
                 "--latency-repeats", "2", "--no-plot", "--output-dir", str(out)]) == 0
    report = CompressionReport.load_json(out / "report.json")
    assert report["pruned"].weight_sparsity == pytest.approx(0.5, abs=1e-3)
    # 97% of its weights are the LSTM's: the int8 file is under 0.4x the fp32 one only if the LSTM is int8
    assert report["quantized"].size_bytes < 0.4 * report["input"].size_bytes


def test_the_built_in_lstm_loses_half_its_hidden_units_to_structured_pruning_and_its_file_loads_back(tmp_path):
    """Before, ln_structured found nothing to prune in it (its LSTM was left out, its head is the output)."""
    from litcompress import load_shrunk_state_dict
    from litcompress.models import LSTMClassifier

    out = tmp_path / "lstm"
    assert main(["compress", "--model", "lstm", "--train-epochs", "1", "--prune", "ln_structured", "--sparsity",
                 "0.5", "--prune-epochs", "1", "--quantize", "none", "--latency-repeats", "2", "--no-plot",
                 "--output-dir", str(out)]) == 0
    report = CompressionReport.load_json(out / "report.json")
    assert report["shrunk"].parameters < 0.35 * report["input"].parameters  # 64 -> 32 units: about 0.3x
    model = load_shrunk_state_dict(LSTMClassifier(), torch.load(out / SHRUNK_STATE_FILE)).eval()
    assert model.lstm.hidden_size == 32 and model.head.in_features == 32
    loaded, _ = load_quantized(next(out.glob("model.*")))
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)  # the exported file is that model


def test_a_text_model_with_dict_batches_called_by_keyword_is_compressed_end_to_end(tmp_path):
    """Hugging Face style: dict batches, self(input_ids=..., attention_mask=...) in the steps. Before, the CLI
    failed after the dense training (a dict is not the model's inputs), and no ONNX or TorchScript candidate could
    be judged (they take no keywords)."""
    from tests.text_task import LENGTH, VOCAB, TextClassifier

    out = tmp_path / "text"
    assert main(["compress", "--model", "tests.text_task:TextClassifier", "--data", "tests.text_task:TextData",
                 "--train-epochs", "2", "--prune", "l1_unstructured", "--sparsity", "0.5", "--prune-epochs", "1",
                 "--backends", "torch_ao,onnxruntime", "--max-trials", "2", "--latency-repeats", "2", "--no-plot",
                 "--output-dir", str(out)]) == 0
    report = CompressionReport.load_json(out / "report.json")
    assert report["quantized"].metric > 0.7  # judged through validation_step's keyword call
    (artifact,) = out.glob("model.*")
    model, _ = load_quantized(artifact)
    pruned = TextClassifier()
    pruned.load_state_dict(torch.load(out / PRUNED_STATE_FILE))
    generator = torch.Generator().manual_seed(0)
    ids, mask = torch.randint(0, VOCAB, (5, LENGTH), generator=generator), torch.ones(5, LENGTH, dtype=torch.long)
    with torch.no_grad():
        int8, fp32 = model(ids, mask), pruned.eval()(ids, mask)  # the file takes forward's inputs, in its order
    assert (int8 - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_inputs_star_passes_the_whole_batch_to_a_forward_that_takes_it(tmp_path, capsys):
    """A LightningModule whose forward reads its dict batch itself: --inputs '*' quantizes it (the file takes the
    batch's tensors by sorted key), and --latency-batch-size gathers batches of dicts."""
    out = tmp_path / "out"
    assert main(["compress", "--model", "tests.text_task:BatchClassifier", "--data", "tests.text_task:TextData",
                 "--inputs", "*", "--prune", "none", "--quantize", "dynamic", "--backends", "onnxruntime",
                 "--max-trials", "1", "--latency-repeats", "2", "--latency-batch-size", "48", "--no-plot",
                 "--train-epochs", "1", "--output-dir", str(out)]) == 0
    report = CompressionReport.load_json(out / "report.json")
    assert report["quantized"].metric > 0.5 and report.batch_size == 48
    assert any("takes containers or non-tensor values as inputs" in m for m in report.messages)
    loaded, _ = load_quantized(out / "model.onnx")
    ids, mask = torch.randint(0, 20, (3, 12)), torch.ones(3, 12, dtype=torch.long)
    labels = torch.zeros(3, dtype=torch.long)
    assert loaded(mask, ids, labels).shape == (3, 2)  # attention_mask, input_ids, labels: sorted keys


def test_inputs_names_the_keys_of_dict_batches_and_is_checked_before_training(tmp_path, capsys):
    keys = '{"keys": ["ids", "mask", "y"]}'
    common = ["compress", "--model", "tests.text_task:TextClassifier", "--model-args", keys,
              "--data", "tests.text_task:TextData", "--data-args", keys, "--prune", "none", "--quantize", "dynamic",
              "--backends", "onnxruntime", "--max-trials", "1", "--latency-repeats", "2", "--no-plot"]
    with pytest.raises(SystemExit):
        main(common + ["--inputs", "ids,nope", "--train-epochs", "1", "--output-dir", str(tmp_path / "bad")])
    # the message as written (it was a KeyError's repr: in quotes, its own quotes escaped)
    said = capsys.readouterr().err
    assert "compress: error: --inputs: ['nope'] not in the batch (keys: ['ids', 'mask', 'y'])\n" in said
    assert not (tmp_path / "bad" / "dense.ckpt").exists()  # refused before any training
    assert main(common + ["--inputs", "ids,mask", "--train-epochs", "1", "--output-dir", str(tmp_path / "ok")]) == 0
    assert CompressionReport.load_json(tmp_path / "ok" / "report.json")["quantized"].metric > 0.5
    # without --inputs: the inputs validation_step gives the model (by keyword), whatever the batch's keys are called
    # (the batch was read by forward's parameter names first, and refused)
    assert main(common + ["--train-epochs", "1", "--output-dir", str(tmp_path / "steps")]) == 0
    assert CompressionReport.load_json(tmp_path / "steps" / "report.json")["quantized"].metric > 0.5


def test_a_second_run_into_the_same_directory_names_the_files_it_did_not_write(tmp_path, capsys):
    """The pruned and shrunk state dicts and the plot of a first run stay (not ours to delete), and the second run
    says which files are not its own, so that no one takes them for its outputs."""
    out = str(tmp_path / "out")
    # one file format in both runs: 'auto' keeps the faster file, and timings under load may pick two different ones
    same_file = ["--quantize", "none", "--fp32-format", "onnx", "--output-dir", out]
    assert main(["compress", *QUICK, "--prune", "ln_structured", "--sparsity", "0.5", *same_file]) == 0
    capsys.readouterr()
    assert main(["compress", *QUICK, "--prune", "none", "--no-plot", *same_file]) == 0
    captured = capsys.readouterr()
    assert "- pruned_state_dict.pt, shrunk_state_dict.pt in the output directory are not from this run" in captured.out
    assert "report.png is an earlier run's plot (this run wrote none)" in captured.err
    assert "dense.ckpt is an earlier run's checkpoint" not in captured.err  # this run trained and wrote it
    checkpoint = str(tmp_path / "given.ckpt")
    os.replace(os.path.join(out, "dense.ckpt"), checkpoint)
    (tmp_path / "out" / "dense.ckpt").write_bytes(b"")  # another run's (it was not even this model's)
    assert main(["compress", "--checkpoint", checkpoint, "--train-epochs", "0", "--prune", "none", "--no-plot",
                 "--latency-repeats", "2", *same_file]) == 0
    assert "dense.ckpt is an earlier run's checkpoint (this run trained nothing)" in capsys.readouterr().err


def test_prune_embeddings_prunes_a_text_lstms_embedding_dims_and_shrink_removes_them(tmp_path, capsys):
    from litcompress import load_pruned_state_dict, load_shrunk_state_dict
    from tests.text_task import PackedLSTMClassifier

    assert main(["channels", "--model", "tests.text_task:PackedLSTMClassifier", "--data", "tests.text_task:TextData",
                 "--sparsity", "0.5", "--prune-embeddings"]) == 0
    assert re.search(r"^embedding +lstm +32 -> 16 ", capsys.readouterr().out, re.M)  # the preview
    out = tmp_path / "text"
    assert main(["compress", "--model", "tests.text_task:PackedLSTMClassifier", "--data", "tests.text_task:TextData",
                 "--train-epochs", "1", "--prune", "ln_structured", "--sparsity", "0.5", "--prune-embeddings",
                 "--prune-epochs", "1", "--quantize", "none", "--latency-repeats", "2", "--no-plot",
                 "--output-dir", str(out)]) == 0
    report = CompressionReport.load_json(out / "report.json")
    assert report["shrunk"].description.startswith("16 channels removed, 8 hidden units removed")
    pruned = load_pruned_state_dict(PackedLSTMClassifier(), torch.load(out / PRUNED_STATE_FILE), keep_masks=False)
    weights = [p for name, p in pruned.named_parameters() if "weight" in name and p.dim() > 1]  # the embedding's too
    assert report["pruned"].weight_sparsity == pytest.approx(
        sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights))
    model = load_shrunk_state_dict(PackedLSTMClassifier(), torch.load(out / SHRUNK_STATE_FILE)).eval()
    assert (model.embedding.embedding_dim, model.lstm.hidden_size) == (16, 8)
    with pytest.raises(SystemExit):
        main(["compress", "--prune", "l1_unstructured", "--prune-embeddings"])
    assert "--prune-embeddings prunes embeddings' dims with a structured method" in capsys.readouterr().err


def test_sparse_kernels_replace_int8_and_ship_torchscript(tmp_path, capsys):
    """--sparse-kernels implies --quantize none; which layers run on CSR is measured (the report's table says), so
    the run is checked for what does not depend on the host's speed."""
    out = tmp_path / "sparse"
    assert main(["compress", "--train-epochs", "1", "--prune-epochs", "1", "--sparsity", "0.95", "--sparse-kernels",
                 "--model-args", '{"hidden": [512, 512]}', "--latency-repeats", "2", "--no-plot",
                 "--output-dir", str(out)]) == 0
    report = CompressionReport.load_json(out / "report.json")
    stages = [row.stage for row in report.stages]
    assert "quantized" not in stages and "Sparse kernels" in dict(report.details)
    if "sparse" in stages:  # a layer ran faster on CSR here: the file is TorchScript, read back and measured
        assert stages[-1] == "sparse" and report.artifact == str(out / "model.pt")
    else:
        # (none was faster alone, or they were and the whole model ran slower with them: a loaded host, both said)
        assert any(m.startswith(("sparse kernels: none of the 3 Linear layers",
                                 "sparse kernels: the model ran slower with its CSR layers")) for m in report.messages)
    for flags, said in ((["--quantize", "static"], "drop --quantize static, or drop --sparse-kernels"),
                        (["--fp32-format", "onnx"], "onnx files cannot hold sparse tensors"),
                        (["--prune", "ln_structured"], "--sparse-kernels with --prune ln_structured: shrink removes "
                         "the slices a structured method zeroes, so no layer is left sparse for the sparse kernels; "
                         "prune unstructured (--prune l1_unstructured) for them")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(["compress", "--sparse-kernels", *flags, "--output-dir", str(tmp_path / "refused")])
        assert said in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize(("args", "ignored"), [
    (["--no-shrink", "--keep-multiple-of", "8"], True),  # unstructured: only shrink rounds
    (["--no-shrink", "--keep-multiple-of", "8", "--prune", "none"], True),
    (["--no-shrink", "--keep-multiple-of", "8", "--prune", "ln_structured"], False),  # pruning rounds, too
    (["--keep-multiple-of", "8"], False),
])
def test_keep_multiple_of_is_named_as_ignored_only_where_nothing_rounds(args, ignored, capsys):
    from litcompress.cli import _configs, build_parser

    config = _configs(build_parser().parse_args(["compress", *args]))
    assert config.keep_multiple_of == 8
    assert ("--keep-multiple-of ignored" in capsys.readouterr().err) == ignored


def test_a_method_name_in_any_case_prunes_as_the_lower_case_one():
    """The residual grouping and --prune-embeddings compare the name: LN_STRUCTURED must not prune ungrouped."""
    from litcompress.cli import _configs, build_parser

    config = _configs(build_parser().parse_args(["compress", "--prune", "LN_Structured", "--prune-embeddings"]))
    assert config.prune.method == "ln_structured"
    assert _configs(build_parser().parse_args(["compress", "--prune", "None"])).prune is None


@pytest.mark.parametrize("command", ["compress", "channels"])
def test_help_says_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert not re.search(r"\(default: [^)]*\) \(default:", text)


_USER_DATA = '''
import torch
import lightning as L
from torch.utils.data import DataLoader, TensorDataset


class EmptyVal(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.rand(8, 64), torch.zeros(8, dtype=torch.long)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.rand(0, 64), torch.zeros(0, dtype=torch.long)), batch_size=4)


class NoVal(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.rand(8, 64), torch.zeros(8, dtype=torch.long)), batch_size=4)


class SizedNet(L.LightningModule):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.fc = torch.nn.Linear(64, hidden)  # torch refuses a negative size with a RuntimeError

'''


def test_a_model_of_a_package_in_the_folder_the_command_runs_in_is_found(tmp_path):
    """The README's `--model my_pkg.models:Net`, run in the project folder: the console script's sys.path starts
    with its bin folder, so the package was not found ("No module named 'my_pkg'") unless PYTHONPATH named it."""
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "models.py").write_text(_USER_DATA)
    script = Path(sys.executable).parent / "litcompress"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(script), "channels", "--model", "my_pkg.models:SizedNet", "--model-args",
                           '{"hidden": 16}', "--submodule", "fc"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "Linear 64 -> 16" in done.stdout, done.stderr  # imported, built and read
    done = subprocess.run([str(script), "channels", "--model", "no_such_pkg.models:Net"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "cannot import 'no_such_pkg.models': No module named 'no_such_pkg'" in done.stderr


def test_model_args_override_a_built_in_models_checkpoint_hyperparameters(first_run, tmp_path):
    """They were dropped without a word for a built-in --model (a user class got them)."""
    from litcompress import cli

    _, out = first_run
    args = cli.build_parser().parse_args(["compress", "--checkpoint", str(out / "dense.ckpt"),
                                          "--model-args", '{"lr": 0.5}'])
    assert cli._model(args, None).hparams.lr == 0.5
    args = cli.build_parser().parse_args(["compress", "--checkpoint", str(out / "dense.ckpt"),
                                          "--model-args", '{"hidden": [32]}'])
    with pytest.raises(ValueError, match=r"saved with hidden=\(48, 48\); --model-args gives other values, .* "
                                         r"\(net.0.weight would be built with another shape\)"):
        cli._model(args, None)  # another architecture: its weights do not fit
    # a shrunk checkpoint (its hyperparameters the widths before shrink): --model-args giving the widths its weights
    # have are no conflict (refused, saying that the weights do not fit, after 8c44484)
    import torch

    saved = torch.load(out / "dense.ckpt", weights_only=False)
    saved["hyper_parameters"]["hidden"] = (64, 64)
    torch.save(saved, tmp_path / "shrunk.ckpt")
    args = cli.build_parser().parse_args(["compress", "--checkpoint", str(tmp_path / "shrunk.ckpt"),
                                          "--model-args", '{"hidden": [48, 48]}'])
    assert [layer.out_features for layer in cli._model(args, None).net if isinstance(layer, torch.nn.Linear)] == [
        48, 48, 10]


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "cli_user_data:EmptyVal"], "--data: EmptyVal.val_dataloader() yields no batch"),  # StopIteration
    (["--data", "cli_user_data:NoVal"], "--data: NoVal.val_dataloader() failed (MisconfigurationException"),
    (["--model", "cli_broken_module:Model"], "importing 'cli_broken_module' failed: SyntaxError"),
    (["--model", "cli_raising_module:Model"], "importing 'cli_raising_module' failed: RuntimeError: not today"),
    (["--model", "cli_user_data:SizedNet", "--model-args", '{"hidden": -1}'],
     "failed: RuntimeError: Trying to create tensor with negative dimension"),
    (["--data-args", '{"val_fraction": 0.0002}'], "leave the val split(s) empty"),
])
@pytest.mark.parametrize("command", ["compress", "channels"])
def test_user_code_and_data_that_fail_are_said_in_one_line(command, args, message, tmp_path, monkeypatch, capsys):
    # each was a traceback (exit 1): only ImportError, TypeError and ValueError were turned into usage errors
    (tmp_path / "cli_user_data.py").write_text(_USER_DATA)
    (tmp_path / "cli_broken_module.py").write_text("def f(:\n")
    (tmp_path / "cli_raising_module.py").write_text("raise RuntimeError('not today')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    user_data = "--data" in args and "--model" not in args
    model = ["--model", "tests.conftest:ConfiguredDigitsClassifier"] if user_data else []
    with pytest.raises(SystemExit) as exit_info:
        main([command, *model, *args] + (["--output-dir", "out"] if command == "compress" else []))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err


def test_a_test_metric_of_a_model_without_test_step_is_said_as_such(tmp_path, monkeypatch, capsys):
    """It was taken for a model and data that do not fit ("do the model (--model-args...) and the data fit")."""
    (tmp_path / "cli_no_test_step.py").write_text(
        "import lightning as L\nfrom tests.conftest import ConfiguredDigitsClassifier\n\n\n"
        "class NoTestStep(ConfiguredDigitsClassifier):\n"
        "    test_step = L.LightningModule.test_step  # as a class that never defined one\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit):
        main(["compress", "--model", "cli_no_test_step:NoTestStep", "--test-metric", "test_acc",
              "--output-dir", str(tmp_path / "out")])
    assert ("--test-metric test_acc: NoTestStep has no test_step to log it; define one, or leave --test-metric out."
            in capsys.readouterr().err)


@pytest.mark.parametrize(("signal_name", "code", "said"), [
    ("SIGINT", 130, "interrupted (Ctrl-C)"),
    # Lightning ends a fit on SIGTERM (a scheduler's, `kill`'s) with SystemExit too: it was said as Ctrl-C, code 130
    ("SIGTERM", 143, "terminated (SIGTERM)"),
])
def test_a_signal_during_training_ends_with_a_line_and_the_shells_code(tmp_path, signal_name, code, said):
    """Lightning turns Ctrl-C in a fit into exit code 1 with its message on a logger the CLI keeps quiet: the run
    ended without a word."""
    import signal

    script = Path(sys.executable).parent / "litcompress"
    # a terminal's Ctrl-C: a test run started in the background (nohup, `&`) ignores SIGINT, and so would the CLI
    process = subprocess.Popen([str(script), "compress", "--train-epochs", "500", "--output-dir", str(tmp_path / "o")],
                               stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stderr:  # send it once the fit runs
        if line.startswith("training "):
            break
    time.sleep(3)
    process.send_signal(getattr(signal, signal_name))
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert f"{said}; the files already in {tmp_path / 'o'} are whole" in err
    assert signal_name == "SIGINT" or "Ctrl-C" not in err


@given(field=st.sampled_from(["exclude", "heads", "method", "sparsity", "schedule", "rounds", "scope"]),
       value=st.one_of(st.just("..."), st.floats(0, 1).map(repr), st.text("abc._", min_size=1).map(repr)))
def test_configuration_fields_the_cli_sets_are_said_as_its_options_and_others_stay(field, value):
    message = f"PruneConfig({field}={value}): something is wrong."
    said = in_cli_terms(message)
    flag = {"exclude": "--exclude", "heads": "--prune-heads", "method": "--prune", "sparsity": "--sparsity",
            "schedule": "--schedule"}.get(field)
    if flag is None:  # no option sets it: as the engine said it
        assert said == message
    else:
        assert "PruneConfig" not in said and said.startswith(flag) and said.endswith("): something is wrong."[1:])
        assert value == "..." or value.strip("'") in said


def test_every_option_the_messages_are_translated_to_is_an_option_of_compress():
    from litcompress.cli import _OPTIONS, build_parser

    parser = build_parser()
    compress = parser._subparsers._group_actions[0].choices["compress"]
    options = {flag for action in compress._actions for flag in action.option_strings}
    assert {flag for fields in _OPTIONS.values() for flag in fields.values()} <= options


@pytest.mark.parametrize(("message", "said"), [
    ("CompressionConfig(sparse_kernels=True, fp32_format='onnx'): onnx files cannot hold sparse tensors; use "
     "fp32_format='auto' or 'torchscript'.",
     "--sparse-kernels --fp32-format onnx: onnx files cannot hold sparse tensors; use --fp32-format auto or "
     "'torchscript'."),
    ("PruneConfig(rounds=3, method='x'): no.", "PruneConfig(rounds=3, method='x'): no."),  # rounds: no option
    ("nothing to remove. Pass removable_only=False to mask them anyway.",
     "nothing to remove. Pass removable_only=False to mask them anyway. (removable_only is an option of the Python "
     "API's PruneConfig; from the command line, prune unstructured: --prune l1_unstructured.)"),
])
def test_calls_of_several_fields_and_advice_on_python_options_are_said_for_the_command_line(message, said):
    assert in_cli_terms(message) == said


class OneWidthMLP(MLPClassifier):
    """A user's model whose `hidden` is one int, checked in its constructor."""

    def __init__(self, hidden: int = 32, **kwargs: object) -> None:
        if not isinstance(hidden, int):
            raise ValueError(f"hidden={hidden!r}: expected one int")
        super().__init__(hidden=(hidden,), **kwargs)


def test_a_checkpoint_of_another_model_is_said_to_be_one(first_run, capsys, tmp_path):
    """The model's constructor, handed the other model's saved hyperparameters, failed, and its error came alone
    ('hidden=[48, 48]: expected one int'): nothing said the checkpoint was the cause."""
    _, out = first_run
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--model", "tests.test_cli:OneWidthMLP", "--checkpoint", str(out / "dense.ckpt"),
              "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert (f"--checkpoint {out / 'dense.ckpt'}: OneWidthMLP cannot be built from the hyperparameters the checkpoint "
            "saved (" in err)
    assert "hidden=(48, 48): expected one int. Give a checkpoint that Lightning's Trainer saved for this --model" in err


class SavesNoHyperparameters(L.LightningModule):
    """A user's module whose constructor needs `hidden` and a keyword-only `layers` and that calls no
    save_hyperparameters()."""

    def __init__(self, hidden: int, *, layers: int) -> None:
        super().__init__()
        widths = [64] + [hidden] * layers
        self.net = torch.nn.Sequential(torch.nn.Flatten(), *[module for i in range(layers) for module in (
            torch.nn.Linear(widths[i], widths[i + 1]), torch.nn.ReLU())], torch.nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_checkpoint_of_a_module_that_saves_no_hyperparameters_is_told_to_take_model_args(capsys, tmp_path):
    """Its own checkpoint was said to be another model's ("Give a checkpoint that Lightning's Trainer saved for this
    --model"), where --model-args with the missing `hidden` loads it."""
    from litcompress.cli import _from_checkpoint

    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trained = SavesNoHyperparameters(12, layers=1)
    trainer.fit(trained, datamodule=DigitsDataModule(batch_size=32))
    checkpoint = tmp_path / "own.ckpt"
    trainer.save_checkpoint(checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--model", "tests.test_cli:SavesNoHyperparameters", "--checkpoint", str(checkpoint),
              "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert (f"--checkpoint {checkpoint}: SavesNoHyperparameters needs hidden, layers, which the checkpoint did not "
            "save (saved: none). If it is this model's checkpoint (its module calls no self.save_hyperparameters() for "
            "them), give the values it was trained with, --model-args '{\"hidden\": \"...\", \"layers\": \"...\"}'; "
            "else give a checkpoint Lightning's Trainer saved for this --model.") in err.replace("\n", " ")
    with pytest.raises(SystemExit):  # (Python names the keyword-only one only once the positional one is given)
        main(["compress", "--model", "tests.test_cli:SavesNoHyperparameters", "--checkpoint", str(checkpoint),
              "--model-args", '{"hidden": 12}', "--output-dir", str(tmp_path / "run")])
    assert "SavesNoHyperparameters needs layers, which" in capsys.readouterr().err
    loaded = _from_checkpoint(SavesNoHyperparameters, checkpoint, hidden=12, layers=1)  # as --model-args gives them
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))


def test_a_mnist_checkpoint_takes_other_training_images_but_keeps_its_held_out_sets(tmp_path, capsys):
    """MNIST's validation and test sets are as shipped (its seed and train_limit choose training images only): a
    --checkpoint run refused another train_limit, saying it would score the model on data it trained on."""
    checkpoint = tmp_path / "dense.ckpt"
    torch.save({"datamodule_hyper_parameters": dict(batch_size=64, seed=0, num_workers=0, flatten=False,
                                                    train_limit=512, shuffle_seed=None)}, checkpoint)

    def datamodule(*options: str):
        return _datamodule(build_parser().parse_args(["compress", "--model", "cnn", "--data", "mnist",
                                                      "--checkpoint", str(checkpoint), *options]))

    capsys.readouterr()
    more = datamodule("--data-args", '{"train_limit": 1024}')
    assert (more.train_limit, more.seed, more.shuffle_seed) == (1024, 0, 0)
    same = datamodule("--seed", "2")  # the checkpoint's training images, in --seed's order
    assert (same.train_limit, same.seed, same.shuffle_seed) == (512, 0, 2)
    said = capsys.readouterr().err
    assert "training images are those --checkpoint was trained on (seed 0, train_limit 512)" in said
    assert "score it on data it trained on" not in said
    other = datamodule("--seed", "2", "--data-args", '{"seed": 2}')
    assert (other.train_limit, other.seed) == (512, 2)


def test_search_limits_are_said_as_options_but_a_call_written_out_is_left_as_written():
    from litcompress.cli import _search_limits_as_options

    assert _search_limits_as_options("timeout_s=5 reached. Raise max_trials/timeout_s") == (
        "--timeout 5 reached. Raise --max-trials/--timeout")
    said = ("int8 does not pay off: PTQConfig(min_speedup=1.0) (CLI: --min-speedup 1) keeps fp32; min_speedup=1.0 "
            "was not given")
    assert _search_limits_as_options(said) == ("int8 does not pay off: PTQConfig(min_speedup=1.0) (CLI: "
                                               "--min-speedup 1) keeps fp32; --min-speedup 1.0 was not given")


class _BatchNormNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                       torch.nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


class _SampledData:
    """One dataset of `rows`, its training loader drawing `sampler`'s rows."""

    def __init__(self, rows: int, batch_size: int, sampler: Any = None) -> None:
        from torch.utils.data import TensorDataset

        self.dataset, self.batch_size, self.sampler = TensorDataset(torch.randn(rows, 4)), batch_size, sampler

    def train_dataloader(self):
        from torch.utils.data import DataLoader

        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler)


def test_the_single_row_batch_norm_check_counts_the_rows_the_sampler_draws_and_says_a_single_sample_plainly():
    """A subset sampler's 1000 of 1079 rows (last batch 20) was refused as a last batch of one; a training set of one
    sample failed the check itself with StopIteration."""
    from torch.utils.data import SubsetRandomSampler, WeightedRandomSampler

    from litcompress.cli import _check_single_row_batch_norm

    model, x = _BatchNormNet(), (torch.randn(4, 4),)
    for sampler in (SubsetRandomSampler(range(1000)), WeightedRandomSampler(torch.ones(1079), 1000)):
        _check_single_row_batch_norm(model, _SampledData(1079, 98, sampler), x)  # not refused
    with pytest.raises(ValueError, match=r"batch_size 98 leaves a last training batch of 1 of the 1079 training "
                                         r"samples.*e\.g\. 99\.$"):
        _check_single_row_batch_norm(model, _SampledData(1079, 98), x)
    with pytest.raises(ValueError, match=r"batch_size 10 leaves a last training batch of 1 of the 981 .*e\.g\. 11\.$"):
        _check_single_row_batch_norm(model, _SampledData(2000, 10, SubsetRandomSampler(range(981))), x)
    with pytest.raises(ValueError, match="the training data holds 1 sample, and _BatchNormNet's batch norm cannot "
                                         "train on one row"):
        _check_single_row_batch_norm(model, _SampledData(1, 2), x)


def test_a_built_in_model_takes_its_sizes_from_model_args_where_the_data_has_no_input_shape(capsys):
    """The error advised "pass --model-args with the sizes instead", then ignored them: the same error again."""
    with pytest.raises(SystemExit) as exit_info:
        main(["channels", "--model", "mlp", "--data", "tests.test_cli:ShapelessDigits"])
    assert exit_info.value.code == 2
    assert ("--model mlp needs a DataModule with an `input_shape` attribute (ShapelessDigits has none), or the sizes "
            "in --model-args: --model-args '{\"in_features\": N, \"num_classes\": N}'.") in capsys.readouterr().err
    assert main(["channels", "--model", "mlp", "--data", "tests.test_cli:ShapelessDigits", "--model-args",
                 '{"in_features": 64}']) == 0
    assert "net.0  Linear" in capsys.readouterr().out


def test_the_python_apis_input_fn_advice_is_said_in_command_line_terms(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--model", "tests.test_cli:FlatInputsOnly", "--data", "digits", "--data-args",
              '{"flatten": false}', "--train-epochs", "0", "--quantize", "none", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "pass input_fn=" in err and ("(input_fn is the Python API's, compress_lightning(input_fn=...); from the "
                                        "command line, --inputs KEY,... reads a dict batch's entries") in err


def test_a_pgf_plot_without_latex_is_refused_before_the_run(monkeypatch, tmp_path):
    """.pgf was offered among the formats, then matplotlib's pgf backend failed after the report ('xelatex' not
    found), with a traceback."""
    import shutil

    from litcompress.cli import _check_plot_path

    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)  # a host without LaTeX, wherever run
    with pytest.raises(ValueError, match=r"--plot .*x\.pgf: matplotlib writes \.pgf files with xelatex, which this "
                                         r"host lacks; use one of .*\.png"):
        _check_plot_path(tmp_path / "x.pgf")
    with pytest.raises(ValueError) as refused:
        _check_plot_path(tmp_path / "x.xyz")
    assert ".pgf" not in str(refused.value) and ".svg" in str(refused.value)
    _check_plot_path(tmp_path / "x.svg")


def test_sizes_from_model_args_that_do_not_fit_the_data_are_named(tmp_path, capsys):
    """The advice was --inputs (and the Python API's input_fn=), which cannot help: the sizes given were wrong."""
    with pytest.raises(SystemExit):
        main(["compress", "--model", "mlp", "--data", "tests.test_cli:ShapelessDigits", "--data-args",
              '{"flatten": true}', "--model-args", '{"in_features": 32}', "--train-epochs", "0", "--quantize", "none",
              "--output-dir", str(tmp_path / "o")])
    assert ("--model mlp was built with the sizes of --model-args {\"in_features\": 32}, and it cannot take the "
            "inputs of ShapelessDigits's first batch ((64, 64)): give their sizes (in_features) in --model-args."
            ) in capsys.readouterr().err
