"""The engine and the Lightning callbacks on a CUDA device: exact sparsity, masks and checkpoints as on the CPU.

Skipped without a GPU (CI has none): run them on a machine with one with ``make test-gpu``. The same tests run on the
CPU with ``LITCOMPRESS_TEST_DEVICE=cpu``, which is how they are checked before they reach a GPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from litcompress.callbacks.pruning import ModelPruning, load_module_from_checkpoint
from litcompress.data import DigitsDataModule
from litcompress.pruning import shrink
from litcompress.pruning.engine import default_targets, effective_tensor, mask_of, prune_, prune_to_sparsity_
from litcompress.pruning.gradual import GradualPruner
from litcompress.pruning.schedules import PolynomialDecay
from tests.conftest import FixedDataModel

DEVICE = os.environ.get("LITCOMPRESS_TEST_DEVICE", "cuda")
ACCELERATOR = "gpu" if DEVICE == "cuda" else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device (make test-gpu on a machine with one)")


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    # TF32 (on by default for convolutions on Ampere and later) would make GPU-vs-reference comparisons tolerance games
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(accelerator=ACCELERATOR, devices=1, default_root_dir=tmp_path, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    deterministic=True)
    return Trainer(**{**defaults, **kwargs})


def weight_targets(model):
    return [(m, "weight") for m in model.layer]


class SimulatedCrash(RuntimeError):
    pass


class CrashAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SimulatedCrash


class RecordDevices(Callback):
    """The devices of the module's masks while it trains (Lightning moves the module back to the CPU after a fit)."""

    def __init__(self) -> None:
        self.devices: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.devices |= {buffer.device.type for name, buffer in pl_module.named_buffers() if name.endswith("_mask")}


@pytest.mark.parametrize("make_pruning_permanent", [True, False])
def test_a_fit_killed_mid_schedule_on_the_device_resumes_to_the_masks_of_an_uninterrupted_one(
        tmp_path, make_pruning_permanent):
    def run(model, callbacks, ckpt_path=None):
        callback = ModelPruning("l1_unstructured", parameters_to_prune=weight_targets(model),
                                amount=PolynomialDecay(final_sparsity=0.85, begin=2, end=14, frequency=3),
                                use_lottery_ticket_hypothesis=False, make_pruning_permanent=make_pruning_permanent)
        trainer(tmp_path, max_epochs=5, enable_checkpointing=True, callbacks=[callback, *callbacks]).fit(
            model, ckpt_path=ckpt_path)
        return model

    seed_everything(1)
    devices = RecordDevices()
    reference = run(FixedDataModel(), [devices, ModelCheckpoint(dirpath=tmp_path / "ref")])
    assert devices.devices == {DEVICE}  # the masks lived on the device while it trained

    seed_everything(1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "killed", save_last=True, every_n_epochs=1)
    with pytest.raises(SimulatedCrash):
        run(FixedDataModel(), [ckpt, CrashAtStep(10)])  # mid-epoch 2, mid-schedule
    resumed = run(FixedDataModel(), [], ckpt_path=ckpt.last_model_path)
    for (a, name), (b, _) in zip(weight_targets(reference), weight_targets(resumed)):
        assert torch.equal(getattr(a, name), getattr(b, name))
    zeros = sum(int((m.weight == 0).sum()) for m, _ in weight_targets(resumed))
    assert zeros == round(0.85 * sum(m.weight.numel() for m, _ in weight_targets(resumed)))

    # the checkpoint a device fit wrote loads on a CPU-only host into a fresh module that computes the same outputs
    loaded = load_module_from_checkpoint(FixedDataModel, ckpt.last_model_path, keep_masks=True)
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    x = torch.randn(8, 32)
    state = torch.load(ckpt.last_model_path, map_location="cpu", weights_only=False)["state_dict"]
    assert {k for k in state if k.endswith("_mask")} == ({"layer.mlp_1.weight_mask", "layer.mlp_2.weight_mask",
                                                          "layer.mlp_3.weight_mask"}
                                                         if not make_pruning_permanent else set())
    assert torch.isfinite(loaded(x)).all()


