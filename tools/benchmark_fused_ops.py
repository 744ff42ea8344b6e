#!/usr/bin/env python
"""Does onnxruntime's fused integer op (QLinearSoftmax, QLinearAdd, QLinearMul) beat the
float op it would replace, at ViTDet-B's and Swin-B's shapes? Each op in two small graphs
timed side by side (:mod:`qdet.benchmark.fused_ops`); table and JSON in ``--out``
(``benchmark_fused_ops.md`` / ``.json``).

    .venv/bin/python tools/benchmark_fused_ops.py --threads 1 2 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qdet.benchmark.fused_ops import fused_ops_table, measure_fused_ops  # noqa: E402
from qdet.benchmark.machine import machine  # noqa: E402
from qdet.engine.cli import run_cli  # noqa: E402


def main(args) -> dict:
    result = {
        "machine": machine("cpu"),
        **measure_fused_ops(args.threads, args.repeats, args.warmup),
    }
    text = fused_ops_table(result)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    for suffix, content in ((".json", json.dumps(result, indent=1)), (".md", text + "\n")):
        with open(os.path.join(args.out, "benchmark_fused_ops" + suffix), "w") as f:
            f.write(content)
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="output/benchmark_export")
    p.add_argument("--debug", action="store_true")
    parsed = p.parse_args()
    run_cli(main, parsed, debug=parsed.debug)
