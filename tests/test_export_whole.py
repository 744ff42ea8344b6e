"""The whole detector in one file (qdet/export/whole.py, whole_check.py) and the torch-free
runner (qdet_runner.py): the file's instances equal PyTorch's on pictures other than the
traced one and at another size; nothing detected gives empty outputs; the runner, with
torch and Detectron2 blocked from import, gives PyTorch's instances; a target's file runs
every quantized conv as one integer op; bad files and pictures are named."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from detectron2 import model_zoo
from detectron2.modeling import build_model
from target_models import _target_model
from torch import nn

import qdet_runner
from qdet.config import load_config
from qdet.export import export_onnx
from qdet.export.peer import WHOLE_NETWORK
from qdet.export.whole import export_whole_detector
from qdet.export.whole_check import check_whole
from qdet.study.deployment_transformer import ARCHS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP = os.path.join(ROOT, "configs/digits/retinanet_r18_fp.yaml")
VITDET = os.path.join(ROOT, "configs/digits/vitdet_tiny_fp.yaml")
QUANTIZED = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_baseline.yaml")
TINY = ["MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "32"]
TINY += ["MODEL.RETINANET.NUM_CONVS", "1", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]
# Every anchor scores: a random head's detections, 20 a picture.
ALL = ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20"]


def _info(cfg, bits: str = "FP32", target: str = "") -> dict:
    return {
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "score_threshold": cfg.MODEL.RETINANET.SCORE_THRESH_TEST,
        "class_names": [str(i) for i in range(10)],
        "bits": bits,
        "target": target,
    }


def _picture(height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=g).float()


def _retinanet(*opts):
    cfg = load_config(FP, [*TINY, *opts])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a trained head's small box deltas (random ones: exp() of noise)
        model.head.bbox_pred.weight.mul_(0.1)
    return model, cfg


@pytest.fixture(scope="module")
def fp_file(tmp_path_factory):
    model, cfg = _retinanet(*ALL)
    path = str(tmp_path_factory.mktemp("whole") / "fp.onnx")
    export_whole_detector(model, path, _picture(64, 96, 0), _info(cfg))
    return model, cfg, path


def test_fp_file_equals_pytorch_on_other_pictures_and_sizes(fp_file):
    model, _, path = fp_file
    pictures = [_picture(64, 96, 1), _picture(64, 96, 2), _picture(96, 64, 3), _picture(80, 72, 4)]
    report = check_whole(model, path, pictures)
    assert report.ok, report.failures
    assert report.instances_torch == report.instances_onnx == 4 * 20
    assert report.box_max_abs <= 1e-3 and report.score_max_abs <= 1e-5
    names = [o.name for o in ort.InferenceSession(path).get_outputs()]
    assert names == ["pred_boxes", "pred_classes", "scores", "image_size"]


def test_nothing_detected_gives_empty_outputs(tmp_path):
    model, cfg = _retinanet("MODEL.RETINANET.SCORE_THRESH_TEST", "1.1")
    path = str(tmp_path / "none.onnx")
    export_whole_detector(model, path, _picture(64, 96, 0), _info(cfg))
    session = ort.InferenceSession(path)
    boxes, classes, scores, _ = session.run(None, {"image": _picture(64, 96, 1).numpy()})
    assert boxes.shape == (0, 4) and classes.shape == (0,) and scores.shape == (0,)
    found = qdet_runner.Detector(path)(np.zeros((64, 96, 3), np.uint8))
    assert found["boxes"].shape == (0, 4) and len(found["scores"]) == 0


def test_a_detector_without_the_memory_arena_finds_the_same_instances(fp_file):
    """``arena=False`` (the latency benchmark's --no-arena: idle sessions hold no
    activations) changes where memory comes from, not what the file computes."""
    _, _, path = fp_file
    picture = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    with_arena, without = qdet_runner.Detector(path), qdet_runner.Detector(path, arena=False)
    assert with_arena.session.get_session_options().enable_cpu_mem_arena
    assert not without.session.get_session_options().enable_cpu_mem_arena
    want, got = with_arena(picture), without(picture)
    assert len(want["scores"]) == 20
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


RUN_BLOCKED = """
import json, sys
sys.modules["torch"] = None  # any import of torch or Detectron2 now fails
sys.modules["detectron2"] = None
sys.path.insert(0, {root!r})
import qdet_runner
found = qdet_runner.Detector({path!r})(qdet_runner.read_image({picture!r}))
print(json.dumps({{k: v.tolist() for k, v in found.items()}}))
"""


def test_runner_without_torch_gives_pytorchs_instances(fp_file, tmp_path):
    """A picture already at the test size (no resize), BGR on disk: the runner in a
    process where torch and Detectron2 cannot be imported, against PyTorch's inference
    with Detectron2's post-processing to the picture's size."""
    model, cfg, path = fp_file
    picture = str(tmp_path / "p.png")
    bgr = _picture(64, 96, 5).numpy().transpose(1, 2, 0).astype(np.uint8)
    cv2.imwrite(picture, bgr)
    code = RUN_BLOCKED.format(root=ROOT, path=path, picture=picture)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    found = {k: np.array(v) for k, v in json.loads(done.stdout).items()}
    image = bgr[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else bgr
    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    with torch.no_grad():
        want = model([{"image": chw, "height": 64, "width": 96}])[0]["instances"]
    assert len(found["boxes"]) == len(want) == 20
    np.testing.assert_allclose(found["boxes"], want.pred_boxes.tensor.numpy(), atol=1e-3)
    np.testing.assert_allclose(found["scores"], want.scores.numpy(), atol=1e-5)
    assert (found["classes"] == want.pred_classes.numpy()).all()


def test_target_file_is_integer_and_checked_layer_by_layer(tmp_path):
    """A target's whole file runs every quantized conv as one QLinearConv, and each of its
    QuantizeLinear nodes gives PyTorch's codes on the runtime's inputs (a picture of
    another size too); an int32 bias changed by 5 in the file fails that check, named."""
    from onnx import numpy_helper

    model = _target_model("MODEL.RETINANET.SCORE_THRESH_TEST", "0.0")
    cfg = load_config(FP, TINY)
    path = str(tmp_path / "target.onnx")
    export_whole_detector(model, path, _picture(64, 96, 0), _info(cfg, "W4/A4", "onnxruntime"))
    pictures = [_picture(64, 96, 1), _picture(80, 72, 2)]
    report = check_whole(model, path, pictures)
    assert report.ok, report.failures
    assert report.quantized and report.target == "onnxruntime"
    assert report.integer_kernels["QLinearConv"] == 48 and report.float_convs == 0
    grids = json.loads(
        ort.InferenceSession(path).get_modelmeta().custom_metadata_map["integer_activations"]
    )
    assert report.activations_checked == len(grids) > 48
    assert report.activation_values > 2 * 64 * 96 * 32

    proto = onnx.load(path)
    bias = [n for n in proto.graph.node if n.op_type == "Conv"][4].input[2]
    producer = {o: n for n in proto.graph.node for o in n.output}
    codes = producer[bias].input[0]  # the int32 bias of its DequantizeLinear
    init = next(i for i in proto.graph.initializer if i.name == codes)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.int32(5), codes))
    onnx.save(proto, path)
    tampered = check_whole(model, path, pictures[:1])
    assert any("differ from PyTorch" in f for f in tampered.failures), tampered.failures


MASK_MODELS = {
    "vitdet": (VITDET, []),
    "swin": (os.path.join(ROOT, "configs/digits/swin_tiny_fp.yaml"), []),
    # Detectron2's own Mask R-CNN R-FPN config on qdet's meta-architecture, tiny.
    "resnet_fpn": (
        model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"),
        ["MODEL.META_ARCHITECTURE", "QuantMaskRCNN", "MODEL.DEVICE", "cpu"]
        + ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.RESNETS.DEPTH", "18"]
        + ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "32"]
        + ["MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64"]
        + ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160"]
        # Every detection kept: an untrained head's scores tie, and which of them a cut
        # at 100 keeps is either runtime's own choice.
        + ["TEST.DETECTIONS_PER_IMAGE", "1000", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"],
    ),
}


@pytest.mark.parametrize("arch", MASK_MODELS)
def test_mask_model_file_equals_pytorch(tmp_path, arch):
    """Mask R-CNN (tiny ViTDet, tiny Swin, an R18-FPN; random weights, every proposal
    kept): boxes, classes, scores and 28 x 28 masks as PyTorch's, on other pictures and
    at another size."""
    config, opts = MASK_MODELS[arch]
    cfg = load_config(
        config, [*opts, "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a trained predictor's moderate logits (random ones: large)
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.1)
    path = str(tmp_path / "mask.onnx")
    info = {**_info(cfg), "score_threshold": 0.0}
    size = cfg.INPUT.MIN_SIZE_TEST
    export_whole_detector(model, path, _picture(size, size + 32, 0), info)
    pictures = [_picture(size, size + 32, 1), _picture(size + 16, size, 2)]
    with torch.no_grad():  # the masks compared are not all empty
        masks = model.inference([{"image": pictures[0]}], do_postprocess=False)[0].pred_masks
    assert (masks > 0.5).any() and (masks < 0.5).any()
    report = check_whole(model, path, pictures)
    assert report.ok, report.failures
    assert report.instances_torch > 0 and report.mask_min_iou >= 0.99
    names = [o.name for o in ort.InferenceSession(path).get_outputs()]
    assert names == ["pred_boxes", "pred_classes", "pred_masks", "scores", "image_size"]
    # onnxruntime's quantize_static of such a file (qdet.export.peer) quantizes the nodes
    # under WHOLE_NETWORK: every learned layer's node is there
    nodes = onnx.load(path).graph.node
    learned = [n for n in nodes if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    assert len(learned) > 20 and all(n.name.startswith(WHOLE_NETWORK) for n in learned)
    if arch in ARCHS:  # the deployment study's peer row that quantizes the blocks only
        backbone = model.backbone.net if arch == "vitdet" else model.backbone.bottom_up
        blocks = [
            m
            for n, m in backbone.named_modules()
            if re.fullmatch(r"(layers\.\d+\.)?blocks\.\d+", n)
        ]
        in_blocks = [n for n in learned if n.name.startswith(ARCHS[arch].blocks)]
        block_linears = [m for b in blocks for m in b.modules() if isinstance(m, nn.Linear)]
        assert len(in_blocks) == len(block_linears) + 2 * len(blocks) > 0  # + q kT, attn v


def test_an_op_onnx_cannot_convert_is_named_with_its_layer(tmp_path):
    """A layer calling an operator with no ONNX conversion: one error naming the operator
    and the layer (not the exporter's bare "not supported"), and no file written."""
    model, cfg = _retinanet()
    layer = model.head.cls_subnet[0]
    conv = layer.forward
    layer.forward = lambda x: torch.erfinv(torch.tanh(conv(x)) * 0.5)
    path = tmp_path / "bad.onnx"
    with pytest.raises(
        ValueError,
        match=r"no conversion for aten::erfinv, which head\.cls_subnet\.0 \(Conv2d\) calls",
    ):
        export_whole_detector(model, str(path), _picture(64, 96, 0), _info(cfg))
    assert not path.exists()


def test_runner_names_what_it_cannot_run(fp_file, tmp_path):
    model, _, path = fp_file
    network = str(tmp_path / "network.onnx")
    export_onnx(model, network, model.preprocess_image([{"image": _picture(64, 96, 0)}]).tensor)
    with pytest.raises(
        ValueError, match=r"network-only export .* not a whole detector.*export_onnx"
    ):
        qdet_runner.Detector(network)
    with pytest.raises(FileNotFoundError, match=r"nope.onnx' does not exist"):
        qdet_runner.Detector(str(tmp_path / "nope.onnx"))
    broken = tmp_path / "pictures"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not a picture")
    gray = np.full((64, 96), 128, np.uint8)
    cv2.imwrite(str(broken / "gray.png"), gray)
    cv2.imwrite(str(broken / "rgba.png"), np.dstack([gray, gray, gray, gray]))
    out = tmp_path / "out"
    argv = ["--onnx", path, "--input", str(broken), "--output", str(out)]
    assert qdet_runner.main([*argv, "--score", "0"]) == 0
    written = json.loads((out / "detections.json").read_text())
    assert sorted(written) == ["gray.png", "rgba.png"]  # bad.png named and skipped
    assert len(written["gray.png"]) == 20
    scores = [d["score"] for d in written["gray.png"]]
    # Between two written (rounded) scores: an untrained head scores below the default 0.5.
    cut = sum(sorted(scores)[9:11]) / 2
    assert qdet_runner.main([*argv, "--score", str(cut)]) == 0
    kept = [d["score"] for d in json.loads((out / "detections.json").read_text())["gray.png"]]
    assert kept == [x for x in scores if x > cut] and 0 < len(kept) < 20
    assert qdet_runner.main([*argv[:4], "--output", str(broken)]) == 2  # would overwrite


def test_runner_resize_and_mask_paste_are_detectron2s():
    """The runner's numpy versions against Detectron2's: ResizeShortestEdge's size and PIL's
    bilinear resize (the same pixels, enlarging and shrinking), paste_masks_in_image (the
    same pixels but for a few on the 0.5 boundary)."""
    import detectron2.data.transforms as T
    from detectron2.layers.mask_ops import paste_masks_in_image
    from detectron2.structures import Boxes

    rng = np.random.default_rng(0)
    sizes = [(161, 183, 160, 192), (156, 137, 160, 192), (480, 640, 800, 1333)]
    sizes += [(37, 50, 64, 96), (900, 1500, 160, 192), (300, 10, 160, 1333)]
    for h, w, short, longest in sizes:
        want = T.ResizeShortestEdge.get_output_shape(h, w, short, longest)
        assert qdet_runner.resized_shape(h, w, short, longest) == want
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        theirs = T.ResizeTransform(h, w, *want).apply_image(image)
        np.testing.assert_array_equal(qdet_runner.resize(image, *want), theirs)
    masks = torch.rand(5, 28, 28)
    boxes = torch.tensor(
        [[3.2, 4.7, 40.1, 30.0], [0.0, 0.0, 96.0, 64.0], [50.5, 10.2, 60.3, 62.9],
         [10.0, 10.0, 12.0, 11.0], [-5.0, 20.0, 30.0, 80.0]]
    )  # fmt: skip
    theirs = paste_masks_in_image(masks, Boxes(boxes), (64, 96)).numpy()
    ours = qdet_runner.paste_masks(masks.numpy(), boxes.numpy(), 64, 96)
    assert theirs.shape == ours.shape and theirs.sum() > 100
    assert (theirs != ours).sum() <= 0.001 * theirs.size


def _doubled(a: np.ndarray) -> np.ndarray:
    return np.asarray(a * 2, dtype=a.dtype)


def test_quantized_file_is_checked_layer_by_layer_and_a_tampered_step_fails(tmp_path):
    """A simulated 4-bit file: its QDQ inside the whole graph passes the layer-wise check
    (weights on their grids, every QuantizeLinear's codes PyTorch's); one activation
    DequantizeLinear step doubled in the file fails it, named."""
    from onnx import numpy_helper

    from qdet.quantization import calibrate

    cfg = load_config(QUANTIZED, [*TINY, *ALL])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    calibrate(model, [[{"image": _picture(64, 96, 9)}]], num_batches=1)
    path = str(tmp_path / "q.onnx")
    export_whole_detector(model, path, _picture(64, 96, 0), _info(cfg, "W4/A4"))
    report = check_whole(model, path, [_picture(64, 96, 1)])
    assert report.ok, report.failures
    assert report.quantized and report.weights_checked > 20 and report.activations_checked > 30

    proto = onnx.load(path)
    constants = {i.name for i in proto.graph.initializer}
    constants |= {n.output[0] for n in proto.graph.node if n.op_type == "Constant"}
    dq = next(
        n
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] not in constants
    )  # an activation's: its codes come from a QuantizeLinear
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == dq.input[1]:
            t = node.attribute[0].t
            t.CopyFrom(numpy_helper.from_array(_doubled(numpy_helper.to_array(t)), t.name))
    for init in proto.graph.initializer:
        if init.name == dq.input[1]:
            init.CopyFrom(numpy_helper.from_array(_doubled(numpy_helper.to_array(init)), init.name))
    onnx.save(proto, path)
    tampered = check_whole(model, path, [_picture(64, 96, 1)])
    assert not tampered.ok and any("dq_step" in f for f in tampered.failures), tampered.failures


