"""The first errors a newcomer meets, through tools/train_net.py: one line that says what
to do, exit status 2, and the traceback only with --debug."""

import os

import pytest
from train_net_cli import ROOT, run_train_net

from qdet.config import load_config
from qdet.engine.checks import missing_checkpoint_message, producing_config

BASELINE = "configs/digits/retinanet_r18_4bit_baseline.yaml"


def _one_line_error(r) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if "error:" in x]
    return line


def test_missing_fp_checkpoint_names_the_command_that_trains_it(tmp_path):
    # A COCO teacher nobody trains on this machine: the path a shipped config writes.
    r = run_train_net(
        "--config-file",
        BASELINE,
        "MODEL.WEIGHTS",
        "output/coco/retinanet_r50_fp/model_final.pth",
        "OUTPUT_DIR",
        str(tmp_path),
        check=False,
    )
    line = _one_line_error(r)
    assert "MODEL.WEIGHTS='output/coco/retinanet_r50_fp/model_final.pth' does not exist" in line
    assert "tools/train_net.py --config-file configs/retinanet_r50_fp.yaml" in line
    assert 'MODEL.WEIGHTS "" to start from scratch' in line
    assert producing_config("output/digits/retinanet_r18_fp/model_final.pth") == (
        "configs/digits/retinanet_r18_fp.yaml"
    )


def test_missing_coco_says_where_to_point_detectron2_datasets(tmp_path):
    r = run_train_net(
        "--config-file",
        "configs/retinanet_r18_fp.yaml",
        "MODEL.DEVICE",
        "cpu",
        "MODEL.WEIGHTS",
        "",
        env_extra={"DETECTRON2_DATASETS": str(tmp_path)},
        check=False,
    )
    line = _one_line_error(r)
    expected = os.path.join(str(tmp_path), "coco/annotations/instances_train2017.json")
    assert f"needs {expected}, which does not exist" in line
    assert "Set DETECTRON2_DATASETS to the folder that holds coco/" in line
    assert "coco/train2017/*.jpg" in line


def test_bad_bits_is_one_line_and_debug_keeps_the_traceback(tmp_path):
    args = ("--config-file", BASELINE, "QUANT.W_BITS", "9", "MODEL.WEIGHTS", "")
    line = _one_line_error(run_train_net(*args, check=False))
    assert "QUANT.W_BITS: bits=9 is out of range" in line
    r = run_train_net("--debug", *args, check=False)
    assert r.returncode != 0 and "Traceback" in r.stderr
    assert "ValueError: QUANT.W_BITS: bits=9" in r.stderr


def test_config_mistakes_are_errors_that_say_what_to_write(tmp_path):
    """A flag after the overrides, YAML that does not parse, a missing _BASE_, a value of
    the wrong type: qdet's errors (one line through run_cli), each naming the fix."""
    config = os.path.join(ROOT, BASELINE)
    for flag in ("--resume", "--stage"):
        with pytest.raises(ValueError, match=rf"^'{flag}' comes after the KEY VALUE overrides"):
            load_config(config, ["OUTPUT_DIR", "out", flag, "teacher"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("MODEL:\n  WEIGHTS: [\n")
    with pytest.raises(ValueError, match=r"broken.yaml' .* is not valid YAML: .*line 3"):
        load_config(str(broken), [])
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text('_BASE_: "nowhere.yaml"\n')
    with pytest.raises(FileNotFoundError, match=r"its _BASE_ '.*nowhere.yaml' does not exist"):
        load_config(str(orphan), [])
    for value, kind in (("'4'", "str"), ("4.0", "float")):
        with pytest.raises(
            ValueError,
            match=rf"^QUANT.W_BITS takes a value of type int, not .* \(type {kind}\): .*"
            r"\(QUANT.W_BITS 4\)$",
        ):
            load_config(config, ["QUANT.W_BITS", value])
    typed = tmp_path / "typed.yaml"
    typed.write_text(f'_BASE_: "{config}"\nQUANT:\n  W_BITS: 4.0\n')
    with pytest.raises(ValueError, match=r"typed.yaml': QUANT.W_BITS takes a value of type int"):
        load_config(str(typed), [])


def test_missing_trained_model_is_not_offered_a_start_from_scratch():
    """Export, predict and a teacher need the trained checkpoint: "" is no way out there."""
    for weights in ("output/digits/retinanet_r18_fp/model_final.pth", "/nowhere/m.pth"):
        trained = missing_checkpoint_message("MODEL.WEIGHTS", weights)
        training = missing_checkpoint_message("MODEL.WEIGHTS", weights, from_scratch=True)
        assert "from scratch" not in trained and "from scratch" in training
    assert missing_checkpoint_message("MODEL.WEIGHTS", "/nowhere/m.pth").endswith(
        "Point MODEL.WEIGHTS at the checkpoint a training run wrote (its model_final.pth)."
    )
