"""The QAT optimizer (qdet/engine/optimizer.py): the quantizer parameters in their own Adam
group, and SGDWithAdamGroups against torch's SGD and Adam."""

import copy

import pytest
import torch
from retinanet_r18 import _retinanet_cfg

from qdet.quantization import quantize_model, quantized_layers


def test_qat_optimizer_puts_quantizer_params_in_their_own_group(fp_retinanet):
    from qdet.engine import build_qat_optimizer
    from qdet.engine.optimizer import quantizer_parameters

    model = copy.deepcopy(fp_retinanet)
    quantize_model(model, 4, 4)
    cfg = _retinanet_cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY = 0.01, 1e-4
    cfg.QUANT.BASE_LR, cfg.QUANT.WEIGHT_DECAY = 0.001, 0.0
    opt = build_qat_optimizer(cfg, model)
    qids = {id(p) for p in quantizer_parameters(model)}
    assert len(qids) == 3 * 2 * len(quantized_layers(model))
    groups = [g for g in opt.param_groups if any(id(p) in qids for p in g["params"])]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == qids
    assert groups[0]["lr"] == pytest.approx(0.001) and groups[0]["weight_decay"] == 0.0
    assert groups[0]["adam"] and not any(
        g.get("adam") for g in opt.param_groups if g is not groups[0]
    )
    # Every trainable parameter is in exactly one group.
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_sgd_with_adam_groups_matches_torch_optimizers():
    from qdet.engine.optimizer import SGDWithAdamGroups

    torch.manual_seed(0)
    w, q = torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)
    w_ref, q_ref = (t.detach().clone().requires_grad_(True) for t in (w, q))
    ours = SGDWithAdamGroups(
        [
            {"params": [w], "lr": 0.1, "weight_decay": 1e-4},
            {"params": [q], "lr": 0.01, "weight_decay": 0.0, "adam": True},
        ],
        lr=0.1,
        momentum=0.9,
    )
    sgd = torch.optim.SGD([w_ref], lr=0.1, momentum=0.9, weight_decay=1e-4)
    adam = torch.optim.Adam([q_ref], lr=0.01)
    for _ in range(5):
        grads = torch.randn(5) * 100, torch.randn(3) * 100
        for (a, b), g in zip(((w, w_ref), (q, q_ref)), grads):
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        sgd.step()
        adam.step()
        torch.testing.assert_close(w, w_ref)
        torch.testing.assert_close(q, q_ref)
    # Adam's step is about lr whatever the gradient's scale: what the quantizer group needs.
    assert (q - q_ref).abs().max() == 0
    state = ours.state_dict()
    assert state["state"][1]["step"] == 5
