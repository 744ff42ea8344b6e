"""Getting a quantized model out: ONNX with QDQ, the packed low-bit weight file, the check.

- :func:`export_onnx`: a detector (RetinaNet: through its head; others: the backbone) to
  ONNX, quantized layers as QuantizeLinear / DequantizeLinear on their exact grids.
- :func:`verify`: onnxruntime against the PyTorch fake-quant model on the same images.
- :class:`OnnxRetinaNet`: the ONNX network + Detectron2's post-processing, for evaluation.
- :func:`save_packed_weights` / :func:`read_packed_weights`: codes at b bits, safetensors.

onnx and onnxruntime come with the ``export`` extra (``pip install -e .[export]``).
"""

from qdet.export.graphs import export_graph, export_onnx
from qdet.export.packed import read_packed_weights, save_packed_weights
from qdet.export.qdq import activation_grid, onnx_export_mode, weight_grid
from qdet.export.runtime import OnnxRetinaNet, inference_session
from qdet.export.verify import VerifyReport, verify

__all__ = [
    "OnnxRetinaNet",
    "VerifyReport",
    "activation_grid",
    "export_graph",
    "export_onnx",
    "inference_session",
    "onnx_export_mode",
    "read_packed_weights",
    "save_packed_weights",
    "verify",
    "weight_grid",
]
