"""The integer graph of a target-trained model (``QUANT.TARGET``): what onnxruntime fuses.

A model trained for a deployment target (:mod:`qdet.quantization.targets`,
:mod:`qdet.modeling.deployable`) exports in the QDQ form onnxruntime's graph optimiser turns
into integer kernels:

- each tensor between quantized ops: ``QuantizeLinear`` (its step and integer zero point),
  below 8 bits an integer ``Clip`` of the codes to 0..n (onnxruntime runs Clip on uint8;
  the fused QLinearConv / QLinearAdd before it saturate only at 0..255), and
  ``DequantizeLinear``; no float offsets, so nothing sits between an op and its Q;
- each quantized conv: ``DequantizeLinear`` of its folded int8 weight (per output channel)
  and of its int32 bias at step s_x s_w[c], then ``Conv``, with no norm after it
  (:mod:`qdet.quantization.folding`): DQ -> Conv -> (Relu) -> Q, which onnxruntime
  rewrites to QLinearConv (it checks the bias step against s_x s_w[c]);
- each quantized Linear (ViTDet's, Swin's, a box head's): DQ of its int8 weight (per
  output channel) and of its int32 bias at s_x s_w[c], each with its zero point written
  out, then Gemm(transB=1), tokens reshaped to 2-D around it: DQ -> Gemm -> (Relu) ->
  Q, which onnxruntime rewrites to QGemm (it takes the int32 bias without checking its
  step;
  docs/deploy/onnxruntime_transformer_fusion.md);
- residual adds and FPN sums: DQ, DQ -> Add -> (Relu) -> Q, rewritten to QLinearAdd;
- nearest upsampling and max-pooling: DQ -> op -> Q on the same grid, which onnxruntime
  runs on the codes.

:class:`IntegerRecord` lists what was written, in graph order, for the check
(:mod:`qdet.export.integer_check`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qdet.quantization.folding import INT32_MAX, folded_steps, norm_affine
from qdet.quantization.modes import integer_record
from qdet.quantization.quantizers import Quantizer, mark_quantized, quantized_source
from qdet.quantization.targets import IntegerGrid


@contextlib.contextmanager
def untraced():
    """Compute constants for the file from parameters without the tracer recording it."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        with torch.no_grad():
            yield
    finally:
        torch._C._set_tracing_state(state)


def _const(g, tensor: torch.Tensor):
    return g.op("Constant", value_t=tensor)


# -- activations --------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ActivationCodes:
    grid: IntegerGrid
    dtype: torch.dtype
    clip: bool  # an integer Clip of the codes to 0..n after QuantizeLinear
    requantize: bool = False  # the output of a grid-preserving op (same grid as its input)

    def zero(self) -> torch.Tensor:
        return torch.tensor(self.grid.zero_point - self.grid.offset, dtype=self.dtype)


def activation_codes(quantizer: Quantizer, requantize: bool = False) -> ActivationCodes:
    grid = quantizer.integer_grid()
    target = quantizer.target
    # A grid-preserving op's output is already within 0..n: no Clip.
    clip = target.clip_codes_below_8_bits and grid.n < 255 and not requantize
    return ActivationCodes(grid, target.activation_dtype, clip, requantize)


class _QuantizeDequantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codes: ActivationCodes, value: torch.Tensor):
        # Only traced: the exporter records the symbolic; the value, the quantizer's own
        # output computed beside it, keeps the traced run equal to PyTorch's.
        return value.clone()

    @staticmethod
    def symbolic(g, x, codes: ActivationCodes, value):
        grid = codes.grid
        zero = _const(g, codes.zero())
        step = grid.dq_step if codes.requantize else grid.q_step
        q = g.op("QuantizeLinear", x, _const(g, torch.tensor(step, dtype=torch.float32)), zero)
        if codes.clip:
            lo, hi = (torch.tensor(v - grid.offset, dtype=codes.dtype) for v in (0, grid.n))
            q = g.op("Clip", q, _const(g, lo), _const(g, hi))
        dq_step = _const(g, torch.tensor(grid.dq_step, dtype=torch.float32))
        return g.op("DequantizeLinear", q, dq_step, zero)


class IntegerActivation(nn.Module):
    """Stands in for a target-trained activation quantizer during export: Q [Clip] DQ."""

    def __init__(self, quantizer: Quantizer, path: str = ""):
        super().__init__()
        self.quantizer, self.path = quantizer, path
        self.codes = activation_codes(quantizer)

    @property
    def last_used(self) -> Quantizer:
        return self.quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with untraced():
            value = self.quantizer(x)
        if (record := integer_record()) is not None:
            record.activations.append({"path": self.path, "grid": self.codes.grid})
        out = _QuantizeDequantize.apply(x, self.codes, value)
        return mark_quantized(out, self.quantizer)


