"""projects/Classification's recipes: QFD's pooled-feature tap, the ground-truth weight,
FAQD through train_net.py, and AKT's zero-shot path (generator, BN statistics, no real
training images)."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from train_net_cli import ROOT, run_train_net

sys.path.insert(0, os.path.join(ROOT, "projects", "Classification"))
from classification import (  # noqa: E402
    ZeroShotTrainer,
    add_classification_config,
    zeroshot,
)
from classification import (
    trainer as trainer_module,
)

from qdet.config import add_qdet_config  # noqa: E402
from qdet.distill.distiller import Distiller  # noqa: E402
from qdet.distill.terms import TermSpec  # noqa: E402
from qdet.quantization import UniformQuantizer  # noqa: E402

TRAIN_NET = "projects/Classification/train_net.py"
CONFIGS = os.path.join(ROOT, "projects", "Classification", "configs")
FP_CONFIG = os.path.join(CONFIGS, "digits32", "resnet20_fp.yaml")


def _cfg(config: str, *opts):
    cfg = add_classification_config(add_qdet_config(get_cfg()))
    cfg.merge_from_file(os.path.join(CONFIGS, config))
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    """An (untrained) FP ResNet-20 checkpoint: a teacher and a starting point. Its BN
    layers hold some running statistics, as a trained model's, for the zero-shot generator."""
    torch.manual_seed(0)
    model = build_model(_cfg("digits32/resnet20_fp.yaml"))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("fp")
    DetectionCheckpointer(model, save_dir=str(folder)).save("model_final")
    return str(folder / "model_final.pth")


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.rand(3, 32, 32, generator=g) * 255, "label": int(i % 10)} for i in range(n)
    ]


def test_qfd_pooled_feature_tap_is_unsigned_and_gt_weight_scales_the_cross_entropy():
    """QFD Eq. 8: the teacher's pooled (post-ReLU) feature quantized unsigned; the student's
    cross-entropy weighted 1 - lambda beside the distillation term."""
    teacher = build_model(
        _cfg(
            "digits32/resnet20_fp.yaml",
            "QUANT.FEATURE_TAP", "pool", "QUANT.FEATURE_SIGNED", "False",
            "QUANT.FEATURE_BITS", "2",
        )
    )  # fmt: skip
    q = teacher.feature_quantizer
    assert isinstance(q, UniformQuantizer) and not q.signed
    teacher.eval()
    with torch.no_grad():
        q.lower.fill_(0.0), q.upper.fill_(0.3), q.scale.fill_(0.3)
        q.initialized = True
        pooled = teacher.pool(teacher.backbone(teacher.preprocess_image(_batch()))["res4"])
    # 2 bits unsigned on [0, 0.3]: four levels 0, 0.1, 0.2, 0.3.
    levels = torch.unique((pooled / 0.1).round(decimals=4))
    assert set(levels.tolist()) <= {0.0, 1.0, 2.0, 3.0} and pooled.min() >= 0

    student = build_model(_cfg("digits32/resnet20_fp.yaml"))
    student.train()
    distiller = Distiller(student, teacher, [TermSpec("qfd", ["pool"], 0.5)])
    distiller.gt_weight = 0.5
    student.attach_distiller(distiller)
    seen = {}
    student.fc.register_forward_hook(lambda m, i, o: seen.setdefault("logits", o))
    batch = _batch(seed=1)
    from detectron2.utils.events import EventStorage

    with EventStorage():
        losses = student(batch)
    logits = seen["logits"].detach().double()
    labels = [x["label"] for x in batch]
    # Cross-entropy written out: mean over images of logsumexp(z) - z_y.
    ce = sum(
        math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits.tolist(), labels)
    ) / len(labels)
    assert losses["loss_cls"].item() == pytest.approx(0.5 * ce, rel=1e-5)
    assert set(losses) == {"loss_cls", "loss_distill_qfd"}


