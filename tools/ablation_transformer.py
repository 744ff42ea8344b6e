#!/usr/bin/env python
"""QFD's Table 8 for one transformer backbone: FP, 8/8, 6/6, 4/4, MHA-only and MLP-only 4/4.

    tools/ablation_transformer.py --arch vitdet                  # tiny ViTDet, digits, CPU
    tools/ablation_transformer.py --arch swin
    tools/ablation_transformer.py --arch vitdet --coco --num-gpus 8   # ViTDet-B on COCO

Digits rows use configs/digits/{arch}_tiny_*.yaml: the FP model is trained from scratch and
every quantized row is fine-tuned from it. COCO rows use configs/{arch}_b_*.yaml as they
are (each from the pretrained backbone, the paper's schedule), one after another through
Detectron2's launcher. Each row reports box and mask AP, how many Linear layers it
quantizes and their share of the transformer's parameters (``backbone.net`` of ViTDet,
``backbone.bottom_up`` of Swin, quantizer parameters not counted). Writes
``<out>/table8_<arch>.md`` and ``.json``; finished rows are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.engine import launch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import qdet  # noqa: E402,F401  (registers qdet's datasets, models and backbones)
from qdet.engine.stages import evaluate_final, load_config, train  # noqa: E402
from qdet.quantization import Quantizer  # noqa: E402
from qdet.quantization.layers import QUANTIZED_LAYERS  # noqa: E402

# (row label, config suffix, overrides)
ROWS = (
    ("FP", "fp", []),
    ("8/8", "8bit", []),
    ("6/6", "6bit", []),
    ("4/4", "4bit", []),
    ("4/4 MHA only", "4bit_mha", []),
    ("4/4 MLP only", "4bit_mlp", []),
)
# The digits configs hold 4-bit rows only; 8/8 and 6/6 override their bits.
DIGITS_BITS = {"8bit": ("4bit", 8), "6bit": ("4bit", 6)}


def row_config(arch: str, suffix: str, coco: bool, out: str, extra: list[str]):
    opts = list(extra)
    if coco:
        path = f"configs/{arch}_b_{suffix}.yaml"
    else:
        base, bits = DIGITS_BITS.get(suffix, (suffix, None))
        path = f"configs/digits/{arch}_tiny_{base}.yaml"
        if bits:
            opts += ["QUANT.W_BITS", str(bits), "QUANT.A_BITS", str(bits)]
        if suffix != "fp":
            opts += ["MODEL.WEIGHTS", os.path.join(out, arch, "fp", "model_final.pth")]
    cfg = load_config(path, ["OUTPUT_DIR", os.path.join(out, arch, suffix), *opts])
    cfg.freeze()
    return cfg


def quantized_share(cfg) -> tuple[int, float]:
    """(quantized Linear layers, their share of the transformer's parameters)."""
    model = build_model(cfg)
    net = getattr(model.backbone, "net", None) or model.backbone.bottom_up

    def weights(module):
        return sum(p.numel() for p in module.parameters(recurse=False))

    total = sum(weights(m) for m in net.modules() if not isinstance(m, Quantizer))
    layers = [m for m in net.modules() if isinstance(m, QUANTIZED_LAYERS)]
    return len(layers), sum(weights(m) for m in layers) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=("vitdet", "swin"))
    parser.add_argument("--coco", action="store_true", help="the -B models on COCO")
    parser.add_argument("--num-gpus", type=int, default=1, help="COCO rows: GPUs per run")
    parser.add_argument("--out", default="output/ablation")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, every row")
    args = parser.parse_args()
    setup_logger(name="qdet")
    rows, t0 = [], time.time()
    for i, (label, suffix, _) in enumerate(ROWS, 1):
        cfg = row_config(args.arch, suffix, args.coco, args.out, args.opts)
        final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        seconds = None
        if os.path.isfile(final):
            print(f"[ablation] {i}/{len(ROWS)} {label}: reusing {final}", flush=True)
        else:
            print(
                f"[ablation] {i}/{len(ROWS)} {label}: training {cfg.SOLVER.MAX_ITER} it "
                f"({time.time() - t0:.0f} s so far)",
                flush=True,
            )
            start = time.time()
            if args.coco and args.num_gpus > 1:
                launch(train, args.num_gpus, args=(cfg, False))
            else:
                train(cfg, resume=False)
            seconds = time.time() - start
        metrics = evaluate_final(cfg)
        count, share = quantized_share(cfg)
        rows.append(
            {
                "row": label,
                "W/A": metrics["W/A"],
                "box AP": metrics["AP"],
                "AP50": metrics["AP50"],
                "AP75": metrics["AP75"],
                "mask AP": metrics["mask AP"],
                "mask AP50": metrics["mask AP50"],
                "mask AP75": metrics["mask AP75"],
                "quantized Linear": count,
                "backbone params quantized": f"{share:.1%}",
                "train s": f"{seconds:.0f}" if seconds is not None else "reused",
            }
        )
    data = "COCO val2017" if args.coco else "qdet_digits_val"
    header = (
        f"Table 8 shape, {args.arch} Mask R-CNN on {data} (`tools/ablation_transformer.py "
        f"--arch {args.arch}{' --coco' if args.coco else ''}`, {time.time() - t0:.0f} s)\n\n"
    )
    table = tabulate(rows, headers="keys", tablefmt="github", floatfmt=".1f")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"table8_{args.arch}")
    with open(stem + ".md", "w") as f:
        f.write(header + table + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    print("\n" + header + table)


if __name__ == "__main__":
    main()
