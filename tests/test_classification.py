"""projects/Classification: the digit crops, CIFAR from a local root, the quantized CIFAR
ResNet, and its train_net.py end to end."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from train_net_cli import ROOT, run_train_net

sys.path.insert(0, os.path.join(ROOT, "projects", "Classification"))
from classification import add_classification_config, data  # noqa: E402

from qdet.config import add_qdet_config  # noqa: E402
from qdet.data import embedded  # noqa: E402
from qdet.quantization.layers import QUANTIZED_LAYERS  # noqa: E402

TRAIN_NET = "projects/Classification/train_net.py"
CONFIGS = os.path.join(ROOT, "projects", "Classification", "configs")
SMALL = {"train": 40, "val": 20}


def _cfg(*opts):
    cfg = add_classification_config(add_qdet_config(get_cfg()))
    cfg.merge_from_file(os.path.join(CONFIGS, "Base-digits32.yaml"))
    cfg.merge_from_list(list(opts))
    return cfg


def test_crops_are_deterministic_and_val_digits_are_never_trained_on(tmp_path):
    a = data.build_digit_crops(tmp_path / "a", SMALL)
    b = data.build_digit_crops(tmp_path / "b", SMALL)
    for split in SMALL:
        bytes_a, bytes_b = (r.joinpath(f"{split}.npz").read_bytes() for r in (a, b))
        assert hashlib.sha256(bytes_a).digest() == hashlib.sha256(bytes_b).digest()
    with np.load(a / "train.npz") as train, np.load(a / "val.npz") as val:
        assert train["images"].shape == (40, 32, 32, 3) and train["images"].dtype == np.uint8
        # Each crop's class is its digit sample's sklearn label; the samples of the two
        # splits come from disjoint pools.
        _, _, targets = embedded.digit_pools()
        for split in (train, val):
            assert (targets[split["digit_samples"]] == split["labels"]).all()
        assert not set(train["digit_samples"]) & set(val["digit_samples"])
        assert len(set(train["labels"].tolist())) > 5


def test_quantized_resnet20_keeps_stem_and_fc_fp_and_distils_its_branches():
    model = build_model(_cfg("QUANT.ENABLED", "True", "QUANT.W_BITS", "2", "QUANT.A_BITS", "2"))
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    quantized = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]
    # 1 stem conv + 9 blocks x 2 convs + 2 shortcut convs; fc is the one Linear.
    assert len(convs) == 21 and sorted(set(convs) - set(quantized)) == ["backbone.stem.conv1"]
    assert "fc" not in quantized and len(quantized) == 20
    from qdet.distill.taps import residual_branches

    assert len(residual_branches(model)) == 9  # AKT's taps on ResNet-20
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 32, 32) * 255, "label": 3}])
    assert out[0]["logits"].shape == (10,)


def _fake_cifar10(root):
    """torchvision's on-disk CIFAR-10: pickled batches of 3072-byte rows and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", 2) for i in range(1, 6)), ("test_batch", 3)]:
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return folder


def test_cifar_loads_from_a_local_root_in_torchvisions_format(tmp_path, monkeypatch):
    import torchvision

    folder = _fake_cifar10(tmp_path)
    # torchvision checks the real files' MD5 sums, which a fake cannot match.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    cfg = _cfg(
        "DATASETS.TRAIN", "('cifar10_train',)", "DATASETS.TEST", "('cifar10_test',)",
        "DATASETS.CIFAR_ROOT", str(tmp_path),
    )  # fmt: skip
    data.register_cifar(cfg)
    train, test = DatasetCatalog.get("cifar10_train"), DatasetCatalog.get("cifar10_test")
    assert len(train) == 10 and len(test) == 3
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f)
    # Row-major 3 x 32 x 32 planes -> H x W x 3, as torchvision decodes it.
    expected = raw["data"][1].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(test[1]["image"], expected) and test[1]["label"] == raw["labels"][1]
    mapped = data.ClassificationMapper(is_train=False)(test[1])
    assert mapped["image"].shape == (3, 32, 32)
    assert torch.equal(mapped["image"], torch.as_tensor(expected).permute(2, 0, 1).float())


def test_missing_cifar_root_and_unknown_arch_are_one_line_errors(tmp_path):
    cifar = os.path.join(CONFIGS, "cifar", "resnet20_fp.yaml")
    r = run_train_net(
        "--config-file", cifar, "DATASETS.CIFAR_ROOT", str(tmp_path / "nope"),
        "MODEL.DEVICE", "cpu", check=False, script=TRAIN_NET,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "DATASETS.CIFAR_ROOT" in r.stderr and "cifar-10-batches-py/" in r.stderr
    fp = os.path.join(CONFIGS, "digits32", "resnet20_fp.yaml")
    r = run_train_net(
        "--config-file", fp, "MODEL.CLASSIFIER.ARCH", "resnet21", check=False, script=TRAIN_NET
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'resnet21' is unknown" in r.stderr and "resnet20" in r.stderr


def test_train_net_trains_a_4bit_resnet20_and_reports_top1(tmp_path):
    fp = os.path.join(CONFIGS, "digits32", "resnet20_fp.yaml")
    fast = ["SOLVER.IMS_PER_BATCH", "16", "SOLVER.WARMUP_ITERS", "1", "TEST.IMS_PER_BATCH", "100"]
    run_train_net(
        "--config-file", fp, "SOLVER.MAX_ITER", "3", *fast, "OUTPUT_DIR", str(tmp_path / "fp"),
        "DATASETS.TEST", "()", script=TRAIN_NET,
    )  # fmt: skip
    q = os.path.join(CONFIGS, "digits32", "resnet20_4bit_baseline.yaml")
    run_train_net(
        "--config-file", q, "SOLVER.MAX_ITER", "3", *fast, "QUANT.CALIB_BATCHES", "1",
        "MODEL.WEIGHTS", str(tmp_path / "fp" / "model_final.pth"),
        "OUTPUT_DIR", str(tmp_path / "q"), script=TRAIN_NET,
    )  # fmt: skip
    with open(tmp_path / "q" / "eval_final.json") as f:
        result = json.load(f)["classification"]
    # Top-1 recomputed from the saved model: every val crop through it by hand, argmax
    # against the labels.
    from detectron2.checkpoint import DetectionCheckpointer

    cfg = _cfg("QUANT.ENABLED", "True", *fast)
    cfg.merge_from_file(q)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(tmp_path / "q" / "model_final.pth"))
    val = DatasetCatalog.get("qdet_digits32_val")
    images = torch.as_tensor(np.stack([d["image"] for d in val])).permute(0, 3, 1, 2).float()
    labels = torch.tensor([d["label"] for d in val])
    with torch.no_grad():
        pred = torch.cat(
            [
                model.classify(model.preprocess_image([{"image": im} for im in chunk])).argmax(1)
                for chunk in images.split(200)
            ]
        )
    assert result["top1"] == pytest.approx(100.0 * (pred == labels).double().mean().item())
    assert 0 <= result["top1"] <= result["top5"] <= 100
    lines = (tmp_path / "q" / "metrics.json").read_text().splitlines()
    last = [json.loads(line) for line in lines if "total_loss" in line][-1]
    assert last["iteration"] == 2 and 0 < last["total_loss"] < 10  # cross-entropy alone
