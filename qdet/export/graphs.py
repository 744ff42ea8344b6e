"""What goes into the ONNX file: a detector's network from normalised pixels to its head.

The graph's input is the batch exactly as Detectron2's ``preprocess_image`` makes it
(``(image - PIXEL_MEAN) / PIXEL_STD``, padded with zeros to the backbone's size
divisibility), so both sides see the same tensor and the comparison is exact; the ONNX
file's metadata carries the mean, std, input format and divisibility a deployment needs.

- RetinaNet (``head`` + ``anchor_generator``): outputs are the head's class logits and box
  deltas per FPN level. Anchor decoding, score threshold, top-k and NMS stay in Python:
  Detectron2's own ``forward_inference`` runs on the ONNX outputs
  (:class:`qdet.export.runtime.OnnxRetinaNet`), so the post-processing is the one the
  PyTorch model uses, not a re-implementation.
- Any other Detectron2 model (ViTDet / Swin Mask R-CNN): the backbone (ViT or Swin and its
  feature pyramid), outputs p2... in the backbone's order; RPN and ROI heads stay in
  PyTorch.
"""

from __future__ import annotations

import json
import logging
import os
import warnings

import torch
from torch import nn

from qdet.export.qdq import onnx_export_mode

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OPSET = 17


class BackboneGraph(nn.Module):
    """Normalised padded batch -> the backbone's feature maps, in its output order."""

    kind = "backbone"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def output_names(self) -> list[str]:
        return list(self.model.backbone.output_shape())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model.backbone(images)
        return tuple(features[f] for f in self.output_names)


class RetinaNetGraph(BackboneGraph):
    """Normalised padded batch -> (logits of each level..., box deltas of each level...)."""

    kind = "retinanet"

    @property
    def output_names(self) -> list[str]:
        levels = self.model.head_in_features
        return [f"logits_{f}" for f in levels] + [f"deltas_{f}" for f in levels]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model.backbone(images)
        logits, deltas = self.model.head([features[f] for f in self.model.head_in_features])
        return (*logits, *deltas)


def export_graph(model: nn.Module) -> RetinaNetGraph | BackboneGraph:
    """The part of ``model`` that goes into ONNX (module docstring)."""
    if hasattr(model, "head") and hasattr(model, "anchor_generator"):
        return RetinaNetGraph(model)
    if hasattr(model, "backbone"):
        return BackboneGraph(model)
    raise ValueError(
        f"{type(model).__name__} has no 'backbone': the ONNX export takes Detectron2 "
        "detectors (QuantRetinaNet; QuantMaskRCNN exports its backbone)"
    )


def qdq_metadata(record) -> dict:
    """What the layer-wise check reads of an export's QDQ (:mod:`qdet.export.verify`): each
    activation's grid and each quantized weight, in graph order."""
    return {
        "qdq_activations": [grid.as_dict() for grid in record.activations],
        "qdq_weights": [
            {"path": g.path, "bits": g.bits, "offset": g.offset is not None} for g in record.weights
        ],
    }


def integer_metadata(record) -> dict:
    """What the check of an integer export reads (:mod:`qdet.export.integer_check`): the
    quantized conv, Linear and attention matmul calls that must each be one integer op, and each
    QuantizeLinear's grid in graph order."""
    return {
        "integer_convs": record.integer.convs,
        "integer_linears": record.integer.linears,
        "integer_matmuls": record.integer.matmuls,
        "integer_activations": [
            {
                "path": a["path"],
                "requantize": a.get("requantize", False),
                **{k: getattr(a["grid"], k) for k in ("q_step", "dq_step", "zero_point", "n")},
            }
            for a in record.integer.activations
        ],
    }


