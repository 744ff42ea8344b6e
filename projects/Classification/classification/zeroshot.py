"""Zero-shot (data-free) quantization: a conditional generator trained against the frozen FP
teacher makes the student's only training images (AKT Sec. 3.3 on GDFQ / AdaDFQ; SPEC.md
"AKT").

Each training step (:meth:`ZeroShotData.train_step`) draws noise z and classes y, makes
images x = G(z, y), takes one Adam step on the generator's loss, and hands x (detached) to
the student, which learns from the teacher's outputs on x alone (``DISTILL.LABEL_FREE``:
logit KD + RFD in AKT's recipe). Before the student's first step the generator warms up
alone (:class:`ZeroShotHook`). The real training set is never read.

Generator losses (``ZEROSHOT.LOSS``):

- "gdfq": ``TASK_WEIGHT * CE(z_T(x), y) + BNS_WEIGHT * L_BNS`` (GDFQ's: CE to the sampled
  class plus the BN-statistics loss, weight 0.1).
- "adadfq" (AKT's official code): ``L_margin + beta * (alpha_ds CE(z_T - z_S, y) +
  alpha_as CE(z_T + z_S, y)) + gamma * L_BNS``, with AdaDFQ's margin on the
  teacher-student disagreement entropy (:func:`adadfq_margin`).

``L_BNS`` (:func:`qdet.datafree.bn_statistics_loss`): over the teacher's BN layers, the
mean of ``MSE(mean_b(input), running_mean) + MSE(var_b(input), running_var)`` (biased batch
variance, as AdaDFQ's code). The generator, its training step, the loader and the warm-up
hook are qdet's (:mod:`qdet.datafree`), shared with the data-free detector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qdet.datafree import ConditionalGenerator, GeneratorSource

GENERATOR_LOSSES = ("gdfq", "adadfq")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per row, H(softmax(logits))."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def adadfq_margin(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, lower: float, upper: float
) -> torch.Tensor:
    """AdaDFQ's margin: h = H(softmax(z_T - z_S)) per sample, rescaled to h' = (h - min_b h)
    / (ln C - min_b h); the loss ``mean(relu(lower - h')) + mean(relu(h' - upper))`` keeps
    the samples' disagreement between the two boundaries (AdaDFQ's lambda_l, lambda_u)."""
    h = entropy(teacher_logits - student_logits)
    h = (h - h.min()) / (math.log(teacher_logits.shape[1]) - h.min())
    return F.relu(lower - h).mean() + F.relu(h - upper).mean()


class ZeroShotData(GeneratorSource):
    """A classifier's generator (:class:`ConditionalGenerator`): the condition is a class,
    the task term CE to it (or AdaDFQ's terms, which read the student too)."""

    def __init__(self, cfg, teacher: nn.Module, student: nn.Module, seed: int):
        z = cfg.ZEROSHOT
        if z.LOSS not in GENERATOR_LOSSES:
            raise ValueError(f"ZEROSHOT.LOSS={z.LOSS!r} is unknown: choose from {GENERATOR_LOSSES}")
        height, width = z.IMAGE_SIZE
        if height != width:
            raise ValueError(f"ZEROSHOT.IMAGE_SIZE={tuple(z.IMAGE_SIZE)}: crops are square")
        self.num_classes = cfg.MODEL.CLASSIFIER.NUM_CLASSES
        generator = ConditionalGenerator(self.num_classes, z.LATENT_DIM, height, 3, z.BN_EPS)
        bns_weight = z.BNS_WEIGHT if z.LOSS == "gdfq" else z.ADADFQ.GAMMA
        super().__init__(cfg, generator, teacher, student, teacher, seed, bns_weight)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(self.batch_size, self.cfg.LATENT_DIM, generator=self.noise)
        labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=self.noise)
        return z.to(self.pixel_mean.device), labels.to(self.pixel_mean.device)

    def task_losses(self, images: torch.Tensor, labels: torch.Tensor, bn_recorded) -> dict:
        with bn_recorded():
            teacher_logits = self.teacher.classify(images)
        c = self.cfg
        if c.LOSS == "gdfq":
            return {"loss_g_ce": c.TASK_WEIGHT * F.cross_entropy(teacher_logits, labels)}
        a = c.ADADFQ
        with self.student.distiller.paused():  # not the student's training step
            student_logits = self.student.classify(images)
        ce_disagree = F.cross_entropy(teacher_logits - student_logits, labels)
        ce_agree = F.cross_entropy(teacher_logits + student_logits, labels)
        return {
            "loss_g_margin": adadfq_margin(
                teacher_logits, student_logits, a.LAMBDA_LOW, a.LAMBDA_UP
            ),
            "loss_g_ce": a.BETA * (a.ALPHA_DS * ce_disagree + a.ALPHA_AS * ce_agree),
        }

    def as_inputs(self, images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
        """Detectron2-style inputs whose normalisation by the student gives back ``images``."""
        pixels = self.to_pixels(images)
        return [{"image": p, "label": int(y)} for p, y in zip(pixels, labels)]

    def draw_sheet(self, pixels: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        """The crops, enlarged 2x, in the order drawn (their classes in the log)."""
        return list(F.interpolate(pixels, scale_factor=2, mode="nearest"))
