"""Data-free quantization (qdet.datafree): the BN-statistics loss, the generators, the
detector's layouts and task term, and a 4-bit RetinaNet trained on generated images only."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from test_retinanet_qfd import FP_CONFIG, TINY, _cfg
from torch import nn
from train_net_cli import ROOT, write_config_with

from qdet.config import load_config
from qdet.datafree import BNStatistics, ConditionalGenerator, LayoutGenerator
from qdet.datafree.detection import (
    DataFreeTrainer,
    layout_masks,
    retinanet_layout_loss,
    sample_layouts,
)
from qdet.engine import trainer as trainer_module
from qdet.engine.checks import check_teacher
from qdet.engine.stages import evaluate_checkpoint

DATAFREE = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_datafree.yaml")


def _model_with_two_bns():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), FrozenBatchNorm2d(2)
    ).eval()
    for bn in (model[1], model[4]):
        bn.running_mean.copy_(torch.randn(bn.num_features))
        bn.running_var.copy_(torch.rand(bn.num_features) + 0.5)
    return model


@pytest.mark.parametrize("normalize", [False, True])
def test_bn_statistics_loss_against_per_channel_loops(normalize):
    torch.manual_seed(0)
    model = _model_with_two_bns()
    stats = BNStatistics(model, normalize=normalize)
    x = torch.randn(5, 3, 6, 6)
    stats.recording = True
    model(x)
    stats.recording = False
    got = stats.loss()
    # The inputs of the two BN layers, computed again, and their statistics by loops.
    inputs = [model[0](x), model[3](model[2](model[1](model[0](x))))]
    per_layer = []
    for bn, a in zip((model[1], model[4]), inputs):
        a = a.detach().double().numpy()
        c = a.shape[1]
        means = [a[:, k].mean() for k in range(c)]
        variances = [((a[:, k] - a[:, k].mean()) ** 2).mean() for k in range(c)]  # biased
        rm, rv = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
        if normalize:  # in units of the running variance (+ 1e-5)
            s2 = rv + 1e-5
            mean_err = sum((means[k] - rm[k]) ** 2 / s2[k] for k in range(c)) / c
            var_err = sum((variances[k] / s2[k] - 1) ** 2 for k in range(c)) / c
        else:
            mean_err = sum((means[k] - rm[k]) ** 2 for k in range(c)) / c
            var_err = sum((variances[k] - rv[k]) ** 2 for k in range(c)) / c
        per_layer.append(mean_err + var_err)
    assert got.item() == pytest.approx(sum(per_layer) / 2, rel=1e-5)
    model(x)  # not recording: nothing kept
    assert stats.stats == []
    stats.remove()


def test_bn_statistics_leave_out_untrained_layers_and_refuse_a_model_without_any():
    model = _model_with_two_bns()
    model[4].running_mean.zero_()
    model[4].running_var.fill_(1.0)  # frozen before training: the initial statistics
    stats = BNStatistics(model)
    assert stats.layers == [model[1]] and stats.skipped == 1
    stats.remove()
    model[1].running_mean.zero_()
    model[1].running_var.fill_(1.0)
    with pytest.raises(ValueError, match="initial running statistics"):
        BNStatistics(model)
    with pytest.raises(ValueError, match="no BatchNorm layers"):
        BNStatistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)))


def test_classifier_generator_makes_normalised_images_of_the_classifiers_size():
    gen = ConditionalGenerator(num_classes=10, latent_dim=16, image_size=32)
    x = gen(torch.randn(8, 16), torch.arange(8))
    assert x.shape == (8, 3, 32, 32)
    # The last BN (no affine) normalises each channel over the batch.
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        ConditionalGenerator(10, image_size=30)


def _layouts(count=3, size=(64, 96), seed=0, **kw):
    options = dict(objects=(1, 5), box_sizes=(12.0, 40.0), aspect_ratios=(0.5, 2.0), max_iou=0.2)
    options.update(kw)
    return sample_layouts(torch.Generator().manual_seed(seed), count, size, 10, **options)


def test_sampled_layouts_keep_to_their_ranges():
    layouts = _layouts(count=40)
    counts = [len(x) for x in layouts]
    assert min(counts) >= 1 and max(counts) <= 5 and len(set(counts)) > 2
    for layout in layouts:
        boxes = layout.gt_boxes.tensor
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all()
        side, ratio = (w * h).sqrt(), h / w
        assert ((side >= 12 - 1e-3) & (side <= 40 + 1e-3)).all()
        assert ((ratio >= 0.5 - 1e-4) & (ratio <= 2 + 1e-4)).all()
        iou = pairwise_iou(layout.gt_boxes, layout.gt_boxes) - torch.eye(len(layout))
        assert iou.max() <= 0.2 + 1e-6
        assert ((layout.gt_classes >= 0) & (layout.gt_classes < 10)).all()
    # The noise generator decides everything: the same seed, the same layouts.
    again = _layouts(count=40)
    assert all(torch.equal(a.gt_boxes.tensor, b.gt_boxes.tensor) for a, b in zip(layouts, again))


def test_layout_masks_and_the_layout_generator():
    layout = Instances((16, 24))
    layout.gt_boxes = Boxes(torch.tensor([[2.5, 1.0, 6.0, 4.2], [10.0, 8.0, 12.0, 16.0]]))
    layout.gt_classes = torch.tensor([3, 0])
    masks = layout_masks([layout], num_classes=4)
    want = np.zeros((5, 16, 24))
    want[3, 1:5, 2:6] = 1  # rows 1..4 (y 1.0-4.2 rounded out), columns 2..5
    want[0, 8:16, 10:12] = 1
    want[4] = 1 - want[:4].max(0)
    np.testing.assert_array_equal(masks[0].numpy(), want)
    gen = LayoutGenerator(num_classes=4, latent_dim=8)
    x = gen(torch.randn(2, 8, 2, 3), masks.repeat(2, 1, 1, 1))
    assert x.shape == (2, 3, 16, 24)
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_layout_loss_is_retinanets_own_loss_with_the_layout_as_ground_truth():
    torch.manual_seed(0)
    model = build_model(_cfg()).eval()
    images = torch.randn(2, 3, 96, 128)
    layouts = _layouts(count=2, size=(96, 128), box_sizes=(16.0, 48.0), aspect_ratios=(1.0, 1.0))
    features = [model.backbone(images)[f] for f in model.head_in_features]
    got = retinanet_layout_loss(model, features, layouts)
    # Detectron2's RetinaNet.losses, normalised by an EMA of foreground anchors: started at
    # this batch's count, the EMA is that count.
    anchors = model.anchor_generator(features)
    gt_labels, gt_boxes = model.label_anchors(anchors, layouts)
    foreground = sum(int(((g >= 0) & (g != model.num_classes)).sum()) for g in gt_labels)
    assert foreground > 0
    model.loss_normalizer = float(foreground)
    logits, deltas = model.head(features)
    with EventStorage():
        want = model.losses(
            anchors,
            [x.permute(0, 2, 3, 1).reshape(2, -1, model.num_classes) for x in logits],
            gt_labels,
            [x.permute(0, 2, 3, 1).reshape(2, -1, 4) for x in deltas],
            gt_boxes,
        )
    torch.testing.assert_close(got["loss_cls"], want["loss_cls"], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["loss_box"], want["loss_box_reg"], rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny FP RetinaNet-R18 whose BN layers hold (random) running statistics, its config,
    and the same model with the initial statistics (never trained)."""
    d = tmp_path_factory.mktemp("datafree_teacher")
    torch.manual_seed(3)
    model = build_model(_cfg())
    DetectionCheckpointer(model, save_dir=str(d)).save("untrained")
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    DetectionCheckpointer(model, save_dir=str(d)).save("fp")
    config = write_config_with(d / "teacher.yaml", FP_CONFIG, TINY)
    return {"dir": d, "config": config, "weights": str(d / "fp.pth")}


