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
  (``QUANT.INCLUDE``), each an integer conv with its LayerNorm in float after.

Pictures are uniform noise, seeded: nothing here depends on what they show. Each file runs
batch 1 on the same normalised picture, all files alternating run by run
(:func:`qdet.benchmark.export_latency.time_networks`). The table: per size and threads the
median ms (IQR), the ratios to FP32 and to ``quantize_static`` MinMax, and per layer kind
how many ops run in integers and in float in onnxruntime's optimised graph
(:func:`qdet.export.integer_check.kernels_by_kind`).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.modeling.backbone.fpn import FPN

from qdet.benchmark.export_latency import PEER, time_networks
from qdet.config import load_config
from qdet.export import export_onnx
from qdet.export.integer_check import kernels_by_kind, optimized_op_counts
from qdet.export.peer import quantize_static_peer
from qdet.quantization import calibrate

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
        from detectron2.checkpoint import DetectionCheckpointer

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
) -> tuple[dict[str, str], np.ndarray]:
    """name -> backbone ONNX file under ``out`` for every model of the module docstring,
    and the normalised picture they are timed on."""
    os.makedirs(out, exist_ok=True)
    cfg, fp = build_transformer(config, size, opts)
    pictures = noise_pictures(size, calibration + 1)
    with torch.no_grad():
        batches = [fp.preprocess_image([{"image": p}]).tensor for p in pictures]
    paths = {"FP32": os.path.join(out, "fp32.onnx")}
    export_onnx(fp, paths["FP32"], batches[0])
    calib = [b.numpy() for b in batches[1:]]
    for method, label in (("minmax", "MinMax"), ("percentile", "Percentile")):
        paths[f"quantize_static {label}"] = os.path.join(out, f"ort_{method}.onnx")
        quantize_static_peer(paths["FP32"], paths[f"quantize_static {label}"], calib, method)
    state = fp.state_dict()
    variants = [("", [])]
    if isinstance(fp.backbone, FPN):  # Swin's: its convs quantized too, the LN float after
        variants.append((" +FPN", ["QUANT.INCLUDE", "['fpn_lateral', 'fpn_output']"]))
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
    return paths, batches[0].numpy()


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
            paths, picture = transformer_files(
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
        fp, peer = by_model["FP32"]["median_ms"], by_model[PEER]["median_ms"]
        for model, t in by_model.items():
            lines.append(
                f"| {model} | {t['median_ms']:.1f} ({t['iqr_ms']:.1f}) | "
                f"{t['median_ms'] / fp:.2f}x | {t['median_ms'] / peer:.2f}x | "
                f"{_kernels(result['kernels'][name][model])} | "
                f"{result['mib'][name][model]:.0f} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip("\n")
