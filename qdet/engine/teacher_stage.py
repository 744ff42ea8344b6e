"""The teacher of a distilled run and QFD's teacher stage, for yacs and LazyConfig alike.

QFD ("Experimental settings"): before the student, the FP teacher is fine-tuned with an
8-bit quantizer on the feature its ``qfd`` term distils (p3); the student then matches
that quantized feature (QFD Eq. 7). Either kind of config is read into a plain
:class:`TeacherStage` (the tap, its bits, the stage's length, the FP weights it starts from
and where it writes); what follows from it is written once here: the stage's schedule
(:func:`stage_schedule`), the teacher's model with its feature quantizer
(:func:`add_stage_quantizer`) and its checked loading (:func:`load_checked`).

- yacs: :func:`yacs_teacher_stage`, :func:`teacher_stage_config` (the stage as a config
  ``tools/train_net.py`` trains), :func:`teacher_config`, :func:`load_teacher`,
  :func:`build_distiller`;
- LazyConfig: :func:`lazy_teacher_stage`, :func:`lazy_teacher_stage_config`,
  :func:`lazy_teacher_model`, :func:`build_lazy_teacher` (trained by
  :mod:`qdet.engine.lazy`).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, LazyCall, get_cfg, instantiate
from detectron2.modeling import build_model
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from torch import nn

from qdet.config import add_qdet_config
from qdet.distill.distiller import Distiller
from qdet.distill.terms import qfd_term_tap, specs_from_terms, term_specs
from qdet.engine.lazy_config import check_distill_node, plain
from qdet.modeling.quantized import add_feature_quantizer

logger = logging.getLogger(__name__)

STAGE_FOLDER = "teacher_stage"  # under the student's output folder


@dataclass(frozen=True)
class TeacherStage:
    """QFD's teacher stage of one run, whatever its config's kind."""

    tap: str  # the qfd term's tap: the teacher feature the stage quantizes
    bits: int  # its quantizer's bits (8)
    signed: bool  # its quantizer's sign (signed: FPN outputs are)
    iters: int  # the stage's length
    init_weights: str  # the FP teacher it starts from
    weights: str  # where its model_final.pth is


def stage_weights(output_dir: str) -> str:
    """The teacher stage's output under a student's ``output_dir``."""
    return os.path.join(output_dir, STAGE_FOLDER, "model_final.pth")


def stage_schedule(student_max_iter: int, student_warmup_iters: float, iters: int = 0):
    """``(iters, warmup_iters)`` of a teacher stage: ``iters`` (default a tenth of the
    student's schedule) at the base learning rate after the student's warmup, at most half
    the stage; the student's milestones lie past so short a run and are dropped."""
    iters = int(iters or max(student_max_iter // 10, 1))
    return iters, min(student_warmup_iters, iters // 2)


def add_stage_quantizer(model: nn.Module, stage: TeacherStage) -> nn.Module:
    """``model`` with the stage's feature quantizer on its tap (``feature_quantizer``)."""
    add_feature_quantizer(model, stage.tap, stage.bits, stage.signed)
    return model


class _CheckedCheckpointer(DetectionCheckpointer):
    """Keeps the incompatible keys that Detectron2 only logs, so they can be refused."""

    incompatible = None

    def _log_incompatible_keys(self, incompatible) -> None:
        self.incompatible = incompatible
        super()._log_incompatible_keys(incompatible)


# What load_checked's messages name, by kind of config: the model the teacher is built
# from, the command that runs the teacher stage, and QFD's float alternative.
CONFIG_NAMES = {
    "yacs": (
        "DISTILL.TEACHER_CONFIG",
        "tools/train_net.py --stage teacher",
        "DISTILL.LOSS feature_kd",
    ),
    "lazy": ("distill.teacher_model", "tools/lazy_train_net.py", "a feature_kd term"),
}


def load_checked(teacher: nn.Module, weights: str, quantized_feature: bool, kind: str) -> nn.Module:
    """Load ``weights`` into ``teacher``, refusing a checkpoint that does not fit the model
    (other shapes, missing parameters) and, for the stage's model (``quantized_feature``),
    one without a trained feature quantizer. ``kind``: "yacs" or "lazy", the kind of config
    the messages name keys of (:data:`CONFIG_NAMES`)."""
    model_key, stage_command, float_alternative = CONFIG_NAMES[kind]
    checkpointer = _CheckedCheckpointer(teacher)
    checkpointer.load(weights, checkpointables=[])
    result = checkpointer.incompatible
    if result is not None and result.incorrect_shapes:
        name, got, want = result.incorrect_shapes[0]
        raise ValueError(
            f"teacher checkpoint {weights} does not match {model_key}: {name} has "
            f"shape {tuple(got)} in the checkpoint, {tuple(want)} in the model "
            f"({len(result.incorrect_shapes)} such parameters)"
        )
    missing = [k for k in (result.missing_keys if result else []) if "num_batches_tracked" not in k]
    if quantized_feature and any(k.startswith("feature_quantizer.") for k in missing):
        raise ValueError(
            f"teacher checkpoint {weights} has no trained feature quantizer: QFD needs the "
            f"teacher stage's output ({stage_command}), or use {float_alternative}"
        )
    if missing:
        raise ValueError(
            f"teacher checkpoint {weights} lacks {len(missing)} parameters of "
            f"{model_key}'s model, e.g. {missing[:5]}"
        )
    return teacher


# -- yacs ---------------------------------------------------------------------------------
def qfd_tap(cfg: CfgNode) -> str | None:
    """The teacher feature a yacs config's qfd term distils, or None without one."""
    return qfd_term_tap(term_specs(cfg) if cfg.DISTILL.ENABLED else [])


def needs_teacher_stage(cfg: CfgNode) -> bool:
    """Whether the distillation loss wants the feature-quantized teacher (QFD does)."""
    return cfg.DISTILL.ENABLED and qfd_tap(cfg) is not None


def quantized_teacher_weights(cfg: CfgNode) -> str:
    """Where the feature-quantized teacher is (the teacher stage writes it there)."""
    return cfg.DISTILL.QUANTIZED_TEACHER_WEIGHTS or stage_weights(cfg.OUTPUT_DIR)


def yacs_teacher_stage(cfg: CfgNode) -> TeacherStage | None:
    """The teacher stage of a yacs config (``DISTILL.*``), None without a qfd term."""
    tap = qfd_tap(cfg) if cfg.DISTILL.ENABLED else None
    if tap is None:
        return None
    iters, _ = stage_schedule(
        cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS, cfg.DISTILL.TEACHER_STAGE_ITERS
    )
    return TeacherStage(
        tap=tap,
        bits=cfg.DISTILL.TEACHER_FEATURE_BITS,
        signed=cfg.DISTILL.TEACHER_FEATURE_SIGNED,
        iters=iters,
        init_weights=cfg.DISTILL.TEACHER_WEIGHTS,
        weights=quantized_teacher_weights(cfg),
    )


def teacher_config(cfg: CfgNode, quantized_feature: bool) -> CfgNode:
    """The teacher's config: DISTILL.TEACHER_CONFIG, on the student's device and data; with
    ``quantized_feature``, its tap quantized as the teacher stage does (``QUANT.FEATURE_*``)."""
    path = cfg.DISTILL.TEACHER_CONFIG
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"DISTILL.TEACHER_CONFIG={path!r} is not a file: set it to the teacher's config"
        )
    tcfg = add_qdet_config(get_cfg())
    tcfg.set_new_allowed(True)
    tcfg.merge_from_file(path)
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.DISTILL.ENABLED = False
    if quantized_feature:
        tcfg.QUANT.FEATURE_TAP = qfd_tap(cfg) or cfg.DISTILL.TAP  # TAP: a bare load_teacher
        tcfg.QUANT.FEATURE_BITS = cfg.DISTILL.TEACHER_FEATURE_BITS
        tcfg.QUANT.FEATURE_SIGNED = cfg.DISTILL.TEACHER_FEATURE_SIGNED
    return tcfg


def teacher_stage_config(cfg: CfgNode) -> CfgNode:
    """The stage as a yacs config: the student's schedule (:func:`stage_schedule`) and
    data, on the teacher's model with its tap quantized, from DISTILL.TEACHER_WEIGHTS."""
    stage = yacs_teacher_stage(cfg)
    tcfg = teacher_config(cfg, quantized_feature=True)
    tcfg.defrost()
    tcfg.MODEL.WEIGHTS = cfg.DISTILL.TEACHER_WEIGHTS
    tcfg.DATASETS = cfg.DATASETS.clone()
    tcfg.DATALOADER = cfg.DATALOADER.clone()
    tcfg.INPUT = cfg.INPUT.clone()
    tcfg.SOLVER = cfg.SOLVER.clone()
    tcfg.defrost()  # the clones of the frozen student config are frozen too
    iters, warmup = stage_schedule(
        cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS, cfg.DISTILL.TEACHER_STAGE_ITERS
    )
    tcfg.SOLVER.MAX_ITER = iters
    tcfg.SOLVER.STEPS = ()
    tcfg.SOLVER.WARMUP_ITERS = warmup
    tcfg.SOLVER.CHECKPOINT_PERIOD = min(cfg.SOLVER.CHECKPOINT_PERIOD, iters)
    tcfg.QUANT.CALIB_BATCHES = cfg.QUANT.CALIB_BATCHES
    tcfg.TEST.EVAL_PERIOD = 0
    tcfg.DATASETS.TEST = ()  # nothing reads its AP: skip Detectron2's after-train evaluation
    tcfg.OUTPUT_DIR = os.path.dirname(stage.weights)
    tcfg.SEED = cfg.SEED
    tcfg.freeze()
    return tcfg


def load_teacher(cfg: CfgNode, weights: str, quantized_feature: bool) -> nn.Module:
    """Build the teacher and load ``weights``, refusing a checkpoint that does not fit."""
    if not weights or not os.path.isfile(weights):
        hint = (
            " Run the teacher stage first (tools/train_net.py --stage teacher)."
            if quantized_feature
            else ""
        )
        raise FileNotFoundError(f"teacher checkpoint {weights!r} does not exist.{hint}")
    teacher = build_model(teacher_config(cfg, quantized_feature))
    return load_checked(teacher, weights, quantized_feature, "yacs")


def build_distiller(cfg: CfgNode, student: nn.Module) -> Distiller:
    """The distiller for ``cfg.DISTILL`` (:func:`qdet.distill.term_specs`), its teacher on
    the student's device. With a qfd term the teacher is the teacher stage's model, whose
    QFD tap is quantized for every term (the head then sees the quantized feature too)."""
    specs = term_specs(cfg)
    stage = yacs_teacher_stage(cfg)
    weights = stage.weights if stage is not None else cfg.DISTILL.TEACHER_WEIGHTS
    teacher = load_teacher(cfg, weights, stage is not None).to(student.device)
    if not (
        torch.equal(teacher.pixel_mean.cpu(), student.pixel_mean.cpu())
        and torch.equal(teacher.pixel_std.cpu(), student.pixel_std.cpu())
    ):
        raise ValueError(
            "teacher and student normalise pixels differently "
            "(MODEL.PIXEL_MEAN / PIXEL_STD): the teacher sees the student's input"
        )
    distiller = Distiller(student, teacher, specs).to(student.device)  # connectors too
    distiller.label_free = cfg.DISTILL.LABEL_FREE
    distiller.gt_weight = cfg.DISTILL.GT_WEIGHT
    # With TERMS set, LOSS / TAP / WEIGHT are not read (and the reverse): say what runs.
    logger.info(
        "Distillation terms%s: %s",
        " (label-free)"
        if distiller.label_free
        else f" (ground-truth losses x {distiller.gt_weight:g})"
        if distiller.gt_weight != 1.0
        else "",
        "; ".join(f"{t.name} x {t.weight:g} on {t.taps}" for t in distiller.terms),
    )
    return distiller


# -- LazyConfig ---------------------------------------------------------------------------
def lazy_qfd_tap(cfg) -> str | None:
    """The teacher feature a LazyConfig's qfd term (``distill.terms``) distils, or None."""
    if "distill" not in cfg:
        return None
    return qfd_term_tap(specs_from_terms(plain(cfg.distill.terms)))


def lazy_teacher_stage(cfg) -> TeacherStage | None:
    """The teacher stage of a LazyConfig (``distill`` node), None without a qfd term."""
    tap = lazy_qfd_tap(cfg)
    if tap is None:
        return None
    d = cfg.distill
    iters, _ = stage_schedule(cfg.train.max_iter, 0, d.get("teacher_stage_iters") or 0)
    return TeacherStage(
        tap=tap,
        bits=int(d.get("teacher_feature_bits", 8)),
        signed=True,
        iters=iters,
        init_weights=d.get("teacher_weights", ""),
        weights=stage_weights(cfg.train.output_dir),
    )


def lazy_teacher_model(cfg, with_feature_quantizer: bool) -> nn.Module:
    """``distill.teacher_model`` (default the student's ``cfg.model``), built; with
    ``with_feature_quantizer`` and a qfd term, the stage's feature quantizer on its tap."""
    model = instantiate(cfg.distill.get("teacher_model") or cfg.model)
    stage = lazy_teacher_stage(cfg) if with_feature_quantizer else None
    return add_stage_quantizer(model, stage) if stage is not None else model


def lazy_teacher_stage_config(cfg):
    """QFD's teacher stage as a LazyConfig: the student's data, optimizer and init from
    ``distill.teacher_weights``, for ``distill.teacher_stage_iters`` (default a tenth of
    the schedule) at the base learning rate after the student's warmup (at most half the
    stage), as the yacs path's :func:`teacher_stage_config` (:func:`stage_schedule`).
    Checkpoints at its end only; no evaluation."""
    stage_info = lazy_teacher_stage(cfg)
    stage = copy.deepcopy(cfg)
    schedule = cfg.lr_multiplier
    student_warmup = float(schedule.get("warmup_length", 0.0)) * cfg.train.max_iter
    iters, warmup = stage_schedule(
        cfg.train.max_iter, student_warmup, cfg.distill.get("teacher_stage_iters") or 0
    )
    stage.train.max_iter = iters
    stage.train.output_dir = os.path.dirname(stage_info.weights)
    stage.train.init_checkpoint = stage_info.init_weights
    stage.train.eval_period = 0
    stage.train.checkpointer.period = iters
    stage.lr_multiplier = LazyCall(WarmupParamScheduler)(
        # one value, no milestone (fvcore's constant scheduler refuses where = 1.0, where
        # Detectron2's LRMultiplier ends)
        scheduler=LazyCall(MultiStepParamScheduler)(values=[1.0], milestones=[], num_updates=iters),
        warmup_length=warmup / iters,
        warmup_factor=float(schedule.get("warmup_factor", 0.001)),
    )
    if "evaluator" in stage.dataloader:
        del stage.dataloader["evaluator"]  # nothing reads the stage's AP
    return stage


def check_lazy_stage_input(cfg) -> None:
    """The FP teacher the stage starts from (``distill.teacher_weights``) exists."""
    weights = cfg.distill.get("teacher_weights", "")
    if not weights or not os.path.isfile(weights):
        raise FileNotFoundError(
            f"distill.teacher_weights={weights!r} does not exist: train the FP model first "
            "(tools/lazy_train_net.py with quant.enabled=False writes "
            "<train.output_dir>/model_final.pth)"
        )


def build_lazy_teacher(cfg, device) -> nn.Module:
    """The frozen teacher of ``cfg.distill``: ``teacher_model`` (default ``cfg.model``) with
    ``teacher_weights``, or, with a ``qfd`` term, the teacher stage's model (its tap
    quantized by its trained feature quantizer), loaded as :func:`load_checked` checks."""
    check_distill_node(cfg)
    stage = lazy_teacher_stage(cfg)
    weights = stage.weights if stage is not None else cfg.distill.get("teacher_weights", "")
    if not weights or not os.path.isfile(weights):
        raise FileNotFoundError(
            f"the teacher checkpoint {weights!r} does not exist: "
            + (
                "QFD's teacher stage writes it (tools/lazy_train_net.py runs it first)"
                if stage is not None
                else "train the FP model first (tools/lazy_train_net.py with "
                "quant.enabled=False writes <train.output_dir>/model_final.pth) and set "
                "distill.teacher_weights"
            )
        )
    teacher = lazy_teacher_model(cfg, with_feature_quantizer=stage is not None).to(device)
    return load_checked(teacher, weights, stage is not None, "lazy")
