"""``qdet.quantize_model`` on every meta-architecture Detectron2 registers, built from its
model-zoo configs (yacs and LazyConfig) without weights: 4 bits, a training step, an
inference; the registered meta-architectures take the same code path."""

from __future__ import annotations

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

import qdet
from qdet.quantization import QConv2d, Quantizer, calibrate

H, W = 64, 96
# meta-architecture -> (model-zoo config, overrides): yacs files, and FCOS's LazyConfig.
ZOO = {
    "GeneralizedRCNN": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", {}),
    "GeneralizedRCNN (Cascade)": ("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml", {}),
    "RetinaNet": ("COCO-Detection/retinanet_R_50_FPN_1x.yaml", {}),
    "FCOS": ("common/models/fcos.py", {}),
    "PanopticFPN": ("COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml", {}),
    "SemanticSegmentor": ("Misc/semantic_R_50_FPN_1x.yaml", {}),
}


STEM = "backbone.bottom_up.stem.conv1"
RPN = {f"proposal_generator.rpn_head.{p}" for p in ("objectness_logits", "anchor_deltas")}
BOX = {"roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"}
CASCADE_BOX = {
    f"roi_heads.box_predictor.{i}.{p}" for i in range(3) for p in ("cls_score", "bbox_pred")
}
MASK, SEM_SEG = "roi_heads.mask_head.predictor", "sem_seg_head.predictor"
# The layers each model keeps in FP, named one by one: the stem and every predictor. Every
# other Conv2d / Linear (RPN and ROI heads, mask and sem-seg heads included) is quantized.
FP_KEPT = {
    "GeneralizedRCNN": {STEM, *RPN, *BOX, MASK},
    "GeneralizedRCNN (Cascade)": {STEM, *RPN, *CASCADE_BOX, MASK},
    "RetinaNet": {STEM, "head.cls_score", "head.bbox_pred"},
    "FCOS": {STEM, "head.cls_score", "head.bbox_pred", "head.ctrness"},
    "PanopticFPN": {STEM, *RPN, *BOX, MASK, SEM_SEG},
    "SemanticSegmentor": {STEM, SEM_SEG},
}


def _build(name: str) -> torch.nn.Module:
    path, _ = ZOO[name]
    torch.manual_seed(0)
    if path.endswith(".py"):
        lazy = LazyConfig.load(model_zoo.get_config_file(path))
        lazy.model.num_classes = 3
        return instantiate(lazy.model)
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    # R18 (Detectron2's BasicBlock ResNet): an untrained R50's activations grow through its
    # 50 layers until the RPN proposes nothing, and its heads would see no box.
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 18, 64
    # Fewer boxes per image than COCO's (speed only).
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 64
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, cfg.TEST.DETECTIONS_PER_IMAGE = 32, 8
    return build_model(cfg)


def _batch() -> list[dict]:
    out = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        target = Instances((H, W))
        boxes = torch.tensor([[8.0, 8.0, 40.0, 44.0], [50.0, 12.0, 90.0, 60.0]])
        target.gt_boxes, target.gt_classes = Boxes(boxes), torch.tensor([0, 2])
        bitmaps = torch.zeros(2, H, W, dtype=torch.bool)
        for bitmap, (x0, y0, x1, y1) in zip(bitmaps, boxes.int().tolist()):
            bitmap[y0:y1, x0:x1] = True
        target.gt_masks = BitMasks(bitmaps)
        image = torch.randint(0, 256, (3, H, W), generator=g).float()
        sem_seg = torch.randint(0, 4, (H, W), generator=g)
        out.append(
            {"image": image, "height": H, "width": W, "instances": target, "sem_seg": sem_seg}
        )
    return out