def requantize(y: torch.Tensor, quantizer: Quantizer, factor: float = 1.0) -> torch.Tensor:
    """Q / DQ on ``quantizer``'s output grid after a grid-preserving op (module docstring).

    ``factor`` != 1: the DequantizeLinear's step is ``factor`` times the grid's, so a
    constant multiplier of the codes' values (the attention's 1 / sqrt(d) on q) costs no
    op: the integer matmul reading the DQ takes it in its requantisation scale. PyTorch's
    value is ``y * factor``."""
    codes = activation_codes(quantizer, requantize=True)
    if factor != 1.0:
        grid = codes.grid
        scaled = IntegerGrid(
            grid.dq_step, grid.dq_step * factor, grid.zero_point, grid.n, grid.offset
        )
        codes = ActivationCodes(scaled, codes.dtype, clip=False)
    if (record := integer_record()) is not None:
        record.activations.append({"path": "", "grid": codes.grid, "requantize": True})
    return _QuantizeDequantize.apply(y, codes, y * factor if factor != 1.0 else y)


# -- convs ----------------------------------------------------------------------------------
def _per_channel_dq(g, integers: torch.Tensor, step: torch.Tensor):
    """DequantizeLinear of constant integers along the output channels (axis 0), its zero
    point written out (onnxruntime's Gemm fusion requires it)."""
    zero = torch.zeros(integers.shape[0], dtype=integers.dtype)
    return g.op("DequantizeLinear", _const(g, integers), _const(g, step), _const(g, zero), axis_i=0)


def _integer_bias_codes(layer: nn.Module, bias: torch.Tensor, step: torch.Tensor, q):
    """The bias's int32 codes at ``step``; the weight integers ``q`` checked to fit int8."""
    codes = torch.round(bias / step)
    if codes.abs().max() > INT32_MAX:
        raise ValueError(f"{layer}: a bias does not fit int32 at step s_x s_w")
    if q.abs().max() > 127:
        raise ValueError(f"{layer}: weight integers beyond int8")
    return codes.to(torch.int32)


@dataclass(frozen=True, eq=False)
class IntegerConvGrid:
    """A folded quantized conv as the runtime holds it."""

    weight: torch.Tensor  # int8, (C_out, C_in / groups, kh, kw)
    weight_step: torch.Tensor  # float32, (C_out,)
    bias: torch.Tensor  # int32, (C_out,)
    bias_step: torch.Tensor  # float32, (C_out,) = s_x * weight_step
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int


def integer_conv_grid(layer: nn.Module, source: Quantizer, norm: nn.Module | None):
    """The folded int8 weight and int32 bias of ``layer`` for an input on ``source``'s grid
    (:mod:`qdet.quantization.folding`); the same arithmetic as the layer's QAT forward."""
    q, step = layer.weight_quantizer.weight_integers(layer.weight)
    channels = q.shape[0]
    bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(channels)
    fold = None
    if norm is not None:
        fold, shift = norm_affine(norm)
        fold, bias = fold.detach().float(), (shift + fold * bias).detach().float()
        sign = torch.where(fold < 0, -1, 1).view(-1, *([1] * (q.dim() - 1)))
        q = torch.where((fold == 0).view_as(sign), 0, q * sign)
    weight_step, bias_step = folded_steps(source.integer_grid().dq_step, step, fold, channels)
    codes = _integer_bias_codes(layer, bias, bias_step, q)
    return IntegerConvGrid(
        q.to(torch.int8),
        weight_step,
        codes,
        bias_step,
        tuple(layer.stride),
        tuple(layer.padding),
        tuple(layer.dilation),
        layer.groups,
    )


class _IntegerConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid: IntegerConvGrid):
        w = grid.weight.float() * grid.weight_step.view(-1, 1, 1, 1)
        b = grid.bias.float() * grid.bias_step
        return F.conv2d(
            x, w.to(x.dtype), b.to(x.dtype), grid.stride, grid.padding, grid.dilation, grid.groups
        )

    @staticmethod
    def symbolic(g, x, grid: IntegerConvGrid):
        w = _per_channel_dq(g, grid.weight, grid.weight_step)
        b = _per_channel_dq(g, grid.bias, grid.bias_step)
        ph, pw = grid.padding
        return g.op(
            "Conv",
            x,
            w,
            b,
            kernel_shape_i=list(grid.weight.shape[2:]),
            strides_i=list(grid.stride),
            pads_i=[ph, pw, ph, pw],
            dilations_i=list(grid.dilation),
            group_i=grid.groups,
        )


