#!/usr/bin/env python
"""What a deployable grid costs and what QAT buys: onnxruntime's PTQ, qdet's PTQ, and QAT
simulated and for the onnxruntime target, paired over seeds, on the embedded digits data.

    tools/deployment_study.py --seeds 1 2 3 --jobs 2      # writes output/deploy_study/

Per seed, the FP RetinaNet-R18 is trained from scratch (the accuracy study's row ``fp``,
reused if there) and every other row starts from it, with the same batches (SEED): the
rows ``ptq_onnxruntime_*`` (onnxruntime's ``quantize_static``), ``ptq_qdet_<wa>`` (qdet's
calibration only, ``QUANT.TARGET onnxruntime``), ``baseline_sim_<wa>`` / ``qfd_sim_<wa>``
(QAT simulated) and ``baseline_ort_<wa>`` / ``qfd_ort_<wa>`` (QAT for onnxruntime), all
calibrating with ``--calib-range`` (default ``mse``), beside rows with EWGS's rule. What
each row is and how it is made and scored: :mod:`qdet.study.deployment`.

Target rows report PyTorch's AP and onnxruntime's (their integer export, checked layer by
layer on 8 val images). ``deployment.md`` / ``.json`` in ``--out``: AP per row and W/A
(mean ± std), the paired differences that answer the two questions, AP per seed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.utils.logger import setup_logger  # noqa: E402

import qdet  # noqa: E402,F401
from qdet.engine.cli import run_cli  # noqa: E402
from qdet.study import Study, add_study_arguments, write_report  # noqa: E402
from qdet.study.deployment import (  # noqa: E402
    WIDTHS,
    add_deploy_config,
    evaluate_run,
    make_run,
    study_rows,
    tables,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument(
        "--freeze-at", type=int, default=0, help="MODEL.BACKBONE.FREEZE_AT of every run"
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        help="train and report only these rows (and fp: the others start from it)",
    )
    parser.add_argument(
        "--calib-range",
        default="mse",
        help="QUANT.CALIB_RANGE of the quantized rows (beside those that show EWGS's rule)",
    )
    add_study_arguments(parser, "output/deploy_study")
    args = parser.parse_args()
    run_cli(run, args, debug=args.debug)


def run(args) -> None:
    setup_logger(name="qdet")
    opts = ["MODEL.BACKBONE.FREEZE_AT", str(args.freeze_at), *args.opts]
    rows = study_rows(args.widths, args.calib_range)
    if args.rows:
        unknown = sorted(set(args.rows) - {r.name for r in rows})
        if unknown:
            raise ValueError(
                f"--rows: unknown row(s) {unknown}; the rows at --widths {args.widths}: "
                f"{[r.name for r in rows]}"
            )
        rows = [r for r in rows if r.name == "fp" or r.name in args.rows]
    study = Study(
        rows,
        args.seeds,
        args.out,
        opts,
        train_fn=make_run,
        tag="deploy",
        jobs=args.jobs,
        add_config=add_deploy_config,
        evaluate_fn=evaluate_run,
    )
    start = time.time()
    results = study.run(train=not args.report_only)
    report = tables(results, args.widths, args.seeds)
    text = write_report(args.out, "deployment", time.time() - start, report, results)
    print("\n" + text)


if __name__ == "__main__":
    main()
