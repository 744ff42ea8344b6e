"""The study runner: pairing (one teacher file and one data order per seed), reuse,
ordering, and the accuracy study's paired-difference table."""

import json
import os
import sys
import time

import numpy as np
import pytest
import torch

from qdet.engine import QDetTrainer
from qdet.study import accuracy as accuracy_study
from qdet.study import runner as study_module
from qdet.study.runner import Study, StudyRow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(80, 96, 112)"]  # random scale


def _image_ids(cfg, batches=3):
    loader = iter(QDetTrainer.build_train_loader(cfg))
    out = []
    for _ in range(batches):
        batch = next(loader)
        out.append([(d["image_id"], d["image"].float().sum().item()) for d in batch])
    return out


def test_rows_of_a_seed_share_the_teacher_file_and_the_batches(tmp_path):
    rows = accuracy_study.study_rows(["baseline", "qfd", "feature_kd", "ewgs"], [4, 2], [4])
    assert "ewgs_4bit" in {r.name for r in rows} and "ewgs_2bit" not in {r.name for r in rows}
    study = Study(rows, [1, 2], str(tmp_path), SMALL)
    for seed in (1, 2):
        fp = os.path.join(str(tmp_path), f"seed{seed}", "fp", "model_final.pth")
        cfgs = {r.name: study.config(r, seed) for r in rows}
        assert cfgs["fp"].MODEL.WEIGHTS == "" and seed == cfgs["fp"].SEED
        for name, cfg in cfgs.items():
            assert seed == cfg.SEED
            if name != "fp":
                assert fp == cfg.MODEL.WEIGHTS, name
            if cfg.DISTILL.ENABLED:
                assert fp == cfg.DISTILL.TEACHER_WEIGHTS, name
        # The QFD rows of a seed share a teacher stage only where the stage is the same.
        stages = {cfgs[n].DISTILL.QUANTIZED_TEACHER_WEIGHTS for n in ("qfd_4bit", "qfd_2bit")}
        assert len(stages) == 1 and f"seed{seed}" in stages.pop()
    # Same batches (images, order, augmentation) for every row of a seed, even when the
    # rows consume other randomness in between; another seed sees other batches.
    first = {}
    for i, name in enumerate(("fp", "baseline_4bit", "qfd_2bit")):
        np.random.rand(i + 1)
        torch.rand(i + 1)
        first[name] = _image_ids(study.config(study.rows[name], 1))
    assert first["fp"] == first["baseline_4bit"] == first["qfd_2bit"]
    assert _image_ids(study.config(study.rows["fp"], 2)) != first["fp"]


def test_study_reuses_runs_and_checks_its_rows(tmp_path, monkeypatch):
    trained = []

    def fake_train(cfg):
        trained.append((os.path.basename(cfg.OUTPUT_DIR), cfg.SEED))
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        open(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), "w").close()

    ap = {"fp": 50.0, "q": 40.0}
    monkeypatch.setattr(
        study_module,
        "evaluate_final",
        lambda cfg: {"AP": ap[os.path.basename(cfg.OUTPUT_DIR)] + cfg.SEED, "W/A": "x"},
    )
    config = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_baseline.yaml")
    rows = [
        StudyRow("fp", "FP", os.path.join(ROOT, "configs/digits/retinanet_r18_fp.yaml")),
        StudyRow("q", "baseline", config, bits="4/4", init="fp"),
    ]
    lines = []
    study = Study(rows, [1, 2], str(tmp_path), train_fn=fake_train, log=lines.append)
    results = study.run()
    assert trained == [("fp", 1), ("fp", 2), ("q", 1), ("q", 2)]  # row-major
    assert results["q"] == {
        1: {"AP": 41.0, "W/A": "x", "train s": pytest.approx(0, abs=5)},
        2: {
            "AP": 42.0,
            "W/A": "x",
            "train s": pytest.approx(0, abs=5),
        },
    }
    assert any("about" in line and "min of training left" in line for line in lines)
    trained.clear()
    study.run()
    assert trained == []  # every run reused
    os.remove(os.path.join(str(tmp_path), "seed2", "q", "model_final.pth"))
    partial = study.run(train=False)  # a report of the finished runs, nothing trained
    assert trained == [] and sorted(partial["q"]) == [1] and sorted(partial["fp"]) == [1, 2]
    report = {"fp": partial["fp"], "baseline_4bit": partial["q"]}
    assert "| 41.0, -" in accuracy_study.tables(report, ["baseline"], [4], [1, 2])
    with pytest.raises(ValueError, match="listed before 'fp'"):
        Study(rows[::-1], [1], str(tmp_path)).plan()
    with pytest.raises(ValueError, match="'nope', which is not a row"):
        Study([StudyRow("q", "b", config, init="nope")], [1], str(tmp_path))


