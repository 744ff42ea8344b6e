#!/usr/bin/env python
"""onnxruntime latency of an FP32 export against a QDQ (quantized) export, side by side.

    tools/benchmark_export.py \\
        --fp configs/digits/retinanet_r18_fp.yaml output/.../fp/model_final.pth \\
        --quantized configs/digits/retinanet_r18_4bit_qfd.yaml output/.../qfd_4bit/model_final.pth

Exports both (``tools/export_onnx.py``'s function), then times onnxruntime's CPU provider
at batch 1 on each ``--sizes`` (H W, padded to the backbone's divisibility), the two
models alternating run by run in one process, and prints the medians and their ratio
(table + JSON). Whether onnxruntime runs the QDQ graph with integer kernels is its
choice (it fuses DequantizeLinear -> Conv -> QuantizeLinear groups into QLinearConv
where it can); the ratio says what that gives here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qdet  # noqa: E402,F401
from qdet.engine.cli import run_cli  # noqa: E402


def _load(config: str, weights: str):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from qdet.engine.checks import missing_checkpoint_message
    from qdet.engine.stages import load_config

    if not os.path.isfile(weights):
        raise FileNotFoundError(missing_checkpoint_message("weights", weights))
    cfg = load_config(config, ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    return model


def _optimized_ops(path: str) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs for ``path`` after its optimisations."""
    import collections

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = path + ".optimized"
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(path + ".optimized").graph.node)
    os.remove(path + ".optimized")
    return dict(ops)


def main(args) -> dict:
    import numpy as np
    import torch

    from qdet.export import export_onnx, inference_session

    os.makedirs(args.out, exist_ok=True)
    models = {"fp32": _load(*args.fp), "qdq": _load(*args.quantized)}
    div = max(m.backbone.size_divisibility for m in models.values())
    rows, result = [], {"threads": args.threads, "repeats": args.repeats, "sizes": {}}
    for h, w in args.sizes:
        ph, pw = -(-h // div) * div, -(-w // div) * div
        images = torch.randn(1, 3, ph, pw)
        sessions = {}
        for name, model in models.items():
            path = os.path.join(args.out, f"{name}_{ph}x{pw}.onnx")
            export_onnx(model, path, images)
            sessions[name] = inference_session(path, args.threads)
        kernels = _optimized_ops(path)  # the QDQ model's, as onnxruntime runs it
        feed = {"images": images.numpy()}
        times = {name: [] for name in sessions}
        for _ in range(args.warmup):
            for s in sessions.values():
                s.run(None, feed)
        for _ in range(args.repeats):  # alternate, so drift hits both alike
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feed)
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) * 1000 for name, t in times.items()}
        spread = {
            name: float(np.percentile(t, 75) - np.percentile(t, 25)) * 1000
            for name, t in times.items()
        }
        ratio = med["qdq"] / med["fp32"]
        result["sizes"][f"{ph}x{pw}"] = {
            "median_ms": med,
            "iqr_ms": spread,
            "qdq_over_fp32": ratio,
            "qdq_optimized_ops": kernels,
        }
        integer = sum(v for k, v in kernels.items() if "Integer" in k or k.startswith("QLinear"))
        rows.append(
            f"| {ph}x{pw} | {med['fp32']:.1f} ({spread['fp32']:.1f}) | "
            f"{med['qdq']:.1f} ({spread['qdq']:.1f}) | {ratio:.2f} | "
            f"{integer} integer, {kernels.get('Conv', 0) + kernels.get('FusedConv', 0)} float |"
        )
    table = "\n".join(
        [
            f"onnxruntime CPU, batch 1, {args.threads or 'default'} threads, median (IQR) of "
            f"{args.repeats} runs each, alternating",
            "",
            "| input | FP32 ONNX ms | QDQ ONNX ms | QDQ / FP32 | QDQ model's convs as run |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    with open(os.path.join(args.out, "benchmark_export.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "benchmark_export.md"), "w") as f:
        f.write(table + "\n")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp", nargs=2, required=True, metavar=("CONFIG", "WEIGHTS"))
    p.add_argument("--quantized", nargs=2, required=True, metavar=("CONFIG", "WEIGHTS"))
    p.add_argument(
        "--sizes",
        type=int,
        nargs=2,
        action="append",
        metavar=("H", "W"),
        help="input sizes (default: 160 192, the digits test size, and 800 1333)",
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: default)")
    p.add_argument("--out", default="output/benchmark_export")
    p.add_argument("--debug", action="store_true")
    return p


if __name__ == "__main__":
    parsed = build_parser().parse_args()
    parsed.sizes = parsed.sizes or [(160, 192), (800, 1333)]
    run_cli(main, parsed, debug=parsed.debug)
