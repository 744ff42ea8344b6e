"""Mask R-CNN's RPN, box and mask heads in the form an integer runtime runs
(``QUANT.TARGET``).

With Detectron2's ResNet-FPN backbone (:mod:`qdet.modeling.deployable`), the heads of a
Mask R-CNN hold quantized convs too; under a target each runs as one QLinearConv:

- the RPN head's 3x3 conv (or the first of several, ``MODEL.RPN.CONV_DIMS``: ViTDet-B has
  two) reads the quantized FPN levels, and the last quantizes its (ReLU) output once for
  both predictors (``output_quantizer``: 8 bits when the predictors are float, as
  QFD keeps them, else the activation width, the predictors then reading it);
- the mask head's convs each read their own input quantizer (the first: ROIAlign's float
  output; the next: the previous conv's output, which only it reads), and the last conv's
  output is quantized (``deconv_input_quantizer``, 8 bits) for the ConvTranspose, which
  stays float: onnxruntime's CPU provider has no fused integer ConvTranspose
  (docs/deploy/onnxruntime_transformer_fusion.md); the check counts it.

The box head's FCs are quantized Linears: QGemm each
(:func:`qdet.quantization.integer_ops.integer_linear`); its convs (ViTDet's "4conv1fc"
head), like the mask head's, each read their own input quantizer. A head conv whose norm
cannot fold (ViTDet's LayerNorm, ``MODEL.ROI_BOX_HEAD.NORM`` / ``ROI_MASK_HEAD.NORM``
"LN") runs as one QLinearConv whose output is quantized once (``norm_input_quantizer``),
the norm and ReLU in float after, as an FPN conv's (:mod:`qdet.modeling.deployable`); the
mask head's ConvTranspose then reads that float output as it is, with no quantizer before
it. So does the box head's last conv whatever its norm: its output goes through Flatten to
fc1, and no integer op's QuantizeLinear follows the conv itself. The classes are
Detectron2's, with the same children (FP checkpoints load), converted in place by
:func:`qdet.modeling.deployable.make_deployable`.
"""

from __future__ import annotations

from detectron2.modeling.proposal_generator.rpn import StandardRPNHead
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from torch import nn

from qdet.quantization.folding import foldable
from qdet.quantization.layers import QConv2d, QuantizedInput
from qdet.quantization.produced import produce


class DeployStandardRPNHead(StandardRPNHead):
    """StandardRPNHead with its conv's output quantized once for both predictors."""

    output_quantizer: nn.Module

    def forward(self, features):
        logits, deltas = [], []
        for x in features:
            t = produce(self.output_quantizer, self.conv(x))
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


class DeployMaskRCNNConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """MaskRCNNConvUpsampleHead whose last conv's output is quantized for the float
    ConvTranspose (module docstring)."""

    deconv_input_quantizer: nn.Module

    def layers(self, x):
        for conv in self.conv_norm_relus:
            x = conv(x)
        if _deconv_input_quantized(self):
            x = produce(self.deconv_input_quantizer, x)
        return self.predictor(self.deconv_relu(self.deconv(x)))


class DeployFastRCNNConvFCHead(FastRCNNConvFCHead):
    """FastRCNNConvFCHead whose quantized convs with a LayerNorm quantize their outputs for
    it (module docstring); its forward is Detectron2's."""


DEPLOYABLE_RCNN = {
    StandardRPNHead: DeployStandardRPNHead,
    MaskRCNNConvUpsampleHead: DeployMaskRCNNConvUpsampleHead,
    FastRCNNConvFCHead: DeployFastRCNNConvFCHead,
}


def rcnn_head_is_quantized(module: nn.Module) -> bool:
    """Whether an R-CNN head holds a quantized conv (it is then converted)."""
    return any(isinstance(m, QConv2d) for m in module.modules())


def add_rcnn_quantizers(module: nn.Module, activation, edge, levels_quantized: bool):
    """Give a converted R-CNN head its quantizers; yields (attribute, quantizer).
    ``levels_quantized``: the features arrive quantized (a converted FPN's levels), so the
    RPN conv reads them as they are."""
    if isinstance(module, DeployStandardRPNHead):
        # One conv, or a Sequential of them (MODEL.RPN.CONV_DIMS, e.g. ViTDet's two): the
        # first reads the levels.
        first = module.conv[0] if isinstance(module.conv, nn.Sequential) else module.conv
        if isinstance(first, QConv2d) and levels_quantized:
            first.input_quantizer = QuantizedInput(first.input_quantizer.bits)
        predictors = (module.objectness_logits, module.anchor_deltas)
        if all(isinstance(p, QConv2d) for p in predictors):
            for p in predictors:
                p.input_quantizer = QuantizedInput(p.input_quantizer.bits)
            module.output_quantizer = activation(False)
        else:
            module.output_quantizer = edge(False)
        yield "output_quantizer", module.output_quantizer
    elif isinstance(module, (DeployMaskRCNNConvUpsampleHead, DeployFastRCNNConvFCHead)):
        owned = {id(m): n for n, m in module.named_children()}
        convs = module.conv_norm_relus
        for i, conv in enumerate(convs):
            # The box head's last conv feeds ReLU, Flatten and fc1 (or the float predictor):
            # no integer op's QuantizeLinear follows it, so it quantizes its output itself,
            # whatever its norm.
            feeds_flatten = isinstance(module, DeployFastRCNNConvFCHead) and i == len(convs) - 1
            if isinstance(conv, QConv2d) and (not foldable(conv.norm) or feeds_flatten):
                # Signed: the conv's output before its norm has both signs.
                conv.norm_input_quantizer = activation(True)
                yield f"{owned[id(conv)]}.norm_input_quantizer", conv.norm_input_quantizer
        if isinstance(module, DeployMaskRCNNConvUpsampleHead) and _deconv_input_quantized(module):
            module.deconv_input_quantizer = edge(False)
            yield "deconv_input_quantizer", module.deconv_input_quantizer


def _deconv_input_quantized(head: MaskRCNNConvUpsampleHead) -> bool:
    """Whether the last conv is quantized and its output, ReLU'd, goes to the float
    ConvTranspose as a QLinearConv's output (quantized for it): not when a float norm sits
    between them."""
    if not head.conv_norm_relus:
        return False
    last = head.conv_norm_relus[-1]
    return isinstance(last, QConv2d) and foldable(last.norm)
