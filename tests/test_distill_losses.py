"""Distillation losses against independent computations written another way (Python loops
and explicit matrices), plus their option and shape errors. Small maps, CPU, float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qdet.distill.losses import DISTILL_LOSS_REGISTRY, build_distill_loss, registered_losses

D = torch.float64


def _randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D) * scale


def _softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [x / sum(e) for x in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


# ----------------------------------------------------------------------------- registry


def test_every_config_name_builds_its_registered_class():
    assert set(registered_losses()) == {
        "qfd",
        "feature_kd",
        "fa",
        "ffa",
        "rfd",
        "logit_kd",
        "logit_mse",
        "akt_logit",
    }
    for name, cls in registered_losses().items():
        loss = build_distill_loss(name)
        assert type(loss) is cls is DISTILL_LOSS_REGISTRY.get(cls.__name__)
        assert loss.name == name
        assert loss.quantized_teacher is (name == "qfd")
        assert loss.kind == ("logits" if name.startswith(("logit", "akt")) else "feature")
        assert type(loss).__doc__
    for name in ("qfd", "fa", "ffa", "rfd"):
        assert "Eq." in type(build_distill_loss(name)).__doc__


def test_a_loss_registered_by_a_user_is_configured_and_built_like_qdets():
    from detectron2.config import get_cfg

    from qdet.config import add_distill_term_config, add_qdet_config
    from qdet.distill.loss_base import DistillLoss
    from qdet.distill.terms import term_specs

    @DISTILL_LOSS_REGISTRY.register()
    class ScaledL1Loss(DistillLoss):
        """scale * mean |f_s - f_t|, summed over taps."""

        name = "scaled_l1"

        def __init__(self, *, scale=2.0, **unknown):
            super().__init__()
            self.reject_unknown(unknown)
            self.scale = scale

        def forward(self, students, teachers):
            return sum(self.scale * (s - t).abs().mean() for s, t in zip(students, teachers))

    try:
        assert registered_losses()["scaled_l1"] is ScaledL1Loss
        cfg = add_qdet_config(get_cfg())
        cfg.DISTILL.ENABLED, cfg.DISTILL.TERMS = True, ["scaled_l1", "fa"]
        with pytest.raises(ValueError, match="no config node DISTILL.SCALED_L1.*add_distill_"):
            term_specs(cfg)
        add_distill_term_config(cfg, "scaled_l1", ["p4"], 0.25)
        assert dict(cfg.DISTILL.SCALED_L1) == {"TAPS": ["p4"], "WEIGHT": 0.25, "SCALE": 2.0}
        cfg.merge_from_list(["DISTILL.SCALED_L1.SCALE", 3.0])  # a YAML's keys now merge
        spec = term_specs(cfg)[0]
        assert (spec.loss, spec.taps, spec.weight, spec.options) == (
            "scaled_l1",
            ["p4"],
            0.25,
            {"scale": 3.0},
        )
        s, t = _randn(2, 3, 4, 4, seed=1), _randn(2, 3, 4, 4, seed=2)
        by_hand = 3.0 * sum(abs(a - b) for a, b in zip(s.flatten().tolist(), t.flatten().tolist()))
        loss = build_distill_loss("scaled_l1", **spec.options)([s], [t])
        assert loss.item() == pytest.approx(by_hand / s.numel(), rel=1e-12)
    finally:
        DISTILL_LOSS_REGISTRY._obj_map.pop("ScaledL1Loss")  # the registry is global
    with pytest.raises(ValueError, match="'scaled_l1' is not registered"):
        add_distill_term_config(add_qdet_config(get_cfg()), "scaled_l1", ["p4"], 1.0)


def test_options_and_defaults_are_public():
    fa = build_distill_loss("fa")
    assert type(fa).options() == {
        "norm": "fro2",
        "reduction": "mean",
        "eps": 1e-5,
        "align_corners": True,
        "algorithm": "explicit",
    }
    assert build_distill_loss("ffa").options()["k"] == 15
    assert build_distill_loss("rfd").temperature == 8.0
    assert build_distill_loss("logit_kd").temperature == 4.0
    assert build_distill_loss("akt_logit").temperature == 20.0
    assert build_distill_loss("qfd").options() == {}
    assert "norm='l1'" in repr(build_distill_loss("fa", norm="l1"))


# ------------------------------------------------------------------------ qfd, feature_kd


@pytest.mark.parametrize("name", ["qfd", "feature_kd"])
def test_mse_losses_match_the_previous_single_tap_value_and_sum_taps(name):
    loss = build_distill_loss(name)
    s = torch.randn(2, 4, 5, 6)
    t = torch.randn(2, 4, 5, 6)
    assert torch.equal(loss([s], [t]), F.mse_loss(s, t))  # the code path before taps
    s2, t2 = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    manual = ((s - t) ** 2).mean() + ((s2 - t2) ** 2).mean()
    torch.testing.assert_close(loss([s, s2], [t, t2]), manual)


def test_teacher_is_cast_to_the_student_dtype():
    s = torch.randn(1, 2, 3, 3, requires_grad=True)
    out = build_distill_loss("feature_kd")([s], [torch.randn(1, 2, 3, 3, dtype=D)])
    assert out.dtype == torch.float32
    out.backward()
    assert s.grad is not None


# ------------------------------------------------------------------------------------- FA


def _pixels(f, b):
    """Pixel C-vectors of image b as Python lists, row-major."""
    _, c, h, w = f.shape
    return [[f[b, k, y, x].item() for k in range(c)] for y in range(h) for x in range(w)]


def _unit(v, eps):
    n = math.sqrt(sum(x * x for x in v))
    return [x / max(n, eps) for x in v]


def _fa_reference(s, t, norm="fro2", reduction="mean", eps=1e-5, align_corners=True):
    if t.shape[-2:] != s.shape[-2:]:
        t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=align_corners)
    hw = s.shape[2] * s.shape[3]
    per_image = []
    for b in range(s.shape[0]):
        ps = [_unit(v, eps) for v in _pixels(s, b)]
        pt = [_unit(v, eps) for v in _pixels(t, b)]
        total = 0.0
        for i in range(hw):
            for j in range(hw):
                cos_s = sum(x * y for x, y in zip(ps[i], ps[j]))
                cos_t = sum(x * y for x, y in zip(pt[i], pt[j]))
                d = cos_t - cos_s
                total += d * d if norm == "fro2" else abs(d)
        per_image.append(total / hw**2)
    return sum(per_image) / len(per_image) if reduction == "mean" else sum(per_image)


@pytest.mark.parametrize("norm", ["fro2", "l1"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fa_matches_pairwise_cosine_loops(norm, reduction):
    s = _randn(2, 3, 3, 4, seed=1)
    t = _randn(2, 5, 3, 4, seed=2)  # different C is fine
    loss = build_distill_loss("fa", norm=norm, reduction=reduction)
    ref = _fa_reference(s, t, norm, reduction)
    torch.testing.assert_close(loss([s], [t]).item(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fa_gram_algorithm_matches_pairwise_cosine_loops(reduction):
    s = _randn(2, 3, 3, 4, seed=7)
    t = _randn(2, 5, 6, 8, seed=8)  # different C and a resized teacher
    loss = build_distill_loss("fa", reduction=reduction, algorithm="gram")
    ref = _fa_reference(s, t, "fro2", reduction)
    torch.testing.assert_close(loss([s], [t]).item(), ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="algorithm='gram' needs norm='fro2'"):
        build_distill_loss("fa", norm="l1", algorithm="gram")


@pytest.mark.parametrize("align_corners", [True, False])
def test_fa_resizes_the_teacher_to_the_student_and_sums_taps(align_corners):
    s1, t1 = _randn(2, 3, 3, 4, seed=3), _randn(2, 6, 6, 8, seed=4)
    s2, t2 = _randn(2, 4, 2, 2, seed=5), _randn(2, 4, 2, 2, seed=6)
    loss = build_distill_loss("fa", align_corners=align_corners)
    ref = _fa_reference(s1, t1, align_corners=align_corners) + _fa_reference(s2, t2)
    torch.testing.assert_close(loss([s1, s2], [t1, t2]).item(), ref, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ FFA


def _affinity_difference(s, t, eps=1e-5):
    """Explicit B x HW x HW matrices S_T - S_S (the teacher resized like FA)."""
    t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=True)
    us = s.flatten(2) / s.flatten(2).norm(dim=1, keepdim=True).clamp_min(eps)
    ut = t.flatten(2) / t.flatten(2).norm(dim=1, keepdim=True).clamp_min(eps)
    return torch.einsum("bcp,bcq->bpq", ut, ut) - torch.einsum("bcp,bcq->bpq", us, us)


def test_ffa_is_the_explicit_projection_of_the_affinity_difference():
    s, t = _randn(2, 3, 3, 4, seed=7), _randn(2, 5, 6, 8, seed=8)
    diff, hw, k = _affinity_difference(s, t), 12, 6
    losses = {
        e: build_distill_loss("ffa", k=k, seed=3, estimate=e) for e in ("fro2", "official_l1")
    }
    for step in range(2):
        # The draws the loss makes: B x HW x k per tap, from a generator seeded by
        # NumPy's SeedSequence of (seed, call).
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence([3, step]).generate_state(1)[0])
        )
        dz = diff @ torch.randn(2, hw, k, generator=g).to(D)
        fro2 = (dz.square().sum((1, 2)) / (k * hw**2)).mean()
        l1 = (dz.abs().sum((1, 2)) / (k * hw**2)).mean()
        torch.testing.assert_close(losses["fro2"]([s], [t]), fro2, msg=f"step {step}")
        torch.testing.assert_close(losses["official_l1"]([s], [t]), l1, msg=f"step {step}")


def test_ffa_is_an_unbiased_estimate_of_fa_and_official_l1_of_the_row_norms():
    s, t = _randn(2, 3, 3, 4, seed=9), _randn(2, 4, 6, 8, seed=10)
    fa = build_distill_loss("fa")([s], [t]).item()
    ffa = build_distill_loss("ffa", seed=1)
    mean = sum(ffa([s], [t]).item() for _ in range(2000)) / 2000
    assert abs(mean - fa) < 0.02 * fa, (mean, fa)
    # The official "order 1" estimates sqrt(2/pi) ||S_T - S_S||_{2,1} / (HW)^2.
    rows = _affinity_difference(s, t).norm(dim=2).sum(1)  # per image: sum of row L2 norms
    target = (math.sqrt(2 / math.pi) * rows / 12**2).sum().item()
    official = build_distill_loss("ffa", seed=1, estimate="official_l1", reduction="sum")
    mean = sum(official([s], [t]).item() for _ in range(500)) / 500
    assert abs(mean - target) < 0.02 * target, (mean, target)


def test_ffa_draws_fresh_z_from_its_own_seeded_generator():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    a, b = build_distill_loss("ffa", seed=5), build_distill_loss("ffa", seed=5)
    rng = torch.get_rng_state()
    first, second = a([s], [t]), a([s], [t])
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert not torch.equal(first, second)  # a fresh Z each step
    assert torch.equal(b([s], [t]), first) and torch.equal(b([s], [t]), second)
    assert not torch.equal(build_distill_loss("ffa", seed=6)([s], [t]), first)


def test_ffa_resumes_its_draws_from_a_checkpoint():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    uninterrupted = build_distill_loss("ffa", seed=4)
    values = [uninterrupted([s], [t]) for _ in range(4)]
    interrupted = build_distill_loss("ffa", seed=4)
    for _ in range(2):
        interrupted([s], [t])
    resumed = build_distill_loss("ffa", seed=4)
    resumed.load_state_dict(interrupted.state_dict())  # what a checkpoint holds
    assert int(resumed.calls) == 2
    assert torch.equal(resumed([s], [t]), values[2]) and torch.equal(resumed([s], [t]), values[3])
    assert not torch.equal(values[2], values[3])


def test_ffa_is_finite_with_an_all_zero_pixel_and_trains_the_student():
    s = torch.randn(2, 3, 4, 4)
    s[:, :, 0, 0] = 0  # e.g. after a ReLU connector
    s.requires_grad_(True)
    t = torch.relu(torch.randn(2, 5, 4, 4))
    t[:, :, 1, 1] = 0
    out = build_distill_loss("ffa")([s], [t])
    out.backward()
    assert torch.isfinite(out) and out > 0
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ RFD


def _rfd_reference(students, teachers, temperature, reduction, attention="both"):
    taps = []
    for s, t in zip(students, teachers):
        _, c, h, w = s.shape

        def attentions(f, b, c=c, h=h, w=w):
            x = f[b].tolist()
            sp = [sum(x[k][y][z] ** 2 for k in range(c)) / c for y in range(h) for z in range(w)]
            norm = math.sqrt(sum(v * v for v in sp))
            sp = [v / norm for v in sp]
            ch = [
                sum(x[k][y][z] ** 2 for y in range(h) for z in range(w)) / (h * w) for k in range(c)
            ]
            return sp, _softmax(ch)

        per_image = []
        for b in range(s.shape[0]):
            (sp_s, ch_s), (sp_t, ch_t) = attentions(s, b), attentions(t, b)
            per_image.append(
                sum(
                    _kl(
                        _softmax([v / temperature for v in a_t]),
                        _softmax([v / temperature for v in a_s]),
                    )
                    for kind, a_s, a_t in (("spatial", sp_s, sp_t), ("channel", ch_s, ch_t))
                    if attention in ("both", kind)
                )
            )
        taps.append(per_image)
    if reduction == "official":
        return 1000 * sum(sum(p) for p in taps)
    return sum(sum(p) / len(p) for p in taps) / len(taps)


@pytest.mark.parametrize("temperature", [8.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "official"])
def test_rfd_matches_loops_over_images_and_taps(temperature, reduction):
    students = [_randn(3, 4, 3, 3, seed=11, scale=2), _randn(3, 6, 2, 4, seed=12, scale=2)]
    teachers = [_randn(3, 4, 3, 3, seed=13, scale=2), _randn(3, 6, 2, 4, seed=14, scale=2)]
    loss = build_distill_loss("rfd", temperature=temperature, reduction=reduction)
    ref = _rfd_reference(students, teachers, temperature, reduction)
    torch.testing.assert_close(loss(students, teachers).item(), ref, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("attention", ["spatial", "channel"])
def test_rfd_one_attention_alone(attention):
    """AKT Table 4's ablation: the spatial or the channel KL alone."""
    students, teachers = [_randn(2, 4, 3, 3, seed=17, scale=2)], [_randn(2, 4, 3, 3, seed=18)]
    loss = build_distill_loss("rfd", attention=attention)
    ref = _rfd_reference(students, teachers, 8.0, "mean", attention)
    torch.testing.assert_close(loss(students, teachers).item(), ref, rtol=1e-9, atol=1e-15)
    both = _rfd_reference(students, teachers, 8.0, "mean")
    assert 0 < ref < both


