"""Save, then load in a fresh process: same outputs, no re-tuning, small on disk."""

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import accuracy_fn
from litcompress.quantization import AccuracyCriterion, PTQConfig, load_quantized, quantize, save_quantized
from litcompress.quantization.artifact import FP32_SUFFIXES
from litcompress.quantization.backends.torch_ao import TorchAOBackend

SRC = str(Path(__file__).resolve().parents[2] / "src")

LOADER = """
import json, sys, torch
from litcompress.quantization import load_quantized
x = torch.load(sys.argv[1])
out = {}
for path in sys.argv[2:]:
    model, recipe = load_quantized(path)
    with torch.no_grad():
        torch.save(model(x), path + ".out")
    out[path] = None if recipe is None else recipe.to_dict()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def wide_cnn(digits):
    # Wide enough that weights, not format overhead, dominate the artefact size.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64 * 64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


def test_artefacts_reload_in_a_fresh_process_with_identical_outputs(wide_cnn, digits, tmp_path):
    x = digits[2][:200].view(-1, 1, 8, 8)
    with torch.no_grad():
        labels = wide_cnn(x).argmax(1)
    fp32_path = tmp_path / "fp32.pt"
    torch.save(wide_cnn.state_dict(), fp32_path)
    fp32_size = os.path.getsize(fp32_path)
    calibration = [(digits[0][i:i + 64].view(-1, 1, 8, 8),) for i in range(0, 256, 64)]

    results, paths = {}, []
    for backend, approach in [("torch_ao", "static"), ("torch_ao", "dynamic"), ("onnxruntime", "static"),
                              ("pt2e", "static"), ("torchao", "weight_only")]:
        config = PTQConfig(approach=approach, backends=(backend,), max_trials=2, latency_repeats=3,
                           accuracy=AccuracyCriterion(0.05))
        result = quantize(wide_cnn, config, eval_fn=accuracy_fn(x, labels), calibration_data=calibration)
        assert result.goal_met and result.recipe.backend == backend and not result.recipe.fp32_layers
        path = str(tmp_path / f"{backend}_{approach}.bin")
        size = result.save(path)
        assert size == os.path.getsize(path)
        if approach == "static":  # dynamic int8 keeps the conv layers in fp32
            assert size <= 0.3 * fp32_size, (backend, size, fp32_size)
        results[path], paths = result, paths + [path]

    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "x.pt"), *paths], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipes = json.loads(proc.stdout.strip().splitlines()[-1])
    for path, result in results.items():
        assert recipes[path] == result.recipe.to_dict()
        with torch.no_grad():
            expected = result.model(x)
        assert torch.allclose(torch.load(path + ".out"), expected, atol=1e-5), path


def test_fp32_fallback_result_saves_and_loads(tmp_path, digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10)).eval()
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), timeout_s=1e-9, latency_repeats=3)
    with pytest.warns(UserWarning):
        result = quantize(model, config, eval_fn=lambda m: 1.0, example_inputs=digits[2][:1])
    path = tmp_path / "fp32_fallback.pt"
    result.save(path)
    loaded, recipe = load_quantized(path)
    assert recipe is None
    assert torch.equal(loaded(digits[2]), model(digits[2]))


@pytest.mark.parametrize("fp32_format", ["export", "torchscript", "onnx"])
def test_an_fp32_model_reloads_in_a_fresh_process_at_any_batch_size(fp32_format, digits, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # left in training mode on purpose
    path = tmp_path / f"model{FP32_SUFFIXES[fp32_format]}"
    assert save_quantized(model, None, path, (digits[2][:1],), fp32_format=fp32_format) == path.stat().st_size
    assert model.training  # the caller's model is not switched to eval
    x = digits[2][:7]  # neither the example's batch of 1 nor torch.export's stand-in batch of 2
    torch.save(x, tmp_path / "x.pt")
    # The fresh process cannot import torchao: an fp32 file must not need it, whatever its format.
    block_torchao = "import sys; sys.modules['torchao'] = None\n"
    done = subprocess.run([sys.executable, "-c", block_torchao + LOADER, str(tmp_path / "x.pt"), str(path)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {str(path): None}
    with torch.no_grad():
        torch.testing.assert_close(torch.load(str(path) + ".out"), model.eval()(x), rtol=1e-5, atol=1e-6)
        loaded, _ = load_quantized(path)
        assert loaded.train() is loaded and loaded.eval() is loaded  # callers (and Lightning) switch modes freely
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    if fp32_format != "export":  # compile is for torch.export programs; refused before any compiling
        with pytest.raises(ValueError, match=r"compile applies to torch.export programs \(.pt2\); this file runs "):
            load_quantized(path, compile=True)


class _CompilesAPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.compile(nn.Linear(64, 32), backend="eager")
        self.last = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.first(x)))


@pytest.mark.parametrize("compiled", ["the model", "a part"])
@pytest.mark.parametrize("fp32_format", ["export", "torchscript", "onnx"])
def test_a_compiled_fp32_model_is_saved_as_its_eager_modules(fp32_format, compiled, tmp_path):
    """torch.export failed on a compiled model in words about `dynamic_shapes` and pointed at 'torchscript', which
    failed too ("using FX to torch.jit.trace a dynamo-optimized function"), as ONNX did; the caller's model stays
    compiled."""
    torch.manual_seed(0)
    if compiled == "the model":
        model = torch.compile(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), backend="eager")
    else:
        model = _CompilesAPart()
    x = torch.randn(5, 64)
    path = tmp_path / f"model{FP32_SUFFIXES[fp32_format]}"
    save_quantized(model, None, path, (x[:2],), fp32_format=fp32_format)
    loaded, recipe = load_quantized(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    assert recipe is None
    assert type(model if compiled == "the model" else model.first).__name__ == "OptimizedModule"


@pytest.mark.parametrize("fp32_format", ["export", "onnx"])
def test_the_file_does_not_carry_the_example_batch(fp32_format, tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    small, large = (tmp_path / f"{n}{FP32_SUFFIXES[fp32_format]}" for n in ("small", "large"))
    assert save_quantized(model, None, small, (torch.randn(2, 64),), fp32_format=fp32_format) == \
        save_quantized(model, None, large, (torch.randn(512, 64),), fp32_format=fp32_format)


def test_save_refuses_an_unknown_fp32_format(tmp_path):
    with pytest.raises(ValueError, match="fp32_format='tflite'"):
        save_quantized(nn.Linear(2, 2), None, tmp_path / "m", (torch.zeros(1, 2),), fp32_format="tflite")
    assert not any(tmp_path.iterdir())


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        load_quantized(tmp_path / "nope.onnx")
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "foreign.onnx")
    with pytest.raises(ValueError, match="not a litcompress artefact"):
        load_quantized(tmp_path / "foreign.onnx")
    # what users pass by mistake: a state dict (pruned_state_dict.pt), a pickled module, a broken file, the directory
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "pruned_state_dict.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    # (the legacy pickle format was read as ONNX and called a model file cut short or changed: "save it again")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "legacy4.pt", _use_new_zipfile_serialization=False,
               pickle_protocol=4)  # (a frame before the magic number)
    (tmp_path / "broken.pt2").write_bytes(b"garbage")
    (tmp_path / "empty.onnx").write_bytes(b"")  # was "an ONNX file but not a litcompress artefact (no metadata)"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "scripted.pt")  # torch.jit's, not ours
    # (the advice was model.load_state_dict(torch.load(path)), which refuses a masked state's weight_orig/weight_mask)
    for name, message in (("pruned_state_dict.pt", r"a torch\.save file.*litcompress\.load_pruned_state_dict\(model, "
                                                   r"torch\.load\(path\)\)"),
                          ("module.pt", "a torch\\.save file"),
                          ("legacy.pt", r"a torch\.save file of the legacy format.*load_pruned_state_dict"),
                          ("legacy4.pt", r"a torch\.save file of the legacy format.*load_pruned_state_dict"),
                          ("scripted.pt", r"a TorchScript archive without litcompress's metadata; torch\.jit\.load"),
                          ("broken.pt2", "reads neither as ONNX nor as a zip archive"),
                          ("empty.onnx", r"it is empty \(0 bytes\)")):
        with pytest.raises(ValueError, match=rf"'.*{name}' is not a model file litcompress wrote.*{message}"):
            load_quantized(tmp_path / name)
    with pytest.raises(IsADirectoryError, match="give the model file in it"):
        load_quantized(tmp_path)
    with zipfile.ZipFile(tmp_path / "notes.zip", "w") as archive:  # was "a torch.export archive"
        archive.writestr("a.txt", "hello")
    with pytest.raises(ValueError, match=r"notes.zip' is not a model file .*a zip archive of another kind"):
        load_quantized(tmp_path / "notes.zip")
    with pytest.raises(TypeError, match=r"example_inputs=\{'x'\}\): give the model's positional inputs as a tuple"):
        save_quantized(nn.Linear(2, 2), None, tmp_path / "m.pt2", {"x": torch.zeros(1, 2)})  # "hold no tensor"


@pytest.mark.parametrize("name, kind", [("kept.onnx", "onnx"), ("kept.pt2", "program"), ("kept.bin", "program")])
def test_an_fp32_result_is_saved_in_the_format_its_path_names(tmp_path, digits, name, kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10)).eval()
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), latency_repeats=3, max_trials=1,
                       min_speedup=1000.0)  # out of reach: the fp32 model is the result
    result = quantize(model, config, eval_fn=lambda m: 1.0, example_inputs=digits[2][:1])
    assert result.recipe is None
    path = tmp_path / name
    result.save(path)
    assert zipfile.is_zipfile(path) == (kind == "program")  # an ONNX file is a protobuf, a program a zip
    loaded, recipe = load_quantized(path)
    assert recipe is None
    torch.testing.assert_close(loaded(digits[2]), model(digits[2]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("backend", "name", "warned"), [
    ("torch_ao", "model.onnx", True), ("torch_ao", "model.pt2", True), ("onnxruntime", "model.onnx", False),
    ("torch_ao", "model.pt", False), ("torch_ao", "model.int8", False), ("pt2e", "model.onnx", True),
])
def test_a_path_whose_suffix_names_another_format_than_the_one_written_is_warned_of(tmp_path, digits, backend, name,
                                                                                    warned):
    """save('model.onnx') after a search that chose torch_ao wrote TorchScript under the name of an ONNX file,
    silently: ONNX Runtime then failed on it (the README's QuantizeOnFitEnd example gave such a path)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    config = PTQConfig(approach="dynamic", backends=(backend,), latency_repeats=3, max_trials=1)
    result = quantize(model, config, eval_fn=lambda m: 1.0, example_inputs=digits[2][:1])
    assert result.recipe is not None and result.recipe.backend == backend
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result.save(tmp_path / name)
    said = [str(w.message) for w in caught if "not the one its suffix names" in str(w.message)]
    assert bool(said) == warned, said
    if said:  # advice that fits the name given (an ONNX name: ask for ONNX Runtime; else the right suffix)
        assert ("backends=('onnxruntime',)" in said[0]) == name.endswith(".onnx")
        assert name.endswith(".onnx") or "name it with .pt" in said[0]
    loaded, recipe = load_quantized(tmp_path / name)  # read as it is, whatever the name
    assert recipe == result.recipe
    torch.testing.assert_close(loaded(digits[2]), result.model(digits[2]))


def test_a_lightning_module_is_saved_as_torchscript(tmp_path, digits):
    # tracing probes every attribute, and a LightningModule's `trainer` raises when no Trainer is attached
    from litcompress.models import MLPClassifier
    from litcompress.quantization import Recipe, get_backend

    torch.manual_seed(0)
    module = MLPClassifier(in_features=64, hidden=(32,)).eval()
    x = digits[2][:7]
    fp32_path = tmp_path / "fp32.pt"
    save_quantized(module, None, fp32_path, (x[:1],), fp32_format="torchscript")
    int8 = get_backend("torch_ao").quantize(copy.deepcopy(module), Recipe("torch_ao", "dynamic"), (x[:1],), [])
    int8_path = tmp_path / "int8.pt"
    save_quantized(int8, Recipe("torch_ao", "dynamic"), int8_path, (x[:1],))
    for path, expected in ((fp32_path, module), (int8_path, int8)):
        loaded, _ = load_quantized(path)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected(x))
    assert module._jit_is_scripting is False  # the user's module is left as it was