@pytest.mark.parametrize("name", ZOO)
def test_every_detectron2_meta_architecture_quantizes_trains_and_infers(name):
    model = _build(name)
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    }
    summary = qdet.quantize_model(model, w_bits=4, a_bits=4)
    assert summary.layers and all(bits == (4, 4) for bits in summary.layers.values())
    assert str(summary).count("4/4") == len(summary)
    assert FP_KEPT[name] <= layers  # the names above are the model's
    assert set(summary.layers) == layers - FP_KEPT[name]
    # Parameter names unchanged: the FP state loads, only quantizer keys are missing.
    result = model.load_state_dict(fp_state, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all("quantizer" in k for k in result.missing_keys)

    batch = _batch()

    def run(model, batch):
        # An untrained box head scores nothing above Detectron2's threshold, and its mask
        # head would get no ROI to calibrate on (a calibration error): keep every box.
        if hasattr(model, "roi_heads"):
            for predictor in _box_predictors(model.roi_heads):
                predictor.test_score_thresh = 0.0
        model(batch)

    calibrate(model, [batch], num_batches=1, run=run)
    model.train()
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    layer = model.get_submodule(next(iter(summary.layers)))
    assert layer.input_quantizer.initialized and layer.weight.grad is not None
    model.eval()
    with torch.no_grad():
        outputs = model([{k: x[k] for k in ("image", "height", "width")} for x in batch])
    assert len(outputs) == 2


def _box_predictors(roi_heads) -> list:
    predictor = roi_heads.box_predictor
    return list(predictor) if isinstance(predictor, torch.nn.ModuleList) else [predictor]


def test_registered_meta_architectures_take_the_same_code_path():
    """QuantRetinaNet with QUANT on == Detectron2's RetinaNet through qdet.quantize_model:
    the same layers at the same bits and the same state-dict keys."""
    cfg = qdet.add_qdet_config(get_cfg())
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE, cfg.QUANT.W_BITS, cfg.QUANT.A_BITS = "cpu", 3, 5
    plain = build_model(cfg)
    summary = qdet.quantize_model(plain, cfg=_enabled(cfg))
    cfg.MODEL.META_ARCHITECTURE = "QuantRetinaNet"
    registered = build_model(_enabled(cfg))
    assert registered.quantized_layers == list(summary.layers)
    assert set(summary.layers.values()) == {(3, 5)}
    assert registered.state_dict().keys() == plain.state_dict().keys()


def _enabled(cfg):
    cfg = cfg.clone()
    cfg.QUANT.ENABLED = True
    return cfg


def test_transformer_targets_quantize_the_block_linears_only():
    lazy = LazyConfig.load(model_zoo.get_config_file("common/models/mask_rcnn_vitdet.py"))
    lazy.model.backbone.net.depth, lazy.model.backbone.net.embed_dim = 2, 48
    lazy.model.backbone.net.num_heads, lazy.model.backbone.net.window_block_indexes = 2, [0]
    lazy.model.backbone.net.img_size = 128
    model = instantiate(lazy.model)
    summary = qdet.quantize_model(model, targets=["mha"], w_bits=4, a_bits=4)
    want = [f"backbone.net.blocks.{i}.attn.{n}" for i in range(2) for n in ("qkv", "proj")]
    assert list(summary.layers) == want
    signs = {model.get_submodule(n).input_quantizer.signed for n in want}
    assert signs == {True}  # LayerNorm / attention outputs: signed, as QuantMaskRCNN's


def test_bad_input_names_the_problem():
    model = _build("RetinaNet")
    with pytest.raises(ValueError, match=r"unknown setting 'wbits'; did you mean \['w_bits'"):
        qdet.quantize_model(model, wbits=4)
    with pytest.raises(ValueError, match=r"'head\.nothing' matches no Conv2d/Linear.*Near names"):
        qdet.quantize_model(model, include=["head.nothing"])
    with pytest.raises(ValueError, match=r"W_BITS.*out of range"):
        qdet.quantize_model(model, w_bits=9)
    with pytest.raises(ValueError, match="select no layer"):
        qdet.quantize_model(model, exclude=[".*"])
    with pytest.raises(ValueError, match="registered meta-architectures"):
        qdet.quantize_model(model, feature_tap="p3")
    with pytest.raises(ValueError, match="cfg= or keywords, not both"):
        qdet.quantize_model(model, cfg=qdet.add_qdet_config(get_cfg()), w_bits=4)
    with pytest.raises(ValueError, match="QUANT.ENABLED is False"):
        qdet.quantize_model(model, cfg=qdet.add_qdet_config(get_cfg()))
    with pytest.raises(ValueError, match="has no nn.Conv2d or nn.Linear"):
        qdet.quantize_model(torch.nn.Sequential(torch.nn.ReLU()))
    assert not any(isinstance(m, Quantizer) for m in model.modules())  # nothing half-done
    qdet.quantize_model(model, w_bits=4, a_bits=4)
    with pytest.raises(ValueError, match=r"already quantized \(\d+ layers"):
        qdet.quantize_model(model, w_bits=4, a_bits=4)
    assert isinstance(model.head.cls_subnet[0], QConv2d)


def test_distillation_attaches_to_any_model():
    """FCOS (a LazyConfig model qdet has no meta-architecture for): a 4-bit student, its FP
    twin as teacher, feature KD on p3 and FA on res4 beside FCOS's own losses; each term
    equals the formula on the two models' features computed separately."""
    from qdet.distill import attach_distiller

    teacher, student = _build("FCOS"), _build("FCOS")
    qdet.quantize_model(student, w_bits=4, a_bits=4)
    batch = _batch()
    calibrate(student, [batch], num_batches=1)
    terms = {"feature_kd": {"taps": ["p3"], "weight": 0.5}, "fa": {"taps": ["res4"]}}
    distiller = attach_distiller(student, teacher, terms)
    student.train()
    with EventStorage():
        losses = student(batch)
    assert {"loss_fcos_cls", "loss_distill_feature_kd", "loss_distill_fa"} <= set(losses)
    assert losses["loss_distill_feature_kd"].requires_grad  # the terms train the student
    with torch.no_grad():
        images = student.preprocess_image(batch).tensor
        f_s, f_t = student.backbone(images), teacher.backbone(images)
        f_s.update(student.backbone.bottom_up(images))
        f_t.update(teacher.backbone.bottom_up(images))
    mse = ((f_s["p3"] - f_t["p3"]) ** 2).mean()
    assert losses["loss_distill_feature_kd"].item() == pytest.approx(0.5 * mse.item(), rel=1e-5)

    # FA (FAQD Eq. 6, default weight 0.1): squared Frobenius norm of the difference of the
    # cosine-similarity (HW x HW) matrices, over (HW)^2, batch mean.
    def affinity(f):
        flat = torch.nn.functional.normalize(f.flatten(2), dim=1)
        return flat.transpose(1, 2) @ flat

    a_s, a_t = affinity(f_s["res4"]), affinity(f_t["res4"])
    hw = a_s.shape[-1]
    fa = ((a_s - a_t) ** 2).sum((1, 2)).mean() / hw**2
    assert losses["loss_distill_fa"].item() == pytest.approx(0.1 * fa.item(), rel=1e-4)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen
    distiller.remove()
    with EventStorage():
        assert not any(k.startswith("loss_distill") for k in student(batch))
    with pytest.raises(ValueError, match=r"tap 'p33' is not in the student.*near names"):
        attach_distiller(student, teacher, {"feature_kd": {"taps": ["p33"]}})
    with pytest.raises(ValueError, match=r"runs only its backbone"):
        attach_distiller(student, teacher, {"feature_kd": {"taps": ["head.cls_subnet.0"]}})
    with pytest.raises(ValueError, match=r"unknown setting 'wieght'"):
        attach_distiller(student, teacher, {"fa": {"wieght": 1.0}})