def test_rfd_official_is_1000_times_the_sum_over_the_batch():
    s, t = _randn(3, 4, 3, 3, seed=15), _randn(3, 4, 3, 3, seed=16)  # one tap, B = 3
    mean = build_distill_loss("rfd")([s], [t])
    official = build_distill_loss("rfd", reduction="official")([s], [t])
    assert mean > 0
    torch.testing.assert_close(official, 1000 * 3 * mean)


# --------------------------------------------------------------------------------- logits


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 5)])
def test_logit_kd_softmax_matches_a_hand_written_kl(shape):
    z_s, z_t, t = _randn(*shape, seed=19, scale=3), _randn(*shape, seed=20, scale=3), 4.0
    rows_s, rows_t = z_s.reshape(-1, shape[-1]).tolist(), z_t.reshape(-1, shape[-1]).tolist()
    kls = [
        _kl(_softmax([v / t for v in rt]), _softmax([v / t for v in rs]))
        for rs, rt in zip(rows_s, rows_t)
    ]
    ref = sum(kls) / len(kls) * t * t
    out = build_distill_loss("logit_kd", temperature=t)([z_s], [z_t])
    torch.testing.assert_close(out.item(), ref, rtol=1e-10, atol=0)


def test_logit_kd_sigmoid_matches_binary_kl_of_probabilities():
    z_s, z_t, t = _randn(2, 3, 4, seed=21, scale=3), _randn(2, 3, 4, seed=22, scale=3), 2.0
    total = 0.0
    for n in range(2):
        for r in range(3):  # anchors
            for k in range(4):  # classes: summed
                p = 1 / (1 + math.exp(-z_t[n, r, k].item() / t))
                q = 1 / (1 + math.exp(-z_s[n, r, k].item() / t))
                total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    ref = total / 6 * t * t  # mean over anchors and images
    loss = build_distill_loss("logit_kd", temperature=t, activation="sigmoid")
    torch.testing.assert_close(loss([z_s], [z_t]).item(), ref, rtol=1e-10, atol=0)
    # Confident logits (sigmoid rounds to 0 or 1) stay finite, with finite gradients.
    z = torch.tensor([[[300.0, -300.0]]], requires_grad=True)
    out = loss([z], [torch.tensor([[[-300.0, 300.0]]])])
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()


