"""Tiny models trained for a deployment target (``QUANT.TARGET onnxruntime``), shared by the
tests of the modules a target runs through: tests/test_folding.py, test_targets.py,
test_deployable.py, test_layers.py, test_integer_ops.py, test_integer_check.py,
test_hooks.py, test_export_packed.py and the end-to-end test_deploy_target.py."""

from __future__ import annotations

import os

import torch
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling import build_model

from qdet.config import load_config
from qdet.export import export_onnx
from qdet.quantization import UniformQuantizer, calibrate
from qdet.quantization.targets import DEPLOY_TARGETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETINANET = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_baseline.yaml")
VITDET = os.path.join(ROOT, "configs/digits/vitdet_tiny_4bit.yaml")
TINY = ["MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "32"]
TINY += ["MODEL.RETINANET.NUM_CONVS", "1", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]
ORT = DEPLOY_TARGETS["onnxruntime"]


def _images(n=2, height=64, width=96, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 255, (3, height, width), generator=g).float()} for _ in range(n)
    ]


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """BN statistics and affines away from their init, so folding is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            if isinstance(m, CycleBatchNormList):
                m.weight.copy_(torch.rand(m.weight.numel(), generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.numel(), generator=g) * 0.1)


def _target_model(*opts, seed=0):
    torch.manual_seed(seed)
    cfg = load_config(RETINANET, [*TINY, "QUANT.TARGET", "onnxruntime", *opts])
    model = build_model(cfg)
    _randomize_norms(model, seed)
    calibrate(model, [_images(seed=seed + 1)], num_batches=1)
    with torch.no_grad():  # learned-looking grids: alpha apart from u, l off the grid
        for m in model.modules():
            if isinstance(m, UniformQuantizer) and m.kind == "activation":
                m.scale.mul_(1.07)
                m.lower.add_(0.013 * (m.upper - m.lower))
    return model.eval()


def _export(model, path, batch=None):
    images = model.preprocess_image(batch or _images()).tensor
    return export_onnx(model, str(path), images)