def integer_conv(layer: nn.Module, x_q: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    """``layer`` (a target-trained QConv2d) on its quantized input, as DQ -> Conv."""
    found = quantized_source(x_q)
    if found is None:
        raise RuntimeError(f"{layer}: its input carries no quantizer; the export cannot fold it")
    with untraced():
        grid = integer_conv_grid(layer, found[0], norm)
    if (record := integer_record()) is not None:
        record.convs.append(record.paths.get(id(layer), ""))
    return _IntegerConv.apply(x_q, grid)


# -- linears --------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class IntegerLinearGrid:
    """A quantized Linear as the runtime holds it (no norm to fold)."""

    weight: torch.Tensor  # int8, (out_features, in_features)
    weight_step: torch.Tensor  # float32, (out_features,)
    bias: torch.Tensor  # int32, (out_features,)
    bias_step: torch.Tensor  # float32, (out_features,) = s_x * weight_step


def integer_linear_grid(layer: nn.Module, source: Quantizer) -> IntegerLinearGrid:
    """The int8 weight and int32 bias of ``layer`` for an input on ``source``'s grid: the
    same arithmetic as the layer's QAT forward under a target."""
    q, step = layer.weight_quantizer.weight_integers(layer.weight)
    channels = q.shape[0]
    bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(channels)
    weight_step, bias_step = folded_steps(source.integer_grid().dq_step, step, None, channels)
    codes = _integer_bias_codes(layer, bias, bias_step, q)
    return IntegerLinearGrid(q.to(torch.int8), weight_step, codes, bias_step)


class _IntegerLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid: IntegerLinearGrid):
        w = grid.weight.float() * grid.weight_step.view(-1, 1)
        b = grid.bias.float() * grid.bias_step
        return F.linear(x, w.to(x.dtype), b.to(x.dtype))

    @staticmethod
    def symbolic(g, x, grid: IntegerLinearGrid):
        # Gemm(transB=1) on DequantizeLinear inputs, each with its zero point written out:
        # onnxruntime fuses it (with the Q after it) into QGemm only then, and takes the
        # int32 bias as it is, never checking its step (docs/deploy/
        # onnxruntime_transformer_fusion.md): the step is s_x s_w[c] by construction.
        w = _per_channel_dq(g, grid.weight, grid.weight_step)
        b = _per_channel_dq(g, grid.bias, grid.bias_step)
        rank = x.type().dim()
        if rank == 2:
            return g.op("Gemm", x, w, b, transB_i=1)
        # Tokens (..., K): reshaped to (-1, K) around the Gemm. onnxruntime moves the
        # input's DequantizeLinear past the Reshape (which then runs on the codes) and
        # still fuses QGemm; MatMul + Add on the N-D tensor would become
        # MatMulIntegerToFloat and a float Add, measured slower.
        out_features, in_features = grid.weight.shape
        flat = g.op("Reshape", x, _const(g, torch.tensor([-1, in_features])))
        y = g.op("Gemm", flat, w, b, transB_i=1)
        lead = g.op(
            "Slice",
            g.op("Shape", x),
            _const(g, torch.tensor([0])),
            _const(g, torch.tensor([rank - 1])),
        )
        shape = g.op("Concat", lead, _const(g, torch.tensor([out_features])), axis_i=0)
        return g.op("Reshape", y, shape)


def integer_linear(layer: nn.Module, x_q: torch.Tensor) -> torch.Tensor:
    """``layer`` (a target-trained QLinear) on its quantized input, a batch of vectors
    (Mask R-CNN's box head) or of tokens (..., K), as DQ -> Gemm."""
    found = quantized_source(x_q)
    if found is None:
        raise RuntimeError(f"{layer}: its input carries no quantizer; the export cannot run it")
    with untraced():
        grid = integer_linear_grid(layer, found[0])
    if (record := integer_record()) is not None:
        record.linears.append(record.paths.get(id(layer), ""))
    return _IntegerLinear.apply(x_q, grid)


# -- attention matmuls ----------------------------------------------------------------------
def integer_matmul(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of two quantized operands (DequantizeLinear outputs in the export), in
    ``module`` (an attention): onnxruntime fuses DQ, DQ -> MatMul -> Q into QLinearMatMul,
    and without the Q into MatMulIntegerToFloat; both integer kernels."""
    if (record := integer_record()) is not None:
        record.matmuls.append(record.paths.get(id(module), ""))
    return a @ b
