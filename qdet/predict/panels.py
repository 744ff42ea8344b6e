"""Looking at what a model detects: Detectron2's predictor and Visualizer, panels side by
side (``tools/predict.py``; the demo's and the study's sheets are :mod:`qdet.predict.sheets`).

A panel is one model's detections drawn on one image by Detectron2's ``Visualizer``, at the
image's own size (times ``scale``), with the model named in its top-left corner when it is
compared with others. Images are read and written with opencv (BGR), as Detectron2's
``demo/demo.py`` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import Visualizer

from qdet.engine.trained_model import TrainedModel, trained_model_from_cfg
from qdet.export import OnnxRetinaNet
from qdet.export.whole_check import WholeFileDetector, is_whole_file


def model_title(cfg: CfgNode, name: str) -> str:
    """``name`` with the model's bit widths, e.g. ``retinanet_r18_4bit_qfd  W4/A4``."""
    if not cfg.QUANT.ENABLED:
        return f"{name}  FP32"
    return f"{name}  W{cfg.QUANT.W_BITS}/A{cfg.QUANT.A_BITS}"


@dataclass
class PanelModel:
    """A predictor (a trained model called as Detectron2's ``DefaultPredictor`` is, its
    network possibly run by onnxruntime) and its title."""

    predictor: TrainedModel
    title: str


def build_panel_model(
    cfg: CfgNode,
    title: str,
    confidence_threshold: float = 0.5,
    onnx: str | None = None,
) -> PanelModel:
    """:func:`panel_model` of a yacs config (``MODEL.WEIGHTS``: its checkpoint; optional
    with ``onnx``)."""
    trained = trained_model_from_cfg(cfg, "to run", weights_optional=onnx is not None)
    return panel_model(trained, title, confidence_threshold, onnx)


def check_onnx_file(onnx: str | None) -> None:
    """``--onnx`` names a file (or is not given)."""
    if onnx is not None and not os.path.isfile(onnx):
        raise FileNotFoundError(
            f"--onnx {onnx!r} does not exist; tools/export_onnx.py writes it "
            "(docs/deployment.md, 'Export: ONNX for onnxruntime')"
        )


def panel_model(
    trained: TrainedModel,
    title: str,
    confidence_threshold: float = 0.5,
    onnx: str | None = None,
) -> PanelModel:
    """``trained`` as a predictor (its config's test resize and input format), every head's
    test threshold at ``confidence_threshold``; with ``onnx``, onnxruntime runs that file:
    a whole-detector file with the torch-free runner's post-processing
    (:class:`qdet.export.whole_check.WholeFileDetector`; the file's own score threshold
    applies first), a network-only RetinaNet file with Detectron2's
    (:class:`qdet.export.OnnxRetinaNet`)."""
    check_onnx_file(onnx)
    trained.set_score_threshold(confidence_threshold)
    if onnx is not None:
        if is_whole_file(onnx):
            trained.model = WholeFileDetector(onnx)
        else:
            trained.model = OnnxRetinaNet(trained.model, onnx)
    return PanelModel(trained, title)


def detect(model: PanelModel, image_bgr: np.ndarray, confidence_threshold: float = 0.5):
    """``model``'s detections on one image with a score of at least
    ``confidence_threshold`` (Detectron2 ``Instances`` on the CPU)."""
    instances = model.predictor(image_bgr)["instances"].to("cpu")
    return instances[instances.scores >= confidence_threshold]


def draw_instances(
    model: PanelModel, image_bgr: np.ndarray, instances, scale: float = 1.0
) -> np.ndarray:
    """``instances`` (boxes, and masks where there are) drawn on the image by Detectron2's
    ``Visualizer``, labelled with class and score, one colour per class: BGR uint8."""
    metadata = MetadataCatalog.get(model.predictor.dataset or "__unused")
    classes = instances.pred_classes.tolist()
    names = metadata.get("thing_classes")
    labels = [
        f"{names[c] if names else c} {100 * s:.0f}%" for c, s in zip(classes, instances.scores)
    ]
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata, scale=scale)
    drawn = visualizer.overlay_instances(
        boxes=instances.pred_boxes if instances.has("pred_boxes") else None,
        masks=instances.pred_masks.numpy() if instances.has("pred_masks") else None,
        labels=labels,
        assigned_colors=[class_color(metadata, c) for c in classes],
        alpha=0.4,
    )
    return np.ascontiguousarray(drawn.get_image()[:, :, ::-1])


def draw_detections(
    model: PanelModel,
    image_bgr: np.ndarray,
    confidence_threshold: float = 0.5,
    scale: float = 1.0,
    titled: bool = False,
) -> np.ndarray:
    """``model``'s detections with a score of at least ``confidence_threshold``
    (:func:`detect`), drawn (:func:`draw_instances`), titled with the model's title."""
    instances = detect(model, image_bgr, confidence_threshold)
    panel = draw_instances(model, image_bgr, instances, scale)
    return put_title(panel, model.title) if titled else panel


def class_color(metadata, category: int) -> np.ndarray:
    """The dataset's colour of ``category`` (``thing_colors``), else Detectron2's colormap:
    one colour per class rather than per detection (Visualizer's default, random), so
    panels side by side read alike. RGB in [0, 1]."""
    colors = metadata.get("thing_colors")
    if colors:
        return np.asarray(colors[category % len(colors)], dtype=float) / 255
    palette = colormap(rgb=True, maximum=1)
    return palette[category % len(palette)]


def put_title(panel: np.ndarray, title: str) -> np.ndarray:
    """``title`` in white on a dark band across the panel's top, shrunk to fit its width."""
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, 1
    height, width = panel.shape[:2]
    size = max(0.3, min(0.8, height / 400))
    while size > 0.3 and cv2.getTextSize(title, font, size, thickness)[0][0] > width - 8:
        size -= 0.05
    (text_w, text_h), baseline = cv2.getTextSize(title, font, size, thickness)
    band = text_h + baseline + 6
    out = panel.copy()
    out[:band] = (0.35 * out[:band]).astype(np.uint8)
    cv2.putText(out, title, (4, band - baseline - 3), font, size, (255, 255, 255), thickness)
    return out


def side_by_side(panels: Sequence[np.ndarray]) -> np.ndarray:
    """Panels of one height, left to right."""
    heights = {p.shape[0] for p in panels}
    if len(heights) != 1:
        raise ValueError(f"panels of different heights {sorted(heights)} cannot sit side by side")
    return np.concatenate(list(panels), axis=1)


def stack_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Rows of panels top to bottom, each padded with black on the right to the widest."""
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows])
