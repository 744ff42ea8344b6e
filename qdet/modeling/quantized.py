"""What every qdet meta-architecture adds to its Detectron2 parent: quantization by
``cfg.QUANT``, QFD's teacher-stage feature quantizer, and a distiller's loss."""

from __future__ import annotations

import torch
from detectron2.config import CfgNode

from qdet.config import quantize_kwargs
from qdet.quantization import UniformQuantizer, quantize_model
from qdet.quantization.layers import QUANTIZED_LAYERS


def quantized_model_kwargs(cfg: CfgNode) -> dict:
    """The ``from_config`` keywords of :class:`QuantizedDetectorMixin`."""
    return {
        "quant": quantize_kwargs(cfg) if cfg.QUANT.ENABLED else None,
        "save_codes": cfg.QUANT.SAVE_CODES,
        "feature_tap": cfg.QUANT.FEATURE_TAP,
        "feature_bits": cfg.QUANT.FEATURE_BITS,
    }


class QuantizedDetectorMixin:
    """Mixed into a Detectron2 meta-architecture (``backbone`` attribute required).

    ``quant``: :func:`qdet.quantization.quantize_model` keywords, None for FP.
    ``feature_tap``: adds ``feature_quantizer``, a signed activation quantizer on that
    backbone output, seen by the heads and by a distilling student (QFD's teacher stage).
    A :class:`qdet.distill.Distiller` attached with :meth:`attach_distiller` adds
    ``loss_distill`` to the training losses (:meth:`distill_losses`).
    """

    def setup_quantization(
        self,
        quant: dict | None,
        save_codes: bool = True,
        feature_tap: str = "",
        feature_bits: int = 8,
    ) -> None:
        self.quantized_layers = quantize_model(self, **quant) if quant else []
        for layer in self.modules():
            if isinstance(layer, QUANTIZED_LAYERS):
                layer.save_codes = save_codes
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
        self._images = None
        for net in (self.backbone, getattr(self.backbone, "bottom_up", None)):
            if net is not None:
                net.register_forward_hook(self._keep_features)

    def _quantize_feature(self, _backbone, _inputs, features):
        features = dict(features)
        features[self.feature_tap] = self.feature_quantizer(features[self.feature_tap])
        return features

    def _keep_features(self, net, inputs, features):
        # The distiller reads the student's taps (backbone and bottom-up outputs) and the
        # normalised input batch from here.
        if self.training and self.distiller is not None:
            self._features.update(features)
            if net is self.backbone:
                self._images = inputs[0]

    def attach_distiller(self, distiller) -> None:
        """Add ``distiller``'s loss to the training losses (it holds the frozen teacher)."""
        self.distiller = distiller

    def distill_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``losses`` plus the distiller's term on this step's features (if attached)."""
        if self.distiller is None:
            return losses
        features, images = self._features, self._images
        self._features, self._images = {}, None
        return {**losses, **self.distiller(images, features, losses)}
