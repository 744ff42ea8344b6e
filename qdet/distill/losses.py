"""Distillation losses, in one registry so any loss works with any feature tap.

Every loss is ``loss(students, teachers)`` on two lists with one tensor per tap (same
order) and returns a scalar; see ``qdet.distill.loss_base``. This module holds the MSE
feature losses and the logit losses, and imports the affinity (FA, FFA) and attention
(RFD) losses so that importing it registers them all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdet.distill import affinity, attention  # noqa: F401  (registers FA, FFA and RFD)
from qdet.distill.loss_base import DISTILL_LOSS_REGISTRY, DistillLoss


class _FeatureMSE(DistillLoss):
    """MSE(f_s, f_t) per tap (mean over elements), summed over taps."""

    def __init__(self, **unknown):
        super().__init__()
        self.reject_unknown(unknown)

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]):
        terms = []
        for i, (s, t) in enumerate(self.pairs(students, teachers)):
            if s.shape != t.shape:
                raise self.shape_error(i, s, t, self._mismatch(s, t))
            terms.append(F.mse_loss(s, t))
        return torch.stack(terms).sum()

    def _mismatch(self, s: torch.Tensor, t: torch.Tensor) -> str:
        if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0]:
            return "MSE needs equal B x C x H x W shapes"
        why = []
        if s.shape[1] != t.shape[1]:
            why.append(self.channels_differ(s, t))
        if s.shape[2:] != t.shape[2:]:
            why.append("spatial sizes differ, MSE needs them equal: use a tap of the same stride")
        return "; ".join(why)


@DISTILL_LOSS_REGISTRY.register()
class QFDLoss(_FeatureMSE):
    """Quantized feature distillation (QFD Eq. 7): MSE(f_s, Q(f_t)), summed over taps.

    Q(f_t) is the teacher's feature through its trained, frozen feature quantizer
    (signed, ``DISTILL.TEACHER_FEATURE_BITS``), applied inside the teacher's backbone.
    The weight lambda of Eq. 8 is ``DISTILL.WEIGHT``. No options.
    """

    name = "qfd"
    quantized_teacher = True


@DISTILL_LOSS_REGISTRY.register()
class FeatureKDLoss(_FeatureMSE):
    """Float feature distillation: MSE(f_s, f_t) with the teacher's FP feature, summed
    over taps. No options."""

    name = "feature_kd"
    takes_connector = True


class _LogitLoss(DistillLoss):
    """Logits: (N, K) for a classifier or (N, R, K) for R anchors per image; the last
    dim is the classes. Per-tap terms are summed."""

    kind = "logits"

    def logit_pairs(self, students, teachers):
        for i, (s, t) in enumerate(self.pairs(students, teachers)):
            if s.shape != t.shape or s.dim() not in (2, 3):
                raise self.shape_error(
                    i, s, t, "logits need equal shapes, (N, K) or (N, R, K) with K classes last"
                )
            yield s, t


@DISTILL_LOSS_REGISTRY.register()
class LogitKDLoss(_LogitLoss):
    """Logit KD (Hinton; SPEC "Logit KD"): ``KL(p_T || p_S) * t^2``, ``p = act(z / t)``.

    ``activation``:
    - "softmax" (default, a classifier): KL over the classes, averaged over all leading
      dims (batchmean).
    - "sigmoid" (RetinaNet's focal-loss logits, one binary classifier per anchor and
      class): the binary KL between sigmoid(z_T / t) and sigmoid(z_S / t), computed from
      log-sigmoids for stability, summed over classes and averaged over anchors and
      images.

    Options: ``temperature`` t (4.0), ``activation``. Taps: summed.
    """

    name = "logit_kd"

    def __init__(self, *, temperature=4.0, activation="softmax", **unknown):
        super().__init__()
        self.reject_unknown(unknown)
        self.check_positive("temperature", temperature)
        self.check_choice("activation", activation, ("softmax", "sigmoid"))
        self.temperature, self.activation = temperature, activation

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]):
        t = self.temperature
        terms = []
        for z_s, z_t in self.logit_pairs(students, teachers):
            z_s, z_t = z_s / t, z_t / t
            if self.activation == "softmax":
                log_p_s, log_p_t = F.log_softmax(z_s, -1), F.log_softmax(z_t, -1)
                kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True)
            else:
                # log(1 - sigmoid(z)) = logsigmoid(-z): no log(0) for confident logits.
                log_p_s, log_q_s = F.logsigmoid(z_s), F.logsigmoid(-z_s)
                log_p_t, log_q_t = F.logsigmoid(z_t), F.logsigmoid(-z_t)
                kl = log_p_t.exp() * (log_p_t - log_p_s) + log_q_t.exp() * (log_q_t - log_q_s)
            terms.append(kl.sum(-1).mean() * t**2)
        return torch.stack(terms).sum()


@DISTILL_LOSS_REGISTRY.register()
class LogitMSELoss(_LogitLoss):
    """FAQD's logit distillation: MSE(z_S, z_T) (mean over elements), summed over taps.
    No options."""

    name = "logit_mse"

    def __init__(self, **unknown):
        super().__init__()
        self.reject_unknown(unknown)

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]):
        return torch.stack(
            [F.mse_loss(s, t) for s, t in self.logit_pairs(students, teachers)]
        ).sum()


@DISTILL_LOSS_REGISTRY.register()
class AKTLogitLoss(_LogitLoss):
    """AKT's official logit term: ``-T^2 * mean_n H(softmax((z_T - z_S) / T))``.

    H is the entropy over the classes, the mean runs over all leading dims, T =
    ``temperature`` (20, hard-coded in AKT's code). Not a KL: it is smallest when the
    teacher-student difference is uniform over the classes. For small differences it
    behaves like ``T^2 KL(p_T || p_S)`` plus the constant ``-T^2 ln C`` (C classes), and
    the gradients agree in direction. Taps: summed.
    """

    name = "akt_logit"

    def __init__(self, *, temperature=20.0, **unknown):
        super().__init__()
        self.reject_unknown(unknown)
        self.check_positive("temperature", temperature)
        self.temperature = temperature

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]):
        t = self.temperature
        terms = []
        for z_s, z_t in self.logit_pairs(students, teachers):
            log_p = F.log_softmax((z_t - z_s) / t, dim=-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            terms.append(-(t**2) * entropy.mean())
        return torch.stack(terms).sum()


def registered_losses() -> dict[str, type[DistillLoss]]:
    """Config name (``DISTILL.LOSS``, a term in ``DISTILL.TERMS``) -> loss class, for every
    class in :data:`DISTILL_LOSS_REGISTRY`, qdet's and any registered later."""
    return {cls.name: cls for _, cls in sorted(DISTILL_LOSS_REGISTRY)}


def build_distill_loss(name: str, **options) -> nn.Module:
    """The loss registered under config name ``name`` (``DISTILL.LOSS``), built with its
    lowercase ``options``; unknown names and options raise ValueError."""
    losses = registered_losses()
    if name not in losses:
        raise ValueError(f"DISTILL.LOSS={name!r} is unknown: choose from {sorted(losses)}")
    return losses[name](**options)
