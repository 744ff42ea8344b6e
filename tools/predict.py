#!/usr/bin/env python
"""Run a qdet model on your images and draw its detections (Detectron2's demo/demo.py, for qdet).

    tools/predict.py --config-file configs/digits/retinanet_r18_4bit_qfd.yaml \
        --input a.jpg photos/ "more/*.png" --output out/ MODEL.WEIGHTS model_final.pth

Any qdet config (RetinaNet, ViTDet / Swin Mask R-CNN, quantized or FP), yacs (.yaml,
``MODEL.WEIGHTS X.pth``) or LazyConfig (.py, ``train.init_checkpoint=X.pth``). Each input is
written to --output under its own name, with the detections scoring at least
--confidence-threshold drawn by Detectron2's Visualizer, at the input's size.
--compare OTHER.yaml OTHER.pth (repeatable) runs the same images through more models and
writes the panels side by side, each titled with its model and bit widths (e.g. the FP
teacher left, the 4-bit student right). --onnx model.onnx runs the first model's network
in onnxruntime from an exported file (tools/export_onnx.py); its config still supplies the
pre- and post-processing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cv2  # noqa: E402
import tqdm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.engine.cli import run_cli  # noqa: E402
from qdet.engine.trained_model import checkpoint_overrides, load_trained_model  # noqa: E402
from qdet.predict import (  # noqa: E402
    check_onnx_file,
    draw_detections,
    list_images,
    output_paths,
    panel_model,
    read_image,
    side_by_side,
    split_config_overrides,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument(
        "--input", required=True, nargs="+", help="image files, folders or quoted glob patterns"
    )
    p.add_argument("--output", required=True, help="folder for the drawn images")
    p.add_argument("--confidence-threshold", type=float, default=0.5)
    p.add_argument(
        "--compare",
        nargs=2,
        action="append",
        default=[],
        metavar=("CONFIG", "WEIGHTS"),
        help="another model for the same images, drawn to the right (repeatable)",
    )
    p.add_argument("--onnx", default=None, help="run the first model's network from this ONNX file")
    p.add_argument("--scale", type=float, default=1.0, help="drawing scale (1: the input's size)")
    p.add_argument("--debug", action="store_true", help="full tracebacks of bad-input errors")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    return p


def _name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def main(args) -> list[str]:
    setup_logger(name="qdet")
    inputs, opts = split_config_overrides(args.input, args.opts)
    files = list_images(inputs)  # bad inputs fail before any model is built
    outputs = output_paths(files, args.output)
    threshold = args.confidence_threshold
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--confidence-threshold {threshold} must lie in [0, 1]")
    check_onnx_file(args.onnx)  # before any model is built
    first = load_trained_model(args.config_file, opts, "to run", weights_optional=bool(args.onnx))
    device = str(first.model.device)
    name = _name(args.onnx) + " (onnxruntime)" if args.onnx else _name(args.config_file)
    models = [panel_model(first, f"{name}  {first.bits}", threshold, args.onnx)]
    for config_file, weights in args.compare:
        other = load_trained_model(
            config_file, checkpoint_overrides(config_file, weights, device), "to compare"
        )
        title = f"{_name(config_file)}  {other.bits}"
        models.append(panel_model(other, title, threshold))

    os.makedirs(args.output, exist_ok=True)
    written = []
    compare = len(models) > 1
    for path, out in tqdm.tqdm(list(zip(files, outputs)), desc="predict"):
        image = read_image(path)
        panels = [draw_detections(m, image, threshold, args.scale, titled=compare) for m in models]
        if not cv2.imwrite(out, side_by_side(panels)):
            raise ValueError(f"opencv could not write {out!r}")
        written.append(out)
    logging.getLogger("qdet").info(f"wrote {len(written)} image(s) to {args.output}")
    return written


if __name__ == "__main__":
    parsed = build_parser().parse_args()
    run_cli(main, parsed, debug=parsed.debug)
