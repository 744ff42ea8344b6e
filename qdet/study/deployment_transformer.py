"""The deployment study of a transformer (``tools/deployment_study.py --arch vitdet`` or
``--arch swin``): does QAT beat onnxruntime's post-training quantizer on the digits tiny
ViTDet (or tiny Swin) Mask R-CNN, at which widths and by how much, measured on
whole-detector files (:mod:`qdet.export.whole`).

One FP model is trained once (row ``fp``, the config's SEED, as the transformer ablation's)
and every other row starts from it with the study's seed (SEED: the same batches for every
row of a seed; QFD's teacher is that FP model):

- ``ptq_onnxruntime_minmax``: onnxruntime's ``quantize_static`` (W8A8, MinMax, per-channel
  s8 / u8 QDQ) of the FP model's whole file, its learned layers only (backbone, RPN, box
  and mask heads, the mask head's sigmoid with it: :data:`qdet.export.peer.WHOLE_NETWORK`),
  calibrated on the first 64 training pictures. Percentile cannot calibrate a whole file
  (:func:`quantize_static_peer`). ``ptq_onnxruntime_blocks``: the same, the blocks only
  (:data:`ARCHS`: the ViT's blocks, Swin's stages' blocks without the patch merging between
  them), the part of the network qdet's rows quantize;
  ``ptq_onnxruntime_blocks_matmuls``: of the blocks, its MatMuls only (the Linears and the
  attention matmuls: the ops qdet's rows run in integers; the adds, multiplies and softmax
  stay float); ``ptq_onnxruntime_blocks_matmuls_<op>``: the MatMuls and one op type of
  :data:`PEER_EXTRA_OPS` (softmax, add, mul: the blocks' compute ops the default quantizes
  beside the MatMuls), to find which one costs the AP. All are made once (nothing in them
  depends on the seed) and shared by every seed.
- ``ptq_qdet_<wa>``: the FP model built for ``QUANT.TARGET onnxruntime`` and calibrated only.
- ``baseline_ort_<wa>`` / ``qfd_ort_<wa>``: QAT for onnxruntime (``<arch>_tiny_<wa>_ort.yaml``;
  QFD adds MSE to the teacher's 8-bit p3, :func:`qfd_opts`); ``baseline_ort_w4a8_mha`` /
  ``_mlp``: the attention's Linears and matmuls only, the MLP's only.
- ``baseline_sim_<wa>``: the same recipe simulated (``QUANT.TARGET ''``), the papers' form.
- ``ptq_qdet_heads_<wa>`` / ``baseline_ort_heads_<wa>``: calibration only and baseline QAT
  of the whole network qdet deploys (``<arch>_tiny_<wa>_heads_ort.yaml``: the blocks,
  ViTDet's pyramid or Swin's FPN convs and the R-CNN heads): the scope of
  ``ptq_onnxruntime_minmax``, and the latency benchmark's "+heads" files.
- ``fp_finetune``: the control, the same 200 iterations from the FP model unquantized: the
  FP model is not converged, so QAT's rows gain from the iterations too; compare with it.

Every quantized row reports box and mask AP of PyTorch and of its whole file in onnxruntime
(run by the torch-free runner's post-processing); the target rows' files pass
:func:`qdet.export.whole_check.check_whole` on 8 val pictures first. ``make_run`` and
``evaluate_run`` run in the study's workers.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from detectron2.config import CfgNode

from qdet.engine.stages import evaluate_final
from qdet.engine.trained_model import trained_model_from_cfg
from qdet.export.peer import WHOLE_NETWORK, quantize_static_peer, train_images
from qdet.export.whole import export_whole_detector
from qdet.export.whole_check import WholeFileDetector, check_whole, loader_aps, test_pictures
from qdet.study import deployment
from qdet.study.deployment import paired_cell, report_text
from qdet.study.runner import StudyRow, spread

WIDTHS = {"w8a8": (8, 8), "w4a8": (4, 8)}
CHECK_PICTURES = 8
SIMULATED = ("QUANT.TARGET", "")
ONE_STEP = ("SOLVER.MAX_ITER", "1")  # a PTQ row trains nothing (the progress's count)
# The op types quantize_static adds to the blocks' MatMuls by default, each tried alone
# with them (rows ptq_onnxruntime_blocks_matmuls_<op>): which one costs the AP.
PEER_EXTRA_OPS = ("Softmax", "Add", "Mul")


@dataclass(frozen=True)
class Arch:
    """A tiny transformer of the study: its configs' path prefix, its name in the report and
    the node-name prefixes of its blocks in a whole file (what qdet's rows quantize, MHA
    and MLP; the peer row that quantizes the same part of the network takes them)."""

    configs: str
    name: str
    blocks: tuple[str, ...]


ARCHS = {
    "vitdet": Arch("configs/digits/vitdet_tiny_", "ViTDet", ("/backbone/net/blocks.",)),
    # Swin's stages (depths 1-1-2-1): their blocks, not the patch merging between them.
    "swin": Arch(
        "configs/digits/swin_tiny_",
        "Swin",
        tuple(f"/backbone/bottom_up/layers.{i}/blocks." for i in range(4)),
    ),
}


def qfd_opts(arch: str) -> tuple[str, ...]:
    """QFD on the transformer: MSE to the FP teacher's p3 (the stride-8 level of ViTDet's
    SimpleFeaturePyramid or Swin's FPN) quantized at 8 bits, with the RetinaNet digits
    recipe's weight (not tuned for transformers)."""
    return (
        *("DISTILL.ENABLED", "True", "DISTILL.TEACHER_CONFIG", ARCHS[arch].configs + "fp.yaml"),
        *("DISTILL.TAP", "p3", "DISTILL.LOSS", "qfd", "DISTILL.WEIGHT", "0.2"),
        *("DISTILL.TEACHER_FEATURE_BITS", "8"),
    )


