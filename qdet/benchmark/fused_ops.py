"""Does onnxruntime's fused integer op beat the float op it replaces, at a transformer's
shapes? (``tools/benchmark_fused_ops.py``)

Issue 43 asks for Softmax, residual adds and multiplies in integers "where onnxruntime has a
QLinear kernel it fuses", and for 4-bit weight kernels (MatMulNBits) where they beat an int8
GEMM. Whether that pays is a measurement, one op at a time, each form a small graph, all
forms of a case timed side by side (:func:`qdet.benchmark.export_latency.alternate`):

- **Softmax** over the attention logits. Float form (qdet's export): float logits ->
  Softmax -> QuantizeLinear (the probabilities are quantized for attn v anyway). Integer
  form: the logits quantized first (a QuantizeLinear qdet's graph does not have), then
  DQ -> Softmax -> Q, which onnxruntime fuses to ``com.microsoft.QLinearSoftmax``; its output
  step 1/256 (the one it runs exactly: docs/deploy/onnxruntime_transformer_fusion.md).
- **Add** and **Mul** of two tensors of a block's width (a residual add; GELU's and
  LayerNorm's multiplies). Float form: the op on float tensors. Integer form: DQ(a), DQ(b)
  -> op -> Q on uint8 codes, which onnxruntime fuses to ``QLinearAdd`` / ``QLinearMul``.
- **Linear** (tokens x in -> out). Float form: FP32 Gemm. Integer form (qdet's W8A8):
  DQ(x codes), DQ(int8 weight per output channel), DQ(int32 bias) -> Gemm -> Q, fused to
  QGemm. And W4 weights, blockwise along K (block 32), DQ -> MatMul with float activations,
  fused to ``MatMulNBits``: at accuracy level 4 (onnxruntime's default: activations
  quantized to int8 per row and block on the fly) and level 1 (float activations).

Each case records the ops onnxruntime runs in each form after its optimisations (so a form
that did not fuse is seen) and the integer form's output codes against the same graph run
unfused (``ORT_DISABLE_ALL``: DQ, float op, Q): what QAT would have to simulate. Shapes
(:data:`CASES`) are ViTDet-B's and Swin-B's at 512 x 512, and the digits tiny models' at
160 x 192, batch 1.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from qdet.benchmark.export_latency import alternate, median_iqr
from qdet.export.integer_check import optimized_op_counts

PROBS_STEP = 1.0 / 256  # QLinearSoftmax multiplies by floor(1 / step): exact at 1/256
NBITS_BLOCK = 32  # MatMulNBits' K-block of the W4 form
NBITS_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"


@dataclass(frozen=True)
class OpCase:
    """One op at one tensor's shape: ``op`` (Softmax over the last axis, Add, Mul, Linear)
    and which tensor of which model the shape is (a Linear's: tokens, in, out)."""

    op: str
    where: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Form:
    """One way to run a case: its graph, inputs and session config entries."""

    graph: bytes
    inputs: dict
    config: dict = field(default_factory=dict)


# ViTDet-B at 512: 32 x 32 tokens, 12 heads of 64, 768 wide (MLP 3072); its windowed blocks
# pad 32 to 42 for 14 x 14 windows (9). Swin-B at 512: 128 x 128 tokens in stage 1 (4
# heads, 128 wide), 7 x 7 windows after padding to 133 (361); stage 3 (18 of its 24 blocks):
# 32 x 32 tokens, 16 heads, 512 wide, 25 windows. The digits models at 160 x 192: tiny
# ViTDet pads to 192 x 192, 24 x 24 tokens, 3 heads, 96 wide; tiny Swin, 40 x 48 tokens in
# stage 1 (3 heads, 48 wide), 6 x 6 windows (56).
CASES = (
    OpCase("Softmax", "ViTDet-B global attention logits (12 x 1024 x 1024)", (12, 1024, 1024)),
    OpCase("Softmax", "ViTDet-B window attention logits (9 windows)", (108, 196, 196)),
    OpCase("Softmax", "Swin-B stage 1 window attention logits", (361, 4, 49, 49)),
    OpCase("Softmax", "Swin-B stage 3 window attention logits", (25, 16, 49, 49)),
    OpCase("Softmax", "tiny ViTDet global attention logits (3 x 576 x 576)", (3, 576, 576)),
    OpCase("Softmax", "tiny Swin stage 1 window attention logits", (56, 3, 36, 36)),
    OpCase("Add", "ViTDet-B residual (1 x 32 x 32 x 768)", (1, 32, 32, 768)),
    OpCase("Add", "Swin-B stage 1 residual (1 x 16384 x 128)", (1, 16384, 128)),
    OpCase("Add", "tiny ViTDet residual (1 x 24 x 24 x 96)", (1, 24, 24, 96)),
    OpCase("Mul", "ViTDet-B block-wide tensor (1 x 32 x 32 x 768)", (1, 32, 32, 768)),
    OpCase("Mul", "Swin-B stage 1 block-wide tensor (1 x 16384 x 128)", (1, 16384, 128)),
    OpCase("Linear", "ViTDet-B MLP fc1 (1024 tokens, 768 -> 3072)", (1024, 768, 3072)),
    OpCase("Linear", "Swin-B stage 3 qkv (1024 tokens, 512 -> 1536)", (1024, 512, 1536)),
)


def _grid(x: np.ndarray) -> tuple[float, int]:
    """uint8 step and zero point covering ``x``'s range (MinMax)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = (hi - lo) / 255 or 1.0
    return step, int(round(-lo / step))


def _codes(x: np.ndarray, grid: tuple[float, int]) -> np.ndarray:
    return np.clip(np.rint(x / grid[0]) + grid[1], 0, 255).astype(np.uint8)


def _dequantized(codes: np.ndarray, grid: tuple[float, int]) -> np.ndarray:
    return (codes.astype(np.float32) - grid[1]) * np.float32(grid[0])


def _model(nodes, inputs: dict, out_type: int, out_shape, inits, opset: int = 17) -> bytes:
    import onnx  # optional: the export extra
    from onnx import helper

    infos = [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()]
    model = helper.make_model(
        helper.make_graph(
            nodes, "case", infos, [helper.make_tensor_value_info("y", out_type, out_shape)], inits
        ),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _const(name: str, value, dtype=None):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _elementwise_forms(case: OpCase, rng) -> dict[str, Form]:
    """Softmax, Add, Mul: the float form and the fused integer form (module docstring)."""
    from onnx import TensorProto, helper

    names = ["x"] if case.op == "Softmax" else ["a", "b"]
    # Logits spread like attention's (a few units); a block's tensors about that too.
    grids, codes, floats = {}, {}, {}
    for n in names:
        values = (rng.standard_normal(case.shape) * 3).astype(np.float32)
        grids[n] = _grid(values)
        codes[n] = _codes(values, grids[n])
        floats[n] = _dequantized(codes[n], grids[n])
    grid_inits = []
    for n in names:
        grid_inits += [
            _const(f"{n}_s", grids[n][0], np.float32),
            _const(f"{n}_z", grids[n][1], np.uint8),
        ]
    f32, u8 = TensorProto.FLOAT, TensorProto.UINT8
    if case.op == "Softmax":
        probs = [_const("y_s", PROBS_STEP, np.float32), _const("y_z", 0, np.uint8)]

        def softmax_q(logits: str) -> list:
            return [
                helper.make_node("Softmax", [logits], ["p"], axis=-1),
                helper.make_node("QuantizeLinear", ["p", "y_s", "y_z"], ["y"]),
            ]

        integer_nodes = [
            helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
            *softmax_q("xd"),
        ]
        inputs = {"x": (f32, case.shape)}
        return {
            "float": Form(_model(softmax_q("x"), inputs, u8, case.shape, probs), floats),
            "integer": Form(
                _model(integer_nodes, inputs, u8, case.shape, grid_inits + probs), floats
            ),
        }
    product = floats["a"] + floats["b"] if case.op == "Add" else floats["a"] * floats["b"]
    out_grid = _grid(product)
    output = [_const("y_s", out_grid[0], np.float32), _const("y_z", out_grid[1], np.uint8)]
    integer_nodes = [
        helper.make_node("DequantizeLinear", ["a", "a_s", "a_z"], ["ad"]),
        helper.make_node("DequantizeLinear", ["b", "b_s", "b_z"], ["bd"]),
        helper.make_node(case.op, ["ad", "bd"], ["yd"]),
        helper.make_node("QuantizeLinear", ["yd", "y_s", "y_z"], ["y"]),
    ]
    float_inputs = {n: (f32, case.shape) for n in names}
    code_inputs = {n: (u8, case.shape) for n in names}
    return {
        "float": Form(
            _model([helper.make_node(case.op, names, ["y"])], float_inputs, f32, case.shape, []),
            floats,
        ),
        "integer": Form(
            _model(integer_nodes, code_inputs, u8, case.shape, grid_inits + output), codes
        ),
    }


def _int4(name: str, values: np.ndarray):
    """An INT4 initializer of ``values`` (-8..7), packed two per byte, low nibble first."""
    from onnx import TensorProto, helper

    flat = values.astype(np.int8).flatten()
    flat = np.concatenate([flat, np.zeros(flat.size % 2, np.int8)])
    packed = ((flat[0::2] & 0xF) | ((flat[1::2] & 0xF) << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, values.shape, packed.tobytes(), raw=True)


def _linear_forms(case: OpCase, rng) -> dict[str, Form]:
    """FP32 Gemm, qdet's W8A8 QGemm, W4 MatMulNBits at accuracy levels 4 and 1."""
    from onnx import TensorProto, helper

    tokens, k, n = case.shape
    weight = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    f32, u8 = TensorProto.FLOAT, TensorProto.UINT8
    x_grid = _grid(x)
    x_codes = _codes(x, x_grid)
    x_float = _dequantized(x_codes, x_grid)
    fp32 = _model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
        {"x": (f32, [tokens, k])},
        f32,
        [tokens, n],
        [_const("w", weight), _const("b", bias)],
    )
    # W8A8: int8 weight per output channel (axis 0, transB), int32 bias at s_x s_w.
    w_step = np.abs(weight).max(axis=1) / 127
    w_codes = np.clip(np.rint(weight / w_step[:, None]), -127, 127).astype(np.int8)
    b_step = (x_grid[0] * w_step).astype(np.float32)
    b_codes = np.rint(bias / b_step).astype(np.int32)
    y_grid = _grid(x_float @ weight.T + bias)
    qgemm = _model(
        [
            helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["xd"]),
            helper.make_node("DequantizeLinear", ["wq", "w_s", "w_z"], ["wd"], axis=0),
            helper.make_node("DequantizeLinear", ["bq", "b_s", "b_z"], ["bd"], axis=0),
            helper.make_node("Gemm", ["xd", "wd", "bd"], ["g"], transB=1),
            helper.make_node("QuantizeLinear", ["g", "y_s", "y_z"], ["y"]),
        ],
        {"x": (u8, [tokens, k])},
        u8,
        [tokens, n],
        [
            _const("x_s", x_grid[0], np.float32),
            _const("x_z", x_grid[1], np.uint8),
            _const("wq", w_codes),
            _const("w_s", w_step.astype(np.float32)),
            _const("w_z", np.zeros(n, np.int8)),
            _const("bq", b_codes),
            _const("b_s", b_step),
            _const("b_z", np.zeros(n, np.int32)),
            _const("y_s", y_grid[0], np.float32),
            _const("y_z", y_grid[1], np.uint8),
        ],
    )
    # W4: [K, N] codes, one step per K-block and output column (axis 0, block 32).
    blocks = weight.T.reshape(k // NBITS_BLOCK, NBITS_BLOCK, n)
    w4_step = (np.abs(blocks).max(axis=1) / 7).astype(np.float32)
    w4_codes = np.clip(np.rint(blocks / w4_step[:, None, :]), -8, 7).reshape(k, n)
    nbits = _model(
        [
            helper.make_node(
                "DequantizeLinear", ["w4", "w4_s", "w4_z"], ["wd"], axis=0, block_size=NBITS_BLOCK
            ),
            helper.make_node("MatMul", ["x", "wd"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["y"]),
        ],
        {"x": (f32, [tokens, k])},
        f32,
        [tokens, n],
        [
            _int4("w4", w4_codes),
            _const("w4_s", w4_step),
            _int4("w4_z", np.zeros_like(w4_step, dtype=np.int8)),
            _const("b", bias),
        ],
        opset=21,
    )
    return {
        "float": Form(fp32, {"x": x_float}),
        "integer": Form(qgemm, {"x": x_codes}),
        "MatMulNBits level 4": Form(nbits, {"x": x_float}, {NBITS_LEVEL_KEY: "4"}),
        "MatMulNBits level 1": Form(nbits, {"x": x_float}, {NBITS_LEVEL_KEY: "1"}),
    }


def case_forms(case: OpCase, seed: int = 0) -> dict[str, Form]:
    """Every form of ``case`` (module docstring), on the same values (the integer form's
    as codes)."""
    rng = np.random.default_rng(seed)
    return _linear_forms(case, rng) if case.op == "Linear" else _elementwise_forms(case, rng)


def form_session(form: Form, threads: int, optimize: bool = True):
    """A CPU session of ``form`` on ``threads`` threads with its config entries (idle
    threads sleep); ``optimize`` False runs the graph as written (``ORT_DISABLE_ALL``)."""
    import onnxruntime as ort  # optional: the export extra

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # Idle sessions sleep: the one timed has the cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in form.config.items():
        options.add_session_config_entry(key, value)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(form.graph, options, providers=["CPUExecutionProvider"])


def measure_case(case: OpCase, threads: list[int], repeats: int, warmup: int) -> dict:
    """One case: per form its optimised ops and per thread setting its median ms (IQR);
    the integer form's codes against its unfused graph's."""
    forms = case_forms(case)
    row = {"op": case.op, "where": case.where, "shape": list(case.shape), "forms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, form in forms.items():
            path = os.path.join(tmp, "form.onnx")
            with open(path, "wb") as f:
                f.write(form.graph)
            row["forms"][name] = {"ops": optimized_op_counts(path), "ms": {}}
    integer = forms["integer"]
    fused = form_session(integer, 1).run(None, integer.inputs)[0].astype(np.int32)
    unfused = form_session(integer, 1, optimize=False).run(None, integer.inputs)[0].astype(np.int32)
    off = np.abs(fused - unfused)
    row["integer_vs_unfused"] = {
        "codes_off": int((off > 0).sum()),
        "codes": int(off.size),
        "max_code_difference": int(off.max()),
    }
    for count in threads:
        runs = {
            name: partial(form_session(form, count).run, None, form.inputs)
            for name, form in forms.items()
        }
        for name, seconds in alternate(runs, repeats, warmup).items():
            row["forms"][name]["ms"][str(count)] = median_iqr(seconds)
    return row


def measure_fused_ops(threads: list[int], repeats: int, warmup: int, cases=CASES) -> dict:
    """Every case of ``cases`` (:data:`CASES`), one after another."""
    return {
        "threads": threads,
        "repeats": repeats,
        "probs_step": PROBS_STEP,
        "nbits_block": NBITS_BLOCK,
        "cases": [measure_case(c, threads, repeats, warmup) for c in cases],
    }


def _ops(counts: dict) -> str:
    return " + ".join(f"{n} {op}" if n > 1 else op for op, n in sorted(counts.items()))


def fused_ops_table(result: dict) -> str:
    """Markdown: per case and thread setting, every form's median ms (IQR), the integer
    form's ratio to the float form's, the ops each form ran and the integer form's codes
    off its unfused graph."""
    lines = [
        "| op | tensor | threads | float form ms | integer form ms | integer / float "
        "| other forms ms | forms run | integer codes off unfused |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["cases"]:
        forms = row["forms"]
        off = row["integer_vs_unfused"]
        ran = "; ".join(f"{name}: {_ops(form['ops'])}" for name, form in forms.items())
        for count in result["threads"]:
            ms = {name: form["ms"][str(count)] for name, form in forms.items()}
            others = ", ".join(
                f"{name} {t['median_ms']:.2f} ({t['iqr_ms']:.2f})"
                for name, t in ms.items()
                if name not in ("float", "integer")
            )
            f, i = ms["float"], ms["integer"]
            lines.append(
                f"| {row['op']} | {row['where']} | {count} "
                f"| {f['median_ms']:.2f} ({f['iqr_ms']:.2f}) "
                f"| {i['median_ms']:.2f} ({i['iqr_ms']:.2f}) "
                f"| {i['median_ms'] / f['median_ms']:.2f}x | {others or '—'} | {ran} "
                f"| {off['codes_off']} of {off['codes']} (max {off['max_code_difference']}) |"
            )
    return "\n".join(lines)
