"""qdet's post-training quantization under a deployment target: an FP checkpoint built with
``QUANT.TARGET`` and calibrated only, nothing trained (the deployment study's ``ptq_qdet``
rows, the export benchmark's ``--qdet-calibrated`` models). A trained target model has the
same graph, so this one's latency is a trained one's."""

from __future__ import annotations

from collections.abc import Iterable

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from torch import nn

from qdet.quantization import calibrate


def target_opts(w_bits: int, a_bits: int, target: str = "onnxruntime") -> list[str]:
    """The overrides that make an FP config's model W``w_bits``/A``a_bits`` for ``target``."""
    opts = ["QUANT.ENABLED", "True", "QUANT.TARGET", target]
    return opts + ["QUANT.W_BITS", str(w_bits), "QUANT.A_BITS", str(a_bits)]


def calibrated_target_model(
    cfg: CfgNode, weights: str, batches: Iterable, num_batches: int
) -> nn.Module:
    """``cfg``'s model (``QUANT.TARGET`` set) with the FP ``weights``, its quantizers
    calibrated on ``num_batches`` of ``batches``; in eval mode."""
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    calibrate(model, batches, num_batches=num_batches)
    return model.eval()
