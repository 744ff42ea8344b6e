"""Deployed latency of a detection on onnxruntime's CPU provider
(``tools/benchmark_export.py``): qdet's integer exports against the FP32 model and
onnxruntime's own quantizer of it, each as the network alone and as the whole detector,
side by side in one process, so that the table shows what the post-processing costs.

Models: the FP32 export of ``--fp``; onnxruntime's ``quantize_static`` of that same file
(:mod:`qdet.export.peer`: after ``quant_pre_process``; QDQ, per-channel s8 weights, u8
activations) calibrated with MinMax and with Percentile on ``--calibration-images``
training images; every ``--qdet`` export (a model trained with ``QUANT.TARGET``;
``--qdet-calibrated W A`` instead builds one from the FP weights with qdet's calibration
alone, :mod:`qdet.study.ptq`, whose latency is a trained one's: the graph is the same).

Each model is exported twice (dynamic axes): the network-only file
(:func:`qdet.export.export_onnx`, RetinaNet's head outputs) and the whole detector
(:func:`qdet.export.whole.export_whole_detector`: normalisation, padding, network, anchors,
box decoding, score threshold, top-k, NMS; traced on the first test picture).
``quantize_static``'s whole file is its quantization of the FP32 whole file, calibrated on
the same training pictures (as the whole file takes them: resized, not normalised), with
the network quantized and the post-processing left in float, as qdet's; MinMax only, as
onnxruntime's Percentile cannot calibrate a whole file
(:func:`~qdet.export.peer.quantize_static_peer`).

Timing, batch 1, on every size H x W and thread setting, with the first test picture
resized to H x W (a real picture: the detector finds objects and NMS has work): a
network-only file runs ``session.run`` on it normalised and padded (Detectron2's
``preprocess_image``); a whole file runs image in to instances out, the torch-free runner
(:class:`qdet_runner.Detector`) on it as BGR uint8 (channel order, the runner's resize set
to leave H x W as is, the file, boxes to numpy), so both see the same network input and
the difference is what surrounds the network. All files alternate run by run so that drift
hits them alike (sessions' idle threads sleep instead of spinning, so they do not compete
with the one being timed). The table: per model the median ms (IQR) of both files, the
post-processing's cost (whole minus network, ms and % of the whole), the whole file's
ratios to FP32's and to ``quantize_static`` MinMax's whole files, the integer ops / float
convs onnxruntime runs in it, its size and the instances it returns.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from functools import partial

import numpy as np
import torch
from detectron2.data import DatasetCatalog, DatasetMapper

import qdet_runner
from qdet.config import load_config
from qdet.engine.checks import check_datasets, missing_checkpoint_message
from qdet.engine.trained_model import TrainedModel, trained_model_from_cfg
from qdet.export import export_onnx, inference_session
from qdet.export.graphs import INPUT_NAME
from qdet.export.integer_check import INTEGER_OPS, float_convs, optimized_op_counts
from qdet.export.peer import export_fp32, quantize_static_peer
from qdet.export.whole import export_whole_detector
from qdet.study import ptq

PEER = "quantize_static MinMax"
KINDS = {
    "network": "the network-only file (RetinaNet's head outputs), session.run on the picture "
    "normalised and padded to a multiple of 32",
    "whole": "the whole-detector file through qdet_runner.Detector, the BGR uint8 picture in, "
    "instances out",
}
POST_PROCESSING = (
    "whole minus network: normalisation, padding, anchors, box decoding, top-k and NMS in "
    "the graph, the runner's numpy around it"
)
NO_WHOLE = {
    "quantize_static Percentile": "no whole file: onnxruntime's histogram calibrators stack "
    "each tensor's values over the calibration pictures, and the post-processing's tensors "
    "differ in length from picture to picture (onnxruntime issue #18792); its graph is "
    "MinMax's, only the scales differ"
}


def _config(config: str, weights: str, opts=()):
    if not os.path.isfile(weights):
        raise FileNotFoundError(missing_checkpoint_message("weights", weights))
    return load_config(config, ["MODEL.DEVICE", "cpu", *opts])


def _load(config: str, weights: str, opts=()) -> TrainedModel:
    return trained_model_from_cfg(_config(config, weights, ["MODEL.WEIGHTS", weights, *opts]))


def calibrated_target_model(
    fp: TrainedModel, fp_config: str, w_bits: int, a_bits: int, batches, target="onnxruntime"
) -> TrainedModel:
    """qdet's post-training quantization: ``fp``'s model with ``QUANT.TARGET``, calibrated
    on ``batches`` (``fp``'s test resize and classes)."""
    cfg = _config(fp_config, fp.checkpoint, ptq.target_opts(w_bits, a_bits, target))
    model = ptq.calibrated_target_model(cfg, fp.checkpoint, batches, len(batches))
    return dataclasses.replace(fp, model=model, config=cfg, bits=f"W{w_bits}/A{a_bits}")


def first_test_picture(cfg) -> tuple[str, np.ndarray, torch.Tensor]:
    """The first picture of ``cfg.DATASETS.TEST[0]``: its file, the picture as read (BGR
    uint8, H x W x 3) and as the test loader gives it ((3, h, w), resized, in the input
    format). The whole files are traced on the last and timed with the second."""
    check_datasets(cfg.DATASETS.TEST[:1])
    record = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]
    image = DatasetMapper(cfg, is_train=False)(dict(record))["image"]
    return record["file_name"], qdet_runner.read_image(record["file_name"]), image


