"""Quantized Conv2d and Linear: fake-quantize the input and the weight, then the usual op.

Each subclasses the layer it replaces (``QConv2d`` is a Detectron2 ``Conv2d``, hence an
``nn.Conv2d``; ``QLinear`` an ``nn.Linear``), keeps its parameters, norm and activation,
and keeps its state-dict keys, adding only ``weight_quantizer.*`` and ``input_quantizer.*``:
an FP checkpoint loads into a quantized model with only those keys missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from torch import nn

from qdet.quantization.quantizers import Quantizer, build_quantizer


def _make_quantizers(module, method, w_bits, a_bits, per_channel, act_signed, out_channels):
    module.weight_quantizer = build_quantizer(
        method, w_bits, "weight", per_channel=per_channel, num_channels=out_channels
    )
    module.input_quantizer = build_quantizer(method, a_bits, "activation", signed=act_signed)


class QConv2d(Conv2d):
    """Detectron2 ``Conv2d`` (with its optional ``norm`` and ``activation``) on fake-quantized
    input and weight."""

    weight_quantizer: Quantizer
    input_quantizer: Quantizer

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        w_bits: int,
        a_bits: int,
        method: str = "uniform",
        per_channel: bool = False,
        act_signed: bool | None = None,
    ) -> QConv2d:
        """Wrap ``conv``'s own parameters (shared, not copied) in a quantized layer."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"QConv2d supports padding_mode='zeros', got {conv.padding_mode!r}")
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device="meta",  # no throw-away weight init
            norm=getattr(conv, "norm", None),
            activation=getattr(conv, "activation", None),
        )
        q.weight, q.bias = conv.weight, conv.bias
        q.train(conv.training)
        _make_quantizers(q, method, w_bits, a_bits, per_channel, act_signed, conv.out_channels)
        return q.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(
            self.input_quantizer(x),
            self.weight_quantizer(self.weight),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class QLinear(nn.Linear):
    """``nn.Linear`` on fake-quantized input and weight."""

    weight_quantizer: Quantizer
    input_quantizer: Quantizer

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        w_bits: int,
        a_bits: int,
        method: str = "uniform",
        per_channel: bool = False,
        act_signed: bool | None = None,
    ) -> QLinear:
        q = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta"
        )
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        _make_quantizers(q, method, w_bits, a_bits, per_channel, act_signed, linear.out_features)
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


QUANTIZED_LAYERS = (QConv2d, QLinear)
