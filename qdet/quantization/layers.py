"""Quantized Conv2d and Linear: fake-quantize the input and the weight, then the usual op.

Each subclasses the layer it replaces (``QConv2d`` is a Detectron2 ``Conv2d``, hence an
``nn.Conv2d``; ``QLinear`` an ``nn.Linear``), keeps its parameters, norm and activation,
and keeps its state-dict keys, adding only ``weight_quantizer.*`` and ``input_quantizer.*``:
an FP checkpoint loads into a quantized model with only those keys missing.

Under a deployment target (``QConv2d.target``, :mod:`qdet.quantization.targets`) a conv
computes what the runtime's integer conv computes: its norm folded (with running
statistics) and its bias on the int32 grid s_x s_w (:mod:`qdet.quantization.folding`). Its
input may arrive already quantized by the module that made it (:class:`QuantizedInput`):
every quantizer's output under a target carries which quantizer made it
(:func:`quantized_source`), so a conv finds its input's step s_x wherever it came from.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from torch import nn

from qdet.quantization.folding import (
    folded_steps,
    integer_bias,
    norm_affine,
    uses_running_statistics,
)
from qdet.quantization.integer_ops import integer_conv, integer_linear
from qdet.quantization.modes import capturing_codes, exporting
from qdet.quantization.produced import produce
from qdet.quantization.quantizers import (
    Quantizer,
    build_quantizer,
    output_key,
    quantized_source,
)
from qdet.quantization.saved import SavedActivation, quantized_weight, saving_compactly
from qdet.quantization.targets import DeployTarget


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


class QuantizedInput(nn.Module):
    """A conv's input quantizer when its input arrives quantized, by the module that made
    the tensor (a residual block's output, an FPN level; :mod:`qdet.modeling.deployable`):
    the identity, so the tensor is quantized once for all its readers, as in the
    runtime's graph."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"bits={self.bits}, quantized by its producer"


def quantized_operands(layer: nn.Module, x: torch.Tensor):
    """``(x_q, w_q, context)``: the layer's fake-quantized input and weight (cast to the
    autocast dtype, so the op saves the very tensors held here) and the context to run
    its op in: when the layer saves codes and autograd records,
    :func:`qdet.quantization.saved.saving_compactly` (the input as the codes its quantizer
    made in its own pass, the weight rebuilt from the parameter), else a no-op."""
    dtype = _autocast_dtype(x)
    saving = layer.save_codes and torch.is_grad_enabled()
    if isinstance(layer.input_quantizer, QuantizedInput):
        source, codes = _producer(layer, x)
        x_f = x
    else:
        with capturing_codes() if saving else contextlib.nullcontext() as sink:
            x_f = layer.input_quantizer(x)
        source, codes = layer.input_quantizer, sink.get(output_key(x_f)) if saving else None
    x_q = x_f.to(dtype)
    w_q, weight_record = quantized_weight(layer, dtype, saving)
    if not saving:
        return x_q, w_q, contextlib.nullcontext()
    input_record = SavedActivation(source, x_q, codes)
    return x_q, w_q, saving_compactly([input_record, weight_record])


def _producer(layer: nn.Module, x: torch.Tensor) -> tuple[Quantizer, torch.Tensor | None]:
    found = quantized_source(x)
    if found is None:
        raise RuntimeError(
            f"{type(layer).__name__} expects its input quantized by the module that made "
            "it (QuantizedInput), but the tensor it got carries no quantizer: a module "
            "between them is not in its deployable form (qdet.modeling.deployable)"
        )
    return found


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
    # A deployment target (qdet.modeling.deployable sets it): the norm folds, the bias is
    # int32 at s_x s_w. None: qdet's simulation (conv, then the norm in float).
    target: DeployTarget | None = None
    # QUANT.FREEZE_BN_ITER reached: the norm uses its running statistics in training too.
    norm_frozen = False
    # Under a target, a conv whose norm cannot fold (an FPN's LayerNorm) or whose output a
    # float op reads (ViTDet's pyramid) gets a submodule ``norm_input_quantizer``
    # (qdet.modeling.deployable): the conv still runs as one integer op, its output
    # quantized once by it, the norm (if any) in float after. Absent: the norm folds (or
    # there is none).

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """``norm``: the BN after this conv when it is not ``self.norm`` (RetinaNet's head
        keeps it as the next module of a Sequential), to fold under a target."""
        norm = self.norm if norm is None else norm
        conv = (self.stride, self.padding, self.dilation, self.groups)
        norm_input = self._modules.get("norm_input_quantizer")  # no AttributeError per call
        if self.target is not None and norm_input is not None:
            x = produce(norm_input, self._integer(x, None, conv))
            x = norm(x) if norm is not None else x
        elif self.target is not None and exporting():
            x = integer_conv(self, self.input_quantizer(x), norm)
        elif self.target is None or (norm is not None and not self._folds(norm)):
            x_q, w_q, saving = quantized_operands(self, x)
            with saving:
                x = F.conv2d(x_q, w_q, self.bias, *conv)
            if norm is not None:
                x = norm(x)
        else:
            x = self._integer(x, norm, conv)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def _integer(self, x: torch.Tensor, norm: nn.Module | None, conv: tuple) -> torch.Tensor:
        """What the runtime computes: the norm folded, the bias on its int32 grid."""
        if exporting():
            return integer_conv(self, self.input_quantizer(x), norm)
        # (read the producer's record before the autocast cast makes a new tensor)
        arrived = isinstance(self.input_quantizer, QuantizedInput)
        source = quantized_source(x) if arrived else None
        x_q, w_q, saving = quantized_operands(self, x)
        with saving:
            x = F.conv2d(x_q, w_q, None, *conv)
        return self._folded_affine(x, source or quantized_source(x_q), norm)

    def _folds(self, norm: nn.Module) -> bool:
        return self.norm_frozen or uses_running_statistics(norm)

    def _folded_affine(self, y: torch.Tensor, source, norm: nn.Module | None) -> torch.Tensor:
        """``f y + b'``: the folded norm's scale and the bias on its int32 grid
        (:mod:`qdet.quantization.folding`), for a conv output y = conv(x_q, w_q)."""
        scale, shift = norm_affine(norm) if norm is not None else (None, None)
        bias = self.bias
        if scale is not None:
            y = y * scale.view(1, -1, 1, 1).to(y.dtype)
            bias = shift if bias is None else shift + scale * bias
        if bias is None:
            return y
        bias = bias_on_int32_grid(self, bias, source, scale, self.out_channels)
        return y + bias.view(1, -1, 1, 1).to(y.dtype)


def bias_on_int32_grid(layer: nn.Module, bias, source, fold, channels: int) -> torch.Tensor:
    """``bias`` (already folded with the norm's scale ``fold``, or None) on the int32 grid
    s_x s_w'[c] a target's runtime holds it on (:func:`qdet.quantization.folding.
    integer_bias`, gradient straight through); as it is while ``source`` (the input's
    producing quantizer and codes) or the weight quantizer is off."""
    quantizer = source[0] if source is not None else None
    if quantizer is None or not quantizer.enabled or not layer.weight_quantizer.enabled:
        return bias
    input_step = quantizer.integer_grid().dq_step
    _, step = folded_steps(input_step, layer.weight_quantizer.weight_step(), fold, channels)
    return integer_bias(bias, step.to(bias.device))[1]


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
    # A deployment target: the bias is int32 at s_x s_w, as the runtime's integer GEMM
    # holds it. None: qdet's simulation.
    target: DeployTarget | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.target is not None and exporting():
            return integer_linear(self, self.input_quantizer(x))
        x_q, w_q, saving = quantized_operands(self, x)
        if self.target is None:
            with saving:
                return F.linear(x_q, w_q, self.bias)
        with saving:
            y = F.linear(x_q, w_q, None)
        if self.bias is None:
            return y
        bias = bias_on_int32_grid(self, self.bias, quantized_source(x_q), None, self.out_features)
        return y + bias.to(y.dtype)


QUANTIZED_LAYERS = (QConv2d, QLinear)
