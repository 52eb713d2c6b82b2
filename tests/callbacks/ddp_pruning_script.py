"""Run by test_pruning_ddp.py: two-process DDP on CPU with random pruning; each rank saves its masks.

Usage: python ddp_pruning_script.py {litcompress,lightning,heads,units,configured,distill,qat,qat_resume} OUT_DIR
       [ddp|ddp_spawn] [permanent|masked|ticket|save|full|first|resume]
Lightning's `ddp` launcher re-runs this script for rank 1; `ddp_spawn` pickles the callback into two new processes
and loads rank 0's weights back into this process's model.
"""

import os
import sys

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelPruning as LightningModelPruning
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch import nn

from litcompress import ModelPruning
from litcompress.callbacks import HeadPruning, KnowledgeDistillation, QuantizationAwareTraining, UnitPruning


class Model(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 2))

    def on_train_epoch_start(self) -> None:
        # Ranks not seeded alike, as in a user script without `seed_everything`.
        torch.manual_seed(1000 + self.global_rank + 10 * self.current_epoch)


class ConfiguredModel(Model):
    """Builds its layers in `configure_model`, which the Trainer calls after the callbacks' `setup`."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = None

    def configure_model(self) -> None:
        if self.layer is None:
            self.layer = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 2))


class AttentionModel(Model):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.view(-1, 4, 8).repeat(1, 1, 4)  # 4 tokens of 32
        return self.layer(self.attention(tokens, tokens, tokens, need_weights=False)[0].mean(1))


class RecurrentModel(Model):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 32, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.rnn(x.view(-1, 4, 8))[0][:, -1])  # 4 steps of 8


class ValidatedModel(Model):
    """Has batch norm, whose statistics each rank gathers from its own batches, and logs a validation metric."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(RandomDataset(32, 64), batch_size=4)  # batch norm needs more than one row

    def validation_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("val_loss", loss, sync_dist=True)
        return loss


class SaveQAT(Callback):
    """After QAT's fit end (it comes later in the callback list): each rank saves its observers' ranges, its int8
    model's outputs on one fixed batch and the metric it measured."""

    def __init__(self, out: str, qat: QuantizationAwareTraining, prefix: str = "") -> None:
        self.out, self.qat, self.prefix = out, qat, prefix

    def on_fit_end(self, trainer, pl_module) -> None:
        state = {f"fake_quant.{k}": v for k, v in self.qat.qat.fake_quant_state().items()}
        state.update({f"weight.{k}": v.detach().clone() for k, v in pl_module.state_dict().items()})
        with torch.no_grad():
            state["int8_outputs"] = self.qat.result.model(torch.linspace(-2, 2, 4 * 32).view(4, 32))
        if self.qat.metric_value is not None:
            state["metric"] = torch.tensor(self.qat.metric_value)
        torch.save(state, os.path.join(self.out, f"{self.prefix}rank{trainer.global_rank}.pt"))


