"""Does onnxruntime's fused integer op beat the float op it replaces, at a transformer's
shapes? (``tools/benchmark_fused_ops.py``)

Issue 43 asks for Softmax, residual adds and multiplies in integers "where onnxruntime has a
QLinear kernel it fuses". Whether that pays is a measurement, one op at a time, each in two
one- or few-node graphs timed side by side (:func:`qdet.benchmark.export_latency.alternate`):

- **Softmax** over the attention logits. Float form (qdet's export today): float logits ->
  Softmax -> QuantizeLinear (the probabilities are quantized for attn v anyway). Integer
  form: the logits quantized first (a QuantizeLinear qdet's graph does not have), then
  DQ -> Softmax -> Q, which onnxruntime fuses to ``com.microsoft.QLinearSoftmax``; its output
  step 1/256 (the one it runs exactly: docs/deploy/onnxruntime_transformer_fusion.md).
- **Add** and **Mul** of two tensors of a block's width (a residual add; GELU's and
  LayerNorm's multiplies). Float form: Add / Mul of two
  float tensors. Integer form: DQ(a), DQ(b) -> op -> Q on uint8 codes, which onnxruntime
  fuses to ``QLinearAdd`` / ``QLinearMul``.

Each case records the ops onnxruntime runs in each graph after its optimisations (so a form
that did not fuse is seen) and, for the integer form, the share of output codes that differ
from the same graph run unfused (``ORT_DISABLE_ALL``: DQ, float op, Q): what QAT would have
to simulate. Shapes (:data:`CASES`) are ViTDet-B's and Swin-B's at 512 x 512, and
the digits tiny models' at 160 x 192, batch 1.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import partial

import numpy as np

from qdet.benchmark.export_latency import alternate, median_iqr
from qdet.export import inference_session
from qdet.export.integer_check import optimized_op_counts

PROBS_STEP = 1.0 / 256  # QLinearSoftmax multiplies by floor(1 / step): exact at 1/256
OPSET = 17


@dataclass(frozen=True)
class OpCase:
    """One op at one tensor's shape: ``op`` (Softmax over the last axis, Add, Mul) and
    which tensor of which model the shape is."""

    op: str
    where: str
    shape: tuple[int, ...]


# ViTDet-B at 512: 32 x 32 tokens, 12 heads of 64; its windowed blocks pad 32 to 42 for
# 14 x 14 windows (9). Swin-B at 512: 128 x 128 tokens in stage 1 (4 heads, 128 wide), 7 x 7
# windows after padding to 133 (361); stage 3 (18 of its 24 blocks): 32 x 32 tokens, 16
# heads, 512 wide, 25 windows. The digits models at 160 x 192: tiny ViTDet pads to 192 x 192,
# 24 x 24 tokens, 3 heads, 96 wide; tiny Swin, 40 x 48 tokens in stage 1 (3 heads, 48 wide),
# 6 x 6 windows (56).
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
)


def _grid(x: np.ndarray) -> tuple[float, int]:
    """uint8 step and zero point covering ``x``'s range (MinMax)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = (hi - lo) / 255 or 1.0
    return step, int(round(-lo / step))


def case_graphs(case: OpCase, seed: int = 0) -> tuple[bytes, bytes, dict, dict]:
    """(float graph, integer graph, float form's inputs, integer form's inputs) of ``case``,
    each graph serialised; the inputs are the same values (the integer form's as codes)."""
    import onnx  # optional: the export extra
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    names = ["x"] if case.op == "Softmax" else ["a", "b"]
    # Logits spread like attention's (a few units); a residual's entries about unit size.
    values = {n: (rng.standard_normal(case.shape) * 3).astype(np.float32) for n in names}
    grids = {n: _grid(v) for n, v in values.items()}
    codes = {
        n: np.clip(np.rint(v / grids[n][0]) + grids[n][1], 0, 255).astype(np.uint8)
        for n, v in values.items()
    }
    floats = {n: ((codes[n].astype(np.float32) - grids[n][1]) * grids[n][0]) for n in names}

    def scalar(name, value, dtype):
        return numpy_helper.from_array(np.array(value, dtype=dtype), name)

    def graph(nodes, inputs, in_type, out_type, inits):
        in_infos = [helper.make_tensor_value_info(n, in_type, case.shape) for n in inputs]
        out_info = helper.make_tensor_value_info("y", out_type, case.shape)
        model = helper.make_model(
            helper.make_graph(nodes, case.op, in_infos, [out_info], inits),
            opset_imports=[helper.make_opsetid("", OPSET)],
        )
        onnx.checker.check_model(model)
        return model.SerializeToString()

    grid_inits = []
    for n in names:
        grid_inits += [
            scalar(f"{n}_s", grids[n][0], np.float32),
            scalar(f"{n}_z", grids[n][1], np.uint8),
        ]
    if case.op == "Softmax":
        probs = [scalar("y_s", PROBS_STEP, np.float32), scalar("y_z", 0, np.uint8)]
        float_graph = graph(
            [
                helper.make_node("Softmax", ["x"], ["p"], axis=-1),
                helper.make_node("QuantizeLinear", ["p", "y_s", "y_z"], ["y"]),
            ],
            ["x"],
            TensorProto.FLOAT,
            TensorProto.UINT8,
            probs,
        )
        integer_graph = graph(
            [
                helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
                helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
                helper.make_node("Softmax", ["xd"], ["p"], axis=-1),
                helper.make_node("QuantizeLinear", ["p", "y_s", "y_z"], ["y"]),
            ],
            ["x"],
            TensorProto.FLOAT,
            TensorProto.UINT8,
            grid_inits + probs,
        )
        return float_graph, integer_graph, floats, floats
    out_step, out_zero = _grid(
        floats["a"] + floats["b"] if case.op == "Add" else floats["a"] * floats["b"]
    )
    output = [scalar("y_s", out_step, np.float32), scalar("y_z", out_zero, np.uint8)]
    float_graph = graph(
        [helper.make_node(case.op, ["a", "b"], ["y"])],
        names,
        TensorProto.FLOAT,
        TensorProto.FLOAT,
        [],
    )
    integer_graph = graph(
        [
            helper.make_node("DequantizeLinear", ["a", "a_s", "a_z"], ["ad"]),
            helper.make_node("DequantizeLinear", ["b", "b_s", "b_z"], ["bd"]),
            helper.make_node(case.op, ["ad", "bd"], ["yd"]),
            helper.make_node("QuantizeLinear", ["yd", "y_s", "y_z"], ["y"]),
        ],
        names,
        TensorProto.UINT8,
        TensorProto.UINT8,
        grid_inits + output,
    )
    return float_graph, integer_graph, floats, codes


