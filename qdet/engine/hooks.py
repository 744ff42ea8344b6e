"""Training hooks: quantizer calibration before the first step, EWGS's delta refresh."""

from __future__ import annotations

import logging
import math
import time
from itertools import islice

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from qdet.quantization import calibrate, update_ewgs_deltas
from qdet.quantization.ewgs import preserved_rng
from qdet.quantization.layers import QConv2d
from qdet.quantization.quantizers import EWGSQuantizer, Quantizer

logger = logging.getLogger(__name__)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def sync_quantizers_from_main(model: torch.nn.Module) -> None:
    """Give every process rank 0's quantizer parameters and sign choices.

    Each process calibrated on its own batches; DDP only broadcasts parameters when it is
    built, before calibration, so without this the ranks would train different quantizers.
    """
    if comm.get_world_size() == 1:
        return
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    signs = comm.all_gather([q.signed for q in quantizers])[0]
    for q, signed in zip(quantizers, signs):
        q.signed = signed
        for p in q.parameters():
            torch.distributed.broadcast(p.data, src=0)


class CalibrationHook(HookBase):
    """Initialise uncalibrated quantizers from ``num_batches`` training batches.

    Runs once, before the first step and after the weights are loaded (an FP checkpoint
    or a resumed one). A resumed checkpoint has calibrated quantizers: nothing is redone.
    """

    def __init__(self, build_loader, num_batches: int):
        self._build_loader = build_loader
        self._num_batches = num_batches

    def before_train(self):
        model = unwrap_model(self.trainer.model)
        pending = [
            m
            for m in model.modules()
            if isinstance(m, Quantizer) and m.enabled and not m.initialized
        ]
        if not pending:
            return
        logger.info("Calibrating %d quantizers on %d batches", len(pending), self._num_batches)
        batches = islice(iter(self._build_loader()), self._num_batches)
        calibrate(model, batches, num_batches=self._num_batches)
        sync_quantizers_from_main(model)


def epoch_iterations(data_loader, images_per_batch: int) -> int:
    """Iterations in one epoch of ``data_loader``'s dataset at ``images_per_batch`` images a
    step (all processes together). Detectron2's training loader is infinite; the map-style
    dataset inside it knows its length."""
    node = data_loader
    while node is not None:
        try:
            return max(math.ceil(len(node) / images_per_batch), 1)
        except TypeError:  # an iterable dataset or loader: look inside
            node = getattr(node, "dataset", None)
    raise ValueError(
        "cannot tell the epoch length of this training loader: set QUANT.EWGS_UPDATE_PERIOD "
        "to the number of iterations between EWGS delta refreshes"
    )


class EWGSDeltaHook(HookBase):
    """Refreshes every EWGS quantizer's delta (EWGS Eq. 9) from the Hessian trace every
    ``period`` iterations, on ``num_batches`` training batches.

    As EWGS's loop: delta keeps its initial value (``QUANT.EWGS_DELTA``, 0 = STE) through
    the first period, then is refreshed at every period boundary (not after the last
    step). Batches come from a loader of its own (``build_loader()``, built at the first
    refresh), so the training batches and every random state stay as they would be
    without the hook. Every process
    estimates on its own batches and all take the mean (:func:`update_ewgs_deltas`). It
    runs before the checkpointer, so a checkpoint taken at the same iteration holds the new
    deltas. Logs one summary line per refresh and TensorBoard scalars ``ewgs/...``.
    """

    def __init__(
        self,
        build_loader,
        period: int,
        num_batches: int,
        estimator: str = "per_layer",
        logged_layers: int = 3,
    ):
        if period < 1:
            raise ValueError(f"EWGS delta refresh period must be >= 1 iteration, got {period}")
        self._build_loader = build_loader
        self._batches = None
        self.period = period
        self.num_batches = num_batches
        self.estimator = estimator
        self._logged_layers = logged_layers

    def after_step(self):
        done = self.trainer.iter + 1
        if done % self.period == 0 and done < self.trainer.max_iter:
            self.refresh()

    def refresh(self) -> dict[str, float]:
        model = unwrap_model(self.trainer.model)
        if not any(isinstance(m, EWGSQuantizer) and m.enabled for m in model.modules()):
            return {}
        if self._batches is None:
            with preserved_rng():  # a new loader iterator draws its seed from torch's RNG
                self._batches = iter(self._build_loader())
        start = time.perf_counter()
        deltas = update_ewgs_deltas(
            model,
            lambda batch: sum(model(batch).values()),
            self._batches,
            self.num_batches,
            estimator=self.estimator,
        )
        self._log(model, deltas, time.perf_counter() - start)
        return deltas

    def _log(self, model, deltas: dict[str, float], seconds: float) -> None:
        kinds = {n: m.kind for n, m in model.named_modules() if isinstance(m, EWGSQuantizer)}
        storage = self.trainer.storage
        parts = []
        for kind in ("weight", "activation"):
            names = [n for n in deltas if kinds[n] == kind]
            if not names:
                continue
            values = [deltas[n] for n in names]
            mean = sum(values) / len(values)
            parts.append(
                f"{len(values)} {kind} quantizers mean {mean:.4g} "
                f"[min {min(values):.4g}, max {max(values):.4g}]"
            )
            storage.put_scalar(f"ewgs/{kind}_delta_mean", mean, smoothing_hint=False)
            # A few layers through the network: first, middle, last.
            k = self._logged_layers
            picks = {names[round(i * (len(names) - 1) / max(k - 1, 1))] for i in range(k)}
            for name in picks:
                storage.put_scalar(f"ewgs/{name}", deltas[name], smoothing_hint=False)
        logger.info(
            "EWGS delta refreshed after iteration %d on %d batches (%s, %.1f s): %s",
            self.trainer.iter + 1,
            self.num_batches,
            self.estimator,
            seconds,
            "; ".join(parts),
        )


class FreezeBNHook(HookBase):
    """``QUANT.FREEZE_BN_ITER``: from iteration ``start`` on, every target-trained conv
    (:attr:`qdet.quantization.QConv2d.target`) folds its BN with the running statistics in
    training too, and those stop updating, so the last iterations train the model that
    deploys (Krishnamoorthi 2018, Sec. 3.2). Applied again on resume past ``start``."""

    def __init__(self, start: int):
        self.start = start

    def before_step(self):
        if self.trainer.iter < self.start:
            return

        layers = [
            m
            for name, m in unwrap_model(self.trainer.model).named_modules()
            if isinstance(m, QConv2d) and m.target is not None and not name.startswith("distiller")
        ]
        pending = [m for m in layers if not m.norm_frozen]
        if pending:
            for layer in pending:
                layer.norm_frozen = True
            logger.info(
                "QUANT.FREEZE_BN_ITER: %d target convs fold their BN with running statistics "
                "from iteration %d on",
                len(pending),
                self.trainer.iter,
            )
