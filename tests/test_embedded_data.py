"""The embedded digits dataset: deterministic, valid COCO, registered with Detectron2."""

import hashlib
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from qdet.data import embedded

SMALL = {"train": 12, "val": 6}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return embedded.build_digits_dataset(tmp_path_factory.mktemp("a") / "digits_v2", SMALL)


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_build_is_deterministic(small_dataset, tmp_path, monkeypatch):
    # Built again, cut into per-core processes this time: the same bytes.
    monkeypatch.setattr(embedded, "IMAGES_PER_JOB", 2)
    monkeypatch.setattr(embedded.os, "cpu_count", lambda: 3)
    again = embedded.build_digits_dataset(tmp_path / "digits_v2", SMALL)
    assert _digest(again) == _digest(small_dataset)
    # A second call finds the dataset and does not rebuild it.
    mtime = (again / "annotations" / "train.json").stat().st_mtime_ns
    embedded.build_digits_dataset(again, SMALL)
    assert (again / "annotations" / "train.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("split", ["train", "val"])
def test_annotations_are_valid_coco(small_dataset, split):
    from PIL import Image

    coco = COCO(str(small_dataset / "annotations" / f"{split}.json"))
    assert sorted(coco.getCatIds()) == list(range(1, 11))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == embedded.DIGITS_CLASSES
    assert len(coco.getImgIds()) == SMALL[split]
    assert len(coco.getAnnIds()) >= SMALL[split]  # at least one digit per image on average
    for img in coco.loadImgs(coco.getImgIds()):
        with Image.open(small_dataset / split / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"])
            assert 128 <= im.size[0] <= 192 and 128 <= im.size[1] <= 192
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            mask = coco.annToMask(ann).astype(bool)
            assert mask.shape == (img["height"], img["width"])
            ys, xs = np.nonzero(mask)
            x0, y0, w, h = ann["bbox"]
            assert (x0, y0, w, h) == (
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            )
            assert ann["area"] == mask.sum() >= 16
            assert x0 + w <= img["width"] and y0 + h <= img["height"]


def test_masks_of_one_image_do_not_overlap(small_dataset):
    data = json.loads((small_dataset / "annotations" / "train.json").read_text())
    by_image = {}
    for ann in data["annotations"]:
        seg = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        by_image.setdefault(ann["image_id"], []).append(mask_util.decode(seg))
    for masks in by_image.values():
        assert np.stack(masks).sum(0).max() == 1  # a later digit cuts the ones below it


def test_train_and_val_use_disjoint_digit_samples(small_dataset):
    from sklearn.datasets import load_digits

    pools, images, targets = embedded.digit_pools()
    assert not set(pools["train"]) & set(pools["val"])
    assert len(pools["train"]) + len(pools["val"]) == len(targets) == len(images) == 1797
    # In the built images: every annotation names its sample, of its own class and pool.
    used, labels = {}, load_digits().target
    for split in ("train", "val"):
        data = json.loads((small_dataset / "annotations" / f"{split}.json").read_text())
        used[split] = {a["digit_sample"] for a in data["annotations"]}
        assert used[split] <= set(pools[split].tolist())
        for a in data["annotations"]:
            assert labels[a["digit_sample"]] == a["category_id"] - 1
    assert used["train"] and used["val"] and not used["train"] & used["val"]


def test_unwritable_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RuntimeError, match="set QDET_DATASETS"):
        embedded.build_digits_dataset(blocker / "sub" / "digits_v2", SMALL)


def test_registered_in_detectron2(small_dataset, monkeypatch):
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog

    monkeypatch.setattr(embedded, "get_digits_root", lambda: small_dataset)
    assert {"qdet_digits_train", "qdet_digits_val"} <= set(DatasetCatalog.list())
    meta = MetadataCatalog.get("qdet_digits_val")
    assert meta.thing_classes == embedded.DIGITS_CLASSES and meta.evaluator_type == "coco"
    records = DatasetCatalog.get("qdet_digits_val")
    assert len(records) == SMALL["val"]
    cats = {a["category_id"] for r in records for a in r["annotations"]}
    assert cats <= set(range(10))
    assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(10)}
    # Detectron2's mapper turns a record into Instances with bitmasks of the image's size.
    cfg = get_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MASK_FORMAT = "bitmask"
    mapped = DatasetMapper(cfg, is_train=True)(dict(records[0]))
    inst = mapped["instances"]
    assert len(inst) == len(records[0]["annotations"])
    assert tuple(inst.gt_masks.tensor.shape[1:]) == tuple(mapped["image"].shape[1:])
    assert inst.gt_masks.tensor.dtype == torch.bool


def test_the_version_is_in_the_path_so_an_old_build_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("QDET_DATASETS", str(tmp_path))
    (tmp_path / "digits_v1" / "annotations").mkdir(parents=True)  # a v1 cache
    assert embedded.get_digits_root() == tmp_path / "digits_v2"
    assert embedded.SPLITS == {"train": 4000, "val": 300}
