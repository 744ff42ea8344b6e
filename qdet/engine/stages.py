"""One training run as a function: config loading, QFD's two stages, final evaluation.

``tools/train_net.py`` wraps these in Detectron2's launcher; ``tools/demo.py`` and
``tools/accuracy_study.py`` call them in-process for many runs in a row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import default_setup
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from qdet.config import load_config
from qdet.distill.terms import term_specs
from qdet.engine.checkpoint import AtomicCheckpointer, check_calibrated
from qdet.engine.checks import check_run_inputs
from qdet.engine.hooks import unwrap_model
from qdet.engine.teacher_stage import (
    needs_teacher_stage,
    qfd_tap,
    quantized_teacher_weights,
    teacher_stage_config,
)
from qdet.engine.trainer import TRAINER_REGISTRY, QDetTrainer
from qdet.quantization import deployed_weight_bytes


def setup(
    args,
    add_config: Callable[[CfgNode], object] | None = None,
    register_datasets: Callable[[CfgNode], object] | None = None,
) -> CfgNode:
    """A ``train_net.py``'s config from its arguments (:func:`load_config`), checked
    (distillation terms, weights, teacher, datasets, an OUTPUT_DIR holding another run:
    all before anything is written), frozen, with Detectron2's run setup (output folder,
    config dump, seeds) and qdet's logger. ``register_datasets``: a project's datasets,
    registered from the config before they are checked."""
    cfg = load_config(args.config_file, args.opts, add_config)
    if register_datasets is not None:
        register_datasets(cfg)
    if cfg.DISTILL.ENABLED:
        term_specs(cfg)  # unknown losses, options and bad weights fail before any training
    # Before default_setup writes OUTPUT_DIR/config.yaml: a refused run leaves it as it was.
    check_run_inputs(
        cfg,
        resume=getattr(args, "resume", False),
        eval_only=getattr(args, "eval_only", False),
        restart=getattr(args, "restart", False),
    )
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="qdet")
    return cfg


def trainer_class(cfg: CfgNode) -> type[QDetTrainer]:
    """The trainer a detector's config runs with: data-free (``ZEROSHOT.ENABLED``: the
    ``DataFreeTrainer`` that :mod:`qdet.datafree.detection` registers) or on DATASETS.TRAIN."""
    return TRAINER_REGISTRY.get("DataFreeTrainer" if cfg.ZEROSHOT.ENABLED else "QDetTrainer")


def train(
    cfg: CfgNode,
    resume: bool,
    trainer_cls: type[QDetTrainer] | None = None,
    restart: bool = False,
):
    """Train one stage with ``trainer_cls`` (default :func:`trainer_class`; resuming from
    OUTPUT_DIR if asked); returns the evaluation after the last step (Detectron2's test
    results), if any."""
    # Seeded per run, as default_setup does, so both stages of one process are repeatable.
    check_run_inputs(cfg, resume=resume, restart=restart)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())
    trainer = (trainer_cls or trainer_class(cfg))(cfg)
    trainer.resume_or_load(resume=resume)
    results = trainer.train()
    # Detectron2's EvalHook evaluates once more after the last step; keep that as the final
    # model's figures rather than evaluating model_final.pth again.
    last = getattr(trainer, "_last_eval_results", None)
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if comm.is_main_process() and last and "bbox" in last and os.path.isfile(final):
        _save_final_metrics(cfg, unwrap_model(trainer.model), last)
    return last or results


def evaluate_checkpoint(
    cfg: CfgNode, resume: bool, trainer_cls: type[QDetTrainer] = QDetTrainer
) -> dict:
    """``--eval-only``: MODEL.WEIGHTS (or, resuming, OUTPUT_DIR's last checkpoint) on
    DATASETS.TEST with ``trainer_cls``'s evaluators."""
    model = build_model(cfg)
    checkpointer = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    check_calibrated(model, getattr(checkpointer, "_loading", cfg.MODEL.WEIGHTS))
    return trainer_cls.test(cfg, model)


STAGES = ("all", "teacher", "student")


def train_stages(
    cfg: CfgNode,
    resume: bool = False,
    stage: str = "all",
    trainer_cls: type[QDetTrainer] | None = None,
    log=print,
    restart: bool = False,
):
    """QFD's two stages, or the one stage of any other run; returns the student's last
    evaluation. ``stage`` "all": the teacher stage unless its output exists, then the
    student; "teacher" / "student": that stage alone (a ``train_net.py``'s ``--stage``)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is unknown: choose from {list(STAGES)}")
    teacher_missing = not os.path.isfile(quantized_teacher_weights(cfg))
    if needs_teacher_stage(cfg) and (stage == "teacher" or (stage == "all" and teacher_missing)):
        log(f"teacher stage: {qfd_tap(cfg)} quantized to {cfg.DISTILL.TEACHER_FEATURE_BITS} bits")
        train(teacher_stage_config(cfg), resume, trainer_cls, restart)
    if stage == "teacher":
        return None
    return train(cfg, resume, trainer_cls, restart)


def evaluate_final(cfg: CfgNode) -> dict:
    """COCO box AP (and mask AP, for a model with masks) of ``OUTPUT_DIR/model_final.pth``,
    cached in ``eval_final.json``."""
    cache = os.path.join(cfg.OUTPUT_DIR, "eval_final.json")
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if os.path.isfile(cache) and os.path.getmtime(cache) >= os.path.getmtime(final):
        with open(cache) as f:
            return json.load(f)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(final)
    return _save_final_metrics(cfg, model, QDetTrainer.test(cfg, model))


def _save_final_metrics(cfg: CfgNode, model, results: dict) -> dict:
    """The figures the study and the demo tabulate, from Detectron2's test results."""
    bbox = results["bbox"]
    result = {
        "W/A": f"{cfg.QUANT.W_BITS}/{cfg.QUANT.A_BITS}" if cfg.QUANT.ENABLED else "32/32",
        "AP": bbox["AP"],
        "AP50": bbox["AP50"],
        "AP75": bbox["AP75"],
        "weights MiB": deployed_weight_bytes(model) / 2**20,
    }
    if "segm" in results:
        result.update({f"mask {k}": results["segm"][k] for k in ("AP", "AP50", "AP75")})
    with open(os.path.join(cfg.OUTPUT_DIR, "eval_final.json"), "w") as f:
        json.dump(result, f)
    return result
