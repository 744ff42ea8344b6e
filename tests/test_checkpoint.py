"""The atomic checkpointer (qdet/engine/checkpoint.py): a saved file holds the model's state
and ``last_checkpoint`` names it; a crash in the middle of a write leaves the previous
checkpoint whole, where Detectron2's own checkpointer (the negative control) tears it."""

import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from qdet.engine import AtomicCheckpointer


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Linear(8, 4))


def test_saved_file_holds_the_state_and_last_checkpoint_names_it(tmp_path):
    model, optimizer_state = _model(0), {"step": 7}

    class Stateful:
        def state_dict(self):
            return dict(optimizer_state)

    checkpointer = AtomicCheckpointer(model, save_dir=str(tmp_path), optimizer=Stateful())
    checkpointer.save("model_0000009", iteration=9)
    saved = torch.load(tmp_path / "model_0000009.pth", weights_only=False)
    assert saved["iteration"] == 9 and saved["optimizer"] == {"step": 7}
    want = model.state_dict()
    assert sorted(saved["model"]) == sorted(want)
    for key, value in want.items():
        assert torch.equal(saved["model"][key], value), key
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    # only the checkpoint and its tag: no temporary file left behind
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]
    # Detectron2's reader finds and loads it into a fresh model
    fresh = _model(1)
    AtomicCheckpointer(fresh, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    for key, value in want.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_nothing_is_written_without_a_save_dir_or_off_the_main_process(tmp_path):
    AtomicCheckpointer(_model(0), save_dir="").save("model_final")
    AtomicCheckpointer(_model(0), save_dir=str(tmp_path), save_to_disk=False).save("x")
    assert os.listdir(tmp_path) == []


def _crash_mid_write(monkeypatch):
    """torch.save writes half of its bytes, then the process 'dies' (an exception)."""
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
        else:
            f.write(data[: len(data) // 2])
            f.flush()
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", torn_save)


@pytest.mark.parametrize("checkpointer", [AtomicCheckpointer, DetectionCheckpointer])
def test_a_crash_mid_write_leaves_the_previous_checkpoint_whole(
    tmp_path, monkeypatch, checkpointer
):
    checkpointer(_model(0), save_dir=str(tmp_path)).save("model_final")
    before = (tmp_path / "model_final.pth").read_bytes()
    with monkeypatch.context() as patch:
        _crash_mid_write(patch)
        with pytest.raises(KeyboardInterrupt):
            checkpointer(_model(1), save_dir=str(tmp_path)).save("model_final")
    after = (tmp_path / "model_final.pth").read_bytes()
    if checkpointer is AtomicCheckpointer:
        assert after == before
        state = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
        for key, value in _model(0).state_dict().items():
            assert torch.equal(state[key], value), key
        assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    else:  # the control: a plain write in place is torn by the same crash
        assert after != before and len(after) < len(before)
