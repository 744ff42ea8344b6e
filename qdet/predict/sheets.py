"""The sheets the demo and the accuracy study write: FP and quantized models side by side
on a few val images (``output/demo/detections.png``).

A sheet drawn at an arbitrary score on the first images says little: a short-schedule
teacher boxes few digits at 0.5, and the first images need not show any difference
between the models. So, where the runs' evaluation results are on disk, the sheet is
drawn at the score where the FP model's detections are about 90% right on the val split
and on the val images where the quantized models differ most from it
(:mod:`qdet.predict.sheet_choice`); each panel says how many of the image's objects its
drawn detections get right and how many are false, and the caption states the threshold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from detectron2.data import DatasetCatalog

from qdet.predict.inputs import read_image
from qdet.predict.panels import (
    build_panel_model,
    detect,
    draw_instances,
    put_title,
    side_by_side,
    stack_rows,
)
from qdet.predict.sheet_choice import (
    ImageMatches,
    Threshold,
    ground_truth,
    images_that_differ,
    instances_as_results,
    load_matches,
    match_detections,
    precision_threshold,
)

DEFAULT_THRESHOLD = 0.5  # where the val results are missing or never reach the precision
TARGET_PRECISION = 0.9


@dataclass(frozen=True)
class Sheet:
    """A written sheet: its file, the threshold it is drawn at (None: the default 0.5,
    without the val split's precision) and its images (chosen where the models differ
    when there is a threshold, else the split's first)."""

    path: str
    threshold: Threshold | None
    files: tuple[str, ...]

    @property
    def score(self) -> float:
        return self.threshold.score if self.threshold is not None else DEFAULT_THRESHOLD

    @property
    def chosen(self) -> bool:
        """The images are where the models differ (else the split's first ones)."""
        return self.threshold is not None

    def describe(self) -> str:
        """One line for a tool's console: what the sheet shows."""
        which = "where the quantized models differ most from FP" if self.chosen else "the first"
        if self.threshold is None:
            at = f"score >= {self.score:.2f}"
        else:
            t = self.threshold
            at = (
                f"score >= {t.score:.2f}, where the FP model is {100 * t.precision:.0f}% right "
                f"(recall {100 * t.recall:.0f}%) on the val split"
            )
        return f"{len(self.files)} val images ({which}), detections at {at}"


def put_caption(sheet: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``lines`` in white on a black band above ``sheet``."""
    font, size, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1
    width = sheet.shape[1]
    while size > 0.3 and max(cv2.getTextSize(t, font, size, 1)[0][0] for t in lines) > width - 8:
        size -= 0.05
    line_h = cv2.getTextSize("Ag", font, size, thickness)[0][1] + 8
    band = np.zeros((line_h * len(lines) + 6, width, 3), dtype=np.uint8)
    for i, text in enumerate(lines):
        y = line_h * (i + 1)
        cv2.putText(band, text, (4, y), font, size, (255, 255, 255), thickness, cv2.LINE_AA)
    return np.concatenate([band, sheet], axis=0)


def write_image(path: str, image: np.ndarray) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, image):
        raise ValueError(f"opencv could not write {path!r} (a .png or .jpg name is needed)")
    return path


def write_study_sheet(
    study,
    names: Sequence[str],
    seed: int,
    path: str,
    num_images: int = 3,
    target_precision: float = TARGET_PRECISION,
    scale: float = 2.0,
    files: Mapping[str, str] | None = None,
) -> Sheet | None:
    """A study's finished runs ``names`` for ``seed`` (the first: the FP reference, e.g.
    FP, 4-bit baseline, 4-bit QFD) on ``num_images`` val images, one row each. With every
    run's evaluation results on disk: drawn at the FP run's ``target_precision``
    threshold (:func:`~qdet.predict.sheet_choice.precision_threshold`), on the images
    where the others differ most from it; else the first images at 0.5. Each panel is
    titled with its row's label and bits and what its drawn detections got right. A run
    with a whole-detector file in ``files`` (name -> path) is drawn from that file in
    onnxruntime, with the torch-free runner's post-processing. None when fewer than two of
    the runs have finished."""
    runs = []
    for name in names:
        row = study.rows.get(name)
        if row is None:
            continue
        cfg = study.config(row, seed).clone()
        final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        if os.path.isfile(final):
            cfg.defrost()
            cfg.MODEL.WEIGHTS = final
            cfg.freeze()
            onnx = (files or {}).get(name)
            title = f"{row.label} {row.bits}".strip() + (", ONNX file" if onnx else "")
            runs.append((cfg, title, onnx))
    if len(runs) < 2:
        return None
    dataset = runs[0][0].DATASETS.TEST[0]
    dicts = DatasetCatalog.get(dataset)
    gt = ground_truth(dataset)
    matches = [load_matches(gt, cfg.OUTPUT_DIR) for cfg, _, _ in runs]
    threshold = None
    if all(m is not None for m in matches):
        threshold = precision_threshold(matches[0], target_precision)
    if threshold is not None:
        ids = set(images_that_differ(matches[0], matches[1:], threshold.score, num_images))
        chosen = [d for d in dicts if d["image_id"] in ids]
    else:
        chosen = dicts[:num_images]
    sheet = Sheet(path, threshold, tuple(d["file_name"] for d in chosen))
    score = sheet.score
    models = [build_panel_model(cfg, title, score, onnx) for cfg, title, onnx in runs]
    rows = []
    for record in chosen:
        image = read_image(record["file_name"])
        panels = []
        for model in models:
            instances = detect(model, image, score)
            drawn = instances_as_results(instances, record["image_id"], dataset)
            counts = match_detections(gt, drawn, [record["image_id"]])[record["image_id"]]
            title = f"{model.title}: {panel_counts(counts, score)}"
            panels.append(put_title(draw_instances(model, image, instances, scale), title))
        rows.append(side_by_side(panels))
    write_image(path, put_caption(stack_rows(rows), caption(sheet, dataset, len(dicts))))
    return sheet


def panel_counts(matches: ImageMatches, score: float) -> str:
    """``7/8 right, 1 false``: ground-truth instances found, of all, and false detections."""
    return (
        f"{len(matches.found(score))}/{len(matches.ground_truth)} right, "
        f"{matches.false(score)} false"
    )


def caption(sheet: Sheet, dataset: str, total: int) -> list[str]:
    """The sheet's caption: which threshold and which images, and why."""
    if sheet.threshold is None:
        return [
            f"Detections with score >= {sheet.score:.2f}; the first {len(sheet.files)} "
            f"of {total} images of {dataset}"
        ]
    t = sheet.threshold
    return [
        f"Detections with score >= {t.score:.2f}: there the FP model's detections are "
        f"{100 * t.precision:.0f}% right (IoU >= 0.5, right class) and find "
        f"{100 * t.recall:.0f}% of the objects on {dataset}",
        f"The {len(sheet.files)} of its {total} images where the quantized models differ "
        "most from FP; 'right': objects found, 'false': boxes of none or of the wrong class",
    ]
