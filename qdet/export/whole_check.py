"""The check of a whole-detector file (:mod:`qdet.export.whole`): onnxruntime runs the file
on pictures, Detectron2's PyTorch inference of the same model runs on the same input
tensors, and the instances are compared.

- FP models must agree to float rounding: as many instances, boxes within
  :data:`BOX_ATOL` px, the same classes, scores within :data:`SCORE_ATOL`, and each mask
  (28 x 28 probabilities pasted into the input picture) at IoU >= :data:`MASK_IOU`.
- Quantized models: two runtimes cannot agree to float precision at 4 bits (an activation
  within 1e-6 of a rounding boundary lands one code apart and the next layers amplify it;
  docs/deployment.md), so the file is judged by the layer-wise check of its network
  (``--network-only``'s :func:`qdet.export.verify`), by how many of PyTorch's confident
  detections onnxruntime finds (warning below :data:`MIN_AGREEMENT`), and by COCO AP
  (``--eval``). A target's file must still run every quantized conv as one integer op.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import torch
from detectron2.evaluation import inference_on_dataset
from detectron2.structures import Boxes, Instances
from torch import nn

import qdet_runner
from qdet.export import integer_check
from qdet.export.runtime import inference_session, onnx_metadata
from qdet.export.verify import (
    BOX_IOU,
    CONFIDENT,
    MIN_AGREEMENT,
    VerifyReport,
    check_activations,
    check_tie_rate,
    check_weights,
)
from qdet.export.whole import FORMAT, WHOLE_INPUT, detector_inference

BOX_ATOL = 1e-3  # px
SCORE_ATOL = 1e-5
MASK_IOU = 0.99


@dataclass
class WholeReport(VerifyReport):
    """:class:`qdet.export.verify.VerifyReport` (failures, confident detections, the
    layer-by-layer counts of a simulated file, a target's kernels) plus the comparison of
    the whole file's instances with PyTorch's."""

    instances_torch: int = 0
    instances_onnx: int = 0
    box_max_abs: float = 0.0
    score_max_abs: float = 0.0
    mask_min_iou: float = 1.0
    quantized: bool = False

    def summary(self) -> str:
        s = (
            f"{self.images} pictures: onnxruntime {self.instances_onnx} instances, PyTorch "
            f"{self.instances_torch}; {self.confident_found}/{self.confident_torch} confident "
            f"detections (score >= {CONFIDENT}) found (same class, IoU >= {BOX_IOU})"
        )
        if not self.quantized:
            s += (
                f"; boxes within {self.box_max_abs:.2g} px, scores within "
                f"{self.score_max_abs:.2g}, masks IoU >= {self.mask_min_iou:.4f}"
            )
        if self.activations_checked:
            if self.target:  # weights are checked by the integer kernels' codes
                checked = f"{self.activation_values} codes of the integer kernels, each layer fed "
                checked += "the runtime's inputs"
            else:
                s += f"; {self.weights_checked} quantized weights on their grids"
                checked = f"{self.activation_values} codes"
            s += (
                f"; layer by layer: {self.activations_checked} QuantizeLinear nodes ({checked}) "
                f"give PyTorch's codes, {self.boundary_flips} at a rounding boundary "
                f"({self.tie_values} distinct values)"
            )
        if self.target:
            kernels = ", ".join(f"{v} {k}" for k, v in sorted(self.integer_kernels.items()))
            s += f"; onnxruntime runs {kernels} and {self.float_convs} float convs"
        return s


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of XYXY boxes (len(a), len(b))."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)


def _aligned(want: dict, got: dict) -> dict:
    """``got``'s instances reordered to match ``want``'s one by one (greedily: the same
    class, a score within :data:`SCORE_ATOL`, the nearest box). Detections whose scores tie
    to float rounding (an untrained head's) leave NMS in either runtime's own order."""
    dist = np.abs(want["pred_boxes"][:, None, :] - got["pred_boxes"][None]).max(axis=2)
    dist += 1e9 * (want["pred_classes"][:, None] != got["pred_classes"][None])
    dist += 1e9 * (np.abs(want["scores"][:, None] - got["scores"][None]) > SCORE_ATOL)
    free, order = np.ones(len(got["scores"]), dtype=bool), []
    for row in dist:
        j = int(np.argmin(np.where(free, row, np.inf)))
        free[j] = False
        order.append(j)
    return {k: v[order] if k != "image_size" else v for k, v in got.items()}


def _compare(report: WholeReport, want: dict, got: dict, size: tuple[int, int]) -> None:
    """One picture's instances: PyTorch's (``want``) against the file's (``got``)."""
    n_want, n_got = len(want["pred_boxes"]), len(got["pred_boxes"])
    report.instances_torch += n_want
    report.instances_onnx += n_got
    confident = want["scores"] >= CONFIDENT
    report.confident_torch += int(confident.sum())
    if confident.any() and n_got:
        iou = _iou(want["pred_boxes"][confident], got["pred_boxes"])
        iou[want["pred_classes"][confident][:, None] != got["pred_classes"][None, :]] = 0
        report.confident_found += int((iou.max(axis=1) >= BOX_IOU).sum())
    if report.quantized:
        return
    where = f"picture {report.images}"
    if n_want != n_got:
        report.failures.append(f"{where}: {n_got} instances in onnxruntime, {n_want} in PyTorch")
        return
    if not n_want:
        return
    got = _aligned(want, got)
    box = float(np.abs(want["pred_boxes"] - got["pred_boxes"]).max())
    score = float(np.abs(want["scores"] - got["scores"]).max())
    report.box_max_abs = max(report.box_max_abs, box)
    report.score_max_abs = max(report.score_max_abs, score)
    if box > BOX_ATOL or score > SCORE_ATOL:
        report.failures.append(
            f"{where}: boxes {box:.3g} px and scores {score:.3g} apart (FP: within "
            f"{BOX_ATOL} px and {SCORE_ATOL})"
        )
    if not np.array_equal(want["pred_classes"], got["pred_classes"]):
        report.failures.append(f"{where}: other classes in onnxruntime than in PyTorch")
    if "pred_masks" in want:
        pasted = [
            qdet_runner.paste_masks(m["pred_masks"][:, 0], m["pred_boxes"], *size)
            for m in (want, got)
        ]
        inter = (pasted[0] & pasted[1]).sum(axis=(1, 2))
        union = (pasted[0] | pasted[1]).sum(axis=(1, 2))
        # Two empty masks agree (IoU 1).
        iou = float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).min())
        report.mask_min_iou = min(report.mask_min_iou, iou)
        if iou < MASK_IOU:
            report.failures.append(f"{where}: a mask at IoU {iou:.3f} with PyTorch's")


