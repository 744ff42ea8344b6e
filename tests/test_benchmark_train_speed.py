"""The training benchmark's memory figure (qdet/benchmark/train_speed.py): the bytes autograd
saves for backward, each storage once, against the sizes of the tensors a tiny model is
known to save, and its batch: each instance's mask is its box."""

import torch
from torch import nn

from qdet.benchmark.train_speed import make_batch, saved_bytes


class Scale(nn.Module):
    """loss = sum(x * w) + sum(view(x) * v): each product saves its x (for w's and v's
    gradient), the second a view of the first's storage."""

    def __init__(self):
        super().__init__()
        self.w, self.v = nn.Parameter(torch.ones(100)), nn.Parameter(torch.ones(10))

    def forward(self, batch):
        x = batch["x"]
        return {"a": (x * self.w).sum(), "b": (x.view(-1, 10) * self.v).sum()}


def test_saved_bytes_count_each_storage_once():
    model = Scale()
    x = torch.randn(100)
    assert saved_bytes(model, {"x": x}, amp=False, device="cpu") == 100 * 4  # x, once
    assert model.w.grad is None and model.v.grad is None  # the step's gradients dropped
    two = {"x": torch.cat([x, x]).view(2, 100)}
    assert saved_bytes(model, two, amp=False, device="cpu") == 200 * 4


def test_batch_boxes_classes_and_masks_agree():
    batch = make_batch(2, 96, 128, "cpu")
    assert len(batch) == 2
    for d in batch:
        inst = d["instances"]
        assert d["image"].shape == (3, 96, 128) and (d["height"], d["width"]) == (96, 128)
        boxes = inst.gt_boxes.tensor
        assert boxes.shape == (8, 4) and (boxes[:, 2:] > boxes[:, :2]).all()
        assert inst.gt_classes.shape == (8,)
        for box, mask in zip(boxes, inst.gt_masks.tensor):
            x0, y0, x1, y1 = (int(v) for v in box)
            want = torch.zeros(96, 128, dtype=torch.bool)
            want[y0:y1, x0:x1] = True
            assert torch.equal(mask, want)
