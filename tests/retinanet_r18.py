"""Detectron2's model-zoo RetinaNet config made a tiny R18 with qdet's keys (10 classes, on
the CPU): the model of tests/test_surgery.py and test_optimizer.py (their ``fp_retinanet``
fixture is in conftest.py)."""

from detectron2 import model_zoo
from detectron2.config import get_cfg

from qdet.config import add_qdet_config


def _retinanet_cfg():
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    add_qdet_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RETINANET.NUM_CLASSES = 10
    return cfg
