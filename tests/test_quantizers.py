"""UniformQuantizer / EWGS / LSQ against independent references."""

import math

import numpy as np
import pytest
import torch

from qdet.quantization import (
    EWGSQuantizer,
    LSQQuantizer,
    UniformQuantizer,
    build_quantizer,
    fake_quant_reference,
)
from qdet.quantization import functional as F

ALL_BITS = [1, 2, 3, 4, 5, 6, 7, 8]
KINDS = [("weight", False), ("activation", False), ("activation", True)]


def _set_params(q, lower, upper, scale):
    with torch.no_grad():
        q.lower.copy_(torch.as_tensor(lower))
        q.upper.copy_(torch.as_tensor(upper))
        q.scale.copy_(torch.as_tensor(scale))
    q.initialized = True


def _numpy_quantize(x, l, u, s, bits, kind, signed):
    """QFD Eq. 1-4 in float64 NumPy: a reference computed another way."""
    n = 2**bits - 1
    v_tilde = np.round(n * np.clip((x - l) / (u - l), 0, 1)) / n  # numpy rounds half to even
    if kind == "weight":
        return s * 2 * (v_tilde - 0.5)
    return l + s * v_tilde if signed else s * v_tilde


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("kind,signed", KINDS)
def test_forward_matches_plain_formula(bits, kind, signed):
    torch.manual_seed(bits)
    x = torch.randn(3, 5, 7, 7) * 2
    q = UniformQuantizer(bits, kind, signed=signed)
    _set_params(q, -1.3, 1.7, 1.1)
    out = q(x)
    ref = fake_quant_reference(x, q.lower, q.upper, q.scale, 2**bits - 1, q.mode)
    assert torch.equal(out, ref)
    ref64 = _numpy_quantize(x.double().numpy(), -1.3, 1.7, 1.1, bits, kind, signed)
    np.testing.assert_allclose(out.detach().numpy(), ref64, atol=1e-5)
    assert len(torch.unique(out)) <= 2**bits  # at most 2^b levels


