"""qdet's classification project: CIFAR ResNets and torchvision's ResNet-18 as a
registered meta-architecture (``QuantClassifier``), the embedded digit crops and CIFAR
datasets, top-1 evaluation, and qdet's trainer on top. Importing it registers them."""

from .config import add_classification_config
from .data import (
    ClassificationMapper,
    build_digit_crops,
    load_digit_crops,
    register_cifar,
    register_digit_crops,
)
from .evaluation import ClassificationEvaluator
from .modeling import CifarResNet, QuantClassifier, TorchvisionResNet
from .trainer import ClassificationTrainer, ZeroShotTrainer, trainer_class
from .zeroshot import ZeroShotData

register_digit_crops()

__all__ = [
    "CifarResNet",
    "ClassificationEvaluator",
    "ClassificationMapper",
    "ClassificationTrainer",
    "QuantClassifier",
    "TorchvisionResNet",
    "ZeroShotData",
    "ZeroShotTrainer",
    "add_classification_config",
    "build_digit_crops",
    "load_digit_crops",
    "register_cifar",
    "register_digit_crops",
    "trainer_class",
]
