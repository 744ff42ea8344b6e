"""EWGS as its official code defines it, against an independent implementation written here.

The reference below follows cvlab-yonsei/EWGS (``custom_modules.py``, ``utils.py``): the
discretiser works on [0, 1] inputs and saves x_in - x_out for its backward; the Hessian
is taken w.r.t. the discretiser's output; weights are mapped by 2 (v - 0.5) afterwards.
qdet's output maps (QFD Eq. 3-4) are applied to that output.
"""

import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qdet.config import add_qdet_config
from qdet.quantization import (
    EWGSQuantizer,
    UniformQuantizer,
    calibrate,
    quantize_model,
    update_ewgs_deltas,
)
from qdet.quantization.ewgs import hutchinson_trace
from qdet.quantization.settings import quantize_kwargs


class _EWGSDiscretizer(torch.autograd.Function):
    """EWGS_discretizer of the official code: x_in in [0, 1], ``levels`` = 2^b."""

    @staticmethod
    def forward(ctx, x_in, levels, delta):
        x_out = torch.round(x_in * (levels - 1)) / (levels - 1)
        ctx.delta = delta
        ctx.save_for_backward(x_in - x_out)
        return x_out

    @staticmethod
    def backward(ctx, g):
        (diff,) = ctx.saved_tensors
        return g * (1 + ctx.delta * torch.sign(g) * diff), None, None


class _ClampPassingBounds(torch.autograd.Function):
    """clamp(t, 0, 1) whose gradient passes on [0, 1] inclusive (the clamp EWGS ran with)."""

    @staticmethod
    def forward(ctx, t):
        ctx.save_for_backward(t)
        return t.clamp(0, 1)

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return g * ((t >= 0) & (t <= 1)).to(g.dtype)


def _reference_quantize(x, l, u, s, bits, kind, signed, delta, inclusive):
    """(output, v): v the discretiser output in [0, 1], the tensor EWGS's Hessian is about."""
    t = (x - l) / (u - l)
    v_hat = _ClampPassingBounds.apply(t) if inclusive else t.clamp(0, 1)
    v = _EWGSDiscretizer.apply(v_hat, 2**bits, delta)
    if kind == "weight":
        return s * 2 * (v - 0.5), v
    return (l + s * v if signed else s * v), v


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _per_channel_view(p, like):
    return p.view(-1, *([1] * (like.dim() - 1))) if p.dim() == 1 else p


def _reference_net(model, x, inclusive):
    """The three quantized convs of ``_stacked_model`` recomputed with the reference
    quantizer on copies of every parameter. Returns the output, the v's (in the model's
    quantizer order: each conv's weight, then its input) and the leaf copies."""
    h, vs, leaves = x, [], {}
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    for i, conv in enumerate(convs):
        quantized = {}
        for name, q, source in (
            ("weight", conv.weight_quantizer, _leaf(conv.weight)),
            ("input", conv.input_quantizer, h),
        ):
            leaves[f"{i}.{name}"] = [_leaf(q.lower), _leaf(q.upper), _leaf(q.scale)]
            l, u, s = (_per_channel_view(p, source) for p in leaves[f"{i}.{name}"])
            quantized[name], v = _reference_quantize(
                source, l, u, s, q.bits, q.kind, q.signed, q.delta.item(), inclusive
            )
            vs.append(v)
            if name == "weight":
                leaves[f"{i}.w"] = source
        leaves[f"{i}.b"] = _leaf(conv.bias)
        h = F.conv2d(quantized["input"], quantized["weight"], leaves[f"{i}.b"], padding=1)
        if i < len(convs) - 1:
            h = F.relu(h)
    return h, vs, leaves


