"""The export benchmark's report (qdet/benchmark/export_latency.py): per size and threads a
row per model with its network-only and whole-file medians (IQR), the post-processing's
cost (whole minus network, ms and % of the whole), the whole file's ratios to FP32's and to
onnxruntime's MinMax's, its op counts, size and instances, each worked out here from the
result; a model without a whole file gets its network time and dashes, and its note. On a
result in the benchmark's JSON layout written here, and on the recorded one
(docs/export/benchmark_export.json)."""

import json
import re
from pathlib import Path

from qdet.benchmark.export_latency import table

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "docs/export/benchmark_export.json"
PEER = "quantize_static MinMax"


def _t(median: float, iqr: float) -> dict:
    return {"median_ms": median, "iqr_ms": iqr}


def _ops(integer: int, floats: int) -> dict:
    counts = {"QLinearConv": integer - 10, "QLinearAdd": 10} if integer else {"Conv": floats}
    return {"counts": counts, "integer": integer, "float_convs": floats}


def _files(stem: str, whole: bool = True) -> dict:
    files = {"network": f"out/{stem}.onnx", "whole": f"out/{stem}.whole.onnx"}
    return files if whole else {"network": files["network"]}


RESULT = {
    "onnxruntime": "1.32.0",
    "repeats": 5,
    "warmup": 1,
    "picture": "val/00001.png",
    "network_inputs": {"160x192": [1, 3, 160, 192], "800x1344": [1, 3, 800, 1344]},
    "kinds": {"network": "the network-only file", "whole": "the whole-detector file"},
    "post_processing": "whole minus network",
    "models": {
        "FP32": _files("fp32"),
        PEER: _files("ort_minmax"),
        "quantize_static Percentile": _files("ort_percentile", whole=False),
        "qdet W4A4 (calibration only)": _files("w4a4"),
    },
    "notes": {"quantize_static Percentile": "no whole file: its calibrator cannot"},
    "ops": {
        "FP32": {"network": _ops(0, 58), "whole": _ops(0, 58)},
        PEER: {"network": _ops(68, 0), "whole": _ops(68, 0)},
        "quantize_static Percentile": {"network": _ops(68, 0)},
        "qdet W4A4 (calibration only)": {"network": _ops(68, 0), "whole": _ops(67, 1)},
    },
    "mib": {
        "FP32": {"network": 47.47, "whole": 47.61},
        PEER: {"network": 12.08, "whole": 12.19},
        "quantize_static Percentile": {"network": 12.08},
        "qdet W4A4 (calibration only)": {"network": 12.25, "whole": 12.41},
    },
    "timings": {
        "160x192@1": {
            "FP32": {"network": _t(27.72, 0.06), "whole": _t(30.36, 0.62), "instances": 100},
            PEER: {"network": _t(8.41, 0.79), "whole": _t(11.55, 0.24), "instances": 100},
            "quantize_static Percentile": {"network": _t(8.82, 0.5)},
            "qdet W4A4 (calibration only)": {
                "network": _t(9.43, 0.71),
                "whole": _t(10.49, 0.2),
                "instances": 97,
            },
        },
        "800x1344@2": {
            "FP32": {"network": _t(480.2, 21.3), "whole": _t(501.9, 18.0), "instances": 100},
            PEER: {"network": _t(150.6, 9.9), "whole": _t(171.35, 8.4), "instances": 100},
            "quantize_static Percentile": {"network": _t(151.1, 7.7)},
            "qdet W4A4 (calibration only)": {
                "network": _t(155.0, 6.2),
                "whole": _t(170.04, 5.5),
                "instances": 88,
            },
        },
    },
}


def _expected_cells(result: dict, key: str, model: str) -> list[str]:
    t = result["timings"][key][model]
    network = f"{t['network']['median_ms']:.1f} ({t['network']['iqr_ms']:.1f})"
    if "whole" not in t:
        return [model, network] + ["—"] * 7
    whole = t["whole"]["median_ms"]
    post = whole - t["network"]["median_ms"]
    fp = result["timings"][key]["FP32"]["whole"]["median_ms"]
    peer = result["timings"][key][PEER]["whole"]["median_ms"]
    ops = result["ops"][model]["whole"]
    return [
        model,
        network,
        f"{whole:.1f} ({t['whole']['iqr_ms']:.1f})",
        f"{post:.1f} ({post / whole * 100:.0f}%)",
        f"{whole / fp:.2f}x",
        f"{whole / peer:.2f}x",
        f"{ops['integer']} / {ops['float_convs']}",
        f"{result['mib'][model]['whole']:.1f}",
        str(t["instances"]),
    ]


def _check_table(result: dict) -> None:
    text = table(result)
    assert text.startswith(f"onnxruntime {result['onnxruntime']} CPU provider")
    assert f"median (IQR) ms of {result['repeats']} runs each" in text.splitlines()[0]
    sections = re.split(r"^\*\*(\S+), (\d+) thread\(s\)\*\*$", text, flags=re.M)[1:]
    assert [f"{s}@{t}" for s, t in zip(sections[::3], sections[1::3])] == list(result["timings"])
    for key, body in zip(result["timings"], sections[2::3]):
        timings = result["timings"][key]
        rows = [line for line in body.splitlines() if line.startswith("| ") and "---" not in line]
        assert len(rows) == 1 + len(timings)  # the header, then one row per model
        assert [c.strip() for c in rows[0].strip("|").split("|")][:4] == [
            "model",
            "network ms",
            "whole ms",
            "post-processing ms (% of whole)",
        ]
        for line, model in zip(rows[1:], timings):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells == _expected_cells(result, key, model), (key, model)
    for model, why in result.get("notes", {}).items():
        assert f"— {model}: {why}." in text.splitlines()


def test_table_rows_are_the_timings_their_difference_and_ratios():
    _check_table(RESULT)
    text = table(RESULT)
    # spot checks against hand-worked values: FP32 at 160x192 spends 2.6 ms (9%) beyond
    # its network; qdet W4A4's whole file at 800x1344 is 0.99x MinMax's.
    assert (
        "| FP32 | 27.7 (0.1) | 30.4 (0.6) | 2.6 (9%) | 1.00x | 2.63x | 0 / 58 | 47.6 | 100 |"
        in (text)
    )
    assert "| 170.0 (5.5) | 15.0 (9%) | 0.34x | 0.99x | 67 / 1 | 12.4 | 88 |" in text
    assert "| quantize_static Percentile | 151.1 (7.7) |" + " — |" * 7 in text


def test_a_changed_timing_changes_its_row():
    changed = json.loads(json.dumps(RESULT))
    changed["timings"]["160x192@1"][PEER]["whole"]["median_ms"] = 15.0
    text = table(changed)
    assert "| FP32 | 27.7 (0.1) | 30.4 (0.6) | 2.6 (9%) | 1.00x | 2.02x |" in text
    assert "| quantize_static MinMax | 8.4 (0.8) | 15.0 (0.2) | 6.6 (44%) | 0.49x | 1.00x |" in text


def test_table_of_the_recorded_result():
    _check_table(json.loads(RECORDED.read_text()))
