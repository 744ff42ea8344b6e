"""Quantized layers (qdet/quantization/layers.py): a conv whose input arrives quantized
(QuantizedInput) refuses a tensor no quantizer made."""

import pytest
import torch
from target_models import _target_model

from qdet.quantization.quantizers import mark_quantized


def test_an_input_without_its_producer_is_an_error():
    model = _target_model()
    conv = model.backbone.bottom_up.res2[0].conv1
    with pytest.raises(RuntimeError, match="carries no quantizer"):
        conv(torch.randn(1, 64, 8, 8))
    x = mark_quantized(torch.zeros(1, 64, 8, 8), model.backbone.bottom_up.stem.output_quantizer)
    assert conv(x).shape == (1, 64, 8, 8)
