"""The distiller's own cost per training step (``tools/benchmark_distill.py --parts step``).

the distiller's own cost per training step of the
``--config-file`` student (default: 4-bit QFD RetinaNet-R18 on the digits data).
Teacher checkpoints come from a randomly initialised FP model of the teacher config
(and, for QFD, its feature-quantized copy, the feature quantizer calibrated) in a
temporary directory: these are timings, not accuracy. Two students with the same
weights and calibration: (a) without distillation, (b) with the config's distiller;
(c) the teacher alone, ``Distiller.teacher_features`` on the same normalised images.
(a) and (b) are forward + backward + optimizer step (the config's QAT optimizer).
Each round runs a, b, c on that round's batch, in rotating order; medians over
``--steps`` rounds after ``--warmup``. Overhead = (b - a - c) / a: what distillation
costs beyond the teacher's forward (taps, loss, its backward, logging), as a share of
the student's own step. Target < 5 %.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from itertools import islice

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tabulate import tabulate

from qdet.benchmark.machine import fmt, machine, machine_note, print_targets, sync
from qdet.config import load_config
from qdet.engine import QDetTrainer
from qdet.engine.teacher_stage import needs_teacher_stage, teacher_config
from qdet.quantization import calibrate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = "configs/digits/retinanet_r18_4bit_qfd.yaml"
OVERHEAD_TARGET = 5.0  # % of the student's step


def step_config(config_file: str, opts: list[str], device: str):
    if not os.path.isfile(config_file) and os.path.isfile(os.path.join(ROOT, config_file)):
        config_file = os.path.join(ROOT, config_file)  # the default, run from elsewhere
    cfg = load_config(config_file, opts)
    cfg.MODEL.DEVICE = device
    if not cfg.DISTILL.ENABLED:
        raise ValueError(f"{config_file}: DISTILL.ENABLED is False, nothing to measure")
    path = cfg.DISTILL.TEACHER_CONFIG
    if path and not os.path.isabs(path) and not os.path.isfile(path):
        cfg.DISTILL.TEACHER_CONFIG = os.path.join(ROOT, path)  # run from anywhere
    return cfg


def load_batches(cfg, n: int) -> list:
    """The first ``n`` training batches of the config's loader (fixed by cfg.SEED)."""
    return list(islice(iter(QDetTrainer.build_train_loader(cfg)), n))


def build_step_models(cfg, calib: list, tmp: str) -> dict:
    """Teacher checkpoints in ``tmp`` from a random FP model; the two calibrated students
    with the same weights, "plain" without and "distilled" with the distiller."""
    cfg = cfg.clone()
    cfg.defrost()
    torch.manual_seed(0)
    fp = build_model(teacher_config(cfg, quantized_feature=False))
    DetectionCheckpointer(fp, save_dir=tmp).save("fp")
    cfg.DISTILL.TEACHER_WEIGHTS = os.path.join(tmp, "fp.pth")
    if needs_teacher_stage(cfg):  # QFD: the teacher stage's feature-quantized model
        fq = build_model(teacher_config(cfg, quantized_feature=True))
        fq.load_state_dict(fp.state_dict(), strict=False)
        calibrate(fq, calib, len(calib))  # its only quantizer: the feature quantizer
        DetectionCheckpointer(fq, save_dir=tmp).save("fq")
        cfg.DISTILL.QUANTIZED_TEACHER_WEIGHTS = os.path.join(tmp, "fq.pth")
    plain_cfg = cfg.clone()
    plain_cfg.DISTILL.ENABLED = False
    plain = QDetTrainer.build_model(plain_cfg)
    plain.load_state_dict(fp.state_dict(), strict=False)  # the student starts from the FP
    calibrate(plain, calib, len(calib))
    distilled = QDetTrainer.build_model(cfg)
    result = distilled.load_state_dict(plain.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("distiller.")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"students differ: {missing[:3]} {result.unexpected_keys[:3]}")
    return {"cfg": cfg, "plain": plain, "distilled": distilled}


def train_step(model, optimizer, batch) -> bool:
    """Forward + backward + optimizer step (SimpleTrainer's order); whether finite."""
    losses = model(batch)
    total = sum(losses.values())
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return bool(torch.isfinite(total.detach()))


