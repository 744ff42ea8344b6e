"""QDetTrainer's CPU pieces: bfloat16 autocast training (SOLVER.AMP.ENABLED on a CPU) and
batched evaluation (TEST.IMS_PER_BATCH)."""

import copy

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventStorage
from PIL import Image
from torch import nn

from qdet.config import add_qdet_config
from qdet.engine import QDetTrainer
from qdet.engine.trainer import CPUAutocastTrainer


class _TinyLossModel(nn.Module):
    """A conv and a linear layer returning a loss dict, as a Detectron2 model does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, batch):
        x, y = batch
        logits = self.fc(self.conv(x).relu().mean((2, 3)))
        return {"loss_cls": nn.functional.cross_entropy(logits.float(), y)}


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(4, 3, 12, 12, generator=g), torch.randint(0, 4, (4,), generator=g)


def _step_with(trainer_cls, model):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = trainer_cls(model, _data(), opt)
    trainer.iter = 0
    with EventStorage(0):
        trainer.run_step()
    return model


def test_cpu_autocast_trainer_steps_like_a_bf16_forward_and_fp32_update():
    torch.manual_seed(0)
    start = _TinyLossModel()
    stepped = _step_with(CPUAutocastTrainer, copy.deepcopy(start))

    # Written out: forward under bf16 autocast, backward and SGD outside it.
    manual = copy.deepcopy(start)
    x, y = next(_data())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = manual((x, y))["loss_cls"]
    loss.backward()
    with torch.no_grad():
        for p in manual.parameters():
            p -= 0.5 * p.grad
    fp32 = _step_with(SimpleTrainer, copy.deepcopy(start))

    for (name, a), b in zip(stepped.named_parameters(), manual.parameters(), strict=True):
        assert a.dtype == torch.float32, name  # parameters stay float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # and the autocast was in effect: the update differs from the float32 one
    assert not torch.allclose(stepped.conv.weight, fp32.conv.weight, rtol=0, atol=1e-7)


@pytest.fixture
def tiny_image_dataset(tmp_path):
    name = "qdet_test_five_images"
    records = []
    for i in range(5):
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(np.full((40 + 8 * i, 48, 3), 30 * i, np.uint8)).save(path)
        records.append({"file_name": path, "image_id": i, "height": 40 + 8 * i, "width": 48})
    DatasetCatalog.register(name, lambda: records)
    yield name
    DatasetCatalog.remove(name)


def test_test_loader_batches_ims_per_batch(tiny_image_dataset):
    cfg = add_qdet_config(get_cfg())
    sizes = {}
    for per_batch in (1, 2):
        cfg.TEST.IMS_PER_BATCH = per_batch
        loader = QDetTrainer.build_test_loader(cfg, tiny_image_dataset)
        sizes[per_batch] = [len(b) for b in loader]
        ids = [
            d["image_id"] for b in QDetTrainer.build_test_loader(cfg, tiny_image_dataset) for d in b
        ]
        assert ids == list(range(5))  # every image once, in order
    assert sizes == {1: [1, 1, 1, 1, 1], 2: [2, 2, 1]}
