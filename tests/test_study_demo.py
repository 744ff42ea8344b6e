"""``make demo``'s rows, table and summary (qdet/study/demo.py) against the recorded run
README quotes (docs/demo/demo.json): the same models at the same widths, its table read
back from its own metrics and its files' (qdet/study/demo_deploy.py), its summary's
fields."""

import json
import os
import types
from pathlib import Path

from qdet.study.demo import SHEET, demo_rows, demo_table, write_summary

ROOT = Path(__file__).resolve().parents[1]
RECORDED = json.loads((ROOT / "docs/demo/demo.json").read_text())


def test_rows_are_the_recorded_demos_models():
    rows = demo_rows()
    assert [r.label for r in rows] == [m["model"] for m in RECORDED["rows"]]
    assert [r.bits for r in rows[1:]] == [m["W/A"] for m in RECORDED["rows"][1:]]  # FP: 32/32
    assert all((ROOT / r.config).is_file() for r in rows)
    assert [r.init for r in rows] == [None] + ["fp"] * (len(rows) - 1)  # students of the FP
    assert set(SHEET) <= {r.name for r in rows}


def test_table_is_seed_ones_metrics_and_each_files_per_model():
    rows = demo_rows()
    results = {
        row.name: {1: dict(recorded), 2: {k: -1 for k in recorded}}
        for row, recorded in zip(rows, RECORDED["rows"])
    }
    file_ms = {row.name: recorded["file ms"] for row, recorded in zip(rows, RECORDED["rows"])}
    study = types.SimpleNamespace(rows={row.name: row for row in rows})
    assert demo_table(study, results, file_ms) == RECORDED["rows"]
    # Runs that shipped no file (evaluated by Detectron2 alone) and no timing: the PyTorch
    # columns alone.
    for by_seed in results.values():
        del by_seed[1]["file AP"]
    bare = [{k: v for k, v in r.items() if not k.startswith("file ")} for r in RECORDED["rows"]]
    assert demo_table(study, results) == bare


def test_summary_holds_the_table_the_sheet_and_the_time(tmp_path):
    recorded = RECORDED["sheet"]
    threshold = types.SimpleNamespace(precision=recorded["precision"], recall=recorded["recall"])
    files = [os.path.join("output", "demo", "val", name) for name in recorded["images"]]
    sheet = types.SimpleNamespace(score=recorded["score"], threshold=threshold, files=files)
    write_summary(RECORDED["rows"], sheet, 1234.5678, str(tmp_path / "demo.json"))
    written = json.loads((tmp_path / "demo.json").read_text())
    assert written == {"rows": RECORDED["rows"], "seconds": 1234.6, "sheet": recorded}
    write_summary([], None, 1.0, str(tmp_path / "none.json"))
    assert "sheet" not in json.loads((tmp_path / "none.json").read_text())