@pytest.mark.parametrize("fp32_format", ["export", "onnx", "torchscript"])
def test_a_file_is_replaced_whole_never_written_in_place(tmp_path, fp32_format):
    # the writers wrote into the user's path itself: a write killed midway left a truncated or empty file where a
    # loadable one was. Written beside it and renamed over it, the path gets a new file (inode) in one step.
    from litcompress.quantization import save_quantized

    torch.manual_seed(0)
    first, second = (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval() for _ in range(2))
    x, path = torch.randn(3, 4), tmp_path / "model.bin"
    save_quantized(first, None, path, (x,), fp32_format=fp32_format)
    inode = path.stat().st_ino
    size = save_quantized(second, None, path, (x,), fp32_format=fp32_format)
    assert path.stat().st_ino != inode and size == path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]  # no partial file left
    loaded, _ = load_quantized(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), second(x))

    class FailsWhenTraced(nn.Module):
        def forward(self, x):
            raise RuntimeError("interrupted")

    with pytest.raises(Exception, match="interrupted"):  # (the written-then-failed case: tests/test_files.py)
        save_quantized(FailsWhenTraced(), None, path, (x,), fp32_format=fp32_format)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"] and load_quantized(path)[0] is not None


class _MeanPool(nn.Module):
    """(batch, length, 4) -> (batch, 3): both dims free."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.a(x)).mean(1))


@pytest.mark.parametrize("fp32_format", ["export", "onnx", "torchscript"])
def test_declaring_a_length_leaves_the_batch_free_too(fp32_format, tmp_path):
    """dynamic_dims={0: 1} fixed the batch to the example's in the export and ONNX files (the docstring says the
    batch dim of every input stays free)."""
    torch.manual_seed(0)
    model = _MeanPool().eval()
    path = tmp_path / {"export": "m.pt2", "onnx": "m.onnx", "torchscript": "m.pt"}[fp32_format]
    save_quantized(model, None, path, (torch.randn(16, 10, 4),), fp32_format=fp32_format, dynamic_dims={0: 1})
    loaded, _ = load_quantized(path)
    for batch, length in ((16, 3), (7, 10), (1, 5)):
        x = torch.randn(batch, length, 4)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


def test_saving_into_a_folder_not_there_yet_makes_it(tmp_path):
    """It failed after the whole export, with each backend's own error naming an internal '.partial' path."""
    model = _MeanPool().eval()
    path = tmp_path / "new" / "deeper" / "m.pt2"
    save_quantized(model, None, path, (torch.randn(2, 3, 4),))
    loaded, _ = load_quantized(path)
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fp32_format", ["export", "torchscript"])
def test_a_damaged_or_cut_short_file_is_said_to_be_so(fp32_format, tmp_path):
    """Bytes changed in a .pt2 raised torch's UnicodeDecodeError; a torch.export file cut in half was taken for a
    torch.save file (the end found was that of a state dict nested in it), with advice about state dicts."""
    model = _MeanPool().eval()
    path = tmp_path / f"m{FP32_SUFFIXES[fp32_format]}"
    save_quantized(model, None, path, (torch.randn(2, 3, 4),), fp32_format=fp32_format)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:  # change bytes inside the largest member's data
        info = max(archive.infolist(), key=lambda i: i.compress_size)
    # its data starts after the local header, whose extra field (torch's alignment padding) the listing does not give
    name_length, extra_length = (int.from_bytes(data[info.header_offset + at:info.header_offset + at + 2], "little")
                                 for at in (26, 28))
    start = info.header_offset + 30 + name_length + extra_length
    damaged = bytearray(data)
    damaged[start:start + 16] = bytes(b ^ 0xFF for b in damaged[start:start + 16])
    (tmp_path / "damaged").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=rf"is damaged: its member '.*{re.escape(info.filename.split('/', 1)[1])}' "
                                         "fails its checksum"):
        load_quantized(tmp_path / "damaged")
    for cut in (len(data) // 2, len(data) - 10):
        (tmp_path / "cut").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="is a zip archive whose end is missing, as a copy or download cut short"):
            load_quantized(tmp_path / "cut")


