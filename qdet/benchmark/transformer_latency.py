"""Deployed latency of ViTDet's and Swin's backbones, or of their whole detectors, on
onnxruntime's CPU provider (``tools/benchmark_export.py --transformer [--whole]``): qdet's
integer exports against the FP32 model and onnxruntime's own quantizer of it, side by side
in one process.

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
  also "+pyramid": its SimpleFeaturePyramid's convs the same way; for a whole file also
  "+heads": that and the R-CNN heads (the RPN's convs, the box head's convs and FCs, the
  mask head's convs; :mod:`qdet.modeling.deployable_rcnn`).

``whole``: the whole detector instead (:func:`qdet.export.whole.export_whole_detector`:
normalisation, padding, backbone, RPN, ROI heads, NMS, masks), timed image in to instances
out through :class:`qdet_runner.Detector`. Every model's score threshold is set to 0, so
each file keeps its ``TEST.DETECTIONS_PER_IMAGE`` instances and its mask head runs on as
many boxes whatever its random weights score. The peer: ``quantize_static`` MinMax of the
whole file's network (:data:`qdet.export.peer.WHOLE_NETWORK`: backbone, RPN head, box and
mask heads; Percentile cannot calibrate a whole file), and the same restricted to its
MatMuls (``op_types_to_quantize``: the blocks' Linears and attention matmuls, and Swin's
patch-merging Linears; the scope that keeps the FP model's AP in the tiny ViTDet study,
docs/deployment.md). qdet's files
quantize what the config's ``QUANT.TARGETS`` select, the heads float but in "+heads".

Pictures are uniform noise, seeded: nothing here depends on what they show. Each file runs
batch 1 on the same picture (normalised for a backbone file), all files alternating run by
run (:func:`qdet.benchmark.export_latency.time_networks` / ``time_detectors``). The
table: per size and threads the median ms (IQR), the ratios to FP32 and to
``quantize_static`` MinMax, and per layer kind how many ops run in integers and in float in
onnxruntime's optimised graph (:func:`qdet.export.integer_check.kernels_by_kind`).
"""

from __future__ import annotations

import multiprocessing
import os

import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.modeling.backbone.fpn import FPN
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid

from qdet.benchmark.export_latency import PEER, time_detectors, time_networks
from qdet.config import load_config
from qdet.engine.trained_model import TrainedModel
from qdet.export import export_onnx
from qdet.export.integer_check import kernels_by_kind, optimized_op_counts
from qdet.export.peer import quantize_static_peer
from qdet.export.whole import export_whole_detector
from qdet.quantization import calibrate

