"""The demo's deployment (``tools/demo.py``): each finished model exported as one
whole-detector file (:func:`qdet.export.whole.export_whole_detector`), then run by the
torch-free runner (:class:`qdet_runner.Detector`: picture in, its own resize, instances
out) on every val picture, on one onnxruntime thread each. Box AP by Detectron2's
``COCOEvaluator`` of the runner's instances, and the runner's median milliseconds per
picture (the image already decoded; resize, network, post-processing and box scaling
timed), the files alternating picture by picture."""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from detectron2.data import DatasetCatalog

import qdet_runner
from qdet.engine.trained_model import coco_evaluator, trained_model_from_cfg
from qdet.export.whole import export_whole_detector
from qdet.export.whole_check import as_instances
from qdet.study.runner import Study

FILE = "model.onnx"  # in each run's OUTPUT_DIR
TIMED = 100  # pictures timed per file


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
    with torch.no_grad():
        export_whole_detector(trained.model, path, first, trained.deployment_info())
    return path


def run_files(
    files: dict[str, str], dataset: str, evaluator_fn, threads: int = 1, timed: int = TIMED
) -> dict:
    """``{name: {"AP": box AP, "ms": median ms per picture}}`` of the whole files ``files``
    (name -> path) run by the runner on every picture of ``dataset``; ``evaluator_fn()``
    gives a fresh COCO evaluator of ``dataset``. The AP pass runs the files side by side,
    one per core (onnxruntime leaves Python's lock while it runs); then the first ``timed``
    pictures are timed with the files alternating picture by picture, nothing else
    running, each on ``threads`` onnxruntime threads."""
    detectors = {
        name: qdet_runner.Detector(path, threads, spinning=False) for name, path in files.items()
    }
    pictures = [
        (r["image_id"], qdet_runner.read_image(r["file_name"])) for r in DatasetCatalog.get(dataset)
    ]

    def detect_all(name: str) -> list[dict]:
        return [detectors[name](image) for _, image in pictures]

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        found = dict(zip(files, pool.map(detect_all, files)))
    aps = {}
    for name in files:
        evaluator = evaluator_fn()
        evaluator.reset()
        for (image_id, image), detections in zip(pictures, found[name]):
            instances = as_instances(detections, image.shape[:2])
            evaluator.process([{"image_id": image_id}], [{"instances": instances}])
        aps[name] = evaluator.evaluate()["bbox"]["AP"]
    times = {name: [] for name in files}
    for _, image in pictures[:timed]:
        for name, detector in detectors.items():  # alternating: drift hits every file alike
            start = time.perf_counter()
            detector(image)
            times[name].append(time.perf_counter() - start)
    return {name: {"AP": aps[name], "ms": 1000 * statistics.median(times[name])} for name in files}


def deploy(study: Study, names, seed: int = 1) -> dict:
    """The finished runs ``names`` of ``study`` (``seed``) exported whole and run by the
    runner (module docstring): ``{name: {"file", "AP", "ms"}}``."""
    configs = {name: study.config(study.rows[name], seed) for name in names}
    files = {name: export_run(cfg) for name, cfg in configs.items()}
    dataset = next(iter(configs.values())).DATASETS.TEST[0]
    results = run_files(files, dataset, lambda: coco_evaluator(dataset))
    return {name: {"file": files[name], **results[name]} for name in names}
