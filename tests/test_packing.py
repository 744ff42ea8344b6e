"""Integer export: packing, bit-exact round trip, size."""

import pytest
import torch
from torch import nn

from qdet.quantization import (
    dequantize_weights,
    export_int_weights,
    export_size_bytes,
    pack_codes,
    quantize_model,
    unpack_codes,
)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("numel", [1, 7, 64])
def test_pack_unpack_inverse(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == ((numel + 1) // 2 if bits <= 4 else numel)
    assert torch.equal(unpack_codes(packed, bits, torch.Size([numel])), codes)


def test_pack_layout_low_nibble_first():
    packed = pack_codes(torch.tensor([1, 2, 15, 0]), 4)
    assert packed.tolist() == [1 | (2 << 4), 15]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)
    )


@pytest.mark.parametrize("method", ["uniform", "ewgs", "lsq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_round_trip_is_bit_exact(method, bits, per_channel):
    model = _model()
    quantize_model(model, bits, 8, method=method, per_channel=per_channel, exclude=[])
    model(torch.randn(2, 3, 8, 8))  # initialises the quantizers
    with torch.no_grad():  # move the bounds off their init so the test is not trivial
        for m in model.modules():
            if hasattr(m, "weight_quantizer"):
                m.weight_quantizer.scale.mul_(1.1)
    exported = export_int_weights(model)
    decoded = dequantize_weights(exported)
    assert set(decoded) == {"0", "2", "4"}
    for name, w in decoded.items():
        layer = model.get_submodule(name)
        assert torch.equal(w, layer.weight_quantizer(layer.weight).detach())
        codes = exported[name]["codes"]
        assert codes.dtype == torch.uint8
        assert int(unpack_codes(codes, bits, layer.weight.shape).max()) <= 2**bits - 1


def test_binary_weights_round_trip_and_32_bit_layers_stay_float():
    model = _model()
    quantize_model(model, 1, 4, include=["^0$"], exclude=[])
    quantize_model(model, 32, 32, include=["^2$"], exclude=[])
    model(torch.randn(1, 3, 8, 8))
    exported = export_int_weights(model)
    assert "codes" in exported["0"] and "weight" in exported["2"]
    decoded = dequantize_weights(exported)
    q0 = model[0].weight_quantizer
    assert torch.equal(decoded["0"], q0(model[0].weight).detach())
    assert torch.equal(decoded["2"], model[2].weight.detach())


def test_4bit_size_is_about_an_eighth_of_fp32():
    model = nn.Sequential(nn.Conv2d(64, 128, 3))
    quantize_model(model, 4, 4, exclude=[])
    model(torch.randn(1, 64, 8, 8))
    sizes = export_size_bytes(export_int_weights(model))
    assert sizes["fp32_bytes"] == 4 * 64 * 128 * 9
    # 4 bits per weight plus three float32 scalars (l, u, s).
    assert sizes["int_bytes"] == 64 * 128 * 9 // 2 + 12
