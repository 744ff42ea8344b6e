"""The demo's and study's sheet: its threshold from the FP model's precision on val, and the
images where the quantized models differ (qdet.predict.sheet_choice, qdet.predict.sheets)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import cv2
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from pycocotools.coco import COCO

from qdet.config import load_config
from qdet.predict import write_study_sheet
from qdet.predict.sheet_choice import (
    ImageMatches,
    images_that_differ,
    match_detections,
    precision_threshold,
    results_file,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# image 1: two digits of class 1; image 2: one digit of class 2 (COCO boxes: x, y, w, h)
GT = {
    "images": [{"id": 1, "width": 64, "height": 64}, {"id": 2, "width": 64, "height": 64}],
    "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20]},
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [40, 40, 20, 20]},
        {"id": 12, "image_id": 2, "category_id": 2, "bbox": [10, 10, 30, 30]},
    ],
}
for a in GT["annotations"]:
    a.update(area=a["bbox"][2] * a["bbox"][3], iscrowd=0)


def coco() -> COCO:
    gt = COCO()
    gt.dataset = json.loads(json.dumps(GT))
    gt.createIndex()
    return gt


def det(image, category, box, score):
    return {"image_id": image, "category_id": category, "bbox": box, "score": score}


# By hand, in score order: 0.9 right (ann 10), 0.8 false (IoU 100 / 700 with ann 11),
# 0.7 right (ann 12), 0.6 false (class 1 on the class-2 digit), 0.5 right (ann 11), 0.4
# false (a second box on ann 10, already taken).
# precision 1, 1/2, 2/3, 2/4, 3/5, 3/6; recall of 3 digits 1/3 ... 3/3.
RESULTS = [
    det(1, 1, [0, 0, 20, 20], 0.9),
    det(1, 1, [50, 50, 20, 20], 0.8),
    det(2, 2, [10, 10, 30, 30], 0.7),
    det(2, 1, [10, 10, 30, 30], 0.6),
    det(1, 1, [41, 41, 20, 20], 0.5),
    det(1, 1, [1, 1, 20, 20], 0.4),
]


def test_matching_is_cocos_at_iou_half():
    matches = match_detections(coco(), RESULTS)
    one = {d.score: d.matched for d in matches[1].detections}
    assert one == {0.9: 10, 0.8: 0, 0.5: 11, 0.4: 0}
    two = {d.score: d.matched for d in matches[2].detections}
    assert two == {0.7: 12, 0.6: 0}
    assert matches[1].ground_truth == {10, 11} and matches[2].ground_truth == {12}
    assert matches[1].found(0.5) == {10, 11} and matches[1].false(0.5) == 1
    assert matches[1].found(0.6) == {10} and matches[2].false(0.6) == 1


def test_threshold_is_the_lowest_score_that_keeps_the_precision():
    matches = match_detections(coco(), RESULTS)
    t = precision_threshold(matches, 0.9)
    assert (t.score, t.precision, t.recall) == (0.9, 1.0, pytest.approx(1 / 3))
    t = precision_threshold(matches, 0.6)  # 2/3 at 0.7 and 3/5 at 0.5: 0.5 finds more
    assert (t.score, t.precision, t.recall) == (0.5, pytest.approx(0.6), 1.0)
    t = precision_threshold(matches, 0.65)
    assert (t.score, t.precision, t.recall) == (0.7, pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert precision_threshold(match_detections(coco(), RESULTS[1:2]), 0.9) is None
    assert precision_threshold(match_detections(coco(), []), 0.9) is None


def test_equal_scores_are_kept_or_dropped_together():
    tied = [det(1, 1, [0, 0, 20, 20], 0.9), det(1, 1, [50, 50, 20, 20], 0.9)]
    assert precision_threshold(match_detections(coco(), tied), 0.9) is None  # 1/2 at 0.9
    t = precision_threshold(match_detections(coco(), tied), 0.5)
    assert (t.score, t.precision) == (0.9, 0.5)


def test_the_images_chosen_are_where_the_models_disagree():
    reference = match_detections(coco(), RESULTS)
    same = match_detections(coco(), RESULTS)
    # misses the digit of image 2, a false box there instead of the reference's: 1 there
    other = match_detections(coco(), RESULTS[:2] + RESULTS[4:] + [det(2, 1, [0, 0, 5, 5], 0.95)])
    assert images_that_differ(reference, [same, other], 0.5, 1) == [2]
    assert images_that_differ(reference, [same, other], 0.5, 2) == [1, 2]
    # no disagreement anywhere: the image the reference reads best (1: 2 right - 2 false,
    # 2: 1 right - 1 false: a tie) then the first
    assert images_that_differ(reference, [same], 0.5, 1) == [1]


def test_an_image_without_detections_counts_its_digits():
    matches = match_detections(coco(), RESULTS[:1])
    assert matches[2] == ImageMatches((), frozenset({12}))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two finished runs of a tiny RetinaNet on qdet_digits_val: the FP reference's
    evaluation results are the ground truth itself (all right) plus one false box per
    image at a low score, the other's miss every digit of the second image."""
    root = tmp_path_factory.mktemp("sheet")
    base = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_baseline.yaml")
    torch.manual_seed(0)
    cfgs = {}
    val = DatasetCatalog.get("qdet_digits_val")[:4]
    for name in ("fp", "low"):
        cfg = load_config(
            base,
            [
                "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "32",
                "MODEL.RETINANET.NUM_CONVS", "1", "QUANT.ENABLED", "False",
                "OUTPUT_DIR", str(root / name),
            ],
        )  # fmt: skip
        os.makedirs(os.path.join(cfg.OUTPUT_DIR, "inference"))
        DetectionCheckpointer(build_model(cfg), save_dir=cfg.OUTPUT_DIR).save("model_final")
        results = []
        for i, d in enumerate(val):
            for a in d["annotations"]:
                if name == "fp" or i != 1:
                    assert a["bbox_mode"] == BoxMode.XYWH_ABS  # COCO's, as the results
                    results.append(det(d["image_id"], a["category_id"] + 1, a["bbox"], 0.8))
            results.append(det(d["image_id"], 1, [0, 0, 2, 2], 0.1))
        with open(results_file(cfg.OUTPUT_DIR), "w") as f:
            json.dump(results, f)
        cfgs[name] = cfg
    rows = {
        n: SimpleNamespace(name=n, label=label, bits=bits)
        for n, label, bits in (("fp", "FP", ""), ("low", "low-bit", "4/4"))
    }
    return SimpleNamespace(rows=rows, config=lambda row, seed: cfgs[row.name]), val, root