def _fake_train(cfg):
    """A picklable stand-in for training: writes the final file, notes when it ran."""
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    start = time.time()
    init = cfg.MODEL.WEIGHTS
    assert not init or os.path.isfile(init), f"{cfg.OUTPUT_DIR} started before {init} existed"
    time.sleep(1.5)
    with open(os.path.join(cfg.OUTPUT_DIR, "ran.json"), "w") as f:
        json.dump([start, time.time(), os.getpid()], f)
    open(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), "w").close()


def test_parallel_study_waits_for_each_runs_start(tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "evaluate_final", lambda cfg: {"AP": 1.0, "W/A": "x"})
    config = os.path.join(ROOT, "configs/digits/retinanet_r18_4bit_baseline.yaml")
    rows = [
        StudyRow("fp", "FP", os.path.join(ROOT, "configs/digits/retinanet_r18_fp.yaml")),
        StudyRow("q", "baseline", config, bits="4/4", init="fp"),
        StudyRow("r", "baseline", config, bits="4/4", init="fp"),
    ]
    lines = []
    study = Study(rows, [1, 2], str(tmp_path), train_fn=_fake_train, log=lines.append, jobs=2)
    results = study.run()  # a worker that starts too early fails its assert, and the study
    assert {n: sorted(r) for n, r in results.items()} == {"fp": [1, 2], "q": [1, 2], "r": [1, 2]}

    spans = []
    for row in ("fp", "q", "r"):
        for seed in (1, 2):
            with open(os.path.join(str(tmp_path), f"seed{seed}", row, "ran.json")) as f:
                spans.append(json.load(f))
    # At most two at once, and two at once at some point (both FP runs start together).
    running = [sum(a <= t < b for a, b, _ in spans) for t, _, _ in spans]
    assert max(running) == 2
    assert len({pid for _, _, pid in spans}) == 6  # a fresh process per run
    assert sum("in a worker" in line for line in lines) == 6


def test_paired_differences_and_wins_in_the_table():
    results = {
        "fp": {1: {"AP": 50.0}, 2: {"AP": 52.0}, 3: {"AP": 51.0}},
        "baseline_4bit": {1: {"AP": 40.0}, 2: {"AP": 44.0}, 3: {"AP": 42.0}},
        "qfd_4bit": {1: {"AP": 41.0}, 2: {"AP": 47.0}, 3: {"AP": 41.5}},
    }
    text = accuracy_study.tables(results, ["baseline", "qfd"], [4], [1, 2, 3])
    # Differences per seed: +1, +3, -0.5: mean 1.17, sample std 1.76, better on 2 of 3.
    assert "+1.2 ± 1.8 (2/3 seeds better)" in text
    assert "42.0 ± 2.0" in text and "51.0 ± 1.0" in text  # baseline and FP mean ± std
    assert "41.0, 47.0, 41.5" in text


def _classification_study():
    sys.path.insert(0, os.path.join(ROOT, "projects", "Classification"))
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "classification_study", os.path.join(ROOT, "projects", "Classification", "study.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_train_quick(cfg):
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    open(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), "w").close()


def _fake_top1(cfg):
    """A picklable stand-in for scoring: a top-1 made of the row and the seed."""
    name = os.path.basename(cfg.OUTPUT_DIR)
    return {"top1": 90.0 + len(name) + cfg.SEED, "W/A": "x"}


