#!/usr/bin/env python
"""QFD's Table 8 for one transformer backbone: FP, 8/8, 6/6, 4/4, MHA-only and MLP-only 4/4.

    tools/ablation_transformer.py --arch vitdet                  # tiny ViTDet, digits, CPU
    tools/ablation_transformer.py --arch swin
    tools/ablation_transformer.py --arch vitdet --coco --num-gpus 8   # ViTDet-B on COCO
    tools/ablation_transformer.py --arch vitdet --lazy           # the same from configs/lazy

Digits rows use configs/digits/{arch}_tiny_*.yaml: the FP model is trained from scratch,
every quantized row is fine-tuned from it, and a control row fine-tunes it just as long in
FP (8/8 and 6/6 override the 4-bit config's bits). COCO rows use configs/{arch}_b_*.yaml as they
are (each from the pretrained backbone, the paper's schedule), one after another through
Detectron2's launcher. Each row reports box and mask AP, how many Linear layers it
quantizes and their share of the transformer's parameters (``backbone.net`` of ViTDet,
``backbone.bottom_up`` of Swin, quantizer parameters not counted). Writes
``<out>/table8_<arch>.md`` and ``.json`` (the table and every run's figures); finished
runs are reused. ``--finetune-seeds 1 2 3`` repeats each digits fine-tune with those seeds
(mean ± sample std) from the one FP model, to show run-to-run noise. The rows, their runs
and the table's figures: :mod:`qdet.study.ablation`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.utils.logger import setup_logger  # noqa: E402

import qdet  # noqa: E402,F401  (registers qdet's datasets, models and backbones)
from qdet.engine.cli import run_cli  # noqa: E402
from qdet.study.ablation import DIGITS_CONTROL, ROWS, run_lazy, run_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=("vitdet", "swin"))
    parser.add_argument("--coco", action="store_true", help="the -B models on COCO")
    parser.add_argument("--num-gpus", type=int, default=1, help="COCO rows: GPUs per run")
    parser.add_argument(
        "--finetune-seeds",
        type=int,
        nargs="+",
        help="digits: run every fine-tune row (not the FP model) once per seed; default: "
        "the config's SEED",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=[suffix for _, suffix in (*ROWS, DIGITS_CONTROL)],
        help="only these rows (by config suffix); default: all",
    )
    parser.add_argument(
        "--lazy",
        action="store_true",
        help="the rows from configs/lazy (tools/lazy_train_net.py's trainer; ViTDet); "
        "overrides are key=value",
    )
    parser.add_argument("--out", default="output/ablation")
    parser.add_argument(
        "--jobs", type=int, default=1, help="digits rows trained at once (2 on a 2-core CPU)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, every row")
    parser.add_argument("--debug", action="store_true", help="tracebacks for bad input")
    args = parser.parse_args()
    run_cli(run, args, debug=args.debug)


def run(args) -> None:
    setup_logger(name="qdet")
    if args.coco and args.jobs > 1:
        raise ValueError("--jobs is for the digits rows; COCO rows use --num-gpus")
    t0 = time.time()
    if args.lazy:
        setup_logger()  # Detectron2's training and evaluation progress lines
        rows, results = run_lazy(
            args.arch, args.coco, args.out, args.opts, args.finetune_seeds, args.rows,
            args.num_gpus,
        )  # fmt: skip
    else:
        rows, results = run_study(
            args.arch, args.coco, args.out, args.opts, args.finetune_seeds, args.jobs,
            args.rows, args.num_gpus,
        )  # fmt: skip
    data = "COCO val2017" if args.coco else "qdet_digits_val"
    header = (
        f"Table 8 shape, {args.arch} Mask R-CNN on {data} (`tools/ablation_transformer.py "
        f"{' '.join(sys.argv[1:])}`, {time.time() - t0:.0f} s)\n\n"
    )
    table = tabulate(rows, headers="keys", tablefmt="github", floatfmt=".1f")
    os.makedirs(args.out, exist_ok=True)
    name = f"table8_{'lazy_' if args.lazy else ''}{args.arch}"
    stem = os.path.join(args.out, name + ("_seeds" if args.finetune_seeds else ""))
    with open(stem + ".md", "w") as f:
        f.write(header + table + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"rows": rows, "runs": results}, f, indent=1)
    print("\n" + header + table)


if __name__ == "__main__":
    main()
