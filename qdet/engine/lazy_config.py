"""A LazyConfig's qdet nodes read as plain settings, and the one LazyConfig loader.

A LazyConfig for qdet is Detectron2's (``model``, ``dataloader``, ``optimizer``,
``lr_multiplier``, ``train``) plus a ``quant`` node (the ``QUANT`` keys in lower case,
:func:`qdet.quantize_model`'s keywords, and the trainer's keys below) and an optional
``distill`` node (:data:`DISTILL_KEYS`). :func:`load_lazy_config` is what every tool and
:mod:`qdet.engine.lazy` load one with.
"""

from __future__ import annotations

import os

from detectron2.config import LazyConfig
from omegaconf import DictConfig, OmegaConf

from qdet.config import quant_defaults

QUANT_NODE_HELP = (
    "add a quant node to the config: quant = dict(w_bits=4, a_bits=4) (the QUANT keys in "
    "lower case, e.g. targets=['mha'] for a ViT), or quant = dict(enabled=False) to train "
    "the model in FP"
)
# quant keys the trainer reads (calibration, the quantizer parameters' optimizer group);
# the rest go to qdet.quantize_model.
TRAINER_KEYS = {
    "enabled": True,
    "calib_batches": 4,
    "optimizer": "adam",
    "base_lr": 1e-5,
    "weight_decay": 0.0,
}
DISTILL_KEYS = (
    "teacher_weights",  # the FP model's checkpoint
    "teacher_model",  # its model node (default: the student's cfg.model)
    "terms",  # {loss: {"taps": [...], "weight": w, **options}} (attach_distiller)
    "label_free",
    "gt_weight",
    "teacher_stage_iters",  # QFD's teacher stage (a qfd term): default max_iter // 10
    "teacher_feature_bits",  # its feature quantizer's bits (8)
)


def is_lazy_config(config_file: str) -> bool:
    """A LazyConfig is Python; qdet's yacs configs are YAML."""
    return config_file.endswith(".py")


def load_lazy_config(config_file: str, opts: list[str]):
    """``LazyConfig.load`` + ``apply_overrides`` (``key=value``), with a clear error for a
    missing file and for overrides that are not ``key=value``."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file!r} does not exist")
    if any("=" not in o for o in opts):
        bad = [o for o in opts if "=" not in o]
        raise ValueError(
            f"LazyConfig overrides are key=value, got {bad} (e.g. train.init_checkpoint=X.pth; "
            "KEY VALUE pairs are for yacs configs)"
        )
    return LazyConfig.apply_overrides(LazyConfig.load(config_file), opts)


def plain(node) -> dict:
    """A config node as a plain dict (interpolations resolved)."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def quant_settings(cfg) -> tuple[dict, dict]:
    """(``qdet.quantize_model`` keywords, the trainer's keys) of ``cfg.quant``."""
    if "quant" not in cfg:
        raise ValueError(f"the config has no quant node: {QUANT_NODE_HELP}")
    settings = plain(cfg.quant)
    trainer = {k: settings.pop(k, default) for k, default in TRAINER_KEYS.items()}
    if trainer["optimizer"] not in ("adam", "sgd"):
        raise ValueError(f"quant.optimizer={trainer['optimizer']!r}: use 'adam' or 'sgd'")
    return settings, trainer


def quant_bits(cfg) -> tuple[int, int] | None:
    """(weight bits, activation bits) that ``cfg.quant`` trains (qdet's ``QUANT`` defaults
    for keys it leaves out), or None for an FP model."""
    settings, trainer = quant_settings(cfg)
    if not trainer["enabled"]:
        return None
    defaults = quant_defaults()
    w_bits = settings.get("w_bits", defaults["W_BITS"])
    return int(w_bits), int(settings.get("a_bits", defaults["A_BITS"]))


def check_distill_node(cfg) -> None:
    """``cfg.distill``'s keys are :data:`DISTILL_KEYS`."""
    unknown = sorted(set(cfg.distill) - set(DISTILL_KEYS))
    if unknown:
        raise ValueError(f"distill has unknown keys {unknown}: use {list(DISTILL_KEYS)}")