def test_the_global_threshold_on_the_device_picks_the_cpu_masks_ties_included():
    """Global magnitude pruning computes its threshold where the weights are; the masks match the CPU's entry for
    entry, with ties (many equal magnitudes) and in half precision, and the count is exact."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(300, 784), (100, 300), (10, 100), (64, 3, 3, 3)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # quantized to 1/16: thousands of equal magnitudes straddle every threshold
        layers = [torch.round(torch.randn(s, generator=generator) * 16) / 16 for s in shapes]

        def masks_on(device):
            modules = [nn.Module() for _ in layers]
            for module, weight in zip(modules, layers):
                module.weight = nn.Parameter(weight.to(device=device, dtype=dtype))
            targets = [(m, "weight") for m in modules]
            pruned = [prune_to_sparsity_(targets, "l1_unstructured", s) for s in (0.5, 0.9, 0.97)]
            assert all(mask_of(m, "weight").device.type == torch.device(device).type for m in modules)
            return [mask_of(m, "weight").cpu() for m in modules], pruned

        on_cpu, pruned_cpu = masks_on("cpu")
        # under `Trainer(deterministic=True)` (torch.use_deterministic_algorithms), which refuses some CUDA kernels
        # (kthvalue, histc, ...) outright: the threshold must not need them
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            on_device, pruned_device = masks_on(DEVICE)
        finally:
            torch.use_deterministic_algorithms(deterministic)
        total = sum(w.numel() for w in layers)
        assert pruned_cpu == pruned_device and sum(pruned_device) == round(0.97 * total)
        assert all(torch.equal(a, b) for a, b in zip(on_cpu, on_device)), dtype


def test_a_gradual_pruner_in_a_plain_half_precision_device_loop_hits_its_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(DEVICE, torch.bfloat16)
    pruner = GradualPruner(default_targets(model), PolynomialDecay(final_sparsity=0.9, begin=0, end=20, frequency=5),
                           scope="local")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 64, device=DEVICE, dtype=torch.bfloat16)
    for step in range(1, 26):
        optimizer.zero_grad()
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        pruner.step(step)
    weights = [effective_tensor(m, "weight") for m, _ in default_targets(model)]
    assert all(w.device.type == DEVICE and w.dtype == torch.bfloat16 for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.9 * sum(w.numel() for w in weights))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x))


def test_structured_pruning_then_shrink_on_the_device_keeps_outputs_and_device():
    torch.manual_seed(0)
    model = ConvNet().to(DEVICE).eval()
    for module in model.modules():  # non-trivial statistics, so a wrong channel would show in the outputs
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    targets = [(model.features[0], "weight"), (model.features[3], "weight")]
    prune_(targets, "ln_structured", 0.5, scope="local", n=1, dim=0)
    x = torch.randn(4, 3, 16, 16, device=DEVICE)
    with torch.no_grad():
        masked = model(x)
        result = shrink(model, x)
        shrunk = result.model.eval()
        assert all(t.device.type == DEVICE for t in shrunk.state_dict().values())
        torch.testing.assert_close(shrunk(x), masked, rtol=1e-5, atol=1e-5)
    # a pruned channel whose batch norm turns its zeros into a positive constant stays (zero padding of the next
    # convolution makes it non-constant at the borders); the others go
    conv, bn = model.features[0], model.features[1]
    pruned = mask_of(conv, "weight").flatten(1).sum(1) == 0  # such a channel computes its conv bias everywhere
    constant = torch.relu((conv.bias - bn.running_mean) * bn.weight / torch.sqrt(bn.running_var + bn.eps) + bn.bias)
    assert shrunk.features[0].out_channels == 16 + int((pruned & (constant > 0)).sum()) < 32
    assert shrunk.features[3].out_channels < 64
    assert all(t.device.type == DEVICE for t in model.state_dict().values())  # the user's model stays as it was


def test_a_lottery_ticket_found_on_the_device_is_rewound_and_exactly_as_sparse():
    from litcompress.callbacks.lottery import find_lottery_ticket
    from tests.pruning.test_imp import DigitsClassifier

    seed_everything(0)
    module = DigitsClassifier()
    ticket = find_lottery_ticket(module, DigitsDataModule(batch_size=128), metric="test_acc", rounds=2, rate=0.6,
                                 trainer_kwargs=dict(max_epochs=3, accelerator=ACCELERATOR, devices=1),
                                 rewind_to_step=3)
    assert ticket.remaining == pytest.approx(((4096 - 2458) - round(0.6 * 1638) + (640 - 384) - round(0.6 * 256))
                                             / 4736)
    assert all(0.5 < r.metric <= 1.0 for r in ticket.rounds)
    assert not torch.equal(ticket.rewound_state["net.0.weight_orig"].cpu(), module.net[0].weight.cpu())


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true"])
def test_pruning_under_the_device_precisions_hits_its_sparsity(tmp_path, precision):
    if DEVICE == "cpu" and precision == "16-mixed":
        pytest.skip("float16 autocast is a GPU precision")
    seed_everything(0)
    model = FixedDataModel()
    # epoch rounds, each rewinding the survivors to their initial values (the lottery ticket's reset)
    callback = ModelPruning("l1_unstructured", parameters_to_prune=weight_targets(model),
                            amount=PolynomialDecay(final_sparsity=0.8, begin=0, end=2, frequency=1, unit="epoch"),
                            use_lottery_ticket_hypothesis=True, make_pruning_permanent=False)
    trainer(tmp_path, max_epochs=3, precision=precision, callbacks=[callback]).fit(model)
    weights = [m.weight for m, _ in weight_targets(model)]
    assert all(torch.isfinite(w).all() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * sum(w.numel() for w in weights))


def trained_on_the_device(root) -> tuple:
    """A digits MLP that logs val_acc, fitted for 2 epochs by a device Trainer (which leaves it on the CPU)."""
    from tests.pruning.test_imp import DigitsClassifier

    class Validated(DigitsClassifier):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    seed_everything(0)
    module, datamodule = Validated(), DigitsDataModule(batch_size=128)
    trainer(root, max_epochs=2).fit(module, datamodule=datamodule)
    return module, datamodule


def test_quantizing_a_device_model_refuses_it_and_the_lightning_entry_point_takes_a_cpu_copy():
    from litcompress.quantization import PTQConfig, quantize
    from litcompress.quantization.lightning import quantize_lightning

    module, datamodule = trained_on_the_device(None)
    module.to(DEVICE)
    before = copy.deepcopy(module.state_dict())
    if DEVICE != "cpu":
        with pytest.raises(ValueError, match="Pass a CPU copy"):
            quantize(module.net, PTQConfig(approach="dynamic", backends=("torch_ao",)), eval_fn=lambda model: 1.0,
                     example_inputs=(torch.randn(2, 64, device=DEVICE),))
    result = quantize_lightning(module, PTQConfig(approach="dynamic", backends=("torch_ao",)), metric="val_acc",
                                datamodule=datamodule)
    assert result.metric is not None and result.metric > 0.5
    assert all(v.device.type == DEVICE for v in module.state_dict().values())
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_compress_lightning_fine_tunes_and_distils_on_the_device_then_quantizes_on_the_cpu(tmp_path):
    from litcompress.distillation import DistillationConfig
    from litcompress.pipeline import CompressionConfig, PruneConfig
    from litcompress.pipeline.lightning import compress_lightning
    from litcompress.quantization import PTQConfig

    module, datamodule = trained_on_the_device(tmp_path)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.7, method="l1_unstructured"),
                               quantize=PTQConfig(approach="dynamic", backends=("torch_ao",)))
    result = compress_lightning(module, config, datamodule=datamodule, metric="val_acc", fine_tune_epochs=2,
                                trainer_kwargs=dict(accelerator=ACCELERATOR, devices=1),
                                distill=DistillationConfig(temperature=2.0, alpha=0.5))
    stages = {stage.stage: stage for stage in result.report.stages}
    assert all(stage.metric is not None and stage.metric > 0.5 for stage in stages.values())
    assert abs(stages["pruned"].weight_sparsity - 0.7) < 1e-3  # rounds run on the device hit the target
    assert all(t.device.type == "cpu" for t in module.state_dict().values())  # where its fit left it


def test_a_sparse_layer_on_the_device_loads_a_cpu_state_dict_onto_the_device():
    """It kept the loaded weight on the CPU (nn.Linear's copy_ keeps its device), so its next call mixed devices."""
    from litcompress.pruning import SparseLinear

    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    with torch.no_grad():
        dense.weight[torch.rand(8, 16) < 0.9] = 0
    layer = SparseLinear.from_dense(nn.Linear(16, 8)).to(DEVICE)
    layer.load_state_dict(dense.state_dict())  # a CPU file, as torch.load gives it by default
    assert layer.weight.device.type == layer.bias.device.type == torch.device(DEVICE).type
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x.to(DEVICE)).cpu(), dense(x), rtol=1e-5, atol=1e-5)
