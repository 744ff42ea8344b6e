"""The distillation framework: taps, several terms, connectors, label-free, errors.

The losses themselves are checked against hand-written formulas in test_distill_losses.py;
here the features each term receives are checked against an independent forward pass.
"""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem
from detectron2.utils.events import EventStorage
from test_retinanet_qfd import (
    FP_CONFIG,
    TINY,
    _batch,
    _cfg,
    _student_cfg,
    _tiny_teacher_config,
    teacher_checkpoint,  # noqa: F401  (fixture)
)
from torch import nn
from train_net_cli import run_train_net

from qdet.distill import distiller as distiller_module
from qdet.distill.distiller import Distiller
from qdet.distill.taps import expand_taps, resolve_tap
from qdet.distill.terms import TermSpec, term_specs
from qdet.engine import QDetTrainer, teacher_stage
from qdet.quantization import deployed_weight_bytes

# loss_distill of the previous single-term code path (commit 97955a4, distiller.py before
# the framework) on the fixed input of _old_path_losses, DISTILL.WEIGHT 0.5.
PREVIOUS = {"qfd": 39.05830383300781, "feature_kd": 12376.19140625}


@pytest.fixture
def tiny_teacher(monkeypatch):
    monkeypatch.setattr(teacher_stage, "teacher_config", _tiny_teacher_config)


def _student(d, *opts, seed=2):
    torch.manual_seed(seed)
    student = QDetTrainer.build_model(_student_cfg(d, *opts))
    return student.train()


def test_single_term_configs_give_the_previous_loss(teacher_checkpoint, tiny_teacher):  # noqa: F811
    """Each single-term config's loss, computed independently: both backbones run by hand,
    the teacher's p3 through a fresh 8-bit quantizer holding its checkpoint's parameters
    for QFD, then 0.5 x the mean squared difference. PREVIOUS (the pre-framework code's
    values) is a regression pin beside it, not the oracle."""
    from qdet.quantization import UniformQuantizer

    for loss, previous in PREVIOUS.items():
        # FREEZE_AT 2: the digits recipe when PREVIOUS was computed.
        opts = ("DISTILL.LOSS", loss, "DISTILL.WEIGHT", "0.5", "MODEL.BACKBONE.FREEZE_AT", "2")
        student = _student(teacher_checkpoint, *opts)
        batch = _batch()
        with EventStorage():
            got = student(batch)[f"loss_distill_{loss}"].item()
        teacher = student.distiller.teacher
        images = student.preprocess_image(batch).tensor
        with torch.no_grad():
            f_s = student.backbone(images)["p3"]
            fpn = copy.deepcopy(teacher.backbone)
            fpn._forward_hooks.clear()  # the plain FP pyramid, no tap or quantizer hook
            f_t = fpn(images)["p3"]
            if loss == "qfd":
                q = UniformQuantizer(8, "activation", signed=True)
                q.load_state_dict(teacher.feature_quantizer.state_dict())
                f_t = q(f_t)
        expected = 0.5 * (f_s.double() - f_t.double()).pow(2).mean().item()
        assert got == pytest.approx(expected, rel=1e-5)
        assert got == pytest.approx(previous, rel=1e-4)  # the regression pin


def test_taps_resolve_expand_and_name_near_misses(teacher_checkpoint, tiny_teacher):  # noqa: F811
    model = _student(teacher_checkpoint)
    assert resolve_tap(model, "p3").path == "backbone"
    assert resolve_tap(model, "res4").path == "backbone.bottom_up"
    assert resolve_tap(model, "backbone.bottom_up.res4.1.conv2").path == (
        "backbone.bottom_up.res4.1.conv2"
    )
    assert resolve_tap(model, "logits").path == "head"
    branches = expand_taps(model, ["residual_branches"])
    assert len(branches) == 8  # ResNet-18: 4 stages x 2 BasicBlocks, each ending in conv2
    assert all(b.endswith(".conv2") for b in branches)
    assert expand_taps(model, ["backbone.bottom_up.res*.0"]) == [
        f"backbone.bottom_up.res{i}.0" for i in (2, 3, 4, 5)
    ]
    with pytest.raises(ValueError, match=r"'backbone.bottom_up.res4.1.conv9'.*res4.1.conv2"):
        resolve_tap(model, "backbone.bottom_up.res4.1.conv9")
    with pytest.raises(ValueError, match="matches nothing"):
        expand_taps(model, ["backbone.nothing.*"])


