"""Pictures of what a model detects: the inputs ``tools/predict.py`` reads
(:mod:`qdet.predict.inputs`) and the panels, side-by-side sheets and the demo's and
study's pictures drawn with Detectron2's Visualizer (:mod:`qdet.predict.panels`)."""

from qdet.predict.inputs import list_images, output_names, read_image, split_config_overrides
from qdet.predict.panels import (
    PanelModel,
    build_panel_model,
    check_onnx_file,
    comparison_sheet,
    draw_detections,
    model_title,
    panel_model,
    side_by_side,
    write_study_sheet,
    write_val_sheet,
)

__all__ = [
    "PanelModel",
    "build_panel_model",
    "check_onnx_file",
    "comparison_sheet",
    "draw_detections",
    "list_images",
    "model_title",
    "output_names",
    "panel_model",
    "read_image",
    "side_by_side",
    "split_config_overrides",
    "write_study_sheet",
    "write_val_sheet",
]
