"""What a run needs on disk, checked before any model is built, with errors that say what to do.

Detectron2 finds out late and answers with fvcore's ``AssertionError: Checkpoint ... not
found!`` or a bare ``FileNotFoundError`` on a COCO json; these checks name the config key,
the command or environment variable that fixes it, and the expected layout.
"""

from __future__ import annotations

import difflib
import glob
import os

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from qdet.config import load_config
from qdet.engine.teacher_stage import qfd_tap, quantized_teacher_weights

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COCO_LAYOUT = (
    "coco/annotations/instances_train2017.json, coco/annotations/instances_val2017.json, "
    "coco/train2017/*.jpg, coco/val2017/*.jpg"
)


def producing_config(checkpoint: str) -> str | None:
    """The shipped config (relative path) whose training writes ``checkpoint``, if any."""
    wanted = os.path.normpath(os.path.abspath(checkpoint))
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)):
        try:
            out = load_config(path, []).OUTPUT_DIR
        except Exception:  # noqa: BLE001 - a config that does not load produces nothing
            continue
        for base in (os.getcwd(), ROOT):
            final = os.path.join(base, out, "model_final.pth")
            if os.path.normpath(os.path.abspath(final)) == wanted:
                return os.path.relpath(path, ROOT)
    return None


def missing_checkpoint_message(key: str, checkpoint: str, from_scratch: bool = False) -> str:
    """``key`` = the checkpoint does not exist, and how to make it; ``from_scratch``: the
    key may also be "" (a training run's MODEL.WEIGHTS; not a trained model's or a
    teacher's)."""
    message = f"{key}={checkpoint!r} does not exist."
    source = producing_config(checkpoint)
    if source:
        scratch = f', or set {key} "" to start from scratch' if from_scratch else ""
        return (
            f"{message} It is the model that `tools/train_net.py --config-file {source}` "
            f"trains: run that first{scratch}."
        )
    if from_scratch:
        return (
            f'{message} Point {key} at a Detectron2 checkpoint, or set it to "" to start '
            "from scratch."
        )
    return f"{message} Point {key} at the checkpoint a training run wrote (its model_final.pth)."


def check_weights(cfg: CfgNode, resume: bool = False) -> None:
    """MODEL.WEIGHTS exists (unless empty, a URL, or replaced by a resumed checkpoint)."""
    weights = cfg.MODEL.WEIGHTS
    if not weights or "://" in weights or os.path.isfile(weights):
        return
    if resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    raise FileNotFoundError(missing_checkpoint_message("MODEL.WEIGHTS", weights, from_scratch=True))


