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

    # Zero-shot quantization (AKT; classification/zeroshot.py): the student trains on a
    # generator's images only, never on DATASETS.TRAIN. Needs DISTILL.ENABLED and LABEL_FREE.
    cfg.ZEROSHOT = CN()
    cfg.ZEROSHOT.ENABLED = False
    cfg.ZEROSHOT.LATENT_DIM = 100  # noise z (GDFQ, AdaDFQ, AKT)
    cfg.ZEROSHOT.IMAGE_SIZE = 32  # generated images are square, a multiple of 4
    # eps of the generator's two conv BNs (GDFQ's code passes 0.8 where momentum was meant).
    cfg.ZEROSHOT.BN_EPS = 0.8
    # The generator's Adam (GDFQ / AdaDFQ: lr 1e-3, betas 0.5, 0.999), constant LR here.
    cfg.ZEROSHOT.BASE_LR = 1e-3
    cfg.ZEROSHOT.BETAS = (0.5, 0.999)
    # Generator steps alone before the student's first (AdaDFQ: 4 epochs x 200 steps).
    cfg.ZEROSHOT.WARMUP_ITERS = 800
    # The generator's loss: "gdfq" (CE to the sampled class + BN statistics) or "adadfq"
    # (AKT's official code: + AdaDFQ's disagreement margin and agreement terms).
    cfg.ZEROSHOT.LOSS = "gdfq"
    cfg.ZEROSHOT.CE_WEIGHT = 1.0  # gdfq
    cfg.ZEROSHOT.BNS_WEIGHT = 0.1  # gdfq (GDFQ's 0.1)
    cfg.ZEROSHOT.ADADFQ = CN()  # AdaDFQ's CIFAR-10 ResNet-20 settings
    cfg.ZEROSHOT.ADADFQ.ALPHA_DS = 0.2  # CE of z_T - z_S (disagreement)
    cfg.ZEROSHOT.ADADFQ.ALPHA_AS = 0.1  # CE of z_T + z_S (agreement)
    cfg.ZEROSHOT.ADADFQ.LAMBDA_LOW = 0.1  # margin's lower boundary
    cfg.ZEROSHOT.ADADFQ.LAMBDA_UP = 0.8  # and upper
    cfg.ZEROSHOT.ADADFQ.BETA = 1.0  # weight of the two CE terms
    cfg.ZEROSHOT.ADADFQ.GAMMA = 1.0  # weight of the BN-statistics loss
    # Keep the student's BN statistics as the FP model's (AKT's code trains it in eval mode).
    cfg.ZEROSHOT.FREEZE_STUDENT_BN = True
    return cfg
