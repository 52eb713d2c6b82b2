import re

import pytest
from hypothesis import given, strategies as st

from litcompress.quantization import AccuracyCriterion, PTQConfig, Recipe
from litcompress.quantization.config import criterion_for_metric, metric_reads_lower_is_better


def test_unknown_approach_names_argument_and_choices():
    with pytest.raises(ValueError, match=r"approach='qat'.*dynamic.*static.*weight_only"):
        PTQConfig(approach="qat")


def test_unknown_backend_names_it_and_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'tensorrt'.*torch_ao"):
        PTQConfig(backends=("torch_ao", "tensorrt"))


@pytest.mark.parametrize("name", ["torch_ao", "onnxruntime", "pt2e", "torchao"])
def test_the_approach_table_is_what_each_backend_does(name):
    """PTQConfig checks an approach against BACKEND_APPROACHES without importing the backends: it must be theirs."""
    from litcompress.quantization.backends import BACKEND_APPROACHES, get_backend

    assert BACKEND_APPROACHES[name] == tuple(get_backend(name).approaches)


@pytest.mark.parametrize("approach, backends, match", [
    ("dynamic", ("torchao",), r"none of these backends does dynamic quantization \(torchao: weight_only\); add one "
                              r"that does: torch_ao, onnxruntime, pt2e"),
    ("weight_only", ("torch_ao", "onnxruntime"), r"does weight_only quantization .* add one that does: torchao"),
])
def test_backends_that_cannot_do_the_approach_are_refused(approach, backends, match):
    """Accepted, the search built no candidate and returned the fp32 model, after any training before it."""
    with pytest.raises(ValueError, match=match):
        PTQConfig(approach=approach, backends=backends)
    PTQConfig(approach=approach, backends=(*backends, "torchao" if approach == "weight_only" else "pt2e"))


def test_backends_given_as_one_string_become_a_tuple():
    assert PTQConfig(backends="onnxruntime").backends == ("onnxruntime",)


@pytest.mark.parametrize("backends, error, match", [
    (None, TypeError, r"PTQConfig\(backends=None\): give backend names"),
    (3, TypeError, r"PTQConfig\(backends=3\): give backend names"),
    ([["torch_ao"]], TypeError, r"each backend is a name \(str\), got list"),
    (("torch_ao", "onnxruntime", "torch_ao"), ValueError, r"'torch_ao' given more than once"),
])
def test_backends_that_are_not_distinct_names_are_refused(backends, error, match):
    with pytest.raises(error, match=match):
        PTQConfig(backends=backends)


@pytest.mark.parametrize("kwargs, name", [
    ({"max_trials": 0}, "max_trials"),
    ({"timeout_s": -1}, "timeout_s"),
    ({"num_calibration_batches": 0}, "num_calibration_batches"),
    ({"backends": ()}, "backends"),
    ({"accuracy": 0.01}, "accuracy"),
    ({"min_speedup": 0}, "min_speedup"),
    ({"min_speedup": float("inf")}, "min_speedup"),
    ({"min_speedup": True}, "min_speedup"),
    ({"min_speedup": "1.1"}, "min_speedup"),
    # these failed later, or with a bare comparison TypeError: a float thread count in torch.set_num_threads
    ({"num_threads": 1.5}, "num_threads"),
    ({"num_threads": True}, "num_threads"),
    ({"timeout_s": "60"}, "timeout_s"),
    ({"timeout_s": float("nan")}, "timeout_s"),
    ({"num_calibration_batches": "8"}, "num_calibration_batches"),
    ({"num_calibration_batches": 2.5}, "num_calibration_batches"),
    ({"latency_repeats": 0.5}, "latency_repeats"),
    ({"max_trials": True}, "max_trials"),
])
def test_bad_budget_values_name_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=rf"PTQConfig\({name}="):
        PTQConfig(**kwargs)


