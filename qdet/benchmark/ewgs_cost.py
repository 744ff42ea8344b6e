"""What EWGS costs and changes on a trained detector (``tools/benchmark_ewgs.py``): the
clip-bound gradient's effect on dL/dl, and the cost and agreement of the Hessian-trace
delta estimators.

1. Bound gradient (:func:`bound_gradient_effect`): on one training batch, dL/dl of every
   unsigned input quantizer with ``exclusive`` and with ``inclusive`` bounds (same model,
   same batch), and the share of its input elements exactly at l.
2. Estimators (:func:`compare_estimators`): every quantizer's delta on the same training
   batches with ``per_layer`` (EWGS's code) under each Rademacher seed, and with ``joint``
   under the same seeds: seconds per estimate, and per quantizer |a - b| / max(a, b),
   per_layer against its other seed (its own noise) and joint against per_layer (same
   seed).
"""

from __future__ import annotations

import statistics
import time
from itertools import islice

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.events import EventStorage
from tabulate import tabulate

from qdet.engine import QDetTrainer
from qdet.quantization import Quantizer, calibrate, update_ewgs_deltas


def calibrated_model(cfg, batches: int):
    """The config's quantized model from ``MODEL.WEIGHTS``, calibrated on
    ``QUANT.CALIB_BATCHES`` training batches, in train mode; and the next ``batches``
    training batches (the estimates')."""
    model = QDetTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    loader = iter(QDetTrainer.build_train_loader(cfg))
    calibrate(model, islice(loader, cfg.QUANT.CALIB_BATCHES), cfg.QUANT.CALIB_BATCHES)
    estimate_batches = list(islice(loader, batches))
    model.train()
    return model, estimate_batches


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


def bound_changes(bound: dict) -> list[float]:
    """|dL/dl inclusive - exclusive| / |exclusive| per quantizer whose exclusive one is
    not 0."""
    return [
        abs(b["dl_inclusive"] - b["dl_exclusive"]) / abs(b["dl_exclusive"])
        for b in bound.values()
        if b["dl_exclusive"] != 0
    ]