TRANSFORMERS = {  # config, W/A bits
    "vitdet": ("configs/digits/vitdet_tiny_4bit.yaml", "8"),  # with its pyramid and heads
    "swin": ("configs/digits/swin_tiny_4bit.yaml", "8"),
    "vitdet_mha_only": ("configs/digits/vitdet_tiny_4bit_mha.yaml", "8"),
    "vitdet_mlp_only": ("configs/digits/vitdet_tiny_4bit_mlp.yaml", "8"),
    # Swin's FPN quantized too (QUANT.INCLUDE): its lateral convs quantize Swin's outputs.
    "swin_fpn": ("configs/digits/swin_tiny_4bit.yaml", "8"),
    # 4-bit codes: an integer Clip between each QuantizeLinear and its DequantizeLinear.
    "vitdet_w4a4": ("configs/digits/vitdet_tiny_4bit.yaml", "4"),
}
# The quantized convs each file runs as QLinearConv (the transformers' blocks have none):
# in the "swin_fpn" case Swin's FPN (8) and its RPN's 2 convs (the first reading the
# quantized levels); in the "vitdet" case ViTDet's SimpleFeaturePyramid (6) and its heads
# (QUANT.INCLUDE): 2 RPN convs as ViTDet-B's, a box head of 2 convs without a norm and a
# FC, a mask head of 2 convs with LayerNorm as ViTDet-B's.
TRANSFORMER_CONVS = {"swin_fpn": 8 + 2, "vitdet": 6 + 2 + 2 + 2}
TWO_RPN_CONVS = ["MODEL.RPN.CONV_DIMS", "[-1, -1]"]
VITDET_HEADS = ["QUANT.INCLUDE", "['simfp', 'proposal_generator', 'roi_heads']", *TWO_RPN_CONVS]
VITDET_HEADS += ["MODEL.ROI_BOX_HEAD.NUM_CONV", "2", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32"]
VITDET_HEADS += ["MODEL.ROI_BOX_HEAD.NUM_FC", "1", "MODEL.ROI_MASK_HEAD.NORM", "LN"]


@pytest.mark.parametrize("arch", TRANSFORMERS)
def test_transformer_target_file_runs_every_quantized_linear_and_matmul_in_integers(tmp_path, arch):
    """A tiny ViTDet / Swin Mask R-CNN trained for onnxruntime (W8A8, and W4A4): its whole file
    runs every quantized Linear of the model as one QGemm and both matmuls of every attention
    whose qkv and proj are quantized as integer matmuls (counted against the model's own
    modules), each QuantizeLinear gives PyTorch's codes on the runtime's inputs, and the
    instances agree; MHA-only quantizes (and deploys) the attention alone, the MLP's GEMMs
    staying float, and MLP-only the reverse."""
    from qdet.export.integer_check import MATMUL_OPS, optimized_op_counts
    from qdet.modeling.deployable_attention import DEPLOYABLE_ATTENTION
    from qdet.quantization import calibrate
    from qdet.quantization.layers import QConv2d, QLinear, QuantizedInput

    config, bits = TRANSFORMERS[arch]
    opts = ["MODEL.WEIGHTS", "", "QUANT.TARGET", "onnxruntime", "QUANT.W_BITS", bits]
    opts += ["QUANT.A_BITS", bits]
    if arch == "swin_fpn":
        opts += ["QUANT.INCLUDE", "['fpn_lateral', 'fpn_output', 'proposal_generator']"]
        opts += TWO_RPN_CONVS
    if arch == "vitdet":  # its SimpleFeaturePyramid's and heads' convs quantized too
        opts += VITDET_HEADS
    cfg = load_config(os.path.join(ROOT, config), opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    size = cfg.INPUT.MIN_SIZE_TEST
    calibrate(model, [[{"image": _picture(size, size, 7)}]], num_batches=1)
    linears = [n for n, m in model.named_modules() if isinstance(m, QLinear)]
    convs = [n for n, m in model.named_modules() if isinstance(m, QConv2d)]
    attentions = [
        m
        for m in model.modules()
        if type(m) in (*DEPLOYABLE_ATTENTION, *DEPLOYABLE_ATTENTION.values())
    ]
    integer_attentions = [m for m in attentions if type(m) in DEPLOYABLE_ATTENTION.values()]
    float_linears = [n for n, m in model.backbone.named_modules() if type(m) is torch.nn.Linear]
    path = str(tmp_path / "t.onnx")
    info = {**_info(cfg, f"W{bits}/A{bits}", "onnxruntime"), "score_threshold": 0.05}
    export_whole_detector(model, path, _picture(size, size, 0), info)
    report = check_whole(model, path, [_picture(size, size + 16, 1)])
    assert report.ok, report.failures
    counts = optimized_op_counts(path)
    assert counts["QGemm"] == len(linears) > 0
    assert len(convs) == TRANSFORMER_CONVS.get(arch, 0)
    # Each RPN conv runs once per pyramid level.
    rpn_calls = (
        2 * (len(model.proposal_generator.in_features) - 1) if arch in TRANSFORMER_CONVS else 0
    )
    assert counts.get("QLinearConv", 0) == len(convs) + rpn_calls
    if arch == "swin_fpn":  # the first RPN conv reads the FPN's quantized levels as they are
        first = model.proposal_generator.rpn_head.conv[0]
        assert isinstance(first.input_quantizer, QuantizedInput)
    if arch == "vitdet":  # the mask head's convs quantize their outputs for the LayerNorm,
        # the box head's last conv for the Flatten before fc1
        box, mask = (
            model.roi_heads.box_head.conv_norm_relus,
            model.roi_heads.mask_head.conv_norm_relus,
        )
        assert [hasattr(c, "norm_input_quantizer") for c in box] == [False, True]
        assert all(c.norm_input_quantizer for c in mask)
        assert not hasattr(model.roi_heads.mask_head, "deconv_input_quantizer")
    matmuls = sum(counts.get(op, 0) for op in MATMUL_OPS)
    assert matmuls == 2 * len(integer_attentions)
    assert report.activations_checked >= len(linears)
    meta = json.loads(
        ort.InferenceSession(path).get_modelmeta().custom_metadata_map["integer_linears"]
    )
    assert sorted(meta) == sorted(linears)
    float_gemms = sum(counts.get(k, 0) for k in ("MatMul", "FusedMatMul", "Gemm"))
    if arch == "vitdet_mha_only":
        assert all(".attn." in n for n in linears) and len(float_linears) > 0
        assert float_gemms >= len(float_linears)
    if arch == "vitdet_mlp_only":
        assert all(".mlp." in n for n in linears) and not integer_attentions
        assert matmuls == 0 and float_gemms >= 2 * len(attentions) + len(float_linears)
    else:
        assert len(integer_attentions) == len(attentions) > 0


def test_resnet_fpn_mask_rcnn_target_file_runs_its_heads_in_integers(tmp_path):
    """A tiny R18-FPN Mask R-CNN trained for onnxruntime: every quantized conv of the
    backbone, the RPN head and the mask head is a QLinearConv and the box head's FCs QGemms
    (counted against the model's own layers), the mask head's ConvTranspose float and
    counted, codes layer by layer PyTorch's."""
    from qdet.export.integer_check import optimized_op_counts
    from qdet.quantization import calibrate
    from qdet.quantization.layers import QConv2d, QLinear

    opts = ["MODEL.WEIGHTS", "", "QUANT.ENABLED", "True", "QUANT.TARGETS", "[]"]
    opts += ["QUANT.TARGET", "onnxruntime", "QUANT.W_BITS", "8", "QUANT.A_BITS", "8"]
    opts += ["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", "MODEL.RESNETS.DEPTH", "18"]
    opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "BN"]
    features = "['res2', 'res3', 'res4', 'res5']"
    opts += ["MODEL.RESNETS.OUT_FEATURES", features, "MODEL.FPN.IN_FEATURES", features]
    cfg = load_config(os.path.join(ROOT, "configs/digits/Base-digits-maskrcnn.yaml"), opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    size = cfg.INPUT.MIN_SIZE_TEST
    calibrate(model, [[{"image": _picture(size, size, 7)}]], num_batches=1)
    rpn, mask_head = model.proposal_generator.rpn_head, model.roi_heads.mask_head
    assert isinstance(rpn.conv, QConv2d) and isinstance(mask_head.mask_fcn1, QConv2d)
    levels = len(model.proposal_generator.in_features)
    head_convs = [m for m in (*model.roi_heads.modules(),) if isinstance(m, QConv2d)]
    backbone_convs = [m for m in model.backbone.modules() if isinstance(m, QConv2d)]
    path = str(tmp_path / "m.onnx")
    info = {**_info(cfg, "W8/A8", "onnxruntime"), "score_threshold": 0.0}
    export_whole_detector(model, path, _picture(size, size, 0), info)
    report = check_whole(model, path, [_picture(size, size + 16, 1)])
    assert report.ok, report.failures
    counts = optimized_op_counts(path)
    assert counts["QLinearConv"] == len(backbone_convs) + levels + len(head_convs)
    assert counts["QGemm"] == sum(isinstance(m, QLinear) for m in model.modules()) == 2
    assert counts["ConvTranspose"] == 1  # the mask head's upsampling: float


def test_the_check_names_an_attention_whose_matmul_runs_in_float(tmp_path):
    """A Relu put between the probabilities' DequantizeLinear and attn v's MatMul (the
    values are >= 0, so nothing else changes) leaves that matmul in float: the check
    fails, counting the integer matmuls, and names the attention."""
    from qdet.quantization import calibrate

    opts = ["MODEL.WEIGHTS", "", "QUANT.TARGET", "onnxruntime", "QUANT.W_BITS", "8"]
    opts += ["QUANT.A_BITS", "8"]
    cfg = load_config(os.path.join(ROOT, "configs/digits/vitdet_tiny_4bit_mha.yaml"), opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    size = cfg.INPUT.MIN_SIZE_TEST
    calibrate(model, [[{"image": _picture(size, size, 7)}]], num_batches=1)
    path = str(tmp_path / "t.onnx")
    info = {**_info(cfg, "W8/A8", "onnxruntime"), "score_threshold": 0.05}
    export_whole_detector(model, path, _picture(size, size, 0), info)
    proto = onnx.load(path)
    matmul = next(n for n in proto.graph.node if n.name.endswith("blocks.2/attn/MatMul_1"))
    probs = matmul.input[0]
    relu = onnx.helper.make_node("Relu", [probs], [probs + "_relu"], name="tamper")
    matmul.input[0] = probs + "_relu"
    index = list(proto.graph.node).index(matmul)
    proto.graph.node.insert(index, relu)
    onnx.save(proto, path)
    report = check_whole(model, path, [_picture(size, size + 16, 1)])
    assert not report.ok
    assert any("attention matmul calls should run as" in f for f in report.failures)
    assert any(f == "running in float: backbone.net.blocks.2.attn" for f in report.failures), (
        report.failures
    )
