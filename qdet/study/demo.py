"""``make demo``'s rows and figures (``tools/demo.py``): an FP RetinaNet-R18 teacher on
the digits data (configs/digits/demo_*.yaml, one seed, short schedules), the 4-bit
baseline QAT and QFD students fine-tuned from it for onnxruntime's integer kernels
(``QUANT.TARGET``), their table (:func:`demo_table`, with each model's whole-detector
file's AP and latency: :mod:`qdet.study.demo_deploy`), bar chart (:func:`plot`) and
summary (:func:`write_summary`)."""

from __future__ import annotations

import json
import os

from qdet.study.runner import Study, StudyRow

DEMO = "configs/digits/demo_"
BITS = 4
SHEET = ("fp", "baseline_4bit", "qfd_4bit")  # the models drawn side by side


def demo_rows() -> list[StudyRow]:
    rows = [StudyRow("fp", "FP teacher", DEMO + "fp.yaml")]
    for method, label in (("baseline", "baseline QAT"), ("qfd", "QFD")):
        rows.append(
            StudyRow(
                f"{method}_{BITS}bit",
                f"{BITS}-bit {label}",
                f"{DEMO}{method}.yaml",
                bits=f"{BITS}/{BITS}",
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


def demo_table(study: Study, results: dict, file_ms: dict | None = None) -> list[dict]:
    """A row per model (seed 1): W/A, box AP, AP50, AP75, weights MiB, training seconds;
    where the run shipped its model (:func:`qdet.study.demo_deploy.ship_run`), its whole
    file's box AP as the torch-free runner gets it, and with ``file_ms`` (name -> ms,
    :func:`qdet.study.demo_deploy.time_files`) the runner's median ms per picture."""
    rows = []
    for row in study.rows.values():
        m = results[row.name][1]
        table_row = {
            "model": row.label,
            "W/A": m["W/A"],
            "AP": m["AP"],
            "AP50": m["AP50"],
            "AP75": m["AP75"],
            "weights MiB": m["weights MiB"],
            "train s": m["train s"],
        }
        if "file AP" in m:
            table_row["file AP"] = m["file AP"]
        if file_ms and row.name in file_ms:
            table_row["file ms"] = file_ms[row.name]
        rows.append(table_row)
    return rows
