"""Distillation: losses (one registry), taps on any layer, and the distiller that runs the
frozen teacher and adds each configured term to the student's losses."""

from qdet.distill.affinity import FastFeatureAffinityLoss, FeatureAffinityLoss
from qdet.distill.attention import RFDLoss
from qdet.distill.distiller import (
    Distiller,
    DistillTerm,
    TermSpec,
    attach_distiller,
    build_distiller,
    load_teacher,
    teacher_config,
    term_specs,
)
from qdet.distill.loss_base import DistillLoss
from qdet.distill.losses import (
    DISTILL_LOSS_REGISTRY,
    AKTLogitLoss,
    FeatureKDLoss,
    LogitKDLoss,
    LogitMSELoss,
    QFDLoss,
    build_distill_loss,
    registered_losses,
)
from qdet.distill.taps import Tap, TapRecorder, expand_taps, resolve_tap

__all__ = [
    "DISTILL_LOSS_REGISTRY",
    "AKTLogitLoss",
    "DistillLoss",
    "DistillTerm",
    "Distiller",
    "FastFeatureAffinityLoss",
    "FeatureAffinityLoss",
    "FeatureKDLoss",
    "LogitKDLoss",
    "LogitMSELoss",
    "QFDLoss",
    "RFDLoss",
    "Tap",
    "TapRecorder",
    "TermSpec",
    "attach_distiller",
    "build_distill_loss",
    "build_distiller",
    "expand_taps",
    "load_teacher",
    "registered_losses",
    "resolve_tap",
    "teacher_config",
    "term_specs",
]
