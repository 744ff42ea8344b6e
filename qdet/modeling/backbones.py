"""Yacs builders for Detectron2's ViT (ViTDet) and Swin backbones, in BACKBONE_REGISTRY.

Detectron2 builds these from LazyConfig files only; the builders here read
``cfg.MODEL.VIT.*`` / ``cfg.MODEL.SWIN.*`` (declared in :func:`qdet.config.add_qdet_config`)
so the yacs-config trainer, tools and ``_BASE_`` YAMLs serve transformers too. The
modules are Detectron2's own, so their parameter names are those of Detectron2's ViTDet
checkpoints.
"""

from __future__ import annotations

import math
from functools import partial

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, SimpleFeaturePyramid
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.swin import SwinTransformer
from detectron2.modeling.backbone.vit import ViT
from torch import nn


def build_vit(cfg: CfgNode) -> ViT:
    v = cfg.MODEL.VIT
    return ViT(
        img_size=v.IMG_SIZE,
        patch_size=v.PATCH_SIZE,
        embed_dim=v.EMBED_DIM,
        depth=v.DEPTH,
        num_heads=v.NUM_HEADS,
        mlp_ratio=v.MLP_RATIO,
        qkv_bias=v.QKV_BIAS,
        drop_path_rate=v.DROP_PATH_RATE,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),  # as MAE and ViTDet
        use_abs_pos=v.USE_ABS_POS,
        use_rel_pos=v.USE_REL_POS,
        window_size=v.WINDOW_SIZE,
        window_block_indexes=tuple(v.WINDOW_BLOCK_INDEXES),
        residual_block_indexes=tuple(v.RESIDUAL_BLOCK_INDEXES),
        pretrain_img_size=v.PRETRAIN_IMG_SIZE,
        pretrain_use_cls_token=v.PRETRAIN_USE_CLS_TOKEN,
        out_feature="last_feat",
    )


def max_pool_top_block(in_feature: str = "p5") -> LastLevelMaxPool:
    """Detectron2's LastLevelMaxPool reading ``in_feature``: a pyramid whose coarsest level
    is not p5 (ViTDet with scale factors 2, 1, 0.5 on a stride-8 ViT ends at p4) pools that
    one. LazyConfig-callable (LastLevelMaxPool takes no such argument)."""
    block = LastLevelMaxPool()
    block.in_feature = in_feature
    return block


@BACKBONE_REGISTRY.register()
def build_vitdet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> SimpleFeaturePyramid:
    """ViTDet: a plain ViT and a SimpleFeaturePyramid (p2..p6 for the default scales)."""
    scales = tuple(cfg.MODEL.VIT.SCALE_FACTORS)
    # The max-pooled level comes from the coarsest pyramid level, whatever the scales.
    top_block = max_pool_top_block(f"p{int(math.log2(cfg.MODEL.VIT.PATCH_SIZE / min(scales)))}")
    return SimpleFeaturePyramid(
        net=build_vit(cfg),
        in_feature="last_feat",
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        scale_factors=scales,
        top_block=top_block,
        norm=cfg.MODEL.VIT.SFP_NORM,
        square_pad=cfg.MODEL.VIT.SQUARE_PAD,
    )


def build_swin(cfg: CfgNode) -> SwinTransformer:
    s = cfg.MODEL.SWIN
    return SwinTransformer(
        pretrain_img_size=s.PRETRAIN_IMG_SIZE,
        patch_size=s.PATCH_SIZE,
        embed_dim=s.EMBED_DIM,
        depths=tuple(s.DEPTHS),
        num_heads=tuple(s.NUM_HEADS),
        window_size=s.WINDOW_SIZE,
        mlp_ratio=s.MLP_RATIO,
        qkv_bias=s.QKV_BIAS,
        drop_path_rate=s.DROP_PATH_RATE,
        ape=s.APE,
        patch_norm=s.PATCH_NORM,
        out_indices=tuple(s.OUT_INDICES),
        frozen_stages=s.FROZEN_STAGES,
    )


@BACKBONE_REGISTRY.register()
def build_swin_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """Swin + FPN (p2..p6 from Swin's p0..p3), as Detectron2's ViTDet Swin configs."""
    return FPN(
        bottom_up=build_swin(cfg),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        square_pad=cfg.MODEL.SWIN.SQUARE_PAD,
    )
