"""QDetTrainer: Detectron2's DefaultTrainer for QAT, with or without a distilling teacher."""

from __future__ import annotations

import logging
import os
import random
import weakref

import numpy as np
import torch
from detectron2.data import (
    DatasetCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model
from detectron2.engine.hooks import PeriodicCheckpointer
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import Registry

from qdet.data.mapper import SizedBoxMapper
from qdet.engine.checkpoint import AtomicCheckpointer, non_finite_message
from qdet.engine.exact_resume import (
    ResumableAMPTrainer,
    ResumableSimpleTrainer,
    jit_unoptimized,
)
from qdet.engine.hooks import (
    CalibrationHook,
    EWGSDeltaHook,
    FreezeBNHook,
    epoch_iterations,
)
from qdet.engine.optimizer import build_qat_optimizer
from qdet.engine.resumable_loader import resumable_train_loader
from qdet.engine.teacher_stage import build_distiller
from qdet.quantization.quantizers import EWGSQuantizer


def has_compiled_ops() -> bool:
    """Whether Detectron2's C++/CUDA extension loads (it does not for a 3.10 wheel on 3.11)."""
    try:
        from detectron2 import _C  # noqa: F401  (a probe: whether the extension loads)
    except ImportError:
        return False
    return True


TRAINER_REGISTRY = Registry("QDET_TRAINER")
TRAINER_REGISTRY.__doc__ = """The trainers a run can use, by class name: ``QDetTrainer`` (on
DATASETS.TRAIN), and ``DataFreeTrainer``, which :mod:`qdet.datafree.detection` registers
(``ZEROSHOT.ENABLED``); :func:`qdet.engine.stages.trainer_class` picks one."""


@TRAINER_REGISTRY.register()
class QDetTrainer(DefaultTrainer):
    """DefaultTrainer with: the student's teacher attached (``DISTILL.ENABLED``); quantizer
    parameters in their own optimizer group; calibration before the first step; atomic
    checkpoints; COCO evaluation. AMP (``SOLVER.AMP.ENABLED``) and DDP come from Detectron2
    on GPUs; on a CPU, AMP is bfloat16 autocast (:class:`CPUAutocastTrainer`).
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__, but DDP also on CPU processes (gloo), which take no
        # device_ids, and the atomic checkpointer from the start.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = model.device.type == "cpu"
        model = create_ddp_model(
            model,
            broadcast_buffers=False,
            device_ids=None if on_cpu else [comm.get_local_rank()],
            # Label-free, the heads' parts no term reaches get no gradient.
            find_unused_parameters=cfg.DISTILL.ENABLED and cfg.DISTILL.LABEL_FREE,
        )
        trainer_cls = ResumableSimpleTrainer
        if cfg.SOLVER.AMP.ENABLED:
            trainer_cls = CPUAutocastTrainer if on_cpu else ResumableAMPTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        if cfg.DISTILL.ENABLED:
            model.attach_distiller(build_distiller(cfg, model))
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        """The training loader, whose batches are a function of ``cfg.SEED`` alone (when
        >= 0): Detectron2's seeded sampler stream and aspect-ratio grouping, each sample
        augmented with generators seeded by its place in the stream
        (:mod:`qdet.engine.resumable_loader`). Runs of one study seed (FP, baseline, QFD,
        ...) then see the same images in the same order with the same augmentations,
        whatever else consumed randomness (paired comparisons), and a resumed run goes on
        with the batches the uninterrupted run would have seen (:meth:`resume_or_load`)."""
        if cfg.SEED < 0:
            return build_detection_train_loader(cfg, mapper=SizedBoxMapper(cfg, True))
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        return resumable_train_loader(
            dataset,
            SizedBoxMapper(cfg, True),
            cfg.SEED,
            cfg.SOLVER.IMS_PER_BATCH,
            cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            cfg.DATALOADER.NUM_WORKERS,
        )

    def resume_or_load(self, resume: bool = True) -> None:
        """Detectron2's resume (weights, optimizer, scheduler, iteration, hooks), then the
        training loader moved to the resumed iteration and torch's generator put back
        (:meth:`qdet.engine.exact_resume.ExactResumeMixin.start_loader_at`)."""
        super().resume_or_load(resume=resume)
        self._trainer.start_loader_at(self.start_iter)

    def train(self):
        """Detectron2's training (hooks, steps, the evaluation after them) with TorchScript's
        optimising executor off (:func:`qdet.engine.exact_resume.jit_unoptimized`)."""
        with jit_unoptimized():
            return super().train()

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:
            raise FloatingPointError(non_finite_message(e, self.checkpointer)) from e

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_qat_optimizer(cfg, model)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, batch_size=cfg.TEST.IMS_PER_BATCH)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if dataset_name.startswith("qdet_digits"):
            DatasetCatalog.get(dataset_name)  # builds the embedded data if needed
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(
            dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops()
        )

    def build_hooks(self):
        # Called at the end of DefaultTrainer.__init__: swap in the atomic checkpointer
        # before the periodic-checkpoint hook captures it.
        self.checkpointer = AtomicCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        hooks = super().build_hooks()
        keep = self.cfg.SOLVER.CHECKPOINTS_TO_KEEP
        for hook in hooks:
            if isinstance(hook, PeriodicCheckpointer) and keep > 0:
                hook.max_to_keep = keep  # fvcore's PeriodicCheckpointer deletes the older ones
        calib = CalibrationHook(self.sample_loader, self.cfg.QUANT.CALIB_BATCHES)
        freeze = (
            [FreezeBNHook(self.cfg.QUANT.FREEZE_BN_ITER)] if self.cfg.QUANT.FREEZE_BN_ITER else []
        )
        return [calib, *freeze, *self._ewgs_hooks(), *hooks]

    def _ewgs_hooks(self) -> list:
        """EWGS's delta refresh, when the model has EWGS quantizers and the Hessian is on."""
        q = self.cfg.QUANT
        model = self._trainer.model
        if not (q.EWGS_USE_HESSIAN and any(isinstance(m, EWGSQuantizer) for m in model.modules())):
            return []
        images_per_batch = self.cfg.SOLVER.IMS_PER_BATCH
        period = q.EWGS_UPDATE_PERIOD or epoch_iterations(
            self._trainer.data_loader, images_per_batch
        )
        logging.getLogger(__name__).info(
            "EWGS: delta refreshed every %d iterations on %d batches (%s estimator)",
            period,
            q.EWGS_HESSIAN_BATCHES,
            q.EWGS_HUTCHINSON,
        )
        return [
            EWGSDeltaHook(self.sample_loader, period, q.EWGS_HESSIAN_BATCHES, q.EWGS_HUTCHINSON)
        ]

    def sample_loader(self):
        """A new loader of training batches for what only reads them (calibration, EWGS's
        Hessian): the training loader's batches, with its own mapper. A trainer whose
        training loader does more than read (the zero-shot generator trains as it draws)
        returns one that does not."""
        return self.build_train_loader(self.cfg)


class CPUAutocastTrainer(ResumableSimpleTrainer):
    """``SOLVER.AMP.ENABLED`` on a CPU: each step under ``torch.autocast("cpu", bfloat16)``
    (Detectron2's AMPTrainer is CUDA-only). Convolutions and matmuls run in bfloat16, which
    oneDNN runs about 1.8x faster than float32 on CPUs with AVX512-BF16 (the digits FP
    teacher's step); bfloat16 keeps float32's exponent range, so no loss scaling. Parameters,
    gradients and the optimizer stay float32: autograd returns each gradient in its
    parameter's dtype. Meant for FP models: a fake-quantized grid rounded to bfloat16 is no
    longer exact."""

    def run_step(self):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().run_step()


class SeededMapper:
    """Runs ``mapper`` with NumPy's and Python's global generators (which Detectron2's
    augmentations draw from) seeded with (``seed``, process rank, loader worker, call
    number), and puts their states back afterwards. Each worker maps its samples in sampler
    order, so the augmentation of every sample is fixed by the seed."""

    def __init__(self, mapper, seed: int):
        self.mapper, self.seed, self.calls = mapper, seed, 0

    def __call__(self, dataset_dict):
        worker = torch.utils.data.get_worker_info()
        key = [self.seed, comm.get_rank(), worker.id if worker else 0, self.calls]
        np_state, py_state = np.random.get_state(), random.getstate()
        np.random.seed(key)
        random.seed("-".join(map(str, key)))
        self.calls += 1
        try:
            return self.mapper(dataset_dict)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
