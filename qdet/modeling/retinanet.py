"""QuantRetinaNet: Detectron2's RetinaNet, quantized by ``cfg.QUANT``, ready for distillation."""

from __future__ import annotations

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

from qdet.config import quantize_kwargs
from qdet.quantization import QConv2d, UniformQuantizer, build_quantizer, quantize_model
from qdet.quantization.per_level import PerLevelQuantizer


@META_ARCH_REGISTRY.register()
class QuantRetinaNet(RetinaNet):
    """RetinaNet whose convs are quantized per ``cfg.QUANT`` (FP when not ENABLED).

    By QFD's rule every conv of backbone, FPN and head is quantized, shortcut convs
    included, except the stem conv and the class / box predictors. Its parameter names are
    RetinaNet's, so a plain RetinaNet checkpoint loads with only quantizer keys missing.

    ``head_per_level_act`` gives each quantized head conv one input quantizer per FPN
    level (:class:`qdet.quantization.per_level.PerLevelQuantizer`).

    ``feature_tap`` adds ``feature_quantizer``, a signed activation quantizer on that
    backbone output, seen by the head and by a distilling student: QFD's teacher stage.
    A :class:`qdet.distill.Distiller` attached with :meth:`attach_distiller` adds
    ``loss_distill`` to the training losses.
    """

    @configurable
    def __init__(
        self,
        *,
        quant: dict | None = None,
        head_per_level_act: bool = False,
        feature_tap: str = "",
        feature_bits: int = 8,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.quantized_layers = quantize_model(self, **quant) if quant else []
        if quant and head_per_level_act:
            self._per_level_head_inputs(quant)
        self.feature_tap = feature_tap
        if feature_tap:
            taps = list(self.backbone.output_shape())
            if feature_tap not in taps:
                raise ValueError(
                    f"QUANT.FEATURE_TAP={feature_tap!r} is not a backbone output; "
                    f"choose from {taps}"
                )
            self.feature_quantizer = UniformQuantizer(feature_bits, "activation", signed=True)
            self.backbone.register_forward_hook(self._quantize_feature)
        self.distiller = None
        self._features = {}
        for net in (self.backbone, getattr(self.backbone, "bottom_up", None)):
            if net is not None:
                net.register_forward_hook(self._keep_features)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["quant"] = quantize_kwargs(cfg) if cfg.QUANT.ENABLED else None
        ret["head_per_level_act"] = cfg.QUANT.HEAD_PER_LEVEL_ACT
        ret["feature_tap"] = cfg.QUANT.FEATURE_TAP
        ret["feature_bits"] = cfg.QUANT.FEATURE_BITS
        return ret

    def _per_level_head_inputs(self, quant: dict) -> None:
        """One input quantizer per FPN level for each quantized conv of the shared head."""
        levels = len(self.head_in_features)
        for conv in self.head.modules():
            if isinstance(conv, QConv2d):
                conv.input_quantizer = PerLevelQuantizer(
                    levels,
                    lambda: build_quantizer(
                        quant["method"], quant["a_bits"], "activation", signed=quant["act_signed"]
                    ),
                )

    def _quantize_feature(self, _backbone, _inputs, features):
        features = dict(features)
        features[self.feature_tap] = self.feature_quantizer(features[self.feature_tap])
        return features

    def _keep_features(self, _net, _inputs, features):
        # The distiller reads the student's taps (FPN and bottom-up outputs) from here.
        if self.training and self.distiller is not None:
            self._features.update(features)

    def attach_distiller(self, distiller) -> None:
        """Add ``distiller``'s loss to the training losses (it holds the frozen teacher)."""
        self.distiller = distiller

    def forward_training(self, images, features, predictions, gt_instances):
        losses = super().forward_training(images, features, predictions, gt_instances)
        if self.distiller is not None:
            student_features, self._features = self._features, {}
            losses.update(self.distiller(images.tensor, student_features, losses))
        return losses
