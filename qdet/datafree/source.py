"""A generator as the student's source of training images: the generator, its Adam, the
noise, one training step against the frozen teacher, the loader the trainer reads, and the
hook that warms it up alone first (AKT Sec. 3.3 on GDFQ / AdaDFQ)."""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torchvision
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from qdet.datafree.bn_statistics import BNStatistics

logger = logging.getLogger("qdet")


class GeneratorSource:
    """The generator, its Adam optimizer and its loss against the frozen teacher: the
    student's source of training images. Subclasses say what a condition is and what the
    task term is: :meth:`draw` (noise and conditions), :meth:`task_losses` (terms beside the
    BN statistics), :meth:`as_inputs` (Detectron2 inputs for the student) and
    :meth:`draw_sheet` (a picture of some images).

    ``bn_root``: the teacher's part whose BN layers give ``L_BNS`` (recorded inside
    :meth:`bn_recorded`), weighted by ``bns_weight`` (default ``ZEROSHOT.BNS_WEIGHT``; 0:
    not computed). Noise and conditions come from a generator seeded with
    ``seed``; ``state_dict`` holds everything a resumed run needs (registered with the
    trainer's checkpointer)."""

    def __init__(self, cfg, generator: nn.Module, teacher: nn.Module, student: nn.Module,
                 bn_root: nn.Module, seed: int, bns_weight: float | None = None):  # fmt: skip
        z = cfg.ZEROSHOT
        self.bns_weight = z.BNS_WEIGHT if bns_weight is None else bns_weight
        self.cfg, self.teacher, self.student = z, teacher, student
        self.generator = generator.to(student.device)
        self.optimizer = torch.optim.Adam(
            self.generator.parameters(), lr=z.BASE_LR, betas=tuple(z.BETAS)
        )
        self.bn = None
        if self.bns_weight > 0:
            self.bn = BNStatistics(bn_root, "the teacher", normalize=z.BNS_NORMALIZE)
            logger.info(
                "Zero-shot: BN statistics of %d teacher layers%s", len(self.bn.layers),
                f" ({self.bn.skipped} with initial statistics left out)" if self.bn.skipped else "",
            )  # fmt: skip
        self.noise = torch.Generator().manual_seed(seed)
        self.batch_size = cfg.SOLVER.IMS_PER_BATCH  # one process (ZeroShotTrainerMixin)
        self.pixel_mean, self.pixel_std = student.pixel_mean, student.pixel_std
        self.warmed_up = False
        self.last_losses: dict[str, float] = {}

    # --- what a task defines ---
    def draw(self) -> tuple[torch.Tensor, object]:
        """Noise and conditions of one batch, from ``self.noise``."""
        raise NotImplementedError

    def generate(self, noise: torch.Tensor, conditions) -> torch.Tensor:
        """Normalised images of the generator for ``conditions``."""
        return self.generator(noise, conditions)

    def task_losses(self, images: torch.Tensor, conditions, bn_recorded) -> dict:
        """The generator's loss terms other than ``L_BNS``; ``bn_recorded`` is a context
        inside which the teacher part whose BN statistics count runs."""
        raise NotImplementedError

    def as_inputs(self, images: torch.Tensor, conditions) -> list[dict]:
        raise NotImplementedError

    def draw_sheet(self, pixels: torch.Tensor, conditions) -> list[torch.Tensor]:
        """uint8 RGB pictures (3 x H x W) of the images, with what they were made for."""
        return list(pixels)

    # --- shared ---
    @contextlib.contextmanager
    def bn_recorded(self):
        """Inside, the BN hooks record (nothing when L_BNS is off)."""
        if self.bn is None:
            yield
            return
        self.bn.recording = True
        try:
            yield
        finally:
            self.bn.recording = False

    def generator_loss(self, images: torch.Tensor, conditions) -> dict:
        """Every loss term of the generator on ``images`` made for ``conditions``:
        ``loss_g_bns`` = ``bns_weight * L_BNS`` plus the task's terms."""
        losses = self.task_losses(images, conditions, self.bn_recorded)
        if self.bn is not None:
            losses["loss_g_bns"] = self.bns_weight * self.bn.loss()
        return losses

    def train_step(self) -> tuple[torch.Tensor, object]:
        """One Adam step of the generator; returns the step's images (detached) and
        conditions."""
        self.generator.train()
        noise, conditions = self.draw()
        images = self.generate(noise, conditions)
        losses = self.generator_loss(images, conditions)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"the generator's loss is {total.item()} "
                f"({', '.join(f'{k} {v.item():.4g}' for k, v in losses.items())})"
            )
        params = [p for p in self.generator.parameters() if p.requires_grad]
        # Gradients of the generator only: the student's are its own optimizer's business.
        grads = torch.autograd.grad(total, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        self.optimizer.step()
        self.last_losses = {k: v.item() for k, v in losses.items()}
        return images.detach(), conditions

    @torch.no_grad()
    def sample(self) -> tuple[torch.Tensor, object]:
        """Images of the current generator, no step (calibration, EWGS's Hessian, the
        sheet). In training mode, as the student gets them: the generator's BN layers
        always normalise with the batch's statistics (GDFQ); their running averages are
        never used, and images made with them come out nearly flat."""
        self.generator.train()
        noise, conditions = self.draw()
        return self.generate(noise, conditions), conditions

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images back to the model's pixel space (its PIXEL_MEAN / STD)."""
        return images * self.pixel_std + self.pixel_mean

    def write_sheet(self, path: str, count: int, rgb: bool) -> None:
        """A PNG grid of ``count`` images of the current generator (what the teacher
        "dreams"), each with the condition it was made for; ``rgb``: the model's channel
        order (else BGR, flipped for the PNG)."""
        pictures = []
        while len(pictures) < count:
            images, conditions = self.sample()
            pixels = self.to_pixels(images).clamp(0, 255).round().to(torch.uint8).cpu()
            pixels = pixels if rgb else pixels.flip(1)
            pictures += self.draw_sheet(pixels, conditions)
        grid = torchvision.utils.make_grid(pictures[:count], nrow=min(count, 8), padding=2)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torchvision.io.write_png(grid, path)

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

    def __init__(self, source: GeneratorSource, train_generator: bool):
        self.source, self.train_generator = source, train_generator

    def __iter__(self):
        while True:
            draw = self.source.train_step if self.train_generator else self.source.sample
            yield self.source.as_inputs(*draw())


class ZeroShotHook(HookBase):
    """Warms the generator up alone before the student's first step, logs the generator's
    losses every step, keeps the student's BN statistics frozen
    (``ZEROSHOT.FREEZE_STUDENT_BN``, as AKT's code, which trains the student in eval mode),
    and at the end writes a sheet of generated images (``ZEROSHOT.SHEET_IMAGES``)."""

    def __init__(self, source: GeneratorSource, cfg):
        self.source, self.cfg = source, cfg

    def before_train(self):
        if self.source.warmed_up:
            return
        self.before_step()  # AdaDFQ's terms run the student during the warm-up too
        iters = self.cfg.ZEROSHOT.WARMUP_ITERS
        logger.info("Zero-shot: warming the generator up alone for %d steps", iters)
        for i in range(iters):
            self.source.train_step()
            if (i + 1) % max(iters // 5, 1) == 0:
                losses = ", ".join(f"{k} {v:.4f}" for k, v in self.source.last_losses.items())
                logger.info("Zero-shot warm-up %d/%d: %s", i + 1, iters, losses)
        self.source.warmed_up = True

    def before_step(self):
        if self.cfg.ZEROSHOT.FREEZE_STUDENT_BN:
            for m in self.source.student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def after_step(self):
        get_event_storage().put_scalars(**self.source.last_losses)

    def after_train(self):
        count = self.cfg.ZEROSHOT.SHEET_IMAGES
        if count > 0 and comm.is_main_process():
            path = os.path.join(self.cfg.OUTPUT_DIR, "generated_images.png")
            self.source.write_sheet(path, count, rgb=self.cfg.INPUT.FORMAT == "RGB")
            logger.info("Zero-shot: %d generated images in %s", count, path)
