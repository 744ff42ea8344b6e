"""Datasets: the embedded digits detection/segmentation dataset, registered on import."""

from qdet.data.embedded import (
    DIGITS_CLASSES,
    build_digits_dataset,
    ensure_digits_dataset,
    get_digits_root,
    register_digits_datasets,
)

register_digits_datasets()

__all__ = [
    "DIGITS_CLASSES",
    "build_digits_dataset",
    "ensure_digits_dataset",
    "get_digits_root",
    "register_digits_datasets",
]
