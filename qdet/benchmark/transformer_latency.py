"""Deployed latency of ViTDet's and Swin's backbones on onnxruntime's CPU provider
(``tools/benchmark_export.py --transformer``): qdet's integer exports against the FP32
model and onnxruntime's own quantizer of it, side by side in one process.

Models per config and size (a COCO config's random weights suffice for latency, or
``MODEL.WEIGHTS`` in ``opts``; the input is square, ``SQUARE_PAD`` set to the size, as
ViTDet and Swin pad it):

- FP32: the backbone export of the FP model (:func:`qdet.export.export_onnx`);
- ``quantize_static`` MinMax and Percentile: onnxruntime's quantizer of that file
  (:mod:`qdet.export.peer`: ``quant_pre_process``, QDQ, per-channel s8 weights, u8
  activations, every op type it quantizes), calibrated on ``calibration`` pictures;
- qdet W8A8 / W4A8 (and any ``bits``): the model with ``QUANT.TARGET onnxruntime`` and
  ``QUANT.TARGETS ['mha', 'mlp']``, the FP weights loaded and qdet's calibration alone run
  on the same pictures (a trained model's file has the same graph, so the same latency);
  for an FPN backbone (Swin's) also "+FPN": its lateral and output convs quantized too
  (``QUANT.INCLUDE``), each an integer conv with its LayerNorm in float after; for ViTDet
  also "+pyramid": its SimpleFeaturePyramid's convs the same way.

Pictures are uniform noise, seeded: nothing here depends on what they show. Each file runs
batch 1 on the same normalised picture, all files alternating run by run
(:func:`qdet.benchmark.export_latency.time_networks`). The table: per size and threads the
median ms (IQR), the ratios to FP32 and to ``quantize_static`` MinMax, and per layer kind
how many ops run in integers and in float in onnxruntime's optimised graph
(:func:`qdet.export.integer_check.kernels_by_kind`).
"""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.modeling.backbone.fpn import FPN
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid

from qdet.benchmark.export_latency import PEER, time_networks
from qdet.config import load_config
from qdet.export import export_onnx
from qdet.export.integer_check import kernels_by_kind, optimized_op_counts
from qdet.export.peer import quantize_static_peer
from qdet.quantization import calibrate

# onnxruntime's histogram calibrators (Percentile) hold every tensor of a picture in memory:
# ViT-B / Swin-B at 1024 x 1024 took more than the 24 GB here (killed); MinMax keeps minima
# and maxima only.
PERCENTILE_MAX_SIZE = 512
PAD_KEY = {"build_vitdet_backbone": "MODEL.VIT.SQUARE_PAD"}
KINDS_SHOWN = ("linear", "matmul", "softmax", "add", "mul", "conv")


def _pad_key(cfg) -> str:
    return PAD_KEY.get(cfg.MODEL.BACKBONE.NAME, "MODEL.SWIN.SQUARE_PAD")


def build_transformer(config: str, size: int, opts=(), seed: int = 0):
    """The model of ``config`` for ``size`` x ``size`` pictures (test resize and square
    padding), weights from ``opts``' ``MODEL.WEIGHTS`` or random (seeded)."""
    base = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]  # random unless opts say otherwise
    cfg = load_config(config, [*base, *opts])
    size_opts = ["INPUT.MIN_SIZE_TEST", size, "INPUT.MAX_SIZE_TEST", size, _pad_key(cfg), size]
    cfg = load_config(config, [*base, *size_opts, *opts])
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return cfg, model


def noise_pictures(size: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, size, size), generator=g).float() for _ in range(count)]


def transformer_files(
    config: str,
    size: int,
    out: str,
    bits: list[tuple[int, int]],
    calibration: int,
    opts=(),
) -> tuple[dict[str, str], np.ndarray, dict[str, str]]:
    """name -> backbone ONNX file under ``out`` for every model of the module docstring,
    the normalised picture they are timed on, and why a file could not be made (its
    name -> the reason)."""
    os.makedirs(out, exist_ok=True)
    cfg, fp = build_transformer(config, size, opts)
    pictures = noise_pictures(size, calibration + 1)
    with torch.no_grad():
        batches = [fp.preprocess_image([{"image": p}]).tensor for p in pictures]
    paths = {"FP32": os.path.join(out, "fp32.onnx")}
    export_onnx(fp, paths["FP32"], batches[0])
    calib = [b.numpy() for b in batches[1:]]
    notes: dict[str, str] = {}
    methods = [("minmax", "MinMax"), ("percentile", "Percentile")]
    for method, label in methods[: 1 if size > PERCENTILE_MAX_SIZE else 2]:
        path = os.path.join(out, f"ort_{method}.onnx")
        failure = _peer_in_child(paths["FP32"], path, calib, method)
        if failure:
            notes[os.path.basename(path)] = failure
        else:
            paths[f"quantize_static {label}"] = path
    state = fp.state_dict()
    variants = [("", [])]
    if isinstance(fp.backbone, FPN):  # Swin's: its convs quantized too, the LN float after
        variants.append((" +FPN", ["QUANT.INCLUDE", "['fpn_lateral', 'fpn_output']"]))
    if isinstance(fp.backbone, SimpleFeaturePyramid):  # ViTDet's: the same for its convs
        variants.append((" +pyramid", ["QUANT.INCLUDE", "['simfp']"]))
    del fp
    for w_bits, a_bits in bits:
        for suffix, include in variants:
            target = ["QUANT.ENABLED", "True", "QUANT.TARGET", "onnxruntime", *include]
            target += ["QUANT.TARGETS", "['mha', 'mlp']", "QUANT.W_BITS", w_bits]
            _, model = build_transformer(config, size, [*opts, *target, "QUANT.A_BITS", a_bits])
            model.load_state_dict(state, strict=False)
            calibrate(model, [[{"image": p}] for p in pictures[1:]], num_batches=calibration)
            name = f"qdet W{w_bits}A{a_bits}{suffix}"
            stem = f"qdet_w{w_bits}a{a_bits}{suffix.strip().replace('+', '_').lower()}"
            paths[name] = os.path.join(out, f"{stem}.onnx")
            export_onnx(model, paths[name], batches[0])
            del model
    return paths, batches[0].numpy(), notes


