"""Deployment targets: what an integer runtime computes, as constraints QAT trains under.

``QUANT.TARGET`` names an entry of :data:`DEPLOY_TARGETS`; ``""`` keeps qdet's simulation
(the papers' quantizers, BN and adds in float). Under a target, every quantized layer and
every tensor between them is put in the form the runtime runs in integer kernels
(:mod:`qdet.modeling.deployable` for Detectron2's ResNet, FPN and RetinaNet head):

- weights: symmetric, zero point 0, an integer per element that fits int8 (QFD's zero-less
  odd grid up to 7 bits; at 8 bits the narrow int8 grid [-127, 127], since QFD's 8-bit
  grid has odd integers up to 255); BN folded into them per output channel;
- activations: a grid whose zero point is an integer, so 0 is a level (the runtime pads
  with it), in the target's container (uint8 with any integer zero point, or int8 with
  zero point 0);
- bias: int32 at step s_x * s_w[c];
- every tensor a quantized op reads is quantized once, by the op that makes it: residual
  adds and FPN's top-down sums read quantized operands and quantize their sum.

A second runtime is one more :class:`DeployTarget`, not a second code path: the
quantizers, the model structure and the export read these fields only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdet.quantization.functional import MODE_SIGNED, MODE_UNSIGNED, MODE_WEIGHT


@dataclass(frozen=True)
class DeployTarget:
    """One runtime's integer kernels, as the constraints QAT must meet to match them."""

    name: str
    description: str
    # Weight / activation bit widths whose quantized convs run as one integer op.
    weight_bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    # "integer": any integer zero point (asymmetric grids); "zero": symmetric, zero point 0.
    activation_zero_point: str
    # The activations' integer type.
    activation_dtype: torch.dtype
    # Below 8 bits the runtime's QuantizeLinear saturates at the container's range, not at
    # the top code: an integer Clip on the codes follows it (onnxruntime runs Clip on uint8).
    clip_codes_below_8_bits: bool
    # The weights' integer type (int8 in every target here).
    weight_dtype: torch.dtype = torch.int8
    # Whether the runtime has been run by qdet's tests and benchmarks (it has not for
    # TensorRT: no TensorRT on the machines qdet is built on).
    checked: bool = True

    @property
    def weight_levels_8bit(self) -> int:
        """n (levels - 1) of an 8-bit weight grid: 254, the narrow int8 range [-127, 127]."""
        return 254

    def describe_bits(self) -> str:
        return (
            f"weights {_span(self.weight_bits)} bits, activations "
            f"{_span(self.activation_bits)} bits"
        )


def _span(bits: tuple[int, ...]) -> str:
    if len(bits) > 2 and list(bits) == list(range(bits[0], bits[-1] + 1)):
        return f"{bits[0]}-{bits[-1]}"
    return "/".join(str(b) for b in bits)


DEPLOY_TARGETS: dict[str, DeployTarget] = {
    "onnxruntime": DeployTarget(
        name="onnxruntime",
        description="onnxruntime's CPU provider: QLinearConv / QLinearAdd (u8 activations, "
        "s8 weights per output channel); a uint8 Clip below 8-bit activations",
        weight_bits=(1, 2, 3, 4, 5, 6, 7, 8),
        activation_bits=(1, 2, 3, 4, 5, 6, 7, 8),
        activation_zero_point="integer",
        activation_dtype=torch.uint8,
        clip_codes_below_8_bits=True,
    ),
    # TensorRT's explicit quantization (QDQ ONNX): symmetric int8 everywhere; its INT4 is
    # weight-only and has no conv kernel. Its constraints are honoured by the quantizers
    # and the export writes its QDQ form, but no TensorRT was available to run it.
    "tensorrt": DeployTarget(
        name="tensorrt",
        description="TensorRT int8 (symmetric activations, zero point 0; per-channel "
        "symmetric int8 weights); not run here",
        weight_bits=(8,),
        activation_bits=(8,),
        activation_zero_point="zero",
        activation_dtype=torch.int8,
        clip_codes_below_8_bits=False,
        checked=False,
    ),
}


def get_target(name: str) -> DeployTarget | None:
    """The target called ``name`` (None for ``""``: qdet's float simulation)."""
    if not name:
        return None
    if name not in DEPLOY_TARGETS:
        raise ValueError(
            f"QUANT.TARGET={name!r} is not a known deployment target: choose from "
            f"{list(DEPLOY_TARGETS)}, or '' for qdet's simulation (no runtime constraints)"
        )
    return DEPLOY_TARGETS[name]


def check_target_bits(target: DeployTarget, w_bits: int, a_bits: int) -> None:
    """Refuse bit widths whose convs, Linears and matmuls the target cannot run as integer
    ops."""
    for kind, bits, allowed in (
        ("QUANT.W_BITS", w_bits, target.weight_bits),
        ("QUANT.A_BITS", a_bits, target.activation_bits),
    ):
        if bits not in allowed:
            raise ValueError(
                f"{kind}={bits}: QUANT.TARGET {target.name!r} runs quantized layers in "
                f"integers at {target.describe_bits()} only ({target.description}); "
                f"{bits} bits would leave them in float. Pick a supported width or "
                "QUANT.TARGET ''"
            )


