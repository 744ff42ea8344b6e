"""Nothing overwritten by mistake (qdet/engine/checks.py): a training run refuses an
OUTPUT_DIR that holds another run's checkpoints unless it resumes or starts over
explicitly, and leaves that folder's files (config.yaml included) as they were; a tool's
output that is one of its inputs is refused before anything is written."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, get_cfg
from detectron2.modeling import build_model
from train_net_cli import ROOT, run_train_net

from qdet.config import add_qdet_config, load_config
from qdet.engine import lazy
from qdet.engine.checks import check_output_dir, refuse_overwriting_inputs

FP = os.path.join(ROOT, "configs/digits/retinanet_r18_fp.yaml")
TINY = ["MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "32"]
TINY += ["MODEL.RETINANET.NUM_CONVS", "1", "SOLVER.IMS_PER_BATCH", "2"]
TINY += ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.MAX_ITER", "1"]
TINY += ["TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]


def _digests(folder) -> dict[str, str]:
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, name))
    }


def test_output_dir_with_checkpoints_needs_resume_or_restart(tmp_path):
    cfg = add_qdet_config(get_cfg())
    cfg.OUTPUT_DIR = str(tmp_path)
    check_output_dir(cfg.OUTPUT_DIR)  # empty: fine
    (tmp_path / "metrics.json").write_text("{}")
    check_output_dir(cfg.OUTPUT_DIR)  # no checkpoint: fine
    (tmp_path / "model_0000009.pth").write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(FileExistsError, match=r"1 model_\*.pth, last model_0000009.pth.*--resume"):
        check_output_dir(cfg.OUTPUT_DIR)
    check_output_dir(cfg.OUTPUT_DIR, resume=True)
    check_output_dir(cfg.OUTPUT_DIR, restart=True)


def test_lazy_run_checks_its_output_dir_before_writing(tmp_path):
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/lazy/digits/retinanet_r18_fp.py"))
    cfg.train.output_dir = str(tmp_path)
    lazy.check_run(cfg)
    (tmp_path / "model_0000009.pth").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"^train.output_dir .* new train.output_dir"):
        lazy.check_run(cfg)
    lazy.check_run(cfg, resume=True)
    lazy.check_run(cfg, restart=True)


def test_outputs_that_are_inputs_are_refused(tmp_path):
    weights = str(tmp_path / "model_final.pth")
    same = os.path.join(str(tmp_path), "sub", "..", "model_final.pth")  # the same file
    with pytest.raises(ValueError, match="--output .* is the checkpoint.*another --output"):
        refuse_overwriting_inputs({"--output": same}, {"the checkpoint": weights})
    refuse_overwriting_inputs({"--output": str(tmp_path / "m.onnx")}, {"the checkpoint": weights})


def test_train_net_refuses_a_used_folder_and_leaves_it_as_it_was(tmp_path):
    out = str(tmp_path / "run")
    run_train_net("--config-file", FP, *TINY, "OUTPUT_DIR", out)
    before = _digests(out)
    refused = run_train_net(
        "--config-file", FP, *TINY, "SOLVER.BASE_LR", "0.5", "OUTPUT_DIR", out, check=False
    )
    assert refused.returncode == 2
    assert "--resume" in refused.stderr and "--restart" in refused.stderr
    assert _digests(out) == before  # config.yaml and the checkpoints untouched
    run_train_net(
        "--restart", "--config-file", FP, *TINY, "SOLVER.BASE_LR", "0.5", "OUTPUT_DIR", out
    )
    assert load_config(os.path.join(out, "config.yaml"), []).SOLVER.BASE_LR == 0.5


def test_export_refuses_to_write_over_its_checkpoint(tmp_path):
    cfg = load_config(FP, TINY)
    weights = str(tmp_path / "model.pth")
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("model")
    before = _digests(tmp_path)
    cmd = [sys.executable, os.path.join(ROOT, "tools/export_onnx.py"), "--config-file", FP]
    cmd += ["--output", weights, *TINY, "MODEL.WEIGHTS", weights]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--output" in done.stderr and "is the checkpoint" in done.stderr
    assert _digests(tmp_path) == before


def test_divergence_keeps_the_last_good_checkpoint_and_names_it(tmp_path):
    """A diverging run (learning rate 100): whether a loss or the weights after an update
    turn inf / NaN first, nothing non-finite is saved; the error names the last checkpoint,
    whose weights are finite, and the newest file on disk is that one."""
    out = str(tmp_path / "nan")
    opts = [*TINY, "SOLVER.MAX_ITER", "30", "SOLVER.CHECKPOINT_PERIOD", "1"]
    opts += ["SOLVER.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "100.0", "OUTPUT_DIR", out]
    done = run_train_net("--config-file", FP, *opts, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert "inf or NaN" in line or "infinite or NaN" in line
    with open(os.path.join(out, "last_checkpoint")) as f:
        last = f.read().strip()
    assert f"the last checkpoint, {os.path.join(out, last)}," in line and "resume from it" in line
    saved = sorted(n for n in os.listdir(out) if n.startswith("model_"))
    assert saved[-1] == last and "model_final.pth" not in saved
    for name in saved:  # every file on disk is finite
        state = torch.load(os.path.join(out, name), weights_only=False)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