def test_logit_mse_and_akt_logit_match_manual_values():
    z_s, z_t = _randn(3, 5, seed=23), _randn(3, 5, seed=24)
    mse = build_distill_loss("logit_mse")([z_s], [z_t])
    torch.testing.assert_close(mse.item(), sum(((z_s - z_t) ** 2).flatten().tolist()) / 15)
    t = 20.0
    entropies = []
    for rs, rt in zip(z_s.tolist(), z_t.tolist()):
        p = _softmax([(b - a) / t for a, b in zip(rs, rt)])
        entropies.append(-sum(x * math.log(x) for x in p))
    ref = -t * t * sum(entropies) / len(entropies)
    akt = build_distill_loss("akt_logit")([z_s], [z_t])
    torch.testing.assert_close(akt.item(), ref, rtol=1e-10, atol=0)
    # Near agreement it is T^2 KL - T^2 ln C: equal logits give exactly -T^2 ln C.
    same = build_distill_loss("akt_logit")([z_t], [z_t])
    torch.testing.assert_close(same.item(), -t * t * math.log(5))


# ------------------------------------------------------------------------------- errors


def test_unknown_names_and_options_are_rejected_with_the_valid_ones():
    with pytest.raises(ValueError, match="DISTILL.LOSS='kl'.*feature_kd"):
        build_distill_loss("kl")
    with pytest.raises(ValueError, match="'fa' has no option 'nrom'.*align_corners, eps, norm"):
        build_distill_loss("fa", nrom="l1")
    with pytest.raises(ValueError, match="'qfd' has no option 'temperature'.*none"):
        build_distill_loss("qfd", temperature=2.0)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("fa", {"norm": "l3"}, "norm='l3' is invalid.*'fro2', 'l1'"),
        ("fa", {"reduction": "official"}, "reduction='official'.*'mean', 'sum'"),
        ("fa", {"align_corners": 1}, "align_corners=1.*True, False"),
        ("fa", {"eps": 0}, "eps=0.*> 0"),
        ("ffa", {"k": 0}, "k=0.*integer >= 1"),
        ("ffa", {"k": 2.5}, "k=2.5.*integer >= 1"),
        ("ffa", {"seed": 1.5}, "seed=1.5.*integer"),
        ("ffa", {"seed": -1}, r"seed=-1.*\[0, 2\^31\)"),
        ("ffa", {"estimate": "l1"}, "estimate='l1'.*'fro2', 'official_l1'"),
        ("rfd", {"temperature": 0}, "temperature=0.*> 0"),
        ("rfd", {"reduction": "sum"}, "'mean', 'official'"),
        ("rfd", {"attention": "pixel"}, "'both', 'spatial', 'channel'"),
        ("logit_kd", {"temperature": -1.0}, "temperature=-1.0.*> 0"),
        ("logit_kd", {"activation": "relu"}, "activation='relu'.*'softmax', 'sigmoid'"),
        ("akt_logit", {"temperature": 0.0}, "temperature=0.0"),
    ],
)
def test_bad_option_values_list_the_valid_values(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_distill_loss(name, **options)


def test_shape_mismatches_name_the_tap_both_shapes_and_the_fix():
    ok = torch.randn(2, 4, 6, 6)
    qfd = build_distill_loss("qfd")
    with pytest.raises(
        ValueError, match=r"tap 1.*\(2, 4, 6, 6\).*\(2, 8, 6, 6\).*channels match in both"
    ):
        qfd([ok, ok], [ok, torch.randn(2, 8, 6, 6)])
    with pytest.raises(ValueError, match=r"channels differ.*FEATURE_KD.CONNECTOR True"):
        build_distill_loss("feature_kd")([ok], [torch.randn(2, 8, 6, 6)])
    with pytest.raises(ValueError, match=r"'feature_kd', tap 0.*spatial sizes differ.*same stride"):
        build_distill_loss("feature_kd")([ok], [torch.randn(2, 4, 3, 3)])
    rfd = build_distill_loss("rfd")
    with pytest.raises(
        ValueError, match=r"tap 0.*channels differ \(4 vs 5\).*channels match in both"
    ):
        rfd([ok], [torch.randn(2, 5, 6, 6)])
    with pytest.raises(ValueError, match=r"'rfd', tap 0.*spatial sizes must match"):
        rfd([ok], [torch.randn(2, 4, 3, 3)])
    with pytest.raises(ValueError, match=r"'fa', tap 0.*B x C x H x W"):
        build_distill_loss("fa")([ok], [torch.randn(3, 4, 6, 6)])
    with pytest.raises(ValueError, match=r"'logit_kd', tap 0.*\(2, 5\).*\(2, 6\).*\(N, R, K\)"):
        build_distill_loss("logit_kd")([torch.randn(2, 5)], [torch.randn(2, 6)])
    with pytest.raises(ValueError, match="1 student taps and 2 teacher taps"):
        qfd([ok], [ok, ok])
    with pytest.raises(TypeError, match=r"one tensor per tap.*\[f_student\]"):
        qfd(ok, ok)
