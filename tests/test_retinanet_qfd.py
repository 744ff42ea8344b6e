"""QuantRetinaNet, the QFD distiller and tools/train_net.py on the embedded data (CPU)."""

import copy
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from train_net_cli import run_train_net, write_config_with

from qdet.config import add_qdet_config, load_config
from qdet.distill import Distiller, TermSpec, build_distill_loss
from qdet.engine import teacher_stage
from qdet.engine.teacher_stage import load_teacher, teacher_config
from qdet.quantization import QConv2d, UniformQuantizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP_CONFIG = os.path.join(ROOT, "configs/digits/retinanet_r18_fp.yaml")
TINY = [
    "MODEL.RESNETS.DEPTH",
    "18",
    "MODEL.FPN.OUT_CHANNELS",
    "32",
    "MODEL.RETINANET.NUM_CONVS",
    "1",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "INPUT.MIN_SIZE_TRAIN",
    "(96,)",
    "INPUT.MAX_SIZE_TRAIN",
    "128",
    "INPUT.MIN_SIZE_TEST",
    "96",
    "INPUT.MAX_SIZE_TEST",
    "128",
]
# Quantized with EWGS, delta 0.5 until the hook's first refresh (one batch, joint).
EWGS = ["QUANT.ENABLED", "True", "QUANT.METHOD", "ewgs", "QUANT.EWGS_DELTA", "0.5"]
EWGS += ["QUANT.EWGS_HESSIAN_BATCHES", "1", "QUANT.EWGS_HUTCHINSON", "joint"]


def _cfg(*opts):
    cfg = add_qdet_config(get_cfg())
    cfg.merge_from_file(FP_CONFIG)
    cfg.merge_from_list(TINY + list(opts))
    return cfg


def _batch(n=2, size=96, seed=0):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 40.0, 50.0], [50.0, 30.0, 80.0, 70.0]]))
        inst.gt_classes = torch.tensor([1, 7])
        out.append(
            {
                "image": torch.randint(0, 255, (3, size, size), generator=g).float(),
                "instances": inst,
                "height": size,
                "width": size,
            }
        )
    return out


def test_quant_retinanet_quantizes_and_trains():
    torch.manual_seed(0)
    model = build_model(_cfg("QUANT.ENABLED", "True"))
    convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert set(model.quantized_layers) == convs - {
        "backbone.bottom_up.stem.conv1",
        "head.cls_score",
        "head.bbox_pred",
    }
    assert isinstance(model.backbone.fpn_output3, QConv2d)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(2):
        with EventStorage(step):
            losses = model(_batch(seed=step))
        opt.zero_grad()
        sum(losses.values()).backward()
        q = model.head.cls_subnet[0]
        assert q.input_quantizer.scale.grad is not None and q.weight_quantizer.lower.grad.abs() > 0
        opt.step()
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("freeze_with_weights", [False, True])
def test_quantizers_of_frozen_stages_train_unless_frozen_with_their_weights(freeze_with_weights):
    torch.manual_seed(0)
    cfg = _cfg("QUANT.ENABLED", "True", "MODEL.BACKBONE.FREEZE_AT", "2")
    cfg.QUANT.FREEZE_WITH_WEIGHTS = freeze_with_weights
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(_batch())
    sum(losses.values()).backward()
    res2, res3 = model.backbone.bottom_up.res2[0].conv1, model.backbone.bottom_up.res3[0].conv1
    assert not res2.weight.requires_grad and res3.input_quantizer.upper.grad is not None
    for p in (res2.input_quantizer.upper, res2.weight_quantizer.scale):
        assert p.requires_grad != freeze_with_weights
        assert (p.grad is None) == freeze_with_weights


