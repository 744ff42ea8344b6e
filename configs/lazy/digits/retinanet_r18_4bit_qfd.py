# retinanet_r18_4bit.py with QFD (QFD Eq. 7-8): the teacher stage fine-tunes the FP model
# with an 8-bit quantizer on p3 for a tenth of the schedule (output_dir/teacher_stage),
# then the 4-bit student distils that quantized p3 (MSE) beside the detection losses.
from .retinanet_r18_4bit import dataloader, lr_multiplier, model, optimizer, quant, train

train.output_dir = "output/lazy/digits/retinanet_r18_4bit_qfd"
distill = dict(
    teacher_weights="output/lazy/digits/retinanet_r18_fp/model_final.pth",
    terms={"qfd": {"taps": ["p3"], "weight": 1.0}},
    teacher_feature_bits=8,
)
