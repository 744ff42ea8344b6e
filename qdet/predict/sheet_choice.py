"""What a comparison sheet shows, chosen from the evaluation a study already ran: the score
threshold at which the FP model's detections are about 90% right, and the val images on
which the quantized models differ most from it.

Both read the COCO results Detectron2's ``COCOEvaluator`` writes
(``OUTPUT_DIR/inference/coco_instances_results.json``) and match them to the ground truth
with pycocotools' own matching (``COCOeval.evaluate`` at IoU 0.5, 100 detections per
image), so "right" means what it means for AP50: the right class on a box of IoU >= 0.5
with a ground-truth instance not already taken by a higher-scored detection.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_dict
from detectron2.structures import BoxMode
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

MATCH_IOU = 0.5


def results_file(output_dir: str) -> str:
    """Where Detectron2's ``COCOEvaluator`` (as qdet's trainer builds it) writes a run's
    detections on its test set."""
    return os.path.join(output_dir, "inference", "coco_instances_results.json")


@dataclass(frozen=True)
class Detection:
    """One scored detection and the ground-truth annotation it matched (0: none)."""

    score: float
    matched: int


@dataclass(frozen=True)
class ImageMatches:
    """One image's detections, matched, and its ground-truth annotation ids."""

    detections: tuple[Detection, ...]
    ground_truth: frozenset[int]

    def found(self, threshold: float) -> frozenset[int]:
        """Ground-truth instances a detection of score >= ``threshold`` got right."""
        return frozenset(d.matched for d in self.detections if d.score >= threshold and d.matched)

    def false(self, threshold: float) -> int:
        """Detections of score >= ``threshold`` that match nothing (a wrong place or class)."""
        return sum(1 for d in self.detections if d.score >= threshold and not d.matched)


def ground_truth(dataset: str):
    """``dataset``'s annotations as a pycocotools ``COCO``: its ``json_file`` where it is
    registered from one, else Detectron2's conversion of its dicts."""
    json_file = MetadataCatalog.get(dataset).get("json_file")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        if json_file and os.path.isfile(json_file):
            return COCO(json_file)
        coco = COCO()
        coco.dataset = convert_to_coco_dict(dataset)
        coco.createIndex()
    return coco


def match_detections(
    gt, results: Sequence[dict], image_ids: Sequence[int] | None = None
) -> dict[int, ImageMatches]:
    """Per image id of ``gt`` (or of ``image_ids``): its detections from ``results`` (COCO
    result format, boxes) matched by ``COCOeval.evaluate`` at IoU 0.5 over all areas,
    crowd and ignored ones left out."""
    ids = list(image_ids) if image_ids is not None else gt.getImgIds()
    per_image: dict[int, list[Detection]] = {i: [] for i in ids}
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = COCOeval(gt, gt.loadRes(list(results)), "bbox")
            evaluation.params.imgIds = ids
            evaluation.params.iouThrs = np.array([MATCH_IOU])
            evaluation.params.areaRng = [[0, 1e10]]
            evaluation.params.areaRngLbl = ["all"]
            evaluation.params.maxDets = [100]
            evaluation.evaluate()
        for entry in evaluation.evalImgs:
            if entry is None:
                continue
            detections = per_image[entry["image_id"]]
            for score, matched, ignored in zip(
                entry["dtScores"], entry["dtMatches"][0], entry["dtIgnore"][0]
            ):
                if not ignored:
                    detections.append(Detection(float(score), int(matched)))
    return {
        i: ImageMatches(tuple(d), frozenset(gt.getAnnIds(imgIds=[i], iscrowd=False)))
        for i, d in per_image.items()
    }


def instances_as_results(instances, image_id: int, dataset: str) -> list[dict]:
    """Detectron2 ``Instances`` of one image in COCO's result format, with ``dataset``'s own
    category ids, as ``COCOEvaluator`` writes them."""
    to_dataset = {
        v: k
        for k, v in MetadataCatalog.get(dataset)
        .get("thing_dataset_id_to_contiguous_id", {})
        .items()
    }
    boxes = BoxMode.convert(instances.pred_boxes.tensor.numpy(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
    return [
        {
            "image_id": image_id,
            "category_id": to_dataset.get(int(c), int(c)),
            "bbox": [float(v) for v in box],
            "score": float(score),
        }
        for box, c, score in zip(boxes, instances.pred_classes.tolist(), instances.scores.tolist())
    ]


def load_matches(gt, output_dir: str) -> dict[int, ImageMatches] | None:
    """:func:`match_detections` of a run's evaluation results; None when it wrote none."""
    path = results_file(output_dir)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return match_detections(gt, json.load(f))


@dataclass(frozen=True)
class Threshold:
    """A score threshold and the precision and recall of detections at or above it."""

    score: float
    precision: float
    recall: float


def precision_threshold(
    matches: dict[int, ImageMatches], target_precision: float = 0.9
) -> Threshold | None:
    """The lowest score threshold t at which the detections scored >= t are right at least
    ``target_precision`` of the time: precision(t) = TP(t) / #(score >= t), recall(t) =
    TP(t) / #ground truth, the point of the precision-recall curve with the most recall
    and precision >= the target. None when no threshold reaches it."""
    detections = sorted((d for m in matches.values() for d in m.detections), key=lambda d: -d.score)
    total = sum(len(m.ground_truth) for m in matches.values())
    if not detections or total == 0:
        return None
    scores = np.array([d.score for d in detections])
    right = np.cumsum([bool(d.matched) for d in detections])
    precision = right / np.arange(1, len(detections) + 1)
    # only the last detection of a run of equal scores: a threshold keeps all of them
    last_of_score = np.append(scores[1:] < scores[:-1], True)
    ok = np.flatnonzero(last_of_score & (precision >= target_precision))
    if len(ok) == 0:
        return None
    k = ok[-1]
    return Threshold(float(scores[k]), float(precision[k]), float(right[k] / total))


def disagreement(reference: ImageMatches, other: ImageMatches, threshold: float) -> int:
    """How differently two models read one image at ``threshold``: instances one finds
    and the other does not, plus the difference in false detections."""
    found = reference.found(threshold) ^ other.found(threshold)
    return len(found) + abs(reference.false(threshold) - other.false(threshold))


def images_that_differ(
    reference: dict[int, ImageMatches],
    others: Sequence[dict[int, ImageMatches]],
    threshold: float,
    num_images: int,
) -> list[int]:
    """The ``num_images`` image ids where ``others`` disagree most with ``reference``
    (summed :func:`disagreement`; ties: the image the reference reads best, then the
    first), in the dataset's order."""

    def rank(image_id: int) -> tuple[int, int, int]:
        ref = reference[image_id]
        total = sum(disagreement(ref, o[image_id], threshold) for o in others if image_id in o)
        reads_well = len(ref.found(threshold)) - ref.false(threshold)
        return (-total, -reads_well, image_id)

    chosen = sorted(reference, key=rank)[:num_images]
    return sorted(chosen)