def test_per_level_head_quantizers_see_their_own_level():
    from qdet.quantization.per_level import PerLevelQuantizer

    torch.manual_seed(0)
    model = build_model(_cfg("QUANT.ENABLED", "True", "QUANT.HEAD_PER_LEVEL_ACT", "True"))
    first = model.head.cls_subnet[0]
    assert isinstance(first.input_quantizer, PerLevelQuantizer)
    assert len(first.input_quantizer.levels) == 5
    assert not isinstance(model.backbone.fpn_output3.input_quantizer, PerLevelQuantizer)
    from qdet.quantization import Quantizer, calibrate
    from qdet.quantization.quantizers import SIGNED_PERCENTILES, _percentile

    batch = _batch()
    # Level i's quantizer must be calibrated on p(3+i) alone, as the FP model computes it.
    fp = copy.deepcopy(model).eval()
    for q in fp.modules():
        if isinstance(q, Quantizer):
            q.bits = 32
    with torch.no_grad():
        feats = fp.backbone(fp.preprocess_image(batch).tensor)
    calibrate(model, [batch], num_batches=1)

    for level, name in enumerate(["p3", "p4", "p5", "p6", "p7"]):
        q = first.input_quantizer.levels[level]
        assert q.initialized and q.signed
        assert q.upper.item() == pytest.approx(
            _percentile(feats[name], SIGNED_PERCENTILES[1]), rel=1e-4
        )
    lows = {round(q.lower.item(), 4) for q in first.input_quantizer.levels}
    assert len(lows) == 5  # different ranges per level
    model.train()
    with EventStorage():
        losses = model(batch)
    sum(losses.values()).backward()
    assert all(q.scale.grad is not None for q in first.input_quantizer.levels)


def test_fp_checkpoint_loads_into_quantized_model(tmp_path):
    fp = build_model(_cfg())
    DetectionCheckpointer(fp, save_dir=str(tmp_path)).save("fp")
    q = build_model(_cfg("QUANT.ENABLED", "True"))
    result = q.load_state_dict(
        torch.load(tmp_path / "fp.pth", weights_only=False)["model"], strict=False
    )
    assert not result.unexpected_keys
    assert result.missing_keys and all("_quantizer." in k for k in result.missing_keys)


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """An FP teacher checkpoint and a feature-quantized one (teacher stage output)."""
    d = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(1)
    fp = build_model(_cfg())
    DetectionCheckpointer(fp, save_dir=str(d)).save("fp")
    fq = build_model(_cfg("QUANT.FEATURE_TAP", "p3"))
    fq.load_state_dict(fp.state_dict(), strict=False)
    with torch.no_grad():
        fq.feature_quantizer.init_from(torch.randn(1000) * 3)
    DetectionCheckpointer(fq, save_dir=str(d)).save("fq")
    return d


def _student_cfg(d, *opts):
    return _cfg(
        "QUANT.ENABLED",
        "True",
        "DISTILL.ENABLED",
        "True",
        "DISTILL.TEACHER_CONFIG",
        FP_CONFIG,
        "DISTILL.TEACHER_WEIGHTS",
        str(d / "fp.pth"),
        "DISTILL.QUANTIZED_TEACHER_WEIGHTS",
        str(d / "fq.pth"),
        *opts,
    )


def test_qfd_loss_matches_independent_computation(teacher_checkpoint, monkeypatch):
    monkeypatch.setattr(teacher_stage, "teacher_config", _tiny_teacher_config)
    cfg = _student_cfg(teacher_checkpoint)
    from qdet.engine import QDetTrainer

    student = QDetTrainer.build_model(cfg)
    teacher = student.distiller.teacher
    assert teacher.feature_quantizer.bits == 8 and teacher.feature_quantizer.signed
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("distiller.teacher") for k in student.state_dict())
    student.train()
    batch = _batch()
    with EventStorage() as storage:
        losses = student(batch)
    ratio = storage.history("distill_ratio").latest()
    det = losses["loss_cls"] + losses["loss_box_reg"]
    total = det + losses["loss_distill_qfd"]
    assert ratio == pytest.approx((losses["loss_distill_qfd"] / total).item(), rel=1e-5)
    # Independent: run both backbones by hand, quantize the teacher's p3 with a fresh
    # quantizer holding the checkpoint's parameters, and take the mean squared error.
    images = student.preprocess_image(batch).tensor
    with torch.no_grad():
        f_s = student.backbone(images)["p3"]
        fpn_fp = copy.deepcopy(teacher.backbone)
        fpn_fp._forward_hooks.clear()
        p3_t = fpn_fp(images)["p3"]
        q = UniformQuantizer(8, "activation", signed=True)
        q.load_state_dict(teacher.feature_quantizer.state_dict())
        expected = F.mse_loss(f_s, q(p3_t)) * cfg.DISTILL.WEIGHT
    torch.testing.assert_close(losses["loss_distill_qfd"].detach(), expected, rtol=1e-5, atol=1e-7)
    assert losses["loss_distill_qfd"].requires_grad
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())


def _tiny_teacher_config(cfg, quantized_feature):
    tcfg = teacher_config(cfg, quantized_feature)
    tcfg.merge_from_list(TINY)
    return tcfg


