"""What every qdet meta-architecture adds to its Detectron2 parent: quantization by
``cfg.QUANT``, QFD's teacher-stage feature quantizer, and a distiller's loss."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from detectron2.config import CfgNode
from torch import nn

from qdet.distill.distiller import check_tap_path
from qdet.distill.taps import LOGITS, resolve_tap
from qdet.modeling.deployable import EDGE_LAYERS, make_deployable
from qdet.quantization import (
    Quantizer,
    UniformQuantizer,
    build_quantizer,
    name_quantizers,
    quantize_model,
    select_layers,
)
from qdet.quantization.layers import QUANTIZED_LAYERS
from qdet.quantization.settings import quantize_kwargs


@dataclass
class QuantizationSettings:
    """What ``cfg.QUANT`` asks of a meta-architecture: one keyword for every model class,
    so a new setting is added here and in :meth:`from_config` only."""

    quant: dict | None = None  # quantize_model keywords; None: the model stays FP
    save_codes: bool = True  # QUANT.SAVE_CODES
    freeze_with_weights: bool = True  # QUANT.FREEZE_WITH_WEIGHTS
    feature_tap: str = ""  # QUANT.FEATURE_TAP (QFD's teacher stage)
    feature_bits: int = 8  # QUANT.FEATURE_BITS
    feature_signed: bool = True  # QUANT.FEATURE_SIGNED
    edge_bits: int = 8  # QUANT.TARGET_EDGE_BITS (under QUANT.TARGET)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> QuantizationSettings:
        """The settings of a yacs config's ``QUANT`` node (:meth:`from_quant`)."""
        return cls.from_quant(cfg.QUANT)

    @classmethod
    def from_quant(cls, quant: Mapping) -> QuantizationSettings:
        """The settings of a mapping of the upper-case ``QUANT`` keys (a yacs ``QUANT``
        node, or a plain dict), checked (:func:`qdet.quantization.settings.quantize_kwargs`)."""
        kwargs = quantize_kwargs(quant) if quant["ENABLED"] else None
        if kwargs and quant["TARGETS"] and quant["ACT_SIGNED"] == "auto":
            # Transformer blocks' Linear inputs (LayerNorm, attention, GELU outputs) are
            # signed: QFD's ViTDet / Swin rule.
            kwargs["act_signed"] = True
        return cls(
            quant=kwargs,
            save_codes=quant["SAVE_CODES"],
            freeze_with_weights=quant["FREEZE_WITH_WEIGHTS"],
            feature_tap=quant["FEATURE_TAP"],
            feature_bits=quant["FEATURE_BITS"],
            feature_signed=quant["FEATURE_SIGNED"],
            edge_bits=quant["TARGET_EDGE_BITS"],
        )

    @property
    def target(self):
        """The deployment target (``QUANT.TARGET``), None for qdet's simulation."""
        return (self.quant or {}).get("quantizer_options", {}).get("target")


def _activation_quantizer(quant: dict, bits: int, signed: bool, **options):
    """An activation quantizer with the model's method and options (its target too);
    ``options`` (a calibration's ``percentiles``) make it QFD's uniform quantizer."""
    method = "uniform" if options else quant["act_method"] or quant["method"]
    options = {**(quant["quantizer_options"] or {}), **options}
    return build_quantizer(method, bits, "activation", signed=signed, **options)


def quantize_edges(model: nn.Module, quant: dict, bits: int) -> list[str]:
    """Quantize at ``bits`` the layers ``quant`` left in float that a deployment target's
    graph holds (:data:`qdet.modeling.deployable.EDGE_LAYERS`: the stem conv, RetinaNet's
    predictors), so that it runs them in integers too."""
    patterns = [re.compile(p) for p in EDGE_LAYERS]
    names = [n for n in select_layers(model, exclude=[]) if any(p.search(n) for p in patterns)]
    if not names:
        return []
    return quantize_model(
        model,
        w_bits=bits,
        a_bits=bits,
        include=[f"^{re.escape(n)}$" for n in names],
        exclude=[],
        method=quant["method"],
        per_channel=quant["per_channel"],
        quantizer_options=quant["quantizer_options"],
    )


def _weights(module: nn.Module):
    """``module``'s parameters other than its quantizers'."""
    quantizer_params = {
        id(p) for m in module.modules() if isinstance(m, Quantizer) for p in m.parameters()
    }
    return [p for p in module.parameters() if id(p) not in quantizer_params]


def apply_quantization(
    model: nn.Module,
    settings: QuantizationSettings,
    prepare: Callable[[], None] | None = None,
    per_level_head: bool = False,
) -> list[str]:
    """Quantize ``model`` in place as ``settings`` say (layer selection, edges and integer
    form under a deployment target, saved codes, quantizers of frozen layers frozen); the
    paths of the quantized layers. The one code path of the registered meta-architectures
    and of :func:`qdet.quantize_model`. ``prepare``: run after the layers are quantized,
    before a deployment target puts the model in its integer form
    (:mod:`qdet.modeling.deployable`); ``per_level_head``: the target's head quantizers get
    one quantizer per level."""
    quant = settings.quant
    layers = quantize_model(model, **quant) if quant else []
    if settings.target is not None and settings.edge_bits != 32:
        layers += quantize_edges(model, quant, settings.edge_bits)
    if prepare is not None and quant:
        prepare()
    added = {}
    if settings.target is not None:
        added = make_deployable(
            model,
            settings.target,
            activation=lambda signed: _activation_quantizer(quant, quant["a_bits"], signed),
            edge=lambda signed, **kw: _activation_quantizer(quant, 8, signed, **kw),
            per_level_head=per_level_head,
        )
    for layer in model.modules():
        if isinstance(layer, QUANTIZED_LAYERS):
            layer.save_codes = settings.save_codes
            if settings.freeze_with_weights and not layer.weight.requires_grad:
                for quantizer in (layer.weight_quantizer, layer.input_quantizer):
                    quantizer.requires_grad_(False)
    if settings.freeze_with_weights:
        for owner, quantizer in added.values():
            if not any(p.requires_grad for p in _weights(owner)):
                quantizer.requires_grad_(False)
    name_quantizers(model)
    return layers


