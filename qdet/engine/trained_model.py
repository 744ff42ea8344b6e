"""A trained model from either kind of Detectron2 config, for the tools that use one
(``tools/export_onnx.py``, ``tools/predict.py``): a yacs YAML (``MODEL.WEIGHTS``) or a
LazyConfig ``.py`` with a ``quant`` node (``train.init_checkpoint``).

Both give the same things: the model in eval mode with its checkpoint loaded, its test
loader and evaluator, the dataset whose metadata names the classes, what a picture goes
through before the model (resize, channel order) and the model's bit widths for a title.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from torch import nn

from qdet.config import load_config
from qdet.engine.checkpoint import AtomicCheckpointer
from qdet.engine.checks import check_datasets, require_trained_weights
from qdet.engine.lazy import build_model as build_lazy_model
from qdet.engine.lazy_config import is_lazy_config, load_lazy_config, quant_bits, quant_settings
from qdet.engine.trainer import QDetTrainer, has_compiled_ops


def checkpoint_overrides(config_file: str, weights: str, device: str | None = None) -> list[str]:
    """The overrides that load ``weights`` (on ``device``) in ``config_file``'s kind of
    config: ``MODEL.WEIGHTS`` / ``MODEL.DEVICE``, or ``train.init_checkpoint`` /
    ``train.device``."""
    if is_lazy_config(config_file):
        return [f"train.init_checkpoint={weights}"] + ([f"train.device={device}"] if device else [])
    return ["MODEL.WEIGHTS", weights] + (["MODEL.DEVICE", device] if device else [])


@dataclass
class TrainedModel:
    """A model built from its config with its trained checkpoint loaded (eval mode)."""

    model: nn.Module
    config: object  # the yacs CfgNode or the LazyConfig
    dataset: str  # the first test dataset: its metadata names the classes
    test_loader: Callable[[], Iterable[list[dict]]]
    evaluator: Callable[[], object]  # a fresh DatasetEvaluator
    augmentations: list  # what Detectron2's predictor applies to a picture (resize)
    input_format: str  # "BGR" or "RGB": the channel order the model reads
    bits: str  # "FP32" or "W4/A4"
    checkpoint: str = ""  # the loaded weights (MODEL.WEIGHTS / train.init_checkpoint)

    def score_threshold(self) -> float:
        """The test score threshold the model applies (RetinaNet's, or the ROI box
        predictor's)."""
        if hasattr(self.model, "test_score_thresh"):
            return float(self.model.test_score_thresh)
        return float(self.model.roi_heads.box_predictor.test_score_thresh)

    def deployment_info(self) -> dict:
        """What a runner of the whole-detector file needs beside the graph
        (:func:`qdet.export.whole.export_whole_detector`): the channel order, the test
        resize, the score threshold, the class names, the bits and the target."""
        resize = next((a for a in self.augmentations if isinstance(a, T.ResizeShortestEdge)), None)
        quantizers = [m for m in self.model.modules() if getattr(m, "target", None) is not None]
        target = getattr(getattr(quantizers[0], "target", None), "name", "") if quantizers else ""
        classes = MetadataCatalog.get(self.dataset).get("thing_classes") if self.dataset else None
        return {
            "input_format": self.input_format,
            "min_size_test": int(max(resize.short_edge_length)) if resize else 0,
            "max_size_test": int(resize.max_size) if resize else 0,
            "score_threshold": self.score_threshold(),
            "class_names": list(classes or []),
            "bits": self.bits,
            "target": target,
        }

    def set_score_threshold(self, threshold: float) -> None:
        """Every head's test score threshold (what Detectron2's demo sets from
        ``--confidence-threshold``): RetinaNet's, and the ROI box predictor's."""
        if hasattr(self.model, "test_score_thresh"):
            self.model.test_score_thresh = threshold
        predictor = getattr(getattr(self.model, "roi_heads", None), "box_predictor", None)
        if predictor is not None and hasattr(predictor, "test_score_thresh"):
            predictor.test_score_thresh = threshold

    @torch.no_grad()
    def __call__(self, image_bgr: np.ndarray) -> dict:
        """Detectron2's ``DefaultPredictor`` call: one BGR picture -> its outputs, at the
        picture's size."""
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        height, width = image.shape[:2]
        check_resizable(height, width, self.augmentations)
        resized = T.AugmentationList(self.augmentations)(T.AugInput(image)).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return self.model([{"image": tensor.float(), "height": height, "width": width}])[0]


def check_resizable(height: int, width: int, augmentations: list) -> None:
    """A picture whose test-time resize (``ResizeShortestEdge``) leaves an edge under one
    pixel (e.g. 4000 x 3) is an error naming its size, not a crash inside the resize."""
    for aug in augmentations:
        if isinstance(aug, T.ResizeShortestEdge):
            short = max(aug.short_edge_length)
            new_h, new_w = T.ResizeShortestEdge.get_output_shape(height, width, short, aug.max_size)
            if min(new_h, new_w) < 1:
                raise ValueError(
                    f"a {width} x {height} picture resizes to {new_w} x {new_h} (the config's "
                    f"test resize: short edge {short}, long edge at most {aug.max_size}): an "
                    "edge under one pixel; crop it to a less extreme aspect ratio first"
                )


def float_form(config_file: str, opts: list[str], trained: TrainedModel) -> TrainedModel:
    """``trained``'s FP form: ``config_file`` built with its quantizers off
    (``in_float``), given ``trained``'s float weights. Its quantizers' state (and
    what a target adds under them) is left out; anything else missing or left over is an
    error, since the FP form would then not be the quantized model's own."""
    fp_opts = [*opts, *checkpoint_overrides(config_file, "")]
    fp = load_trained_model(
        config_file, fp_opts, "to export", "cpu", weights_optional=True, in_float=True
    )
    loaded = fp.model.load_state_dict(trained.model.state_dict(), strict=False)
    quantizer_paths = tuple(
        f"{name}."
        for name, _ in trained.model.named_modules()
        if "quantizer" in name.split(".")[-1]
    )
    unexpected = [k for k in loaded.unexpected_keys if not k.startswith(quantizer_paths)]
    if loaded.missing_keys or unexpected:
        raise ValueError(
            f"the FP form of {config_file} does not match the quantized model: "
            f"{len(loaded.missing_keys)} entries missing (e.g. {loaded.missing_keys[:3]}), "
            f"{len(unexpected)} left over (e.g. {unexpected[:3]})"
        )
    return fp


def load_trained_model(
    config_file: str,
    opts: list[str],
    purpose: str,
    device: str | None = None,
    weights_optional: bool = False,
    in_float: bool = False,
) -> TrainedModel:
    """The trained model of ``config_file`` (yacs ``.yaml`` with ``MODEL.WEIGHTS``, or a
    LazyConfig ``.py`` with ``train.init_checkpoint``; ``opts`` override either), on
    ``device`` (default: the config's). ``purpose`` ends the missing-weights message
    ("to export"). ``weights_optional``: an empty checkpoint key builds the model untrained
    (e.g. when onnxruntime runs its network from a file). ``in_float``: the config's model
    with its quantizers off (``QUANT.ENABLED False``; a LazyConfig's ``quant`` node
    replaced by ``{"enabled": False}``, since its bits would be refused beside it)."""
    if is_lazy_config(config_file):
        return _lazy_model(config_file, opts, purpose, device, weights_optional, in_float)
    if in_float:
        opts = [*opts, "QUANT.ENABLED", "False"]
    return _yacs_model(config_file, opts, purpose, device, weights_optional)


def _yacs_model(config_file, opts, purpose, device, weights_optional) -> TrainedModel:
    cfg = load_config(config_file, opts)
    if device is not None:
        cfg.defrost()
        cfg.MODEL.DEVICE = device
    cfg.freeze()
    return trained_model_from_cfg(cfg, purpose, weights_optional)


def trained_model_from_cfg(
    cfg, purpose: str = "to run", weights_optional: bool = False
) -> TrainedModel:
    """:class:`TrainedModel` of a yacs config (``MODEL.WEIGHTS``: its checkpoint)."""
    if cfg.MODEL.WEIGHTS or not weights_optional:
        require_trained_weights(cfg, purpose)
    dataset = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else ""
    if dataset:
        check_datasets([dataset])
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    # Detectron2's DefaultPredictor resize.
    size = cfg.INPUT.MIN_SIZE_TEST
    resize = T.ResizeShortestEdge([size, size], cfg.INPUT.MAX_SIZE_TEST)
    quant = cfg.QUANT
    return TrainedModel(
        model=model,
        config=cfg,
        dataset=dataset,
        test_loader=lambda: yacs_test_loader(cfg, dataset),
        evaluator=lambda: coco_evaluator(dataset),
        augmentations=[resize],
        input_format=cfg.INPUT.FORMAT,
        bits=f"W{quant.W_BITS}/A{quant.A_BITS}" if quant.ENABLED else "FP32",
        checkpoint=cfg.MODEL.WEIGHTS,
    )


def yacs_test_loader(cfg, dataset: str):
    """The test loader training evaluates with (``TEST.IMS_PER_BATCH`` images a batch)."""
    return QDetTrainer.build_test_loader(cfg, dataset)


def coco_evaluator(dataset: str):
    """COCOEvaluator of ``dataset``, nothing written (pycocotools' own evaluation when
    Detectron2's compiled ops are missing)."""
    return COCOEvaluator(dataset, output_dir=None, use_fast_impl=has_compiled_ops())


def _lazy_model(config_file, opts, purpose, device, weights_optional, in_float) -> TrainedModel:
    cfg = load_lazy_config(config_file, opts)
    quant_settings(cfg)  # no quant node: say what to add, first
    if in_float:
        cfg.quant = {"enabled": False}
    if device is not None:
        cfg.train.device = device
    weights = cfg.train.get("init_checkpoint", "")
    if not weights and not weights_optional:
        raise ValueError(
            f"train.init_checkpoint is empty: give the trained checkpoint {purpose} "
            "(train.init_checkpoint=path/to/model_final.pth)"
        )
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(
            f"train.init_checkpoint={weights!r} does not exist: `tools/lazy_train_net.py "
            f"--config-file {config_file}` writes <train.output_dir>/model_final.pth"
        )
    test = cfg.dataloader.test
    names = test.dataset.names
    dataset = names if isinstance(names, str) else names[0]
    check_datasets([dataset])
    model = build_lazy_model(cfg).eval()
    if weights:
        AtomicCheckpointer(model).load(weights)
    bits = quant_bits(cfg)
    return TrainedModel(
        model=model,
        config=cfg,
        dataset=dataset,
        test_loader=lambda: instantiate(test),
        evaluator=lambda: instantiate(cfg.dataloader.evaluator),
        augmentations=[instantiate(a) for a in test.mapper.augmentations],
        input_format=test.mapper.image_format,
        bits="FP32" if bits is None else "W{}/A{}".format(*bits),
        checkpoint=weights,
    )
