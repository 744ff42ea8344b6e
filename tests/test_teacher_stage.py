"""QFD's teacher stage, one home for yacs and LazyConfig (qdet/engine/teacher_stage.py):
both kinds of config describe the same stage, with the schedule computed by hand here."""

from __future__ import annotations

import os

import pytest
from detectron2.config import LazyConfig, instantiate

from qdet.config import load_config
from qdet.engine import teacher_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YACS_QFD = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_qfd.yaml")
LAZY_QFD = os.path.join(ROOT, "configs/lazy/digits/retinanet_r18_4bit_qfd.py")


@pytest.mark.parametrize(
    "max_iter, warmup, requested, expected",
    [
        (1500, 100, 0, (150, 75)),  # a tenth of the schedule; warmup capped at half of it
        (400, 20, 0, (40, 20)),  # the student's warmup fits half the stage
        (5, 3, 0, (1, 0)),  # at least one iteration; half of one is none
        (400, 20, 7, (7, 3)),  # DISTILL.TEACHER_STAGE_ITERS / distill.teacher_stage_iters
    ],
)
def test_stage_schedule(max_iter, warmup, requested, expected):
    assert teacher_stage.stage_schedule(max_iter, warmup, requested) == expected


def test_yacs_and_lazy_configs_describe_the_same_stage(tmp_path):
    """The shipped QFD configs, the yacs one at the lazy one's schedule (400 iterations,
    warmup 20): the same tap, bits and length, a stage of 40 iterations at the base rate
    after a warmup of 20, written under the student's output folder."""
    opts = ["SOLVER.MAX_ITER", "400", "SOLVER.WARMUP_ITERS", "20"]
    opts += ["OUTPUT_DIR", str(tmp_path / "yacs")]
    yacs = load_config(YACS_QFD, opts)
    lazy = LazyConfig.load(LAZY_QFD)
    lazy.train.output_dir = str(tmp_path / "lazy")
    a, b = teacher_stage.yacs_teacher_stage(yacs), teacher_stage.lazy_teacher_stage(lazy)
    assert (a.tap, a.bits, a.signed, a.iters) == ("p3", 8, True, 40)
    assert (b.tap, b.bits, b.signed, b.iters) == ("p3", 8, True, 40)
    assert a.weights == str(tmp_path / "yacs" / "teacher_stage" / "model_final.pth")
    assert b.weights == str(tmp_path / "lazy" / "teacher_stage" / "model_final.pth")
    assert a.init_weights == yacs.DISTILL.TEACHER_WEIGHTS
    assert b.init_weights == lazy.distill.teacher_weights

    tcfg = teacher_stage.teacher_stage_config(yacs)
    solver, quant = tcfg.SOLVER, tcfg.QUANT
    assert (solver.MAX_ITER, solver.WARMUP_ITERS, tuple(solver.STEPS)) == (40, 20, ())
    folder, weights = tcfg.OUTPUT_DIR, tcfg.MODEL.WEIGHTS
    assert folder == os.path.dirname(a.weights) and weights == a.init_weights
    assert (quant.FEATURE_TAP, quant.FEATURE_BITS) == ("p3", 8)
    stage = teacher_stage.lazy_teacher_stage_config(lazy)
    assert stage.train.max_iter == 40 and stage.train.output_dir == os.path.dirname(b.weights)
    multiplier = instantiate(stage.lr_multiplier)
    # The warmup ends at iteration 20 of 40 in both: below the base rate before, 1.0 after.
    assert multiplier(19 / 40) < 1.0 and multiplier(20 / 40) == 1.0


def test_no_qfd_term_no_stage(tmp_path):
    yacs = load_config(YACS_QFD, ["DISTILL.LOSS", "feature_kd"])
    assert teacher_stage.yacs_teacher_stage(yacs) is None
    assert not teacher_stage.needs_teacher_stage(yacs)
    lazy = LazyConfig.load(LAZY_QFD)
    lazy.distill.terms = {"feature_kd": {"taps": ["p3"]}}
    assert teacher_stage.lazy_teacher_stage(lazy) is None


def test_one_qfd_tap_in_either_kind():
    yacs = load_config(YACS_QFD, ["DISTILL.TERMS", "['qfd']", "DISTILL.QFD.TAPS", "['p3', 'p4']"])
    with pytest.raises(ValueError, match="QFD's teacher stage quantizes one"):
        teacher_stage.qfd_tap(yacs)
    lazy = LazyConfig.load(LAZY_QFD)
    lazy.distill.terms = {"qfd": {"taps": ["p3", "p4"]}}
    with pytest.raises(ValueError, match="QFD's teacher stage quantizes one"):
        teacher_stage.lazy_teacher_stage(lazy)


def test_lazy_stage_needs_the_fp_teacher(tmp_path):
    lazy = LazyConfig.load(LAZY_QFD)
    lazy.distill.teacher_weights = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="quant.enabled=False"):
        teacher_stage.check_lazy_stage_input(lazy)
    lazy.train.output_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="QFD's teacher stage writes it"):
        teacher_stage.build_lazy_teacher(lazy, "cpu")
