# RetinaNet R50-FPN on COCO from Detectron2's own LazyConfig model
# (common/models/retinanet.py, COCO-Detection/retinanet_R_50_FPN_1x.py's data and schedule)
# at W4/A4 on every conv of backbone, FPN and head but the stem and the predictors (QFD's
# rule), fine-tuned from the FP 1x model for a third of its schedule.
from detectron2 import model_zoo

_base = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
model, dataloader, optimizer, lr_multiplier, train = (
    _base.model,
    _base.dataloader,
    _base.optimizer,
    _base.lr_multiplier,
    _base.train,
)
train.init_checkpoint = (
    "detectron2://COCO-Detection/retinanet_R_50_FPN_1x/190397773/model_final_bfca0b.pkl"
)
train.max_iter = 30000
lr_multiplier.scheduler.milestones = [20000, 26667]
optimizer.lr = 0.001
train.output_dir = "output/lazy/retinanet_R_50_FPN_4bit"
# Seeds the model, and plans the batches ahead so that a killed run resumes bit-identical
# (qdet.engine.lazy.build_train_loader); -1 draws a seed, as Detectron2 does.
train.seed = 0
quant = dict(w_bits=4, a_bits=4)