def transformer_rows(widths: list[str], arch: str = "vitdet") -> list[StudyRow]:
    """The rows of the module docstring for ``arch`` (a key of :data:`ARCHS`) at
    ``widths`` (keys of :data:`WIDTHS`)."""
    prefix = ARCHS[arch].configs
    rows = [StudyRow("fp", "FP", prefix + "fp.yaml", per_seed=False)]
    # The control: the QAT rows' 200-iteration fine-tune without quantization (the FP model
    # is not converged at 600 iterations; QAT's gain over PTQ includes these iterations).
    rows.append(
        StudyRow("fp_finetune", "", prefix + "4bit.yaml", ("QUANT.ENABLED", "False"), "", "fp")
    )
    peer = ("DEPLOY_STUDY.KIND", "ptq_onnxruntime", "DEPLOY_STUDY.CALIBRATION", "minmax")
    blocks = ("DEPLOY_STUDY.PEER_NODES", repr(list(ARCHS[arch].blocks)))
    # onnxruntime's PTQ depends on nothing a seed changes (the FP model, the first training
    # pictures): made once and shared by every seed, as the FP model is.
    matmuls = ("DEPLOY_STUDY.PEER_OPS", "['MatMul']")  # the Linears and attention matmuls
    peers = [
        ("minmax", peer),
        ("blocks", (*peer, *blocks)),
        ("blocks_matmuls", (*peer, *blocks, *matmuls)),
    ]
    # Which of the ops the default adds to the MatMuls costs the accuracy: one at a time.
    for op in PEER_EXTRA_OPS:
        ops = ("DEPLOY_STUDY.PEER_OPS", repr(["MatMul", op]))
        peers.append((f"blocks_matmuls_{op.lower()}", (*peer, *blocks, *ops)))
    for name, opts in peers:
        fp = prefix + "fp.yaml"
        rows.append(
            StudyRow(f"ptq_onnxruntime_{name}", "", fp, (*opts, *ONE_STEP), "8/8", "fp", False)
        )
    for wa in widths:
        w, a = WIDTHS[wa]
        bits, config = f"{w}/{a}", f"{prefix}{wa}_ort.yaml"
        heads = f"{prefix}{wa}_heads_ort.yaml"  # the whole network: + pyramid / FPN, heads
        ptq = ("DEPLOY_STUDY.KIND", "ptq_qdet", *ONE_STEP)
        rows += [
            StudyRow(f"ptq_qdet_{wa}", "", config, ptq, bits, "fp"),
            StudyRow(f"baseline_ort_{wa}", "", config, (), bits, "fp"),
            StudyRow(f"qfd_ort_{wa}", "", config, qfd_opts(arch), bits, "fp"),
            StudyRow(f"baseline_sim_{wa}", "", config, SIMULATED, bits, "fp"),
            StudyRow(f"ptq_qdet_heads_{wa}", "", heads, ptq, bits, "fp"),
            StudyRow(f"baseline_ort_heads_{wa}", "", heads, (), bits, "fp"),
        ]
        if wa == "w4a8":
            for part in ("mha", "mlp"):
                part_config = f"{prefix}w4a8_{part}_ort.yaml"
                rows.append(StudyRow(f"baseline_ort_w4a8_{part}", "", part_config, (), bits, "fp"))
    return rows


