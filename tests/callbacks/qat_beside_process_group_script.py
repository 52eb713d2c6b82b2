"""Run by tests/callbacks/test_qat.py: a process group of two is initialised (as one a DDP fit leaves behind), then
rank 0 alone runs a one-device QAT fit while rank 1 only waits. The callback must not sync with a peer that is not
training: rank 0 would block in an all-reduce (here: fail after the group's 20 s timeout).

Usage: python qat_beside_process_group_script.py RANK OUT_DIR
"""

import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

if __name__ == "__main__":
    rank, out = int(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    if rank == 0:
        from lightning.pytorch import Trainer

        from litcompress.callbacks import QuantizationAwareTraining
        from litcompress.data import DigitsDataModule
        from litcompress.models import MLPClassifier

        qat, status = QuantizationAwareTraining("net"), "failed"
        try:
            Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=1,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[qat]).fit(MLPClassifier(hidden=(8,)), datamodule=DigitsDataModule())
            status = "ok" if qat.result is not None else "no int8 model"
        finally:
            (out / "done").write_text(status)  # rank 1 stops waiting either way
    else:
        deadline = time.monotonic() + 240
        while not (out / "done").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    torch.save({}, out / f"rank{rank}.pt")
