"""The deployment study's rows and runs (``tools/deployment_study.py``): what a
deployable grid costs and what QAT buys, onnxruntime's PTQ, qdet's PTQ, and QAT simulated
and for the onnxruntime target, paired over seeds, on the embedded digits data.

Per seed, the FP RetinaNet-R18 is trained from scratch (the accuracy study's row ``fp``,
reused if there) and every other row starts from it, with the same batches (SEED):

- ``ptq_onnxruntime_minmax`` / ``_percentile``: onnxruntime's ``quantize_static`` of the FP
  model's ONNX (W8A8; ``quant_pre_process``, per-channel s8 / u8 QDQ), calibrated on the
  first 64 training images (:mod:`qdet.export.peer`): what a user gets without qdet. AP
  through onnxruntime.
- ``ptq_qdet_<wa>``: the FP model built for ``QUANT.TARGET onnxruntime`` and calibrated
  only (``QUANT.CALIB_BATCHES`` training batches, as QAT starts): qdet's PTQ
  (:mod:`qdet.study.ptq`).
- ``baseline_sim_<wa>`` / ``qfd_sim_<wa>``: QAT simulated (``QUANT.TARGET ''``, the
  papers' form); ``baseline_ort_<wa>`` / ``qfd_ort_<wa>``: the same recipe trained for
  onnxruntime. All these calibrate their ranges with the study's ``QUANT.CALIB_RANGE``;
  ``ptq_qdet_w8a8_ewgs`` and the W4A4 ``baseline_4bit`` / ``qfd_4bit`` (the accuracy
  study's runs, reused when there) show EWGS's rule, the papers' default, beside them.

Target rows report PyTorch's AP and onnxruntime's (their integer export, checked layer by
layer on 8 val images), cached beside the run (:func:`evaluate_run`). :func:`tables`: AP
per row and W/A (mean ± std), the paired differences that answer the two questions, AP per
seed, the checks. :func:`make_run` and :func:`evaluate_run` run in the study's workers.
"""

from __future__ import annotations

import json
import os
import shutil
from itertools import islice

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode as CN
from detectron2.modeling import build_model
from tabulate import tabulate

from qdet.engine.stages import evaluate_final, train_stages
from qdet.engine.trainer import QDetTrainer
from qdet.export import OnnxRetinaNet, export_onnx, verify
from qdet.export.peer import export_fp32, quantize_static_peer
from qdet.export.runtime import box_ap
from qdet.study.ptq import calibrated_target_model
from qdet.study.runner import StudyRow, mean_std, spread

DIGITS = "configs/digits/retinanet_r18_"
WIDTHS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}
PTQ_WIDTHS = ("w8a8", "w4a8")
CALIBRATION_IMAGES = 64
CHECK_IMAGES = 8
ORT = ("QUANT.TARGET", "onnxruntime")


def add_deploy_config(cfg) -> None:
    """``DEPLOY_STUDY.KIND``: how a row's run is made (module docstring)."""
    cfg.DEPLOY_STUDY = CN()
    cfg.DEPLOY_STUDY.KIND = "qat"  # "qat" | "ptq_qdet" | "ptq_onnxruntime"
    cfg.DEPLOY_STUDY.CALIBRATION = "minmax"  # ptq_onnxruntime: quantize_static's method
    # ptq_onnxruntime of a whole file (the vitdet study's): the node-name prefixes
    # quantize_static quantizes (empty: every learned layer, qdet.export.peer.WHOLE_NETWORK).
    cfg.DEPLOY_STUDY.PEER_NODES = []
    # ptq_onnxruntime of a whole file: the op types quantize_static quantizes (empty: its
    # default, every op it can).
    cfg.DEPLOY_STUDY.PEER_OPS = []


def _ort(method: str, wa: str) -> str:
    return f"{method}_ort_{wa}"


def _sim_name(method: str, wa: str) -> str:
    return f"{method}_sim_{wa}"


# The accuracy study's names of its W4A4 runs with EWGS's range rule (reused if there).
EWGS_RULE = {"baseline": "baseline_4bit", "qfd": "qfd_4bit"}
METHOD_LABELS = {"baseline": "baseline QAT", "qfd": "QFD"}


