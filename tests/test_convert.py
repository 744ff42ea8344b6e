"""tools/convert_torchvision_to_d2.py: torchvision ResNet weights load into Detectron2's."""

import os
import subprocess
import sys

import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from qdet.config import add_qdet_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_converted_resnet18_loads_into_retinanet(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()  # random weights: no download
    with torch.no_grad():
        tv.bn1.running_mean.uniform_()
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools/convert_torchvision_to_d2.py"),
            str(tmp_path / "r18.pth"),
            str(tmp_path / "R-18.pkl"),
        ],
        check=True,
    )
    cfg = add_qdet_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, "configs/retinanet_r18_fp.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.FPN.NORM = cfg.MODEL.RETINANET.NORM = "BN"
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(tmp_path / "R-18.pkl"))
    bottom_up = model.backbone.bottom_up
    pairs = [
        (bottom_up.stem.conv1.weight, tv.conv1.weight),
        (bottom_up.stem.conv1.norm.running_mean, tv.bn1.running_mean),
        (bottom_up.res2[0].conv1.weight, tv.layer1[0].conv1.weight),
        (bottom_up.res3[0].conv2.norm.weight, tv.layer2[0].bn2.weight),
        (bottom_up.res4[0].shortcut.weight, tv.layer3[0].downsample[0].weight),
        (bottom_up.res5[0].shortcut.norm.bias, tv.layer4[0].downsample[1].bias),
    ]
    for d2_param, tv_param in pairs:
        assert torch.equal(d2_param.detach(), tv_param.detach())