@torch.no_grad()
def check_whole(
    model: nn.Module, path: str, images: list[torch.Tensor], threads: int = 0
) -> WholeReport:
    """The file at ``path`` against ``model`` on ``images`` ((3, H, W) float pictures in
    the model's input format, resized as its test set). Failures are in the report."""
    model.eval()
    session = inference_session(path, threads)
    meta = onnx_metadata(session)
    names = [o.name for o in session.get_outputs()]
    report = WholeReport(quantized=meta.get("quantizers", 0) > 0, target=meta.get("target", ""))
    inference = detector_inference(model)
    for image in images:
        instances = inference(model, [{"image": image}])[0]["instances"].to("cpu")
        fields = instances.get_fields()
        want = {k: getattr(v, "tensor", v).numpy() for k, v in fields.items()}
        feed = {WHOLE_INPUT: image.float().cpu().numpy()}
        got = dict(zip(names, session.run(None, feed)))
        _compare(report, want, got, tuple(image.shape[1:]))
        report.images += 1
    if report.quantized and not report.target and images:
        _check_layers(model, path, meta, images, report)
    if report.target and images:
        nodes = integer_check.optimized_nodes(path, threads or 1)
        counts = dict(collections.Counter(op for op, _ in nodes))
        first = [{"image": images[0]}]
        float_calls = integer_check.float_conv_calls(model, lambda: inference(model, first))
        integer_check.check_kernels(meta, counts, float_calls, report, nodes)
        feeds = [image.float().cpu().numpy() for image in images]
        integer_check.check_layers(
            model,
            path,
            feeds,
            meta,
            report,
            input_name=WHOLE_INPUT,
            run_model=lambda x: inference(model, [{"image": torch.from_numpy(x)}]),
        )
        check_tie_rate(report)
    if report.confident_torch and report.confident_found < MIN_AGREEMENT * report.confident_torch:
        report.warnings.append(
            f"onnxruntime finds only {report.confident_found} of PyTorch's "
            f"{report.confident_torch} confident detections: compare COCO AP with --eval"
        )
    return report


