"""An export run with another config is refused (qdet/export/runtime.py: check_file_fits):
other anchors would draw wrong boxes, other classes fail later with an IndexError."""

from __future__ import annotations

import os

import pytest
import torch
from detectron2.modeling import build_model

from qdet.config import load_config
from qdet.export import OnnxRetinaNet, export_onnx
from qdet.quantization import calibrate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETINANET = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_baseline.yaml")
TINY = ["MODEL.WEIGHTS", "", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.RETINANET.NUM_CONVS", "1"]


def _model(*opts: str):
    torch.manual_seed(0)
    return build_model(load_config(RETINANET, [*TINY, *opts])).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model()
    images = [{"image": torch.rand(3, 64, 96) * 255}]
    calibrate(model, [images], num_batches=1)
    path = str(tmp_path_factory.mktemp("fit") / "m.onnx")
    export_onnx(model, path, model.preprocess_image(images).tensor)
    return path


@pytest.mark.parametrize(
    "opts, what",
    [
        (["MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]"], "cell_anchors"),
        (["MODEL.RETINANET.NUM_CLASSES", "7"], "num_classes"),
        (["INPUT.FORMAT", "RGB"], "input_format"),
    ],
)
def test_another_config_is_refused(exported, opts, what):
    with pytest.raises(ValueError, match=rf"exported from another model.*its {what} is"):
        OnnxRetinaNet(_model(*opts), exported)


def test_the_same_config_runs(exported):
    runner = OnnxRetinaNet(_model(), exported)
    out = runner([{"image": torch.rand(3, 64, 96) * 255, "height": 64, "width": 96}])
    assert len(out) == 1 and "instances" in out[0]
