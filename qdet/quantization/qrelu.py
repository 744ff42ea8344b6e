"""FAQD's quantized ReLU with a learnable resolution (FAQD Eq. 4-5, after Yin et al. 2019).

    sigma(x, alpha) = alpha * clip(ceil(x / alpha), 0, n),   n = 2^b - 1

0 for x <= 0, k alpha for (k - 1) alpha < x <= k alpha, n alpha beyond. FAQD's Eq. 4 puts
each step's boundary on the other side ((k - 1) alpha <= x < k alpha), which sends
x = 0, every zero of a ReLU, to alpha; qdet follows Yin et al.'s boundary, so that as the
input quantizer of a layer fed by a ReLU it equals the quantized ReLU of the pre-activation.
The backward (Eq. 5): d sigma / dx = 1 on 0 < x < n alpha, else 0 (the clipped ReLU's
STE); d sigma / d alpha = 0 for x <= 0, 2^(b-1) for 0 < x < n alpha, n for x >= n alpha
(the three-valued proxy of Yin et al.; the extracted text of Eq. 5 lost the exponent).
"""

from __future__ import annotations

import torch
from torch import nn

from qdet.quantization.functional import MODE_UNSIGNED
from qdet.quantization.quantizers import QUANTIZER_REGISTRY, Quantizer

# ceil(x / alpha - EPS): a value already on level k (k alpha up to float rounding) stays
# there, so quantizing twice changes nothing (the codes autograd saves, the export). The
# step boundaries move by 1e-3 of a step.
_EPS = 1e-3


def qrelu_levels(x: torch.Tensor, alpha: torch.Tensor, n: int) -> torch.Tensor:
    """The level k in 0..n of each element: clip(ceil(x / alpha), 0, n)."""
    return torch.clamp(torch.ceil(x / alpha - _EPS), 0, n)


class _QReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, bits: int):
        ctx.save_for_backward(x, alpha)
        ctx.bits = bits
        return alpha * qrelu_levels(x, alpha, 2**bits - 1)

    @staticmethod
    def backward(ctx, grad):
        x, alpha = ctx.saved_tensors
        n = 2**ctx.bits - 1
        inside = (x > 0) & (x < n * alpha)
        grad_x = grad * inside
        proxy = torch.where(inside, float(2 ** (ctx.bits - 1)), 0.0) + torch.where(
            x >= n * alpha, float(n), 0.0
        )
        grad_alpha = (grad * proxy).sum().reshape(alpha.shape)
        return grad_x, grad_alpha, None


@QUANTIZER_REGISTRY.register()
class QReLUQuantizer(Quantizer):
    """FAQD's quantized ReLU as an activation quantizer: one learnable resolution
    ``alpha`` per tensor. Initialised so that the top level n alpha is the unsigned
    uniform quantizer's upper bound, 3 std(x) / sqrt(1 - 2/pi) (averaged over the
    calibration batches). Unsigned by definition: negative inputs become 0, so use it on
    the inputs of layers fed by a ReLU (every quantized conv of a ResNet)."""

    method = "qrelu"  # its QUANT.METHOD name

    def __init__(self, bits, kind, signed=False, per_channel=False, num_channels=None, **options):
        if kind != "activation":
            raise ValueError(
                "the quantized ReLU quantizes activations: quantize weights with another "
                "method (QUANT.METHOD) and set QUANT.ACT_METHOD qrelu"
            )
        if signed:
            raise ValueError("the quantized ReLU is unsigned: its inputs are ReLU outputs")
        if options.get("target") is not None:
            raise ValueError(
                "FAQD's quantized ReLU (QUANT.ACT_METHOD qrelu) rounds up (ceil(x / alpha)), "
                "which no runtime's QuantizeLinear computes (it rounds to nearest): it has no "
                "integer form on a deployment target. Use QUANT.ACT_METHOD '' with "
                "QUANT.TARGET, or QUANT.TARGET '' with qrelu"
            )
        options.pop("delta", None)  # an EWGS option, meaningless here
        options.pop("calib_range", None)  # its own rule: alpha from the std, as FAQD's
        super().__init__(bits, kind, False, per_channel, num_channels, **options)
        self.alpha = nn.Parameter(torch.tensor(1.0))

    def _statistics(self, x):
        return {"std": x.std().item() if x.numel() > 1 else 0.0}

    def _init_from_statistics(self, stats):
        top = sum(3 * s["std"] for s in stats) / len(stats) / (1 - 2 / torch.pi) ** 0.5
        self.alpha.fill_(max(top, 1e-3) / self.n_levels)

    def _fake_quant(self, x, with_codes: bool = False):
        out = _QReLU.apply(x, self.alpha.abs() + 1e-8, self.bits)
        return (out, None) if with_codes else out  # no fused codes: the layer encodes

    def _affine(self):
        top = self.n_levels * (self.alpha.abs() + 1e-8)
        return torch.zeros_like(top), top, top, MODE_UNSIGNED

    def _encode(self, x, lower, upper) -> torch.Tensor:
        return qrelu_levels(x, upper / self.n_levels, self.n_levels)
