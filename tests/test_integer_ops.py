"""The integer graph of a target-trained model (qdet/quantization/integer_ops.py): each conv's
bias is int32 at the input step times the weight step, read back from the ONNX file."""

import copy

import numpy as np
import onnx
import pytest
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


class _BoxHead(torch.nn.Module):
    """Mask R-CNN's box head in miniature (flattened ROI features -> FC -> ReLU -> FC ->
    ReLU), trained for the onnxruntime target: each FC reads its input quantizer's codes,
    the head's output has its own quantizer (the next op's Q)."""

    def __init__(self, tokens: bool = False, w_bits: int = 8, a_bits: int = 8):
        from torch import nn

        from qdet.quantization import UniformQuantizer
        from qdet.quantization.layers import QLinear

        super().__init__()
        torch.manual_seed(0)
        options = {"target": ORT}
        self.fc1 = QLinear.from_float(
            nn.Linear(48, 32), w_bits, a_bits, per_channel=True, act_signed=True, options=options
        )
        self.fc2 = QLinear.from_float(
            nn.Linear(32, 16), w_bits, a_bits, per_channel=True, act_signed=False, options=options
        )
        with torch.no_grad():
            self.fc1.bias.normal_(0, 0.5)
            self.fc2.bias.normal_(0, 0.5)
        self.fc1.target = self.fc2.target = ORT
        self.output_quantizer = UniformQuantizer(a_bits, "activation", signed=False, target=ORT)
        self.tokens = tokens  # (B, T, 48) tokens through the FCs, as in a ViT's MLP

    def flat(self, x):
        return x if self.tokens else x.flatten(1)

    def forward(self, x):
        x = torch.relu(self.fc1(self.flat(x)))
        return self.output_quantizer(torch.relu(self.fc2(x)))


@pytest.mark.parametrize("tokens", [False, True], ids=["vectors", "tokens"])
def test_integer_linear_is_its_formula_and_runs_as_qgemm(tmp_path, tokens):
    """A target-trained Linear, on a batch of vectors (a box head) and of tokens (a ViT's
    MLP): PyTorch's output is x_q W_q^T + b', with b' the bias on the int32 grid s_x s_w[c]
    (written out here from the quantizers, float64); its export is DQ -> Gemm, which
    onnxruntime runs as QGemm (no float GEMM left), giving PyTorch's output codes but for
    ties at a rounding boundary."""
    import onnxruntime as ort

    from qdet.export.integer_check import optimized_op_counts
    from qdet.export.qdq import onnx_export_mode

    head = _BoxHead(tokens).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*((8, 6, 48) if tokens else (64, 3, 4, 4)), generator=g)
    calibrate(head, [x], num_batches=1)
    with torch.no_grad():
        fc1 = copy.deepcopy(head.fc1).double()  # float64: the int32 bias step is ~1e-5
        got = fc1(head.flat(x).double())
        x_q = fc1.input_quantizer(head.flat(x).double())
        k, s_w = fc1.weight_quantizer.weight_integers(fc1.weight)
        w_q = k.double() * s_w.double().view(-1, 1)
        step = fc1.input_quantizer.integer_grid().dq_step * s_w.double()
        rounded = torch.round(fc1.bias / step) * step
        want = x_q @ w_q.T + rounded
    err = (got - want).abs().max()
    assert err < 0.02 * step.min(), (err, step.min())  # float32 steps, as the file holds
    assert (fc1.bias - rounded).abs().max() > 0.1 * step.min()  # the rounding shows

    path = str(tmp_path / "head.onnx")
    with onnx_export_mode(head) as record, torch.no_grad():
        torch.onnx.export(
            head,
            (x,),
            path,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            dynamic_axes={"x": {0: "n", 1: "t"} if tokens else {0: "n"}},
        )
    assert record.integer.linears == ["fc1", "fc2"]
    counts = optimized_op_counts(path)
    assert counts.get("QGemm") == 2 and "Gemm" not in counts and "MatMul" not in counts, counts
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    step = head.output_quantizer.integer_grid().dq_step
    for batch in (x, x[:5, :4] if tokens else x[:5]):  # another size too (dynamic axes)
        out = session.run(None, {"x": batch.numpy()})[0]
        with torch.no_grad():
            torch_out = head(batch).numpy()
        assert out.shape == torch_out.shape
        codes_apart = np.abs(out - torch_out) / step
        assert codes_apart.max() <= 1.0 + 1e-3 and (codes_apart > 0.5).mean() < 0.01
