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
    """Refuse bit widths whose convs the target cannot run as integer ops."""
    for kind, bits, allowed in (
        ("QUANT.W_BITS", w_bits, target.weight_bits),
        ("QUANT.A_BITS", a_bits, target.activation_bits),
    ):
        if bits not in allowed:
            raise ValueError(
                f"{kind}={bits}: QUANT.TARGET {target.name!r} runs quantized convs in "
                f"integers at {target.describe_bits()} only ({target.description}); "
                f"{bits} bits would leave them in float. Pick a supported width or "
                "QUANT.TARGET ''"
            )
