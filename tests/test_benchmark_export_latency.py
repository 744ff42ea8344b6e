"""The export benchmark's report (qdet/benchmark/export_latency.py) on its recorded result
(docs/export/benchmark_export.json): per size and threads a row per model, its median (IQR)
and its ratios to FP32 and to onnxruntime's MinMax worked out here from the timings, its
op counts and size."""

import json
import re
from pathlib import Path

from qdet.benchmark.export_latency import table

ROOT = Path(__file__).resolve().parents[1]
RECORDED = json.loads((ROOT / "docs/export/benchmark_export.json").read_text())


def test_table_rows_are_the_recorded_timings_and_their_ratios():
    text = table(RECORDED)
    assert text.startswith(f"onnxruntime {RECORDED['onnxruntime']} CPU provider")
    sections = re.split(r"^\*\*(\S+), (\d+) thread\(s\)\*\*$", text, flags=re.M)[1:]
    assert [f"{s}@{t}" for s, t in zip(sections[::3], sections[1::3])] == list(RECORDED["timings"])
    for key, body in zip(RECORDED["timings"], sections[2::3]):
        timings = RECORDED["timings"][key]
        rows = [line for line in body.splitlines() if line.startswith("| ") and "---" not in line]
        assert len(rows) == 1 + len(timings)  # the header, then one row per model
        for line, (model, t) in zip(rows[1:], timings.items()):
            cells = [c.strip() for c in line.strip("|").split("|")]
            fp = timings["FP32"]["median_ms"]
            peer = timings["quantize_static MinMax"]["median_ms"]
            ops = RECORDED["ops"][model]
            assert cells == [
                model,
                f"{t['median_ms']:.1f} ({t['iqr_ms']:.1f})",
                f"{t['median_ms'] / fp:.2f}x",
                f"{t['median_ms'] / peer:.2f}x",
                f"{ops['integer']} / {ops['float_convs']}",
                f"{RECORDED['mib'][model]:.1f}",
            ], (key, model)
