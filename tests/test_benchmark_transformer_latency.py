"""The transformer export benchmark (qdet/benchmark/transformer_latency.py): the integer and
float ops per layer kind of an optimised graph (qdet.export.integer_check.kernels_by_kind),
and the report's rows, each ratio worked out here from the result."""

import re

from qdet.benchmark.transformer_latency import transformer_table
from qdet.export.integer_check import kernels_by_kind

PEER = "quantize_static MinMax"


def test_kernels_by_kind_sorts_each_op_type_into_its_kind():
    counts = {"QGemm": 48, "Gemm": 2, "FusedGemm": 1, "QLinearMatMul": 12}
    counts |= {"MatMulIntegerToFloat": 12, "FusedMatMul": 3, "Softmax": 12, "QLinearAdd": 5}
    counts |= {"Add": 67, "ConvTranspose": 1, "FusedConv": 4, "QLinearConv": 9, "Relu": 8}
    counts |= {"QLinearSigmoid": 1, "Sigmoid": 2, "LayerNormalization": 8}
    kinds = kernels_by_kind(counts)
    assert kinds["sigmoid"] == {"integer": 1, "float": 2}
    assert kinds["layer_norm"] == {"integer": 0, "float": 8}
    assert kinds["linear"] == {"integer": 48, "float": 3}
    assert kinds["matmul"] == {"integer": 24, "float": 3}
    assert kinds["softmax"] == {"integer": 0, "float": 12}
    assert kinds["add"] == {"integer": 5, "float": 67}
    assert kinds["conv"] == {"integer": 9, "float": 4}
    assert kinds["conv_transpose"] == {"integer": 0, "float": 1}


def _kinds(linear, matmul):
    k = kernels_by_kind({})
    k["linear"], k["matmul"] = linear, matmul
    return k


def test_the_table_shows_each_model_against_fp32_and_the_peer():
    t = {
        "FP32": {"median_ms": 1600.0, "iqr_ms": 20.0},
        PEER: {"median_ms": 980.0, "iqr_ms": 10.0},
        "qdet W8A8": {"median_ms": 800.0, "iqr_ms": 5.0},
    }
    kernels = {
        "FP32": _kinds({"integer": 0, "float": 48}, {"integer": 0, "float": 24}),
        PEER: _kinds({"integer": 48, "float": 0}, {"integer": 24, "float": 0}),
        "qdet W8A8": _kinds({"integer": 48, "float": 0}, {"integer": 24, "float": 0}),
    }
    result = {
        "onnxruntime": "1.32.0",
        "repeats": 8,
        "pictures": "noise",
        "timings": {"vitdet_b_fp 512x512@2": t},
        "kernels": {"vitdet_b_fp 512x512": kernels},
        "mib": {"vitdet_b_fp 512x512": {"FP32": 348.6, PEER: 92.0, "qdet W8A8": 110.0}},
    }
    text = transformer_table(result)
    assert "**vitdet_b_fp 512x512, 2 thread(s)**" in text
    row = next(line for line in text.splitlines() if line.startswith("| qdet W8A8 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "800.0 (5.0)"
    assert cells[2] == f"{800 / 1600:.2f}x" and cells[3] == f"{800 / 980:.2f}x"
    assert cells[4] == "linear 48/0, matmul 24/0" and cells[5] == "110"
    fp_row = next(line for line in text.splitlines() if line.startswith("| FP32 |"))
    assert re.search(r"\| 1\.00x \| 1\.63x \|", fp_row)


def test_a_whole_detector_table_adds_the_instances_each_file_returns():
    from qdet.benchmark.transformer_latency import WHOLE_FILE

    t = {
        "FP32": {"median_ms": 3000.0, "iqr_ms": 20.0, "instances": 100},
        PEER: {"median_ms": 1500.0, "iqr_ms": 10.0, "instances": 100},
        "qdet W8A8 +heads": {"median_ms": 1200.0, "iqr_ms": 5.0, "instances": 97},
    }
    kernels = {m: _kinds({"integer": 0, "float": 1}, {"integer": 0, "float": 1}) for m in t}
    result = {
        "onnxruntime": "1.32.0",
        "repeats": 5,
        "pictures": "noise",
        "file": WHOLE_FILE,
        "timings": {"vitdet_b_fp 512x512@2": t},
        "kernels": {"vitdet_b_fp 512x512": kernels},
        "mib": {"vitdet_b_fp 512x512": dict.fromkeys(t, 100.0)},
    }
    lines = transformer_table(result).splitlines()
    assert WHOLE_FILE in lines[0]
    header = next(line for line in lines if line.startswith("| model |"))
    assert header.endswith("| MiB | instances |")
    row = next(line for line in lines if line.startswith("| qdet W8A8 +heads |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 7 and cells[-1] == "97" and cells[3] == f"{1200 / 1500:.2f}x"
