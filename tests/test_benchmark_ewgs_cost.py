"""What EWGS costs and changes (qdet/benchmark/ewgs_cost.py): the bound-gradient probe on a
tiny quantized net (the share of inputs at l counted here; dL/dl moves only where inputs sit
at l; the quantizers' setting restored), and the summaries against values worked by hand."""

import pytest
import torch
from torch import nn

from qdet.benchmark.ewgs_cost import (
    bound_changes,
    bound_gradient_effect,
    relative_differences,
    summary,
)
from qdet.quantization import calibrate, quantize_model


class Net(nn.Module):
    """conv -> ReLU -> conv, its loss as a dict (what a detector returns in training)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return {"loss": self.second(torch.relu(self.first(x))).square().mean()}


def test_bound_gradient_probe_counts_inputs_at_l_and_restores_the_setting():
    torch.manual_seed(0)
    net = Net()
    quantize_model(net, 4, 4, exclude=[])
    x = torch.randn(2, 3, 10, 10)
    calibrate(net, [x], num_batches=1, run=lambda m, b: m(b))
    unsigned = net.second.input_quantizer
    assert unsigned.signed is False and float(unsigned.lower) == 0.0
    result = bound_gradient_effect(net, x)
    assert set(result) == {"second.input_quantizer"}  # the one unsigned input quantizer
    with torch.no_grad():
        zeros = float((torch.relu(net.first(x)) == 0).float().mean())
    probe = result["second.input_quantizer"]
    assert probe["share_at_l"] == pytest.approx(zeros) and 0.2 < zeros < 0.8
    assert probe["dl_inclusive"] != probe["dl_exclusive"]  # ReLU's zeros sit at l = 0
    assert all(m.bound_gradient == "exclusive" for m in (unsigned, net.first.input_quantizer))
    assert all(p.grad is None or not p.grad.any() for p in net.parameters())


def test_summaries_of_relative_differences():
    a, b = {"x": 1.0, "y": 0.0, "z": 2.0, "w": 4.0}, {"x": 3.0, "y": 0.0, "z": 2.0, "w": 1.0}
    assert relative_differences(a, b) == pytest.approx([2 / 3, 0.0, 3 / 4])  # y: both 0
    assert summary([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]) == (
        "median 4.00 (quartiles 2.00-6.00, max 7.00)"
    )
    assert summary([0.5]) == "median 0.50 (quartiles 0.50-0.50, max 0.50)"
    probes = {
        "a": {"dl_exclusive": -2.0, "dl_inclusive": -3.0},
        "b": {"dl_exclusive": 0.0, "dl_inclusive": 1.0},
        "c": {"dl_exclusive": 4.0, "dl_inclusive": 4.0},
    }
    assert bound_changes(probes) == [0.5, 0.0]
