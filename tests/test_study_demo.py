"""``make demo``'s rows, table and summary (qdet/study/demo.py) against the recorded run
README quotes (docs/demo/demo.json): the same models at the same widths, its table read
back from its own metrics and its files' (qdet/study/demo_deploy.py), its summary's
fields."""

import json
import os
import types
from pathlib import Path

from qdet.study.demo import SHEET, demo_rows, demo_table, write_summary

ROOT = Path(__file__).resolve().parents[1]
RECORDED = json.loads((ROOT / "docs/demo/demo.json").read_text())


def test_rows_are_the_recorded_demos_models():
    rows = demo_rows()
    assert [r.label for r in rows] == [m["model"] for m in RECORDED["rows"]]
    assert [r.bits for r in rows[1:]] == [m["W/A"] for m in RECORDED["rows"][1:]]  # FP: 32/32
    assert all((ROOT / r.config).is_file() for r in rows)
    assert [r.init for r in rows] == [None] + ["fp"] * (len(rows) - 1)  # students of the FP
    assert set(SHEET) <= {r.name for r in rows}


def test_table_is_seed_ones_metrics_and_each_files_per_model():
    rows = demo_rows()
    results = {
        row.name: {1: dict(recorded), 2: {k: -1 for k in recorded}}
        for row, recorded in zip(rows, RECORDED["rows"])
    }
    file_ms = {row.name: recorded["file ms"] for row, recorded in zip(rows, RECORDED["rows"])}
    study = types.SimpleNamespace(rows={row.name: row for row in rows})
    assert demo_table(study, results, file_ms) == RECORDED["rows"]
    # Runs that shipped no file (evaluated by Detectron2 alone) and no timing: the PyTorch
    # columns alone.
    for by_seed in results.values():
        del by_seed[1]["file AP"]
    bare = [{k: v for k, v in r.items() if not k.startswith("file ")} for r in RECORDED["rows"]]
    assert demo_table(study, results) == bare


def test_summary_holds_the_table_the_sheet_and_the_time(tmp_path):
    recorded = RECORDED["sheet"]
    threshold = types.SimpleNamespace(precision=recorded["precision"], recall=recorded["recall"])
    files = [os.path.join("output", "demo", "val", name) for name in recorded["images"]]
    sheet = types.SimpleNamespace(score=recorded["score"], threshold=threshold, files=files)
    write_summary(RECORDED["rows"], sheet, 1234.5678, str(tmp_path / "demo.json"))
    written = json.loads((tmp_path / "demo.json").read_text())
    assert written == {"rows": RECORDED["rows"], "seconds": 1234.6, "sheet": recorded}
    write_summary([], None, 1.0, str(tmp_path / "none.json"))
    assert "sheet" not in json.loads((tmp_path / "none.json").read_text())


def test_file_ap_scores_the_runners_detections_of_every_picture(tmp_path):
    """``file_ap`` (the demo's AP of a whole file): on pictures whose ground truth is what
    the runner itself finds above a score, its instances score 100 AP; with one picture's
    ground truth moved off its detections, less. So it reads every picture, runs the file
    and hands the runner's boxes and classes, in the picture's pixels, to COCO's
    evaluation."""
    import cv2
    import numpy as np
    import torch
    from detectron2.data.datasets import register_coco_instances
    from detectron2.modeling import build_model

    import qdet_runner
    from qdet.config import load_config
    from qdet.export.whole import export_whole_detector
    from qdet.study.demo_deploy import file_ap

    opts = ["MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "32"]
    opts += ["MODEL.RETINANET.NUM_CONVS", "1", "INPUT.MIN_SIZE_TEST", "64"]
    opts += ["INPUT.MAX_SIZE_TEST", "96", "TEST.DETECTIONS_PER_IMAGE", "20"]
    cfg = load_config(str(ROOT / "configs/digits/retinanet_r18_fp.yaml"), opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a trained head's small box deltas (random ones: exp() of noise)
        model.head.bbox_pred.weight.mul_(0.1)
    info = {"input_format": "BGR", "min_size_test": 64, "max_size_test": 96}
    info |= {"score_threshold": 0.05, "class_names": [str(i) for i in range(10)]}
    path = str(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(80, 120), (96, 64)]]
    export_whole_detector(model, path, torch.from_numpy(pictures[0].transpose(2, 0, 1)), info)

    detector = qdet_runner.Detector(path, threads=1)
    found = [detector(picture) for picture in pictures]
    # Ground truth: every detection above one score over both pictures (so that no other
    # detection outranks one of them in COCO's per-class ranking across pictures).
    cut = np.median(np.concatenate([f["scores"] for f in found]))
    images, annotations = [], []
    for i, (picture, f) in enumerate(zip(pictures, found), start=1):
        cv2.imwrite(str(tmp_path / f"{i}.png"), picture)
        h, w = picture.shape[:2]
        images.append({"id": i, "file_name": f"{i}.png", "height": h, "width": w})
        top = f["scores"] > cut
        for (x0, y0, x1, y1), c in zip(f["boxes"][top], f["classes"][top]):
            box = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(c) + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    assert len(annotations) >= 10
    categories = [{"id": k + 1, "name": str(k)} for k in range(10)]

    def register(name: str, annotations: list) -> str:
        json_file = tmp_path / f"{name}.json"
        json_file.write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories})
        )
        register_coco_instances(name, {}, str(json_file), str(tmp_path))
        return name

    assert file_ap(path, register("qdet_test_demo_exact", annotations)) == 100.0
    moved = [
        dict(a, bbox=[a["bbox"][0] + 30, *a["bbox"][1:]]) if a["image_id"] == 2 else a
        for a in annotations
    ]
    assert file_ap(path, register("qdet_test_demo_moved", moved)) < 80.0
