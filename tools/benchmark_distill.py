#!/usr/bin/env python
"""Distillation cost: FA vs FFA loss time and memory, and the distiller's overhead per step.

    .venv/bin/python tools/benchmark_distill.py                 # both parts, CPU (+ CUDA)
    .venv/bin/python tools/benchmark_distill.py --parts loss --max-fa-size 64
    .venv/bin/python tools/benchmark_distill.py --parts step --steps 20 SOLVER.IMS_PER_BATCH 4

1. Loss (``--parts loss``): FA (FAQD Eq. 6) against FFA (Eq. 14-15) on one tap: time and
   peak memory per size, and FA from Gram matrices (:mod:`qdet.benchmark.affinity_cost`).
2. Step (``--parts step``): the distiller's own cost per training step of the
   ``--config-file`` student beyond the teacher's forward
   (:mod:`qdet.benchmark.distill_overhead`).

Everything goes to ``--out`` (output/benchmark_distill.json) too. Trailing KEY VALUE
pairs override the step part's config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.benchmark.affinity_cost import bench_losses, print_losses  # noqa: E402
from qdet.benchmark.distill_overhead import (  # noqa: E402
    DEFAULT_CONFIG,
    bench_step,
    load_batches,
    print_step,
    step_config,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("loss", "step"), default=["loss", "step"])
    parser.add_argument(
        "--devices",
        nargs="+",
        choices=("cpu", "cuda"),
        help="default: cpu, and cuda when available (a missing cuda is skipped with a note)",
    )
    g = parser.add_argument_group("loss part (FA vs FFA)")
    g.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="H = W")
    g.add_argument("--channels", type=int, default=256)
    g.add_argument("--batch", type=int, default=2)
    g.add_argument("--k", type=int, default=15, help="FFA's random projections")
    g.add_argument("--reps", type=int, default=5, help="timed calls per loss and size")
    g.add_argument("--max-fa-size", type=int, help="skip FA above this H (a note instead)")
    g = parser.add_argument_group("step part (distiller overhead)")
    g.add_argument("--config-file", default=DEFAULT_CONFIG)
    g.add_argument("--steps", type=int, default=20, help="timed rounds (a, b, c each)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed calls (loss) / rounds (step) first"
    )
    parser.add_argument("--out", default="output/benchmark_distill.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="step config overrides KEY VALUE")
    return parser.parse_args(argv)


def devices(requested: list[str] | None) -> tuple[list[str], list[str]]:
    """The devices to run, and notes on those skipped."""
    wanted = requested or ["cpu", "cuda"]
    notes = []
    if "cuda" in wanted and not torch.cuda.is_available():
        wanted = [d for d in wanted if d != "cuda"]
        if requested:
            notes.append("cuda requested but torch.cuda.is_available() is False: skipped")
        else:
            notes.append("CUDA not available: CPU only")
    return wanted, notes


def main(argv=None) -> dict:
    args = parse_args(argv)
    run_on, notes = devices(args.devices)
    for note in notes:
        print(note)
    report: dict = {"args": vars(args), "torch": torch.__version__, "notes": notes}
    if "loss" in args.parts:
        report["loss"] = {}
        for device in run_on:
            print(f"== FA vs FFA on {device}", flush=True)
            report["loss"][device] = bench_losses(device, args)
            print_losses(report["loss"][device], args)
    if "step" in args.parts:
        report["step"] = {}
        for device in run_on:
            print(f"== distiller overhead on {device}", flush=True)
            cfg = step_config(args.config_file, args.opts, device)
            n_calib = cfg.QUANT.CALIB_BATCHES
            data = load_batches(cfg, n_calib + min(args.warmup + args.steps, 8))
            result = bench_step(cfg, data[n_calib:], data[:n_calib], args.warmup, args.steps)
            result["config_file"] = args.config_file
            report["step"][device] = result
            print_step(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
