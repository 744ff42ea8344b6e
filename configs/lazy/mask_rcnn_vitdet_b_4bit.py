# ViTDet-B Mask R-CNN on COCO at W4/A4 on every Linear of the ViT's blocks (MHA and MLP,
# QFD Table 8's "both" row), from Detectron2's own LazyConfig model
# (common/models/mask_rcnn_vitdet.py) and upstream projects/ViTDet's 100-epoch recipe
# (AdamW, layer decay 0.7, LSJ at 1024), fine-tuned from the FP ViTDet-B checkpoint.
# QUANT.TARGETS's rule: patch embedding, pyramid and heads stay FP. MHA only / MLP only:
# mask_rcnn_vitdet_b_4bit_mha.py / _mlp.py.
from functools import partial

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
image_size = 1024
dataloader.train.mapper.augmentations = [  # upstream ViTDet's large-scale jitter
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(
        min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size
    ),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.recompute_boxes = True
dataloader.train.total_batch_size = 64
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size)
]

train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
# The FP ViTDet-B (upstream's model zoo, or your own run of its config).
train.init_checkpoint = "output/lazy/mask_rcnn_vitdet_b_fp/model_final.pth"
train.max_iter = 18438  # a tenth of upstream's 100 epochs: a fine-tune
train.output_dir = "output/lazy/mask_rcnn_vitdet_b_4bit"
# Seeds the model, and plans the batches ahead so that a killed run resumes bit-identical
# (qdet.engine.lazy.build_train_loader); -1 draws a seed, as Detectron2 does.
train.seed = 0

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 1e-5
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1], milestones=[16389], num_updates="${train.max_iter}"
    ),
    warmup_length=250 / 18438,
    warmup_factor=0.001,
)
quant = dict(w_bits=4, a_bits=4, targets=["mha", "mlp"])
