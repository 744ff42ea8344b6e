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
from detectron2.utils import comm

from qdet.engine import QDetTrainer
from qdet.engine.hooks import CalibrationHook
from qdet.engine.trainer import SeededMapper

from .data import ClassificationMapper
from .evaluation import ClassificationEvaluator
from .zeroshot import GeneratedBatches, ZeroShotData, ZeroShotHook


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


class ZeroShotTrainer(ClassificationTrainer):
    """AKT's zero-shot recipe (``ZEROSHOT.ENABLED``): the student's training batches come
    from a generator trained against the frozen FP teacher (:mod:`.zeroshot`); the real
    training set is never read (``DATASETS.TRAIN`` may be empty). Needs the teacher
    (``DISTILL.ENABLED``) and ``DISTILL.LABEL_FREE``: generated images have no labels."""

    def __init__(self, cfg):
        if not (cfg.DISTILL.ENABLED and cfg.DISTILL.LABEL_FREE):
            raise ValueError(
                "ZEROSHOT.ENABLED needs DISTILL.ENABLED True and DISTILL.LABEL_FREE True: "
                "the student learns from the teacher's outputs on generated images only"
            )
        if comm.get_world_size() > 1:
            raise ValueError("zero-shot training runs in one process (one generator)")
        self._zeroshot = None
        super().__init__(cfg)
        # build_hooks made the checkpointer: the generator is saved and resumed with the model.
        self.checkpointer.checkpointables["zeroshot_generator"] = self._zeroshot

    def build_model(self, cfg):
        model = super().build_model(cfg)
        seed = cfg.SEED if cfg.SEED >= 0 else 0
        self._zeroshot = ZeroShotData(cfg, model.distiller.teacher, model, seed)
        return model

    def build_train_loader(self, cfg):
        return GeneratedBatches(self._zeroshot, train_generator=True)

    def sample_loader(self):
        return GeneratedBatches(self._zeroshot, train_generator=False)

    def build_hooks(self):
        z = self.cfg.ZEROSHOT
        hooks = super().build_hooks()
        calibration = next(h for h in hooks if isinstance(h, CalibrationHook))
        others = [h for h in hooks if h is not calibration]
        warmup = ZeroShotHook(self._zeroshot, z.WARMUP_ITERS, z.FREEZE_STUDENT_BN)
        # The student's quantizers are calibrated on warmed-up images, unless the warm-up
        # itself runs the student (AdaDFQ's terms): it must not meet uncalibrated
        # quantizers, which would initialise themselves from the untrained generator.
        if z.LOSS == "adadfq":
            return [calibration, warmup, *others]
        return [warmup, calibration, *others]


def trainer_class(cfg) -> type[ClassificationTrainer]:
    """The trainer a config runs with: zero-shot (``ZEROSHOT.ENABLED``) or on the real data."""
    return ZeroShotTrainer if cfg.ZEROSHOT.ENABLED else ClassificationTrainer
