"""Degenerate batches through every registered quantized meta-architecture at 4 bits, as
Detectron2's own model tests feed its models: images without instances, half-empty
batches, ROI heads that get no box, inf / NaN pixels, evaluation with nothing detected;
each before calibration (quantizers initialise lazily) and after it."""

from __future__ import annotations

import os

import pytest
import torch
from detectron2 import model_zoo
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from qdet.config import load_config
from qdet.quantization import Quantizer, build_quantizer, calibrate, quantize_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 64, 96
SMALL = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "QUANT.W_BITS", "4", "QUANT.A_BITS", "4"]
ARCHS = {
    "retinanet": (os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_baseline.yaml"), []),
    # Detectron2's own Mask R-CNN config on qdet's meta-architecture, every conv quantized
    # (the mask head's first conv is where an empty ROI batch used to fail).
    "mask_rcnn": (
        model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"),
        ["MODEL.META_ARCHITECTURE", "QuantMaskRCNN", "QUANT.ENABLED", "True"]
        + ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.RESNETS.DEPTH", "18"]
        + ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "32"]
        + ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32"]
        + ["MODEL.ROI_BOX_HEAD.FC_DIM", "64", "INPUT.MASK_FORMAT", "bitmask"],
    ),
    "vitdet": (os.path.join(ROOT, "configs/digits/vitdet_tiny_4bit.yaml"), []),
    "swin": (os.path.join(ROOT, "configs/digits/swin_tiny_4bit.yaml"), []),
}


def _model(arch: str) -> nn.Module:
    config, opts = ARCHS[arch]
    torch.manual_seed(0)
    model = build_model(load_config(config, [*SMALL, *opts]))
    assert any(isinstance(m, Quantizer) and m.enabled for m in model.modules())
    return model


def _image(seed: int, instances: int, masks: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    target = Instances((H, W))
    boxes = torch.tensor([[8.0, 8.0, 40.0, 44.0], [50.0, 12.0, 90.0, 60.0]])[:instances]
    target.gt_boxes = Boxes(boxes)
    target.gt_classes = torch.arange(instances) % 3
    if masks:
        bitmaps = torch.zeros(instances, H, W, dtype=torch.bool)
        for bitmap, (x0, y0, x1, y1) in zip(bitmaps, boxes.int().tolist()):
            bitmap[y0:y1, x0:x1] = True
        target.gt_masks = BitMasks(bitmaps)
    image = torch.randint(0, 256, (3, H, W), generator=g).float()
    return {"image": image, "height": H, "width": W, "instances": target}


def _batch(arch: str, counts: tuple[int, ...], seed: int = 0) -> list[dict]:
    masks = arch != "retinanet"
    return [_image(seed + i, n, masks) for i, n in enumerate(counts)]


def _calibrated(arch: str) -> nn.Module:
    model = _model(arch)
    calibrate(model, [_batch(arch, (2, 1))], num_batches=1)
    return model


def _train_step(model: nn.Module, batch: list[dict]) -> dict[str, torch.Tensor]:
    model.train()
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total), {k: float(v) for k, v in losses.items()}
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # Every quantizer that ran takes part in the gradient (a zero one for a layer given an
    # empty input), as DistributedDataParallel needs of every parameter each step.
    for name, q in model.named_modules():
        if isinstance(q, Quantizer) and q.enabled and q.initialized:
            for p in q.parameters():
                if p.requires_grad:
                    assert p.grad is not None, f"{name}: no gradient"
    return losses


def _no_proposals(model: nn.Module) -> None:
    """Every RPN proposal falls away (a box must be larger than the image to survive)."""
    model.proposal_generator.min_box_size = 10 * max(H, W)


def _nothing_detected(model: nn.Module) -> None:
    if hasattr(model, "roi_heads"):
        model.roi_heads.box_predictor.test_score_thresh = 1.1
    else:
        model.test_score_thresh = 1.1


def _check_empty_detections(model: nn.Module, arch: str) -> None:
    model.eval()
    with torch.no_grad():
        outputs = model(
            [{k: v for k, v in x.items() if k != "instances"} for x in _batch(arch, (2, 1))]
        )
    for out in outputs:
        found = out["instances"]
        assert len(found) == 0
        assert found.pred_boxes.tensor.shape == (0, 4) and found.scores.shape == (0,)
        if arch != "retinanet":
            assert found.pred_masks.shape[0] == 0 and found.pred_masks.shape[-2:] == (H, W)


STAGES = {"before": _model, "after": _calibrated}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("arch", ARCHS)
def test_images_without_instances_train(arch, stage):
    model = STAGES[stage](arch)
    losses = _train_step(model, _batch(arch, (0, 0)))
    # No foreground anywhere: the classification terms still train, the box terms are 0.
    box_terms = [k for k in losses if "box" in k or "loc" in k]
    assert box_terms and all(float(losses[k]) == 0.0 for k in box_terms), losses


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("arch", ARCHS)
def test_half_empty_batch_trains(arch, stage):
    model = STAGES[stage](arch)
    losses = _train_step(model, _batch(arch, (2, 0)))
    if arch != "retinanet":
        assert float(losses["loss_mask"]) > 0  # the image with instances reached the mask head


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("arch", ["mask_rcnn", "vitdet", "swin"])
def test_roi_heads_given_no_box(arch, stage):
    model = STAGES[stage](arch)
    _no_proposals(model)
    seen = []
    box_head_input = model.roi_heads.box_head.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].shape[0])
    )
    losses = _train_step(model, _batch(arch, (0, 0)))  # no ground truth to add either
    assert seen == [0] and float(losses["loss_box_reg"]) == 0.0
    model.eval()
    with torch.no_grad():
        outputs = model(_batch(arch, (1, 1)))
    box_head_input.remove()
    assert seen == [0, 0] and all(len(o["instances"]) == 0 for o in outputs)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("arch", ARCHS)
