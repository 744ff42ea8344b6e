"""Each distillation loss's recipe: its default taps, weight and options (the papers').

The one source of these defaults: ``qdet.config`` declares ``DISTILL.<LOSS>`` from them
(what a yacs YAML overrides), and :func:`qdet.distill.attach_distiller` fills the settings a
LazyConfig's or a script's ``terms`` leave out from them. Option names are the loss
classes' keyword arguments (:mod:`qdet.distill.losses`), upper-case in the config; an option
not given here keeps the class's default. ``connector``: the term's FAQD connector switch,
offered where the recipe names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TermRecipe:
    """A loss's default taps and weight, and the options whose default differs from, or is
    not in, the loss class's signature (lower-case names)."""

    taps: tuple[str, ...]
    weight: float
    options: dict = field(default_factory=dict)


_STAGES = tuple(f"backbone.bottom_up.res{i}" for i in (3, 4, 5))
# FA and FFA: no connector, batch-mean reduction, the teacher map resized to the student's
# with align_corners, eps in the normalisation.
_AFFINITY = dict(connector=False, reduction="mean", align_corners=True, eps=1e-5)

RECIPES: dict[str, TermRecipe] = {
    # QFD (QFD Eq. 7): MSE to the teacher's feature quantized by its teacher stage; one tap.
    "qfd": TermRecipe(("p3",), 1.0),
    # Float feature KD: MSE to the teacher's float feature. connector: FAQD's trainable
    # 1x1 conv + ReLU per tap on the student side (channels may then differ).
    "feature_kd": TermRecipe(("p3",), 1.0, dict(connector=False)),
    # Feature affinity (FAQD Eq. 6) on the ResNet stage outputs, weight 0.1 (FAQD: every
    # stage; res2 is left out as Detectron2 freezes it by default, MODEL.BACKBONE.FREEZE_AT).
    # norm: "fro2" (the paper) or "l1" (official code); reduction over the batch: "mean" or
    # "sum" (official code). algorithm "gram": the same value from C x C matrices (faster on
    # large maps).
    "fa": TermRecipe(_STAGES, 0.1, dict(norm="fro2", algorithm="explicit", **_AFFINITY)),
    # Fast FA (FAQD Eq. 14-15): k random projections, a fresh draw every step from its own
    # generator seeded with seed. estimate: what it estimates ("fro2": FA itself).
    "ffa": TermRecipe(_STAGES, 0.1, dict(k=15, seed=0, estimate="fro2", **_AFFINITY)),
    # AKT's refined feature distillation (AKT Eq. 6-9) on every residual branch, weight
    # 1 - alpha = 0.5. reduction: "mean" (the paper) or "official" (1000 x sums).
    # attention: "both", or "spatial" / "channel" alone (AKT Table 4's ablation).
    "rfd": TermRecipe(
        ("residual_branches",),
        0.5,
        dict(temperature=8.0, reduction="mean", attention="both"),
    ),
    # Logit KD: KL(softmax(z_T/t) || softmax(z_S/t)) t^2. activation "auto": sigmoid for
    # RetinaNet's focal-loss logits (per anchor and class), softmax for a classifier.
    "logit_kd": TermRecipe(("logits",), 1.0, dict(temperature=4.0, activation="auto")),
    # FAQD's logit MSE.
    "logit_mse": TermRecipe(("logits",), 1.0),
    # AKT's official logit term (-T^2 H(softmax((z_T - z_S)/T)), T = 20), alpha = 0.5.
    "akt_logit": TermRecipe(("logits",), 0.5, dict(temperature=20.0)),
}
