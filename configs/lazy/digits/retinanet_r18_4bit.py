# 4-bit RetinaNet-R18 on the digits data (W4/A4 on every conv but the stem and the
# predictors, qdet's rule), fine-tuned from retinanet_r18_fp.py's model for 400 iterations.
from .retinanet_r18_fp import dataloader, lr_multiplier, model, optimizer, train

train.init_checkpoint = "output/lazy/digits/retinanet_r18_fp/model_final.pth"
train.max_iter = 400
train.output_dir = "output/lazy/digits/retinanet_r18_4bit"
optimizer.lr = 0.01
lr_multiplier.scheduler.milestones = [300, 375]
lr_multiplier.warmup_length = 20 / 400
quant = dict(w_bits=4, a_bits=4, calib_batches=4)
