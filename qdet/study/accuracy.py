"""The accuracy study's rows (``tools/accuracy_study.py``): methods x bit widths on the
embedded digits data, paired over seeds, and its tables and AP-vs-bits plot.

Per seed: the FP RetinaNet-R18 is trained from scratch (configs/digits/retinanet_r18_fp.yaml);
every quantized row fine-tunes that seed's FP model with one schedule and sees the same
batches in the same order (SEED = the seed), and the distillation rows distil from it.
Methods (:data:`METHODS`): the baseline QAT, one row per registered distillation loss
(``qfd``, float feature KD ``feature_kd``, and any loss registered later), FAQD, AKT, the
data-free student (``datafree``, which never reads a training image) and its ablations,
the baseline with ``QUANT.BOUND_GRADIENT inclusive``, and EWGS (these two at the check
bit widths only, :data:`ONE_WIDTH`). The rows of :data:`CURVES` on the first seed are
evaluated during training (:func:`curve_opts`) for the curves' plot.
"""

from __future__ import annotations

from collections.abc import Callable

from qdet.config import load_config
from qdet.distill.losses import registered_losses
from qdet.study.report import bits_tables, plot_vs_bits
from qdet.study.runner import StudyRow

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


def max_iter(row: StudyRow, opts: list[str]) -> int:
    return load_config(row.config, [*row.opts, *opts]).SOLVER.MAX_ITER


def curve_opts(first: int, opts: list[str]) -> Callable[[StudyRow, int], list[str]]:
    """The study's ``run_opts``: on seed ``first``, the rows of :data:`CURVES` evaluate
    :data:`CURVE_EVALS` times during training (``opts``: the study's overrides)."""

    def run_opts(row: StudyRow, seed: int) -> list[str]:
        if seed != first or row.name not in CURVES:
            return []
        return ["TEST.EVAL_PERIOD", str(max(max_iter(row, opts) // CURVE_EVALS, 1))]

    return run_opts