def make_run(cfg: CfgNode) -> None:
    """A row's model: onnxruntime's PTQ of the whole file here, the rest as the RetinaNet
    study makes them (:func:`qdet.study.deployment.make_run`)."""
    if cfg.DEPLOY_STUDY.KIND != "ptq_onnxruntime":
        deployment.make_run(cfg)
        return
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    trained = trained_model_from_cfg(cfg, "to quantize")
    fp_onnx = os.path.join(cfg.OUTPUT_DIR, "fp32.onnx")
    picture = test_pictures(trained.test_loader(), 1)[0]
    export_whole_detector(trained.model, fp_onnx, picture, trained.deployment_info())
    batches = train_images(cfg, trained.model, deployment.CALIBRATION_IMAGES)
    pictures = [b[0]["image"].float().numpy() for b in batches]
    out = os.path.join(cfg.OUTPUT_DIR, "model.onnx")
    prefixes = tuple(cfg.DEPLOY_STUDY.PEER_NODES) or WHOLE_NETWORK
    method, ops = cfg.DEPLOY_STUDY.CALIBRATION, tuple(cfg.DEPLOY_STUDY.PEER_OPS)
    quantize_static_peer(fp_onnx, out, pictures, method, True, prefixes, ops)
    # The FP weights mark the run finished (the runner's model_final.pth).
    shutil.copyfile(cfg.MODEL.WEIGHTS, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))


def evaluate_run(cfg: CfgNode) -> dict:
    """PyTorch's box and mask AP and, for rows with a file (PTQ and target rows), the whole
    file's in onnxruntime, after the file's check; cached in ``eval_deploy.json``."""
    cache = os.path.join(cfg.OUTPUT_DIR, "eval_deploy.json")
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if os.path.isfile(cache) and os.path.getmtime(cache) >= os.path.getmtime(final):
        with open(cache) as f:
            return json.load(f)
    kind, metrics = cfg.DEPLOY_STUDY.KIND, {}
    if kind != "ptq_onnxruntime":
        metrics.update(evaluate_final(cfg))
    if kind != "qat" or cfg.QUANT.TARGET:
        run_cfg = cfg.clone()
        run_cfg.defrost()
        run_cfg.MODEL.WEIGHTS = final
        trained = trained_model_from_cfg(run_cfg, "to evaluate")
        path = os.path.join(cfg.OUTPUT_DIR, "model.onnx")
        if kind != "ptq_onnxruntime":
            pictures = test_pictures(trained.test_loader(), CHECK_PICTURES)
            export_whole_detector(trained.model, path, pictures[0], trained.deployment_info())
            metrics["check"] = deployment.check_record(check_whole(trained.model, path, pictures))
        aps = loader_aps(WholeFileDetector(path), trained.test_loader(), trained.evaluator())
        metrics["ort AP"], metrics["ort mask AP"] = aps["bbox"]["AP"], aps["segm"]["AP"]
        metrics.setdefault("AP", metrics["ort AP"])  # onnxruntime's PTQ: its file's AP
        metrics.setdefault("mask AP", metrics["ort mask AP"])
    with open(cache, "w") as f:
        json.dump(metrics, f)
    return metrics


