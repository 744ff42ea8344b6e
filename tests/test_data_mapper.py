"""The training mapper (qdet/data/mapper.py): a box of negative size is dropped as one of
zero size is; Detectron2's own mapper, the negative control, turns it into a valid box."""

from __future__ import annotations

import contextlib
import io
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetMapper
from detectron2.structures import BoxMode

from qdet.config import load_config
from qdet.data.mapper import SizedBoxMapper, has_positive_size
from qdet.engine.cli import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/digits/retinanet_r18_fp.yaml")


def _record(path: str) -> dict:
    boxes = [
        ([10, 10, 20, 20], BoxMode.XYWH_ABS),  # valid: x 10..30, y 10..30
        ([40, 10, -15, 20], BoxMode.XYWH_ABS),  # negative width
        ([5, 5, 0, 10], BoxMode.XYWH_ABS),  # zero width
        ([60, 60, 50, 70], BoxMode.XYXY_ABS),  # x1 < x0
    ]
    annotations = [{"bbox": b, "bbox_mode": m, "category_id": 0, "iscrowd": 0} for b, m in boxes]
    return {"file_name": path, "height": 80, "width": 80, "annotations": annotations}


def test_negative_and_zero_size_boxes_are_dropped(tmp_path):
    path = str(tmp_path / "image.png")
    cv2.imwrite(path, np.zeros((80, 80, 3), np.uint8))
    # No resize: 80 px in, 80 px out, so boxes keep their coordinates.
    cfg = load_config(CONFIG, ["INPUT.MIN_SIZE_TRAIN", "(80,)", "INPUT.MAX_SIZE_TRAIN", "80"])
    cfg.INPUT.RANDOM_FLIP = "none"
    ours = SizedBoxMapper(cfg, True)(_record(path))["instances"]
    assert torch.equal(ours.gt_boxes.tensor, torch.tensor([[10.0, 10.0, 30.0, 30.0]]))
    theirs = DatasetMapper(cfg, True)(_record(path))["instances"]
    assert len(theirs) == 3  # the negative ones flipped into valid boxes, the zero one gone
    assert [has_positive_size(a) for a in _record(path)["annotations"]] == [
        True,
        False,
        False,
        False,
    ]


def test_unreadable_training_image_names_the_file(tmp_path):
    """A deleted image, and one whose bytes are not an image: errors naming the file, in
    the main process and from a DataLoader worker (one line through run_cli)."""
    cfg = load_config(CONFIG, [])
    mapper = SizedBoxMapper(cfg, True)
    missing = str(tmp_path / "deleted.png")
    with pytest.raises(FileNotFoundError, match=r"training image .*deleted.png' cannot be read"):
        mapper(_record(missing))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"corrupt.png' cannot be read \(UnidentifiedImageError"):
        mapper(_record(str(corrupt)))
    loader = torch.utils.data.DataLoader(
        [_record(missing)], batch_size=None, num_workers=1, collate_fn=mapper
    )
    err = io.StringIO()
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(err):
        run_cli(lambda: next(iter(loader)))
    assert stop.value.code == 2
    (line,) = err.getvalue().splitlines()
    assert "error: training image" in line and "deleted.png' cannot be read" in line