@pytest.mark.parametrize("fp32_format", ["export", "torchscript"])
def test_a_byte_changed_in_an_archives_records_is_said_too(fp32_format, tmp_path):
    """A byte changed in a member's name (its local header) raised UnicodeDecodeError from the checksum pass; one in
    the directory records at the end, torch's own reader errors ("PytorchStreamReader failed reading zip
    archive", "an error when deserializing"). Every such file loads as it was, or is said to be damaged."""
    model, x = _MeanPool().eval(), torch.randn(2, 3, 4)
    path = tmp_path / f"m{FP32_SUFFIXES[fp32_format]}"
    save_quantized(model, None, path, (x,), fp32_format=fp32_format)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    # every byte of the first local headers (names and torch's alignment padding too), two of every other's name,
    # and of the end-of-archive record with the directory's last entries
    headers = [info.header_offset + k for info in infos[:3] for k in range(30 + len(info.filename) + int.from_bytes(
        data[info.header_offset + 28:info.header_offset + 30], "little"))]
    headers += [info.header_offset + 30 + k for info in infos[3:] for k in (0, 3)]
    tail = list(range(len(data) - 120, len(data), 2))
    outcomes = set()
    for at in headers + tail:
        changed = bytearray(data)
        changed[at] ^= 0xFF
        (tmp_path / "changed").write_bytes(bytes(changed))
        try:
            loaded, _ = load_quantized(tmp_path / "changed")
        except ValueError as error:
            said = r"is damaged|whose end is missing|torch cannot read the model|not a model file"
            assert re.search(said, str(error)), error
            outcomes.add("said")
            continue
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
        outcomes.add("loaded")
    assert "said" in outcomes


