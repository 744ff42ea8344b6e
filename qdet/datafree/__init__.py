"""Data-free (zero-shot) quantization: a generator trained against the frozen FP teacher
makes the student's training images (GDFQ, AKT; detectors: :mod:`qdet.datafree.detection`)."""

from qdet.datafree.bn_statistics import BNStatistics, bn_statistics_loss
from qdet.datafree.detection import DataFreeTrainer  # registered in TRAINER_REGISTRY
from qdet.datafree.generators import ConditionalGenerator, LayoutGenerator
from qdet.datafree.source import GeneratedBatches, GeneratorSource, ZeroShotHook
from qdet.datafree.trainer import ZeroShotTrainerMixin

__all__ = [
    "BNStatistics",
    "ConditionalGenerator",
    "DataFreeTrainer",
    "GeneratedBatches",
    "GeneratorSource",
    "LayoutGenerator",
    "ZeroShotHook",
    "ZeroShotTrainerMixin",
    "bn_statistics_loss",
]
