#!/usr/bin/env python
"""Plot each quantizer's learned range and the share of values it clips, layer by layer.

    tools/inspect_quantizers.py --config-file configs/digits/retinanet_r18_4bit_qfd.yaml \
        --output output/ranges MODEL.WEIGHTS output/digits/retinanet_r18_4bit_qfd/model_final.pth

Runs the model on a calibration batch (the first --num-images images of DATASETS.TEST[0],
or --input files, folders or globs) and writes ranges.png (per quantizer in network order:
[l, u], the output step, % of values clipped below l and above u; activations and weights
side by side) and ranges.json (the same figures), and prints the quantizers that clip most.
A layer whose input is clipped heavily is saturating: its range may be too narrow for the
data (or the data unlike the training set's).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.data import build_detection_test_loader  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from tabulate import tabulate  # noqa: E402

import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.config import load_config  # noqa: E402
from qdet.engine.checkpoint import AtomicCheckpointer  # noqa: E402
from qdet.engine.checks import (  # noqa: E402
    check_datasets,
    refuse_overwriting_inputs,
    require_trained_weights,
)
from qdet.engine.cli import run_cli  # noqa: E402
from qdet.predict import list_images, predictor_batches, split_config_overrides  # noqa: E402
from qdet.quantization.range_report import plot_ranges, quantizer_ranges  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--output", required=True, help="folder for ranges.png and ranges.json")
    p.add_argument("--input", nargs="+", default=None, help="images (default: the test set)")
    p.add_argument("--num-images", type=int, default=8, help="images in the calibration batch")
    p.add_argument("--top", type=int, default=5, help="quantizers listed as clipping most")
    p.add_argument("--debug", action="store_true", help="full tracebacks of bad-input errors")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    return p


def main(args) -> dict:
    setup_logger(name="qdet")
    if args.num_images < 1:
        raise ValueError(f"--num-images {args.num_images} must be at least 1")
    inputs, opts = split_config_overrides(args.input or [], args.opts)
    files = list_images(inputs)[: args.num_images] if inputs else None
    cfg = load_config(args.config_file, opts)
    require_trained_weights(cfg, "whose ranges to plot")
    weights = cfg.MODEL.WEIGHTS
    plot_path = os.path.join(args.output, "ranges.png")
    json_path = os.path.join(args.output, "ranges.json")
    inputs = {"--config-file": args.config_file, "the checkpoint": weights}
    inputs.update({f"input {f}": f for f in files or []})
    refuse_overwriting_inputs({"ranges.png": plot_path, "ranges.json": json_path}, inputs)
    model = build_model(cfg).eval()
    AtomicCheckpointer(model).load(weights)  # a checkpoint of another model is an error
    if files is None:
        check_datasets(cfg.DATASETS.TEST[:1])
        loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
        batches, source = itertools.islice(loader, args.num_images), cfg.DATASETS.TEST[0]
    else:
        batches, source = predictor_batches(cfg, files), f"{len(files)} input image(s)"
    records = quantizer_ranges(model, batches)

    os.makedirs(args.output, exist_ok=True)
    name = os.path.splitext(os.path.basename(args.config_file))[0]
    plot_ranges(records, plot_path, title=f"{name}: quantizer ranges on {source}")
    result = {"config": args.config_file, "weights": weights, "images": source}
    result["quantizers"] = records
    with open(json_path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(json_path + ".tmp", json_path)

    worst = sorted(records, key=lambda r: -r["clipped"])[: args.top]
    table = [
        [r["name"], r["kind"], r["bits"], f"{r['lower']:.3g}", f"{r['upper']:.3g}",
         f"{r['step']:.3g}", f"{100 * r['clipped_below']:.2f}", f"{100 * r['clipped_above']:.2f}"]
        for r in worst
    ]  # fmt: skip
    headers = ["quantizer", "kind", "bits", "l", "u", "step", "% below l", "% above u"]
    log = logging.getLogger("qdet").info
    log(f"the {len(worst)} quantizers clipping most, of {len(records)}:")
    log("\n" + tabulate(table, headers))
    log(f"wrote {plot_path} and {json_path}")
    return result


if __name__ == "__main__":
    parsed = build_parser().parse_args()
    run_cli(main, parsed, debug=parsed.debug)