def _datafree_cfg(teacher, out, *opts):
    return load_config(
        DATAFREE,
        [
            *TINY,
            "MODEL.WEIGHTS", teacher["weights"],
            "DISTILL.TEACHER_WEIGHTS", teacher["weights"],
            "DISTILL.TEACHER_CONFIG", teacher["config"],
            "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "0",
            "ZEROSHOT.WARMUP_ITERS", "2", "ZEROSHOT.SHEET_IMAGES", "3",
            "QUANT.CALIB_BATCHES", "1", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out),
            *opts,
        ],
    )  # fmt: skip


def test_datafree_student_trains_on_generated_images_only(tmp_path, monkeypatch, teacher):
    real_get = DatasetCatalog.get

    def get_but_not_train(name):
        assert "train" not in name, f"the data-free path read the training set {name}"
        return real_get(name)

    def refuse(*args, **kwargs):
        raise AssertionError("the data-free path built the real training loader")

    monkeypatch.setattr(DatasetCatalog, "get", get_but_not_train)
    monkeypatch.setattr(trainer_module, "resumable_train_loader", refuse)
    monkeypatch.setattr(trainer_module, "get_detection_dataset_dicts", refuse)
    out = tmp_path / "df"
    # Both terms weighted, so that every gradient the student gets is from the teacher.
    cfg = _datafree_cfg(teacher, out, "DATASETS.TRAIN", "('qdet_digits_train',)")
    trainer = DataFreeTrainer(cfg)
    source, teacher_model = trainer._zeroshot, trainer.model.distiller.teacher
    teacher_before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    generator_before = {k: v.clone() for k, v in source.generator.state_dict().items()}
    student_weight = trainer.model.backbone.fpn_output3.weight
    student_before = student_weight.detach().clone()
    trainer.resume_or_load(resume=False)
    trainer.train()
    # The teacher is bit-identical and got no gradient; the generator and student moved.
    for k, v in teacher_model.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in teacher_model.parameters())
    generator_after = source.generator.state_dict()
    assert all(
        not torch.equal(generator_before[k], generator_after[k])
        for k in ("blocks.0.conv.weight", "to_image.weight")
    )
    assert not torch.equal(student_before, student_weight.detach())
    metrics = [json.loads(line) for line in (out / "metrics.json").open()]
    assert {"loss_distill_logit_kd", "loss_distill_rfd", "loss_g_cls", "loss_g_box"} <= set(
        metrics[-1]
    )
    assert metrics[-1]["loss_g_bns"] > 0
    assert "loss_cls" not in metrics[-1]  # label-free: no ground truth anywhere
    # The sheet: 3 images of the generator's size in a row, boxes drawn on them.
    sheet = torchvision.io.read_image(str(out / "generated_images.png"))
    h, w = source.image_size
    assert (h, w) == (96, 128)  # the test size, a multiple of the backbone's 32
    assert sheet.shape == (3, h + 4, 3 * (w + 2) + 2)
    # Drawn as the student gets them (batch-statistics BN): a normalised image's pixels
    # spread like the data's (PIXEL_STD about 58), not a flat grey with boxes on it.
    first = sheet[:, 2 : 2 + h, 2 : 2 + w].float()
    assert first.std() > 40, first.std()
    state = torch.load(out / "model_final.pth", weights_only=False)
    assert state["zeroshot_generator"]["warmed_up"] is True
    # The student's checkpoint is a RetinaNet's: --eval-only's evaluation gives COCO AP on
    # real val images (the first 12 of qdet_digits_val: a quantized eager forward is slow).
    monkeypatch.setattr(DatasetCatalog, "get", real_get)
    val = real_get("qdet_digits_val")
    DatasetCatalog.register("qdet_digits_val_first12", lambda: val[:12])
    MetadataCatalog.get("qdet_digits_val_first12").set(
        **{k: v for k, v in MetadataCatalog.get("qdet_digits_val").as_dict().items() if k != "name"}
    )
    try:
        eval_cfg = load_config(
            DATAFREE,
            [*TINY, "MODEL.WEIGHTS", str(out / "model_final.pth"),
             "DATASETS.TEST", "('qdet_digits_val_first12',)", "OUTPUT_DIR", str(tmp_path / "ev")],
        )  # fmt: skip
        results = evaluate_checkpoint(eval_cfg, resume=False)
    finally:
        DatasetCatalog.remove("qdet_digits_val_first12")
        MetadataCatalog.remove("qdet_digits_val_first12")
    assert {"AP", "AP50", "AP75"} <= set(results["bbox"])


