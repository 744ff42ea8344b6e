"""QuantMaskRCNN: Detectron2's GeneralizedRCNN (Mask R-CNN with ``MODEL.MASK_ON``) quantized
by ``cfg.QUANT``; for ViTDet / Swin backbones, by ``cfg.QUANT.TARGETS``."""

from __future__ import annotations

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from qdet.modeling.quantized import (
    QuantizationSettings,
    QuantizedDetectorMixin,
    quantized_model_kwargs,
)


@META_ARCH_REGISTRY.register()
class QuantMaskRCNN(QuantizedDetectorMixin, GeneralizedRCNN):
    """Mask R-CNN (box and mask heads) with quantized layers (FP when not ENABLED).

    With ``QUANT.TARGETS`` (``mha``, ``mlp`` or both) only those Linear layers of the
    backbone's transformer blocks are quantized (QFD, "The ViT structure"; Table 8's
    MHA-only and MLP-only rows): patch embedding, the feature pyramid, RPN and ROI heads
    stay FP. Their inputs (LayerNorm, attention and GELU outputs) are signed, so with
    ``QUANT.ACT_SIGNED auto`` the activation quantizers are signed. Without TARGETS,
    INCLUDE / EXCLUDE select as for RetinaNet.
    """

    @configurable
    def __init__(
        self,
        *,
        quantization: QuantizationSettings | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.setup_quantization(quantization)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(quantized_model_kwargs(cfg))
        return ret

    def forward(self, batched_inputs):
        if self.training and self.label_free:
            # No ground-truth losses: only the backbone's taps are distilled (the RPN and
            # ROI heads need proposals, which come from ground truth in training).
            self.backbone(self.preprocess_image(batched_inputs).tensor)
            return self.distill_losses({})
        out = super().forward(batched_inputs)
        return self.distill_losses(out) if self.training else out