def test_a_program_calling_an_operator_not_registered_is_not_said_to_be_damaged(tmp_path):
    """An intact .pt2 whose program calls a custom op that the loading process has not registered (torchvision.ops
    without `import torchvision`) was said to be damaged: "save or copy the model file again"."""
    script = f"""
import sys, torch
sys.path.insert(0, {SRC!r})
from torch import nn
from litcompress.quantization import load_quantized, save_quantized
if sys.argv[1] == "save":
    @torch.library.custom_op("litcompress_test::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2
    @twice.register_fake
    def _(x):
        return torch.empty_like(x)
    class Twice(nn.Module):
        def forward(self, x):
            return torch.ops.litcompress_test.twice(x)
    save_quantized(Twice().eval(), None, sys.argv[2], (torch.randn(2, 3),))
else:
    try:
        load_quantized(sys.argv[2])
    except ValueError as error:
        print(error)
"""
    path = str(tmp_path / "custom.pt2")
    for step in ("save", "load"):
        run = subprocess.run([sys.executable, "-c", script, step, path], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    assert "an operator the model calls that this process has not registered" in run.stdout
    assert "is damaged" not in run.stdout


def test_torchs_own_words_about_the_host_are_not_taken_for_damage():
    """A file written on a GPU, read where CUDA is missing, was said to be changed or of another torch version."""
    from litcompress.quantization.artifact import _read_by_torch

    cuda = ("Attempting to deserialize object on a CUDA device but torch.cuda.is_available() is False. If you are "
            "running on a CPU-only machine, please use torch.load with map_location=torch.device('cpu').")
    with pytest.raises(RuntimeError, match="CUDA device"), _read_by_torch("m.pt2"):
        raise RuntimeError(cuda)
    with pytest.raises(ValueError, match=r"torch cannot read the model in 'm.pt'.*Expected PROTO opcode"), \
            _read_by_torch("m.pt"):
        raise RuntimeError("Expected PROTO opcode at the start of pickle archive, found 224")
    with pytest.raises(ValueError, match=r"Unknown builtin op: mylib::twice.*an operator the model calls that this "
                                         "process has not registered"), _read_by_torch("m.pt"):
        raise RuntimeError("Unknown builtin op: mylib::twice.\nCould not find any similar ops to mylib::twice.")


def test_saving_to_a_directory_is_refused_before_the_export(tmp_path):
    """It failed at the rename, after the whole export, naming an internal '.partial' file."""
    with pytest.raises(IsADirectoryError, match="is a directory; give a file path in it"):
        save_quantized(_MeanPool().eval(), None, tmp_path, (torch.randn(2, 3, 4),))
    # a folder not there yet: the export ran, wrote a file named like the folder, then raised NotADirectoryError
    with pytest.raises(ValueError, match=r"'.*exported/' names a folder; give a file path"):
        save_quantized(_MeanPool().eval(), None, f"{tmp_path}/exported/", (torch.randn(2, 3, 4),))
    assert sorted(os.listdir(tmp_path)) == []
    (tmp_path / "a_file").write_text("kept")  # mkdir's bare "File exists" before
    with pytest.raises(NotADirectoryError, match=r"a_file/sub/model.pt': .*a_file is a file, not a folder"):
        save_quantized(_MeanPool().eval(), None, tmp_path / "a_file" / "sub" / "model.pt", (torch.randn(2, 3, 4),))
    assert (tmp_path / "a_file").read_text() == "kept"


def test_saving_into_a_folder_that_cannot_be_written_is_refused_before_the_export_naming_the_path(
        unwritable_folder):
    """torch's writer failed after the export, naming no file ("open file failed with strerror: Permission
    denied")."""
    path = unwritable_folder / "model.pt"
    with pytest.raises(PermissionError, match=re.escape(f"save_quantized: cannot write '{path}' (")):
        save_quantized(_MeanPool().eval(), None, path, (torch.randn(2, 3, 4),))
    assert not path.exists()


@pytest.mark.parametrize("fp32_format", ["export", "onnx"])
def test_one_tensor_as_example_inputs_is_the_one_input(fp32_format, tmp_path):
    """quantize() takes one tensor for one input; here it was read as a sequence of rows: a batch of 4 failed as four
    inputs, a batch of 1 wrote a file that took unbatched inputs only."""
    model = nn.Sequential(nn.Linear(64, 10)).eval()
    for rows in (1, 4):
        path = tmp_path / f"m{rows}{FP32_SUFFIXES[fp32_format]}"
        save_quantized(model, None, path, torch.randn(rows, 64), fp32_format=fp32_format)
        loaded, _ = load_quantized(path)
        x = torch.randn(5, 64)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_cut_short_or_changed_onnx_file_is_said_to_be_so(tmp_path):
    """A cut ONNX file was "not a model file litcompress wrote ... neither ONNX nor a zip archive"; a byte changed in
    its metadata leaked a bare UnicodeDecodeError."""
    path = tmp_path / "m.onnx"
    save_quantized(nn.Sequential(nn.Linear(8, 4)).eval(), None, path, (torch.randn(2, 8),), fp32_format="onnx")
    data = path.read_bytes()
    at = data.index(b'"litcompress_format"') + 2  # inside the metadata's JSON
    changed = data[:at] + b"\xcf" + data[at + 1:]
    for name, content in (("cut.onnx", data[:-1]), ("changed.onnx", changed)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=r"or one cut short or changed since it was written: it reads neither as "
                                             r"ONNX nor as a zip archive.*save or copy it again"):
            load_quantized(tmp_path / name)


@pytest.mark.parametrize(("backend", "approach"), [("torch_ao", "dynamic"), ("torchao", "weight_only"),
                                                   ("pt2e", "dynamic"), ("onnxruntime", "dynamic"), (None, None)])
def test_a_loaded_file_saves_again_with_the_same_outputs(backend, approach, tmp_path):
    """A loaded torch_ao file lost its forward in the copy made for tracing; a loaded torchao (or fp32 .pt2) program
    was exported again through its wrapper, which torch.export refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(6, 16)
    suffix = {"torch_ao": ".pt", "onnxruntime": ".onnx"}.get(backend, ".pt2")
    first, second = tmp_path / f"first{suffix}", tmp_path / f"again{suffix}"
    if backend is None:
        save_quantized(model, None, first, (x,))
    else:
        config = PTQConfig(approach=approach, backends=(backend,), max_trials=1, latency_repeats=2,
                           accuracy=AccuracyCriterion(tolerable_loss=1.0))
        result = quantize(model, config, eval_fn=lambda m: 1.0, example_inputs=(x,))
        assert result.recipe is not None and result.recipe.backend == backend
        result.save(first)
    loaded, recipe = load_quantized(first)
    save_quantized(loaded, recipe, second, (x,))
    again, recipe_again = load_quantized(second)
    assert recipe_again == recipe
    with torch.no_grad():
        assert torch.equal(again(x[:3]), loaded(x[:3]))


class _TwoBatches(nn.Module):
    """Queries and keys of their own batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.queries, self.keys = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, queries, keys):
        return self.queries(queries), self.keys(keys)