def picture_inputs(trained: TrainedModel, picture: np.ndarray, height: int, width: int):
    """``picture`` (BGR uint8) resized to ``height`` x ``width`` as the two kinds of file
    take it: BGR uint8 (the runner's input) and the network's input batch (in the input
    format, normalised and padded by the model's ``preprocess_image``)."""
    import cv2  # the runner's dependency

    bgr = cv2.resize(picture, (width, height), interpolation=cv2.INTER_LINEAR)
    image = bgr[:, :, ::-1] if trained.input_format == "RGB" else bgr
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    with torch.no_grad():
        batch = trained.model.preprocess_image([{"image": tensor}]).tensor.numpy()
    return bgr, batch


def _ops(path: str) -> dict:
    counts = optimized_op_counts(path)
    integer = sum(v for k, v in counts.items() if k in INTEGER_OPS)
    return {"counts": counts, "integer": integer, "float_convs": float_convs(counts)}


def build_models(args, fp: TrainedModel, traced: torch.Tensor) -> dict[str, dict[str, str]]:
    """name -> {"network": ONNX path, "whole": ONNX path}, exported under ``args.out``;
    the whole files traced on ``traced`` (a test picture as the model takes it)."""
    os.makedirs(args.out, exist_ok=True)

    def files(stem: str) -> dict[str, str]:
        return {
            "network": os.path.join(args.out, f"{stem}.onnx"),
            "whole": os.path.join(args.out, f"{stem}.whole.onnx"),
        }

    paths = {"FP32": files("fp32")}
    batches, calibration = export_fp32(
        fp.config, fp.model, paths["FP32"]["network"], args.calibration_images
    )
    export_whole_detector(fp.model, paths["FP32"]["whole"], traced, fp.deployment_info())
    pictures = [b[0]["image"].float().numpy() for b in batches]  # the whole file's input
    for method in ("minmax", "percentile"):
        name = f"quantize_static {'MinMax' if method == 'minmax' else 'Percentile'}"
        paths[name] = files(f"ort_{method}")
        quantize_static_peer(paths["FP32"]["network"], paths[name]["network"], calibration, method)
        if name in NO_WHOLE:
            del paths[name]["whole"]
        else:
            quantize_static_peer(
                paths["FP32"]["whole"], paths[name]["whole"], pictures, method, whole=True
            )
    models = [
        (f"qdet {label}", _load(config, weights)) for label, config, weights in args.qdet or []
    ]
    for w_bits, a_bits in args.qdet_calibrated or []:
        calibration_batches = batches[: args.qdet_calib_batches]
        trained = calibrated_target_model(fp, args.fp[0], w_bits, a_bits, calibration_batches)
        models.append((f"qdet W{w_bits}A{a_bits} (calibration only)", trained))
    sample = torch.from_numpy(calibration[0])
    for name, trained in models:
        paths[name] = files(name.split()[1].lower())
        export_onnx(trained.model, paths[name]["network"], sample)
        export_whole_detector(
            trained.model, paths[name]["whole"], traced, trained.deployment_info()
        )
    return paths