def _unfused_codes(graph: bytes, inputs: dict) -> np.ndarray:
    import onnxruntime as ort  # optional: the export extra

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def measure_case(case: OpCase, threads: list[int], repeats: int, warmup: int) -> dict:
    """One case: per form its optimised ops and per thread setting its median ms (IQR);
    the integer form's codes against its unfused graph's."""
    float_graph, integer_graph, float_inputs, integer_inputs = case_graphs(case)
    graphs = {"float": (float_graph, float_inputs), "integer": (integer_graph, integer_inputs)}
    row = {"op": case.op, "where": case.where, "shape": list(case.shape), "forms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for form, (graph, _) in graphs.items():
            path = os.path.join(tmp, f"{form}.onnx")
            with open(path, "wb") as f:
                f.write(graph)
            row["forms"][form] = {"ops": optimized_op_counts(path), "ms": {}}
    fused = inference_session(integer_graph, 1).run(None, integer_inputs)[0]
    unfused = _unfused_codes(integer_graph, integer_inputs)
    off = np.abs(fused.astype(np.int32) - unfused.astype(np.int32))
    row["integer_vs_unfused"] = {
        "codes_off": int((off > 0).sum()),
        "codes": int(off.size),
        "max_code_difference": int(off.max()),
    }
    for count in threads:
        sessions = {
            form: inference_session(g, count, spinning=False) for form, (g, _) in graphs.items()
        }
        runs = {form: partial(s.run, None, graphs[form][1]) for form, s in sessions.items()}
        for form, seconds in alternate(runs, repeats, warmup).items():
            row["forms"][form]["ms"][str(count)] = median_iqr(seconds)
    return row


def measure_fused_ops(threads: list[int], repeats: int, warmup: int, cases=CASES) -> dict:
    """Every case of ``cases`` (:data:`CASES`), one after another."""
    return {
        "threads": threads,
        "repeats": repeats,
        "probs_step": PROBS_STEP,
        "cases": [measure_case(c, threads, repeats, warmup) for c in cases],
    }


def _ops(counts: dict) -> str:
    return " + ".join(f"{n} {op}" if n > 1 else op for op, n in sorted(counts.items()))


def fused_ops_table(result: dict) -> str:
    """Markdown: per case and thread setting, both forms' median ms (IQR), their ratio
    (integer / float), the ops each ran and the integer form's codes off its unfused graph."""
    lines = [
        "| op | tensor | threads | float form ms | integer form ms | integer / float "
        "| float form runs | integer form runs | integer codes off unfused |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["cases"]:
        forms = row["forms"]
        off = row["integer_vs_unfused"]
        for count in result["threads"]:
            f, i = (forms[form]["ms"][str(count)] for form in ("float", "integer"))
            lines.append(
                f"| {row['op']} | {row['where']} | {count} "
                f"| {f['median_ms']:.2f} ({f['iqr_ms']:.2f}) "
                f"| {i['median_ms']:.2f} ({i['iqr_ms']:.2f}) "
                f"| {i['median_ms'] / f['median_ms']:.2f}x "
                f"| {_ops(forms['float']['ops'])} | {_ops(forms['integer']['ops'])} "
                f"| {off['codes_off']} of {off['codes']} (max {off['max_code_difference']}) |"
            )
    return "\n".join(lines)
