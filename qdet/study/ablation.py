"""QFD's Table 8 for one transformer backbone (``tools/ablation_transformer.py``): FP,
8/8, 6/6, 4/4, MHA-only and MLP-only 4/4, its rows and its table.

Digits rows use configs/digits/{arch}_tiny_*.yaml: the FP model is trained from scratch,
every quantized row is fine-tuned from it, and a control row fine-tunes it just as long in
FP (8/8 and 6/6 override the 4-bit config's bits). COCO rows use configs/{arch}_b_*.yaml as
they are (each from the pretrained backbone, the paper's schedule). Each row reports box
and mask AP, how many Linear layers it quantizes and their share of the transformer's
parameters (:func:`quantized_share`). :func:`run_study` runs the yacs rows as a
:class:`~qdet.study.Study`; :func:`run_lazy` the same rows from configs/lazy (ViTDet).
"""

from __future__ import annotations

import os

from detectron2.config import LazyConfig
from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng

from qdet.engine import lazy
from qdet.engine.stages import train
from qdet.quantization import Quantizer
from qdet.quantization.layers import QUANTIZED_LAYERS
from qdet.study.runner import Study, StudyRow, spread

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


def run_lazy(
    arch: str,
    coco: bool,
    out: str,
    opts: list[str],
    finetune_seeds: list[int] | None = None,
    rows: list[str] | None = None,
    num_gpus: int = 1,
) -> tuple[list[dict], dict]:
    """Table 8 from the LazyConfigs: every run trained (unless finished) and evaluated by
    ``qdet.engine.lazy.final_metrics``, one after another."""
    if arch != "vitdet":
        raise ValueError("--lazy runs ViTDet (configs/lazy holds ViTDet configs, no Swin)")
    seeds = finetune_seeds or [0]
    runs: dict[str, list[dict]] = {}
    configs = {}
    for seed in seeds:
        for suffix, label, cfg in lazy_run_configs(coco, out, opts, seed, rows):
            if suffix == "fp" and suffix in runs:
                continue  # one FP model for every seed
            seed_all_rng(0 if suffix == "fp" else seed)  # the same data order per seed
            runs.setdefault(suffix, []).append(lazy.final_metrics(cfg, num_gpus))
            configs[suffix] = (label, cfg)
    table = [
        table_row(label, runs[s], lazy.build_model(cfg), cfg.train.max_iter, bool(finetune_seeds))
        for s, (label, cfg) in configs.items()
    ]
    return table, runs


def run_study(
    arch: str,
    coco: bool,
    out: str,
    opts: list[str],
    finetune_seeds: list[int] | None = None,
    jobs: int = 1,
    rows: list[str] | None = None,
    num_gpus: int = 1,
) -> tuple[list[dict], dict]:
    """Table 8 from the yacs configs (a :class:`Study`)."""
    study = build_study(arch, coco, out, opts, finetune_seeds, jobs)
    if rows:  # the digits fine-tunes start from the FP row, so it always runs
        wanted = set(rows) | (set() if coco else {"fp"})
        study.rows = {n: r for n, r in study.rows.items() if n in wanted}
    if coco and num_gpus > 1:
        study.train_fn = lambda cfg: launch(train, num_gpus, args=(cfg, False))
    results = study.run()
    table, seeds = [], study.seeds
    for row in study.rows.values():
        runs = [results[row.name][s] for s in (seeds if row.per_seed else seeds[:1])]
        cfg = study.config(row, seeds[0])
        iters = cfg.SOLVER.MAX_ITER
        table.append(table_row(row.label, runs, build_model(cfg), iters, bool(finetune_seeds)))
    return table, results