def study_rows(widths: list[str], calib_range: str) -> list[StudyRow]:
    """Every quantized row calibrates with ``calib_range`` (``QUANT.CALIB_RANGE``), but the
    rows that show EWGS's rule beside it."""
    fp = DIGITS + "fp.yaml"
    rows = [StudyRow("fp", "FP", fp)]
    no_steps = ("SOLVER.MAX_ITER", "1")  # a PTQ row trains nothing (the progress's count)
    for method in ("minmax", "percentile"):
        opts = ("DEPLOY_STUDY.KIND", "ptq_onnxruntime", "DEPLOY_STUDY.CALIBRATION", method)
        rows.append(
            StudyRow(f"ptq_onnxruntime_{method}", "", fp, (*opts, *no_steps), "8/8", init="fp")
        )
    ptq = ("QUANT.ENABLED", "True", *ORT, "DEPLOY_STUDY.KIND", "ptq_qdet", *no_steps)
    eight = ("QUANT.W_BITS", "8", "QUANT.A_BITS", "8")
    rows.append(StudyRow("ptq_qdet_w8a8_ewgs", "", fp, (*ptq, *eight), "8/8", init="fp"))
    for wa in widths:
        w, a = WIDTHS[wa]
        bits = ("QUANT.W_BITS", str(w), "QUANT.A_BITS", str(a), "QUANT.CALIB_RANGE", calib_range)
        if wa in PTQ_WIDTHS:
            rows.append(StudyRow(f"ptq_qdet_{wa}", "", fp, (*ptq, *bits), f"{w}/{a}", init="fp"))
        for method in METHOD_LABELS:
            config = DIGITS + f"4bit_{method}.yaml"
            rows.append(StudyRow(_sim_name(method, wa), "", config, bits, f"{w}/{a}", init="fp"))
            rows.append(
                StudyRow(f"{method}_ort_{wa}", "", config, (*ORT, *bits), f"{w}/{a}", init="fp")
            )
            if wa == "w4a4":
                rows.append(StudyRow(EWGS_RULE[method], "", config, (), "4/4", init="fp"))
    return rows


def make_run(cfg) -> None:
    """Train a QAT row (QFD's two stages where needed), or make a PTQ row's model."""
    kind = cfg.DEPLOY_STUDY.KIND
    if kind == "qat":
        train_stages(cfg, restart=True)  # a study run: an interrupted attempt starts over
        return
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    if kind == "ptq_onnxruntime":
        model = build_model(cfg).eval()
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        fp_onnx = os.path.join(cfg.OUTPUT_DIR, "fp32.onnx")
        _, calibration = export_fp32(cfg, model, fp_onnx, CALIBRATION_IMAGES)
        quantize_static_peer(
            fp_onnx,
            os.path.join(cfg.OUTPUT_DIR, "model.onnx"),
            calibration,
            cfg.DEPLOY_STUDY.CALIBRATION,
        )
        # The FP model's weights: its pre- and post-processing run the ONNX network.
        shutil.copyfile(cfg.MODEL.WEIGHTS, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
        return
    n = cfg.QUANT.CALIB_BATCHES
    batches = islice(iter(QDetTrainer.build_train_loader(cfg)), n)
    model = calibrated_target_model(cfg, cfg.MODEL.WEIGHTS, batches, n)
    DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).save("model_final")


def check_record(report) -> dict:
    """What the study's JSON keeps of a file's check (:func:`qdet.export.verify` or
    :func:`qdet.export.whole_check.check_whole`): its verdict, first failures, ties, codes
    compared and the kernels onnxruntime ran."""
    return {
        "ok": report.ok,
        "failures": report.failures[:3],
        "boundary_flips": report.boundary_flips,
        "tie_values": report.tie_values,
        "codes": report.activation_values,
        "kernels": report.integer_kernels,
        "float_convs": report.float_convs,
    }