# -- the report ---------------------------------------------------------------------------
def _values(results, row: str, seeds, metric: str) -> dict[int, float]:
    runs = results.get(row, {})
    return {s: runs[s][metric] for s in seeds if s in runs and metric in runs[s]}


def _pair(results, row: str, seeds, metric: str) -> str:
    """PyTorch's ``metric`` / the file's (``ort <metric>``), mean ± std over seeds."""
    torch_ap = _values(results, row, seeds, metric)
    if not torch_ap:
        return ""
    ort_ap = _values(results, row, seeds, f"ort {metric}")
    if row in PEER_LABELS:  # onnxruntime's PTQ: its file only, made once for every seed
        return f"{ort_ap[min(ort_ap)]:.1f}"
    cell = spread(list(torch_ap.values()))
    return f"{cell} / {spread(list(ort_ap.values()))}" if ort_ap else cell


PEER_LABELS = {
    "ptq_onnxruntime_minmax": "onnxruntime quantize_static W8A8 MinMax, every layer (its file)",
    "ptq_onnxruntime_blocks": "onnxruntime quantize_static W8A8 MinMax, the blocks only (its file)",
    "ptq_onnxruntime_blocks_matmuls": (
        "onnxruntime quantize_static W8A8 MinMax, the blocks' MatMuls only (its file)"
    ),
} | {
    f"ptq_onnxruntime_blocks_matmuls_{op.lower()}": (
        f"onnxruntime quantize_static W8A8 MinMax, the blocks' MatMuls and {op} ops (its file)"
    )
    for op in PEER_EXTRA_OPS
}
ROW_LABELS = {
    "fp_finetune": "FP, the same fine-tune (control)",
    "ptq_qdet": "qdet calibration only",
    "baseline_ort": "baseline QAT, TARGET onnxruntime",
    "qfd_ort": "QFD, TARGET onnxruntime",
    "baseline_sim": "baseline QAT, simulated",
    "baseline_ort_w4a8_mha": "baseline QAT, TARGET, MHA only",
    "baseline_ort_w4a8_mlp": "baseline QAT, TARGET, MLP only",
    "ptq_qdet_heads": "qdet calibration only, + pyramid / FPN and heads",
    "baseline_ort_heads": "baseline QAT, TARGET, + pyramid / FPN and heads",
}
# (row prefix, base row prefix or row, the row's metric prefix, the base's): the paired
# differences that answer the study's questions ("ort " is the file's AP).
DIFFERENCES = (
    ("baseline_ort", "fp_finetune", "ort ", ""),
    ("qfd_ort", "fp_finetune", "ort ", ""),
    ("baseline_ort", "ptq_onnxruntime_minmax", "ort ", "ort "),
    ("qfd_ort", "ptq_onnxruntime_minmax", "ort ", "ort "),
    ("baseline_ort", "ptq_onnxruntime_blocks", "ort ", "ort "),
    ("qfd_ort", "ptq_onnxruntime_blocks", "ort ", "ort "),
    ("ptq_qdet", "ptq_onnxruntime_blocks_matmuls", "ort ", "ort "),
    ("baseline_ort", "ptq_qdet", "ort ", "ort "),
    ("qfd_ort", "baseline_ort", "ort ", "ort "),
    ("baseline_ort", "baseline_sim", "ort ", ""),
    ("baseline_ort", "baseline_ort", "ort ", ""),
    ("baseline_ort_w4a8_mha", "baseline_ort", "ort ", "ort "),
    ("baseline_ort_w4a8_mlp", "baseline_ort", "ort ", "ort "),
    # The whole network: what the heads cost, and QAT against onnxruntime's PTQ of the same
    # scope (its every-layer file) and against calibration alone.
    ("baseline_ort_heads", "baseline_ort", "ort ", "ort "),
    ("baseline_ort_heads", "fp_finetune", "ort ", ""),
    ("baseline_ort_heads", "ptq_onnxruntime_minmax", "ort ", "ort "),
    ("baseline_ort_heads", "ptq_qdet_heads", "ort ", "ort "),
    ("baseline_ort_heads", "baseline_ort_heads", "ort ", ""),
)


