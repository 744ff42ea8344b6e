#!/usr/bin/env python
"""Quantization-aware training from a LazyConfig (Detectron2's ``lazyconfig_train_net.py``
with qdet's ``quant`` and ``distill`` nodes, :mod:`qdet.engine.lazy`).

    tools/lazy_train_net.py --config-file configs/lazy/mask_rcnn_vitdet_b_4bit.py --num-gpus 8
    tools/lazy_train_net.py --config-file configs/lazy/digits/retinanet_r18_4bit.py \
        train.max_iter=100 quant.w_bits=3 quant.a_bits=3
    tools/lazy_train_net.py --config-file X.py --eval-only train.init_checkpoint=out/model_final.pth
"""

from __future__ import annotations

import os
import sys

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)
from detectron2.engine import default_argument_parser, default_setup

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.engine import lazy  # noqa: E402
from qdet.engine.cli import launch_main  # noqa: E402
from qdet.engine.lazy_config import load_lazy_config, quant_settings  # noqa: E402


def main(args):
    cfg = load_lazy_config(args.config_file, args.opts)
    quant_settings(cfg)  # a config without a quant node: say what to add, first
    if not args.eval_only:
        lazy.check_run(cfg, resume=args.resume, restart=args.restart)  # before config.yaml
    default_setup(cfg, args)
    if args.eval_only:
        return lazy.do_eval(cfg)
    return lazy.do_train(cfg, resume=args.resume)


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--debug", action="store_true", help="tracebacks for bad input")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="train in a train.output_dir that holds a run's checkpoints, replacing them",
    )
    launch_main(main, parser.parse_args())
