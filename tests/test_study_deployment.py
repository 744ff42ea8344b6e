"""The deployment study's rows (qdet/study/deployment.py) against the runs of its recorded
results (docs/deploy/deployment.json): the same run names, each at its width, each quantized
row from the FP model of its seed."""

import json
from pathlib import Path

from qdet.study.deployment import study_rows

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = {"w8a8": "8/8", "w4a8": "4/8", "w4a4": "4/4"}


def test_rows_are_the_recorded_runs():
    recorded = json.loads((ROOT / "docs/deploy/deployment.json").read_text())
    rows = study_rows(list(WIDTHS), "mse")
    names = [r.name for r in rows]
    assert len(names) == len(set(names))
    # the accuracy study's two W4A4 runs with EWGS's range rule are reused, not recorded here
    assert set(names) - {"baseline_4bit", "qfd_4bit"} == set(recorded)
    for row in rows:
        assert (ROOT / row.config).is_file(), row.config
        assert row.init == (None if row.name == "fp" else "fp"), row.name
        width = next((w for w in WIDTHS if row.name.endswith(w)), None)
        if width:
            assert row.bits == WIDTHS[width], row.name
        elif row.name != "fp":  # onnxruntime's PTQ and EWGS's rule: 8/8, or the 4-bit runs
            assert row.bits == ("4/4" if row.name.endswith("_4bit") else "8/8"), row.name


def test_the_range_rule_reaches_every_quantized_row_but_ewgs_rows():
    for rule in ("mse", "minmax"):
        for row in study_rows(["w4a4"], rule):
            opts = dict(zip(row.opts[::2], row.opts[1::2]))
            shows_ewgs = row.name.endswith(("_ewgs", "_4bit")) or row.name == "fp"
            if shows_ewgs or row.name.startswith("ptq_onnxruntime"):
                assert opts.get("QUANT.CALIB_RANGE") is None, row.name
            else:
                assert opts.get("QUANT.CALIB_RANGE") == rule, row.name
