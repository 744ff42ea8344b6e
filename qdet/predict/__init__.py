"""Pictures of what a model detects: the inputs ``tools/predict.py`` reads
(:mod:`qdet.predict.inputs`), panels side by side drawn with Detectron2's Visualizer
(:mod:`qdet.predict.panels`), and the demo's and the study's sheets, drawn at a threshold
and on images chosen from the val split's evaluation (:mod:`qdet.predict.sheets`,
:mod:`qdet.predict.sheet_choice`)."""

from qdet.predict.inputs import (
    list_images,
    output_names,
    output_paths,
    predictor_batches,
    read_image,
    split_config_overrides,
)
from qdet.predict.panels import (
    PanelModel,
    build_panel_model,
    check_onnx_file,
    draw_detections,
    model_title,
    panel_model,
    side_by_side,
)
from qdet.predict.sheets import Sheet, write_study_sheet

__all__ = [
    "PanelModel",
    "Sheet",
    "build_panel_model",
    "check_onnx_file",
    "draw_detections",
    "list_images",
    "model_title",
    "output_names",
    "output_paths",
    "predictor_batches",
    "panel_model",
    "read_image",
    "side_by_side",
    "split_config_overrides",
    "write_study_sheet",
]
