"""Exact resume (qdet/engine/resumable_loader.py, QDetTrainer.resume_or_load): a run killed
with SIGKILL and resumed from its last checkpoint ends with the weights of the run that was
never interrupted, bit for bit; and the planned batches are Detectron2's (the loader a
study seed's earlier runs used), computed here with Detectron2's own loader."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts as dataset_dicts
from detectron2.data.samplers import TrainingSampler
from train_net_cli import ROOT, run_train_net

from qdet.config import load_config
from qdet.engine.trainer import QDetTrainer, SeededMapper

FP = os.path.join(ROOT, "configs/digits/retinanet_r18_fp.yaml")
QAT = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_baseline.yaml")
TINY = ["MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "32"]
TINY += ["MODEL.RETINANET.NUM_CONVS", "1", "SOLVER.IMS_PER_BATCH", "2"]
TINY += ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128"]
TINY += ["SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "2"]
TINY += ["SOLVER.STEPS", "(8,)", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]
TINY += ["SOLVER.CHECKPOINTS_TO_KEEP", "0", "QUANT.CALIB_BATCHES", "1"]


def _weights(folder) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(folder, "model_final.pth"), weights_only=False)["model"]


def _kill_after_checkpoint(args: list[str], folder, name: str) -> None:
    """Start train_net.py, SIGKILL it as soon as ``name`` is in ``folder``."""
    env = dict(os.environ, QDET_QUANT_BACKEND="eager", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tools/train_net.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not os.path.isfile(os.path.join(folder, name)):
            assert proc.poll() is None, "the run ended before its checkpoint appeared"
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.isfile(os.path.join(folder, "model_final.pth")), "killed too late"


@pytest.mark.parametrize("config", [FP, QAT], ids=["fp", "4bit"])
def test_killed_run_resumes_bit_identical(tmp_path, config):
    env = {"OMP_NUM_THREADS": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_train_net("--config-file", config, *TINY, "OUTPUT_DIR", str(whole), env_extra=env)
    args = ["--config-file", config, *TINY, "OUTPUT_DIR", str(killed)]
    _kill_after_checkpoint(args, killed, "model_0000003.pth")
    run_train_net("--resume", *args, env_extra=env)
    expected, got = _weights(whole), _weights(killed)
    assert expected.keys() == got.keys()
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ, e.g. {differ[:3]}"


def test_planned_batches_are_detectron2s_and_resume_mid_stream():
    """The first batches equal Detectron2's own loader's (sampler seeded with SEED, the
    mapper's generators seeded per call, one process), and a loader started at batch 5
    gives batches 5.. of a fresh one."""
    cfg = load_config(FP, ["SOLVER.IMS_PER_BATCH", "4"])
    dataset = dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=True)
    theirs = build_detection_train_loader(
        cfg,
        dataset=dataset,
        mapper=SeededMapper(DatasetMapper(cfg, True), cfg.SEED),
        sampler=TrainingSampler(len(dataset), seed=cfg.SEED),
    )
    ours = list(itertools.islice(QDetTrainer.build_train_loader(cfg), 8))
    for a, b in zip(itertools.islice(theirs, 8), ours):
        assert [d["file_name"] for d in a] == [d["file_name"] for d in b]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    loader = QDetTrainer.build_train_loader(cfg)
    loader.batch_sampler.start = 5
    for a, b in zip(ours[5:], itertools.islice(loader, 3)):
        assert [d["file_name"] for d in a] == [d["file_name"] for d in b]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