def add_feature_quantizer(
    model: nn.Module, tap_name: str, bits: int = 8, signed: bool = True
) -> UniformQuantizer:
    """QFD's teacher-stage quantizer: an activation quantizer on ``tap_name``'s output (a
    backbone output such as p3, or a module path; :mod:`qdet.distill.taps`), which the rest
    of ``model`` and a distilling student's taps then see. Registered on ``model`` as
    ``feature_quantizer`` (so it is in the checkpoint)."""
    try:
        tap = resolve_tap(model, tap_name)
    except ValueError as e:
        raise ValueError(f"QUANT.FEATURE_TAP: {e}") from None
    if tap.name == LOGITS:
        raise ValueError("QUANT.FEATURE_TAP: QFD quantizes a feature, not the logits")
    check_tap_path(model, tap.path)
    quantizer = UniformQuantizer(bits, "activation", signed=signed)
    model.feature_quantizer = quantizer

    def hook(_module, _inputs, output):
        if not isinstance(tap.select, str):  # a module's tensor (any layout: per-tensor Q)
            return quantizer(output)
        output = dict(output)
        output[tap.select] = quantizer(output[tap.select])
        return output

    model.get_submodule(tap.path).register_forward_hook(hook)
    return quantizer


def quantized_model_kwargs(cfg: CfgNode) -> dict:
    """The ``from_config`` keywords of a :class:`QuantizedDetectorMixin` model."""
    return {"quantization": QuantizationSettings.from_config(cfg)}


class QuantizedDetectorMixin:
    """Mixed into a Detectron2 meta-architecture (``backbone`` attribute required), set up
    by :meth:`setup_quantization` from a :class:`QuantizationSettings`:

    ``quant``: :func:`qdet.quantization.quantize_model` keywords, None for FP.
    ``feature_tap``: adds ``feature_quantizer``, an activation quantizer (signed unless
    ``feature_signed`` is False) on that tap's output (a backbone output or a module path,
    :mod:`qdet.distill.taps`), seen by the rest of the model and by a distilling student
    (QFD's teacher stage).
    ``freeze_with_weights`` (``QUANT.FREEZE_WITH_WEIGHTS``): a quantized layer whose weight
    is frozen (``MODEL.BACKBONE.FREEZE_AT``) keeps its quantizers at their calibration too.
    A :class:`qdet.distill.Distiller` attached with :meth:`attach_distiller` adds its terms
    to the training losses (:meth:`distill_losses`); with its ``label_free`` set they are
    the only losses.
    """

    # Top-level modules whose outputs taps may read: a teacher runs only these for them.
    tap_roots: tuple[str, ...] = ("backbone",)

    def setup_quantization(
        self,
        settings: QuantizationSettings | None,
        prepare: Callable[[], None] | None = None,
        per_level_head: bool = False,
    ) -> None:
        """:func:`apply_quantization` (``prepare``, ``per_level_head``: its), then QFD's
        feature quantizer on ``settings.feature_tap``; no distiller yet."""
        settings = settings or QuantizationSettings()
        self.quantized_layers = apply_quantization(self, settings, prepare, per_level_head)
        self.feature_tap = settings.feature_tap
        if settings.feature_tap:
            self.feature_quantizer = add_feature_quantizer(
                self, settings.feature_tap, settings.feature_bits, settings.feature_signed
            )
        self.distiller = None
        name_quantizers(self)

    def preprocess_image(self, batched_inputs):
        """The parent's normalised, padded batch, refused when a pixel is inf or NaN:
        quantizers would clip inf to their bounds and train on it silently (Detectron2's
        trainer, too, raises ``FloatingPointError`` for what is not finite)."""
        images = super().preprocess_image(batched_inputs)
        if not bool(torch.isfinite(images.tensor).all()):
            bad = [
                batched_inputs[i].get("file_name", f"image {i} of the batch")
                for i, image in enumerate(images.tensor)
                if not bool(torch.isfinite(image).all())
            ]
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite pixel values (inf/NaN) in {bad}; check "
                "the data loader and its augmentations"
            )
        return images

    def check_tap_path(self, path: str) -> None:
        """Refuse a tap whose module does not run in :meth:`forward_taps`."""
        if path.split(".")[0] not in self.tap_roots:
            raise ValueError(
                f"tap module {path!r}: a {type(self).__name__} teacher runs only "
                f"{list(self.tap_roots)} for distillation; tap inside those"
            )

    def forward_taps(self, images: torch.Tensor, paths: list[str]) -> None:
        """Run as much of the model on normalised ``images`` as the tapped ``paths`` need."""
        self.backbone(images)

    def attach_distiller(self, distiller) -> None:
        """Add ``distiller``'s terms to the training losses (it holds the frozen teacher);
        None detaches the current one and its hooks."""
        if self.distiller is not None and self.distiller is not distiller:
            self.distiller.remove()
        self.distiller = distiller

    @property
    def label_free(self) -> bool:
        """Training without ground-truth losses (``DISTILL.LABEL_FREE``)."""
        return self.distiller is not None and self.distiller.label_free

    def distill_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``losses`` (times the distiller's ``gt_weight``, ``DISTILL.GT_WEIGHT``) plus the
        distiller's terms on this step's taps (if attached); only the terms when label-free."""
        return losses if self.distiller is None else self.distiller.add_to(losses)
