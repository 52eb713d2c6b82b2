"""Run by tests/callbacks/test_pruning_ddp.py: a process group of two is initialised (as one a DDP fit leaves
behind), then rank 0 alone runs one-device fits with litcompress's callbacks, a GradualPruner(world_size=1) and the
pipeline while rank 1 only waits. No callback may
sync with a peer that is not training: rank 0 would block in a collective (here: fail after the group's 20 s
timeout). Rank 0 writes OUT/done: "ok", or the first fit that failed.

Usage: python beside_process_group_script.py RANK OUT_DIR
"""

import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

if __name__ == "__main__":
    rank, out = int(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    if rank == 0:
        from lightning.pytorch import Trainer

        from litcompress import ModelPruning
        from litcompress.callbacks import QuantizationAwareTraining, UnitPruning
        from litcompress.data import DigitsDataModule
        from litcompress.models import LSTMClassifier, MLPClassifier

        status = "ok"
        try:
            for name, model, callback, data in [
                ("ModelPruning", MLPClassifier(hidden=(8,)),
                 ModelPruning("random_unstructured", amount=0.3, verbose=0), DigitsDataModule()),
                ("UnitPruning", LSTMClassifier(hidden=16), UnitPruning(0.5), DigitsDataModule(flatten=False)),
                ("QuantizationAwareTraining", MLPClassifier(hidden=(8,)), QuantizationAwareTraining("net"),
                 DigitsDataModule()),
            ]:
                status = f"{name} failed"
                Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=3, limit_val_batches=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback]).fit(model, datamodule=data)
                status = "ok"
            # the framework-free pruner told it prunes alone, and the pipeline (which fine-tunes in this process)
            import torch
            from torch import nn

            from litcompress.pipeline import CompressionConfig, PruneConfig, compress
            from litcompress.pruning import GradualPruner, default_targets
            from litcompress.pruning.schedules import PolynomialDecay

            status = "GradualPruner(world_size=1) failed"
            model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
            pruner = GradualPruner(default_targets(model), PolynomialDecay(final_sparsity=0.5, begin=0, end=4,
                                                                           frequency=2), "random_unstructured",
                                   world_size=1)
            for step in range(1, 5):
                pruner.step(step)
            status = "compress with fine-tuning failed"
            x = torch.randn(32, 8)

            def fine_tune(model, step):
                for t in range(1, 5):
                    step(t)

            compress(model, CompressionConfig(prune=PruneConfig(sparsity=0.5), quantize=None, export=False,
                                              latency_repeats=2),
                     eval_fn=lambda m: float(m(x).argmax(1).float().mean()), example_inputs=x[:4],
                     fine_tune=fine_tune, fine_tune_steps=4)
            status = "ok"
        finally:
            (out / "done").write_text(status)  # rank 1 stops waiting either way
    else:
        deadline = time.monotonic() + 240
        while not (out / "done").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
