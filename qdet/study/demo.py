"""``make demo``'s rows and figures (``tools/demo.py``): an FP RetinaNet-R18 teacher on
the digits data (configs/digits/demo_*.yaml, one seed, short schedules), the 4-bit and
low-bit baseline QAT and QFD students fine-tuned from it, their table
(:func:`demo_table`), bar chart (:func:`plot`) and summary (:func:`write_summary`)."""

from __future__ import annotations

import json
import os

from qdet.study.runner import Study, StudyRow

DEMO = "configs/digits/demo_"
LOW_BITS = 2  # where the study's methods differ most (docs/studies.md, "Accuracy study")
SHEET = ("fp", "baseline_4bit", "qfd_4bit")  # the models drawn side by side


def demo_rows() -> list[StudyRow]:
    rows = [StudyRow("fp", "FP teacher", DEMO + "fp.yaml")]
    for bits in (4, LOW_BITS):
        opts = ("QUANT.W_BITS", str(bits), "QUANT.A_BITS", str(bits))
        for method, label in (("baseline", "baseline QAT"), ("qfd", "QFD")):
            rows.append(
                StudyRow(
                    f"{method}_{bits}bit",
                    f"{bits}-bit {label}",
                    f"{DEMO}{method}.yaml",
                    opts,
                    f"{bits}/{bits}",
                    init="fp",
                )
            )
    return rows


def plot(rows: list[dict], path: str) -> None:
    """The table's box AP as bars, one per model."""
    import matplotlib  # when plotting only: slow to import; Agg chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    colors = ["black"] + ["tab:blue", "tab:orange"] * ((len(rows) - 1) // 2)
    bars = ax.bar(range(len(rows)), [r["AP"] for r in rows], color=colors)
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("box AP (qdet_digits_val)")
    ax.set_title("make demo: one seed, short schedules")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(rows: list[dict], sheet, seconds: float, path: str) -> None:
    """The table, the sheet's threshold and images, and the wall time: the demo's figures
    as README quotes them (docs/demo/demo.json is a copy of one run's)."""
    summary = {"rows": rows, "seconds": round(seconds, 1)}
    if sheet:
        t = sheet.threshold
        summary["sheet"] = {
            "score": sheet.score,
            "precision": t.precision if t else None,
            "recall": t.recall if t else None,
            "images": [os.path.basename(f) for f in sheet.files],
        }
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)


def demo_table(study: Study, results: dict) -> list[dict]:
    """A row per model (seed 1): W/A, box AP, AP50, AP75, weights MiB, training seconds."""
    rows = []
    for row in study.rows.values():
        m = results[row.name][1]
        rows.append(
            {
                "model": row.label,
                "W/A": m["W/A"],
                "AP": m["AP"],
                "AP50": m["AP50"],
                "AP75": m["AP75"],
                "weights MiB": m["weights MiB"],
                "train s": m["train s"],
            }
        )
    return rows
