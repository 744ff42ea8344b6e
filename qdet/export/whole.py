"""The whole detector in one ONNX file: Detectron2's own inference, traced by Detectron2's
``TracingAdapter``, with qdet's quantized layers inside in the form they export in
(:mod:`qdet.export.qdq`: QDQ on the exact grids, or the integer form under a target).

The file's interface is Detectron2's tracing export's (upstream ``tests/test_export_onnx.py``,
``tools/deploy/export_model.py --export-method tracing``):

- input ``image``: one (3, H, W) float32 picture in the config's ``INPUT.FORMAT``, already
  resized as the test-time ``ResizeShortestEdge`` resizes it; H and W are dynamic;
- outputs ``pred_boxes`` (N, 4) XYXY in the input's pixels, ``pred_classes`` (N,),
  ``scores`` (N,), for mask models ``pred_masks`` (N, 1, 28, 28) probabilities
  (R-CNNs: ``inference(..., do_postprocess=False)``), and ``image_size`` (2,).

Everything between (normalisation, padding, backbone, heads, anchors, box decoding, score
threshold, top-k, NMS, RPN, ROIAlign, box and mask heads) is the model's own code. What
turns those outputs into instances of the original picture (box scaling, mask pasting) is
the runner's (``qdet_runner``, torch-free). The metadata says what a runner needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings

import torch
from detectron2.export import TracingAdapter
from torch import nn

from qdet.export.graphs import (
    OPSET,
    constants_as_initializers,
    integer_metadata,
    qdq_metadata,
    save_model,
)
from qdet.export.qdq import onnx_export_mode
from qdet_runner import TEXT_METADATA

logger = logging.getLogger(__name__)

WHOLE_INPUT = "image"
BOX_OUTPUTS = ("pred_boxes", "pred_classes", "scores")
SIZE_OUTPUT = "image_size"
FORMAT = "qdet-detector-1"  # metadata "graph" of a whole file


def detector_inference(model: nn.Module):
    """The function the tracer follows: one picture in, Detectron2's ``Instances`` out,
    in the input's pixels (RetinaNet: ``forward`` without a target size; R-CNNs:
    ``inference(..., do_postprocess=False)``, masks 28 x 28)."""
    if hasattr(model, "roi_heads"):

        def inference(model, inputs):
            return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]

    elif hasattr(model, "head") and hasattr(model, "anchor_generator"):

        def inference(model, inputs):
            return [{"instances": model(inputs)[0]["instances"]}]

    else:
        raise ValueError(
            f"{type(model).__name__} is neither a one-stage detector (head and anchors) nor "
            "an R-CNN (roi_heads): the whole-detector export takes Detectron2's detectors; "
            "--network-only exports its backbone"
        )
    return inference


def export_whole_detector(
    model: nn.Module, path: str, image: torch.Tensor, info: dict, opset: int = OPSET
) -> dict:
    """Write ``model``'s whole inference to ``path`` (module docstring). ``image``: a
    (3, H, W) float picture, resized as the test set's, to trace with. ``info``: what a
    runner needs beside the graph (input format, test resize, score threshold, class
    names, bits, target; :func:`qdet.engine.trained_model.deployment_info`), written to
    the metadata with the opset and IR version. Returns the output names, the number of
    quantizers exported and the path."""
    import onnx  # optional: the export extra

    model.eval()
    image = image.float()  # the file's input is float32, whatever the loader gave (uint8)
    adapter = TracingAdapter(model, [{"image": image}], detector_inference(model)).eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with torch.no_grad():  # once, outside the export's recording: the outputs' schema
        adapter(*adapter.flattened_inputs)
    names = _flat_output_names(adapter.outputs_schema)
    with (
        onnx_export_mode(model) as record,
        torch.no_grad(),
        warnings.catch_warnings(),
        _naming_what_cannot_export(model, adapter, opset),
    ):
        if record.quantizers == 0:
            logger.warning("%s has no quantized layers: exporting it as FP32", type(model).__name__)
        # The TorchScript exporter (qdet's QDQ stand-ins have ONNX symbolics); its warnings
        # are about Python ints in Detectron2's shape arithmetic, traced as intended.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            adapter,
            adapter.flattened_inputs,
            tmp,
            dynamo=False,
            opset_version=opset,
            input_names=[WHOLE_INPUT],
            output_names=names,
            dynamic_axes={
                WHOLE_INPUT: {1: "height", 2: "width"},
                **{n: {0: "instances"} for n in names if n != SIZE_OUTPUT},
            },
            do_constant_folding=True,
        )
    proto = onnx.load(tmp)
    constants_as_initializers(proto)
    meta = {
        "producer": "qdet",
        "graph": FORMAT,
        "input": f"{WHOLE_INPUT}: (3, H, W) float32 in input_format, resized as "
        "ResizeShortestEdge(min_size_test, max_size_test)",
        "outputs": names,
        "quantizers": record.quantizers,
        "opset": opset,
        "ir_version": proto.ir_version,
        **info,
    }
    if record.target:  # the integer check: every quantized conv one op, codes layer by layer
        meta.update(integer_metadata(record))
    else:  # the layer-wise check of the QDQ inside (qdet.export.verify)
        meta.update(qdq_metadata(record))
    for key, value in meta.items():
        text = value if key in TEXT_METADATA else json.dumps(value)
        proto.metadata_props.add(key=key, value=text)
    save_model(proto, tmp, path)
    os.replace(tmp, path)  # never a half-written file under the final name
    return {"graph": FORMAT, "outputs": names, "quantizers": record.quantizers, "path": path}


def _flat_output_names(schema) -> list[str]:
    """The names of the traced outputs: one picture's ``Instances`` fields as Detectron2's
    flattening orders them (sorted), then its image size."""
    node = schema
    while type(node).__name__ != "InstancesSchema":
        inner = getattr(node, "schemas", None)
        if not inner or len(inner) != 1:
            raise ValueError(f"the traced inference returned {schema}, not one Instances")
        node = inner[0]
    missing = set(BOX_OUTPUTS) - set(node.keys)
    if missing:
        raise ValueError(f"the traced Instances lack {sorted(missing)}: not a detector's output")
    return [*node.keys, SIZE_OUTPUT]


@contextlib.contextmanager
def _naming_what_cannot_export(model: nn.Module, adapter: nn.Module, opset: int):
    """An operator the ONNX exporter has no conversion for, as one error naming it, the
    layer that calls it (found by running the inference once more, watching each aten op
    with the module stack) and the ways out; instead of a bare "not supported"."""
    try:
        yield
    except torch.onnx.errors.UnsupportedOperatorError as e:
        found = re.search(r"operator '([\w:.]+)'", str(e))
        if not found:
            raise
        op = found.group(1)
        layer = _layer_calling(model, adapter, op)
        where = f"{layer[0]} ({layer[1]})" if layer else f"{type(model).__name__}'s inference"
        raise ValueError(
            f"ONNX opset {opset} has no conversion for {op}, which {where} calls: write that "
            "layer with exportable ops, or give the op a symbolic "
            "(torch.onnx.register_custom_op_symbolic) before exporting"
        ) from e


def _layer_calling(model: nn.Module, adapter: nn.Module, op: str) -> tuple[str, str] | None:
    """(name, class) of the innermost layer of ``model`` that calls aten ``op`` while
    ``adapter`` runs, or None."""
    from torch.utils._python_dispatch import TorchDispatchMode

    stack: list[tuple[str, str]] = []
    found: list[tuple[str, str]] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not found and func._schema.name == op and stack:
                found.append(stack[-1])
            return func(*args, **(kwargs or {}))

    def enter(name):
        return lambda m, _inputs: stack.append((name, type(m).__name__))

    def leave(_module, _inputs, _output):
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad(), Watch():
            adapter(*adapter.flattened_inputs)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None