def teacher_forward(distiller, images: torch.Tensor) -> bool:
    """The teacher's forward as the distiller runs it (no grad, only as far as the taps)."""
    distiller.teacher_features(images)
    return True


def bench_step(cfg, batches: list, calib: list, warmup: int, steps: int) -> dict:
    """Part 2 on the config's device: seconds per round of (a) plain step, (b) distilled
    step, (c) teacher forward, interleaved in rotating order on the same batches."""
    device = cfg.MODEL.DEVICE
    with tempfile.TemporaryDirectory() as tmp:
        built = build_step_models(cfg, calib, tmp)
    cfg, plain, distilled = built["cfg"], built["plain"], built["distilled"]
    distiller = distilled.distiller
    opts = {m: QDetTrainer.build_optimizer(cfg, m) for m in (plain, distilled)}
    plain.train()
    distilled.train()
    with torch.no_grad():  # the normalised input the distiller hands the teacher
        images = [plain.preprocess_image(b).tensor for b in batches]
    runs = {
        "a": lambda i: train_step(plain, opts[plain], batches[i]),
        "b": lambda i: train_step(distilled, opts[distilled], batches[i]),
        "c": lambda i: teacher_forward(distiller, images[i]),
    }
    times: dict[str, list[float]] = {n: [] for n in runs}
    finite = True
    rounds = warmup + steps
    with EventStorage(0) as storage:
        for i in range(rounds):
            order = list(runs)[i % 3 :] + list(runs)[: i % 3]
            for name in order:
                sync(device)
                start = time.perf_counter()
                ok = runs[name](i % len(batches))
                sync(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
                finite = finite and ok
            storage.step()
            print(f"  [step] round {i + 1}/{rounds}", flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    overhead = 100 * (med["b"] - med["a"] - med["c"]) / med["a"]
    paired = [100 * (b - a - c) / a for a, b, c in zip(times["a"], times["b"], times["c"])]
    q = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
    return {
        "machine": machine(device),
        "distill_config": cfg.DISTILL.dump(),
        "terms": [t.name for t in distiller.terms],
        "images_per_batch": len(batches[0]),
        "image_size": list(images[0].shape[-2:]),
        "quant_backend": os.environ.get("QDET_QUANT_BACKEND", "auto"),
        "warmup": warmup,
        "steps": steps,
        "seconds": times,
        "median_ms": {n: 1e3 * v for n, v in med.items()},
        "overhead_pct": overhead,
        "paired_overhead_pct": {"median": q[1], "quartiles": [q[0], q[2]], "all": paired},
        "finite_losses": finite,
        "target": {
            "target": f"(b - a - c) / a < {OVERHEAD_TARGET:g} %",
            "value": overhead,
            "ok": overhead < OVERHEAD_TARGET,
        },
    }


def print_step(result: dict) -> None:
    m, p = result["median_ms"], result["paired_overhead_pct"]
    info = result["machine"]
    print(
        f"\nDistiller overhead per training step, {info['device']}, terms "
        f"{result['terms']}, {result['images_per_batch']} images of "
        f"{result['image_size'][0]}x{result['image_size'][1]} (padded) per batch; median of "
        f"{result['steps']} rounds after {result['warmup']} warm-up"
    )
    print("  a = quantized student's step without distillation (forward + backward + optimizer)")
    print("  b = the same student with the distiller attached (includes the teacher's forward)")
    print("  c = the teacher's forward alone on the same images (Distiller.teacher_features)")
    print("  overhead = (b - a - c) / a: distillation's cost beyond the teacher's forward")
    table = [
        [
            fmt(m["a"], ".1f"),
            fmt(m["b"], ".1f"),
            fmt(m["c"], ".1f"),
            fmt(100 * m["c"] / m["a"], ".1f"),
            fmt(result["overhead_pct"], ".2f"),
            f"{p['median']:.2f} ({p['quartiles'][0]:.2f} .. {p['quartiles'][1]:.2f})",
        ]
    ]
    headers = ["a ms", "b ms", "c ms", "c / a %", "overhead %", "per-round overhead % (IQR)"]
    print(tabulate(table, headers, tablefmt="github", disable_numparse=True))
    if not result["finite_losses"]:
        print("  warning: a loss was not finite in some step (random teacher); times still hold")
    print_targets([result["target"]])
    print(machine_note(info))
