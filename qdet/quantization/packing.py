"""Integer export: a quantized model's weights as integer codes plus the floats to decode them.

For every quantized layer the weight becomes codes k in 0..2^b - 1 (QFD: k = round(n v_hat);
LSQ: k = q - Q_n), stored as uint8, two 4-bit codes per byte (low nibble first) when
b <= 4. Decoding applies the quantizer's own de-quantization arithmetic, so
``dequantize_weights(export_int_weights(m))`` equals the fake-quantized weights bit for bit.
The input quantizers' parameters travel along for an integer runtime.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qdet.quantization.layers import QUANTIZED_LAYERS
from qdet.quantization.quantizers import Quantizer, build_quantizer
from qdet.quantization.targets import DEPLOY_TARGETS


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten ``codes`` (0..2^bits - 1) to uint8; two per byte when ``bits`` <= 4."""
    flat = codes.flatten().to(torch.uint8)
    if bits > 4:
        return flat
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int64 codes of ``shape``."""
    numel = math.prod(shape)
    if bits <= 4:
        packed = torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten()
    return packed[:numel].long().view(shape)


def _quantizer_state(q) -> dict:
    if hasattr(q, "levels"):  # PerLevelQuantizer: one state per FPN level
        return {"levels": [_quantizer_state(level) for level in q.levels]}
    if not isinstance(q, Quantizer):  # QuantizedInput: the producer's quantizer holds it
        return {"quantized_by_producer": True, "bits": q.bits}
    return {
        "method": type(q).__name__,
        "bits": q.bits,
        "kind": q.kind,
        "signed": q.signed,
        "per_channel": q.per_channel,
        # A deployment target's 8-bit weights have 254 levels (qdet.quantization.targets).
        "target": q.target.name if q.target is not None else "",
        "params": {k: v.detach().cpu().clone() for k, v in q.named_parameters()},
    }


@torch.no_grad()
def export_int_weights(model: nn.Module) -> dict[str, dict]:
    """layer name -> {"codes", "shape", "weight_quantizer", "input_quantizer", "bias"}.

    Layers whose weight quantizer has 32 bits keep their float weight under "weight".
    """
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, QUANTIZED_LAYERS):
            continue
        wq = m.weight_quantizer
        entry = {
            "shape": tuple(m.weight.shape),
            "weight_quantizer": _quantizer_state(wq),
            "input_quantizer": _quantizer_state(m.input_quantizer),
            "bias": None if m.bias is None else m.bias.detach().cpu().clone(),
        }
        if wq.enabled:
            entry["codes"] = pack_codes(wq.to_codes(m.weight.detach()).cpu(), wq.bits)
        else:
            entry["weight"] = m.weight.detach().cpu().clone()
        out[name] = entry
    return out


_METHOD_BY_CLASS = {"UniformQuantizer": "uniform", "EWGSQuantizer": "ewgs", "LSQQuantizer": "lsq"}


def _rebuild_quantizer(state: dict):
    q = build_quantizer(
        _METHOD_BY_CLASS[state["method"]],
        state["bits"],
        state["kind"],
        signed=state["signed"],
        per_channel=state["per_channel"],
        target=DEPLOY_TARGETS.get(state.get("target", "")),
    )
    for k, v in state["params"].items():
        getattr(q, k).data = v.clone()
    q.initialized = True
    return q


@torch.no_grad()
def dequantize_weights(exported: dict[str, dict]) -> dict[str, torch.Tensor]:
    """layer name -> float weight decoded from :func:`export_int_weights`'s output."""
    weights = {}
    for name, entry in exported.items():
        if "codes" not in entry:
            weights[name] = entry["weight"].clone()
            continue
        state = entry["weight_quantizer"]
        codes = unpack_codes(entry["codes"], state["bits"], torch.Size(entry["shape"]))
        weights[name] = _rebuild_quantizer(state).from_codes(codes)
    return weights


def load_dequantized_weights(model: nn.Module, exported: dict[str, dict]) -> None:
    """Write the decoded weights into ``model``'s quantized layers (for checking a file)."""
    for name, w in dequantize_weights(exported).items():
        layer = model.get_submodule(name)
        layer.weight.data.copy_(w.to(layer.weight.device))


def export_size_bytes(exported: dict[str, dict]) -> dict[str, int]:
    """Bytes of the quantized layers' weights: packed codes + decode floats vs FP32."""
    int_bytes = fp32_bytes = 0
    for entry in exported.values():
        numel = math.prod(entry["shape"])
        fp32_bytes += 4 * numel
        if "codes" in entry:
            int_bytes += entry["codes"].numel()
            int_bytes += sum(4 * p.numel() for p in entry["weight_quantizer"]["params"].values())
        else:
            int_bytes += 4 * numel
    return {"int_bytes": int_bytes, "fp32_bytes": fp32_bytes}


def deployed_weight_bytes(model: nn.Module) -> int:
    """Bytes of all the model's parameters as deployed: quantized layers' weights as packed
    codes plus their decode floats, everything else (FP layers, biases, norms) in FP32.
    Quantizer parameters are counted through the codes' decode floats only; a distiller's
    connectors not at all."""
    exported = export_int_weights(model)
    packed = export_size_bytes(exported)["int_bytes"]
    skip = set()
    for name in exported:
        layer = model.get_submodule(name)
        skip.add(id(layer.weight))
        skip.update(
            id(p) for q in (layer.weight_quantizer, layer.input_quantizer) for p in q.parameters()
        )
    distiller = getattr(model, "distiller", None)  # its connectors train, never deploy
    if distiller is not None:
        skip.update(id(p) for p in distiller.parameters())
    rest = sum(4 * p.numel() for p in model.parameters() if id(p) not in skip)
    return packed + rest
