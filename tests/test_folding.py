"""BN folded into a quantized conv and the int32 bias (qdet/quantization/folding.py): the
target conv in eval against conv then BN computed with plain ops, and the folding helpers
against the formulas written out here."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from target_models import ORT, _randomize_norms

from qdet.quantization import calibrate, quantize_model
from qdet.quantization.folding import (
    check_foldable,
    folded_steps,
    integer_bias,
    norm_affine,
    uses_running_statistics,
)


@pytest.mark.parametrize("norm_kind", ["bn", "frozen", "cycle"])
def test_folded_conv_in_eval_equals_conv_then_norm(norm_kind):
    """The target conv in eval against its formula computed here in float64 from the
    quantized operands and the norm's statistics: z = conv(x_q, f w_q) + round(c / t) t,
    with f = gamma / sqrt(var + eps), c = beta - f mean + f b and t = s_x s_w |f| the
    int32 bias step. The bias's rounding is visible (the unrounded bias is further off
    than the tolerance), so leaving it out, or truncating, fails."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 6, 3, padding=1, bias=norm_kind == "cycle")
    net = torch.nn.Sequential(conv)
    quantize_model(net, 4, 4, exclude=[], per_channel=True, quantizer_options={"target": ORT})
    layer = net[0]
    layer.target = ORT
    if norm_kind == "bn":
        norm = torch.nn.BatchNorm2d(6).eval()
    elif norm_kind == "frozen":
        norm = FrozenBatchNorm2d(6)
    else:
        norm = CycleBatchNormList(2, num_features=6).eval()
    norm_net = torch.nn.Sequential(norm)
    _randomize_norms(norm_net, 1)
    x = torch.randn(2, 5, 7, 7) * 2
    calibrate(net, [x], num_batches=1)
    x_q = layer.input_quantizer(x).detach().double()
    w_q = layer.weight_quantizer(layer.weight).detach().double()
    s_x = float(layer.input_quantizer.integer_grid().dq_step)
    s_w = (layer.weight_quantizer.scale.detach() / layer.weight_quantizer.n_levels).double()
    outs = [layer(x, norm=norm).detach() for _ in range(2)]  # a CycleBatchNormList: both
    for level, got in enumerate(outs):
        bn = norm[level] if norm_kind == "cycle" else norm
        mean, var = bn.running_mean.double(), bn.running_var.double()
        f = norm.weight.detach().double() / torch.sqrt(var + bn.eps)
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(6).double()
        c = norm.bias.detach().double() - f * mean + f * b
        t = s_x * s_w.flatten() * f.abs()
        z = F.conv2d(x_q, w_q * f.view(-1, 1, 1, 1), padding=1)
        want = z + (torch.round(c / t) * t).view(1, -1, 1, 1)
        unrounded = z + c.view(1, -1, 1, 1)
        err = (got.double() - want).abs().max()
        assert err < 1e-4, float(err)
        # The test sees the rounding: without it the output would be this far off.
        assert float((unrounded - want).abs().max()) > 10 * 1e-4
    # Training (batch statistics, trainable BN): the float simulation, no bias rounding.
    if norm_kind == "bn":
        norm.train()
        got = layer(x, norm=norm)
        z = F.conv2d(x_q.float(), w_q.float(), padding=1)
        want = F.batch_norm(z, None, None, norm.weight, norm.bias, True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _norm(kind: str) -> torch.nn.Module:
    norm = {
        "bn": lambda: torch.nn.BatchNorm2d(6),
        "frozen": lambda: FrozenBatchNorm2d(6),
        "cycle": lambda: CycleBatchNormList(2, num_features=6),
    }[kind]()
    _randomize_norms(torch.nn.Sequential(norm), 3)
    return norm.eval()


@pytest.mark.parametrize("norm_kind", ["bn", "frozen", "cycle"])
def test_norm_affine_is_the_norm_in_eval(norm_kind):
    """BN(z) = f z + c against F.batch_norm on the running statistics; a
    CycleBatchNormList answers for each level in turn, as its forward cycles."""
    norm = _norm(norm_kind)
    z = torch.randn(2, 6, 4, 4)
    for level in range(2 if norm_kind == "cycle" else 1):
        bn = norm[level] if norm_kind == "cycle" else norm
        mean, var = bn.running_mean, bn.running_var
        want = F.batch_norm(z, mean, var, norm.weight, norm.bias, False, 0.0, bn.eps)
        f, c = norm_affine(norm)
        got = f.view(1, -1, 1, 1) * z + c.view(1, -1, 1, 1)
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    if norm_kind == "cycle":
        assert norm._pos == 0  # advanced once a level, back to the first
        f0, _ = norm_affine(norm, advance=False)
        assert norm._pos == 0 and torch.equal(f0, norm_affine(norm)[0]) and norm._pos == 1


def test_integer_bias_rounds_to_its_grid_and_passes_the_gradient():
    bias = torch.tensor([0.26, -0.74, 3.0, 1e12], dtype=torch.float64, requires_grad=True)
    step = torch.tensor([0.1, 0.2, 0.25, 1.0], dtype=torch.float64)
    codes, values = integer_bias(bias, step)
    assert codes.tolist() == [3.0, -4.0, 12.0, float(2**31 - 1)]  # nearest, int32-clamped
    torch.testing.assert_close(values[:3], torch.tensor([0.3, -0.8, 3.0], dtype=torch.float64))
    values.sum().backward()
    assert bias.grad.tolist() == [1.0, 1.0, 1.0, 1.0]  # straight through


def test_folded_steps_scale_the_weight_step_by_the_fold():
    weight_step, steps = torch.tensor(0.1), torch.tensor([0.1, 0.2, 0.3])
    fold = torch.tensor([2.0, -3.0, 0.0])
    step, bias_step = folded_steps(0.5, weight_step, fold, 3)
    torch.testing.assert_close(step, torch.tensor([0.2, 0.3, 0.1]))  # |f| s_w; s_w at f = 0
    torch.testing.assert_close(bias_step, 0.5 * torch.tensor([0.2, 0.3, 0.1]))
    step, bias_step = folded_steps(0.25, steps, None, 3)
    torch.testing.assert_close(step, steps)
    torch.testing.assert_close(bias_step, 0.25 * steps)
    assert step.dtype == bias_step.dtype == torch.float32


def test_norms_that_cannot_fold_are_refused_and_running_statistics_are_told():
    for norm in (
        None,
        torch.nn.BatchNorm2d(4),
        FrozenBatchNorm2d(4),
        CycleBatchNormList(2, num_features=4),
    ):
        check_foldable(norm, "ok")
    with pytest.raises(ValueError, match=r"^x\.norm: its GroupNorm .* cannot be folded"):
        check_foldable(torch.nn.GroupNorm(2, 4), "x.norm")
    with pytest.raises(ValueError, match="CycleBatchNormList without affine"):
        check_foldable(CycleBatchNormList(2, num_features=4, affine=False), "y")
    bn = torch.nn.BatchNorm2d(4)
    assert not uses_running_statistics(bn.train()) and uses_running_statistics(bn.eval())
    assert uses_running_statistics(FrozenBatchNorm2d(4))
    cycle = CycleBatchNormList(2, num_features=4).train()
    cycle[1].eval()
    assert not uses_running_statistics(cycle)
    cycle._pos = 1
    assert uses_running_statistics(cycle)