# onnxruntime's histogram calibrators (Percentile) hold every tensor of a picture in memory:
# ViT-B / Swin-B at 1024 x 1024 took more than the 24 GB here (killed); MinMax keeps minima
# and maxima only.
PERCENTILE_MAX_SIZE = 512
# quantize_static of a whole file, and its scope restricted to MatMuls: (label, op types).
WHOLE_PEERS = (("", ()), (" MatMuls", ("MatMul",)))
PAD_KEY = {"build_vitdet_backbone": "MODEL.VIT.SQUARE_PAD"}
WHOLE_FILE = "the whole detector's file, image in to instances out"
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
    whole: bool = False,
) -> tuple[dict[str, str], np.ndarray, dict[str, str]]:
    """name -> ONNX file under ``out`` for every model of the module docstring (the
    backbone's, or with ``whole`` the whole detector's), what they are timed on (the
    normalised batch, or the BGR uint8 picture of a whole file), and why a file could not
    be made (its name -> the reason)."""
    os.makedirs(out, exist_ok=True)
    if whole:  # module docstring; random heads would also leave qdet's mask head no box
        # to calibrate on
        opts = [*opts, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    cfg, fp = build_transformer(config, size, opts)
    pictures = noise_pictures(size, calibration + 1)
    with torch.no_grad():
        batches = [fp.preprocess_image([{"image": p}]).tensor for p in pictures]

    def export(model, path: str, bits: str = "FP32") -> None:
        if whole:
            info = _whole_info(cfg, model, size, bits)
            export_whole_detector(model, path, pictures[0], info)
        else:
            export_onnx(model, path, batches[0])

    paths = {"FP32": os.path.join(out, "fp32.onnx")}
    export(fp, paths["FP32"])
    notes: dict[str, str] = {}
    if whole:
        calib = [p.numpy() for p in pictures[1:]]
        peers = [
            (f"ort_minmax{s.strip().lower()}", "minmax", f"MinMax{s}", o) for s, o in WHOLE_PEERS
        ]
    else:
        calib = [b.numpy() for b in batches[1:]]
        peers = [
            ("ort_minmax", "minmax", "MinMax", ()),
            ("ort_percentile", "percentile", "Percentile", ()),
        ]
        peers = peers[: 1 if size > PERCENTILE_MAX_SIZE else 2]
    for stem, method, label, op_types in peers:
        path = os.path.join(out, f"{stem}.onnx")
        failure = _peer_in_child(paths["FP32"], path, calib, method, whole, op_types)
        if failure:
            notes[os.path.basename(path)] = failure
        else:
            paths[f"quantize_static {label}"] = path
    state = fp.state_dict()
    variants = [("", [])]
    if isinstance(fp.backbone, FPN):  # Swin's: its convs quantized too, the LN float after
        variants.append((" +FPN", ["fpn_lateral", "fpn_output"]))
    if isinstance(fp.backbone, SimpleFeaturePyramid):  # ViTDet's: the same for its convs
        variants.append((" +pyramid", ["simfp"]))
    if whole and len(variants) > 1:  # and the R-CNN heads' convs and FCs
        variants.append((" +heads", [*variants[1][1], "proposal_generator", "roi_heads"]))
    del fp
    for w_bits, a_bits in bits:
        for suffix, include in variants:
            target = ["QUANT.ENABLED", "True", "QUANT.TARGET", "onnxruntime"]
            target += ["QUANT.INCLUDE", repr(include)] if include else []
            target += ["QUANT.TARGETS", "['mha', 'mlp']", "QUANT.W_BITS", w_bits]
            _, model = build_transformer(config, size, [*opts, *target, "QUANT.A_BITS", a_bits])
            model.load_state_dict(state, strict=False)
            calibrate(model, [[{"image": p}] for p in pictures[1:]], num_batches=calibration)
            name = f"qdet W{w_bits}A{a_bits}{suffix}"
            stem = f"qdet_w{w_bits}a{a_bits}{suffix.strip().replace('+', '_').lower()}"
            paths[name] = os.path.join(out, f"{stem}.onnx")
            export(model, paths[name], f"W{w_bits}/A{a_bits}")
            del model
    if whole:
        bgr = pictures[0].permute(1, 2, 0).to(torch.uint8).numpy()[:, :, ::-1]
        return paths, np.ascontiguousarray(bgr), notes
    return paths, batches[0].numpy(), notes


def _whole_info(cfg, model, size: int, bits: str) -> dict:
    """The runner's metadata of ``model``'s whole file at ``size`` x ``size``
    (:meth:`TrainedModel.deployment_info`; no dataset, so no class names)."""
    resize = T.ResizeShortestEdge([size, size], size)
    described = TrainedModel(model, cfg, "", list, list, [resize], cfg.INPUT.FORMAT, bits)
    return described.deployment_info()


def _peer_in_child(
    fp: str,
    out: str,
    calibration: list[np.ndarray],
    method: str,
    whole: bool = False,
    op_types: tuple[str, ...] = (),
) -> str:
    """``quantize_static_peer`` in a child process: its calibrator can take more memory
    than the machine has (ViT-B at 1024: killed at 24 GB), which must not end the run.
    Why the file was not made, or "" when it was."""
    context = multiprocessing.get_context("spawn")
    kwargs = {"whole": whole, "op_types": op_types}
    child = context.Process(
        target=quantize_static_peer, args=(fp, out, calibration, method), kwargs=kwargs
    )
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
    arena = not args.no_arena  # False: every session returns its activations' memory
    result = {
        "onnxruntime": onnxruntime.__version__,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "file": WHOLE_FILE if args.whole else "the backbone file",
        "pictures": "uniform noise, seeded; weights random unless MODEL.WEIGHTS is given",
        "calibration_pictures": args.calibration_images,
        "memory_arena": arena,
        "notes": {
            "quantize_static Percentile": "not built: onnxruntime's histogram calibrators "
            "cannot calibrate a whole file (qdet.export.peer.quantize_static_peer)"
            if args.whole
            else f"above {PERCENTILE_MAX_SIZE} x {PERCENTILE_MAX_SIZE} not built: its "
            "histogram calibrator holds every tensor of a picture in memory, more than the "
            "24 GB here for ViT-B / Swin-B at 1024"
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
                config, size, out, bits, args.calibration_images, args.opts, args.whole
            )
            result["models"][key] = paths
            result["kernels"][key] = {
                n: kernels_by_kind(optimized_op_counts(p)) for n, p in paths.items()
            }
            result["mib"][key] = {n: os.path.getsize(p) / 2**20 for n, p in paths.items()}
            time_files = time_detectors if args.whole else time_networks
            for threads in args.threads:
                timed = time_files(paths, picture, threads, args.repeats, args.warmup, arena)
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
        f"onnxruntime {result['onnxruntime']} CPU provider, "
        f"{result.get('file', 'the backbone file')}, batch 1, "
        f"median (IQR) ms of {result['repeats']} runs each, all files alternating in one "
        f"process{'' if result.get('memory_arena', True) else ', no CPU memory arena'}; "
        f"{result['pictures']}. Kernels: integer / float ops per layer kind in "
        "onnxruntime's optimised graph.",
        "",
    ]
    header = f"| model | ms | vs FP32 | vs {PEER} | kernels (integer/float) | MiB |"
    whole = result.get("file") == WHOLE_FILE
    header += " instances |" if whole else ""
    for key, by_model in result["timings"].items():
        name, threads = key.split("@")
        lines += [f"**{name}, {threads} thread(s)**", "", header, "|---" * (6 + whole) + "|"]
        fp = by_model["FP32"]["median_ms"]
        peer = by_model[PEER]["median_ms"] if PEER in by_model else None
        for model, t in by_model.items():
            ms = t["median_ms"]
            versus_peer = f"{ms / peer:.2f}x" if peer else "—"
            lines.append(
                f"| {model} | {ms:.1f} ({t['iqr_ms']:.1f}) | {ms / fp:.2f}x | {versus_peer} | "
                f"{_kernels(result['kernels'][name][model])} | "
                f"{result['mib'][name][model]:.0f} |" + (f" {t['instances']} |" if whole else "")
            )
        lines.append("")
    lines += [f"— {name}: {why}." for name, why in result.get("notes", {}).items()]
    return "\n".join(lines).rstrip("\n")
