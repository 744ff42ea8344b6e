"""Detectron2's ResNet, FPN and RetinaNet head in deployable form (qdet/modeling/deployable.py):
each tensor between quantized convs quantized once by its producer, a target model trains
and loads an FP checkpoint, and the layers a target cannot run are named."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.backbone.swin import WindowAttention
from target_models import RETINANET, TINY, VITDET, _images, _target_model

from qdet.config import load_config
from qdet.modeling.deployable import DeployBasicBlock, DeployFPN
from qdet.modeling.deployable_attention import attention_is_quantized
from qdet.quantization import QConv2d, calibrate
from qdet.quantization.layers import QLinear, QuantizedInput
from qdet.quantization.quantizers import Quantizer


def test_tensors_between_quantized_convs_are_quantized_once_by_their_producer():
    model = _target_model()
    blocks = [m for m in model.modules() if isinstance(m, DeployBasicBlock)]
    assert len(blocks) == 8
    for block in blocks:
        assert isinstance(block.conv1.input_quantizer, QuantizedInput)
        assert isinstance(block.conv2.input_quantizer, Quantizer)  # one reader: its own
        if block.shortcut is not None:
            assert isinstance(block.shortcut.input_quantizer, QuantizedInput)
    fpn = next(m for m in model.modules() if isinstance(m, DeployFPN))
    assert len(fpn.sum_quantizers) == 2 and len(fpn.output_quantizers) == 3
    # A conv whose input arrives quantized gets a tensor carrying the quantizer that made
    # it; a conv with its own input quantizer gets a float tensor (nothing quantizes twice).
    seen = []

    def record(layer, inputs):
        arrives = isinstance(layer.input_quantizer, QuantizedInput)
        seen.append((arrives, getattr(inputs[0], "_qdet_quantized", None) is not None))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, QConv2d)]
    with torch.no_grad():
        model(_images(1))
    for h in hooks:
        h.remove()
    assert sum(a for a, _ in seen) > 20 and sum(not a for a, _ in seen) >= 20
    assert all(arrives == tagged for arrives, tagged in seen)


def test_a_target_model_trains_a_step_and_loads_an_fp_checkpoint():
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    fp = build_model(load_config(RETINANET, [*TINY, "QUANT.ENABLED", "False"]))
    model = build_model(load_config(RETINANET, [*TINY, "QUANT.TARGET", "onnxruntime"]))
    missing, unexpected = model.load_state_dict(fp.state_dict(), strict=False)
    assert not unexpected and all("quantizer" in k for k in missing)
    batch = _images()
    for d in batch:
        d["instances"] = Instances((64, 96))
        d["instances"].gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 40.0, 50.0]]))
        d["instances"].gt_classes = torch.tensor([3])
    calibrate(model, [batch], num_batches=1)
    model.train()
    with EventStorage():
        losses = model(batch)
    sum(losses.values()).backward()
    grads = [
        m.residual_quantizer.upper.grad for m in model.modules() if isinstance(m, DeployBasicBlock)
    ]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_layers_a_target_cannot_fold_or_fuse_are_named():
    with pytest.raises(ValueError, match=r"cls_subnet\.1.*GroupNorm.*cannot be folded"):
        build_model(
            load_config(
                RETINANET, [*TINY, "QUANT.TARGET", "onnxruntime", "MODEL.RETINANET.NORM", "GN"]
            )
        )
    # An FPN's GroupNorm / LayerNorm does not fold either, but there the conv runs as an
    # integer op with its output quantized and the norm in float after.
    model = build_model(
        load_config(RETINANET, [*TINY, "QUANT.TARGET", "onnxruntime", "MODEL.FPN.NORM", "GN"])
    )
    assert all(hasattr(c, "norm_input_quantizer") for c in model.backbone.lateral_convs)
    with pytest.raises(ValueError, match=r"backbone\.\S+: FAQD's quantized ReLU.*no integer form"):
        build_model(
            load_config(
                RETINANET, [*TINY, "QUANT.TARGET", "onnxruntime", "QUANT.ACT_METHOD", "qrelu"]
            )
        )
    with pytest.raises(ValueError, match=r"no quantized layer: QUANT.TARGETS / QUANT.EXCLUDE"):
        opts = ["MODEL.WEIGHTS", "", "QUANT.TARGET", "onnxruntime", "QUANT.W_BITS", "8"]
        opts += ["QUANT.A_BITS", "8", "QUANT.EXCLUDE", "['attn', 'mlp']"]
        build_model(load_config(VITDET, opts))
    with pytest.raises(ValueError, match=r"FUSE_TYPE 'avg'"):
        build_model(
            load_config(
                RETINANET, [*TINY, "QUANT.TARGET", "onnxruntime", "MODEL.FPN.FUSE_TYPE", "avg"]
            )
        )


def test_attention_and_rcnn_heads_a_target_cannot_run_in_integers_are_named():
    """An attention with only one of qkv / proj quantized, or dropout on its probabilities,
    has no integer form: a build-time error naming the layer and the fix."""
    opts = ["MODEL.WEIGHTS", "", "QUANT.TARGET", "onnxruntime", "QUANT.W_BITS", "8"]
    opts += ["QUANT.A_BITS", "8"]
    with pytest.raises(ValueError, match=r"blocks\.0\.attn: only \S+attn\.qkv is quantized"):
        build_model(
            load_config(VITDET, [*opts, "QUANT.TARGETS", "[]", "QUANT.INCLUDE", "['attn.qkv']"])
        )
    attention = WindowAttention(16, (2, 2), num_heads=2, attn_drop=0.1)
    for name in ("qkv", "proj"):
        setattr(attention, name, QLinear.from_float(getattr(attention, name), 8, 8))
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.attn_drop: dropout .*p=0\.1"):
        attention_is_quantized(attention, "blocks.1.attn")


def test_a_pyramid_converts_its_stage_convs_only():
    """ViTDet's SimpleFeaturePyramid converted (QUANT.INCLUDE ['simfp']): each stage conv
    quantizes its output for its float LayerNorm; the conversion covers its stages, not the
    ViT it holds."""
    from qdet.modeling.deployable_pyramid import covered_paths

    opts = ["MODEL.WEIGHTS", "", "QUANT.TARGET", "onnxruntime", "QUANT.W_BITS", "8"]
    opts += ["QUANT.A_BITS", "8"]
    model = build_model(load_config(VITDET, [*opts, "QUANT.INCLUDE", "['simfp']"]))
    convs = {n: m for n, m in model.backbone.named_modules() if isinstance(m, QConv2d)}
    stages = [n for n, _ in model.backbone.named_children() if n.startswith("simfp_")]
    assert len(stages) == 3 and len(convs) == 2 * len(stages)
    assert all(type(m.norm).__name__ == "LayerNorm" for m in convs.values())
    assert all(m._modules.get("norm_input_quantizer") is not None for m in convs.values())
    covered = set(covered_paths(model.backbone))
    assert set(convs) <= covered and set(stages) <= covered
    assert not any(p.startswith("net") for p in covered) and "net.patch_embed.proj" not in covered
