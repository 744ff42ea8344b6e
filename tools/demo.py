#!/usr/bin/env python
"""`make demo`: FP teacher, 4-bit baseline / QFD students for onnxruntime, each shipped as
one file and run without torch, on the digits data.

Rows (configs/digits/demo_*.yaml, outputs under output/demo/, one seed, short schedules):
  1. an FP RetinaNet-R18 teacher trained from scratch on qdet_digits_train (600 iterations);
  2. a 4-bit QAT baseline and a 4-bit QFD student fine-tuned from it, both trained for
     onnxruntime's integer kernels (QUANT.TARGET onnxruntime; QFD runs its teacher stage
     first: the teacher fine-tuned with an 8-bit quantizer on its p3 feature);
each evaluated on qdet_digits_val (COCO AP) in PyTorch, then exported as one
whole-detector ONNX file (<run>/model.onnx) and run by the torch-free runner
(qdet_runner.py) on every val picture (the file's AP), in its worker right after its
training; then the runner's ms per picture, the files alternating on one thread each.
A table (also output/demo/demo.json), a bar chart (output/demo/demo.png) and the three
files' detections side by side (output/demo/detections.png) on the three val images where
the 4-bit models differ most from FP, at the score where the FP teacher's detections are
90% right on val. The fine-tunes train two at a time (qdet.study.Study); a
progress line with an ETA comes at every start and every minute.

Finished rows and their files are reused; --fresh retrains everything. One seed of a short
schedule shows the pipeline, not which method is better: the demo says so and points to
the study.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.utils.logger import setup_logger  # noqa: E402

import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.engine.cli import run_cli  # noqa: E402
from qdet.predict import write_study_sheet  # noqa: E402
from qdet.study import Study  # noqa: E402
from qdet.study.demo import SHEET, demo_rows, demo_table, plot, write_summary  # noqa: E402
from qdet.study.demo_deploy import FILE, TIMED, ship_run, time_files  # noqa: E402

OUT = "output/demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="retrain every row")
    parser.add_argument("--debug", action="store_true", help="tracebacks for bad input")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="KEY VALUE overrides for every run, e.g. SOLVER.MAX_ITER 50",
    )
    args = parser.parse_args()
    run_cli(run, args, debug=args.debug)


def run(args) -> None:
    if args.fresh:
        shutil.rmtree(OUT, ignore_errors=True)
    setup_logger(name="qdet")
    start = time.time()
    jobs = 2 if (os.cpu_count() or 1) >= 2 else 1  # two one-thread runs beat one (Study)
    log = lambda m: print(m, flush=True)  # noqa: E731
    study = Study(
        demo_rows(), [1], OUT, args.opts, tag="demo", log=log, jobs=jobs, evaluate_fn=ship_run
    )
    results = study.run()
    files = {name: os.path.join(study.run_dir(row, 1), FILE) for name, row in study.rows.items()}
    log(f"[demo] Timing the {len(files)} whole-detector files, {TIMED} val pictures each")
    file_ms = time_files(files, study.config(study.rows[SHEET[0]], 1).DATASETS.TEST[0])
    rows = demo_table(study, results, file_ms)
    plot(rows, os.path.join(OUT, "demo.png"))
    sheet = write_study_sheet(study, SHEET, 1, os.path.join(OUT, "detections.png"), files=files)
    seconds = time.time() - start
    write_summary(rows, sheet, seconds, os.path.join(OUT, "demo.json"))
    print(
        f"\n[demo] COCO box AP on qdet_digits_val ({seconds:.0f} s in all); 'file': the "
        "model's whole-detector ONNX file run by qdet_runner.py (no torch), its AP and "
        "median ms per picture on one onnxruntime thread:"
    )
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".1f"))
    if sheet:
        print(f"[demo] Detections, {' | '.join(SHEET)}: {sheet.path}: {sheet.describe()}")
    print(
        f"[demo] Run a file without torch: python qdet_runner.py --onnx "
        f"{files[SHEET[-1]]} --input PICTURES --output FOLDER"
    )
    print(
        f"[demo] Plot: {OUT}/demo.png. One seed of a short schedule: AP differences of a few "
        "points between these rows are within run-to-run noise, not results; the 3-seed "
        "comparison is docs/studies.md, 'Accuracy study' (tools/accuracy_study.py)."
    )


if __name__ == "__main__":
    main()
