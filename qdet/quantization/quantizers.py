"""Quantizer modules: QFD's uniform quantizer (the default), EWGS and LSQ.

All three share one interface, so a config switch picks among them:
``Quantizer(bits, kind, signed=False, per_channel=False)``, ``forward(x)``,
``observe(x)`` / ``finish_calibration()`` (or ``init_from(x)``), and the integer-code pair
``to_codes(x)`` / ``from_codes(codes)`` used by the integer export.

Under a deployment target (``target=``, :mod:`qdet.quantization.targets`) the same
quantizers train on the grids the runtime computes: integer zero points, the narrow int8
grid for 8-bit weights (:meth:`Quantizer.integer_grid`, :meth:`Quantizer.weight_integers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from detectron2.utils.registry import Registry
from torch import nn

from qdet.quantization.calib_range import CALIB_RANGES, activation_range, sample, weight_range
from qdet.quantization.functional import (
    MODE_SIGNED,
    MODE_UNSIGNED,
    MODE_WEIGHT,
    ScaleGradient,
    decode_codes,
    fake_quantize,
    fake_quantize_values,
)
from qdet.quantization.modes import code_sink, output_substitute
from qdet.quantization.observer import CalibrationObserver
from qdet.quantization.quantizer_state import CheckpointState
from qdet.quantization.targets import DeployTarget, TargetGrids

VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)
KINDS = ("weight", "activation")
# The clip's gradient at exactly l and u: "exclusive" as torch.clamp (torch 2.14) gives,
# "inclusive" as EWGS's runs had it (see qdet.quantization.functional).
BOUND_GRADIENTS = ("exclusive", "inclusive")
# Low/high percentiles of the calibration batches that set a signed activation's l, u.
SIGNED_PERCENTILES = (0.1, 99.9)
# Beyond this many elements, percentiles are estimated on an evenly strided subsample.
_PERCENTILE_SAMPLES = 1 << 20


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in VALID_BITS:
        raise ValueError(
            f"bits={bits!r} is out of range: use an integer in 1..8, or 32 for 'not quantized'"
        )
    return bits


def _percentile(x: torch.Tensor, q: float) -> float:
    flat = x.detach().flatten().float()
    if flat.numel() > _PERCENTILE_SAMPLES:
        flat = flat[:: flat.numel() // _PERCENTILE_SAMPLES + 1]
    return torch.quantile(flat, q / 100.0).item()


def output_key(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.numel()


def mark_quantized(t: torch.Tensor, quantizer: Quantizer, codes: torch.Tensor | None = None):
    """Record on ``t`` that ``quantizer`` made it (and its uint8 ``codes``, if known): under
    a deployment target a tensor is quantized once, by its producer, and every conv that
    reads it needs that grid's step for its int32 bias (:mod:`qdet.quantization.layers`)."""
    t._qdet_quantized = (quantizer, codes)
    return t


def quantized_source(t: torch.Tensor) -> tuple[Quantizer, torch.Tensor | None] | None:
    """``(quantizer, codes or None)`` that :func:`mark_quantized` recorded on ``t``."""
    return getattr(t, "_qdet_quantized", None)


QUANTIZER_REGISTRY = Registry("QUANTIZER")
QUANTIZER_REGISTRY.__doc__ = """Quantizer classes, each with its ``method`` name (``QUANT.METHOD``,
``QUANT.ACT_METHOD``): ``@QUANTIZER_REGISTRY.register()`` adds one (the quantized ReLU,
:mod:`qdet.quantization.qrelu`, registers itself so)."""