def test_evaluation_with_nothing_detected_gives_empty_instances(arch, stage):
    model = STAGES[stage](arch)
    _nothing_detected(model)
    _check_empty_detections(model, arch)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("arch", ARCHS)
def test_non_finite_pixels_raise_floating_point_error(arch, stage, value):
    model = STAGES[stage](arch)
    batch = _batch(arch, (1, 1))
    batch[1]["image"][0, 5, 7] = value
    batch[1]["file_name"] = "bad.png"
    for training in (True, False):
        model.train(training)
        with EventStorage(), pytest.raises(FloatingPointError, match=r"non-finite.*bad\.png"):
            model(batch)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("arch", ARCHS)
def test_non_finite_features_pass_through_the_heads_in_eval(arch, stage, value):
    """Detectron2's own model tests (``test_inf_nan_data``, ``test_roiheads_inf_nan_data``):
    inf / NaN features given to the heads of a model in eval give no exception; NaN ones no
    detection (an uncalibrated quantizer passes them on, a calibrated one passes NaN on; a
    calibrated one clamps inf to its bounds, so inf features may give finite boxes)."""
    model = STAGES[stage](arch).eval()
    images = ImageList(torch.full((1, 3, H, W), value), [(H, W)])
    features = {
        name: torch.full((1, s.channels, max(H // s.stride, 1), max(W // s.stride, 1)), value)
        for name, s in model.backbone.output_shape().items()
    }
    with torch.no_grad():
        if arch == "retinanet":
            levels = [features[f] for f in model.head_in_features]
            found = model.forward_inference(images, levels, model.head(levels))[0]
        else:
            proposals = Instances((H, W))
            proposals.proposal_boxes = Boxes(torch.tensor([[10.0, 10.0, 20.0, 20.0]]))
            proposals.objectness_logits = torch.tensor([1.0])
            found = model.roi_heads(images, features, [proposals])[0][0]
    assert len(found.pred_boxes) == len(found.scores) == len(found.pred_classes)
    if value != value:  # NaN
        assert len(found) == 0


def test_mask_head_calibrates_on_the_first_batch_that_reaches_it():
    """Calibration batch 1 gives the mask head no ROI, batch 2 does: the mask head's
    quantizers are those of calibrating on batch 2 alone; the other layers saw both."""
    empty_first, second_only = _model("mask_rcnn"), _model("mask_rcnn")
    heads = empty_first.roi_heads.box_predictor
    first, second = _batch("mask_rcnn", (2, 1)), _batch("mask_rcnn", (1, 2), seed=10)

    def run(model, batch):
        # The first batch detects nothing (as an untrained head often does on COCO).
        heads.test_score_thresh = 1.1 if batch is first else 0.05
        model(batch)

    calibrate(empty_first, [first, second], num_batches=2, run=run)
    calibrate(second_only, [second], num_batches=1)
    mask_conv = "roi_heads.mask_head.mask_fcn1.input_quantizer"
    a, b = empty_first.get_submodule(mask_conv), second_only.get_submodule(mask_conv)
    assert a.initialized and torch.equal(a.upper, b.upper) and torch.equal(a.lower, b.lower)
    backbone = "backbone.bottom_up.res2.0.conv1.input_quantizer"
    assert not torch.equal(
        empty_first.get_submodule(backbone).upper, second_only.get_submodule(backbone).upper
    )


def test_layer_that_only_saw_empty_inputs_is_a_calibration_error():
    model = _model("mask_rcnn")
    _nothing_detected(model)
    with pytest.raises(RuntimeError, match=r"mask_head\.mask_fcn1.*QUANT\.CALIB_BATCHES"):
        calibrate(model, [_batch("mask_rcnn", (1, 1))], num_batches=1)


def test_non_finite_activation_in_calibration_names_layer_and_batch():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Identity(), nn.Conv2d(3, 4, 3))
    quantize_model(body, w_bits=4, a_bits=4, exclude=[])
    good, bad = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match=r"^1\.input_quantizer: 1 of 384 .*batch 2 of 2"):
        calibrate(body, [good, bad], num_batches=2)
    assert not body[1].input_quantizer.initialized


@pytest.mark.parametrize("method", ["uniform", "ewgs", "lsq", "qrelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizer_on_an_empty_tensor(method, dtype):
    """Before and after calibration: an empty output of the input's shape and dtype, an
    input gradient, and a (zero) gradient for every quantizer parameter; nothing
    calibrates on it."""
    q = build_quantizer(method, 4, "activation")
    for calibrated in (False, True):
        if calibrated:
            q.init_from(torch.rand(2, 8, 5, 5))
        x = torch.zeros(0, 8, 5, 5, dtype=dtype, requires_grad=True)
        out = q(x)
        assert out.shape == x.shape and out.dtype == dtype and q.initialized == calibrated
        out.float().sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        for p in q.parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0
            p.grad = None
    q_new = build_quantizer(method, 4, "activation")
    q_new.observe(torch.zeros(0, 8))
    with pytest.raises(RuntimeError, match=r"non-empty observe.*1 empty ones were skipped"):
        q_new.finish_calibration()