# -- a quantizer's grid as the runtime's integers --------------------------------------------
@dataclass(frozen=True)
class IntegerGrid:
    """An activation grid as a runtime stores it: code k = clip(round(x / q_step) +
    zero_point, 0, n) (QuantizeLinear, then a Clip below the container's range) and value
    dq_step * (k - zero_point) (DequantizeLinear). The two steps differ only where QFD's
    learnable output scale alpha differs from the input range (unsigned grids, whose zero
    point is 0 on both sides). An int8 container stores k - offset."""

    q_step: float
    dq_step: float
    zero_point: int
    n: int
    offset: int = 0  # int8 containers: codes are stored as k - offset (zero point 0)


class TargetGrids:
    """What a quantizer trained for a target offers the runtime (mixed into
    :class:`qdet.quantization.quantizers.Quantizer`): its activation grid as integer codes
    (:meth:`integer_grid`), its weight as integers and their step (:meth:`weight_integers`,
    :meth:`weight_step`), and the grid the target trains on (:meth:`_target_affine`, the
    uniform quantizer's map under a target). Reads the quantizer's ``_affine()``,
    ``n_levels``, ``kind``, ``target`` and ``to_codes``."""

    @torch.no_grad()
    def integer_grid(self) -> IntegerGrid:
        """This activation quantizer's grid as a runtime's codes (:class:`IntegerGrid`).
        Only grids with an integer zero point have one: a deployment target's."""
        if self.kind != "activation":
            raise ValueError("integer_grid() describes activations; weights: weight_integers()")
        lower, upper, scale = (float(t) for t in self._affine()[:3])
        n = self.n_levels
        q_step = (upper - lower) / n
        exact = -lower / q_step
        zero_point = round(exact)
        if self.target is None or abs(exact - zero_point) > 1e-3 or not 0 <= zero_point <= n:
            raise ValueError(
                f"this quantizer's zero point {exact:.4g} is not an integer in 0..{n}: only "
                "quantizers built for a deployment target (QUANT.TARGET) have integer grids"
            )
        symmetric = self.target.activation_zero_point == "zero"
        return IntegerGrid(q_step, scale / n, zero_point, n, zero_point if symmetric else 0)

    @torch.no_grad()
    def weight_step(self) -> torch.Tensor:
        """The step s_w between consecutive integers of this weight quantizer's output
        (per output channel when per-channel): w_q = s_w * q, q integer."""
        lower, _, scale, mode = self._affine()
        n = self.n_levels
        if mode == MODE_WEIGHT:  # s (2k - n) / n: odd integers (n odd) or k - n / 2
            return (scale / n if n % 2 else 2 * scale / n).detach().float()
        return (scale / n).detach().float()  # lower + scale k / n (LSQ)

    @torch.no_grad()
    def weight_integers(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, s_w)``: int32 integers and their step with ``self(weight) = s_w * q``
        (s_w broadcast per output channel), for the integer export and the bias grid."""
        lower, _, scale, mode = self._affine()
        codes = self.to_codes(weight)
        n = self.n_levels
        if mode == MODE_WEIGHT:
            q = 2 * codes - n if n % 2 else codes - n // 2
        else:
            offset = torch.round(self._view(lower * n / scale, codes)).long()
            q = codes + offset
        return q.int(), self.weight_step()

    def _target_affine(self):
        """The grid a deployment target runs (QFD's map with 0 as a level):

        - zero point 0 (symmetric targets, int8): every grid is signed with its zero at
          code 2^(b-1), l' = -2^(b-1) (u - l) / n, u' = l' + (u - l), alpha = u - l;
        - unsigned (post-ReLU) inputs: l = 0 exactly, u and alpha learned as in QFD;
        - signed inputs: l nudged onto the grid, l' = -z (u - l) / n with the integer zero
          point z = clip(round(-l n / (u - l)), 0, n), u' = l' + (u - l); alpha = u - l
          (tied, so the runtime's one zero point serves both its QuantizeLinear and its
          DequantizeLinear). The nudge passes the gradient straight through (as TF's
          nudged fake-quant and torch.ao's rounded zero point do), so l and u stay learned.
        """
        n = self.n_levels
        width = self.upper - self.lower
        step = width.detach() / n
        if self.target.activation_zero_point == "zero":
            zero_point = torch.tensor(float((n + 1) // 2))  # int8: codes k - 128
        elif not self.signed:
            return torch.zeros_like(self.lower), self.upper, self.scale, MODE_UNSIGNED
        else:
            zero_point = torch.clamp(torch.round(-self.lower.detach() / step), 0, n)
        lower = self.lower + (-zero_point * step - self.lower).detach()
        return lower, lower + width, width, MODE_SIGNED
