"""Benchmark qdet's uniform fake-quantization op (the op behind ``UniformQuantizer``).

Measures one training step, forward + ``y.backward(grad)``, of

* ours (compiled) / ours (eager): ``qdet.quantization.fake_quantize`` with the
  ``torch.compile`` and the eager backend of ``functional.set_backend``;
* plain: ``fake_quant_reference``, the same formula as a plain autograd composition;
* fused: ``torch._fake_quantize_learnable_per_tensor_affine``, PyTorch's fused LSQ kernel
  (behind torch.ao's ``_LearnableFakeQuantize``), with learnable scale and zero point.

Per case it reports the median wall time over ``--repeats`` steps, after ``--warmup``
untimed steps (the compiled backend compiles on its first calls), with the implementations
run round-robin so drift hits all alike; the bytes autograd saves for backward (unique
storages, the input included when it is saved); on CUDA also the allocator's peak during
the step above what was allocated before it (inputs excluded). Then two targets: ours
(compiled) time <= 1.5x fused, and ours (compiled) memory <= 0.5x plain. Every number goes
to ``--json`` too, with each implementation's largest difference from plain (y and x.grad);
the fused kernel uses LSQ's grid (2^b levels, rounded zero point) and masks gradients by the
rounded value, so it is a speed and memory reference, not a numerical one.

    .venv/bin/python tools/benchmark_quantizer.py --device cpu --repeats 5
    .venv/bin/python tools/benchmark_quantizer.py --device all --json output/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tabulate import tabulate
from torch._dynamo.utils import counters

from qdet.quantization import fake_quant_reference, fake_quantize
from qdet.quantization.functional import MODE_SIGNED, MODE_UNSIGNED, MODE_WEIGHT, set_backend

IMPLS = ("ours (compiled)", "ours (eager)", "plain", "fused")
COLUMNS = (
    "case|impl|time ms|time / fused|time / plain|saved MiB|saved / plain|peak MiB|peak / plain"
)
RATIOS = (("time ms", "fused"), ("time ms", "plain"), ("saved MiB", "plain"), ("peak MiB", "plain"))
TIME_TARGET, MEMORY_TARGET = 1.5, 0.5  # ours vs fused time, ours vs plain memory


def cases(device: str) -> list[dict]:
    act = (2, 256, 100, 168)  # a RetinaNet p3 feature map
    rows = [
        dict(name="act signed", shape=act, mode=MODE_SIGNED),
        dict(name="act unsigned", shape=act, mode=MODE_UNSIGNED),
        dict(name="weight", shape=(256, 256, 3, 3), mode=MODE_WEIGHT),
        dict(name="weight", shape=(2048, 512, 1, 1), mode=MODE_WEIGHT),
    ]
    if device == "cuda":
        rows += [
            dict(name="act signed", shape=(2, 256, 200, 336), mode=MODE_SIGNED),
            dict(name="act signed fp16 autocast", shape=act, mode=MODE_SIGNED, half=True),
        ]
    for c in rows:
        c["name"] += " " + "x".join(map(str, c["shape"]))
    return rows


def make_inputs(case: dict, bits: int, device: str) -> dict:
    """Input, fixed output gradient, and initial parameters as the quantizer would set them."""
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(case["shape"], generator=g), torch.randn(case["shape"], generator=g)
    mode = case["mode"]
    if mode != MODE_SIGNED:  # a ReLU output (lower = its min = 0), or conv-weight-sized values
        x = x.relu() if mode == MODE_UNSIGNED else 0.02 * x
    std, n, h = x.std().item(), 2**bits - 1, 2 ** (bits - 1)
    lower, upper = (0.0 if mode == MODE_UNSIGNED else -3 * std), 3 * std
    if mode == MODE_WEIGHT:  # s = (u - l) / 2; fused: symmetric -2^(b-1) .. 2^(b-1) - 1
        scale, fused = (upper - lower) / 2, (upper / h, 0.0, -h, h - 1)
    else:  # alpha = u - l; fused: 0 .. n with the zero point at l
        step = (upper - lower) / n
        scale, fused = upper - lower, (step, float(round(-lower / step)), 0, n)
    dtype = torch.float16 if case.get("half") else torch.float32
    x, grad = x.to(device, dtype), grad.to(device, dtype)
    return dict(x=x, grad=grad, params=(lower, upper, scale), fused=fused)


def step(impl: str, inp: dict, bits: int, case: dict, on_start=lambda: None):
    """Forward + backward on fresh leaf tensors; returns (seconds, y, x.grad)."""
    x = inp["x"].clone().requires_grad_(True)
    values, shape = (inp["fused"][:2], (1,)) if impl == "fused" else (inp["params"], ())
    params = [torch.full(shape, v, device=x.device, requires_grad=True) for v in values]
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    amp = torch.autocast("cuda", dtype=torch.float16) if case.get("half") else nullcontext()
    sync()
    on_start()
    start = time.perf_counter()
    with amp:
        if impl == "fused":
            qmin, qmax = inp["fused"][2:]
            y = torch._fake_quantize_learnable_per_tensor_affine(x, *params, qmin, qmax, 1.0)
        elif impl == "plain":
            y = fake_quant_reference(x, *params, 2**bits - 1, case["mode"])
        else:
            set_backend("compile" if impl == "ours (compiled)" else "eager")
            y = fake_quantize(x, *params, bits, case["mode"])
    y.backward(inp["grad"])
    sync()
    return time.perf_counter() - start, y.detach(), x.grad


def memory(impl: str, inp: dict, bits: int, case: dict) -> tuple[dict, tuple]:
    """MiB saved for backward (each storage once) and, on CUDA, the step's peak."""
    saved: dict[int, int] = {}
    cuda, before = inp["x"].is_cuda, []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        saved[key] = max(saved.get(key, 0), t.numel() * t.element_size())
        return t

    def on_start() -> None:  # the leaves exist by now, so they are not counted
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before.append(torch.cuda.memory_allocated())

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, y, dx = step(impl, inp, bits, case, on_start)
    out = {"saved MiB": sum(saved.values()) / 2**20}
    if cuda:
        out["peak MiB"] = (torch.cuda.max_memory_allocated() - before[0]) / 2**20
    return out, (y, dx)