def test_datafree_generator_step_leaves_the_teacher_alone(tmp_path, teacher):
    cfg = _datafree_cfg(teacher, tmp_path, "ZEROSHOT.BNS_NORMALIZE", "False")
    trainer = DataFreeTrainer(cfg)
    source = trainer._zeroshot
    images, layouts = source.train_step()
    assert images.shape == (2, 3, 96, 128) and not images.requires_grad
    assert set(source.last_losses) == {"loss_g_cls", "loss_g_box", "loss_g_bns"}
    assert all(p.grad is not None for p in source.generator.parameters())
    assert all(p.grad is None for p in trainer.model.parameters())  # the student's too
    # The student's inputs normalise back to the images, the layout riding along.
    inputs = source.as_inputs(images, layouts)
    normalised = (inputs[0]["image"] - trainer.model.pixel_mean) / trainer.model.pixel_std
    torch.testing.assert_close(normalised, images[0], rtol=0, atol=1e-4)
    assert inputs[1]["instances"] is layouts[1]
    # Without the task term the teacher's head is never run: only L_BNS trains it.
    cfg = _datafree_cfg(teacher, tmp_path, "ZEROSHOT.TASK_WEIGHT", "0.0")
    source = DataFreeTrainer(cfg)._zeroshot
    source.train_step()
    assert set(source.last_losses) == {"loss_g_bns"}


