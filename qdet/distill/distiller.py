"""The distiller: the frozen teacher, its taps matched to the student's, and each configured
term (:mod:`qdet.distill.terms`) added to the student's losses."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import replace

import torch
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from qdet.distill.losses import build_distill_loss
from qdet.distill.taps import (
    Tap,
    TapRecorder,
    expand_taps,
    resolve_tap,
)
from qdet.distill.terms import TermSpec, specs_from_terms

logger = logging.getLogger(__name__)

# A term below LOW_SHARE of the loss over the first SHARE_CHECK_ITERS steps is warned
# about, with the weight that would make it TARGET_SHARE (QFD's detection recipe's 1/5).
SHARE_CHECK_ITERS, LOW_SHARE, TARGET_SHARE = 100, 0.01, 0.2


def tap_channels(model: nn.Module, tap: Tap) -> int:
    """Channels of a tap's feature, read off the model (connectors are built from it)."""
    net = model.get_submodule(tap.path) if tap.path else model
    if isinstance(tap.select, str) and hasattr(net, "output_shape"):
        return net.output_shape()[tap.select].channels
    for module in (net, *reversed(list(net.modules()))):
        for attr in ("out_channels", "out_features"):
            if isinstance(getattr(module, attr, None), int):
                return getattr(module, attr)
    raise ValueError(
        f"a connector on tap {tap.name!r}: cannot tell its channels from "
        f"{type(net).__name__}; tap a conv, a block or a backbone output"
    )


def matched_taps(student: nn.Module, teacher: nn.Module, taps: list[str]) -> list[tuple[Tap, Tap]]:
    """(student tap, teacher tap) pairs, in order. Names are the same tap in both models;
    a pattern is expanded in each model and paired in order (an R18 student's
    ``residual_branches`` end in conv2, an R50 teacher's in conv3), so it must match as
    many taps in both. The teacher's taps carry the student's names."""
    pairs = []
    for pattern in taps:
        s_names = expand_taps(student, [pattern], "student")
        t_names = expand_taps(teacher, [pattern], "teacher")
        if len(s_names) != len(t_names):
            raise ValueError(
                f"tap pattern {pattern!r} matches {len(s_names)} modules in the student "
                f"and {len(t_names)} in the teacher: taps are paired one to one, so name "
                f"them (student: {s_names[:4]}..., teacher: {t_names[:4]}...)"
            )
        for s_name, t_name in zip(s_names, t_names):
            s_tap = resolve_tap(student, s_name, "student")
            t_tap = replace(resolve_tap(teacher, t_name, "teacher"), name=s_tap.name)
            for model, tap in ((student, s_tap), (teacher, t_tap)):
                check_tap_path(model, tap.path)
            if s_tap.name not in {p[0].name for p in pairs}:
                pairs.append((s_tap, t_tap))
    return pairs


def check_tap_path(model: nn.Module, path: str) -> None:
    """Refuse a tap whose module does not run when the teacher computes taps: a qdet
    meta-architecture says which top-level modules run (``check_tap_path``); any other
    model runs its backbone only."""
    if hasattr(model, "check_tap_path"):
        model.check_tap_path(path)
    elif path.split(".")[0] != "backbone":
        raise ValueError(
            f"tap module {path!r}: a {type(model).__name__} runs only its backbone for "
            "distillation (qdet's meta-architectures run their heads too); tap inside the "
            "backbone"
        )


