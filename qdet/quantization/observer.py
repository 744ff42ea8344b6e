"""A quantizer's calibration bookkeeping: observe tensors, reduce each to statistics at
once, and set the parameters from them (mixed into
:class:`qdet.quantization.quantizers.Quantizer`; the statistics and the rule that turns
them into bounds are each quantizer's own ``_statistics`` / ``_init_from_statistics``).

Each observed tensor is reduced to a few statistics at once, so calibrating a detector on
several large batches holds no activations in memory. The model-level driver (batches
through the model, every quantizer finished) is :func:`qdet.quantization.calibrate`.
"""

from __future__ import annotations

import torch


class CalibrationObserver:
    """Calibration state: ``_observed`` statistics, ``_empty_seen`` skipped empty tensors,
    ``initialized``; reads the quantizer's ``path``, ``kind`` and ``signed``."""

    @property
    def num_observed(self) -> int:
        """Calibration tensors observed since the last ``finish_calibration``."""
        return len(self._observed)

    def observe(self, x: torch.Tensor, where: str = "calibration") -> None:
        """Record one calibration tensor (weights: the weight; activations: a batch).

        An empty tensor (a mask head that got no ROI) is skipped: the layer calibrates on
        the next non-empty one. Non-finite values raise ``FloatingPointError`` naming this
        layer and ``where`` (the calibration batch): bounds of inf / NaN would quantize
        everything to one code."""
        if x.numel() == 0:
            self._empty_seen += 1
            return
        with torch.no_grad():
            finite = torch.isfinite(x)
            if not bool(finite.all()):
                bad = x.numel() - int(finite.sum())
                raise FloatingPointError(
                    f"{self.path or type(self).__name__}: {bad} of {x.numel()} values of its "
                    f"input are inf or NaN in {where}; bounds cannot be set from them. Find "
                    "where they arise (the input images, a diverged checkpoint) before "
                    "calibrating"
                )
            self._observed.append(self._statistics(x.detach().float()))

    @property
    def num_empty_skipped(self) -> int:
        """Empty tensors ``observe`` skipped since the last ``finish_calibration``."""
        return self._empty_seen

    def finish_calibration(self) -> None:
        """Set the parameters from what ``observe`` recorded, then forget it."""
        if not self._observed:
            seen = f" ({self._empty_seen} empty ones were skipped)" if self._empty_seen else ""
            raise RuntimeError(
                f"{self.path or type(self).__name__}: finish_calibration() called before any "
                f"non-empty observe(x){seen}"
            )
        stats = self._observed
        if self.kind == "activation" and self.signed is None:
            self.signed = bool(min(s["min"] for s in stats) < 0)
        with torch.no_grad():
            self._init_from_statistics(stats)
        self._observed = []
        self._empty_seen = 0
        self.initialized = True

    def init_from(self, x: torch.Tensor, where: str = "calibration") -> None:
        """Calibrate from one (non-empty, finite) tensor."""
        self.observe(x, where)
        self.finish_calibration()

    def _statistics(self, x: torch.Tensor) -> dict:
        raise NotImplementedError

    def _init_from_statistics(self, stats: list[dict]) -> None:
        raise NotImplementedError
