"""Quantizers as ONNX QuantizeLinear / DequantizeLinear (QDQ) with the model's exact grids.

Every qdet quantizer maps an input to ``out = B + A k / n`` with an integer code k in
0..n, n = 2^b - 1, ``k = round(n clip((x - l) / (u - l), 0, 1))`` (QFD Eq. 1-4; LSQ is the
special case l = Q_n s, u = Q_p s, A = n s, B = l). In ONNX:

- Weights are constants, so they are written as integers and one DequantizeLinear:
  QFD's zero-less grid ``s (2k - n) / n`` as the odd integers q = 2k - n (|q| <= n) with
  scale s / n; LSQ's grid ``s (k + Q_n)`` as q = k + Q_n with scale s. The container is
  int8 (QFD up to 7 bits, LSQ up to 8). QFD's 8-bit grid (odd integers up to 255) fits
  no int8: it is written as the codes k in uint8 with scale 2s/n, then ``Add(-s)``
  (onnxruntime's graph optimiser rejects the alternative, an int32 DequantizeLinear,
  once it moves a Transpose through it).
  Per-channel weights use DequantizeLinear's ``axis`` = 0.
- Activations: ``Sub(l)`` (the grid's offset, a non-integer zero point in units of the
  step, so it cannot be QuantizeLinear's zero point), ``Clip`` to the top code when
  b < 8 (QuantizeLinear saturates only at 255), ``QuantizeLinear`` (uint8, step
  (u - l) / n), ``DequantizeLinear`` (step A / n) and ``Add(B)`` for signed activations.
  LSQ needs none of the offsets: ``Clip``, then a standard int8 / uint8 QDQ pair.

Both sides compute the same values up to float rounding (``x / step`` against
``n ((x - l) / (u - l))``): an element within float error of a rounding boundary can land
one code apart; :mod:`qdet.export.verify` measures what that does to the outputs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from qdet.quantization.functional import MODE_SIGNED, MODE_UNSIGNED, MODE_WEIGHT
from qdet.quantization.integer_ops import IntegerActivation
from qdet.quantization.layers import QUANTIZED_LAYERS
from qdet.quantization.modes import integer_export, recording
from qdet.quantization.per_level import PerLevelQuantizer
from qdet.quantization.quantizers import (
    EWGSQuantizer,
    LSQQuantizer,
    Quantizer,
    UniformQuantizer,
)

EXPORTABLE_QUANTIZERS = (UniformQuantizer, EWGSQuantizer, LSQQuantizer)


def _const(g, tensor: torch.Tensor):
    return g.op("Constant", value_t=tensor)


@dataclass(frozen=True, eq=False)
class WeightGrid:
    """A quantized weight as ``integers * scale`` (scale per output channel when 1-D)."""

    integers: torch.Tensor  # int8 (uint8 with an offset), the weight's shape
    scale: torch.Tensor  # float32, () or (out_channels,)
    path: str = ""
    bits: int = 0
    offset: torch.Tensor | None = None  # added after DequantizeLinear, as scale's shape


@torch.no_grad()
def weight_grid(quantizer: Quantizer, weight: torch.Tensor, path: str = "") -> WeightGrid:
    """The integers and scale that reproduce ``quantizer(weight)`` (module docstring)."""
    codes = quantizer.to_codes(weight)
    _, _, scale, mode = quantizer._affine()
    n = quantizer.n_levels
    if isinstance(quantizer, LSQQuantizer):
        qn = quantizer.qrange[0]
        integers, step = codes + qn, scale / n  # scale = (Q_p - Q_n) s
        dtype = torch.int8
    elif mode == MODE_WEIGHT and n <= 127:
        integers, step = 2 * codes - n, scale / n
        dtype = torch.int8
    elif mode == MODE_WEIGHT:  # s (2k - n) / n = (2s / n) k - s
        offset = (-scale).detach().float().clone()
        step = (2 * scale / n).detach().float().clone()
        return WeightGrid(codes.to(torch.uint8), step, path, quantizer.bits, offset)
    else:
        raise ValueError(f"weight quantizer {quantizer} has no integer grid for export")
    return WeightGrid(integers.to(dtype), step.detach().float().clone(), path, quantizer.bits)


class _DequantizedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, grid: WeightGrid):
        # Runs only inside the exporter's trace, which records this Function as its
        # symbolic and reads nothing but the output's shape (tensors held outside the
        # trace cannot be used here anyway: the tracer refuses them).
        return weight.clone()

    @staticmethod
    def symbolic(g, weight, grid: WeightGrid):
        # A layer called several times (RetinaNet's head, once per FPN level) gets one
        # copy of its integers in the file, not one per call.
        if _recording is not None and id(grid) in _recording.weight_values:
            return _recording.weight_values[id(grid)]
        _record("weights", grid)
        zero = torch.zeros(grid.scale.shape, dtype=grid.integers.dtype)
        kwargs = {"axis_i": 0} if grid.scale.dim() == 1 else {}
        value = g.op(
            "DequantizeLinear",
            _const(g, grid.integers),
            _const(g, grid.scale),
            _const(g, zero),
            **kwargs,
        )
        if grid.offset is not None:
            shape = (-1,) + (1,) * (grid.integers.dim() - 1) if grid.offset.dim() else ()
            value = g.op("Add", value, _const(g, grid.offset.reshape(shape)))
        if _recording is not None:
            _recording.weight_values[id(grid)] = value
        return value


@dataclass(frozen=True, eq=False)
class ActivationGrid:
    """``out = offset_out + dq_step * QuantizeLinear(clip(x - offset_in), q_step, zp)``."""

    offset_in: float | None
    clip_min: float | None
    clip_max: float | None
    q_step: float
    dtype: torch.dtype  # torch.uint8 or torch.int8
    dq_step: float
    offset_out: float | None
    # The PyTorch side, for the layer-wise check: code k = round(n clip((x - l) / (u - l),
    # 0, 1)) in float32, and the QuantizeLinear output is k + code_offset.
    lower: float = 0.0
    upper: float = 1.0
    n: int = 1
    code_offset: int = 0
    path: str = ""

    def as_dict(self) -> dict:
        keys = ("path", "lower", "upper", "n", "code_offset", "q_step", "dq_step")
        return {k: getattr(self, k) for k in keys}


@torch.no_grad()
def activation_grid(quantizer: Quantizer, path: str = "") -> ActivationGrid:
    lower, upper, scale, mode = (
        t.detach().float().clone() if torch.is_tensor(t) else t for t in quantizer._affine()
    )
    n = quantizer.n_levels
    torch_side = {"lower": float(lower), "upper": float(upper), "n": n, "path": path}
    full = n == 255  # QuantizeLinear saturates at the 8-bit range by itself
    if isinstance(quantizer, LSQQuantizer):
        qn, qp = quantizer.qrange
        step = float(scale) / n
        dtype = torch.int8 if qn < 0 else torch.uint8
        lo, hi = (None, None) if full else (qn * step, qp * step)
        return ActivationGrid(None, lo, hi, step, dtype, step, None, **torch_side, code_offset=qn)
    if mode not in (MODE_UNSIGNED, MODE_SIGNED):
        raise ValueError(f"activation quantizer {quantizer} has no QDQ form")
    lo, width = float(lower), float(upper - lower)
    return ActivationGrid(
        offset_in=lo if lo != 0 else None,
        clip_min=None,  # uint8 saturation clips at code 0
        clip_max=None if full else width,
        q_step=width / n,
        dtype=torch.uint8,
        dq_step=float(scale) / n,
        offset_out=lo if mode == MODE_SIGNED else None,
        **torch_side,
    )


class _QuantDequant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid: ActivationGrid):
        return x.clone()  # see _DequantizedWeight.forward

    @staticmethod
    def symbolic(g, x, grid: ActivationGrid):
        _record("activations", grid)

        def scalar(v):
            return _const(g, torch.tensor(v, dtype=torch.float32))

        if grid.offset_in is not None:
            x = g.op("Sub", x, scalar(grid.offset_in))
        if grid.clip_min is not None or grid.clip_max is not None:
            lo = scalar(grid.clip_min if grid.clip_min is not None else -math.inf)
            x = g.op("Clip", x, lo, scalar(grid.clip_max))
        zero = _const(g, torch.tensor(0, dtype=grid.dtype))
        codes = g.op("QuantizeLinear", x, scalar(grid.q_step), zero)
        out = g.op("DequantizeLinear", codes, scalar(grid.dq_step), zero)
        if grid.offset_out is not None:
            out = g.op("Add", out, scalar(grid.offset_out))
        return out


class ExportedWeightQuantizer(nn.Module):
    """Stands in for a weight quantizer during export: its output is a DQ of constants."""

    def __init__(self, quantizer: Quantizer, weight: torch.Tensor, path: str = ""):
        super().__init__()
        self.grid = weight_grid(quantizer, weight, path)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _DequantizedWeight.apply(weight, self.grid)


class ExportedActivationQuantizer(nn.Module):
    """Stands in for an activation quantizer during export: a QDQ chain in ONNX."""

    def __init__(self, quantizer: Quantizer, path: str = ""):
        super().__init__()
        self.grid = activation_grid(quantizer, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantDequant.apply(x, self.grid)


class ExportedPerLevelQuantizer(PerLevelQuantizer):
    """A :class:`PerLevelQuantizer` whose levels are export stand-ins (``stand_in``:
    :class:`ExportedActivationQuantizer` or, for a target, ``IntegerActivation``)."""

    def __init__(self, per_level: PerLevelQuantizer, path: str = "", stand_in=None):
        nn.Module.__init__(self)
        stand_in = stand_in or ExportedActivationQuantizer
        self.levels = nn.ModuleList(
            stand_in(q, f"{path}.levels.{i}") for i, q in enumerate(per_level.levels)
        )
        self._pos = 0


def _check_exportable(name: str, quantizer: nn.Module) -> None:
    inner = quantizer.levels if isinstance(quantizer, PerLevelQuantizer) else [quantizer]
    for q in inner:
        if not isinstance(q, EXPORTABLE_QUANTIZERS):
            raise ValueError(
                f"{name} is a {type(q).__name__}, which the ONNX export does not support "
                f"(exportable: {', '.join(t.__name__ for t in EXPORTABLE_QUANTIZERS)}); "
                "train that layer with QUANT.METHOD / QUANT.ACT_METHOD uniform, ewgs or lsq"
            )
        if q.enabled and not q.initialized:
            raise ValueError(
                f"{name} was never calibrated: export a trained checkpoint "
                "(MODEL.WEIGHTS from tools/train_net.py), not a freshly built model"
            )


def deploy_target(quantizer: nn.Module):
    """The deployment target ``quantizer`` (or a per-level one's levels) trained for."""
    inner = quantizer.levels[0] if isinstance(quantizer, PerLevelQuantizer) else quantizer
    return getattr(inner, "target", None)


def _export_module(path: str, quantizer: nn.Module, weight: torch.Tensor | None):
    if deploy_target(quantizer) is not None:
        if weight is not None or not quantizer.enabled:
            return None  # a target layer writes its folded integer weight itself
        if isinstance(quantizer, PerLevelQuantizer):
            return ExportedPerLevelQuantizer(quantizer, path, IntegerActivation)
        return IntegerActivation(quantizer, path)
    if isinstance(quantizer, PerLevelQuantizer):
        return ExportedPerLevelQuantizer(quantizer, path) if quantizer.enabled else None
    if not quantizer.enabled:
        return None  # 32 bits: the identity, traced as such
    if weight is not None:
        return ExportedWeightQuantizer(quantizer, weight, path)
    return ExportedActivationQuantizer(quantizer, path)


def exported_quantizers(model: nn.Module, skip: tuple[str, ...] = ("distiller",)) -> dict:
    """Every quantizer ``model`` runs at inference, by module path, checked exportable.

    Returns ``{path: (parent module, attribute, quantizer, weight or None)}``. Quantizers
    under ``skip`` (the distiller's teacher and connectors never run at inference) are
    left out.
    """
    found, skip = {}, list(skip)
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, PerLevelQuantizer):
            skip.append(name)  # its levels are exported with it
            continue
        for attr, child in module.named_children():
            if not isinstance(child, (Quantizer, PerLevelQuantizer)):
                continue
            path = f"{name}.{attr}" if name else attr
            _check_exportable(path, child)
            is_weight = isinstance(module, QUANTIZED_LAYERS) and attr == "weight_quantizer"
            found[path] = (module, attr, child, module.weight if is_weight else None)
    return found


