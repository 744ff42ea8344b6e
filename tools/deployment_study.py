#!/usr/bin/env python
"""What a deployable grid costs and what QAT buys: onnxruntime's PTQ, qdet's PTQ, and QAT
simulated and for the onnxruntime target, paired over seeds, on the embedded digits data.

    tools/deployment_study.py --seeds 1 2 3 --jobs 2      # writes output/deploy_study/
    tools/deployment_study.py --arch vitdet --seeds 1 2 3 --jobs 2
                                                  # writes output/deploy_study_vitdet/
    tools/deployment_study.py --arch swin --seeds 1 --jobs 2    # output/deploy_study_swin/

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

``--arch vitdet`` / ``swin``: the digits tiny ViTDet / Swin Mask R-CNN on whole-detector
files, box and mask AP, one FP model for every seed; its rows:
:mod:`qdet.study.deployment_transformer`.
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
from qdet.study import (  # noqa: E402
    Study,
    add_study_arguments,
    deployment_transformer,
    write_report,
)
from qdet.study.deployment import (  # noqa: E402
    WIDTHS,
    add_deploy_config,
    evaluate_run,
    make_run,
    study_rows,
    tables,
)

OUT = {
    "retinanet": "output/deploy_study",
    "vitdet": "output/deploy_study_vitdet",
    "swin": "output/deploy_study_swin",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        choices=list(OUT),
        default="retinanet",
        help="the digits RetinaNet-R18 (network files), tiny ViTDet or tiny Swin (whole files)",
    )
    parser.add_argument(
        "--widths",
        nargs="+",
        choices=list(WIDTHS),
        help=f"default: {list(WIDTHS)}; vitdet, swin: {list(deployment_transformer.WIDTHS)}",
    )
    parser.add_argument(
        "--freeze-at", type=int, default=0, help="MODEL.BACKBONE.FREEZE_AT of every run (retinanet)"
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        help="train and report only these rows (and fp: the others start from it)",
    )
    parser.add_argument(
        "--calib-range",
        default="mse",
        help="retinanet: QUANT.CALIB_RANGE of the quantized rows (beside those that show "
        "EWGS's rule); the vitdet and swin configs calibrate with mse",
    )
    add_study_arguments(parser, "")
    args = parser.parse_args()
    args.out = args.out or OUT[args.arch]
    run_cli(run, args, debug=args.debug)


def run(args) -> None:
    setup_logger(name="qdet")
    transformer = args.arch in deployment_transformer.ARCHS
    widths = args.widths or list(deployment_transformer.WIDTHS if transformer else WIDTHS)
    if transformer:
        if args.freeze_at != 0 or args.calib_range != "mse":
            raise ValueError(
                f"--freeze-at and --calib-range set the retinanet study's runs; the {args.arch} "
                "configs set their own (QUANT.CALIB_RANGE mse): leave them out, or give "
                "config overrides (KEY VALUE) after the flags"
            )
        unknown = sorted(set(widths) - set(deployment_transformer.WIDTHS))
        if unknown:
            raise ValueError(
                f"--widths {unknown}: the {args.arch} study has "
                f"{list(deployment_transformer.WIDTHS)} (its _ort configs)"
            )
        opts = list(args.opts)
        rows = deployment_transformer.transformer_rows(widths, args.arch)
        train_fn = deployment_transformer.make_run
        evaluate_fn = deployment_transformer.evaluate_run
    else:
        opts = ["MODEL.BACKBONE.FREEZE_AT", str(args.freeze_at), *args.opts]
        rows = study_rows(widths, args.calib_range)
        train_fn, evaluate_fn = make_run, evaluate_run
    if args.rows:
        unknown = sorted(set(args.rows) - {r.name for r in rows})
        if unknown:
            raise ValueError(
                f"--rows: unknown row(s) {unknown}; the rows at --widths {widths}: "
                f"{[r.name for r in rows]}"
            )
        rows = [r for r in rows if r.name == "fp" or r.name in args.rows]
    study = Study(
        rows,
        args.seeds,
        args.out,
        opts,
        train_fn=train_fn,
        tag="deploy",
        jobs=args.jobs,
        add_config=add_deploy_config,
        evaluate_fn=evaluate_fn,
    )
    start = time.time()
    results = study.run(train=not args.report_only)
    if args.report_only and not any(results.values()):
        raise FileNotFoundError(
            f"--report-only: no finished run under {args.out!r} (nothing to report; the "
            "report there is left as it is): run the study without --report-only first"
        )
    if transformer:
        report = deployment_transformer.tables(results, widths, args.seeds, args.arch)
    else:
        report = tables(results, widths, args.seeds)
    text = write_report(args.out, "deployment", time.time() - start, report, results)
    print("\n" + text)


if __name__ == "__main__":
    main()