def test_adadfq_margin_against_a_direct_computation():
    g = torch.Generator().manual_seed(3)
    zt, zs = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g)
    got = zeroshot.adadfq_margin(zt, zs, lower=0.1, upper=0.8).item()
    d = (zt - zs).double().numpy()
    p = np.exp(d - d.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    h = -(p * np.log(p)).sum(1)
    h = (h - h.min()) / (np.log(10) - h.min())
    want = np.maximum(0.1 - h, 0).mean() + np.maximum(h - 0.8, 0).mean()
    assert want > 0 and got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("generator_loss", ["gdfq", "adadfq"])
def test_zeroshot_student_trains_without_ever_building_the_real_training_loader(
    tmp_path, monkeypatch, fp_checkpoint, generator_loss
):
    def refuse(*args, **kwargs):
        raise AssertionError("the zero-shot path built the real training loader")

    monkeypatch.setattr(trainer_module, "build_detection_train_loader", refuse)
    monkeypatch.setattr(trainer_module, "get_detection_dataset_dicts", refuse)
    monkeypatch.setattr(trainer_module.ClassificationTrainer, "build_train_loader", refuse)
    cfg = _cfg(
        "digits32/akt_table2_resnet20_w4a4_zeroshot.yaml",
        "DATASETS.TEST", "()",
        "MODEL.WEIGHTS", fp_checkpoint,
        "DISTILL.TEACHER_WEIGHTS", fp_checkpoint,
        "DISTILL.TEACHER_CONFIG", FP_CONFIG,
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "8", "SOLVER.WARMUP_ITERS", "0",
        "ZEROSHOT.WARMUP_ITERS", "2", "QUANT.CALIB_BATCHES", "1",
        "ZEROSHOT.LOSS", generator_loss, "OUTPUT_DIR", str(tmp_path / "zs"),
    )  # fmt: skip
    trainer = ZeroShotTrainer(cfg)
    generator = trainer._zeroshot.generator
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    trainer.resume_or_load(resume=False)  # the FP model's weights and BN statistics
    student_before = trainer.model.backbone.res2[0].conv1.weight.detach().clone()
    bn = trainer.model.backbone.res2[0].conv1.norm
    bn_before = bn.running_mean.clone()
    trainer.train()
    after = generator.state_dict()
    assert not torch.equal(before["fc.weight"], after["fc.weight"])  # warm-up + 2 steps
    assert not torch.equal(student_before, trainer.model.backbone.res2[0].conv1.weight)
    # The student's BN statistics stay the FP model's (AKT trains it in eval mode), through
    # the warm-up (which runs the student for AdaDFQ's terms) and the steps.
    torch.testing.assert_close(bn.running_mean, bn_before, rtol=0, atol=0)
    metrics = [json.loads(line) for line in (tmp_path / "zs" / "metrics.json").open()]
    assert {"loss_distill_logit_kd", "loss_distill_rfd", "loss_g_ce", "loss_g_bns"} <= set(
        metrics[-1]
    )
    assert "loss_cls" not in metrics[-1]  # label-free
    assert ("loss_g_margin" in metrics[-1]) == (generator_loss == "adadfq")
    state = torch.load(tmp_path / "zs" / "model_final.pth", weights_only=False)
    assert state["zeroshot_generator"]["warmed_up"] is True
    torch.testing.assert_close(
        state["zeroshot_generator"]["generator"]["fc.weight"], after["fc.weight"]
    )


def test_zeroshot_refuses_a_run_with_labels(fp_checkpoint):
    cfg = _cfg(
        "digits32/akt_table2_resnet20_w4a4_zeroshot.yaml",
        "DISTILL.LABEL_FREE", "False", "MODEL.WEIGHTS", fp_checkpoint,
    )  # fmt: skip
    with pytest.raises(ValueError, match="LABEL_FREE True"):
        ZeroShotTrainer(cfg)


def test_qfd_recipe_runs_its_teacher_stage_through_the_projects_train_net(tmp_path, fp_checkpoint):
    out = tmp_path / "qfd"
    r = run_train_net(
        "--recipe", "digits32/qfd_table2_resnet20_w4a4",
        "MODEL.WEIGHTS", fp_checkpoint, "DISTILL.TEACHER_WEIGHTS", fp_checkpoint,
        "DISTILL.TEACHER_CONFIG", FP_CONFIG,
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "8", "SOLVER.WARMUP_ITERS", "0",
        "DISTILL.TEACHER_STAGE_ITERS", "1", "QUANT.CALIB_BATCHES", "1",
        "DATASETS.TEST", "()", "OUTPUT_DIR", str(out), script=TRAIN_NET,
    )  # fmt: skip
    teacher = torch.load(out / "teacher_stage" / "model_final.pth", weights_only=False)["model"]
    # (initialized, signed, bits): the pooled post-ReLU feature, unsigned at 1 bit (QFD).
    assert teacher["feature_quantizer._extra_state"].tolist() == [1, 0, 1]
    metrics = [json.loads(line) for line in (out / "metrics.json").open()]
    assert {"loss_cls", "loss_distill_qfd"} <= set(metrics[-1])
    assert "ground-truth losses x 0.5" in r.stdout + r.stderr


def test_unknown_recipe_lists_the_recipes():
    r = run_train_net("--recipe", "faqd_cifar", check=False, script=TRAIN_NET)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'faqd_cifar' is unknown" in r.stderr
    assert "digits32/faqd_table6_resnet20_w4a4_finetune" in r.stderr


def _recipes():
    sys.path.insert(0, os.path.join(ROOT, "projects", "Classification"))
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "classification_train_net", os.path.join(ROOT, TRAIN_NET)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.recipes()


@pytest.mark.parametrize("name", sorted(_recipes()))
def test_every_recipe_loads_and_builds_its_model(name):
    """Every YAML of the project: its keys exist, its distillation terms are valid, and its
    model builds (on the CPU)."""
    from qdet.config import load_config
    from qdet.distill.terms import term_specs

    cfg = load_config(_recipes()[name], ["MODEL.DEVICE", "cpu"], add_classification_config)
    if cfg.DISTILL.ENABLED:
        assert term_specs(cfg)
    model = build_model(cfg)
    assert model.fc.out_features == cfg.MODEL.CLASSIFIER.NUM_CLASSES


def test_negative_gt_weight_is_refused_by_name():
    from qdet.engine.checks import check_teacher

    cfg = _cfg("digits32/faqd_table6_resnet20_w4a4_finetune.yaml", "DISTILL.GT_WEIGHT", "-0.3")
    with pytest.raises(ValueError, match=r"DISTILL.GT_WEIGHT=-0.3 must be >= 0"):
        check_teacher(cfg)