def evaluate_run(cfg) -> dict:
    """PyTorch's box AP and, for deployable rows, onnxruntime's (cached beside the run)."""
    cache = os.path.join(cfg.OUTPUT_DIR, "eval_deploy.json")
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if os.path.isfile(cache) and os.path.getmtime(cache) >= os.path.getmtime(final):
        with open(cache) as f:
            return json.load(f)
    kind = cfg.DEPLOY_STUDY.KIND
    metrics = {}
    if kind != "ptq_onnxruntime":
        metrics.update(evaluate_final(cfg))
    path = os.path.join(cfg.OUTPUT_DIR, "model.onnx")
    if kind != "qat" or cfg.QUANT.TARGET:
        model = build_model(cfg).eval()
        DetectionCheckpointer(model).load(final)
        if kind != "ptq_onnxruntime":
            loader = QDetTrainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
            batches = [b for _, b in zip(range(CHECK_IMAGES), loader)]
            export_onnx(model, path, model.preprocess_image(batches[0]).tensor)
            metrics["check"] = check_record(verify(model, path, batches))
        bbox = box_ap(cfg, OnnxRetinaNet(model, path))
        metrics["ort AP"] = bbox["AP"]
        metrics.setdefault("AP", bbox["AP"])  # the headline: onnxruntime's for its own PTQ
    with open(cache, "w") as f:
        json.dump(metrics, f)
    return metrics


# -- the report ---------------------------------------------------------------------------
def _values(results, row: str, seeds, metric: str) -> list[float]:
    runs = results.get(row, {})
    return [runs[s][metric] for s in seeds if s in runs and metric in runs[s]]


def _cell(results, row: str, seeds, metric: str = "AP") -> str:
    values = _values(results, row, seeds, metric)
    return spread(values) if values else ""


def _both(results, row: str, seeds) -> str:
    """PyTorch's AP / onnxruntime's."""
    torch_ap, ort_ap = _cell(results, row, seeds), _cell(results, row, seeds, "ort AP")
    return f"{torch_ap} / {ort_ap}" if torch_ap else ""


def paired_cell(results, row: str, base: str, seeds, metric="AP", base_metric="AP") -> str:
    """``row``'s metric minus ``base``'s, paired per seed: mean ± std (seeds higher); one
    seed's difference without a spread."""
    runs, ref = results.get(row, {}), results.get(base, {})
    shared = [
        s for s in seeds if s in runs and s in ref and metric in runs[s] and base_metric in ref[s]
    ]
    if not shared:
        return ""
    d = [runs[s][metric] - ref[s][base_metric] for s in shared]
    mean, std = mean_std(d)
    spread_text = f" ± {std:.1f}" if len(d) > 1 else ""
    return f"{mean:+.1f}{spread_text} ({sum(v > 0 for v in d)}/{len(d)} higher)"


def per_seed_rows(results, seeds, metrics=("AP", "ort AP")) -> list[list[str]]:
    """[run (metric), its value per seed] for every run and metric it has."""
    rows = []
    for name, runs in results.items():
        for metric in metrics:
            values = [runs[s].get(metric) if s in runs else None for s in seeds]
            if any(v is not None for v in values):
                cells = ", ".join("-" if v is None else f"{v:.1f}" for v in values)
                rows.append([f"{name} ({metric})", cells])
    return rows


def _distinct(check: dict) -> str:
    """How many distinct values the ties are, where the record has it and they repeat (the
    tie rate counts them: :func:`qdet.export.verify.check_tie_rate`)."""
    distinct = check.get("tie_values", check["boundary_flips"])
    return f" ({distinct} distinct)" if distinct != check["boundary_flips"] else ""


def check_rows(results) -> list[list[str]]:
    """[run, each seed's check of its integer export: ok or FAILED, ties] for runs with one."""
    rows = []
    for name, runs in results.items():
        done = [(s, r["check"]) for s, r in sorted(runs.items()) if "check" in r]
        if done:
            checks = (
                f"seed {s}: {'ok' if c['ok'] else 'FAILED'}, {c['boundary_flips']} of "
                f"{c['codes']} codes at a tie" + _distinct(c)
                for s, c in done
            )
            rows.append([name, ", ".join(checks)])
    return rows


