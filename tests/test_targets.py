"""Deployment targets (qdet/quantization/targets.py): the integer grids a target puts the
quantizers on, their ranges, and the settings a target refuses."""

import pytest
import torch
from detectron2.modeling import build_model
from target_models import ORT, RETINANET, TINY, _target_model

from qdet.config import load_config
from qdet.quantization import QConv2d, UniformQuantizer
from qdet.quantization.quantizers import LSQQuantizer, Quantizer
from qdet.quantization.targets import DEPLOY_TARGETS


def test_every_grid_has_an_integer_zero_point_that_decodes_to_zero():
    """Each activation grid against the rule written out here from the quantizer's learned
    bounds l, u (float64): z = clip(round(-l n / (u - l)), 0, n) (0 for a post-ReLU input),
    l' = -z (u - l) / n; the code of x is k = clip(round((x - l') / t), 0, n) with
    t = (u - l) / n, its value d (k - z) with d = t (a post-ReLU input: d = alpha / n,
    QFD's learned output scale), and 0 comes out as 0. A zero point off by one, in
    the model and the export alike, fails here."""
    model = _target_model("QUANT.W_BITS", "8", "QUANT.A_BITS", "4")
    activations = [
        m for m in model.modules() if isinstance(m, Quantizer) and m.kind == "activation"
    ]
    assert len(activations) > 40
    signed = 0
    for q in activations:
        grid = q.integer_grid()
        n = q.n_levels
        l, u = float(q.lower), float(q.upper)
        if q.signed:
            z = min(max(round(-l * n / (u - l)), 0), n)
        else:
            z, l = 0, 0.0  # a ReLU's output: l is exactly 0
        t = (u - l) / n
        d = t if q.signed else float(q.scale) / n
        lower = -z * t
        assert grid.zero_point == z
        assert abs(grid.q_step - t) <= 1e-6 * t and abs(grid.dq_step - d) <= 1e-6 * d
        x = torch.linspace(lower - 3 * t, lower + (n + 3) * t, 200, dtype=torch.float64)
        x = torch.cat([x, torch.zeros(1, dtype=torch.float64)])
        want = d * (torch.clamp(torch.round((x - lower) / t), 0, n) - z)
        got = q(x.float()).double()
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * d * n), q
        assert abs(float(got[-1])) <= 1e-5 * d * n  # zero is a level (to float32 rounding)
        signed += z > 0
    assert signed > 10  # residuals, shortcuts and FPN levels have a mid-range zero point
    for m in model.modules():  # 8-bit weights: integers on the narrow int8 grid
        if isinstance(m, QConv2d):
            q, _ = m.weight_quantizer.weight_integers(m.weight)
            assert q.abs().max() <= 127 and m.weight_quantizer.n_levels == 254


def test_nudged_lower_bound_keeps_its_gradient():
    q = UniformQuantizer(4, "activation", signed=True, target=ORT)
    x = torch.randn(1000)
    q.init_from(x)
    with torch.no_grad():
        q.lower.add_(0.0123)
    lower, upper, scale, _ = q._affine()
    step = float(q.upper - q.lower) / 15
    assert abs(float(lower) / step - round(float(lower) / step)) < 1e-4  # on the grid
    assert abs(float(lower) - float(q.lower)) <= step / 2 + 1e-6  # moved by under half a step
    q(x).square().sum().backward()
    assert q.lower.grad is not None and float(q.lower.grad) != 0
    assert q.upper.grad is not None and float(q.upper.grad) != 0


def test_lsq_and_symmetric_targets_have_their_integer_ranges():
    w = LSQQuantizer(8, "weight", target=ORT)
    assert w.qrange == (-127, 127) and w.n_levels == 254
    trt = DEPLOY_TARGETS["tensorrt"]
    a = UniformQuantizer(8, "activation", signed=False, target=trt)
    a.init_from(torch.rand(1000))
    grid = a.integer_grid()
    assert grid.zero_point == 128 and grid.offset == 128  # int8 with zero point 0
    assert LSQQuantizer(8, "activation", signed=False, target=trt).qrange == (-128, 127)


def test_checkpoint_of_a_target_model_is_refused_by_a_simulated_one():
    trained = UniformQuantizer(4, "activation", target=ORT)
    trained.init_from(torch.rand(100))
    other = UniformQuantizer(4, "activation")
    with pytest.raises(ValueError, match="trained for QUANT.TARGET 'onnxruntime'"):
        other.load_state_dict(trained.state_dict())
    UniformQuantizer(4, "activation", target=ORT).load_state_dict(trained.state_dict())


def test_unknown_target_and_unsupported_bits_are_refused():
    with pytest.raises(ValueError, match=r"QUANT.TARGET='tflite'.*onnxruntime.*tensorrt"):
        build_model(load_config(RETINANET, [*TINY, "QUANT.TARGET", "tflite"]))
    with pytest.raises(ValueError, match=r"QUANT.W_BITS=4.*'tensorrt'.*weights 8 bits"):
        build_model(load_config(RETINANET, [*TINY, "QUANT.TARGET", "tensorrt"]))
    with pytest.raises(ValueError, match=r"QUANT.A_BITS=32.*integers"):
        build_model(
            load_config(RETINANET, [*TINY, "QUANT.TARGET", "onnxruntime", "QUANT.A_BITS", "32"])
        )
