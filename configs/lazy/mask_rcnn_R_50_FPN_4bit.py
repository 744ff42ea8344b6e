# Detectron2's new Mask R-CNN R50-FPN baseline (new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py:
# SyncBN, LSJ, from scratch) at W4/A4, every conv but the stem and the predictors (qdet's
# rule), fine-tuned from that FP model for a tenth of its schedule.
from detectron2 import model_zoo

_base = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
model, dataloader, optimizer, lr_multiplier, train = (
    _base.model,
    _base.dataloader,
    _base.optimizer,
    _base.lr_multiplier,
    _base.train,
)
# The FP model of that config, from Detectron2's model zoo.
train.init_checkpoint = (
    "detectron2://new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ/42047764/model_final_bb69de.pkl"
)
train.max_iter = 18438
lr_multiplier.scheduler.milestones = [16389, 17754]
optimizer.lr = 0.01
train.output_dir = "output/lazy/mask_rcnn_R_50_FPN_4bit"
# Seeds the model, and plans the batches ahead so that a killed run resumes bit-identical
# (qdet.engine.lazy.build_train_loader); -1 draws a seed, as Detectron2 does.
train.seed = 0
quant = dict(w_bits=4, a_bits=4)