def test_classification_study_pairs_its_rows_and_compares_with_their_references(
    tmp_path, monkeypatch
):
    cls_study = _classification_study()
    rows = cls_study.study_rows(["baseline", "faqd", "zs_logit_kd", "akt"], [4, 2], [3])
    names = [r.name for r in rows]
    assert names == ["fp", "baseline_4bit", "baseline_2bit", "faqd_4bit", "faqd_2bit",
                     "zs_logit_kd_3bit", "akt_3bit"]  # fmt: skip
    monkeypatch.chdir(ROOT)  # the recipes name their teacher config from the repo root
    study = Study(
        rows, [1, 2], str(tmp_path), train_fn=_fake_train_quick,
        add_config=cls_study.add_classification_config,
        evaluate_fn=_fake_top1, headline=("top1", "top-1"), log=lambda m: None,
    )  # fmt: skip
    fp = os.path.join(str(tmp_path), "seed2", "fp", "model_final.pth")
    akt = study.config(study.rows["akt_3bit"], 2)
    assert akt.ZEROSHOT.ENABLED and akt.QUANT.W_BITS == 3 and akt.SEED == 2
    assert akt.MODEL.WEIGHTS == fp == akt.DISTILL.TEACHER_WEIGHTS
    results = study.run()
    text = cls_study.bits_tables(
        results, {m: cls_study.METHODS[m][0] for m in ("baseline", "akt", "zs_logit_kd")},
        [4, 3], [1, 2], "top1", "Top-1", cls_study.REFERENCES,
    )  # fmt: skip
    # akt_3bit - zs_logit_kd_3bit per seed: len("akt_3bit") - len("zs_logit_kd_3bit") = -8.
    assert "-8.0 ± 0.0 (0/2 seeds better)" in text and "(reference)" in text
    assert "or zero-shot, logit KD only, where so marked" in text
    # RFD at AKT's code's reduction and at 1/5 of the loss: zero-shot rows, paired with
    # zero-shot logit KD, with the overrides they name.
    for name in ("akt_official", "akt_fifth", "akt_spatial_official", "akt_channel_fifth"):
        assert cls_study.REFERENCES[name] == "zs_logit_kd"
    more = Study(
        cls_study.study_rows(["baseline", "akt_official", "akt_channel_fifth"], [2], [4]),
        [1], str(tmp_path), add_config=cls_study.add_classification_config,
    )  # fmt: skip
    official = more.config(more.rows["akt_official_4bit"], 1)
    assert official.DISTILL.RFD.REDUCTION == "official" and official.ZEROSHOT.ENABLED
    fifth = more.config(more.rows["akt_channel_fifth_4bit"], 1)
    assert fifth.DISTILL.RFD.ATTENTION == "channel" and fifth.DISTILL.RFD.REDUCTION == "mean"
    assert fifth.DISTILL.RFD.WEIGHT == cls_study.RFD_FIFTH_WEIGHTS["channel"] > 500
    # --report-only before a row has finished any seed: no seconds-per-epoch line for it.
    assert cls_study.seconds_per_epoch(study, {"faqd_2bit": {}}, ["faqd"], [2], [1, 2]) == ""


def test_each_terms_share_of_the_loss_reaches_the_table(tmp_path):
    lines = [
        {
            "iteration": 19,
            "distill_ratio": 0.30,
            "distill_ratio/qfd": 0.10,
            "distill_ratio/fa": 0.2,
        },
        {
            "iteration": 39,
            "distill_ratio": 0.25,
            "distill_ratio/qfd": 0.20,
            "distill_ratio/fa": 0.05,
        },
        {"iteration": 40, "eval": 1.0},  # a line without the scalars (an evaluation's)
    ]
    (tmp_path / "metrics.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    shares = study_module.term_shares(str(tmp_path))
    assert shares == pytest.approx({"share qfd": 0.15, "share fa": 0.125})
    assert study_module.term_shares(str(tmp_path / "missing")) == {}
    results = {
        "fp": {1: {"AP": 50.0}, 2: {"AP": 52.0}},
        "baseline_4bit": {1: {"AP": 40.0}, 2: {"AP": 44.0}},
        "qfd_4bit": {1: {"AP": 41.0, **shares}, 2: {"AP": 47.0, "share qfd": 0.25}},
    }
    text = accuracy_study.tables(results, ["baseline", "qfd"], [4], [1, 2])
    # qfd over seeds: (0.15 + 0.25) / 2 = 20%; fa: seed 1 only, 12.5% -> "12%" (2 digits).
    assert "| QFD" in text and "fa 12%, qfd 20%" in text
    assert "distill_ratio/<term>" in text
    assert "| baseline" not in text.split("distill_ratio/<term>")[1]  # no term: no row
    from qdet.study.report import _percent

    assert [_percent(x) for x in (0.0063, 0.19, 1.0)] == ["0.63%", "19%", "100%"]
