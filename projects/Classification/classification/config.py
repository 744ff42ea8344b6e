"""``add_classification_config(cfg)``: the project's keys, each with its default."""

from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_classification_config(cfg: CN) -> CN:
    """Declare the classification project's keys on a Detectron2 + qdet config."""
    cfg.MODEL.CLASSIFIER = CN()
    # "resnet20" / "resnet56" / "resnet110" (CIFAR ResNets, 16-32-64 channels) or
    # "resnet18" (torchvision's, ImageNet layout).
    cfg.MODEL.CLASSIFIER.ARCH = "resnet20"
    cfg.MODEL.CLASSIFIER.NUM_CLASSES = 10
    # Folder holding torchvision's cifar-10-batches-py/ or cifar-100-python/ (datasets
    # cifar10_train / cifar10_test / cifar100_train / cifar100_test). Never downloaded.
    cfg.DATASETS.CIFAR_ROOT = ""
    # Training augmentation: zero-pad by this many pixels, then a random crop back to size.
    cfg.INPUT.CROP_PADDING = 4

    # Zero-shot quantization (AKT; classification/zeroshot.py; the ZEROSHOT keys are qdet's,
    # qdet/config.py): the generator makes crops of the classifier's input size.
    cfg.ZEROSHOT.IMAGE_SIZE = (32, 32)
    return cfg
