"""Benchmark qdet's uniform fake-quantization op (the op behind ``UniformQuantizer``).

One training step (forward + backward) of qdet's op, compiled and eager, against the
plain autograd composition and PyTorch's fused LSQ kernel, then one quantized conv layer
against the FP conv, Brevitas and torch.ao: median time, bytes saved for backward (and on
CUDA the allocator's peak and the bandwidth against a copy), and the targets. What is
measured and how: :mod:`qdet.benchmark.quantizer_speed`. Every number goes to ``--json``.

    .venv/bin/python tools/benchmark_quantizer.py --device cpu --repeats 5
    .venv/bin/python tools/benchmark_quantizer.py --device all --json output/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)
import torch

# This checkout's qdet, not whichever one is installed (as tools/benchmark_train.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qdet.benchmark.peers import brevitas_version  # noqa: E402
from qdet.benchmark.quantizer_speed import bench_device  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    p.add_argument("--repeats", type=int, help="timed steps per case (default 10 CPU, 50 CUDA)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument(
        "--section",
        choices=("all", "ops", "layer"),
        default="all",
        help="the quantizer op alone, one quantized conv layer, or both",
    )
    p.add_argument("--json", default="output/benchmark_quantizer.json")
    args = p.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        print("CUDA is not available: skipping it")
        devices.remove("cuda")
    result = dict(torch=torch.__version__, cpu_count=os.cpu_count(), devices={})
    result.update(threads=torch.get_num_threads(), bits=args.bits, warmup=args.warmup)
    result.update(brevitas=brevitas_version())
    for device in devices:
        repeats = args.repeats or (10 if device == "cpu" else 50)
        result["devices"][device] = bench_device(
            device, args.bits, args.warmup, repeats, args.section
        )
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
