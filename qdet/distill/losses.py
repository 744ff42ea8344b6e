"""Distillation losses, in one registry so any loss works with any feature tap."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fvcore.common.registry import Registry
from torch import nn

DISTILL_LOSS_REGISTRY = Registry("DISTILL_LOSS")
DISTILL_LOSS_REGISTRY.__doc__ = """Feature distillation losses: ``loss(f_student, f_teacher)``.

A class attribute ``quantized_teacher`` says whether the teacher's feature must come from
its feature quantizer (QFD) or in float (plain feature KD)."""


@DISTILL_LOSS_REGISTRY.register()
class QFDLoss(nn.Module):
    """Quantized feature distillation (QFD Eq. 7): MSE(f_s, Q(f_t)).

    Q(f_t) is the teacher's feature through its trained, frozen feature quantizer
    (signed, ``DISTILL.TEACHER_FEATURE_BITS``), applied inside the teacher's backbone.
    The weight lambda of Eq. 8 is ``DISTILL.WEIGHT``.
    """

    quantized_teacher = True

    def forward(self, f_student: torch.Tensor, f_teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(f_student, f_teacher)


@DISTILL_LOSS_REGISTRY.register()
class FeatureKDLoss(nn.Module):
    """Float feature distillation: MSE(f_s, f_t) with the teacher's FP feature."""

    quantized_teacher = False

    def forward(self, f_student: torch.Tensor, f_teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(f_student, f_teacher)


# Config names -> registered classes.
LOSS_NAMES = {"qfd": "QFDLoss", "feature_kd": "FeatureKDLoss"}


def build_distill_loss(name: str) -> nn.Module:
    """The loss registered under config name ``name`` (``DISTILL.LOSS``)."""
    if name not in LOSS_NAMES:
        raise ValueError(f"DISTILL.LOSS={name!r} is unknown: choose from {sorted(LOSS_NAMES)}")
    return DISTILL_LOSS_REGISTRY.get(LOSS_NAMES[name])()
