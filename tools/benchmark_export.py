#!/usr/bin/env python
"""Deployed latency of a detection on onnxruntime's CPU provider: qdet's integer exports
against the FP32 model and onnxruntime's own quantizer of it, each as the network alone and
as the whole detector, side by side in one process.

    tools/benchmark_export.py --fp configs/digits/retinanet_r18_fp.yaml FP_WEIGHTS \\
        --qdet W8A8 configs/digits/retinanet_r18_w8a8_baseline_ort.yaml WEIGHTS \\
        --qdet W4A4 configs/digits/retinanet_r18_4bit_qfd_ort.yaml WEIGHTS

Models: the FP32 export of ``--fp``; onnxruntime's ``quantize_static`` of that same file
calibrated with MinMax and with Percentile on ``--calibration-images`` training images;
every ``--qdet`` export (a model trained with ``QUANT.TARGET``; ``--qdet-calibrated W A``
instead builds one from the FP weights with qdet's calibration alone). Each is exported as
the network-only file and as the whole detector (``quantize_static``'s whole file: its
MinMax quantization of the FP32 whole file's network; Percentile cannot calibrate one).
Both are timed at batch 1 on every ``--sizes`` and ``--threads`` setting with the first
test picture resized to that size, the network-only file on its normalised batch, the whole
file image in to instances out through ``qdet_runner.Detector``, all files alternating run
by run (:mod:`qdet.benchmark.export_latency`). Table (per model: both files' median ms and
IQR, the post-processing's cost, the whole file's ratios to FP32's and to ``quantize_static``
MinMax's, the integer / float ops onnxruntime runs in it, its size, the instances it
returns) in ``--out`` as ``benchmark_export.md`` and ``.json``.

ViTDet and Swin (``--transformer CONFIG``, repeatable, instead of ``--fp``): the backbone
files of FP32, ``quantize_static`` MinMax and Percentile, and qdet's target exports
(``--qdet-calibrated``, default W8A8 and W4A8), random weights unless ``--opts
MODEL.WEIGHTS ...``, at every square ``--sizes`` H (:mod:`qdet.benchmark.
transformer_latency`), in ``--out`` as ``benchmark_export_transformers.md`` / ``.json``:

    tools/benchmark_export.py --transformer configs/vitdet_b_fp.yaml \\
        --transformer configs/swin_b_fp.yaml --sizes 512 512 --sizes 1024 1024

``--whole`` times their whole-detector files instead, image in to instances out
(``quantize_static`` MinMax of the whole network, and of its MatMuls only), in
``benchmark_export_transformers_whole.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qdet  # noqa: E402,F401
from qdet.benchmark.export_latency import measure, table  # noqa: E402
from qdet.benchmark.transformer_latency import (  # noqa: E402
    measure_transformers,
    transformer_table,
)
from qdet.engine.cli import run_cli  # noqa: E402


def main(args) -> dict:
    if args.transformer:
        result = measure_transformers(args)
        stem = "benchmark_export_transformers" + ("_whole" if args.whole else "")
        text = transformer_table(result)
    else:
        result, stem = measure(args), "benchmark_export"
        text = table(result)
    print(text)
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(text + "\n")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp", nargs=2, metavar=("CONFIG", "WEIGHTS"))
    p.add_argument(
        "--transformer",
        action="append",
        metavar="CONFIG",
        help="a ViTDet / Swin config whose backbone files to time (repeatable; replaces --fp)",
    )
    p.add_argument("--opts", nargs="*", default=[], help="config options for --transformer")
    p.add_argument(
        "--whole",
        action="store_true",
        help="--transformer: time the whole detector's files (image in, instances out), not "
        "the backbone's",
    )
    p.add_argument("--keep-files", action="store_true", help="--transformer: keep the ONNX files")
    p.add_argument(
        "--no-arena",
        action="store_true",
        help="--transformer: every session without onnxruntime's CPU memory arena, so an "
        "idle one holds no activations (ViTDet-B's whole files at 1024 x 1024 side by side "
        "did not fit 24 GB with it)",
    )
    p.add_argument(
        "--qdet",
        nargs=3,
        action="append",
        metavar=("LABEL", "CONFIG", "WEIGHTS"),
        help="a model trained with QUANT.TARGET (repeatable), e.g. W4A4 config weights",
    )
    p.add_argument(
        "--qdet-calibrated",
        nargs=2,
        type=int,
        action="append",
        metavar=("W_BITS", "A_BITS"),
        help="a target model built from the FP weights, calibrated only (repeatable)",
    )
    p.add_argument("--qdet-calib-batches", type=int, default=4, help="its calibration batches")
    p.add_argument(
        "--calibration-images", type=int, default=64, help="quantize_static's calibration pictures"
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs=2,
        action="append",
        metavar=("H", "W"),
        help="picture sizes, H x W (default: 160 192, the digits test size, and 800 1344)",
    )
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="output/benchmark_export")
    p.add_argument("--debug", action="store_true")
    return p


if __name__ == "__main__":
    parser = build_parser()
    parsed = parser.parse_args()
    if not (parsed.fp or parsed.transformer):
        parser.error("give --fp CONFIG WEIGHTS (RetinaNet) or --transformer CONFIG (ViTDet, Swin)")
    if parsed.whole and not parsed.transformer:
        parser.error("--whole times a --transformer config's whole detector: give --transformer")
    if parsed.transformer:
        parsed.sizes = parsed.sizes or [(512, 512), (1024, 1024)]
        # quantize_static's calibrators hold every tensor of every picture (ViT-B's global
        # attention at 1024: GBs each): one picture; latency does not depend on it.
        parsed.calibration_images = 1
    parsed.sizes = parsed.sizes or [(160, 192), (800, 1344)]
    if not (parsed.qdet or parsed.qdet_calibrated):
        default = [(8, 8), (4, 8)] if parsed.transformer else [(8, 8), (4, 8), (4, 4)]
        parsed.qdet_calibrated = default
    run_cli(main, parsed, debug=parsed.debug)
