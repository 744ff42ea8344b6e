#!/usr/bin/env python
"""Deployed latency on onnxruntime's CPU provider: qdet's integer exports against the FP32
model and onnxruntime's own quantizer of it, side by side in one process.

    tools/benchmark_export.py --fp configs/digits/retinanet_r18_fp.yaml FP_WEIGHTS \\
        --qdet W8A8 configs/digits/retinanet_r18_w8a8_baseline_ort.yaml WEIGHTS \\
        --qdet W4A4 configs/digits/retinanet_r18_4bit_qfd_ort.yaml WEIGHTS

Models: the FP32 export of ``--fp``; onnxruntime's ``quantize_static`` of that same file
(after ``quant_pre_process``; QDQ, per-channel s8 weights, u8 activations) calibrated with
MinMax and with Percentile on ``--calibration-images`` training images; every ``--qdet``
export (a model trained with ``QUANT.TARGET``; ``--qdet-calibrated W A`` instead builds one
from the FP weights with qdet's calibration alone, whose latency is a trained one's: the
graph is the same). Each is exported once (dynamic axes), then timed at batch 1 on every
``--sizes`` and ``--threads`` setting, all models alternating run by run so that drift
hits them alike (sessions' idle threads sleep instead of spinning, so they do not compete
with the one being timed). Table (median ms and IQR, ratios to FP32 and to ``quantize_static``
MinMax, the integer / float ops onnxruntime runs, file size) in ``--out`` as
``benchmark_export.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qdet  # noqa: E402,F401
from qdet.engine.cli import run_cli  # noqa: E402

PEER = "quantize_static MinMax"


def _load(config: str, weights: str, opts=()):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from qdet.config import load_config
    from qdet.engine.checks import missing_checkpoint_message

    if not os.path.isfile(weights):
        raise FileNotFoundError(missing_checkpoint_message("weights", weights))
    cfg = load_config(config, ["MODEL.DEVICE", "cpu", *opts])
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    return cfg, model


def calibrated_target_model(fp_config, fp_weights, w_bits, a_bits, batches, target="onnxruntime"):
    """qdet's post-training quantization: the FP model with ``QUANT.TARGET``, calibrated."""
    from qdet.quantization import calibrate

    opts = ["QUANT.ENABLED", "True", "QUANT.TARGET", target]
    opts += ["QUANT.W_BITS", str(w_bits), "QUANT.A_BITS", str(a_bits)]
    _, model = _load(fp_config, fp_weights, opts)
    calibrate(model, batches, num_batches=len(batches))
    return model.eval()


def _ops(path: str) -> dict:
    from qdet.export.integer_check import INTEGER_OPS, float_convs, optimized_op_counts

    counts = optimized_op_counts(path)
    integer = sum(v for k, v in counts.items() if k in INTEGER_OPS)
    return {"counts": counts, "integer": integer, "float_convs": float_convs(counts)}


def build_models(args) -> dict[str, str]:
    """name -> ONNX path, exported under ``args.out``."""
    import torch

    from qdet.export import export_onnx
    from qdet.export.peer import normalised, quantize_static_peer, train_images

    os.makedirs(args.out, exist_ok=True)
    fp_cfg, fp = _load(*args.fp)
    batches = train_images(fp_cfg, fp, args.calibration_images)
    calibration = normalised(fp, batches)
    sample = torch.from_numpy(calibration[0])
    paths = {"FP32": os.path.join(args.out, "fp32.onnx")}
    export_onnx(fp, paths["FP32"], sample)
    for method in ("minmax", "percentile"):
        name = f"quantize_static {'MinMax' if method == 'minmax' else 'Percentile'}"
        paths[name] = quantize_static_peer(
            paths["FP32"], os.path.join(args.out, f"ort_{method}.onnx"), calibration, method
        )
    models = []
    for label, config, weights in args.qdet or []:
        models.append((f"qdet {label}", _load(config, weights)[1]))
    for w_bits, a_bits in args.qdet_calibrated or []:
        model = calibrated_target_model(
            *args.fp, w_bits, a_bits, batches[: args.qdet_calib_batches]
        )
        models.append((f"qdet W{w_bits}A{a_bits} (calibration only)", model))
    for name, model in models:
        path = os.path.join(args.out, name.split()[1].lower() + ".onnx")
        export_onnx(model, path, sample)
        paths[name] = path
    return paths


