# FP tiny ViTDet Mask R-CNN on the digits data, from Detectron2's own LazyConfig model
# (common/models/mask_rcnn_vitdet.py) at the yacs tiny size (configs/digits/
# Base-digits-vitdet.yaml: 4 blocks of width 96, patch 8, p2-p4 and a pooled p5, slim
# heads), trained from scratch with AdamW. The teacher of vitdet_tiny_4bit*.py.
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from qdet.modeling.backbones import max_pool_top_block

from .data import dataloader

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
net = model.backbone.net
net.img_size, net.patch_size, net.embed_dim, net.depth, net.num_heads = 192, 8, 96, 4, 3
net.drop_path_rate, net.window_size, net.window_block_indexes = 0.0, 6, [0, 2]
net.pretrain_img_size, net.pretrain_use_cls_token = 192, False
model.backbone.out_channels = 64
model.backbone.scale_factors = (2.0, 1.0, 0.5)  # stride 8 -> p2, p3, p4
model.backbone.top_block = L(max_pool_top_block)(in_feature="p4")
model.backbone.square_pad = 192
rpn = model.proposal_generator
rpn.in_features = ["p2", "p3", "p4", "p5"]
rpn.head.in_channels = 64
rpn.head.conv_dims = [-1]  # one conv, as the yacs tiny model (ViTDet-B has two)
rpn.anchor_generator.sizes = [[16], [32], [64], [128]]
rpn.anchor_generator.strides = [4, 8, 16, 32]
rpn.pre_nms_topk, rpn.post_nms_topk, rpn.batch_size_per_image = (600, 300), (300, 100), 128
heads = model.roi_heads
heads.num_classes, heads.batch_size_per_image = 10, 128
heads.box_in_features = heads.mask_in_features = ["p2", "p3", "p4"]
heads.box_pooler.scales = heads.mask_pooler.scales = (1 / 4, 1 / 8, 1 / 16)
heads.box_head.input_shape = ShapeSpec(channels=64, height=7, width=7)
heads.box_head.conv_dims, heads.box_head.fc_dims = [], [256, 256]
heads.box_predictor.input_shape = ShapeSpec(channels=256)
heads.mask_head.input_shape = ShapeSpec(channels=64, width=14, height=14)
heads.mask_head.conv_dims = [64, 64, 64]
heads.mask_head.conv_norm = ""  # as the yacs tiny model (ViTDet-B: LN)
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.instance_mask_format = "bitmask"  # the digits annotations are RLE

train = model_zoo.get_config("common/train.py").train
train.device = "cpu"
train.max_iter = 600
train.eval_period = 0
train.checkpointer = dict(period=200, max_to_keep=1)
train.output_dir = "output/lazy/digits/vitdet_tiny_fp"
# Seeds the model, and plans the batches ahead so that a killed run resumes bit-identical
# (qdet.engine.lazy.build_train_loader); -1 draws a seed, as Detectron2 does.
train.seed = 0
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 4e-4
optimizer.weight_decay = 0.05
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1], milestones=[450], num_updates="${train.max_iter}"
    ),
    warmup_length=50 / 600,
    warmup_factor=0.001,
)
quant = dict(enabled=False)
