"""The packed low-bit weight file: a model's weights at b bits in safetensors (no pickle).

Each quantized layer's weight is stored as its integer codes packed by
:func:`qdet.quantization.pack_codes` (one code per byte above 4 bits, two per byte at 4
bits and below) under ``<layer>.weight.codes``, with its quantizer's decode parameters
under ``<layer>.weight_quantizer.<param>``; every other tensor of the model's state dict
(FP layers, biases, norms, activation quantizers) is stored as it is. The file's
metadata says, per quantized layer, the method, bits and shape needed to decode.
:func:`read_packed_weights` returns what :func:`qdet.quantization.export_int_weights`
returns, so :func:`qdet.quantization.dequantize_weights` decodes a file to the model's
fake-quantized weights bit for bit.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from qdet.quantization import export_int_weights

FORMAT = "qdet-packed-weights-v1"
_SKIP_PREFIXES = ("distiller.",)  # the teacher and connectors never deploy


def _layer_metadata(entry: dict) -> dict:
    q = entry["weight_quantizer"]
    keys = ("method", "bits", "kind", "signed", "per_channel", "target")
    return {"shape": list(entry["shape"]), "params": list(q["params"]), **{k: q[k] for k in keys}}


def save_packed_weights(model: nn.Module, path: str) -> dict[str, int]:
    """Write ``model``'s packed weights to ``path`` (safetensors, atomically).

    Returns sizes in bytes: the file, and the model's parameters in FP32.
    """
    from safetensors.torch import save_file  # optional: the export extra

    exported = export_int_weights(model)
    tensors, layers = {}, {}
    for name, entry in exported.items():
        if "codes" not in entry:
            continue  # a 32-bit weight stays in the state dict below
        tensors[f"{name}.weight.codes"] = entry["codes"]
        for param, value in entry["weight_quantizer"]["params"].items():
            tensors[f"{name}.weight_quantizer.{param}"] = value
        layers[name] = _layer_metadata(entry)
    packed_weights = {f"{name}.weight" for name in layers}
    for key, value in model.state_dict().items():
        if key in packed_weights or key.startswith(_SKIP_PREFIXES) or key in tensors:
            continue
        tensors[key] = value.detach().cpu()
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "layers": json.dumps(layers)}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    fp32 = sum(
        4 * p.numel()
        for k, p in model.state_dict().items()
        if p.is_floating_point() and not k.startswith(_SKIP_PREFIXES)
    )
    return {"file_bytes": os.path.getsize(path), "fp32_bytes": fp32}


def read_packed_weights(path: str) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """``(layers, rest)``: ``layers`` as :func:`qdet.quantization.export_int_weights`
    returns it (codes, shape, weight quantizer state; no input quantizer or bias, which
    are in ``rest``), ``rest`` the file's other tensors by state-dict key."""
    from safetensors import safe_open  # optional: the export extra

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: write it with tools/export_onnx.py --packed-weights"
        )
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a qdet packed weight file ({FORMAT})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    layers = {}
    for name, info in json.loads(meta["layers"]).items():
        params = {p: tensors.pop(f"{name}.weight_quantizer.{p}") for p in info["params"]}
        state = {k: info[k] for k in ("method", "bits", "kind", "signed", "per_channel")}
        state["target"] = info.get("target", "")  # files from before deployment targets
        layers[name] = {
            "shape": tuple(info["shape"]),
            "codes": tensors.pop(f"{name}.weight.codes"),
            "weight_quantizer": {**state, "params": params},
        }
    return layers, tensors
