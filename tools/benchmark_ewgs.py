#!/usr/bin/env python
"""EWGS on a trained detector: the clip-bound gradient's effect on dL/dl, and the cost and
agreement of the Hessian-trace delta estimators.

    .venv/bin/python tools/benchmark_ewgs.py       # digits RetinaNet-R18, W4/A4, CPU
    .venv/bin/python tools/benchmark_ewgs.py --config-file configs/retinanet_r50_4bit_ewgs.yaml \\
        MODEL.WEIGHTS model_final.pth MODEL.DEVICE cuda

Builds the config's EWGS-quantized model from its FP weights (``MODEL.WEIGHTS``: for the
default config, ``tools/train_net.py --config-file configs/digits/retinanet_r18_fp.yaml``
makes them) and calibrates it.

1. Bound gradient: on one training batch, dL/dl of every unsigned input quantizer with
   ``exclusive`` and with ``inclusive`` bounds, and the share of its inputs exactly at l.
2. Estimators (skipped with ``--bound-only``): every quantizer's delta on the same
   ``--batches`` training batches with ``per_layer`` and ``joint`` under each ``--seeds``
   Rademacher seed: seconds per estimate, and how far the deltas agree.

What is measured and how: :mod:`qdet.benchmark.ewgs_cost`. Writes tables and JSON
(output/benchmark_ewgs.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.utils.env import seed_all_rng  # noqa: E402

import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.benchmark.ewgs_cost import (  # noqa: E402
    bound_changes,
    bound_gradient_effect,
    calibrated_model,
    compare_estimators,
    summary,
)
from qdet.config import load_config  # noqa: E402

DEFAULT_CONFIG = "configs/digits/retinanet_r18_4bit_ewgs.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--batches", type=int, default=1, help="training batches per estimate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--bound-only", action="store_true", help="skip the estimators")
    parser.add_argument("--output", default="output/benchmark_ewgs.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE")
    args = parser.parse_args()

    cfg = load_config(args.config_file, args.opts)
    seed_all_rng(cfg.SEED)  # the same calibration and estimate batches every run
    if not os.path.isfile(cfg.MODEL.WEIGHTS):
        sys.exit(
            f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS!r} does not exist: train the FP model first "
            "(tools/train_net.py --config-file configs/digits/retinanet_r18_fp.yaml)"
        )
    model, batches = calibrated_model(cfg, args.batches)

    bound = bound_gradient_effect(model, batches[0])
    changes = bound_changes(bound)
    print(f"Bound gradient, {len(bound)} unsigned input quantizers, one batch:")
    print(f"  share of inputs exactly at l: {summary([b['share_at_l'] for b in bound.values()])}")
    print(f"  |dL/dl inclusive - exclusive| / |exclusive|: {summary(changes)}")
    report = {"config": args.config_file, "batches": args.batches, "bound_gradient": bound}
    if not args.bound_only:
        report.update(compare_estimators(model, batches, args.seeds))
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
