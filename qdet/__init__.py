"""qdet: low-bit quantization-aware training with feature distillation for Detectron2.

Importing qdet registers its datasets, meta-architectures, backbones and the data-free
trainer into Detectron2's registries, the way Detectron2's own projects do.
"""

from qdet import (
    data,  # noqa: F401  (registers qdet_digits_train / qdet_digits_val)
    datafree,  # noqa: F401  (registers DataFreeTrainer, ZEROSHOT.ENABLED's trainer)
    modeling,  # noqa: F401  (registers QuantRetinaNet, QuantMaskRCNN, ViTDet / Swin backbones)
)
from qdet.config import add_qdet_config
from qdet.quantize import QuantizationSummary, quantize_model

__all__ = ["QuantizationSummary", "add_qdet_config", "quantize_model"]
__version__ = "0.1.0"
