#!/usr/bin/env python
"""Distillation cost: FA vs FFA loss time and memory, and the distiller's overhead per step.

    .venv/bin/python tools/benchmark_distill.py                 # both parts, CPU (+ CUDA)
    .venv/bin/python tools/benchmark_distill.py --parts loss --max-fa-size 64
    .venv/bin/python tools/benchmark_distill.py --parts step --steps 20 SOLVER.IMS_PER_BATCH 4

1. Loss (``--parts loss``): FeatureAffinityLoss ("fa", FAQD Eq. 6, forms B x HW x HW
   affinities) against FastFeatureAffinityLoss ("ffa", Eq. 14-15, k random projections) on
   one tap: a student map B x C x H x W that requires grad and a teacher map that does not,
   random normal, at each of ``--sizes`` (H = W). One call is forward + backward of the
   loss alone. Time: FA and FFA alternate, ``--warmup`` untimed calls each, then the
   median of ``--reps``. Peak memory, above what the inputs already hold:
   - CPU: the growth of the process's resident-set high-water mark (Linux: VmHWM in
     /proc/self/status; elsewhere ``getrusage`` ru_maxrss) over one call, in a fresh
     subprocess per (loss, size) that first makes one call on an 8 x 8 map (loading the
     kernels) and then allocates the inputs. It is the memory the OS had to give the call: tensors,
     the gradient of the student map included, plus allocator overhead.
   - CUDA: ``torch.cuda.max_memory_allocated()`` during one call minus
     ``memory_allocated()`` before it: the caching allocator's live tensor bytes.
   FA sizes above ``--max-fa-size``, or whose estimated need (4 x B x (HW)^2 fp32 values)
   exceeds the memory available, are skipped with a note. Targets: FA / FFA time >= 50 at
   128 x 128, and the slope of log(memory) in log(HW) between the two largest sizes:
   about 2 for FA, about 1 for FFA. A third column times ``fa`` with ``algorithm="gram"``:
   the exact FA value from C x C Gram matrices, O(HW C^2).
2. Step (``--parts step``): the distiller's own cost per training step of the
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

Everything goes to ``--out`` (output/benchmark_distill.json) too. Trailing KEY VALUE
pairs override the step part's config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import qdet  # noqa: E402,F401  (registers qdet's datasets and models)
from qdet.distill import (  # noqa: E402
    FastFeatureAffinityLoss,
    FeatureAffinityLoss,
    teacher_config,
)
from qdet.engine import QDetTrainer  # noqa: E402
from qdet.engine.stages import load_config, needs_teacher_stage  # noqa: E402
from qdet.quantization import calibrate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/digits/retinanet_r18_4bit_qfd.yaml"
SPEED_TARGET, SPEED_TARGET_SIZE = 50.0, 128  # FA / FFA time at 128 x 128
OVERHEAD_TARGET = 5.0  # % of the student's step
MIB = 2**20
CPU_MEMORY = (
    "CPU peak: growth of the resident-set high-water mark (VmHWM; ru_maxrss off Linux) over one "
    "forward + backward, in a fresh subprocess per (loss, size), inputs excluded; "
    "includes allocator overhead"
)
CUDA_MEMORY = (
    "CUDA peak: torch.cuda.max_memory_allocated() during one forward + backward minus "
    "memory_allocated() before it (live tensor bytes), inputs excluded"
)


# ---------------------------------------------------------------------------------------
# Shared
# ---------------------------------------------------------------------------------------


def machine(device: str) -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"device": device, "cpu": cpu, "cpu_count": os.cpu_count()}
    info["torch_threads"] = torch.get_num_threads()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_note(info: dict) -> str:
    where = f"GPU {info['gpu']}, " if "gpu" in info else ""
    return (
        f"Machine: {where}CPU {info['cpu']} ({info['cpu_count']} cores), "
        f"torch.get_num_threads() = {info['torch_threads']}. All ratios were measured side "
        "by side in this one run (interleaved repetitions); compare ratios, not absolute "
        "times, across machines."
    )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def available_bytes(device: str) -> int | None:
    """Memory a new allocation could get now (None if unknown)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:"))
        return kib * 1024
    except (OSError, StopIteration):
        return None


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ---------------------------------------------------------------------------------------
# Part 1: FA vs FFA, the loss alone
# ---------------------------------------------------------------------------------------


def build_loss(name: str, k: int):
    """ "fa" (explicit HW x HW), "fa_gram" (the same value from C x C Gram matrices), "ffa"."""
    if name == "fa":
        return FeatureAffinityLoss()
    if name == "fa_gram":
        return FeatureAffinityLoss(algorithm="gram")
    return FastFeatureAffinityLoss(k=k)


