#!/usr/bin/env python
"""Training-step time and memory of FP, 4-bit QAT and 4-bit QFD RetinaNet, as ratios to FP.

    .venv/bin/python tools/benchmark_train.py                      # CPU, 2 x 256x320, R50
    .venv/bin/python tools/benchmark_train.py --device cuda --size 800 1333 --amp
    .venv/bin/python tools/benchmark_train.py --arch vitdet --size 256 256   # ViTDet-B
    .venv/bin/python tools/benchmark_train.py --arch vitdet --device cuda --size 1024 1024 --amp

``--arch vitdet``: ViTDet-B Mask R-CNN, "fp" and "qat". The variants ("fp", "qat",
"qat_frozen_layers_quantizers_train", "qfd", "brevitas"), what a step is and how memory
is counted: :mod:`qdet.benchmark.train_speed`. After the timing, --recompile-steps qat
steps at a new input size each count the torch.compile graphs built (0: no recompilation
per image size); --steady-malloc pins glibc's malloc thresholds so that no step pays page
faults for fresh heap. Writes a table and JSON (output/benchmark_train.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)
import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qdet.benchmark.peers import brevitas_version  # noqa: E402
from qdet.benchmark.train_speed import (  # noqa: E402
    make_batch,
    recompiles_over_sizes,
    sgd_optimizers,
    steady_malloc,
    time_variants,
    variants,
    vitdet_variants,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="retinanet", choices=("retinanet", "vitdet"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 320), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA)")
    parser.add_argument(
        "--recompile-steps",
        type=int,
        default=20,
        help="qat steps at varying input sizes after timing, counting torch.compile graphs",
    )
    parser.add_argument("--json", default="output/benchmark_train.json")
    parser.add_argument(
        "--steady-malloc",
        action="store_true",
        help="glibc: never hand freed heap back to the OS (mallopt), so no variant pays page "
        "faults for the heap another variant's larger peak left behind",
    )
    args = parser.parse_args()
    if args.steady_malloc:
        steady_malloc()
    cuda = args.device == "cuda"
    batch = make_batch(args.batch, *args.size, args.device)
    if args.arch == "vitdet":
        models = vitdet_variants(args.device, batch, max(args.size))
    else:
        models = variants(args.depth, args.device, batch)
    opts = sgd_optimizers(models)
    rows = time_variants(models, opts, batch, args.device, args.amp, args.warmup, args.repeats)
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3f"))
    recompiles = None
    if args.recompile_steps and "qat" in models:
        recompiles = recompiles_over_sizes(
            models["qat"], opts["qat"], args.size, args.device, args.recompile_steps
        )
        print(
            f"torch.compile graphs built over {args.recompile_steps} more qat steps at a new "
            f"input size each: {recompiles}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "args": vars(args),
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "threads": torch.get_num_threads(),
                "brevitas": brevitas_version(),
                "recompiles_over_sizes": recompiles,
                "rows": rows,
            },
            f,
            indent=2,
        )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
