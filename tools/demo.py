#!/usr/bin/env python
"""`make demo`: quantize a Detectron2 RetinaNet-R18 to 4 bits on the embedded digits data.

What it does today (the foundation): builds the embedded dataset, builds a RetinaNet-R18
for its 10 classes, swaps every conv but the stem and the predictors for 4-bit quantized
ones, calibrates the quantizers on training batches, runs a 4-bit forward/backward step,
and exports the integer weights, printing the layer table, the calibrated ranges and the
export size. Training the FP teacher and the QFD student (the full demo) comes with the
distillation trainer.
"""

from __future__ import annotations

import argparse
import time

import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import qdet  # noqa: F401  (registers qdet_digits_*)
from qdet.config import add_qdet_config, quantize_kwargs
from qdet.quantization import (
    calibrate,
    dequantize_weights,
    export_int_weights,
    export_size_bytes,
    quantization_table,
    quantize_model,
)


def _cfg(bits: int):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    add_qdet_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RETINANET.NUM_CLASSES = 10
    cfg.DATASETS.TRAIN = ("qdet_digits_train",)
    cfg.INPUT.MIN_SIZE_TRAIN = (160,)
    cfg.INPUT.MAX_SIZE_TRAIN = 192
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.QUANT.ENABLED = True
    cfg.QUANT.W_BITS = cfg.QUANT.A_BITS = bits
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument(
        "--calib-batches", type=int, default=None, help="default: QUANT.CALIB_BATCHES"
    )
    args = parser.parse_args()
    t0 = time.time()
    print("[demo] building / loading the embedded digits dataset ...", flush=True)
    print(f"[demo] {len(DatasetCatalog.get('qdet_digits_train'))} training images")
    cfg = _cfg(args.bits)
    calib_batches = args.calib_batches or cfg.QUANT.CALIB_BATCHES
    torch.manual_seed(0)
    model = build_model(cfg)
    names = quantize_model(model, **quantize_kwargs(cfg))
    print(f"[demo] quantized {len(names)} layers to W{args.bits}/A{args.bits}:")
    print(quantization_table(model))

    loader = build_detection_train_loader(cfg, mapper=DatasetMapper(cfg, is_train=True))
    batches = iter(loader)
    print(f"[demo] calibrating on {calib_batches} batches ...", flush=True)
    inputs = calibrate(model, batches, num_batches=calib_batches)
    for name in list(inputs)[:3] + list(inputs)[-2:]:
        q = inputs[name]
        sign = "signed" if q.signed else "unsigned"
        print(f"  {name:55s} {sign:8s} l={q.lower.item():+.3f} u={q.upper.item():+.3f}")

    model.train()
    with EventStorage():
        losses = model(next(batches))
    sum(losses.values()).backward()
    print(
        "[demo] one 4-bit training step: "
        + ", ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
    )

    exported = export_int_weights(model)
    decoded = dequantize_weights(exported)
    exact = all(
        torch.equal(w, model.get_submodule(n).weight_quantizer(model.get_submodule(n).weight))
        for n, w in decoded.items()
    )
    size = export_size_bytes(exported)
    print(
        f"[demo] integer export: {size['int_bytes'] / 2**20:.2f} MiB vs FP32 "
        f"{size['fp32_bytes'] / 2**20:.2f} MiB ({size['fp32_bytes'] / size['int_bytes']:.1f}x "
        f"smaller); round trip bit-exact: {exact}"
    )
    print(f"[demo] done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