class WholeFileDetector(nn.Module):
    """The whole file as a Detectron2 model for ``inference_on_dataset``: each input's
    (resized) image through onnxruntime, then the torch-free runner's post-processing to
    the input's height and width (:func:`qdet_runner.postprocess`), as ``Instances``. So a
    COCO evaluation of it measures the deployed file and runner, not Detectron2's code."""

    def __init__(self, path: str, threads: int = 0):
        super().__init__()
        self.session = inference_session(path, threads)
        self.names = [o.name for o in self.session.get_outputs()]

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        outputs = []
        for x in batched_inputs:
            image = x["image"].float().cpu().numpy()
            raw = dict(zip(self.names, self.session.run(None, {WHOLE_INPUT: image})))
            size = (x.get("height", image.shape[1]), x.get("width", image.shape[2]))
            found = qdet_runner.postprocess(raw, image.shape[1:], size)
            outputs.append({"instances": as_instances(found, size)})
        return outputs


def as_instances(found: dict, size: tuple[int, int]) -> Instances:
    """The runner's numpy detections of a ``size`` picture (:func:`qdet_runner.postprocess`)
    as Detectron2 ``Instances``, for its evaluators and Visualizer."""
    instances = Instances(size)
    instances.pred_boxes = Boxes(torch.from_numpy(found["boxes"]))
    instances.scores = torch.from_numpy(found["scores"])
    instances.pred_classes = torch.from_numpy(found["classes"])
    if "masks" in found:
        instances.pred_masks = torch.from_numpy(found["masks"])
    return instances


def _check_layers(model: nn.Module, path: str, meta: dict, images, report: WholeReport) -> None:
    """The layer-wise check of a network-only file (:mod:`qdet.export.verify`) on the QDQ
    inside the whole file: every quantized weight, and every QuantizeLinear's codes on
    onnxruntime's own inputs and each constant of its chain, against the model's
    quantizers; boundary ties counted and capped."""
    import onnx  # optional: the export extra

    proto = onnx.load(path)
    check_weights(model, proto, meta, report)
    feeds = [image.float().cpu().numpy() for image in images]
    check_activations(model, proto, meta, feeds, report, input_name=WHOLE_INPUT, substituted=False)
    check_tie_rate(report)


def is_whole_file(path: str) -> bool:
    """Whether the ONNX file at ``path`` is a whole-detector export (its metadata)."""
    return onnx_metadata(inference_session(path)).get("graph") == FORMAT


def test_pictures(loader, count: int) -> list[torch.Tensor]:
    """The first ``count`` pictures of a test loader, as the model gets them (resized)."""
    pictures = []
    for batch in loader:
        pictures += [x["image"] for x in batch]
        if len(pictures) >= count:
            break
    return pictures[:count]


def loader_aps(runner: nn.Module, loader, evaluator) -> dict:
    """COCO AP of ``runner`` on ``loader`` by ``evaluator``: box, and mask for a model with
    masks (``{"bbox": {...}, "segm": {...}}``)."""
    with torch.no_grad():
        return dict(inference_on_dataset(runner, loader, evaluator))
