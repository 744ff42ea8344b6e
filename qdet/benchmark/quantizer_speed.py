"""How fast and how lean qdet's uniform fake-quantization op is (the op behind
``UniformQuantizer``), alone and inside one quantized conv, against its peers
(``tools/benchmark_quantizer.py``).

Measures one training step, forward + ``y.backward(grad)``, of

* ours (compiled) / ours (eager): ``qdet.quantization.fake_quantize`` with the
  ``torch.compile`` and the eager backend of ``functional.set_backend``;
* plain: ``fake_quant_reference``, the same formula as a plain autograd composition;
* fused: ``torch._fake_quantize_learnable_per_tensor_affine``, PyTorch's fused LSQ kernel
  (behind torch.ao's ``_LearnableFakeQuantize``), with learnable scale and zero point.

Per case it reports the median wall time over ``repeats`` steps, after ``warmup``
untimed steps (the compiled backend compiles on its first calls), with the implementations
run round-robin so drift hits all alike; the bytes autograd saves for backward (unique
storages, the input included when it is saved); on CUDA also the allocator's peak during
the step above what was allocated before it (inputs excluded). A plain copy of the same
tensor runs in the same rounds: "GB/s" is a step's least traffic (5 passes over the
tensor: x in, y out; gradient and x in, x's gradient out) over its time, against the
copy's 2 passes. Then the targets: ours (compiled) time <= 1.5x fused, and ours
(compiled) memory <= 0.5x plain; on CUDA also ours >= 0.7x the copy's bandwidth. Each
implementation's largest difference from plain (y and x.grad) goes with its row; the
fused kernel uses LSQ's grid (2^b levels, rounded zero point) and masks gradients by the
rounded value, so it is a speed and memory reference, not a numerical one.
"""

from __future__ import annotations

import platform
import statistics
import time
from contextlib import nullcontext

import torch
from detectron2.layers import Conv2d
from tabulate import tabulate
from torch._dynamo.utils import counters

from qdet.benchmark.peers import BREVITAS_NOTE, BrevitasConv, brevitas_version
from qdet.quantization import QConv2d, calibrate, fake_quant_reference, fake_quantize
from qdet.quantization.functional import (
    MODE_SIGNED,
    MODE_UNSIGNED,
    MODE_WEIGHT,
    set_backend,
)

IMPLS = ("ours (compiled)", "ours (eager)", "plain", "fused")
COPY = "copy (reference)"
COLUMNS = (
    "case|impl|time ms|time / fused|time / plain|GB/s|GB/s / copy|saved MiB|saved / plain|"
    "peak MiB|peak / plain"
)
# Bandwidth: a quantizer step must at least read x and write y (forward), read the output
# gradient and x and write x's gradient (backward): 5 passes over the tensor; a copy 2.
STEP_PASSES, COPY_PASSES = 5, 2
BANDWIDTH_TARGET = 0.7  # ours (compiled) GB/s over the copy's, on CUDA
RATIOS = (("time ms", "fused"), ("time ms", "plain"), ("saved MiB", "plain"), ("peak MiB", "plain"))
TIME_TARGET, MEMORY_TARGET = 1.5, 0.5  # ours vs fused time, ours vs plain memory
LAYER_TARGET = 1.05  # one quantized conv (compiled, code saving) vs the FP conv


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


