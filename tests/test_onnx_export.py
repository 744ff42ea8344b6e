"""ONNX export (QDQ), the onnxruntime check and the packed weight file, on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from onnx import numpy_helper
from safetensors import safe_open

from qdet.config import load_config
from qdet.export import export_onnx, inference_session, read_packed_weights, save_packed_weights
from qdet.export import verify as verify_export
from qdet.export.qdq import onnx_export_mode
from qdet.export.verify import MAX_TIE_RATE, VerifyReport, check_tie_rate
from qdet.quantization import (
    QConv2d,
    calibrate,
    dequantize_weights,
    export_int_weights,
    unpack_codes,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETINANET = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_baseline.yaml")
BACKBONES = {
    "vitdet": os.path.join(ROOT, "configs/digits/vitdet_tiny_4bit.yaml"),
    "swin": os.path.join(ROOT, "configs/digits/swin_tiny_4bit.yaml"),
}
TINY = ["MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "32"]
TINY += ["MODEL.RETINANET.NUM_CONVS", "1", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]


def _images(n=2, height=64, width=96, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 255, (3, height, width), generator=g).float()} for _ in range(n)
    ]


def _quantized_model(config=RETINANET, *opts, seed=0):
    torch.manual_seed(seed)
    model = build_model(load_config(config, [*TINY, *opts])).eval()
    calibrate(model, [_images(seed=seed + 1)], num_batches=1)
    with torch.no_grad():  # move bounds and scales off their initial values
        for m in model.modules():
            if isinstance(m, QConv2d) and m.weight_quantizer.enabled:
                m.weight_quantizer.scale.mul_(1.05)
    return model


def _export(model, path, batch=None):
    images = model.preprocess_image(batch or _images()).tensor
    return export_onnx(model, str(path), images)


def _metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _weight_integers(path) -> dict[str, tuple]:
    """(integers, scale, offset or 0) of each quantized weight of the file, by layer."""
    proto = onnx.load(str(path))
    constants = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    adds = {n.input[0]: constants.get(n.input[1]) for n in proto.graph.node if n.op_type == "Add"}
    layers = [w["path"].rsplit(".", 1)[0] for w in json.loads(_metadata(path)["qdq_weights"])]
    dq = [
        n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants
    ]
    return {
        layer: (constants[n.input[0]], constants[n.input[1]], adds.get(n.output[0], 0))
        for layer, n in zip(layers, dq)
    }


CASES = [  # bits, method, per-channel weights, per-level head activations
    (2, "uniform", False, False),
    (3, "lsq", True, False),
    (4, "uniform", True, True),
    (4, "ewgs", False, False),
    (8, "uniform", False, False),
    (8, "lsq", True, False),
]


@pytest.mark.parametrize("bits,method,per_channel,per_level", CASES)
def test_retinanet_export_matches_pytorch(tmp_path, bits, method, per_channel, per_level):
    opts = ["QUANT.W_BITS", str(bits), "QUANT.A_BITS", str(bits), "QUANT.METHOD", method]
    opts += ["QUANT.PER_CHANNEL", str(per_channel), "QUANT.HEAD_PER_LEVEL_ACT", str(per_level)]
    model = _quantized_model(RETINANET, *opts)
    info = _export(model, tmp_path / "m.onnx")
    assert info["graph"] == "retinanet" and info["quantizers"] > 0

    report = verify_export(model, str(tmp_path / "m.onnx"), [_images(seed=5), _images(seed=6)])
    assert report.ok, report.failures
    layers = [n for n, m in model.named_modules() if isinstance(m, QConv2d)]
    assert report.weights_checked == len(layers)
    assert report.activations_checked >= len(layers)  # a per-level head conv has 5
    assert report.activation_values > 0
    lowers = [g["lower"] for g in json.loads(_metadata(tmp_path / "m.onnx")["qdq_activations"])]
    assert min(lowers) < -0.01 and any(abs(lo) < 1e-6 for lo in lowers)  # signed and unsigned

    # Independently of the check: each weight constant, decoded with numpy, is the
    # PyTorch fake-quantized weight, on a grid of exactly 2^b integers.
    n = 2**bits - 1
    qfd_8bit = method != "lsq" and bits == 8  # codes in uint8, then Add(-s)
    for layer, (integers, scale, offset) in _weight_integers(tmp_path / "m.onnx").items():
        module = model.get_submodule(layer)
        want = module.weight_quantizer(module.weight).detach().numpy()
        step = scale.reshape(-1, *[1] * (integers.ndim - 1)) if scale.ndim else scale
        got = integers.astype(np.float64) * step + offset
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        if method == "lsq":
            grid = np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1))
        else:
            grid = np.arange(0, n + 1) if qfd_8bit else np.arange(-n, n + 1, 2)
        assert set(np.unique(integers)) <= set(grid.tolist())
        assert integers.dtype == (np.uint8 if qfd_8bit else np.int8)
    if bits <= 4:  # a large layer fills the grid (LSQ's 8-bit step leaves its tails empty)
        largest = max(_weight_integers(tmp_path / "m.onnx").values(), key=lambda v: v[0].size)
        assert np.unique(largest[0]).size == 2**bits


def test_activation_qdq_equals_an_independent_fake_quant(tmp_path):
    """One quantized conv: ONNX's output against QFD Eq. 1-4 written with numpy."""
    from qdet.quantization import quantize_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False))
    quantize_model(net, 3, 3, exclude=[])
    x = torch.randn(2, 3, 8, 8)
    calibrate(net, [x], num_batches=1)
    conv = net[0]
    with torch.no_grad():
        conv.input_quantizer.lower.fill_(-1.3)  # a signed map with l, u, alpha all apart
        conv.input_quantizer.upper.fill_(1.7)
        conv.input_quantizer.scale.fill_(2.9)
        conv.input_quantizer.signed = True
    path = str(tmp_path / "conv.onnx")
    with onnx_export_mode(net), torch.no_grad():
        torch.onnx.export(net, (x,), path, dynamo=False, opset_version=17, input_names=["x"])
    got = inference_session(path).run(None, {"x": x.numpy()})[0]

    xs = x.numpy().astype(np.float64)
    t = np.clip((xs - -1.3) / (1.7 - -1.3), 0, 1)
    x_q = -1.3 + 2.9 * np.rint(7 * t) / 7
    w = conv.weight_quantizer(conv.weight).detach().numpy().astype(np.float64)
    want = torch.nn.functional.conv2d(torch.from_numpy(x_q), torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch,bits", [("vitdet", b) for b in (2, 3, 4, 8)] + [("swin", 3)])
def test_transformer_backbone_export(tmp_path, arch, bits):
    opts = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
    opts += ["QUANT.W_BITS", str(bits), "QUANT.A_BITS", str(bits)]
    torch.manual_seed(0)
    model = build_model(load_config(BACKBONES[arch], ["MODEL.WEIGHTS", "", *opts])).eval()
    batch = _images(1, 64, 64)
    calibrate(model, [batch], num_batches=1)
    info = _export(model, tmp_path / "vit.onnx", batch)
    assert info["graph"] == "backbone"
    assert info["outputs"] == list(model.backbone.output_shape())
    report = verify_export(model, str(tmp_path / "vit.onnx"), [batch, _images(1, 64, 64, seed=3)])
    assert report.ok, report.failures
    assert report.weights_checked > 0 and report.activations_checked > 0


def test_packed_weight_file_round_trips_bit_exactly(tmp_path):
    model = _quantized_model(RETINANET, "QUANT.W_BITS", "3", "QUANT.PER_CHANNEL", "True")
    path = str(tmp_path / "w.safetensors")
    sizes = save_packed_weights(model, path)
    layers, rest = read_packed_weights(path)
    exported = export_int_weights(model)
    assert set(layers) == set(exported)
    for name, entry in layers.items():
        assert torch.equal(entry["codes"], exported[name]["codes"])
        shape = torch.Size(entry["shape"])
        assert int(unpack_codes(entry["codes"], 3, shape).max()) <= 7
    for name, w in dequantize_weights(layers).items():
        module = model.get_submodule(name)
        assert torch.equal(w, module.weight_quantizer(module.weight).detach())
    state = model.state_dict()
    for key, value in rest.items():
        assert torch.equal(value, state[key]), key
    with safe_open(path, "pt") as f:  # a plain safetensors file: no pickle
        assert f.metadata()["format"] == "qdet-packed-weights-v1"
    assert sizes["file_bytes"] < sizes["fp32_bytes"] / 4


def test_fp_model_exports_as_fp32_with_a_warning(tmp_path, caplog):
    torch.manual_seed(0)
    model = build_model(load_config(RETINANET, [*TINY, "QUANT.ENABLED", "False"])).eval()
    with caplog.at_level("WARNING"):
        info = _export(model, tmp_path / "fp.onnx")
    assert info["quantizers"] == 0
    assert "no quantized layers" in caplog.text
    ops = {n.op_type for n in onnx.load(str(tmp_path / "fp.onnx")).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    report = verify_export(model, str(tmp_path / "fp.onnx"), [_images()])
    assert report.ok and report.head_max_abs < 1e-3


def test_unsupported_quantizer_and_uncalibrated_model_are_refused(tmp_path):
    model = _quantized_model(RETINANET, "QUANT.ACT_METHOD", "qrelu")
    with pytest.raises(
        ValueError, match=r"backbone\..*\.input_quantizer is a QReLUQuantizer.*uniform, ewgs or lsq"
    ):
        _export(model, tmp_path / "q.onnx")
    torch.manual_seed(0)
    fresh = build_model(load_config(RETINANET, TINY)).eval()
    with pytest.raises(ValueError, match="never calibrated.*MODEL.WEIGHTS"):
        _export(fresh, tmp_path / "f.onnx")
    assert not os.path.exists(tmp_path / "f.onnx")


def _scale_constant(proto, name: str, factor: float) -> None:
    """Multiply the constant ``name`` (an initializer or a Constant node) by ``factor``."""
    for init in proto.graph.initializer:
        if init.name == name:
            value = np.asarray(numpy_helper.to_array(init) * factor, np.float32)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            t = node.attribute[0].t
            value = np.asarray(numpy_helper.to_array(t) * factor, np.float32)
            t.CopyFrom(numpy_helper.from_array(value, t.name))


@pytest.mark.parametrize("tamper", ["step", "step_and_metadata", "offset_and_metadata"])
def test_check_fails_on_a_wrong_grid(tmp_path, tamper):
    """A QuantizeLinear whose grid is not the model quantizer's fails the check, also when
    the export's metadata is made to agree with the wrong file (the check's codes come
    from the model's quantizers, not from what the export wrote)."""
    model = _quantized_model(RETINANET)
    path = tmp_path / "m.onnx"
    _export(model, path)
    proto = onnx.load(str(path))
    q_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    meta = {p.key: p for p in proto.metadata_props}
    grids = json.loads(meta["qdq_activations"].value)
    producers = {out: n for n in proto.graph.node for out in n.output}

    def offset_sub(node):  # the Sub (x - l) of a signed map's chain (Sub, Clip, Q), or None
        before = producers.get(node.input[0])
        if before is not None and before.op_type == "Clip":
            before = producers.get(before.input[0])
        return before if before is not None and before.op_type == "Sub" else None

    i = next(k for k, n in enumerate(q_nodes) if offset_sub(n) is not None)
    grid = grids[i]
    if tamper.startswith("step"):
        _scale_constant(proto, q_nodes[i].input[1], 2.0)  # the step, doubled
        grid["upper"] = grid["lower"] + 2 * (grid["upper"] - grid["lower"])
        grid["q_step"] *= 2
    else:
        _scale_constant(proto, offset_sub(q_nodes[i]).input[1], 0.5)  # l moved halfway to 0
        grid["lower"] *= 0.5
    if tamper.endswith("metadata"):
        meta["qdq_activations"].value = json.dumps(grids)
    onnx.save(proto, str(path))
    report = verify_export(model, str(path), [_images()])
    assert not report.ok
    path_name = grids[i]["path"]
    assert any(f.startswith(path_name) for f in report.failures), report.failures


def test_check_fails_on_a_changed_float_op(tmp_path):
    """The class predictor (a float conv after the last quantizer) with its bias moved by
    0.05: every quantizer's codes still agree, so only the end-to-end check with
    onnxruntime's quantized tensors substituted can see it."""
    model = _quantized_model(RETINANET)
    path = tmp_path / "m.onnx"
    _export(model, path)
    report = verify_export(model, str(path), [_images()])
    assert report.ok and report.substituted_max_abs < 1e-4, report.failures
    proto = onnx.load(str(path))
    # The class predictor: the float Conv whose output is the first level's logits.
    producers = {out: n for n in proto.graph.node for out in n.output}
    conv = producers[proto.graph.output[0].name]
    while conv.op_type != "Conv":
        conv = producers[conv.input[0]]
    (bias,) = [i for i in proto.graph.initializer if i.name == conv.input[2]]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 0.05, bias.name))
    onnx.save(proto, str(path))
    report = verify_export(model, str(path), [_images()])
    assert not any("codes differ" in f for f in report.failures)
    assert any("substituted, an output differs by 0.05" in f for f in report.failures)


