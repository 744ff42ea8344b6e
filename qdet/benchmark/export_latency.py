"""Deployed latency on onnxruntime's CPU provider (``tools/benchmark_export.py``): qdet's
integer exports against the FP32 model and onnxruntime's own quantizer of it, side by side
in one process.

Models: the FP32 export of ``--fp``; onnxruntime's ``quantize_static`` of that same file
(:mod:`qdet.export.peer`: after ``quant_pre_process``; QDQ, per-channel s8 weights, u8
activations) calibrated with MinMax and with Percentile on ``--calibration-images``
training images; every ``--qdet`` export (a model trained with ``QUANT.TARGET``;
``--qdet-calibrated W A`` instead builds one from the FP weights with qdet's calibration
alone, :mod:`qdet.study.ptq`, whose latency is a trained one's: the graph is the same).
Each is exported once (dynamic axes), then timed at batch 1 on every size and thread
setting, all models alternating run by run so that drift hits them alike (sessions' idle
threads sleep instead of spinning, so they do not compete with the one being timed). The
table: median ms and IQR, ratios to FP32 and to ``quantize_static`` MinMax, the integer /
float ops onnxruntime runs, file size.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from qdet.config import load_config
from qdet.engine.checks import missing_checkpoint_message
from qdet.export import export_onnx, inference_session
from qdet.export.integer_check import INTEGER_OPS, float_convs, optimized_op_counts
from qdet.export.peer import export_fp32, quantize_static_peer
from qdet.study import ptq

PEER = "quantize_static MinMax"
DIVISIBILITY = 32  # Detectron2's ResNet-FPN size divisibility


def _config(config: str, weights: str, opts=()):
    if not os.path.isfile(weights):
        raise FileNotFoundError(missing_checkpoint_message("weights", weights))
    return load_config(config, ["MODEL.DEVICE", "cpu", *opts])


def _load(config: str, weights: str, opts=()):
    cfg = _config(config, weights, opts)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    return cfg, model


def calibrated_target_model(fp_config, fp_weights, w_bits, a_bits, batches, target="onnxruntime"):
    """qdet's post-training quantization: the FP model with ``QUANT.TARGET``, calibrated."""
    cfg = _config(fp_config, fp_weights, ptq.target_opts(w_bits, a_bits, target))
    return ptq.calibrated_target_model(cfg, fp_weights, batches, len(batches))


def _ops(path: str) -> dict:
    counts = optimized_op_counts(path)
    integer = sum(v for k, v in counts.items() if k in INTEGER_OPS)
    return {"counts": counts, "integer": integer, "float_convs": float_convs(counts)}


def build_models(args) -> dict[str, str]:
    """name -> ONNX path, exported under ``args.out``."""
    os.makedirs(args.out, exist_ok=True)
    fp_cfg, fp = _load(*args.fp)
    paths = {"FP32": os.path.join(args.out, "fp32.onnx")}
    batches, calibration = export_fp32(fp_cfg, fp, paths["FP32"], args.calibration_images)
    sample = torch.from_numpy(calibration[0])
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


def measure(args) -> dict:
    """Every model of ``args`` built, exported and timed at every ``args.sizes`` and
    ``args.threads``: what :func:`table` shows and the JSON holds."""
    import onnxruntime  # optional: the export extra

    paths = build_models(args)
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
            paths, args.sizes, threads, args.repeats, args.warmup, DIVISIBILITY
        ).items():
            result["timings"][f"{size}@{threads}"] = by_model
    return result
