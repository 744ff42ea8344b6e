"""The check of an integer export (qdet/export/integer_check.py): every quantized conv one
QLinearConv in the graph onnxruntime runs (counted on the model), and the check fails on a
wrong folded weight and on a conv left in float."""

import collections

import onnx
import pytest
import torch
from onnx import numpy_helper
from target_models import _export, _images, _target_model

from qdet.export import verify as verify_export
from qdet.export.integer_check import _Substitute, optimized_op_counts
from qdet.export.verify import MAX_TIE_RATE, VerifyReport, check_tie_rate
from qdet.quantization import QConv2d, UniformQuantizer


@pytest.mark.parametrize(
    "w_bits,a_bits,method", [(8, 8, "uniform"), (4, 8, "uniform"), (4, 4, "uniform"), (4, 4, "lsq")]
)
def test_onnxruntime_runs_every_quantized_conv_as_one_integer_op(tmp_path, w_bits, a_bits, method):
    model = _target_model(
        "QUANT.W_BITS", str(w_bits), "QUANT.A_BITS", str(a_bits), "QUANT.METHOD", method
    )
    path = tmp_path / "m.onnx"
    _export(model, path)
    counts = optimized_op_counts(str(path))
    # Counted on the model: each quantized conv once per call (the head's per level).
    calls = collections.Counter()
    hooks = [
        m.register_forward_pre_hook(lambda mod, _i: calls.update(["conv"]))
        for m in model.modules()
        if isinstance(m, QConv2d)
    ]
    with torch.no_grad():
        model(_images(1))
    for h in hooks:
        h.remove()
    assert counts.get("QLinearConv") == calls["conv"]
    assert counts.get("Conv", 0) == 0 and counts.get("FusedConv", 0) == 0
    assert counts.get("QLinearAdd") == 8 + 2  # residual adds and FPN sums
    # The graph's 10 float outputs, and P7's input: ReLU(P6) requantized in float, DQ -> Q
    # (onnxruntime drops the ReLU into the Q) on a map 1/64 of P3's.
    assert counts.get("DequantizeLinear", 0) == 10 + 1
    assert counts.get("QuantizeLinear", 0) == 1 + 1  # the input images, and P7's input
    clips = counts.get("Clip", 0)
    assert (clips > 0) == (a_bits < 8)  # the exact form below 8 bits: integer Clips

    model.requires_grad_(True)  # as the tool loads a trained model: the check needs none
    report = verify_export(model, str(path), [_images(seed=5), _images(seed=6)])
    assert report.ok, report.failures
    assert report.activations_checked > 50
    assert report.boundary_flips <= MAX_TIE_RATE * report.activation_values


def _runtime_at_ties(quantizer, fractions: torch.Tensor, ties: torch.Tensor):
    """Inputs at code ``fractions`` (code units) and a runtime's codes for them: PyTorch's,
    except at ``ties``, where the runtime rounds to the boundary's other side."""
    lower, upper = (t.detach() for t in quantizer._affine()[:2])
    n = quantizer.n_levels
    x = lower + fractions * (upper - lower) / n
    t = n * torch.clamp((x - lower) / (upper - lower), 0, 1)  # as the check computes it
    other = torch.where(torch.round(t) == torch.floor(t), torch.floor(t) + 1, torch.floor(t))
    codes = torch.where(ties, other, torch.round(t)).long()
    return x, codes.numpy()


