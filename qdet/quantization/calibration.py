"""Calibration: initialise every quantizer of a model before training.

Weight quantizers are initialised from their weights; input quantizers from the
activations of a few batches, observed in full precision (quantization is off while
observing, so every layer sees the statistics it will see at the start of FP fine-tuning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from qdet.quantization.layers import QUANTIZED_LAYERS
from qdet.quantization.quantizers import Quantizer, name_quantizers

logger = logging.getLogger(__name__)


def init_weight_quantizers(model: nn.Module) -> int:
    """Initialise every weight quantizer from its layer's weight; returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, QUANTIZED_LAYERS) and m.weight_quantizer.enabled:
            m.weight_quantizer.init_from(m.weight)
            count += 1
    return count


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable,
    num_batches: int = 4,
    run: Callable[[nn.Module, object], object] | None = None,
) -> dict[str, Quantizer]:
    """Initialise all quantizers of ``model`` from ``num_batches`` batches of ``batches``.

    ``run(model, batch)`` performs one forward (default: ``model(batch)``). The model is
    put in eval mode while observing, so BN statistics are untouched, then restored.
    Returns name -> activation quantizer that was calibrated.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches}: calibration needs at least one batch")
    run = run or (lambda m, b: m(b))
    name_quantizers(model)
    init_weight_quantizers(model)
    # Every enabled activation quantizer: layer inputs, and standalone ones such as a
    # teacher's feature quantizer.
    inputs = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, Quantizer) and m.kind == "activation" and m.enabled
    }

    seen = 0

    def observe(quantizer, _args):
        quantizer.observe(_args[0], where=f"calibration batch {seen + 1} of {num_batches}")

    # Observe through pre-hooks while every quantizer is off (a 32-bit quantizer is the
    # identity), so the statistics are those of the FP model being fine-tuned.
    handles = [q.register_forward_pre_hook(observe) for q in inputs.values()]
    all_quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    saved_bits = [q.bits for q in all_quantizers]
    for q in all_quantizers:
        q.bits = 32
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if seen == num_batches:
                break
            run(model, batch)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for q, bits in zip(all_quantizers, saved_bits):
            q.bits = bits
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibrate() got no batches: the data iterable is empty")
    never_called = [n for n, q in inputs.items() if q.num_observed == q.num_empty_skipped == 0]
    if never_called:
        raise RuntimeError(f"these quantized layers never ran during calibration: {never_called}")
    only_empty = {n: q.num_empty_skipped for n, q in inputs.items() if q.num_observed == 0}
    if only_empty:
        raise RuntimeError(
            f"{len(only_empty)} quantized layers got only empty inputs in {seen} calibration "
            f"batches, so nothing sets their range (calls per layer: {only_empty}): a ROI "
            "head gets no box when no proposal or detection survives. Calibrate on more "
            "batches (QUANT.CALIB_BATCHES, here num_batches), or start from trained "
            "weights (MODEL.WEIGHTS) whose heads detect something"
        )
    for q in inputs.values():
        q.finish_calibration()
    logger.info("Calibrated %d input quantizers on %d batches", len(inputs), seen)
    return inputs