def tables(results, widths, seeds) -> str:
    def across(fn, only=None) -> list[str]:
        return [fn(w) if only is None or w in only else "" for w in widths]

    ap = [
        ["onnxruntime quantize_static MinMax (its AP)"]
        + across(lambda w: _cell(results, "ptq_onnxruntime_minmax", seeds), ("w8a8",)),
        ["onnxruntime quantize_static Percentile (its AP)"]
        + across(lambda w: _cell(results, "ptq_onnxruntime_percentile", seeds), ("w8a8",)),
        ["qdet calibration only, CALIB_RANGE ewgs"]
        + across(lambda w: _both(results, "ptq_qdet_w8a8_ewgs", seeds), ("w8a8",)),
        ["qdet calibration only"]
        + across(lambda w: _both(results, f"ptq_qdet_{w}", seeds), PTQ_WIDTHS),
    ]
    for method, label in METHOD_LABELS.items():
        ap.append(
            [f"{label}, simulated, CALIB_RANGE ewgs"]
            + across(lambda w, m=method: _cell(results, EWGS_RULE[m], seeds), ("w4a4",))
        )
        ap.append(
            [f"{label}, simulated"]
            + across(lambda w, m=method: _cell(results, _sim_name(m, w), seeds))
        )
        ap.append(
            [f"{label}, TARGET onnxruntime"]
            + across(lambda w, m=method: _both(results, f"{m}_ort_{w}", seeds))
        )
    diffs = []
    for method, label in METHOD_LABELS.items():
        diffs += [
            [f"{label}: TARGET (onnxruntime AP) - simulated"]
            + across(
                lambda w, m=method: paired_cell(
                    results, _ort(m, w), _sim_name(m, w), seeds, "ort AP"
                )
            ),
            [f"{label}: TARGET, onnxruntime - PyTorch"]
            + across(
                lambda w, m=method: paired_cell(results, _ort(m, w), _ort(m, w), seeds, "ort AP")
            ),
            [f"{label}: TARGET (onnxruntime AP) - quantize_static MinMax W8A8"]
            + across(
                lambda w, m=method: paired_cell(
                    results, _ort(m, w), "ptq_onnxruntime_minmax", seeds, "ort AP"
                )
            ),
            [f"{label}: TARGET - qdet calibration only (onnxruntime AP)"]
            + across(
                lambda w, m=method: paired_cell(
                    results, _ort(m, w), f"ptq_qdet_{w}", seeds, "ort AP", "ort AP"
                ),
                PTQ_WIDTHS,
            ),
            [f"{label}: simulated, the study's CALIB_RANGE - ewgs"]
            + across(
                lambda w, m=method: paired_cell(results, _sim_name(m, w), EWGS_RULE[m], seeds),
                ("w4a4",),
            ),
        ]
    heads = ["row", *[f"W/A {WIDTHS[w][0]}/{WIDTHS[w][1]}" for w in widths]]
    seed_list = ", ".join(map(str, seeds))
    return report_text(
        f"COCO box AP on qdet_digits_val, mean ± sample std over seeds {seed_list} "
        f"(FP: {_cell(results, 'fp', seeds)}); two figures: PyTorch / onnxruntime:",
        ap,
        "Paired differences (same FP model and batches per seed), mean ± sample std, and "
        "on how many seeds the first is higher:",
        diffs,
        heads,
        results,
        seeds,
        f"The integer exports' layer-wise check on {CHECK_IMAGES} val images:",
    )


def report_text(
    ap_caption: str,
    ap: list,
    diffs_caption: str,
    diffs: list,
    heads: list[str],
    results,
    seeds,
    checks_caption: str,
    metrics=("AP", "ort AP"),
) -> str:
    """A deployment study's report: its AP table and paired differences (``heads``
    columns) under their captions, then ``metrics`` per seed and the exports' checks."""
    seed_list = ", ".join(map(str, seeds))
    return "\n\n".join(
        [
            ap_caption,
            tabulate(ap, heads, tablefmt="github"),
            diffs_caption,
            tabulate(diffs, heads, tablefmt="github"),
            "AP per seed:",
            tabulate(
                per_seed_rows(results, seeds, metrics),
                ["run", f"seeds {seed_list}"],
                tablefmt="github",
            ),
            checks_caption,
            tabulate(check_rows(results), ["run", "check"], tablefmt="github"),
        ]
    )
