"""EWGS delta from the Hessian trace, against an exact trace on a small problem."""

import pytest
import torch

from qdet.quantization import EWGSQuantizer, QLinear, quantize_model, update_ewgs_deltas


def test_delta_matches_exact_hessian_trace():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    quantize_model(model, 4, 4, method="ewgs", exclude=[])
    layer = model[0]
    assert isinstance(layer, QLinear) and isinstance(layer.input_quantizer, EWGSQuantizer)
    x = torch.randn(6, 4) - 0.3
    model(x)  # initialise

    def loss_fn(batch):
        return (model(batch) ** 2).sum()

    deltas = update_ewgs_deltas(model, loss_fn, [x], num_batches=1, samples=400)
    assert set(deltas) == {"0.weight_quantizer", "0.input_quantizer"}

    # Exact: L = sum((x_q W_q^T + b)^2). W.r.t. the input quantizer's output x_q:
    # g = 2 y W_q, H = 2 W_q^T W_q per row, Tr(H) = 6 * 2 ||W_q||_F^2.
    with torch.no_grad():
        w_q = layer.weight_quantizer(layer.weight)
        x_q = layer.input_quantizer(x)
        y = x_q @ w_q.T + layer.bias
        g = 2 * y @ w_q
        trace = 6 * 2 * (w_q**2).sum()
        alpha = layer.input_quantizer.scale.abs()
        expected = alpha * (trace / x_q.numel()) / (3 * g.std())
    assert deltas["0.input_quantizer"] == pytest.approx(expected.item(), rel=0.15)
    assert layer.input_quantizer.delta.item() == pytest.approx(deltas["0.input_quantizer"])
    # W.r.t. W_q: H = 2 x_q^T x_q per output row, Tr(H) = 3 * 2 ||x_q||_F^2.
    with torch.no_grad():
        g_w = 2 * y.T @ x_q
        trace_w = 3 * 2 * (x_q**2).sum()
        s = layer.weight_quantizer.scale.abs()
        expected_w = s * (trace_w / w_q.numel()) / (3 * g_w.std())
    assert deltas["0.weight_quantizer"] == pytest.approx(expected_w.item(), rel=0.15)


def test_delta_is_clipped_at_zero_and_requires_batches():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    quantize_model(model, 4, 4, method="ewgs", exclude=[])
    x = torch.randn(5, 4)
    model(x)
    # A concave loss has a negative Hessian trace: delta must clip to 0.
    deltas = update_ewgs_deltas(model, lambda b: -(model(b) ** 2).sum(), [x], samples=50)
    assert all(d == 0.0 for d in deltas.values())
    with pytest.raises(ValueError, match="no batches"):
        update_ewgs_deltas(model, lambda b: model(b).sum(), [])
