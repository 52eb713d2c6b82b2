"""ModelPruning on a torch.compile'd network: the compiled forward sees every new mask (no stale graph)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from litcompress import ModelPruning
from litcompress.data import DigitsDataModule
from litcompress.models import MLPClassifier
from litcompress.pruning.schedules import PolynomialDecay
from litcompress.quantization.lightning import QUIET_CPU_TRAINER


class CompareCompiledWithEager(L.Callback):
    """After every optimizer step: the compiled network's output and the eager masked one's, and the sparsity."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x, _ = batch
        eager_net = pl_module.net._orig_mod
        with torch.no_grad():
            difference = (pl_module.net(x) - eager_net(x)).abs().max().item()
        weights = [m.weight for m in eager_net if isinstance(m, torch.nn.Linear)]
        sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        self.seen.append((trainer.global_step, sparsity, difference))


@pytest.mark.slow
def test_compiled_forward_follows_every_pruning_round():
    from torch._dynamo.utils import counters

    counters.clear()
    L.seed_everything(0)
    module = MLPClassifier(hidden=(64, 64), lr=1e-2)
    module.net = torch.compile(module.net)  # a Lightning user compiles the network, not the module (self.log)
    pruning = ModelPruning("l1_unstructured", amount=PolynomialDecay(final_sparsity=0.8, begin=0, end=30, frequency=5),
                           parameter_names=["weight"], use_lottery_ticket_hypothesis=False,
                           make_pruning_permanent=False)
    compare = CompareCompiledWithEager()
    L.Trainer(max_epochs=2, callbacks=[pruning, compare], **QUIET_CPU_TRAINER).fit(
        module, datamodule=DigitsDataModule(batch_size=64))
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did compile the network (no silent eager fallback)
    assert len({round(s, 4) for _, s, _ in compare.seen}) >= 6  # the mask changed over several rounds ...
    assert max(d for _, _, d in compare.seen) < 1e-5  # ... and the compiled graph computed with each new one
    assert compare.seen[-1][1] == pytest.approx(0.8, abs=1e-3)
