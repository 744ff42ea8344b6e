"""onnxruntime's own post-training quantizer as qdet's peer (qdet/export/peer.py), on a tiny
conv net: the input's grid is MinMax over the calibration batches (computed here), the
weights are per-channel int8 codes of the FP weights, activations uint8; and the padding
of calibration batches against NumPy's."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from qdet.export.graphs import INPUT_NAME
from qdet.export.peer import CALIBRATIONS, padded, quantize_static_peer


def _fp_onnx(path) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    torch.onnx.export(
        net,
        (torch.randn(1, 3, 8, 8),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=[INPUT_NAME],
        output_names=["out"],
    )
    return net


def _batches() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    first = rng.normal(size=(1, 3, 8, 8)).astype(np.float32) * 3  # the widest range
    return [first, *(rng.normal(size=(1, 3, 8, 8)).astype(np.float32) for _ in range(3))]


def _initializers(proto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def test_quantize_static_is_minmax_on_the_batches_with_int8_weights(tmp_path):
    net = _fp_onnx(tmp_path / "fp.onnx")
    batches = _batches()
    out = quantize_static_peer(str(tmp_path / "fp.onnx"), str(tmp_path / "q.onnx"), batches)
    assert out == str(tmp_path / "q.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp.onnx", "q.onnx"]  # no leftovers
    proto = onnx.load(out)
    values = _initializers(proto)
    # the input's QuantizeLinear: uint8, MinMax over every batch, the range holding 0
    (q_in,) = [
        n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == INPUT_NAME
    ]
    low = min(0.0, min(float(b.min()) for b in batches))
    high = max(0.0, max(float(b.max()) for b in batches))
    scale, zero = values[q_in.input[1]], values[q_in.input[2]]
    assert zero.dtype == np.uint8
    np.testing.assert_allclose(scale, (high - low) / 255, rtol=1e-6)
    assert int(zero) == round(-low / float(scale))
    # each conv's weight: int8 codes per output channel that decode to the FP weight
    dequantize = {n.input[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    for conv in (m for m in net if isinstance(m, nn.Conv2d)):
        w = conv.weight.detach().numpy()
        (name,) = [k for k, v in values.items() if v.shape == w.shape and v.dtype == np.int8]
        step, zero_point = (values[i] for i in dequantize[name].input[1:3])
        assert step.shape == (w.shape[0],) and not zero_point.any()
        decoded = values[name].astype(np.float32) * step[:, None, None, None]
        assert np.all(np.abs(decoded - w) <= step[:, None, None, None] / 2 + 1e-7)
    activations = [
        values[n.input[2]].dtype
        for n in proto.graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2
    ]
    assert activations and set(activations) == {np.dtype(np.uint8)}


def test_percentile_runs_and_an_unknown_calibration_is_refused(tmp_path):
    _fp_onnx(tmp_path / "fp.onnx")
    assert CALIBRATIONS == ("minmax", "percentile")
    out = quantize_static_peer(
        str(tmp_path / "fp.onnx"), str(tmp_path / "p.onnx"), _batches(), "percentile"
    )
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)
    with pytest.raises(ValueError, match="calibration 'entropy': choose from"):
        quantize_static_peer(str(tmp_path / "fp.onnx"), str(tmp_path / "e.onnx"), [], "entropy")


def test_padded_is_numpys_zero_padding_at_the_bottom_and_right():
    rng = np.random.default_rng(1)
    images = [rng.normal(size=(1, 3, 5, 7)).astype(np.float32), np.ones((1, 3, 8, 6), np.float32)]
    out = padded(images, 8, 7)
    want = [
        np.pad(images[0], ((0, 0), (0, 0), (0, 3), (0, 0))),
        np.pad(images[1], ((0, 0), (0, 0), (0, 0), (0, 1))),
    ]
    for got, expected in zip(out, want):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
