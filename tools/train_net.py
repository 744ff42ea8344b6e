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

import logging
import os
import sys

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)
from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.engine import stages  # noqa: E402
from qdet.engine.cli import launch_main  # noqa: E402
from qdet.engine.stages import STAGES, evaluate_checkpoint, train_stages  # noqa: E402


def setup(args) -> CfgNode:
    return stages.setup(args)


def main(args):
    cfg = setup(args)  # checks the run's inputs and OUTPUT_DIR first
    if args.eval_only:
        return evaluate_checkpoint(cfg, args.resume)
    log = logging.getLogger("qdet").info
    return train_stages(cfg, args.resume, args.stage, log=log, restart=args.restart)


def build_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--stage",
        choices=STAGES,
        default="all",
        help="with DISTILL.LOSS qfd: run the teacher stage, the student "
        "stage, or both (default; the teacher stage is skipped when its "
        "output exists)",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="start over in an OUTPUT_DIR that holds a run's checkpoints (they are replaced); "
        "without it such a folder is refused unless --resume continues its run",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of bad-input errors (also QDET_DEBUG=1)",
    )
    return parser


if __name__ == "__main__":
    launch_main(main, build_parser().parse_args())
