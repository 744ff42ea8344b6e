"""Quantized layers keep their fake-quantized input and weight for backward as uint8 codes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qdet.quantization import functional as QF
from qdet.quantization import quantize_model
from qdet.quantization.functional import MODE_SIGNED, MODE_UNSIGNED, MODE_WEIGHT
from qdet.quantization.per_level import PerLevelQuantizer
from qdet.quantization.quantizers import UniformQuantizer
from qdet.quantization.saved import reuse_quantized_weights_within


def _small_net(method: str, per_channel: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )
    quantize_model(net, 4, 4, exclude=[], method=method, per_channel=per_channel)
    net(torch.randn(2, 3, 6, 6))  # initialise the quantizers
    return net


def _float_saving_copy(net: nn.Module) -> nn.Module:
    plain = copy.deepcopy(net)
    for layer in plain.modules():
        if hasattr(layer, "save_codes"):
            layer.save_codes = False
    return plain


def _grads(net, x):
    net.zero_grad()
    loss = net(x).square().sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("method", ["uniform", "ewgs", "lsq"])
def test_codes_give_the_same_loss_and_gradients_as_float_inputs(method, per_channel):
    compact = _small_net(method, per_channel)
    plain = _float_saving_copy(compact)
    x = torch.randn(2, 3, 6, 6)
    loss_c, grads_c = _grads(compact, x)
    loss_p, grads_p = _grads(plain, x)
    assert torch.equal(loss_c, loss_p)
    for gc, gp in zip(grads_c, grads_p, strict=True):
        torch.testing.assert_close(gc, gp, rtol=0, atol=1e-6)


def _saved_bytes(net, x) -> tuple[int, list[torch.dtype]]:
    """Bytes autograd keeps for backward, seen through an outer saved-tensor hook."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = net(x).square().sum()
    loss.backward()
    return sum(b for b, _ in seen.values()), [d for _, d in seen.values()]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("method", ["uniform", "ewgs", "lsq"])
def test_inputs_are_saved_as_uint8_weights_not_at_all_and_outer_hooks_see_everything(
    method, per_channel
):
    compact = _small_net(method, per_channel)
    plain = _float_saving_copy(compact)
    x = torch.randn(4, 3, 6, 6)
    bytes_c, dtypes_c = _saved_bytes(compact, x)
    bytes_p, dtypes_p = _saved_bytes(plain, x)
    assert torch.uint8 in dtypes_c and torch.uint8 not in dtypes_p
    # Three quantized inputs of 4 bytes per element become 1 byte each; the three
    # fake-quantized weights (4 bytes each) are not kept at all (rebuilt from the parameter,
    # which both nets keep: the weight quantizer saves it).
    inputs = x.numel() + 4 * 8 * 6 * 6 + 4 * 8 * 6 * 6  # of conv, conv, linear
    weights = 8 * 3 * 9 + 8 * 8 * 9 + 5 * 8 * 6 * 6
    assert bytes_p - bytes_c == 3 * inputs + 4 * weights


def test_decode_uses_the_parameters_of_the_forward_even_if_they_change():
    q = UniformQuantizer(4, "activation", signed=True)
    x = torch.randn(64)
    q.init_from(x)
    x_q = q(x)
    encode, decode = q.codec()
    with torch.no_grad():
        q.upper.mul_(2)  # after the forward, e.g. the next level of a shared head
    torch.testing.assert_close(decode(encode(x_q)), x_q, rtol=0, atol=0)


def test_weight_changed_in_place_before_backward_is_an_error():
    """The fake-quantized weight is rebuilt from the parameter in backward, so a step taken
    between forward and backward would silently change the gradient; it raises instead."""
    net = _small_net("uniform")
    loss = net(torch.randn(2, 3, 6, 6)).square().sum()
    with torch.no_grad():
        net[4].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        loss.backward()


def test_per_level_quantizer_reports_the_level_that_served_the_last_call():
    q = PerLevelQuantizer(3, lambda: UniformQuantizer(4, "activation", signed=True))
    for i in range(4):
        q(torch.randn(8) * (i + 1))
        assert q.last_used is q.levels[i % 3]


