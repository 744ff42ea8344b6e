"""A study's method x bit-width tables and plot (markdown, PNG), for any metric: the
detection study's box AP, the classification study's top-1.

Runs are named ``fp`` and ``<method>_<b>bit``; ``results`` is :meth:`Study.run`'s
(row -> seed -> metrics). Each method is compared, seed by seed, with its reference method
at the same bit width (default ``baseline``; a method that is a reference says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence

from tabulate import tabulate

from qdet.study.runner import SHARE_PREFIX, Study, mean_std, paired_differences, spread


def _values(runs: dict, seeds, metric: str) -> list[float]:
    """The metric of the seeds that finished (all of them, unless a report-only run)."""
    return [runs[s][metric] for s in seeds if s in runs]


def _per_seed(runs: dict, seeds, metric: str) -> str:
    return ", ".join(f"{runs[s][metric]:.1f}" if s in runs else "-" for s in seeds)


def bits_tables(
    results: dict,
    labels: Mapping[str, str],
    bits: Sequence[int],
    seeds: Sequence[int],
    metric: str = "AP",
    what: str = "COCO box AP on qdet_digits_val",
    references: Mapping[str, str] | None = None,
) -> str:
    """``metric`` (mean ± std), paired difference to the reference, per seed: markdown.
    ``labels``: method -> its name in the tables, in order; ``references``: method -> the
    method it is compared with (default ``baseline``)."""
    references = references or {}
    reference_of = {m: references.get(m, "baseline") for m in labels}
    fp = _values(results["fp"], seeds, metric) if "fp" in results else []
    top = [["FP", spread(fp) if fp else ""] + [""] * len(bits)]
    per_seed = [["FP", _per_seed(results.get("fp", {}), seeds, metric)] + [""] * len(bits)]
    diff = []
    for m, label in labels.items():
        top_row, diff_row, seed_row = [label, ""], [label], [label, ""]
        if reference_of[m] != "baseline" and m not in reference_of.values():
            diff_row = [f"{label} (vs {labels.get(reference_of[m], reference_of[m])})"]
        for b in bits:
            runs = results.get(f"{m}_{b}bit")
            if not runs:  # not run at this width, or none finished
                top_row.append("")
                diff_row.append("")
                seed_row.append("")
                continue
            top_row.append(spread(_values(runs, seeds, metric)))
            seed_row.append(_per_seed(runs, seeds, metric))
            if m in reference_of.values():
                diff_row.append("(reference)")
                continue
            base = f"{reference_of[m]}_{b}bit"
            d = paired_differences(results, f"{m}_{b}bit", base, metric) if base in results else {}
            if not d:
                diff_row.append("")
                continue
            mean, std = mean_std(list(d.values()))
            wins = sum(v > 0 for v in d.values())
            diff_row.append(f"{mean:+.1f} ± {std:.1f} ({wins}/{len(d)} seeds better)")
        top.append(top_row)
        diff.append(diff_row)
        per_seed.append(seed_row)
    heads = [f"W/A {b}/{b}" for b in bits]
    shares = shares_table(results, labels, bits, seeds)
    named = sorted({labels.get(r, r) for m, r in reference_of.items() if r != "baseline"})
    against = "the baseline" + (f" (or {', '.join(named)}, where so marked)" if named else "")
    return "\n\n".join(
        [
            f"{what}, mean ± sample std over seeds {', '.join(map(str, seeds))}:",
            tabulate(top, ["method", "FP 32/32", *heads], tablefmt="github"),
            f"Paired difference to {against} of the same bit width (same FP model and "
            "batches per seed), mean ± sample std, and on how many seeds the method is "
            "higher:",
            tabulate(diff, ["method", *heads], tablefmt="github"),
            f"{what.split(' on ')[0]} per seed:",
            tabulate(per_seed, ["method", "FP 32/32", *heads], tablefmt="github"),
            *shares,
        ]
    )


def _percent(share: float) -> str:
    """A share of the loss as a percentage: two significant digits below 10%, whole
    percents above (``0.63%``, ``19%``, ``100%``)."""
    return f"{100 * share:.2g}%" if share < 0.1 else f"{100 * share:.0f}%"


def shares_table(
    results: dict, labels: Mapping[str, str], bits: Sequence[int], seeds: Sequence[int]
) -> list[str]:
    """How much each distillation term weighed: its share of the training loss (the log's
    ``distill_ratio/<term>``, mean over the run, then over seeds) per method and width, as
    [heading, table]; [] when no run distilled."""
    rows = []
    for m, label in labels.items():
        row, any_share = [label], False
        for b in bits:
            runs = results.get(f"{m}_{b}bit", {})
            terms = sorted(
                {k for s in seeds if s in runs for k in runs[s] if k.startswith(SHARE_PREFIX)}
            )
            cell = []
            for key in terms:
                values = [runs[s][key] for s in seeds if s in runs and key in runs[s]]
                cell.append(f"{key.removeprefix(SHARE_PREFIX)} {_percent(mean_std(values)[0])}")
            any_share |= bool(cell)
            row.append(", ".join(cell))
        if any_share:
            rows.append(row)
    if not rows:
        return []
    heads = [f"W/A {b}/{b}" for b in bits]
    return [
        "Share of each distillation term in the training loss (the log's "
        "`distill_ratio/<term>`, mean over the run and the seeds):",
        tabulate(rows, ["method", *heads], tablefmt="github"),
    ]


def plot_vs_bits(
    results: dict,
    labels: Mapping[str, str],
    bits: Sequence[int],
    seeds: Sequence[int],
    path: str,
    metric: str = "AP",
    ylabel: str = "box AP (qdet_digits_val)",
    title: str = "",
) -> None:
    """``metric`` against W/A bits per method, error bars = sample std over seeds; the FP
    model's mean as a dashed line with its std as a band. No line across a width not run."""
    import matplotlib  # when plotting only: slow to import; Agg chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if results.get("fp"):
        fp_mean, fp_std = mean_std(_values(results["fp"], seeds, metric))
        ax.axhline(fp_mean, color="black", linestyle="--", label=f"FP ({fp_mean:.1f})")
        ax.axhspan(fp_mean - fp_std, fp_mean + fp_std, color="black", alpha=0.08)
    xs = sorted(bits)
    for i, (m, label) in enumerate(labels.items()):
        xm = [b for b in xs if results.get(f"{m}_{b}bit")]
        stats = [mean_std(_values(results[f"{m}_{b}bit"], seeds, metric)) for b in xm]
        offset = (i - (len(labels) - 1) / 2) * 0.06  # keep error bars apart
        ax.errorbar(
            [x + offset for x in xm],
            [v for v, _ in stats],
            yerr=[e for _, e in stats],
            marker="o",
            capsize=3,
            linestyle="-" if xm == xs else "none",
            label=label,
        )
    ax.set_xticks(xs, [f"{b}/{b}" for b in xs])
    ax.set_xlabel("W/A bits")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"mean ± std over {len(seeds)} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def plot_curves(study: Study, names: Sequence[str], seed: int, path: str) -> None:
    """Val box AP during training of the rows ``names`` on ``seed``: the FP row (``fp``,
    from scratch) left, its fine-tunes right."""
    import matplotlib  # when plotting only: slow to import; Agg chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name in names:
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


def add_study_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """What every study tool takes beside its rows: seeds, output folder, parallel runs,
    report-only, --debug, and KEY VALUE overrides for every run (added last)."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", default=out)
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once (2 on a 2-core CPU)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="tables and plots of the finished runs only"
    )
    parser.add_argument("--debug", action="store_true", help="tracebacks for bad input")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, every run")


def write_report(out: str, stem: str, seconds: float, report: str, results: dict) -> str:
    """``<stem>.md`` (the command line, its time, ``report``) and ``<stem>.json`` (every
    run's figures) in ``out``; returns the markdown."""
    os.makedirs(out, exist_ok=True)
    command = " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    text = f"`{command}` ({seconds:.0f} s for this invocation)\n\n{report}"
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump({n: {str(s): r for s, r in v.items()} for n, v in results.items()}, f, indent=1)
    return text
