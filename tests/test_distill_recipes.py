"""Distillation recipes (qdet/distill/recipes.py): the yacs path (DISTILL.<LOSS> nodes,
term_specs) and the keyword path (specs_from_terms, what attach_distiller and a LazyConfig's
distill.terms use) build the same terms from the same settings, and the declared defaults
are the papers' numbers, written out here."""

from __future__ import annotations

import pytest
from detectron2.config import get_cfg

from qdet.config import add_qdet_config
from qdet.distill import RECIPES, registered_losses, specs_from_terms, term_specs

STAGES = [f"backbone.bottom_up.res{i}" for i in (3, 4, 5)]


def _yacs_specs(terms: dict):
    """The same terms set through a yacs config's DISTILL node, key by key."""
    cfg = add_qdet_config(get_cfg())
    cfg.DISTILL.TERMS = list(terms)
    for loss, settings in terms.items():
        node = cfg.DISTILL[loss.upper()]
        for key, value in settings.items():
            node[key.upper()] = value
    return term_specs(cfg)


@pytest.mark.parametrize("loss", sorted(RECIPES))
def test_both_paths_give_the_same_default_term(loss):
    assert specs_from_terms({loss: {}}) == _yacs_specs({loss: {}})


@pytest.mark.parametrize(
    "terms",
    [
        {"fa": {"norm": "l1", "weight": 0.5, "taps": ["backbone.bottom_up.res4"]}},
        {"feature_kd": {"connector": True, "taps": ["p4"]}, "logit_kd": {"temperature": 2.0}},
        {"rfd": {"attention": "spatial", "reduction": "official"}, "qfd": {"weight": 0.2}},
    ],
)
def test_both_paths_give_the_same_overridden_terms(terms):
    assert specs_from_terms(terms) == _yacs_specs(terms)


def test_declared_defaults_are_the_papers():
    """Taps and weights (QFD Eq. 7; FAQD Eq. 6, 14-15 with weight 0.1 on the stages; AKT's
    1 - alpha = 0.5, T = 8 for RFD and 20 for its logit term; KD's T = 4)."""
    cfg = add_qdet_config(get_cfg())
    d = cfg.DISTILL
    assert (d.QFD.TAPS, d.QFD.WEIGHT) == (["p3"], 1.0)
    assert (d.FEATURE_KD.TAPS, d.FEATURE_KD.WEIGHT, d.FEATURE_KD.CONNECTOR) == (["p3"], 1.0, False)
    assert (d.FA.TAPS, d.FA.WEIGHT, d.FA.NORM, d.FA.REDUCTION) == (STAGES, 0.1, "fro2", "mean")
    assert (d.FFA.TAPS, d.FFA.WEIGHT, d.FFA.K, d.FFA.ESTIMATE) == (STAGES, 0.1, 15, "fro2")
    assert (d.RFD.TAPS, d.RFD.WEIGHT, d.RFD.TEMPERATURE) == (["residual_branches"], 0.5, 8.0)
    assert (d.LOGIT_KD.TEMPERATURE, d.LOGIT_KD.ACTIVATION) == (4.0, "auto")
    assert (d.AKT_LOGIT.WEIGHT, d.AKT_LOGIT.TEMPERATURE) == (0.5, 20.0)
    assert (d.LOGIT_MSE.TAPS, d.LOGIT_MSE.WEIGHT) == (["logits"], 1.0)
    # Each of qdet's losses has a recipe, so both paths know its defaults.
    qdet_losses = {"qfd", "feature_kd", "fa", "ffa", "rfd", "logit_kd", "logit_mse", "akt_logit"}
    assert set(RECIPES) == qdet_losses and qdet_losses <= set(registered_losses())


def test_keyword_errors_name_the_setting_and_the_known_ones():
    with pytest.raises(ValueError, match=r"'fa': unknown setting 'nrom'.*'norm'.*'taps'"):
        specs_from_terms({"fa": {"nrom": "l1"}})
    with pytest.raises(ValueError, match=r"DISTILL.TERMS: loss 'kl' is unknown.*'fa'"):
        specs_from_terms({"kl": {}})
    with pytest.raises(ValueError, match=r"DISTILL.FA.WEIGHT=-1.*finite number >= 0"):
        specs_from_terms({"fa": {"weight": -1}})