def test_distiller_errors(teacher_checkpoint, monkeypatch):
    monkeypatch.setattr(teacher_stage, "teacher_config", _tiny_teacher_config)
    cfg = _student_cfg(teacher_checkpoint)
    with pytest.raises(FileNotFoundError, match="does not exist.*teacher stage"):
        load_teacher(cfg, str(teacher_checkpoint / "missing.pth"), quantized_feature=True)
    with pytest.raises(ValueError, match="no trained feature quantizer"):
        load_teacher(cfg, str(teacher_checkpoint / "fp.pth"), quantized_feature=True)
    teacher = load_teacher(cfg, str(teacher_checkpoint / "fp.pth"), quantized_feature=False)
    student = build_model(cfg)
    with pytest.raises(ValueError, match=r"'p9' is not in the student.*p3"):
        Distiller(student, teacher, [TermSpec("qfd", ["p9"], 1.0)])
    with pytest.raises(ValueError, match="DISTILL.LOSS='kl'.*feature_kd"):
        build_distill_loss("kl")
    # A teacher config whose model does not match the checkpoint.
    monkeypatch.setattr(teacher_stage, "teacher_config", _wide)
    with pytest.raises(ValueError, match="does not match"):
        load_teacher(cfg, str(teacher_checkpoint / "fp.pth"), quantized_feature=False)


def _wide(cfg, quantized_feature):
    tcfg = _tiny_teacher_config(cfg, quantized_feature)
    tcfg.merge_from_list(["MODEL.FPN.OUT_CHANNELS", "48"])
    return tcfg


def test_train_net_runs_resumes_and_evaluates(tmp_path):
    out = tmp_path / "fp"
    common = [
        "--config-file",
        FP_CONFIG,
        *TINY,
        "OUTPUT_DIR",
        str(out),
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "DATASETS.TEST",
        "()",
    ]
    run_train_net(*common, "SOLVER.MAX_ITER", "2")
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert not list(out.glob("*.tmp-*"))  # atomic writes leave no temporaries
    # Resume with a longer schedule: starts at iteration 2, not 0. A checkpoint every
    # iteration, the newest one kept: model_0000002 is deleted when model_0000003 is written
    # (the first run's model_0000001 is not this run's to delete).
    keep_one = ["SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.CHECKPOINTS_TO_KEEP", "1"]
    r = run_train_net("--resume", *common, "SOLVER.MAX_ITER", "4", *keep_one)
    assert "Starting training from iteration 2" in r.stderr + r.stdout
    assert sorted(p.name for p in out.glob("model_*.pth")) == [
        "model_0000001.pth",
        "model_0000003.pth",
        "model_final.pth",
    ]
    ckpt = torch.load(out / "model_final.pth", weights_only=False)
    assert ckpt["iteration"] == 3
    # --eval-only prints COCO AP on the embedded val split.
    r = run_train_net(
        "--eval-only",
        "--config-file",
        FP_CONFIG,
        *TINY,
        "MODEL.WEIGHTS",
        str(out / "model_final.pth"),
        "OUTPUT_DIR",
        str(tmp_path / "eval"),
    )
    assert "copypaste: AP,AP50,AP75" in r.stderr + r.stdout


def test_train_net_ewgs_hook_refreshes_delta(tmp_path):
    """QUANT.METHOD ewgs in tools/train_net.py: delta starts at EWGS_DELTA and the hook
    refreshes it after iteration 2 (period 2); the checkpoint holds what the log reports."""
    out = tmp_path / "ewgs"
    r = run_train_net(
        "--config-file",
        FP_CONFIG,
        *TINY,
        *EWGS,
        "QUANT.EWGS_UPDATE_PERIOD",
        "2",
        "QUANT.CALIB_BATCHES",
        "1",
        "SOLVER.MAX_ITER",
        "3",
        "DATASETS.TEST",
        "()",
        "OUTPUT_DIR",
        str(out),
    )
    log = r.stderr + r.stdout
    assert "EWGS: delta refreshed every 2 iterations on 1 batches (joint estimator)" in log
    refreshes = [line for line in log.splitlines() if "EWGS delta refreshed after" in line]
    assert len(refreshes) == 1 and "after iteration 2 on 1 batches" in refreshes[0]
    state = torch.load(out / "model_final.pth", weights_only=False)["model"]
    weight_deltas = [float(v) for k, v in state.items() if k.endswith("weight_quantizer.delta")]
    # A quantizer whose output got no gradient in the hook's batch keeps 0.5 (in this tiny
    # untrained model, layers behind an activation quantizer that clipped every input do),
    # and the log says how many were kept.
    refreshed = [d for d in weight_deltas if d != 0.5]
    assert all(d >= 0 for d in weight_deltas) and refreshed
    if len(refreshed) < len(weight_deltas):
        assert "EWGS delta kept for" in log and "that got no gradient" in log
    count, mean = re.search(r"(\d+) weight quantizers mean (\S+)", refreshes[0]).groups()
    assert int(count) == len(refreshed)
    assert float(mean) == pytest.approx(sum(refreshed) / len(refreshed), rel=1e-3)
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("ewgs/weight_delta_mean" in m for m in metrics)


