"""Deployment targets (QUANT.TARGET): what QAT trains is what onnxruntime's integer kernels
compute. Each expected value is computed here another way: BN and the bias grid with
plain ops, op counts from the optimised graph, bias steps from the file's own scales."""

from __future__ import annotations

import collections
import os
import types

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling import build_model
from onnx import numpy_helper

from qdet.config import load_config
from qdet.export import export_onnx
from qdet.export import verify as verify_export
from qdet.export.integer_check import optimized_op_counts
from qdet.modeling.deployable import DeployBasicBlock, DeployFPN
from qdet.quantization import QConv2d, UniformQuantizer, calibrate, quantize_model
from qdet.quantization.layers import QuantizedInput
from qdet.quantization.quantizers import LSQQuantizer, Quantizer, mark_quantized
from qdet.quantization.targets import DEPLOY_TARGETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETINANET = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_baseline.yaml")
VITDET = os.path.join(ROOT, "configs/digits/vitdet_tiny_4bit.yaml")
TINY = ["MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "32"]
TINY += ["MODEL.RETINANET.NUM_CONVS", "1", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]
ORT = DEPLOY_TARGETS["onnxruntime"]


def _images(n=2, height=64, width=96, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 255, (3, height, width), generator=g).float()} for _ in range(n)
    ]


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """BN statistics and affines away from their init, so folding is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            if isinstance(m, CycleBatchNormList):
                m.weight.copy_(torch.rand(m.weight.numel(), generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.numel(), generator=g) * 0.1)


def _target_model(*opts, seed=0):
    torch.manual_seed(seed)
    cfg = load_config(RETINANET, [*TINY, "QUANT.TARGET", "onnxruntime", *opts])
    model = build_model(cfg)
    _randomize_norms(model, seed)
    calibrate(model, [_images(seed=seed + 1)], num_batches=1)
    with torch.no_grad():  # learned-looking grids: alpha apart from u, l off the grid
        for m in model.modules():
            if isinstance(m, UniformQuantizer) and m.kind == "activation":
                m.scale.mul_(1.07)
                m.lower.add_(0.013 * (m.upper - m.lower))
    return model.eval()


def _export(model, path, batch=None):
    images = model.preprocess_image(batch or _images()).tensor
    return export_onnx(model, str(path), images)


# -- folding and the bias grid --------------------------------------------------------------
@pytest.mark.parametrize("norm_kind", ["bn", "frozen", "cycle"])
def test_folded_conv_in_eval_equals_conv_then_norm(norm_kind):
    """Conv (on quantized operands) then BN in eval, computed with F.batch_norm, against
    the target conv: equal but for the bias grid, whose rounding is at most half a step."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 6, 3, padding=1, bias=norm_kind == "cycle")
    net = torch.nn.Sequential(conv)
    quantize_model(net, 4, 4, exclude=[], per_channel=True, quantizer_options={"target": ORT})
    layer = net[0]
    layer.target = ORT
    if norm_kind == "bn":
        norm = torch.nn.BatchNorm2d(6).eval()
    elif norm_kind == "frozen":
        norm = FrozenBatchNorm2d(6)
    else:
        norm = CycleBatchNormList(2, num_features=6).eval()
    norm_net = torch.nn.Sequential(norm)
    _randomize_norms(norm_net, 1)
    x = torch.randn(2, 5, 7, 7) * 2
    calibrate(net, [x], num_batches=1)
    x_q = layer.input_quantizer(x)
    w_q = layer.weight_quantizer(layer.weight)
    outs = [layer(x, norm=norm) for _ in range(2)]  # a CycleBatchNormList: both levels
    for level, got in enumerate(outs):
        z = F.conv2d(x_q, w_q, conv.bias, padding=1)
        bn = norm[level] if norm_kind == "cycle" else norm
        mean, var = bn.running_mean, bn.running_var
        gamma = norm.weight
        beta = norm.bias
        want = (z - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
        want = want * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
        # The bias grid's step per channel: s_x * s_w * |f|.
        s_x = layer.input_quantizer.integer_grid().dq_step
        s_w = layer.weight_quantizer.scale.detach() / layer.weight_quantizer.n_levels
        f = gamma / torch.sqrt(var + bn.eps)
        step = (s_x * s_w * f.abs()).view(1, -1, 1, 1)
        err = (got - want).abs()
        assert torch.all(err <= step / 2 + 1e-5), float((err - step / 2).max())
        assert float(err.max()) > 0  # the bias is rounded, not passed through
    # Training (batch statistics, trainable BN): the float simulation, no bias rounding.
    if norm_kind == "bn":
        norm.train()
        got = layer(x, norm=norm)
        want = F.batch_norm(F.conv2d(x_q, w_q, padding=1), None, None, norm.weight, norm.bias, True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_every_grid_has_an_integer_zero_point_that_decodes_to_zero():
    model = _target_model("QUANT.W_BITS", "8", "QUANT.A_BITS", "4")
    activations = [
        m for m in model.modules() if isinstance(m, Quantizer) and m.kind == "activation"
    ]
    assert len(activations) > 40
    signed = 0
    for q in activations:
        grid = q.integer_grid()
        lower_t, _, scale, mode = (t.detach() if torch.is_tensor(t) else t for t in q._affine())
        lower = float(lower_t)
        # -l / step is an integer within float rounding, and that code decodes to 0.
        assert abs(-lower / grid.q_step - grid.zero_point) < 1e-4
        zero = q._decode(torch.tensor([float(grid.zero_point)]), lower_t, scale, mode)
        assert abs(float(zero)) <= 1e-5 * grid.dq_step * grid.n
        signed += grid.zero_point > 0
        if not q.signed:
            assert grid.zero_point == 0 and lower == 0.0  # ReLU outputs: l is exactly 0
    assert signed > 10  # residuals, shortcuts and FPN levels have a mid-range zero point
    for m in model.modules():  # 8-bit weights: integers on the narrow int8 grid
        if isinstance(m, QConv2d):
            q, _ = m.weight_quantizer.weight_integers(m.weight)
            assert q.abs().max() <= 127 and m.weight_quantizer.n_levels == 254


def test_nudged_lower_bound_keeps_its_gradient():
    q = UniformQuantizer(4, "activation", signed=True, target=ORT)
    x = torch.randn(1000)
    q.init_from(x)
    with torch.no_grad():
        q.lower.add_(0.0123)
    lower, upper, scale, _ = q._affine()
    step = float(q.upper - q.lower) / 15
    assert abs(float(lower) / step - round(float(lower) / step)) < 1e-4  # on the grid
    assert abs(float(lower) - float(q.lower)) <= step / 2 + 1e-6  # moved by under half a step
    q(x).square().sum().backward()
    assert q.lower.grad is not None and float(q.lower.grad) != 0
    assert q.upper.grad is not None and float(q.upper.grad) != 0


def test_lsq_and_symmetric_targets_have_their_integer_ranges():
    w = LSQQuantizer(8, "weight", target=ORT)
    assert w.qrange == (-127, 127) and w.n_levels == 254
    trt = DEPLOY_TARGETS["tensorrt"]
    a = UniformQuantizer(8, "activation", signed=False, target=trt)
    a.init_from(torch.rand(1000))
    grid = a.integer_grid()
    assert grid.zero_point == 128 and grid.offset == 128  # int8 with zero point 0
    assert LSQQuantizer(8, "activation", signed=False, target=trt).qrange == (-128, 127)


def test_checkpoint_of_a_target_model_is_refused_by_a_simulated_one():
    trained = UniformQuantizer(4, "activation", target=ORT)
    trained.init_from(torch.rand(100))
    other = UniformQuantizer(4, "activation")
    with pytest.raises(ValueError, match="trained for QUANT.TARGET 'onnxruntime'"):
        other.load_state_dict(trained.state_dict())
    UniformQuantizer(4, "activation", target=ORT).load_state_dict(trained.state_dict())


# -- the model's structure ------------------------------------------------------------------
def test_tensors_between_quantized_convs_are_quantized_once_by_their_producer():
    model = _target_model()
    blocks = [m for m in model.modules() if isinstance(m, DeployBasicBlock)]
    assert len(blocks) == 8
    for block in blocks:
        assert isinstance(block.conv1.input_quantizer, QuantizedInput)
        assert isinstance(block.conv2.input_quantizer, Quantizer)  # one reader: its own
        if block.shortcut is not None:
            assert isinstance(block.shortcut.input_quantizer, QuantizedInput)
    fpn = next(m for m in model.modules() if isinstance(m, DeployFPN))
    assert len(fpn.sum_quantizers) == 2 and len(fpn.output_quantizers) == 3
    # A conv whose input arrives quantized gets a tensor carrying the quantizer that made
    # it; a conv with its own input quantizer gets a float tensor (nothing quantizes twice).
    seen = []

    def record(layer, inputs):
        arrives = isinstance(layer.input_quantizer, QuantizedInput)
        seen.append((arrives, getattr(inputs[0], "_qdet_quantized", None) is not None))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, QConv2d)]
    with torch.no_grad():
        model(_images(1))
    for h in hooks:
        h.remove()
    assert sum(a for a, _ in seen) > 20 and sum(not a for a, _ in seen) >= 20
    assert all(arrives == tagged for arrives, tagged in seen)


