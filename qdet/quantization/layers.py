"""Quantized Conv2d and Linear: fake-quantize the input and the weight, then the usual op.

Each subclasses the layer it replaces (``QConv2d`` is a Detectron2 ``Conv2d``, hence an
``nn.Conv2d``; ``QLinear`` an ``nn.Linear``), keeps its parameters, norm and activation,
and keeps its state-dict keys, adding only ``weight_quantizer.*`` and ``input_quantizer.*``:
an FP checkpoint loads into a quantized model with only those keys missing.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from torch import nn

from qdet.quantization.quantizers import Quantizer, build_quantizer, capturing_codes, output_key
from qdet.quantization.saved import SavedActivation, quantized_weight, saving_compactly


def _make_quantizers(
    module, method, w_bits, a_bits, per_channel, act_signed, out_channels, options, act_method
):
    options = options or {}
    module.weight_quantizer = build_quantizer(
        method, w_bits, "weight", per_channel=per_channel, num_channels=out_channels, **options
    )
    module.input_quantizer = build_quantizer(
        act_method or method, a_bits, "activation", signed=act_signed, **options
    )


def quantized_operands(layer: nn.Module, x: torch.Tensor):
    """``(x_q, w_q, context)``: the layer's fake-quantized input and weight (cast to the
    autocast dtype, so the op saves the very tensors held here) and the context to run
    its op in: when the layer saves codes and autograd records,
    :func:`qdet.quantization.saved.saving_compactly` (the input as the codes its quantizer
    made in its own pass, the weight rebuilt from the parameter), else a no-op."""
    dtype = _autocast_dtype(x)
    saving = layer.save_codes and torch.is_grad_enabled()
    with capturing_codes() if saving else contextlib.nullcontext() as sink:
        x_f = layer.input_quantizer(x)
    x_q = x_f.to(dtype)
    w_q, weight_record = quantized_weight(layer, dtype, saving)
    if not saving:
        return x_q, w_q, contextlib.nullcontext()
    input_record = SavedActivation(layer.input_quantizer, x_q, sink.get(output_key(x_f)))
    return x_q, w_q, saving_compactly([input_record, weight_record])


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    # Under AMP, cast before the op ourselves: the op then saves the very tensor we hold.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


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
        options: dict | None = None,
        act_method: str | None = None,
    ) -> QConv2d:
        """Wrap ``conv``'s own parameters (shared, not copied) in a quantized layer.
        ``options``: more quantizer keywords (:func:`qdet.quantization.build_quantizer`);
        ``act_method``: the input quantizer's method, if not ``method``."""
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
        _make_quantizers(
            q,
            method,
            w_bits,
            a_bits,
            per_channel,
            act_signed,
            conv.out_channels,
            options,
            act_method,
        )
        return q.to(conv.weight.device)

    save_codes = True  # see qdet.quantization.saved; False keeps float tensors for backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, w_q, saving = quantized_operands(self, x)
        with saving:
            x = F.conv2d(x_q, w_q, self.bias, self.stride, self.padding, self.dilation, self.groups)
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
        options: dict | None = None,
        act_method: str | None = None,
    ) -> QLinear:
        q = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta"
        )
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        _make_quantizers(
            q,
            method,
            w_bits,
            a_bits,
            per_channel,
            act_signed,
            linear.out_features,
            options,
            act_method,
        )
        return q.to(linear.weight.device)

    save_codes = True  # see qdet.quantization.saved; False keeps float tensors for backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, w_q, saving = quantized_operands(self, x)
        with saving:
            return F.linear(x_q, w_q, self.bias)


QUANTIZED_LAYERS = (QConv2d, QLinear)
