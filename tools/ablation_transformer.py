#!/usr/bin/env python
"""QFD's Table 8 for one transformer backbone: FP, 8/8, 6/6, 4/4, MHA-only and MLP-only 4/4.

    tools/ablation_transformer.py --arch vitdet                  # tiny ViTDet, digits, CPU
    tools/ablation_transformer.py --arch swin
    tools/ablation_transformer.py --arch vitdet --coco --num-gpus 8   # ViTDet-B on COCO
    tools/ablation_transformer.py --arch vitdet --lazy           # the same from configs/lazy

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
import sys
import time

import quiet_console  # noqa: F401  (first: quiets third-party warnings in a tool's console)
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.engine import launch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import qdet  # noqa: E402,F401  (registers qdet's datasets, models and backbones)
from qdet.engine.cli import run_cli  # noqa: E402
from qdet.engine.stages import train  # noqa: E402
from qdet.quantization import Quantizer  # noqa: E402
from qdet.quantization.layers import QUANTIZED_LAYERS  # noqa: E402
from qdet.study import Study, StudyRow, spread  # noqa: E402

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


def build_study(
    arch: str,
    coco: bool,
    out: str,
    opts: list[str],
    seeds: list[int] | None = None,
    jobs: int = 1,
) -> Study:
    """Table 8's rows as a :class:`Study`. Digits: the FP model once (its YAML's SEED), the
    fine-tunes from it, once per seed of ``seeds`` (default: the YAML's SEED only). COCO:
    every row from its own YAML as it is."""
    rows = []
    plan = ROWS if coco else (ROWS[0], DIGITS_CONTROL, *ROWS[1:])
    for label, suffix in plan:
        if coco:
            rows.append(StudyRow(suffix, label, f"configs/{arch}_b_{suffix}.yaml", per_seed=False))
            continue
        base, overrides = DIGITS_DERIVED.get(suffix, (suffix, []))
        config = f"configs/digits/{arch}_tiny_{base}.yaml"
        if suffix == "fp":
            rows.append(StudyRow(suffix, label, config, per_seed=False))
        else:
            rows.append(
                StudyRow(suffix, label, config, tuple(overrides), init="fp", per_seed=bool(seeds))
            )
    return Study(rows, seeds or [0], os.path.join(out, arch), opts, tag="ablation", jobs=jobs)


def quantized_share(model) -> tuple[int, float]:
    """(quantized Linear layers, their share of the transformer's parameters)."""
    net = getattr(model.backbone, "net", None) or model.backbone.bottom_up

    def weights(module):
        return sum(p.numel() for p in module.parameters(recurse=False))

    total = sum(weights(m) for m in net.modules() if not isinstance(m, Quantizer))
    layers = [m for m in net.modules() if isinstance(m, QUANTIZED_LAYERS)]
    return len(layers), sum(weights(m) for m in layers) / total


METRICS = ("AP", "AP50", "AP75", "mask AP", "mask AP50", "mask AP75")


def per_seed(runs: list[dict]) -> str:
    return ", ".join(f"{r['AP']:.1f}" for r in runs)


def table_row(label: str, runs: list[dict], model, iters: int, seeds: bool) -> dict:
    """One line of the table: the runs' figures (mean ± std over seeds), what ``model``
    quantizes, the schedule."""
    count, share = quantized_share(model)
    return {
        "row": label,
        "W/A": runs[0]["W/A"],
        **{("box AP" if k == "AP" else k): spread([r[k] for r in runs]) for k in METRICS},
        **({"box AP per seed": per_seed(runs)} if seeds else {}),
        "quantized Linear": count,
        "backbone params quantized": f"{share:.1%}",
        "iters": iters,
        "train s": spread([r.get("train s", float("nan")) for r in runs], ".0f"),
    }


# The LazyConfig rows (--lazy, ViTDet): configs/lazy/digits/vitdet_tiny_<suffix>.py, or
# with --coco configs/lazy/mask_rcnn_vitdet_b_<suffix>.py; derived rows change cfg.quant.
LAZY_CONFIGS = {
    False: "configs/lazy/digits/vitdet_tiny_{}.py",
    True: "configs/lazy/mask_rcnn_vitdet_b_{}.py",
}
LAZY_DERIVED = {
    "8bit": ("4bit", {"w_bits": 8, "a_bits": 8}),
    "6bit": ("4bit", {"w_bits": 6, "a_bits": 6}),
    "fp_finetune": ("4bit", {"enabled": False}),
}


def lazy_run_configs(coco: bool, out: str, opts: list[str], seed: int, rows=None) -> list:
    """[(suffix, label, LazyConfig)] of Table 8 from the lazy configs. Digits: the FP model
    (trained once, seed 0) and every fine-tune from it with ``seed``. COCO: the quantized
    rows, each from its config's ``train.init_checkpoint`` (the FP ViTDet-B, whose AP is
    upstream's or your own run's: no FP row)."""
    from detectron2.config import LazyConfig

    root = os.path.join(out, "lazy_vitdet_coco" if coco else "lazy_vitdet")
    fp_final = os.path.join(root, "fp", "model_final.pth")
    plan = ROWS[1:] if coco else (ROWS[0], DIGITS_CONTROL, *ROWS[1:])
    runs = []
    for label, suffix in plan:
        if rows and suffix not in rows and not (suffix == "fp" and not coco):
            continue
        base, quant = LAZY_DERIVED.get(suffix, (suffix, None))
        cfg = LazyConfig.load(LAZY_CONFIGS[coco].format(base))
        if quant is not None:
            cfg.quant = quant if "enabled" in quant else {**cfg.quant, **quant}
        cfg = LazyConfig.apply_overrides(cfg, opts)
        if suffix == "fp":
            cfg.train.output_dir = os.path.dirname(fp_final)
        else:
            cfg.train.output_dir = os.path.join(root, f"seed{seed}", suffix)
            if not coco:
                cfg.train.init_checkpoint = fp_final
        runs.append((suffix, label, cfg))
    return runs


def run_lazy(args) -> tuple[list[dict], dict]:
    """Table 8 from the LazyConfigs: every run trained (unless finished) and evaluated by
    ``qdet.engine.lazy.final_metrics``, one after another."""
    from detectron2.utils.env import seed_all_rng

    from qdet.engine import lazy

    setup_logger()  # Detectron2's training and evaluation progress lines

    if args.arch != "vitdet":
        raise ValueError("--lazy runs ViTDet (configs/lazy holds ViTDet configs, no Swin)")
    seeds = args.finetune_seeds or [0]
    runs: dict[str, list[dict]] = {}
    configs = {}
    for seed in seeds:
        for suffix, label, cfg in lazy_run_configs(args.coco, args.out, args.opts, seed, args.rows):
            if suffix == "fp" and suffix in runs:
                continue  # one FP model for every seed
            seed_all_rng(0 if suffix == "fp" else seed)  # the same data order per seed
            runs.setdefault(suffix, []).append(lazy.final_metrics(cfg, args.num_gpus))
            configs[suffix] = (label, cfg)
    rows = [
        table_row(
            label, runs[s], lazy.build_model(cfg), cfg.train.max_iter, bool(args.finetune_seeds)
        )
        for s, (label, cfg) in configs.items()
    ]
    return rows, runs


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
    parser.add_argument(
        "--lazy",
        action="store_true",
        help="the rows from configs/lazy (tools/lazy_train_net.py's trainer; ViTDet); "
        "overrides are key=value",
    )
    parser.add_argument("--out", default="output/ablation")
    parser.add_argument(
        "--jobs", type=int, default=1, help="digits rows trained at once (2 on a 2-core CPU)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, every row")
    parser.add_argument("--debug", action="store_true", help="tracebacks for bad input")
    args = parser.parse_args()
    run_cli(run, args, debug=args.debug)


def run_study(args) -> tuple[list[dict], dict]:
    """Table 8 from the yacs configs (a :class:`Study`)."""
    study = build_study(args.arch, args.coco, args.out, args.opts, args.finetune_seeds, args.jobs)
    if args.rows:  # the digits fine-tunes start from the FP row, so it always runs
        wanted = set(args.rows) | (set() if args.coco else {"fp"})
        study.rows = {n: r for n, r in study.rows.items() if n in wanted}
    if args.coco and args.num_gpus > 1:
        study.train_fn = lambda cfg: launch(train, args.num_gpus, args=(cfg, False))
    results = study.run()
    rows, seeds = [], study.seeds
    for row in study.rows.values():
        runs = [results[row.name][s] for s in (seeds if row.per_seed else seeds[:1])]
        cfg = study.config(row, seeds[0])
        iters = cfg.SOLVER.MAX_ITER
        rows.append(table_row(row.label, runs, build_model(cfg), iters, bool(args.finetune_seeds)))
    return rows, results


def run(args) -> None:
    setup_logger(name="qdet")
    if args.coco and args.jobs > 1:
        raise ValueError("--jobs is for the digits rows; COCO rows use --num-gpus")
    t0 = time.time()
    if args.lazy:
        rows, results = run_lazy(args)
    else:
        rows, results = run_study(args)
    data = "COCO val2017" if args.coco else "qdet_digits_val"
    header = (
        f"Table 8 shape, {args.arch} Mask R-CNN on {data} (`tools/ablation_transformer.py "
        f"{' '.join(sys.argv[1:])}`, {time.time() - t0:.0f} s)\n\n"
    )
    table = tabulate(rows, headers="keys", tablefmt="github", floatfmt=".1f")
    os.makedirs(args.out, exist_ok=True)
    name = f"table8_{'lazy_' if args.lazy else ''}{args.arch}"
    stem = os.path.join(args.out, name + ("_seeds" if args.finetune_seeds else ""))
    with open(stem + ".md", "w") as f:
        f.write(header + table + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"rows": rows, "runs": results}, f, indent=1)
    print("\n" + header + table)


if __name__ == "__main__":
    main()
