"""Distillation: losses (one registry), taps on any layer, and the distiller that runs the
frozen teacher and adds each configured term to the student's losses."""

from qdet.distill.affinity import FastFeatureAffinityLoss, FeatureAffinityLoss
from qdet.distill.attention import RFDLoss
from qdet.distill.distiller import Distiller, DistillTerm, attach_distiller
from qdet.distill.loss_base import DistillLoss
from qdet.distill.losses import (
    DISTILL_LOSS_REGISTRY,
    AKTLogitLoss,
    FeatureKDLoss,
    LogitKDLoss,
    LogitMSELoss,
    QFDLoss,
    build_distill_loss,
    registered_losses,
)
from qdet.distill.recipes import RECIPES, TermRecipe
from qdet.distill.taps import Tap, TapRecorder, expand_taps, resolve_tap
from qdet.distill.terms import TermSpec, qfd_term_tap, specs_from_terms, term_spec, term_specs

__all__ = [
    "RECIPES",
    "TermRecipe",
    "DISTILL_LOSS_REGISTRY",
    "AKTLogitLoss",
    "DistillLoss",
    "DistillTerm",
    "Distiller",
    "FastFeatureAffinityLoss",
    "FeatureAffinityLoss",
    "FeatureKDLoss",
    "LogitKDLoss",
    "LogitMSELoss",
    "QFDLoss",
    "RFDLoss",
    "Tap",
    "TapRecorder",
    "TermSpec",
    "attach_distiller",
    "build_distill_loss",
    "expand_taps",
    "registered_losses",
    "resolve_tap",
    "qfd_term_tap",
    "specs_from_terms",
    "term_spec",
    "term_specs",
]