def test_reference_conv_on_decoded_codes_matches_the_layer():
    net = _small_net("uniform")
    conv = net[0]
    x = torch.randn(2, 3, 6, 6)
    x_q = conv.input_quantizer(x)
    encode, decode = conv.input_quantizer.codec()
    expected = F.conv2d(
        decode(encode(x_q)), conv.weight_quantizer(conv.weight), conv.bias, padding=1
    )
    torch.testing.assert_close(conv(x), expected)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("method", ["uniform", "ewgs", "lsq"])
def test_codes_come_from_the_quantizers_own_pass(method, per_channel, monkeypatch):
    """Saving costs no extra pass: the layer never re-encodes its fake-quantized tensors."""
    net = _small_net(method, per_channel)
    encoded = []
    for q in net.modules():
        if isinstance(q, UniformQuantizer) or type(q).__name__ == "LSQQuantizer":
            monkeypatch.setattr(q, "_encode", lambda *a, _e=encoded: _e.append(1))
    loss = net(torch.randn(2, 3, 6, 6)).square().sum()
    loss.backward()
    assert encoded == []


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("method", ["uniform", "ewgs", "lsq"])
def test_codes_equal_float_saving_under_bfloat16_autocast(method, per_channel):
    compact = _small_net(method, per_channel)
    plain = _float_saving_copy(compact)
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_c, grads_c = _grads(compact, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_p, grads_p = _grads(plain, x)
    assert torch.equal(loss_c, loss_p)
    for gc, gp in zip(grads_c, grads_p, strict=True):
        assert torch.equal(gc, gp)
    # Measured inside autocast, where training runs: the codes are still saved as uint8,
    # and the compact net keeps fewer bytes for backward than float saving does.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bytes_c, dtypes_c = _saved_bytes(compact, x)
        bytes_p, dtypes_p = _saved_bytes(plain, x)
    assert torch.uint8 in dtypes_c and torch.uint8 not in dtypes_p
    assert bytes_c < bytes_p


@pytest.mark.parametrize("backend", ["eager", "compile"])
@pytest.mark.parametrize("mode", [MODE_WEIGHT, MODE_UNSIGNED, MODE_SIGNED])
def test_fused_codes_and_their_decoding_are_exact(backend, mode):
    """The codes from the forward pass are round(n clip((x - l) / (u - l), 0, 1)) (numpy,
    written here), and decoding them, or fake-quantizing again without autograd, gives the
    forward's output bit for bit."""
    counters = None
    if backend == "compile":
        pytest.importorskip("torch._inductor")
        from test_quantizers import fresh_compile

        counters = fresh_compile()
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    x = torch.randn(3, 5, 17, 19) * 2
    lower, upper = torch.tensor([-1.2, 0.5, -0.7]), torch.tensor([1.4, 2.0, 0.9])
    scale = torch.tensor([1.3, 1.1, 2.2])
    QF.set_backend(backend)
    try:
        for per_channel in (False, True):
            lo, hi, s = (p if per_channel else p[0] for p in (lower, upper, scale))
            out, codes = QF.fake_quantize(
                x, lo, hi, s, 3, mode, per_channel=per_channel, return_codes=True
            )
            shape = (-1, 1, 1, 1) if per_channel else ()
            lo_np, hi_np = lo.reshape(shape).numpy(), hi.reshape(shape).numpy()
            want = np.rint(7 * np.clip((x.numpy() - lo_np) / (hi_np - lo_np), 0, 1))
            assert codes.dtype == torch.uint8
            np.testing.assert_array_equal(codes.numpy(), want)
            plain = QF.fake_quantize(x, lo, hi, s, 3, mode, per_channel=per_channel)
            assert torch.equal(out, plain)
            assert torch.equal(QF.decode_codes(codes, lo, s, 3, mode, per_channel), out)
            # The weight rebuild of backward: no autograd, the same values bit for bit.
            rebuilt = QF.fake_quantize_values(x, lo, hi, s, 3, mode, per_channel)
            assert not rebuilt.requires_grad and torch.equal(rebuilt, out)
            half = x.bfloat16().requires_grad_()
            want_half = QF.fake_quantize(half, lo, hi, s, 3, mode, per_channel=per_channel)
            got_half = QF.fake_quantize_values(half, lo, hi, s, 3, mode, per_channel)
            assert got_half.dtype == torch.bfloat16 and not got_half.requires_grad
            assert torch.equal(got_half, want_half.detach())
    finally:
        QF.set_backend("eager")
    if counters is not None:  # the compiled bodies ran, not eager ones
        assert counters["stats"]["unique_graphs"] > 0


class _SharedHead(nn.Module):
    """Two quantized convs run on every level, as RetinaNet's head."""

    def __init__(self):
        super().__init__()
        self.subnet = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)
        )
        quantize_model(self, 4, 4, exclude=[])

    def forward(self, levels):
        return [self.subnet(x) for x in levels]


