"""The training mapper: Detectron2's ``DatasetMapper``, except that a box of negative size
is dropped as one of zero size is, and an image that cannot be read is an error naming it.

Detectron2 converts a box to corners and lets each transform take the corners' min and max,
so ``[x, y, -w, h]`` (or ``x1 < x0``) turns into a valid box around other pixels; its
``filter_empty_instances`` then only drops boxes of zero area. Here such an annotation is
left out before the transforms, with the zero-size ones.
"""

from __future__ import annotations

from detectron2.data import DatasetMapper
from detectron2.structures import BoxMode


def has_positive_size(annotation: dict) -> bool:
    """Whether an annotation's box (any ``bbox_mode``) has positive width and height."""
    x0, y0, x1, y1 = BoxMode.convert(
        list(annotation["bbox"]), annotation["bbox_mode"], BoxMode.XYXY_ABS
    )
    return x1 > x0 and y1 > y0


class SizedBoxMapper(DatasetMapper):
    """``DatasetMapper`` whose annotations with a box of zero or negative size are dropped
    before the transforms (module docstring)."""

    def __call__(self, dataset_dict: dict) -> dict:
        try:
            return super().__call__(dataset_dict)
        except OSError as e:  # a missing file; PIL's unreadable or truncated image
            name = dataset_dict.get("file_name", "?")
            detail = " ".join(str(e).split())[:160]
            message = (
                f"training image {name!r} cannot be read ({type(e).__name__}: {detail}): "
                "restore the file, or leave it out of the dataset (qdet's embedded digits "
                "data: delete its folder and it is made again)"
            )
            if isinstance(e, FileNotFoundError):
                raise FileNotFoundError(message) from e
            raise ValueError(message) from e

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        dataset_dict["annotations"] = [
            a for a in dataset_dict["annotations"] if has_positive_size(a)
        ]
        super()._transform_annotations(dataset_dict, transforms, image_shape)
