"""The QAT optimizer: Detectron2's SGD param groups, plus one for the quantizer parameters.

EWGS's official code trains the quantizer parameters (l, u, s) apart from the weights, with
a smaller learning rate and no weight decay: decaying l and u would shrink every
quantization interval towards zero. ``QUANT.LR_FACTOR`` and ``QUANT.WEIGHT_DECAY`` set
that group's LR (a factor of ``SOLVER.BASE_LR``, like ``SOLVER.BIAS_LR_FACTOR``) and decay.
"""

from __future__ import annotations

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from torch import nn

from qdet.quantization.quantizers import Quantizer


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable parameters of every quantizer in ``model``."""
    return [p for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()]


def build_qat_optimizer_params(cfg: CfgNode, model: nn.Module) -> list[dict]:
    """Detectron2's default param groups, with quantizer parameters moved to their own."""
    groups = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    quant_ids = {id(p) for p in quantizer_parameters(model)}
    out = []
    quant_group = {
        "params": [],
        "lr": cfg.SOLVER.BASE_LR * cfg.QUANT.LR_FACTOR,
        "weight_decay": cfg.QUANT.WEIGHT_DECAY,
    }
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in quant_ids]
        quant_group["params"] += [p for p in group["params"] if id(p) in quant_ids]
        if rest:
            out.append({**group, "params": rest})
    if quant_group["params"]:
        out.append(quant_group)
    return out


def build_qat_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """SGD as Detectron2's ``build_optimizer`` makes it, with the quantizer group."""
    optimizer = torch.optim.SGD(
        build_qat_optimizer_params(cfg, model),
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )
    return maybe_add_gradient_clipping(cfg, optimizer)