@pytest.mark.parametrize("approach", ["static", "dynamic"])
def test_onnx_files_leave_each_inputs_batch_free_on_its_own(approach, tmp_path):
    """Every input's dim 0 was named "batch": ONNX Runtime took the batches as equal, and the static file failed
    on 4 queries and 2 keys ("Shape mismatch attempting to re-use buffer"), in memory and loaded."""
    import onnx

    torch.manual_seed(0)
    model = _TwoBatches().eval()
    example = (torch.randn(4, 8), torch.randn(6, 8))
    config = PTQConfig(approach=approach, backends=("onnxruntime",), max_trials=1, latency_repeats=2, num_threads=1)
    result = quantize(model, config, eval_fn=lambda m: 0.0, calibration_data=[example] * 2, example_inputs=example)
    path = tmp_path / "two.onnx"
    result.save(path)
    axes = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(path).graph.input]
    assert axes[0][0] != axes[1][0] and all(isinstance(a[0], str) and a[1] == 8 for a in axes)
    loaded, _ = load_quantized(path)
    queries, keys = example[0], example[1][:2]  # within the calibrated ranges
    with torch.no_grad():
        expected = model(queries, keys)
        for quantized in (result.model, loaded):
            got = quantized(queries, keys)
            assert [t.shape for t in got] == [t.shape for t in expected]
            assert all(torch.allclose(g, e, atol=0.1) for g, e in zip(got, expected))


