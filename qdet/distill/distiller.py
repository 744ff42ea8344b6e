"""The frozen teacher and the distillation term added to the student's losses."""

from __future__ import annotations

import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import get_event_storage
from torch import nn

from qdet.distill.losses import build_distill_loss


def backbone_taps(model: nn.Module) -> list[str]:
    """Feature names a tap can name: the backbone's outputs and its bottom-up network's."""
    names = list(model.backbone.output_shape())
    bottom_up = getattr(model.backbone, "bottom_up", None)
    if bottom_up is not None:
        names += [n for n in bottom_up.output_shape() if n not in names]
    return names


class Distiller(nn.Module):
    """``loss_distill = weight * loss(f_student[tap], f_teacher[tap])``.

    The teacher is held outside the module tree (not in the student's state dict, not in
    its optimizer, not wrapped by DDP), is frozen, and runs in eval mode on the student's
    normalised input batch. The training log gets ``distill_ratio``, the distillation
    term's share of the total loss (QFD's detection recipe: about 1/5).
    """

    def __init__(self, teacher: nn.Module, tap: str, loss: nn.Module, weight: float):
        super().__init__()
        taps = backbone_taps(teacher)
        if tap not in taps:
            raise ValueError(
                f"DISTILL.TAP={tap!r} is not a feature of the teacher: choose from {taps}"
            )
        teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # deliberately not a submodule
        self.tap, self.loss, self.weight = tap, loss, weight
        self._teacher_features = {}
        teacher.backbone.register_forward_hook(self._keep(self._teacher_features))
        if hasattr(teacher.backbone, "bottom_up"):
            teacher.backbone.bottom_up.register_forward_hook(self._keep(self._teacher_features))

    @staticmethod
    def _keep(store):
        def hook(_module, _inputs, features):
            store.update(features)

        return hook

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher's BN statistics never move
        return self

    def forward(self, images: torch.Tensor, student_features: dict, det_losses: dict) -> dict:
        if self.tap not in student_features:
            raise ValueError(
                f"DISTILL.TAP={self.tap!r} is not a feature of the student: "
                f"choose from {sorted(student_features)}"
            )
        self._teacher_features.clear()
        with torch.no_grad():
            self.teacher.backbone(images.to(self.teacher.device))
        f_t = self._teacher_features[self.tap]
        f_s = student_features[self.tap]
        if f_s.shape != f_t.shape:
            raise ValueError(
                f"student and teacher feature {self.tap!r} differ in shape: "
                f"{tuple(f_s.shape)} vs {tuple(f_t.shape)}; use a teacher whose "
                "FPN/backbone has the same channels and strides"
            )
        loss = self.weight * self.loss(f_s, f_t.to(f_s.dtype))
        det = sum(det_losses.values())
        get_event_storage().put_scalar("distill_ratio", (loss / (loss + det)).item())
        return {"loss_distill": loss}


def teacher_config(cfg: CfgNode, quantized_feature: bool) -> CfgNode:
    """The teacher's config: DISTILL.TEACHER_CONFIG, on the student's device and data."""
    from qdet.config import add_qdet_config

    path = cfg.DISTILL.TEACHER_CONFIG
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"DISTILL.TEACHER_CONFIG={path!r} is not a file: set it to the teacher's config"
        )
    tcfg = add_qdet_config(get_cfg())
    tcfg.set_new_allowed(True)
    tcfg.merge_from_file(path)
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.DISTILL.ENABLED = False
    if quantized_feature:
        tcfg.QUANT.FEATURE_TAP = cfg.DISTILL.TAP
        tcfg.QUANT.FEATURE_BITS = cfg.DISTILL.TEACHER_FEATURE_BITS
    return tcfg


def load_teacher(cfg: CfgNode, weights: str, quantized_feature: bool) -> nn.Module:
    """Build the teacher and load ``weights``, refusing a checkpoint that does not fit."""
    if not weights or not os.path.isfile(weights):
        hint = (
            " Run the teacher stage first (tools/train_net.py --stage teacher)."
            if quantized_feature
            else ""
        )
        raise FileNotFoundError(f"teacher checkpoint {weights!r} does not exist.{hint}")
    teacher = build_model(teacher_config(cfg, quantized_feature))
    checkpointer = _CheckedCheckpointer(teacher)
    checkpointer.load(weights, checkpointables=[])
    result = checkpointer.incompatible
    if result is not None and result.incorrect_shapes:
        name, got, want = result.incorrect_shapes[0]
        raise ValueError(
            f"teacher checkpoint {weights} does not match DISTILL.TEACHER_CONFIG: {name} has "
            f"shape {tuple(got)} in the checkpoint, {tuple(want)} in the model "
            f"({len(result.incorrect_shapes)} such parameters)"
        )
    missing = [k for k in (result.missing_keys if result else []) if "num_batches_tracked" not in k]
    if quantized_feature and any(k.startswith("feature_quantizer.") for k in missing):
        raise ValueError(
            f"teacher checkpoint {weights} has no trained feature quantizer: QFD needs the "
            "teacher stage's output (tools/train_net.py --stage teacher), or use "
            "DISTILL.LOSS feature_kd"
        )
    if missing:
        raise ValueError(
            f"teacher checkpoint {weights} lacks {len(missing)} parameters of "
            f"DISTILL.TEACHER_CONFIG's model, e.g. {missing[:5]}"
        )
    return teacher


class _CheckedCheckpointer(DetectionCheckpointer):
    """Keeps the incompatible keys that Detectron2 only logs, so they can be refused."""

    incompatible = None

    def _log_incompatible_keys(self, incompatible) -> None:
        self.incompatible = incompatible
        super()._log_incompatible_keys(incompatible)


def build_distiller(cfg: CfgNode, student: nn.Module) -> Distiller:
    """The distiller for ``cfg.DISTILL``, its teacher on the student's device."""
    loss = build_distill_loss(cfg.DISTILL.LOSS)
    weights = cfg.DISTILL.TEACHER_WEIGHTS
    if loss.quantized_teacher:
        weights = quantized_teacher_weights(cfg)
    teacher = load_teacher(cfg, weights, loss.quantized_teacher).to(student.device)
    if not (
        torch.equal(teacher.pixel_mean.cpu(), student.pixel_mean.cpu())
        and torch.equal(teacher.pixel_std.cpu(), student.pixel_std.cpu())
    ):
        raise ValueError(
            "teacher and student normalise pixels differently "
            "(MODEL.PIXEL_MEAN / PIXEL_STD): the teacher sees the student's input"
        )
    return Distiller(teacher, cfg.DISTILL.TAP, loss, cfg.DISTILL.WEIGHT)


def quantized_teacher_weights(cfg: CfgNode) -> str:
    """Where the feature-quantized teacher is (the teacher stage writes it there)."""
    return cfg.DISTILL.QUANTIZED_TEACHER_WEIGHTS or os.path.join(
        cfg.OUTPUT_DIR, "teacher_stage", "model_final.pth"
    )
