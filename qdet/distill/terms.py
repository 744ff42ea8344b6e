"""Distillation terms as configured: a registered loss on taps, with a weight and its
options (:class:`TermSpec`), built and checked from either a yacs config's ``DISTILL`` node
(:func:`term_specs`) or plain settings (:func:`specs_from_terms`: a LazyConfig's
``distill.terms``, :func:`qdet.distill.attach_distiller`'s keywords), both through
:func:`term_spec`; what the settings leave out comes from the recipes
(:mod:`qdet.distill.recipes`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from detectron2.config import CfgNode

from qdet.distill.losses import build_distill_loss, registered_losses
from qdet.distill.recipes import RECIPES, TermRecipe
from qdet.distill.taps import LOGITS, RESIDUAL_BRANCHES


@dataclass
class TermSpec:
    """One distillation term as configured: a loss on taps, weighted, with its options."""

    loss: str
    taps: list[str]
    weight: float
    connector: bool = False
    options: dict = field(default_factory=dict)
    weight_key: str = ""  # the config key of ``weight``, for messages


# Keys of a DISTILL.<LOSS> node that belong to the term, not to the loss's options.
_TERM_KEYS = ("TAPS", "WEIGHT", "CONNECTOR")


def term_spec(
    name: str,
    taps: list[str],
    weight,
    options: Mapping,
    connector: bool = False,
    node: str = "",
    field_name: str = "DISTILL.TERMS",
) -> TermSpec:
    """One term, checked: a registered loss (``field_name`` names where its name was set),
    at least one tap, a finite weight >= 0 and options the loss accepts. ``node``: the
    config key holding the term's settings (``DISTILL.<LOSS>``), for messages; its weight's
    key is ``<node>.WEIGHT`` unless ``field_name`` is the one-term shorthand's."""
    losses = registered_losses()
    if name not in losses:
        raise ValueError(f"{field_name}: loss {name!r} is unknown: choose from {sorted(losses)}")
    node = node or f"DISTILL.{name.upper()}"
    where = "DISTILL.WEIGHT" if field_name == "DISTILL.LOSS" else f"{node}.WEIGHT"
    number = isinstance(weight, int | float) and not isinstance(weight, bool)
    if not (number and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"{where}={weight!r}: a term's weight must be a finite number >= 0")
    if not taps:
        raise ValueError(f"DISTILL.{name.upper()}.TAPS is empty: name at least one tap")
    options = dict(options)
    # Unknown or bad options fail here, before any model is built ("auto" is resolved
    # against the student by the Distiller).
    probe = dict(options)
    if probe.get("activation") == "auto":
        probe["activation"] = "softmax"
    try:
        build_distill_loss(name, **probe)
    except ValueError as e:
        raise ValueError(f"{node}: {e}") from None
    return TermSpec(name, list(taps), float(weight), bool(connector), options, weight_key=where)


def term_specs(cfg: CfgNode) -> list[TermSpec]:
    """The terms of ``cfg.DISTILL``: each name in ``TERMS`` with its ``DISTILL.<NAME>`` node,
    or, with ``TERMS`` empty, the one-term shorthand ``LOSS`` on ``TAP`` with ``WEIGHT``
    (and the options of ``DISTILL.<LOSS>``)."""
    d = cfg.DISTILL
    names = list(d.TERMS) or [d.LOSS]
    field_name = "DISTILL.TERMS" if d.TERMS else "DISTILL.LOSS"
    if len(set(names)) != len(names):
        raise ValueError(f"DISTILL.TERMS={names} names a loss twice: each loss is one term")
    specs, losses = [], registered_losses()
    for name in names:
        if name not in losses:
            raise ValueError(
                f"{field_name}: loss {name!r} is unknown: choose from {sorted(losses)}"
            )
        node = d.get(name.upper())
        if node is None:  # registered after the config was made
            raise ValueError(
                f"{field_name}: loss {name!r} has no config node DISTILL.{name.upper()}: "
                f"declare it with qdet.config.add_distill_term_config(cfg, {name!r}, taps, "
                "weight) before merging the YAML"
            )
        taps = list(node.TAPS) if d.TERMS else [d.TAP]
        weight = node.WEIGHT if d.TERMS else d.WEIGHT
        options = {k.lower(): v for k, v in node.items() if k not in _TERM_KEYS}
        connect = bool(node.get("CONNECTOR"))
        specs.append(term_spec(name, taps, weight, options, connect, field_name=field_name))
    return specs


def specs_from_terms(terms: Mapping[str, Mapping] | list[TermSpec]) -> list[TermSpec]:
    """TermSpecs from ``{loss: {"taps": [...], "weight": w, "connector": False, **options}}``
    (a loss's omitted taps / weight / options take its recipe's defaults,
    :mod:`qdet.distill.recipes`, as ``DISTILL.<LOSS>`` does), checked as ``DISTILL.TERMS``
    is; TermSpecs pass through."""
    if isinstance(terms, list):
        return terms
    losses, specs = registered_losses(), []
    for name, settings in terms.items():
        if name not in losses:
            known = sorted(losses)
            raise ValueError(f"DISTILL.TERMS: loss {name!r} is unknown: choose from {known}")
        recipe = RECIPES.get(name, TermRecipe((), 1.0))
        values = {
            "taps": list(recipe.taps),
            "weight": recipe.weight,
            **losses[name].options(),
            **recipe.options,
        }
        for key, value in dict(settings).items():
            if key.lower() not in values:
                raise ValueError(
                    f"distillation term {name!r}: unknown setting {key!r}; use {sorted(values)}"
                )
            values[key.lower()] = list(value) if isinstance(value, list | tuple) else value
        taps, weight = values.pop("taps"), values.pop("weight")
        connect = bool(values.get("connector"))
        options = {k: v for k, v in values.items() if k.upper() not in _TERM_KEYS}
        specs.append(term_spec(name, taps, weight, options, connect))
    return specs


def qfd_term_tap(specs: list[TermSpec]) -> str | None:
    """The teacher feature the ``qfd`` term distils (QFD's teacher stage quantizes it), or
    None without a qfd term."""
    taps = [t for s in specs if s.loss == "qfd" for t in s.taps]
    if len(taps) > 1:
        raise ValueError(
            f"the qfd term has taps {taps}: QFD's teacher stage quantizes one teacher "
            "feature; give it one tap (other taps can use feature_kd)"
        )
    if taps and (taps[0] in (LOGITS, RESIDUAL_BRANCHES) or any(c in taps[0] for c in "*?[")):
        raise ValueError(
            f"the qfd term's tap {taps[0]!r}: QFD quantizes one named feature (a backbone "
            "output such as p3, or a module path), not logits or a pattern"
        )
    return taps[0] if taps else None