def bench_case(case: dict, device: str, bits: int, warmup: int, repeats: int) -> list[dict]:
    inp = make_inputs(case, bits, device)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    errors: dict[str, str] = {}
    for i in range(warmup + repeats):
        for impl in IMPLS:  # round-robin, so drift affects every implementation alike
            if impl in errors:
                continue
            try:
                t = step(impl, inp, bits, case)[0]
            except Exception as e:  # noqa: BLE001 - e.g. a kernel without fp16 support
                errors[impl] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                print(f"    {impl} failed: {errors[impl]}")
                continue
            if i >= warmup:
                times[impl].append(t)
    rows, outputs = {}, {}
    for impl in IMPLS:
        rows[impl] = {"case": case["name"], "impl": impl, "error": errors.get(impl)}
        if impl not in errors:
            ts = [1e3 * t for t in times[impl]]
            mem, outputs[impl] = memory(impl, inp, bits, case)
            rows[impl].update({"time ms": statistics.median(ts), "all ms": ts, **mem})
    for impl, r in rows.items():
        for col, ref in RATIOS:  # e.g. "time / fused": time ms over fused's time ms
            a, b = r.get(col), rows[ref].get(col)
            r[f"{col.split()[0]} / {ref}"] = a / b if a is not None and b else None
        if impl in outputs and "plain" in outputs:  # how far the results are from plain's
            (y, dx), (y_ref, dx_ref) = outputs[impl], outputs["plain"]
            r["max |y - plain|"] = (y.float() - y_ref.float()).abs().max().item()
            r["max |dx - plain|"] = (dx.float() - dx_ref.float()).abs().max().item()
    print("    " + ", ".join(f"{i} {r['time ms']:.2f} ms" for i, r in rows.items() if i in outputs))
    return list(rows.values())


def targets(rows: list[dict], device: str) -> list[dict]:
    checks = [("time / fused", TIME_TARGET), ("saved / plain", MEMORY_TARGET)]
    checks += [("peak / plain", MEMORY_TARGET)] if device == "cuda" else []
    out = []
    for r in (r for r in rows if r["impl"] == "ours (compiled)"):
        for ratio, limit in checks:
            ok = r[ratio] is not None and r[ratio] <= limit
            out.append(dict(case=r["case"], target=f"{ratio} <= {limit}", value=r[ratio], ok=ok))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    p.add_argument("--repeats", type=int, help="timed steps per case (default 10 CPU, 50 CUDA)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--json", default="output/benchmark_quantizer.json")
    args = p.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        print("CUDA is not available: skipping it")
        devices.remove("cuda")
    result = dict(torch=torch.__version__, cpu_count=os.cpu_count(), devices={})
    result.update(threads=torch.get_num_threads(), bits=args.bits, warmup=args.warmup)
    for device in devices:
        repeats = args.repeats or (10 if device == "cpu" else 50)
        name = torch.cuda.get_device_name() if device == "cuda" else platform.machine()
        print(f"== {device} ({name}): {args.warmup} warm-up + {repeats} timed steps per case")
        rows = []
        for case in cases(device):
            print(f"  {case['name']} ...", flush=True)
            rows += bench_case(case, device, args.bits, args.warmup, repeats)
        graphs = counters["stats"]["unique_graphs"]
        print(f"  (torch.compile has built {graphs} graphs so far)")
        cols = [c for c in COLUMNS.split("|") if device == "cuda" or not c.startswith("peak")]
        table = [[r.get(c) for c in cols] for r in rows]
        print("\nsaved MiB = bytes saved for backward (unique storages, input included)")
        print(tabulate(table, cols, tablefmt="github", floatfmt=".2f", missingval="n/a"))
        checks = targets(rows, device)
        print(f"\ntargets ({device}, ours (compiled)):")
        for c in checks:
            value = "n/a" if c["value"] is None else f"{c['value']:.2f}"
            print(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['case']}: {c['target']} (is {value})")
        result["devices"][device] = dict(
            name=name,
            repeats=repeats,
            cases=cases(device),
            rows=rows,
            targets=checks,
            compiled_graphs=graphs,
        )
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