@pytest.mark.parametrize("loss", [-0.1, float("nan"), float("inf")])
def test_bad_tolerable_loss(loss):
    with pytest.raises(ValueError, match="tolerable_loss"):
        AccuracyCriterion(tolerable_loss=loss)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: AccuracyCriterion(higher_is_better="False"), "AccuracyCriterion(higher_is_better='False'): expected True"),
    (lambda: AccuracyCriterion(relative="no"), "AccuracyCriterion(relative='no'): expected True or False"),
    (lambda: AccuracyCriterion(relative=0), "AccuracyCriterion(relative=0): expected True or False"),
    (lambda: PTQConfig(compile="no"), "PTQConfig(compile='no'): expected True or False"),
])
def test_flags_that_are_not_bools_are_refused(build, message):
    """A string from a YAML file or the environment is truthy: 'False' turned the goal around (the search kept the
    candidates that raise a loss), 'no' compiled."""
    with pytest.raises(TypeError, match=re.escape(message)):
        build()


def test_a_bool_tolerable_loss_is_refused():
    with pytest.raises(ValueError, match="tolerable_loss=True"):
        AccuracyCriterion(tolerable_loss=True)  # was 1.0: any metric met the goal


def test_recipe_round_trips_through_dict():
    recipe = Recipe("torch_ao", "static", per_channel=False, calibration="histogram", fp32_layers=("a.b",),
                    reduce_range=True)
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@given(baseline=st.floats(-1e6, 1e6), tolerance=st.floats(0, 1), relative=st.booleans(),
       higher=st.booleans())
def test_criterion_baseline_always_meets_goal_and_threshold_is_the_boundary(baseline, tolerance, relative, higher):
    criterion = AccuracyCriterion(tolerable_loss=tolerance, relative=relative, higher_is_better=higher)
    assert criterion.is_met(baseline, baseline)
    limit = criterion.threshold(baseline)
    assert criterion.is_met(limit, baseline)
    worse = limit - 1 - abs(limit) * 1e-6 if higher else limit + 1 + abs(limit) * 1e-6
    assert not criterion.is_met(worse, baseline)


def test_relative_criterion_on_lower_is_better_metric():
    criterion = AccuracyCriterion(tolerable_loss=0.1, relative=True, higher_is_better=False)
    assert criterion.threshold(2.0) == pytest.approx(2.2)
    assert criterion.is_met(2.1, 2.0) and not criterion.is_met(2.3, 2.0)


@given(st.sampled_from(["loss", "error", "err", "mse", "mae", "rmse", "nll", "perplexity", "ppl", "wer", "cer"]),
       st.sampled_from(["", "val_", "val/", "train-", "test_"]), st.sampled_from(["", "_epoch", "/step", "_0"]),
       st.booleans())
def test_metric_names_that_read_as_losses_need_a_mode(word, prefix, suffix, upper):
    name = prefix + (word.upper() if upper else word) + suffix
    assert metric_reads_lower_is_better(name)
    with pytest.raises(ValueError, match=f"quantize_lightning\\(metric='{re.escape(name)}'\\).*mode='min'"):
        criterion_for_metric(AccuracyCriterion(), name, None, "quantize_lightning")
    lower = criterion_for_metric(AccuracyCriterion(tolerable_loss=0.1), name, "min", "quantize_lightning")
    assert not lower.higher_is_better and lower.tolerable_loss == 0.1
    assert lower.is_met(1.05, 1.0) and not lower.is_met(1.2, 1.0)  # a loss may rise by 10 %, not by 20 %
    told = AccuracyCriterion(higher_is_better=False)
    assert criterion_for_metric(told, name, None, "quantize_lightning") == told  # already lower-is-better
    assert criterion_for_metric(AccuracyCriterion(), name, "max", "x").higher_is_better  # the user's word


