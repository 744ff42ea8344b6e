#!/usr/bin/env python
"""EWGS on a trained detector: the clip-bound gradient's effect on dL/dl, and the cost and
agreement of the Hessian-trace delta estimators.

    .venv/bin/python tools/benchmark_ewgs.py       # digits RetinaNet-R18, W4/A4, CPU
    .venv/bin/python tools/benchmark_ewgs.py --config-file configs/retinanet_r50_4bit_ewgs.yaml \\
        MODEL.WEIGHTS model_final.pth MODEL.DEVICE cuda

Builds the config's EWGS-quantized model from its FP weights (``MODEL.WEIGHTS``: for the
default config, ``tools/train_net.py --config-file configs/digits/retinanet_r18_fp.yaml``
makes them) and calibrates it.

1. Bound gradient: on one training batch, dL/dl of every unsigned input quantizer with
   ``exclusive`` and with ``inclusive`` bounds (same model, same batch), and the share of
   its input elements exactly at l.
2. Estimators (skipped with ``--bound-only``): every quantizer's delta on the same
   ``--batches`` training batches with ``per_layer`` (EWGS's code) under each ``--seeds``
   Rademacher seed, and with ``joint`` under the same seeds: seconds per estimate, and per
   quantizer |a - b| / max(a, b), per_layer against its other seed (its own noise) and
   joint against per_layer (same seed).

Writes tables and JSON (output/benchmark_ewgs.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from itertools import islice

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.config import load_config  # noqa: E402
from qdet.engine import QDetTrainer  # noqa: E402
from qdet.quantization import Quantizer, calibrate, update_ewgs_deltas  # noqa: E402

DEFAULT_CONFIG = "configs/digits/retinanet_r18_4bit_ewgs.yaml"


def relative_differences(a: dict, b: dict) -> list[float]:
    """|a - b| / max(a, b) per quantizer where either is positive."""
    return [abs(a[k] - b[k]) / max(a[k], b[k]) for k in a if max(a[k], b[k]) > 0]


def summary(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"median {q[1]:.2f} (quartiles {q[0]:.2f}-{q[2]:.2f}, max {max(values):.2f})"


def bound_gradient_effect(model, batch) -> dict:
    """Per unsigned input quantizer: share of inputs at l, dL/dl exclusive and inclusive."""
    quantizers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, Quantizer) and m.kind == "activation" and m.signed is False
    }
    at_lower = {}

    def share(name):
        def hook(q, inputs):
            at_lower[name] = (inputs[0] == q.lower).float().mean().item()

        return hook

    handles = [q.register_forward_pre_hook(share(n)) for n, q in quantizers.items()]
    every = [m for m in model.modules() if isinstance(m, Quantizer)]
    configured = [m.bound_gradient for m in every]
    grads = {}
    for bound in ("exclusive", "inclusive"):
        for m in every:
            m.bound_gradient = bound
        model.zero_grad()
        with EventStorage(0):
            sum(model(batch).values()).backward()
        grads[bound] = {n: q.lower.grad.item() for n, q in quantizers.items()}
    for h in handles:
        h.remove()
    for m, bound in zip(every, configured):
        m.bound_gradient = bound
    model.zero_grad()
    return {
        n: {
            "share_at_l": at_lower[n],
            "dl_exclusive": grads["exclusive"][n],
            "dl_inclusive": grads["inclusive"][n],
        }
        for n in quantizers
    }


def compare_estimators(model, batches: list, seeds: list[int]) -> dict:
    def loss(batch):
        return sum(model(batch).values())

    results, rows = {}, []
    for estimator in ("per_layer", "joint"):
        for seed in seeds:
            start = time.perf_counter()
            deltas = update_ewgs_deltas(
                model, loss, batches, len(batches), estimator=estimator, seed=seed
            )
            seconds = time.perf_counter() - start
            results[f"{estimator}/{seed}"] = {"seconds": seconds, "deltas": deltas}
            rows.append([estimator, seed, f"{seconds:.1f}", len(deltas)])
            print(f"{estimator} seed {seed}: {seconds:.1f} s", flush=True)
    print(tabulate(rows, ["estimator", "seed", "seconds", "quantizers"], tablefmt="github"))

    base = seeds[0]
    comparisons = {}
    for seed in seeds[1:]:
        comparisons[f"per_layer/{base} vs per_layer/{seed}"] = relative_differences(
            results[f"per_layer/{base}"]["deltas"], results[f"per_layer/{seed}"]["deltas"]
        )
    for seed in seeds:
        comparisons[f"joint/{seed} vs per_layer/{seed}"] = relative_differences(
            results[f"joint/{seed}"]["deltas"], results[f"per_layer/{seed}"]["deltas"]
        )
    print("\nRelative difference of delta per quantizer, |a - b| / max(a, b):")
    for name, values in comparisons.items():
        print(f"  {name}: {summary(values)}")
    return {"estimators": results, "relative_differences": comparisons}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--batches", type=int, default=1, help="training batches per estimate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--bound-only", action="store_true", help="skip the estimators")
    parser.add_argument("--output", default="output/benchmark_ewgs.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE")
    args = parser.parse_args()

    cfg = load_config(args.config_file, args.opts)
    seed_all_rng(cfg.SEED)  # the same calibration and estimate batches every run
    if not os.path.isfile(cfg.MODEL.WEIGHTS):
        sys.exit(
            f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS!r} does not exist: train the FP model first "
            "(tools/train_net.py --config-file configs/digits/retinanet_r18_fp.yaml)"
        )
    model = QDetTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    loader = iter(QDetTrainer.build_train_loader(cfg))
    calibrate(model, islice(loader, cfg.QUANT.CALIB_BATCHES), cfg.QUANT.CALIB_BATCHES)
    batches = list(islice(loader, args.batches))
    model.train()

    bound = bound_gradient_effect(model, batches[0])
    changes = [
        abs(b["dl_inclusive"] - b["dl_exclusive"]) / abs(b["dl_exclusive"])
        for b in bound.values()
        if b["dl_exclusive"] != 0
    ]
    print(f"Bound gradient, {len(bound)} unsigned input quantizers, one batch:")
    print(f"  share of inputs exactly at l: {summary([b['share_at_l'] for b in bound.values()])}")
    print(f"  |dL/dl inclusive - exclusive| / |exclusive|: {summary(changes)}")
    report = {"config": args.config_file, "batches": args.batches, "bound_gradient": bound}
    if not args.bound_only:
        report.update(compare_estimators(model, batches, args.seeds))
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
