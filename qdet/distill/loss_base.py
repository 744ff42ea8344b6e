"""The distillation-loss registry and the base class every loss shares.

A loss is built from its config name and lowercase keyword options
(``build_distill_loss("fa", norm="l1")``) and called on two lists with one tensor per tap:
``loss(students, teachers)`` -> scalar. The base class checks the options and the tap
lists, so each loss only states its formula.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from fvcore.common.registry import Registry
from torch import nn

DISTILL_LOSS_REGISTRY = Registry("DISTILL_LOSS")
DISTILL_LOSS_REGISTRY.__doc__ = """Distillation losses: ``loss(students, teachers)``.

Class attributes: ``name`` (the config name, ``DISTILL.LOSS``), ``kind`` ("feature":
B x C x H x W maps, or "logits": tensors whose last dim is the classes) and
``quantized_teacher`` (the teacher's feature comes from its feature quantizer, QFD)."""


class DistillLoss(nn.Module):
    """Base class: option checks and tap pairing. Subclasses declare their options as
    keyword-only ``__init__`` arguments with defaults, followed by ``**unknown``."""

    name: str = ""
    kind: str = "feature"
    quantized_teacher: bool = False
    # Whether its config node offers FAQD's connector (DISTILL.<NAME>.CONNECTOR).
    takes_connector: bool = False

    @classmethod
    def options(cls) -> dict:
        """The loss's options and their defaults, from its ``__init__`` signature."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}

    def reject_unknown(self, unknown: dict) -> None:
        if unknown:
            bad = sorted(unknown)[0]
            valid = ", ".join(sorted(self.options())) or "none"
            raise ValueError(
                f"distillation loss {self.name!r} has no option {bad!r}: valid options: {valid}"
            )

    def check_choice(self, option: str, value, choices: Sequence) -> None:
        # ``type(value) is type(c)`` keeps True from passing as 1 (and 1 as True).
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ValueError(
                f"distillation loss {self.name!r}: {option}={value!r} is invalid: "
                f"valid values: {', '.join(repr(c) for c in choices)}"
            )

    def check_positive(self, option: str, value, integer: bool = False) -> None:
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
            want = "an integer >= 1" if integer else "a number > 0"
            raise ValueError(
                f"distillation loss {self.name!r}: {option}={value!r} is invalid: "
                f"valid values: {want}"
            )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options())

    def pairs(
        self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(student, teacher)`` per tap, the teacher cast to the student's dtype."""
        if isinstance(students, torch.Tensor) or isinstance(teachers, torch.Tensor):
            # A bare tensor would iterate over its batch: demand the list explicitly.
            raise TypeError(
                f"distillation loss {self.name!r} takes lists with one tensor per tap: "
                "call loss([f_student], [f_teacher])"
            )
        if len(students) != len(teachers) or not students:
            raise ValueError(
                f"distillation loss {self.name!r}: {len(students)} student taps and "
                f"{len(teachers)} teacher taps: pass one tensor per tap, at least one, "
                "in the same order"
            )
        return [(s, t.to(s.dtype)) for s, t in zip(students, teachers)]

    def shape_error(self, tap: int, s: torch.Tensor, t: torch.Tensor, why: str) -> ValueError:
        return ValueError(
            f"distillation loss {self.name!r}, tap {tap}: student shape {tuple(s.shape)} "
            f"and teacher shape {tuple(t.shape)}: {why}"
        )

    def check_maps(self, tap: int, s: torch.Tensor, t: torch.Tensor, same_size: bool) -> None:
        """Both B x C x H x W with the same batch; with ``same_size`` the same H x W too.
        Channels may differ (affinity losses); losses that need equal C check it."""
        if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0]:
            raise self.shape_error(tap, s, t, "need B x C x H x W maps with the same batch")
        if same_size and s.shape[-2:] != t.shape[-2:]:
            raise self.shape_error(
                tap, s, t, "spatial sizes must match: use a tap of the same stride"
            )

    def channels_differ(self, s: torch.Tensor, t: torch.Tensor) -> str:
        fix = (
            f"use DISTILL.{self.name.upper()}.CONNECTOR True or a different tap"
            if self.takes_connector
            else "use a tap whose channels match in both models"
        )
        return f"channels differ ({s.shape[1]} vs {t.shape[1]}): {fix}"

    def check_channels(self, tap: int, s: torch.Tensor, t: torch.Tensor) -> None:
        if s.shape[1] != t.shape[1]:
            raise self.shape_error(tap, s, t, self.channels_differ(s, t))


def reduce_batch(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    """``mean`` or ``sum`` of per-image values."""
    return per_image.mean() if reduction == "mean" else per_image.sum()