def copy_step(inp: dict) -> float:
    """One plain copy of the input, the bandwidth this device reaches on the tensor."""
    sync = torch.cuda.synchronize if inp["x"].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    inp["x"].clone()
    sync()
    return time.perf_counter() - start


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
    times: dict[str, list[float]] = {impl: [] for impl in (*IMPLS, COPY)}
    errors: dict[str, str] = {}
    for i in range(warmup + repeats):
        for impl in (*IMPLS, COPY):  # round-robin, so drift affects every implementation alike
            if impl in errors:
                continue
            try:
                t = copy_step(inp) if impl == COPY else step(impl, inp, bits, case)[0]
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
    tensor_gb = inp["x"].numel() * inp["x"].element_size() / 1e9
    copy_ms = statistics.median(times[COPY]) * 1e3
    rows[COPY] = {"case": case["name"], "impl": COPY, "time ms": copy_ms, "error": None}
    rows[COPY]["GB/s"] = COPY_PASSES * tensor_gb / (copy_ms / 1e3)
    for r in rows.values():
        if r["impl"] != COPY and r.get("time ms"):
            r["GB/s"] = STEP_PASSES * tensor_gb / (r["time ms"] / 1e3)
            r["GB/s / copy"] = r["GB/s"] / rows[COPY]["GB/s"]
    for impl, r in rows.items():
        for col, ref in RATIOS if impl != COPY else ():  # "time / fused": over fused's
            a, b = r.get(col), rows[ref].get(col)
            r[f"{col.split()[0]} / {ref}"] = a / b if a is not None and b else None
        if impl in outputs and "plain" in outputs:  # how far the results are from plain's
            (y, dx), (y_ref, dx_ref) = outputs[impl], outputs["plain"]
            r["max |y - plain|"] = (y.float() - y_ref.float()).abs().max().item()
            r["max |dx - plain|"] = (dx.float() - dx_ref.float()).abs().max().item()
    print("    " + ", ".join(f"{i} {r['time ms']:.2f} ms" for i, r in rows.items() if i in outputs))
    return list(rows.values())


def targets(rows: list[dict], device: str) -> list[dict]:
    checks = [("time / fused", "<=", TIME_TARGET), ("saved / plain", "<=", MEMORY_TARGET)]
    if device == "cuda":
        checks += [("peak / plain", "<=", MEMORY_TARGET)]
        checks += [("GB/s / copy", ">=", BANDWIDTH_TARGET)]
    out = []
    for r in (r for r in rows if r["impl"] == "ours (compiled)"):
        for ratio, op, limit in checks:
            value = r.get(ratio)
            ok = value is not None and (value <= limit if op == "<=" else value >= limit)
            target = f"{ratio} {op} {limit}"
            out.append(dict(case=r["case"], target=target, value=value, ok=ok))
    return out


LAYER_SHAPE = (2, 256, 50, 84)  # a post-ReLU RetinaNet-R50 res3/p3-sized input
LAYERS = (
    "FP conv",
    "qdet compiled, code saving",
    "qdet compiled, float saving",
    "qdet eager, code saving",
    "qdet eager, float saving",
    "brevitas",
    "torch.ao fused LSQ",
)


def make_layers(device: str, bits: int, x: torch.Tensor) -> dict:
    """One 3x3 conv 256 -> 256 as FP, qdet's QConv2d (calibrated on ``x``; two backends x
    two saving modes), Brevitas (when installed) and torch.ao's fused learnable
    fake-quant on input and weight."""
    torch.manual_seed(0)
    fp = Conv2d(256, 256, 3, padding=1, bias=False).to(device)
    layers = {"FP conv": fp}
    for backend in ("compiled", "eager"):
        for codes in (True, False):
            q = QConv2d.from_float(fp, bits, bits, act_signed=False)
            calibrate(q, [x], num_batches=1)
            q.save_codes = codes
            layers[f"qdet {backend}, {'code' if codes else 'float'} saving"] = q
    if brevitas_version():
        layers["brevitas"] = BrevitasConv(fp, bits, signed_input=False).to(device)
    q_in, q_w = 2**bits - 1, 2 ** (bits - 1)
    a_scale = (x.max() / q_in).item()
    w_scale = (3 * fp.weight.std() / q_w).item()
    ao = {
        "a": (torch.tensor([a_scale], device=device), torch.tensor([0.0], device=device)),
        "w": (torch.tensor([w_scale], device=device), torch.tensor([0.0], device=device)),
    }
    for t in (*ao["a"], *ao["w"]):
        t.requires_grad_(True)

    def torch_ao(inp):
        xq = torch._fake_quantize_learnable_per_tensor_affine(inp, *ao["a"], 0, q_in, 1.0)
        wq = torch._fake_quantize_learnable_per_tensor_affine(
            fp.weight, *ao["w"], -q_w, q_w - 1, 1.0
        )
        return torch.nn.functional.conv2d(xq, wq, padding=1)

    layers["torch.ao fused LSQ"] = torch_ao
    return layers