def _name(prefix: str, wa: str) -> str:
    """A row's name at width ``wa``: the prefix and the width, or a row named in full."""
    named_in_full = prefix in PEER_LABELS or prefix == "fp_finetune"
    return prefix if named_in_full or prefix.endswith(("_mha", "_mlp")) else f"{prefix}_{wa}"


def _label(prefix: str) -> str:
    return {**PEER_LABELS, **ROW_LABELS}[prefix]


def tables(results, widths: list[str], seeds, arch: str = "vitdet") -> str:
    """AP per row and width (box and mask; PyTorch / the file), the paired differences, AP
    per seed and the files' checks."""

    def only(prefix: str, wa: str) -> bool:
        """Whether the row has a run at ``wa`` (a row named in full has its one width)."""
        if _name(prefix, wa) != prefix or prefix == "fp_finetune":  # the control: every column
            return True
        return wa == ("w8a8" if prefix in PEER_LABELS else "w4a8")

    heads = ["row"]
    for kind in ("box", "mask"):
        heads += [f"{kind} AP W/A {WIDTHS[w][0]}/{WIDTHS[w][1]}" for w in widths]
    prefixes = [*PEER_LABELS, *ROW_LABELS]
    ap = [
        [_label(p)]
        + [
            _pair(results, _name(p, w), seeds, metric) if only(p, w) else ""
            for metric in ("AP", "mask AP")
            for w in widths
        ]
        for p in prefixes
    ]
    diffs = []
    for row, base, mine, theirs in DIFFERENCES:
        what = (
            f"{_label(row)}: the file - PyTorch"
            if row == base
            else f"{_label(row)} - {_label(base)}"
        )
        diffs.append(
            [what]
            + [
                paired_cell(results, _name(row, w), _name(base, w), seeds, mine + m, theirs + m)
                if only(row, w)
                else ""
                for m in ("AP", "mask AP")
                for w in widths
            ]
        )
    fp = _values(results, "fp", seeds[:1], "AP")
    fp_mask = _values(results, "fp", seeds[:1], "mask AP")
    seed_list = ", ".join(map(str, seeds))
    over = f"mean ± sample std over seeds {seed_list}" if len(seeds) > 1 else f"seed {seeds[0]}"
    return report_text(
        f"COCO AP on qdet_digits_val of the tiny {ARCHS[arch].name} Mask R-CNN, {over} "
        f"(one FP model: box {spread(list(fp.values()))}, mask "
        f"{spread(list(fp_mask.values()))}); two figures: PyTorch / the whole file in "
        "onnxruntime:",
        ap,
        "Paired differences (same FP model and batches per seed; the file's AP unless "
        "'simulated'), mean ± sample std (one seed: its difference), and on how many seeds "
        "the first is higher:",
        diffs,
        heads,
        results,
        seeds,
        f"The target files' check on {CHECK_PICTURES} val pictures:",
        ("AP", "ort AP", "mask AP", "ort mask AP"),
    )
