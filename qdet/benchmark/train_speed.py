"""Training-step time and memory of FP, 4-bit QAT and 4-bit QFD RetinaNet (or FP and
4-bit QAT ViTDet-B), as ratios to FP (``tools/benchmark_train.py``).

``vitdet``: ViTDet-B Mask R-CNN (configs/Base-QDet-ViTDet.yaml), "fp" and "qat"
(W4/A4 on every MHA and MLP Linear of the ViT; QFD is not used for ViTs in the paper).

Each variant is Detectron2's RetinaNet (FPN and head with BN, as qdet's COCO configs):
"fp" the plain model; "qat" the same with every conv but the stem and the predictors
quantized (W4/A4, calibrated; res2's quantizers frozen with its weights, FREEZE_AT 2 and
QUANT.FREEZE_WITH_WEIGHTS, so backward stops at res3 as FP's does);
"qat_frozen_layers_quantizers_train" with QUANT.FREEZE_WITH_WEIGHTS False (res2's
quantizers train); "qfd" the QAT model plus the frozen FP teacher's forward and
the QFD loss on p3; "brevitas" the FP model with the same convs as Brevitas W4/A4 layers
(:mod:`qdet.benchmark.peers`; skipped with a note when brevitas is not installed). One
step is forward, backward and an SGD update on a fixed batch with random boxes; the
variants run round-robin, the median over ``repeats`` after ``warmup`` is reported.
Memory: on CUDA the allocator's peak during a step above what was allocated before it; on
CPU (no allocator peak) the bytes autograd saves for the backward, which is what grows
with QAT. After the timing, :func:`recompiles_over_sizes` runs qat steps at a new input
size each and counts the torch.compile graphs built (0: no recompilation per image size).
"page faults / step" (minor faults, median) shows how much of a step went to fresh pages
from the OS; :func:`steady_malloc` pins glibc's malloc thresholds so that none does.
"""

from __future__ import annotations

import ctypes
import os
import resource
import statistics
import time
from contextlib import nullcontext

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch._dynamo.utils import counters

from qdet.benchmark.peers import BREVITAS_NOTE, brevitas_version, swap_to_brevitas
from qdet.config import add_qdet_config
from qdet.distill import Distiller, TermSpec
from qdet.quantization import calibrate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = os.path.join(ROOT, "configs/Base-QDet-RetinaNet.yaml")
VITDET = os.path.join(ROOT, "configs/Base-QDet-ViTDet.yaml")


def build_vitdet(device: str, quantized: bool, size: int):
    cfg = add_qdet_config(get_cfg())
    cfg.merge_from_file(VITDET)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.VIT.SQUARE_PAD = size
    cfg.MODEL.VIT.IMG_SIZE = size
    cfg.QUANT.ENABLED = quantized
    torch.manual_seed(0)
    return build_model(cfg)


def build(depth: int, device: str, quantized: bool, feature_tap: str = "", **quant_keys):
    cfg = add_qdet_config(get_cfg())
    cfg.merge_from_file(BASE)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.RESNETS.DEPTH = depth
    if depth < 50:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.NORM = cfg.MODEL.RETINANET.NORM = "BN"
    cfg.QUANT.ENABLED = quantized
    cfg.QUANT.FEATURE_TAP = feature_tap
    for key, value in quant_keys.items():
        cfg.QUANT[key] = value
    torch.manual_seed(0)
    return build_model(cfg)