def test_export_tool_writes_and_checks(tmp_path):
    model = _quantized_model(RETINANET)
    weights = str(tmp_path / "model_final.pth")
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    out = str(tmp_path / "export" / "m.onnx")
    cmd = [sys.executable, os.path.join(ROOT, "tools/export_onnx.py"), "--config-file", RETINANET]
    cmd += ["--output", out, "--verify-images", "2", *TINY[2:], "MODEL.WEIGHTS", weights]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out.removesuffix(".onnx") + ".export.json") as f:
        result = json.load(f)
    assert result["verify"]["failures"] == [] and result["verify"]["images"] == 2
    assert os.path.isfile(out.removesuffix(".onnx") + ".weights.safetensors")
    assert "smaller than" in done.stderr + done.stdout

    missing = subprocess.run(
        [*cmd[:-1], str(tmp_path / "nope.pth")], capture_output=True, text=True, cwd=ROOT
    )
    assert missing.returncode == 2
    assert "MODEL.WEIGHTS" in missing.stderr and "does not exist" in missing.stderr


def test_per_level_head_quantizers_are_exported_once_each(tmp_path):
    model = _quantized_model(RETINANET, "QUANT.HEAD_PER_LEVEL_ACT", "True")
    info = _export(model, tmp_path / "m.onnx")
    convs = [m for m in model.modules() if isinstance(m, QConv2d)]
    assert info["quantizers"] == 2 * len(convs)  # a weight and an input quantizer each
    grids = json.loads(_metadata(tmp_path / "m.onnx")["qdq_activations"])
    levels = len(model.head_in_features)
    head_convs = [n for n, m in model.head.named_modules() if isinstance(m, QConv2d)]
    per_level = {g["path"] for g in grids if ".levels." in g["path"]}
    assert len(per_level) == levels * len(head_convs)


