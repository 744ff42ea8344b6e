"""QuantRetinaNet: Detectron2's RetinaNet, quantized by ``cfg.QUANT``, ready for distillation."""

from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K

from qdet.modeling.quantized import (
    QuantizationSettings,
    QuantizedDetectorMixin,
    quantized_model_kwargs,
)
from qdet.quantization import QConv2d, build_quantizer
from qdet.quantization.per_level import PerLevelQuantizer
from qdet.quantization.saved import reuse_quantized_weights_within


@META_ARCH_REGISTRY.register()
class QuantRetinaNet(QuantizedDetectorMixin, RetinaNet):
    """RetinaNet whose convs are quantized per ``cfg.QUANT`` (FP when not ENABLED).

    By QFD's rule every conv of backbone, FPN and head is quantized, shortcut convs
    included, except the stem conv and the class / box predictors. Its parameter names are
    RetinaNet's, so a plain RetinaNet checkpoint loads with only quantizer keys missing.

    ``head_per_level_act`` gives each quantized head conv one input quantizer per FPN
    level (:class:`qdet.quantization.per_level.PerLevelQuantizer`). The feature tap and
    the distiller: :class:`qdet.modeling.quantized.QuantizedDetectorMixin`.
    """

    @configurable
    def __init__(
        self,
        *,
        quantization: QuantizationSettings | None = None,
        head_per_level_act: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        quant = quantization.quant if quantization else None
        per_level = bool(quant and head_per_level_act)
        self.setup_quantization(
            quantization,
            prepare=(lambda: self._per_level_head_inputs(quant)) if per_level else None,
            per_level_head=per_level,
        )
        if quant:
            # The head runs every conv once per FPN level: quantize its weights once.
            reuse_quantized_weights_within(self.head)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(quantized_model_kwargs(cfg))
        ret["head_per_level_act"] = cfg.QUANT.HEAD_PER_LEVEL_ACT
        return ret

    def _per_level_head_inputs(self, quant: dict) -> None:
        """One input quantizer per FPN level for each quantized conv of the shared head."""
        levels = len(self.head_in_features)
        for conv in self.head.modules():
            if isinstance(conv, QConv2d):
                conv.input_quantizer = PerLevelQuantizer(
                    levels,
                    lambda: build_quantizer(
                        quant["method"],
                        quant["a_bits"],
                        "activation",
                        signed=quant["act_signed"],
                        **(quant["quantizer_options"] or {}),
                    ),
                )

    # Taps may read the head too: its convs (head.cls_subnet.0, ...) and the class logits.
    tap_roots = ("backbone", "head")
    logits_activation = "sigmoid"  # focal loss: one binary classifier per anchor and class

    def logits_tap(self):
        """``logits``: the head's class logits of all levels as (N, R, K), before sigmoid, in
        the anchor order of Detectron2's RetinaNet losses."""
        k = self.num_classes

        def select(head_output):
            return torch.cat([permute_to_N_HWA_K(x, k) for x in head_output[0]], dim=1)

        return "head", select

    def forward_taps(self, images, paths):
        features = self.backbone(images)
        if any(p.split(".")[0] == "head" for p in paths):
            self.head([features[f] for f in self.head_in_features])

    def forward_training(self, images, features, predictions, gt_instances):
        if self.label_free:  # no ground-truth losses at all (FAQD Eq. 11; AKT)
            return self.distill_losses({})
        losses = super().forward_training(images, features, predictions, gt_instances)
        return self.distill_losses(losses)
