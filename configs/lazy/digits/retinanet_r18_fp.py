# FP RetinaNet-R18 on the embedded digits data from Detectron2's own LazyConfig model
# (common/models/retinanet.py), trained from scratch with the yacs digits recipe
# (configs/digits/Base-digits.yaml): BN everywhere, 3 square anchors per place, 2 head convs
# of 64 channels, SGD 0.02 for 1500 iterations. The teacher of the 4-bit configs here.
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from .data import dataloader

model = model_zoo.get_config("common/models/retinanet.py").model
model.backbone.bottom_up.stem.norm = model.backbone.bottom_up.stages.norm = "BN"
model.backbone.bottom_up.stages.depth = 18
del model.backbone.bottom_up.stages.stride_in_1x1  # a bottleneck option; R18 has BasicBlocks
model.backbone.top_block.in_channels = 512  # res5 of an R18
model.backbone.out_channels = 64
model.backbone.norm = "BN"
model.head.conv_dims = [64, 64]
model.head.norm = "BN"
model.head.num_anchors = 3
model.head.input_shape = [ShapeSpec(channels=64)] * 5
model.anchor_generator.sizes = [
    [x, x * 2 ** (1 / 3), x * 2 ** (2 / 3)] for x in (16, 32, 64, 128, 256)
]
model.anchor_generator.aspect_ratios = [1.0]
model.num_classes = 10
model.pixel_mean, model.pixel_std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
model.input_format = "RGB"

train = model_zoo.get_config("common/train.py").train
train.device = "cpu"
train.max_iter = 1500
train.eval_period = 0
train.checkpointer = dict(period=500, max_to_keep=1)
train.output_dir = "output/lazy/digits/retinanet_r18_fp"
# Seeds the model, and plans the batches ahead so that a killed run resumes bit-identical
# (qdet.engine.lazy.build_train_loader); -1 draws a seed, as Detectron2 does.
train.seed = 0

optimizer = model_zoo.get_config("common/optim.py").SGD
optimizer.lr = 0.02
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[1100, 1350], num_updates="${train.max_iter}"
    ),
    warmup_length=100 / 1500,
    warmup_factor=0.001,
)
quant = dict(enabled=False)