def connector(in_channels: int, out_channels: int) -> nn.Module:
    """FAQD's connector: a trainable 1x1 conv + ReLU on the student's feature."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.ReLU())


def _key(tap: str) -> str:
    return tap.replace(".", "__")  # module names may not contain dots


class DistillTerm(nn.Module):
    """``weight * loss([f_s(tap) for tap], [f_t(tap) for tap])``, optionally with FAQD's
    trainable connector (1x1 conv + ReLU, student side) per tap."""

    def __init__(self, spec: TermSpec, loss: nn.Module, connectors: nn.ModuleDict | None):
        super().__init__()
        self.name, self.taps, self.weight = spec.loss, list(spec.taps), spec.weight
        self.weight_key = spec.weight_key or f"DISTILL.{spec.loss.upper()}.WEIGHT"
        self.loss, self.connectors = loss, connectors

    def forward(self, student: dict, teacher: dict) -> torch.Tensor:
        f_s = [student[t] for t in self.taps]
        if self.connectors is not None:
            f_s = [self.connectors[_key(t)](f) for t, f in zip(self.taps, f_s, strict=True)]
        f_t = [teacher[t] for t in self.taps]
        # In float32 even under AMP: affinities and attention KLs are small differences of
        # near-equal numbers, which bfloat16 / float16 would mostly round away.
        with torch.autocast(f_s[0].device.type, enabled=False):
            return self.weight * self.loss([f.float() for f in f_s], [f.float() for f in f_t])


class Distiller(nn.Module):
    """The distillation terms of a student, computed against a frozen teacher.

    The teacher is held outside the module tree (not in the student's state dict, not in
    its optimizer, not wrapped by DDP), is frozen, and runs in eval mode on the student's
    normalised input batch, only as far as the taps need (backbone; the head for head taps
    and ``logits``). Taps are read by forward hooks registered once on both models
    (:class:`qdet.distill.taps.TapRecorder`); the student's are kept in training forwards
    only, and handed over every step. Terms' connectors are the distiller's parameters:
    in the student's checkpoint and optimizer, never in its exported weights.

    Losses: ``loss_distill_<name>`` per term; ``distill_ratio`` in the log is the share of
    all distillation terms in the total loss (QFD's detection recipe: about 1/5),
    ``distill_ratio/<name>`` each term's. A term below :data:`LOW_SHARE` of the loss over
    the first :data:`SHARE_CHECK_ITERS` steps gets one warning with the weight that would
    make it :data:`TARGET_SHARE` (a term that weighs nothing tests nothing).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, specs: list[TermSpec]):
        super().__init__()
        teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # deliberately not a submodule
        s_taps, t_taps, terms = {}, {}, []
        for spec in specs:
            pairs = matched_taps(student, teacher, spec.taps)
            for s_tap, t_tap in pairs:
                s_taps.setdefault(s_tap.name, s_tap)
                t_taps.setdefault(s_tap.name, t_tap)
            spec = replace(spec, taps=[s.name for s, _ in pairs], options=dict(spec.options))
            if spec.options.get("activation") == "auto":  # the student's logits say which
                spec.options["activation"] = getattr(student, "logits_activation", "softmax")
            if "seed" in spec.options:  # independent random draws on every process
                spec.options["seed"] += comm.get_rank()
            loss = build_distill_loss(spec.loss, **spec.options)
            connectors = None
            if spec.connector:
                if not loss.takes_connector:
                    raise ValueError(
                        f"DISTILL.{spec.loss.upper()}: {spec.loss!r} takes no connector "
                        "(FAQD's 1x1 conv + ReLU is offered for feature_kd, fa and ffa)"
                    )
                connectors = nn.ModuleDict(
                    {
                        _key(s.name): connector(tap_channels(student, s), tap_channels(teacher, t))
                        for s, t in pairs
                    }
                )
            terms.append(DistillTerm(spec, loss, connectors))
        self.terms = nn.ModuleList(terms)
        self.label_free = False
        self.gt_weight = 1.0  # the ground-truth losses' weight beside the terms
        # A student's taps are kept in training forwards with autograd on (the ones whose
        # losses train it): not in evaluation, calibration or no-grad checks.
        self._paused = False
        self._student = TapRecorder(
            student,
            list(s_taps.values()),
            when=lambda: student.training and torch.is_grad_enabled() and not self._paused,
        )
        # Renamed to the student's names: a pattern may end in differently named modules.
        self._teacher = TapRecorder(teacher, list(t_taps.values()))
        self._teacher_paths = sorted({t.path for t in t_taps.values()})
        self._images = None
        self._share_sums = torch.zeros(len(terms) + 1, dtype=torch.float64)  # terms, total
        self._share_steps = 0
        self._hooks = [
            student.backbone.register_forward_pre_hook(self._keep_images(student)),
            # Taps hold one forward's outputs: forget any left by a forward that did not
            # reach the distiller, so a tap seen twice means a module that runs twice.
            student.register_forward_pre_hook(self._forget_taps),
        ]

    def _forget_taps(self, _model, _inputs) -> None:
        self._student.pop()  # returns None: a pre-hook's return value replaces the inputs

    @contextlib.contextmanager
    def paused(self):
        """Student forwards inside keep no taps and no images: forwards with autograd on
        that are not the student's training step (the zero-shot generator's loss runs the
        student to train the generator)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def remove(self) -> None:
        """Take the distiller's hooks off both models (``attach_distiller(None)`` does)."""
        self._student.remove()
        self._teacher.remove()
        for hook in self._hooks:
            hook.remove()

    def _keep_images(self, student: nn.Module):
        def hook(_backbone, inputs):
            if student.training and torch.is_grad_enabled() and not self._paused:
                self._images = inputs[0]

        return hook

    @property
    def tap_names(self) -> list[str]:
        return list(self._student.taps)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher's BN statistics never move
        return self

    def add_to(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``losses`` (times ``gt_weight``, ``DISTILL.GT_WEIGHT``) plus this step's terms;
        only the terms when ``label_free``. What a student's training forward returns."""
        if self.gt_weight != 1.0:
            losses = {k: v * self.gt_weight for k, v in losses.items()}
        terms = self(losses)
        return terms if self.label_free else {**losses, **terms}

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> dict:
        """The teacher's taps on ``images``, running only the parts of it they need."""
        self._teacher.recording = True
        try:
            device = next(self.teacher.parameters()).device
            if hasattr(self.teacher, "forward_taps"):
                self.teacher.forward_taps(images.to(device), self._teacher_paths)
            else:  # any Detectron2 model: its taps are in its backbone (check_tap_path)
                self.teacher.backbone(images.to(device))
        finally:
            self._teacher.recording = False
        return self._teacher.pop()

    def forward(self, gt_losses: dict) -> dict:
        """This step's terms, from the student's taps kept during its forward."""
        student, images = self._student.pop(), self._images
        self._images = None
        if images is None:
            raise RuntimeError(
                "the distiller got no input batch: the student's backbone did not run in "
                "training mode before its losses"
            )
        missing = [n for n in self.tap_names if n not in student]
        if missing:
            raise RuntimeError(
                f"the student's forward did not produce the taps {missing}: taps must lie on "
                "the training forward path (backbone, head)"
            )
        teacher = self.teacher_features(images)
        losses = {f"loss_distill_{t.name}": t(student, teacher) for t in self.terms}
        total = sum(losses.values()) + sum(gt_losses.values())
        values = torch.stack([*losses.values(), total]).detach().double().cpu()  # one sync
        storage, total_value = get_event_storage(), values[-1].item()
        shares = (values[:-1] / total_value).tolist() if total_value else [1.0] * len(losses)
        storage.put_scalar("distill_ratio", sum(shares) if total_value else 1.0)
        for term, share in zip(self.terms, shares):
            storage.put_scalar(f"distill_ratio/{term.name}", share)
        self._check_shares(values)
        return losses

    def _check_shares(self, values: torch.Tensor) -> None:
        """Warn once about terms that stay below LOW_SHARE of the loss (mean term over mean
        total) in the first SHARE_CHECK_ITERS steps, naming the weight that would make the
        term TARGET_SHARE: w' = w * TARGET / (1 - TARGET) * (L - T) / T."""
        if self._share_steps >= SHARE_CHECK_ITERS:
            return
        self._share_sums += values
        self._share_steps += 1
        if self._share_steps < SHARE_CHECK_ITERS or not comm.is_main_process():
            return
        total = self._share_sums[-1].item()
        for term, summed in zip(self.terms, self._share_sums[:-1].tolist()):
            if term.weight == 0 or total <= 0 or summed / total >= LOW_SHARE:
                continue
            share = summed / total
            if summed > 0:
                weight = term.weight * TARGET_SHARE / (1 - TARGET_SHARE) * (total - summed) / summed
                text = f"{weight:.3g}"
                fix = f"{term.weight_key} {text if '.' in text or 'e' in text else text + '.0'}"
            else:
                fix = "no weight (it is 0 throughout)"
            logger.warning(
                "distillation term %s is %.2g%% of the loss over the first %d iterations "
                "(%s %g); %s would make it 1/%d",
                term.name, 100 * share, SHARE_CHECK_ITERS, term.weight_key, term.weight,
                fix, round(1 / TARGET_SHARE),
            )  # fmt: skip


def attach_distiller(
    student: nn.Module,
    teacher: nn.Module,
    terms: Mapping[str, Mapping] | list[TermSpec],
    label_free: bool = False,
    gt_weight: float = 1.0,
) -> Distiller:
    """Distil ``teacher`` (frozen, on the student's device) into ``student``, any Detectron2
    model with a ``backbone``: ``terms`` as :func:`specs_from_terms` takes them, e.g.
    ``{"qfd": {"taps": ["p3"], "weight": 1.0}, "fa": {"taps": ["res4"], "weight": 6.0}}``.
    The terms join the student's training losses (``loss_distill_<loss>``); with
    ``label_free`` they are its only losses. Returns the distiller (``remove()`` detaches)."""
    for model, what in ((student, "student"), (teacher, "teacher")):
        if not hasattr(model, "backbone"):
            raise ValueError(
                f"the {what} ({type(model).__name__}) has no backbone: distillation reads the "
                "student's normalised batch at its backbone's input, and runs the teacher's"
            )
    device = next(student.parameters()).device
    distiller = Distiller(student, teacher.to(device), specs_from_terms(terms)).to(device)
    distiller.label_free, distiller.gt_weight = label_free, gt_weight
    if hasattr(student, "attach_distiller"):  # qdet's meta-architectures add the terms
        student.attach_distiller(distiller)
        return distiller

    def add_terms(model, _inputs, output):
        if model.training and torch.is_grad_enabled() and isinstance(output, dict):
            return distiller.add_to(output)
        return output

    distiller._hooks.append(student.register_forward_hook(add_terms))
    return distiller
