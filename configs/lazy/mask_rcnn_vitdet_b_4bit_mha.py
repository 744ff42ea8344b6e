# QFD Table 8's MHA-only row: W4/A4 on attn.qkv and attn.proj of every block only.
from .mask_rcnn_vitdet_b_4bit import dataloader, lr_multiplier, model, optimizer, quant, train

quant.targets = ["mha"]
train.output_dir = "output/lazy/mask_rcnn_vitdet_b_4bit_mha"
