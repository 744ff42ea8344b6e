"""Model surgery on Detectron2's RetinaNet: which convs are quantized, FP checkpoints load."""

import copy

import pytest
import torch
from detectron2.layers import Conv2d
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from retinanet_r18 import _retinanet_cfg
from torch import nn

from qdet.quantization import (
    QConv2d,
    QLinear,
    calibrate,
    quantization_table,
    quantize_model,
    quantized_layers,
)
from qdet.quantization.settings import quantize_kwargs

# The layers SPEC.md keeps in full precision in RetinaNet.
RETINANET_FP = {"backbone.bottom_up.stem.conv1", "head.cls_score", "head.bbox_pred"}


def _images(n=2, size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 255, (3, size, size), generator=g).float(),
            "height": size,
            "width": size,
        }
        for _ in range(n)
    ]


def test_default_selection_is_every_conv_but_stem_and_predictors(fp_retinanet):
    model = copy.deepcopy(fp_retinanet)
    all_convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    names = quantize_model(model, 4, 4)
    assert set(names) == all_convs - RETINANET_FP
    # The shortcut (downsample) convs and P6/P7 are among them.
    assert "backbone.bottom_up.res3.0.shortcut" in names
    assert {"backbone.top_block.p6", "backbone.top_block.p7"} <= set(names)
    assert any(n.startswith("head.cls_subnet") for n in names)
    assert set(quantized_layers(model)) == set(names)
    for name in RETINANET_FP:
        assert not isinstance(model.get_submodule(name), QConv2d)


def test_fpn_forward_runs_the_quantized_convs(fp_retinanet):
    # FPN reads its convs from Python lists: those must point at the quantized layers too.
    model = copy.deepcopy(fp_retinanet)
    quantize_model(model, 4, 4)
    fpn = model.backbone
    assert all(isinstance(c, QConv2d) for c in fpn.lateral_convs + fpn.output_convs)
    assert fpn.lateral_convs[0] is fpn.fpn_lateral5
    calls = []
    fpn.fpn_output3.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(_images(n=1))
    assert calls == [1]


def test_quantized_conv_keeps_class_norm_and_parameters(fp_retinanet):
    model = copy.deepcopy(fp_retinanet)
    conv_before = model.backbone.bottom_up.res3[0].conv1
    norm, weight = conv_before.norm, conv_before.weight
    quantize_model(model, 4, 4)
    q = model.backbone.bottom_up.res3[0].conv1
    assert isinstance(q, QConv2d) and isinstance(q, Conv2d) and isinstance(q, nn.Conv2d)
    assert q.norm is norm and q.weight is weight  # shared, not copied
    assert q.weight_quantizer.bits == 4 and q.input_quantizer.bits == 4


def test_fp_checkpoint_loads_with_only_quantizer_keys_missing(fp_retinanet):
    fp_state = fp_retinanet.state_dict()
    model = build_model(_retinanet_cfg())
    quantize_model(model, 4, 4)
    result = model.load_state_dict(fp_state, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys, "quantizer parameters should be new keys"
    assert all("_quantizer." in k for k in result.missing_keys)
    for k, v in fp_state.items():
        assert torch.equal(model.state_dict()[k], v)


def test_32_bit_quantized_model_reproduces_fp_outputs(fp_retinanet):
    model = copy.deepcopy(fp_retinanet)
    quantize_model(model, 32, 32)
    with torch.no_grad():
        a = fp_retinanet(_images())
        b = model(_images())
    for x, y in zip(a, b):
        assert torch.equal(x["instances"].scores, y["instances"].scores)


def test_calibrated_4bit_model_trains_and_quantizers_get_gradients(fp_retinanet):
    model = copy.deepcopy(fp_retinanet)
    quantize_model(model, 4, 4)
    batches = [_images(seed=s) for s in range(2)]
    calibrated = calibrate(model, batches, num_batches=2)
    assert all(q.initialized for q in calibrated.values())
    # Post-ReLU inputs are unsigned; FPN outputs (the head's first conv input) are signed.
    assert model.backbone.bottom_up.res3[0].conv1.input_quantizer.signed is False
    assert model.head.cls_subnet[0].input_quantizer.signed is True
    model.train()
    data = _images()
    for d in data:
        d["instances"] = _instances()
    with EventStorage():
        losses = model(data)
    sum(losses.values()).backward()
    conv = model.backbone.fpn_output3
    for q in (conv.weight_quantizer, conv.input_quantizer):
        assert q.lower.grad is not None and torch.isfinite(q.scale.grad)
        assert q.scale.grad.abs() > 0


def _instances():
    from detectron2.structures import Boxes, Instances

    inst = Instances((96, 96))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 50.0, 60.0]]))
    inst.gt_classes = torch.tensor([3])
    return inst


def test_include_exclude_and_pattern_errors(fp_retinanet):
    model = copy.deepcopy(fp_retinanet)
    names = quantize_model(model, 4, 8, include=[r"^head\."], exclude=[r"cls_score", r"bbox_pred"])
    assert names and all(n.startswith("head.") for n in names)
    assert "head.cls_score" not in names
    with pytest.raises(ValueError, match="matches no Conv2d/Linear layer") as e:
        quantize_model(copy.deepcopy(fp_retinanet), 4, 4, include=[r"backbone\.fpn_outptu"])
    assert "Near names" in str(e.value)
    with pytest.raises(ValueError, match="not a valid regex"):
        quantize_model(copy.deepcopy(fp_retinanet), 4, 4, exclude=["head.(["])
    with pytest.raises(ValueError, match="out of range"):
        quantize_model(copy.deepcopy(fp_retinanet), 4, 12)
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize_model(copy.deepcopy(fp_retinanet), 4, 4, method="pact")


def test_linear_layers_and_table():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    names = quantize_model(model, 6, 6, per_channel=True)
    assert names == ["0", "2"]
    assert isinstance(model[0], QLinear) and isinstance(model[0], nn.Linear)
    y = model(torch.randn(3, 8))
    assert y.shape == (3, 4)
    assert model[0].weight_quantizer.scale.shape == (16,)
    table = quantization_table(model)
    assert "QLinear" in table and "6/6" in table and "100.0% quantized" in table


def test_config_defaults_and_errors():
    cfg = _retinanet_cfg()
    kw = quantize_kwargs(cfg.QUANT)
    assert kw["w_bits"] == 4 and kw["a_bits"] == 4 and kw["method"] == "uniform"
    assert kw["include"] is None and kw["exclude"] is None and kw["act_signed"] is None
    cfg.QUANT.W_BITS = 9
    with pytest.raises(ValueError, match="out of range"):
        quantize_kwargs(cfg.QUANT)
    cfg.QUANT.W_BITS = 4
    cfg.QUANT.METHOD = "apot"
    with pytest.raises(ValueError, match="QUANT.METHOD"):
        quantize_kwargs(cfg.QUANT)
