"""The embedded dataset: real handwritten digits pasted on textured canvases.

scikit-learn ships the UCI handwritten digits (1797 8x8 images, 10 classes, no download).
Each image here is a 128-192 px canvas (gradients, noise, stripes, checkers, blobs) with
2-8 digits (5 on average) scaled to 20-48 px, tinted against their background and
overlapping little (box IoU <= 0.1); each digit is an instance with a box and a mask (its
pixels, cut where a later digit covers it). Train and val use disjoint digit samples
(each annotation names its sample: ``digit_sample``). The COCO json stores masks as RLE:
train Mask R-CNN on it with ``INPUT.MASK_FORMAT bitmask``.

``digits_v2`` (4000 train, 300 val images) replaces v1 (400 and 100 images, 1-5 larger
digits each): on v1 a RetinaNet trained from scratch memorised its 400 training images
(about 10 val AP); on v2 it generalises (docs/getting_started.md, "Embedded dataset"). It is built
deterministically on first use into ``$QDET_DATASETS/digits_v2`` (default
``~/.cache/qdet/datasets``; the version in the folder name keeps an old build from being
taken for this one), in a temporary folder renamed into place at the end, so an
interrupted build never leaves half a dataset and two concurrent builds do not clash.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image
from pycocotools import mask as mask_util

DIGITS_CLASSES = [str(i) for i in range(10)]
VERSION = "digits_v2"
SPLITS = {"train": 4000, "val": 300}  # images per split
_SPLIT_SEEDS = {"train": 1, "val": 2}
_VAL_SAMPLE_FRACTION = 0.25  # share of sklearn's 1797 digit samples reserved for val
CANVAS = (128, 192)  # image height and width drawn from [128, 192]
DIGITS_PER_IMAGE = (2, 8)  # attempted per image (a digit that finds no free spot is skipped)
DIGIT_SIZE = (20, 48)  # side of a pasted digit, px
MAX_IOU = 0.1  # boxes of one image overlap at most this much
IMAGES_PER_JOB = 100  # fewer images than this a process: built in this one


def get_digits_root() -> Path:
    """Where the dataset lives: ``$QDET_DATASETS/digits_v2`` or the user cache."""
    base = os.environ.get("QDET_DATASETS")
    if not base:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        base = Path(cache) / "qdet" / "datasets"
    return Path(base) / VERSION


def digit_pools() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """({"train", "val"} -> sorted indices into sklearn's digits, disjoint), images (8x8,
    0-16), labels. The classification crops share the split, so their val digits are
    never seen in any training image either."""
    # sklearn only when the dataset is first built (its import is slow)
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    n_val = int(len(order) * _VAL_SAMPLE_FRACTION)
    pools = {"val": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}
    return pools, digits.images, digits.target


def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random RGB background in [0, 1]: two colours mixed by a random pattern, plus noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient
        angle = rng.uniform(0, np.pi)
        pattern = (np.cos(angle) * xx + np.sin(angle) * yy) % 1.0
    elif kind == 1:  # stripes
        freq, angle = rng.uniform(4, 14), rng.uniform(0, np.pi)
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    elif kind == 2:  # checkerboard
        cells = rng.integers(4, 12)
        pattern = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(float)
    else:  # smooth blobs: upsampled noise
        coarse = rng.random((5, 5))
        pattern = (
            np.asarray(
                Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                dtype=float,
            )
            / 255
        )
    c0, c1 = rng.random(3), rng.random(3)
    img = c0 + (c1 - c0) * pattern[..., None] * rng.uniform(0.2, 0.6)
    return np.clip(img + rng.normal(0, 0.04, img.shape), 0, 1)


def _iou(a: tuple, b: tuple) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def _render(rng, pool, images, targets):
    """One canvas and its instances: (uint8 HxWx3, [(category, bool mask, digit sample)])."""
    h, w = (int(v) for v in rng.integers(CANVAS[0], CANVAS[1] + 1, size=2))
    canvas = texture(rng, h, w)
    placed, instances = [], []
    for _ in range(rng.integers(DIGITS_PER_IMAGE[0], DIGITS_PER_IMAGE[1] + 1)):
        size = int(rng.integers(DIGIT_SIZE[0], DIGIT_SIZE[1] + 1))
        for _try in range(20):
            x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
            box = (x0, y0, x0 + size, y0 + size)
            if all(_iou(box, other) <= MAX_IOU for other in placed):
                break
        else:
            continue
        sample = int(rng.choice(pool))
        digit = Image.fromarray((images[sample] * (255 / 16)).astype(np.uint8))
        alpha = np.asarray(digit.resize((size, size), Image.BILINEAR), dtype=float) / 255
        # Tint for contrast: dark ink on light background and the reverse.
        local = canvas[y0 : y0 + size, x0 : x0 + size].mean()
        ink = rng.uniform(0, 0.3, 3) if local > 0.5 else rng.uniform(0.7, 1.0, 3)
        region = canvas[y0 : y0 + size, x0 : x0 + size]
        canvas[y0 : y0 + size, x0 : x0 + size] = (
            region * (1 - alpha[..., None]) + ink * alpha[..., None]
        )
        mask = np.zeros((h, w), dtype=bool)
        mask[y0 : y0 + size, x0 : x0 + size] = alpha > 0.35
        for _, earlier, _ in instances:  # the new digit covers the ones below it
            earlier &= ~mask
        placed.append(box)
        instances.append((int(targets[sample]), mask, sample))
    instances = [(c, m, k) for c, m, k in instances if m.sum() >= 16]
    return (canvas * 255).round().astype(np.uint8), instances


def _build_image(out: Path, split: str, image_id: int, pool, images, targets) -> tuple:
    """Render image ``image_id`` of ``split`` (its own seed: the split's and its id), write
    its PNG; return its COCO image record and its annotations (ids assigned later)."""
    rng = np.random.default_rng([_SPLIT_SEEDS[split], image_id])
    pixels, instances = _render(rng, pool, images, targets)
    file_name = f"{image_id:05d}.png"
    # Level 1: the noisy textures barely compress, and level 6 took 40% of the build.
    Image.fromarray(pixels).save(out / split / file_name, compress_level=1)
    h, w = pixels.shape[:2]
    annotations = []
    for category, mask, sample in instances:
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append(
            {
                "image_id": image_id,
                "category_id": category + 1,
                "iscrowd": 0,
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "area": float(mask_util.area(rle)),
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                # Which of sklearn's 1797 digit images this is (train and val disjoint).
                "digit_sample": sample,
            }
        )
    return {"id": image_id, "file_name": file_name, "height": h, "width": w}, annotations


def _build_chunk(args: tuple) -> list[tuple]:
    out, split, ids, pool, images, targets = args
    return [_build_image(out, split, i, pool, images, targets) for i in ids]


def _build_split(out: Path, split: str, count: int, pool, images, targets) -> dict:
    """The split's images, rendered in as many processes as there are cores (each image
    has its own seed, so the split is the same however it is cut), and its COCO json."""
    (out / split).mkdir(parents=True)
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(DIGITS_CLASSES)],
    }
    jobs = min(os.cpu_count() or 1, max(count // IMAGES_PER_JOB, 1))
    ids = list(range(1, count + 1))
    chunks = [(out, split, ids[k::jobs], pool, images, targets) for k in range(jobs)]
    if jobs > 1 and "fork" in multiprocessing.get_all_start_methods():
        # fork: the workers share the digit pools and need no imports.
        with multiprocessing.get_context("fork").Pool(jobs) as workers:
            done = [r for chunk in workers.map(_build_chunk, chunks) for r in chunk]
    else:
        done = [r for chunk in map(_build_chunk, chunks) for r in chunk]
    for image, found in sorted(done, key=lambda r: r[0]["id"]):
        coco["images"].append(image)
        for annotation in found:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, **annotation})
    return coco


def build_digits_dataset(root: str | Path, splits: dict[str, int] | None = None) -> Path:
    """Build the dataset into ``root`` unless it is there; returns ``root``.

    ``splits`` maps split name ("train", "val") to its number of images.
    """
    root = Path(root)
    if (root / "annotations").is_dir():
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    except OSError as e:
        raise RuntimeError(
            f"cannot create the embedded dataset under {root.parent} ({e}): set QDET_DATASETS "
            "to a writable folder"
        ) from e
    try:
        pools, images, targets = digit_pools()
        (tmp / "annotations").mkdir()
        for split, count in (splits or SPLITS).items():
            coco = _build_split(tmp, split, count, pools[split], images, targets)
            with open(tmp / "annotations" / f"{split}.json", "w") as f:
                json.dump(coco, f)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "annotations").is_dir():  # not a concurrent build: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_digits_dataset() -> dict[str, tuple[str, str]]:
    """Build if needed; split -> (json_file, image_root)."""
    root = build_digits_dataset(get_digits_root())
    return {s: (str(root / "annotations" / f"{s}.json"), str(root / s)) for s in SPLITS}


def register_digits_datasets() -> None:
    """Register ``qdet_digits_train`` / ``qdet_digits_val`` (lazily built) with Detectron2."""
    root = get_digits_root()
    for split in SPLITS:
        name = f"qdet_digits_{split}"
        if name in DatasetCatalog.list():
            continue

        def load(split=split, name=name):
            json_file, image_root = ensure_digits_dataset()[split]
            return load_coco_json(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=str(root / "annotations" / f"{split}.json"),
            image_root=str(root / split),
            evaluator_type="coco",
            thing_classes=DIGITS_CLASSES,
        )