def time_sessions(paths: dict[str, str], sizes, threads: int, repeats: int, warmup: int, div: int):
    import numpy as np

    from qdet.export import inference_session

    # Idle sessions' threads must not spin on the cores the timed one runs on.
    sessions = {name: inference_session(p, threads, spinning=False) for name, p in paths.items()}
    rows = {}
    for h, w in sizes:
        ph, pw = -(-h // div) * div, -(-w // div) * div
        feed = {"images": np.random.default_rng(0).standard_normal((1, 3, ph, pw), np.float32)}
        times = {name: [] for name in sessions}
        for _ in range(warmup):
            for s in sessions.values():
                s.run(None, feed)
        for _ in range(repeats):  # alternate, so drift hits every model alike
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feed)
                times[name].append(time.perf_counter() - start)
        rows[f"{ph}x{pw}"] = {
            name: {
                "median_ms": statistics.median(t) * 1000,
                "iqr_ms": float(np.percentile(t, 75) - np.percentile(t, 25)) * 1000,
            }
            for name, t in times.items()
        }
    return rows


def table(result: dict) -> str:
    lines = [
        f"onnxruntime {result['onnxruntime']} CPU provider, batch 1, median (IQR) of "
        f"{result['repeats']} runs each, all models alternating in one process",
        "",
    ]
    for key, by_model in result["timings"].items():
        size, threads = key.split("@")
        lines += [
            f"**{size}, {threads} thread(s)**",
            "",
            "| model | ms | vs FP32 | vs " + PEER + " | integer ops / float convs | MiB |",
            "|---|---|---|---|---|---|",
        ]
        fp, peer = by_model["FP32"]["median_ms"], by_model[PEER]["median_ms"]
        for name, t in by_model.items():
            ops = result["ops"][name]
            lines.append(
                f"| {name} | {t['median_ms']:.1f} ({t['iqr_ms']:.1f}) | "
                f"{t['median_ms'] / fp:.2f}x | {t['median_ms'] / peer:.2f}x | "
                f"{ops['integer']} / {ops['float_convs']} | {result['mib'][name]:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(args) -> dict:
    import onnxruntime

    paths = build_models(args)
    div = 32  # Detectron2's ResNet-FPN size divisibility
    result = {
        "onnxruntime": onnxruntime.__version__,
        "repeats": args.repeats,
        "models": paths,
        "ops": {name: _ops(p) for name, p in paths.items()},
        "mib": {name: os.path.getsize(p) / 2**20 for name, p in paths.items()},
        "timings": {},
    }
    for threads in args.threads:
        for size, by_model in time_sessions(
            paths, args.sizes, threads, args.repeats, args.warmup, div
        ).items():
            result["timings"][f"{size}@{threads}"] = by_model
    text = table(result)
    print(text)
    with open(os.path.join(args.out, "benchmark_export.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "benchmark_export.md"), "w") as f:
        f.write(text + "\n")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp", nargs=2, required=True, metavar=("CONFIG", "WEIGHTS"))
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
        "--calibration-images", type=int, default=64, help="quantize_static's calibration"
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs=2,
        action="append",
        metavar=("H", "W"),
        help="input sizes (default: 160 192, the digits test size, and 800 1344)",
    )
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="output/benchmark_export")
    p.add_argument("--debug", action="store_true")
    return p


if __name__ == "__main__":
    parsed = build_parser().parse_args()
    parsed.sizes = parsed.sizes or [(160, 192), (800, 1344)]
    if not (parsed.qdet or parsed.qdet_calibrated):
        parsed.qdet_calibrated = [(8, 8), (4, 8), (4, 4)]
    run_cli(main, parsed, debug=parsed.debug)