def test_saving_touches_no_file_but_its_own(tmp_path):
    """The temporary file had a fixed name beside the target: a user's `model.partial.pt` was overwritten, then
    deleted. The saved file has the permissions of any new file (not a private temporary file's)."""
    own = tmp_path / "model.partial.pt"
    own.write_bytes(b"the user's")
    save_quantized(nn.Linear(3, 2).eval(), None, tmp_path / "model.pt", (torch.randn(2, 3),))
    assert own.read_bytes() == b"the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.partial.pt", "model.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_long_legal_file_name_is_written(tmp_path):
    """The file is written under a temporary name beside it, 21 characters longer: a legal 244-character name
    failed with an OSError naming that temporary file."""
    path = tmp_path / ("m" * 240 + ".pt2")
    save_quantized(nn.Sequential(nn.Linear(4, 2)).eval(), None, path, (torch.randn(2, 4),))
    assert os.listdir(tmp_path) == [path.name]
    loaded, _ = load_quantized(path)
    assert loaded(torch.randn(3, 4)).shape == (3, 2)


def test_a_legal_name_whose_suffix_is_most_of_it_is_written(tmp_path):
    """The temporary name kept the whole suffix ('.2024_06_01_xxx...', 248 bytes) and overran the limit."""
    path = tmp_path / ("run.2024_06_01_" + "x" * 236)
    save_quantized(nn.Sequential(nn.Linear(4, 2)).eval(), None, path, (torch.randn(2, 4),), fp32_format="torchscript")
    assert os.listdir(tmp_path) == [path.name]


def test_a_torch_export_file_of_any_name_saves_and_loads_without_torchs_complaint(tmp_path, caplog):
    """The README's `result.save("model.int8")`: torch logged "Expect archive file to be a file ending in .pt2" and
    "Unable to load package" (the file loaded all the same)."""
    import logging

    model, x = nn.Sequential(nn.Linear(4, 3)).eval(), torch.randn(2, 4)
    with caplog.at_level(logging.WARNING):
        save_quantized(model, None, tmp_path / "model.int8", x, fp32_format="export")
        loaded, recipe = load_quantized(tmp_path / "model.int8")
    assert recipe is None and torch.allclose(loaded(x), model(x))
    assert not [r for r in caplog.records if ".pt2" in r.getMessage()]


