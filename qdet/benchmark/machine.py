"""What a benchmark was measured on, and the small helpers its timings share."""

from __future__ import annotations

import os
import platform
import statistics

import torch


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


def fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_targets(targets: list[dict]) -> None:
    for c in targets:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[c["ok"]]
        print(f"  {verdict}  {c['target']} (is {fmt(c['value'])})")
