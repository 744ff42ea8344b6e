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

import copy
import logging
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qdet.engine.checkpoint import AtomicCheckpointer
from qdet.engine.hooks import CalibrationHook
from qdet.engine.optimizer import SGDWithAdamGroups, with_quantizer_group
from qdet.modeling.quantized import add_feature_quantizer
from qdet.quantize import quantize_model

logger = logging.getLogger(__name__)

QUANT_NODE_HELP = (
    "add a quant node to the config: quant = dict(w_bits=4, a_bits=4) (the QUANT keys in "
    "lower case, e.g. targets=['mha'] for a ViT), or quant = dict(enabled=False) to train "
    "the model in FP"
)
# quant keys the trainer reads (calibration, the quantizer parameters' optimizer group);
# the rest go to qdet.quantize_model.
_TRAINER_KEYS = {
    "enabled": True,
    "calib_batches": 4,
    "optimizer": "adam",
    "base_lr": 1e-5,
    "weight_decay": 0.0,
}
_DISTILL_KEYS = (
    "teacher_weights",  # the FP model's checkpoint
    "teacher_model",  # its model node (default: the student's cfg.model)
    "terms",  # {loss: {"taps": [...], "weight": w, **options}} (attach_distiller)
    "label_free",
    "gt_weight",
    "teacher_stage_iters",  # QFD's teacher stage (a qfd term): default max_iter // 10
    "teacher_feature_bits",  # its feature quantizer's bits (8)
)


