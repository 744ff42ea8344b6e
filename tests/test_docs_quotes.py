"""Docs that cannot rot, quoted figures: every figure in docs/model_zoo.md's "measured"
columns is computed here from the JSON its study wrote (mean ± sample std over seeds, as
the studies' tables print them), and a cell holds no figure that is not one of them.

``quote_problems`` returns the problems of one page's text;
``test_quote_check_catches_a_changed_figure`` changes a figure and adds one, and requires
a problem for each, so the check cannot pass vacuously.
"""

from __future__ import annotations

import json
import re
import statistics

from docs_markdown import DOCS, ROOT

MODEL_ZOO = DOCS / "model_zoo.md"
CODE = re.compile(r"`[^`]*`")
FIGURE = re.compile(r"\d+\.\d+")
PAPER = re.compile(r"paper \d+\.\d+ %( / \d+\.\d+ %)*")  # the papers' own figures


def _json(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _spread(runs: dict, metric: str = "AP") -> str:
    values = [runs[s][metric] for s in sorted(runs, key=int)]
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def expected_quotes() -> dict[str, list[str]]:
    """config -> the strings its "measured" cell must hold, from the studies' JSON."""
    acc = _json("docs/study/accuracy.json")
    dep = _json("docs/deploy/deployment.json")
    datafree = _json("docs/datafree/ablations_4bit.json")
    top1 = _json("docs/classification/top1.json")
    demo = {(r["model"]): r["AP"] for r in _json("docs/demo/demo.json")["rows"]}

    def ort(run: str) -> str:
        return f"{_spread(dep[run])} / {_spread(dep[run], 'ort AP')}"

    def cls(run: str, low: str = "2bit", label: str = "W2/A2") -> str:
        four, other = top1[f"{run}_4bit"], top1[f"{run}_{low}"]
        return f"{_spread(four, 'top1')}; {label} {_spread(other, 'top1')}"

    digits, project = "configs/digits/", "projects/Classification/configs/digits32/"
    return {
        f"{digits}retinanet_r18_fp.yaml": [
            f"{_spread(acc['fp'])} (accuracy study",
            f"{_spread(dep['fp'])} (deployment study",
        ],
        f"{digits}retinanet_r18_4bit_baseline.yaml": [
            f"{_spread(acc['baseline_4bit'])} (accuracy study",
            f"at W2/A2: {_spread(acc['baseline_2bit'])}",
        ],
        f"{digits}retinanet_r18_3bit_baseline.yaml": [f"{_spread(acc['baseline_3bit'])} ("],
        f"{digits}retinanet_r18_4bit_qfd.yaml": [
            f"{_spread(acc['qfd_4bit'])} (accuracy study",
            f"at W2/A2: {_spread(acc['qfd_2bit'])}",
        ],
        f"{digits}retinanet_r18_3bit_qfd.yaml": [f"{_spread(acc['qfd_3bit'])} ("],
        f"{digits}retinanet_r18_4bit_ewgs.yaml": [f"{_spread(acc['ewgs_4bit'])} ("],
        f"{digits}retinanet_r18_4bit_akt.yaml": [f"{_spread(acc['akt_4bit'])} (accuracy study"],
        f"{digits}retinanet_r18_4bit_datafree.yaml": [f"{_spread(datafree['datafree_4bit'])} ("],
        f"{digits}retinanet_r18_4bit_baseline_ort.yaml": [
            f"{_spread(dep['baseline_ort_w4a4'])} PyTorch / "
            f"{_spread(dep['baseline_ort_w4a4'], 'ort AP')} onnxruntime"
        ],
        f"{digits}retinanet_r18_4bit_qfd_ort.yaml": [ort("qfd_ort_w4a4")],
        f"{digits}retinanet_r18_w4a8_qfd_ort.yaml": [ort("qfd_ort_w4a8")],
        f"{digits}retinanet_r18_w8a8_baseline_ort.yaml": [ort("baseline_ort_w8a8")],
        f"{digits}demo_fp.yaml": [f"{demo['FP teacher']:.1f}"],
        f"{digits}demo_baseline.yaml": [
            f"{demo['4-bit baseline QAT']:.1f} (4 bits), {demo['2-bit baseline QAT']:.1f} (2 bits)"
        ],
        f"{digits}demo_qfd.yaml": [
            f"{demo['4-bit QFD']:.1f} (4 bits), {demo['2-bit QFD']:.1f} (2 bits)"
        ],
        f"{project}resnet20_fp.yaml": [_spread(top1["fp"], "top1")],
        f"{project}resnet20_4bit_baseline.yaml": [
            cls("baseline"),
            f"{_spread(top1['baseline_qrelu_4bit'], 'top1')}, "
            f"{_spread(top1['baseline_qrelu_2bit'], 'top1')}",
        ],
        f"{project}qfd_table2_resnet20_w4a4.yaml": [cls("qfd")],
        f"{project}faqd_table6_resnet20_w4a4_finetune.yaml": [cls("faqd")],
        f"{project}faqd_eq11_resnet20_w4a4_label_free.yaml": [cls("faqd_label_free")],
        f"{project}faqd_table7_resnet20_w4a4_ffa.yaml": [cls("ffa")],
        f"{project}akt_table2_resnet20_w4a4_zeroshot.yaml": [cls("akt", "3bit", "W3/A3")],
        f"{project}akt_table4_resnet20_w4a4_zeroshot_no_rfd.yaml": [
            cls("zs_logit_kd", "3bit", "W3/A3")
        ],
    }


def measured_cells(text: str) -> dict[str, str]:
    """config -> its "measured" cell, for every table whose last header starts so."""
    cells, measured = {}, False
    for line in text.split("\n"):
        if not line.startswith("|"):
            measured = False
            continue
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if row[0] == "config":
            measured = row[-1].startswith("measured")
        elif measured and row[0].startswith("`"):
            for config in CODE.findall(row[0]):
                cells[config.strip("`")] = row[-1]
    return cells


def quote_problems(text: str, quotes: dict[str, list[str]]) -> list[str]:
    """Each config's expected strings in its cell, and no other figure there (code spans
    and the papers' own figures aside)."""
    problems, cells = [], measured_cells(text)
    for config, cell in cells.items():
        wanted = quotes.get(config, [])
        problems += [f"{config}: {q!r} missing from {cell!r}" for q in wanted if q not in cell]
        allowed = set(FIGURE.findall(" ".join(wanted)))
        plain = PAPER.sub("", CODE.sub("", cell))
        extra = [f for f in FIGURE.findall(plain) if f not in allowed]
        if extra:
            problems.append(f"{config}: figures with no JSON source {extra} in {cell!r}")
    problems += [f"{c}: no measured cell" for c in quotes if c not in cells]
    return problems


def test_model_zoo_figures_are_the_studies_json():
    quotes = expected_quotes()
    assert not quote_problems(MODEL_ZOO.read_text(), quotes)
    assert sum(len(q) for q in quotes.values()) >= 27  # every quote above was found


def test_quote_check_catches_a_changed_figure():
    text, quotes = MODEL_ZOO.read_text(), expected_quotes()
    first = quotes["configs/digits/retinanet_r18_4bit_qfd.yaml"][0].split(" (")[0]
    mean, spread = first.split(" ± ")
    changed = text.replace(first, f"{float(mean) + 0.1:.1f} ± {spread}", 1)
    assert changed != text and quote_problems(changed, quotes)
    added = text.replace("| not measured |", "| not measured; 61.2 on one seed |", 1)
    assert added != text and any(
        "no JSON source ['61.2']" in p for p in quote_problems(added, quotes)
    )
