#!/usr/bin/env python
"""Train or evaluate a (quantized, distilled) detector with Detectron2's launcher.

    tools/train_net.py --config-file configs/retinanet_r50_4bit_qfd.yaml --num-gpus 8
    tools/train_net.py --config-file configs/digits/retinanet_r18_fp.yaml
    tools/train_net.py --config-file X.yaml --eval-only MODEL.WEIGHTS out/model_final.pth

With ``DISTILL.ENABLED`` and the QFD loss, training has two stages (QFD, "Experimental
settings"): the teacher stage fine-tunes the FP teacher with an 8-bit quantizer on its tap
feature for ``DISTILL.TEACHER_STAGE_ITERS`` iterations (default a tenth of the schedule)
and writes ``OUTPUT_DIR/teacher_stage/model_final.pth``; the student stage then distils
from that frozen teacher. ``--stage all`` (default) runs the teacher stage unless its
output exists; ``--stage teacher`` / ``--stage student`` run one.
"""

from __future__ import annotations

import difflib
import os
import sys

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.config import add_qdet_config  # noqa: E402
from qdet.distill.distiller import quantized_teacher_weights, teacher_config  # noqa: E402
from qdet.distill.losses import build_distill_loss  # noqa: E402
from qdet.engine import QDetTrainer  # noqa: E402


def _all_keys(cfg: CfgNode, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys += _all_keys(v, f"{prefix}{k}.") if isinstance(v, CfgNode) else [prefix + k]
    return keys


def load_config(config_file: str, opts: list[str]) -> CfgNode:
    """Detectron2 + qdet config from a YAML file and KEY VALUE overrides, with clear errors."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file!r} does not exist")
    cfg = add_qdet_config(get_cfg())
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError) as e:
        message = str(e)
        if "Non-existent" not in message:  # e.g. an odd number of KEY VALUE overrides
            raise ValueError(f"bad config or overrides: {message}") from e
        bad = message.split(":")[-1].strip().strip("'\"")
        near = difflib.get_close_matches(bad, _all_keys(cfg), n=5, cutoff=0.5)
        raise KeyError(
            f"unknown config key {bad!r}; did you mean one of {near}? qdet's keys "
            "are declared in qdet/config.py, Detectron2's in detectron2/config/"
            "defaults.py"
        ) from e
    return cfg


def setup(args) -> CfgNode:
    cfg = load_config(args.config_file, args.opts)
    if cfg.DISTILL.ENABLED:
        build_distill_loss(cfg.DISTILL.LOSS)  # unknown loss names fail before any training
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="qdet")
    return cfg


def teacher_stage_config(cfg: CfgNode) -> CfgNode:
    """The student's schedule and data, on the teacher's model with its tap quantized."""
    tcfg = teacher_config(cfg, quantized_feature=True)
    tcfg.defrost()
    tcfg.MODEL.WEIGHTS = cfg.DISTILL.TEACHER_WEIGHTS
    tcfg.DATASETS = cfg.DATASETS.clone()
    tcfg.DATALOADER = cfg.DATALOADER.clone()
    tcfg.INPUT = cfg.INPUT.clone()
    tcfg.SOLVER = cfg.SOLVER.clone()
    tcfg.defrost()  # the clones of the frozen student config are frozen too
    iters = cfg.DISTILL.TEACHER_STAGE_ITERS or max(cfg.SOLVER.MAX_ITER // 10, 1)
    tcfg.SOLVER.MAX_ITER = iters
    tcfg.SOLVER.STEPS = ()
    tcfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, iters // 2)
    tcfg.SOLVER.CHECKPOINT_PERIOD = min(cfg.SOLVER.CHECKPOINT_PERIOD, iters)
    tcfg.QUANT.CALIB_BATCHES = cfg.QUANT.CALIB_BATCHES
    tcfg.TEST.EVAL_PERIOD = 0
    tcfg.OUTPUT_DIR = os.path.dirname(quantized_teacher_weights(cfg))
    tcfg.SEED = cfg.SEED
    tcfg.freeze()
    return tcfg


def train(cfg: CfgNode, resume: bool):
    # Seeded per run, as default_setup does, so both stages of one process are repeatable.
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())
    trainer = QDetTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    return trainer.train()


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return QDetTrainer.test(cfg, model)
    quantized_teacher = (
        cfg.DISTILL.ENABLED and build_distill_loss(cfg.DISTILL.LOSS).quantized_teacher
    )
    teacher_missing = not os.path.isfile(quantized_teacher_weights(cfg))
    if quantized_teacher and (args.stage == "teacher" or (args.stage == "all" and teacher_missing)):
        train(teacher_stage_config(cfg), resume=args.resume)
    if args.stage == "teacher":
        return None
    return train(cfg, resume=args.resume)


def build_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--stage",
        choices=("all", "teacher", "student"),
        default="all",
        help="with DISTILL.LOSS qfd: run the teacher stage, the student "
        "stage, or both (default; the teacher stage is skipped when its "
        "output exists)",
    )
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