def _stacked_model(bound="exclusive", per_channel=False, bits=3, seed=0):
    """conv-ReLU-conv-ReLU-conv, every conv an EWGS-quantized QConv2d, calibrated, with a
    different delta for each of its six quantizers."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 2, 3, padding=1),
    )
    quantize_model(
        model,
        bits,
        bits,
        method="ewgs",
        per_channel=per_channel,
        exclude=[],
        quantizer_options={"bound_gradient": bound},
    )
    x = torch.randn(2, 2, 5, 5)
    calibrate(model, [x], num_batches=1)
    quantizers = [m for m in model.modules() if isinstance(m, EWGSQuantizer)]
    for i, q in enumerate(quantizers):
        q.delta.fill_(0.15 * (i + 1))
    return model, x, quantizers


def _loss(y, target):
    return ((y - target) ** 2).mean()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bound", ["exclusive", "inclusive"])
def test_three_stacked_convs_match_reference_values_and_gradients(bound, per_channel):
    model, x, quantizers = _stacked_model(bound, per_channel)
    # ReLU zeros sit exactly at l = min(x) = 0 of the two later input quantizers.
    second_input = quantizers[3]  # (weight, input) per conv
    assert second_input.lower.item() == 0 and second_input.signed is False
    target = torch.randn(2, 2, 5, 5)
    x_ours = x.clone().requires_grad_(True)
    y = model(x_ours)
    _loss(y, target).backward()

    x_ref = x.clone().requires_grad_(True)
    y_ref, _, leaves = _reference_net(model, x_ref, inclusive=bound == "inclusive")
    _loss(y_ref, target).backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-7)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    for i, conv in enumerate(convs):
        torch.testing.assert_close(conv.weight.grad, leaves[f"{i}.w"].grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(conv.bias.grad, leaves[f"{i}.b"].grad, rtol=1e-5, atol=1e-7)
        for name, q in (("input", conv.input_quantizer), ("weight", conv.weight_quantizer)):
            for ours, ref in zip((q.lower, q.upper, q.scale), leaves[f"{i}.{name}"]):
                torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-7)


def test_scaling_is_in_unit_interval_units_not_codes():
    """g_in = g (1 + delta sign(g) (v_hat - v_tilde)), by hand on a few values."""
    q = EWGSQuantizer(2, "activation", signed=False, delta=0.5)  # n = 3
    with torch.no_grad():
        q.lower.fill_(0.0)
        q.upper.fill_(1.0)
        q.scale.fill_(1.0)
    q.initialized = True
    x = torch.tensor([0.1, 0.3, 0.5, 0.9], requires_grad=True)
    g = torch.tensor([1.0, -1.0, 2.0, 1.0])
    q(x).backward(g)
    v_tilde = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])  # round(3 x) / 3
    expected = g * (1 + 0.5 * torch.sign(g) * (x.detach() - v_tilde))
    torch.testing.assert_close(x.grad, expected)


def test_default_delta_is_zero_and_equals_the_ste():
    torch.manual_seed(0)
    x = torch.randn(64)
    grads = []
    for cls in (UniformQuantizer, EWGSQuantizer):
        q = cls(4, "activation", signed=True)
        q.init_from(x)
        xr = x.clone().requires_grad_(True)
        q(xr).backward(torch.linspace(-1, 1, 64))
        grads.append(
            torch.cat([xr.grad, q.lower.grad[None], q.upper.grad[None], q.scale.grad[None]])
        )
    assert EWGSQuantizer(4, "weight").delta.item() == 0.0
    assert torch.equal(grads[0], grads[1])


def test_inclusive_bound_adds_the_pull_of_values_exactly_at_l():
    """dL/dl differs by the elements at t = 0: their dt/dl = (t - 1)/d = -1/d times
    dL/dv_hat = alpha g."""
    x = torch.relu(torch.randn(200, generator=torch.Generator().manual_seed(1)))
    g = torch.randn(200, generator=torch.Generator().manual_seed(2))
    grad_l = {}
    for bound in ("exclusive", "inclusive"):
        q = UniformQuantizer(4, "activation", signed=False, bound_gradient=bound)
        q.init_from(x)
        q(x).backward(g)
        grad_l[bound] = q.lower.grad.item()
        alpha, d = q.scale.item(), (q.upper - q.lower).item()
    assert q.lower.item() == 0.0 and (x == 0).sum() > 50
    extra = -(alpha * g[x == 0]).sum().item() / d
    assert grad_l["inclusive"] - grad_l["exclusive"] == pytest.approx(extra, rel=1e-4)
    assert abs(extra) > 0.1 * abs(grad_l["exclusive"])


def test_hutchinson_stopping_rule_is_ewgs():
    """EWGS stops when |mean - previous mean| / (previous mean + 1e-6) < tol (signed)."""
    seq = iter([4.0, 4.002, 100.0])
    assert hutchinson_trace(lambda: next(seq)) == pytest.approx(4.001)  # stops at 2
    seq = iter([-1.0, -5.0, 100.0])
    assert hutchinson_trace(lambda: next(seq)) == pytest.approx(-3.0)  # negative: stops at 2
    seq = iter([1.0, 3.0, 2.0, 2.0, 2.0])
    assert hutchinson_trace(lambda: next(seq), max_iter=3) == pytest.approx(2.0)
    seq = iter(float(v) for v in range(1, 11))
    assert hutchinson_trace(lambda: next(seq), max_iter=10, tol=None) == pytest.approx(5.5)


def _exact_deltas(model, x, target, inclusive):
    """Per quantizer, from the exact Hessian over all v's (every row by a unit-vector
    product): EWGS's delta, and the std (in delta units) of one Hutchinson sample,
    per layer (z_i^T H_ii z_i: 2 sum_{a != b} H_ii,ab^2) and joint (plus
    sum_{j != i} z_i^T H_ij z_j: + sum_{j != i} |H_ij|_F^2)."""
    y, vs, _ = _reference_net(model, x, inclusive)
    grads = torch.autograd.grad(_loss(y, target), vs, create_graph=True)
    rows = []
    for g in grads:
        for gi in g.flatten():
            row = torch.autograd.grad(gi, vs, retain_graph=True)
            rows.append(torch.cat([r.flatten() for r in row]))
    h = torch.stack(rows).double()
    h = (h + h.T) / 2
    out, start = [], 0
    for v, g in zip(vs, grads):
        block = slice(start, start + v.numel())
        start += v.numel()
        h_ii = h[block, block]
        own = 2 * ((h_ii**2).sum() - (h_ii.diagonal() ** 2).sum())
        cross = (h[block] ** 2).sum() - (h_ii**2).sum()
        scale = v.numel() * 3 * g.std().item()
        out.append(
            (
                h_ii.trace().item() / scale,
                math.sqrt(own.item()) / scale,
                math.sqrt((own + cross).item()) / scale,
            )
        )
    return out


@pytest.mark.parametrize("per_channel", [False, True])
def test_hessian_delta_matches_exact_trace_on_three_stacked_convs(per_channel):
    model, x, quantizers = _stacked_model("inclusive", per_channel, seed=3)
    target = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(4))
    exact = _exact_deltas(model, x, target, inclusive=True)
    names = [n for n, m in model.named_modules() if isinstance(m, EWGSQuantizer)]
    samples = 200
    for estimator, column in (("per_layer", 1), ("joint", 2)):
        deltas = update_ewgs_deltas(
            model,
            lambda b: _loss(model(b), target),
            [x],
            num_batches=1,
            estimator=estimator,
            max_iter=samples,
            tol=None,
        )
        assert list(deltas) == names  # two quantized layers in a row no longer fail
        for name, q, row in zip(names, quantizers, exact):
            assert row[0] > 0, name  # MSE on a piecewise-linear net: H is PSD
            # The mean of `samples` Hutchinson samples: within 5 standard errors.
            tolerance = 5 * row[column] / math.sqrt(samples) + 1e-9
            assert deltas[name] == pytest.approx(row[0], abs=tolerance), (estimator, name)
            assert q.delta.item() == pytest.approx(deltas[name])
    # Not a trivially passing bound: the deltas differ between quantizers.
    assert max(row[0] for row in exact) > 2 * min(row[0] for row in exact)


def test_default_stopping_estimate_is_close_to_exact():
    model, x, _ = _stacked_model("exclusive", seed=5)
    target = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(6))
    exact = _exact_deltas(model, x, target, inclusive=False)
    deltas = update_ewgs_deltas(model, lambda b: _loss(model(b), target), [x, x, x])
    for row, estimate in zip(exact, deltas.values()):
        assert estimate == pytest.approx(row[0], rel=0.5)


def test_refresh_leaves_no_trace_behind():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Dropout(0.5)
    )
    quantize_model(model, 4, 4, method="ewgs", exclude=[])
    x = torch.randn(4, 3, 8, 8)
    calibrate(model, [x], num_batches=1)
    model[0].bias.requires_grad_(False)
    model[3].weight.grad = torch.full_like(model[3].weight, 7.0)
    model.eval()
    bn = {k: v.clone() for k, v in model[1].state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    deltas = update_ewgs_deltas(model, lambda b: model(b).pow(2).sum(), [x, x + 1])
    assert any(d > 0 for d in deltas.values())
    assert not model.training and not model[1].training
    assert all(torch.equal(v, model[1].state_dict()[k]) for k, v in bn.items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model[3].weight.grad, torch.full_like(model[3].weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "3.weight")


def _assert_random_states_untouched(run):
    """After ``run()``, torch, Python and NumPy draw what they would have drawn without it."""

    def seed_and_draw(before):
        torch.manual_seed(11)
        random.seed(12)
        np.random.seed(13)
        before()
        return torch.rand(4), random.random(), np.random.rand()

    drawn, expected = seed_and_draw(run), seed_and_draw(lambda: None)
    assert torch.equal(drawn[0], expected[0]) and drawn[1:] == expected[1:]


def test_random_states_are_restored_exactly():
    model, x, _ = _stacked_model()
    _assert_random_states_untouched(
        lambda: update_ewgs_deltas(model, lambda b: model(b).pow(2).sum(), [x])
    )


def test_errors_and_clipping():
    model, x, quantizers = _stacked_model()
    # A concave loss has a negative Hessian trace: delta clips to 0.
    deltas = update_ewgs_deltas(model, lambda b: -(model(b) ** 2).sum(), [x])
    assert all(d == 0.0 for d in deltas.values()) and quantizers[0].delta.item() == 0.0
    with pytest.raises(ValueError, match="no batches"):
        update_ewgs_deltas(model, lambda b: model(b).sum(), [])
    with pytest.raises(RuntimeError, match="does not depend on any EWGS quantizer"):
        update_ewgs_deltas(model, lambda b: torch.zeros((), requires_grad=True), [x])
    fresh = nn.Sequential(nn.Linear(3, 2))
    quantize_model(fresh, 4, 4, method="ewgs", exclude=[])
    with pytest.raises(RuntimeError, match="not calibrated"):
        update_ewgs_deltas(fresh, lambda b: fresh(b).sum(), [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="bound_gradient"):
        UniformQuantizer(4, "weight", bound_gradient="both")
    with pytest.raises(ValueError, match=">= 0"):
        EWGSQuantizer(4, "weight", delta=-1.0)
    with pytest.raises(ValueError, match="per_layer"):
        update_ewgs_deltas(model, lambda b: model(b).sum(), [x], estimator="exact")


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("QUANT.BOUND_GRADIENT", "open", r"QUANT.BOUND_GRADIENT='open'.*exclusive.*inclusive"),
        ("QUANT.EWGS_UPDATE_PERIOD", -1, r"QUANT.EWGS_UPDATE_PERIOD=-1.*>= 0"),
        ("QUANT.EWGS_HESSIAN_BATCHES", 0, r"QUANT.EWGS_HESSIAN_BATCHES=0.*>= 1"),
        ("QUANT.EWGS_DELTA", -0.1, r"QUANT.EWGS_DELTA=-0.1.*>= 0"),
        ("QUANT.EWGS_HUTCHINSON", "exact", r"QUANT.EWGS_HUTCHINSON='exact'.*per_layer.*joint"),
    ],
)
def test_config_errors_name_the_key_and_valid_values(key, value, message):
    from detectron2.config import get_cfg

    cfg = add_qdet_config(get_cfg())
    cfg.merge_from_list(["QUANT.METHOD", "ewgs", key, str(value)])
    with pytest.raises(ValueError, match=message):
        quantize_kwargs(cfg.QUANT)


def test_config_options_reach_the_quantizers():
    from detectron2.config import get_cfg

    cfg = add_qdet_config(get_cfg())
    cfg.merge_from_list(
        ["QUANT.METHOD", "ewgs", "QUANT.BOUND_GRADIENT", "inclusive", "QUANT.EWGS_DELTA", "0.25"]
    )
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3))
    kwargs = quantize_kwargs(cfg.QUANT)
    kwargs["exclude"] = []
    quantize_model(model, **kwargs)
    quantizers = [m for m in model.modules() if isinstance(m, EWGSQuantizer)]
    assert len(quantizers) == 4
    assert all(q.bound_gradient == "inclusive" and q.delta.item() == 0.25 for q in quantizers)


class _LossDict(nn.Module):
    """A model that returns a loss dict, as Detectron2's meta-architectures do."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch):
        return {"loss": self.net(batch).pow(2).mean()}


