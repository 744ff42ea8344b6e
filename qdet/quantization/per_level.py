"""Per-level activation quantizers for a layer shared across FPN levels.

RetinaNet's head runs the same convs on p3 ... p7, whose activation ranges differ by
level; one input quantizer must then cover them all. ``PerLevelQuantizer`` holds one
quantizer per level and cycles through them on each call, as Detectron2's
``CycleBatchNormList`` does for BN: the caller must call it once per level, in order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qdet.quantization.quantizers import Quantizer


class PerLevelQuantizer(nn.Module):
    """``levels`` quantizers used in turn: call i uses quantizer ``i % levels``."""

    def __init__(self, levels: int, make: Callable[[], Quantizer]):
        super().__init__()
        self.levels = nn.ModuleList(make() for _ in range(levels))
        self._pos = 0

    @property
    def bits(self) -> int:
        return self.levels[0].bits

    @property
    def enabled(self) -> bool:
        return self.levels[0].enabled

    @property
    def last_used(self) -> Quantizer:
        return self.levels[(self._pos - 1) % len(self.levels)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.levels[self._pos](x)
        self._pos = (self._pos + 1) % len(self.levels)
        return out

    def extra_repr(self) -> str:
        return f"levels={len(self.levels)}"
