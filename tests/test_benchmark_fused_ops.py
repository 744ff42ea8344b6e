"""The fused-op benchmark (qdet/benchmark/fused_ops.py) on tiny shapes: each integer form is
the one fused op onnxruntime runs, its codes are those of the op computed here in numpy
from the dequantized inputs, the W4 form's output is the product with its dequantized
weight, and the table's ratio is worked out from the result."""

import re

import numpy as np
import pytest

from qdet.benchmark.fused_ops import (
    NBITS_BLOCK,
    PROBS_STEP,
    OpCase,
    case_forms,
    form_session,
    fused_ops_table,
    measure_fused_ops,
)

pytest.importorskip("onnxruntime")

TINY = (
    OpCase("Softmax", "logits", (2, 3, 5, 7)),
    OpCase("Add", "residual", (1, 6, 8)),
    OpCase("Mul", "residual", (1, 6, 8)),
    OpCase("Linear", "fc", (5, 64, 24)),
)
FUSED = {
    "Softmax": {"float": "Softmax", "integer": "QLinearSoftmax"},
    "Add": {"float": "Add", "integer": "QLinearAdd"},
    "Mul": {"float": "Mul", "integer": "QLinearMul"},
    "Linear": {
        "float": "Gemm",
        "integer": "QGemm",
        "MatMulNBits level 4": "MatMulNBits",
        "MatMulNBits level 1": "MatMulNBits",
    },
}


@pytest.fixture(scope="module")
def result():
    return measure_fused_ops([1], repeats=1, warmup=0, cases=TINY)


def test_each_form_runs_as_the_op_it_is_named_for(result):
    for row in result["cases"]:
        assert set(row["forms"]) == set(FUSED[row["op"]])
        for form, op in FUSED[row["op"]].items():
            assert op in row["forms"][form]["ops"], (row["op"], form, row["forms"][form]["ops"])
        float_ops = set(row["forms"]["float"]["ops"])
        assert not float_ops & {"QLinearSoftmax", "QLinearAdd", "QLinearMul", "QGemm"}
        out_shape = row["shape"][:1] + row["shape"][2:] if row["op"] == "Linear" else row["shape"]
        assert row["integer_vs_unfused"]["codes"] == int(np.prod(out_shape))


def _initializers(graph: bytes) -> dict:
    import onnx
    from onnx import numpy_helper

    return {
        t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(graph).graph.initializer
    }


def _numpy_codes(case: OpCase, inputs: dict, graph: bytes) -> np.ndarray:
    """The integer form's output written another way: dequantize, float op, quantize."""
    inits = _initializers(graph)

    def dq(name, codes):
        return (codes.astype(np.float64) - inits[f"{name}_z"].astype(np.float64)) * inits[
            f"{name}_s"
        ].astype(np.float64)

    if case.op == "Softmax":
        x = inputs["x"].astype(np.float64)
        logits = dq("x", np.clip(np.rint(x / inits["x_s"]) + inits["x_z"], 0, 255))
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return np.clip(np.rint(e / e.sum(axis=-1, keepdims=True) / PROBS_STEP), 0, 255)
    if case.op == "Linear":
        w = inits["wq"].astype(np.float64) * inits["w_s"][:, None]
        y = dq("x", inputs["x"]) @ w.T + inits["bq"] * inits["b_s"].astype(np.float64)
    else:
        a, b = dq("a", inputs["a"]), dq("b", inputs["b"])
        y = a + b if case.op == "Add" else a * b
    return np.clip(np.rint(y / float(inits["y_s"])) + float(inits["y_z"]), 0, 255)


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.op)
def test_the_integer_form_computes_the_op_on_the_codes(case):
    form = case_forms(case)["integer"]
    got = form_session(form, 1).run(None, form.inputs)[0].astype(np.int64)
    expected = _numpy_codes(case, form.inputs, form.graph)
    # Float rounding may move a value exactly between two codes to the other one.
    assert np.abs(got - expected).max() <= 1
    assert (got != expected).mean() < 0.02


def test_the_w4_form_is_the_product_with_its_blockwise_weight():
    case = TINY[-1]
    forms = case_forms(case)
    nbits = forms["MatMulNBits level 1"]
    x = nbits.inputs["x"]
    inits = _initializers(nbits.graph)
    # the 4-bit codes ([K, N]) times one step per block of NBITS_BLOCK rows and column
    weight = inits["w4"].astype(np.float64) * np.repeat(inits["w4_s"], NBITS_BLOCK, axis=0)
    expected = x.astype(np.float64) @ weight + inits["b"]
    level1 = form_session(nbits, 1).run(None, nbits.inputs)[0]
    np.testing.assert_allclose(level1, expected, rtol=1e-4, atol=1e-4)
    # level 4 quantizes the activations to int8 on the fly: near, not equal
    level4 = form_session(forms["MatMulNBits level 4"], 1).run(None, nbits.inputs)[0]
    scale = np.abs(expected).max()
    assert 1e-5 * scale < np.abs(level4 - expected).max() < 0.05 * scale
    assert set(np.unique(inits["w4"])) <= set(range(-8, 8))


def test_the_table_has_one_row_per_case_and_thread_with_the_ratio(result):
    text = fused_ops_table(result)
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| op")]
    assert len(rows) == len(TINY)
    for row, line in zip(result["cases"], rows):
        ms = {f: row["forms"][f]["ms"]["1"]["median_ms"] for f in ("float", "integer")}
        ratio = float(re.search(r"\| ([0-9.]+)x \|", line).group(1))
        assert ratio == pytest.approx(ms["integer"] / ms["float"], abs=0.006)
        assert FUSED[row["op"]]["integer"] in line
    assert "MatMulNBits level 4 " in rows[-1]
