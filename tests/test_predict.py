"""tools/predict.py (drawn detections, --compare, --onnx) and tools/inspect_quantizers.py."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from qdet.config import load_config
from qdet.predict import build_panel_model, list_images, read_image
from qdet.quantization import QConv2d, calibrate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT, WIDTH = 64, 96


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny calibrated 4-bit RetinaNet: its YAML, its checkpoint, and two input images
    (one a file, one inside a folder)."""
    root = tmp_path_factory.mktemp("predict")
    base = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_baseline.yaml")
    config = root / "tiny.yaml"
    config.write_text(
        f'_BASE_: "{base}"\n'
        "MODEL:\n  WEIGHTS: ''\n  RESNETS: {DEPTH: 18}\n  FPN: {OUT_CHANNELS: 32}\n"
        "  RETINANET: {NUM_CONVS: 1}\n"
        f"INPUT: {{MIN_SIZE_TEST: {HEIGHT}, MAX_SIZE_TEST: {WIDTH}}}\n"
        "TEST: {DETECTIONS_PER_IMAGE: 1}\n"  # one box per image: where it is drawn is known
    )
    torch.manual_seed(0)
    model = build_model(load_config(str(config), [])).eval()
    g = torch.Generator().manual_seed(1)
    batch = [{"image": torch.randint(0, 255, (3, HEIGHT, WIDTH), generator=g).float()}]
    calibrate(model, [batch], num_batches=1)
    DetectionCheckpointer(model, save_dir=str(root)).save("model_final")
    rng = np.random.default_rng(2)
    (root / "folder").mkdir()
    images = [str(root / "a.png"), str(root / "folder" / "b.png")]
    for path in images:
        cv2.imwrite(path, rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    return {"config": str(config), "weights": str(root / "model_final.pth"), "images": images}


def _predict(load_tool, argv: list[str]) -> list[str]:
    tool = load_tool("predict")
    return tool.main(tool.build_parser().parse_args(argv))


def test_predict_draws_the_detections_at_the_input_size(tiny, tmp_path, load_tool):
    out = tmp_path / "out"
    argv = ["--config-file", tiny["config"], "--input", tiny["images"][0]]
    argv += [os.path.dirname(tiny["images"][1]), "--output", str(out)]
    argv += ["--confidence-threshold", "0", "MODEL.WEIGHTS", tiny["weights"]]
    written = _predict(load_tool, argv)
    assert sorted(os.path.basename(p) for p in written) == ["a.png", "b.png"]

    cfg = load_config(tiny["config"], ["MODEL.WEIGHTS", tiny["weights"]])
    predictor = build_panel_model(cfg, "tiny", confidence_threshold=0.0).predictor
    for image_path, out_path in zip(tiny["images"], sorted(written)):
        image, drawn = read_image(image_path), read_image(out_path)
        assert drawn.shape == image.shape
        changed = np.abs(drawn.astype(int) - image.astype(int)).max(axis=2) > 0
        # The one detection's outline, from the predictor run here, is where pixels changed.
        assert _outline_share(changed, predictor(image)) > 0.8
        assert changed.mean() < 0.8  # a box and its label, not the whole image


def _outline_share(changed: np.ndarray, outputs: dict) -> float:
    """The share of the first detected box's outline among the ``changed`` pixels."""
    x0, y0, x1, y1 = outputs["instances"].pred_boxes.tensor[0].round().int().tolist()
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, WIDTH - 1), min(y1, HEIGHT - 1)
    outline = np.zeros_like(changed)
    outline[[y0, y1], x0 : x1 + 1] = True
    outline[y0 : y1 + 1, [x0, x1]] = True
    return float(changed[outline].mean())


def test_predict_compare_and_onnx_write_panels_side_by_side(tiny, tmp_path, load_tool):
    from qdet.export import OnnxRetinaNet, export_onnx

    cfg = load_config(tiny["config"], ["MODEL.WEIGHTS", tiny["weights"]])
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(tiny["weights"])
    image = torch.zeros(3, HEIGHT, WIDTH)
    onnx_path = str(tmp_path / "tiny.onnx")
    export_onnx(model, onnx_path, model.preprocess_image([{"image": image}]).tensor)

    argv = ["--config-file", tiny["config"], "--input", tiny["images"][0], "--output"]
    argv += [str(tmp_path / "out"), "--onnx", onnx_path, "--confidence-threshold", "0"]
    argv += ["--compare", tiny["config"], tiny["weights"]]
    # the ONNX model left, PyTorch right; MODEL.WEIGHTS optional
    (written,) = _predict(load_tool, argv)
    drawn, image = read_image(written), read_image(tiny["images"][0])
    assert drawn.shape == (HEIGHT, 2 * WIDTH, 3)
    # Each half holds its own backend's box: onnxruntime's on the left, PyTorch's on the
    # right (the title in each top-left corner changes pixels too, not the box's outline).
    onnx_predictor = build_panel_model(cfg, "onnx", 0.0, onnx=onnx_path).predictor
    torch_predictor = build_panel_model(cfg, "torch", 0.0).predictor
    for half, predictor in (
        (drawn[:, :WIDTH], onnx_predictor),
        (drawn[:, WIDTH:], torch_predictor),
    ):
        changed = np.abs(half.astype(int) - image.astype(int)).max(axis=2) > 0
        assert _outline_share(changed, predictor(image)) > 0.8
    assert isinstance(onnx_predictor.model, OnnxRetinaNet)


