"""The packed low-bit weight file (qdet/export/packed.py): an 8-bit target model's weights
decode bit for bit to its quantized weights."""

import torch
from target_models import _target_model


def test_packed_weights_of_an_8bit_target_model_decode_bit_exactly(tmp_path):
    from qdet.export import read_packed_weights, save_packed_weights
    from qdet.quantization import dequantize_weights

    model = _target_model("QUANT.W_BITS", "8", "QUANT.A_BITS", "8")
    save_packed_weights(model, str(tmp_path / "w.safetensors"))
    layers, _ = read_packed_weights(str(tmp_path / "w.safetensors"))
    for name, w in dequantize_weights(layers).items():
        module = model.get_submodule(name)
        assert torch.equal(w, module.weight_quantizer(module.weight).detach()), name
