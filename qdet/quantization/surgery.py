"""Model surgery: swap the chosen Conv2d / Linear layers for quantized ones, eagerly.

qdet never traces the model (torch.fx fails on detectors' data-dependent control flow): it
walks ``named_modules`` and replaces matching layers in their parents.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Sequence

from tabulate import tabulate
from torch import nn

from qdet.quantization.layers import QUANTIZED_LAYERS, QConv2d, QLinear
from qdet.quantization.quantizers import check_bits, quantizer_methods

logger = logging.getLogger(__name__)

# Layers that stay full precision unless ``exclude`` is given: the input stem conv and
# the final predictors (QFD, "RetinaNet": all layers but the input to the backbone and the
# output of the detection head; classification: all but the first conv and last FC).
DEFAULT_EXCLUDE = (
    r"(^|\.)stem\.conv1$",  # Detectron2 ResNet stem
    r"(^|\.)patch_embed\.proj$",  # Detectron2 ViT / Swin patch embedding
    r"(^|\.)(cls_score|bbox_pred)$",  # RetinaNet head and Fast R-CNN box predictors
    r"(^|\.)(objectness_logits|anchor_deltas)$",  # RPN predictors
    r"(^|\.)(mask_head|sem_seg_head)\.predictor$",  # mask and semantic-segmentation predictors
    r"(^|\.)ctrness$",  # FCOS's centerness predictor
    r"^conv1$",  # torchvision ResNet stem
    r"^fc$",  # torchvision ResNet classifier
)


# Transformer layer groups (QFD, "The ViT structure", Table 8): the Linear layers of every
# block of Detectron2's ViT and Swin. Patch embedding, patch merging and heads are not in.
QUANT_TARGETS = {
    "mha": r"(^|\.)blocks\.\d+\.attn\.(qkv|proj)$",
    "mlp": r"(^|\.)blocks\.\d+\.mlp\.(fc1|fc2)$",
}


def target_patterns(targets: Sequence[str], include: Sequence[str] = ()) -> list[str] | None:
    """``include`` patterns for transformer ``targets`` (``QUANT.TARGETS``) plus ``include``.

    None (quantize every layer) when both are empty.
    """
    unknown = [t for t in targets if t not in QUANT_TARGETS]
    if unknown:
        raise ValueError(
            f"QUANT.TARGETS has unknown target(s) {unknown}: choose from {list(QUANT_TARGETS)}"
        )
    patterns = [QUANT_TARGETS[t] for t in dict.fromkeys(targets)] + list(include)
    return patterns or None


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear)) and not isinstance(module, QUANTIZED_LAYERS)


def _check_patterns(patterns: Sequence[str], names: list[str], what: str) -> None:
    """Every user pattern must compile and match at least one layer."""
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{what} pattern {pattern!r} is not a valid regex: {e}") from e
        if not any(regex.search(n) for n in names):
            near = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3) or names[:5]
            raise ValueError(
                f"{what} pattern {pattern!r} matches no Conv2d/Linear layer. Near names: "
                f"{near}. Patterns are regexes searched in module names (re.search)."
            )


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """Names of the Conv2d / Linear layers that ``include`` selects and ``exclude`` spares.

    ``include=None`` selects every layer; ``exclude=None`` spares :data:`DEFAULT_EXCLUDE`.
    User patterns that match no layer raise ``ValueError`` listing near names.
    """
    names = [n for n, m in model.named_modules() if _quantizable(m)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear to quantize")
    if include:
        _check_patterns(include, names, "include")
    if exclude:
        _check_patterns(exclude, names, "exclude")
    inc = [re.compile(p) for p in include] if include else None
    exc = [re.compile(p) for p in (DEFAULT_EXCLUDE if exclude is None else exclude)]
    return [
        n
        for n in names
        if (inc is None or any(r.search(n) for r in inc)) and not any(r.search(n) for r in exc)
    ]


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``name`` is, and wherever else the old module is referenced.

    Detectron2 keeps some layers in plain Python lists beside their registered names
    (FPN's ``lateral_convs`` / ``output_convs``), and its forward reads the lists: a
    ``setattr`` alone would leave the old FP layer running.
    """
    old = model.get_submodule(name)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    for module in model.modules():
        for attr, value in vars(module).items():
            if isinstance(value, (list, tuple)) and any(v is old for v in value):
                replaced = [new if v is old else v for v in value]
                object.__setattr__(module, attr, type(value)(replaced))


def quantize_model(
    model: nn.Module,
    w_bits: int,
    a_bits: int,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    method: str = "uniform",
    per_channel: bool = False,
    act_signed: bool | None = None,
    verbose: bool = False,
    quantizer_options: dict | None = None,
    act_method: str | None = None,
) -> list[str]:
    """Replace matching ``nn.Conv2d`` / ``nn.Linear`` layers of ``model`` in place.

    Args:
        w_bits, a_bits: weight and input-activation bit widths (1..8, or 32 = FP).
        include, exclude: regexes searched in module names; see :func:`select_layers`.
            The defaults quantize every conv of a Detectron2 RetinaNet (backbone, shortcut
            convs, FPN, head) except the stem conv and the class/box predictors.
        method: ``uniform`` (QFD / EWGS quantizer with STE), ``ewgs`` or ``lsq``.
        per_channel: per-output-channel weight quantizers.
        act_signed: ``None`` decides each input quantizer's sign at calibration (signed if
            the calibration data has negative values); True/False forces it.
        verbose: log a table of the quantized layers.
        quantizer_options: more quantizer keywords, e.g. ``bound_gradient`` (any method)
            or ``delta`` (``ewgs``); see :func:`qdet.quantization.build_quantizer`.
        act_method: the input (activation) quantizers' method when not ``method``, e.g.
            ``qrelu`` (FAQD's quantized ReLU, :mod:`qdet.quantization.qrelu`).

    Returns:
        The names of the quantized layers, in module order.
    """
    check_bits(w_bits)
    check_bits(a_bits)
    for m in (method, act_method or method):
        if m not in quantizer_methods():
            known = list(quantizer_methods())
            raise ValueError(f"unknown quantization method {m!r}: choose from {known}")
    names = select_layers(model, include, exclude)
    for name in names:
        layer = model.get_submodule(name)
        qcls = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
        try:
            quantized = qcls.from_float(
                layer,
                w_bits,
                a_bits,
                method=method,
                per_channel=per_channel,
                act_signed=act_signed,
                options=quantizer_options,
                act_method=act_method,
            )
        except ValueError as e:  # name the layer: a config applies to many
            raise ValueError(f"{name}: {e}") from None
        _replace_module(model, name, quantized)
    if verbose:
        logger.info("Quantized %d layers:\n%s", len(names), quantization_table(model))
    return names


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> quantized layer, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)}


def quantization_table(model: nn.Module) -> str:
    """A table of every Conv2d / Linear: name, type, W/A bits, parameters.

    Layers left in full precision are listed as 32/32, so the table also shows what was
    not quantized, and the last row counts the quantized share of parameters.
    """
    rows, q_params, all_params = [], 0, 0
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        params = sum(p.numel() for p in m.parameters(recurse=False))
        all_params += params
        if isinstance(m, QUANTIZED_LAYERS):
            bits = f"{m.weight_quantizer.bits}/{m.input_quantizer.bits}"
            q_params += params
        else:
            bits = "32/32"
        rows.append((name, type(m).__name__, bits, f"{params:,}"))
    share = q_params / max(all_params, 1)
    rows.append(("total", "", f"{share:.1%} quantized", f"{all_params:,}"))
    return tabulate(rows, headers=["layer", "type", "W/A bits", "params"], tablefmt="github")
