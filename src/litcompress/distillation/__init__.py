"""Knowledge distillation: fine-tune a compressed student against a frozen teacher (the model before compression).

Framework-free; :class:`litcompress.callbacks.KnowledgeDistillation` is the Lightning adapter, and
``compress_lightning(distill=...)`` (the CLI's ``--distill``) distils the pruned model from the input model while it
fine-tunes.
"""

from litcompress.distillation.loss import (
    DISTILLATION_KINDS,
    DistillationConfig,
    Distiller,
    default_outputs,
    distillation_loss,
)

__all__ = ["DISTILLATION_KINDS", "DistillationConfig", "Distiller", "default_outputs", "distillation_loss"]