def _plain(node) -> dict:
    """A config node as a plain dict (interpolations resolved)."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def quant_settings(cfg) -> tuple[dict, dict]:
    """(``qdet.quantize_model`` keywords, the trainer's keys) of ``cfg.quant``."""
    if "quant" not in cfg:
        raise ValueError(f"the config has no quant node: {QUANT_NODE_HELP}")
    settings = _plain(cfg.quant)
    trainer = {k: settings.pop(k, default) for k, default in _TRAINER_KEYS.items()}
    if trainer["optimizer"] not in ("adam", "sgd"):
        raise ValueError(f"quant.optimizer={trainer['optimizer']!r}: use 'adam' or 'sgd'")
    return settings, trainer


def quant_bits(cfg) -> tuple[int, int] | None:
    """(weight bits, activation bits) that ``cfg.quant`` trains (qdet's ``QUANT`` defaults
    for keys it leaves out), or None for an FP model."""
    settings, trainer = quant_settings(cfg)
    if not trainer["enabled"]:
        return None
    from detectron2.config import get_cfg

    from qdet.config import add_qdet_config

    defaults = add_qdet_config(get_cfg()).QUANT
    w_bits = settings.get("w_bits", defaults.W_BITS)
    return int(w_bits), int(settings.get("a_bits", defaults.A_BITS))


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


def qfd_tap(cfg) -> str | None:
    """The teacher feature a ``qfd`` term distils (QFD's teacher stage quantizes it)."""
    from qdet.distill.distiller import specs_from_terms

    if "distill" not in cfg:
        return None
    taps = [
        t for s in specs_from_terms(_plain(cfg.distill.terms)) if s.loss == "qfd" for t in s.taps
    ]
    if len(taps) > 1:
        raise ValueError(f"the qfd term has taps {taps}: QFD's teacher stage quantizes one")
    return taps[0] if taps else None


def teacher_stage_weights(cfg) -> str:
    return os.path.join(cfg.train.output_dir, "teacher_stage", "model_final.pth")


def _teacher_model(cfg, with_feature_quantizer: bool) -> nn.Module:
    model = instantiate(cfg.distill.get("teacher_model") or cfg.model)
    tap = qfd_tap(cfg) if with_feature_quantizer else None
    if tap is not None:
        bits = int(cfg.distill.get("teacher_feature_bits", 8))
        add_feature_quantizer(model, tap, bits, signed=True)
    return model


def build_teacher(cfg, device) -> nn.Module:
    """The frozen teacher of ``cfg.distill``: ``teacher_model`` (default ``cfg.model``) with
    ``teacher_weights``, or, with a ``qfd`` term, the teacher stage's model (its tap
    quantized by its trained feature quantizer)."""
    d = cfg.distill
    unknown = sorted(set(d) - set(_DISTILL_KEYS))
    if unknown:
        raise ValueError(f"distill has unknown keys {unknown}: use {list(_DISTILL_KEYS)}")
    qfd = qfd_tap(cfg) is not None
    weights = teacher_stage_weights(cfg) if qfd else d.get("teacher_weights", "")
    if not weights or not os.path.isfile(weights):
        raise FileNotFoundError(
            f"the teacher checkpoint {weights!r} does not exist: "
            + (
                "QFD's teacher stage writes it (tools/lazy_train_net.py runs it first)"
                if qfd
                else "train the FP model first (tools/lazy_train_net.py with "
                "quant.enabled=False writes <train.output_dir>/model_final.pth) and set "
                "distill.teacher_weights"
            )
        )
    teacher = _teacher_model(cfg, with_feature_quantizer=qfd).to(device)
    DetectionCheckpointer(teacher).load(weights)
    return teacher


def teacher_stage_config(cfg):
    """QFD's teacher stage as a LazyConfig: the student's data, optimizer and init from
    ``distill.teacher_weights``, for ``distill.teacher_stage_iters`` (default a tenth of
    the schedule) at the base learning rate after the student's warmup (at most half the
    stage), as the yacs path's ``teacher_stage_config``: the student's milestones lie past
    so short a run. Checkpoints at its end only; no evaluation."""
    from detectron2.config import LazyCall as L
    from detectron2.solver import WarmupParamScheduler
    from fvcore.common.param_scheduler import MultiStepParamScheduler

    d = cfg.distill
    stage = copy.deepcopy(cfg)
    iters = int(d.get("teacher_stage_iters") or max(cfg.train.max_iter // 10, 1))
    stage.train.max_iter = iters
    stage.train.output_dir = os.path.dirname(teacher_stage_weights(cfg))
    stage.train.init_checkpoint = d.get("teacher_weights", "")
    stage.train.eval_period = 0
    stage.train.checkpointer.period = iters
    schedule = cfg.lr_multiplier
    warmup_iters = float(schedule.get("warmup_length", 0.0)) * cfg.train.max_iter
    stage.lr_multiplier = L(WarmupParamScheduler)(
        # one value, no milestone (fvcore's constant scheduler refuses where = 1.0, where
        # Detectron2's LRMultiplier ends)
        scheduler=L(MultiStepParamScheduler)(values=[1.0], milestones=[], num_updates=iters),
        warmup_length=min(warmup_iters, iters // 2) / iters,
        warmup_factor=float(schedule.get("warmup_factor", 0.001)),
    )
    if "evaluator" in stage.dataloader:
        del stage.dataloader["evaluator"]  # nothing reads the stage's AP
    return stage


def train_teacher_stage(cfg) -> str:
    """QFD's teacher stage (QFD, "Experimental settings"): the FP teacher fine-tuned with an
    8-bit (``distill.teacher_feature_bits``) quantizer on the qfd tap
    (:func:`teacher_stage_config`); returns its checkpoint,
    ``<train.output_dir>/teacher_stage/model_final.pth``."""
    weights = cfg.distill.get("teacher_weights", "")
    if not weights or not os.path.isfile(weights):
        raise FileNotFoundError(
            f"distill.teacher_weights={weights!r} does not exist: train the FP model first "
            "(tools/lazy_train_net.py with quant.enabled=False writes "
            "<train.output_dir>/model_final.pth)"
        )
    stage = teacher_stage_config(cfg)
    model = _teacher_model(cfg, with_feature_quantizer=True).to(cfg.train.device)
    logger.info(
        "QFD teacher stage: %d iterations -> %s", stage.train.max_iter, stage.train.output_dir
    )
    _train(stage, model, resume=False, calib_batches=quant_settings(cfg)[1]["calib_batches"])
    return teacher_stage_weights(cfg)


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """``cfg.optimizer`` on ``model``, the quantizer parameters in their own group
    (``quant.base_lr``, Adam steps with ``quant.optimizer adam`` under SGD)."""
    _, trainer = quant_settings(cfg)
    cfg.optimizer.params.model = model
    groups = instantiate(cfg.optimizer.params)
    adam = trainer["optimizer"] == "adam"
    groups = with_quantizer_group(groups, model, trainer["base_lr"], trainer["weight_decay"], adam)
    kwargs = {k: v for k, v in _plain(cfg.optimizer).items() if k not in ("_target_", "params")}
    optimizer_cls = cfg.optimizer._target_
    if isinstance(optimizer_cls, str):
        from detectron2.config.instantiate import locate

        optimizer_cls = locate(optimizer_cls)
    if optimizer_cls is torch.optim.SGD:
        optimizer_cls = SGDWithAdamGroups
    return optimizer_cls(groups, **kwargs)


def do_test(cfg, model: nn.Module):
    """COCO (or the config's) evaluation of ``model`` on ``cfg.dataloader.test``."""
    if "evaluator" not in cfg.dataloader:
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
    if qfd_tap(cfg) is not None and not os.path.isfile(teacher_stage_weights(cfg)):
        train_teacher_stage(cfg)
    model = build_model(cfg)
    if "distill" in cfg:
        from qdet.distill import attach_distiller

        d = cfg.distill
        attach_distiller(
            model,
            build_teacher(cfg, cfg.train.device),
            _plain(d.terms),
            label_free=bool(d.get("label_free", False)),
            gt_weight=float(d.get("gt_weight", 1.0)),
        )
    calib = trainer_keys["calib_batches"] if trainer_keys["enabled"] else 0
    _train(cfg, model, resume, calib)


def _train(cfg, model: nn.Module, resume: bool, calib_batches: int) -> None:
    """Detectron2's LazyConfig training loop on ``model``; quantizers calibrated on
    ``calib_batches`` training batches first (0: none)."""
    optimizer = build_optimizer(cfg, model)
    train_loader = instantiate(cfg.dataloader.train)
    ddp = _plain(cfg.train.ddp)
    if model.device.type == "cpu":
        ddp.pop("fp16_compression", None)  # a CUDA communication hook
    model = create_ddp_model(model, **ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(
        model, train_loader, optimizer
    )
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    calibration = []
    if calib_batches:
        loader = lambda: instantiate(cfg.dataloader.train)  # noqa: E731
        calibration = [CalibrationHook(loader, calib_batches)]
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
    trainer.train(start_iter, cfg.train.max_iter)


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
    DetectionCheckpointer(model).load(weights)
    return do_test(cfg, create_ddp_model(model))


def final_metrics(cfg, num_gpus: int = 1) -> dict:
    """Train ``cfg`` unless ``<train.output_dir>/model_final.pth`` exists (on ``num_gpus``
    through Detectron2's launcher), then its final model's COCO figures, cached in
    ``eval_final.json`` beside it: the lazy counterpart of a study run (box AP, mask AP for
    a model with masks, W/A, training seconds)."""
    import json
    import time

    from detectron2.engine import launch

    from qdet.quantization import deployed_weight_bytes

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