def _head_logits(model, features):
    """RetinaNet's class logits as (N, R, K), written out with view / permute."""
    logits, _ = model.head([features[f] for f in model.head_in_features])
    k = model.num_classes
    out = []
    for x in logits:
        n, _, h, w = x.shape
        out.append(x.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k))
    return torch.cat(out, dim=1)


def test_several_terms_read_the_right_features(teacher_checkpoint, tiny_teacher):  # noqa: F811
    tap = "backbone.bottom_up.res3.0.conv2"
    student = _student(
        teacher_checkpoint,
        "DISTILL.TERMS",
        "['feature_kd', 'logit_mse', 'fa']",
        "DISTILL.FEATURE_KD.TAPS",
        f"['{tap}']",
        "DISTILL.FEATURE_KD.WEIGHT",
        "0.3",
        "DISTILL.FA.TAPS",
        "['res4', 'p3']",
    )
    teacher = student.distiller.teacher
    batch = _batch()
    with EventStorage() as storage:
        losses = student(batch)
    assert student.distiller._student.features == {}  # handed over: nothing kept
    student.eval()
    with torch.no_grad():
        student(batch)
    assert student.distiller._student.features == {}  # evaluation records nothing
    student.train()
    terms = {k: v for k, v in losses.items() if k.startswith("loss_distill_")}
    assert sorted(terms) == ["loss_distill_fa", "loss_distill_feature_kd", "loss_distill_logit_mse"]
    total = sum(losses.values())
    assert storage.history("distill_ratio").latest() == pytest.approx(
        (sum(terms.values()) / total).item(), rel=1e-5
    )
    for name, value in terms.items():  # each term's own share, as the study tables show
        share = storage.history(f"distill_ratio/{name.removeprefix('loss_distill_')}").latest()
        assert share == pytest.approx((value / total).item(), rel=1e-5)
    # Independent: each tap by its own forward path (quantizers are initialised by now;
    # training-mode BN normalises with the batch's statistics in both passes).
    images = student.preprocess_image(batch).tensor
    with torch.no_grad():
        outs = {}
        for name, model in (("s", student), ("t", teacher)):
            bottom_up = model.backbone.bottom_up
            feats = bottom_up(images)
            block = bottom_up.res3[0]
            res2 = bottom_up.res2(bottom_up.stem(images))
            branch = block.conv2(F.relu(block.conv1(res2)))
            fpn = model.backbone(images)
            outs[name] = {"branch": branch, "res4": feats["res4"], "p3": fpn["p3"]}
            outs[name]["logits"] = _head_logits(model, fpn)
    expected_kd = 0.3 * F.mse_loss(outs["s"]["branch"], outs["t"]["branch"])
    expected_mse = 1.0 * F.mse_loss(outs["s"]["logits"], outs["t"]["logits"])

    def fa(f_s, f_t):  # explicit HW x HW cosine affinities, squared Frobenius, batch mean
        per_image = []
        for a, b in zip(f_s, f_t):
            a, b = a.flatten(1).T, b.flatten(1).T
            s_a = (a / a.norm(dim=1, keepdim=True).clamp_min(1e-5)) @ (
                a / a.norm(dim=1, keepdim=True).clamp_min(1e-5)
            ).T
            s_b = (b / b.norm(dim=1, keepdim=True).clamp_min(1e-5)) @ (
                b / b.norm(dim=1, keepdim=True).clamp_min(1e-5)
            ).T
            per_image.append(((s_b - s_a) ** 2).sum() / a.shape[0] ** 2)
        return torch.stack(per_image).mean()

    expected_fa = 0.1 * (
        fa(outs["s"]["res4"], outs["t"]["res4"]) + fa(outs["s"]["p3"], outs["t"]["p3"])
    )
    torch.testing.assert_close(
        terms["loss_distill_feature_kd"].detach(), expected_kd, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        terms["loss_distill_logit_mse"].detach(), expected_mse, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(terms["loss_distill_fa"].detach(), expected_fa, rtol=1e-4, atol=1e-7)


def test_connectors_train_and_stay_out_of_export(teacher_checkpoint, tiny_teacher):  # noqa: F811
    cfg_opts = ("DISTILL.TERMS", "['ffa']", "DISTILL.FFA.TAPS", "['res3', 'res5']")
    cfg_opts += ("DISTILL.FFA.CONNECTOR", "True")
    student = _student(teacher_checkpoint, *cfg_opts)
    teacher = student.distiller.teacher
    connectors = student.distiller.terms[0].connectors
    assert sorted(connectors) == ["res3", "res5"]  # keyed by tap, not by position
    assert [connectors[k][0].in_channels for k in ("res3", "res5")] == [128, 512]
    first = connectors["res3"][0]
    keys = [k for k in student.state_dict() if k.startswith("distiller.")]
    # The connectors and FFA's call count (checkpointed, so a resumed run draws on).
    assert keys and all(".connectors." in k or k.endswith(".loss.calls") for k in keys)
    cfg = _student_cfg(teacher_checkpoint, *cfg_opts)
    optimizer = QDetTrainer.build_optimizer(cfg, student)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in connectors.parameters())
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_connector = first.weight.detach().clone()
    for _ in range(2):
        with EventStorage():
            losses = student(_batch())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        assert first.weight.grad.abs().sum() > 0
        optimizer.step()
    assert not torch.equal(first.weight, before_connector)
    assert student.state_dict()["distiller.terms.0.loss.calls"].item() == 2
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before_teacher[k]), k  # bit-identical
    with_connectors = deployed_weight_bytes(student)
    student.attach_distiller(None)
    assert deployed_weight_bytes(student) == with_connectors


