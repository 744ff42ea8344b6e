"""Data-free quantization of a detector (RetinaNet): a layout-conditioned generator trained
against the frozen FP detector makes the student's only training images.

The generator's loss (docs/methods.md, "Data-free quantization of a detector"):

- ``L_BNS`` over the BN layers of the teacher's backbone (bottom-up and FPN), as for a
  classifier: the images' statistics match the real data's, layer by layer.
- The task term. A classifier's generator is told a class y and pays CE(z_T(x), y). A
  detector's is told a layout: boxes with classes, sampled per image
  (:func:`sample_layouts`); it pays the teacher's own training loss as if that layout were
  the ground truth, RetinaNet's focal loss over all anchors (anchors matched to a layout box
  pushed to its class, the rest to background) plus its box regression, each normalised by
  the batch's foreground anchors (:func:`retinanet_layout_loss`). So the teacher must find
  the objects where they were asked for, of the size asked, and nothing elsewhere: the
  image-level analogue of GDFQ's class condition, in the terms the detector was trained on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from detectron2.data import MetadataCatalog
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes, Instances, pairwise_iou
from fvcore.nn import sigmoid_focal_loss_jit
from torch import nn

from qdet.datafree.generators import LayoutGenerator
from qdet.datafree.source import GeneratorSource
from qdet.datafree.trainer import ZeroShotTrainerMixin
from qdet.engine.trainer import TRAINER_REGISTRY, QDetTrainer

DETECTOR_GENERATOR_LOSSES = ("gdfq",)


def _uniform(rng: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=rng).item()


def sample_layouts(
    rng: torch.Generator,
    count: int,
    image_size: tuple[int, int],
    num_classes: int,
    objects: tuple[int, int],
    box_sizes: tuple[float, float],
    aspect_ratios: tuple[float, float],
    max_iou: float,
) -> list[Instances]:
    """``count`` layouts of (H, W) = ``image_size``: per image, a number of objects drawn
    from ``objects`` (inclusive), each a uniform class and a box whose side sqrt(area) is
    log-uniform in ``box_sizes`` and whose h / w is log-uniform in ``aspect_ratios``, placed
    uniformly inside the image and kept only if its IoU with the boxes placed before is at
    most ``max_iou`` (20 tries). Returns Instances with ``gt_boxes`` and ``gt_classes``."""
    h, w = image_size
    log_size, log_ratio = [math.log(s) for s in box_sizes], [math.log(a) for a in aspect_ratios]
    layouts = []
    for _ in range(count):
        boxes: list[list[float]] = []
        classes: list[int] = []
        wanted = int(torch.randint(objects[0], objects[1] + 1, (), generator=rng))
        for _ in range(wanted):
            for _try in range(20):
                side = math.exp(_uniform(rng, *log_size))
                ratio = math.exp(_uniform(rng, *log_ratio))
                bw, bh = min(side / math.sqrt(ratio), w), min(side * math.sqrt(ratio), h)
                x0, y0 = _uniform(rng, 0, w - bw), _uniform(rng, 0, h - bh)
                box = [x0, y0, x0 + bw, y0 + bh]
                if not boxes or pairwise_iou(Boxes([box]), Boxes(boxes)).max() <= max_iou:
                    boxes.append(box)
                    classes.append(int(torch.randint(num_classes, (), generator=rng)))
                    break
        layout = Instances(image_size)
        layout.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        layout.gt_classes = torch.tensor(classes, dtype=torch.int64)
        layouts.append(layout)
    return layouts


def layout_masks(layouts: list[Instances], num_classes: int) -> torch.Tensor:
    """(N, C + 1, H, W): channel c is 1 inside the boxes of class c (boxes rounded outwards
    to pixels), the last channel 1 where no box is (background)."""
    h, w = layouts[0].image_size
    masks = torch.zeros(len(layouts), num_classes + 1, h, w)
    for i, layout in enumerate(layouts):
        for (x0, y0, x1, y1), c in zip(layout.gt_boxes.tensor.tolist(), layout.gt_classes):
            masks[i, c, math.floor(y0) : math.ceil(y1), math.floor(x0) : math.ceil(x1)] = 1
    masks[:, num_classes] = (masks[:, :num_classes].sum(1) == 0).float()
    return masks


def retinanet_layout_loss(
    teacher: nn.Module, features: list[torch.Tensor], layouts: list[Instances]
) -> dict[str, torch.Tensor]:
    """RetinaNet's training loss of ``teacher`` on ``features`` (its head's input levels)
    with ``layouts`` as ground truth: ``loss_cls``, the sigmoid focal loss over the anchors
    its matcher labels (foreground to the box's class, background to none, the ignored band
    left out), and ``loss_box``, its box-regression loss on the foreground anchors, both
    divided by the number of foreground anchors in the batch (at least 1). As Detectron2's
    ``RetinaNet.losses``, but normalised by this batch rather than a running average, which
    would be state kept on the frozen teacher."""
    k = teacher.num_classes
    pred_logits, pred_deltas = teacher.head(features)
    anchors = teacher.anchor_generator(features)
    gt_labels, gt_boxes = teacher.label_anchors(anchors, layouts)
    logits = torch.cat([permute_to_N_HWA_K(x, k) for x in pred_logits], dim=1)
    deltas = [permute_to_N_HWA_K(x, 4) for x in pred_deltas]
    gt_labels = torch.stack(gt_labels)
    valid = gt_labels >= 0
    foreground = valid & (gt_labels != k)
    normalizer = max(int(foreground.sum()), 1)
    target = F.one_hot(gt_labels[valid], k + 1)[:, :-1].to(logits.dtype)
    loss_cls = sigmoid_focal_loss_jit(
        logits[valid],
        target,
        alpha=teacher.focal_loss_alpha,
        gamma=teacher.focal_loss_gamma,
        reduction="sum",
    )
    loss_box = _dense_box_regression_loss(
        anchors,
        teacher.box2box_transform,
        deltas,
        gt_boxes,
        foreground,
        box_reg_loss_type=teacher.box_reg_loss_type,
        smooth_l1_beta=teacher.smooth_l1_beta,
    )
    return {"loss_cls": loss_cls / normalizer, "loss_box": loss_box / normalizer}


def generated_image_size(cfg, size_divisibility: int) -> tuple[int, int]:
    """``ZEROSHOT.IMAGE_SIZE`` (H, W), or for (0, 0) the test resize's (MIN_SIZE_TEST,
    MAX_SIZE_TEST), rounded up to a multiple of the backbone's size divisibility and of 8
    (the generator's stride)."""
    h, w = cfg.ZEROSHOT.IMAGE_SIZE
    step = math.lcm(8, max(size_divisibility, 1))
    if (h, w) == (0, 0):
        test_size = (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        h, w = (math.ceil(s / step) * step for s in test_size)
    if h <= 0 or w <= 0 or h % step or w % step:
        raise ValueError(
            f"ZEROSHOT.IMAGE_SIZE={tuple(cfg.ZEROSHOT.IMAGE_SIZE)} must be (H, W), both "
            f"positive multiples of {step} (the generator's stride 8 and the backbone's "
            f"size divisibility {size_divisibility}), or (0, 0) for the test size"
        )
    return int(h), int(w)


class DetectorGeneratorSource(GeneratorSource):
    """The generator of a RetinaNet student's images (:class:`LayoutGenerator`), trained
    with ``BNS_WEIGHT * L_BNS`` over the teacher backbone's BN layers plus ``TASK_WEIGHT *
    (loss_cls + BOX_WEIGHT * loss_box)`` of :func:`retinanet_layout_loss`."""

    def __init__(self, cfg, teacher: nn.Module, student: nn.Module, seed: int):
        z = cfg.ZEROSHOT
        if z.LOSS not in DETECTOR_GENERATOR_LOSSES:
            raise ValueError(
                f"ZEROSHOT.LOSS={z.LOSS!r} is not offered for detectors: choose from "
                f"{DETECTOR_GENERATOR_LOSSES} (AdaDFQ's 'adadfq' terms are the classifiers', "
                "projects/Classification)"
            )
        if not all(hasattr(teacher, a) for a in ("label_anchors", "anchor_generator", "head")):
            raise ValueError(
                f"data-free detection needs a RetinaNet teacher (its anchors and focal loss "
                f"make the task term); the teacher is a {type(teacher).__name__}"
            )
        if z.TASK_WEIGHT <= 0 and z.BNS_WEIGHT <= 0:
            raise ValueError(
                "ZEROSHOT.TASK_WEIGHT and ZEROSHOT.BNS_WEIGHT are both 0: nothing would train "
                "the generator"
            )
        self.num_classes = teacher.num_classes
        self.image_size = generated_image_size(cfg, teacher.backbone.size_divisibility)
        # The generator's images have unit variance per channel; in pixels they spread by
        # ZEROSHOT.PIXEL_STD, which the model's own normalisation may not divide out
        # (Detectron2's caffe-style PIXEL_STD is 1: its inputs spread like pixels).
        spread = torch.tensor(z.PIXEL_STD, dtype=torch.float32).view(-1, 1, 1)
        self.image_scale = spread.to(student.pixel_std.device) / student.pixel_std
        generator = LayoutGenerator(self.num_classes, z.LATENT_DIM, 3, z.BN_EPS)
        super().__init__(cfg, generator, teacher, student, teacher.backbone, seed)
        names = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
        classes = MetadataCatalog.get(names).get("thing_classes") if names else None
        self.class_names = classes or [str(c) for c in range(self.num_classes)]

    def draw(self) -> tuple[torch.Tensor, list[Instances]]:
        z = self.cfg
        h, w = self.image_size
        noise = torch.randn(self.batch_size, z.LATENT_DIM, h // 8, w // 8, generator=self.noise)
        layouts = sample_layouts(
            self.noise, self.batch_size, self.image_size, self.num_classes,
            tuple(z.OBJECTS_PER_IMAGE), tuple(z.BOX_SIZES), tuple(z.BOX_ASPECT_RATIOS),
            z.MAX_IOU,
        )  # fmt: skip
        return noise.to(self.pixel_mean.device), layouts

    def generate(self, noise: torch.Tensor, layouts: list[Instances]) -> torch.Tensor:
        masks = layout_masks(layouts, self.num_classes).to(noise.device)
        return self.generator(noise, masks) * self.image_scale

    def task_losses(self, images: torch.Tensor, layouts: list[Instances], bn_recorded) -> dict:
        with bn_recorded():
            features = self.teacher.backbone(images)
        z = self.cfg
        if z.TASK_WEIGHT <= 0:
            return {}
        head_inputs = [features[f] for f in self.teacher.head_in_features]
        device = images.device
        losses = retinanet_layout_loss(self.teacher, head_inputs, [x.to(device) for x in layouts])
        return {
            "loss_g_cls": z.TASK_WEIGHT * losses["loss_cls"],
            "loss_g_box": z.TASK_WEIGHT * z.BOX_WEIGHT * losses["loss_box"],
        }

    def as_inputs(self, images: torch.Tensor, layouts: list[Instances]) -> list[dict]:
        """Detectron2 inputs whose normalisation by the student gives back ``images``; the
        layout rides along as ``instances`` (Detectron2's detectors assert there are some
        in training), which the label-free student does not read."""
        h, w = self.image_size
        pixels = self.to_pixels(images)
        return [
            {"image": p, "height": h, "width": w, "instances": layout}
            for p, layout in zip(pixels, layouts)
        ]

    def draw_sheet(self, pixels: torch.Tensor, layouts: list[Instances]) -> list[torch.Tensor]:
        """Each image with its layout's boxes and class names drawn on it."""
        return [
            torchvision.utils.draw_bounding_boxes(
                image,
                layout.gt_boxes.tensor,
                labels=[self.class_names[c] for c in layout.gt_classes],
                colors="yellow",
            )
            for image, layout in zip(pixels, layouts)
        ]


@TRAINER_REGISTRY.register()
class DataFreeTrainer(ZeroShotTrainerMixin, QDetTrainer):
    """qdet's trainer for a data-free RetinaNet (``ZEROSHOT.ENABLED``): the student trains
    label-free on the generator's images only; evaluation reads the real DATASETS.TEST."""

    def build_zeroshot_source(self, cfg, model) -> DetectorGeneratorSource:
        seed = cfg.SEED if cfg.SEED >= 0 else 0
        return DetectorGeneratorSource(cfg, model.distiller.teacher, model, seed)
