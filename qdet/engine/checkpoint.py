"""A DetectionCheckpointer whose files appear whole or not at all."""

from __future__ import annotations

import os
import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from qdet.quantization.per_level import PerLevelQuantizer
from qdet.quantization.quantizers import Quantizer


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: a crash leaves the old file or the new one


def _expected_missing(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes a checkpoint of the model's FP form lacks: its quantizers' (the FP ->
    quantized fine-tune) and the distiller's connectors."""
    prefixes = ["distiller."]
    for name, module in model.named_modules():
        if name and isinstance(module, Quantizer | PerLevelQuantizer):
            prefixes.append(name + ".")
    return tuple(prefixes)


def incompatibility(model: nn.Module, incompatible) -> str:
    """Why a loaded checkpoint is another model's (fvcore's incompatible keys), or "":
    parameters of other shapes; parameters of the model's own modules that the model does
    not have (another depth or backbone); or, for a whole detector's checkpoint (one with
    any parameter outside the backbone), missing parameters beyond the FP -> quantized
    case. A backbone's pretrained weights may leave the rest of the model to train."""
    problems = []
    shapes = incompatible.incorrect_shapes
    if shapes:
        name, got, want = shapes[0]
        problems.append(
            f"{len(shapes)} parameters of other shapes (e.g. {name}: {tuple(got)} in the "
            f"checkpoint, {tuple(want)} in the model)"
        )
        # A quantizer's extra state holds its deployment target only under one
        # (qdet.quantization.quantizer_state): lengths 3 and 4 are a target mismatch.
        targets = [
            (tuple(got), tuple(want))
            for name, got, want in shapes
            if name.endswith("quantizer._extra_state")
        ]
        if targets and targets[0] in (((3,), (4,)), ((4,), (3,))):
            trained_with = "without" if targets[0][0] == (3,) else "with"
            problems.append(
                f"its quantizers were trained {trained_with} a QUANT.TARGET and this config "
                f"builds them {'with' if trained_with == 'without' else 'without'} one: give "
                "the QUANT.TARGET of the run that trained it (its OUTPUT_DIR/config.yaml); a "
                "model for a runtime is trained for it (docs/deployment.md)"
            )
    children = {name for name, _ in model.named_children()}
    unexpected = [k for k in incompatible.unexpected_keys if k.split(".")[0] in children]
    if unexpected:
        problems.append(f"{len(unexpected)} parameters the model lacks (e.g. {unexpected[:3]})")
    model_keys = list(model.state_dict())
    missing = set(incompatible.missing_keys)
    # (BN's num_batches_tracked is never reported missing: it does not tell.)
    loaded = [k for k in model_keys if k not in missing and not k.endswith("num_batches_tracked")]
    whole_detector = any(not k.startswith("backbone.") for k in loaded)
    allowed = _expected_missing(model)
    lacking = [
        k
        for k in incompatible.missing_keys
        if not k.startswith(allowed) and not k.endswith("num_batches_tracked")
    ]
    if whole_detector and lacking:
        problems.append(f"{len(lacking)} of the model's parameters missing (e.g. {lacking[:3]})")
    return "; ".join(problems)


def check_calibrated(model: nn.Module, weights: str) -> None:
    """An evaluated quantized model's quantizers come calibrated from its checkpoint: an FP
    checkpoint in a quantized config would otherwise calibrate itself on the first test
    batch and report an AP as if the model were trained."""
    pending = [
        name
        for name, m in model.named_modules()
        if isinstance(m, Quantizer) and m.enabled and not m.initialized
    ]
    if pending:
        raise ValueError(
            f"{len(pending)} quantizers of this quantized model are not calibrated after loading "
            f"{weights!r} (e.g. {pending[0]}): it is not a trained checkpoint of this config. "
            "Evaluate the checkpoint this config trains (tools/train_net.py writes "
            "OUTPUT_DIR/model_final.pth), or an FP checkpoint with its FP config"
        )


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

    def load(self, path: str, *args, **kwargs):
        self._loading = path
        remote = "://" in path
        if path and not remote and not os.path.isfile(path):
            # fvcore would stop with an assertion ("Checkpoint ... not found!").
            raise FileNotFoundError(
                f"checkpoint {path!r} does not exist: give a checkpoint that tools/train_net.py "
                "(or tools/lazy_train_net.py) wrote, e.g. <OUTPUT_DIR>/model_final.pth"
            )
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> dict:
        """Detectron2's reading of a ``.pth`` / ``.pkl``; a file that is not a whole
        checkpoint is one error naming it (torch's own is a 45-line traceback)."""
        try:
            return super()._load_file(filename)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
            detail = " ".join(str(e).split())[:160]
            raise ValueError(
                f"cannot read checkpoint {filename!r} ({type(e).__name__}: {detail}): it is "
                "truncated or not a checkpoint (a copy or download that stopped early, or "
                "another kind of file); give a complete one, e.g. the run's previous "
                "model_*.pth"
            ) from e

    def _log_incompatible_keys(self, incompatible) -> None:
        """Detectron2 logs these and trains or evaluates a model that is partly random;
        here a checkpoint of another model is an error (:func:`incompatibility`)."""
        super()._log_incompatible_keys(incompatible)
        problem = incompatibility(self.model, incompatible)
        if problem:
            raise ValueError(
                f"checkpoint {getattr(self, '_loading', '')} does not fit this config's model: "
                f"{problem}. Give the checkpoint the config that trained it (or this config's "
                "own MODEL.WEIGHTS / train.init_checkpoint)"
            )

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))


def non_finite_message(error: FloatingPointError, checkpointer: AtomicCheckpointer) -> str:
    """Detectron2's (or qdet's) non-finite-loss message in one line, with the checkpoint to
    resume from: the error comes before the step's update and checkpoint, so the last
    checkpoint on disk is from a step whose losses were finite."""
    message = " ".join(str(error).split())
    if not checkpointer.has_checkpoint():
        return f"{message}; training stopped before its update; no checkpoint was written yet"
    last = checkpointer.get_checkpoint_file()
    return (
        f"{message}; training stopped before its update; the last checkpoint, {last}, is "
        "from a step whose losses were finite: resume from it (--resume) once the cause "
        "is found (a lower SOLVER.BASE_LR, the data)"
    )