class _ResNet20(nn.Module):
    """A CIFAR ResNet-20 (3 stages x 3 BasicBlocks, 16/32/64 channels) from Detectron2's
    blocks, as a classifier offering the distillation protocol: ``backbone``, ``logits``,
    ``forward_taps``, ``check_tap_path``."""

    def __init__(self, blocks_per_stage: int = 3):
        super().__init__()
        blocks, c = [BasicStem(3, 16, norm="BN")], 16
        for stage, out in enumerate((16, 32, 64)):
            for i in range(blocks_per_stage):
                stride = 2 if stage and i == 0 else 1
                blocks.append(BasicBlock(c, out, stride=stride, norm="BN"))
                c = out
        self.backbone = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, 10)
        self.distiller = None

    def forward(self, images, labels=None):
        logits = self.fc(self.backbone(images).mean((2, 3)))
        if not self.training:
            return logits
        losses = {"loss_ce": F.cross_entropy(logits, labels)}
        return {**losses, **self.distiller(losses)} if self.distiller else losses

    def logits_tap(self):
        return "fc", None  # a submodule: the distiller runs inside forward()

    def check_tap_path(self, path):
        pass

    def forward_taps(self, images, paths):
        self(images)


def _branches(model, images):
    """Every block's residual branch by hand: conv2(relu(conv1(x))), x the block input."""
    x, out = model.backbone[0](images), []
    for block in model.backbone[1:]:
        branch = block.conv2(F.relu(block.conv1(x)))
        short = block.shortcut(x) if block.shortcut is not None else x
        out.append(branch)
        x = F.relu(branch + short)
    return out, model.fc(x.mean((2, 3)))


def test_akt_on_nine_residual_branches_of_a_classifier():
    torch.manual_seed(0)
    student, teacher = _ResNet20().train(), _ResNet20()
    specs = [
        TermSpec("rfd", ["residual_branches"], 0.5, options={"temperature": 8.0}),
        TermSpec("akt_logit", ["logits"], 0.5, options={"temperature": 20.0}),
    ]
    student.distiller = Distiller(student, teacher, specs)
    assert len(student.distiller.terms[0].taps) == 9
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with EventStorage():
        losses = student(images, labels)
    with torch.no_grad():
        s_branches, s_logits = _branches(student, images)
        teacher.eval()
        t_branches, t_logits = _branches(teacher, images)

    def kl(p, q):  # KL(p || q) by explicit sums
        return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))

    def soft(v, t):
        e = [math.exp(x / t) for x in v]
        return [x / sum(e) for x in e]

    rfd = 0.0
    for f_s, f_t in zip(s_branches, t_branches):
        for b in range(images.shape[0]):
            per = []
            for f in (f_s[b], f_t[b]):
                sp = (f**2).mean(0).flatten()
                sp = (sp / sp.norm()).tolist()
                ch = torch.softmax((f**2).mean((1, 2)), 0).tolist()
                per.append((soft(sp, 8.0), soft(ch, 8.0)))
            (sp_s, ch_s), (sp_t, ch_t) = per
            rfd += (kl(sp_t, sp_s) + kl(ch_t, ch_s)) / images.shape[0]
    rfd /= 9
    assert losses["loss_distill_rfd"].item() == pytest.approx(0.5 * rfd, rel=1e-3)
    p = torch.softmax((t_logits - s_logits) / 20.0, dim=1)
    entropy = -(p * p.log()).sum(1).mean()
    assert losses["loss_distill_akt_logit"].item() == pytest.approx(
        (0.5 * -(20.0**2) * entropy).item(), rel=1e-5
    )


