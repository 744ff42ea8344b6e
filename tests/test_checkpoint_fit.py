"""A checkpoint of another model is refused (qdet/engine/checkpoint.py: incompatibility,
check_calibrated): Detectron2 would log the mismatch and run a partly random network. The
documented cases still load: an FP detector into its quantized config, a backbone's
pretrained weights into a detector."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from qdet.config import load_config
from qdet.engine.checkpoint import AtomicCheckpointer, check_calibrated
from qdet.quantization import Quantizer, calibrate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP = os.path.join(ROOT, "configs/digits/retinanet_r18_fp.yaml")
QAT = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_baseline.yaml")
TINY = ["MODEL.WEIGHTS", "", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.RETINANET.NUM_CONVS", "1"]


def _saved(tmp_path, config: str, *opts: str, name: str = "m") -> str:
    torch.manual_seed(0)
    model = build_model(load_config(config, [*TINY, *opts]))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save(name)
    return str(tmp_path / f"{name}.pth")


def _model(config: str, *opts: str):
    return build_model(load_config(config, [*TINY, *opts]))


def test_deeper_backbone_is_refused(tmp_path):
    r34 = _saved(tmp_path, FP, "MODEL.RESNETS.DEPTH", "34")
    with pytest.raises(ValueError, match=r"does not fit.*parameters the model lacks.*res2\.2"):
        AtomicCheckpointer(_model(FP, "MODEL.RESNETS.DEPTH", "18")).load(r34)


def test_other_shapes_are_refused(tmp_path):
    wide = _saved(tmp_path, FP, "MODEL.FPN.OUT_CHANNELS", "48")
    with pytest.raises(ValueError, match=r"parameters of other shapes \(e\.g\. backbone\.fpn"):
        AtomicCheckpointer(_model(FP)).load(wide)


def test_fp_into_quantized_and_backbone_only_load(tmp_path):
    fp = _saved(tmp_path, FP)
    model = _model(QAT)
    AtomicCheckpointer(model).load(fp)  # only quantizer keys missing: the documented case
    reference = torch.load(fp, weights_only=False)["model"]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    backbone = {k: v for k, v in reference.items() if k.startswith("backbone.bottom_up.")}
    torch.save({"model": backbone}, tmp_path / "backbone.pth")
    AtomicCheckpointer(_model(FP)).load(str(tmp_path / "backbone.pth"))  # the rest trains


def test_missing_head_of_a_detector_checkpoint_is_refused(tmp_path):
    reference = torch.load(_saved(tmp_path, FP), weights_only=False)["model"]
    partial = {k: v for k, v in reference.items() if not k.startswith("head.cls_score")}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"2 of the model's parameters missing.*cls_score"):
        AtomicCheckpointer(_model(FP)).load(str(tmp_path / "partial.pth"))


def test_evaluating_an_uncalibrated_quantized_model_is_refused(tmp_path):
    fp = _saved(tmp_path, FP)
    model = _model(QAT)
    AtomicCheckpointer(model).load(fp)
    with pytest.raises(ValueError, match=r"quantizers of this quantized model are not calibrated"):
        check_calibrated(model, fp)
    images = [{"image": torch.rand(3, 64, 96) * 255}]
    calibrate(model.eval(), [images], num_batches=1)
    assert all(m.initialized for m in model.modules() if isinstance(m, Quantizer) and m.enabled)
    check_calibrated(model, fp)


def test_unreadable_or_missing_checkpoint_is_one_error_naming_it(tmp_path):
    whole = _saved(tmp_path, FP)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(pathlib.Path(whole).read_bytes()[:10000])
    with pytest.raises(ValueError, match=r"cannot read checkpoint '.*truncated.pth' .*truncated"):
        AtomicCheckpointer(_model(FP)).load(str(truncated))
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*gone.pth' does not exist"):
        AtomicCheckpointer(_model(FP)).load(str(tmp_path / "gone.pth"))


def test_checkpoint_of_another_target_says_so(tmp_path):
    simulated = _saved(tmp_path, QAT, "MODEL.RESNETS.DEPTH", "18")
    for_runtime = _model(QAT, "MODEL.RESNETS.DEPTH", "18", "QUANT.TARGET", "onnxruntime")
    with pytest.raises(ValueError, match=r"trained without a QUANT.TARGET and this config builds"):
        AtomicCheckpointer(for_runtime).load(simulated)
