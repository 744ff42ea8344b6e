# vitdet_tiny_4bit.py, W4/A4 only on attn.qkv and attn.proj of every block
# (QFD Table 8's MHA-only row)
from .vitdet_tiny_4bit import dataloader, lr_multiplier, model, optimizer, quant, train

quant.targets = ["mha"]
train.output_dir = "output/lazy/digits/vitdet_tiny_4bit_mha"