def test_distill_config_errors(teacher_checkpoint, tiny_teacher):  # noqa: F811
    def specs(*opts):
        return term_specs(_student_cfg(teacher_checkpoint, *opts))

    with pytest.raises(ValueError, match=r"'kl' is unknown.*fa.*ffa.*logit_kd"):
        specs("DISTILL.TERMS", "['kl']")
    with pytest.raises(ValueError, match=r"DISTILL.FA.*norm='l3'.*fro2"):
        specs("DISTILL.TERMS", "['fa']", "DISTILL.FA.NORM", "l3")
    with pytest.raises(ValueError, match=r"DISTILL.RFD.*reduction='sum'.*mean.*official"):
        specs("DISTILL.TERMS", "['rfd']", "DISTILL.RFD.REDUCTION", "sum")
    for bad in (-0.1, float("nan")):
        cfg = _student_cfg(teacher_checkpoint, "DISTILL.TERMS", "['fa']")
        cfg.DISTILL.FA.WEIGHT = bad
        with pytest.raises(ValueError, match=r"DISTILL.FA.WEIGHT.*finite number >= 0"):
            term_specs(cfg)
    with pytest.raises(ValueError, match="QFD's teacher stage quantizes one"):
        teacher_stage.qfd_tap(
            _student_cfg(
                teacher_checkpoint, "DISTILL.TERMS", "['qfd']", "DISTILL.QFD.TAPS", "['p3', 'p4']"
            )
        )
    with pytest.raises(ValueError, match=r"'backbone.bottom_up.res9'.*not in the student"):
        _student(
            teacher_checkpoint,
            "DISTILL.TERMS",
            "['fa']",
            "DISTILL.FA.TAPS",
            "['backbone.bottom_up.res9']",
        )
    # A tap the student has and the teacher (one head conv fewer) has not.
    with pytest.raises(ValueError, match=r"'head.cls_subnet.3'.*not in the teacher"):
        _student(
            teacher_checkpoint,
            "MODEL.RETINANET.NUM_CONVS",
            "2",
            "DISTILL.TERMS",
            "['feature_kd']",
            "DISTILL.FEATURE_KD.TAPS",
            "['head.cls_subnet.3']",
        )
    # Channels a plain MSE cannot compare: say to use a connector or another tap.
    student = _student(
        teacher_checkpoint,
        "DISTILL.TERMS",
        "['feature_kd']",
        "DISTILL.FEATURE_KD.TAPS",
        "['res3', 'res4']",
    )
    teacher_feats = student.distiller.teacher_features
    student.distiller.teacher_features = lambda images: {
        "res3": teacher_feats(images)["res4"],
        "res4": teacher_feats(images)["res4"],
    }
    with pytest.raises(ValueError, match="CONNECTOR|connector"), EventStorage():
        student(_batch())


