"""The fused-op benchmark (qdet/benchmark/fused_ops.py) on tiny shapes: each integer form is
the one fused op onnxruntime runs, its codes are those of the op computed here in numpy
from the dequantized inputs, and the table's ratio is worked out from the result."""

import re

import numpy as np
import pytest

from qdet.benchmark.fused_ops import (
    PROBS_STEP,
    OpCase,
    case_graphs,
    fused_ops_table,
    measure_fused_ops,
)

pytest.importorskip("onnxruntime")

TINY = (
    OpCase("Softmax", "logits", (2, 3, 5, 7)),
    OpCase("Add", "residual", (1, 6, 8)),
    OpCase("Mul", "residual", (1, 6, 8)),
)
FUSED = {"Softmax": "QLinearSoftmax", "Add": "QLinearAdd", "Mul": "QLinearMul"}


@pytest.fixture(scope="module")
def result():
    return measure_fused_ops([1], repeats=1, warmup=0, cases=TINY)


def test_each_integer_form_is_the_fused_op_and_the_float_form_is_not(result):
    for row in result["cases"]:
        fused = FUSED[row["op"]]
        assert fused in row["forms"]["integer"]["ops"], row
        assert row["op"] not in row["forms"]["integer"]["ops"], row  # no float op left
        assert (
            row["op"] in row["forms"]["float"]["ops"] and fused not in row["forms"]["float"]["ops"]
        )
        assert row["integer_vs_unfused"]["codes"] == int(np.prod(row["shape"]))


def _numpy_codes(case: OpCase, inputs: dict, graph: bytes) -> np.ndarray:
    """The integer form's output written another way: dequantize, float op, quantize."""
    import onnx
    from onnx import numpy_helper

    inits = {
        t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(graph).graph.initializer
    }

    def dq(name):
        return (inputs[name].astype(np.float64) - float(inits[f"{name}_z"])) * float(
            inits[f"{name}_s"]
        )

    if case.op == "Softmax":
        x = inputs["x"].astype(np.float64)
        codes = np.clip(np.rint(x / inits["x_s"]) + inits["x_z"], 0, 255)
        logits = (codes - float(inits["x_z"])) * float(inits["x_s"])
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return np.clip(np.rint(e / e.sum(axis=-1, keepdims=True) / PROBS_STEP), 0, 255)
    y = dq("a") + dq("b") if case.op == "Add" else dq("a") * dq("b")
    return np.clip(np.rint(y / float(inits["y_s"])) + float(inits["y_z"]), 0, 255)


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.op)
def test_the_integer_form_computes_the_op_on_the_codes(case):
    from qdet.export import inference_session

    _, integer_graph, _, inputs = case_graphs(case)
    got = inference_session(integer_graph, 1).run(None, inputs)[0].astype(np.int64)
    expected = _numpy_codes(case, inputs, integer_graph)
    # Float rounding may move a value exactly between two codes to the other one.
    assert np.abs(got - expected).max() <= 1
    assert (got != expected).mean() < 0.02


def test_the_table_has_one_row_per_case_and_thread_with_the_ratio(result):
    text = fused_ops_table(result)
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| op")]
    assert len(rows) == len(TINY)
    for row, line in zip(result["cases"], rows):
        ms = {f: row["forms"][f]["ms"]["1"]["median_ms"] for f in ("float", "integer")}
        ratio = float(re.search(r"\| ([0-9.]+)x \|", line).group(1))
        assert ratio == pytest.approx(ms["integer"] / ms["float"], abs=0.006)
        assert FUSED[row["op"]] in line
