"""Deployment targets end to end (QUANT.TARGET): the commands of docs/deployment.md on a
tiny model, from FP training to the check of the integer export. What each module a target
runs through computes is tested beside it: tests/test_folding.py, test_targets.py,
test_deployable.py, test_layers.py, test_integer_ops.py, test_integer_check.py,
test_hooks.py, test_export_packed.py (the models they share: tests/target_models.py)."""

from __future__ import annotations

import os

from target_models import ROOT


def test_qfd_for_a_target_trains_and_exports_in_integer_kernels(tmp_path):
    """The commands of docs/deployment.md, on a tiny model: FP, QFD for onnxruntime (its
    teacher stage first), then tools/export_onnx.py's check of the integer graph."""
    import json
    import subprocess
    import sys

    from train_net_cli import run_train_net, write_config_with

    small = ["MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "32"]
    small += ["MODEL.RETINANET.NUM_CONVS", "1", "SOLVER.IMS_PER_BATCH", "2"]
    small += ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128"]
    small += ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128"]
    fp_config = os.path.join(ROOT, "configs/digits/retinanet_r18_fp.yaml")
    fp_out, out = tmp_path / "fp", tmp_path / "qfd"
    run_train_net(
        "--config-file",
        fp_config,
        *small,
        "SOLVER.MAX_ITER",
        "2",
        "DATASETS.TEST",
        "()",
        "OUTPUT_DIR",
        str(fp_out),
    )
    fp_weights = str(fp_out / "model_final.pth")
    teacher = write_config_with(tmp_path / "teacher.yaml", fp_config, small)
    config = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_qfd_ort.yaml")
    run_train_net(
        "--config-file", config, *small,
        "MODEL.WEIGHTS", fp_weights,
        "DISTILL.TEACHER_WEIGHTS", fp_weights,
        "DISTILL.TEACHER_CONFIG", str(teacher),
        "DISTILL.TEACHER_STAGE_ITERS", "2",
        "SOLVER.MAX_ITER", "3",
        "QUANT.FREEZE_BN_ITER", "2",
        "QUANT.CALIB_BATCHES", "1",
        "DATASETS.TEST", "()",
        "OUTPUT_DIR", str(out),
    )  # fmt: skip
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert metrics[-1]["loss_distill_qfd"] > 0
    onnx_path = str(tmp_path / "export" / "qfd.onnx")
    cmd = [sys.executable, os.path.join(ROOT, "tools/export_onnx.py"), "--config-file", config]
    cmd += ["--output", onnx_path, "--verify-images", "2", *small]
    cmd += ["MODEL.WEIGHTS", str(out / "model_final.pth")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(onnx_path.removesuffix(".onnx") + ".export.json") as f:
        result = json.load(f)
    check = result["verify"]
    assert check["failures"] == [] and check["target"] == "onnxruntime"
    assert check["integer_kernels"]["QLinearConv"] == 48 and check["float_convs"] == 0
    # beside it, onnxruntime's quantize_static of the same FP model: the same 48 convs, all
    # QLinearConv too; R18's 8 residual adds and the FPN's 2 top-down adds integer in both
    kinds = result["kernels_vs_quantize_static"]
    assert kinds["conv"]["qdet"] == {"integer": 48, "float": 0}
    assert kinds["conv"]["quantize_static"] == {"integer": 48, "float": 0}
    assert kinds["add"]["qdet"]["integer"] == 10
    assert kinds["add"]["quantize_static"]["integer"] >= 10
