"""Peer libraries beside qdet (qdet/benchmark/peers.py): Brevitas is optional, its version
is None exactly when it is not installed, and a model's quantized convs are swapped for
Brevitas layers one for one, each with its input's sign as qdet's calibration found it."""

import importlib.util

import torch
from torch import nn

from qdet.benchmark import peers
from qdet.benchmark.peers import BREVITAS_NOTE, brevitas_version
from qdet.quantization import calibrate, quantize_model


def test_the_version_is_none_exactly_without_brevitas():
    installed = importlib.util.find_spec("brevitas") is not None
    assert (brevitas_version() is not None) == installed
    assert "pip install -e .[bench]" in BREVITAS_NOTE


def _convs() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1))


def test_every_quantized_conv_is_swapped_with_its_inputs_sign(monkeypatch):
    """Which layers and signs: Brevitas's layer itself replaced by a stub that records them."""

    class Recorded(nn.Module):
        def __init__(self, conv, bits, signed_input):
            super().__init__()
            self.conv, self.bits, self.signed = conv, bits, signed_input

    monkeypatch.setattr(peers, "BrevitasConv", Recorded)
    torch.manual_seed(0)
    fp, quantized = _convs(), _convs()
    quantize_model(quantized, 4, 4, exclude=[r"^3$"])
    calibrate(quantized, [torch.randn(2, 3, 8, 8)], num_batches=1)
    convs = [fp[0], fp[2]]
    assert peers.swap_to_brevitas(fp, quantized, 3) == 2
    assert [type(m).__name__ for m in fp] == ["Recorded", "ReLU", "Recorded", "Conv2d"]
    assert [m.conv for m in (fp[0], fp[2])] == convs  # the FP model's own convs
    assert [(fp[0].bits, fp[0].signed), (fp[2].bits, fp[2].signed)] == [(3, True), (3, False)]