def layer_step(name: str, layer, x: torch.Tensor, grad: torch.Tensor) -> float:
    xr = x.clone().requires_grad_(True)
    if name.startswith("qdet"):
        set_backend("compile" if "compiled" in name else "eager")
    start = time.perf_counter()
    layer(xr).backward(grad)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def layer_saved_mib(name: str, layer, x: torch.Tensor, grad: torch.Tensor) -> float:
    """MiB autograd saves for the layer's backward (unique storages), after any packing
    the layer does (qdet's code saving hands uint8 codes to the outer hook)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer_step(name, layer, x, grad)
    return sum(saved.values()) / 2**20


def bench_layer(device: str, bits: int, warmup: int, repeats: int) -> list[dict]:
    """One quantized conv, forward + backward, against the FP conv and the peers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(LAYER_SHAPE, generator=g).relu().to(device)
    grad = torch.randn(LAYER_SHAPE, generator=g).to(device)
    layers = make_layers(device, bits, x)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for i in range(warmup + repeats):
        for name, layer in layers.items():  # round-robin
            t = layer_step(name, layer, x, grad)
            if i >= warmup:
                times[name].append(t)
    set_backend("auto")
    rows = []
    for name in LAYERS:
        if name not in layers:
            rows.append({"layer": name, "note": BREVITAS_NOTE})
            continue
        rows.append(
            {
                "layer": name,
                "time ms": 1e3 * statistics.median(times[name]),
                "all ms": [1e3 * t for t in times[name]],
                "saved MiB": layer_saved_mib(name, layers[name], x, grad),
            }
        )
    for r in rows:
        if "time ms" in r:
            r["time / FP"] = r["time ms"] / rows[0]["time ms"]
            r["saved / FP"] = r["saved MiB"] / rows[0]["saved MiB"]
    return rows


def layer_targets(rows: list[dict]) -> list[dict]:
    """qdet's default layer (compiled, code saving) <= 1.05x the FP conv, and faster than
    Brevitas's (when it ran)."""
    by_name = {r["layer"]: r for r in rows}
    ours = by_name["qdet compiled, code saving"]
    out = [
        dict(
            case="one layer",
            target=f"qdet (compiled, code saving) time / FP <= {LAYER_TARGET}",
            value=ours["time / FP"],
            ok=ours["time / FP"] <= LAYER_TARGET,
        )
    ]
    if "time ms" in by_name["brevitas"]:
        ratio = ours["time ms"] / by_name["brevitas"]["time ms"]
        target = "qdet / brevitas time < 1"
        out.append(dict(case="one layer", target=target, value=ratio, ok=ratio < 1))
    return out


def bench_device(device: str, bits: int, warmup: int, repeats: int, section: str) -> dict:
    """One device: the op's cases and / or one layer (``section``: all, ops, layer), their
    tables and targets printed as they come; returns the device's entry of the JSON."""
    name = torch.cuda.get_device_name() if device == "cuda" else platform.machine()
    print(f"== {device} ({name}): {warmup} warm-up + {repeats} timed steps per case")
    rows, checks = [], []
    if section in ("all", "ops"):
        for case in cases(device):
            print(f"  {case['name']} ...", flush=True)
            rows += bench_case(case, device, bits, warmup, repeats)
        cols = [c for c in COLUMNS.split("|") if device == "cuda" or not c.startswith("peak")]
        table = [[r.get(c) for c in cols] for r in rows]
        print("\nsaved MiB = bytes saved for backward (unique storages, input included)")
        print(tabulate(table, cols, tablefmt="github", floatfmt=".2f", missingval="n/a"))
        checks = targets(rows, device)
    layer_rows = []
    if section in ("all", "layer"):
        shape = "x".join(map(str, LAYER_SHAPE))
        print(f"\n  one layer: 3x3 conv 256->256 on {shape}, W/A {bits} ...", flush=True)
        layer_rows = bench_layer(device, bits, warmup, repeats)
        cols = ["layer", "time ms", "time / FP", "saved MiB", "saved / FP", "note"]
        table = [[r.get(c) for c in cols] for r in layer_rows]
        print(tabulate(table, cols, tablefmt="github", floatfmt=".2f", missingval=""))
        checks += layer_targets(layer_rows)
    graphs = counters["stats"]["unique_graphs"]
    print(f"\n(torch.compile has built {graphs} graphs in this run)")
    print(f"targets ({device}):")
    for c in checks:
        value = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['case']}: {c['target']} (is {value})")
    return dict(
        layer=layer_rows,
        name=name,
        repeats=repeats,
        cases=cases(device),
        rows=rows,
        targets=checks,
        compiled_graphs=graphs,
    )