def _chain_node(proto, op: str, after_q: bool):
    """The first activation chain's ``op`` node: the Sub / Clip before a QuantizeLinear
    (``after_q`` False) or the DequantizeLinear / Add after it."""
    producers = {out: n for n in proto.graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for q in (n for n in proto.graph.node if n.op_type == "QuantizeLinear"):
        if after_q:
            (dq,) = [c for c in consumers[q.output[0]] if c.op_type == "DequantizeLinear"]
            if op == "DequantizeLinear":
                return dq
            after = consumers.get(dq.output[0], [])
            if len(after) == 1 and after[0].op_type == op:
                return after[0]
        else:
            node = producers.get(q.input[0])
            while node is not None and node.op_type in ("Sub", "Clip"):
                if node.op_type == op:
                    return node
                node = producers.get(node.input[0])
    raise AssertionError(f"no {op} in an activation chain")


@pytest.mark.parametrize(
    "op, after_q, operand, factor",
    [
        ("DequantizeLinear", True, 1, 2.0),  # the activation's output step
        ("Add", True, 1, 0.5),  # the signed map's output offset
        ("Clip", False, 2, 0.5),  # the top code's bound
        ("Sub", False, 1, 0.5),  # the input offset l
    ],
)
def test_check_fails_on_each_constant_of_an_activation_chain(
    tmp_path, op, after_q, operand, factor
):
    """Each constant of an activation's chain, tampered with alone (its metadata left
    as it was), fails the check and is named."""
    model = _quantized_model(RETINANET)
    path = tmp_path / "m.onnx"
    _export(model, path)
    proto = onnx.load(str(path))
    node = _chain_node(proto, op, after_q)
    _scale_constant(proto, node.input[operand], factor)
    onnx.save(proto, str(path))
    report = verify_export(model, str(path), [_images()])
    key = {
        "DequantizeLinear": "dq_step",
        "Add": "offset_out",
        "Clip": "clip_max",
        "Sub": "offset_in",
    }
    assert not report.ok
    assert any(key[op] in f for f in report.failures), report.failures


def test_check_fails_on_a_weight_step(tmp_path):
    model = _quantized_model(RETINANET)
    path = tmp_path / "m.onnx"
    _export(model, path)
    proto = onnx.load(str(path))
    constants = {i.name for i in proto.graph.initializer}
    constants |= {n.output[0] for n in proto.graph.node if n.op_type == "Constant"}
    dq = next(
        n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants
    )  # a weight's DequantizeLinear: its integers are a constant
    _scale_constant(proto, dq.input[1], 1.5)
    onnx.save(proto, str(path))
    report = verify_export(model, str(path), [_images()])
    assert not report.ok and any("dequantized weight differs" in f for f in report.failures)


def test_export_tool_checks_an_existing_file(tmp_path):
    """``tools/export_onnx.py --check FILE``: exit 0 for the model's own export, 1 once a
    constant of the file is changed; nothing written."""
    model = _quantized_model(RETINANET)
    weights = str(tmp_path / "model_final.pth")
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    path = tmp_path / "m.onnx"
    _export(model, path)
    cmd = [sys.executable, os.path.join(ROOT, "tools/export_onnx.py"), "--config-file", RETINANET]
    cmd += ["--check", str(path), "--verify-images", "1", *TINY[2:], "MODEL.WEIGHTS", weights]
    files = sorted(os.listdir(tmp_path))
    good = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert good.returncode == 0, good.stderr[-3000:]
    proto = onnx.load(str(path))
    _scale_constant(proto, _chain_node(proto, "DequantizeLinear", True).input[1], 2.0)
    onnx.save(proto, str(path))
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert bad.returncode == 1 and "dq_step" in bad.stderr + bad.stdout
    assert sorted(os.listdir(tmp_path)) == files


def test_check_fails_when_boundary_ties_exceed_the_documented_rate():
    """Ties at a rounding boundary are float rounding: up to MAX_TIE_RATE of the codes
    checked pass (counted); one more fails the check, naming both counts."""
    values = 2_000_000
    allowed = int(MAX_TIE_RATE * values)
    assert allowed == 200  # 1e-4: one tie in ten thousand codes
    within = VerifyReport(activation_values=values, boundary_flips=allowed, tie_values=allowed)
    check_tie_rate(within)
    assert within.ok
    above = VerifyReport(
        activation_values=values, boundary_flips=allowed + 1, tie_values=allowed + 1
    )
    check_tie_rate(above)
    assert not above.ok
    assert above.failures[0].startswith(
        "201 distinct values (201 of 2000000 activation codes) are one code apart"
    )


def test_weights_are_initializers_and_large_files_keep_external_data(tmp_path, monkeypatch):
    """A quantized export holds its weights (and every other non-scalar constant) as
    initializers, states opset and IR version; past protobuf's 2 GB (here: the limit
    lowered to 1 byte) its tensors go to ``<file>.data`` and onnxruntime runs it the same."""
    import qdet.export.graphs as graphs

    model = _quantized_model(RETINANET)
    small = tmp_path / "small.onnx"
    _export(model, small)
    proto = onnx.load(str(small))
    tensors = [n for n in proto.graph.node if n.op_type == "Constant" and n.attribute[0].t.dims]
    assert not tensors and len(proto.graph.initializer) > 2 * len(
        [m for m in model.modules() if isinstance(m, QConv2d)]
    )
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["opset"] == "17" and int(meta["ir_version"]) == proto.ir_version
    monkeypatch.setattr(graphs, "PROTOBUF_LIMIT", 1)
    large = tmp_path / "large.onnx"
    _export(model, large)
    assert os.path.isfile(str(large) + ".data") and not os.path.isfile(str(large) + ".tmp.data")
    assert os.path.getsize(large) < os.path.getsize(small) / 10
    feed = {"images": model.preprocess_image(_images()).tensor.numpy()}
    outs = [inference_session(str(p)).run(None, feed) for p in (small, large)]
    assert all(np.array_equal(a, b) for a, b in zip(*outs))
