# mask_rcnn_vitdet_b_4bit.py with QFD on the pyramid's p3 (the teacher stage quantizes the
# FP ViTDet-B's p3 to 8 bits first). QFD's ViT rows (Table 8) train without distillation;
# this is its detection recipe carried over, and its weight is not tuned (check the log's
# distill_ratio, about 0.2 is QFD's aim; the distiller warns below 1%).
from .mask_rcnn_vitdet_b_4bit import dataloader, lr_multiplier, model, optimizer, quant, train

train.output_dir = "output/lazy/mask_rcnn_vitdet_b_4bit_qfd"
distill = dict(
    teacher_weights="output/lazy/mask_rcnn_vitdet_b_fp/model_final.pth",
    terms={"qfd": {"taps": ["p3"], "weight": 1.0}},
)