def test_datafree_bad_input_is_clear(tmp_path, teacher):
    untrained = str(teacher["dir"] / "untrained.pth")
    cfg = _datafree_cfg(teacher, tmp_path, "DISTILL.TEACHER_WEIGHTS", untrained)
    with pytest.raises(ValueError, match="initial running statistics"):
        DataFreeTrainer(cfg)
    with pytest.raises(ValueError, match=r"not offered for detectors: choose from \('gdfq',\)"):
        DataFreeTrainer(_datafree_cfg(teacher, tmp_path, "ZEROSHOT.LOSS", "adadfq"))
    with pytest.raises(ValueError, match="multiples of 32"):
        DataFreeTrainer(_datafree_cfg(teacher, tmp_path, "ZEROSHOT.IMAGE_SIZE", "(100, 128)"))
    with pytest.raises(ValueError, match="nothing would train"):
        no_terms = ("ZEROSHOT.TASK_WEIGHT", "0.0", "ZEROSHOT.BNS_WEIGHT", "0.0")
        DataFreeTrainer(_datafree_cfg(teacher, tmp_path, *no_terms))
    with pytest.raises(ValueError, match="LABEL_FREE True"):
        DataFreeTrainer(_datafree_cfg(teacher, tmp_path, "DISTILL.LABEL_FREE", "False"))
    with pytest.raises(ValueError, match="cannot distil with QFD"):
        check_teacher(_datafree_cfg(teacher, tmp_path, "DISTILL.TERMS", "['qfd']"))
    with pytest.raises(KeyError, match="ZEROSHOT.BOX_SIZES"):
        _datafree_cfg(teacher, tmp_path, "ZEROSHOT.BOX_SIZE", "(8, 16)")
