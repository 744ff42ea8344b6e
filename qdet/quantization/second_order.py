"""Exact second derivatives for the Detectron2 ops whose torchvision kernels have none.

EWGS's Hessian trace (:mod:`qdet.quantization.ewgs`) needs a double backward through the
whole training loss; torchvision's ``roi_align``, in Mask R-CNN's box and mask heads, has
none ("double backwards on roi_align not supported"). For fixed boxes roi_align is linear
in its features, y = R x, so its backward is R^T g and the backward of that is R again:
two autograd Functions around torchvision's own kernels give the exact second derivative.
:func:`twice_differentiable` switches a model's ``ROIAlign`` modules to them for a block.
"""

from __future__ import annotations

import contextlib

import torch
from detectron2.layers import ROIAlign
from torch import nn
from torch.nn.modules.utils import _pair


class RoIAlignFunction(torch.autograd.Function):
    """torchvision's roi_align whose backward is itself differentiable. ``args`` =
    (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned); rois get no
    gradient (Detectron2's proposals are detached)."""

    @staticmethod
    def forward(ctx, features, rois, *args):
        ctx.save_for_backward(rois)
        ctx.args, ctx.shape = args, tuple(features.shape)
        return torch.ops.torchvision.roi_align(features, rois, *args)

    @staticmethod
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        features_grad = RoIAlignTranspose.apply(grad, rois, ctx.shape, *ctx.args)
        return (features_grad, None) + (None,) * len(ctx.args)


class RoIAlignTranspose(torch.autograd.Function):
    """R^T g: roi_align's backward kernel, with roi_align (R) as its own backward."""

    @staticmethod
    def forward(ctx, grad, rois, shape, spatial_scale, pooled_h, pooled_w, sampling, aligned):
        ctx.save_for_backward(rois)
        ctx.args = (spatial_scale, pooled_h, pooled_w, sampling, aligned)
        batch, channels, height, width = shape
        return torch.ops.torchvision._roi_align_backward(
            grad.contiguous(),
            rois,
            spatial_scale,
            pooled_h,
            pooled_w,
            batch,
            channels,
            height,
            width,
            sampling,
            aligned,
        )

    @staticmethod
    def backward(ctx, grad_grad):
        (rois,) = ctx.saved_tensors
        return (RoIAlignFunction.apply(grad_grad, rois, *ctx.args),) + (None,) * 7


def _roi_align_forward(self: ROIAlign, features: torch.Tensor, rois: torch.Tensor):
    """Detectron2's ``ROIAlign.forward`` on :class:`RoIAlignFunction`."""
    pooled_h, pooled_w = _pair(self.output_size)
    return RoIAlignFunction.apply(
        features,
        rois.to(features.dtype),
        float(self.spatial_scale),
        pooled_h,
        pooled_w,
        int(self.sampling_ratio),
        bool(self.aligned),
    )


@contextlib.contextmanager
def twice_differentiable(model: nn.Module):
    """Inside, ``model``'s Detectron2 ``ROIAlign`` modules have exact second derivatives
    (same values and first derivatives as torchvision's kernel)."""
    patched = [m for m in model.modules() if isinstance(m, ROIAlign)]
    for m in patched:
        m.forward = _roi_align_forward.__get__(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
