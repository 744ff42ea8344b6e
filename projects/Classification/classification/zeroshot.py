"""Zero-shot (data-free) quantization: a conditional generator trained against the frozen FP
teacher makes the student's only training images (AKT Sec. 3.3 on GDFQ / AdaDFQ; SPEC.md
"AKT").

Each training step (:meth:`ZeroShotData.train_step`) draws noise z and classes y, makes
images x = G(z, y), takes one Adam step on the generator's loss, and hands x (detached) to
the student, which learns from the teacher's outputs on x alone (``DISTILL.LABEL_FREE``:
logit KD + RFD in AKT's recipe). Before the student's first step the generator warms up
alone (:class:`ZeroShotHook`). The real training set is never read.

Generator losses (``ZEROSHOT.LOSS``):

- "gdfq": ``CE_WEIGHT * CE(z_T(x), y) + BNS_WEIGHT * L_BNS`` (GDFQ's: CE to the sampled
  class plus the BN-statistics loss, weight 0.1).
- "adadfq" (AKT's official code): ``L_margin + beta * (alpha_ds CE(z_T - z_S, y) +
  alpha_as CE(z_T + z_S, y)) + gamma * L_BNS``, with AdaDFQ's margin on the
  teacher-student disagreement entropy (:func:`adadfq_margin`).

``L_BNS`` (:func:`bn_statistics_loss`): over the teacher's BN layers, the mean of
``MSE(mean_b(input), running_mean) + MSE(var_b(input), running_var)`` (biased batch
variance, as AdaDFQ's code).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from detectron2.engine import HookBase
from detectron2.layers import FrozenBatchNorm2d
from detectron2.utils.events import get_event_storage
from torch import nn

logger = logging.getLogger("qdet")
GENERATOR_LOSSES = ("gdfq", "adadfq")


class ConditionalGenerator(nn.Module):
    """GDFQ's conditional generator (SPEC.md "AKT"): ``z * embed(y)`` -> Linear to 128 x
    (S/4)^2 -> BN -> upsample x2 -> conv 128 -> BN -> LeakyReLU 0.2 -> upsample x2 -> conv 64
    -> BN -> LeakyReLU 0.2 -> conv to ``channels`` -> tanh -> BN without affine. The output
    is in the classifier's normalised input space. The two convs' BNs have eps ``bn_eps``
    (0.8: GDFQ's and AKT's code pass 0.8 as BatchNorm2d's second argument, which is eps)."""

    def __init__(
        self,
        num_classes: int,
        latent_dim: int = 100,
        image_size: int = 32,
        channels: int = 3,
        bn_eps: float = 0.8,
    ):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"ZEROSHOT.IMAGE_SIZE={image_size} must be a multiple of 4")
        self.latent_dim, self.base = latent_dim, image_size // 4
        self.label_embedding = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(latent_dim, 128 * self.base**2)
        self.bn0 = nn.BatchNorm2d(128)
        self.conv1 = nn.Conv2d(128, 128, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(128, eps=bn_eps)
        self.conv2 = nn.Conv2d(128, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64, eps=bn_eps)
        self.to_image = nn.Conv2d(64, channels, 3, padding=1)
        self.out_norm = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.fc(z * self.label_embedding(labels)).view(len(z), 128, self.base, self.base)
        x = F.interpolate(self.bn0(x), scale_factor=2)
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
        x = F.interpolate(x, scale_factor=2)
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        return self.out_norm(torch.tanh(self.to_image(x)))


def bn_statistics_loss(stats: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """GDFQ's BN-statistics loss: the mean over BN layers of ``MSE(mu, running_mean) +
    MSE(var, running_var)``; ``stats`` holds (mu, var, running_mean, running_var) per layer,
    mu and var the batch's per-channel mean and biased variance of the layer's input."""
    return torch.stack(
        [F.mse_loss(mu, rm) + F.mse_loss(var, rv) for mu, var, rm, rv in stats]
    ).mean()


class BNStatistics:
    """Forward pre-hooks on every BN layer of ``model`` (BatchNorm2d, and Detectron2's
    FrozenBatchNorm2d, which keeps running statistics too) that record, while
    ``recording``, the per-channel batch mean and biased variance of the layer's input."""

    def __init__(self, model: nn.Module):
        self.layers = [
            m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))
        ]
        if not self.layers:
            raise ValueError(
                "the teacher has no BatchNorm layers: the BN-statistics loss needs some"
            )
        self.recording, self.stats = False, []
        self._handles = [m.register_forward_pre_hook(self._record) for m in self.layers]

    def _record(self, module, inputs) -> None:
        if self.recording:
            x = inputs[0]
            mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            self.stats.append((mu, var, module.running_mean, module.running_var))

    def loss(self) -> torch.Tensor:
        """:func:`bn_statistics_loss` of what was recorded since the last call."""
        stats, self.stats = self.stats, []
        return bn_statistics_loss(stats)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


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


