"""Quantizers, quantized layers, model surgery, calibration and integer export."""

from qdet.quantization.calibration import calibrate, init_weight_quantizers
from qdet.quantization.ewgs import update_ewgs_deltas
from qdet.quantization.functional import fake_quant_reference, fake_quantize
from qdet.quantization.layers import QConv2d, QLinear
from qdet.quantization.modes import set_backend
from qdet.quantization.packing import (
    deployed_weight_bytes,
    dequantize_weights,
    export_int_weights,
    export_size_bytes,
    load_dequantized_weights,
    pack_codes,
    unpack_codes,
)
from qdet.quantization.qrelu import QReLUQuantizer  # registers the 'qrelu' method
from qdet.quantization.quantizers import (
    QUANTIZER_REGISTRY,
    EWGSQuantizer,
    LSQQuantizer,
    Quantizer,
    UniformQuantizer,
    build_quantizer,
    name_quantizers,
    quantizer_methods,
)
from qdet.quantization.surgery import (
    DEFAULT_EXCLUDE,
    QUANT_TARGETS,
    quantization_table,
    quantize_model,
    quantized_layers,
    select_layers,
    target_patterns,
)

__all__ = [
    "DEFAULT_EXCLUDE",
    "deployed_weight_bytes",
    "QUANTIZER_REGISTRY",
    "QUANT_TARGETS",
    "EWGSQuantizer",
    "LSQQuantizer",
    "QConv2d",
    "QReLUQuantizer",
    "QLinear",
    "Quantizer",
    "UniformQuantizer",
    "build_quantizer",
    "name_quantizers",
    "quantizer_methods",
    "calibrate",
    "dequantize_weights",
    "export_int_weights",
    "export_size_bytes",
    "fake_quant_reference",
    "fake_quantize",
    "init_weight_quantizers",
    "load_dequantized_weights",
    "pack_codes",
    "quantization_table",
    "quantize_model",
    "quantized_layers",
    "select_layers",
    "set_backend",
    "target_patterns",
    "unpack_codes",
    "update_ewgs_deltas",
]
