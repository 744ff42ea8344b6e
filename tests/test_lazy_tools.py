"""tools/export_onnx.py and tools/predict.py on a LazyConfig (qdet.engine.trained_model):
the same tools as for yacs configs, the checkpoint in ``train.init_checkpoint``."""

from __future__ import annotations

import json
import os

import cv2
import detectron2.data.transforms as T
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate

import qdet  # noqa: F401  (registers the digits datasets)
from qdet.engine import lazy
from qdet.engine.trained_model import check_resizable, float_form, load_trained_model
from qdet.export.runtime import inference_session, onnx_metadata
from qdet.predict import split_config_overrides
from qdet.quantization import calibrate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "lazy", "digits", "retinanet_r18_4bit.py")
HEIGHT, WIDTH = 120, 150  # resized by the config's test augmentation (short edge 160)


@pytest.fixture(scope="module")
def lazy_checkpoint(tmp_path_factory):
    """The lazy digits 4-bit RetinaNet, calibrated on one training batch (untrained), and
    two pictures."""
    root = tmp_path_factory.mktemp("lazy_tools")
    cfg = LazyConfig.load(CONFIG)
    cfg.dataloader.train.total_batch_size = 2
    torch.manual_seed(0)
    model = lazy.build_model(cfg).eval()
    calibrate(model, [next(iter(instantiate(cfg.dataloader.train)))], num_batches=1)
    DetectionCheckpointer(model, save_dir=str(root)).save("model_final")
    rng = np.random.default_rng(0)
    images = [str(root / f"{name}.png") for name in ("a", "b")]
    for path in images:
        cv2.imwrite(path, rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    return {"weights": str(root / "model_final.pth"), "images": images, "root": root}


def test_export_onnx_from_a_lazy_config(lazy_checkpoint, tmp_path, load_tool):
    out = str(tmp_path / "lazy.onnx")
    tool = load_tool("export_onnx")
    argv = ["--config-file", CONFIG, "--output", out, "--verify-images", "2"]
    status = tool.main(
        tool.build_parser().parse_args(
            [*argv, f"train.init_checkpoint={lazy_checkpoint['weights']}"]
        )
    )
    assert status == 0
    with open(out.removesuffix(".onnx") + ".export.json") as f:
        result = json.load(f)
    trained = load_trained_model(
        CONFIG, [f"train.init_checkpoint={lazy_checkpoint['weights']}"], "to export"
    )
    quantizers = [m for n, m in trained.model.named_modules() if n.endswith("_quantizer")]
    assert result["graph"] == "qdet-detector-1" and result["quantizers"] == len(quantizers) > 0
    check = result["verify"]
    assert not check["failures"] and check["images"] == 2 and check["quantized"]
    # What a runner needs, read from the LazyConfig (its test mapper and resize).
    meta = onnx_metadata(inference_session(out))
    assert (meta["input_format"], meta["min_size_test"], meta["max_size_test"]) == ("RGB", 160, 192)
    assert meta["bits"] == "W4/A4" and len(meta["class_names"]) == 10
    assert os.path.isfile(out.removesuffix(".onnx") + ".weights.safetensors")


def test_float_form_is_the_quantized_models_weights_without_its_quantizers(lazy_checkpoint):
    """The FP model --peer-kernels hands onnxruntime's quantize_static: no quantizer, every
    float tensor the trained model's; a state the FP form cannot hold is refused."""
    opts = [f"train.init_checkpoint={lazy_checkpoint['weights']}"]
    trained = load_trained_model(CONFIG, opts, "to export")
    fp = float_form(CONFIG, opts, trained)
    assert not [n for n, _ in fp.model.named_modules() if n.endswith("_quantizer")]
    ours = trained.model.state_dict()
    theirs = fp.model.state_dict()
    assert theirs and all(torch.equal(t, ours[k]) for k, t in theirs.items())
    assert len(ours) > len(theirs)  # the quantizers' state, left out
    trained.model.register_buffer("stray", torch.zeros(1))
    with pytest.raises(ValueError, match=r"1 left over \(e.g. \['stray'\]\)"):
        float_form(CONFIG, opts, trained)


def test_predict_from_a_lazy_config_resizes_as_its_test_loader(
    lazy_checkpoint, tmp_path, load_tool
):
    """The picture goes through what the config's test mapper does (RGB, short edge 160):
    the tool's detections equal the model's on the mapper's output for the same file."""
    weights = lazy_checkpoint["weights"]
    tool = load_tool("predict")
    argv = ["--config-file", CONFIG, "--input", *lazy_checkpoint["images"]]
    argv += ["--output", str(tmp_path), "--confidence-threshold", "0"]
    written = tool.main(tool.build_parser().parse_args([*argv, f"train.init_checkpoint={weights}"]))
    assert [cv2.imread(p).shape for p in written] == [(HEIGHT, WIDTH, 3)] * 2

    trained = load_trained_model(CONFIG, [f"train.init_checkpoint={weights}"], "to run")
    trained.set_score_threshold(0.0)
    cfg = LazyConfig.load(CONFIG)
    mapper = instantiate(cfg.dataloader.test.mapper)
    model = lazy.build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    model.test_score_thresh = 0.0
    for path in lazy_checkpoint["images"]:
        picture = trained(cv2.imread(path))["instances"]
        mapped = mapper({"file_name": path, "height": HEIGHT, "width": WIDTH})
        with torch.no_grad():
            expected = model([mapped])[0]["instances"]
        assert len(picture) == len(expected) > 0
        torch.testing.assert_close(picture.pred_boxes.tensor, expected.pred_boxes.tensor)
        torch.testing.assert_close(picture.scores, expected.scores)


def test_lazy_tool_errors(lazy_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"train.init_checkpoint is empty: .*to export"):
        load_trained_model(CONFIG, ["train.init_checkpoint=''"], "to export")
    missing = str(tmp_path / "none.pth")
    with pytest.raises(FileNotFoundError, match=r"none.pth.* does not exist: `tools/lazy_train"):
        load_trained_model(CONFIG, [f"train.init_checkpoint={missing}"], "to export")
    with pytest.raises(ValueError, match=r"overrides are key=value, got \['MODEL.WEIGHTS'"):
        load_trained_model(CONFIG, ["MODEL.WEIGHTS", lazy_checkpoint["weights"]], "to export")
    images = lazy_checkpoint["images"]
    overrides = ["train.init_checkpoint=x.pth", "train.device=cpu"]
    assert split_config_overrides([*images, *overrides], []) == (images, overrides)


def test_a_picture_too_thin_to_resize_is_an_error_naming_its_size():
    resize = [T.ResizeShortestEdge([160, 160], 192)]
    check_resizable(120, 160, resize)  # an ordinary picture
    check_resizable(4000, 30, resize)  # thin, but 1 x 192 after the resize
    with pytest.raises(ValueError, match=r"a 3 x 4000 picture resizes to 0 x 192 .*short edge 160"):
        check_resizable(4000, 3, resize)
