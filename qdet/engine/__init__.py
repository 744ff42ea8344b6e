"""Training: the QAT/distillation trainer, its hooks, optimizer and checkpointer."""

from qdet.engine.checkpoint import AtomicCheckpointer
from qdet.engine.hooks import (
    CalibrationHook,
    EWGSDeltaHook,
    epoch_iterations,
    sync_quantizers_from_main,
)
from qdet.engine.optimizer import build_qat_optimizer, build_qat_optimizer_params
from qdet.engine.trainer import QDetTrainer, has_compiled_ops

__all__ = [
    "AtomicCheckpointer",
    "CalibrationHook",
    "EWGSDeltaHook",
    "QDetTrainer",
    "build_qat_optimizer",
    "build_qat_optimizer_params",
    "epoch_iterations",
    "has_compiled_ops",
    "sync_quantizers_from_main",
]
