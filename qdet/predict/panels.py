"""Looking at what a model detects: Detectron2's predictor and Visualizer, panels side by
side (``tools/predict.py``, and the sheets the demo and the study write).

A panel is one model's detections drawn on one image by Detectron2's ``Visualizer``, at the
image's own size (times ``scale``), with the model named in its top-left corner when it is
compared with others. Images are read and written with opencv (BGR), as Detectron2's
``demo/demo.py`` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from detectron2.config import CfgNode

from qdet.engine.trained_model import TrainedModel, trained_model_from_cfg
from qdet.predict.inputs import read_image


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
    test threshold at ``confidence_threshold``; with ``onnx``, the network runs in
    onnxruntime from that file and the model only pre- and post-processes
    (``qdet.export.OnnxRetinaNet``)."""
    check_onnx_file(onnx)
    trained.set_score_threshold(confidence_threshold)
    if onnx is not None:
        from qdet.export import OnnxRetinaNet

        trained.model = OnnxRetinaNet(trained.model, onnx)
    return PanelModel(trained, title)


def draw_detections(
    model: PanelModel,
    image_bgr: np.ndarray,
    confidence_threshold: float = 0.5,
    scale: float = 1.0,
    titled: bool = False,
) -> np.ndarray:
    """``model``'s detections (boxes, and masks where it predicts them) with a score of
    at least ``confidence_threshold``, drawn by Detectron2's ``Visualizer``: BGR uint8."""
    from detectron2.data import MetadataCatalog
    from detectron2.utils.visualizer import Visualizer

    instances = model.predictor(image_bgr)["instances"].to("cpu")
    instances = instances[instances.scores >= confidence_threshold]
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
    panel = np.ascontiguousarray(drawn.get_image()[:, :, ::-1])
    return put_title(panel, model.title) if titled else panel


def class_color(metadata, category: int) -> np.ndarray:
    """The dataset's colour of ``category`` (``thing_colors``), else Detectron2's colormap:
    one colour per class rather than per detection (Visualizer's default, random), so
    panels side by side read alike. RGB in [0, 1]."""
    from detectron2.utils.colormap import colormap

    colors = metadata.get("thing_colors")
    if colors:
        return np.asarray(colors[category % len(colors)], dtype=float) / 255
    palette = colormap(rgb=True, maximum=1)
    return palette[category % len(palette)]


def put_title(panel: np.ndarray, title: str) -> np.ndarray:
    """``title`` in white on a dark band across the panel's top, shrunk to fit its width."""
    import cv2

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


def comparison_sheet(
    models: Sequence[PanelModel],
    images: Sequence[np.ndarray],
    confidence_threshold: float = 0.5,
    scale: float = 1.0,
) -> np.ndarray:
    """A grid: one row per image, one titled column per model (BGR uint8). Images of
    different sizes are padded with black to the widest and tallest."""
    rows = [
        side_by_side(
            [draw_detections(m, im, confidence_threshold, scale, titled=True) for m in models]
        )
        for im in images
    ]
    height = max(r.shape[0] for r in rows)
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, height - r.shape[0]), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(padded, axis=0)


def write_val_sheet(
    models: Sequence[PanelModel],
    dataset: str,
    path: str,
    num_images: int = 3,
    confidence_threshold: float = 0.5,
    scale: float = 2.0,
) -> str:
    """The first ``num_images`` images of ``dataset`` through every model, one row each:
    the sheet the demo and the accuracy study write (FP, 4-bit baseline, 4-bit QFD)."""
    import cv2
    from detectron2.data import DatasetCatalog

    files = [d["file_name"] for d in DatasetCatalog.get(dataset)[:num_images]]
    sheet = comparison_sheet(models, [read_image(f) for f in files], confidence_threshold, scale)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, sheet):
        raise ValueError(f"opencv could not write {path!r} (a .png or .jpg name is needed)")
    return path


def write_study_sheet(
    study, names: Sequence[str], seed: int, path: str, num_images: int = 3
) -> str | None:
    """:func:`write_val_sheet` of a study's finished runs ``names`` for ``seed`` (e.g. FP,
    4-bit baseline, 4-bit QFD), each panel titled with its row's label and bits; None when
    fewer than two of them have finished."""
    models = []
    for name in names:
        row = study.rows.get(name)
        if row is None:
            continue
        cfg = study.config(row, seed).clone()
        final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        if not os.path.isfile(final):
            continue
        cfg.defrost()
        cfg.MODEL.WEIGHTS = final
        cfg.freeze()
        models.append(build_panel_model(cfg, f"{row.label} {row.bits}".strip()))
    if len(models) < 2:
        return None
    return write_val_sheet(models, models[0].predictor.dataset, path, num_images)