def test_study_sheet_is_drawn_at_the_fp_threshold_on_the_images_that_differ(two_runs):
    study, val, root = two_runs
    from detectron2.data import MetadataCatalog

    ids = MetadataCatalog.get("qdet_digits_val").thing_dataset_id_to_contiguous_id
    assert ids == {i + 1: i for i in range(len(ids))}  # so det()'s category ids above
    path = str(root / "sheet.png")
    sheet = write_study_sheet(study, ["fp", "low"], 1, path, num_images=1)
    assert sheet.threshold.score == 0.8 and sheet.threshold.precision == 1.0
    assert sheet.chosen and sheet.files == (val[1]["file_name"],)
    assert "score >= 0.80" in sheet.describe()
    image = cv2.imread(path)
    two_panels = 2 * 2 * cv2.imread(val[1]["file_name"]).shape[1]  # scale 2
    assert image.shape[1] == two_panels
    assert image.shape[0] > 2 * cv2.imread(val[1]["file_name"]).shape[0]  # and a caption


def test_study_sheet_without_results_is_the_first_images_at_half(two_runs):
    study, val, root = two_runs
    os.remove(results_file(study.config(study.rows["low"], 1).OUTPUT_DIR))
    sheet = write_study_sheet(study, ["fp", "low"], 1, str(root / "plain.png"), num_images=2)
    assert sheet.threshold is None and sheet.score == 0.5 and not sheet.chosen
    assert sheet.files == tuple(d["file_name"] for d in val[:2])