def test_bad_inputs_are_clear_errors(tiny, tmp_path, load_tool):
    with pytest.raises(FileNotFoundError, match="nope.png.*no such file"):
        list_images([str(tmp_path / "nope.png")])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list_images([str(tmp_path / "*.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without images"):
        list_images([str(tmp_path / "empty")])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read .*broken.png"):
        read_image(str(broken))
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS.*does not exist"):
        argv = ["--config-file", tiny["config"], "--input", tiny["images"][0], "--output"]
        argv += [str(tmp_path / "o"), "MODEL.WEIGHTS", str(tmp_path / "none.pth")]
        _predict(load_tool, argv)
    # --output the folder of the pictures: drawing would overwrite them; nothing is written.
    folder = os.path.dirname(tiny["images"][0])
    before = sorted(os.listdir(folder))
    with pytest.raises(ValueError, match=r"--output .* would overwrite input picture .*another"):
        argv = ["--config-file", tiny["config"], "--input", *tiny["images"], "--output", folder]
        _predict(load_tool, [*argv, "MODEL.WEIGHTS", tiny["weights"]])
    assert sorted(os.listdir(folder)) == before


def test_inspect_quantizers_writes_the_ranges_plot_and_json(tiny, tmp_path, load_tool):
    tool = load_tool("inspect_quantizers")
    argv = ["--config-file", tiny["config"], "--output", str(tmp_path), "--input"]
    argv += [*tiny["images"], "MODEL.WEIGHTS", tiny["weights"]]
    tool.main(tool.build_parser().parse_args(argv))
    with open(tmp_path / "ranges.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "ranges.json") as f:
        records = json.load(f)["quantizers"]

    model = build_model(load_config(tiny["config"], [])).eval()
    DetectionCheckpointer(model).load(tiny["weights"])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QConv2d)}
    assert len(records) == 2 * len(layers)  # each layer's input and weight quantizer
    assert all(r["lower"] < r["upper"] and 0 <= r["clipped"] <= 1 for r in records)
    assert all(r["calls"] > 0 for r in records)
    # One weight quantizer's clipped share, counted directly from its parameters.
    name, layer = next(iter(layers.items()))
    q = layer.weight_quantizer
    w = layer.weight.detach().numpy()
    lo, hi = q.lower.item(), q.upper.item()
    half = (hi - lo) / (2 * (2**q.bits - 1))
    want = float(np.mean((w < lo - half) | (w > hi + half)))
    (got,) = [r for r in records if r["name"] == f"{name}.weight_quantizer"]
    assert got["clipped"] == pytest.approx(want, abs=1e-12)
    assert got["step"] == pytest.approx(2 * q.scale.item() / (2**q.bits - 1), rel=1e-6)


def test_predict_runs_a_whole_detector_file_with_the_runners_post_processing(tiny, tmp_path):
    """--onnx with a whole-detector file: the panel's detections are the file's, run by the
    torch-free runner (a picture at the test size: no resize on either side)."""
    import qdet_runner
    from qdet.export.whole import export_whole_detector
    from qdet.export.whole_check import WholeFileDetector

    cfg = load_config(tiny["config"], ["MODEL.WEIGHTS", tiny["weights"]])
    trained = build_panel_model(cfg, "torch", 0.0).predictor
    path = str(tmp_path / "whole.onnx")
    export_whole_detector(
        trained.model, path, torch.zeros(3, HEIGHT, WIDTH), trained.deployment_info()
    )
    whole = build_panel_model(cfg, "whole", 0.0, onnx=path).predictor
    assert isinstance(whole.model, WholeFileDetector)
    image = read_image(tiny["images"][0])
    got = whole(image)["instances"]
    want = qdet_runner.Detector(path)(image)
    assert len(got) == len(want["boxes"]) == 1
    assert np.allclose(got.pred_boxes.tensor.numpy(), want["boxes"], atol=1e-4)
    assert got.pred_classes.tolist() == want["classes"].tolist()