class ZeroShotData:
    """The generator, its Adam optimizer and its loss against ``teacher`` (and ``student``,
    for AdaDFQ's terms): the student's source of training images. Noise and classes come
    from a generator seeded with ``seed``; ``state_dict`` holds everything a resumed run
    needs (registered with the trainer's checkpointer)."""

    def __init__(self, cfg, teacher: nn.Module, student: nn.Module, seed: int):
        z = cfg.ZEROSHOT
        if z.LOSS not in GENERATOR_LOSSES:
            raise ValueError(f"ZEROSHOT.LOSS={z.LOSS!r} is unknown: choose from {GENERATOR_LOSSES}")
        self.cfg, self.teacher, self.student = z, teacher, student
        self.num_classes = cfg.MODEL.CLASSIFIER.NUM_CLASSES
        device = student.device
        self.generator = ConditionalGenerator(
            self.num_classes, z.LATENT_DIM, z.IMAGE_SIZE, 3, z.BN_EPS
        ).to(device)
        self.optimizer = torch.optim.Adam(
            self.generator.parameters(), lr=z.BASE_LR, betas=tuple(z.BETAS)
        )
        self.bn = BNStatistics(teacher)
        self.noise = torch.Generator().manual_seed(seed)
        self.batch_size = cfg.SOLVER.IMS_PER_BATCH  # one process (ZeroShotTrainer)
        self.pixel_mean = student.pixel_mean
        self.pixel_std = student.pixel_std
        self.warmed_up = False
        self.last_losses: dict[str, float] = {}

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(self.batch_size, self.cfg.LATENT_DIM, generator=self.noise)
        labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=self.noise)
        return z.to(self.pixel_mean.device), labels.to(self.pixel_mean.device)

    def generator_loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """The generator's loss terms on ``images`` (normalised) made for ``labels``."""
        self.bn.recording = True
        try:
            teacher_logits = self.teacher.classify(images)
        finally:
            self.bn.recording = False
        bns = self.bn.loss()
        c = self.cfg
        if c.LOSS == "gdfq":
            return {
                "loss_g_ce": c.CE_WEIGHT * F.cross_entropy(teacher_logits, labels),
                "loss_g_bns": c.BNS_WEIGHT * bns,
            }
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
            "loss_g_bns": a.GAMMA * bns,
        }

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One Adam step of the generator; returns the step's images (detached) and classes."""
        self.generator.train()
        z, labels = self.draw()
        images = self.generator(z, labels)
        losses = self.generator_loss(images, labels)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"the generator's loss is {total.item()} "
                f"({', '.join(f'{k} {v.item():.4g}' for k, v in losses.items())})"
            )
        params = [p for p in self.generator.parameters() if p.requires_grad]
        # Gradients of the generator only: the student's are its own optimizer's business.
        grads = torch.autograd.grad(total, params)
        for p, g in zip(params, grads):
            p.grad = g
        self.optimizer.step()
        self.last_losses = {k: v.item() for k, v in losses.items()}
        return images.detach(), labels

    @torch.no_grad()
    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images of the current generator, no step (calibration, EWGS's Hessian)."""
        z, labels = self.draw()
        return self.generator(z, labels), labels

    def as_inputs(self, images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
        """Detectron2-style inputs whose normalisation by the student gives back ``images``."""
        pixels = images * self.pixel_std + self.pixel_mean
        return [{"image": p, "label": int(y)} for p, y in zip(pixels, labels)]

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "noise": self.noise.get_state(),
            "warmed_up": self.warmed_up,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise.set_state(state["noise"])
        self.warmed_up = bool(state["warmed_up"])


class GeneratedBatches:
    """An endless loader of generated batches: each one trains the generator a step first
    (``train_generator``), or only samples it."""

    def __init__(self, data: ZeroShotData, train_generator: bool):
        self.data, self.train_generator = data, train_generator

    def __iter__(self):
        while True:
            draw = self.data.train_step if self.train_generator else self.data.sample
            yield self.data.as_inputs(*draw())


class ZeroShotHook(HookBase):
    """Warms the generator up alone before the student's first step, logs the generator's
    losses every step, and keeps the student's BN statistics frozen
    (``ZEROSHOT.FREEZE_STUDENT_BN``, as AKT's code, which trains the student in eval mode)."""

    def __init__(self, data: ZeroShotData, warmup_iters: int, freeze_student_bn: bool):
        self.data, self.warmup_iters = data, warmup_iters
        self.freeze_student_bn = freeze_student_bn

    def before_train(self):
        if self.data.warmed_up:
            return
        self.before_step()  # AdaDFQ's terms run the student during the warm-up too
        logger.info("Zero-shot: warming the generator up alone for %d steps", self.warmup_iters)
        for i in range(self.warmup_iters):
            self.data.train_step()
            if (i + 1) % max(self.warmup_iters // 5, 1) == 0:
                losses = ", ".join(f"{k} {v:.4f}" for k, v in self.data.last_losses.items())
                logger.info("Zero-shot warm-up %d/%d: %s", i + 1, self.warmup_iters, losses)
        self.data.warmed_up = True

    def before_step(self):
        if self.freeze_student_bn:
            for m in self.data.student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def after_step(self):
        get_event_storage().put_scalars(**self.data.last_losses)
