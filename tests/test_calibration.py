"""Calibration (qdet/quantization/calibration.py): its errors, and the ranges it sets from
the FP inputs of each layer, BN left alone."""

import math

import pytest
import torch
from torch import nn

from qdet.quantization import calibrate, quantize_model


def test_calibration_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    quantize_model(model, 4, 4, exclude=[])
    with pytest.raises(ValueError, match="no batches"):
        calibrate(model, [], num_batches=2)
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(model, [torch.randn(2, 4)], num_batches=0)
    # A layer the forward never reaches is named.
    with pytest.raises(RuntimeError, match="never ran during calibration: \\['2.input"):
        calibrate(model, [torch.randn(2, 4)], run=lambda m, b: m[0](b))


def test_calibration_observes_fp_inputs_and_leaves_bn_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
    quantize_model(model, 4, 4, exclude=[])
    running_mean = model[1].running_mean.clone()
    x = torch.randn(8, 3, 10, 10)
    calibrate(model.train(), [x], num_batches=1)
    assert model.training  # restored
    assert torch.equal(model[1].running_mean, running_mean)
    q = model[3].input_quantizer
    with torch.no_grad():  # calibration runs in eval mode: BN uses its running statistics
        conv0 = nn.functional.conv2d(x, model[0].weight, model[0].bias)
        fp_input = model[2](model[1].eval()(conv0))
    # Unsigned rule on the FP (not quantized) input of the second conv.
    assert q.signed is False
    assert q.upper.item() == pytest.approx(
        3 * fp_input.std().item() / (1 - 2 / math.pi) ** 0.5, rel=1e-4
    )