def require_trained_weights(cfg: CfgNode, purpose: str) -> None:
    """MODEL.WEIGHTS names a checkpoint that exists (or a URL): the tools that use a trained
    model (export, predict, quantizer ranges). ``purpose`` ends the empty-key message,
    e.g. "to export"."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise ValueError(
            f"MODEL.WEIGHTS is empty: give the trained checkpoint {purpose} "
            "(MODEL.WEIGHTS path/to/model_final.pth)"
        )
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(missing_checkpoint_message("MODEL.WEIGHTS", weights))


def check_datasets(names) -> None:
    """Every dataset is registered and, where its metadata names files, they exist."""
    registered = DatasetCatalog.list()
    for name in names:
        if name not in registered:
            near = difflib.get_close_matches(name, registered, n=5, cutoff=0.4)
            raise KeyError(
                f"dataset {name!r} is not registered; did you mean one of {near}? (qdet "
                "registers qdet_digits_train / qdet_digits_val, Detectron2 coco_2017_*)"
            )
        if name.startswith("qdet_digits"):  # built on first use
            continue
        meta = MetadataCatalog.get(name)
        for key in ("json_file", "image_root"):
            path = getattr(meta, key, None)
            if path and not os.path.exists(path):
                where = os.environ.get("DETECTRON2_DATASETS")
                where = f"it is {where!r}" if where else "it is unset, so ./datasets is used"
                raise FileNotFoundError(
                    f"dataset {name!r} needs {path}, which does not exist. Set "
                    f"DETECTRON2_DATASETS to the folder that holds coco/ ({where}); "
                    f"expected inside it: {COCO_LAYOUT}"
                )


def check_teacher(cfg: CfgNode) -> None:
    """DISTILL.TEACHER_WEIGHTS exists when the run will load it (QFD loads it only for its
    teacher stage, skipped when that stage's output exists)."""
    if cfg.DISTILL.LABEL_FREE and not cfg.DISTILL.ENABLED:
        raise ValueError(
            "DISTILL.LABEL_FREE True needs DISTILL.ENABLED True (and a teacher): without "
            "distillation a label-free student would have no loss at all"
        )
    if not cfg.DISTILL.GT_WEIGHT >= 0:
        raise ValueError(
            f"DISTILL.GT_WEIGHT={cfg.DISTILL.GT_WEIGHT!r} must be >= 0 (the ground-truth "
            "losses' weight; DISTILL.LABEL_FREE True drops them)"
        )
    if cfg.ZEROSHOT.ENABLED and qfd_tap(cfg) is not None:
        raise ValueError(
            "a zero-shot run (ZEROSHOT.ENABLED) cannot distil with QFD: its teacher stage "
            "fine-tunes the teacher on real training images. Distil with rfd, fa, "
            "feature_kd or logit_kd (DISTILL.TERMS), e.g. "
            "configs/digits/retinanet_r18_4bit_datafree.yaml"
        )
    weights = cfg.DISTILL.TEACHER_WEIGHTS
    if not cfg.DISTILL.ENABLED or os.path.isfile(weights):
        return
    if qfd_tap(cfg) is not None and os.path.isfile(quantized_teacher_weights(cfg)):
        return
    raise FileNotFoundError(missing_checkpoint_message("DISTILL.TEACHER_WEIGHTS", weights))


def check_output_dir(
    folder: str, resume: bool = False, restart: bool = False, key: str = "OUTPUT_DIR"
) -> None:
    """A run that neither resumes nor starts over explicitly (``restart``) refuses an
    output ``folder`` (the config's ``key``) that holds another run's checkpoints:
    Detectron2 would overwrite them and repoint ``last_checkpoint`` without a word."""
    if resume or restart or not os.path.isdir(folder):
        return
    found = sorted(glob.glob(os.path.join(folder, "model_*.pth")))
    marker = os.path.join(folder, "last_checkpoint")
    if not found and not os.path.isfile(marker):
        return
    last = ""
    if os.path.isfile(marker):
        with open(marker) as f:
            last = f", last {f.read().strip()}"
    raise FileExistsError(
        f"{key} {folder!r} holds a run's checkpoints ({len(found)} model_*.pth{last}): "
        f"continue that run with --resume, give this one a new {key}, or start over in "
        "it with --restart (its checkpoints are then replaced)"
    )


def refuse_overwriting_inputs(outputs: dict[str, str], inputs: dict[str, str]) -> None:
    """No output file is one of the command's inputs (``{what: path}`` each): writing it
    would destroy what the command reads."""
    for out_name, out in outputs.items():
        for in_name, source in inputs.items():
            if out and source and os.path.abspath(out) == os.path.abspath(source):
                raise ValueError(
                    f"{out_name} {out!r} is {in_name}: writing it would overwrite the "
                    f"command's own input; choose another {out_name}"
                )


def check_run_inputs(
    cfg: CfgNode, resume: bool = False, eval_only: bool = False, restart: bool = False
) -> None:
    """Weights, teacher and datasets of a run (``eval_only``: weights and test sets); a
    training run's OUTPUT_DIR holds no other run's checkpoints (:func:`check_output_dir`)."""
    check_weights(cfg, resume)
    if not eval_only:
        check_output_dir(cfg.OUTPUT_DIR, resume, restart)
    if not eval_only:
        check_teacher(cfg)
    check_datasets((() if eval_only else tuple(cfg.DATASETS.TRAIN)) + tuple(cfg.DATASETS.TEST))
