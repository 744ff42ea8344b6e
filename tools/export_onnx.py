#!/usr/bin/env python
"""Export a trained qdet detector to ONNX (quantized layers as QDQ) and to the packed
low-bit weight file, then check the ONNX model in onnxruntime against PyTorch.

    tools/export_onnx.py --config-file configs/digits/retinanet_r18_4bit_qfd.yaml \\
        --output output/export/qfd_4bit.onnx \\
        MODEL.WEIGHTS output/digits/retinanet_r18_4bit_qfd/model_final.pth
    tools/export_onnx.py --config-file configs/lazy/digits/retinanet_r18_4bit_qfd.py \\
        --output output/export/lazy_qfd_4bit.onnx \\
        train.init_checkpoint=output/lazy/digits/retinanet_r18_4bit_qfd/model_final.pth

Writes ``--output`` and, beside it, ``<output>.weights.safetensors`` (``--packed-weights``
to choose the path), prints the sizes against FP32, and runs the check on
``--verify-images`` validation images (default 8; 0 skips it): head outputs within the
stated tolerance and the same detections, or exit status 1. ``--eval`` adds COCO AP of the
onnxruntime model and of the PyTorch model on the whole of ``DATASETS.TEST[0]`` (a
LazyConfig: ``dataloader.test`` and ``dataloader.evaluator``).
RetinaNet exports through its head (post-processing in Python, Detectron2's own code);
ViTDet / Swin Mask R-CNN export their backbone. Needs the ``export`` extra.
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
from detectron2.utils.logger import setup_logger  # noqa: E402

import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.engine.checks import refuse_overwriting_inputs  # noqa: E402
from qdet.engine.cli import run_cli  # noqa: E402
from qdet.engine.trained_model import load_trained_model  # noqa: E402
from qdet.export import OnnxRetinaNet, export_onnx, save_packed_weights, verify  # noqa: E402
from qdet.export.runtime import loader_box_ap  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--output", help="the .onnx file to write")
    p.add_argument(
        "--check",
        metavar="FILE.onnx",
        help="check an existing export against the config and its weights instead of "
        "exporting (exit 1 when it fails; writes nothing)",
    )
    p.add_argument(
        "--packed-weights",
        default=None,
        help="the packed weight file (default: <output>.weights.safetensors; 'none' skips)",
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check the file in onnxruntime against PyTorch (on by default; exit 1 on failure)",
    )
    p.add_argument("--verify-images", type=int, default=8, help="images the check runs")
    p.add_argument("--eval", action="store_true", help="COCO AP of onnxruntime vs PyTorch")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    p.add_argument("--debug", action="store_true", help="full tracebacks of bad-input errors")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    return p


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(args) -> int:
    setup_logger()  # Detectron2: inference progress
    setup_logger(name="qdet")
    log = logging.getLogger("qdet").info
    # onnxruntime's CPU provider is the reference
    if bool(args.output) == bool(args.check):
        raise ValueError("give --output FILE.onnx (export) or --check FILE.onnx (check), one")
    trained = load_trained_model(args.config_file, args.opts, "to export", device="cpu")
    if args.check:
        if not os.path.isfile(args.check):
            raise FileNotFoundError(f"--check {args.check!r} does not exist")
        batches = itertools.islice(trained.test_loader(), max(args.verify_images, 1))
        report = verify(trained.model, args.check, batches, threads=args.threads)
        log(f"check of {args.check}: {report.summary()}")
        for failure in report.failures:
            logging.getLogger("qdet").error(f"check failed: {failure}")
        return 0 if report.ok else 1
    packed = args.packed_weights or args.output.removesuffix(".onnx") + ".weights.safetensors"
    report_path = args.output.removesuffix(".onnx") + ".export.json"
    refuse_overwriting_inputs(
        {"--output": args.output, "--packed-weights": packed, "the export's JSON": report_path},
        {"--config-file": args.config_file, "the checkpoint": trained.checkpoint},
    )
    model = trained.model
    sample = model.preprocess_image(next(iter(trained.test_loader()))).tensor

    info = export_onnx(model, args.output, sample)
    fp32_ckpt = sum(4 * p.numel() for p in model.state_dict().values() if p.is_floating_point())
    log(
        f"wrote {args.output} ({info['graph']} graph, {info['quantizers']} quantizers in QDQ): "
        f"{_mib(os.path.getsize(args.output))}"
    )
    sizes = {"onnx_bytes": os.path.getsize(args.output), "fp32_bytes": fp32_ckpt}
    if packed.lower() != "none":
        written = save_packed_weights(model, packed)
        sizes["packed_bytes"] = written["file_bytes"]
        log(
            f"wrote {packed}: {_mib(written['file_bytes'])}, "
            f"{written['fp32_bytes'] / written['file_bytes']:.1f}x smaller than the "
            f"{_mib(written['fp32_bytes'])} of the model in FP32"
        )
    result = {"sizes": sizes, **info}
    status = 0
    if args.verify and args.verify_images > 0:
        batches = itertools.islice(trained.test_loader(), args.verify_images)
        report = verify(model, args.output, batches, threads=args.threads)
        result["verify"] = dict(vars(report))
        log(f"check: {report.summary()}")
        for warning in report.warnings:
            logging.getLogger("qdet").warning(warning)
        if not report.ok:
            for failure in report.failures:
                logging.getLogger("qdet").error(f"check failed: {failure}")
            status = 1
    if args.eval:
        if info["graph"] != "retinanet":
            raise ValueError("--eval evaluates RetinaNet exports; this model exports a backbone")
        dataset = trained.dataset
        runners = {"pytorch": model, "onnxruntime": OnnxRetinaNet(model, args.output, args.threads)}
        aps = {
            name: loader_box_ap(runner, trained.test_loader(), trained.evaluator())
            for name, runner in runners.items()
        }
        result["eval"] = aps
        log(
            f"box AP on {dataset}: PyTorch {aps['pytorch']['AP']:.2f}, "
            f"onnxruntime {aps['onnxruntime']['AP']:.2f}"
        )
    with open(report_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return status


if __name__ == "__main__":
    parsed = build_parser().parse_args()
    sys.exit(run_cli(main, parsed, debug=parsed.debug))
