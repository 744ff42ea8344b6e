#!/usr/bin/env python
"""Train or evaluate a (quantized, distilled) classifier with Detectron2's launcher.

    projects/Classification/train_net.py \
        --config-file projects/Classification/configs/digits32/resnet20_fp.yaml
    projects/Classification/train_net.py --recipe digits32/qfd_table2_resnet20_w4a4
    projects/Classification/train_net.py --config-file <X.yaml> --eval-only \
        MODEL.WEIGHTS <out>/model_final.pth

``--recipe NAME`` is ``--config-file`` for the YAML of that name under ``configs/`` (the
papers' recipes; an unknown name lists them). With a ``qfd`` term, QFD's teacher stage runs
first (``--stage`` as in ``tools/train_net.py``); with ``ZEROSHOT.ENABLED`` the student
trains on generated images only (AKT). The final model's top-1 / top-5 on
``DATASETS.TEST`` are written to ``OUTPUT_DIR/eval_final.json``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser
from detectron2.utils import comm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "tools"))
import quiet_console  # noqa: E402,F401  (first: quiets third-party warnings in a tool's console)

sys.path.insert(0, HERE)  # the project's package, as in Detectron2's projects
sys.path.insert(1, os.path.dirname(os.path.dirname(HERE)))  # qdet, from a source checkout
from classification import (  # noqa: E402  (registers the project's datasets and models)
    ClassificationTrainer,
    add_classification_config,
    register_cifar,
    trainer_class,
)

import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.engine import stages  # noqa: E402
from qdet.engine.cli import launch_main  # noqa: E402
from qdet.engine.stages import STAGES, evaluate_checkpoint, train_stages  # noqa: E402

CONFIGS = os.path.join(HERE, "configs")


def recipes() -> dict[str, str]:
    """Recipe name (a YAML's path under configs/ without .yaml, e.g.
    ``digits32/qfd_table2_resnet20_w4a4``) -> its path, for every config but the bases."""
    paths = glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
    return {
        os.path.relpath(p, CONFIGS)[: -len(".yaml")]: p
        for p in sorted(paths)
        if not os.path.basename(p).startswith("Base-")
    }


def recipe_config(name: str) -> str:
    known = recipes()
    if name not in known:
        raise ValueError(f"--recipe {name!r} is unknown; the recipes are {sorted(known)}")
    return known[name]


def setup(args) -> CfgNode:
    return stages.setup(args, add_classification_config, register_cifar)


def main(args):
    if args.recipe:
        args.config_file = recipe_config(args.recipe)
    cfg = setup(args)  # checks the run's inputs and OUTPUT_DIR first
    if args.eval_only:
        return evaluate_checkpoint(cfg, args.resume, ClassificationTrainer)
    log = logging.getLogger("qdet").info
    results = train_stages(cfg, args.resume, args.stage, trainer_class(cfg), log=log)
    if comm.is_main_process() and results:
        with open(os.path.join(cfg.OUTPUT_DIR, "eval_final.json"), "w") as f:
            json.dump(results, f)
    return results


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--recipe", default="", help="a config of configs/ by name")
    parser.add_argument(
        "--stage", choices=STAGES, default="all", help="QFD: teacher stage, student, or both"
    )
    parser.add_argument("--debug", action="store_true", help="tracebacks for bad input")
    launch_main(main, parser.parse_args())
