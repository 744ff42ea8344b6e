"""A DetectionCheckpointer whose files appear whole or not at all."""

from __future__ import annotations

import os

import torch
from detectron2.checkpoint import DetectionCheckpointer


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: a crash leaves the old file or the new one


class AtomicCheckpointer(DetectionCheckpointer):
    """Writes to a temporary file and renames it, so a crash never leaves a torn
    checkpoint and ``last_checkpoint`` always names a complete file; and refuses to write
    weights that are not finite, so a diverged step never replaces (or, with
    ``SOLVER.CHECKPOINTS_TO_KEEP``, rotates out) the last good checkpoint."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        bad = [
            k
            for k, v in data["model"].items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if bad:
            raise FloatingPointError(self._not_finite_message(name, bad))
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def _not_finite_message(self, name: str, bad: list[str]) -> str:
        message = (
            f"{name}: {len(bad)} of the model's tensors are inf or NaN (e.g. {bad[0]}), so "
            "it is not saved"
        )
        if not self.has_checkpoint():
            return f"{message}; no checkpoint was written before"
        return (
            f"{message}; the last checkpoint, {self.get_checkpoint_file()}, is the newest "
            "with finite weights: resume from it (--resume) once the cause is found (a lower "
            "SOLVER.BASE_LR, the data)"
        )

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))
