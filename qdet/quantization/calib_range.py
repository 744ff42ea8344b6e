"""How calibration sets a uniform quantizer's range (``QUANT.CALIB_RANGE``).

- ``ewgs`` (the default; the papers' rows): EWGS's official rule, weights u = -l = 3 std,
  unsigned activations u = 3 std / sqrt(1 - 2/pi), signed ones the 0.1 / 99.9 percentiles
  (:class:`qdet.quantization.UniformQuantizer`). Made for 2-4 bits, where rounding error
  dominates; at 8 bits its clipping dominates instead: on the digits RetinaNet-R18 (FP
  75.8 AP), W8A8 calibrated by it scores 52.5 AP before any training, and QAT's quantizer
  learning rate (1e-5) barely moves a range in a fine-tune (docs/deployment.md).
- ``minmax``: the whole observed range (weights +-max|w|), as onnxruntime's MinMax
  calibration: 75.9 AP at W8A8 there, but wasteful at low bits.
- ``mse``: per quantizer (per channel for per-channel weights), the range c x the
  min / max range, c on a grid in (0, 1], whose fake-quantized values are closest to the
  calibration data in mean squared error: wide at 8 bits, clipped at 4 (as the MSE
  observers of TensorRT and AIMET choose).
"""

from __future__ import annotations

import torch

from qdet.quantization.functional import (
    MODE_SIGNED,
    MODE_UNSIGNED,
    MODE_WEIGHT,
    fake_quant_reference,
)

CALIB_RANGES = ("ewgs", "minmax", "mse")
_SAMPLES = 1 << 16  # elements of each calibration tensor kept for the MSE search
_FRACTIONS = torch.linspace(0.02, 1.0, 50)


def sample(x: torch.Tensor) -> torch.Tensor:
    """An evenly strided subsample of ``x`` (all of it when small), float32."""
    flat = x.detach().flatten().float()
    if flat.numel() > _SAMPLES:
        flat = flat[:: flat.numel() // _SAMPLES + 1]
    return flat.clone()


def _mse(x, lower, upper, n, mode, dims):
    with torch.no_grad():
        scale = (upper - lower) / 2 if mode == MODE_WEIGHT else upper - lower
        q = fake_quant_reference(x, lower, upper, scale, n, mode)
        return (q - x).square().mean(dim=dims)


def weight_range(w: torch.Tensor, n: int, per_channel: bool, rule: str) -> torch.Tensor:
    """u (= -l) of a weight quantizer: per output channel when ``per_channel``."""
    flat = w.detach().float().flatten(1) if per_channel else w.detach().float().reshape(1, -1)
    top = flat.abs().amax(dim=1).clamp_min(1e-12)
    if rule == "minmax":
        best = top
    else:
        errors = torch.stack(
            [
                _mse(flat, -(c * top)[:, None], (c * top)[:, None], n, MODE_WEIGHT, 1)
                for c in _FRACTIONS
            ]
        )
        best = _FRACTIONS[errors.argmin(dim=0)] * top
    return best if per_channel else best[0]


def activation_range(samples: list[torch.Tensor], n: int, signed: bool, rule: str):
    """``(l, u)`` of an activation quantizer from the calibration ``samples``."""
    x = torch.cat(samples)
    lo, hi = min(float(x.min()), 0.0), float(x.max())
    if not signed:
        lo = 0.0 if lo >= 0 else lo
    if rule == "minmax" or hi <= lo:
        return lo, max(hi, lo + 1e-3)
    mode = MODE_SIGNED if signed else MODE_UNSIGNED
    candidates = [(c * lo, c * hi) for c in _FRACTIONS.tolist()]
    errors = [float(_mse(x, torch.tensor(a), torch.tensor(b), n, mode, 0)) for a, b in candidates]
    return candidates[min(range(len(errors)), key=errors.__getitem__)]
