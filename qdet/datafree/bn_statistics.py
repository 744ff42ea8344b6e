"""The BN-statistics loss of data-free quantization (GDFQ; AKT Eq. 6): images whose
per-channel statistics at every BN layer of the frozen teacher match the running statistics
that layer recorded on the real training data."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

BN_TYPES = (nn.BatchNorm2d, FrozenBatchNorm2d)


def bn_statistics_loss(
    stats: list[tuple[torch.Tensor, ...]], normalize: bool = False, eps: float = 1e-5
) -> torch.Tensor:
    """GDFQ's BN-statistics loss: the mean over BN layers of ``MSE(mu, running_mean) +
    MSE(var, running_var)``; ``stats`` holds (mu, var, running_mean, running_var) per layer,
    mu and var the batch's per-channel mean and biased variance of the layer's input.

    ``normalize``: each channel's errors in its own units instead, ``MSE((mu - running_mean)
    / sigma, 0) + MSE(var / sigma^2, 1)`` with ``sigma^2 = running_var + eps``, so that every
    layer counts alike whatever its scale (a detector trained from scratch has layers whose
    running variance is 1000x another's, and those would be the whole of GDFQ's loss)."""
    if normalize:
        terms = [
            ((mu - rm) ** 2 / (rv + eps)).mean() + (var / (rv + eps) - 1).square().mean()
            for mu, var, rm, rv in stats
        ]
    else:
        terms = [F.mse_loss(mu, rm) + F.mse_loss(var, rv) for mu, var, rm, rv in stats]
    return torch.stack(terms).mean()


def holds_statistics(layer: nn.Module) -> bool:
    """Whether a BN layer's running statistics were ever updated: a fresh layer (and
    Detectron2's FrozenBatchNorm2d built without ImageNet weights) holds mean 0, var 1."""
    return not (torch.all(layer.running_mean == 0) and torch.all(layer.running_var == 1))


class BNStatistics:
    """Forward pre-hooks on every BN layer of ``model`` (BatchNorm2d, and Detectron2's
    FrozenBatchNorm2d, which keeps running statistics too) that record, while
    ``recording``, the per-channel batch mean and biased variance of the layer's input.

    ``where`` names the model in the errors (e.g. "the teacher's backbone"). A model with no
    BN layer, or whose BN layers all hold the initial statistics (mean 0, var 1: never
    trained with BN, e.g. FrozenBN from scratch), has nothing to match: a ValueError. Layers
    holding the initial statistics beside trained ones (frozen before training,
    MODEL.BACKBONE.FREEZE_AT) are left out: their statistics say nothing of the data.
    ``normalize``: :func:`bn_statistics_loss`'s option."""

    def __init__(self, model: nn.Module, where: str = "the teacher", normalize: bool = False):
        self.normalize = normalize
        self.layers = [m for m in model.modules() if isinstance(m, BN_TYPES)]
        if not self.layers:
            raise ValueError(
                f"{where} has no BatchNorm layers: the BN-statistics loss needs the running "
                "statistics of a model trained with BN (norm 'BN', or 'FrozenBN' loaded from "
                "BN-trained weights); set ZEROSHOT.BNS_WEIGHT 0 to train without it"
            )
        trained = [m for m in self.layers if holds_statistics(m)]
        if not trained:
            raise ValueError(
                f"the {len(self.layers)} BN layers of {where} all hold the initial running "
                "statistics (mean 0, var 1): nothing to match. Load the teacher's trained "
                "weights (DISTILL.TEACHER_WEIGHTS), or set ZEROSHOT.BNS_WEIGHT 0"
            )
        self.skipped, self.layers = len(self.layers) - len(trained), trained
        self.recording, self.stats = False, []
        self._handles = [m.register_forward_pre_hook(self._record) for m in self.layers]

    def _record(self, module, inputs) -> None:
        if self.recording:
            x = inputs[0]
            mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            self.stats.append((mu, var, module.running_mean, module.running_var))

    def loss(self) -> torch.Tensor:
        """:func:`bn_statistics_loss` of what was recorded since the last call."""
        stats, self.stats = self.stats, []
        return bn_statistics_loss(stats, self.normalize)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
