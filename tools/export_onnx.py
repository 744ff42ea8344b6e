#!/usr/bin/env python
"""Export a trained qdet detector to ONNX (quantized layers as QDQ) and to the packed
low-bit weight file, then check the ONNX model in onnxruntime against PyTorch.

    tools/export_onnx.py --config-file configs/digits/retinanet_r18_4bit_qfd.yaml \\
        --output output/export/qfd_4bit.onnx \\
        MODEL.WEIGHTS output/digits/retinanet_r18_4bit_qfd/model_final.pth
    tools/export_onnx.py --config-file configs/lazy/digits/retinanet_r18_4bit_qfd.py \\
        --output output/export/lazy_qfd_4bit.onnx \\
        train.init_checkpoint=output/lazy/digits/retinanet_r18_4bit_qfd/model_final.pth

Writes ``--output``: the whole detector in one file (Detectron2's inference traced by its
``TracingAdapter``, qdet's quantized layers inside; one resized picture in, instances out;
``qdet_runner.py`` runs it without torch), and beside it ``<output>.weights.safetensors``
(``--packed-weights`` to choose the path). The check runs on ``--verify-images`` test
pictures (default 8; 0 skips it): an FP file's instances equal PyTorch's to float
rounding; a quantized file finds PyTorch's confident detections (a target's file runs every
quantized conv as one integer op); otherwise exit status 1. ``--eval`` adds COCO AP (box;
mask for mask models) of the file run by the runner's post-processing and of PyTorch on
the whole test set. A target's file's JSON also holds, per layer kind, its integer and
float ops beside those of onnxruntime's ``quantize_static`` of the same FP model
(``--peer-kernels``; ``--no-peer-kernels`` skips it). ``--network-only`` writes the
network alone as before (RetinaNet's head outputs, an R-CNN's backbone features; checked
layer by layer). Needs the ``export`` extra.
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
from qdet.engine.trained_model import (  # noqa: E402
    load_trained_model,
)
from qdet.export import OnnxRetinaNet, export_onnx, save_packed_weights, verify  # noqa: E402
from qdet.export.peer import kernels_vs_quantize_static  # noqa: E402
from qdet.export.whole import export_whole_detector  # noqa: E402
from qdet.export.whole_check import (  # noqa: E402
    WholeFileDetector,
    check_whole,
    is_whole_file,
    loader_aps,
    test_pictures,
)

EVAL_AP_TOLERANCE = 0.3  # AP points between the file and PyTorch before --eval warns
# Test pictures quantize_static calibrates on for --peer-kernels (counts, not accuracy).
PEER_CALIBRATION_PICTURES = 4


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
    p.add_argument(
        "--network-only",
        action="store_true",
        help="write the network alone (RetinaNet: head outputs; R-CNNs: backbone features), "
        "the post-processing left to Detectron2: the layer-wise check and latency benchmark",
    )
    p.add_argument(
        "--peer-kernels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="count onnxruntime's quantize_static (MinMax) of the same FP model's whole file, "
        "per layer kind beside the export's, into the JSON (default: for a target's file)",
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
    if args.peer_kernels and args.network_only:
        raise ValueError(
            "--peer-kernels compares whole-detector files; leave out --network-only or "
            "--peer-kernels"
        )
    trained = load_trained_model(args.config_file, args.opts, "to export", device="cpu")
    if args.check:
        if not os.path.isfile(args.check):
            raise FileNotFoundError(f"--check {args.check!r} does not exist")
        report = _check(trained, args.check, max(args.verify_images, 1), args.threads)
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
    first = next(iter(trained.test_loader()))
    if args.network_only:
        info = export_onnx(model, args.output, model.preprocess_image(first).tensor)
    else:
        info = export_whole_detector(
            model, args.output, first[0]["image"], trained.deployment_info()
        )
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
        report = _check(trained, args.output, args.verify_images, args.threads)
        result["verify"] = dict(vars(report))
        log(f"check: {report.summary()}")
        for warning in report.warnings:
            logging.getLogger("qdet").warning(warning)
        if not report.ok:
            for failure in report.failures:
                logging.getLogger("qdet").error(f"check failed: {failure}")
            status = 1
    if args.peer_kernels is None:
        args.peer_kernels = bool(trained.deployment_info().get("target")) and not args.network_only
    if args.peer_kernels:
        try:
            result["kernels_vs_quantize_static"] = _kernels_vs_peer(args, trained)
        except Exception as e:  # the export and its check stand without the comparison
            result["kernels_vs_quantize_static"] = {"error": f"{type(e).__name__}: {e}"}
            logging.getLogger("qdet").warning(
                f"--peer-kernels: no comparison, {e} (--no-peer-kernels skips it)"
            )
    if args.eval:
        result["eval"] = _evaluate(trained, args.output, info["graph"], args.threads)
        for kind, aps in result["eval"]["onnxruntime"].items():
            torch_ap = result["eval"]["pytorch"][kind]["AP"]
            ort_ap = aps["AP"]
            log(f"{kind} AP on {trained.dataset}: PyTorch {torch_ap:.2f}, onnxruntime {ort_ap:.2f}")
            if abs(aps["AP"] - torch_ap) > EVAL_AP_TOLERANCE:
                logging.getLogger("qdet").warning(
                    f"the file's {kind} AP is {aps['AP'] - torch_ap:+.2f} from PyTorch's, beyond "
                    f"{EVAL_AP_TOLERANCE}: an FP file must not differ (report it); a quantized "
                    "one differs by ties at rounding boundaries (docs/deployment.md, 'The check')"
                )
    with open(report_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return status


def _check(trained, path: str, images: int, threads: int):
    """The whole file against PyTorch's inference (:mod:`qdet.export.whole_check`), or a
    network-only file layer by layer (:func:`qdet.export.verify`)."""
    if is_whole_file(path):
        pictures = test_pictures(trained.test_loader(), images)
        return check_whole(trained.model, path, pictures, threads=threads)
    batches = itertools.islice(trained.test_loader(), images)
    return verify(trained.model, path, batches, threads=threads)


def _kernels_vs_peer(args, trained) -> dict:
    """:func:`kernels_vs_quantize_static` of the export, logged as a table."""
    pictures = test_pictures(trained.test_loader(), PEER_CALIBRATION_PICTURES)
    table = kernels_vs_quantize_static(trained, args.config_file, args.opts, args.output, pictures)
    log = logging.getLogger("qdet").info
    log("integer / float ops per layer kind: this file | quantize_static MinMax of the FP model")
    for kind, both in table.items():
        q, p = both["qdet"], both["quantize_static"]
        log(f"  {kind:15s} {q['integer']:4d} / {q['float']:<4d} | {p['integer']:4d} / {p['float']}")
    return table


def _evaluate(trained, path: str, graph: str, threads: int) -> dict:
    """COCO AP (box; mask for mask models) of PyTorch and of the file on the test set."""
    if graph == "retinanet":  # a network-only RetinaNet: Detectron2's post-processing
        runner = OnnxRetinaNet(trained.model, path, threads)
    elif graph == "backbone":
        raise ValueError("--eval evaluates whole files and RetinaNet exports; this is a backbone")
    else:
        runner = WholeFileDetector(path, threads)
    runners = {"pytorch": trained.model, "onnxruntime": runner}
    return {
        name: loader_aps(runner, trained.test_loader(), trained.evaluator())
        for name, runner in runners.items()
    }


if __name__ == "__main__":
    parsed = build_parser().parse_args()
    sys.exit(run_cli(main, parsed, debug=parsed.debug))
