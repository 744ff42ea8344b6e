"""FAQD's quantized ReLU (Eq. 4-5) against element-by-element loops."""

from __future__ import annotations

import pytest
import torch

from qdet.quantization import QConv2d, QReLUQuantizer, build_quantizer, quantize_model


def _by_hand(values: list[float], alpha: float, bits: int) -> list[float]:
    """0 for x <= 0; k alpha for (k-1) alpha < x <= k alpha; (2^b - 1) alpha beyond."""
    n, out = 2**bits - 1, []
    for x in values:
        level = 0
        if x > 0:
            level = n
            for k in range(1, n + 1):
                if (k - 1) * alpha < x <= k * alpha:
                    level = k
                    break
        out.append(level * alpha)
    return out


def _proxy(x: float, alpha: float, bits: int) -> float:
    """d sigma / d alpha (Eq. 5): 0, 2^(b-1) inside, 2^b - 1 at or beyond the top."""
    n = 2**bits - 1
    if x <= 0:
        return 0.0
    return float(2 ** (bits - 1)) if x < n * alpha else float(n)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_values_and_gradients_match_the_definition(bits):
    q = build_quantizer("qrelu", bits, "activation")
    q.alpha.data.fill_(0.25)
    alpha = 0.25 + 1e-8  # the quantizer keeps its step positive as |alpha| + 1e-8
    q.initialized = True
    x = torch.tensor([-1.0, -0.1, 0.0, 0.1, 0.25, 0.26, 0.5, 0.74, 1.0, 3.0, 10.0])
    x = x.double().requires_grad_(True)
    q.double()
    out = q(x)
    expected = _by_hand(x.tolist(), alpha, bits)
    torch.testing.assert_close(out, torch.tensor(expected).double())
    g = torch.linspace(-1, 1, len(x)).double()
    out.backward(g)
    n = 2**bits - 1
    grad_x = [gi if 0 < xi < n * alpha else 0.0 for xi, gi in zip(x.tolist(), g.tolist())]
    torch.testing.assert_close(x.grad, torch.tensor(grad_x).double())
    grad_alpha = sum(gi * _proxy(xi, alpha, bits) for xi, gi in zip(x.tolist(), g.tolist()))
    assert q.alpha.grad.item() == pytest.approx(grad_alpha, rel=1e-9)


def test_codes_round_trip_and_the_relu_is_absorbed():
    q = build_quantizer("qrelu", 3, "activation")
    pre = torch.randn(2, 4, 5, 5)
    q.init_from(torch.relu(pre))
    assert q.alpha.item() > 0
    out = q(torch.relu(pre))
    assert torch.equal(out, q(pre))  # sigma(relu(x)) = sigma(x): ReLU zeros stay 0
    assert torch.equal(q(out), out)  # a quantized value stays on its level
    codes = q.to_codes(out)
    assert codes.min() >= 0 and codes.max() <= 7
    torch.testing.assert_close(q.from_codes(codes), out)


def test_act_method_puts_it_on_every_input_and_refuses_weights():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    quantize_model(net, 4, 2, exclude=[], act_method="qrelu")
    for layer in (net[0], net[2]):
        assert isinstance(layer, QConv2d)
        assert isinstance(layer.input_quantizer, QReLUQuantizer)
        assert type(layer.weight_quantizer).__name__ == "UniformQuantizer"
    with pytest.raises(ValueError, match="quantizes activations.*QUANT.ACT_METHOD qrelu"):
        build_quantizer("qrelu", 4, "weight")
    with pytest.raises(ValueError, match="unknown quantization method 'relu'"):
        quantize_model(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), 4, 4, act_method="relu")
