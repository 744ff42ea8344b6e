"""Each quantizer's range and clipped share (qdet/quantization/range_report.py), against the
same quantities computed here from the quantizers' parameters and the layers' inputs, and
the step against the gap between the distinct values a quantizer outputs."""

import pytest
import torch
from torch import nn

from qdet.quantization import QLinear, quantize_model
from qdet.quantization.range_report import quantizer_ranges


class TwoPaths(nn.Module):
    """Two linear layers in a row and one the forward never reaches (declared first)."""

    def __init__(self):
        super().__init__()
        self.unused, self.first, self.second = nn.Linear(8, 4), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def _model():
    torch.manual_seed(0)
    model = TwoPaths()
    quantize_model(model, 4, 4, exclude=[])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # narrow input ranges, so that the report batches clip
        model.first.input_quantizer.init_from(torch.randn(64, 8, generator=g) * 0.5)
        model.second.input_quantizer.init_from(torch.rand(64, 16, generator=g) * 0.3)
        model.unused.input_quantizer.init_from(torch.randn(64, 8, generator=g))
        for layer in (model.first, model.second, model.unused):
            layer.weight_quantizer.init_from(layer.weight)
    return model


def _clipped(x: torch.Tensor, lower: float, upper: float, bits: int) -> tuple[float, float]:
    half = (upper - lower) / (2 * (2**bits - 1))
    return float((x < lower - half).float().mean()), float((x > upper + half).float().mean())


def test_ranges_and_clipped_shares_are_those_of_the_inputs():
    model = _model().train()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g) * 2]
    records = quantizer_ranges(model, batches)
    assert model.training  # restored
    by_name = {r["name"]: r for r in records}
    assert len(records) == 6 and len(by_name) == 6
    # the batches' inputs of each layer, computed here
    x = torch.cat(batches)
    with torch.no_grad():
        hidden = torch.relu(model.first(x))
    inputs = {"first": x, "second": hidden}
    for layer, seen in inputs.items():
        q = getattr(model, layer).input_quantizer
        r = by_name[f"{layer}.input_quantizer"]
        lower, upper = float(q.lower), float(q.upper)
        below, above = _clipped(seen, lower, upper, q.bits)
        assert (r["lower"], r["upper"]) == pytest.approx((lower, upper), rel=1e-6)
        assert r["clipped_below"] == pytest.approx(below, abs=1e-12)
        assert r["clipped_above"] == pytest.approx(above, abs=1e-12)
        assert r["clipped"] == pytest.approx(below + above, abs=1e-12)
        assert r["calls"] == 2 and r["values"] == seen.numel()
    assert by_name["second.input_quantizer"]["clipped_above"] > 0.05  # the report sees it
    assert by_name["first.input_quantizer"]["clipped"] > 0.05
    # network order; the quantizers the forward never called last, with no calls
    names = [r["name"] for r in records]
    assert names.index("first.input_quantizer") < names.index("second.input_quantizer")
    assert {r["name"] for r in records[-2:]} == {
        "unused.input_quantizer",
        "unused.weight_quantizer",
    }
    assert all(r["calls"] == 0 and r["clipped"] == 0.0 for r in records[-2:])


def test_step_is_the_gap_between_output_levels():
    model = _model()
    records = {r["name"]: r for r in quantizer_ranges(model, [torch.randn(2, 8)])}
    for layer in ("first", "second"):
        module = getattr(model, layer)
        assert isinstance(module, QLinear)
        with torch.no_grad():
            outputs = {
                "weight": module.weight_quantizer(module.weight),
                "input": module.input_quantizer(torch.linspace(-3, 3, 5000)),
            }
        for kind, out in outputs.items():
            gap = float(torch.unique(out).diff().min())
            r = records[f"{layer}.{kind}_quantizer"]
            assert r["step"] == pytest.approx(gap, rel=1e-4), (r["name"], r["step"], gap)


def test_a_model_without_quantizers_is_refused():
    with pytest.raises(ValueError, match="no enabled quantizer"):
        quantizer_ranges(nn.Linear(2, 2), [torch.randn(1, 2)])