def test_one_bit_weights_are_binary():
    w = torch.randn(64, 32)
    q = UniformQuantizer(1, "weight")
    q.init_from(w)
    s = q.scale.item()
    values = sorted(torch.unique(q(w)).tolist())
    assert values == pytest.approx([-s, s])


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("kind,signed", KINDS)
@pytest.mark.parametrize("bound", ["exclusive", "inclusive"])
def test_gradients_match_autograd_of_plain_formula(bits, kind, signed, bound):
    torch.manual_seed(100 + bits)
    x = torch.randn(2, 4, 6, 6) * 2
    x[0, 0, 0, :3] = torch.tensor([-0.9, 1.4, 0.0])  # exactly on l, on u, and a ReLU zero
    x.requires_grad_(True)
    q = UniformQuantizer(bits, kind, signed=signed, bound_gradient=bound)
    _set_params(q, -0.9, 1.4, 1.6)
    g = torch.randn(2, 4, 6, 6)
    q(x).backward(g)
    ours = [x.grad.clone(), q.lower.grad.clone(), q.upper.grad.clone(), q.scale.grad.clone()]

    x2 = x.detach().clone().requires_grad_(True)
    l, u, s = (torch.tensor(v, requires_grad=True) for v in (-0.9, 1.4, 1.6))
    inclusive = bound == "inclusive"
    fake_quant_reference(x2, l, u, s, 2**bits - 1, q.mode, inclusive).backward(g)
    for a, b in zip(ours, [x2.grad, l.grad, u.grad, s.grad]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Exclusive: no gradient at l or u, like torch.clamp's; inclusive: it passes there.
    xd = x.detach()
    outside = (xd < -0.9) | (xd > 1.4)
    at_bounds = (xd == -0.9) | (xd == 1.4)
    assert torch.all(x.grad[outside] == 0)
    assert torch.all((x.grad[at_bounds] != 0) == inclusive)


def test_bits_32_is_exact_identity():
    x = torch.randn(4, 8, requires_grad=True)
    for kind in ("weight", "activation"):
        q = UniformQuantizer(32, kind)
        y = q(x)
        assert y is x
    assert not UniformQuantizer(32, "weight").enabled


@pytest.mark.parametrize("bad", [0, 9, 16, 31, 33, -4, 4.0, True, "4"])
def test_bits_out_of_range_is_clear_error(bad):
    with pytest.raises(ValueError, match="out of range"):
        UniformQuantizer(bad, "weight")


def test_bad_kind_and_per_channel_activation_errors():
    with pytest.raises(ValueError, match="kind"):
        UniformQuantizer(4, "bias")
    with pytest.raises(ValueError, match="per_channel applies to weights"):
        UniformQuantizer(4, "activation", per_channel=True)
    with pytest.raises(ValueError, match="unknown quantization method"):
        build_quantizer("dorefa", 4, "weight")


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_matches_torch_fake_quantize_where_grids_coincide(bits, signed):
    # With l = -zero_point * step and alpha = u - l, the activation grid is torch's affine
    # grid (unsigned: zero_point = 0, since the unsigned map starts at 0).
    n = 2**bits - 1
    step = 0.05
    zero_point = n // 3 if signed else 0
    lower = -zero_point * step
    upper = lower + n * step
    # Values on the grid plus offsets well inside a bin, so float rounding of the two
    # different formulas cannot land on opposite sides of a tie; some fall outside [l, u].
    k = torch.randint(-3, n + 4, (4000,))
    x = lower + (k + torch.rand(4000) * 0.8 - 0.4) * step
    q = UniformQuantizer(bits, "activation", signed=signed)
    _set_params(q, lower, upper, upper - lower)
    expected = torch.fake_quantize_per_tensor_affine(x, step, zero_point, 0, n)
    torch.testing.assert_close(q(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_per_channel_equals_per_tensor_on_each_channel(bits):
    torch.manual_seed(bits)
    w = torch.randn(6, 3, 3, 3) * torch.linspace(0.1, 2, 6).view(6, 1, 1, 1)
    w.requires_grad_(True)
    q = UniformQuantizer(bits, "weight", per_channel=True)
    q.init_from(w)
    assert q.lower.shape == (6,)
    g = torch.randn_like(w)
    q(w).backward(g)
    for c in range(6):
        qc = UniformQuantizer(bits, "weight")
        _set_params(qc, q.lower[c].item(), q.upper[c].item(), q.scale[c].item())
        wc = w[c].detach().clone().requires_grad_(True)
        out_c = qc(wc)
        out_c.backward(g[c])
        torch.testing.assert_close(q(w)[c], out_c)
        torch.testing.assert_close(w.grad[c], wc.grad)
        torch.testing.assert_close(q.scale.grad[c], qc.scale.grad)
        torch.testing.assert_close(q.lower.grad[c], qc.lower.grad)


def test_weight_init_rule_per_tensor_and_per_channel():
    w = torch.randn(8, 4, 3, 3) * 0.2
    q = UniformQuantizer(4, "weight")
    q.init_from(w)
    std = float(np.std(w.numpy().ravel(), ddof=1))
    assert q.upper.item() == pytest.approx(3 * std, rel=1e-5)
    assert q.lower.item() == pytest.approx(-3 * std, rel=1e-5)
    assert q.scale.item() == pytest.approx(3 * std, rel=1e-5)  # (u - l) / 2
    qc = UniformQuantizer(4, "weight", per_channel=True)
    qc.init_from(w)
    stds = np.std(w.numpy().reshape(8, -1), axis=1, ddof=1)
    np.testing.assert_allclose(qc.upper.detach().numpy(), 3 * stds, rtol=1e-5)


def test_unsigned_activation_init_is_half_normal_rule():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(20000) * 1.5)
    q = UniformQuantizer(4, "activation", signed=None)
    q.init_from(x)
    assert q.signed is False
    expected_u = 3 * float(np.std(x.numpy(), ddof=1)) / math.sqrt(1 - 2 / math.pi)
    assert q.upper.item() == pytest.approx(expected_u, rel=1e-5)
    assert q.lower.item() == 0.0
    assert q.scale.item() == pytest.approx(expected_u, rel=1e-5)


def test_signed_activation_init_uses_percentiles_over_batches():
    torch.manual_seed(0)
    batches = [torch.randn(5000) * s for s in (1.0, 2.0)]
    q = UniformQuantizer(8, "activation", signed=None)
    for b in batches:
        q.observe(b)
    q.finish_calibration()
    assert q.signed is True
    lo = np.mean([np.percentile(b.numpy(), 0.1) for b in batches])
    hi = np.mean([np.percentile(b.numpy(), 99.9) for b in batches])
    assert q.lower.item() == pytest.approx(lo, rel=1e-4)
    assert q.upper.item() == pytest.approx(hi, rel=1e-4)
    assert q.scale.item() == pytest.approx(hi - lo, rel=1e-4)


def test_uncalibrated_quantizer_initialises_on_first_tensor():
    x = torch.randn(100) - 0.5
    q = UniformQuantizer(4, "activation", signed=None)
    assert not q.initialized
    q(x)
    assert q.initialized and q.signed is True


def test_backward_saves_only_the_input():
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    q = UniformQuantizer(4, "activation", signed=True)
    q.init_from(x)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(x)
    big = [t for t in saved if t.numel() > 1]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    # The plain composition keeps several full-size tensors for its backward.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fake_quant_reference(x, q.lower, q.upper, q.scale, 15, q.mode)
    assert sum(t.numel() for t in saved if t.numel() > 1) >= 2 * x.numel()


def _lsq_reference(x, s, qn, qp, grad_scale):
    """LSQ (Esser et al. 2020) written with the paper's grad_scale / round_pass tricks."""
    s_scaled = (s - s * grad_scale).detach() + s * grad_scale
    v = torch.clamp(x / s_scaled, qn, qp)
    v = (v.round() - v).detach() + v
    return v * s_scaled


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind,signed", KINDS)
def test_lsq_matches_paper_formula(bits, kind, signed):
    torch.manual_seed(bits)
    x = torch.randn(3, 40).requires_grad_(True)
    q = LSQQuantizer(bits, kind, signed=signed)
    q.init_from(x)
    qn, qp = q.qrange
    assert qp == (2**bits - 1 if (kind == "activation" and not signed) else 2 ** (bits - 1) - 1)
    assert q.scale.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(qp), rel=1e-5)
    g = torch.randn(3, 40)
    q(x).backward(g)

    x2 = x.detach().clone().requires_grad_(True)
    s2 = q.scale.detach().clone().requires_grad_(True)
    ref = _lsq_reference(x2, s2 + 1e-8, qn, qp, 1 / math.sqrt(x.numel() * qp))
    # Tied bounds compute l + alpha k / n instead of (k + Q_n) s: equal up to float rounding.
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(q.scale.grad, s2.grad, rtol=1e-4, atol=1e-6)


def test_lsq_rejects_binary_weights():
    with pytest.raises(ValueError, match="LSQ needs at least 2 bits"):
        LSQQuantizer(1, "weight")


def test_state_dict_round_trip_keeps_calibration_and_sign():
    q = UniformQuantizer(4, "activation", signed=None)
    q.init_from(torch.randn(1000))
    sd = q.state_dict()
    assert set(sd) == {"lower", "upper", "scale", "_extra_state"}
    q2 = UniformQuantizer(4, "activation", signed=None)
    q2.load_state_dict(sd)
    assert q2.initialized and q2.signed is True
    x = torch.randn(50)
    assert torch.equal(q(x), q2(x))
    with pytest.raises(ValueError, match="checkpoint quantizer has 4 bits"):
        UniformQuantizer(8, "activation").load_state_dict(sd)


def test_per_channel_params_take_their_size_from_checkpoint():
    q = UniformQuantizer(4, "weight", per_channel=True)  # channels unknown until init
    q.init_from(torch.randn(5, 3))
    q2 = UniformQuantizer(4, "weight", per_channel=True)
    q2.load_state_dict(q.state_dict())
    assert q2.scale.shape == (5,)


def test_autocast_bfloat16_forward_backward():
    """Under bfloat16 autocast the quantizer's output and every gradient equal the float32
    path's within bfloat16's precision (8 mantissa bits: 2^-8 relative). The input is
    bfloat16-representable, so both paths quantize the same values."""
    torch.manual_seed(0)
    x0 = torch.randn(4, 64).to(torch.bfloat16).float()
    g = torch.randn(4, 64)
    q = UniformQuantizer(4, "activation", signed=True)
    q.init_from(x0)

    def run(autocast: bool):
        q.zero_grad()
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = q(x.to(torch.bfloat16) if autocast else x)
        (y.float() * g).sum().backward()
        return y, x.grad, {n: p.grad.clone() for n, p in q.named_parameters()}

    y32, gx32, gp32 = run(False)
    y16, gx16, gp16 = run(True)
    assert y16.dtype == torch.bfloat16 and y32.dtype == torch.float32
    eps = 2.0**-8
    torch.testing.assert_close(y16.float(), y32, rtol=eps, atol=eps * y32.abs().max().item())
    torch.testing.assert_close(gx16, gx32, rtol=eps, atol=eps * gx32.abs().max().item())
    assert set(gp16) == {"lower", "upper", "scale"}
    for name, grad in gp32.items():  # sums over 256 elements: a few eps
        torch.testing.assert_close(gp16[name], grad, rtol=4 * eps, atol=0.0)


def fresh_compile():
    """Forget every compiled quantizer body and dynamo's caches and counters, so what a
    test compiles shows in ``counters["stats"]["unique_graphs"]``."""
    from torch._dynamo.utils import counters

    F._compiled.clear()
    torch._dynamo.reset()
    counters.clear()
    return counters


@pytest.mark.parametrize("ewgs", [False, True])
def test_compiled_backend_equals_eager(ewgs):
    """The STE with torch.clamp's bounds, and EWGS scaling with the inclusive bounds; the
    compiled run built graphs (not eager compared with eager)."""
    pytest.importorskip("torch._inductor")
    counters = fresh_compile()
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 11) * 2
    x[0, 0, 0, :2] = torch.tensor([-1.0, 1.5])  # exactly at l and u
    g = torch.randn_like(x)
    results = {}
    for backend in ("eager", "compile"):
        F.set_backend(backend)
        try:
            xr = x.clone().requires_grad_(True)
            if ewgs:
                q = EWGSQuantizer(4, "activation", signed=True, bound_gradient="inclusive")
                q.delta.fill_(0.3)
            else:
                q = UniformQuantizer(4, "activation", signed=True)
            _set_params(q, -1.0, 1.5, 2.5)
            y = q(xr)
            y.backward(g)
            results[backend] = (y.detach(), xr.grad, q.lower.grad, q.upper.grad, q.scale.grad)
        finally:
            F.set_backend("eager")
    assert counters["stats"]["unique_graphs"] > 0
    for a, b in zip(results["eager"], results["compile"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert torch.equal(results["eager"][0], results["compile"][0])


def test_compiled_op_does_not_recompile_per_input_size():
    """Detector inputs change size every batch: after the first, no new compiled graph."""
    pytest.importorskip("torch._inductor")
    counters = fresh_compile()
    q = UniformQuantizer(4, "activation", signed=True)
    _set_params(q, -1.0, 1.5, 2.5)
    # H == W first (dynamo's duck sizing would tie them), then sizes that break every
    # relation between the dims; all above 4096 elements (inductor's small-size variant).
    sizes = [(2, 8, 17, 17), (2, 8, 20, 24), (2, 8, 24, 20), (1, 8, 30, 30), (2, 16, 18, 26)]
    F.set_backend("compile")
    try:
        graphs = []
        for shape in sizes:
            x = torch.randn(shape, requires_grad=True)
            q(x).sum().backward()
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        F.set_backend("eager")
    assert graphs[0] > 0 and graphs[1:] == [graphs[0]] * (len(sizes) - 1), graphs


def test_compile_backend_refuses_to_run_eager(monkeypatch):
    """Under QDET_QUANT_BACKEND=compile a body torch.compile gives nothing for is an error,
    never a silent eager run (auto falls back)."""
    fresh_compile()
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: None)
    q = UniformQuantizer(4, "activation", signed=True)
    _set_params(q, -1.0, 1.5, 2.5)
    x = torch.randn(2, 3, 4, 5)
    eager = q(x)
    F.set_backend("compile")
    try:
        with pytest.raises(RuntimeError, match="QDET_QUANT_BACKEND=compile.*no compiled form"):
            q(x)
        F._compiled.clear()
        F.set_backend("auto")
        assert torch.equal(q(x), eager)
    finally:
        F.set_backend("eager")
        F._compiled.clear()


def test_codes_of_an_output_decode_to_it_when_alpha_left_the_range():
    """The saved-codes codec encodes a quantizer's *output*: once alpha != u - l (trained),
    the input map would give other codes (a quantized input saved for backward)."""
    for kind, signed in (("activation", True), ("activation", False), ("weight", False)):
        q = UniformQuantizer(4, kind, signed=signed)
        x = torch.randn(500)
        q.init_from(x)
        with torch.no_grad():
            q.scale.mul_(1.37)
        x_q = q(x)
        encode, decode = q.codec()
        codes = encode(x_q)
        assert codes.min() >= 0 and codes.max() <= 15
        torch.testing.assert_close(decode(codes), x_q, rtol=0, atol=0)
