#!/usr/bin/env python
"""QFD's Table 8 for one transformer backbone: FP, 8/8, 6/6, 4/4, MHA-only and MLP-only 4/4.

    tools/ablation_transformer.py --arch vitdet                  # tiny ViTDet, digits, CPU
    tools/ablation_transformer.py --arch swin
    tools/ablation_transformer.py --arch vitdet --coco --num-gpus 8   # ViTDet-B on COCO

Digits rows use configs/digits/{arch}_tiny_*.yaml: the FP model is trained from scratch,
every quantized row is fine-tuned from it, and a control row fine-tunes it just as long in
FP (8/8 and 6/6 override the 4-bit config's bits). COCO rows use configs/{arch}_b_*.yaml as they
are (each from the pretrained backbone, the paper's schedule), one after another through
Detectron2's launcher. Each row reports box and mask AP, how many Linear layers it
quantizes and their share of the transformer's parameters (``backbone.net`` of ViTDet,
``backbone.bottom_up`` of Swin, quantizer parameters not counted). Writes
``<out>/table8_<arch>.md`` and ``.json`` (the table and every run's figures); finished
runs are reused. ``--finetune-seeds 1 2 3`` repeats each digits fine-tune with those seeds
(mean ± sample std) from the one FP model, to show run-to-run noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

# (row label, config suffix): COCO rows use configs/{arch}_b_{suffix}.yaml as they are.
ROWS = (
    ("FP", "fp"),
    ("8/8", "8bit"),
    ("6/6", "6bit"),
    ("4/4", "4bit"),
    ("4/4 MHA only", "4bit_mha"),
    ("4/4 MLP only", "4bit_mlp"),
)
# On the digits data every quantized row is a fine-tune of the FP model, so a control row
# fine-tunes it just as long without quantization: it tells the bits' effect apart from
# that of the extra iterations.
DIGITS_CONTROL = ("FP, same fine-tune", "fp_finetune")
# Digits rows without a YAML of their own: (config suffix, overrides).
DIGITS_DERIVED = {
    "8bit": ("4bit", ["QUANT.W_BITS", "8", "QUANT.A_BITS", "8"]),
    "6bit": ("4bit", ["QUANT.W_BITS", "6", "QUANT.A_BITS", "6"]),
    "fp_finetune": ("4bit", ["QUANT.ENABLED", "False"]),
}


def row_config(
    arch: str, suffix: str, coco: bool, out: str, extra: list[str], seed: int | None = None
):
    """One row's config; ``seed`` (digits fine-tunes) overrides SEED, in a folder of its own
    unless it is the YAML's seed."""
    opts = list(extra)
    if coco:
        path = f"configs/{arch}_b_{suffix}.yaml"
    else:
        base, overrides = DIGITS_DERIVED.get(suffix, (suffix, []))
        path = f"configs/digits/{arch}_tiny_{base}.yaml"
        opts += overrides
        if suffix != "fp":
            opts += ["MODEL.WEIGHTS", os.path.join(out, arch, "fp", "model_final.pth")]
    cfg = load_config(path, opts)
    run_dir = suffix if seed in (None, cfg.SEED) else f"{suffix}_seed{seed}"
    cfg.SEED = cfg.SEED if seed is None else seed
    cfg.OUTPUT_DIR = os.path.join(out, arch, run_dir)
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


METRICS = ("box AP", "AP50", "AP75", "mask AP", "mask AP50", "mask AP75")


def run_row(cfg, args) -> dict:
    """Trains ``cfg`` unless its final model exists, then its (cached) final evaluation and
    training time."""
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    timing = os.path.join(cfg.OUTPUT_DIR, "train_seconds.json")
    if os.path.isfile(final):
        print(f"[ablation]   reusing {final}", flush=True)
    else:
        print(f"[ablation]   training {cfg.SOLVER.MAX_ITER} it, seed {cfg.SEED}", flush=True)
        start = time.time()
        if args.coco and args.num_gpus > 1:
            launch(train, args.num_gpus, args=(cfg, False))
        else:
            train(cfg, resume=False)
        with open(timing, "w") as f:
            json.dump({"seconds": time.time() - start, "iters": cfg.SOLVER.MAX_ITER}, f)
    seconds = float("nan")
    if os.path.isfile(timing):  # a reused run keeps the time it took when trained
        with open(timing) as f:
            seconds = json.load(f)["seconds"]
    m = evaluate_final(cfg)
    return {"W/A": m["W/A"], "box AP": m["AP"], "train s": seconds} | {
        key: m[key] for key in METRICS[1:]
    }


def spread(values: list[float], fmt: str = ".1f") -> str:
    """``mean`` for one run, ``mean ± sample std`` for several."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def per_seed(runs: list[dict]) -> str:
    return ", ".join(f"{r['box AP']:.1f}" for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=("vitdet", "swin"))
    parser.add_argument("--coco", action="store_true", help="the -B models on COCO")
    parser.add_argument("--num-gpus", type=int, default=1, help="COCO rows: GPUs per run")
    parser.add_argument(
        "--finetune-seeds",
        type=int,
        nargs="+",
        help="digits: run every fine-tune row (not the FP model) once per seed; default: "
        "the config's SEED",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=[suffix for _, suffix in (*ROWS, DIGITS_CONTROL)],
        help="only these rows (by config suffix); default: all",
    )
    parser.add_argument("--out", default="output/ablation")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, every row")
    args = parser.parse_args()
    setup_logger(name="qdet")
    plan = ROWS if args.coco else (ROWS[0], DIGITS_CONTROL, *ROWS[1:])
    if args.rows:  # the digits fine-tunes start from the FP row, so it always runs
        plan = [(label, s) for label, s in plan if s in args.rows or (s == "fp" and not args.coco)]
    rows, raw, t0 = [], {}, time.time()
    for i, (label, suffix) in enumerate(plan, 1):
        fine_tune = not args.coco and suffix != "fp"
        runs = []
        for seed in args.finetune_seeds if fine_tune and args.finetune_seeds else [None]:
            cfg = row_config(args.arch, suffix, args.coco, args.out, args.opts, seed)
            print(
                f"[ablation] {i}/{len(plan)} {label} ({time.time() - t0:.0f} s so far)", flush=True
            )
            runs.append(run_row(cfg, args) | {"seed": cfg.SEED})
        raw[label] = runs
        count, share = quantized_share(cfg)
        rows.append(
            {
                "row": label,
                "W/A": runs[0]["W/A"],
                **{key: spread([r[key] for r in runs]) for key in METRICS},
                **({"box AP per seed": per_seed(runs)} if args.finetune_seeds else {}),
                "quantized Linear": count,
                "backbone params quantized": f"{share:.1%}",
                "iters": cfg.SOLVER.MAX_ITER,
                "train s": spread([r["train s"] for r in runs], ".0f"),
            }
        )
    data = "COCO val2017" if args.coco else "qdet_digits_val"
    header = (
        f"Table 8 shape, {args.arch} Mask R-CNN on {data} (`tools/ablation_transformer.py "
        f"{' '.join(sys.argv[1:])}`, {time.time() - t0:.0f} s)\n\n"
    )
    table = tabulate(rows, headers="keys", tablefmt="github", floatfmt=".1f")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"table8_{args.arch}{'_seeds' if args.finetune_seeds else ''}")
    with open(stem + ".md", "w") as f:
        f.write(header + table + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"rows": rows, "runs": raw}, f, indent=1)
    print("\n" + header + table)


if __name__ == "__main__":
    main()
