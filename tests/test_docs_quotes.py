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
from pathlib import Path

import yaml
from docs_markdown import DOCS, ROOT
from test_docs_tables import check_table, marked_tables

MODEL_ZOO = DOCS / "model_zoo.md"
CODE = re.compile(r"`[^`]*`")
FIGURE = re.compile(r"\d+\.\d+")
PAPER = re.compile(r"paper \d+\.\d+ %( / \d+\.\d+ %)*")  # the papers' own figures


def _json(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _spread(runs: dict, metric: str = "AP") -> str:
    values = [runs[s][metric] for s in sorted(runs, key=int)]
    if len(values) == 1:  # one seed: the value alone
        return f"{values[0]:.1f}"
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

    def boxmask(run: str) -> str:  # a transformer file's box / mask AP in onnxruntime
        return f"{_spread(vit[run], 'ort AP')} / {_spread(vit[run], 'ort mask AP')}"

    vit = _json("docs/deploy/vitdet/deployment.json")
    control = f"{_spread(vit['fp_finetune'])} / {_spread(vit['fp_finetune'], 'mask AP')}"
    parts = [
        f"MHA only {boxmask('baseline_ort_w4a8_mha')}",
        f"MLP only {boxmask('baseline_ort_w4a8_mlp')}",
    ]
    heads = [
        f"W8A8 {boxmask('baseline_ort_heads_w8a8')}",
        f"W4A8 {boxmask('baseline_ort_heads_w4a8')} (deployment study",
    ]
    swin = _json("docs/deploy/swin/deployment.json")

    def swin_file(run: str) -> str:  # one seed: the value alone
        return f"{_spread(swin[run], 'ort AP')} / {_spread(swin[run], 'ort mask AP')}"

    swin_parts = [
        f"MHA only {swin_file('baseline_ort_w4a8_mha')}",
        f"MLP only {swin_file('baseline_ort_w4a8_mlp')}",
    ]
    swin_heads = [
        f"W8A8 {swin_file('baseline_ort_heads_w8a8')}",
        f"W4A8 {swin_file('baseline_ort_heads_w4a8')} (Swin deployment study, seed 1)",
    ]
    digits, project = "configs/digits/", "projects/Classification/configs/digits32/"
    return {
        f"{digits}swin_tiny_w8a8_ort.yaml": [
            f"box {_spread(swin['baseline_ort_w8a8'], 'ort AP')} / mask "
            f"{_spread(swin['baseline_ort_w8a8'], 'ort mask AP')}, its file",
            f"FP control: {_spread(swin['fp_finetune'])} / "
            f"{_spread(swin['fp_finetune'], 'mask AP')})",
        ],
        f"{digits}swin_tiny_w4a8_ort.yaml": [
            f"{swin_file('baseline_ort_w4a8')} (Swin deployment study, seed 1)"
        ],
        f"{digits}swin_tiny_w8a8_heads_ort.yaml": swin_heads,
        f"{digits}swin_tiny_w4a8_heads_ort.yaml": swin_heads,
        f"{digits}swin_tiny_w4a8_mha_ort.yaml": swin_parts,
        f"{digits}swin_tiny_w4a8_mlp_ort.yaml": swin_parts,
        f"{digits}vitdet_tiny_w8a8_ort.yaml": [
            f"box {_spread(vit['baseline_ort_w8a8'], 'ort AP')} / mask "
            f"{_spread(vit['baseline_ort_w8a8'], 'ort mask AP')}, its file",
            f"FP control: {control})",
        ],
        f"{digits}vitdet_tiny_w4a8_ort.yaml": [f"{boxmask('baseline_ort_w4a8')} (deployment study"],
        f"{digits}vitdet_tiny_w8a8_heads_ort.yaml": heads,
        f"{digits}vitdet_tiny_w4a8_heads_ort.yaml": heads,
        f"{digits}vitdet_tiny_w4a8_mha_ort.yaml": parts,
        f"{digits}vitdet_tiny_w4a8_mlp_ort.yaml": parts,
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
        f"{digits}demo_baseline.yaml": [f"{demo['4-bit baseline QAT']:.1f}"],
        f"{digits}demo_qfd.yaml": [f"{demo['4-bit QFD']:.1f}"],
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


# --- The other pages' quoted figures ----------------------------------------------------
#
# Each page's figures in prose and in tables without a source marker, as the page writes
# them, computed here from the JSON the run wrote. A page's figures that no JSON records
# were removed from it or say so; see tests/README.md.


def _values(runs: dict, metric: str = "AP") -> list[float]:
    return [runs[s][metric] for s in sorted(runs, key=int)]


def _mean(runs: dict, metric: str = "AP") -> float:
    return statistics.mean(_values(runs, metric))


def _paired(runs: dict, ref: dict, metric: str = "AP", ref_metric: str | None = None) -> str:
    """mean ± std of the per-seed differences and (higher/seeds), as the pages print them."""
    seeds = sorted(set(runs) & set(ref), key=int)
    d = [runs[s][metric] - ref[s][ref_metric or metric] for s in seeds]
    wins = sum(v > 0 for v in d)
    return f"{statistics.mean(d):+.1f} ± {statistics.stdev(d):.1f} ({wins}/{len(d)}"


def _bare(paired: str) -> str:
    return paired.split(" (")[0]


def readme_quotes() -> list[str]:
    demo = _json("docs/demo/demo.json")
    sheet = demo["sheet"]
    return [
        f"{demo['seconds']:.0f} s by the demo's own count",
        f"({sheet['score']:.2f} here; it finds {sheet['recall']:.0%} of the digits there)",
    ]


def getting_started_quotes() -> list[str]:
    demo = _json("docs/demo/demo.json")
    train = {r["model"]: r["train s"] for r in demo["rows"]}
    tunes = [v for k, v in train.items() if k != "FP teacher"]
    gaps = [abs(r["file AP"] - r["AP"]) for r in demo["rows"]]
    fp_ms = demo["rows"][0]["file ms"]
    ratios = [r["file ms"] / fp_ms for r in demo["rows"][1:]]
    sheet = demo["sheet"]
    lazy = _json("docs/lazy/table8_lazy_vitdet.json")["runs"]
    box = {k: v[0]["AP"] for k, v in lazy.items()}
    mask = [v[0]["mask AP"] for k, v in lazy.items() if k != "fp"]
    spread = max(abs(box[k] - box["fp_finetune"]) for k in box if k not in ("fp", "fp_finetune"))
    return [
        f"{demo['seconds']:.0f} s by the demo's count",
        f"FP {train['FP teacher']:.0f} s of training (the dataset's build included), the two "
        f"fine-tunes {min(tunes):.0f}-{max(tunes):.0f} s each",
        f"The file's AP is PyTorch's to {max(gaps):.1f} for each model (the FP file's to "
        f"{gaps[0]:.2f}",
        f"the 4-bit files detect in about {max(ratios):.1f}x the FP32 file's time",
        f"the teacher trains 560 iterations, not 600 ({demo['rows'][0]['AP']:.1f} box AP against",
        f"score >= {sheet['score']:.2f} (FP precision {sheet['precision']:.0%}, "
        f"recall {sheet['recall']:.0%})",
        f"FP {box['fp']:.1f} box AP after 600 iterations; its 200-iteration fine-tunes FP "
        f"{box['fp_finetune']:.1f}, 8/8 {box['8bit']:.1f}, 6/6 {box['6bit']:.1f}, 4/4 "
        f"{box['4bit']:.1f}, MHA only {box['4bit_mha']:.1f}, MLP only {box['4bit_mlp']:.1f} "
        f"(mask AP {min(mask):.1f}-{max(mask):.1f})",
        f"within {spread:.1f} of the FP fine-tune",
    ]


def studies_quotes() -> list[str]:
    acc = _json("docs/study/accuracy.json")
    frozen = _json("docs/study/freeze_quantizers/accuracy.json")
    demo = {r["model"]: r["AP"] for r in _json("docs/demo/demo.json")["rows"]}
    datafree = _json("docs/datafree/ablations_4bit.json")
    rfd4 = _json("docs/classification/akt_rfd_weight_4bit.json")
    rfd3 = _json("docs/classification/akt_rfd_weight_3bit.json")
    one = _json("docs/classification/akt_one_attention_4bit.json")
    top1 = _json("docs/classification/top1.json")

    def p(method: str, bits: int, ref: str = "baseline") -> str:
        return _bare(_paired(acc[f"{method}_{bits}bit"], acc[f"{ref}_{bits}bit"]))

    def apart(a: str, b: str, bits: int) -> float:
        x, y = acc[f"{a}_{bits}bit"], acc[f"{b}_{bits}bit"]
        return max(abs(x[s]["AP"] - y[s]["AP"]) for s in x)

    def share(runs: dict) -> str:
        return f"{_mean(runs, 'share rfd'):.0%}"

    fp, two_bit = (
        _mean(acc["fp"]),
        [_mean(acc[f"{m}_2bit"]) for m in ("baseline", "qfd", "feature_kd", "fa", "ffa", "rfd")]
        + [_mean(acc["logit_kd_2bit"])],
    )
    df, base4 = datafree["datafree_4bit"], acc["baseline_4bit"]
    untrained = _values(datafree["datafree_untrained_4bit"], "train s")
    akt_pairs = [
        statistics.mean(_values(d[k], "top1")) - statistics.mean(_values(d[ref], "top1"))
        for d, ref in (
            (rfd4, "zs_logit_kd_4bit"),
            (rfd3, "zs_logit_kd_3bit"),
            (one, "zs_logit_kd_4bit"),
        )
        for k in d
        if "share rfd" in d[k]["1"]
    ]
    return [
        f"the demo's teacher then reaches {demo['FP teacher']:.1f} AP in 560 iterations",
        _bare(_paired(frozen["freeze_quantizers_4bit"], frozen["baseline_4bit"])),
        "reaches {:.1f}, {:.1f} and {:.1f} box AP".format(*_values(acc["fp"]))
        + f" on `qdet_digits_val` (seeds 1-3; {_spread(acc['fp'])})",
        f"The teacher generalises ({_spread(acc['fp'])} AP)",
        f"the baseline loses {fp - _mean(base4):.1f} AP, 3 bits lose "
        f"{fp - _mean(acc['baseline_3bit']):.1f}, 2 bits collapse "
        f"({_mean(acc['baseline_2bit']):.1f} AP)",
        f"QFD {p('qfd', 4)} and {p('qfd', 3)}, float feature KD {p('feature_kd', 4)} and "
        f"{p('feature_kd', 3)}",
        f"the inclusive bound gradient {p('inclusive', 4)} and EWGS {p('ewgs', 4)} at 4 bits",
        f"At 2 bits QFD is higher on all 3 seeds ({p('qfd', 2)}) and float KD too "
        f"({p('feature_kd', 2)})",
        f"every 2-bit student is near {_mean(acc['baseline_2bit']):.0f} AP against {fp:.0f}",
        f"`fa` {p('fa', 4)}, `ffa` {p('ffa', 4)} (FFA and exact FA within "
        f"{apart('fa', 'ffa', 4):.1f} AP",
        f"`rfd` {p('rfd', 4)}, `logit_kd` {p('logit_kd', 4)}",
        f"costs {p('akt', 4).lstrip('-')} AP at 4 bits",
        f"({_mean(acc['akt_4bit']):.1f} against {_mean(base4):.1f})",
        f"by {p('logit_kd', 2).lstrip('+')} AP** ({_mean(acc['logit_kd_2bit']):.1f} against "
        f"{_mean(acc['baseline_2bit']):.1f}; QFD {p('qfd', 2).split(' ')[0]}, float feature KD "
        f"{p('feature_kd', 2).split(' ')[0]})",
        f"`fa` and `rfd` are not ({p('fa', 2)}, {p('rfd', 2)})",
        f"At 3 bits `fa` ({p('fa', 3)}) and `rfd` ({p('rfd', 3)})",
        f"`logit_kd` is level ({p('logit_kd', 3)})",
        f"seed spread ({statistics.stdev(_values(acc['baseline_3bit'])):.1f} AP)",
        f"({p('ffa', 3)} and {p('ffa', 2)}; within {apart('fa', 'ffa', 3):.1f} and "
        f"{apart('fa', 'ffa', 2):.1f} AP of `fa`",
        f"{p('akt', 3)} AP at 3 bits ({_mean(acc['akt_3bit']):.1f}) and {p('akt', 2)} at 2 "
        f"bits, where it collapses to {_mean(acc['akt_2bit']):.1f} AP",
        f"near {min(two_bit):.0f}-{max(two_bit):.0f} AP against {fp:.0f} for FP",
        # classification
        f"official {share(rfd4['akt_official_4bit'])} at 4 bits, "
        f"{share(rfd3['akt_official_3bit'])} at 3; 1/5: {share(rfd4['akt_fifth_4bit'])} and "
        f"{share(rfd3['akt_fifth_3bit'])}",
        f"spatial official {share(one['akt_spatial_official_4bit'])}, spatial 1/5 "
        f"{share(one['akt_spatial_fifth_4bit'])}, channel official "
        f"{share(one['akt_channel_official_4bit'])}, channel 1/5 "
        f"{share(one['akt_channel_fifth_4bit'])}",
        f"(at most {max(akt_pairs):+.1f}, ",
        "seed ({:.1f}, {:.1f}, {:.1f})".format(*_values(rfd4["zs_logit_kd_4bit"], "top1")),
        f"seed 1 {rfd4['zs_logit_kd_4bit']['1']['top1']:.1f} against "
        f"{top1['zs_logit_kd_4bit']['1']['top1']:.1f}",
        # data-free
        "(seed 1's data-free run from an earlier invocation, {:.0f} s; seeds 2 and 3 two at "
        "a time, {:.0f} s and {:.0f} s".format(*_values(df, "train s")),
        f"keeps {_mean(df) / fp:.0%} of its teacher's AP ({_mean(df):.1f} of {fp:.1f}) and is "
        f"{_bare(_paired(df, base4)).lstrip('-')} AP below",
        f"label-free recipe on the real images ({_spread(acc['akt_4bit'])}, accuracy study)",
        "{:.0f}-{:.0f} s each two at a time, {:.0f} s alone".format(
            *sorted(untrained)[1:], min(untrained)
        ),
        f"({_spread(datafree['datafree_untrained_4bit'])} against {_spread(df)}; "
        f"{_bare(_paired(datafree['datafree_untrained_4bit'], df))} paired)",
        f"the {abs(statistics.mean(_values(df)) - _mean(base4)):.0f} AP between data-free",
    ]


def _export_row(bits: str, path: str) -> str:
    """A row of deployment.md's table of the seed-1 QFD exports."""
    e = _json(path)
    pt, ort, v, mib = e["eval"]["pytorch"]["AP"], e["eval"]["onnxruntime"]["AP"], e["verify"], 2**20
    sizes = [e["sizes"][k] / mib for k in ("onnx_bytes", "packed_bytes", "fp32_bytes")]
    return (
        f"| {bits} | {pt:.2f} | {ort:.2f} | {ort - pt:+.2f} | {v['head_mean_abs']:.3f} / "
        f"{v['head_max_abs']:.1f} | " + " | ".join(f"{x:.1f} MiB" for x in sizes) + " |"
    )


def deployment_quotes() -> list[str]:
    dep = _json("docs/deploy/deployment.json")
    four, three = (_json(f"docs/export/qfd_{b}bit_seed1.export.json") for b in (4, 3))
    clips = _json("docs/export/benchmark_export.json")["ops"]["qdet W4A4 (calibration only)"]
    clips = clips["network"]
    check = dep["qfd_ort_w4a4"]["1"]["check"]
    checks = [r["check"] for runs in dep.values() for r in runs.values() if "check" in r]
    ties = [c["boundary_flips"] for c in checks]
    fp, minmax = dep["fp"], dep["ptq_onnxruntime_minmax"]
    ort_runs = {k: v for k, v in dep.items() if "check" in v["1"]}
    gaps = [r["ort AP"] - r["AP"] for runs in ort_runs.values() for r in runs.values()]
    worst = min(gaps)
    row_means = [
        statistics.mean(r["ort AP"] - r["AP"] for r in v.values()) for v in ort_runs.values()
    ]

    latency = _latency_ratios()
    w4a4_cost = "{:.0f}-{:.0f}%".format(*_span(latency["w4a4 / minmax, network"], -1, 100))
    loss_w4a4_qs = _mean(dep["qfd_ort_w4a4"], "ort AP") - _mean(minmax)

    def p(run: str, ref: str, ref_metric: str = "ort AP") -> str:
        metric = "ort AP" if "ort AP" in dep[run]["1"] else "AP"
        ref_metric = ref_metric if ref_metric in dep[ref]["1"] else "AP"
        return _paired(dep[run], dep[ref], metric, ref_metric)

    same8, same4 = (
        _bare(p(f"qfd_ort_{w}", f"baseline_ort_{w}")).split(" ")[0] for w in ("w8a8", "w4a8")
    )

    def loss(run: str) -> float:
        return _mean(fp) - _mean(dep[run], "ort AP")

    return [
        f"by {four['verify']['head_mean_abs']:.2f} on average (max "
        f"{four['verify']['head_max_abs']:.1f})",
        f"{four['verify']['boundary_flips']} of "
        f"{four['verify']['activation_values'] / 1e6:.1f} million values on "
        f"{four['verify']['images']} digits images)",
        f"{four['verify']['confident_found']} of {four['verify']['confident_torch']} at 4 bits, "
        f"{three['verify']['confident_found']} of {three['verify']['confident_torch']} at 3 bits",
        _export_row("4/4", "docs/export/qfd_4bit_seed1.export.json"),
        _export_row("3/3", "docs/export/qfd_3bit_seed1.export.json"),
        f"{four['sizes']['packed_bytes'] / 2**20:.2f} MiB against "
        f"{four['sizes']['fp32_bytes'] / 2**20:.2f} MiB in FP32 "
        f"({four['sizes']['fp32_bytes'] / four['sizes']['packed_bytes']:.1f}x",
        f"the ONNX file is {four['sizes']['onnx_bytes'] / 2**20:.1f} MiB",
        f"found {check['kernels']['QLinearConv']} QLinearConv, {check['kernels']['QLinearAdd']} "
        f"QLinearAdd, {check['float_convs']} float convs; {check['boundary_flips']} of "
        f"{check['codes'] / 1e6:.1f} million codes at a tie",
        f"writes; it is the only node W4A4 adds ({clips['counts']['Clip']} Clips)",
        f"loses about {loss('ptq_qdet_w8a8_ewgs'):.0f} AP before any training",
        f"(`qdet.quantization.calib_range`) {loss('ptq_qdet_w8a8'):.1f}",
        f"compares {checks[0]['codes']:,} codes",
        f"the study's checks counted {min(ties)} to {max(ties)} ties each, at most "
        f"{max(ties) / checks[0]['codes']:.1e}".replace("e-0", "e-"),
        f"(FP: {_spread(fp)})",
        f"(`quantize_static` {_bare(_paired(minmax, fp)).split(' ')[0]} against FP, qdet's "
        f"calibration alone {_bare(p('ptq_qdet_w8a8', 'fp')).split(' ')[0]})",
        f"(baseline {_bare(p('baseline_ort_w8a8', 'ptq_onnxruntime_minmax'))}, QFD "
        f"{_bare(p('qfd_ort_w8a8', 'ptq_onnxruntime_minmax'))}, 3/3) and "
        f"{_bare(p('qfd_ort_w8a8', 'ptq_qdet_w8a8')).split(' ')[0]} over calibration",
        f"W4A8: calibration alone loses {loss('ptq_qdet_w4a8'):.1f} AP; target QAT recovers "
        f"it, {p('qfd_ort_w4a8', 'ptq_qdet_w4a8')}) over calibration",
        f"(onnxruntime minus FP: baseline {_bare(p('baseline_ort_w4a8', 'fp', 'AP'))}, QFD "
        f"{_bare(p('qfd_ort_w4a8', 'fp', 'AP'))}) and "
        f"{_bare(p('qfd_ort_w4a8', 'ptq_onnxruntime_minmax'))} over `quantize_static` W8A8",
        f"QFD {_bare(p('qfd_ort_w4a4', 'qfd_sim_w4a4', 'AP'))}, baseline "
        f"{_bare(p('baseline_ort_w4a4', 'baseline_sim_w4a4', 'AP'))} (0/3 each)",
        f"{_bare(p('baseline_ort_w4a4', 'ptq_onnxruntime_minmax'))} (baseline) and "
        f"{_bare(p('qfd_ort_w4a4', 'ptq_onnxruntime_minmax'))} (QFD)",
        f"W4A4 pays about {-statistics.mean([loss_w4a4_qs]):.0f} AP here",
        f"(its {clips['counts']['Clip']} Clips cost {w4a4_cost} of the network's time)",
        f"{p('qfd_ort_w4a4', 'baseline_ort_w4a4')}) at W4A4",
        f"at W4A4, {same8} at W8A8 and W4A8" if same8 == same4 else "W8A8 and W4A8 differ",
        f"between {min(row_means):+.1f} and {max(row_means):+.1f} AP on average per row; per "
        f"run within 0.25 AP in {sum(abs(g) < 0.25 for g in gaps)} of the {len(gaps)} target "
        f"files",
        f"and {worst:.2f} for one",
        f"({min(ties)}-{max(ties)} of {checks[0]['codes'] / 1e6:.1f} million codes",
        f"and adds {_bare(p('qfd_ort_w8a8', 'ptq_onnxruntime_minmax'))[1:4]} AP",
        f"(where calibration alone loses {loss('ptq_qdet_w4a8'):.1f} AP)",
    ]


def _span(values: list[float], shift: float = 0.0, scale: float = 1.0) -> tuple[float, float]:
    return (min(values) + shift) * scale, (max(values) + shift) * scale


def _latency_ratios() -> dict[str, list[float]]:
    """benchmark_export.json's median ratios over its four sizes and thread counts: whole
    files and network-only files; and what the post-processing costs (whole minus network:
    ms per size, % of the whole)."""
    timings = _json("docs/export/benchmark_export.json")["timings"]
    qdet = "qdet {} (calibration only)"
    peer = "quantize_static MinMax"

    def ratio(model: str, ref: str, kind: str) -> list[float]:
        return [t[model][kind]["median_ms"] / t[ref][kind]["median_ms"] for t in timings.values()]

    integer = [m for m, t in next(iter(timings.values())).items() if m != "FP32" and "whole" in t]
    everything = ["FP32", *integer]

    def post(t: dict, model: str) -> float:
        return t[model]["whole"]["median_ms"] - t[model]["network"]["median_ms"]

    def at(size: str) -> list[dict]:
        return [t for k, t in timings.items() if k.startswith(size + "@")]

    return {
        "integer / fp32": [r for m in integer for r in ratio(m, "FP32", "whole")],
        "qdet / minmax": [
            r for m in integer if m.startswith("qdet") for r in ratio(m, peer, "whole")
        ],
        "w8 w4a8 / minmax, network": ratio(qdet.format("W8A8"), peer, "network")
        + ratio(qdet.format("W4A8"), peer, "network"),
        "w4a4 / minmax, network": ratio(qdet.format("W4A4"), peer, "network"),
        **{
            f"iqr {size}": [t[m]["whole"]["iqr_ms"] for t in at(size) for m in everything]
            for size in ("160x192", "800x1344")
        },
        **{
            f"post {size}": [post(t, m) for t in at(size) for m in everything]
            for size in ("160x192", "800x1344")
        },
        **{
            f"share {size}": [
                100 * post(t, m) / t[m]["whole"]["median_ms"] for t in at(size) for m in integer
            ]
            for size in ("160x192", "800x1344")
        },
        "share fp32": [
            100 * post(t, "FP32") / t["FP32"]["whole"]["median_ms"] for t in timings.values()
        ],
    }


def benchmarks_quotes() -> list[str]:
    frozen = _json("docs/study/freeze_quantizers/accuracy.json")
    acc = _json("docs/study/accuracy.json")
    export = _json("docs/export/benchmark_export.json")
    ops = {(r["case"], r["impl"]): r for r in _ops_rows()}
    act, weight = "act signed 2x256x100x168", "weight 256x256x3x3"
    counts = export["ops"]["quantize_static MinMax"]["network"]["counts"]
    lat = _latency_ratios()
    return [
        f"seed 3 came out at {frozen['fp']['3']['AP']:.1f} here against "
        f"{acc['fp']['3']['AP']:.1f} in the study",
        f"activation qdet's compiled op reaches {ops[act, 'ours (compiled)']['GB/s']:.1f} GB/s "
        f"against the copy's {ops[act, 'copy (reference)']['GB/s']:.1f} "
        f"({ops[act, 'ours (compiled)']['GB/s / copy']:.2f}x",
        f"{ops[weight, 'ours (compiled)']['GB/s']:.0f} GB/s against "
        f"{ops[weight, 'copy (reference)']['GB/s']:.0f} "
        f"({ops[weight, 'ours (compiled)']['GB/s / copy']:.2f}x",
        f"torch.ao's fused kernel: {ops[act, 'fused']['GB/s']:.1f} GB/s on the activation",
        f"({counts['QLinearConv']} QLinearConv, {counts['QLinearAdd']} QLinearAdd, "
        f"{counts['DequantizeLinear']} DQ, {counts['QuantizeLinear']} Q, {counts['Resize']} "
        f"Resize, {counts['NhwcMaxPool']} MaxPool, {counts['Transpose']} Transpose)",
        "{:.2f}-{:.2f}x its. W4A4 adds its {} integer Clips, the price of exact 4-bit "
        "activations: {:.2f}-{:.2f}x `quantize_static`'s network".format(
            *_span(lat["w8 w4a8 / minmax, network"]),
            export["ops"]["qdet W4A4 (calibration only)"]["network"]["counts"]["Clip"],
            *_span(lat["w4a4 / minmax, network"]),
        ),
        "Every integer file detects at {:.2f}-{:.2f}x FP32's time".format(
            *_span(lat["integer / fp32"])
        ),
        "qdet's are within {:.2f}-{:.2f}x of `quantize_static`'s".format(
            *_span(lat["qdet / minmax"])
        ),
        "the IQRs are {:.1f}-{:.1f} ms at 160x192, {:.0f}-{:.0f} ms at 800x1344".format(
            *_span(lat["iqr 160x192"]), *_span(lat["iqr 800x1344"])
        ),
        "{:.1f}-{:.1f} ms at 160x192 and {:.1f}-{:.1f} ms at 800x1344".format(
            *_span(lat["post 160x192"]), *_span(lat["post 800x1344"])
        ),
        "That is {:.0f}-{:.0f}% of an integer detection at the digits' size and {:.0f}-{:.0f}% "
        "at 800x1344, against {:.0f}-{:.0f}% of an FP32 one".format(
            *_span(lat["share 160x192"]), *_span(lat["share 800x1344"]), *_span(lat["share fp32"])
        ),
        *_layer_rows(),
    ]


def _layer_rows() -> list[str]:
    """benchmarks.md's one-layer table, row by row, from benchmark_layer.json."""
    rows = _json("docs/benchmarks/benchmark_layer.json")["devices"]["cpu"]["layer"]
    labels = {
        "FP conv": "FP conv",
        "qdet compiled, code saving": "qdet, compiled, code saving (default)",
        "qdet compiled, float saving": "qdet, compiled, float saving",
        "qdet eager, code saving": "qdet, eager, code saving",
        "qdet eager, float saving": "qdet, eager, float saving",
        "brevitas": "Brevitas 0.13.4 (QuantIdentity + QuantConv2d)",
        "torch.ao fused LSQ": "torch.ao fused LSQ-style fake-quant (input and weight)",
    }
    bold = "qdet compiled, code saving"
    out = []
    for r in rows:
        ratio = f"{r['time / FP']:.2f}"
        ratio = f"**{ratio}**" if r["layer"] == bold else ratio
        out.append(f"| {labels[r['layer']]} | {ratio} | {r['saved MiB']:.1f} |")
    return out


def _ops_rows() -> list[dict]:
    return _json("docs/benchmarks/benchmark_ops_cpu.json")["devices"]["cpu"]["rows"]


def methods_quotes() -> list[str]:
    """The quantizer op's table (methods.md, "The quantizer") from benchmark_ops_cpu.json,
    and the accuracy study's EWGS and inclusive-bound rows that "EWGS" quotes."""
    rows = {(r["case"], r["impl"]): r for r in _ops_rows()}
    labels = {
        "act signed 2x256x100x168": "activation 2x256x100x168, signed",
        "act unsigned 2x256x100x168": "activation 2x256x100x168, unsigned",
        "weight 256x256x3x3": "weight 256x256x3x3",
        "weight 2048x512x1x1": "weight 2048x512x1x1",
    }
    quotes = [
        f"| {label} | {rows[case, 'ours (compiled)']['time / fused']:.2f} | "
        f"{rows[case, 'ours (compiled)']['saved / plain']:.2f} |"
        for case, label in labels.items()
    ]
    eager = [rows[c, "ours (eager)"]["time / plain"] for c in labels]
    grad = max(rows[c, "ours (compiled)"]["max |dx - plain|"] for c in labels)
    acc = _json("docs/study/accuracy.json")

    def vs_baseline(run: str) -> str:
        return f"{_paired(acc[run], acc['baseline_4bit'])} seeds higher) AP against the"

    return quotes + [
        f"accuracy study's EWGS row ([studies.md](studies.md#accuracy-study)): "
        f"{vs_baseline('ewgs_4bit')}",
        f"[studies.md](studies.md#accuracy-study)): {vs_baseline('inclusive_4bit')}",
        f"within {grad:.0e} in gradient".replace("e-0", "e-"),
        "the eager fallback takes {:.1f}-{:.1f}x the plain composition's time".format(
            *_span(eager)
        ),
    ]


def _pair(runs: dict, ref: dict, metric: str = "top1") -> tuple[str, int, int]:
    """(mean ± std of the per-seed differences, seeds higher, seeds)."""
    p = _paired(runs, ref, metric)
    wins, n = p.split(" (")[1].split("/")
    return _bare(p), int(wins), int(n)


def _solver(path: Path) -> dict:
    """A yacs config's SOLVER keys, its _BASE_ chain merged."""
    cfg = yaml.safe_load(path.read_text())
    base = _solver(path.parent / cfg["_BASE_"]) if "_BASE_" in cfg else {}
    return {**base, **cfg.get("SOLVER", {})}


def _epochs(config: str) -> float:
    """Epochs of the 20000 crops one run of a digits32 config trains (the study's count)."""
    solver = _solver(ROOT / "projects/Classification/configs/digits32" / config)
    return solver["MAX_ITER"] * solver["IMS_PER_BATCH"] / 20000


def classification_quotes() -> list[str]:
    """projects/Classification/README.md's prose, from the classification study's JSON."""
    top1 = _json("docs/classification/top1.json")
    rfd4 = _json("docs/classification/akt_rfd_weight_4bit.json")
    rfd3 = _json("docs/classification/akt_rfd_weight_3bit.json")
    one = _json("docs/classification/akt_one_attention_4bit.json")

    def s(runs: dict) -> str:
        return _spread(runs, "top1")

    def m(run: str) -> float:
        return _mean(top1[run], "top1")

    def p(run: str, ref: str) -> str:
        return _bare(_paired(top1[run], top1[ref], "top1"))

    def secs(*runs: str) -> str:
        t = [v for r in runs for v in _values(top1[r], "train s")]
        return f"{min(t):.0f}-{max(t):.0f} s"

    def share(runs: dict) -> str:
        return f"{_mean(runs, 'share rfd'):.0%}"

    def akt(d: dict, run: str, ref: str, long: bool) -> str:
        diff, wins, n = _pair(d[run], d[ref])
        higher = f"higher on {wins} of {n} seeds" if long else f"{wins} of {n}"
        return f"{s(d[run])} ({diff}, {higher}"

    def one_row(run: str, how: str) -> str:
        diff, wins, n = _pair(one[run], one["zs_logit_kd_4bit"])
        return f"{s(one[run])} ({how}, {diff}, {wins}/{n}"

    per_epoch = {
        k: [v / _epochs(c) for v in _values(top1[k], "train s")]
        for k, c in (
            ("faqd_4bit", "faqd_table6_resnet20_w4a4_finetune.yaml"),
            ("faqd_2bit", "faqd_table6_resnet20_w4a4_finetune.yaml"),
            ("ffa_4bit", "faqd_table7_resnet20_w4a4_ffa.yaml"),
            ("ffa_2bit", "faqd_table7_resnet20_w4a4_ffa.yaml"),
        )
    }
    fa_ffa = [
        statistics.mean(per_epoch[f"faqd_{b}bit"]) / statistics.mean(per_epoch[f"ffa_{b}bit"])
        for b in (4, 2)
    ]

    def epoch(run: str) -> str:
        v = per_epoch[run]
        return f"{statistics.mean(v):.0f} ± {statistics.stdev(v):.0f}"

    real4 = ["qfd_4bit", "baseline_qrelu_4bit", "faqd_4bit", "faqd_label_free_4bit", "ffa_4bit"]
    base4, fp = m("baseline_4bit"), m("fp")
    qfd2, qfd2_wins, _ = _pair(top1["qfd_2bit"], top1["baseline_2bit"])
    faqd2 = _paired(top1["faqd_2bit"], top1["baseline_qrelu_2bit"], "top1")
    ffa_fa = [
        top1["ffa_2bit"][k]["top1"] - top1["faqd_2bit"][k]["top1"]
        for k in sorted(top1["ffa_2bit"], key=int)
    ]
    spatial, channel = (p(f"akt_{a}_4bit", "zs_logit_kd_4bit") for a in ("spatial", "channel"))
    one_attention = (
        f"spatial only and channel only {spatial}"
        if spatial == channel
        else f"spatial only {spatial}, channel only {channel}"
    )
    seed1 = rfd3["akt_official_3bit"]["1"]["top1"] - rfd3["zs_logit_kd_3bit"]["1"]["top1"]
    return [
        f"single runs took {secs('baseline_4bit')} for the 4-bit baseline, "
        f"{secs('faqd_4bit', 'faqd_label_free_4bit')} for FA, "
        f"{secs('zs_logit_kd_3bit', 'akt_3bit', 'akt_spatial_4bit', 'akt_channel_4bit')} for "
        "a zero-shot run",
        f"FA vs FFA: {epoch('faqd_4bit')} vs {epoch('ffa_4bit')} at 4 bits, "
        f"{epoch('faqd_2bit')} vs {epoch('ffa_2bit')} at 2 bits",
        f"a rough ratio, {min(fa_ffa):.1f}-{max(fa_ffa):.1f}x",
        f"every real-data row is within {max(abs(m(r) - base4) for r in real4):.1f} of the "
        f"baseline's {base4:.1f} (FP {fp:.1f}; the baseline is {fp - base4:.1f} below FP)",
        f"(e.g. FFA {p('ffa_4bit', 'baseline_qrelu_4bit')} on "
        f"{_pair(top1['ffa_4bit'], top1['baseline_qrelu_4bit'])[1]}/3 seeds, FAQD "
        f"{p('faqd_4bit', 'baseline_qrelu_4bit')} on "
        f"{_pair(top1['faqd_4bit'], top1['baseline_qrelu_4bit'])[1]}/3)",
        f"at 2 bits with labels it does, {faqd2} seeds higher) over the same quantized-ReLU",
        f"it matches that baseline ({p('faqd_label_free_2bit', 'baseline_qrelu_2bit')})",
        f"FFA gives {p('ffa_2bit', 'baseline_qrelu_2bit')} against FA's "
        f"{p('faqd_2bit', 'baseline_qrelu_2bit')} at 2 bits",
        "(FFA - FA per seed: " + ", ".join(f"{d:.2f}" for d in ffa_fa) + ")",
        "each epoch took {:.0f}-{:.0f}% of FA's time".format(*sorted(100 / r for r in fa_ffa)),
        f"costs the 2-bit baseline {m('baseline_2bit') - m('baseline_qrelu_2bit'):.1f} points "
        f"here ({m('baseline_qrelu_2bit'):.1f} against {m('baseline_2bit'):.1f}",
        f"costs nothing measurable ({m('baseline_qrelu_4bit'):.1f} vs {base4:.1f})",
        f"the student is {qfd2.lstrip('-')} below the plain 2-bit baseline ("
        + ("lower on all three seeds" if qfd2_wins == 0 else f"higher on {qfd2_wins}")
        + f"), and {p('qfd_4bit', 'baseline_4bit').lstrip('-')} below at 4 bits",
        f"({p('akt_4bit', 'zs_logit_kd_4bit')} at 4 bits, {p('akt_3bit', 'zs_logit_kd_3bit')} "
        f"at 3 bits; {one_attention};",
        f"RFD {share(rfd4['akt_official_4bit'])} of the loss over the run",
        f"19600, RFD {share(rfd4['akt_fifth_4bit'])})",
        f"logit KD alone {s(rfd4['zs_logit_kd_4bit'])}, AKT official "
        f"{akt(rfd4, 'akt_official_4bit', 'zs_logit_kd_4bit', True)}), AKT at a fifth "
        f"{akt(rfd4, 'akt_fifth_4bit', 'zs_logit_kd_4bit', False)})",
        f"seed 1 is {rfd4['zs_logit_kd_4bit']['1']['top1']:.1f} here, "
        f"{top1['zs_logit_kd_4bit']['1']['top1']:.1f} there",
        f"logit KD alone {s(rfd3['zs_logit_kd_3bit'])}, AKT official "
        f"{akt(rfd3, 'akt_official_3bit', 'zs_logit_kd_3bit', True)}; RFD "
        f"{share(rfd3['akt_official_3bit'])} of the loss), AKT at a fifth "
        f"{akt(rfd3, 'akt_fifth_3bit', 'zs_logit_kd_3bit', False)}; RFD "
        f"{share(rfd3['akt_fifth_3bit'])})",
        f"(seed 1, the weak one, gains {seed1:.1f})",
        f"spatial only {one_row('akt_spatial_official_4bit', 'official')}; RFD "
        f"{share(one['akt_spatial_official_4bit'])}) and "
        f"{one_row('akt_spatial_fifth_4bit', 'a fifth')}), channel only "
        f"{one_row('akt_channel_official_4bit', 'official')}; RFD "
        f"{share(one['akt_channel_official_4bit'])}) and "
        f"{one_row('akt_channel_fifth_4bit', 'a fifth')}), against logit KD alone "
        f"{s(one['zs_logit_kd_4bit'])}",
        f"reach {s(top1['zs_logit_kd_4bit'])} at 4 bits and {s(top1['zs_logit_kd_3bit'])} at 3 "
        f"bits in the earlier run (FP {fp:.1f})",
    ]


PAGE_QUOTES = {
    "README.md": readme_quotes,
    "docs/getting_started.md": getting_started_quotes,
    "docs/studies.md": studies_quotes,
    "docs/deployment.md": deployment_quotes,
    "docs/benchmarks.md": benchmarks_quotes,
    "docs/methods.md": methods_quotes,
    "projects/Classification/README.md": classification_quotes,
}


def flat(text: str) -> str:
    return " ".join(text.split())  # line breaks anywhere


def missing_quotes(text: str, quotes: list[str]) -> list[str]:
    return [q for q in quotes if q not in flat(text)]


def test_pages_quote_their_json_figures():
    problems = {}
    for page, quotes in PAGE_QUOTES.items():
        missing = missing_quotes((ROOT / page).read_text(), quotes())
        if missing:
            problems[page] = missing
    assert not problems
    assert sum(len(q()) for q in PAGE_QUOTES.values()) >= 80


FIRST_FIGURE = re.compile(r"\d+\.\d+|\d+")


def test_page_quote_check_catches_a_changed_figure():
    """On every page, each quote with its first figure changed is caught."""
    for page, make in PAGE_QUOTES.items():
        quotes, text = make(), flat((ROOT / page).read_text())
        for quote in quotes:
            m = FIRST_FIGURE.search(quote)
            assert m, f"{page}: {quote!r} holds no figure"
            digit = str((int(m.group()[-1]) + 1) % 10)
            wrong = quote[: m.end() - 1] + digit + quote[m.end() :]
            broken = text.replace(quote, wrong)
            assert broken != text, f"{page}: {quote!r} is not in the page"
            assert quote in missing_quotes(broken, quotes), f"{page}: a changed {quote!r} passed"


# --- The project READMEs' marked tables -------------------------------------------------
#
# test_docs_tables.py reads README.md and docs/*.md; the project READMEs' tables marked
# ``<!-- source: ... -->`` are checked here with its checker.

PROJECT_READMES = sorted(ROOT.glob("projects/*/README.md"))


def test_project_readme_tables_are_the_json_figures():
    problems, checked = [], 0
    for f in PROJECT_READMES:
        for sources, rows in marked_tables(f.read_text()):
            found, n = check_table(sources, rows)
            problems += [f"{f.relative_to(ROOT)} ({sources[0]}): {p}" for p in found]
            checked += n
    assert not problems, "\n".join(problems)
    assert checked >= 30  # the classification study's table (31 cells)


def test_project_readme_table_check_catches_a_changed_figure():
    text = (ROOT / "projects/Classification/README.md").read_text()
    sources, rows = next(
        (s, r) for s, r in marked_tables(text) if s[0] == "docs/classification/top1.json"
    )
    assert check_table(sources, rows)[0] == []
    old, new = "+1.1 ± 0.2 (3/3)", "+1.1 ± 0.2 (2/3)"
    changed = [[new if c == old else c for c in row] for row in rows]
    assert changed != rows and check_table(sources, changed)[0]
