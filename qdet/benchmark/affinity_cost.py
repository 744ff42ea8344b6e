"""FA against FFA, the loss alone (``tools/benchmark_distill.py --parts loss``).

FeatureAffinityLoss ("fa", FAQD Eq. 6, forms B x HW x HW
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
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
from tabulate import tabulate

from qdet.benchmark.machine import (
    available_bytes,
    fmt,
    machine,
    machine_note,
    median_or_none,
    print_targets,
    ratio,
    sync,
)
from qdet.distill import FastFeatureAffinityLoss, FeatureAffinityLoss

SPEED_TARGET, SPEED_TARGET_SIZE = 50.0, 128  # FA / FFA time at 128 x 128
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
    cmd = [sys.executable, "-m", __name__, spec, str(torch.get_num_threads())]
    # The child imports this qdet, wherever it is run from.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
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


if __name__ == "__main__":  # the fresh process of cpu_memory(): python -m ... SPEC THREADS
    torch.set_num_threads(int(sys.argv[2]))
    print(json.dumps(probe_cpu_memory(**json.loads(sys.argv[1]))))