def test_train_net_unknown_key_is_clear(tmp_path):
    r = run_train_net("--config-file", FP_CONFIG, "QUANT.W_BIT", "4", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown config key" in r.stderr and "QUANT.W_BITS" in r.stderr


def test_two_process_training_keeps_ranks_equal(tmp_path):
    """2 CPU processes through Detectron2's launch (gloo DDP): same weights on both ranks,
    and after EWGS's delta refresh the same deltas; a direct refresh on different data per
    rank gives every rank the mean of the ranks' own estimates."""
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import sys, torch
sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, "tools")!r})
from detectron2.engine import launch
from detectron2.utils import comm
import train_net
from qdet.engine import QDetTrainer
from qdet.quantization import EWGSQuantizer, calibrate, quantize_model, update_ewgs_deltas

def main(args):
    cfg = train_net.setup(args)
    trainer = QDetTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.module
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    flats = comm.all_gather(flat)
    finite = bool(torch.isfinite(flat).all())  # NaN != NaN: equality needs finite values
    deltas = torch.stack([m.delta for m in model.modules() if isinstance(m, EWGSQuantizer)])
    all_deltas = comm.all_gather(deltas)
    # A refresh straight from update_ewgs_deltas, each rank on its own data.
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(), torch.nn.Conv2d(3, 2, 3)
    )
    quantize_model(net, 4, 4, method="ewgs", exclude=[])
    x = torch.randn(2, 2, 7, 7, generator=torch.Generator().manual_seed(comm.get_rank()))
    calibrate(net, [x], 1)
    loss = lambda b: net(b).pow(2).mean()
    own = update_ewgs_deltas(net, loss, [x], 1, average_across_ranks=False)
    for m in net.modules():  # delta is in the backward: start the second estimate alike
        if isinstance(m, EWGSQuantizer):
            m.delta.zero_()
    averaged = update_ewgs_deltas(net, loss, [x], 1)
    owns, averageds = comm.all_gather(own), comm.all_gather(averaged)
    if comm.is_main_process():
        q = model.head.cls_subnet[0].input_quantizer
        equal = bool(torch.equal(flats[0], flats[1]))
        print("RANKS_EQUAL", equal, "FINITE", finite, "CALIBRATED", q.initialized)
        refreshed = bool((deltas != 0.5).any())
        print("DELTAS_EQUAL", bool(torch.equal(*all_deltas)), "REFRESHED", refreshed)
        differ = any(abs(owns[0][k] - owns[1][k]) > 1e-3 * owns[0][k] for k in own)
        mean = all(
            abs(averageds[r][k] - (owns[0][k] + owns[1][k]) / 2) < 1e-6 * averageds[r][k]
            for k in own for r in (0, 1)
        )
        positive = all(v > 0 for v in own.values())
        print("OWN_DIFFER", differ, "AVERAGED_IS_MEAN", mean, "POSITIVE", positive)

if __name__ == "__main__":
    args = train_net.build_parser().parse_args(sys.argv[1:])
    launch(main, 2, dist_url="auto", args=(args,))
