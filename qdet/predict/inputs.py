"""What ``tools/predict.py`` and ``tools/inspect_quantizers.py`` read: image files and
folders, the config overrides argparse mixes into ``--input``, and images as the
predictor's batches."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Sequence

import cv2
import detectron2.data.transforms as T
import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(inputs: Sequence[str]) -> list[str]:
    """Image files from ``inputs``: files, folders (their images, sorted) and glob patterns.

    A path that does not exist, a folder without images and a pattern that matches nothing
    are errors that name the input."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f)
                for f in os.listdir(item)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise FileNotFoundError(
                    f"--input {item!r} is a folder without images ({', '.join(IMAGE_EXTENSIONS)})"
                )
            files += found
        elif os.path.isfile(item):
            files.append(item)
        elif glob.has_magic(item):
            found = sorted(f for f in glob.glob(item) if os.path.isfile(f))
            if not found:
                raise FileNotFoundError(f"--input {item!r} matches no file")
            files += found
        else:
            raise FileNotFoundError(f"--input {item!r}: no such file or folder")
    if not files:
        raise ValueError("no input images: give --input files, folders or glob patterns")
    return files


def split_config_overrides(inputs: list[str], opts: list[str]) -> tuple[list[str], list[str]]:
    """``--input a.jpg MODEL.WEIGHTS m.pth``: argparse hands the overrides to ``--input``;
    give back the inputs before the first config key (yacs ``A.B`` in capitals, or a
    LazyConfig ``a.b=value``; not a file) and the overrides from there on."""
    yacs_key = r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+"
    lazy_override = r"\+?[A-Za-z_][\w]*(\.[\w]+)+=.*"
    for i, item in enumerate(inputs):
        key = re.fullmatch(yacs_key, item) or re.fullmatch(lazy_override, item)
        if key and not os.path.exists(item):
            return inputs[:i], [*inputs[i:], *opts]
    return inputs, opts


def read_image(path: str) -> np.ndarray:
    """The image at ``path`` as BGR uint8 (opencv), or an error naming the file."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read {path!r} as an image (opencv could not decode it)")
    return image


def output_names(files: Sequence[str]) -> list[str]:
    """One output file name per input: its base name, prefixed by its folder's name where
    two inputs share a base name."""
    names = [os.path.basename(f) for f in files]
    clashes = {n for n in names if names.count(n) > 1}
    return [
        f"{os.path.basename(os.path.dirname(os.path.abspath(f)))}_{n}" if n in clashes else n
        for f, n in zip(files, names)
    ]


def output_paths(files: Sequence[str], folder: str) -> list[str]:
    """Where each picture of ``files`` is drawn: ``folder`` / its output name
    (:func:`output_names`). A path that is one of the inputs is refused: drawing would
    overwrite the picture it draws."""
    paths = [os.path.join(folder, name) for name in output_names(files)]
    inputs = {os.path.abspath(f) for f in files}
    clashes = [p for p in paths if os.path.abspath(p) in inputs]
    if clashes:
        raise ValueError(
            f"--output {folder!r} would overwrite input picture {clashes[0]!r} (and "
            f"{len(clashes) - 1} more) with its drawing: choose another --output folder"
        )
    return paths


def predictor_batches(cfg, files: Sequence[str]) -> Iterator[list[dict]]:
    """Each image of ``files`` as a batch of one, in the config's ``INPUT.FORMAT``, resized
    as Detectron2's predictor resizes it (``ResizeShortestEdge`` to ``MIN_SIZE_TEST``)."""
    resize = T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )
    for path in files:
        image = read_image(path)  # BGR
        if cfg.INPUT.FORMAT == "RGB":
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        resized = resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        yield [{"image": tensor, "height": height, "width": width}]