@dataclass
class ExportRecord:
    """What an export wrote, in graph order: the i-th QuantizeLinear node of the file is
    ``activations[i]``, the i-th DequantizeLinear of a constant is ``weights[i]``."""

    quantizers: int = 0
    activations: list[ActivationGrid] = field(default_factory=list)
    weights: list[WeightGrid] = field(default_factory=list)
    weight_values: dict = field(default_factory=dict)  # id(grid) -> its DequantizeLinear
    target: str = ""  # a target-trained model: its integer graph (qdet.quantization.integer_ops)
    integer: object = None  # its IntegerRecord


_recording: ExportRecord | None = None


def _record(kind: str, grid) -> None:
    if _recording is not None:
        getattr(_recording, kind).append(grid)


@contextlib.contextmanager
def onnx_export_mode(model: nn.Module):
    """Inside, ``model``'s quantizers are their QDQ stand-ins (restored on exit).

    Yields an :class:`ExportRecord` (``quantizers`` = 0: the model exports as FP) that
    the export fills with the grids it writes.
    """
    global _recording
    swapped, save_codes = [], {}
    record = ExportRecord()
    found = exported_quantizers(model)
    targets = {t.name for _, _, q, _ in found.values() if (t := deploy_target(q)) is not None}
    if len(targets) > 1:
        raise ValueError(f"the model mixes quantizers of several targets: {sorted(targets)}")
    record.target = next(iter(targets), "")
    stack = contextlib.ExitStack()
    try:
        if record.target:
            stack.enter_context(integer_export())
            record.integer = stack.enter_context(recording())
            record.integer.paths = {id(m): name for name, m in model.named_modules()}
        for path, (module, attr, quantizer, weight) in found.items():
            stand_in = _export_module(path, quantizer, weight)
            if stand_in is not None:
                setattr(module, attr, stand_in)
                swapped.append((module, attr, quantizer))
            if isinstance(module, QUANTIZED_LAYERS):  # nothing is saved for backward
                save_codes[module] = module.save_codes
                module.save_codes = False
        record.quantizers = len(swapped)
        _recording = record
        yield record
    finally:
        _recording = None
        stack.close()
        for module, attr, quantizer in swapped:
            setattr(module, attr, quantizer)
        for module, flag in save_codes.items():
            module.save_codes = flag