def test_hook_refreshes_on_period_boundaries_and_leaves_randomness_alone():
    from types import SimpleNamespace

    from detectron2.utils.events import EventStorage

    from qdet.engine import EWGSDeltaHook

    net, x, quantizers = _stacked_model()
    for q in quantizers:
        q.delta.fill_(0.5)
    data = [x + i for i in range(6)]
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=True)
    hook = EWGSDeltaHook(lambda: loader, period=2, num_batches=1, estimator="joint")
    storage = EventStorage()
    hook.trainer = SimpleNamespace(model=_LossDict(net), iter=0, max_iter=4, storage=storage)

    def train_four_steps():
        for it in range(4):
            hook.trainer.iter = it
            hook.after_step()
            refreshed = [q.delta.item() != 0.5 for q in quantizers]
            assert all(refreshed) == (it >= 1) and any(refreshed) == (it >= 1), it

    _assert_random_states_untouched(train_four_steps)
    # One refresh: after iteration 2 of 4, not after the last one.
    assert len(storage.history("ewgs/weight_delta_mean").values()) == 1


def test_epoch_iterations_reads_the_dataset_inside_detectron2s_loader():
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, build_detection_train_loader

    from qdet.engine import epoch_iterations

    cfg = add_qdet_config(get_cfg())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg.merge_from_file(os.path.join(root, "configs/digits/Base-digits.yaml"))
    loader = build_detection_train_loader(cfg)
    images = len(DatasetCatalog.get("qdet_digits_train"))
    assert epoch_iterations(loader, 8) == math.ceil(images / 8)
    with pytest.raises(ValueError, match="QUANT.EWGS_UPDATE_PERIOD"):
        epoch_iterations(iter([1, 2]), 8)
