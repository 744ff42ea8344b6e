"""Studies: rows (a config plus overrides) times seeds, paired, each run trained once and
reused (:mod:`qdet.study.runner`), and their method x bit-width tables and plots
(:mod:`qdet.study.report`)."""

from qdet.study.report import (
    add_study_arguments,
    bits_tables,
    plot_vs_bits,
    shares_table,
    write_report,
)
from qdet.study.runner import (
    SHARE_PREFIX,
    Study,
    StudyRow,
    mean_std,
    paired_differences,
    spread,
    term_shares,
)

__all__ = [
    "SHARE_PREFIX",
    "Study",
    "StudyRow",
    "add_study_arguments",
    "bits_tables",
    "mean_std",
    "paired_differences",
    "plot_vs_bits",
    "shares_table",
    "spread",
    "term_shares",
    "write_report",
]
