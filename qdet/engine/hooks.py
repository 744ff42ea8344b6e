"""Training hooks: quantizer calibration before the first step."""

from __future__ import annotations

import logging
from itertools import islice

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from qdet.quantization import calibrate
from qdet.quantization.quantizers import Quantizer

logger = logging.getLogger(__name__)


def _unwrap(model):
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
        model = _unwrap(self.trainer.model)
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
