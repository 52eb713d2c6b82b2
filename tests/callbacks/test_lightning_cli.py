"""The callbacks configured the way LightningCLI users configure them: from YAML, schedules included, and the
config LightningCLI saves runs again."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from tests.conftest import FixedDataModel

pytest.importorskip("jsonargparse")
from lightning.pytorch.cli import LightningCLI  # noqa: E402  (needs jsonargparse)


class CliModel(FixedDataModel):
    """A LightningCLI model (its constructor takes no arguments LightningCLI would have to fill)."""


def _weight_sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _fit(config_path) -> LightningCLI:
    return LightningCLI(CliModel, args=["fit", "--config", str(config_path)],
                        save_config_kwargs={"overwrite": True, "config_filename": "saved.yaml"})


def _config(tmp_path, callback: dict) -> dict:
    return {"trainer": {"max_epochs": 2, "limit_train_batches": 4, "limit_val_batches": 1, "logger": False,
                        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                        "default_root_dir": str(tmp_path), "accelerator": "cpu", "callbacks": [callback]}}


@pytest.mark.parametrize("amount", [
    0.5,
    {"class_path": "litcompress.pruning.schedules.PolynomialDecay",
     "init_args": {"final_sparsity": 0.8, "begin": 0, "end": 6, "frequency": 2}},
])
def test_model_pruning_from_yaml_and_from_the_config_lightning_cli_saved(amount, tmp_path):
    """Before, a schedule given as `amount` did not validate against the constructor's type hints, and the config
    LightningCLI saved named `pruning_fn: Unable to serialize instance l1_unstructured` (Lightning's callback still
    does), which fails when run again."""
    callback = {"class_path": "litcompress.ModelPruning",
                "init_args": {"pruning_fn": "l1_unstructured", "amount": amount, "parameter_names": ["weight"],
                              "use_lottery_ticket_hypothesis": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, callback)))
    first = _fit(path)
    expected = 0.75 if amount == 0.5 else 0.8  # two rounds of 50% of what remains, or the schedule's target
    assert _weight_sparsity(first.model) == pytest.approx(expected, abs=1e-3)

    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    [saved_callback] = saved["trainer"]["callbacks"]
    assert saved_callback["init_args"]["pruning_fn"] == "l1_unstructured"
    again = _fit(tmp_path / "saved.yaml")
    assert _weight_sparsity(again.model) == pytest.approx(expected, abs=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                  again.model.state_dict().values()))


def test_head_pruning_compress_and_quantize_on_fit_end_from_yaml(tmp_path):
    from litcompress.callbacks import CompressOnFitEnd, HeadPruning, QuantizeOnFitEnd

    callback = {"class_path": "litcompress.callbacks.HeadPruning",
                "init_args": {"heads": {"class_path": "litcompress.pruning.schedules.PolynomialDecay",
                                        "init_args": {"final_sparsity": 0.5, "begin": 0, "end": 4}}}}
    config = _config(tmp_path, callback)
    config["trainer"]["callbacks"].append(
        {"class_path": "litcompress.callbacks.CompressOnFitEnd",
         "init_args": {"output_dir": str(tmp_path / "out"), "metric": "val_acc",
                       "config": {"prune": {"sparsity": 0.5, "method": "ln_structured"},
                                  "quantize": {"approach": "dynamic", "backends": ["onnxruntime"]}}}})
    config["trainer"]["callbacks"].append(
        {"class_path": "litcompress.callbacks.QuantizeOnFitEnd",
         "init_args": {"metric": "val_acc", "config": {"approach": "static",
                                                       "accuracy": {"tolerable_loss": 0.02, "relative": False}}}})
    parsed = LightningCLI(CliModel, args=["--config", yaml.safe_dump(config)], run=False)
    [head_pruning] = [c for c in parsed.trainer.callbacks if isinstance(c, HeadPruning)]
    assert head_pruning.heads.final_sparsity == 0.5 and head_pruning.heads.end == 4
    [compress] = [c for c in parsed.trainer.callbacks if isinstance(c, CompressOnFitEnd)]
    assert compress.config.prune.sparsity == 0.5 and compress.config.prune.method == "ln_structured"
    assert compress.config.quantize.backends == ("onnxruntime",)
    [quantize] = [c for c in parsed.trainer.callbacks if isinstance(c, QuantizeOnFitEnd)]
    assert quantize.config.approach == "static" and quantize.config.accuracy.tolerable_loss == 0.02
    assert quantize.config.accuracy.relative is False


def test_unit_pruning_from_yaml_parses_with_its_schedule():
    from litcompress.callbacks import UnitPruning

    config = {"trainer": {"logger": False, "enable_checkpointing": False, "accelerator": "cpu", "callbacks": [
        {"class_path": "litcompress.callbacks.UnitPruning",
         "init_args": {"units": {"class_path": "litcompress.pruning.schedules.PolynomialDecay",
                                 "init_args": {"final_sparsity": 0.5, "begin": 0, "end": 40, "frequency": 10}},
                       "exclude": ["encoder"]}}]}}
    parsed = LightningCLI(CliModel, args=["--config", yaml.safe_dump(config)], run=False)
    [unit_pruning] = [c for c in parsed.trainer.callbacks if isinstance(c, UnitPruning)]
    assert unit_pruning.units.final_sparsity == 0.5 and unit_pruning.units.frequency == 10
    assert unit_pruning.exclude == ("encoder",)


class HalfL1(torch.nn.utils.prune.L1Unstructured):
    """A BasePruningMethod of the user's, named in YAML by its import path."""

    def __init__(self, amount: float) -> None:
        super().__init__(amount)