@pytest.mark.parametrize("fp32_format", ["export", "torchscript"])
def test_an_fp32_onnx_file_read_back_is_refused_in_another_format_and_resaves_as_onnx(fp32_format, tmp_path):
    """torch.export failed in torch's words ('dynamic_shapes has 2' for a model of one input) and TorchScript said
    a dim was fixed: both trace torch code, and the model runs an ONNX Runtime session."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 8)
    save_quantized(model, None, tmp_path / "m.onnx", (x,), fp32_format="onnx")
    loaded, recipe = load_quantized(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=re.escape(f"save_quantized(fp32_format={fp32_format!r}): this fp32 model "
                                                   "runs in ONNX Runtime (read from an .onnx file), which only an "
                                                   "ONNX file holds; save it with fp32_format='onnx'.")):
        save_quantized(loaded, recipe, tmp_path / "again.pt2", (x,), fp32_format=fp32_format)
    nested = nn.Sequential(loaded, nn.Softmax(-1))  # inside another: torch's bare error; ONNX wrote none of its ops
    for format_ in (fp32_format, "onnx"):
        with pytest.raises(ValueError, match=r"runs an ONNX Runtime session inside it \(0\), which no file format "
                                             r"holds; save the torch model that file was exported from"):
            save_quantized(nested, recipe, tmp_path / "again.pt2", (x,), fp32_format=format_)
    assert not (tmp_path / "again.pt2").exists()
    save_quantized(loaded, recipe, tmp_path / "again.onnx", (x,), fp32_format="onnx")
    again, _ = load_quantized(tmp_path / "again.onnx")
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=1e-6, rtol=1e-5)
    if fp32_format == "export":  # the pipeline's "auto" picks ONNX alone for it (it noted the other as failed)
        from litcompress.pipeline import CompressionConfig, compress

        result = compress(loaded, CompressionConfig(latency_repeats=2), eval_fn=lambda m: 0.0, example_inputs=(x,),
                          output_dir=tmp_path / "run")
        assert result.artifact.name == "model.onnx"
        assert not any("ValueError" in m for m in result.report.messages), result.report.messages
        # inside another module: shrink's trace is refused by the session (it crashed the process), no file written
        result = compress(nested, CompressionConfig(latency_repeats=2), eval_fn=lambda m: 0.0, example_inputs=(x,),
                          output_dir=tmp_path / "nested")
        assert result.artifact is None
        assert any(m.startswith("shrink skipped") and "runs an ONNX Runtime session on tensors" in m
                   for m in result.report.messages), result.report.messages


def test_save_quantized_refuses_a_recipe_that_is_no_recipe_and_missing_example_inputs(tmp_path):
    """A recipe given as its backend's name failed in the writer ('str' object has no attribute 'to_dict'), and no
    example inputs in the input reader ('NoneType' object is not iterable)."""
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"save_quantized\(recipe='torch_ao'\): give the Recipe the model was built"):
        save_quantized(model, "torch_ao", tmp_path / "model.pt", torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"save_quantized\(example_inputs=None\): give the model's inputs"):
        save_quantized(model, None, tmp_path / "model.pt2", None)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("backend", "approach"), [("torch_ao", "dynamic"), ("torchao", "weight_only"),
                                                   ("pt2e", "dynamic"), ("onnxruntime", "dynamic")])
def test_save_quantized_refuses_a_model_its_recipe_did_not_build(backend, approach, tmp_path):
    """Another backend's recipe, or None, was written into the file beside the model (load_quantized then gave that
    recipe back), or failed inside torch (a missing '__obj_flatten__', '.numpy() is not supported for tensor
    subclasses', a false fixed dim); a torchao model saved as fp32 TorchScript was later read as damaged."""
    from litcompress.quantization.config import Recipe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(6, 16)
    config = PTQConfig(approach=approach, backends=(backend,), max_trials=1, latency_repeats=2,
                       accuracy=AccuracyCriterion(tolerable_loss=1.0))
    result = quantize(model, config, eval_fn=lambda m: 1.0, example_inputs=(x,))
    assert result.recipe is not None and result.recipe.backend == backend
    others = [Recipe(name, "weight_only" if name == "torchao" else "dynamic")
              for name in ("torch_ao", "torchao", "pt2e", "onnxruntime") if name != backend]
    for recipe in others:
        with pytest.raises(ValueError, match=rf"save_quantized\(recipe={recipe.describe()}\): this model was made by "
                                             rf"{backend} \(.*\), not {recipe.backend}: give the Recipe it was built "
                                             "from"):
            save_quantized(result.model, recipe, tmp_path / "model.pt", (x,))
    with pytest.raises(ValueError, match=r"save_quantized\(recipe=None\): this model holds int8 parts of "
                                         rf"{backend}"):
        save_quantized(result.model, None, tmp_path / "model.pt", (x,), fp32_format="torchscript")
    assert not list(tmp_path.iterdir())  # nothing written
    result.save(tmp_path / "model")  # its own recipe
    saved = next(tmp_path.iterdir())
    loaded, recipe = load_quantized(saved)
    assert recipe == result.recipe
    # read back, the same (an int8 ONNX or TorchScript file was written again with no recipe)
    if backend != "torchao":  # (torchao's program read back shows no int8 op: it is saved as it is)
        fp32_format = "onnx" if backend == "onnxruntime" else "torchscript" if backend == "torch_ao" else "export"
        with pytest.raises(ValueError, match=rf"save_quantized\(recipe=None\): this model holds int8 parts of "
                                             rf"{backend}"):
            save_quantized(loaded, None, tmp_path / f"again{saved.suffix}", (x,), fp32_format=fp32_format)
        with pytest.raises(ValueError, match=rf"this model was made by {backend} \(.*\), not {others[0].backend}"):
            save_quantized(loaded, others[0], tmp_path / f"again{saved.suffix}", (x,))
    assert [path.name for path in tmp_path.iterdir()] == [saved.name]


class _OwnLinear(nn.Linear):
    pass


def test_an_fx_program_of_int8_functional_ops_is_not_saved_as_fp32(tmp_path):
    """FX's static convert of Linear subclasses calls torch.ops.quantized.linear itself (no int8 module to see): with
    recipe=None it was written as an fp32 TorchScript file holding int8 (found by a review)."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    config = PTQConfig(approach="static", backends=("torch_ao",), max_trials=1, latency_repeats=2,
                       accuracy=AccuracyCriterion(tolerable_loss=1.0))
    result = quantize(nn.Sequential(_OwnLinear(16, 16), nn.ReLU(), _OwnLinear(16, 4)).eval(), config,
                      eval_fn=lambda m: 1.0, example_inputs=(x,), calibration_data=[(x,)] * 2)
    assert result.recipe is not None
    with pytest.raises(ValueError, match=r"save_quantized\(recipe=None\): this model holds int8 parts of torch_ao "
                                         r"\(the fx program's quantized ops"):
        save_quantized(result.model, None, tmp_path / "model.pt", (x,), fp32_format="torchscript")
    assert not list(tmp_path.iterdir())


def test_torch_ao_dynamic_counts_only_the_layers_quantize_dynamic_swaps(tmp_path):
    """quantize_dynamic swaps nn.Linear, not a subclass of it: a model of such layers came back as a torch_ao int8
    result holding no int8 layer (and a check refusing "an fp32 model under a recipe" then refused to save it)."""
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    config = PTQConfig(approach="dynamic", backends=("torch_ao",), max_trials=1, latency_repeats=2,
                       accuracy=AccuracyCriterion(tolerable_loss=1.0))
    result = quantize(nn.Sequential(_OwnLinear(16, 16), nn.ReLU(), _OwnLinear(16, 4)).eval(), config,
                      eval_fn=lambda m: 1.0, example_inputs=(x,))
    assert result.recipe is None
    assert any("of torch's own classes (not a subclass of them" in message for message in result.messages)
    mixed = quantize(nn.Sequential(_OwnLinear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), config,
                     eval_fn=lambda m: 1.0, example_inputs=(x,))
    assert mixed.recipe is not None and type(mixed.model[0]) is _OwnLinear
    assert type(mixed.model[2]).__module__.startswith("torch.ao.nn.quantized.dynamic")
    mixed.save(tmp_path / "model")
    loaded, recipe = load_quantized(next(tmp_path.iterdir()))
    assert recipe == mixed.recipe
    torch.testing.assert_close(loaded(x), mixed.model(x))


def test_save_quantized_names_its_model_path_and_inputs_of_the_wrong_kind(tmp_path):
    """None for the model failed with "no attribute 'named_modules'", for the path in os.fspath's words; a numpy
    batch was said to hold "no tensor: there is nothing for an int8 model to take" of an fp32 model."""
    import numpy as np

    model = nn.Sequential(nn.Linear(4, 2)).eval()
    with pytest.raises(TypeError, match=r"save_quantized\(model=NoneType\): expected the nn.Module to write"):
        save_quantized(None, None, tmp_path / "model.pt2", torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"save_quantized\(path=None\): expected the file to write"):
        save_quantized(model, None, None, torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"save_quantized\(example_inputs=ndarray\): .*torch\.from_numpy\(array\)"):
        save_quantized(model, None, tmp_path / "model.pt2", np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match=r"example_inputs=\.\.\.\): input 0 is a numpy ndarray; give torch tensors"):
        save_quantized(model, None, tmp_path / "model.pt2", (np.zeros((2, 4), np.float32),))
    assert not list(tmp_path.iterdir())


class _AddsWithFloatFunctional(nn.Module):
    """An fp32 model whose residual add is torch.ao's FloatFunctional (torchvision's quantizable models')."""

    def __init__(self) -> None:
        super().__init__()
        from torch.ao.nn.quantized import FloatFunctional

        self.a, self.b, self.add = nn.Linear(16, 16), nn.Linear(16, 4), FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.add.add(x, torch.relu(self.a(x))))


