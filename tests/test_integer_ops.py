"""The integer graph of a target-trained model (qdet/quantization/integer_ops.py): each conv's
bias is int32 at the input step times the weight step, read back from the ONNX file."""

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from target_models import ORT, _export, _randomize_norms, _target_model

from qdet.quantization import calibrate, quantize_model
from qdet.quantization.integer_ops import integer_conv_grid


def test_bias_is_int32_at_the_input_step_times_the_weight_step(tmp_path):
    model = _target_model()
    path = tmp_path / "m.onnx"
    _export(model, path)
    proto = onnx.load(str(path))
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) > 20
    for conv in convs:
        x_dq, w_dq, b_dq = (producer[name] for name in conv.input[:3])
        assert values[b_dq.input[0]].dtype == np.int32
        s_x = values[x_dq.input[1]]
        s_w = values[w_dq.input[1]]
        np.testing.assert_allclose(values[b_dq.input[1]], np.float32(s_x) * s_w, rtol=1e-6)
        assert values[w_dq.input[0]].dtype == np.int8


def test_integer_conv_grid_against_its_formula():
    """A quantized conv with BN folded, as the runtime holds it, against the formula
    computed here in float64: int8 weights sign(f) q (0 where f = 0), weight step
    s_w |f| (s_w where f = 0), int32 bias round(c / (s_x s_w')) with
    c = beta - f mean + f b. Integers compared exactly: truncating, a missing sign flip or
    a bias without the conv's own bias fails."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 5, 3, padding=1, bias=True))
    quantize_model(net, 4, 4, exclude=[], per_channel=True, quantizer_options={"target": ORT})
    layer = net[0]
    norm = torch.nn.BatchNorm2d(5).eval()
    _randomize_norms(torch.nn.Sequential(norm), 2)
    with torch.no_grad():
        norm.weight[1] = -0.7  # a negative gamma flips the channel's weight integers
        norm.weight[3] = 0.0  # a zero gamma: that channel's integers are all 0
        layer.bias.copy_(torch.randn(5) * 0.3)
    calibrate(net, [torch.randn(2, 4, 6, 6) * 2], num_batches=1)
    grid = integer_conv_grid(layer, layer.input_quantizer, norm)

    codes, s_w = layer.weight_quantizer.weight_integers(layer.weight)
    codes, s_w = codes.double(), s_w.double().flatten().expand(5)
    s_x = float(layer.input_quantizer.integer_grid().dq_step)
    f = norm.weight.detach().double() / torch.sqrt(norm.running_var.double() + norm.eps)
    c = norm.bias.detach().double() - f * norm.running_mean.double() + f * layer.bias.double()
    weight_step = torch.where(f != 0, s_w * f.abs(), s_w)
    bias_codes = torch.round(c / (s_x * weight_step))
    sign = torch.sign(f).view(-1, 1, 1, 1)
    assert torch.equal(grid.weight.double(), codes * sign)
    assert grid.weight.dtype == torch.int8 and grid.bias.dtype == torch.int32
    torch.testing.assert_close(grid.weight_step.double(), weight_step, rtol=1e-6, atol=0)
    torch.testing.assert_close(grid.bias_step.double(), s_x * weight_step, rtol=1e-6, atol=0)
    assert torch.equal(grid.bias.double(), bias_codes)
    # Rounding is seen: truncation would give other integers here.
    assert not torch.equal(torch.trunc(c / (s_x * weight_step)), bias_codes)
