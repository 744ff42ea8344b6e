"""Classification data: the embedded 32x32 digit crops and real CIFAR-10/100.

The crops are the detection set's digits on its textures (:mod:`qdet.data.embedded`), one
digit per 32x32 image, 10 classes. Train and val draw from the same disjoint pools of
scikit-learn digit samples as the detection set, so no val digit appears in any training
image of either. Built deterministically on first use into ``$QDET_DATASETS/digits32_v1``
as one ``.npz`` per split (uint8 images, labels, digit samples; loaded without pickle), in
a temporary file renamed into place. CIFAR comes from torchvision's dataset classes reading
a local root (``DATASETS.CIFAR_ROOT``); nothing is downloaded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from qdet.data.embedded import DIGITS_CLASSES, digit_pools, get_digits_root, texture

VERSION = "digits32_v1"
SPLITS = {"train": 20000, "val": 2000}  # images per split
_SPLIT_SEEDS = {"train": 11, "val": 12}
SIZE = 32
DIGIT_SIZE = (16, 28)  # side of the digit, px
CIFAR = {  # dataset name -> (torchvision class, train split, folder torchvision reads)
    "cifar10_train": ("CIFAR10", True, "cifar-10-batches-py"),
    "cifar10_test": ("CIFAR10", False, "cifar-10-batches-py"),
    "cifar100_train": ("CIFAR100", True, "cifar-100-python"),
    "cifar100_test": ("CIFAR100", False, "cifar-100-python"),
}


def get_crops_root() -> Path:
    """``$QDET_DATASETS/digits32_v1`` (or the user cache), beside the detection set."""
    return get_digits_root().parent / VERSION


def render_crop(rng: np.random.Generator, pool, images, targets) -> tuple[np.ndarray, int, int]:
    """One 32x32 RGB crop (uint8), its class and its digit sample."""
    canvas = texture(rng, SIZE, SIZE)
    size = int(rng.integers(DIGIT_SIZE[0], DIGIT_SIZE[1] + 1))
    x0, y0 = (int(v) for v in rng.integers(0, SIZE - size + 1, size=2))
    sample = int(rng.choice(pool))
    digit = Image.fromarray((images[sample] * (255 / 16)).astype(np.uint8))
    alpha = np.asarray(digit.resize((size, size), Image.BILINEAR), dtype=float)[..., None] / 255
    region = canvas[y0 : y0 + size, x0 : x0 + size]
    # Dark ink on a light background and the reverse, as in the detection set.
    ink = rng.uniform(0, 0.3, 3) if region.mean() > 0.5 else rng.uniform(0.7, 1.0, 3)
    canvas[y0 : y0 + size, x0 : x0 + size] = region * (1 - alpha) + ink * alpha
    return (canvas * 255).round().astype(np.uint8), int(targets[sample]), sample


def build_digit_crops(root: str | Path, splits: dict[str, int] | None = None) -> Path:
    """Write ``root/<split>.npz`` for each split that is missing; returns ``root``."""
    root = Path(root)
    pools, images, targets = digit_pools()
    for split, count in (splits or SPLITS).items():
        path = root / f"{split}.npz"
        if path.is_file():
            continue
        crops = [
            render_crop(
                np.random.default_rng([_SPLIT_SEEDS[split], i]), pools[split], images, targets
            )
            for i in range(count)
        ]
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{split}-", suffix=".npz", dir=root)
        except OSError as e:
            raise RuntimeError(
                f"cannot write the embedded crops under {root} ({e}): set QDET_DATASETS to a "
                "writable folder"
            ) from e
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    images=np.stack([c[0] for c in crops]),
                    labels=np.array([c[1] for c in crops], dtype=np.int64),
                    digit_samples=np.array([c[2] for c in crops], dtype=np.int64),
                )
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return root


def load_digit_crops(split: str) -> list[dict]:
    """The crops of ``split`` as Detectron2 dataset dicts (built on first use)."""
    root = build_digit_crops(get_crops_root())
    with np.load(root / f"{split}.npz", allow_pickle=False) as data:
        images, labels, samples = data["images"], data["labels"], data["digit_samples"]
    return [
        {
            "image_id": i,
            "image": images[i],
            "label": int(labels[i]),
            "digit_sample": int(samples[i]),
        }
        for i in range(len(labels))
    ]


def register_digit_crops() -> None:
    """Register ``qdet_digits32_train`` / ``qdet_digits32_val`` (lazily built)."""
    for split in SPLITS:
        name = f"qdet_digits32_{split}"
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda split=split: load_digit_crops(split))
        MetadataCatalog.get(name).set(thing_classes=DIGITS_CLASSES, evaluator_type="top1")


def cifar_names(cfg: CfgNode) -> list[str]:
    return [n for n in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST) if n in CIFAR]


def register_cifar(cfg: CfgNode) -> None:
    """(Re-)register the CIFAR datasets the config names, read from ``DATASETS.CIFAR_ROOT``
    by torchvision; a missing root is an error that names the key and the layout."""
    root = cfg.DATASETS.CIFAR_ROOT
    for name in cifar_names(cfg):
        cls_name, train, folder = CIFAR[name]
        if not root or not os.path.isdir(os.path.join(root, folder)):
            raise FileNotFoundError(
                f"dataset {name!r} needs DATASETS.CIFAR_ROOT, the folder holding {folder}/ "
                f"(torchvision's layout, as CIFAR10(root, download=True) leaves it); it is "
                f"{root!r}. These machines do not download it: copy it there first."
            )

        def load(cls_name=cls_name, train=train):
            import torchvision

            data = getattr(torchvision.datasets, cls_name)(root, train=train, download=False)
            return [
                {"image_id": i, "image": image, "label": int(label)}
                for i, (image, label) in enumerate(zip(data.data, data.targets))
            ]

        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        DatasetCatalog.register(name, load)
        classes = 10 if cls_name == "CIFAR10" else 100
        MetadataCatalog.get(name).set(num_classes=classes, evaluator_type="top1")


class ClassificationMapper:
    """A dataset dict -> {"image": 3 x H x W float tensor (0-255, RGB), "label"}. Training
    pads by ``padding`` (zeros) and crops back at a random place, drawing from NumPy's
    global generator (seeded per sample by qdet's ``SeededMapper``); no flip: digits are
    not mirror-symmetric (CIFAR configs turn it on with INPUT.RANDOM_FLIP)."""

    def __init__(self, is_train: bool, padding: int = 4, flip: bool = False):
        self.is_train, self.padding, self.flip = is_train, padding, flip

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool) -> ClassificationMapper:
        return cls(is_train, cfg.INPUT.CROP_PADDING, cfg.INPUT.RANDOM_FLIP == "horizontal")

    def __call__(self, dataset_dict: dict) -> dict:
        image = torch.as_tensor(np.ascontiguousarray(dataset_dict["image"])).permute(2, 0, 1)
        if self.is_train and self.padding:
            h, w = image.shape[1:]
            p = self.padding
            padded = torch.nn.functional.pad(image, (p, p, p, p))
            y, x = np.random.randint(0, 2 * p + 1, size=2)
            image = padded[:, y : y + h, x : x + w]
        if self.is_train and self.flip and np.random.rand() < 0.5:
            image = image.flip(-1)
        return {"image": image.float(), "label": dataset_dict["label"]}
