"""The LazyConfig path: tools/lazy_train_net.py's loop on the digits configs of
configs/lazy (FP teacher, 4-bit student distilled from it, evaluation), and its errors."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog

import qdet  # noqa: F401  (registers the digits datasets)
from qdet.engine import hooks as hooks_module
from qdet.engine import lazy, teacher_stage
from qdet.quantization import QConv2d, Quantizer, calibrate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "lazy", "digits")
VAL = "qdet_digits_val_first8"
# Two steps of two images, small heads' batches, evaluation on 8 val images.
QUICK = [
    "train.max_iter=2",
    "train.checkpointer.period=2",
    "dataloader.train.total_batch_size=2",
    f"dataloader.test.dataset.names={VAL}",
    "quant.calib_batches=1",
    "lr_multiplier.scheduler.milestones=[50,75]",  # a 2-step run on a 100-step schedule
    "lr_multiplier.scheduler.num_updates=100",
]


@pytest.fixture
def first_val_images():
    val = DatasetCatalog.get("qdet_digits_val")
    DatasetCatalog.register(VAL, lambda: val[:8])
    metadata = MetadataCatalog.get("qdet_digits_val").as_dict()
    MetadataCatalog.get(VAL).set(**{k: v for k, v in metadata.items() if k != "name"})
    yield VAL
    DatasetCatalog.remove(VAL)
    MetadataCatalog.remove(VAL)


def _config(name: str, *overrides: str):
    cfg = LazyConfig.load(os.path.join(DIGITS, name))
    return LazyConfig.apply_overrides(cfg, [*QUICK, *overrides])


def _metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def test_lazy_trainer_trains_fp_then_a_distilled_4bit_student_and_evaluates(
    tmp_path, first_val_images, monkeypatch
):
    fp_dir, student_dir = str(tmp_path / "fp"), str(tmp_path / "student")
    torch.manual_seed(0)
    lazy.do_train(_config("retinanet_r18_fp.py", f"train.output_dir={fp_dir}"))
    fp_weights = os.path.join(fp_dir, "model_final.pth")
    assert os.path.isfile(fp_weights)

    cfg = _config(
        "retinanet_r18_4bit_feature_kd.py",
        f"train.output_dir={student_dir}",
        f"train.init_checkpoint={fp_weights}",
        f"distill.teacher_weights={fp_weights}",
    )
    calls = []

    def spy(model, batches, num_batches, **kwargs):
        pending = [m for m in model.modules() if isinstance(m, Quantizer) and not m.initialized]
        calls.append((len(pending), num_batches))
        return calibrate(model, batches, num_batches=num_batches, **kwargs)

    monkeypatch.setattr(hooks_module, "calibrate", spy)
    lazy.do_train(cfg)
    # Calibrated once, before the first step, on quant.calib_batches training batches, with
    # every quantizer of the student waiting for it.
    student = lazy.build_model(cfg)
    quantizers = [m for m in student.modules() if isinstance(m, Quantizer)]
    assert calls == [(len(quantizers), 1)]
    logged = _metrics(student_dir)
    assert any("loss_distill_feature_kd" in m and "loss_cls" in m for m in logged)
    assert any("bbox/AP" in m for m in logged)  # Detectron2's EvalHook at the end
    # The student's checkpoint: calibrated quantizers; --eval-only evaluates it.
    eval_cfg = _config(
        "retinanet_r18_4bit.py", f"train.init_checkpoint={student_dir}/model_final.pth"
    )
    results = lazy.do_eval(eval_cfg)
    ap = results["bbox"]["AP"]  # NaN when a 2-step model detects nothing
    assert {"AP", "AP50", "AP75"} <= set(results["bbox"]) and (math.isnan(ap) or 0 <= ap <= 100)
    model = lazy.build_model(eval_cfg)
    DetectionCheckpointer(model).load(os.path.join(student_dir, "model_final.pth"))
    conv = model.backbone.bottom_up.res2[0].conv1
    assert isinstance(conv, QConv2d) and conv.input_quantizer.initialized
    assert conv.weight_quantizer.bits == conv.input_quantizer.bits == 4


def test_lazy_model_loads_its_fp_checkpoint_with_only_quantizer_keys_missing(tmp_path):
    fp = instantiate(_config("retinanet_r18_fp.py").model)
    path = str(tmp_path / "fp.pth")
    torch.save({"model": fp.state_dict()}, path)
    quantized = lazy.build_model(_config("retinanet_r18_4bit.py"))
    result = quantized.load_state_dict(torch.load(path)["model"], strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all("quantizer" in k for k in result.missing_keys)


def test_lazy_config_errors(tmp_path):
    cfg = _config("retinanet_r18_fp.py")
    del cfg["quant"]
    with pytest.raises(ValueError, match=r"no quant node: add a quant node.*quant = dict\(w_bits"):
        lazy.do_train(cfg)
    with pytest.raises(ValueError, match=r"unknown setting 'wbits'"):
        lazy.build_model(_config("retinanet_r18_4bit.py", "+quant.wbits=4"))
    with pytest.raises(ValueError, match=r"quant.enabled is False but quant sets \['w_bits'\]"):
        lazy.build_model(_config("retinanet_r18_fp.py", "+quant.w_bits=4"))
    missing = str(tmp_path / "nothing.pth")
    with pytest.raises(
        FileNotFoundError, match=r"teacher checkpoint .*nothing.pth.* does not exist: train the FP"
    ):
        lazy.do_train(
            _config(
                "retinanet_r18_4bit_feature_kd.py",
                "train.init_checkpoint=''",
                f"distill.teacher_weights={missing}",
            )
        )
    with pytest.raises(FileNotFoundError, match=r"init_checkpoint=.*--eval-only evaluates"):
        lazy.do_eval(_config("retinanet_r18_4bit.py", f"train.init_checkpoint={missing}"))


LAZY_COCO = ["mask_rcnn_vitdet_b_4bit", "mask_rcnn_R_50_FPN_4bit", "retinanet_R_50_FPN_4bit"]


@pytest.mark.parametrize("name", LAZY_COCO)
def test_coco_lazy_configs_build_their_quantized_model(name):
    """Each imports Detectron2's own LazyConfig and adds only quantization: its model builds
    and quantizes at 4 bits on the CPU (no weights, no data)."""
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "lazy", f"{name}.py"))
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train", "quant"} <= set(cfg)
    cfg.train.device = "cpu"
    model = lazy.build_model(cfg)
    bits = {
        (m.weight_quantizer.bits, m.input_quantizer.bits)
        for m in model.modules()
        if hasattr(m, "weight_quantizer")
    }
    assert bits == {(4, 4)}


@pytest.mark.parametrize("targets", ["mha", "mlp"])
def test_lazy_vitdet_quantizes_the_linears_the_yacs_path_does(targets):
    """configs/lazy/mask_rcnn_vitdet_b_4bit_<targets>.py and the yacs
    configs/vitdet_b_4bit_<targets>.yaml select the same Linear layers of ViTDet-B."""
    from detectron2.modeling import build_model

    from qdet.config import load_config

    cfg = LazyConfig.load(
        os.path.join(ROOT, "configs", "lazy", f"mask_rcnn_vitdet_b_4bit_{targets}.py")
    )
    cfg.train.device = "cpu"
    lazy_layers = {
        n for n, m in lazy.build_model(cfg).named_modules() if hasattr(m, "weight_quantizer")
    }
    yacs = load_config(
        os.path.join(ROOT, "configs", f"vitdet_b_4bit_{targets}.yaml"),
        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"],
    )
    yacs_model = build_model(yacs)
    assert lazy_layers == set(yacs_model.quantized_layers)
    assert len(lazy_layers) == 12 * 2  # two Linear layers per block of the 12


def test_lazy_train_net_cli_reports_bad_input_in_one_line(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "none.pth"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "lazy_train_net.py"), "--config-file",
         os.path.join(DIGITS, "retinanet_r18_4bit.py"), f"train.init_checkpoint={missing}",
         f"train.output_dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("lazy_train_net.py: error: train.init_checkpoint=")
        and "FP model first" in last
    )


@pytest.mark.parametrize("suffix", ["", "_mha", "_mlp"])
def test_lazy_tiny_vitdet_quantizes_the_linears_the_yacs_tiny_vitdet_does(suffix):
    from detectron2.modeling import build_model

    from qdet.config import load_config

    lazy_model = lazy.build_model(_config(f"vitdet_tiny_4bit{suffix}.py"))
    got = {n for n, m in lazy_model.named_modules() if hasattr(m, "weight_quantizer")}
    yacs = load_config(
        os.path.join(ROOT, "configs", "digits", f"vitdet_tiny_4bit{suffix}.yaml"),
        ["MODEL.WEIGHTS", ""],
    )
    assert got == set(build_model(yacs).quantized_layers) and len(got) == 4 * (2 if suffix else 4)
    # the same pyramid and heads: parameter names and shapes match the yacs model's
    shapes = {k: v.shape for k, v in lazy_model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in build_model(yacs).state_dict().items()}


def test_lazy_tiny_vitdet_trains_and_evaluates(tmp_path, first_val_images):
    out = str(tmp_path / "vit")
    torch.manual_seed(0)
    lazy.do_train(
        _config(
            "vitdet_tiny_4bit_mha.py",
            "train.init_checkpoint=''",
            f"train.output_dir={out}",
            "lr_multiplier.scheduler.milestones=[50]",  # its schedule has one step
        )
    )
    logged = _metrics(out)
    assert any("loss_mask" in m for m in logged) and any("segm/AP" in m for m in logged)


def test_lazy_qfd_runs_its_teacher_stage_then_distils_the_quantized_feature(
    tmp_path, first_val_images
):
    fp_dir, out = str(tmp_path / "fp"), str(tmp_path / "qfd")
    torch.manual_seed(0)
    lazy.do_train(_config("retinanet_r18_fp.py", f"train.output_dir={fp_dir}"))
    fp = os.path.join(fp_dir, "model_final.pth")
    cfg = _config(
        "retinanet_r18_4bit_qfd.py",
        f"train.output_dir={out}",
        f"train.init_checkpoint={fp}",
        f"distill.teacher_weights={fp}",
        "+distill.teacher_stage_iters=2",
    )
    lazy.do_train(cfg)
    stage = teacher_stage.lazy_teacher_stage(cfg).weights
    assert os.path.isfile(stage) and any("loss_distill_qfd" in m for m in _metrics(out))
    teacher = teacher_stage.build_lazy_teacher(cfg, "cpu")
    q = teacher.feature_quantizer
    assert q.initialized and q.bits == 8 and q.signed
    # The teacher's p3, as the student's term reads it, is on the 8-bit grid: 2^8 levels.
    batch = next(iter(instantiate(cfg.dataloader.train)))
    with torch.no_grad():
        p3 = teacher.backbone(teacher.preprocess_image(batch).tensor)["p3"]
    assert 1 < p3.unique().numel() <= 256


def test_lazy_qfd_teacher_stage_schedule_fits_its_length():
    """The QFD config as shipped (400 iterations, milestones at 300 and 375): its teacher
    stage is 40 iterations at the base rate after a warmup of at most half of them, as the
    yacs path's; the student's milestones would not fit 40 updates."""
    cfg = LazyConfig.load(os.path.join(DIGITS, "retinanet_r18_4bit_qfd.py"))
    stage = teacher_stage.lazy_teacher_stage_config(cfg)
    assert stage.train.max_iter == 40 and stage.train.checkpointer.period == 40
    assert stage.train.init_checkpoint == cfg.distill.teacher_weights
    assert "evaluator" not in stage.dataloader and "evaluator" in cfg.dataloader
    multiplier = instantiate(stage.lr_multiplier)
    warmup = 20  # the student's 20 / 400 warmup, at most 40 // 2
    assert multiplier(0.0) == pytest.approx(0.001)
    assert [multiplier(i / 40) for i in range(warmup, 40)] == [1.0] * (40 - warmup)
    assert multiplier(warmup / 2 / 40) < 1.0 and multiplier(1.0) == 1.0  # where LRMultiplier ends
    student = copy.deepcopy(cfg.lr_multiplier)
    student.scheduler.num_updates = 40
    with pytest.raises(ValueError, match="Milestone must be smaller"):
        instantiate(student)


def test_lazy_divergence_names_the_last_finite_checkpoint(tmp_path):
    """Learning rate 100: the lazy loop stops with the non-finite message in one line,
    naming the last checkpoint, whose weights are finite."""
    out = str(tmp_path / "nan")
    cfg = _config(
        "retinanet_r18_fp.py",
        f"train.output_dir={out}",
        "train.max_iter=30",
        "train.checkpointer.period=1",
        "train.checkpointer.max_to_keep=100",
        "optimizer.lr=100.0",
        "lr_multiplier.warmup_length=0.0",
    )
    with pytest.raises(FloatingPointError) as stop:
        lazy.do_train(cfg)
    message = str(stop.value)
    assert "\n" not in message and "training stopped before its update" in message
    with open(os.path.join(out, "last_checkpoint")) as f:
        last = os.path.join(out, f.read().strip())
    assert f"the last checkpoint, {last}, is from a step whose losses were finite" in message
    state = torch.load(last, weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
