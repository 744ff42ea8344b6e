"""Meta-architectures and backbones, registered in Detectron2's registries on import."""

from qdet.modeling.backbones import build_swin_fpn_backbone, build_vitdet_backbone
from qdet.modeling.rcnn import QuantMaskRCNN
from qdet.modeling.retinanet import QuantRetinaNet

__all__ = ["QuantMaskRCNN", "QuantRetinaNet", "build_swin_fpn_backbone", "build_vitdet_backbone"]