def _head_pair():
    torch.manual_seed(0)
    plain = _SharedHead()
    plain([torch.randn(2, 4, 8, 8)])  # initialise the quantizers
    reusing = copy.deepcopy(plain)
    reuse_quantized_weights_within(reusing)
    return plain, reusing


def _head_grads(head, levels):
    head.zero_grad()
    loss = sum(y.square().sum() for y in head(levels))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in head.parameters()]


def test_a_layer_run_per_level_quantizes_its_weight_once_with_the_same_gradients():
    plain, reusing = _head_pair()
    calls = []
    for conv in reusing.subnet[0], reusing.subnet[2]:
        conv.weight_quantizer.register_forward_hook(lambda *_: calls.append(1))
    levels = [torch.randn(2, 4, s, s) for s in (8, 4, 2)]
    loss_p, grads_p = _head_grads(plain, levels)
    loss_r, grads_r = _head_grads(reusing, levels)
    assert len(calls) == 2  # two convs, three levels: once per conv
    assert torch.equal(loss_p, loss_r)
    for gp, gr in zip(grads_p, grads_r, strict=True):
        torch.testing.assert_close(gr, gp, rtol=1e-6, atol=1e-7)


def test_weight_reuse_ends_with_the_call_and_follows_parameter_changes():
    _, head = _head_pair()
    levels = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)]
    # Two backward passes without a step between (gradient accumulation): the second call
    # must not reuse the first call's quantized weight, whose graph was freed.
    _head_grads(head, levels)
    loss_1, _ = _head_grads(head, levels)
    with torch.no_grad():
        head.subnet[0].weight.mul_(2)
    loss_2, _ = _head_grads(head, levels)
    with torch.no_grad():
        head.subnet[0].weight.div_(2)
    loss_3, _ = _head_grads(head, levels)
    assert not torch.equal(loss_1, loss_2) and torch.equal(loss_1, loss_3)


def test_the_codes_output_costs_no_zero_gradient_in_backward(monkeypatch):
    """The uint8 codes never get a gradient; autograd must not build an activation-sized
    zero tensor for them on every backward (it did: ~50 ms a RetinaNet-R50 step)."""
    received = []
    backward = QF.FakeQuantize.backward

    def spy(ctx, g, g_codes=None):
        received.append(g_codes)
        return backward(ctx, g, g_codes)

    monkeypatch.setattr(QF.FakeQuantize, "backward", staticmethod(spy))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    lower, upper, scale = (torch.tensor(v, requires_grad=True) for v in (-1.0, 1.0, 2.0))
    out, codes = QF.fake_quantize(x, lower, upper, scale, 4, MODE_SIGNED, return_codes=True)
    (out * out).sum().backward()
    assert received == [None]
    want = QF.fake_quant_reference(x, lower, upper, scale, 15, MODE_SIGNED)
    grad_want = torch.autograd.grad((want * want).sum(), x)[0]
    torch.testing.assert_close(x.grad, grad_want)
