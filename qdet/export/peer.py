"""The peer a deployed qdet model is measured against: onnxruntime's own post-training
quantizer (``onnxruntime.quantization.quantize_static``) of the same FP model, as a user
would run it: ``quant_pre_process`` (shape inference, Conv+BN folding), then QDQ with
per-channel s8 weights and u8 activations, calibrated on real training images. Of a
network-only file, or of a whole-detector file (:mod:`qdet.export.whole`) with its
network quantized and its post-processing left in float."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import numpy as np
import torch
from detectron2.data import DatasetCatalog, DatasetMapper

from qdet.engine.checks import check_datasets
from qdet.engine.trained_model import TrainedModel, float_form
from qdet.export.graphs import INPUT_NAME, export_onnx
from qdet.export.integer_check import kernels_by_kind, optimized_op_counts
from qdet.export.whole import WHOLE_INPUT, export_whole_detector

CALIBRATIONS = ("minmax", "percentile")
# A whole file's network: the nodes its TracingAdapter traces the model's learned layers to,
# RetinaNet's under "/model/" (its backbone and head), an R-CNN's at the top (its backbone,
# the RPN conv and predictors, the box head and predictor, the mask head), not the anchors,
# box decoding, ROIAlign or NMS between them. The mask head's nodes include its sigmoid and
# per-class gather (Detectron2 runs mask_rcnn_inference in the head's forward), which
# quantize_static then quantizes too (a QLinearSigmoid).
WHOLE_NETWORK = (
    "/model/backbone/",
    "/model/head/",
    "/backbone/",
    "/proposal_generator/rpn_head/",
    "/roi_heads/box_head/",
    "/roi_heads/box_predictor/",
    "/roi_heads/mask_head/",
)


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
    fp_onnx: str,
    out: str,
    calibration: list[np.ndarray],
    method: str = "minmax",
    whole: bool = False,
    prefixes: tuple[str, ...] = WHOLE_NETWORK,
    op_types: tuple[str, ...] = (),
) -> str:
    """onnxruntime's ``quantize_static`` of ``fp_onnx`` into ``out`` (QDQ, per-channel s8
    weights, u8 activations), calibrated on ``calibration`` (normalised input batches,
    one shape) with ``method`` (:data:`CALIBRATIONS`). Returns ``out``.

    ``whole``: ``fp_onnx`` is a whole-detector file and ``calibration`` its input
    pictures ((3, H, W) float in the input format, resized, each its own size). Only the
    network's nodes (:data:`WHOLE_NETWORK`, quantize_static's ``nodes_to_quantize``) are
    quantized, as in a network-only file: by default it also quantizes the anchors' and box
    decoding's Add / Mul, which onnxruntime 1.32 fuses into QLinearAdd / QLinearMul and
    crashes running (and box coordinates would sit on an 8-bit grid). The output drops the
    shapes ONNX's shape inference wrote into it (``value_info``, which quantize_static always
    adds): on them onnxruntime's ReshapeFusion breaks a Reshape of the box decoding
    ("cannot reshape {0,1,4} to {0,-1}"); its metadata keeps qdet's entries only. MinMax
    only: the histogram calibrators (Percentile) stack each tensor's values over the
    pictures, and the post-processing's tensors differ in length from picture to picture
    (onnxruntime issue #18792). ``prefixes``: the node-name prefixes of a whole file that
    are quantized (e.g. ``("/backbone/net/blocks.",)``: a ViT's blocks only). ``op_types``:
    the op types it quantizes (``op_types_to_quantize``; empty: every one it can, its
    default; ``("MatMul",)``: a ViT's Linears and attention matmuls only)."""
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
    if whole and method != "minmax":
        raise ValueError(
            f"calibration {method!r} of a whole-detector file: onnxruntime's histogram "
            "calibrators cannot take tensors whose length differs between pictures (the "
            "post-processing's; onnxruntime issue #18792): use minmax"
        )
    if prefixes != WHOLE_NETWORK and not whole:
        raise ValueError(
            "prefixes choose the nodes of a whole-detector file (whole=True); a network-only "
            "file is quantized whole"
        )
    input_name = WHOLE_INPUT if whole else INPUT_NAME

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {input_name: x}

    pre = out + ".pre.onnx"
    # A detector export has dynamic axes, which symbolic shape inference cannot follow.
    quant_pre_process(fp_onnx, pre, skip_symbolic_shape=True)
    try:
        nodes = _whole_network(pre, prefixes) if whole else None
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
            nodes_to_quantize=nodes,
            op_types_to_quantize=list(op_types) or None,
        )
        if whole:
            _as_whole_file(out + ".tmp")
        os.replace(out + ".tmp", out)
    finally:
        if os.path.exists(pre):
            os.remove(pre)
    return out


def _whole_network(path: str, prefixes: tuple[str, ...]) -> list[str]:
    """The names of the nodes of the whole file at ``path`` under ``prefixes``."""
    import onnx  # optional: the export extra

    names = [n.name for n in onnx.load(path).graph.node if n.name.startswith(prefixes)]
    if not names:
        raise ValueError(
            f"{path} has no node under {prefixes}: not a whole-detector file "
            "(qdet.export.whole), or not of this model"
        )
    return names


def _as_whole_file(path: str) -> None:
    """The quantized whole file at ``path`` without ONNX's inferred shapes and without the
    text markers onnxruntime's quantizer adds to its metadata ("onnx.infer", ...), which
    qdet_runner would read as JSON like the rest."""
    import onnx  # optional: the export extra

    proto = onnx.load(path)
    del proto.graph.value_info[:]
    kept = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith("onnx.")]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, path)


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


