#!/usr/bin/env python
"""Accuracy study on the embedded digits data: methods x bit widths, paired over seeds.

    tools/accuracy_study.py --seeds 1 2 3 --jobs 2           # every method, W/A 4, 3, 2
    tools/accuracy_study.py --seeds 1 --bits 4 --methods baseline qfd

Per seed: the FP RetinaNet-R18 is trained from scratch (configs/digits/retinanet_r18_fp.yaml);
every quantized row fine-tunes that seed's FP model with one schedule and sees the same
batches in the same order (SEED = the seed), and the distillation rows distil from it.
Methods: the baseline QAT, one row per registered distillation loss (``qfd``, float feature
KD ``feature_kd``, and any loss registered later), FAQD, AKT, the data-free student
(``datafree``, which never reads a training image) and its two ablations, the baseline with
``QUANT.BOUND_GRADIENT inclusive``, and EWGS (these two at ``--check-bits`` only). Writes
into ``--out``: ``accuracy.md`` (AP mean ± sample std per method and bit width, the paired
difference to the baseline with the number of seeds it wins, AP per seed),
``accuracy.json`` (every run's figures), ``ap_vs_bits.png``, ``curves.png`` (val AP
during training of FP, 4-bit baseline and 4-bit QFD on the first seed) and
``detections.png`` (those three models' detections on three val images, side by side).
Finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.utils.logger import setup_logger  # noqa: E402

import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.distill.losses import registered_losses  # noqa: E402
from qdet.engine.cli import run_cli  # noqa: E402
from qdet.predict import write_study_sheet  # noqa: E402
from qdet.study import (  # noqa: E402
    Study,
    StudyRow,
    add_study_arguments,
    bits_tables,
    plot_vs_bits,
    write_report,
)

DIGITS = "configs/digits/retinanet_r18_"
# method: (label, config, overrides). Every quantized row is the 4-bit config with its bits
# overridden, so rows of one bit width differ only in the method.
METHODS = {
    "baseline": ("baseline QAT", DIGITS + "4bit_baseline.yaml", ()),
    "qfd": ("QFD", DIGITS + "4bit_qfd.yaml", ()),
    "feature_kd": ("float feature KD", DIGITS + "4bit_qfd.yaml", ("DISTILL.LOSS", "feature_kd")),
    "inclusive": (
        "baseline, inclusive bound gradient",
        DIGITS + "4bit_baseline.yaml",
        ("QUANT.BOUND_GRADIENT", "inclusive"),
    ),
    "ewgs": ("EWGS", DIGITS + "4bit_ewgs.yaml", ()),
    # qdet's default since the study of this row (docs/benchmarks.md, "Training speed and memory"):
    # quantizers of frozen layers (FREEZE_AT) stay at calibration.
    "freeze_quantizers": (
        "baseline, frozen layers' quantizers frozen",
        DIGITS + "4bit_baseline.yaml",
        ("QUANT.FREEZE_WITH_WEIGHTS", "True"),
    ),
}
# Weights that make a term about 1/5 of the total loss at the start of the 4-bit fine-tune
# (det losses about 0.38; each term measured at weight 1 over its first 40 iterations: fa
# 0.016, ffa 0.017, rfd 1.6e-5, logit_kd 0.15, logit_mse 0.18; docs/studies.md, "Accuracy study").
# A loss not listed keeps its DISTILL.<LOSS>.WEIGHT.
STUDY_WEIGHTS = {"fa": 6.0, "ffa": 6.0, "rfd": 6000.0, "logit_kd": 0.6, "logit_mse": 0.5}
for _loss in registered_losses():  # a distillation loss is a row as soon as it is registered
    # One term with its DISTILL.<LOSS> taps and options beside the GT losses.
    _opts: tuple[str, ...] = ("DISTILL.TERMS", f"['{_loss}']")
    if _loss in STUDY_WEIGHTS:
        _opts += (f"DISTILL.{_loss.upper()}.WEIGHT", str(STUDY_WEIGHTS[_loss]))
    METHODS.setdefault(_loss, (_loss, DIGITS + "4bit_qfd.yaml", _opts))
METHODS["faqd"] = ("FAQD (FA + logit MSE)", DIGITS + "4bit_faqd.yaml", ())
METHODS["label_free"] = ("FAQD label-free", DIGITS + "4bit_faqd_label_free.yaml", ())
# AKT's recipe with the study's weights: both terms matter (at its config's RFD weight,
# (1 - alpha) beta = 500, the RFD term is about 7% of the logit term's size).
METHODS["akt"] = (
    "AKT (RFD + logit KD, label-free)",
    DIGITS + "4bit_akt.yaml",
    ("DISTILL.RFD.WEIGHT", str(STUDY_WEIGHTS["rfd"]), "DISTILL.LOGIT_KD.WEIGHT", "0.6"),
)
# Data-free (docs/methods.md, "Data-free quantization of a detector"): no real training image; the
# two ablations drop one of the generator's terms.
DATAFREE = DIGITS + "4bit_datafree.yaml"
METHODS["datafree"] = ("data-free (generator; logit KD + RFD)", DATAFREE, ())
METHODS["datafree_no_bns"] = (
    "data-free, no BN-statistics term",
    DATAFREE,
    ("ZEROSHOT.BNS_WEIGHT", "0.0"),
)
METHODS["datafree_no_task"] = ("data-free, no task term", DATAFREE, ("ZEROSHOT.TASK_WEIGHT", "0.0"))
# The control for both: the generator's weights stay at their random init (Adam at lr 0;
# its BN layers still normalise each batch), so the student sees untrained noise images.
METHODS["datafree_untrained"] = (
    "data-free, generator never trained",
    DATAFREE,
    ("ZEROSHOT.BASE_LR", "0.0"),
)
# Single-change checks: run at --check-bits only.
ONE_WIDTH = ("inclusive", "ewgs", "freeze_quantizers")
CURVES = ("fp", "baseline_4bit", "qfd_4bit")  # evaluated during training on the first seed
CURVE_EVALS = 6


def method_bits(method: str, bits: list[int], check_bits: list[int]) -> list[int]:
    return [b for b in bits if b in check_bits] if method in ONE_WIDTH else bits


# The recipe of README's tables, before a row's own overrides: the quantizers of layers
# FREEZE_AT freezes train (QUANT.FREEZE_WITH_WEIGHTS was False by default then).
RECIPE = ("QUANT.FREEZE_WITH_WEIGHTS", "False")


def study_rows(methods: list[str], bits: list[int], check_bits: list[int]) -> list[StudyRow]:
    rows = [StudyRow("fp", "FP", DIGITS + "fp.yaml")]
    for b in bits:
        for m in methods:
            if b not in method_bits(m, bits, check_bits):
                continue
            label, config, opts = METHODS[m]
            opts = (*RECIPE, *opts, "QUANT.W_BITS", str(b), "QUANT.A_BITS", str(b))
            rows.append(StudyRow(f"{m}_{b}bit", label, config, opts, f"{b}/{b}", init="fp"))
    return rows


def tables(results, methods, bits, seeds) -> str:
    """Box AP (mean ± std), paired difference to the baseline, AP per seed: markdown."""
    return bits_tables(results, {m: METHODS[m][0] for m in methods}, bits, seeds)


def plot_ap_vs_bits(results, methods, bits, seeds, path: str) -> None:
    labels = {m: METHODS[m][0] for m in methods}
    title = f"RetinaNet-R18 on digits, mean ± std over {len(seeds)} seeds"
    plot_vs_bits(results, labels, bits, seeds, path, title=title)


def ap_curve(run_dir: str) -> tuple[list[int], list[float]]:
    """(iterations, val box AP) from a run's metrics.json (its periodic evaluations)."""
    points = []
    path = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                m = json.loads(line)
                if "bbox/AP" in m:
                    points.append((m["iteration"] + 1, m["bbox/AP"]))
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(study: Study, seed: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name in CURVES:
        row = study.rows.get(name)
        if row is None:
            continue
        iters, ap = ap_curve(study.run_dir(row, seed))
        ax = axes[0] if name == "fp" else axes[1]
        ax.plot(iters, ap, marker="o", label=f"{row.label} {row.bits}".strip())
    axes[0].set_title("FP teacher, from scratch")
    axes[1].set_title("4-bit fine-tunes of it")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.set_ylabel("val box AP")
        ax.legend(fontsize=8)
    fig.suptitle(f"qdet_digits_val AP during training (seed {seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--check-bits",
        type=int,
        nargs="+",
        default=[4],
        help=f"bit widths of the single-change rows ({', '.join(ONE_WIDTH)})",
    )
    parser.add_argument(
        "--freeze-at",
        type=int,
        default=2,
        help="MODEL.BACKBONE.FREEZE_AT of every run. 2 (stem and res2 keep their random "
        "init): the recipe of the tables in README; 0: the digits configs' (not run yet)",
    )
    add_study_arguments(parser, "output/study")
    args = parser.parse_args()
    run_cli(run, args, debug=args.debug)


def run(args) -> None:
    setup_logger(name="qdet")
    methods = ["baseline", *[m for m in args.methods if m != "baseline"]]
    rows = study_rows(methods, args.bits, args.check_bits)
    first = args.seeds[0]

    def curve_opts(row: StudyRow, seed: int) -> list[str]:
        if seed != first or row.name not in CURVES:
            return []
        return ["TEST.EVAL_PERIOD", str(max(_max_iter(row, args.opts) // CURVE_EVALS, 1))]

    opts = ["MODEL.BACKBONE.FREEZE_AT", str(args.freeze_at), *args.opts]
    study = Study(
        rows, args.seeds, args.out, opts, run_opts=curve_opts, tag="study", jobs=args.jobs
    )
    start = time.time()
    results = study.run(train=not args.report_only)
    report = tables(results, methods, args.bits, args.seeds)
    text = write_report(args.out, "accuracy", time.time() - start, report, results)
    plot_ap_vs_bits(
        results, methods, args.bits, args.seeds, os.path.join(args.out, "ap_vs_bits.png")
    )
    plot_curves(study, first, os.path.join(args.out, "curves.png"))
    write_study_sheet(study, CURVES, first, os.path.join(args.out, "detections.png"))
    print("\n" + text)


def _max_iter(row: StudyRow, opts: list[str]) -> int:
    from qdet.config import load_config

    return load_config(row.config, [*row.opts, *opts]).SOLVER.MAX_ITER


if __name__ == "__main__":
    main()