def _peer_in_child(fp: str, out: str, calibration: list[np.ndarray], method: str) -> str:
    """``quantize_static_peer`` in a child process: its calibrator can take more memory
    than the machine has (ViT-B at 1024: killed at 24 GB), which must not end the run.
    Why the file was not made, or "" when it was."""
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=quantize_static_peer, args=(fp, out, calibration, method))
    child.start()
    child.join()
    if child.exitcode != 0:
        return f"quantize_static ({method}) of {fp} ended with exit code {child.exitcode}" + (
            " (killed: out of memory)" if child.exitcode == -9 else ""
        )
    return ""


def measure_transformers(args) -> dict:
    """Every ``args.transformer`` config at every ``args.sizes`` (square: H) and
    ``args.threads``: the files built, their kernels counted, all timed alternating."""
    import onnxruntime  # optional: the export extra

    bits = [tuple(b) for b in (args.qdet_calibrated or [(8, 8), (4, 8)])]
    result = {
        "onnxruntime": onnxruntime.__version__,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "pictures": "uniform noise, seeded; weights random unless MODEL.WEIGHTS is given",
        "calibration_pictures": args.calibration_images,
        "notes": {
            "quantize_static Percentile": f"above {PERCENTILE_MAX_SIZE} x "
            f"{PERCENTILE_MAX_SIZE} not built: its histogram calibrator holds every tensor "
            "of a picture in memory, more than the 24 GB here for ViT-B / Swin-B at 1024"
        },
        "models": {},
        "kernels": {},
        "mib": {},
        "timings": {},
    }
    for config in args.transformer:
        arch = os.path.splitext(os.path.basename(config))[0]
        for size, _ in args.sizes:
            key = f"{arch} {size}x{size}"
            out = os.path.join(args.out, f"{arch}_{size}")
            paths, picture, notes = transformer_files(
                config, size, out, bits, args.calibration_images, args.opts
            )
            result["models"][key] = paths
            result["kernels"][key] = {
                n: kernels_by_kind(optimized_op_counts(p)) for n, p in paths.items()
            }
            result["mib"][key] = {n: os.path.getsize(p) / 2**20 for n, p in paths.items()}
            for threads in args.threads:
                timed = time_networks(paths, picture, threads, args.repeats, args.warmup)
                result["timings"][f"{key}@{threads}"] = timed
            for file, why in notes.items():
                result["notes"][f"{key}: {file}"] = why
            if not args.keep_files:
                for p in paths.values():
                    os.remove(p)
    return result


def _kernels(k: dict) -> str:
    return ", ".join(
        f"{kind} {k[kind]['integer']}/{k[kind]['float']}"
        for kind in KINDS_SHOWN
        if k[kind]["integer"] or k[kind]["float"]
    )


def transformer_table(result: dict) -> str:
    """The markdown report of :func:`measure_transformers`'s result."""
    lines = [
        f"onnxruntime {result['onnxruntime']} CPU provider, the backbone file, batch 1, "
        f"median (IQR) ms of {result['repeats']} runs each, all files alternating in one "
        f"process; {result['pictures']}. Kernels: integer / float ops per layer kind in "
        "onnxruntime's optimised graph.",
        "",
    ]
    header = f"| model | ms | vs FP32 | vs {PEER} | kernels (integer/float) | MiB |"
    for key, by_model in result["timings"].items():
        name, threads = key.split("@")
        lines += [f"**{name}, {threads} thread(s)**", "", header, "|---" * 6 + "|"]
        fp = by_model["FP32"]["median_ms"]
        peer = by_model[PEER]["median_ms"] if PEER in by_model else None
        for model, t in by_model.items():
            ms = t["median_ms"]
            versus_peer = f"{ms / peer:.2f}x" if peer else "—"
            lines.append(
                f"| {model} | {ms:.1f} ({t['iqr_ms']:.1f}) | {ms / fp:.2f}x | {versus_peer} | "
                f"{_kernels(result['kernels'][name][model])} | "
                f"{result['mib'][name][model]:.0f} |"
            )
        lines.append("")
    lines += [f"— {name}: {why}." for name, why in result.get("notes", {}).items()]
    return "\n".join(lines).rstrip("\n")