def test_a_target_model_trains_a_step_and_loads_an_fp_checkpoint():
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    fp = build_model(load_config(RETINANET, [*TINY, "QUANT.ENABLED", "False"]))
    model = build_model(load_config(RETINANET, [*TINY, "QUANT.TARGET", "onnxruntime"]))
    missing, unexpected = model.load_state_dict(fp.state_dict(), strict=False)
    assert not unexpected and all("quantizer" in k for k in missing)
    batch = _images()
    for d in batch:
        d["instances"] = Instances((64, 96))
        d["instances"].gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 40.0, 50.0]]))
        d["instances"].gt_classes = torch.tensor([3])
    calibrate(model, [batch], num_batches=1)
    model.train()
    with EventStorage():
        losses = model(batch)
    sum(losses.values()).backward()
    grads = [
        m.residual_quantizer.upper.grad for m in model.modules() if isinstance(m, DeployBasicBlock)
    ]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# -- the export: integer kernels, layer by layer ----------------------------------------------
@pytest.mark.parametrize(
    "w_bits,a_bits,method", [(8, 8, "uniform"), (4, 8, "uniform"), (4, 4, "uniform"), (4, 4, "lsq")]
)
def test_onnxruntime_runs_every_quantized_conv_as_one_integer_op(tmp_path, w_bits, a_bits, method):
    model = _target_model(
        "QUANT.W_BITS", str(w_bits), "QUANT.A_BITS", str(a_bits), "QUANT.METHOD", method
    )
    path = tmp_path / "m.onnx"
    _export(model, path)
    counts = optimized_op_counts(str(path))
    # Counted on the model: each quantized conv once per call (the head's per level).
    calls = collections.Counter()
    hooks = [
        m.register_forward_pre_hook(lambda mod, _i: calls.update(["conv"]))
        for m in model.modules()
        if isinstance(m, QConv2d)
    ]
    with torch.no_grad():
        model(_images(1))
    for h in hooks:
        h.remove()
    assert counts.get("QLinearConv") == calls["conv"]
    assert counts.get("Conv", 0) == 0 and counts.get("FusedConv", 0) == 0
    assert counts.get("QLinearAdd") == 8 + 2  # residual adds and FPN sums
    # The graph's 10 float outputs, and P7's input: ReLU(P6) requantized in float, DQ -> Q
    # (onnxruntime drops the ReLU into the Q) on a map 1/64 of P3's.
    assert counts.get("DequantizeLinear", 0) == 10 + 1
    assert counts.get("QuantizeLinear", 0) == 1 + 1  # the input images, and P7's input
    clips = counts.get("Clip", 0)
    assert (clips > 0) == (a_bits < 8)  # the exact form below 8 bits: integer Clips

    report = verify_export(model, str(path), [_images(seed=5), _images(seed=6)])
    assert report.ok, report.failures
    assert report.activations_checked > 50
    assert report.boundary_flips <= 1e-4 * report.activation_values


