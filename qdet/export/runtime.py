"""Running an exported model in onnxruntime, and checking it against PyTorch.

:class:`OnnxRetinaNet` is a drop-in for the PyTorch detector at inference (same inputs,
same ``Instances`` out): the ONNX graph computes the head outputs and Detectron2's own
RetinaNet post-processing (anchors, top-k, box decoding, NMS, resizing to the original
image) runs on them. So a COCO evaluation of the ONNX model compares the network alone;
the post-processing is shared code.
"""

from __future__ import annotations

import torch
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling.postprocessing import detector_postprocess
from torch import nn

import qdet_runner
from qdet.engine.trained_model import coco_evaluator, yacs_test_loader
from qdet.export.graphs import INPUT_NAME, export_graph


def inference_session(path, threads: int = 0, spinning: bool = True, arena: bool = True):
    """A CPU onnxruntime session of a file (a path or serialised bytes), with the torch-free
    runner's options (:func:`qdet_runner.session_options`: ``threads`` = 0 is
    onnxruntime's default; ``spinning`` False lets idle threads sleep; ``arena`` False
    returns activation memory after each run; quantized MatMuls kept in float32)."""
    import onnxruntime as ort  # optional: the export extra

    options = qdet_runner.session_options(threads, spinning, arena)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_metadata(session) -> dict:
    """qdet's metadata of the file ``session`` runs, decoded (:func:`qdet_runner.read_metadata`)."""
    return qdet_runner.read_metadata(session)


def check_file_fits(model: nn.Module, path: str, session) -> None:
    """The RetinaNet export at ``path`` was made from a model like ``model`` (the config the
    runner builds): same normalisation, channel order, classes, anchors and output
    channels; else an error naming what differs."""
    # The fields as the export writes them (qdet.export.graphs): floats survive JSON exactly.
    found = onnx_metadata(session)
    expected = {
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
        "input_format": getattr(model, "input_format", "BGR"),
        "num_classes": model.num_classes,
        "cell_anchors": [a.tolist() for a in model.anchor_generator.cell_anchors],
    }
    levels = len(model.head_in_features)
    anchors = model.anchor_generator.num_cell_anchors
    channels = [a * model.num_classes for a in anchors] + [a * 4 for a in anchors]
    outputs = [o.shape[1] for o in session.get_outputs()]
    expected["output channels"], found["output channels"] = channels, outputs
    for key, want in expected.items():
        if key in found and found[key] != want:
            raise ValueError(
                f"{path} was exported from another model than this config's: its {key} is "
                f"{found[key]}, the config's {want} ({levels} levels). Export the model again "
                "with tools/export_onnx.py and this --config-file, or give the config it was "
                "exported with"
            )


class OnnxRetinaNet(nn.Module):
    """``model``'s inference with the network run by onnxruntime from ``path``.

    ``model`` supplies preprocessing, anchors and post-processing (it is not run)."""

    def __init__(self, model: nn.Module, path: str, threads: int = 0):
        super().__init__()
        if export_graph(model).kind != "retinanet":
            raise ValueError("OnnxRetinaNet runs RetinaNet exports; this model exports a backbone")
        self.model = model.eval()
        self.session = inference_session(path, threads)
        check_file_fits(model, path, self.session)

    def head_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        outs = self.session.run(None, {INPUT_NAME: images.detach().cpu().numpy()})
        return [torch.from_numpy(o) for o in outs]

    @torch.no_grad()
    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        model = self.model
        images = model.preprocess_image(batched_inputs)
        outs = self.head_outputs(images.tensor)
        levels = len(model.head_in_features)
        logits, deltas = outs[:levels], outs[levels:]
        # The anchor generator reads only the feature maps' sizes; the logits have them.
        results = model.forward_inference(images, logits, (logits, deltas))
        processed = []
        for result, inputs, size in zip(results, batched_inputs, images.image_sizes):
            height, width = inputs.get("height", size[0]), inputs.get("width", size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed


def box_ap(cfg, runner: nn.Module) -> dict:
    """COCO box AP of ``runner`` (a PyTorch model or an :class:`OnnxRetinaNet`) on
    ``cfg.DATASETS.TEST[0]``, with the test loader and COCOEvaluator training uses."""
    dataset = cfg.DATASETS.TEST[0]
    return loader_box_ap(runner, yacs_test_loader(cfg, dataset), coco_evaluator(dataset))


def loader_box_ap(runner: nn.Module, loader, evaluator) -> dict:
    """COCO box AP of ``runner`` on ``loader``'s images by ``evaluator`` (a COCOEvaluator;
    a LazyConfig's ``dataloader.test`` and ``dataloader.evaluator``)."""
    with torch.no_grad():
        return inference_on_dataset(runner, loader, evaluator)["bbox"]
