"""BN folded into a quantized conv, and the int32 bias a runtime adds: what QAT computes
under a deployment target (:mod:`qdet.quantization.targets`).

A BN with running statistics is a per-channel affine map, BN(z) = f z + (beta - f mu) with
f = gamma / sqrt(var + eps). Folded into the preceding conv (weight W, bias b):

    W' = f W,   b' = beta + f (b - mu)

qdet quantizes W, then folds: the deployed weight is f * Q(W) = (|f| s_w) * (sign(f) q),
the integers q of Q(W) = s_w q with per-channel step |f| s_w. That is exact by
construction, for a per-tensor weight quantizer too (the runtime takes a step per output
channel), so conv-then-BN in eval *is* the folded integer conv, to float rounding, and
training needs no folded-weight simulation (Jacob et al. 2018 fake-quantize W' instead,
whose grid then moves with the batch statistics). What training with batch statistics
(trainable BN) still differs in is BN's usual train / eval gap; ``QUANT.FREEZE_BN_ITER``
switches the folded layers to running statistics for the last iterations, so the model
trains as it deploys.

The bias: the runtime adds b' as int32 at step s_x s_w'[c] (s_x the input's step), so QAT
adds round(b' / (s_x s_w'[c])) s_x s_w'[c], with the gradient passing straight through.
"""

from __future__ import annotations

import torch
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from torch import nn

INT32_MAX = 2**31 - 1
FOLDABLE = (nn.BatchNorm2d, FrozenBatchNorm2d, CycleBatchNormList)  # SyncBN is a BatchNorm2d


def foldable(norm: nn.Module | None) -> bool:
    """Whether a deployment target folds ``norm`` (none, or a BN kind) into the conv before
    it; a LayerNorm / GroupNorm normalises with each input's statistics and cannot be."""
    return norm is None or isinstance(norm, FOLDABLE)


def check_foldable(norm: nn.Module | None, path: str) -> None:
    """Refuse a norm a deployment target cannot fold into the conv before it."""
    if foldable(norm):
        if isinstance(norm, CycleBatchNormList) and not norm._affine:
            raise ValueError(f"{path}: a CycleBatchNormList without affine cannot be folded")
        return
    raise ValueError(
        f"{path}: its {type(norm).__name__} normalises with statistics of each input "
        "(GroupNorm, LayerNorm), so it cannot be folded into the conv's integer weights "
        "and the conv would run in float. Use BN / SyncBN / FrozenBN (MODEL.*.NORM) or "
        "QUANT.TARGET ''"
    )


def uses_running_statistics(norm: nn.Module) -> bool:
    """Whether ``norm`` normalises with fixed statistics now (eval mode, or FrozenBN)."""
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    if isinstance(norm, CycleBatchNormList):
        return not norm[norm._pos].training
    return not norm.training


def norm_affine(norm: nn.Module, advance: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, c)`` with BN(z) = f z + c under running statistics (module docstring).
    A :class:`CycleBatchNormList` answers for its current level and, with ``advance``,
    moves to the next, as its forward would."""
    if isinstance(norm, CycleBatchNormList):
        bn = norm[norm._pos]
        if advance:
            norm._pos = (norm._pos + 1) % len(norm)
        inv = torch.rsqrt(bn.running_var + bn.eps)
        f = norm.weight * inv
        return f, norm.bias - bn.running_mean * f
    f = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    return f, norm.bias - norm.running_mean * f


def integer_bias(bias: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, values)``: ``bias`` on the int32 grid of ``step`` (per channel). Values
    pass the gradient straight through; codes are clamped to int32."""
    with torch.no_grad():
        codes = torch.clamp(torch.round(bias / step), -INT32_MAX, INT32_MAX)
    values = bias + (codes * step - bias).detach()
    return codes, values


def folded_steps(
    input_step: float, weight_step: torch.Tensor, fold: torch.Tensor | None, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s_w', s_x s_w')`` per output channel, float32: the folded weight's step
    s_w' = |f| s_w (s_w where f is 0: that channel's integers are all 0 then, and its bias
    stays representable) and the int32 bias step. The export writes these very values."""
    step = weight_step.detach().float().expand(channels)
    if fold is not None:
        scaled = step * fold.detach().float().abs()
        step = torch.where(scaled > 0, scaled, step)
    return step, torch.tensor(input_step, dtype=torch.float32) * step