class Quantizer(CheckpointState, CalibrationObserver, TargetGrids, nn.Module):
    """Base class: bit width, kind, the quantization map with its integer codes, and the
    forward. Mixed in: calibration bookkeeping (:mod:`qdet.quantization.observer`), the
    flags a checkpoint carries (:mod:`qdet.quantization.quantizer_state`) and the grids a
    deployment target runs (:class:`qdet.quantization.targets.TargetGrids`).

    ``signed=None`` (activations only) means "decide at calibration": signed when the
    calibration data has negative values. Post-ReLU inputs then get the unsigned map and
    FPN / LayerNorm / GELU outputs the signed one, without per-architecture rules.

    ``bound_gradient``: whether the clip passes gradient at exactly l and u
    (:data:`BOUND_GRADIENTS`).
    """

    method = ""  # the QUANT.METHOD name of a registered subclass

    def __init__(
        self,
        bits: int,
        kind: str,
        signed: bool | None = False,
        per_channel: bool = False,
        num_channels: int | None = None,
        bound_gradient: str = "exclusive",
        target: DeployTarget | None = None,
        calib_range: str = "ewgs",
    ):
        super().__init__()
        self.bits = check_bits(bits)
        self.target = target
        if calib_range not in CALIB_RANGES:
            raise ValueError(f"calib_range={calib_range!r} is not one of {CALIB_RANGES}")
        # How calibration sets the range (qdet.quantization.calib_range); the uniform
        # quantizer offers all, the others their own rule ("ewgs" here means "default").
        self.calib_range = calib_range
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {KINDS}")
        if bound_gradient not in BOUND_GRADIENTS:
            raise ValueError(f"bound_gradient={bound_gradient!r} is not one of {BOUND_GRADIENTS}")
        self.bound_gradient = bound_gradient
        if per_channel and kind != "weight":
            raise ValueError("per_channel applies to weights only (per output channel)")
        if kind == "weight" and signed:
            raise ValueError("signed= applies to activations; weights are always symmetric")
        self.kind = kind
        self.signed = signed if kind == "activation" else False
        self.per_channel = per_channel
        self.initialized = False
        self._observed: list[dict] = []
        self._empty_seen = 0  # empty calibration tensors skipped since the last finish
        # The module path of this quantizer in its model, for error messages
        # (:func:`name_quantizers`); not saved.
        self.path = ""
        shape = (num_channels,) if per_channel and num_channels else ()
        self._param_shape = shape

    @property
    def enabled(self) -> bool:
        return self.bits != 32

    @property
    def n_levels(self) -> int:
        """n, the top code: 2^b - 1, except for a deployment target's 8-bit weights, 254
        (the narrow int8 range [-127, 127]; QFD's zero-less grids of 7 bits and below,
        odd integers up to 127, already fit int8)."""
        n = 2**self.bits - 1
        if self.target is not None and self.kind == "weight" and self.bits == 8:
            return n - 1
        return n

    # -- the quantization map --------------------------------------------------------
    def _affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(l, u, scale, mode) of QFD's map out = A * v_tilde + B (see ``functional``)."""
        raise NotImplementedError

    def _gradient_delta(self) -> torch.Tensor | None:
        """EWGS's gradient-scaling factor, None for the straight-through estimator."""
        return None

    def _fake_quant(self, x: torch.Tensor, with_codes: bool = False):
        """The fake-quantized ``x``; with ``with_codes``, (it, its uint8 codes or None)."""
        lower, upper, scale, mode = self._affine()
        return fake_quantize(
            x,
            lower,
            upper,
            scale,
            self.bits,
            mode,
            delta=self._gradient_delta(),
            per_channel=self.per_channel,
            inclusive=self.bound_gradient == "inclusive",
            return_codes=with_codes,
            levels=self.n_levels,
        )

    def _view(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p.view(-1, *([1] * (x.dim() - 1))) if self.per_channel else p

    @torch.no_grad()
    def to_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes k = round(n v_hat) in 0..n (int64), n = 2^b - 1."""
        lower, upper, _, _ = self._affine()
        return self._encode(x, lower, upper).long()

    @torch.no_grad()
    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The fake-quantized values of ``codes``, with the forward's exact arithmetic."""
        lower, _, scale, mode = self._affine()
        return self._decode(codes, lower, scale, mode)

    @torch.no_grad()
    def codec(self) -> tuple[Callable, Callable]:
        """``(encode, decode)`` frozen at this moment's l, u, scale: for a tensor this
        quantizer just produced, ``decode(encode(x_q))`` equals ``x_q``."""
        lower, _, scale, mode = self._affine()
        lower, scale = (t.detach().clone() for t in (lower, scale))
        return (
            lambda x_q: self._encode_output(x_q, lower, scale, mode),
            lambda codes: self._decode(codes, lower, scale, mode),
        )

    @torch.no_grad()
    def frozen_map(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> fake-quantized x`` (no autograd) frozen at this moment's l, u, scale: for
        the tensor this quantizer was just given, it returns its output again, bit for bit
        (the same op and arithmetic)."""
        lower, upper, scale, mode = self._affine()
        lower, upper, scale = (t.detach().clone() for t in (lower, upper, scale))

        def fake_quantized(x: torch.Tensor) -> torch.Tensor:
            return fake_quantize_values(
                x, lower, upper, scale, self.bits, mode, self.per_channel, self.n_levels
            )

        return fake_quantized

    @property
    def last_used(self) -> Quantizer:
        """The quantizer that served the latest call (see ``PerLevelQuantizer``)."""
        return self

    def _encode(self, x, lower, upper) -> torch.Tensor:
        lo, hi = self._view(lower, x), self._view(upper, x)
        return torch.round(self.n_levels * torch.clamp((x - lo) / (hi - lo), 0, 1))

    def _encode_output(self, x_q, lower, scale, mode) -> torch.Tensor:
        """The codes k of an output x_q = A k / n + B of this quantizer: the inverse of
        ``_decode``, through the output map (A = alpha may differ from u - l once trained,
        so the input map ``_encode`` would give other codes)."""
        amp, shift = (2 * scale, -scale) if mode == MODE_WEIGHT else (scale, None)
        if mode == MODE_SIGNED:
            shift = lower
        shifted = x_q if shift is None else x_q - self._view(shift, x_q)
        n = self.n_levels
        return torch.clamp(torch.round(shifted * n / self._view(amp, x_q)), 0, n)

    def _decode(self, codes, lower, scale, mode) -> torch.Tensor:
        return decode_codes(codes, lower, scale, self.bits, mode, self.per_channel, self.n_levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x if self.target is None else mark_quantized(x, self)
        if x.numel() == 0 or (not self.initialized and not self._any_finite(x)):
            # Empty (a ROI head given no box), or nothing finite to set a range from in
            # inference (Detectron2's models pass inf / NaN features on): passed through,
            # the quantizer still uncalibrated. A calibrated one clamps inf to its bounds
            # and passes NaN on, as the fused op does.
            out = self._empty_output(x)
            return out if self.target is None else mark_quantized(out, self)
        if not self.initialized:
            # No calibration was run: initialise from the first non-empty tensor seen
            # (EWGS does the same on its first training batch).
            self.init_from(x, where="its first input (no calibration was run)")
        sink = code_sink()
        if sink is None:
            out, codes = self._fake_quant(x), None
        else:
            out, codes = self._fake_quant(x, with_codes=True)
            if codes is not None:
                sink[output_key(out)] = codes
        if self.target is None:
            return out
        substitute = output_substitute()
        if substitute is not None and self.kind == "activation":
            out, codes = substitute(self, x, out, False), None
        return mark_quantized(out, self, codes)

    def _any_finite(self, x: torch.Tensor) -> bool:
        """Whether ``x`` holds a finite value; in training always True, so that a
        non-finite first training batch raises (``observe``) as calibration does."""
        return self.training or bool(torch.isfinite(x).any())

    def _empty_output(self, x: torch.Tensor) -> torch.Tensor:
        """The output for an empty ``x`` (a ROI head given no box): empty, of ``x``'s shape
        and dtype, before or after calibration. The parameters enter with a zero gradient,
        so every rank of a DistributedDataParallel model uses them each step."""
        params = [p.sum() for p in self.parameters()]
        if not params:
            return x.clone()
        return x + (torch.stack(params).sum() * 0).to(x.dtype)

    def extra_repr(self) -> str:
        sign = {True: "signed", False: "unsigned", None: "auto-sign"}[self.signed]
        s = f"bits={self.bits}, kind={self.kind}"
        if self.kind == "activation":
            s += f", {sign}"
        if self.bound_gradient != "exclusive":
            s += f", bound_gradient={self.bound_gradient}"
        if self.target is not None:
            s += f", target={self.target.name}"
        return s + (", per_channel" if self.per_channel else "")


@QUANTIZER_REGISTRY.register()
class UniformQuantizer(Quantizer):
    """QFD's uniform quantizer with learnable bounds (QFD Eq. 1-5).

        v_hat = clip((v - l) / (u - l), 0, 1),   v_tilde = round(n v_hat) / n,  n = 2^b - 1
        weights: s * 2 * (v_tilde - 0.5);  unsigned activations: alpha * v_tilde;
        signed activations: l + alpha * v_tilde

    ``lower`` (l), ``upper`` (u) and ``scale`` (s or alpha) are learned; round uses the
    straight-through estimator. Initialisation follows EWGS's official code: weights
    u = -l = 3 std(W) (per channel when ``per_channel``), s = (u - l) / 2; unsigned
    activations u = 3 std(x) / sqrt(1 - 2/pi) (the half-normal's sigma from the std of a
    ReLU output), l = min(x), on the first calibration batch; signed activations l, u =
    the 0.1 / 99.9 percentiles, averaged over calibration batches; alpha = u - l.
    Unsigned u is averaged over the calls seen in calibration (EWGS uses its first batch;
    a shared detection head is called once per FPN level).
    """

    method = "uniform"  # its QUANT.METHOD name

    def __init__(
        self,
        bits,
        kind,
        signed=False,
        per_channel=False,
        num_channels=None,
        percentiles: tuple[float, float] = SIGNED_PERCENTILES,
        **options,
    ):
        super().__init__(bits, kind, signed, per_channel, num_channels, **options)
        # A signed input's calibration percentiles; (0, 100) is min / max (the logits a
        # deployment target quantizes, whose extremes are the detections).
        self.percentiles = percentiles
        self.lower = nn.Parameter(torch.full(self._param_shape, -1.0))
        self.upper = nn.Parameter(torch.full(self._param_shape, 1.0))
        self.scale = nn.Parameter(torch.full(self._param_shape, 1.0))

    @property
    def mode(self) -> int:
        if self.kind == "weight":
            return MODE_WEIGHT
        if self.target is not None and self.target.activation_zero_point == "zero":
            return MODE_SIGNED
        return MODE_SIGNED if self.signed else MODE_UNSIGNED

    def _statistics(self, x):
        if self.kind == "weight":
            if self.calib_range != "ewgs":
                return {"weight": x.clone()}
            return {"std": x.flatten(1).std(dim=1) if self.per_channel else x.std()}
        stats = {
            "min": x.min().item(),
            "std": x.std().item() if x.numel() > 1 else 0.0,
            "low": _percentile(x, self.percentiles[0]),
            "high": _percentile(x, self.percentiles[1]),
        }
        if self.calib_range != "ewgs":
            stats["sample"] = sample(x)
        return stats

    def _init_from_statistics(self, stats):
        if self.calib_range != "ewgs":
            self._init_range_rule(stats)
            return
        if self.kind == "weight":
            std = stats[-1]["std"]
            self._resize(tuple(std.shape))
            self.upper.copy_(3 * std)
            self.lower.copy_(-3 * std)
            self.scale.copy_(3 * std)  # (u - l) / 2
            return
        if self.signed:
            lo = sum(s["low"] for s in stats) / len(stats)
            hi = sum(s["high"] for s in stats) / len(stats)
        else:
            # A layer called several times per batch (RetinaNet's shared head) sees each
            # call here, so average over calls rather than keep only the first.
            lo = min(s["min"] for s in stats)
            hi = sum(3 * s["std"] for s in stats) / len(stats) / math.sqrt(1 - 2 / math.pi)
        if not hi > lo:  # constant input (e.g. an all-zero batch): keep a valid interval
            hi = lo + 1e-3
        self.lower.fill_(lo)
        self.upper.fill_(hi)
        self.scale.fill_(hi - lo)

    def _init_range_rule(self, stats):
        """``QUANT.CALIB_RANGE`` minmax / mse (:mod:`qdet.quantization.calib_range`)."""
        rule, n = self.calib_range, self.n_levels
        if self.kind == "weight":
            top = weight_range(stats[-1]["weight"], n, self.per_channel, rule)
            self._resize(tuple(top.shape))
            self.upper.copy_(top)
            self.lower.copy_(-top)
            self.scale.copy_(top)
            return
        lo, hi = activation_range([s["sample"] for s in stats], n, bool(self.signed), rule)
        self.lower.fill_(lo)
        self.upper.fill_(hi)
        self.scale.fill_(hi - lo)

    def _affine(self):
        if self.target is None or self.kind == "weight":
            return self.lower, self.upper, self.scale, self.mode
        return self._target_affine()


@QUANTIZER_REGISTRY.register()
class EWGSQuantizer(UniformQuantizer):
    """The uniform quantizer with EWGS's element-wise gradient scaling (Lee et al. 2021).

    Backward at the rounding (EWGS Eq. 5, official code's units):
    g_in = g_out * (1 + delta * sign(g_out) * (x_in - x_out)), x_in = v_hat and
    x_out = v_tilde in [0, 1]; delta = 0 is the STE. ``delta`` is a buffer (saved in
    checkpoints) refreshed during training by
    :func:`qdet.quantization.ewgs.update_ewgs_deltas` from the Hessian trace (EWGS Eq. 9).
    It starts at 0, as in EWGS's Hessian runs; a fixed ``delta`` > 0 without refreshes is
    EWGS's fixed-delta variant (its run script uses 1e-3).
    """

    method = "ewgs"  # its QUANT.METHOD name

    def __init__(
        self,
        bits,
        kind,
        signed=False,
        per_channel=False,
        num_channels=None,
        delta: float = 0.0,
        **options,
    ):
        super().__init__(bits, kind, signed, per_channel, num_channels, **options)
        if not delta >= 0:
            raise ValueError(f"EWGS delta={delta!r} must be >= 0 (0 is the STE)")
        self.register_buffer("delta", torch.tensor(float(delta)))

    def _gradient_delta(self):
        return self.delta


@QUANTIZER_REGISTRY.register()
class LSQQuantizer(Quantizer):
    """Learned step size quantization, LSQ (Esser et al. 2020, Eq. 1-5).

        v_bar = round(clip(v / s, Q_n, Q_p)) * s,  gradient of s scaled by 1/sqrt(N Q_p)

    Weights and signed activations: Q_n = -2^(b-1), Q_p = 2^(b-1) - 1; unsigned
    activations: Q_n = 0, Q_p = 2^b - 1. Init (LSQ): s = 2 mean|v| / sqrt(Q_p). Only
    ``scale`` is learned.

    LSQ is QFD's signed map with tied bounds, l = Q_n s, u = Q_p s, alpha = (Q_p - Q_n) s:
    forward values (up to float rounding) and the STE gradients w.r.t. v and s equal
    LSQ's (the gradient w.r.t. s is -v/s + round(v/s) inside the range, Q_n or Q_p
    outside), so LSQ runs on
    the same fused op. (PyTorch's fused LSQ kernel, behind torch.ao's
    ``_LearnableFakeQuantize``, instead masks the input gradient by the *rounded* value,
    which differs from the paper at the clipping edges.)
    """

    method = "lsq"  # its QUANT.METHOD name

    def __init__(self, bits, kind, signed=False, per_channel=False, num_channels=None, **options):
        super().__init__(bits, kind, signed, per_channel, num_channels, **options)
        if self.calib_range != "ewgs":
            raise ValueError("LSQ initialises its step by its own rule: QUANT.CALIB_RANGE ewgs")
        if kind == "weight" and self.enabled and bits < 2:
            raise ValueError("LSQ needs at least 2 bits for weights; use method='uniform'")
        self.scale = nn.Parameter(torch.full(self._param_shape, 1.0))
        self._numel = 1

    @property
    def qrange(self) -> tuple[int, int]:
        """(Q_n, Q_p). On a deployment target, 8-bit weights drop Q_n = -128 (the narrow
        int8 range) and a symmetric target's activations are all signed."""
        symmetric = self.target is not None and self.target.activation_zero_point == "zero"
        if self.kind == "activation" and not self.signed and not symmetric:
            return 0, 2**self.bits - 1
        top = 2 ** (self.bits - 1) - 1
        narrow = self.n_levels == 2 * top  # 8-bit weights on a target: [-127, 127]
        return (-top if narrow else -top - 1), top

    def _statistics(self, x):
        mean_abs = x.abs().flatten(1).mean(1) if self.per_channel else x.abs().mean()
        return {"min": x.min().item(), "mean_abs": mean_abs}

    def _init_from_statistics(self, stats):
        mean_abs = sum(s["mean_abs"] for s in stats) / len(stats)
        self._resize(tuple(mean_abs.shape))
        self.scale.copy_((2 * mean_abs / math.sqrt(self.qrange[1])).clamp_min(1e-8))

    def _fake_quant(self, x, with_codes: bool = False):
        self._numel = x[0].numel() if self.per_channel else x.numel()
        return super()._fake_quant(x, with_codes)

    def _affine(self):
        qn, qp = self.qrange
        step = self.scale.abs() + 1e-8  # a positive step whatever the optimizer does
        g = 1.0 / math.sqrt(self._numel * qp)
        step = ScaleGradient.apply(step, g)  # LSQ's gradient scale on s
        return qn * step, qp * step, (qp - qn) * step, MODE_SIGNED


def name_quantizers(model: nn.Module) -> None:
    """Give every quantizer of ``model`` its module path, which errors name."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            module.path = name


def quantizer_methods() -> dict[str, type[Quantizer]]:
    """``QUANT.METHOD`` / ``QUANT.ACT_METHOD`` name -> class, for every quantizer registered
    in :data:`QUANTIZER_REGISTRY` (in registration order)."""
    return {cls.method: cls for _, cls in QUANTIZER_REGISTRY}


def build_quantizer(
    method: str,
    bits: int,
    kind: str,
    signed: bool | None = False,
    per_channel: bool = False,
    num_channels: int | None = None,
    **options,
) -> Quantizer:
    """Make a quantizer by method name (``uniform`` | ``ewgs`` | ``lsq``).

    ``options``: ``bound_gradient`` (any method), ``delta`` (``ewgs``: the initial delta).
    """
    methods = quantizer_methods()
    if method not in methods:
        raise ValueError(f"unknown quantization method {method!r}: choose from {list(methods)}")
    return methods[method](bits, kind, signed, per_channel, num_channels, **options)
