"""Peer quantization libraries for the benchmarks, side by side with qdet in one run.

Brevitas (PyPI ``brevitas``, in the ``bench`` extra) is optional: :func:`brevitas_version`
is None when it is not installed and the benchmarks skip its rows with a note. A Brevitas
layer is what a Brevitas user writes for W4/A4: a 4-bit ``QuantIdentity`` on the input
(unsigned or signed as qdet's calibration decided for that layer) in front of a
``QuantConv2d`` with 4-bit weights, both with Brevitas's default per-tensor float scales.
Brevitas learns its activation scales after collecting statistics for
``collect_stats_steps`` steps (300 by default); the benchmarks set 1, so their warm-up
steps end the collection and the timed steps are Brevitas's steady state.
"""

from __future__ import annotations

from torch import nn

from qdet.quantization import QConv2d

BREVITAS_NOTE = "brevitas not installed (pip install -e .[bench]): its rows are skipped"


def brevitas_version() -> str | None:
    try:
        import brevitas  # optional: the bench extra
    except ImportError:
        return None
    return brevitas.__version__


class BrevitasConv(nn.Module):
    """A Detectron2 ``Conv2d`` (conv, norm, activation) as Brevitas W``bits``/A``bits``,
    sharing the conv's weight and bias."""

    def __init__(self, conv: nn.Conv2d, bits: int, signed_input: bool):
        super().__init__()
        # optional: the bench extra
        from brevitas.nn import QuantConv2d, QuantIdentity
        from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat

        self.input_quant = QuantIdentity(
            act_quant=Int8ActPerTensorFloat if signed_input else Uint8ActPerTensorFloat,
            bit_width=bits,
            collect_stats_steps=1,
            return_quant_tensor=False,
        )
        self.conv = QuantConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            weight_bit_width=bits,
            return_quant_tensor=False,
            device=conv.weight.device,
        )
        self.conv.weight = conv.weight
        if conv.bias is not None:
            self.conv.bias = conv.bias
        self.norm = getattr(conv, "norm", None)
        self.activation = getattr(conv, "activation", None)

    def forward(self, x):
        x = self.conv(self.input_quant(x))
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def swap_to_brevitas(model: nn.Module, quantized: nn.Module, bits: int) -> int:
    """Replace, in ``model`` (FP), every conv that ``quantized`` (the same architecture,
    quantized and calibrated by qdet) quantizes with a :class:`BrevitasConv`; returns how
    many. The same layers, and each input's sign as qdet's calibration found it."""
    count = 0
    for name, layer in quantized.named_modules():
        if not isinstance(layer, QConv2d):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, child)
        signed = bool(layer.input_quantizer.last_used.signed)
        setattr(parent, child, BrevitasConv(conv, bits, signed))
        count += 1
    return count
