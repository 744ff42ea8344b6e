"""A tensor quantized once, by the op that makes it, for every reader (``QUANT.TARGET``).

An integer runtime holds each tensor between quantized ops as codes made once by its
producer (a QuantizeLinear after the op) and read by all its consumers; ops that only move
values (reshape, transpose, gather, nearest upsampling, max-pooling) run on the codes.
:func:`produce` is the producer's quantization, :func:`same_grid` marks a grid-preserving
op's output as still on its input's grid (the export writes the Q / DQ pair onnxruntime
drops, so the op runs on uint8). Used by :mod:`qdet.modeling.deployable` and
:mod:`qdet.modeling.deployable_attention`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qdet.quantization.integer_ops import requantize
from qdet.quantization.modes import capturing_codes, exporting, output_substitute
from qdet.quantization.quantizers import mark_quantized, quantized_source


def produce(quantizer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``quantizer(x)``, made once for every reader of the tensor; with autograd on, its
    codes come from the same pass so that readers save them, not floats, for backward."""
    with capturing_codes() if torch.is_grad_enabled() else contextlib.nullcontext():
        return quantizer(x)


def same_grid(y: torch.Tensor, x: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """``y``, a grid-preserving function of the quantized ``x`` (nearest upsampling,
    max-pooling, a reshape or transpose), on ``x``'s grid: nothing to compute in PyTorch;
    the export writes the QuantizeLinear / DequantizeLinear pair that lets the runtime run
    the op on codes. ``factor`` != 1 returns ``factor * y`` (unmarked: a matmul operand),
    the factor in the DequantizeLinear's step (:func:`requantize`)."""
    quantizer, _ = quantized_source(x)
    if exporting():
        y = requantize(y, quantizer, factor)
    else:
        substitute = output_substitute()
        if substitute is not None:
            y = substitute(quantizer, None, y, True)
        if factor != 1.0:
            y = y * factor
    return mark_quantized(y, quantizer) if factor == 1.0 else y
