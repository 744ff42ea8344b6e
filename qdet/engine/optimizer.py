"""The QAT optimizer: Detectron2's SGD param groups, plus one for the quantizer parameters.

EWGS's official code trains the quantizer parameters (l, u, s) apart from the weights, with
Adam at lr 1e-5 and no weight decay. Their gradients are sums over every element of a
weight or activation tensor, hundreds of times larger than a weight's, so SGD at the
weights' learning rate moves the ranges far in a few steps; Adam's step does not depend on
the gradient's scale. Decaying l and u would shrink every quantization interval.
``QUANT.OPTIMIZER``, ``QUANT.BASE_LR`` and ``QUANT.WEIGHT_DECAY`` set that group.

``SOLVER.OPTIMIZER ADAMW`` (ViTDet's recipe) makes every group, that one included, take
AdamW steps, with ``SOLVER.LAYER_DECAY`` scaling a ViT block's LR by decay^(depth - i) and
no weight decay on position embeddings, as Detectron2's ViTDet configs do.
"""

from __future__ import annotations

from functools import partial

import torch
from detectron2.config import CfgNode
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from torch import nn

from qdet.quantization.quantizers import Quantizer


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable parameters of every quantizer in ``model``."""
    return [p for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()]


def build_qat_optimizer_params(cfg: CfgNode, model: nn.Module) -> list[dict]:
    """Detectron2's default param groups, with quantizer parameters moved to their own."""
    lr_factor_func, overrides = None, None
    if cfg.SOLVER.LAYER_DECAY != 1.0:
        lr_factor_func = partial(
            get_vit_lr_decay_rate,
            lr_decay_rate=cfg.SOLVER.LAYER_DECAY,
            num_layers=cfg.MODEL.VIT.DEPTH,
        )
    if cfg.SOLVER.OPTIMIZER == "ADAMW":
        no_decay = {"weight_decay": 0.0}
        overrides = {"pos_embed": no_decay, "rel_pos_h": no_decay, "rel_pos_w": no_decay}
    groups = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_factor_func=lr_factor_func,
        overrides=overrides,
    )
    if cfg.QUANT.OPTIMIZER not in ("adam", "sgd"):
        raise ValueError(f"QUANT.OPTIMIZER={cfg.QUANT.OPTIMIZER!r}: use 'adam' or 'sgd'")
    return with_quantizer_group(
        groups, model, cfg.QUANT.BASE_LR, cfg.QUANT.WEIGHT_DECAY, cfg.QUANT.OPTIMIZER == "adam"
    )


def with_quantizer_group(
    groups: list[dict], model: nn.Module, lr: float, weight_decay: float, adam: bool
) -> list[dict]:
    """``groups`` (Detectron2's param groups of ``model``) with the quantizer parameters
    moved to one group of their own at ``lr`` / ``weight_decay``; ``adam`` marks it for
    Adam steps (:class:`SGDWithAdamGroups`)."""
    quant_ids = {id(p) for p in quantizer_parameters(model)}
    out = []
    quant_group = {"params": [], "lr": lr, "weight_decay": weight_decay, "adam": adam}
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in quant_ids]
        quant_group["params"] += [p for p in group["params"] if id(p) in quant_ids]
        if rest:
            out.append({**group, "params": rest})
    if quant_group["params"]:
        out.append(quant_group)
    return out


class SGDWithAdamGroups(torch.optim.SGD):
    """SGD, except for param groups marked ``adam=True``, which take Adam steps
    (Kingma & Ba 2015, Algorithm 1; betas (0.9, 0.999), eps 1e-8 unless the group says).

    One optimizer, so Detectron2's LR schedulers, gradient clipping and checkpointer
    handle both kinds of group unchanged.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g.get("adam")]
        try:
            super().step()
        finally:
            self.param_groups = groups
        for group in groups:
            if group.get("adam"):
                self._adam_step(group)
        return loss

    def _adam_step(self, group: dict) -> None:
        beta1, beta2 = group.get("betas", (0.9, 0.999))
        eps, lr, decay = group.get("eps", 1e-8), group["lr"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad if not decay else p.grad.add(p, alpha=decay)
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias1 = 1 - beta1 ** state["step"]
            bias2 = 1 - beta2 ** state["step"]
            denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)


def build_qat_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """SGD as Detectron2's ``build_optimizer`` makes it, with the quantizer group; or AdamW."""
    if cfg.SOLVER.OPTIMIZER not in ("SGD", "ADAMW"):
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}: use 'SGD' or 'ADAMW'")
    if cfg.SOLVER.OPTIMIZER == "ADAMW":
        optimizer = torch.optim.AdamW(
            build_qat_optimizer_params(cfg, model),
            lr=cfg.SOLVER.BASE_LR,
            betas=(0.9, 0.999),
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
        return maybe_add_gradient_clipping(cfg, optimizer)
    optimizer = SGDWithAdamGroups(
        build_qat_optimizer_params(cfg, model),
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )
    return maybe_add_gradient_clipping(cfg, optimizer)
