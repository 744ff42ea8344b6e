"""Taps: named places in a model whose output a distillation term reads.

A tap is one of
- a backbone output: ``p3`` ... ``p7`` of an FPN, ``res2`` ... ``res5`` of its ResNet
  (the backbone's and its bottom-up network's ``output_shape()`` names);
- a module path in ``model.named_modules()``, e.g. ``backbone.bottom_up.res4.1.conv2``
  or ``backbone.net.blocks.3``: that module's output (ViT and Swin blocks' tokens as
  B x C x H x W maps);
- ``logits``: the head's class logits before any sigmoid/softmax, shaped (N, R, K) for a
  detector's R anchors (RetinaNet: all levels, Detectron2's anchor order) or (N, K) for
  a classifier. Models say where theirs are with a ``logits_tap()`` method.

A pattern expands to many taps: ``residual_branches`` is every residual block's branch
output before the addition (AKT's taps: the block's last conv, whose Detectron2 Conv2d
holds its norm), and a name with ``*``, ``?`` or ``[`` is a glob over module paths
(``backbone.bottom_up.res*.0``).

:class:`TapRecorder` registers one forward hook per tapped module, once, and keeps the
outputs of the current forward only while recording.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch
from detectron2.layers import CNNBlockBase
from detectron2.modeling.backbone.swin import SwinTransformerBlock
from detectron2.modeling.backbone.vit import Block
from torch import nn

LOGITS = "logits"
RESIDUAL_BRANCHES = "residual_branches"
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Tap:
    """Where a tap reads: ``module``'s output, through ``select`` (a dict key or a function)."""

    name: str
    path: str  # module path of the hooked module ("" = the model itself)
    select: str | Callable | None = None  # output[key], fn(output) or the output itself
    # Keep a copy: a module's own output may be changed in place afterwards (a residual
    # block adds its shortcut to its last conv's output); dict outputs and logits are not.
    copy: bool = False

    def read(self, output):
        if self.select is None:
            return output
        if callable(self.select):
            return self.select(output)
        return output[self.select]


def named_outputs(model: nn.Module) -> dict[str, str]:
    """Backbone output name -> module path that returns it in a dict (FPN, then bottom-up)."""
    backbone = getattr(model, "backbone", None)
    nets = {"backbone": backbone, "backbone.bottom_up": getattr(backbone, "bottom_up", None)}
    out: dict[str, str] = {}
    for path, net in nets.items():
        if net is not None and hasattr(net, "output_shape"):
            for name in net.output_shape():
                out.setdefault(name, path)
    return out


def residual_branches(model: nn.Module) -> list[str]:
    """Module paths of every residual block's branch output, before the addition.

    A block is a Detectron2 ``CNNBlockBase`` (``BasicBlock``: ``conv2``; ``BottleneckBlock``:
    ``conv3``) or any module naming its branch end in a ``residual_branch`` attribute.
    """
    paths = []
    for path, module in model.named_modules():
        branch = getattr(module, "residual_branch", None)
        if branch is None and isinstance(module, CNNBlockBase):
            branch = "conv3" if hasattr(module, "conv3") else "conv2"
        if branch is not None and hasattr(module, branch):
            paths.append(f"{path}.{branch}" if path else branch)
    return paths


def available_taps(model: nn.Module) -> list[str]:
    """Every name a tap can take on ``model`` (patterns aside)."""
    names = list(named_outputs(model))
    if hasattr(model, "logits_tap"):
        names.append(LOGITS)
    return names + [p for p, _ in model.named_modules() if p]


def _unknown(model: nn.Module, name: str, what: str) -> ValueError:
    candidates = available_taps(model)
    near = difflib.get_close_matches(name, candidates, n=6, cutoff=0.6)
    shown = near or list(named_outputs(model)) + ([LOGITS] if hasattr(model, "logits_tap") else [])
    return ValueError(
        f"tap {name!r} is not in the {what} ({type(model).__name__}): near names {shown}. A "
        "tap is a backbone output (p3, res4, ...), a module path from model.named_modules(), "
        f"{LOGITS!r}, {RESIDUAL_BRANCHES!r} or a glob over module paths"
    )


def expand_taps(model: nn.Module, patterns: list[str], what: str = "model") -> list[str]:
    """Tap names from names and patterns, in order, each once."""
    names: list[str] = []
    for pattern in patterns:
        if pattern == RESIDUAL_BRANCHES:
            found = residual_branches(model)
        elif any(c in pattern for c in _GLOB_CHARS):
            found = [p for p, _ in model.named_modules() if p and fnmatch.fnmatchcase(p, pattern)]
        else:
            found = [pattern]
        if not found:
            raise ValueError(
                f"tap pattern {pattern!r} matches nothing in the {what} "
                f"({type(model).__name__}); module paths look like "
                f"{[p for p, _ in model.named_modules() if p][:6]}"
            )
        names += [n for n in found if n not in names]
    return names


def resolve_tap(model: nn.Module, name: str, what: str = "model") -> Tap:
    """The :class:`Tap` called ``name`` on ``model``, or an error listing near names."""
    if name == LOGITS:
        if not hasattr(model, "logits_tap"):
            raise ValueError(
                f"tap {LOGITS!r}: {type(model).__name__} (the {what}) has no class-logits tap; "
                "use feature taps (backbone outputs or module paths)"
            )
        path, select = model.logits_tap()
        return Tap(name, path, select)
    outputs = named_outputs(model)
    if name in outputs:
        return Tap(name, outputs[name], name)
    modules = dict(model.named_modules())
    if name and name in modules:
        return Tap(name, name, _as_nchw(modules[name]), copy=True)
    raise _unknown(model, name, what)


def _as_nchw(module: nn.Module) -> Callable | None:
    """Transformer blocks keep tokens channels-last; taps hand maps over as B x C x H x W,
    the layout the feature losses read (ViT blocks: B x H x W x C; Swin blocks: B x HW x C
    with the block's H and W)."""
    if isinstance(module, Block):
        return lambda x: x.permute(0, 3, 1, 2)
    if isinstance(module, SwinTransformerBlock):
        return lambda x: x.transpose(1, 2).reshape(x.shape[0], x.shape[2], module.H, module.W)
    return None


class TapRecorder:
    """Keeps the outputs of ``taps`` of ``model``'s forward passes while :attr:`recording`
    (or while ``when()`` is true).

    One forward hook per tapped module, registered here once. It keeps each output (a copy
    for module outputs, see :class:`Tap`; with its graph, for a student); :meth:`pop` hands
    them over and forgets them, so nothing outlives a step. A module that runs twice in one
    recorded forward is an error: its tap would be ambiguous.
    """

    def __init__(self, model: nn.Module, taps: list[Tap], when: Callable[[], bool] | None = None):
        self.taps = {t.name: t for t in taps}
        self.recording = False
        self._when = when
        self.features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        by_path: dict[str, list[Tap]] = {}
        for tap in taps:
            by_path.setdefault(tap.path, []).append(tap)
        self._handles = [
            modules[path].register_forward_hook(self._hook(path_taps))
            for path, path_taps in by_path.items()
        ]

    def _hook(self, taps: list[Tap]):
        def hook(_module, _inputs, output):
            if self.recording or (self._when is not None and self._when()):
                for tap in taps:
                    if tap.name in self.features:
                        raise RuntimeError(
                            f"tap {tap.name!r}: module {tap.path!r} ran twice in one forward "
                            "(RetinaNet's head convs run once per FPN level); tap a module "
                            "that runs once, such as a backbone output or 'logits'"
                        )
                    feature = tap.read(output)
                    self.features[tap.name] = feature.clone() if tap.copy else feature

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
