# retinanet_r18_4bit.py distilled from its FP teacher: feature KD (MSE) on p3 beside the
# detection losses. (QFD's quantized-teacher target needs its teacher stage, which the yacs
# path runs: configs/digits/retinanet_r18_4bit_qfd.yaml.)
from .retinanet_r18_4bit import dataloader, lr_multiplier, model, optimizer, quant, train

train.output_dir = "output/lazy/digits/retinanet_r18_4bit_feature_kd"
distill = dict(
    teacher_weights="output/lazy/digits/retinanet_r18_fp/model_final.pth",
    terms={"feature_kd": {"taps": ["p3"], "weight": 1.0}},
)
