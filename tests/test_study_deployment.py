"""The deployment study's rows (qdet/study/deployment.py) against the runs of its recorded
results (docs/deploy/deployment.json): the same run names, each at its width, each quantized
row from the FP model of its seed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qdet.config import load_config
from qdet.study.deployment import add_deploy_config, paired_cell, study_rows
from qdet.study.deployment_transformer import ARCHS, tables, transformer_rows

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


# -- the tiny transformers' study (qdet/study/deployment_transformer.py) -------------------
def _vitdet_config(row):
    return load_config(str(ROOT / row.config), list(row.opts), add_deploy_config)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformer_rows_build_what_their_names_say(arch):
    rows = {r.name: r for r in transformer_rows(["w8a8", "w4a8"], arch)}
    assert all(ARCHS[arch].configs in r.config for r in rows.values())
    assert not rows["fp"].per_seed and all(r.init == "fp" for n, r in rows.items() if n != "fp")
    for name, row in rows.items():
        cfg = _vitdet_config(row)
        parts = name.split("_")
        if name == "fp":
            assert not cfg.QUANT.ENABLED
            continue
        if name == "fp_finetune":  # the control: the QAT rows' schedule, unquantized
            qat = _vitdet_config(rows["baseline_ort_w8a8"])
            assert not cfg.QUANT.ENABLED and cfg.SOLVER.MAX_ITER == qat.SOLVER.MAX_ITER == 200
            assert cfg.SOLVER.BASE_LR == qat.SOLVER.BASE_LR and row.per_seed
            continue
        if name.startswith("ptq_onnxruntime"):
            assert cfg.DEPLOY_STUDY.KIND == "ptq_onnxruntime" and not cfg.QUANT.ENABLED
            blocks = list(ARCHS[arch].blocks) if "blocks" in name else []
            assert list(cfg.DEPLOY_STUDY.PEER_NODES) == blocks
            ops = {"matmuls": ["MatMul"], "softmax": ["MatMul", "Softmax"]}
            ops |= {"add": ["MatMul", "Add"], "mul": ["MatMul", "Mul"]}
            want = next((ops[p] for p in reversed(parts) if p in ops), [])
            assert list(cfg.DEPLOY_STUDY.PEER_OPS) == want, name
            assert not row.per_seed  # nothing in it depends on the seed: made once
            continue
        width = next(p for p in parts if p in ("w8a8", "w4a8"))
        assert {"w8a8": (8, 8), "w4a8": (4, 8)}[width] == (cfg.QUANT.W_BITS, cfg.QUANT.A_BITS)
        assert row.bits == f"{cfg.QUANT.W_BITS}/{cfg.QUANT.A_BITS}"
        assert ("" if "sim" in parts else "onnxruntime") == cfg.QUANT.TARGET, name
        assert (parts[0] == "qfd") == cfg.DISTILL.ENABLED, name
        if cfg.DISTILL.ENABLED:  # the teacher: the FP model's config
            assert rows["fp"].config == cfg.DISTILL.TEACHER_CONFIG
        assert list(cfg.QUANT.TARGETS) == (
            [parts[-1]] if parts[-1] in ("mha", "mlp") else ["mha", "mlp"]
        ), name
        assert ("ptq_qdet" if parts[0] == "ptq" else "qat") == cfg.DEPLOY_STUDY.KIND, name
        # the whole network: the blocks, the pyramid's or FPN's convs and the R-CNN heads
        pyramid = {"vitdet": ["simfp"], "swin": ["fpn_lateral", "fpn_output"]}[arch]
        whole = [*pyramid, "proposal_generator", "roi_heads"]
        assert list(cfg.QUANT.INCLUDE) == (whole if "heads" in parts else []), name


def test_vitdet_tables_pair_the_seeds():
    rng = np.random.default_rng(0)
    results = {}
    metrics = ("AP", "ort AP", "mask AP", "ort mask AP")
    for row in transformer_rows(["w8a8", "w4a8"]):
        per_seed = {s: {m: float(rng.uniform(40, 60)) for m in metrics} for s in (1, 2, 3)}
        if not row.per_seed:  # the runner shares one run's figures with every seed
            per_seed = {s: per_seed[1] for s in (1, 2, 3)}
        results[row.name] = per_seed
    text = tables(results, ["w8a8", "w4a8"], [1, 2, 3])
    # QFD's file at W4A8 minus quantize_static's (every layer), per seed, written out here
    d = [
        results["qfd_ort_w4a8"][s]["ort mask AP"]
        - results["ptq_onnxruntime_minmax"][s]["ort mask AP"]
        for s in (1, 2, 3)
    ]
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("| QFD, TARGET onnxruntime - onnxruntime quantize_static W8A8 MinMax, ev")
    )
    cells = [c.strip() for c in line.strip("|").split("|")]
    higher = sum(v > 0 for v in d)
    # columns: box 8/8, box 4/8, mask 8/8, mask 4/8
    assert cells[4] == f"{np.mean(d):+.1f} ± {np.std(d, ddof=1):.1f} ({higher}/3 higher)"
    # onnxruntime's own PTQ: its file's AP only, one run (no spread of copies), W8A8 only
    peer = next(ln for ln in text.splitlines() if "the blocks only (its file)" in ln).split("|")
    assert peer[2].strip() == f"{results['ptq_onnxruntime_blocks'][1]['ort AP']:.1f}"
    assert peer[3].strip() == ""


def test_one_seed_pairs_without_a_spread():
    """One seed has no spread: its difference and whether it is higher, no "± 0.0"."""
    results = {"a": {1: {"AP": 59.34}}, "b": {1: {"AP": 56.07}}, "c": {1: {"AP": 60.0}}}
    assert paired_cell(results, "a", "b", [1]) == "+3.3 (1/1 higher)"
    assert paired_cell(results, "b", "c", [1]) == "-3.9 (0/1 higher)"
    results["a"][2], results["b"][2] = {"AP": 58.0}, {"AP": 57.0}
    d = [59.34 - 56.07, 58.0 - 57.0]
    want = f"{np.mean(d):+.1f} ± {np.std(d, ddof=1):.1f} (2/2 higher)"
    assert paired_cell(results, "a", "b", [1, 2]) == want


def test_report_only_without_runs_is_an_error_and_keeps_the_report(tmp_path):
    report = tmp_path / "deployment.md"
    report.write_text("an earlier report\n")
    cmd = [sys.executable, str(ROOT / "tools/deployment_study.py"), "--arch", "vitdet"]
    cmd += ["--report-only", "--seeds", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--report-only: no finished run under {str(tmp_path)!r}" in done.stderr
    assert report.read_text() == "an earlier report\n"