@pytest.mark.parametrize("norm", [float("inf"), "fro", 1.5])
def test_structured_pruning_norms_and_a_users_method_class_parse_from_yaml(norm):
    """`pruning_norm` was typed int (LightningCLI refused inf, 'fro', 1.5, which the constructor takes), and a
    method class given by import path stayed a string the constructor did not know ("isn't available in PyTorch's
    built-in functions"); PruneConfig.method likewise."""
    from litcompress import ModelPruning
    from litcompress.callbacks import CompressOnFitEnd

    config = {"trainer": {"logger": False, "enable_checkpointing": False, "accelerator": "cpu", "callbacks": [
        {"class_path": "litcompress.ModelPruning",
         "init_args": {"pruning_fn": "ln_structured", "pruning_dim": 0, "pruning_norm": norm,
                       "use_global_unstructured": False, "parameter_names": ["weight"], "amount": 0.25}},
        {"class_path": "litcompress.ModelPruning",
         "init_args": {"pruning_fn": f"{__name__}.HalfL1", "parameter_names": ["weight"], "amount": 0.5}},
        {"class_path": "litcompress.callbacks.CompressOnFitEnd",
         "init_args": {"output_dir": "out", "config": {"prune": {"sparsity": 0.5, "method": f"{__name__}.HalfL1"}}}},
    ]}}
    parsed = LightningCLI(CliModel, args=["--config", yaml.safe_dump(config)], run=False)
    structured, custom = [c for c in parsed.trainer.callbacks if isinstance(c, ModelPruning)]
    assert structured._method_kwargs == {"n": norm, "dim": 0}
    assert custom._pruning_method_name == "HalfL1"
    [compress] = [c for c in parsed.trainer.callbacks if isinstance(c, CompressOnFitEnd)]
    assert compress.config.prune.method is HalfL1


@pytest.mark.parametrize(("path", "said"), [
    ("tests_missing_module.MyMethod", "is an import path, and importing it failed: ModuleNotFoundError: No module "
                                      "named 'tests_missing_module'"),
    (f"{__name__}.HalfL2", f"is an import path, and importing it failed: AttributeError: module '{__name__}' has no "
                           "attribute 'HalfL2'"),
    ("torch.nn.Linear", "is <class 'torch.nn.modules.linear.Linear'>, not a `torch.nn.utils.prune.BasePruningMethod`"
                        " subclass"),
])
def test_a_method_import_path_that_does_not_import_is_refused_with_why(path, said):
    """LightningCLI passes a path it cannot import on as a string: it was refused as a misspelt built-in name,
    lowercased, the import's error lost."""
    config = {"trainer": {"logger": False, "enable_checkpointing": False, "accelerator": "cpu", "callbacks": [
        {"class_path": "litcompress.ModelPruning", "init_args": {"pruning_fn": path, "amount": 0.5}}]}}
    with pytest.raises(Exception) as refused:  # (jsonargparse's error holds the constructor's)
        LightningCLI(CliModel, args=["--config", yaml.safe_dump(config)], run=False)
    assert f"The provided `pruning_fn` {path!r} {said}" in str(refused.value)


def test_method_import_paths_are_taken_by_the_python_api_too(tmp_path, monkeypatch):
    from litcompress import ModelPruning, PruneConfig
    from litcompress.pruning import prune_

    assert ModelPruning(f"{__name__}.HalfL1", amount=0.5)._method is HalfL1
    assert PruneConfig(sparsity=0.5, method=f"{__name__}.HalfL1").method is HalfL1  # not lowercased
    layer = nn.Linear(4, 4)
    prune_([(layer, "weight")], f"{__name__}.HalfL1", 0.5)
    assert int((layer.weight == 0).sum()) == 8
    with pytest.raises(ValueError, match=r"'no_such_module.M' is an import path, and importing it failed"):
        PruneConfig(sparsity=0.5, method="no_such_module.M")
    (tmp_path / "broken_methods_module.py").write_text("x = = 1\n")  # its own error, said as the others
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"importing it failed: SyntaxError: invalid syntax"):
        PruneConfig(sparsity=0.5, method="broken_methods_module.M")


def first_output(outputs):  # no return annotation, as most users write it
    return outputs[0]


def test_a_plain_function_picks_the_distilled_outputs_from_yaml():
    """`outputs_fn` was typed to return a Tensor: jsonargparse refused any function not annotated `-> Tensor`
    ("Expected ... to be a function that returns <class 'Tensor'>"), which Python accepted."""
    from litcompress.callbacks import KnowledgeDistillation

    config = {"trainer": {"logger": False, "enable_checkpointing": False, "accelerator": "cpu", "callbacks": [
        {"class_path": "litcompress.callbacks.KnowledgeDistillation",
         "init_args": {"outputs_fn": f"{__name__}.first_output", "temperature": 2.0}}]}}
    parsed = LightningCLI(CliModel, args=["--config", yaml.safe_dump(config)], run=False)
    [distillation] = [c for c in parsed.trainer.callbacks if isinstance(c, KnowledgeDistillation)]
    assert distillation.outputs_fn is first_output and distillation.config.temperature == 2.0