def loss_inputs(batch: int, channels: int, size: int, device: str, seed: int = 0):
    """Student map (requires grad) and teacher map (does not), B x C x size x size."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, channels, size, size, generator=g).to(device).requires_grad_(True)
    t = torch.randn(batch, channels, size, size, generator=g).to(device)
    return s, t


def loss_call(loss, s: torch.Tensor, t: torch.Tensor) -> None:
    """One forward + backward of the loss on the tap pair, the student's grad fresh."""
    s.grad = None
    loss([s], [t]).backward()


def fa_estimate_bytes(batch: int, size: int) -> int:
    """What FA needs at its peak: about 4 B x HW x HW fp32 matrices (the two affinities
    and their difference in the forward, the difference and two temporaries backward)."""
    return 4 * batch * (size * size) ** 2 * 4


def memory_marks() -> tuple[int, int | None]:
    """(resident-set high-water mark, resident set now) of this process, in bytes.

    Linux: VmHWM and VmRSS of /proc/self/status, which belong to the process's address
    space and start afresh at exec. Elsewhere: ``getrusage`` ru_maxrss and no current
    value; it may carry the parent's high-water mark over a fork (Linux's does)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(ln.split(":", 1) for ln in f if ":" in ln)
        return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, else KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, None


def probe_cpu_memory(name: str, size: int, batch: int, channels: int, k: int) -> dict:
    """Run in a fresh process (``--probe-memory``): the RSS high-water growth of one call."""
    loss = build_loss(name, k)
    loss_call(loss, *loss_inputs(batch, channels, 8, "cpu", seed=1))  # load the kernels
    s, t = loss_inputs(batch, channels, size, "cpu")
    before, rss = memory_marks()
    loss_call(loss, s, t)
    after, _ = memory_marks()
    # If an earlier transient (imports) left the high-water mark above the resident set,
    # the call's first bytes do not raise it: "baseline_gap" is that blind spot.
    gap = None if rss is None else before - rss
    return {"peak_bytes": after - before, "baseline_gap_bytes": gap}


def cpu_memory(name: str, size: int, batch: int, channels: int, k: int) -> dict:
    """:func:`probe_cpu_memory` in a fresh subprocess; an error note if it failed."""
    spec = json.dumps(dict(name=name, size=size, batch=batch, channels=channels, k=k))
    cmd = [sys.executable, os.path.abspath(__file__), "--probe-memory", spec]
    cmd += ["--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else "failed"
        if proc.returncode == -9:
            why += " (out of memory?)"
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        return {"error": f"memory probe {why}: {tail}".rstrip(": ")}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cuda_memory(loss, s: torch.Tensor, t: torch.Tensor) -> dict:
    s.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss_call(loss, s, t)
    torch.cuda.synchronize()
    return {"peak_bytes": torch.cuda.max_memory_allocated() - before}


def time_losses(losses: dict, s, t, device: str, warmup: int, reps: int) -> dict:
    """Seconds per call of each loss, the losses alternating call by call."""
    times: dict[str, list[float]] = {n: [] for n in losses}
    for i in range(warmup + reps):
        for name, loss in losses.items():
            sync(device)
            start = time.perf_counter()
            loss_call(loss, s, t)
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def fa_skip_reason(size: int, device: str, args) -> str | None:
    if args.max_fa_size is not None and size > args.max_fa_size:
        return f"skipped (> --max-fa-size {args.max_fa_size})"
    need, have = fa_estimate_bytes(args.batch, size), available_bytes(device)
    if have is not None and need > 0.9 * have:
        return f"skipped (needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available)"
    return None


def memory_exponent(rows: list[dict], key: str) -> float | None:
    """p in peak ~ HW^p, from the two largest sizes measured (where the fixed overhead of
    a call matters least): log(m2 / m1) / log(HW2 / HW1)."""
    pts = sorted((r["hw"], r[key]) for r in rows if r.get(key))
    if len(pts) < 2:
        return None
    (hw1, m1), (hw2, m2) = pts[-2:]
    return math.log(m2 / m1) / math.log(hw2 / hw1)


def bench_losses(device: str, args, cpu_memory_probe: bool = True) -> dict:
    """Part 1 on one device: rows per size, memory exponents, the targets."""
    rows = []
    for size in args.sizes:
        print(f"  {device} {size}x{size} ...", flush=True)
        s, t = loss_inputs(args.batch, args.channels, size, device)
        skip = fa_skip_reason(size, device, args)
        losses = {"fa_gram": build_loss("fa_gram", args.k), "ffa": build_loss("ffa", args.k)}
        if skip is None:
            losses = {"fa": build_loss("fa", args.k), **losses}
        row: dict = {"size": size, "hw": size * size, "fa_note": skip}
        try:
            times = time_losses(losses, s, t, device, args.warmup, args.reps)
        except torch.OutOfMemoryError as e:
            row["fa_note"] = f"out of memory: {str(e).splitlines()[0][:120]}"
            losses.pop("fa", None)
            torch.cuda.empty_cache()
            times = time_losses(losses, s, t, device, args.warmup, args.reps)
        except RuntimeError as e:  # CPU allocation failures are RuntimeErrors
            if "fa" not in losses or "alloc" not in str(e).lower():
                raise
            row["fa_note"] = f"out of memory: {str(e).splitlines()[0][:120]}"
            losses.pop("fa")
            times = time_losses(losses, s, t, device, args.warmup, args.reps)
        for name in ("fa", "fa_gram", "ffa"):
            row[f"{name}_ms"] = median_or_none([1e3 * x for x in times.get(name, [])])
            row[f"{name}_all_ms"] = [1e3 * x for x in times.get(name, [])]
            if name not in losses:
                row[f"{name}_peak_mib"] = None
                continue
            if device == "cuda":
                mem = cuda_memory(losses[name], s, t)
            elif cpu_memory_probe:
                mem = cpu_memory(name, size, args.batch, args.channels, args.k)
            else:
                mem = {"error": "not measured"}
            row[f"{name}_memory"] = mem
            row[f"{name}_peak_mib"] = mem["peak_bytes"] / MIB if "peak_bytes" in mem else None
        row["speedup"] = ratio(row["fa_ms"], row["ffa_ms"])
        row["gram_speedup"] = ratio(row["fa_ms"], row["fa_gram_ms"])
        row["memory_ratio"] = ratio(row["fa_peak_mib"], row["ffa_peak_mib"])
        rows.append(row)
        del s, t
    exponents = {n: memory_exponent(rows, f"{n}_peak_mib") for n in ("fa", "ffa")}
    n = SPEED_TARGET_SIZE
    at = next((r for r in rows if r["size"] == n), None)
    speed = at["speedup"] if at else None
    targets = [
        {
            "target": f"FA / FFA time >= {SPEED_TARGET:g} at {n}x{n}",
            "value": speed,
            "ok": None if speed is None else speed >= SPEED_TARGET,
        },
        {
            "target": "FFA peak memory ~ linear in HW (log-log slope 0.7 .. 1.3)",
            "value": exponents["ffa"],
            "ok": None if exponents["ffa"] is None else 0.7 <= exponents["ffa"] <= 1.3,
        },
        {
            "target": "FA peak memory ~ quadratic in HW (log-log slope 1.7 .. 2.3)",
            "value": exponents["fa"],
            "ok": None if exponents["fa"] is None else 1.7 <= exponents["fa"] <= 2.3,
        },
    ]
    memory = CUDA_MEMORY if device == "cuda" else CPU_MEMORY
    if device == "cpu" and not cpu_memory_probe:
        memory = "not measured"
    return {
        "machine": machine(device),
        "memory_method": memory,
        "rows": rows,
        "memory_exponents": exponents,
        "targets": targets,
    }


def fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_losses(result: dict, args) -> None:
    info = result["machine"]
    print(
        f"\nFA vs FFA (k={args.k}), {info['device']}: forward + backward of the loss alone, "
        f"B={args.batch}, C={args.channels}; median of {args.reps} calls after "
        f"{args.warmup} warm-up, FA and FFA alternating"
    )
    print(f"peak MiB = {result['memory_method']}")
    headers = ["map", "HW", "FA ms", "FFA ms", "FA/FFA time", "FA MiB", "FFA MiB", "FA/FFA MiB"]
    headers += ["FA gram ms", "FA/gram time", "gram MiB"]
    table = []
    for r in result["rows"]:
        mem = {
            n: r.get(f"{n}_memory", {}).get("error") or fmt(r[f"{n}_peak_mib"], ".1f")
            for n in ("fa", "fa_gram", "ffa")
        }
        table.append(
            [
                f"{r['size']}x{r['size']}",
                r["hw"],
                r["fa_note"] or fmt(r["fa_ms"]),
                fmt(r["ffa_ms"], ".3f"),
                fmt(r["speedup"], ".1f"),
                "n/a" if r["fa_note"] else mem["fa"],
                mem["ffa"],
                fmt(r["memory_ratio"], ".1f"),
                fmt(r["fa_gram_ms"], ".3f"),
                fmt(r["gram_speedup"], ".1f"),
                mem["fa_gram"],
            ]
        )
    print(tabulate(table, headers, tablefmt="github", disable_numparse=True))
    e = result["memory_exponents"]
    print(
        f"peak memory ~ HW^p, p from the two largest sizes measured: FA p = {fmt(e['fa'])}, "
        f"FFA p = {fmt(e['ffa'])} (FA's affinities are HW x HW: 2; FFA's O(k HW C): 1)"
    )
    print_targets(result["targets"])
    print(machine_note(info))


def print_targets(targets: list[dict]) -> None:
    for c in targets:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[c["ok"]]
        print(f"  {verdict}  {c['target']} (is {fmt(c['value'])})")


# ---------------------------------------------------------------------------------------
# Part 2: the distiller's overhead per training step
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------


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
    parser.add_argument("--probe-memory", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
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
    if args.probe_memory:  # a subprocess of cpu_memory()
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(probe_cpu_memory(**json.loads(args.probe_memory))))
        return {}
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