class SaveMasks(Callback):
    """Each rank saves its pruning state when training ends (before the strategy tears the processes down)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v for k, v in pl_module.state_dict().items() if k.endswith(("_mask", "_orig"))}
        state.update({f"{name}.effective": m.weight.detach().clone() for name, m in pl_module.named_modules()
                      if isinstance(m, nn.Linear)})
        for callback in trainer.callbacks:
            if isinstance(callback, KnowledgeDistillation):
                state.update({f"teacher.{k}": v for k, v in callback.teacher.state_dict().items()})
        torch.save(state, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


class TicketAfterTraining(Callback):
    """Listed after ModelPruning: when training ends, each rank takes the lottery ticket by hand (as the callback's
    end-of-fit message advises, with no broadcast after it) and saves its weights."""

    def __init__(self, out: str, pruning: ModelPruning) -> None:
        self.out, self.pruning = out, pruning

    def on_train_end(self, trainer, pl_module) -> None:
        self.pruning.apply_lottery_ticket_hypothesis()
        torch.save({k: v.clone() for k, v in pl_module.state_dict().items() if k.endswith(("_mask", "_orig"))},
                   os.path.join(self.out, f"ticket_rank{trainer.global_rank}.pt"))


class DestroyProcessGroup(Callback):
    """Shut gloo down on every rank together once training is over.

    Lightning leaves a gloo process group to die with its process; when one rank exits while the other's gloo
    threads still hold the connection, that rank aborts ("terminate called without an active exception"), about one
    run in three here. Runs after the strategy's teardown, when no collective is left."""

    def teardown(self, trainer, pl_module, stage) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def main(impl: str, out: str, strategy: str = "ddp", permanence: str = "masked") -> None:
    if impl == "heads":  # litcompress's HeadPruning, once after the first step
        model = AttentionModel()
        callback = HeadPruning(0.5, make_pruning_permanent=permanence == "permanent")
    elif impl == "distill":  # KnowledgeDistillation from the model as the fit starts (alpha: the permanence slot)
        torch.manual_seed(int(os.environ.get("LOCAL_RANK", 0)))  # repeatable runs; the ranks still differ
        model = Model()
        callback = KnowledgeDistillation(temperature=2.0, alpha=float(permanence) if permanence != "masked" else 0.5)
    elif impl == "qat":  # QuantizationAwareTraining of `layer`, each rank on its own data (seeded otherwise)
        torch.manual_seed(int(os.environ.get("LOCAL_RANK", 0)))
        model = ValidatedModel()
        save_path = os.path.join(out, "model_qat.pt2") if permanence == "save" else None
        qat = QuantizationAwareTraining("layer", metric="val_loss", save_path=save_path)
        trainer = Trainer(
            accelerator="cpu", strategy=strategy, devices=2, max_epochs=2, limit_train_batches=3, limit_val_batches=2,
            # ddp: no validation in the fit, so no forward syncs the batch norms after the last step, and the metric
            # is read on the full validation set; ddp_spawn: validation each epoch, its loaders sharded per rank
            check_val_every_n_epoch=3 if strategy == "ddp" else 1, num_sanity_val_steps=0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[qat, SaveQAT(out, qat), DestroyProcessGroup()],
        )
        trainer.fit(model)
        return
    elif impl == "qat_resume":  # QAT for 4 epochs ("full"), or 2 ("first") then resumed from last.ckpt ("resume")
        from lightning.pytorch.callbacks import ModelCheckpoint

        torch.manual_seed(int(os.environ.get("LOCAL_RANK", 0)))
        model, qat = ValidatedModel(), QuantizationAwareTraining("layer")
        trainer = Trainer(
            accelerator="cpu", strategy=strategy, devices=2, max_epochs=2 if permanence == "first" else 4,
            limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0, logger=False,
            enable_progress_bar=False, enable_model_summary=False,
            callbacks=[qat, ModelCheckpoint(dirpath=out, save_last=True), DestroyProcessGroup()]
            + ([] if permanence == "first" else [SaveQAT(out, qat, prefix=permanence)]),
        )
        trainer.fit(model, ckpt_path=os.path.join(out, "last.ckpt") if permanence == "resume" else None)
        return
    elif impl == "units":  # litcompress's UnitPruning, once after the first step
        model = RecurrentModel()
        callback = UnitPruning(0.5, make_pruning_permanent=permanence == "permanent")
    else:
        cls = LightningModelPruning if impl == "lightning" else ModelPruning
        model = ConfiguredModel() if impl == "configured" else Model()
        callback = cls(
            "random_unstructured",
            amount=0.3,
            make_pruning_permanent=permanence == "permanent",
            use_lottery_ticket_hypothesis=True,
            resample_parameters=True,
        )
    ticket = [TicketAfterTraining(out, callback)] if permanence == "ticket" else []
    trainer = Trainer(
        accelerator="cpu", strategy=strategy, devices=2, max_epochs=3, limit_train_batches=3, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[SaveMasks(out), callback, *ticket, DestroyProcessGroup()],
    )
    trainer.fit(model)
    if strategy == "ddp_spawn":  # this process got rank 0's weights back
        torch.save({f"{name}.effective": m.weight.detach().clone() for name, m in model.named_modules()
                    if isinstance(m, nn.Linear)}, os.path.join(out, "parent.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
