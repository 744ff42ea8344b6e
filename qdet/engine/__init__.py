"""Training: the QAT optimizer (trainers and hooks come with the distillation trainer)."""

from qdet.engine.optimizer import build_qat_optimizer, build_qat_optimizer_params

__all__ = ["build_qat_optimizer", "build_qat_optimizer_params"]
