#!/usr/bin/env python
"""`make demo`: FP teacher, then 4-bit baseline and 4-bit QFD students, on the digits data.

Steps (configs/digits/*.yaml, outputs under output/demo/):
  1. train an FP RetinaNet-R18 teacher from scratch on qdet_digits_train;
  2. QFD's teacher stage: fine-tune it with an 8-bit quantizer on its p3 feature;
  3. 4-bit QAT baseline, fine-tuned from the FP model;
  4. 4-bit QFD student: the baseline plus MSE to the teacher's quantized p3;
then evaluate all with COCO AP on qdet_digits_val and print one table.

A step whose model_final.pth exists is reused; --fresh retrains everything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.utils.logger import setup_logger  # noqa: E402

import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.engine.stages import evaluate_final, load_config, train_with_teacher_stage  # noqa: E402

OUT = "output/demo"
FP = "configs/digits/retinanet_r18_fp.yaml"
RUNS = (  # (label, output folder, config)
    ("FP teacher", "fp", FP),
    ("4-bit baseline", "baseline_4bit", "configs/digits/retinanet_r18_4bit_baseline.yaml"),
    ("4-bit QFD", "qfd_4bit", "configs/digits/retinanet_r18_4bit_qfd.yaml"),
)


def _config(path: str, name: str, extra: list[str]):
    fp_weights = os.path.join(OUT, "fp", "model_final.pth")
    opts = ["OUTPUT_DIR", os.path.join(OUT, name), *extra]
    if path != FP:
        opts += ["MODEL.WEIGHTS", fp_weights]
    if "qfd" in path:
        opts += ["DISTILL.TEACHER_WEIGHTS", fp_weights]
    cfg = load_config(path, opts)
    cfg.freeze()
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="retrain every step")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="KEY VALUE overrides for every run, e.g. SOLVER.MAX_ITER 50",
    )
    args = parser.parse_args()
    if args.fresh:
        shutil.rmtree(OUT, ignore_errors=True)
    setup_logger(name="qdet")
    t0 = time.time()
    rows = []
    for step, (label, name, path) in enumerate(RUNS, 1):
        cfg = _config(path, name, args.opts)
        final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        if os.path.isfile(final):
            print(f"[demo] {step}/3 {label}: reusing {final}", flush=True)
        else:
            print(
                f"[demo] {step}/3 {label}: training ({cfg.SOLVER.MAX_ITER} iterations, "
                f"{time.time() - t0:.0f} s so far) ...",
                flush=True,
            )
            train_with_teacher_stage(cfg, log=lambda m: print(f"[demo]     {m}", flush=True))
        rows.append({"model": label, **evaluate_final(cfg)})
    print(f"\n[demo] COCO box AP on qdet_digits_val ({time.time() - t0:.0f} s in all):")
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".1f"))


if __name__ == "__main__":
    main()