class MineBackend(TorchAOBackend):
    """A backend registered by its user: torch.ao's, under another name."""

    name = "mine"

    def recipes(self, approach: str) -> list:
        return [dataclasses.replace(recipe, backend="mine") for recipe in super().recipes(approach)]


def test_what_the_recipe_check_must_not_refuse(tmp_path, monkeypatch):
    """FloatFunctional (fp32, in torch.ao's quantized package) was taken for an int8 part of torch_ao: the fp32 model
    and its torchao result were refused, and compress wrote no model file; a backend registered by its user, built
    on torch.ao, searched but could not save."""
    from litcompress.quantization.backends import BACKEND_REGISTRY

    torch.manual_seed(0)
    model, x = _AddsWithFloatFunctional().eval(), torch.randn(4, 16)
    save_quantized(model, None, tmp_path / "fp32.pt2", (x,))
    config = PTQConfig(approach="weight_only", backends=("torchao",), max_trials=1, latency_repeats=2,
                       accuracy=AccuracyCriterion(tolerable_loss=1.0))
    quantize(model, config, eval_fn=lambda m: 1.0, example_inputs=(x,)).save(tmp_path / "torchao")
    monkeypatch.setitem(BACKEND_REGISTRY, "mine", f"{__name__}:MineBackend")
    config = PTQConfig(approach="dynamic", backends=("mine",), max_trials=1, latency_repeats=2,
                       accuracy=AccuracyCriterion(tolerable_loss=1.0))
    mine = quantize(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval(), config,
                    eval_fn=lambda m: 1.0, example_inputs=(x,))
    assert mine.recipe is not None and mine.recipe.backend == "mine"
    mine.save(tmp_path / "mine")
    for path in sorted(tmp_path.iterdir()):
        loaded, recipe = load_quantized(path)
        assert (recipe.backend if recipe is not None else None) in (None, "torchao", "mine")
        assert loaded(x).shape == (4, 4)
