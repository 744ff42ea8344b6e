# vitdet_tiny_4bit.py, W4/A4 only on mlp.fc1 and mlp.fc2 of every block
# (QFD Table 8's MLP-only row)
from .vitdet_tiny_4bit import dataloader, lr_multiplier, model, optimizer, quant, train

quant.targets = ["mlp"]
train.output_dir = "output/lazy/digits/vitdet_tiny_4bit_mlp"