def median_iqr(seconds: list[float]) -> dict:
    """{"median_ms", "iqr_ms"} of timings in seconds."""
    return {
        "median_ms": statistics.median(seconds) * 1000,
        "iqr_ms": float(np.percentile(seconds, 75) - np.percentile(seconds, 25)) * 1000,
    }


def alternate(runs: dict, repeats: int, warmup: int) -> dict[object, list[float]]:
    """Seconds of each of ``runs`` (key -> callable), ``repeats`` times after ``warmup``,
    alternating run by run so that drift hits every file alike."""
    times = {key: [] for key in runs}
    for _ in range(warmup):
        for run in runs.values():
            run()
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return times


def time_networks(
    paths: dict, batch: np.ndarray, threads: int, repeats: int, warmup: int, arena: bool = True
):
    """{model: {"median_ms", "iqr_ms"}}: every network-only file of ``paths`` (name ->
    path) on ``batch``, alternating (``arena``: :func:`qdet_runner.session_options`)."""
    sessions = {
        n: inference_session(p, threads, spinning=False, arena=arena) for n, p in paths.items()
    }
    runs = {n: partial(s.run, None, {INPUT_NAME: batch}) for n, s in sessions.items()}
    return {n: median_iqr(t) for n, t in alternate(runs, repeats, warmup).items()}


def time_detectors(
    paths: dict, bgr: np.ndarray, threads: int, repeats: int, warmup: int, arena: bool = True
):
    """{model: {"median_ms", "iqr_ms", "instances"}}: every whole-detector file of
    ``paths`` (name -> path) image in to instances out (:class:`qdet_runner.Detector`) on
    the BGR uint8 picture ``bgr``, its resize set to leave the picture's size as is,
    alternating (``arena``: :func:`qdet_runner.session_options`)."""
    height, width = bgr.shape[:2]
    detectors = {
        n: qdet_runner.Detector(p, threads, spinning=False, arena=arena) for n, p in paths.items()
    }
    for detector in detectors.values():
        detector.min_size, detector.max_size = min(height, width), max(height, width)
    runs = {n: partial(d, bgr) for n, d in detectors.items()}
    timed = {n: median_iqr(t) for n, t in alternate(runs, repeats, warmup).items()}
    for name, detector in detectors.items():
        timed[name]["instances"] = len(detector(bgr)["scores"])
    return timed


def time_files(paths: dict, inputs: dict, threads: int, repeats: int, warmup: int) -> dict:
    """{size: {model: {kind: {"median_ms", "iqr_ms"}, "instances": the whole file's}}}
    for every ``inputs`` size (-> (BGR picture, network batch)), every file of ``paths``
    alternating run by run."""
    # Idle sessions' threads must not spin on the cores the timed one runs on.
    networks = {
        n: inference_session(f["network"], threads, spinning=False) for n, f in paths.items()
    }
    wholes = {
        n: qdet_runner.Detector(f["whole"], threads, spinning=False)
        for n, f in paths.items()
        if "whole" in f
    }
    rows = {}
    for size, (bgr, batch) in inputs.items():
        height, width = bgr.shape[:2]
        runs = {}
        for name in paths:
            runs[name, "network"] = partial(networks[name].run, None, {INPUT_NAME: batch})
            if name in wholes:
                detector = wholes[name]
                # ResizeShortestEdge(min, max) of an H x W picture is H x W: the network
                # sees what the network-only file gets.
                detector.min_size, detector.max_size = min(height, width), max(height, width)
                runs[name, "whole"] = partial(detector, bgr)
        times = alternate(runs, repeats, warmup)
        rows[size] = {name: {} for name in paths}
        for (name, kind), seconds in times.items():
            rows[size][name][kind] = median_iqr(seconds)
        for name, detector in wholes.items():
            rows[size][name]["instances"] = len(detector(bgr)["scores"])
    return rows


