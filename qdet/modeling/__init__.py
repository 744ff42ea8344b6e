"""Meta-architectures, registered in Detectron2's META_ARCH_REGISTRY on import."""

from qdet.modeling.retinanet import QuantRetinaNet

__all__ = ["QuantRetinaNet"]
