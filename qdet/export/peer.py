"""The peer a deployed qdet model is measured against: onnxruntime's own post-training
quantizer (``onnxruntime.quantization.quantize_static``) of the same FP model, as a user
would run it: ``quant_pre_process`` (shape inference, Conv+BN folding), then QDQ with
per-channel s8 weights and u8 activations, calibrated on real training images."""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch
from detectron2.data import DatasetCatalog, DatasetMapper

from qdet.engine.checks import check_datasets
from qdet.export.graphs import INPUT_NAME, export_onnx

CALIBRATIONS = ("minmax", "percentile")


def padded(images: Iterable[np.ndarray], height: int, width: int) -> list[np.ndarray]:
    """Each normalised (1, 3, h, w) batch zero-padded to (1, 3, height, width) (what
    Detectron2's padding to size divisibility does, to one size for calibration)."""
    out = []
    for x in images:
        canvas = np.zeros((x.shape[0], 3, height, width), np.float32)
        canvas[:, :, : x.shape[2], : x.shape[3]] = x[:, :, :height, :width]
        out.append(canvas)
    return out


def quantize_static_peer(
    fp_onnx: str, out: str, calibration: list[np.ndarray], method: str = "minmax"
) -> str:
    """onnxruntime's ``quantize_static`` of ``fp_onnx`` into ``out`` (QDQ, per-channel s8
    weights, u8 activations), calibrated on ``calibration`` (normalised input batches,
    one shape) with ``method`` (:data:`CALIBRATIONS`). Returns ``out``."""
    # optional: the export extra
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if method not in CALIBRATIONS:
        raise ValueError(f"calibration {method!r}: choose from {CALIBRATIONS}")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {INPUT_NAME: x}

    pre = out + ".pre.onnx"
    # A detector export has dynamic axes, which symbolic shape inference cannot follow.
    quant_pre_process(fp_onnx, pre, skip_symbolic_shape=True)
    try:
        quantize_static(
            pre,
            out + ".tmp",
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
            }[method],
        )
        os.replace(out + ".tmp", out)
    finally:
        if os.path.exists(pre):
            os.remove(pre)
    return out


def train_images(cfg, model, count: int) -> list[list[dict]]:
    """The first ``count`` images of ``cfg.DATASETS.TRAIN[0]`` in dataset order, as
    Detectron2 test-time inputs (resized, not augmented), one per batch: the calibration
    images of both quantizers, so the two PTQs see the same data."""
    check_datasets(cfg.DATASETS.TRAIN[:1])
    mapper = DatasetMapper(cfg, is_train=False)
    dataset = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:count]
    return [[mapper(dict(d))] for d in dataset]


def normalised(model, batches: list[list[dict]]) -> list[np.ndarray]:
    """Each batch as the network's input (``preprocess_image``), numpy, one size: padded
    to the largest."""
    with torch.no_grad():
        arrays = [model.preprocess_image(b).tensor.numpy() for b in batches]
    height = max(a.shape[2] for a in arrays)
    width = max(a.shape[3] for a in arrays)
    return padded(arrays, height, width)


def export_fp32(cfg, model, fp_onnx: str, count: int) -> tuple[list[list[dict]], list[np.ndarray]]:
    """The FP model's side of the peer: its first ``count`` training images
    (:func:`train_images`) as the network's input (:func:`normalised`), and the model
    exported to ``fp_onnx`` with the first of them as the trace's sample: the file
    :func:`quantize_static_peer` quantizes. Returns (the images, the calibration inputs)."""
    batches = train_images(cfg, model, count)
    calibration = normalised(model, batches)
    export_onnx(model, fp_onnx, torch.from_numpy(calibration[0]))
    return batches, calibration
