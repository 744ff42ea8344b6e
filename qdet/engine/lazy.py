"""QAT from a LazyConfig: Detectron2's ``tools/lazyconfig_train_net.py`` loop, plus a
``quant`` node (the ``QUANT`` keys in lower case, :func:`qdet.quantize_model`) and an
optional ``distill`` node.

    quant = dict(w_bits=4, a_bits=4, targets=["mha"], calib_batches=4)
    distill = dict(
        teacher_weights="output/.../model_final.pth",  # the FP model of this config
        terms={"feature_kd": {"taps": ["p3"], "weight": 1.0}},
        label_free=False,
    )

``quant = dict(enabled=False)`` trains the model in FP (the teacher). Everything else is
Detectron2's: ``model``, ``dataloader``, ``optimizer``, ``lr_multiplier``, ``train``.
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from detectron2.config.instantiate import locate
from detectron2.data import build_detection_train_loader
from detectron2.engine import default_writers, hooks, launch
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from torch import nn

from qdet.distill.distiller import attach_distiller
from qdet.engine.checkpoint import AtomicCheckpointer, check_calibrated, non_finite_message
from qdet.engine.checks import check_output_dir
from qdet.engine.exact_resume import ResumableAMPTrainer, ResumableSimpleTrainer
from qdet.engine.hooks import CalibrationHook
from qdet.engine.lazy_config import plain, quant_bits, quant_settings
from qdet.engine.optimizer import SGDWithAdamGroups, with_quantizer_group
from qdet.engine.resumable_loader import resumable_train_loader
from qdet.engine.teacher_stage import (
    build_lazy_teacher,
    check_lazy_stage_input,
    lazy_teacher_model,
    lazy_teacher_stage,
    lazy_teacher_stage_config,
)
from qdet.quantization import deployed_weight_bytes
from qdet.quantize import quantize_model

logger = logging.getLogger(__name__)


def build_model(cfg) -> nn.Module:
    """``cfg.model``, quantized as ``cfg.quant`` says (on ``cfg.train.device``)."""
    settings, trainer = quant_settings(cfg)
    model = instantiate(cfg.model)
    if trainer["enabled"]:
        summary = quantize_model(model, **settings)
        logger.info("Quantized %d layers:\n%s", len(summary), summary)
    elif settings:
        raise ValueError(f"quant.enabled is False but quant sets {sorted(settings)}: drop them")
    return model.to(cfg.train.device)


def train_teacher_stage(cfg) -> str:
    """QFD's teacher stage (QFD, "Experimental settings"): the FP teacher fine-tuned with an
    8-bit (``distill.teacher_feature_bits``) quantizer on the qfd tap
    (:func:`qdet.engine.teacher_stage.lazy_teacher_stage_config`); returns its checkpoint,
    ``<train.output_dir>/teacher_stage/model_final.pth``."""
    check_lazy_stage_input(cfg)
    stage = lazy_teacher_stage_config(cfg)
    model = lazy_teacher_model(cfg, with_feature_quantizer=True).to(cfg.train.device)
    logger.info(
        "QFD teacher stage: %d iterations -> %s", stage.train.max_iter, stage.train.output_dir
    )
    _train(stage, model, resume=False, calib_batches=quant_settings(cfg)[1]["calib_batches"])
    return lazy_teacher_stage(cfg).weights


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """``cfg.optimizer`` on ``model``, the quantizer parameters in their own group
    (``quant.base_lr``, Adam steps with ``quant.optimizer adam`` under SGD)."""
    _, trainer = quant_settings(cfg)
    cfg.optimizer.params.model = model
    groups = instantiate(cfg.optimizer.params)
    adam = trainer["optimizer"] == "adam"
    groups = with_quantizer_group(groups, model, trainer["base_lr"], trainer["weight_decay"], adam)
    kwargs = {k: v for k, v in plain(cfg.optimizer).items() if k not in ("_target_", "params")}
    optimizer_cls = cfg.optimizer._target_
    if isinstance(optimizer_cls, str):
        optimizer_cls = locate(optimizer_cls)
    if optimizer_cls is torch.optim.SGD:
        optimizer_cls = SGDWithAdamGroups
    return optimizer_cls(groups, **kwargs)


def do_test(cfg, model: nn.Module):
    """COCO (or the config's) evaluation of ``model`` on ``cfg.dataloader.test``; none
    without a ``dataloader.evaluator`` (or with ``dataloader.evaluator=null``)."""
    if cfg.dataloader.get("evaluator") is None:
        return {}
    ret = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(ret)
    return ret


def do_train(cfg, resume: bool = False) -> None:
    """Train ``cfg`` (QAT; with a teacher when it has a ``distill`` node, after QFD's
    teacher stage when a ``qfd`` term needs it and its output is missing), Detectron2's
    LazyConfig loop with calibration before the first step and atomic checkpoints."""
    _, trainer_keys = quant_settings(cfg)
    _check_init_checkpoint(cfg, resume)
    stage = lazy_teacher_stage(cfg)
    if stage is not None and not os.path.isfile(stage.weights):
        train_teacher_stage(cfg)
    model = build_model(cfg)
    if "distill" in cfg:
        d = cfg.distill
        attach_distiller(
            model,
            build_lazy_teacher(cfg, cfg.train.device),
            plain(d.terms),
            label_free=bool(d.get("label_free", False)),
            gt_weight=float(d.get("gt_weight", 1.0)),
        )
    calib = trainer_keys["calib_batches"] if trainer_keys["enabled"] else 0
    _train(cfg, model, resume, calib)


def _train(cfg, model: nn.Module, resume: bool, calib_batches: int) -> None:
    """Detectron2's LazyConfig training loop on ``model``; quantizers calibrated on
    ``calib_batches`` training batches first (0: none)."""
    optimizer = build_optimizer(cfg, model)
    train_loader = build_train_loader(cfg)
    ddp = plain(cfg.train.ddp)
    if model.device.type == "cpu":
        ddp.pop("fp16_compression", None)  # a CUDA communication hook
    model = create_ddp_model(model, **ddp)
    trainer = (ResumableAMPTrainer if cfg.train.amp.enabled else ResumableSimpleTrainer)(
        model, train_loader, optimizer
    )
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    calibration = []
    if calib_batches:
        calibration = [CalibrationHook(lambda: build_train_loader(cfg), calib_batches)]
    main = comm.is_main_process()
    trainer.register_hooks(
        [
            *calibration,
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if main
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.start_loader_at(start_iter)
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except FloatingPointError as e:
        raise FloatingPointError(non_finite_message(e, checkpointer)) from e


def build_train_loader(cfg):
    """``cfg.dataloader.train``; when it is Detectron2's ``build_detection_train_loader``
    with its own sampler and ``train.seed`` >= 0, the same batches from the loader whose
    position is part of the checkpoint (:func:`qdet.engine.resumable_loader.
    resumable_train_loader`: Detectron2's seeded ``TrainingSampler`` stream and
    aspect-ratio grouping, each sample augmented with generators seeded by its place in the
    stream), so a killed run resumes bit-identical. Any other loader is instantiated as it
    is (a resumed run then starts it again)."""
    node = cfg.dataloader.train
    target = node.get("_target_")
    target = locate(target) if isinstance(target, str) else target
    seed = int(cfg.train.get("seed", -1))
    planned = (
        target is build_detection_train_loader
        and seed >= 0
        and node.get("sampler") is None
        and node.get("dataset") is not None
        and node.get("mapper") is not None
    )
    if not planned:
        return instantiate(node)
    dataset = instantiate(node.dataset)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return instantiate(node)
    return resumable_train_loader(
        dataset,
        instantiate(node.mapper),
        seed,
        int(node.total_batch_size),
        bool(node.get("aspect_ratio_grouping", True)),
        int(node.get("num_workers", 0)),
    )


def check_run(cfg, resume: bool = False, restart: bool = False) -> None:
    """What a training run checks before it writes anything (``config.yaml`` included): its
    ``train.init_checkpoint`` exists, and its ``train.output_dir`` holds no other run's
    checkpoints unless it resumes or starts over (``restart``)."""
    _check_init_checkpoint(cfg, resume)
    check_output_dir(cfg.train.output_dir, resume, restart, key="train.output_dir")


def _check_init_checkpoint(cfg, resume: bool) -> None:
    """A local ``train.init_checkpoint`` that does not exist is an error (Detectron2 would
    log it and train from random weights), unless resuming from the output folder."""
    weights = cfg.train.init_checkpoint
    remote = "://" in weights
    resumable = resume and os.path.isfile(os.path.join(cfg.train.output_dir, "last_checkpoint"))
    if weights and not remote and not os.path.isfile(weights) and not resumable:
        raise FileNotFoundError(
            f"train.init_checkpoint={weights!r} does not exist: train the FP model first "
            "(tools/lazy_train_net.py on its config, quant.enabled=False, writes "
            "<train.output_dir>/model_final.pth), or set train.init_checkpoint=''"
        )


def do_eval(cfg):
    """Evaluate ``cfg.train.init_checkpoint`` in the quantized (or FP) model of ``cfg``."""
    model = build_model(cfg)
    weights = cfg.train.init_checkpoint
    if not weights or not os.path.isfile(weights):
        raise FileNotFoundError(
            f"train.init_checkpoint={weights!r} does not exist: --eval-only evaluates a "
            "trained checkpoint (tools/lazy_train_net.py writes <train.output_dir>/"
            "model_final.pth)"
        )
    AtomicCheckpointer(model).load(weights)
    check_calibrated(model, weights)
    return do_test(cfg, create_ddp_model(model))


def final_metrics(cfg, num_gpus: int = 1) -> dict:
    """Train ``cfg`` unless ``<train.output_dir>/model_final.pth`` exists (on ``num_gpus``
    through Detectron2's launcher), then its final model's COCO figures, cached in
    ``eval_final.json`` beside it: the lazy counterpart of a study run (box AP, mask AP for
    a model with masks, W/A, training seconds)."""
    out = cfg.train.output_dir
    final, cache = os.path.join(out, "model_final.pth"), os.path.join(out, "eval_final.json")
    seconds_file = os.path.join(out, "train_seconds.json")
    if not os.path.isfile(final):
        start = time.time()
        launch(do_train, num_gpus, args=(cfg,)) if num_gpus > 1 else do_train(cfg)
        with open(seconds_file, "w") as f:
            json.dump(time.time() - start, f)
    if os.path.isfile(cache) and os.path.getmtime(cache) >= os.path.getmtime(final):
        with open(cache) as f:
            return json.load(f)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(final)
    results = do_test(cfg, model.eval())
    bits = quant_bits(cfg)
    metrics = {"W/A": "32/32" if bits is None else "{}/{}".format(*bits)}
    metrics.update({k: results["bbox"][k] for k in ("AP", "AP50", "AP75")})
    if "segm" in results:
        metrics.update({f"mask {k}": results["segm"][k] for k in ("AP", "AP50", "AP75")})
    metrics["weights MiB"] = deployed_weight_bytes(model) / 2**20
    if os.path.isfile(seconds_file):
        with open(seconds_file) as f:
            metrics["train s"] = json.load(f)
    with open(cache, "w") as f:
        json.dump(metrics, f)
    return metrics