def quantize_static_kernels(
    fp_model: torch.nn.Module,
    picture: torch.Tensor,
    pictures: list[torch.Tensor],
    info: dict,
    workdir: str,
) -> dict[str, dict[str, int]]:
    """Per layer kind, the integer and float ops (:func:`kernels_by_kind`) onnxruntime runs
    for ``quantize_static`` (MinMax) of ``fp_model``'s whole file: what a user gets from
    onnxruntime's own quantizer for the same FP model, beside a qdet export's counts.

    ``picture`` traces the file, ``pictures`` calibrate it ((3, H, W), resized as the test
    set's; the counts depend on the graph, not on the calibration's ranges), ``info`` is
    the runner's metadata (:func:`export_whole_detector`); the files go to ``workdir``."""
    fp_onnx = os.path.join(workdir, "fp32.onnx")
    out = os.path.join(workdir, "quantize_static_minmax.onnx")
    export_whole_detector(fp_model, fp_onnx, picture, info)
    calibration = [p.float().cpu().numpy() for p in pictures]
    quantize_static_peer(fp_onnx, out, calibration, "minmax", whole=True)
    return kernels_by_kind(optimized_op_counts(out))


def kernels_vs_quantize_static(
    trained: TrainedModel,
    config_file: str,
    opts: list[str],
    exported: str,
    pictures: list[torch.Tensor],
) -> dict[str, dict[str, dict[str, int]]]:
    """Per layer kind, ``{"qdet": {integer, float}, "quantize_static": {...}}``: the ops
    onnxruntime runs for the whole file ``exported`` (of ``trained``) and for
    ``quantize_static`` MinMax of the same FP model (:func:`float_form`: the config with
    its quantizers off, given the trained float weights). ``pictures`` ((3, H, W), resized
    as the test set's) trace and calibrate the peer; the counts depend on the graph, not on
    the ranges."""
    fp = float_form(config_file, opts, trained)
    with tempfile.TemporaryDirectory() as workdir:
        peer = quantize_static_kernels(
            fp.model, pictures[0], pictures, fp.deployment_info(), workdir
        )
    ours = kernels_by_kind(optimized_op_counts(exported))
    return {kind: {"qdet": ours[kind], "quantize_static": peer[kind]} for kind in ours}