def _ms(t: dict) -> str:
    return f"{t['median_ms']:.1f} ({t['iqr_ms']:.1f})"


def table(result: dict) -> str:
    """The markdown report of :func:`measure`'s result: per size and threads, a row per
    model."""
    lines = [
        f"onnxruntime {result['onnxruntime']} CPU provider, batch 1, median (IQR) ms of "
        f"{result['repeats']} runs each, all files alternating in one process, a test picture "
        f"resized to each size. network: {result['kinds']['network']}; whole: "
        f"{result['kinds']['whole']}; post-processing: {result['post_processing']}.",
        "",
    ]
    header = (
        "| model | network ms | whole ms | post-processing ms (% of whole) | whole vs FP32 | "
        f"whole vs {PEER} | integer ops / float convs | MiB | instances |"
    )
    for key, by_model in result["timings"].items():
        size, threads = key.split("@")
        lines += [f"**{size}, {threads} thread(s)**", "", header, "|---" * 9 + "|"]
        fp, peer = by_model["FP32"]["whole"]["median_ms"], by_model[PEER]["whole"]["median_ms"]
        for name, t in by_model.items():
            if "whole" not in t:
                lines.append(f"| {name} | {_ms(t['network'])} |" + " — |" * 7)
                continue
            whole, post = (
                t["whole"]["median_ms"],
                t["whole"]["median_ms"] - t["network"]["median_ms"],
            )
            ops = result["ops"][name]["whole"]
            lines.append(
                f"| {name} | {_ms(t['network'])} | {_ms(t['whole'])} | "
                f"{post:.1f} ({100 * post / whole:.0f}%) | {whole / fp:.2f}x | "
                f"{whole / peer:.2f}x | {ops['integer']} / {ops['float_convs']} | "
                f"{result['mib'][name]['whole']:.1f} | {t['instances']} |"
            )
        lines.append("")
    lines += [f"— {name}: {why}." for name, why in result.get("notes", {}).items()]
    return "\n".join(lines).rstrip("\n")


def measure(args) -> dict:
    """Every model of ``args`` built, exported and timed at every ``args.sizes`` and
    ``args.threads``: what :func:`table` shows and the JSON holds."""
    import onnxruntime  # optional: the export extra

    fp = _load(*args.fp)
    picture_file, picture, traced = first_test_picture(fp.config)
    paths = build_models(args, fp, traced)
    inputs = {f"{h}x{w}": picture_inputs(fp, picture, h, w) for h, w in args.sizes}
    result = {
        "onnxruntime": onnxruntime.__version__,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "picture": picture_file,
        "network_inputs": {size: list(batch.shape) for size, (_, batch) in inputs.items()},
        "kinds": KINDS,
        "post_processing": POST_PROCESSING,
        "models": paths,
        "notes": {name: why for name, why in NO_WHOLE.items() if name in paths},
        "ops": {n: {k: _ops(p) for k, p in files.items()} for n, files in paths.items()},
        "mib": {
            n: {k: os.path.getsize(p) / 2**20 for k, p in files.items()}
            for n, files in paths.items()
        },
        "timings": {},
    }
    for threads in args.threads:
        rows = time_files(paths, inputs, threads, args.repeats, args.warmup)
        for size, by_model in rows.items():
            result["timings"][f"{size}@{threads}"] = by_model
    return result
