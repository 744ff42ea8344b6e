#!/usr/bin/env python
"""Accuracy study on the embedded digits data: FP vs 4- and 3-bit, baseline vs QFD, N seeds.

    tools/accuracy_study.py --seeds 1 2 3 --out output/study

Per seed: trains the FP RetinaNet-R18 (configs/digits/retinanet_r18_fp.yaml), runs QFD's
teacher stage once (shared by the 4- and 3-bit QFD students), then fine-tunes every
quantized row from that seed's FP model. Writes ``<out>/accuracy.md`` (mean +- sample std
of COCO box AP over seeds, and each seed's AP) and ``<out>/accuracy.json``. Finished runs
are reused, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.utils.logger import setup_logger  # noqa: E402

import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.engine.stages import evaluate_final, load_config, train_with_teacher_stage  # noqa: E402

DIGITS = "configs/digits/retinanet_r18_"
ROWS = {  # name: (label, config, extra overrides)
    "fp": ("FP", DIGITS + "fp.yaml", []),
    "baseline_4bit": ("4-bit baseline", DIGITS + "4bit_baseline.yaml", []),
    "baseline_4bit_perlevel": (
        "4-bit baseline, per-level head act. quantizers",
        DIGITS + "4bit_baseline.yaml",
        ["QUANT.HEAD_PER_LEVEL_ACT", "True"],
    ),
    "qfd_4bit": ("4-bit QFD", DIGITS + "4bit_qfd.yaml", []),
    "baseline_3bit": ("3-bit baseline", DIGITS + "3bit_baseline.yaml", []),
    "qfd_3bit": ("3-bit QFD", DIGITS + "3bit_qfd.yaml", []),
}


def run_config(name: str, seed: int, out: str, extra: list[str]):
    _, path, row_opts = ROWS[name]
    seed_dir = os.path.join(out, f"seed{seed}")
    fp_weights = os.path.join(seed_dir, "fp", "model_final.pth")
    opts = ["OUTPUT_DIR", os.path.join(seed_dir, name), "SEED", str(seed), *row_opts, *extra]
    if name != "fp":
        opts += ["MODEL.WEIGHTS", fp_weights]
    if "qfd" in name:
        opts += [
            "DISTILL.TEACHER_WEIGHTS",
            fp_weights,
            "DISTILL.QUANTIZED_TEACHER_WEIGHTS",
            os.path.join(seed_dir, "teacher_stage", "model_final.pth"),
        ]
    cfg = load_config(path, opts)
    cfg.freeze()
    return cfg


def summarize(results: dict[str, dict[int, dict]]) -> list[dict]:
    rows = []
    for name, per_seed in results.items():
        seeds = sorted(per_seed)
        row = {"model": ROWS[name][0], "W/A": per_seed[seeds[0]]["W/A"]}
        for metric in ("AP", "AP50", "AP75"):
            values = [per_seed[s][metric] for s in seeds]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            row[metric] = f"{statistics.mean(values):.1f} ± {spread:.1f}"
        row["AP per seed"] = ", ".join(f"{per_seed[s]['AP']:.1f}" for s in seeds)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--out", default="output/study")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    args = parser.parse_args()
    if "fp" not in args.rows:
        args.rows.insert(0, "fp")  # every quantized row starts from its seed's FP model
    setup_logger(name="qdet")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    results: dict[str, dict[int, dict]] = {name: {} for name in args.rows}
    total = len(args.seeds) * len(args.rows)
    for i, (seed, name) in enumerate(
        # row-major: every seed of a row finishes before the next row starts
        ((s, n) for n in args.rows for s in args.seeds),
        1,
    ):
        cfg = run_config(name, seed, args.out, args.opts)
        final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        status = "reusing" if os.path.isfile(final) else f"training {cfg.SOLVER.MAX_ITER} it"
        print(
            f"[study] {i}/{total} seed {seed} {name}: {status} ({time.time() - t0:.0f} s so far)",
            flush=True,
        )
        if not os.path.isfile(final):
            train_with_teacher_stage(cfg, log=lambda m: print(f"[study]     {m}", flush=True))
        results[name][seed] = evaluate_final(cfg)
        print(f"[study]     AP {results[name][seed]['AP']:.1f}", flush=True)
    rows = summarize(results)
    table = tabulate(rows, headers="keys", tablefmt="github")
    header = (
        f"COCO box AP on qdet_digits_val, mean ± sample std over seeds {args.seeds} "
        f"({time.time() - t0:.0f} s for this invocation; `tools/accuracy_study.py "
        f"--seeds {' '.join(map(str, args.seeds))}`)\n\n"
    )
    with open(os.path.join(args.out, "accuracy.md"), "w") as f:
        f.write(header + table + "\n")
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump({n: {str(s): r for s, r in v.items()} for n, v in results.items()}, f, indent=1)
    print("\n" + header + table)


if __name__ == "__main__":
    main()
