# Tiny ViTDet at W4/A4 on mlp.fc1 and mlp.fc2 of every block (QFD Table 8's MLP-only row)
# fine-tuned from vitdet_tiny_fp.py's model.
from .vitdet_tiny_fp import dataloader, lr_multiplier, model, optimizer, train

train.init_checkpoint = "output/lazy/digits/vitdet_tiny_fp/model_final.pth"
train.max_iter = 200
train.output_dir = "output/lazy/digits/vitdet_tiny_4bit_mlp"
optimizer.lr = 1e-4
lr_multiplier.scheduler.milestones = [150]
lr_multiplier.warmup_length = 20 / 200
quant = dict(w_bits=4, a_bits=4, targets=["mlp"])