@pytest.mark.parametrize("name", ["valLoss", "validationLoss", "val_MeanSquaredError", "val_MeanAbsoluteError",
                                  "val_CrossEntropy", "val_crossentropy", "MSELoss", "val_KLDivergence",
                                  "test_HammingDistance", "val_bce", "trainLoss_epoch"])
def test_camel_case_and_torchmetrics_class_names_of_losses_read_as_losses(name):
    # they passed as higher-is-better: the search then kept candidates that raised the loss
    assert metric_reads_lower_is_better(name)


@pytest.mark.parametrize("name", ["val_acc", "accuracy", "val_f1", "auroc", "val_iou", "map_50", "psnr", "glossary",
                                  "merit", "cerebral_acc", "val_MulticlassAccuracy", "val_F1Score", "valAcc",
                                  "val_BinaryAUROC", "val_JaccardIndex", "val_PeakSignalNoiseRatio", "val_ssim",
                                  "val_MeanAveragePrecision", "val_R2Score", "val_PearsonCorrCoef", "val_recall"])
def test_other_metric_names_keep_the_default_direction(name):
    assert not metric_reads_lower_is_better(name)
    assert criterion_for_metric(AccuracyCriterion(), name, None, "f").higher_is_better
    assert not criterion_for_metric(AccuracyCriterion(), name, "min", "f").higher_is_better
    with pytest.raises(ValueError, match="mode='lowest'.*'max'.*'min'"):
        criterion_for_metric(AccuracyCriterion(), name, "lowest", "f")


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(backend=3), ValueError, "Recipe(backend=3): expected a backend's name"),
    (dict(backend=""), ValueError, "Recipe(backend=''): expected a backend's name"),
    (dict(backend="onnxruntime", approach="weight_only"), ValueError,
     "Recipe(backend='onnxruntime', approach='weight_only'): onnxruntime does dynamic, static quantization"),
    (dict(per_channel="no"), TypeError, "Recipe(per_channel='no'): expected True or False"),
    (dict(reduce_range="no"), TypeError, "Recipe(reduce_range='no'): expected True or False"),
    (dict(fp32_layers=("fc1", 2)), TypeError, "Recipe(fp32_layers=('fc1', 2)): expected module names (str)"),
])
def test_recipes_refuse_what_no_backend_could_build(kwargs, error, message):
    """All were accepted, to fail (or be read as true) when a backend built the model from them."""
    with pytest.raises(error, match=re.escape(message)):
        Recipe(**{"backend": "torch_ao", "approach": "dynamic", **kwargs})


def test_one_fp32_layer_named_alone_is_one_layer_and_a_generator_is_read_once():
    """`tuple('fc1')` made the layers 'f', 'c' and '1': fc1 was quantized. A generator is read once (checked
    first, it was used up: no fp32 layer)."""
    assert Recipe("torch_ao", "dynamic", fp32_layers="fc1").fp32_layers == ("fc1",)
    assert Recipe("torch_ao", "dynamic", fp32_layers=(n for n in ("fc1", "fc2"))).fp32_layers == ("fc1", "fc2")


def test_a_recipe_of_a_backend_registered_elsewhere_is_a_recipe():
    """Its files load without the backend registered (load_quantized reads the recipe beside them)."""
    recipe = Recipe.from_dict(Recipe("mybackend", "dynamic").to_dict())
    assert recipe.backend == "mybackend"


def test_a_dicts_keys_keep_their_order_as_backends():
    assert PTQConfig(backends={"onnxruntime": 1, "torch_ao": 2}.keys()).backends == ("onnxruntime", "torch_ao")


@pytest.mark.parametrize("backends", [{"torch_ao", "onnxruntime"}, frozenset({"torch_ao"})])
def test_backends_without_an_order_are_refused(backends):
    """They are tried in the order given: a set's changed with the hash seed, and with it which candidates
    max_trials reached."""
    with pytest.raises(TypeError, match="give the names in the order to try them"):
        PTQConfig(backends=backends)