def test_bias_is_int32_at_the_input_step_times_the_weight_step(tmp_path):
    model = _target_model()
    path = tmp_path / "m.onnx"
    _export(model, path)
    proto = onnx.load(str(path))
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) > 20
    for conv in convs:
        x_dq, w_dq, b_dq = (producer[name] for name in conv.input[:3])
        assert values[b_dq.input[0]].dtype == np.int32
        s_x = values[x_dq.input[1]]
        s_w = values[w_dq.input[1]]
        np.testing.assert_allclose(values[b_dq.input[1]], np.float32(s_x) * s_w, rtol=1e-6)
        assert values[w_dq.input[0]].dtype == np.int8


def test_check_fails_on_a_wrong_folded_weight(tmp_path, monkeypatch):
    """A negative control: one folded weight step doubled at export."""
    import qdet.quantization.integer_ops as integer

    model = _target_model()
    original = integer.integer_conv_grid
    calls = [0]

    def wrong(layer, source, norm):
        grid = original(layer, source, norm)
        calls[0] += 1
        if calls[0] == 3:
            return integer.IntegerConvGrid(
                grid.weight,
                grid.weight_step * 2,
                grid.bias,
                grid.bias_step * 2,
                grid.stride,
                grid.padding,
                grid.dilation,
                grid.groups,
            )
        return grid

    monkeypatch.setattr(integer, "integer_conv_grid", wrong)
    _export(model, tmp_path / "m.onnx")
    monkeypatch.setattr(integer, "integer_conv_grid", original)
    report = verify_export(model, str(tmp_path / "m.onnx"), [_images()])
    assert not report.ok
    assert any("differ from PyTorch" in f for f in report.failures), report.failures


