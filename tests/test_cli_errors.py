"""The first errors a newcomer meets, through tools/train_net.py: one line that says what
to do, exit status 2, and the traceback only with --debug."""

import os

from train_net_cli import run_train_net

from qdet.engine.checks import producing_config

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
