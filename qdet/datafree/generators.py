"""Generators of data-free quantization: images in the model's normalised input space,
made from noise and a condition (a class for a classifier, a layout of boxes for a
detector)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConditionalGenerator(nn.Module):
    """GDFQ's conditional generator (SPEC.md "AKT"): ``z * embed(y)`` -> Linear to 128 x
    (S/4)^2 -> BN -> upsample x2 -> conv 128 -> BN -> LeakyReLU 0.2 -> upsample x2 -> conv 64
    -> BN -> LeakyReLU 0.2 -> conv to ``channels`` -> tanh -> BN without affine. The output
    is in the classifier's normalised input space. The two convs' BNs have eps ``bn_eps``
    (0.8: GDFQ's and AKT's code pass 0.8 as BatchNorm2d's second argument, which is eps)."""

    def __init__(
        self,
        num_classes: int,
        latent_dim: int = 100,
        image_size: int = 32,
        channels: int = 3,
        bn_eps: float = 0.8,
    ):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"ZEROSHOT.IMAGE_SIZE={image_size} must be a multiple of 4")
        self.latent_dim, self.base = latent_dim, image_size // 4
        self.label_embedding = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(latent_dim, 128 * self.base**2)
        self.bn0 = nn.BatchNorm2d(128)
        self.conv1 = nn.Conv2d(128, 128, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(128, eps=bn_eps)
        self.conv2 = nn.Conv2d(128, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64, eps=bn_eps)
        self.to_image = nn.Conv2d(64, channels, 3, padding=1)
        self.out_norm = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.fc(z * self.label_embedding(labels)).view(len(z), 128, self.base, self.base)
        x = F.interpolate(self.bn0(x), scale_factor=2)
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
        x = F.interpolate(x, scale_factor=2)
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        return self.out_norm(torch.tanh(self.to_image(x)))


class LayoutBlock(nn.Module):
    """conv 3x3 on [features, layout at this scale] -> BN -> LeakyReLU 0.2."""

    def __init__(self, in_channels: int, layout_channels: int, out_channels: int, bn_eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + layout_channels, out_channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels, eps=bn_eps)

    def forward(self, x: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        layout = F.interpolate(layout, size=x.shape[-2:], mode="area")
        return F.leaky_relu(self.norm(self.conv(torch.cat([x, layout], 1))), 0.2)


class LayoutGenerator(nn.Module):
    """A detector's generator: GDFQ's generator made fully convolutional and conditioned on
    a layout instead of one class, so that it draws scenes of any size with objects where
    the layout puts them.

    Input: noise z of shape (N, latent_dim, H/8, W/8) and the layout, (N, C + 1, H, W): per
    class a mask of the boxes sampled for it, plus background (see
    :func:`qdet.datafree.detection.layout_masks`). Three blocks at 1/8, 1/4, 1/2 of the image
    size (128, 128, 64 channels; each sees the layout resized to its scale, as SPADE feeds
    the segmentation map to every scale) with x2 upsampling between them and to full size,
    then conv to ``channels`` -> tanh -> BN without affine: images of unit variance per
    channel (:class:`qdet.datafree.detection.DetectorGeneratorSource` scales them to the
    detector's input space, ``ZEROSHOT.PIXEL_STD``)."""

    def __init__(
        self, num_classes: int, latent_dim: int = 100, channels: int = 3, bn_eps: float = 0.8
    ):
        super().__init__()
        self.latent_dim, self.stride = latent_dim, 8
        layout = num_classes + 1
        self.blocks = nn.ModuleList(
            [
                LayoutBlock(latent_dim, layout, 128, bn_eps),
                LayoutBlock(128, layout, 128, bn_eps),
                LayoutBlock(128, layout, 64, bn_eps),
            ]
        )
        self.to_image = nn.Conv2d(64 + layout, channels, 3, padding=1)
        self.out_norm = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        x = z
        for block in self.blocks:
            x = F.interpolate(block(x, layout), scale_factor=2)
        return self.out_norm(torch.tanh(self.to_image(torch.cat([x, layout], 1))))