def test_check_fails_when_a_conv_runs_in_float(tmp_path):
    """A bias step the runtime rejects (2x s_x s_w): its conv stays float, the check says so."""
    model = _target_model()
    path = tmp_path / "m.onnx"
    _export(model, path)
    proto = onnx.load(str(path))
    producer = {o: n for n in proto.graph.node for o in n.output}
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    bias_scale = producer[conv.input[2]].input[1]
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == bias_scale:
            t = node.attribute[0].t
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 2, t.name))
    onnx.save(proto, str(path))
    report = verify_export(model, str(path), [_images()])
    assert not report.ok
    assert any("did not fuse" in f for f in report.failures), report.failures


# -- bad input -------------------------------------------------------------------------------
def test_unknown_target_and_unsupported_bits_are_refused():
    with pytest.raises(ValueError, match=r"QUANT.TARGET='tflite'.*onnxruntime.*tensorrt"):
        build_model(load_config(RETINANET, [*TINY, "QUANT.TARGET", "tflite"]))
    with pytest.raises(ValueError, match=r"QUANT.W_BITS=4.*'tensorrt'.*weights 8 bits"):
        build_model(load_config(RETINANET, [*TINY, "QUANT.TARGET", "tensorrt"]))
    with pytest.raises(ValueError, match=r"QUANT.A_BITS=32.*integers"):
        build_model(
            load_config(RETINANET, [*TINY, "QUANT.TARGET", "onnxruntime", "QUANT.A_BITS", "32"])
        )


