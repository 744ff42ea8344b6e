"""ViTDet's SimpleFeaturePyramid in the form an integer runtime runs (``QUANT.TARGET``).

Each stage of Detectron2's ``SimpleFeaturePyramid`` rescales the ViT's last feature map
(ConvTranspose, or max-pool, in float) and runs a 1x1 and a 3x3 conv, each followed by its
norm (LayerNorm in ViTDet). Selected with ``QUANT.INCLUDE ['simfp']``, under a target each
such conv runs as one QLinearConv:

- its input has its own quantizer: the rescaled map and the previous conv's normalised
  output are float tensors that only it reads;
- its output is quantized once (``norm_input_quantizer``) and the norm runs in float after
  it, as for an FPN conv whose LayerNorm cannot fold (:mod:`qdet.modeling.deployable`).

The ConvTranspose and max-pool stay float (onnxruntime 1.32's CPU provider has no fused
integer ConvTranspose: docs/deploy/onnxruntime_transformer_fusion.md), and so do the
pyramid's outputs, which the RPN conv and the ROI heads quantize themselves. The class is
Detectron2's, with the same children, converted in place by
:func:`qdet.modeling.deployable.make_deployable`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from detectron2.modeling.backbone.vit import SimpleFeaturePyramid
from torch import nn

from qdet.quantization.layers import QConv2d


class DeploySimpleFeaturePyramid(SimpleFeaturePyramid):
    """SimpleFeaturePyramid whose quantized stage convs quantize their outputs for the
    float norm after them (module docstring); its forward is Detectron2's."""


DEPLOYABLE_PYRAMID = {SimpleFeaturePyramid: DeploySimpleFeaturePyramid}


def stage_convs(pyramid: SimpleFeaturePyramid) -> Iterator[tuple[str, QConv2d]]:
    """(path under ``pyramid``, conv) of each quantized conv of its stages (not of the ViT
    it holds as ``net``)."""
    stages = {id(s) for s in pyramid.stages}
    for name, stage in pyramid.named_children():
        if id(stage) in stages:
            for conv_name, conv in stage.named_children():
                if isinstance(conv, QConv2d):
                    yield f"{name}.{conv_name}", conv


def pyramid_is_quantized(pyramid: SimpleFeaturePyramid) -> bool:
    """Whether a stage of ``pyramid`` holds a quantized conv (it is then converted)."""
    return next(stage_convs(pyramid), None) is not None


def add_pyramid_quantizers(
    pyramid: DeploySimpleFeaturePyramid, activation: Callable[[bool | None], nn.Module]
) -> Iterator[tuple[str, nn.Module]]:
    """Give each quantized stage conv its output quantizer; yields (attribute, quantizer).
    Signed: the conv's output before its norm has both signs."""
    for name, conv in stage_convs(pyramid):
        conv.norm_input_quantizer = activation(True)
        yield f"{name}.norm_input_quantizer", conv.norm_input_quantizer


def covered_paths(pyramid: SimpleFeaturePyramid) -> list[str]:
    """The sub-paths whose quantized convs the conversion handles: the stages' (the ViT's
    own convs, e.g. its patch embedding, are not)."""
    stages = {id(s) for s in pyramid.stages}
    return [
        f"{name}.{sub}" if sub else name
        for name, stage in pyramid.named_children()
        if id(stage) in stages
        for sub, _ in stage.named_modules()
    ]