def test_label_free_training_has_no_ground_truth_loss(tmp_path):
    fp_out, out = tmp_path / "fp", tmp_path / "lf"
    common = [*TINY, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", "QUANT.CALIB_BATCHES", "1"]
    run_train_net("--config-file", FP_CONFIG, *common, "OUTPUT_DIR", str(fp_out))
    weights = str(fp_out / "model_final.pth")
    teacher_yaml = tmp_path / "teacher.yaml"
    teacher_yaml.write_text("_BASE_: " + json.dumps(FP_CONFIG) + "\n" + _yaml_overrides(TINY))
    run_train_net(
        "--config-file",
        os.path.join(os.path.dirname(FP_CONFIG), "retinanet_r18_4bit_baseline.yaml"),
        *common,
        "MODEL.WEIGHTS",
        weights,
        "DISTILL.ENABLED",
        "True",
        "DISTILL.TEACHER_CONFIG",
        str(teacher_yaml),
        "DISTILL.TEACHER_WEIGHTS",
        weights,
        "DISTILL.TERMS",
        "['feature_kd', 'logit_kd']",
        "DISTILL.LABEL_FREE",
        "True",
        "OUTPUT_DIR",
        str(out),
    )
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    last = metrics[-1]
    assert last["loss_distill_feature_kd"] > 0 and last["loss_distill_logit_kd"] > 0
    assert not any(k in m for m in metrics for k in ("loss_cls", "loss_box_reg"))
    assert last["distill_ratio"] == pytest.approx(1.0)


def _yaml_overrides(opts):
    tree = {}
    for key, value in zip(opts[::2], opts[1::2]):
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    import yaml

    return yaml.safe_dump(tree)


def test_patterns_pair_one_to_one_and_shared_modules_are_refused(
    teacher_checkpoint,  # noqa: F811
    tiny_teacher,
):
    with pytest.raises(ValueError, match="matches 9 modules in the student and 6 in the teacher"):
        Distiller(
            _ResNet20(),
            _ResNet20(blocks_per_stage=2),
            [TermSpec("rfd", ["residual_branches"], 1.0)],
        )
    student = _student(
        teacher_checkpoint,
        "DISTILL.TERMS",
        "['feature_kd']",
        "DISTILL.FEATURE_KD.TAPS",
        "['head.cls_subnet.0']",
    )
    with (
        pytest.raises(RuntimeError, match=r"'head.cls_subnet.0'.*ran twice.*logits"),
        EventStorage(),
    ):
        student(_batch())


@pytest.mark.parametrize("tap", ["backbone.bottom_up.res3.0.conv2", "res4"])
def test_qfd_feature_quantizer_on_a_module_path_or_a_bottom_up_output(tap):
    torch.manual_seed(0)
    model = build_model(_cfg("QUANT.FEATURE_TAP", tap)).eval()
    with torch.no_grad():
        model.feature_quantizer.init_from(torch.randn(1000) * 3)
        seen = {}
        target = resolve_tap(model, tap)
        model.get_submodule(target.path).register_forward_hook(
            lambda m, i, out: seen.update(f=target.read(out).clone())  # before in-place adds
        )
        model.backbone(torch.randn(1, 3, 64, 64))
    # The tap's output is on the 8-bit grid of the signed quantizer: l + k * s / 255.
    q = model.feature_quantizer
    k = (seen["f"].unique() - q.lower) / (q.scale / 255)
    assert len(k) > 16  # a real feature, not a constant
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-2)


def test_a_term_that_weighs_almost_nothing_is_warned_about_with_the_weight_to_use(
    teacher_checkpoint,  # noqa: F811
    tiny_teacher,
    monkeypatch,
    caplog,
):
    """Below 1% of the loss over the first steps: one warning naming the term, its share
    and a weight; trained again at that weight, the term is 1/5 of the loss."""
    monkeypatch.setattr(distiller_module, "SHARE_CHECK_ITERS", 3)
    terms = ("DISTILL.TERMS", "['feature_kd', 'logit_mse']", "DISTILL.FEATURE_KD.TAPS", "['p3']")

    def shares(weight: str) -> list[float]:
        student = _student(teacher_checkpoint, *terms, "DISTILL.LOGIT_MSE.WEIGHT", weight)
        with EventStorage() as storage:
            for _ in range(4):  # the same batch: every step's share is the same
                student(_batch())
                storage.step()
        return [v for v, _ in storage.history("distill_ratio/logit_mse").values()]

    with caplog.at_level("WARNING", logger=distiller_module.logger.name):
        low = shares("1e-7")
    warnings = [r.getMessage() for r in caplog.records if "distillation term" in r.message]
    assert len(warnings) == 1, warnings  # once, not every step; feature_kd is not named
    message = warnings[0]
    assert message.startswith("distillation term logit_mse is ") and low[0] < 0.01
    assert f"{100 * low[0]:.2g}% of the loss over the first 3 iterations" in message
    suggested = message.split("DISTILL.LOGIT_MSE.WEIGHT ")[2].split(" would")[0]
    assert shares(suggested)[0] == pytest.approx(0.2, abs=2e-3)
