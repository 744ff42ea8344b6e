"""The classification study's runs: how one trains (QFD's two stages, or zero-shot) and
how it is scored (top-1 / top-5 on DATASETS.TEST, cached), as module-level functions that
:class:`qdet.study.Study` runs in its worker processes."""

from __future__ import annotations

import json
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from qdet.engine.stages import train_stages

from .data import register_cifar
from .trainer import ClassificationTrainer, trainer_class


def train_classifier(cfg: CfgNode) -> None:
    """One run as ``train_net.py`` trains it (the teacher stage first for a qfd term)."""
    register_cifar(cfg)
    train_stages(cfg, trainer_cls=trainer_class(cfg), log=lambda message: None, restart=True)


def evaluate_classifier(cfg: CfgNode) -> dict:
    """Top-1 and top-5 (%) of ``OUTPUT_DIR/model_final.pth`` on DATASETS.TEST, cached in
    ``top1_final.json`` (newer than the checkpoint)."""
    cache = os.path.join(cfg.OUTPUT_DIR, "top1_final.json")
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if os.path.isfile(cache) and os.path.getmtime(cache) >= os.path.getmtime(final):
        with open(cache) as f:
            return json.load(f)
    register_cifar(cfg)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(final)
    scores = ClassificationTrainer.test(cfg, model)["classification"]
    result = {
        "W/A": f"{cfg.QUANT.W_BITS}/{cfg.QUANT.A_BITS}" if cfg.QUANT.ENABLED else "32/32",
        "top1": scores["top1"],
        "top5": scores["top5"],
    }
    with open(cache, "w") as f:
        json.dump(result, f)
    return result