def _metadata(model: nn.Module, graph, record, dynamic: bool) -> dict[str, str]:
    meta = {
        "producer": "qdet",
        "graph": graph.kind,
        "input": f"{INPUT_NAME}: (N, 3, H, W) float32, (image - pixel_mean) / pixel_std, "
        "zero-padded to size_divisibility",
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
        "input_format": getattr(model, "input_format", "BGR"),
        "size_divisibility": model.backbone.size_divisibility,
        "outputs": graph.output_names,
        "quantizers": record.quantizers,
        "dynamic_shapes": dynamic,
        # In graph order, for the layer-wise check (qdet.export.verify).
        **qdq_metadata(record),
    }
    if graph.kind == "retinanet":
        meta["num_classes"] = model.num_classes
        # The anchors the outputs are read against: a runner checks its config's are these.
        meta["cell_anchors"] = [a.tolist() for a in model.anchor_generator.cell_anchors]
    if record.target:  # the integer graph (qdet.quantization.integer_ops): what the check counts
        meta["target"] = record.target
        meta.update(integer_metadata(record))
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


PROTOBUF_LIMIT = 2**31  # bytes: a larger model keeps its tensors in an external data file


def constants_as_initializers(proto) -> int:
    """Every tensor a ``Constant`` node holds (the QDQ stand-ins' weights, integers, steps
    and offsets) moved into the graph's initializers, where ONNX tools expect weights;
    returns how many. Names are kept, so every reference still holds."""
    moved = []
    for node in proto.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].t.dims:
            tensor = node.attribute[0].t
            tensor.name = node.output[0]
            proto.graph.initializer.append(tensor)
            moved.append(node)
    for node in moved:
        proto.graph.node.remove(node)
    return len(moved)


def save_model(proto, path: str, final_path: str | None = None) -> None:
    """``onnx.save`` to ``path``, checked first; a model that would pass protobuf's 2 GB
    (ViT-H sizes) keeps its tensors in ``<final_path>.data`` beside it (``final_path``: the
    name ``path`` is renamed to afterwards, default ``path``)."""
    import onnx  # optional: the export extra

    large = proto.ByteSize() >= PROTOBUF_LIMIT
    if large:
        onnx.checker.check_model(proto, full_check=False)  # (in memory: no size limit)
        onnx.save(
            proto,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=os.path.basename(final_path or path) + ".data",
        )
        return
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def export_onnx(
    model: nn.Module,
    path: str,
    sample: torch.Tensor,
    dynamic: bool | None = None,
    opset: int = OPSET,
) -> dict:
    """Write ``model`` (eval mode, quantizers calibrated) to ``path`` as ONNX with QDQ.

    ``sample``: a normalised padded batch to trace with. ``dynamic``: batch, height and
    width as dynamic axes (default: yes for RetinaNet; a ViT's window partition and
    position embeddings are traced for the sample's size). A model without quantizers is
    written as FP32, with a warning. Returns the graph kind, output names and the number
    of quantizers exported.
    """
    import onnx  # optional: the export extra

    graph = export_graph(model).eval()
    if dynamic is None:
        dynamic = graph.kind == "retinanet"
    names = graph.output_names
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}} if dynamic else None
    if axes:
        axes.update({n: {0: "batch", 2: f"height_{n}", 3: f"width_{n}"} for n in names})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with onnx_export_mode(model) as record, torch.no_grad(), warnings.catch_warnings():
        if record.quantizers == 0:
            logger.warning("%s has no quantized layers: exporting it as FP32", type(model).__name__)
        # The TorchScript exporter: qdet's QDQ stand-ins are autograd Functions with an
        # ONNX symbolic, which it maps one to one. It warns that it is deprecated, and
        # about Python ints in shape arithmetic (Detectron2's padding), traced as intended.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (sample,),
            tmp,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    proto = onnx.load(tmp)
    constants_as_initializers(proto)
    meta = _metadata(model, graph, record, dynamic)
    meta.update(opset=str(opset), ir_version=str(proto.ir_version))
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    save_model(proto, tmp, path)
    os.replace(tmp, path)  # never a half-written model under the final name
    return {"graph": graph.kind, "outputs": names, "quantizers": record.quantizers, "path": path}
