"""``qdet.quantize_model``: quantize a model built anywhere (a LazyConfig's, a model-zoo
config's, your own), with the rules of qdet's registered meta-architectures.

    import qdet
    model = instantiate(cfg.model)            # or build_model(cfg), any meta-architecture
    summary = qdet.quantize_model(model, w_bits=4, a_bits=4)
    summary = qdet.quantize_model(model, cfg=yacs_cfg)   # reads yacs_cfg.QUANT
    print(summary)                            # every Conv2d / Linear, its W/A bits

Keywords are the ``QUANT.*`` keys in lower case (:func:`qdet.add_qdet_config` documents
each); unset ones keep their defaults. Parameter names do not change, so the
FP checkpoint loads into the quantized model (only quantizer keys are missing).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from detectron2.config import CfgNode
from torch import nn

from qdet.config import quant_defaults
from qdet.modeling.quantized import QuantizationSettings, apply_quantization
from qdet.quantization.layers import QUANTIZED_LAYERS
from qdet.quantization.surgery import quantization_table

# QUANT keys a built model cannot take through this call: they belong to a registered
# meta-architecture's own structure (QFD's teacher-stage quantizer on a tap, RetinaNet's
# per-level head quantizers). The trainer's keys (calibration, optimizer) are accepted,
# and used by whoever trains the model.
_MODEL_ONLY = ("FEATURE_TAP", "FEATURE_BITS", "FEATURE_SIGNED", "HEAD_PER_LEVEL_ACT")


@dataclass
class QuantizationSummary:
    """What :func:`quantize_model` quantized: ``layers`` path -> (weight bits, input bits),
    in module order; ``str()`` is the table of every Conv2d / Linear."""

    layers: dict[str, tuple[int, int]]
    table: str

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        return self.table


def quant_settings(cfg: CfgNode | None = None, **settings) -> dict:
    """The ``QUANT`` settings as a plain dict (upper-case keys): ``cfg.QUANT``'s, or qdet's
    defaults (:func:`qdet.config.quant_defaults`) with ``settings`` (lower-case ``QUANT``
    keys) set; unknown keys are an error listing the near ones."""
    if cfg is not None:
        if settings:
            raise ValueError(
                f"quantize_model: give cfg= or keywords, not both (got cfg and {sorted(settings)})"
            )
        if "QUANT" not in cfg:
            raise ValueError("cfg has no QUANT node: build it with qdet.add_qdet_config(cfg)")
        quant = dict(cfg.QUANT)
        if not quant["ENABLED"]:
            raise ValueError("cfg.QUANT.ENABLED is False: set it True to quantize the model")
        return quant
    quant = quant_defaults()
    known = {k.lower() for k in quant if k not in _MODEL_ONLY}
    for key, value in settings.items():
        if key.upper() in _MODEL_ONLY:
            raise ValueError(
                f"quantize_model: {key!r} belongs to qdet's registered meta-architectures "
                "(QuantRetinaNet, QuantMaskRCNN: QUANT.FEATURE_TAP is QFD's teacher stage, "
                "QUANT.HEAD_PER_LEVEL_ACT RetinaNet's head); build one of those for it"
            )
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=4, cutoff=0.5)
            hint = f"did you mean {near}? " if near else ""
            raise ValueError(
                f"quantize_model: unknown setting {key!r}; {hint}settings are the QUANT keys "
                f"in lower case: {sorted(known)}"
            )
        old = quant[key.upper()]
        if isinstance(old, bool) != isinstance(value, bool) and not isinstance(old, list | tuple):
            raise ValueError(f"quantize_model: {key}={value!r}, expected a {type(old).__name__}")
        if isinstance(old, float) and isinstance(value, int):
            value = float(value)
        quant[key.upper()] = list(value) if isinstance(value, list | tuple) else value
    if settings.get("enabled", True) is False:
        raise ValueError("quantize_model: enabled=False quantizes nothing; leave it out")
    quant["ENABLED"] = True
    return quant


def quantize_model(
    model: nn.Module, *, cfg: CfgNode | None = None, **settings
) -> QuantizationSummary:
    """Quantize ``model``'s Conv2d / Linear layers in place, as ``cfg.QUANT`` or the
    keywords (lower-case ``QUANT`` keys: ``w_bits``, ``a_bits``, ``include``, ``exclude``,
    ``targets`` = ["mha", "mlp"], ``method``, ``target``, ...) say: the code path of
    ``QuantRetinaNet`` and ``QuantMaskRCNN``. Calibrate before training
    (:func:`qdet.quantization.calibrate`, or the trainer's ``QUANT.CALIB_BATCHES``).

    A model that already has quantized layers is refused (build a fresh FP model)."""
    done = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]
    if done:
        raise ValueError(
            f"{type(model).__name__} is already quantized ({len(done)} layers, e.g. "
            f"{done[0]!r}): quantize_model quantizes an FP model once; build a fresh one"
        )
    settings_ = QuantizationSettings.from_quant(quant_settings(cfg, **settings))
    apply_quantization(model, settings_)
    layers = {
        n: (m.weight_quantizer.bits, m.input_quantizer.bits)
        for n, m in model.named_modules()
        if isinstance(m, QUANTIZED_LAYERS)
    }
    if not layers:
        raise ValueError(
            f"{type(model).__name__}: the settings select no layer to quantize (include / "
            "exclude / targets); see qdet.quantization.select_layers"
        )
    return QuantizationSummary(layers, quantization_table(model))
