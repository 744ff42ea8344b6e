"""Distillation: losses (one registry) and the distiller that runs the frozen teacher."""

from qdet.distill.distiller import Distiller, build_distiller, load_teacher, teacher_config
from qdet.distill.losses import DISTILL_LOSS_REGISTRY, FeatureKDLoss, QFDLoss, build_distill_loss

__all__ = [
    "DISTILL_LOSS_REGISTRY",
    "Distiller",
    "FeatureKDLoss",
    "QFDLoss",
    "build_distill_loss",
    "build_distiller",
    "load_teacher",
    "teacher_config",
]
