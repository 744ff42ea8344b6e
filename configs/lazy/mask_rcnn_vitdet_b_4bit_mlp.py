# QFD Table 8's MLP-only row: W4/A4 on mlp.fc1 and mlp.fc2 of every block only.
from .mask_rcnn_vitdet_b_4bit import dataloader, lr_multiplier, model, optimizer, quant, train

quant.targets = ["mlp"]
train.output_dir = "output/lazy/mask_rcnn_vitdet_b_4bit_mlp"