def test_a_value_repeated_at_a_tie_is_one_rounding_decision():
    """The tie rate counts each tensor's distinct tied values once: in a million codes
    (limit 100 distinct values, 1000 codes), 500 copies of one value at a boundary (a
    padded window's identical tokens) pass as 1 tie, which counted per code would fail;
    200 distinct values within a hair of boundaries (a file off by a hair) fail, and so do
    2000 copies of one value (the cap on codes)."""
    quantizer = next(
        m
        for m in _target_model().modules()
        if isinstance(m, UniformQuantizer) and m.kind == "activation"
    )
    grid = {"requantize": False, "path": "x", "zero_point": 0}
    g = torch.Generator().manual_seed(0)
    n = quantizer.n_levels
    on_grid = torch.randint(0, n + 1, (1_000_000,), generator=g).float()
    cases = {
        "repeated": torch.full((500,), n // 2 + 0.5),
        "distinct": torch.randint(0, n, (200,), generator=g)
        + 0.5
        + torch.linspace(-1.5e-3, 1.5e-3, 200),  # a hair off, each its own value
        "flood": torch.full((2000,), n // 2 + 0.5),
    }
    reports = {}
    for name, at_ties in cases.items():
        fractions = torch.cat([on_grid, at_ties])
        ties = torch.arange(len(fractions)) >= len(on_grid)
        x, codes = _runtime_at_ties(quantizer, fractions, ties)
        report = VerifyReport()
        _Substitute([codes], [grid], report)(quantizer, x, x.clone(), False)
        assert not report.failures, report.failures  # the flips are all at a boundary
        assert report.boundary_flips == int(ties.sum())
        assert report.boundary_flips > MAX_TIE_RATE * report.activation_values  # per code
        check_tie_rate(report)
        reports[name] = report
    assert reports["repeated"].tie_values == 1 and reports["repeated"].ok
    distinct, flood = reports["distinct"], reports["flood"]
    assert distinct.tie_values == 200
    assert not distinct.ok and distinct.failures[0].startswith("200 distinct values")
    assert flood.tie_values == 1
    assert not flood.ok and flood.failures[0].startswith("2000 of 1002000 activation codes")


def test_check_fails_on_a_wrong_folded_weight(tmp_path, monkeypatch):
    """A negative control: one folded weight step doubled at export."""
    import qdet.quantization.integer_ops as integer

    model = _target_model()
    original = integer.integer_conv_grid
    calls = [0]

    def wrong(layer, source, norm):
        grid = original(layer, source, norm)
        calls[0] += 1
        if calls[0] == 3:
            return integer.IntegerConvGrid(
                grid.weight,
                grid.weight_step * 2,
                grid.bias,
                grid.bias_step * 2,
                grid.stride,
                grid.padding,
                grid.dilation,
                grid.groups,
            )
        return grid

    monkeypatch.setattr(integer, "integer_conv_grid", wrong)
    _export(model, tmp_path / "m.onnx")
    monkeypatch.setattr(integer, "integer_conv_grid", original)
    report = verify_export(model, str(tmp_path / "m.onnx"), [_images()])
    assert not report.ok
    assert any("differ from PyTorch" in f for f in report.failures), report.failures


def test_check_fails_when_a_conv_runs_in_float(tmp_path):
    """A bias step the runtime rejects (2x s_x s_w): its conv stays float, the check says so."""
    model = _target_model()
    path = tmp_path / "m.onnx"
    _export(model, path)
    proto = onnx.load(str(path))
    producer = {o: n for n in proto.graph.node for o in n.output}
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    _set_constant(proto, producer[conv.input[2]].input[1], _times(2.0))
    onnx.save(proto, str(path))
    report = verify_export(model, str(path), [_images()])
    assert not report.ok
    assert any("did not fuse" in f for f in report.failures), report.failures


def _set_constant(proto, name: str, edit) -> None:
    """Replace the value of the Constant node or initializer ``name`` by ``edit(value)``."""
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            t = node.attribute[0].t
            t.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(t)), t.name))
            return
    for init in proto.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(init)), name))
            return
    raise KeyError(name)


def _times(f):
    return lambda a: (a * f).astype(a.dtype)


def _plus(k):
    return lambda a: (a + k).astype(a.dtype)


# (what is tampered with, [(operand of the conv's input chain, edit)], what the check says)
TAMPERS = {
    "weight step": ([("w_dq", 1, _times(1.5))], "did not fuse"),
    "weight and bias steps together (still fused)": (
        [("w_dq", 1, _times(1.5)), ("b_dq", 1, _times(1.5))],
        "differ from PyTorch",
    ),
    "int32 bias": ([("b_dq", 0, _plus(5))], "differ from PyTorch"),
    "activation DequantizeLinear step": ([("x_dq", 1, _times(3.0))], "did not fuse"),
    "activation QuantizeLinear step": ([("x_q", 1, _times(1.5))], "differ from PyTorch"),
    "zero point": ([("x_q", 2, _plus(1))], "did not fuse"),
    "Clip bound": ([("clip", 2, _plus(-1))], "differ from PyTorch"),
}


@pytest.fixture(scope="module")
def target_export(tmp_path_factory):
    """A target model and its integer file, exported once for the tampering cases."""
    model = _target_model()
    path = str(tmp_path_factory.mktemp("tamper") / "m.onnx")
    _export(model, path)
    return model, path


@pytest.mark.parametrize("tamper", TAMPERS)
def test_check_fails_on_each_kind_of_tampered_constant(tmp_path, tamper, target_export):
    """One constant of the integer file changed (a conv's weight or bias DequantizeLinear,
    its input's QuantizeLinear or DequantizeLinear, a zero point, a Clip bound): the check
    fails, by a conv that no longer fuses or by codes that differ from PyTorch's."""
    model, original = target_export
    path = str(tmp_path / "m.onnx")
    proto = onnx.load(original)
    producer = {o: n for n in proto.graph.node for o in n.output}
    conv = [n for n in proto.graph.node if n.op_type == "Conv"][4]
    x_dq, w_dq, b_dq = (producer[name] for name in conv.input[:3])
    x_q = producer[x_dq.input[0]]
    while x_q.op_type != "QuantizeLinear":  # past the Clip of a narrow grid
        x_q = producer[x_q.input[0]]
    clip = next(n for n in proto.graph.node if n.op_type == "Clip")
    nodes = {"x_dq": x_dq, "w_dq": w_dq, "b_dq": b_dq, "x_q": x_q, "clip": clip}
    edits, says = TAMPERS[tamper]
    for node, operand, edit in edits:
        _set_constant(proto, nodes[node].input[operand], edit)
    onnx.save(proto, path)
    report = verify_export(model, path, [_images()])
    assert not report.ok
    assert any(says in f for f in report.failures), report.failures
