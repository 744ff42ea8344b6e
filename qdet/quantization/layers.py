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


@contextlib.contextmanager
def saved_as_codes(*pairs: tuple):
    """Inside, autograd keeps each ``(quantizer, x_q[, codes])``'s fake-quantized tensor as
    uint8 codes.

    The conv / matmul saves its input and weight for backward. Both are ``l + s k / n``
    for integer codes k in 0..n (n = 2^b - 1 <= 255), so they are stored as k (1 byte, not
    4) and rebuilt in backward in one fused pass with the forward's arithmetic and the
    quantizer's parameters of that forward. ``codes``, when given, are the codes the
    quantizer produced in its own forward pass (:func:`capturing_codes`), so saving costs
    no extra pass; without them the codes are computed from ``x_q`` when it is saved.
    The quantizers themselves save only their FP inputs, which the FP layer saves too:
    per layer, QAT keeps about 1.25x what FP keeps instead of 2x (SPEC, "memory blow-up").
    """
    codecs = {}
    for quantizer, x_q, *given in pairs:
        q = quantizer.last_used
        if torch.is_grad_enabled() and x_q.requires_grad and q.enabled and x_q.is_contiguous():
            codes = given[0] if given else None
            codecs[(x_q.data_ptr(), x_q.dtype, x_q.numel())] = (x_q, *q.codec(), codes)
    if not codecs:
        yield
        return
    # Compose with any hooks already active (activation checkpointing, offloading, a
    # benchmark's accounting): autograd applies only the innermost pair.
    outer = _current_saved_tensors_hooks()
    outer_pack, outer_unpack = outer if outer else (_identity, _identity)

    def pack(t: torch.Tensor):
        codec = codecs.get((t.data_ptr(), t.dtype, t.numel()))
        if codec is None:
            return outer_pack(t)
        x_q, encode, decode, codes = codec
        if codes is None:
            codes = encode(x_q).to(torch.uint8)
        # The op may save a view of x_q (F.linear: the transposed weight). Codes and
        # decoding stay in x_q's layout (a per-channel step runs along x_q's dim 0); the
        # view is taken again after decoding.
        same = t.shape == x_q.shape and t.stride() == x_q.stride()
        view = None if same else (tuple(t.shape), t.stride())
        return _Codes(outer_pack(codes.view(x_q.shape)), decode, t.dtype, view)

    def unpack(packed):
        if isinstance(packed, _Codes):
            values = packed.decode(outer_unpack(packed.codes)).to(packed.dtype)
            return values if packed.view is None else values.as_strided(*packed.view)
        return outer_unpack(packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def quantized_operands(layer: nn.Module, x: torch.Tensor):
    """``(x_q, w_q, context)``: the layer's fake-quantized input and weight (cast to the
    autocast dtype, so the op saves the very tensors held here) and the context to run
    its op in: :func:`saved_as_codes` with the codes the quantizers made in their own
    pass when the layer saves codes and autograd records, else a no-op."""
    dtype = _autocast_dtype(x)
    wanted = layer.save_codes and torch.is_grad_enabled()
    with capturing_codes() if wanted else contextlib.nullcontext() as sink:
        x_f = layer.input_quantizer(x)
        w_f = layer.weight_quantizer(layer.weight)
    x_q, w_q = x_f.to(dtype), w_f.to(dtype)
    if not wanted:
        return x_q, w_q, contextlib.nullcontext()
    pairs = (
        (layer.input_quantizer, x_q, sink.get(output_key(x_f))),
        (layer.weight_quantizer, w_q, sink.get(output_key(w_f))),
    )
    return x_q, w_q, saved_as_codes(*pairs)


class _Codes:
    """A saved tensor as codes: ``decode(codes).to(dtype)``, then ``as_strided(*view)``
    when the op saved a view of the quantized tensor."""

    __slots__ = ("codes", "decode", "dtype", "view")

    def __init__(self, codes, decode, dtype, view):
        self.codes, self.decode, self.dtype, self.view = codes, decode, dtype, view


def _identity(t):
    return t


def _current_saved_tensors_hooks():
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


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

    save_codes = True  # see saved_as_codes; False keeps float tensors for backward

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

    save_codes = True  # see saved_as_codes; False keeps float tensors for backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, w_q, saving = quantized_operands(self, x)
        with saving:
            return F.linear(x_q, w_q, self.bias)


QUANTIZED_LAYERS = (QConv2d, QLinear)
