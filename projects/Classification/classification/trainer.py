"""qdet's trainer (quantization, calibration, distillation, EWGS, atomic checkpoints) with
classification loaders and top-1 evaluation."""

from __future__ import annotations

from detectron2.data import (
    DatasetCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.samplers import TrainingSampler

from qdet.datafree import ZeroShotTrainerMixin
from qdet.engine import QDetTrainer
from qdet.engine.trainer import SeededMapper

from .data import ClassificationMapper
from .evaluation import ClassificationEvaluator
from .zeroshot import ZeroShotData


class ClassificationTrainer(QDetTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        """Batches fixed by ``cfg.SEED`` (>= 0): sampler order and per-sample crops, as
        qdet's detection loader, so the runs of one study seed are paired."""
        dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
        mapper = ClassificationMapper.from_config(cfg, True)
        seed = cfg.SEED if cfg.SEED >= 0 else None
        return build_detection_train_loader(
            dataset=dataset,
            mapper=SeededMapper(mapper, cfg.SEED) if seed is not None else mapper,
            sampler=TrainingSampler(len(dataset), seed=seed),
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=False,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            dataset=DatasetCatalog.get(dataset_name),
            mapper=ClassificationMapper.from_config(cfg, False),
            batch_size=cfg.TEST.IMS_PER_BATCH,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return ClassificationEvaluator()


class ZeroShotTrainer(ZeroShotTrainerMixin, ClassificationTrainer):
    """AKT's zero-shot recipe (``ZEROSHOT.ENABLED``): the student's training batches come
    from a generator trained against the frozen FP teacher (:mod:`.zeroshot`, on
    :mod:`qdet.datafree`); the real training set is never read (``DATASETS.TRAIN`` may be
    empty)."""

    def build_zeroshot_source(self, cfg, model) -> ZeroShotData:
        seed = cfg.SEED if cfg.SEED >= 0 else 0
        return ZeroShotData(cfg, model.distiller.teacher, model, seed)


def trainer_class(cfg) -> type[ClassificationTrainer]:
    """The trainer a config runs with: zero-shot (``ZEROSHOT.ENABLED``) or on the real data."""
    return ZeroShotTrainer if cfg.ZEROSHOT.ENABLED else ClassificationTrainer