def _box_mask(box: torch.Tensor, h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(h, w, dtype=torch.bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    mask[y0:y1, x0:x1] = True
    return mask


def make_batch(n: int, h: int, w: int, device: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(n):
        inst = Instances((h, w))
        xy = torch.rand(8, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 32 + torch.rand(8, 2, generator=g) * 200
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1).to(device))
        inst.gt_classes = torch.randint(0, 80, (8,), generator=g).to(device)
        inst.gt_masks = BitMasks(
            torch.stack([_box_mask(b, h, w) for b in inst.gt_boxes.tensor.cpu()]).to(device)
        )
        batch.append(
            {
                "image": torch.randint(0, 255, (3, h, w), generator=g).float(),
                "instances": inst,
                "height": h,
                "width": w,
            }
        )
    return batch


def vitdet_variants(device: str, batch: list[dict], size: int) -> dict:
    fp = build_vitdet(device, quantized=False, size=size)
    qat = build_vitdet(device, quantized=True, size=size)
    qat.load_state_dict(fp.state_dict(), strict=False)
    calibrate(qat, [batch], num_batches=1)
    return {"fp": fp, "qat": qat}


def variants(depth: int, device: str, batch: list[dict]) -> dict:
    fp = build(depth, device, quantized=False)
    qat = build(depth, device, quantized=True)
    qat.load_state_dict(fp.state_dict(), strict=False)
    qat_res2 = build(depth, device, quantized=True, FREEZE_WITH_WEIGHTS=False)
    qat_res2.load_state_dict(fp.state_dict(), strict=False)
    qfd = build(depth, device, quantized=True)
    qfd.load_state_dict(fp.state_dict(), strict=False)
    teacher = build(depth, device, quantized=False, feature_tap="p3")
    teacher.load_state_dict(fp.state_dict(), strict=False)
    for model in (qat, qat_res2, qfd, teacher):
        calibrate(model, [batch], num_batches=1)
    qfd.attach_distiller(Distiller(qfd, teacher, [TermSpec("qfd", ["p3"], 1.0)]))
    models = {"fp": fp, "qat": qat, "qat_frozen_layers_quantizers_train": qat_res2, "qfd": qfd}
    if brevitas_version():
        brevitas = build(depth, device, quantized=False)
        brevitas.load_state_dict(fp.state_dict())
        swapped = swap_to_brevitas(brevitas, qat, bits=4)
        print(f"[bench] brevitas {brevitas_version()}: {swapped} convs swapped (qdet's layers)")
        models["brevitas"] = brevitas.to(device)
    else:
        print(f"[bench] {BREVITAS_NOTE}")
    return models


def recompiles_over_sizes(model, optimizer, size: tuple[int, int], device: str, steps: int):
    """torch.compile graphs built during ``steps`` training steps whose input size changes
    every step (detector batches do): 0 means the quantizer's compiled op does not
    recompile per image size."""
    h, w = size
    # A backbone that pads to a square (ViTDet's SimpleFeaturePyramid) takes no side above it.
    square = getattr(model.backbone, "padding_constraints", {}).get("square_size", 0) or 10**9
    before = counters["stats"]["unique_graphs"]
    for i in range(steps):
        dh, dw = (37 * i) % 97 - 48, (53 * i) % 131 - 65  # sizes within about +-25%
        height, width = min(max(64, h + dh), square), min(max(64, w + dw), square)
        batch = make_batch(2, height, width, device)
        step(model, optimizer, batch, False, device)
    return counters["stats"]["unique_graphs"] - before


def step(model, optimizer, batch, amp: bool, device: str):
    ctx = torch.autocast(device, dtype=torch.float16) if amp else nullcontext()
    with EventStorage(), ctx:
        losses = model(batch)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()


def saved_bytes(model, batch, amp: bool, device: str) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ctx = torch.autocast(device, dtype=torch.float16) if amp else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), EventStorage(), ctx:
        losses = model(batch)
    sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def steady_malloc() -> None:
    """Pin glibc's trim and mmap thresholds (normally adaptive): freed memory stays in
    the process, so a step reuses pages instead of faulting in fresh ones. Applies to
    every variant alike; in a one-process round-robin, the adaptive thresholds make a
    variant pay faults for the heap the previous variant grew and freed."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError) as e:
        raise SystemExit(f"--steady-malloc needs glibc's mallopt ({e}); run without it") from e
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    for option in (m_trim_threshold, m_mmap_threshold):
        if mallopt(option, 1 << 30) != 1:
            raise SystemExit("--steady-malloc: glibc refused mallopt; run without it")


def sgd_optimizers(models: dict) -> dict:
    """Each variant's SGD over its trainable parameters."""
    return {
        k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        for k, m in models.items()
    }


def time_variants(
    models: dict, opts: dict, batch, device: str, amp: bool, warmup: int, repeats: int
) -> list[dict]:
    """Every variant's training step, round-robin: a row each (median step seconds, saved
    MiB, page faults per step, CUDA peak) with its ratios to the first (FP)."""
    cuda = device == "cuda"
    for m in models.values():
        m.train()
    times = {k: [] for k in models}
    peaks = {k: [] for k in models}
    faults = {k: [] for k in models}
    for i in range(warmup + repeats):
        for name, model in models.items():  # round-robin: drift hits every variant alike
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            step(model, opts[name], batch, amp, device)
            if cuda:
                torch.cuda.synchronize()
                peaks[name].append(torch.cuda.max_memory_allocated() - before)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - minflt)
        print(f"[bench] round {i + 1}/{warmup + repeats}", flush=True)
    rows = []
    for name, model in models.items():
        row = {
            "variant": name,
            "step s": statistics.median(times[name]),
            "saved MiB": saved_bytes(model, batch, amp, device) / 2**20,
            "page faults / step": statistics.median(faults[name]),
        }
        if cuda:
            row["peak MiB"] = max(peaks[name]) / 2**20
        rows.append(row)
    for row in rows:
        for key in ("step s", "saved MiB", "peak MiB"):
            if key in row:
                row[f"{key.split()[0]} / fp"] = row[key] / rows[0][key]
    return rows
