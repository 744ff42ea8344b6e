"""Training hooks (qdet/engine/hooks.py): QUANT.FREEZE_BN_ITER's hook trains a target model
on BN's running statistics and keeps them."""

import types

import pytest
import torch
from detectron2.modeling import build_model
from target_models import RETINANET, TINY, _images, _target_model

from qdet.config import load_config


def test_frozen_bn_trains_on_running_statistics_and_keeps_them():
    """QUANT.FREEZE_BN_ITER's switch: in training mode a frozen layer computes its eval
    output (running statistics, bias on its grid) and BN statistics stop moving."""
    from qdet.engine.hooks import FreezeBNHook

    model = _target_model()
    x = model.preprocess_image(_images()).tensor
    with torch.no_grad():
        want = model.backbone(x)["p3"]
    model.train()
    bn = model.backbone.bottom_up.res3[0].conv1.norm
    before = bn.running_mean.clone()

    hook = FreezeBNHook(start=5)
    hook.trainer = types.SimpleNamespace(iter=5, model=model)  # what the hook reads
    hook.before_step()
    got = model.backbone(x)["p3"]
    assert torch.equal(bn.running_mean, before)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="FREEZE_BN_ITER.*QUANT.TARGET"):
        build_model(load_config(RETINANET, [*TINY, "QUANT.FREEZE_BN_ITER", "10"]))