""")
    env = dict(os.environ, QDET_QUANT_BACKEND="eager", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            str(script),
            "--config-file",
            FP_CONFIG,
            *TINY,
            *EWGS,
            "QUANT.EWGS_UPDATE_PERIOD",
            "1",
            # This model is untrained: the refresh gives deltas up to 1e6 (EWGS's clip is
            # [0, inf)), and with the stem trainable its gradients overflow to NaN in the
            # next step, on both ranks alike (docs/methods.md, "EWGS"). The stem stays frozen here.
            "MODEL.BACKBONE.FREEZE_AT",
            "2",
            "SOLVER.MAX_ITER",
            "2",
            "SOLVER.IMS_PER_BATCH",
            "4",
            "QUANT.CALIB_BATCHES",
            "1",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RANKS_EQUAL True FINITE True CALIBRATED True" in r.stdout
    assert "DELTAS_EQUAL True REFRESHED True" in r.stdout
    assert "OWN_DIFFER True AVERAGED_IS_MEAN True POSITIVE True" in r.stdout


def test_train_net_teacher_stage_then_qfd_student(tmp_path):
    fp_out, out = tmp_path / "fp", tmp_path / "qfd"
    run_train_net(
        "--config-file",
        FP_CONFIG,
        *TINY,
        "SOLVER.MAX_ITER",
        "2",
        "DATASETS.TEST",
        "()",
        "OUTPUT_DIR",
        str(fp_out),
    )
    fp_weights = str(fp_out / "model_final.pth")
    # The teacher config must describe the same (tiny) model as its checkpoint.
    tiny_teacher = write_config_with(tmp_path / "teacher.yaml", FP_CONFIG, TINY)
    r = run_train_net(
        "--config-file",
        os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_qfd.yaml"),
        *TINY,
        "MODEL.WEIGHTS",
        fp_weights,
        "DISTILL.TEACHER_WEIGHTS",
        fp_weights,
        "DISTILL.TEACHER_CONFIG",
        str(tiny_teacher),
        "DISTILL.TEACHER_STAGE_ITERS",
        "2",
        "SOLVER.MAX_ITER",
        "2",
        "QUANT.CALIB_BATCHES",
        "1",
        "DATASETS.TEST",
        "()",
        "OUTPUT_DIR",
        str(out),
    )
    teacher = torch.load(out / "teacher_stage" / "model_final.pth", weights_only=False)["model"]
    initialized, signed, bits = teacher["feature_quantizer._extra_state"].tolist()
    assert (initialized, signed, bits) == (1, 1, 8)
    fp = torch.load(fp_weights, weights_only=False)["model"]
    key = "backbone.fpn_output3.weight"
    assert not torch.equal(torch.as_tensor(teacher[key]), torch.as_tensor(fp[key]))  # fine-tuned
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert metrics[-1]["loss_distill_qfd"] > 0 and 0 < metrics[-1]["distill_ratio"] < 1
    assert "Calibrating" in r.stdout + r.stderr
    student = torch.load(out / "model_final.pth", weights_only=False)["model"]
    assert "backbone.fpn_output3.input_quantizer.lower" in student
    assert not any(k.startswith("feature_quantizer") for k in student)


def test_configs_load_safely_and_keep_detectron2s_anchors():
    """Every YAML of configs/ and projects/*/configs parses with yaml.safe_load (no Python
    tag, so Detectron2 never falls back to unsafe loading), and the base RetinaNet's anchors
    written out are Detectron2's Base-RetinaNet formula, x * 2^(k/3)."""
    import glob

    import yaml

    paths = glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    paths += glob.glob(
        os.path.join(ROOT, "projects", "*", "configs", "**", "*.yaml"), recursive=True
    )
    assert len(paths) > 20
    for path in paths:
        with open(path) as f:
            yaml.safe_load(f)
    cfg = load_config(os.path.join(ROOT, "configs", "Base-QDet-RetinaNet.yaml"), [])
    expected = [[x * 2 ** (k / 3) for k in range(3)] for x in (32, 64, 128, 256, 512)]
    got = cfg.MODEL.ANCHOR_GENERATOR.SIZES
    assert len(got) == 5 and all(len(row) == 3 for row in got)
    for row, want in zip(got, expected):
        assert row == pytest.approx(want, rel=1e-15, abs=0)


def test_every_detection_config_merges_into_qdets_keys():
    """Every yacs YAML of configs/ (not a _BASE_ file alone) loads with qdet's config: no
    key that qdet or Detectron2 does not declare, every _BASE_ chain found."""
    paths = [
        p
        for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
        if os.sep + "lazy" + os.sep not in p
    ]
    assert len(paths) > 50
    for path in paths:
        cfg = load_config(path, [])
        assert cfg.QUANT.W_BITS >= 1, path
    heads = load_config(
        os.path.join(ROOT, "configs", "digits", "swin_tiny_w4a8_heads_ort.yaml"), []
    )
    assert (heads.QUANT.W_BITS, heads.QUANT.TARGET) == (4, "onnxruntime")
    assert list(heads.QUANT.INCLUDE) == [
        "fpn_lateral",
        "fpn_output",
        "proposal_generator",
        "roi_heads",
    ]
