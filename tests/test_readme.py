"""Every Python snippet in README.md runs as printed.

The snippets use names a reader has in their own script (`module`, `dm`, `model`, `x_val`, ...); the preamble below
gives them small real values (an MLP on scikit-learn's digits, a fitted checkpoint, a few-step training loop), and
`Trainer` trains for one epoch quietly. Each snippet runs in its own namespace, in a temporary directory, so the
files it writes ("out", "model.int8") land there.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = [(README.read_text()[:m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(r"```python\n(.*?)```", README.read_text(), re.S)]


def _namespace(tmp_path: Path) -> dict:
    from litcompress import CompressionConfig, ModelPruning
    from litcompress.data import DigitsDataModule, load_digits_tensors
    from litcompress.models import MLPClassifier
    from litcompress.pruning.schedules import PolynomialDecay
    from litcompress.quantization import PTQConfig
    from litcompress.quantization.lightning import QUIET_CPU_TRAINER

    L.seed_everything(0, verbose=False)
    splits = load_digits_tensors(seed=0)
    x, y = splits.train.tensors
    x_val, y_val = splits.val.tensors
    x_test, y_test = splits.test.tensors
    quiet = {**QUIET_CPU_TRAINER, "max_epochs": 1}
    module = MLPClassifier(hidden=(64, 64), lr=1e-2)
    dm = DigitsDataModule(batch_size=64)
    trainer = L.Trainer(**quiet)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)

    def accuracy_on(xs: torch.Tensor, ys: torch.Tensor):
        def evaluate(m: nn.Module) -> float:
            with torch.no_grad():
                return float((m(xs).argmax(1) == ys).float().mean())
        return evaluate

    def my_loop(m: nn.Module, step) -> None:  # the README's fine_tune(model, step) contract
        optimizer = torch.optim.Adam(m.parameters(), lr=1e-3)
        for t, (xb, yb) in enumerate(loader, start=1):
            optimizer.zero_grad()
            nn.functional.cross_entropy(m(xb), yb).backward()
            optimizer.step()
            step(t)

    def train(m: nn.Module) -> None:
        my_loop(m, lambda t: None)

    return {
        "torch": torch, "nn": nn, "L": L, "Trainer": functools.partial(L.Trainer, **quiet),
        "ModelPruning": ModelPruning, "CompressionConfig": CompressionConfig, "PTQConfig": PTQConfig,
        "module": module, "dm": dm, "datamodule": dm, "MyModule": MLPClassifier,
        "model": model, "x": x, "x_val": x_val, "y_val": y_val, "loader": loader, "train_loader": loader,
        "example_inputs": (x_val[:32],), "val_accuracy": accuracy_on(x_val, y_val),
        "test_accuracy": accuracy_on(x_test, y_test), "my_loop": my_loop, "steps": len(loader), "train": train,
        "schedule": PolynomialDecay(final_sparsity=0.5, begin=0, end=10, frequency=2),
        "hidden_layers": [(module.net[0], "weight"), (module.net[2], "weight")],
        "config": PTQConfig(approach="dynamic", max_trials=2),
    }


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# What each snippet must have done, keyed by a line that identifies it.
CHECKS = {
    "result = compress(model, config": lambda ns: (
        [s.stage for s in ns["result"].report.stages][:2] == ["input", "pruned"]
        and Path("out/report.json").exists() and ns["result"].artifact is not None),
    "compressing.result.report": lambda ns: ns["compressing"].result.report.stages[-1].stage != "input",
    'ModelPruning("l1_unstructured", amount=0.5)': lambda ns: any(
        type(c).__name__ == "ModelPruning" for c in ns["trainer"].callbacks),
    "IterativeSchedule(rate_per_round=0.2": lambda ns: abs(ns["IterativeSchedule"](
        rate_per_round=0.2, rounds=5, unit="epoch").target(5) - (1 - 0.8 ** 5)) < 1e-9,
    "ticket = find_lottery_ticket(": lambda ns: len(ns["ticket"].rounds) == 11 and ns["ticket"].remaining < 0.2,
    "result = shrink(model, example_inputs)": lambda ns: _parameters(ns["result"].model) <= _parameters(ns["model"]),
    'size_on_disk = result.save("model.int8")': lambda ns: (
        Path("model.int8").stat().st_size == ns["size_on_disk"] and ns["recipe"] == ns["result"].recipe),
    "result = quantize_checkpoint(": lambda ns: ns["result"].baseline_metric > 0.5,
    'pruner.load_state_dict(saved["pruner"])': lambda ns: (  # the rounds before the save, then the rest
        [h["t"] for h in ns["pruner"].history] == [1, 3, 6, 9, 12]
        and ns["pruner"].pruned() == round(0.8 * 64 * 128)  # the classifier left dense
        and not bool((ns["net"][2].weight == 0).any())),
    "fresh = load_shrunk_state_dict(TextLSTM()": lambda ns: torch.allclose(  # reloaded: the masked model's outputs
        ns["fresh"].eval()(ns["tokens"], ns["lengths"]), ns["model"](ns["tokens"], ns["lengths"]), atol=1e-5),
    "result = sparsify(model, x[:64])": lambda ns: (  # the masked model's outputs; the file written
        len(ns["result"].report.layers) == 3 and Path("model_sparse.pt").exists()
        and torch.allclose(ns["result"].model(ns["x"][:5]), ns["model"](ns["x"][:5]), atol=1e-5)),
    "qat = QuantizationAwareTraining(": lambda ns: (  # an int8 model, measured and written at fit end
        ns["qat"].metric_value > 0.5 and Path("model_qat.pt2").exists() and "forward" not in ns["module"].net.__dict__),
    "qat_model = prepare_qat(model": lambda ns: (  # the untouched model; the int8 one takes any batch size
        Path("model_qat.pt2").exists() and ns["int8"].model(ns["x"][:5]).shape == (5, 10)
        and not torch.equal(ns["qat_model"].model[0].weight, ns["model"][0].weight)),
    "distill = KnowledgeDistillation(": lambda ns: (  # the student pruned, the teacher (the module at fit start) dense
        float((ns["module"].net[0].weight == 0).float().mean()) >= 0.5 - 1e-3
        and not bool((ns["distill"].teacher.net[0].weight == 0).any()) and "training_step" not in ns["module"].__dict__
        and ns["trainer"].callback_metrics["distill_loss"] > 0),
    "distiller = Distiller(model": lambda ns: (  # the teacher a frozen copy; the caller's model left trainable
        ns["distiller"].teacher is not ns["model"] and not ns["distiller"].teacher.training
        and all(p.requires_grad for p in ns["model"].parameters()) and bool(torch.isfinite(ns["loss"]))),
    "rewind_(targets, ticket)": lambda ns: abs(  # three global rounds of 50%, biases untouched
        ns["sparsity_report"](ns["model"], ns["targets"]).sparsity - 0.875) < 1e-3
        and not bool((ns["model"][-1].weight == 0).any()),  # the classifier left whole (with it, it was emptied)
}


def _check_for(code: str):
    keys = [key for key in CHECKS if key in code]
    assert len(keys) == 1, f"give this README snippet one entry in CHECKS (found {keys}):\n{code}"
    return CHECKS[keys[0]]


def test_every_snippet_has_a_check():
    assert len(SNIPPETS) >= 9
    for _, code in SNIPPETS:
        _check_for(code)


@pytest.mark.filterwarnings("ignore::litcompress.quantization.QuantizationGoalWarning")
@pytest.mark.parametrize(("line", "code"), SNIPPETS, ids=[f"line{line}" for line, _ in SNIPPETS])
def test_snippet_runs_and_does_what_it_says(line, code, tmp_path, monkeypatch):
    namespace = _namespace(tmp_path)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code
    assert _check_for(code)(namespace)
