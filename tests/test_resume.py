"""Exact resume (qdet/engine/exact_resume.py, qdet/engine/resumable_loader.py): a run killed
with SIGKILL and resumed from its last checkpoint ends with the weights of the run that was
never interrupted, bit for bit (FP, QAT, QFD's two stages, the data-free trainer, the lazy
trainer); and the planned batches are Detectron2's (the loader a study seed's earlier runs
used), computed here with Detectron2's own loader."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts as dataset_dicts
from detectron2.data.samplers import TrainingSampler
from detectron2.modeling import build_model
from train_net_cli import ROOT, run_train_net, write_config_with

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


QFD = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_qfd.yaml")
DATAFREE = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_datafree.yaml")
LAZY_QAT = os.path.join(ROOT, "configs/lazy/digits/retinanet_r18_4bit.py")
LAZY_TINY = ["train.init_checkpoint=''", "train.max_iter=12", "train.checkpointer.period=2"]
LAZY_TINY += ["train.checkpointer.max_to_keep=100", "dataloader.train.total_batch_size=2"]
LAZY_TINY += ["quant.calib_batches=1", "lr_multiplier.scheduler.milestones=[8,10]"]
LAZY_TINY += ["lr_multiplier.warmup_length=0.2", "train.log_period=1"]
LAZY_TINY += ["dataloader.train.mapper.augmentations.0.short_edge_length=[96]"]
LAZY_TINY += ["dataloader.train.mapper.augmentations.0.max_size=128", "model.head.conv_dims=[64]"]
LAZY_TINY += ["dataloader.evaluator=null"]  # no evaluation after the last step
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _weights(folder) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(folder, "model_final.pth"), weights_only=False)["model"]


def _assert_same_weights(whole, resumed) -> None:
    expected, got = _weights(whole), _weights(resumed)
    assert expected.keys() == got.keys()
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ, e.g. {differ[:3]}"


def _kill_after_checkpoint(
    args: list[str], folder, name: str, tool: str = "tools/train_net.py"
) -> None:
    """Start ``tool``, SIGKILL it as soon as ``name`` is in ``folder``."""
    env = dict(os.environ, QDET_QUANT_BACKEND="eager", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, tool), *args],
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
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_train_net("--config-file", config, *TINY, "OUTPUT_DIR", str(whole), env_extra=ONE_THREAD)
    args = ["--config-file", config, *TINY, "OUTPUT_DIR", str(killed)]
    _kill_after_checkpoint(args, killed, "model_0000003.pth")
    run_train_net("--resume", *args, env_extra=ONE_THREAD)
    _assert_same_weights(whole, killed)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A tiny FP RetinaNet-R18 (random weights, BN statistics of its own) and its config:
    the teacher of the QFD and data-free runs."""
    folder = tmp_path_factory.mktemp("resume_teacher")
    torch.manual_seed(5)
    model = build_model(load_config(FP, TINY))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    DetectionCheckpointer(model, save_dir=str(folder)).save("fp")
    config = write_config_with(folder / "teacher.yaml", FP, TINY)
    return ["DISTILL.TEACHER_WEIGHTS", str(folder / "fp.pth"), "DISTILL.TEACHER_CONFIG", config]


def test_qfd_killed_in_each_stage_resumes_bit_identical(tmp_path, tiny_teacher):
    """Killed in the teacher stage, resumed, killed again in the student stage, resumed:
    the feature-quantized teacher and the student equal the uninterrupted run's."""
    qfd = [*TINY, *tiny_teacher, "DISTILL.TEACHER_STAGE_ITERS", "6"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_train_net("--config-file", QFD, *qfd, "OUTPUT_DIR", str(whole), env_extra=ONE_THREAD)
    args = ["--config-file", QFD, *qfd, "OUTPUT_DIR", str(killed)]
    _kill_after_checkpoint(args, killed / "teacher_stage", "model_0000003.pth")
    _kill_after_checkpoint(["--resume", *args], killed, "model_0000005.pth")
    run_train_net("--resume", *args, env_extra=ONE_THREAD)
    _assert_same_weights(whole / "teacher_stage", killed / "teacher_stage")
    _assert_same_weights(whole, killed)


def test_datafree_run_resumes_bit_identical(tmp_path, tiny_teacher):
    """The generator, its Adam and its noise are in the checkpoint: the resumed student
    trains on the images the uninterrupted one did."""
    datafree = [*TINY, *tiny_teacher, "MODEL.WEIGHTS", tiny_teacher[1]]
    datafree += ["ZEROSHOT.WARMUP_ITERS", "2", "ZEROSHOT.SHEET_IMAGES", "0"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_train_net(
        "--config-file", DATAFREE, *datafree, "OUTPUT_DIR", str(whole), env_extra=ONE_THREAD
    )
    args = ["--config-file", DATAFREE, *datafree, "OUTPUT_DIR", str(killed)]
    _kill_after_checkpoint(args, killed, "model_0000003.pth")
    run_train_net("--resume", *args, env_extra=ONE_THREAD)
    _assert_same_weights(whole, killed)


def test_lazy_run_resumes_bit_identical(tmp_path):
    """tools/lazy_train_net.py: with ``train.seed`` set (the configs' 0), the batches are
    planned (qdet.engine.lazy.build_train_loader) and the resumed run goes on with them."""
    tool = "tools/lazy_train_net.py"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_train_net(
        "--config-file", LAZY_QAT, *LAZY_TINY, f"train.output_dir={whole}",
        env_extra=ONE_THREAD, script=tool,
    )  # fmt: skip
    args = ["--config-file", LAZY_QAT, *LAZY_TINY, f"train.output_dir={killed}"]
    _kill_after_checkpoint(args, killed, "model_0000003.pth", tool=tool)
    run_train_net("--resume", *args, env_extra=ONE_THREAD, script=tool)
    _assert_same_weights(whole, killed)


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