def test_layers_a_target_cannot_fold_or_fuse_are_named():
    with pytest.raises(ValueError, match=r"fpn_lateral\d\.norm.*GroupNorm.*cannot be folded"):
        build_model(
            load_config(RETINANET, [*TINY, "QUANT.TARGET", "onnxruntime", "MODEL.FPN.NORM", "GN"])
        )
    with pytest.raises(ValueError, match=r"backbone\.\S+: FAQD's quantized ReLU.*no integer form"):
        build_model(
            load_config(
                RETINANET, [*TINY, "QUANT.TARGET", "onnxruntime", "QUANT.ACT_METHOD", "qrelu"]
            )
        )
    with pytest.raises(ValueError, match=r"FUSE_TYPE 'avg'"):
        build_model(
            load_config(
                RETINANET, [*TINY, "QUANT.TARGET", "onnxruntime", "MODEL.FPN.FUSE_TYPE", "avg"]
            )
        )
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: a quantized Linear"):
        build_model(load_config(VITDET, ["MODEL.WEIGHTS", "", "QUANT.TARGET", "onnxruntime"]))


def test_an_input_without_its_producer_is_an_error():
    model = _target_model()
    conv = model.backbone.bottom_up.res2[0].conv1
    with pytest.raises(RuntimeError, match="carries no quantizer"):
        conv(torch.randn(1, 64, 8, 8))
    x = mark_quantized(torch.zeros(1, 64, 8, 8), model.backbone.bottom_up.stem.output_quantizer)
    assert conv(x).shape == (1, 64, 8, 8)


def test_frozen_bn_trains_on_running_statistics_and_keeps_them():
    """QUANT.FREEZE_BN_ITER's switch: in training mode a frozen layer computes its eval
    output (running statistics, bias on its grid) and BN statistics stop moving."""
    from qdet.engine.hooks import FreezeBNHook

    model = _target_model()
    x = model.preprocess_image(_images()).tensor
    with torch.no_grad():
        want = model.backbone(x)["p3"]
    model.train()
    bn = model.backbone.bottom_up.res3[0].conv1.norm
    before = bn.running_mean.clone()

    hook = FreezeBNHook(start=5)
    hook.trainer = types.SimpleNamespace(iter=5, model=model)  # what the hook reads
    hook.before_step()
    got = model.backbone(x)["p3"]
    assert torch.equal(bn.running_mean, before)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="FREEZE_BN_ITER.*QUANT.TARGET"):
        build_model(load_config(RETINANET, [*TINY, "QUANT.FREEZE_BN_ITER", "10"]))


def test_codes_of_an_output_decode_to_it_when_alpha_left_the_range():
    """The saved-codes codec encodes a quantizer's *output*: once alpha != u - l (trained),
    the input map would give other codes (a quantized input saved for backward)."""
    for kind, signed in (("activation", True), ("activation", False), ("weight", False)):
        q = UniformQuantizer(4, kind, signed=signed)
        x = torch.randn(500)
        q.init_from(x)
        with torch.no_grad():
            q.scale.mul_(1.37)
        x_q = q(x)
        encode, decode = q.codec()
        codes = encode(x_q)
        assert codes.min() >= 0 and codes.max() <= 15
        torch.testing.assert_close(decode(codes), x_q, rtol=0, atol=0)


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


def test_packed_weights_of_an_8bit_target_model_decode_bit_exactly(tmp_path):
    from qdet.export import read_packed_weights, save_packed_weights
    from qdet.quantization import dequantize_weights

    model = _target_model("QUANT.W_BITS", "8", "QUANT.A_BITS", "8")
    save_packed_weights(model, str(tmp_path / "w.safetensors"))
    layers, _ = read_packed_weights(str(tmp_path / "w.safetensors"))
    for name, w in dequantize_weights(layers).items():
        module = model.get_submodule(name)
        assert torch.equal(w, module.weight_quantizer(module.weight).detach()), name
