"""Classifiers as Detectron2 meta-architectures, quantized and distilled by qdet.

``QuantClassifier`` (registered in ``META_ARCH_REGISTRY``) = a backbone (CIFAR ResNet-20/
56/110, or torchvision's ResNet-18) + global average pooling + ``fc``. It mixes in qdet's
:class:`~qdet.modeling.quantized.QuantizedDetectorMixin`, so ``cfg.QUANT`` quantizes it
(the stem conv, ``backbone.stem.conv1``, and ``fc`` stay FP: qdet's default exclusions)
and ``cfg.DISTILL`` distils it (taps: backbone outputs ``res2``...; module paths;
``pool`` = the pooled feature, QFD's; ``logits`` = ``fc``'s output; ``residual_branches``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling import META_ARCH_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import BasicBlock
from torch import nn

from qdet.modeling.quantized import (
    QuantizationSettings,
    QuantizedDetectorMixin,
    quantized_model_kwargs,
)

CIFAR_BLOCKS = {"resnet20": 3, "resnet56": 9, "resnet110": 18}  # blocks per stage (6n + 2)
ARCHS = (*CIFAR_BLOCKS, "resnet18")


class CifarResNet(Backbone):
    """He et al.'s CIFAR ResNet (Sec. 4.2): a 3x3 stem conv with 16 channels, three stages
    of ``n`` Detectron2 ``BasicBlock`` s with 16, 32, 64 channels (stride 2 entering stages
    2 and 3). Shortcuts that change shape are 1x1 conv + BN (He et al.'s option B; their
    CIFAR nets use option A, zero padding, which has no weights to quantize). Outputs
    ``res2``, ``res3``, ``res4`` (strides 1, 2, 4)."""

    def __init__(self, blocks_per_stage: int, norm: str = "BN"):
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(conv1=Conv2d(3, 16, 3, padding=1, bias=False, norm=get_norm(norm, 16)))
        )
        channels, self._out_features = 16, []
        self._out_feature_channels, self._out_feature_strides = {}, {}
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(channels, width, stride=stride, norm=norm))
                channels = width
            name = f"res{i + 2}"
            self.add_module(name, nn.Sequential(*blocks))
            self._out_features.append(name)
            self._out_feature_channels[name] = width
            self._out_feature_strides[name] = 2**i
        for m in self.modules():  # as torchvision's ResNets
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.relu(self.stem(x))
        out = {}
        for name in self._out_features:
            x = getattr(self, name)(x)
            out[name] = x
        return out


class TorchvisionResNet(Backbone):
    """torchvision's ResNet-18 (ImageNet layout: 7x7 stride-2 stem, max-pool) with its
    modules renamed Detectron2's way: ``stem.conv1`` and ``res2``...``res5``."""

    def __init__(self, depth: int = 18):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, f"resnet{depth}")()
        self.stem = nn.Sequential(
            OrderedDict(conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool)
        )
        self._out_features = ["res2", "res3", "res4", "res5"]
        self._out_feature_channels, self._out_feature_strides = {}, {}
        for k, name in enumerate(self._out_features):
            layer = getattr(net, f"layer{k + 1}")
            self.add_module(name, layer)
            self._out_feature_channels[name] = layer[-1].conv2.out_channels
            self._out_feature_strides[name] = 2 ** (k + 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        out = {}
        for name in self._out_features:
            x = getattr(self, name)(x)
            out[name] = x
        return out


def build_classifier_backbone(arch: str) -> Backbone:
    if arch in CIFAR_BLOCKS:
        return CifarResNet(CIFAR_BLOCKS[arch])
    if arch == "resnet18":
        return TorchvisionResNet(18)
    raise ValueError(f"MODEL.CLASSIFIER.ARCH={arch!r} is unknown: choose from {list(ARCHS)}")


@META_ARCH_REGISTRY.register()
class QuantClassifier(QuantizedDetectorMixin, nn.Module):
    """Backbone -> global average pool of its last output -> ``fc``. Training returns
    ``{"loss_cls": cross-entropy}`` plus the distiller's terms (only those when label-free);
    inference returns ``[{"logits": (num_classes,)}]`` per image."""

    tap_roots = ("backbone", "pool", "fc")
    logits_activation = "softmax"

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        num_classes: int,
        pixel_mean: list[float],
        pixel_std: list[float],
        quantization: QuantizationSettings | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        last = backbone.output_shape()[backbone._out_features[-1]]
        # A module, so the pooled feature is a tap ("pool": QFD's classification feature).
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(last.channels, num_classes)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.setup_quantization(quantization)

    @classmethod
    def from_config(cls, cfg):
        return {
            "backbone": build_classifier_backbone(cfg.MODEL.CLASSIFIER.ARCH),
            "num_classes": cfg.MODEL.CLASSIFIER.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            **quantized_model_kwargs(cfg),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: list[dict]) -> torch.Tensor:
        images = torch.stack([x["image"].to(self.device) for x in batched_inputs])
        return (images - self.pixel_mean) / self.pixel_std

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        return self.fc(self.pool(features[self.backbone._out_features[-1]]))

    def forward(self, batched_inputs: list[dict]):
        logits = self.classify(self.preprocess_image(batched_inputs))
        if not self.training:
            return [{"logits": row} for row in logits]
        if self.label_free:  # no ground-truth loss at all (FAQD Eq. 11; AKT)
            return self.distill_losses({})
        labels = torch.tensor([x["label"] for x in batched_inputs], device=logits.device)
        return self.distill_losses({"loss_cls": F.cross_entropy(logits, labels)})

    def logits_tap(self):
        """``logits``: ``fc``'s output, before softmax."""
        return "fc", None

    def forward_taps(self, images: torch.Tensor, paths: list[str]) -> None:
        if any(p.split(".")[0] in ("pool", "fc") for p in paths):
            self.classify(images)
        else:
            self.backbone(images)
