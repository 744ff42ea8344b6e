#!/usr/bin/env python
"""Train or evaluate a (quantized, distilled) classifier with Detectron2's launcher.

    projects/Classification/train_net.py \
        --config-file projects/Classification/configs/digits32/resnet20_fp.yaml
    projects/Classification/train_net.py --config-file <X.yaml> --eval-only \
        MODEL.WEIGHTS <out>/model_final.pth

The final model's top-1 / top-5 on ``DATASETS.TEST`` are written to
``OUTPUT_DIR/eval_final.json``.
"""

from __future__ import annotations

import json
import os
import sys

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser
from detectron2.utils import comm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the project's package, as in Detectron2's projects
sys.path.insert(1, os.path.dirname(os.path.dirname(HERE)))  # qdet, from a source checkout
from classification import (  # noqa: E402  (registers the project's datasets and models)
    ClassificationTrainer,
    add_classification_config,
    register_cifar,
)

import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.engine import stages  # noqa: E402
from qdet.engine.checks import check_run_inputs  # noqa: E402
from qdet.engine.cli import launch_main  # noqa: E402
from qdet.engine.stages import evaluate_checkpoint, train  # noqa: E402


def setup(args) -> CfgNode:
    cfg = stages.setup(args, add_classification_config)
    register_cifar(cfg)
    return cfg


def main(args):
    cfg = setup(args)
    check_run_inputs(cfg, resume=args.resume, eval_only=args.eval_only)
    if args.eval_only:
        return evaluate_checkpoint(cfg, args.resume, ClassificationTrainer)
    results = train(cfg, args.resume, ClassificationTrainer)
    if comm.is_main_process() and results:
        with open(os.path.join(cfg.OUTPUT_DIR, "eval_final.json"), "w") as f:
            json.dump(results, f)
    return results


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--debug", action="store_true", help="tracebacks for bad input")
    launch_main(main, parser.parse_args())
