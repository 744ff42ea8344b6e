#!/usr/bin/env python
"""Accuracy study on the embedded digits data: methods x bit widths, paired over seeds.

    tools/accuracy_study.py --seeds 1 2 3 --jobs 2           # every method, W/A 4, 3, 2
    tools/accuracy_study.py --seeds 1 --bits 4 --methods baseline qfd

Per seed: the FP RetinaNet-R18 is trained from scratch; every quantized row fine-tunes
that seed's FP model with the same batches in the same order (SEED = the seed), and the
distillation rows distil from it. The methods (baseline QAT, every registered distillation
loss, FAQD, AKT, data-free and its ablations; the single-change rows at ``--check-bits``
only) and their rows: :mod:`qdet.study.accuracy`. Writes into ``--out``: ``accuracy.md``
(AP mean ± sample std per method and bit width, the paired difference to the baseline with
the number of seeds it wins, AP per seed), ``accuracy.json`` (every run's figures),
``ap_vs_bits.png``, ``curves.png`` (val AP during training of FP, 4-bit baseline and 4-bit
QFD on the first seed) and ``detections.png`` (those three models' detections on three val
images, side by side).
Finished runs are reused.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.utils.logger import setup_logger  # noqa: E402

import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.engine.cli import run_cli  # noqa: E402
from qdet.predict import write_study_sheet  # noqa: E402
from qdet.study import Study, add_study_arguments, write_report  # noqa: E402
from qdet.study.accuracy import (  # noqa: E402
    CURVES,
    METHODS,
    ONE_WIDTH,
    curve_opts,
    plot_ap_vs_bits,
    study_rows,
    tables,
)
from qdet.study.report import plot_curves  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--check-bits",
        type=int,
        nargs="+",
        default=[4],
        help=f"bit widths of the single-change rows ({', '.join(ONE_WIDTH)})",
    )
    parser.add_argument(
        "--freeze-at",
        type=int,
        default=2,
        help="MODEL.BACKBONE.FREEZE_AT of every run. 2 (stem and res2 keep their random "
        "init): the recipe of the tables in README; 0: the digits configs' (not run yet)",
    )
    add_study_arguments(parser, "output/study")
    args = parser.parse_args()
    run_cli(run, args, debug=args.debug)


def run(args) -> None:
    setup_logger(name="qdet")
    methods = ["baseline", *[m for m in args.methods if m != "baseline"]]
    rows = study_rows(methods, args.bits, args.check_bits)
    first = args.seeds[0]
    opts = ["MODEL.BACKBONE.FREEZE_AT", str(args.freeze_at), *args.opts]
    study = Study(
        rows,
        args.seeds,
        args.out,
        opts,
        run_opts=curve_opts(first, args.opts),
        tag="study",
        jobs=args.jobs,
    )
    start = time.time()
    results = study.run(train=not args.report_only)
    report = tables(results, methods, args.bits, args.seeds)
    text = write_report(args.out, "accuracy", time.time() - start, report, results)
    plot_ap_vs_bits(
        results, methods, args.bits, args.seeds, os.path.join(args.out, "ap_vs_bits.png")
    )
    plot_curves(study, CURVES, first, os.path.join(args.out, "curves.png"))
    write_study_sheet(study, CURVES, first, os.path.join(args.out, "detections.png"))
    print("\n" + text)


if __name__ == "__main__":
    main()
