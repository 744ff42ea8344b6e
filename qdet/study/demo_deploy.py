"""The demo's deployment (``tools/demo.py``): each trained model exported as one
whole-detector file (:func:`qdet.export.whole.export_whole_detector`) and run by the
torch-free runner (:class:`qdet_runner.Detector`: picture in, its own resize, instances
out). :func:`ship_run` is the demo's evaluation of a run, in the run's worker right after
its training: COCO AP of the model in PyTorch, then of its file as the runner gets it on
every val picture. :func:`time_files` then times the files in one process, alternating
picture by picture on one onnxruntime thread each: the runner's median milliseconds per
picture (the image already decoded; resize, network, post-processing and box scaling)."""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
from detectron2.data import DatasetCatalog

import qdet_runner
from qdet.engine.stages import evaluate_final
from qdet.engine.trained_model import coco_evaluator, trained_model_from_cfg
from qdet.export.whole import export_whole_detector
from qdet.export.whole_check import as_instances

FILE = "model.onnx"  # in each run's OUTPUT_DIR
FILE_EVAL = "eval_file.json"  # the file's AP, beside Detectron2's eval_final.json
TIMED = 50  # val pictures timed per file


def export_run(cfg) -> str:
    """The run's ``model_final.pth`` exported whole to ``<OUTPUT_DIR>/model.onnx`` (kept when
    it is newer than the checkpoint). Returns the file."""
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    path = os.path.join(cfg.OUTPUT_DIR, FILE)
    if os.path.isfile(path) and os.path.getmtime(path) >= os.path.getmtime(final):
        return path
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = final
    cfg.MODEL.DEVICE = "cpu"
    trained = trained_model_from_cfg(cfg, "to export")
    first = next(iter(trained.test_loader()))[0]["image"]
    export_whole_detector(trained.model, path, first, trained.deployment_info())
    return path


def file_ap(path: str, dataset: str, threads: int = 1) -> float:
    """COCO box AP of the whole file at ``path`` run by the runner on every picture of
    ``dataset`` (each read from disk and resized by the runner itself)."""
    detector = qdet_runner.Detector(path, threads)
    evaluator = coco_evaluator(dataset)
    evaluator.reset()
    for record in DatasetCatalog.get(dataset):
        image = qdet_runner.read_image(record["file_name"])
        instances = as_instances(detector(image), image.shape[:2])
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    return evaluator.evaluate()["bbox"]["AP"]


def ship_run(cfg) -> dict:
    """A finished run's metrics for the demo's table: Detectron2's evaluation of the
    model (:func:`qdet.engine.stages.evaluate_final`) plus ``"file AP"``, its whole file's
    (exported here; cached in ``eval_file.json`` while newer than the file)."""
    metrics = dict(evaluate_final(cfg))
    path = export_run(cfg)
    cache = os.path.join(cfg.OUTPUT_DIR, FILE_EVAL)
    if os.path.isfile(cache) and os.path.getmtime(cache) >= os.path.getmtime(path):
        with open(cache) as f:
            metrics["file AP"] = json.load(f)["AP"]
        return metrics
    metrics["file AP"] = file_ap(path, cfg.DATASETS.TEST[0], torch.get_num_threads())
    with open(cache + ".tmp", "w") as f:
        json.dump({"AP": metrics["file AP"]}, f)
    os.replace(cache + ".tmp", cache)  # a killed demo leaves no half-written cache
    return metrics


def time_files(
    files: dict[str, str], dataset: str, threads: int = 1, timed: int = TIMED
) -> dict[str, float]:
    """``{name: median ms per picture}`` of the whole files ``files`` (name -> path) run by
    the runner on the first ``timed`` pictures of ``dataset``, after one warm-up picture,
    the files alternating picture by picture (drift hits every file alike) on ``threads``
    onnxruntime threads each."""
    detectors = {
        name: qdet_runner.Detector(path, threads, spinning=False) for name, path in files.items()
    }
    records = DatasetCatalog.get(dataset)[:timed]
    pictures = [qdet_runner.read_image(r["file_name"]) for r in records]
    for detector in detectors.values():
        detector(pictures[0])
    times = {name: [] for name in files}
    for image in pictures:
        for name, detector in detectors.items():
            start = time.perf_counter()
            detector(image)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}
